# Helpers for the in-guest suites. Each check prints one marker line:
#   UXEN-TEST: PASS <name>
#   UXEN-TEST: FAIL <name>: <why>
# and the suite's exit status is the number of failed checks.

FAILED=0
PASSED=0

pass() {
    echo "UXEN-TEST: PASS $1"
    PASSED=$((PASSED + 1))
}

fail() {
    echo "UXEN-TEST: FAIL $1: $2"
    FAILED=$((FAILED + 1))
}

# check NAME CMD...: passes when CMD exits 0.
check() {
    _name=$1
    shift
    if "$@" >/tmp/check.out 2>&1; then
        pass "$_name"
    else
        fail "$_name" "exit $? from '$*': $(tail -c 400 /tmp/check.out | tr '\n' ' ')"
    fi
}

# check_fails NAME CMD...: passes when CMD exits non-zero.
check_fails() {
    _name=$1
    shift
    if "$@" >/tmp/check.out 2>&1; then
        fail "$_name" "'$*' succeeded but must fail: $(tail -c 300 /tmp/check.out | tr '\n' ' ')"
    else
        pass "$_name"
    fi
}

# expect_eq NAME GOT WANT
expect_eq() {
    if [ "$2" = "$3" ]; then
        pass "$1"
    else
        fail "$1" "got '$2', want '$3'"
    fi
}

# expect_same NAME A B: A and B are the same value, and there is a value:
# two commands that both printed nothing agree, yet show nothing.
expect_same() {
    if [ -z "$2" ] || [ -z "$3" ]; then
        fail "$1" "no value to compare: got '$2', want '$3'"
    else
        expect_eq "$1" "$2" "$3"
    fi
}

# expect_match NAME TEXT REGEX (grep -E)
expect_match() {
    if printf '%s\n' "$2" | grep -qE "$3"; then
        pass "$1"
    else
        fail "$1" "'$(printf '%s' "$2" | tr '\n' ' ' | tail -c 300)' does not match /$3/"
    fi
}

info() {
    echo "UXEN-INFO: $*"
}

# No oops, BUG or warning in the kernel log.
check_kernel_clean() {
    if dmesg | grep -E 'Oops|BUG:|WARNING:|general protection|Call Trace|Kernel panic|NMI received for unknown reason' >/tmp/oops.out; then
        fail "${1:-kernel-log-clean}" "$(head -c 600 /tmp/oops.out | tr '\n' ' ')"
    else
        pass "${1:-kernel-log-clean}"
    fi
}

# Ends the suite: exit status is the number of failures.
finish() {
    check_kernel_clean
    info "$PASSED passed, $FAILED failed"
    exit "$FAILED"
}

# jnum JSON KEY: the first number after "KEY": in JSON text.
jnum() {
    printf '%s' "$1" | sed -n "s/.*\"$2\":\([0-9-]*\).*/\1/p" | head -n1
}

# verdict JSON NAME: the verdict (ok, warning, blocker) of the finding NAME
# in `uxenctl check --json`; empty when there is no such finding.
verdict() {
    printf '%s' "$1" | sed -n "s/.*{\"name\":\"$2\",\"verdict\":\"\([a-z]*\)\".*/\1/p" | head -n1
}

# The hypervisor's vendor text at CPUID 0x40000000 (EBX, ECX, EDX).
SIG=uXenRsUXenRs

# cpuid_line CPU LEAF: `uxtest cpuid` on CPU: EAX EBX ECX EDX in hex, then
# the text of EBX ECX EDX ('.' for what is not printable).
cpuid_line() {
    taskset -c "$1" uxtest cpuid "$2" 2>&1
}

# signature CPU: the CPUID 0x40000000 vendor text seen on CPU; empty when
# uxtest failed, so only a comparison with $SIG may rest on it.
signature() {
    taskset -c "$1" uxtest cpuid 0x40000000 | awk '{print $5}'
}

# expect_native NAME CPU [BARE]: CPU answers CPUID 0x40000000 and the
# hypervisor does not: a whole line of four registers and their text, not
# $SIG (and, given BARE, the line the bare CPU gave). No answer fails: a
# uxtest that printed nothing is not a CPU without the hypervisor.
expect_native() {
    _l=$(cpuid_line "$2" 0x40000000)
    if [ "$(printf '%s\n' "$_l" | wc -l)" -ne 1 ] \
        || ! printf '%s\n' "$_l" | grep -qxE '[0-9a-f]{8}( [0-9a-f]{8}){3} [[:graph:]]{12}'; then
        fail "$1" "no CPUID 0x40000000 answer on cpu$2: '$_l'"
    elif [ "$(printf '%s' "$_l" | awk '{print $5}')" = "$SIG" ]; then
        fail "$1" "the hypervisor answers on cpu$2: $_l"
    elif [ -n "${3+set}" ] && [ "$_l" != "$3" ]; then
        fail "$1" "cpu$2 answers '$_l', the bare CPU '$3'"
    else
        pass "$1"
    fi
}

