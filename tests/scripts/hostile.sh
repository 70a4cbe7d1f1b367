# Security and robustness (issue 7): the ioctl boundary fuzzed, a hostile
# host, hostile guests, the limits, and no frame leaked. Ends with a table
# of what was tried. What latelaunch.sh and guests.sh already try (pread
# and pwrite of hypervisor and guest frames through /dev/mem, the
# feature-control MSR, VMXON/VMCALL/INVEPT/VMREAD/VMXOFF from ring 3 and
# the probe's VMX instructions from ring 0, hotplug without guests, triple
# faults, a spinning guest beside host work) is not repeated here.
. /tests/lib.sh

SEED=$(sed -n 's/.*uxen\.seed=\([0-9]*\).*/\1/p' /proc/cmdline)
SEED=${SEED:-7}
EFAULT=-14
EINVAL=-22
EBUSY=-16
ENOSYS=-38

# --- The report: one row per area.
ROWS=""
ALL_IN=0
ALL_LEAKED=0
section() {
    S_NAME=$1
    S_P=$PASSED
    S_F=$FAILED
    S_IN=0
    info "--- $S_NAME"
}
inputs() {
    S_IN=$((S_IN + ${1:-0}))
}
# Every area ends with no VM: the driver must have given the whole pool back.
section_end() {
    expect_eq "$S_NAME-no-vms-left" "$(uxenctl list --json)" "[]"
    leaked=$(pool_total)
    expect_eq "$S_NAME-pool-returned" "$leaked" 0
    check_kernel_clean "$S_NAME-kernel-log-clean"
    ROWS="$ROWS
| $S_NAME | $((PASSED + FAILED - S_P - S_F)) | $S_IN | $((FAILED - S_F)) | $leaked |"
    ALL_IN=$((ALL_IN + S_IN))
    ALL_LEAKED=$((ALL_LEAKED + ${leaked:-0}))
}
report() {
    info "hostile suite report (seed $SEED)"
    info "| area | tests | inputs tried | failures | frames leaked |"
    info "|---|---:|---:|---:|---:|"
    printf '%s\n' "$ROWS" | grep . | while read -r l; do info "$l"; done
    info "| total | $((PASSED + FAILED)) | $ALL_IN | $FAILED | $ALL_LEAKED |"
}

# wait_list_gone VM: waits until LIST no longer shows the VM.
wait_list_gone() {
    _n=500
    while [ $_n -gt 0 ]; do
        uxenctl list --json | grep -q "\"id\":$1," || return 0
        usleep 20000
        _n=$((_n - 1))
    done
    return 1
}

# kids PARENT: ids of the listed VMs forked from PARENT.
kids() {
    uxenctl list --json | tr '{' '\n' | grep "\"parent\":$1," | sed -n 's/^"id":\([0-9]*\),.*/\1/p'
}

base_sum=$(uxtest checksum 2)
check insmod insmod /lib/modules/uxen.ko debug=1
j=$(stats_json)
hv_base=$(printf '%s' "$j" | sed -n 's/.*"hv_region":{"base":\([0-9]*\),"size":\([0-9]*\)}.*/\1/p')
hv_size=$(printf '%s' "$j" | sed -n 's/.*"hv_region":{"base":\([0-9]*\),"size":\([0-9]*\)}.*/\2/p')

