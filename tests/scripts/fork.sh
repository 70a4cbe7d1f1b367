# vmfork: copy-on-write clones from inside (the FORK hypercall) and from
# outside (uxenctl fork); exact memory, truthful accounting, destroy in any
# order, forks of forks, the live-children limit, and no leaks.
. /tests/lib.sh
check insmod insmod /lib/modules/uxen.ko debug=1


# vm_field ID KEY: a number from the VM's entry in `uxenctl list --json`.
vm_field() {
    uxenctl list --json | tr '{' '\n' | grep "\"id\":$1," | sed -n "s/.*\"$2\":\([0-9]*\).*/\1/p"
}

# A VM that lives through the whole suite holds the pool: its use is the
# baseline every destroy must return to.
keep=$(uxenctl create /guests/idle --name keeper)
wait_console "$keep" "halting"
base=$(pool_used)
info "baseline: $base frames in use with one idle VM"

# --- 1. The guest forks itself 4 times through the hypercall. ---
out=$(uxenctl run /guests/forker --mem 8 --cmdline "n=4" 2>&1); rc=$?
out=$(printf '%s\n' "$out" | tr -d '\r')
expect_eq forker-all-exit-0 "$rc" 0
printf '%s\n' "$out" | sed 's/^/    /'
parent=$(printf '%s\n' "$out" | sed -n 's/^forker: copy 0 is vm\([0-9]*\) .*/\1/p')
sum=$(printf '%s\n' "$out" | sed -n 's/^forker: vm[0-9]* filled .* sum=\([0-9a-f]*\),.*/\1/p')
kids=$(printf '%s\n' "$out" | sed -n 's/^forker: vm[0-9]* fork [0-9]* returned child vm\([0-9]*\)$/\1/p')
expect_eq forker-parent-got-4-child-ids "$(printf '%s\n' $kids | grep -c .)" 4
ok=0
k=1
for c in $kids; do
    printf '%s\n' "$out" | grep -qx "forker: copy $k is vm$c, fork returned 0, parent vm$parent" && ok=$((ok + 1))
    k=$((k + 1))
done
expect_eq forker-children-got-0-and-their-ids "$ok" 4
expect_eq forker-five-distinct-ids "$(printf '%s\n' $parent $kids | sort -u | grep -c .)" 5
expect_eq forker-all-see-fork-time-memory \
    "$(printf '%s\n' "$out" | grep -c "sees the memory as at the fork sum=$sum\$")" 5
expect_eq forker-all-isolated "$(printf '%s\n' "$out" | grep -c "isolated ok: 3 rounds")" 5
check_fails forker-no-failures sh -c "printf '%s\n' \"\$1\" | grep -q FAIL" sh "$out"
expect_eq forker-leaves-nothing "$(pool_used)" "$base"

# --- 2. 64 forks of a running guest, from outside. ---
p=$(uxenctl create /guests/forkee --mem 40 --cmdline "touch=32" --name forkee)
check forkee-ready wait_console "$p" "forkee: vm$p ready"
psum=$(sed -n 's/.*ready: touched .* sum=\([0-9a-f]*\).*/\1/p' "/run/uxen/vm-$p.console" | tr -d '\r')
usleep 500000
alone=$(($(pool_used) - base))
kids=$(fork_vm "$p" --count 64); rc=$?
expect_eq fork-64-rc "$rc" 0
expect_eq fork-64-ids "$(printf '%s\n' $kids | sort -u | grep -c .)" 64
ok=0
for c in $kids; do
    wait_console "$c" "forkee: vm$c forked from vm$p: memory intact sum=$psum" 500 && ok=$((ok + 1))
done
expect_eq fork-64-children-print-identity "$ok" 64
usleep 500000
after=$(($(pool_used) - base))
ratio=$((after * 1000 / alone))
info "fork: parent alone $alone frames; parent and 64 idle children $after frames; ratio $ratio/1000"
if [ "$ratio" -lt 1100 ]; then pass fork-64-under-1.1x; else fail fork-64-under-1.1x "$after / $alone frames"; fi
first=$(printf '%s\n' $kids | head -n1)
expect_eq list-parent-field "$(vm_field "$first" parent)" "$p"
shared=$(vm_field "$first" frames_shared)
private=$(vm_field "$first" frames_private)
info "child vm$first: $private private, $shared shared frames"
if [ "$shared" -ge 8000 ] && [ "$private" -lt 16 ]; then pass list-child-frames; else fail list-child-frames "private $private shared $shared"; fi
expect_match list-parent-null-for-root "$(uxenctl list --json | tr '{' '\n' | grep "\"id\":$p,")" '"parent":null'
out=$(uxenctl fork "$p" 2>&1); rc=$?
expect_eq fork-65th-refused "$rc" 1
expect_match fork-65th-message "$out" "Resource temporarily unavailable|EAGAIN|live children"

# A fork of a fork sees the same memory.
g=$(fork_vm "$first")
check fork-of-fork-runs wait_console "$g" "forkee: vm$g forked from vm$first: memory intact sum=$psum"
expect_eq fork-of-fork-parent "$(vm_field "$g" parent)" "$first"

# --- 3. Destroy orders. The parent goes first; its children live on. ---
check destroy-parent-first uxenctl destroy "$p"
wait_gone "$p"
second=$(printf '%s\n' $kids | sed -n 2p)
g2=$(fork_vm "$second")
check child-of-destroyed-parent-forks wait_console "$g2" "forkee: vm$g2 forked from vm$second: memory intact sum=$psum"
ok=0
for c in $kids $g $g2; do
    uxenctl destroy "$c" && ok=$((ok + 1))
