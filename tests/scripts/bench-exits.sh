# Exit costs: a CPUID round trip through the hypervisor against the same
# CPUID on the bare machine, and host VM exits per million emulated TSC
# ticks (Bochs advances the TSC with emulated instructions) while the host
# works, against the same host idle.
. /tests/lib.sh

# exits_total: host exits on every CPU, from the stats.
exits_total() {
    stats_json | grep -o '"host_exits":[0-9]*' | cut -d: -f2 | awk '{s += $1} END {print s}'
}

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

# workload: the host workload of the late-launch suite, on both CPUs.
workload() {
    uxtest checksum 8 >/dev/null &
    taskset -c 1 uxtest checksum 8 >/dev/null
    wait
    uxtest forkstorm 50 >/dev/null
}

# A window of host activity: exits and TSC ticks across it.
measure() {
    e0=$(exits_total)
    t0=$(uxtest rdtsc)
    "$@"
    t1=$(uxtest rdtsc)
    e1=$(exits_total)
    echo "$((e1 - e0)) $((t1 - t0))"
}

set -- $(measure usleep 2000000)
idle_exits=$1; idle_tsc=$2
set -- $(measure workload)
work_exits=$1; work_tsc=$2
if [ "$work_tsc" -gt 0 ] && [ "$idle_tsc" -gt 0 ]; then pass exits-measured; else fail exits-measured "idle $idle_tsc work $work_tsc"; fi
echo "UXEN-BENCH: exits idle_exits=$idle_exits idle_tsc=$idle_tsc work_exits=$work_exits work_tsc=$work_tsc"
check rmmod rmmod uxen
finish