# ===========================================================================
section ioctl-fuzz
# Random calls on /dev/uxen and VM descriptors, each checked against the
# contract; then the VM limits.
# Progress lines go to the console (stderr) as the run goes.
out=$(uxtest ioctl-fuzz --seed "$SEED" --calls 5000); rc=$?
printf '%s\n' "$out" | grep -v '^ioctl-fuzz: [0-9]* calls,' | tail -n 45 | sed 's/^/    /'
sum=$(printf '%s\n' "$out" | grep '^ioctl-fuzz: seed=')
expect_eq ioctl-fuzz-5000-calls-rc "$rc" 0
expect_match ioctl-fuzz-every-call-as-specified "$sum" ' mismatches=0 '
expect_match ioctl-fuzz-no-frame-leaked "$sum" ' frames_leaked=0 '
calls=$(printf '%s' "$sum" | sed -n 's/.* calls=\([0-9]*\) .*/\1/p')
if [ "${calls:-0}" -ge 5000 ]; then pass ioctl-fuzz-at-least-5000-calls; else fail ioctl-fuzz-at-least-5000-calls "calls=$calls"; fi
inputs "$calls"
out=$(uxtest vm-limit 2>&1); rc=$?
printf '%s\n' "$out" | tail -n 25 | sed 's/^/    /'
expect_eq vm-limit-rc "$rc" 0
printf '%s\n' "$out" | grep -E '^vm-limit: .*: (ok|FAILED)$' | while read -r l; do
    name=$(printf '%s' "$l" | sed 's/^vm-limit: \([a-z -]*\).*/\1/' | tr ' ' '-' | sed 's/-*$//')
    case "$l" in
    *": ok") echo "UXEN-TEST: PASS vm-limit-$name" ;;
    *) echo "UXEN-TEST: FAIL vm-limit-$name: $l" ;;
    esac
done >/tmp/limit.marks
cat /tmp/limit.marks
PASSED=$((PASSED + $(grep -c PASS /tmp/limit.marks)))
FAILED=$((FAILED + $(grep -c FAIL /tmp/limit.marks)))
inputs "$(printf '%s\n' "$out" | sed -n 's/.* \([0-9]*\) calls,.*/\1/p')"
expect_match hv-intact-after-fuzz "$(stats_json)" '"image_intact":true'
section_end

# ===========================================================================
section hostile-host

# --- Stores from user mode through a /dev/mem mapping (CPL 3 stores the
# hypervisor decodes and drops) into the hypervisor and into a guest.
m=$(uxenctl create /guests/memtest --mem 6 --cmdline rounds=40 --name victim)
check victim-filled wait_console "$m" "memtest: filled"
w0=$(jnum "$(stats_json)" blocked_host_writes)
for off in 4096 $((hv_size / 2)) $((hv_size - 4096)); do
    expect_eq "mmap-store-hv-$off" "$(uxtest devmem mmapw $((hv_base + off)) 256 0xcc)" "stored=256 reads_back=0"
done
for gpa in 0x180000 0x300000; do
    hpa=$(uxenctl translate "$m" $gpa)
    expect_eq "mmap-store-guest-$gpa" "$(uxtest devmem mmapw "$hpa" 256 0xcc)" "stored=256 reads_back=0"
done
inputs $((5 * 256))
w1=$(jnum "$(stats_json)" blocked_host_writes)
if [ "$w1" -ge $((w0 + 5 * 256)) ]; then pass mmap-stores-counted; else fail mmap-stores-counted "$w0 -> $w1"; fi
check victim-finishes wait_gone "$m"
expect_match victim-memory-intact "$(cat /run/uxen/vm-$m.console)" "memtest: ok 6 MiB"
expect_match victim-exit-0 "$(cat /run/uxen/vm-$m.status)" "exited with code 0"

# --- A frame two VMs share after a fork: read, written through pwrite and
# through a mapping; a fork made afterwards still sees the memory as it was.
p=$(uxenctl create /guests/forkee --mem 6 --cmdline touch=2 --name shared)
check shared-ready wait_console "$p" "forkee: vm$p ready"
c=$(fork_vm "$p")
check shared-child-ready wait_console "$c" "forkee: vm$c forked from vm$p: memory intact"
hp=$(uxenctl translate "$p" 0x180000)
hc=$(uxenctl translate "$c" 0x180000)
expect_eq shared-frame-is-shared "$hp" "$hc"
expect_match shared-frame-reads-zeros "$(uxtest devmem read "$hp" 4096)" "bytes=4096 nonzero=0 "
uxtest devmem write "$hp" 4096 0x77 >/dev/null
expect_eq shared-frame-mmap-store "$(uxtest devmem mmapw "$hp" 64 0x77)" "stored=64 reads_back=0"
inputs 3
c2=$(fork_vm "$p")
check shared-parent-intact wait_console "$c2" "forkee: vm$c2 forked from vm$p: memory intact"
c3=$(fork_vm "$c")
check shared-child-intact wait_console "$c3" "forkee: vm$c3 forked from vm$c: memory intact"
for v in $p $c $c2 $c3; do uxenctl destroy "$v"; done
for v in $p $c $c2 $c3; do wait_gone "$v"; done

