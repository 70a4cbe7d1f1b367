# Merge, then fork the merged VMs, round after round beside an idle VM:
# the merged memory reads as before in forks of forks, every round gives
# back all it took, and the hypervisor's heap does not shrink (the host
# EPT tables of frames that come and go are freed again).
. /tests/lib.sh
check insmod insmod /lib/modules/uxen.ko debug=1

# heap_free: free bytes of the hypervisor's heap.
heap_free() { uxenctl stats --json | sed -n 's/.*"heap":{"bytes_total":[0-9]*,"bytes_free":\([0-9]*\)}.*/\1/p'; }

keep=$(uxenctl create /guests/idle --name keeper)
wait_console "$keep" "halting"
base=$(pool_used)
rounds=${ROUNDS:-12}
ok=0
for round in $(seq 1 "$rounds"); do
    p=$(uxenctl create /guests/forkee --mem 16 --cmdline "touch=4 same=2 zero=1" --name merger)
    wait_console "$p" "forkee: vm$p ready" || { fail "round-$round" "vm$p not ready"; break; }
    kids=$(fork_vm "$p" --count 8) || { fail "round-$round" "fork of vm$p failed"; break; }
    wrote=0
    for c in $kids; do wait_console "$c" "forkee: vm$c wrote 2048 KiB" && wrote=$((wrote + 1)); done
    m=$(uxenctl merge --json)
    first=$(printf '%s\n' $kids | head -n1)
    g=$(fork_vm "$first")
    g2=$(fork_vm "$g")
    if [ "$wrote" = 8 ] && [ "$(jnum "$m" merged)" -ge $((7 * 512)) ] &&
        wait_console "$g" "forkee: vm$g forked from vm$first: memory intact" &&
        wait_console "$g2" "forkee: vm$g2 forked from vm$g: memory intact"; then
        ok=$((ok + 1))
    else
        fail "round-$round" "wrote $wrote, merge $m, forks vm$g vm$g2: $(tail -n 2 /run/uxen/vm-$g2.console 2>/dev/null | tr '\n' ' ')"
    fi
    for c in $kids $g $g2 $p; do uxenctl destroy "$c"; done
    for c in $kids $g $g2 $p; do wait_gone "$c"; done
    u=$(pool_used)
    [ "$u" = "$base" ] || fail "round-$round-frees-everything" "$u frames in use, $base before"
    h=$(heap_free)
    # The baseline is taken after round 2: the first rounds split host EPT
    # blocks that later rounds donate and reclaim again (tables the heap
    # keeps, by design), which moved the reading by up to 54 KiB once.
    [ "$round" = 2 ] && heap1=$h
    info "round $round: merged $(jnum "$m" merged), freed $(jnum "$m" frames_freed); heap free $h"
done
expect_eq merge-then-fork-rounds "$ok" "$rounds"
# Some bytes move with the pool's bookkeeping; a leak per round would
# show as tens of KiB per round.
if [ -n "$heap1" ] && [ -n "$h" ] && [ $((heap1 - h)) -le 65536 ]; then pass heap-does-not-shrink; else fail heap-does-not-shrink "$heap1 -> $h bytes free from round 2 to round $rounds"; fi
uxenctl destroy "$keep"; wait_gone "$keep"
check rmmod rmmod uxen
finish
