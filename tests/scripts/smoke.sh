. /tests/lib.sh
check insmod insmod /lib/modules/uxen.ko log_e9=1
check cpu1-offline sh -c 'echo 0 > /sys/devices/system/cpu/cpu1/online'
check cpu1-online sh -c 'echo 1 > /sys/devices/system/cpu/cpu1/online'
dmesg | tail -20
finish
