# The demo: the whole stack on a running Linux with two CPUs.
# Load the hypervisor, see that every CPU runs under it, boot a Linux guest,
# run a command in it, fork it three times and ask each clone for a random
# UUID, merge; start a test guest, fork it, merge what the forks wrote
# alike, read the counters, and give the machine back.
. /tests/lib.sh

say() {
    echo
    echo "=== $*"
}

# run CMD...: shows a command and its output.
run() {
    echo "# $*"
    "$@"
}

say "1. Load: insmod uxen.ko virtualizes every CPU and demotes Linux"
run grep -c ^processor /proc/cpuinfo
bare0=$(cpuid_line 0 0x40000000)
bare1=$(cpuid_line 1 0x40000000)
echo "CPU 0 and CPU 1, bare: CPUID 0x40000000 says '$bare0' and '$bare1'"
check insmod insmod /lib/modules/uxen.ko
run uxenctl version
for cpu in 0 1; do
    sig=$(signature $cpu)
    echo "CPU $cpu: CPUID 0x40000000 says '$sig'"
    expect_eq "cpu$cpu-virtualized" "$sig" "$SIG"
done
hv=$(stats_json | sed -n 's/.*"hv_region":{"base":\([0-9]*\).*/\1/p')
echo "# the host tries to read the hypervisor's own memory at $(printf '%#x' "$hv")"
out=$(uxtest devmem read "$(printf '%#x' "$hv")" 4096)
echo "$out"
expect_match host-reads-zeros "$out" "nonzero=0 "

say "2. Linux: a Linux kernel boots as a guest with 2 vCPUs; a command runs in it"
l=$(uxenctl create --kernel /linux-guest/bzImage --initrd /linux-guest/initramfs.cpio.gz --mem 64 --vcpus 2 --name linux)
echo "# uxenctl create --kernel /linux-guest/bzImage --initrd /linux-guest/initramfs.cpio.gz --mem 64 --vcpus 2  ->  vm $l"
check linux-boots wait_console "$l" "uxen-guest: ready" 15000
run uxenctl console "$l" --send 'echo "guest: $(uname -sr) on $(nproc) CPUs, $(grep MemTotal /proc/meminfo)"\n'
check linux-answers wait_console "$l" "^guest: Linux 6.12"
check linux-nproc wait_console "$l" "on 2 CPUs"
run uxenctl console "$l"

say "2b. Clones: the booted guest forked 3 times; each side gets a new VM generation ID, reseeds, and answers with its own random UUID"
lused0=$(pool_used)
lkids=$(uxenctl fork "$l" --count 3 --json)
echo "# uxenctl fork $l --count 3 --json"
echo "$lkids"
lids=$(printf '%s' "$lkids" | grep -o '"id":[0-9]*' | cut -d: -f2)
uuids=""
for k in $l $lids; do
    uxenctl console "$k" --send "echo \"vm $k: uuid \$(cat /proc/sys/kernel/random/uuid)\"; echo \"vm $k: kernel: \$(dmesg | grep -o 'crng reseeded due to virtual machine fork' | tail -n1)\"\n"
    check "linux-vm$k-uuid" wait_console "$k" "^vm $k: uuid [0-9a-f-]{36}"
    check "linux-vm$k-reseeded" wait_console "$k" "^vm $k: kernel: crng reseeded due to virtual machine fork"
    sed -n "s/^\(vm $k: kernel: .*\)/\1/p" "/run/uxen/vm-$k.console" | tail -n1
    u=$(sed -n "s/^vm $k: uuid \([0-9a-f-]*\).*/\1/p" "/run/uxen/vm-$k.console" | tail -n1)
    echo "vm $k: uuid $u"
    uuids="$uuids $u"
done
expect_eq linux-clone-uuids-differ "$(printf '%s\n' $uuids | sort -u | grep -c .)" 4
lused1=$(pool_used)
run uxenctl merge
lused2=$(pool_used)
echo "frames in use: the guest alone $lused0; with its 3 clones $lused1; after a merge $lused2 ($((lused1 - lused2)) saved)"
for k in $lids; do uxenctl destroy "$k"; done
for k in $lids; do wait_gone "$k"; done
run uxenctl console "$l" --send 'poweroff -f\n'
check linux-powers-off wait_gone "$l" 15000
run uxenctl list
expect_match linux-ended "$(uxenctl list --json | tr '{' '\n' | grep "\"id\":$l,")" '"state":"exited".*"exit_code":0'
check linux-destroy uxenctl destroy "$l"

say "3. Create: a guest VM that fills 24 MiB, then waits"
p=$(uxenctl create /guests/forkee --mem 32 --cmdline "touch=24 same=4 zero=2" --name demo)
check create wait_console "$p" "forkee: vm$p ready"
run uxenctl console "$p"
free0=$(pool_free)
used0=$(($(pool_total) - free0))
run uxenctl list

say "4. Fork: 8 copy-on-write clones of the running guest"
kids=$(uxenctl fork "$p" --count 8 --json)
echo "$kids"
ids=$(printf '%s' "$kids" | grep -o '"id":[0-9]*' | cut -d: -f2)
ok=0
for c in $ids; do
    wait_console "$c" "forkee: vm$c wrote" && ok=$((ok + 1))
done
expect_eq forks-running "$ok" 8
first=$(printf '%s\n' $ids | head -n1)
run uxenctl console "$first"
run uxenctl list
used1=$(pool_used)
echo "frames in use: parent alone $used0; parent and 8 forks, each with 6 MiB written: $used1"

say "5. Merge: the forks wrote the same 4 MiB and 2 MiB of zeros; fold them"
m=$(uxenctl merge --json)
run uxenctl merge
used2=$(pool_used)
echo "frames in use after the merges: $used2 (was $used1)"
if [ "$used2" -lt "$used1" ]; then pass merge-frees; else fail merge-frees "$used1 -> $used2"; fi
g=$(uxenctl fork "$first")
check merged-memory-intact wait_console "$g" "forkee: vm$g forked from vm$first: memory intact"
run uxenctl list

say "6. Stats: what the hypervisor counted"
run uxenctl stats

say "7. Unload: destroy the VMs, rmmod gives the machine back"
for c in $ids $g $p; do uxenctl destroy "$c"; done
for c in $ids $g $p; do wait_gone "$c"; done
run uxenctl list
check rmmod rmmod uxen
echo "CPU 0 and CPU 1: CPUID 0x40000000 says '$(cpuid_line 0 0x40000000)' and '$(cpuid_line 1 0x40000000)'"
expect_native cpu0-native-again 0 "$bare0"
expect_native cpu1-native-again 1 "$bare1"
finish