# --- VMX capability MSRs (read-only on any CPU; absent without VMX) and a
# move of the local APIC away from its write-protected page.
bad=0
n=0
for cpu in 0 1; do
    for msr in 0x480 0x481 0x482 0x483 0x484 0x485 0x486 0x487 0x488 0x489 0x48a 0x48b 0x48c 0x48d 0x48e 0x48f 0x490 0x491; do
        [ "$(uxtest msr read $cpu $msr)" = "errno=5" ] || bad=$((bad + 1))
        [ "$(uxtest msr write $cpu $msr 0)" = "errno=5" ] || bad=$((bad + 1))
        n=$((n + 2))
    done
done
expect_eq vmx-msrs-refused-both-cpus "$bad/$n" "0/$n"
inputs $n
for cpu in 0 1; do
    a=$(uxtest msr read $cpu 0x1b)
    moved=$(printf '%#x' $((a - 0x100000)))
    expect_eq "apic-base-move-refused-cpu$cpu" "$(uxtest msr write $cpu 0x1b "$moved")" "errno=5"
    expect_eq "apic-base-unchanged-cpu$cpu" "$(uxtest msr read $cpu 0x1b)" "$a"
done
inputs 2

# --- Every VMX instruction latelaunch.sh leaves out, from ring 3; VMCALL
# from ring 3 with every host hypercall number (UNLOAD among them).
for insn in invvpid vmwrite vmptrld vmclear vmlaunch vmresume vmfunc getsec; do
    expect_eq "ring3-$insn-sigill" "$(uxtest ring3 $insn)" SIGILL
done
bad=""
for nr in 0 1 2 3 4 5 0x10 0x11 0x12 0x13 0x14 0x15 0x16 0x17 0x20 0x30 0x1000 0xffffffffffffffff; do
    r=$(uxtest ring3 vmcall $nr)
    [ "$r" = SIGILL ] || bad="$bad $nr:$r"
done
expect_eq ring3-vmcall-every-number-sigill "$bad" ""
inputs 26
for c in 0 1; do
    expect_eq "still-virtualized-cpu$c" "$(signature $c)" "$SIG"
done

# --- Ring 0: hypercalls whose argument blocks name memory the host does
# not own (the probe module, given the addresses to aim at).
# The target checks its memory until it is destroyed: the hypercalls aimed
# at its frames and UNLOAD's refusal need it alive throughout.
v=$(uxenctl create /guests/memtest --mem 4 --cmdline rounds=1000000 --name probe-target)
check probe-target-filled wait_console "$v" "memtest: filled"
g=$(uxenctl translate "$v" 0x180000)
dmesg -c >/dev/null
check probe-load insmod /lib/modules/uxen_probe.ko hv_phys="$hv_base" hv_size="$hv_size" guest_phys=$((g)) vm="$v"
check probe-unload rmmod uxen_probe
dmesg | sed -n 's/.*uxen_probe: hc \([^=]*\)=\(-*[0-9]*\)$/\1 \2/p' >/tmp/hc.out
sed 's/^/    /' /tmp/hc.out
while read -r name want; do
    got=$(sed -n "s/^$name \(.*\)$/\1/p" /tmp/hc.out)
    expect_eq "ring0-hc-$name" "$got" "$want"
    inputs 1
