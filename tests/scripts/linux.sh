# Linux guests: the project's guest kernel boots to a shell on its console;
# commands go in through a pipe and through `console --send`; poweroff,
# reboot and a panic each end only their VM, with their own status; the host
# keeps working meanwhile; bad input is refused before a VM exists; nothing
# leaks.
. /tests/lib.sh
check insmod insmod /lib/modules/uxen.ko
K=/linux-guest/bzImage
I=/linux-guest/initramfs.cpio.gz
READY="uxen-guest: ready"

# wait_file FILE REGEX [TRIES]: waits until FILE matches (20 ms a try).
wait_file() {
    _n=${3:-3000}
    while [ "$_n" -gt 0 ]; do
        grep -qE "$2" "$1" 2>/dev/null && return 0
        usleep 20000
        _n=$((_n - 1))
    done
    return 1
}

# boot_pipe [ARGS...]: starts `uxenctl run` on the guest kernel with its
# console on pipes (in: /tmp/lin.in, held open as descriptor 3; out:
# /tmp/lin.out); $run is its pid. A run that outlives 15 minutes is ended.
boot_pipe() {
    rm -f /tmp/lin.in /tmp/lin.out
    mkfifo /tmp/lin.in
    timeout -s TERM 900 uxenctl run --kernel $K --initrd $I --mem 64 "$@" </tmp/lin.in >/tmp/lin.out 2>&1 &
    run=$!
    exec 3>/tmp/lin.in
}

# state VM: the VM's `state` in `uxenctl list --json`.
state() {
    uxenctl list --json | tr '{' '\n' | grep "\"id\":$1," | sed -n 's/.*"state":"\([a-z]*\)".*/\1/p'
}

base=$(pool_used)
ref=$(uxtest checksum 2)
[ -n "$ref" ] && pass host-checksum-reference || fail host-checksum-reference "no checksum"

# 1. `uxenctl run` with its console on pipes: boot to the shell, a command
# in, its output out, `poweroff -f` ends the run with status 0. The host
# computes on both CPUs while the guest boots.
boot_pipe
t0=$(cut -d' ' -f1 /proc/uptime)
sum0=$(taskset -c 0 uxtest checksum 2)
sum1=$(taskset -c 1 uxtest checksum 2)
expect_eq host-cpu0-works-during-boot "$sum0" "$ref"
expect_eq host-cpu1-works-during-boot "$sum1" "$ref"
if wait_file /tmp/lin.out "$READY" 15000; then
    pass pipe-boots-to-shell
    info "boot to the shell took $(awk -v a="$t0" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN{print b-a}') s of host uptime"
else
    fail pipe-boots-to-shell "$(tail -c 600 /tmp/lin.out | tr '\n' ' ')"
fi
echo 'echo pipe-says-$((6 * 7))' >&3
check pipe-command-output wait_file /tmp/lin.out "^pipe-says-42"
echo 'cat /proc/cmdline' >&3
check guest-cmdline wait_file /tmp/lin.out "console=ttyS0.*reboot=t,panic_warm"
echo 'poweroff -f' >&3
wait $run
expect_eq poweroff-run-status-0 "$?" 0
exec 3>&-
expect_same pool-back-after-poweroff "$(pool_used)" "$base"

# 2. A detached guest: `console --send` runs a command; `console` shows it.
a=$(uxenctl create --kernel $K --initrd $I --mem 64 --name lin-a)
expect_match create-prints-id "$a" '^[0-9]+$'
check detached-boots wait_console "$a" "$READY" 15000
check send-command uxenctl console "$a" --send 'echo sent-$((2 + 3))\n'
check send-output-on-console wait_console "$a" "^sent-5"
check send-escapes uxenctl console "$a" --send 'printf "tab\\x3a[\\t]\\n"\n'
check send-escape-output wait_console "$a" "tab:\[	\]"
out=$(uxenctl console "$a" --send 'bad\q' 2>&1); rc=$?
[ $rc -ne 0 ] && pass send-bad-escape-refused || fail send-bad-escape-refused "rc=0"
expect_match send-bad-escape-message "$out" "escape"
out=$(uxenctl console "$a")
expect_match console-shows-output "$out" "sent-5"

