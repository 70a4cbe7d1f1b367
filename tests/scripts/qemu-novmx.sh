# QEMU TCG has no VMX: loading must fail cleanly, saying why.
. /tests/lib.sh
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
