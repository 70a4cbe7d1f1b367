# No remapping hardware (no ACPI DMAR table, as on Bochs): the hypervisor
# logs that DMA protection is unavailable and stats say so, unless
# require_iommu=1 makes the load fail. Run without VMX (iommu_only=1), the
# only way QEMU TCG loads the image; the DMAR handling is the same.
. /tests/lib.sh
MOD=/lib/modules/uxen.ko

j=$(uxenctl check --json)
info "check: $j"
expect_eq check-no-dmar-warning "$(verdict "$j" dmar)" warning
expect_eq check-no-hardware "$(verdict "$j" intremap)" ok

out=$(uxtest modload $MOD iommu_only=1 require_iommu=1 2>&1)
expect_match required-refused "$out" "errno=95 "
d=$(dmesg)
expect_match required-says-why "$d" "uxen: hv: error: DMA protection is unavailable: no ACPI DMAR table \(no VT-d remapping hardware\); refusing to start \(require_iommu=1\)"
expect_match required-driver-says "$d" "cannot start the hypervisor: DMA protection \(VT-d\) is unavailable and require_iommu=1 asks for it \(errno 95\)"
check_fails required-no-device test -e /dev/uxen

dmesg -c >/dev/null
check insmod insmod $MOD iommu_only=1 debug=1
d=$(dmesg)
expect_match driver-no-kernel-dmar "$d" "uxen: the kernel's ACPI has no DMAR table; the hypervisor searches the BIOS areas"
expect_match unavailable-logged "$d" "uxen: hv: warning: DMA protection is unavailable: no ACPI DMAR table \(no VT-d remapping hardware\); devices can reach all memory"
expect_match driver-says-unavailable "$d" "uxen: DMA protection unavailable without VMX on 2 CPUs"
j=$(stats_json)
info "$j"
expect_match stats-iommu-off "$j" '"iommu":\{"enabled":false,"units":0,"faults":0,'
expect_match stats-text "$(uxenctl stats)" "DMA protection +unavailable"
expect_match version-no-features "$(uxenctl version --json)" '"hv_features":0\}'
# Donations work without an IOMMU too (the pages just leave the host).
out=$(uxenctl pool donate)
expect_match donate "$out" "^base=0x[0-9a-f]+ pages=[0-9]+$"
expect_match reclaim "$(uxenctl pool reclaim)" "^pages=[1-9][0-9]*$"
expect_eq dma-unprotected "$(uxtest edu roundtrip)" ok
check rmmod rmmod uxen
finish
