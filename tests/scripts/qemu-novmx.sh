# QEMU TCG has no VMX: loading must fail cleanly, saying why.
. /tests/lib.sh
# The pre-flight says so first, and exits 1.
j=$(uxenctl check --json)
rc=$?
info "check: $j"
expect_eq check-exits-1 "$rc" 1
expect_eq check-vmx-blocker "$(verdict "$j" vmx)" blocker
expect_eq check-not-loaded "$(verdict "$j" loaded)" ""
expect_eq check-la57-ok-with-no5lvl "$(verdict "$j" la57)" ok
# Booted without intremap=off, Linux turned interrupt remapping on in
# QEMU's IOMMU; and TCG's CPU is a guest's that offers no VT-x.
expect_eq check-intremap-blocker "$(verdict "$j" intremap)" blocker
expect_match check-intremap-says "$j" '"detail":"interrupt remapping is on'
expect_eq check-dmar-ok "$(verdict "$j" dmar)" ok
expect_eq check-nested-blocker "$(verdict "$j" nested)" blocker
expect_match check-nested-says "$j" '"detail":"Linux is a guest of QEMU TCG, which offers no nested VT-x"'
expect_match check-counts "$j" '"blockers":3,"warnings":0}$'
out=$(uxenctl check)
expect_eq check-text-exits-1 "$?" 1
expect_match check-text-vmx "$out" '^blocker +vmx '
expect_match check-text-summary "$out" '^[1-9][0-9]* blockers?, [0-9]+ warnings?: fix the blockers before loading uxen.ko$'
out=$(uxtest modload /lib/modules/uxen.ko 2>&1)
expect_match insmod-fails-enodev "$out" "errno=19 "
d=$(dmesg)
expect_match says-vtx-unavailable "$d" "uxen: hv: error: VT-x is unavailable"
expect_match driver-explains "$d" "cannot start the hypervisor: VT-x is unavailable"
check_fails no-device test -e /dev/uxen
out=$(uxenctl version 2>&1)
expect_eq uxenctl-exits-1 "$?" 1
check_fails not-loaded grep -q '^uxen ' /proc/modules
finish
