# Linux guests: the boot of a 64 MiB guest to its shell prompt, in emulated
# TSC ticks (Bochs advances the TSC with emulated instructions) and in wall
# seconds (the runner times the UXEN-MARK lines); then the exits of the idle
# guest per emulated second, by reason, against the host alone idle over
# the same time. Then clones: the fork of a booted 64 MiB and 256 MiB guest
# against their boots, the time from a fork to the clone's first answer,
# the frames of 1 to 32 clones each after a command, and the frames of 8
# separately booted guests before and after a merge.
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
# fork_tsc VM: forks once; prints the hypervisor's cost and the child's id.
fork_tsc() {
    _j=$(fork_vm "$1" --json) || return 1
    printf '%s' "$_j" | sed -n 's/.*"id":\([0-9]*\),"tsc":\([0-9]*\).*/\2 \1/p'
}

# fork_cost VM: the median cost of three forks (children destroyed).
fork_cost() {
    _c=""
    for _i in 1 2 3; do
        _r=$(fork_tsc "$1")
        _t=${_r% *}
        _k=${_r#* }
        [ -n "$_r" ] && uxenctl destroy "$_k" && wait_gone "$_k"
        _c="$_c ${_t:-none}"
    done
    median $_c
}


# The fork of the booted 64 MiB guest, and the time to the clone's answer.
cost64=$(fork_cost "$a"); ok64=$?
t0=$(uxtest rdtsc)
set -- $(fork_tsc "$a")
k=${2:-}
tf=$(uxtest rdtsc)
ask "$k" 'echo first-answer' '^first-answer'; first_ok=$?
t1=$(uxtest rdtsc)
# What a bare rdtsc costs, to read the figures against.
t2=$(uxtest rdtsc)
info "first answer: $((tf - t0)) ticks to the end of \`uxenctl fork\`, $((t1 - tf)) to the answer; a bare \`uxtest rdtsc\` $((t2 - t1))"
[ -n "$k" ] && uxenctl destroy "$k" && wait_gone "$k"
if [ $ok64 -eq 0 ] && [ $first_ok -eq 0 ]; then pass fork-64-measured; else fail fork-64-measured "cost '$cost64', first answer $first_ok"; fi
echo "UXEN-BENCH: linux-fork mem_mib=64 fork=$cost64 boot=$boot first_answer=$((t1 - t0))"

# A 256 MiB guest: its boot, and its fork.
t0=$(uxtest rdtsc)
b=$(taskset -c 1 uxenctl create --kernel $K --initrd $I --mem 256 --name bench256)
check boot-256 wait_console "$b" "uxen-guest: ready" 15000
t1=$(uxtest rdtsc)
cost256=$(fork_cost "$b"); ok256=$?
if [ $ok256 -eq 0 ]; then pass fork-256-measured; else fail fork-256-measured "cost '$cost256'"; fi
echo "UXEN-BENCH: linux-fork mem_mib=256 fork=$cost256 boot=$((t1 - t0))"
uxenctl destroy "$b"; wait_gone "$b"

# Clones of the 64 MiB guest, each after one command: frames in use for
# 1 (the guest alone) to 33 guests.
frames=""
n=1
kids=""
f=$(pool_used)
frames="1:$f"
for step in 1 3 4 8 16; do
    new=$(fork_vm "$a" --count $step --json | grep -o '"id":[0-9]*' | cut -d: -f2)
    for c in $new; do
        ask "$c" "echo clone-$c-ran" "^clone-$c-ran" || fail "clone-$c-answers" "no answer"
    done
    kids="$kids $new"
    n=$((n + step))
    frames="$frames $n:$(pool_used)"
done
expect_eq clones-made "$(printf '%s\n' $kids | grep -c .)" 32
echo "UXEN-BENCH: linux-clones $frames"
for c in $kids; do uxenctl destroy "$c"; done
for c in $kids; do wait_gone "$c"; done
check destroy uxenctl destroy "$a"
wait_gone "$a"

# Eight guests booted one by one, each to its shell: the frames after each
# boot; then a merge, and the frames as they are destroyed again.
base=$(pool_used)
sep=""
merged=""
guests=""
for i in 1 2 3 4 5 6 7 8; do
    g=$(uxenctl create --kernel $K --initrd $I --mem 64 --name "sep$i")
    check "sep$i-boots" wait_console "$g" "uxen-guest: ready" 15000
    ask "$g" "echo sep-$i-ran" "^sep-$i-ran" || fail "sep$i-answers" "no answer"
    guests="$g $guests"
    sep="$sep $i:$(($(pool_used) - base))"
done
echo "UXEN-BENCH: linux-separate $sep"
m=$(uxenctl merge --json)
info "merge: $m"
i=8
for g in $guests; do
    merged="$i:$(($(pool_used) - base)) $merged"
    uxenctl destroy "$g"; wait_gone "$g"
    i=$((i - 1))
done
echo "UXEN-BENCH: linux-merged $merged"
check rmmod rmmod uxen
finish
