# Fork cost against VM size: a copy-on-write fork and a full copy
# (FORK_COPY) of the same running guest, three times each; the medians in
# emulated TSC ticks as the hypervisor measured them. Then the cost of
# copy-on-write itself: the first write to a shared page after a fork, in
# the parent and in the child, as the guest times it, against a plain
# 4 KiB copy in the same guest.
. /tests/lib.sh
check insmod insmod /lib/modules/uxen.ko

# fork_tsc VM [--copy]: forks once, destroys the child, prints the cost.
fork_tsc() {
    j=$(uxenctl fork "$@" --json) || return 1
    c=$(printf '%s' "$j" | sed -n 's/.*"id":\([0-9]*\).*/\1/p')
    uxenctl destroy "$c"
    wait_gone "$c" 3000
    printf '%s' "$j" | sed -n 's/.*"tsc":\([0-9]*\).*/\1/p'
}

for mib in 16 64 256; do
    v=$(uxenctl create /guests/forkee --mem $((mib + 8)) --cmdline "touch=$mib" --name "bench$mib")
    check "bench-$mib-ready" wait_console "$v" "forkee: vm$v ready" 30000
    c1=$(fork_tsc "$v"); c2=$(fork_tsc "$v"); c3=$(fork_tsc "$v")
    f1=$(fork_tsc "$v" --copy); f2=$(fork_tsc "$v" --copy); f3=$(fork_tsc "$v" --copy)
    info "fork $mib MiB: cow $c1 $c2 $c3; copy $f1 $f2 $f3"
    # A fork that failed gives no count: the bench fails rather than
    # report the median of what is left.
    if cow=$(median "$c1" "$c2" "$c3") && copy=$(median "$f1" "$f2" "$f3"); then
        pass "bench-$mib-measured"
        echo "UXEN-BENCH: fork mib=$mib cow=$cow copy=$copy"
    else
        fail "bench-$mib-measured" "a fork gave no count: cow '$c1' '$c2' '$c3', copy '$f1' '$f2' '$f3'"
    fi
    uxenctl destroy "$v"
    wait_gone "$v" 3000
done
# cow_line SIDE: the cowcost guest's figures for the parent or the child,
# as key=value words; nothing if it printed none.
cow_line() {
    printf '%s\n' "$cow" | tr -d '\r' | sed -n "s/^cowcost: $1 \(first=[0-9]* next=[0-9]* copy4k=[0-9]*\)\$/\1/p"
}
cow=$(uxenctl run /guests/cowcost --mem 32 2>&1); rc=$?
info "cowcost: $(printf '%s' "$cow" | tr '\n' ' ')"
expect_eq cowcost-exit-0 "$rc" 0
for side in parent child; do
    l=$(cow_line $side)
    if [ -n "$l" ]; then
        pass "cow-$side-measured"
        echo "UXEN-BENCH: cow side=$side $l"
    else
        fail "cow-$side-measured" "no figures from the $side"
    fi
done
check rmmod rmmod uxen
finish
