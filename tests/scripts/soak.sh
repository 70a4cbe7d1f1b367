# Soak (`cargo xtask soak`): insmod/rmmod cycles with VMs created, forked
# and destroyed by the thousand in between, then a long ioctl fuzz and the
# VM limits. No frame may stay in the hypervisor's pool and no page with
# the driver. Sizes come from the kernel command line (uxen.soak_cycles,
# uxen.soak_ops, uxen.soak_calls, uxen.seed).
. /tests/lib.sh

param() {
    _v=$(sed -n "s/.*uxen\.$1=\([0-9]*\).*/\1/p" /proc/cmdline)
    echo "${_v:-$2}"
}
CYCLES=$(param soak_cycles 20)
OPS=$(param soak_ops 1000)
CALLS=$(param soak_calls 50000)
SEED=$(param seed 11)
info "soak: $CYCLES insmod/rmmod cycles, $OPS create/fork/destroy operations, $CALLS fuzzed calls, seed $SEED"

memfree() {
    sed -n 's/^MemFree: *\([0-9]*\) kB/\1/p' /proc/meminfo
}

# One unmeasured cycle first: what a first load allocates for good (slab
# caches, the misc device) is not a leak.
insmod /lib/modules/uxen.ko && uxenctl run /guests/hello >/dev/null && rmmod uxen
m0=$(memfree)
per=$(((OPS + CYCLES - 1) / CYCLES))
cycles=0
ops=0
for i in $(seq "$CYCLES"); do
    if ! insmod /lib/modules/uxen.ko; then
        fail "soak-cycle-$i" "insmod failed"
        continue
    fi
    out=$(uxtest vm-churn --ops $per --seed $((SEED + i)) 2>&1); rc=$?
    line=$(printf '%s\n' "$out" | grep '^vm-churn:' | tail -n1)
    n=$(printf '%s' "$line" | sed -n 's/.* ops=\([0-9]*\) .*/\1/p')
    ops=$((ops + ${n:-0}))
    # The VMM's path too: a guest that forks itself.
    uxenctl run /guests/forker --mem 4 --cmdline n=1 >/tmp/soak-forker.out 2>&1; frc=$?
    left=$(uxenctl list --json)
    total=$(pool_total)
    if [ $rc -eq 0 ] && [ $frc -eq 0 ] && [ "$left" = "[]" ] && [ "$total" = 0 ] && rmmod uxen; then
        cycles=$((cycles + 1))
    else
        fail "soak-cycle-$i" "churn rc=$rc ($line), forker rc=$frc, VMs $left, pool $total frames"
        printf '%s\n' "$out" | tail -n 20 | sed 's/^/    /'
        rmmod uxen 2>/dev/null
    fi
    [ $((i % 5)) -eq 0 ] && info "soak: $i cycles, $ops operations, MemFree $(memfree) kB"
done
expect_eq soak-insmod-rmmod-cycles "$cycles" "$CYCLES"
if [ "$ops" -ge "$OPS" ]; then pass soak-create-fork-destroy-ops; else fail soak-create-fork-destroy-ops "$ops < $OPS"; fi
m1=$(memfree)
info "soak: MemFree $m0 kB before the cycles, $m1 kB after"
# A page kept per cycle would show as megabytes over the cycles; allow
# for the kernel's own caches.
if [ $((m0 - m1)) -lt 4096 ]; then pass soak-no-pages-kept-by-the-driver; else fail soak-no-pages-kept-by-the-driver "$((m0 - m1)) kB fewer free"; fi

check soak-insmod-fuzz insmod /lib/modules/uxen.ko debug=1
out=$(uxtest ioctl-fuzz --seed "$SEED" --calls "$CALLS" 2>&1); rc=$?
printf '%s\n' "$out" | grep -v '^ioctl-fuzz: [0-9]* calls,' | tail -n 45 | sed 's/^/    /'
sum=$(printf '%s\n' "$out" | grep '^ioctl-fuzz: seed=')
expect_eq soak-ioctl-fuzz-rc "$rc" 0
expect_match soak-ioctl-fuzz-every-call-as-specified "$sum" ' mismatches=0 '
expect_match soak-ioctl-fuzz-no-frame-leaked "$sum" ' frames_leaked=0 '
out=$(uxtest vm-limit 2>&1); rc=$?
printf '%s\n' "$out" | tail -n 12 | sed 's/^/    /'
expect_eq soak-vm-limit-rc "$rc" 0
expect_eq soak-no-vms-left "$(uxenctl list --json)" "[]"
expect_eq soak-pool-returned "$(pool_total)" 0
expect_match soak-hv-intact "$(stats_json)" '"image_intact":true'
check soak-rmmod rmmod uxen
finish