# median A B C: the middle of three counts. Prints nothing and fails when
# any is empty or not a number: sorted, an empty value comes first and a
# failed run would hide behind the other two.
median() {
    if [ $# -ne 3 ]; then
        echo "UXEN-INFO: median of $# values, not 3: '$*'" >&2
        return 1
    fi
    for _v in "$@"; do
        case $_v in
        '' | *[!0-9]*)
            echo "UXEN-INFO: median: '$_v' is not a count (of '$1' '$2' '$3')" >&2
            return 1
            ;;
        esac
    done
    printf '%s\n' "$@" | sort -n | sed -n 2p
}

# attack_frames NAME VM GPA...: the host reads, then overwrites with
# zeros, the page of VM at each GPA through /dev/mem. The hypervisor drops
# the host's stores there without a fault, as it does in its own region:
# each pwrite completes, and must, or the attack was never made. That no
# store landed is shown by the blocked-write counter, which must grow by
# at least one a page (and by the guest's own checksum, for the caller).
attack_frames() {
    _name=$1
    _vm=$2
    shift 2
    _w0=$(jnum "$(stats_json)" blocked_host_writes)
    _made=0
    for _gpa in "$@"; do
        _hpa=$(uxenctl translate "$_vm" "$_gpa")
        expect_match "$_name-read-zeros-$_gpa" "$(uxtest devmem read "$_hpa" 4096)" "bytes=4096 nonzero=0 "
        [ "$(uxtest devmem write "$_hpa" 4096 0x00)" = "written=4096" ] && _made=$((_made + 1))
    done
    expect_eq "$_name-writes-made" "$_made" $#
    _w1=$(jnum "$(stats_json)" blocked_host_writes)
    if [ -n "$_w0" ] && [ -n "$_w1" ] && [ $((_w1 - _w0)) -ge $# ]; then
        pass "$_name-writes-blocked"
    else
        fail "$_name-writes-blocked" "$_made of $# writes made, blocked writes '$_w0' -> '$_w1'"
    fi
}

# fork_vm VM [ARGS...]: `uxenctl fork`, killed if its VMM does not answer
# within a minute; then what every uxenctl thread waits on, for the log.
fork_vm() {
    timeout -s KILL 60 uxenctl fork "$@" && return 0
    _rc=$?
    echo "UXEN-INFO: uxenctl fork $* failed ($_rc); the VMMs' threads:" >&2
    for _p in $(pidof uxenctl); do
        for _t in /proc/"$_p"/task/*; do
            echo "UXEN-INFO:   $_t $(cat "$_t"/wchan) $(grep State "$_t"/status)" >&2
        done
    done
    dmesg | grep -E 'uxen' | tail -n 20 >&2
    return $_rc
}

# The hypervisor's counters as one JSON line.
stats_json() {
    uxenctl stats --json
}

# wait_console VM REGEX [TRIES]: waits until the VM's console matches.
wait_console() {
    _n=${3:-2000}
    while [ "$_n" -gt 0 ]; do
        if grep -qE "$2" "/run/uxen/vm-$1.console" 2>/dev/null; then
            return 0
        fi
        usleep 20000
        _n=$((_n - 1))
    done
    return 1
}

# ask VM CMD REGEX [TRIES]: sends CMD to the VM's console and waits (TRIES
# times 20 ms) for a line after it matching REGEX.
# On failure it shows the console's last lines, which say what the guest
# did instead.
ask() {
    uxenctl console "$1" --send "$2\n" --expect "$3" --timeout $((${4:-5000} * 20)) >/dev/null && return 0
    info "vm $1 gave no line matching '$3' after '$2'; its console ends with:"
    tail -n 6 "/run/uxen/vm-$1.console" 2>/dev/null | while IFS= read -r _l; do info "  vm $1: $_l"; done
    return 1
}

# uuid_of VM TAG: asks the VM for a random UUID, printed as "TAG=UUID";
# prints the UUID, or nothing.
uuid_of() {
    ask "$1" "echo $2=\$(cat /proc/sys/kernel/random/uuid)" "^$2=[0-9a-f-]{36}" >/dev/null || return 1
    sed -n "s/^$2=\([0-9a-f-]*\).*/\1/p" "/run/uxen/vm-$1.console" | tail -n1
}

# wait_gone VM [TRIES]: waits until the VM's VMM has ended.
wait_gone() {
    _n=${2:-2000}
    while [ "$_n" -gt 0 ]; do
        [ -e "/run/uxen/vm-$1.status" ] && return 0
        usleep 20000
        _n=$((_n - 1))
    done
    return 1
}

# exits_of SIDE REASON [JSON]: exits.SIDE.total.REASON (SIDE host or guest)
# of the stats (or of JSON); 0 when the reason has none yet, nothing when
# the stats have no such side.
exits_of() {
    _j=${3:-$(stats_json)}
    _t=$(printf '%s' "$_j" | sed -n "s/.*\"$1\":{\"total\":{\([^}]*\)}.*/\1/p")
    printf '%s' "$_j" | grep -q "\"$1\":{\"total\":{" || return 1
    _n=$(printf '%s' "$_t" | tr ',' '\n' | sed -n "s/^\"$2\":\([0-9]*\)\$/\1/p")
    echo "${_n:-0}"
}

# faults: the IOMMU faults counted so far.
faults() {
    jnum "$(stats_json)" faults
}

# last_vm_gone VM: destroys VM, the last one; then no VM is left, the pool
# has given every frame back to the host, and the module unloads.
last_vm_gone() {
    check destroy-keeper uxenctl destroy "$1"
    wait_gone "$1"
    expect_eq no-vms-left "$(uxenctl list --json)" "[]"
    expect_eq pool-returned "$(pool_total)" 0
    check rmmod rmmod uxen
}

# edu_check: checks that the edu device is there and that its DMA works,
# and sets EDU_SID, the source id its faults name (segment, bus, device,
# function), and EDU_BDF, the same as the hypervisor's log writes it.
edu_check() {
    _e=$(uxtest edu info)
    info "edu: $_e"
    expect_match edu-present "$_e" "id=0x010000ed"
    _bdf=$(printf '%s' "$_e" | sed -n 's/^bdf=\([^ ]*\) .*/\1/p')
    _seg=$((0x$(echo "$_bdf" | cut -d: -f1)))
    _bus=$((0x$(echo "$_bdf" | cut -d: -f2)))
    _dev=$((0x$(echo "$_bdf" | cut -d: -f3 | cut -d. -f1)))
    _fn=$(echo "$_bdf" | cut -d. -f2)
    EDU_SID=$(( (_seg << 16) | (_bus << 8) | (_dev << 3) | _fn ))
    EDU_BDF=$(printf '%04x:%02x:%02x.%d' $_seg $_bus $_dev $_fn)
    expect_eq dma-before-load "$(uxtest edu roundtrip)" ok
}

# dma_blocked NAME PHYS SID [keep]: edu's DMA of a page's worth to PHYS
# completes, is blocked and counted as a fault with edu's source id SID and
# the address PHYS; with `keep` the page also reads the same after.
dma_blocked() {
    _before=$(uxtest devmem read "$2" 4096)
    _f0=$(faults)
    check "dma-to-$1-runs" uxtest edu dma-to "$2" 4095 0xcc
    if [ "${4:-}" = keep ]; then
        expect_eq "$1-page-unchanged" "$(uxtest devmem read "$2" 4096)" "$_before"
    fi
    _j=$(stats_json)
    _f1=$(jnum "$_j" faults)
    if [ "${_f1:-0}" -gt "${_f0:-0}" ]; then pass "$1-fault-counted"; else fail "$1-fault-counted" "$_f0 -> $_f1"; fi
    expect_eq "$1-fault-source" "$(jnum "$_j" last_fault_source)" "$3"
    expect_eq "$1-fault-addr" "$(jnum "$_j" last_fault_addr)" "$2"
}

# pool_free: pool.frames_free from the stats.
pool_free() {
    uxenctl stats --json | sed -n 's/.*"pool":{"frames_total":[0-9]*,"frames_free":\([0-9]*\)}.*/\1/p'
}

pool_total() {
    uxenctl stats --json | sed -n 's/.*"pool":{"frames_total":\([0-9]*\),.*/\1/p'
}

# pool_used: frames in use in the pool (total less free, from one reading).
pool_used() {
    _s=$(uxenctl stats --json)
    _t=$(printf '%s' "$_s" | sed -n 's/.*"pool":{"frames_total":\([0-9]*\),.*/\1/p')
    _f=$(printf '%s' "$_s" | sed -n 's/.*"pool":{"frames_total":[0-9]*,"frames_free":\([0-9]*\)}.*/\1/p')
    # Nothing, not 0, when the counters could not be read: a comparison of
    # two failed readings must not pass.
    [ -n "$_t" ] && [ -n "$_f" ] && echo $((_t - _f))
}