# The guest found its ACPI tables: the VM generation ID's driver and the
# Generic Event Device that notifies it are bound.
check acpi-devices-sent uxenctl console "$a" --send 'ls /sys/bus/platform/drivers/vmgenid /sys/bus/platform/drivers/acpi-ged | grep -c -e VMGENCTR: -e ACPI0013: | sed s/^/acpi-devices=/\n'
check acpi-devices-bound wait_console "$a" "^acpi-devices=2"

# Forks of the booted guest: each child resumes where its parent was, with
# its devices' state (APIC timers, IOAPIC, UART), and answers on its own
# console; the parent answers on; the clones share the parent's memory.
# Each side got a new VM generation ID and reseeded its random number
# generator: the parent and each clone, asked right after the fork, give
# different random UUIDs. (In its first two minutes Linux also reseeds
# from its input pool every uptime/2 seconds, which interrupt timing and
# RDRAND make differ between clones, so the UUIDs alone would differ here
# even without the ID; the interrupt and the kernel's reseed message below
# are what show the generation ID at work.)
used_a=$(pool_used)
kids=$(fork_vm "$a" --count 2 --json)
info "fork of a booted Linux guest: $kids"
ids=$(printf '%s' "$kids" | grep -o '"id":[0-9]*' | cut -d: -f2)
expect_eq fork-children "$(printf '%s\n' $ids | grep -c .)" 2
uuids="$(uuid_of "$a" uuid-parent)"
for k in $ids; do
    uuids="$uuids $(uuid_of "$k" "uuid-$k")"
done
info "random UUIDs after the fork, parent then clones: $uuids"
expect_eq fork-uuids-answered "$(printf '%s\n' $uuids | grep -cE '^[0-9a-f-]{36}$')" 3
expect_eq fork-uuids-differ "$(printf '%s\n' $uuids | sort -u | grep -c .)" 3
# What made them differ: each side took the generation ID's interrupt and
# its kernel reseeded.
for k in $a $ids; do
    check "fork-vm$k-reseed-sent" uxenctl console "$k" --send "grep Ged /proc/interrupts; echo reseeds-$k=\$(dmesg | grep -c 'crng reseeded due to virtual machine fork')\n"
    check "fork-vm$k-ged-interrupt-taken" wait_console "$k" "^ *[0-9]+: +[1-9][0-9]* .*ACPI:Ged"
    check "fork-vm$k-reseeded" wait_console "$k" "^reseeds-$k=[1-9]"
done
for k in $ids; do
    check "fork-vm$k-send" uxenctl console "$k" --send "echo clone-$k-says-\$((20 + $k))\n"
    check "fork-vm$k-answers" wait_console "$k" "^clone-$k-says-$((20 + k))" 5000
done
check fork-parent-send uxenctl console "$a" --send 'echo parent-after-fork\n'
check fork-parent-answers wait_console "$a" "^parent-after-fork"
used_k=$(pool_used)
info "frames in use: the guest alone $used_a, with its 2 clones after each ran a command $used_k"
[ "$used_k" -lt $((used_a * 13 / 10)) ] && pass fork-clones-share-memory || fail fork-clones-share-memory "$used_a -> $used_k"
for k in $ids; do uxenctl destroy "$k"; done

# 3. Reboot and panic end only their VM, with their own state; the other
# guest carries on.
b=$(uxenctl create --kernel $K --initrd $I --mem 64 --name lin-b)
check b-boots wait_console "$b" "$READY" 15000
check reboot-sent uxenctl console "$b" --send 'reboot -f\n'
check reboot-ends-vm wait_gone "$b" 15000
expect_eq reboot-state "$(state "$b")" rebooted
c=$(uxenctl create --kernel $K --initrd $I --mem 64 --name lin-c)
check c-boots wait_console "$c" "$READY" 15000
check panic-sent uxenctl console "$c" --send 'echo c > /proc/sysrq-trigger\n'
check panic-ends-vm wait_gone "$c" 15000
expect_eq panic-state "$(state "$c")" panicked
check panic-on-console wait_console "$c" "Kernel panic"
check a-still-answers uxenctl console "$a" --send 'echo still-$((40 + 2))\n'
check a-output wait_console "$a" "^still-42"

