# Linux guests: the boot of a 64 MiB guest to its shell prompt, in emulated
# TSC ticks (Bochs advances the TSC with emulated instructions) and in wall
# seconds (the runner times the UXEN-MARK lines); then the exits of the idle
# guest per emulated second, by reason, against the host alone idle over
# the same time.
. /tests/lib.sh
check insmod insmod /lib/modules/uxen.ko
K=/linux-guest/bzImage
I=/linux-guest/initramfs.cpio.gz
# The TSC rate Linux uses (the boot messages went to /tmp/boot.dmesg).
khz=$( (cat /tmp/boot.dmesg 2>/dev/null; dmesg) | sed -n 's/.*tsc: Detected \([0-9]*\)\.\([0-9]*\) MHz.*/\1\2/p' | head -n1)
[ -n "$khz" ] && pass tsc-rate || fail tsc-rate "no TSC rate in the kernel log"

# reasons SIDE: the totals by reason of one side of the stats' "exits"
# (1: the host VM, 2: the guests), as "name=N" lines.
reasons() {
    stats_json | sed -n "s/.*\"exits\":{\"host\":{\"total\":{\([^}]*\)}.*\"guest\":{\"total\":{\([^}]*\)}.*/\\$1/p" \
        | tr ',' '\n' | tr -d '"' | tr ':' '='
}
# delta BEFORE AFTER: the "name=N" lines of AFTER less BEFORE, the non-zero
# ones, as words.
delta() {
    { printf '%s\n' "$1" | sed 's/^/B /'; printf '%s\n' "$2" | sed 's/^/A /'; } | awk '
        NF == 2 { split($2, kv, "="); if ($1 == "B") b[kv[1]] = kv[2]; else a[kv[1]] = kv[2] }
        END { for (k in a) if (a[k] - b[k] > 0) printf "%s=%d ", k, a[k] - b[k] }'
}
# window SECS SIDE: exits of SIDE (1 or 2) by reason over SECS emulated seconds.
window() {
    _b=$(reasons "$2")
    usleep $(($1 * 1000000))
    _a=$(reasons "$2")
    delta "$_b" "$_a"
}

# The host alone, idle: the baseline.
host_idle=$(window 10 1)
echo "UXEN-BENCH: linux-host-idle secs=10 $host_idle"

# The boot, on CPU 1; this shell polls the console from CPU 0.
echo "UXEN-MARK: boot-start"
t0=$(uxtest rdtsc)
a=$(taskset -c 1 uxenctl create --kernel $K --initrd $I --mem 64 --name bench)
check boot-to-shell wait_console "$a" "uxen-guest: ready" 15000
t1=$(uxtest rdtsc)
echo "UXEN-MARK: boot-end"
boot=$((t1 - t0))
[ "$boot" -gt 0 ] && pass boot-measured || fail boot-measured "ticks $boot"
echo "UXEN-BENCH: linux-boot mem_mib=64 ticks=$boot tsc_khz=$khz"

# The idle guest: its exits over 10 emulated seconds, after it settles.
usleep 3000000
guest_idle=$(window 10 2)
host_busy=$(window 10 1)
[ -n "$guest_idle" ] && pass guest-exits-counted || fail guest-exits-counted "no guest exits counted"
echo "UXEN-BENCH: linux-guest-idle secs=10 $guest_idle"
echo "UXEN-BENCH: linux-host-with-guest secs=10 $host_busy"
check destroy uxenctl destroy "$a"
wait_gone "$a"
check rmmod rmmod uxen
finish
