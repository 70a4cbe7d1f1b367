# The first end-to-end path: load, /dev/uxen, version ioctl, unload, and the
# refusal of a module whose embedded image header is corrupt.
. /tests/lib.sh

out=$(uxenctl version 2>&1)
rc=$?
expect_eq uxenctl-without-device-exits-1 "$rc" 1
expect_match uxenctl-without-device-message "$out" "/dev/uxen"

dmesg -c >/dev/null
out=$(uxtest modload /lib/modules/uxen-corrupt.ko 2>&1)
rc=$?
if [ $rc -ne 0 ]; then pass corrupt-image-refused; else fail corrupt-image-refused "insmod succeeded"; rmmod uxen; fi
expect_match corrupt-image-errno "$out" "errno=8 \(Exec format error"
expect_match corrupt-image-logged "$(dmesg)" "uxen: refusing the embedded hypervisor image: bad image signature"
check_fails corrupt-image-no-device test -e /dev/uxen

check insmod insmod /lib/modules/uxen.ko
check dev-uxen-exists test -c /dev/uxen
out=$(uxenctl version 2>&1)
info "$out"
json=$(uxenctl version --json 2>&1)
# The driver and the image report the ABI revision uxenctl was built with
# (all three take it from shared-abi).
abi=$(jnum "$json" uxenctl_abi)
expect_match version-abi-known "$abi" '^[1-9][0-9]*$'
expect_match version-driver "$out" "^driver +0\.1\.0 +\(ABI $abi\)"
expect_match version-image "$out" "^image +0\.1\.0 +\(ABI $abi\)"
expect_match version-json "$json" "\"driver_abi\":$abi,.*\"image_abi\":$abi,"
check rmmod rmmod uxen
check_fails dev-uxen-removed test -e /dev/uxen
check insmod-again insmod /lib/modules/uxen.ko
check rmmod-again rmmod uxen
finish
