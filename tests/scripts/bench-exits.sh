# Exit costs: a CPUID round trip through the hypervisor against the same
# CPUID on the bare machine; then the host VM's exits per CPU, by reason,
# per million emulated TSC ticks (Bochs advances the TSC with emulated
# instructions) under three host workloads: idle, a checksum and fork
# storm, and an interrupt storm (IPI ping-pong between the CPUs with timers
# at a high rate). Each window prints the stats before and after it, whole,
# for `cargo xtask bench exits` to set apart by CPU and reason.
. /tests/lib.sh

# cost1 N: the per-CPUID TSC on CPU 0 over N CPUIDs.
cost1() {
    taskset -c 0 uxtest cpuid-cost "$1" | sed -n 's/.*cpuid_tsc=\([0-9]*\).*/\1/p'
}

# cost N: the median of three; nothing, and a failure, if a run failed.
cost() {
    median "$(cost1 "$1")" "$(cost1 "$1")" "$(cost1 "$1")"
}

native=$(cost 20000); native_ok=$?
check insmod insmod /lib/modules/uxen.ko
virt=$(cost 20000); virt_ok=$?
if [ $native_ok -eq 0 ] && [ $virt_ok -eq 0 ]; then
    pass cpuid-measured
    echo "UXEN-BENCH: cpuid native=$native virtualized=$virt"
else
    fail cpuid-measured "native '$native' virt '$virt'"
fi

# storm: the host workload of the late-launch suite, on both CPUs.
storm() {
    uxtest checksum 8 >/dev/null &
    taskset -c 1 uxtest checksum 8 >/dev/null
    wait
    uxtest forkstorm 50 >/dev/null
}

# irqs: rescheduling IPIs both ways and each CPU's timer every 100 us.
irqs() {
    uxtest irqstorm 20000 20000 100 >/tmp/irqstorm.out
}

# window NAME CMD...: the stats and the TSC around CMD, which must succeed.
window() {
    _name=$1
    shift
    _t0=$(uxtest rdtsc)
    _j0=$(stats_json)
    if "$@"; then pass "workload-$_name"; else fail "workload-$_name" "exit status $?"; fi
    _j1=$(stats_json)
    _t1=$(uxtest rdtsc)
    if [ -n "$_j0" ] && [ -n "$_j1" ] && [ "$_t1" -gt "$_t0" ]; then
        echo "UXEN-EXITS: $_name before tsc=$_t0 $_j0"
        echo "UXEN-EXITS: $_name after tsc=$_t1 $_j1"
        pass "exits-measured-$_name"
    else
        fail "exits-measured-$_name" "no stats or TSC around the window"
    fi
}

window idle usleep 4000000
window storm storm
window irqs irqs
expect_match irqstorm-ran "$(cat /tmp/irqstorm.out)" '^rounds=20000 sleeps=40000$'
check rmmod rmmod uxen
finish
