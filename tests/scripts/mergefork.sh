# Forks of VMs whose memory a merge folded, round after round, beside an
# idle VM, with kernel messages on the console.
. /tests/lib.sh
dmesg -n 8
check insmod insmod /lib/modules/uxen.ko debug=1 ${UXEN_E9:+log_e9=1}
( n=0; while :; do sleep 5; n=$((n+5)); echo "<0>heartbeat $n" >/dev/kmsg; echo "UXEN-INFO: heartbeat $n"; done ) &
hb=$!
keep=$(uxenctl create /guests/idle --name keeper)
wait_console "$keep" "halting"
for round in $(seq 1 ${ROUNDS:-20}); do
    info "round $round"
    p=$(uxenctl create /guests/forkee --mem 16 --cmdline "touch=4 same=2 zero=1" --name merger)
    wait_console "$p" "forkee: vm$p ready" || fail "r$round-ready" "no"
    kids=$(fork_vm "$p" --count 8)
    for c in $kids; do wait_console "$c" "forkee: vm$c wrote 2048 KiB" || fail "r$round-wrote" "vm$c"; done
    info "merge: $(uxenctl merge --json)"
    first=$(printf '%s\n' $kids | head -n1)
    g=$(fork_vm "$first")
    check r$round-merged-memory-intact wait_console "$g" "forkee: vm$g forked from vm$first: memory intact"
    g2=$(fork_vm "$g")
    check r$round-merged-memory-intact-again wait_console "$g2" "forkee: vm$g2 forked from vm$g: memory intact"
    for c in $kids $g $g2 $p; do uxenctl destroy "$c"; done
    for c in $kids $g $g2 $p; do wait_gone "$c"; done
    info "heap: $(uxenctl stats --json | sed -n 's/.*"heap":\({[^}]*}\).*/\1/p')"
done
kill $hb
uxenctl destroy "$keep"; wait_gone "$keep"
check rmmod rmmod uxen
finish