done <<EOF
version-ok 0
version@hv $EFAULT
version@hv-end $EFAULT
stats@hv $EFAULT
stats@guest $EFAULT
stats@apic $EFAULT
stats@overflow $EFAULT
stats-short $EINVAL
list@hv $EFAULT
list@guest $EFAULT
create@hv $EFAULT
create@guest $EFAULT
run@hv $EFAULT
destroy@guest $EFAULT
reclaim@hv $EFAULT
reclaim@guest $EFAULT
reclaim-none $EINVAL
donate-hv $EFAULT
donate-guest $EFAULT
donate-apic $EFAULT
donate-twice $EFAULT
donate-misaligned $EINVAL
donate-empty $EINVAL
donate-huge $EINVAL
donate-none $EINVAL
donate-too-many $EINVAL
donate-list@hv $EFAULT
refused-donation-page-intact 1
load-from-hv $EFAULT
load-from-guest $EFAULT
load-from-apic $EFAULT
load-long $EINVAL
load-across-pages $EINVAL
nr-0 $ENOSYS
nr-0x8 $ENOSYS
host-cpu-bad $EINVAL
nr-0x19 $ENOSYS
irq-bad-line $EINVAL
nr-0x1000 $ENOSYS
nr-max $ENOSYS
unload-with-vm $EBUSY
EOF
# Two more full rounds of checks after the attack, then no FAIL.
r0=$(grep -c "round .* ok" "/run/uxen/vm-$v.console")
check probe-target-checks-after wait_console "$v" "memtest: round $((r0 + 2)) ok"
expect_eq probe-target-memory-intact "$(grep -c FAIL "/run/uxen/vm-$v.console")" 0
check probe-target-destroy uxenctl destroy "$v"
wait_gone "$v"
j=$(stats_json)
expect_match hv-intact-after-ring0 "$j" '"image_intact":true'
expect_match both-cpus-after-ring0 "$j" '"id":0,"apic_id":[0-9]+,"virtualized":true.*"id":1,"apic_id":[0-9]+,"virtualized":true'

# --- CPU 1 goes offline and online, three times, while guests run on it:
# one computing, one spinning with interrupts off, one halted.
a=$(taskset -c 1 uxenctl create /guests/memtest --mem 6 --name hp-mem)
s=$(taskset -c 1 uxenctl create /guests/faulty-spin --name hp-spin)
i=$(taskset -c 1 uxenctl create /guests/idle --name hp-idle)
wait_console "$a" "memtest: filled" && wait_console "$s" "spinning" && wait_console "$i" "halting"
ok=0
for k in 1 2 3; do
    echo 0 >/sys/devices/system/cpu/cpu1/online &&
        [ "$(cat /sys/devices/system/cpu/online)" = 0 ] &&
        [ "$(uxtest checksum 2)" = "$base_sum" ] &&
        echo 1 >/sys/devices/system/cpu/cpu1/online &&
        [ "$(signature 1)" = "$SIG" ] && ok=$((ok + 1))
done
expect_eq hotplug-3-cycles-with-guests "$ok" 3
inputs 3
check hotplug-memtest-finishes wait_gone "$a"
expect_match hotplug-memtest-ok "$(cat /run/uxen/vm-$a.console)" "memtest: ok 6 MiB"
expect_match hotplug-spin-still-runs "$(uxenctl list --json | tr '{' '\n' | grep "\"id\":$s,")" '"state":"(running|paused)"'
# The halted VM forks after the cycles: the child halts where its parent
# was, on frames shared with it.
f=$(fork_vm "$i")
expect_match hotplug-idle-forks "$(uxenctl list --json | tr '{' '\n' | grep "\"id\":$f,")" '"state":"(running|paused)".*"frames_shared":[1-9]'
for v in $s $i $f; do uxenctl destroy "$v"; done
for v in $s $i $f; do wait_gone "$v"; done
expect_match hotplug-spin-destroyed "$(cat /run/uxen/vm-$s.status)" "stopped: destroyed"

# --- rmmod while a VM exists (its VMM holds the descriptor), and while only
# /dev/uxen is open: refused by the module's use count.
v=$(uxenctl create /guests/idle --name rm-guard)
check rm-guard-up wait_console "$v" "halting"
expect_match rmmod-with-vm-refused "$(uxtest modunload uxen)" "^errno=11 "
expect_match rmmod-with-vm-module-stays "$(cat /proc/modules)" "^uxen "
check rmmod-with-vm-device-stays test -c /dev/uxen
expect_match rmmod-with-vm-vm-stays "$(uxenctl list --json)" "\"id\":$v,"
expect_eq rmmod-with-vm-still-virtualized "$(signature 1)" "$SIG"
uxenctl destroy "$v"
wait_gone "$v"
exec 3</dev/uxen
expect_match rmmod-with-open-device-refused "$(uxtest modunload uxen)" "^errno=11 "
exec 3<&-
inputs 2

