# Re-merging costs, in emulated TSC ticks (instructions, in Bochs): a first
# pass over eight identical guests and a second over the same, unchanged
# memory, per page examined; the pages reclaimed against the ideal (7/8 of
# their identical pages); and the host CPU share that background merging
# takes at its default budget. Baseline: one full copy of the same guest
# (FORK_COPY), per page, in the same run. Also the pages the second pass
# skipped unread and the index's size after it.
. /tests/lib.sh
check insmod insmod /lib/modules/uxen.ko
P=/sys/module/uxen/parameters
IDEAL=$((7 * 512))

eight() {
    _ids=""
    for _i in 1 2 3 4 5 6 7 8; do
        _ids="$_ids $(uxenctl create /guests/forkee --mem 8 --cmdline "touch=2" --name "$1$_i")"
    done
    for _id in $_ids; do wait_console "$_id" "forkee: vm$_id ready" 30000 || return 1; done
    echo $_ids
}
gone() { for _id in $1; do uxenctl destroy "$_id"; done; for _id in $1; do wait_gone "$_id" 3000; done; }

ids=$(eight bench) || fail bench-guests-ready "$ids"
first=$(echo $ids | cut -d' ' -f1)
cp=$(uxenctl fork "$first" --copy --json)
c=$(printf '%s' "$cp" | sed -n 's/.*"id":\([0-9]*\).*/\1/p')
copy=$(printf '%s' "$cp" | sed -n 's/.*"tsc":\([0-9]*\).*/\1/p')
pages=$(uxenctl list --json | sed -n "s/.*{\"id\":$first,[^}]*\"frames_private\":\([0-9]*\).*/\1/p")
uxenctl destroy "$c"; wait_gone "$c" 3000
m1=$(uxenctl merge --json)
m2=$(uxenctl merge --json)
st=$(stats_json)
info "copy $cp ($pages frames); pass 1 $m1; pass 2 $m2; $(printf '%s' "$st" | grep -o '"merge":{[^}]*}')"
s1=$(jnum "$m1" scanned); t1=$(jnum "$m1" tsc); g1=$(jnum "$m1" merged)
s2=$(jnum "$m2" scanned); t2=$(jnum "$m2" tsc)
if [ -n "$s1" ] && [ "$s1" -gt 0 ] && [ -n "$t2" ] && [ -n "$copy" ] && [ -n "$pages" ] && [ "$pages" -gt 0 ]; then
    pass bench-passes-measured
    echo "UXEN-BENCH: merge pass=1 scanned=$s1 tsc=$t1 merged=$g1 ideal=$IDEAL copy_tsc=$copy copy_pages=$pages"
    echo "UXEN-BENCH: merge pass=2 scanned=$s2 tsc=$t2 merged=$(jnum "$m2" merged) ideal=0 copy_tsc=$copy copy_pages=$pages"
    echo "UXEN-BENCH: merge index=1 skipped=$(jnum "$st" skipped) indexed=$(jnum "$st" indexed) stable=$(jnum "$st" stable) index_frames=$(jnum "$st" index_frames) index_heap_bytes=$(jnum "$st" index_heap_bytes)"
else
    fail bench-passes-measured "copy '$cp' pages '$pages'; '$m1'; '$m2'"
fi
gone "$ids"

# Background merging at its default budget, beside a host that is busy on
# both CPUs: the merge thread's CPU time against the time that passed.
ids=$(eight auto) || fail bench-guests-ready-2 "$ids"
(while :; do :; done) & s1=$!
(while :; do :; done) & s2=$!
check auto-on uxenctl merge --auto
knobs="interval_ms=$(cat $P/merge_interval_ms) batch=$(cat $P/merge_batch)"
pid=$(grep -l '^uxen-merge$' /proc/[0-9]*/comm | head -n1 | cut -d/ -f3)
ticks() { awk '{ print $14 + $15 }' /proc/"$pid"/stat; }
up() { cut -d' ' -f1 /proc/uptime | tr -d .; }
tsc0=$(jnum "$(stats_json)" tsc); k0=$(ticks); u0=$(up)
sleep 20
st=$(stats_json)
tsc1=$(jnum "$st" tsc); k1=$(ticks); u1=$(up)
kill $s1 $s2; wait $s1 $s2 2>/dev/null
check auto-off uxenctl merge --auto off
khz=$(sed -n 's/.*tsc_early_khz=\([0-9]*\).*/\1/p' /proc/cmdline)
info "auto: thread $pid ticks $k0 -> $k1, uptime(cs) $u0 -> $u1, merge tsc $tsc0 -> $tsc1, tsc_khz $khz; $(printf '%s' "$st" | grep -o '"merge":{[^}]*}')"
if [ -n "$pid" ] && [ -n "$k1" ] && [ -n "$tsc1" ] && [ $((u1 - u0)) -gt 0 ] && [ -n "$khz" ]; then
    pass bench-auto-measured
    echo "UXEN-BENCH: merge auto=1 thread_cs=$((k1 - k0)) elapsed_cs=$((u1 - u0)) hv_tsc=$((tsc1 - tsc0)) tsc_khz=$khz $knobs shared=$(jnum "$st" pages_shared_now)"
else
    fail bench-auto-measured "pid '$pid' ticks '$k0' '$k1' tsc '$tsc0' '$tsc1' khz '$khz'"
fi
gone "$ids"
check rmmod rmmod uxen
finish
