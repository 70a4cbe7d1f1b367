# Quick look at a load and unload, with the kernel log.
. /tests/lib.sh
check insmod insmod /lib/modules/uxen.ko log_e9=1
echo alive-1; uxtest drain
uxtest cpuid 0x40000000
echo alive-2; uxtest drain
taskset -c 1 uxtest cpuid 0x40000000
echo alive-3; uxtest drain
dmesg | grep uxen | tail -30
uxenctl version
check rmmod rmmod uxen
dmesg | grep uxen | tail -8
uxtest cpuid 0x40000000
finish
