# VT-d without VMX. QEMU emulates an Intel IOMMU and the edu DMA device but
# no VT-x, so the module loads the hypervisor image with iommu_only=1: the
# image runs its own VT-d code (DMAR parsing, tables, invalidation, faults)
# exactly as under VMX, and the driver reaches it by direct calls. The host
# was booted with intel_iommu=off intremap=off, so the unit is free.
. /tests/lib.sh
MOD=/lib/modules/uxen.ko
GSTS_TES=$((1 << 31))
GSTS_QIES=$((1 << 26))

# --- The pre-flight sees the DMAR table, and a host that leaves the unit
# alone.
j=$(uxenctl check --json)
info "check: $j"
expect_eq check-dmar-ok "$(verdict "$j" dmar)" ok
expect_match check-intremap-ok "$j" '"name":"intremap","verdict":"ok","detail":"[^"]*\(booted with intel_iommu=off intremap=off\)"'

# --- The bare machine: edu is there and its DMA works.
edu_check
sid=$EDU_SID

# --- A failed load turns remapping off again: DMA still works after it.
out=$(uxtest modload $MOD iommu_only=1 fail_cpu=1 2>&1)
expect_match rollback-insmod-fails "$out" "errno=5 "
d=$(dmesg)
expect_match rollback-remapping-was-on "$d" "uxen: hv: VT-d: DMA remapping on in 1 unit"
expect_match rollback-injected "$d" "uxen: hv: error: cpu1: entry failure injected"
expect_match rollback-remapping-off "$d" "uxen: hv: VT-d: DMA remapping off"
check_fails rollback-no-device test -e /dev/uxen
expect_eq rollback-dma-works "$(uxtest edu roundtrip)" ok
unit=$(printf '%s' "$d" | sed -n 's/.*VT-d: unit 0 at \(0x[0-9a-f]*\),.*/\1/p' | head -n1)
info "remapping unit registers at $unit"
gsts=$(uxtest mmio read32 $((unit + 0x1c)))
expect_eq rollback-gsts-off "$(( gsts & (GSTS_TES | GSTS_QIES) ))" 0

# --- A unit someone else drives is refused: turn translation on through
# the registers, as firmware or another kernel would (root table pointer
# at 4 GiB, where this machine has nothing: every DMA would fault).
dmesg -c >/dev/null
uxtest mmio write32 $((unit + 0x20)) 0 >/dev/null
uxtest mmio write32 $((unit + 0x24)) 1 >/dev/null
uxtest mmio write32 $((unit + 0x18)) $((1 << 30)) >/dev/null
uxtest mmio write32 $((unit + 0x18)) $GSTS_TES >/dev/null
gsts=$(uxtest mmio read32 $((unit + 0x1c)))
expect_eq foreign-owner-gsts-tes "$(( gsts & GSTS_TES ))" $GSTS_TES
out=$(uxtest modload $MOD iommu_only=1 2>&1)
expect_match foreign-owner-refused "$out" "errno=16 "
d=$(dmesg)
expect_match foreign-owner-says-why "$d" "uxen: hv: error: VT-d unit at $unit is already in use \(GSTS 0x[0-9a-f]*\); boot the host with intel_iommu=off"
expect_match foreign-owner-driver-says "$d" "the IOMMU is already in use; boot the host with intel_iommu=off"
check_fails foreign-owner-no-device test -e /dev/uxen
uxtest mmio write32 $((unit + 0x18)) 0 >/dev/null
gsts=$(uxtest mmio read32 $((unit + 0x1c)))
expect_eq foreign-owner-gone "$(( gsts & GSTS_TES ))" 0

# --- Load: DMA protection without VMX.
dmesg -c >/dev/null
check insmod insmod $MOD iommu_only=1 debug=1 require_iommu=1
d=$(dmesg)
expect_match dmar-parsed "$d" "uxen: hv: VT-d: DMAR: 1 remapping unit\(s\)"
# A BIOS machine too: the table comes from the kernel's ACPI.
expect_match dmar-from-kernel "$d" "uxen: hv: VT-d: DMAR: .*; the host kernel's ACPI table \([1-9][0-9]* bytes\)"
expect_match unit-described "$d" "uxen: hv: VT-d: unit 0 at $unit, segment 0: version 1\.0"
expect_match remapping-on "$d" "uxen: hv: VT-d: DMA remapping on in 1 unit\(s\) \(1 with queued invalidation\)"
expect_match large-pages "$d" "mapped 1:1 for devices in [1-9][0-9]* 1G \+ [1-9][0-9]* 2M \+ [0-9]+ 4K pages"
expect_match driver-says-on "$d" "uxen: DMA protection on without VMX on 2 CPUs"
gsts=$(uxtest mmio read32 $((unit + 0x1c)))
expect_eq gsts-translating "$(( gsts & (GSTS_TES | GSTS_QIES) ))" $((GSTS_TES | GSTS_QIES))
j=$(stats_json)
info "$j"
expect_match stats-iommu-on "$j" '"iommu":\{"enabled":true,"units":1,"faults":0,"last_fault_source":0,"last_fault_addr":0\}'
expect_match stats-host-not-demoted "$j" '"virtualized":false'
expect_match version-iommu-only "$(uxenctl version --json)" '"hv_active":true,"num_cpus":2,"hv_features":8\}'
base=$(printf '%s' "$j" | sed -n 's/.*"hv_region":{"base":\([0-9]*\),"size":\([0-9]*\)}.*/\1/p')
size=$(printf '%s' "$j" | sed -n 's/.*"hv_region":{"base":\([0-9]*\),"size":\([0-9]*\)}.*/\2/p')
info "hypervisor region $(printf '%#x' "$base") + $size"
if [ $((base + size)) -le $((1 << 28)) ]; then pass region-in-edu-reach; else fail region-in-edu-reach "$base + $size"; fi