# --- SIGKILL of the VMM in the middle of RUN: spinning, halted (asleep in
# RUN), computing (taking page faults), and looping through exits.
n=0
for g in faulty-spin idle memtest hostile-loop; do
    v=$(uxenctl create /guests/$g --mem 6 --name "kill-$g")
    wait_console "$v" "." 2000
    usleep 200000
    kill -9 "$(cat /run/uxen/vm-$v.pid)"
    if wait_list_gone "$v"; then n=$((n + 1)); else fail "sigkill-$g-vm-gone" "vm $v still listed"; fi
done
expect_eq sigkill-4-vmms-vms-gone "$n" 4
expect_eq sigkill-pool-returned "$(pool_total)" 0
# The VMM of a guest that forked: its children, run by child processes,
# finish on their own.
uxenctl run /guests/forker --mem 6 --cmdline n=2 >/tmp/forker.out 2>&1 &
fpid=$!
_n=1500
while [ $_n -gt 0 ] && ! grep -q "fork 2 returned child" /tmp/forker.out; do usleep 20000; _n=$((_n - 1)); done
kill -9 $fpid
wait $fpid 2>/dev/null
_n=1500
while [ $_n -gt 0 ] && [ "$(uxenctl list --json)" != "[]" ]; do usleep 20000; _n=$((_n - 1)); done
expect_eq sigkill-forker-children-finish "$(grep -c 'isolated ok' /tmp/forker.out)" 2
inputs 5
section_end

# ===========================================================================
section hostile-guests
# A bystander that holds its memory through it all.
by=$(uxenctl create /guests/forkee --mem 6 --cmdline touch=2 --name bystander)
check bystander-ready wait_console "$by" "forkee: vm$by ready"

# --- Undefined hypercall numbers with hostile arguments, after every defined
# one with huge and negative arguments.
for nr in 0x5 0xfff 0x2000 0xffffffffffffffff 0x8000000000000000; do
    out=$(uxenctl run /guests/hostile-hypercall --mem 4 --cmdline "nr=$nr" 2>&1); rc=$?
    expect_eq "hypercall-$nr-rc" "$rc" 70
    expect_match "hypercall-$nr-defined-ones-answer" "$out" "hypercall: vm[0-9]+: [0-9]+ checks ok, 0 failed"
    expect_match "hypercall-$nr-stops" "$out" "stopped: bad-hypercall"
    check_fails "hypercall-$nr-nothing-returned" sh -c "printf '%s' \"\$1\" | grep -q FAIL" sh "$out"
    inputs "$(printf '%s' "$out" | sed -n 's/.*: \([0-9]*\) checks ok.*/\1/p')"
    inputs 1
done
out=$(uxenctl run /guests/hostile-hypercall --mem 4 --cmdline "mode=user" 2>&1); rc=$?
expect_eq hypercall-ring3-rc "$rc" 70
expect_match hypercall-ring3-reached "$out" "hypercall: in ring 3"
expect_match hypercall-ring3-ud "$out" "stopped: triple-fault"
check_fails hypercall-ring3-no-fork sh -c "printf '%s' \"\$1\" | grep -q FAIL" sh "$out"
inputs 1

# --- Page tables that lead out of guest memory.
for mode in pml4 pdpt pd cr3 rsvd; do
    out=$(uxenctl run /guests/hostile-pt --mem 4 --cmdline "mode=$mode" 2>&1); rc=$?
    expect_eq "pt-$mode-rc" "$rc" 70
    if [ $mode = rsvd ]; then want=triple-fault; else want=bad-instruction; fi
    expect_match "pt-$mode-stops" "$out" "stopped: $want"
    check_fails "pt-$mode-nothing-read" sh -c "printf '%s' \"\$1\" | grep -q FAIL" sh "$out"
    inputs 1
done

