# VT-d under UEFI firmware. OVMF boots the kernel through its EFI stub and
# hands Linux the ACPI RSDP in the EFI configuration table; the BIOS areas,
# where the hypervisor's own search looks, hold none. The driver gives the
# hypervisor the DMAR table that Linux found, so the IOMMU is taken over
# with no rsdp=; rsdp= still overrides. QEMU TCG has no VMX: iommu_only=1,
# as in the vtd suite (docs/vtd.md, section 7).
. /tests/lib.sh
MOD=/lib/modules/uxen.ko

# --- The machine booted through UEFI, and no RSDP lies in the BIOS areas.
check booted-uefi test -d /sys/firmware/efi
acpi20=$(sed -n 's/^ACPI20=//p' /sys/firmware/efi/systab)
info "EFI system table: ACPI20=$acpi20"
expect_match efi-gives-the-rsdp "$acpi20" '^0x[0-9a-f]+$'
check dmar-in-linux test -e /sys/firmware/acpi/tables/DMAR
# The BIOS read-only memory area, 0xe0000-0xfffff, where an RSDP would be.
dd if=/dev/mem of=/tmp/biosarea bs=4096 skip=$((0xe0000 / 4096)) count=32 2>/dev/null
expect_eq bios-area-read "$(wc -c </tmp/biosarea | tr -d ' ')" 131072
expect_eq no-rsdp-in-bios-area "$(grep -c 'RSD PTR ' /tmp/biosarea)" 0

# --- The pre-flight: the DMAR is there, and on UEFI needs no rsdp=.
j=$(uxenctl check --json)
info "check: $j"
expect_eq check-dmar-ok "$(verdict "$j" dmar)" ok
expect_match check-dmar-says-uefi "$j" '"name":"dmar","verdict":"ok","detail":"[^"]*UEFI: the driver takes the table from the kernel, no rsdp= needed'

# --- edu is there and its DMA works.
edu_check
sid=$EDU_SID

# --- Load with no rsdp=: the DMAR comes from the kernel's ACPI.
dmesg -c >/dev/null
check insmod insmod $MOD iommu_only=1 debug=1 require_iommu=1
d=$(dmesg)
info "$(printf '%s' "$d" | grep "DMAR")"
expect_match driver-hands-kernel-dmar "$d" "uxen: the kernel's ACPI DMAR table \([1-9][0-9]* bytes\) goes to the hypervisor at 0x[0-9a-f]+"
expect_match hv-dmar-from-kernel "$d" "uxen: hv: VT-d: DMAR: 1 remapping unit\(s\), [0-9]+ reserved region\(s\) \(RMRR\), host address width [0-9]+; the host kernel's ACPI table \([1-9][0-9]* bytes\)"
expect_match remapping-on "$d" "uxen: hv: VT-d: DMA remapping on in 1 unit\(s\)"
expect_match driver-says-on "$d" "uxen: DMA protection on without VMX on 2 CPUs"
j=$(stats_json)
info "$j"
expect_match stats-iommu-on "$j" '"iommu":\{"enabled":true,"units":1,"faults":0,'
base=$(printf '%s' "$j" | sed -n 's/.*"hv_region":{"base":\([0-9]*\),"size":\([0-9]*\)}.*/\1/p')
size=$(printf '%s' "$j" | sed -n 's/.*"hv_region":{"base":\([0-9]*\),"size":\([0-9]*\)}.*/\2/p')
info "hypervisor region $(printf '%#x' "$base") + $size"
if [ $((base + size)) -le $((1 << 28)) ]; then pass region-in-edu-reach; else fail region-in-edu-reach "$base + $size"; fi

# --- DMA to ordinary pages works; into the hypervisor region it is blocked,
# the fault recorded with edu's source id and the address. The image's
# first pages (code, read-only data) must read the same after; the last
# page is a CPU's stack, which changes on its own.
expect_eq dma-allowed "$(uxtest edu roundtrip)" ok
expect_eq no-fault-for-allowed-dma "$(faults)" 0
for off in 0 4096 $((size - 4096)); do
    keep=""
    [ "$off" -le 4096 ] && keep=keep
    dma_blocked "region-$off" $((base + off)) "$sid" $keep
done
expect_match region-fault-logged "$(dmesg)" "uxen: hv: warning: VT-d: blocked DMA Write by $EDU_BDF at $(printf '%#x' "$base")"
expect_match region-header-not-zero "$(uxtest devmem read $base 4096)" "nonzero=[1-9]"
expect_match dma-from-region-reads-nothing "$(uxtest edu dma-from $base 4095)" "bytes=4095 nonzero=0 "
expect_match image-intact "$(stats_json)" '"image_intact":true'

# --- Donated pages are blocked too.
out=$(uxenctl pool donate)
info "donated: $out"
dbase=$(printf '%s' "$out" | sed -n 's/^base=\(0x[0-9a-f]*\) pages=.*/\1/p')
if [ -n "$dbase" ]; then pass donated; else fail donated "$out"; fi
f0=$(faults)
check dma-to-donated-runs uxtest edu dma-to $((dbase)) 4095 0x5a
expect_match donated-still-zero "$(uxtest devmem read $((dbase)) 4096)" "bytes=4096 nonzero=0 "
j=$(stats_json)
if [ "$(jnum "$j" faults)" -gt "${f0:-0}" ]; then pass donated-fault-counted; else fail donated-fault-counted "$f0"; fi
expect_eq donated-fault-addr "$(jnum "$j" last_fault_addr)" "$((dbase))"
expect_match reclaimed "$(uxenctl pool reclaim)" "^pages=[1-9][0-9]*$"

# --- Unload: translation off, DMA everywhere again.
dmesg -c >/dev/null
check rmmod rmmod uxen
expect_match teardown-logged "$(dmesg)" "uxen: hv: VT-d: DMA remapping off in 1 unit\(s\) \([1-9][0-9]* faults recorded\)"
expect_eq dma-after-rmmod "$(uxtest edu roundtrip)" ok

# --- rsdp= overrides: the hypervisor walks the tables from the RSDP that
# EFI gave, and protects the same.
dmesg -c >/dev/null
check insmod-rsdp insmod $MOD iommu_only=1 require_iommu=1 rsdp=$acpi20
d=$(dmesg)
expect_match rsdp-driver-says "$d" "uxen: rsdp=$acpi20: the hypervisor finds the ACPI DMAR table through it"
if printf '%s' "$d" | grep -q "the kernel's ACPI DMAR table"; then fail rsdp-kernel-table-not-used "$d"; else pass rsdp-kernel-table-not-used; fi
expect_match rsdp-hv-dmar "$d" "uxen: hv: VT-d: DMAR: 1 remapping unit\(s\), .*; found through the RSDP at $acpi20 \(rsdp=\)"
expect_match rsdp-remapping-on "$d" "uxen: hv: VT-d: DMA remapping on in 1 unit\(s\)"
base=$(printf '%s' "$(stats_json)" | sed -n 's/.*"hv_region":{"base":\([0-9]*\),.*/\1/p')
f0=$(faults)
check rsdp-dma-to-region-runs uxtest edu dma-to $base 4095 0xcc
j=$(stats_json)
if [ "$(jnum "$j" faults)" -gt "${f0:-0}" ]; then pass rsdp-region-fault-counted; else fail rsdp-region-fault-counted "$f0"; fi
expect_eq rsdp-region-fault-addr "$(jnum "$j" last_fault_addr)" "$base"
check rmmod-rsdp rmmod uxen
expect_eq dma-at-the-end "$(uxtest edu roundtrip)" ok
finish
