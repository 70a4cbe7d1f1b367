# A host with 5-level paging. QEMU TCG's `-cpu max` has LA57, and this
# suite boots without no5lvl, so Linux runs with 5-level paging. The
# hypervisor's page tables and the host page-table walker are 4-level, so
# the load is refused, cleanly and saying why (docs/real-machines.md,
# section 2, says what supporting it would take).
. /tests/lib.sh
MOD=/lib/modules/uxen.ko

expect_match cpu-has-la57 "$(grep -m1 '^flags' /proc/cpuinfo)" ' la57( |$)'
expect_match cmdline-without-no5lvl "$(cat /proc/cmdline)" 'uxen.suite=la57'
check_fails no5lvl-not-given grep -qw no5lvl /proc/cmdline
j=$(uxenctl check --json)
info "check: $j"
expect_eq check-la57-blocker "$(verdict "$j" la57)" blocker
out=$(uxtest modload $MOD iommu_only=1 2>&1)
expect_match insmod-refused "$out" "errno=95 "
expect_match driver-says-why "$(dmesg)" "uxen: Linux runs with 5-level paging, which the hypervisor does not support; boot with no5lvl"
check_fails no-device test -e /dev/uxen
check_fails not-loaded grep -q '^uxen ' /proc/modules
finish