# --- Endless loops with interrupts off, through exits the hypervisor
# handles itself, one on each CPU: the host's work completes on both.
for pair in "cpuid msr" "cr8 mix"; do
    set -- $pair
    l0=$(taskset -c 0 uxenctl create /guests/hostile-loop --cmdline "mode=$1" --name "loop-$1")
    l1=$(taskset -c 1 uxenctl create /guests/hostile-loop --cmdline "mode=$2" --name "loop-$2")
    wait_console "$l0" "spinning" && wait_console "$l1" "spinning"
    taskset -c 0 uxtest checksum 2 >/tmp/sum0 &
    w=$!
    taskset -c 1 uxtest checksum 2 >/tmp/sum1
    wait $w
    expect_same "loop-$1-$2-host-cpu0-works" "$(cat /tmp/sum0)" "$base_sum"
    expect_same "loop-$1-$2-host-cpu1-works" "$(cat /tmp/sum1)" "$base_sum"
    expect_eq "loop-$1-$2-host-forks" "$(uxtest forkstorm 10)" "10/10"
    uxenctl destroy "$l0"
    uxenctl destroy "$l1"
    wait_gone "$l0" && wait_gone "$l1"
    expect_match "loop-$1-stopped-by-destroy" "$(cat /run/uxen/vm-$l0.status)" "stopped: destroyed"
    expect_match "loop-$2-stopped-by-destroy" "$(cat /run/uxen/vm-$l1.status)" "stopped: destroyed"
    inputs 2
done

# --- Every I/O port, written and read; then string I/O.
out=$(uxenctl run /guests/hostile-ports --mem 4 2>&1); rc=$?
printf '%s\n' "$out" | grep '^ports:' | sed 's/^/    /'
expect_eq ports-rc "$rc" 0
expect_match ports-all-visited "$out" "ports: wrote 65535 ports, read 65536, [0-9]+ word and doubleword accesses"
expect_match ports-no-device-reached "$out" "0 reads were not all ones; pci config 0xffffffff"
pw=$(printf '%s' "$out" | sed -n 's/.*wrote \([0-9]*\) ports,.*/\1/p')
pr=$(printf '%s' "$out" | sed -n 's/.*, read \([0-9]*\),.*/\1/p')
px=$(printf '%s' "$out" | sed -n 's/.*, \([0-9]*\) word and.*/\1/p')
inputs $((${pw:-0} + ${pr:-0} + ${px:-0}))
out=$(uxenctl run /guests/hostile-ports --mem 4 --cmdline mode=outs 2>&1); rc=$?
expect_eq ports-string-io-rc "$rc" 70
expect_match ports-string-io-stops "$out" "stopped: bad-instruction"
inputs 1
expect_eq ports-host-still-virtualized "$(signature 0)$(signature 1)" "$SIG$SIG"

# --- A fork bomb through the fork hypercall.
b=$(uxenctl create /guests/hostile-forkbomb --mem 4 --name bomb)
check forkbomb-parent-ends wait_gone "$b"
expect_match forkbomb-refused-at-limit "$(cat /run/uxen/vm-$b.console)" "forkbomb: vm$b forked 64 children; fork 65 refused with -11; again -11"
k=$(kids "$b")
expect_eq forkbomb-64-children-live "$(printf '%s\n' $k | grep -c .)" 64
ok=0
for c in $k; do
    wait_console "$c" "forkbomb: vm$c is a child of vm$b" 500 && ok=$((ok + 1))
done
expect_eq forkbomb-children-ran "$ok" 64
check_fails forkbomb-none-past-limit sh -c 'cat /run/uxen/vm-*.console | grep -q "past the limit"'
for c in $k; do uxenctl destroy "$c"; done
for c in $k; do wait_gone "$c"; done
inputs 66

# The bystander's memory is as it was.
c=$(fork_vm "$by")
check bystander-memory-intact wait_console "$c" "forkee: vm$c forked from vm$by: memory intact"
uxenctl destroy "$by"
uxenctl destroy "$c"
wait_gone "$by" && wait_gone "$c"
section_end

# ===========================================================================
check rmmod rmmod uxen
report
finish