# The guest's hostile side: every I/O port written but its own console
# (COM1) and the port that ends a VM (0xf4), and unmapped physical memory
# read; it carries on.
check ports-written uxenctl console "$a" --send 'dd if=/dev/zero of=/dev/port bs=1 count=244 2>/dev/null; dd if=/dev/zero of=/dev/port bs=1 seek=245 count=771 2>/dev/null; dd if=/dev/zero of=/dev/port bs=1 seek=1024 count=64512 2>/dev/null; echo ports-done\n'
check ports-guest-carries-on wait_console "$a" "^ports-done" 15000
check unmapped-read uxenctl console "$a" --send 'echo unmapped=$(devmem 0xc0000000 32)\n'
check unmapped-reads-ones wait_console "$a" "^unmapped=0xFFFFFFFF"
# The IOAPIC, read from the guest through its register window: its
# version register (24 pins, version 0x11).
check ioapic-read uxenctl console "$a" --send 'devmem 0xfec00000 32 1; echo ioapic=$(devmem 0xfec00010 32)\n'
check ioapic-version wait_console "$a" "^ioapic=0x00170011"
expect_match a-still-running "$(state "$a")" '^(running|paused)$'

# run_ends NAME COMMAND STATUS: a guest run through a pipe boots, is sent
# COMMAND, and `uxenctl run` ends with STATUS.
run_ends() {
    boot_pipe
    check "run-$1-boots" wait_file /tmp/lin.out "$READY" 15000
    echo "$2" >&3
    wait $run
    expect_eq "run-$1-status" "$?" "$3"
    exec 3>&-
}

# `uxenctl run` statuses: 71 for a reboot, 72 for a panic.
run_ends reboot 'reboot -f' 71
run_ends panic 'echo c > /proc/sysrq-trigger' 72

# 4. Two vCPUs: the guest sees both.
d=$(uxenctl create --kernel $K --initrd $I --mem 64 --vcpus 2 --name lin-smp)
check smp-boots wait_console "$d" "$READY" 15000
check smp-send uxenctl console "$d" --send 'echo cpus=$(nproc)\n'
check smp-nproc-2 wait_console "$d" "^cpus=2"

# Ended Linux guests stay listed, with their state, until destroyed.
for v in $a $b $c $d; do uxenctl destroy "$v"; done
for v in $a $b $c $d; do wait_gone "$v"; done
_n=1500
while [ $_n -gt 0 ] && [ "$(uxenctl list --json)" != "[]" ]; do usleep 20000; _n=$((_n - 1)); done
expect_eq destroyed-vms-gone "$(uxenctl list --json)" "[]"


# 5. Bad input: one readable line, a non-zero exit, no VM, nothing leaked.
before=$(uxenctl list --json)
out=$(uxenctl run --kernel /nonexistent 2>&1); rc=$?
[ $rc -ne 0 ] && pass missing-kernel-fails || fail missing-kernel-fails "rc=0"
expect_match missing-kernel-message "$out" "/nonexistent"
out=$(uxenctl run --kernel /init 2>&1); rc=$?
[ $rc -ne 0 ] && pass not-a-kernel-fails || fail not-a-kernel-fails "rc=0"
expect_match not-a-kernel-message "$out" "not a Linux bzImage or vmlinux"
out=$(uxenctl run --kernel $K --initrd /nonexistent 2>&1); rc=$?
[ $rc -ne 0 ] && pass missing-initrd-fails || fail missing-initrd-fails "rc=0"
out=$(uxenctl run --kernel $K --initrd $I --mem 2 2>&1); rc=$?
[ $rc -ne 0 ] && pass too-small-mem-fails || fail too-small-mem-fails "rc=0"
expect_match too-small-mem-message "$out" "MiB"
expect_eq bad-input-one-line "$(printf '%s\n' "$out" | wc -l)" 1
expect_eq no-vm-from-bad-input "$(uxenctl list --json)" "$before"
expect_same pool-back-at-end "$(pool_used)" "$base"
finish
