# Linux booted with intel_iommu=on drives the IOMMU itself: the module must
# refuse to load, with or without VMX, and say how to boot instead.
. /tests/lib.sh
MOD=/lib/modules/uxen.ko
expect_match linux-drives-the-iommu "$(cat /tmp/boot.dmesg)" "DMAR: .*[Ee]nabl"
# The pre-flight sees it in /sys/class/iommu and gives the same advice.
j=$(uxenctl check --json)
info "check: $j"
expect_eq check-intremap-blocker "$(verdict "$j" intremap)" blocker
expect_match check-intremap-says "$j" '"name":"intremap","verdict":"blocker","detail":"Linux drives the IOMMU itself \(/sys/class/iommu: dmar0\); the driver refuses to load","fix":"boot with intel_iommu=off intremap=off"'
for params in "iommu_only=1" ""; do
    name=${params:-vmx}
    dmesg -c >/dev/null
    out=$(uxtest modload $MOD $params 2>&1)
    expect_match "refused-$name" "$out" "errno=16 "
    expect_match "says-intel-iommu-off-$name" "$(dmesg)" "uxen: Linux itself drives the Intel IOMMU \(booted with intel_iommu=on\); boot with intel_iommu=off"
    check_fails "no-device-$name" test -e /dev/uxen
    check_fails "not-loaded-$name" grep -q '^uxen ' /proc/modules
done
# Linux's IOMMU is really on: edu has no driver, so no DMA mapping, and
# its DMA to arbitrary pages is blocked.
expect_match linux-iommu-blocks-unmapped-dma "$(uxtest edu roundtrip)" "^mismatch "
finish
