# Clones of a booted Linux guest: eight forks of a guest at its shell, each
# answering on its own console with its own random UUID while the parent
# keeps its files and processes; a guest of two vCPUs forked with both
# running in the clone; a fork from inside the guest (`uxen-fork`); the
# memory the clones share; everything destroyed in mixed order with the
# pool back where it was.
. /tests/lib.sh
check insmod insmod /lib/modules/uxen.ko
K=/linux-guest/bzImage
I=/linux-guest/initramfs.cpio.gz
READY="uxen-guest: ready"
free0=$(pool_free)

# 1. The parent: booted, a file written and a process left running.
a=$(uxenctl create --kernel $K --initrd $I --mem 64 --name parent)
check parent-boots wait_console "$a" "$READY" 15000
check parent-state ask "$a" 'echo parent-file > /root/f; sleep 100000 & echo bg=$!' '^bg=[0-9]+'
bg=$(sed -n 's/^bg=\([0-9]*\).*/\1/p' "/run/uxen/vm-$a.console" | tail -n1)
one=$(pool_used)
info "frames in use: one booted guest $one"

# 2. Eight clones, each answering a command of its own (a shell builtin)
# right after the fork; the frames of the nine guests then; then each
# asked for a random UUID (`cat`, a fork and exec in the guest), the
# parent too, all different.
kids=$(fork_vm "$a" --count 8 --json)
ids=$(printf '%s' "$kids" | grep -o '"id":[0-9]*' | cut -d: -f2)
expect_eq eight-clones "$(printf '%s\n' $ids | grep -c .)" 8
for k in $ids; do
    check "clone-$k-answers" ask "$k" "echo clone-$k-says-\$(($k * 7))" "^clone-$k-says-$((k * 7))"
done
eight=$(pool_used)
info "frames in use: the guest and its 8 clones, each after a command: $eight (one guest: $one)"
if [ -n "$one" ] && [ -n "$eight" ] && [ "$eight" -lt $((one * 13 / 10)) ]; then
    pass clones-share-memory
else
    fail clones-share-memory "one guest '$one', with 8 clones '$eight'"
fi
uuids=$(uuid_of "$a" uuid-parent)
n=0
for k in $ids; do
    u=$(uuid_of "$k" "uuid-$k")
    [ -n "$u" ] && n=$((n + 1))
    uuids="$uuids $u"
done
expect_eq uuid-from-every-clone "$n" 8
info "UUIDs after the fork: $uuids"
expect_eq uuids-all-different "$(printf '%s\n' $uuids | sort -u | grep -c .)" 9
# What makes them differ, whatever the timing: each side got a new VM
# generation ID and its interrupt, and its kernel reseeded.
for k in $a $ids; do
    check "vm$k-reseeded" ask "$k" "echo reseeds-$k=\$(dmesg | grep -c 'crng reseeded due to virtual machine fork')" "^reseeds-$k=[1-9]"
done
info "frames in use: the guest and its 8 clones, each after also a cat: $(pool_used)"
check parent-answers ask "$a" 'echo parent-says-$((6 * 7))' '^parent-says-42'
check parent-file-kept ask "$a" 'echo file=$(cat /root/f)' '^file=parent-file'
check parent-process-kept ask "$a" "kill -0 $bg && echo bg-alive" '^bg-alive'

# 3. A guest of two vCPUs forks; both vCPUs run in the clone.
b=$(uxenctl create --kernel $K --initrd $I --mem 64 --vcpus 2 --name smp)
check smp-boots wait_console "$b" "$READY" 15000
check smp-two-cpus ask "$b" 'echo cpus=$(nproc)' '^cpus=2'
bc=$(fork_vm "$b" --json | grep -o '"id":[0-9]*' | cut -d: -f2)
check smp-forked test -n "$bc"
check smp-clone-cpu0 ask "$bc" "taskset -c 0 sh -c 'echo on-cpu0-ok'" '^on-cpu0-ok'
check smp-clone-cpu1 ask "$bc" "taskset -c 1 sh -c 'echo on-cpu1-ok'" '^on-cpu1-ok'
check smp-parent-cpu1 ask "$b" "taskset -c 1 sh -c 'echo parent-cpu1-ok'" '^parent-cpu1-ok'

# 4. A fork from inside the guest: `uxen-fork` prints the child's id in the
# parent and `child` in the child; both go on.
c=$(uxenctl create --kernel $K --initrd $I --mem 64 --name inner)
check inner-boots wait_console "$c" "$READY" 15000
check inner-fork ask "$c" 'uxen-fork' '^parent [0-9]+'
cc=$(sed -n 's/^parent \([0-9]*\).*/\1/p' "/run/uxen/vm-$c.console" | tail -n1)
check inner-child-says-child wait_console "$cc" '^child' 5000
check inner-child-goes-on ask "$cc" 'echo inner-child-ok' '^inner-child-ok'
for k in $c $cc; do
    check "inner-vm$k-reseeded" ask "$k" "echo reseeds-$k=\$(dmesg | grep -c 'crng reseeded due to virtual machine fork')" "^reseeds-$k=[1-9]"
done
check inner-parent-goes-on ask "$c" 'echo inner-parent-ok' '^inner-parent-ok'
expect_match inner-child-listed "$(uxenctl list --json)" "\"id\":$cc,[^}]*\"parent\":$c"
# Not for an unprivileged process: the guest kernel refuses it the port.
check inner-fork-needs-root ask "$c" 'chpst -u 65534:65534 uxen-fork; echo unpriv=$?' '^unpriv=1'

# 5. Everything destroyed, in mixed order; the pool is back where it was.
all="$(printf '%s\n' $ids | sed -n 3p) $a $bc $(printf '%s\n' $ids | sed -n 1p) $cc $b $ids $c"
for v in $all; do uxenctl destroy "$v" 2>/dev/null; done
for v in $all; do wait_gone "$v"; done
expect_eq no-vms-left "$(uxenctl list --json)" "[]"
expect_eq pool-free-back "$(pool_free)" "$free0"
check rmmod rmmod uxen
check_kernel_clean
finish