# --- 1. DMA to and from ordinary host pages works, the data intact.
for i in 1 2 3; do
    expect_eq "dma-allowed-$i" "$(uxtest edu roundtrip)" ok
done
expect_eq no-fault-for-allowed-dma "$(faults)" 0

# --- 2. DMA into the hypervisor region is blocked: the image's code and
# read-only data (which nothing else writes, so it must read the same
# after), its heap (the DMA tables) and a CPU's stack at the region's end.
for off in 0 4096 65536 $((size / 2)) $((size - 4096)); do
    keep=""
    [ "$off" -le 65536 ] && keep=keep
    dma_blocked "region-$off" $((base + off)) "$sid" $keep
done
info "$(dmesg | grep -m1 'blocked DMA')"
expect_match region-fault-logged "$(dmesg)" "uxen: hv: warning: VT-d: blocked DMA Write by $EDU_BDF at $(printf '%#x' "$base")"
# Reads see nothing of it: the image header is not zero, what arrives is.
expect_match region-header-not-zero "$(uxtest devmem read $base 4096)" "nonzero=[1-9]"
f0=$(faults)
expect_match dma-from-region-reads-nothing "$(uxtest edu dma-from $base 4095)" "bytes=4095 nonzero=0 "
j=$(stats_json)
if [ "$(jnum "$j" faults)" -gt "$f0" ]; then pass read-fault-counted; else fail read-fault-counted "$f0"; fi
expect_match fault-read-logged "$(dmesg)" "VT-d: blocked DMA Read by .* at $(printf '%#x' "$base")"
expect_match image-intact "$j" '"image_intact":true'

# --- 2b. Donated pages are blocked too, and reachable again once returned.
out=$(uxenctl pool donate)
info "donated: $out"
dbase=$(printf '%s' "$out" | sed -n 's/^base=\(0x[0-9a-f]*\) pages=.*/\1/p')
dpages=$(printf '%s' "$out" | sed -n 's/.* pages=\([0-9]*\)$/\1/p')
if [ -n "$dbase" ] && [ "$dpages" -ge 512 ]; then pass donated; else fail donated "$out"; fi
expect_match pool-has-pages "$(stats_json)" "\"pool\":\{\"frames_total\":$dpages,"
for k in 0 5 511; do
    p=$((dbase + k * 4096))
    f0=$(faults)
    check "dma-to-donated-$k-runs" uxtest edu dma-to $p 4095 0x5a
    # Scrubbed when donated; the write did not land.
    expect_match "donated-$k-still-zero" "$(uxtest devmem read $p 4096)" "bytes=4096 nonzero=0 "
    j=$(stats_json)
    if [ "$(jnum "$j" faults)" -gt "$f0" ]; then pass "donated-$k-fault-counted"; else fail "donated-$k-fault-counted" "$f0"; fi
    expect_eq "donated-$k-fault-addr" "$(jnum "$j" last_fault_addr)" "$p"
    expect_eq "donated-$k-fault-source" "$(jnum "$j" last_fault_source)" "$sid"
done
expect_eq dma-allowed-beside-donations "$(uxtest edu roundtrip)" ok
out=$(uxenctl pool reclaim)
expect_eq reclaimed "$out" "pages=$dpages"
expect_match pool-empty "$(stats_json)" '"pool":\{"frames_total":0,'
# The returned pages are the host's again: a device may read them (they
# may be in use by now, so only read), and no fault is recorded.
f0=$(faults)
for k in 0 5 511; do
    check "dma-from-returned-$k" uxtest edu dma-from $((dbase + k * 4096)) 4095
done
expect_eq returned-pages-no-fault "$(faults)" "$f0"

# --- The host keeps working, and the control path refuses what needs VMX.
check uxenctl-list uxenctl list
out=$(uxenctl run /guests/hello 2>&1)
expect_eq no-vms-without-vmx-exit "$?" 1
expect_match no-vms-without-vmx "$out" "No such device"

# --- 3. Teardown: translation off, DMA everywhere again.
total=$(faults)
info "$total faults recorded"
dmesg -c >/dev/null
check rmmod rmmod uxen
d=$(dmesg)
expect_match teardown-logged "$d" "uxen: hv: VT-d: DMA remapping off in 1 unit\(s\) \([0-9]+ faults recorded\)"
expect_match teardown-driver "$d" "uxen: DMA protection is off; devices reach memory untranslated again"
gsts=$(uxtest mmio read32 $((unit + 0x1c)))
expect_eq gsts-off-after-rmmod "$(( gsts & (GSTS_TES | GSTS_QIES) ))" 0
for i in 1 2 3; do
    expect_eq "dma-after-rmmod-$i" "$(uxtest edu roundtrip)" ok
done
# What was the hypervisor region is plain memory now: a device reads what
# the CPU reads there (freed pages, unchanged between the two reads).
m=$(uxtest devmem read $((base + 4096)) 4095 | sed -n 's/.*hash=//p')
t=$(uxtest edu dma-from $((base + 4096)) 4095 | sed -n 's/.*hash=//p')
expect_eq dma-reads-former-region "$t" "$m"

# --- Load and unload again: the same unit, fresh tables.
cycles=0
for i in 1 2 3; do
    insmod $MOD iommu_only=1 && rmmod uxen && cycles=$((cycles + 1))
done
expect_eq load-unload-3-cycles "$cycles" 3
expect_eq dma-after-cycles "$(uxtest edu roundtrip)" ok
finish
