# Guest VMs: run, exit codes, two VMs at once, memory the host cannot
# touch, faulty guests stopped with their reason, no leaks.
. /tests/lib.sh
check insmod insmod /lib/modules/uxen.ko debug=1

out=$(uxenctl run /guests/hello); rc=$?
out=$(printf "%s\n" "$out" | tr -d "\r")
expect_eq hello-exit-0 "$rc" 0
expect_match hello-prints "$out" "^hello from uxen-rs guest vm[0-9]+ \(16 MiB\)$"
uxenctl run /guests/exitcode >/dev/null
expect_eq exitcode-7 "$?" 7
out=$(uxenctl run /guests/hello --mem 6 --name small)
expect_match hello-6mib "$out" "\(6 MiB\)"

# Bad arguments: clear messages, non-zero exits, nothing created.
before=$(uxenctl list --json)
out=$(uxenctl run /guests/hello --mem 3 2>&1); rc=$?
if [ $rc -ne 0 ]; then pass bad-mem-refused; else fail bad-mem-refused "rc=0"; fi
expect_match bad-mem-message "$out" "multiple of 2 MiB"
out=$(uxenctl run /nonexistent 2>&1); rc=$?
expect_match missing-image-message "$out" "cannot open /nonexistent"
if [ $rc -ne 0 ]; then pass missing-image-fails; else fail missing-image-fails "rc=0"; fi
out=$(uxenctl run /init 2>&1); rc=$?
expect_match not-an-image "$out" "/init is not a loadable static ELF64 x86-64 executable"
if [ $rc -ne 0 ]; then pass not-an-image-fails; else fail not-an-image-fails "rc=0"; fi
out=$(uxenctl destroy 999 2>&1); rc=$?
expect_eq destroy-unknown-rc "$rc" 1
expect_match destroy-unknown-message "$out" "no VM with id 999"
out=$(uxenctl console 999 2>&1); rc=$?
expect_eq console-unknown-rc "$rc" 1
expect_eq no-vm-created-by-errors "$(uxenctl list --json)" "$before"

# A clean memtest run gives the reference checksum.
ref=$(uxenctl run /guests/memtest --mem 16 | sed -n 's/.*checksum=\([0-9a-f]*\).*/\1/p')
if [ -n "$ref" ]; then pass memtest-reference; else fail memtest-reference "no checksum"; fi

# Two spinning VMs, one per CPU; the host still gets its work done.
a=$(taskset -c 0 uxenctl create /guests/faulty-spin --name spin0)
b=$(taskset -c 1 uxenctl create /guests/faulty-spin --name spin1)
wait_console "$a" "spinning" && wait_console "$b" "spinning"
expect_eq two-vms-alive "$(uxenctl list --json | grep -oE '"state":"(running|paused)"' | wc -l)" 2
sum=$(uxtest checksum 2)
sum2=$(uxtest checksum 2)
expect_same host-works-while-guests-spin "$sum" "$sum2"
check host-forkstorm-while-guests-spin uxtest forkstorm 20
check destroy-spin0 uxenctl destroy "$a"
check destroy-spin1 uxenctl destroy "$b"
wait_gone "$a" && wait_gone "$b"
expect_match spin-stopped-destroyed "$(cat /run/uxen/vm-$a.status)" "stopped: destroyed"

# The host attacks a guest's frames while it checks its memory; the
# guest's checksum at the end shows that nothing landed.
m=$(uxenctl create /guests/memtest --name memtest)
check memtest-filled wait_console "$m" "memtest: filled"
b0=$(jnum "$(stats_json)" blocked_host_accesses)
attack_frames guest-frame "$m" 0x200000 0x400000 0x800000 0xc00000
b1=$(jnum "$(stats_json)" blocked_host_accesses)
if [ "$b1" -gt "$b0" ]; then pass guest-attacks-counted; else fail guest-attacks-counted "$b0 -> $b1"; fi
check memtest-finishes wait_gone "$m"
expect_match memtest-ok-after-attack "$(cat /run/uxen/vm-$m.console)" "memtest: ok 16 MiB checksum=$ref"
expect_match memtest-exited-0 "$(cat /run/uxen/vm-$m.status)" "exited with code 0"

# Faulty guests stop with their reason; a healthy VM beside them finishes.
m=$(uxenctl create /guests/memtest --name bystander)
out=$(uxenctl run /guests/faulty-triple 2>&1); rc=$?
expect_eq triple-rc "$rc" 70
expect_match triple-reason "$out" "stopped: triple-fault"
out=$(uxenctl run /guests/faulty-hypercall 2>&1); rc=$?
expect_eq badcall-rc "$rc" 70
expect_match badcall-reason "$out" "stopped: bad-hypercall"
check_fails badcall-did-not-continue sh -c "echo '$out' | grep -q 'still running'"
out=$(uxenctl run /guests/faulty-oob 2>&1); rc=$?
expect_eq oob-rc "$rc" 70
expect_match oob-mmio-exit "$out" "read of 8 bytes at guest-physical 0x1000100, where there is neither memory nor a device"
check_fails oob-got-no-data sh -c "echo '$out' | grep -q 'faulty: read 0x'"
check bystander-finishes wait_gone "$m"
expect_match bystander-ok "$(cat /run/uxen/vm-$m.console)" "memtest: ok 16 MiB checksum=$ref"

# A guest's exits count under exits.guest, never under exits.host: a guest
# that does nothing but CPUID, for one emulated second, against the host's
# own CPUIDs over the same time.
j0=$(stats_json)
l=$(taskset -c 1 uxenctl create /guests/hostile-loop --cmdline "mode=cpuid" --name cpuid-loop)
check cpuid-loop-started wait_console "$l" "spinning with interrupts off: cpuid"
usleep 1000000
check cpuid-loop-destroyed uxenctl destroy "$l"
wait_gone "$l"
j1=$(stats_json)
g0=$(exits_of guest cpuid "$j0"); g1=$(exits_of guest cpuid "$j1")
h0=$(exits_of host cpuid "$j0"); h1=$(exits_of host cpuid "$j1")
if [ -n "$g0" ] && [ -n "$g1" ] && [ -n "$h0" ] && [ -n "$h1" ]; then
    info "cpuid exits over the loop: guest $((g1 - g0)), host $((h1 - h0))"
    # Thousands of the guest's; the host's stay what an idle host does.
    expect_eq guest-cpuid-counted-as-guest "$([ $((g1 - g0)) -ge 10000 ] && echo yes)" yes
    expect_eq guest-cpuid-not-counted-as-host "$([ $((h1 - h0)) -lt 1000 ] && echo yes)" yes
else
    fail guest-exits-apart "no exits in the stats: guest '$g0' '$g1', host '$h0' '$h1'"
fi

# 100 create/destroy cycles leave the pool as it was.
keep=$(uxenctl create /guests/idle --name keeper)
wait_console "$keep" "halting"
x=$(uxenctl create /guests/idle); wait_console "$x" "halting"; uxenctl destroy "$x"; wait_gone "$x"
free0=$(pool_free)
total0=$(pool_total)
ok=0
for i in $(seq 100); do
    x=$(uxenctl create /guests/idle) && uxenctl destroy "$x" && ok=$((ok + 1))
done
wait_gone "$x"
expect_eq create-destroy-100 "$ok" 100
expect_eq pool-free-after-100 "$(pool_free)" "$free0"
expect_eq pool-total-after-100 "$(pool_total)" "$total0"
info "pool: $total0 frames, $free0 free, with one idle VM alive"
last_vm_gone "$keep"
finish