done
expect_eq destroy-all-children "$ok" 66
for c in $kids $g $g2; do wait_gone "$c"; done
expect_eq parent-first-frees-everything "$(pool_used)" "$base"

# Children first, then the parent, which must still see its memory.
p=$(uxenctl create /guests/forkee --mem 8 --cmdline "touch=4" --name forkee2)
check forkee2-ready wait_console "$p" "ready"
kids=$(fork_vm "$p" --count 3)
for c in $kids; do wait_console "$c" "forkee: vm$c forked"; done
for c in $kids; do uxenctl destroy "$c"; wait_gone "$c"; done
expect_eq children-gone-parent-owns-all "$(vm_field "$p" frames_shared)" 0
c=$(fork_vm "$p")
check parent-forks-again wait_console "$c" "forkee: vm$c forked from vm$p: memory intact"
check destroy-parent uxenctl destroy "$p"
check destroy-last-child uxenctl destroy "$c"
wait_gone "$p"; wait_gone "$c"
expect_eq children-first-frees-everything "$(pool_used)" "$base"

# --- 4. Re-merging: children that wrote the same data fold back. ---
p=$(uxenctl create /guests/forkee --mem 16 --cmdline "touch=4 same=2 zero=1" --name merger)
check merger-ready wait_console "$p" "forkee: vm$p ready"
kids=$(fork_vm "$p" --count 8)
ok=0
for c in $kids; do
    wait_console "$c" "forkee: vm$c wrote 2048 KiB of shared data and 1024 KiB of zeros" && ok=$((ok + 1))
done
expect_eq merge-children-wrote "$ok" 8
s0=$(stats_json)
u1=$(pool_used)
m=$(uxenctl merge --json); rc=$?
expect_eq merge-rc "$rc" 0
u2=$(pool_used)
info "merge: $m; frames in use $u1 -> $u2"
merged=$(jnum "$m" merged)
zero=$(jnum "$m" zero)
freed=$(jnum "$m" frames_freed)
if [ "$merged" -ge $((7 * 512)) ]; then pass merge-folds-identical-pages; else fail merge-folds-identical-pages "merged $merged"; fi
if [ "$zero" -ge $((8 * 256)) ]; then pass merge-drops-zero-pages; else fail merge-drops-zero-pages "zero $zero"; fi
# The idle children wake now and then and write their stacks, which the
# merge may have folded: a few copies are theirs.
d=$((freed - (u1 - u2)))
if [ "$d" -ge 0 ] && [ "$d" -le 64 ]; then pass merge-freed-what-it-says; else fail merge-freed-what-it-says "freed $freed, use fell by $((u1 - u2))"; fi
if [ "$freed" -ge $((7 * 512 + 8 * 256)) ]; then pass merge-frees-frames; else fail merge-frees-frames "freed $freed"; fi
s1=$(stats_json)
expect_eq merge-counted-in-stats "$(($(jnum "$s1" merged) - $(jnum "$s0" merged)))" "$merged"
first=$(printf '%s\n' $kids | head -n1)
expect_match merged-child-shares "$(uxenctl list --json | tr '{' '\n' | grep "\"id\":$first,")" '"frames_private":[0-9],'
# The merged memory reads as before, in a fork of a merged child and in
# the child itself after more forks.
g=$(fork_vm "$first")
check merged-memory-intact wait_console "$g" "forkee: vm$g forked from vm$first: memory intact"
g2=$(fork_vm "$g")
check merged-memory-intact-again wait_console "$g2" "forkee: vm$g2 forked from vm$g: memory intact"
out=$(uxenctl merge 9999 2>&1); rc=$?
expect_eq merge-unknown-rc "$rc" 1
expect_match merge-unknown-message "$out" "no VM with id 9999"
for c in $kids $g $g2 $p; do uxenctl destroy "$c"; done
for c in $kids $g $g2 $p; do wait_gone "$c"; done
expect_eq merge-then-destroy-frees-everything "$(pool_used)" "$base"

# --- Bad requests: clear errors, nothing changes. ---
before=$(uxenctl list --json)
out=$(uxenctl fork 9999 2>&1); rc=$?
expect_eq fork-unknown-rc "$rc" 1
expect_match fork-unknown-message "$out" "cannot reach the VMM of vm 9999"
out=$(uxenctl fork "$keep" --count 0 2>&1); rc=$?
expect_eq fork-count-0-rc "$rc" 2
out=$(uxenctl fork "$keep" --count 65 2>&1); rc=$?
expect_eq fork-count-65-rc "$rc" 2
expect_match fork-count-65-message "$out" "65 is not in 1..=64"
expect_eq bad-forks-change-nothing "$(uxenctl list --json)" "$before"
two=$(uxenctl create /guests/idle --vcpus 2 --name two)
wait_console "$two" "halting"
# A VM of two vCPUs forks from outside too: both vCPUs leave RUN first.
out=$(uxenctl fork "$two" --json 2>&1); rc=$?
expect_eq fork-two-vcpus "$rc" 0
c2=$(printf '%s' "$out" | sed -n 's/.*"id":\([0-9]*\).*/\1/p')
expect_match fork-two-vcpus-child "$(uxenctl list --json)" "\"id\":${c2:-none},[^}]*\"vcpus\":2"
uxenctl destroy "$c2"; wait_gone "$c2"
uxenctl destroy "$two"; wait_gone "$two"

last_vm_gone "$keep"
finish
