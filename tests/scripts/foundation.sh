# The first end-to-end path: load, /dev/uxen, version ioctl, unload, and the
# refusal of a module whose embedded image header is corrupt.
. /tests/lib.sh

# --- The pre-flight, before anything is loaded: Bochs has VT-x, enabled,
# and no DMAR table; the module in /lib/modules is built for this kernel.
j=$(uxenctl check --json)
rc=$?
info "check: $j"
expect_eq check-exits-0 "$rc" 0
expect_eq check-vmx-ok "$(verdict "$j" vmx)" ok
expect_match check-vmx-enabled "$j" '"name":"vmx","verdict":"ok","detail":"VT-x in CPUID and enabled \(IA32_FEATURE_CONTROL 0x[0-9a-f]*\)"'
expect_eq check-kvm-ok "$(verdict "$j" kvm)" ok
expect_eq check-no-dmar-warning "$(verdict "$j" dmar)" warning
expect_eq check-intremap-ok "$(verdict "$j" intremap)" ok
expect_eq check-la57-ok "$(verdict "$j" la57)" ok
expect_eq check-lockdown-ok "$(verdict "$j" lockdown)" ok
expect_eq check-vermagic-ok "$(verdict "$j" vermagic)" ok
expect_match check-vermagic-module "$j" "\"detail\":\"/lib/modules/uxen.ko is built for the running kernel, $(uname -r)\""
expect_eq check-bare-metal "$(verdict "$j" nested)" ok
expect_eq check-not-loaded "$(verdict "$j" loaded)" ""
expect_match check-counts "$j" '"blockers":0,"warnings":1}$'
out=$(uxenctl check)
expect_match check-text-summary "$out" '^0 blockers, 1 warning: uxen.ko can be loaded$'
expect_match check-text-dmar "$out" '^warning +dmar +no ACPI DMAR table'
expect_eq check-module-missing "$(verdict "$(uxenctl check --json --module /no/uxen.ko)" vermagic)" warning

# With kvm_intel loaded: the test kernel has no KVM, so a copy of /proc
# (UXEN_CHECK_ROOT) lists it beside the real modules.
fake=/tmp/check-kvm
mkdir -p $fake/proc/sys/kernel
for f in cmdline cpuinfo interrupts modules sys/kernel/osrelease; do cat /proc/$f >$fake/proc/$f; done
printf 'kvm_intel 413696 0 - Live 0x0000000000000000\nkvm 1396736 1 kvm_intel, Live 0x0000000000000000\n' >>$fake/proc/modules
ln -s /sys $fake/sys
j=$(UXEN_CHECK_ROOT=$fake uxenctl check --json)
rc=$?
info "check with kvm_intel: $j"
expect_eq check-kvm-exits-1 "$rc" 1
expect_eq check-kvm-blocker "$(verdict "$j" kvm)" blocker
expect_match check-kvm-fix "$j" '"name":"kvm","verdict":"blocker","detail":"[^"]*","fix":"rmmod kvm_intel kvm"'
expect_match check-kvm-only-blocker "$j" '"blockers":1,"warnings":1}$'

# A locked-down kernel that has a DMAR table and runs another release than
# the module's: a made-up /sys, and /proc with another osrelease.
fake=/tmp/check-lockdown
mkdir -p $fake/proc/sys/kernel $fake/sys/kernel/security $fake/sys/firmware/acpi/tables
for f in cmdline cpuinfo interrupts modules; do cat /proc/$f >$fake/proc/$f; done
echo 9.9.9-other >$fake/proc/sys/kernel/osrelease
echo 'none [integrity] confidentiality' >$fake/sys/kernel/security/lockdown
: >$fake/sys/firmware/acpi/tables/DMAR
j=$(UXEN_CHECK_ROOT=$fake uxenctl check --json)
rc=$?
info "check locked down: $j"
expect_eq check-lockdown-exits-1 "$rc" 1
expect_eq check-lockdown-blocker "$(verdict "$j" lockdown)" blocker
expect_eq check-dmar-ok "$(verdict "$j" dmar)" ok
expect_eq check-vermagic-blocker "$(verdict "$j" vermagic)" blocker
expect_match check-vermagic-says "$j" "built for Linux $(uname -r), but the running kernel is 9\.9\.9-other"
expect_match check-lockdown-counts "$j" '"blockers":2,"warnings":0}$'

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

dmesg -c >/dev/null
check insmod insmod /lib/modules/uxen.ko
check dev-uxen-exists test -c /dev/uxen
# What a load says, as README.md quotes it.
d=$(dmesg)
printf '%s\n' "$d" | grep 'uxen' | while read -r l; do info "dmesg: $l"; done
expect_match load-logged-image "$d" "uxen: hypervisor image 0\.1\.0 \(ABI [0-9]+\), [0-9]+ bytes, driver ABI [0-9]+"
expect_match load-logged-demoted "$d" "uxen: the host now runs as a VM on 2 CPUs"
expect_match load-logged-ready "$d" "uxen: /dev/uxen ready"
# Under the hypervisor VMX is hidden and IA32_FEATURE_CONTROL reads locked
# without it: check tells that uxen-rs runs rather than blaming the CPU.
j=$(uxenctl check --json)
rc=$?
info "check, loaded: $j"
expect_eq check-loaded-exits-0 "$rc" 0
expect_eq check-loaded "$(verdict "$j" loaded)" ok
expect_match check-loaded-says "$j" '"detail":"uxen-rs is already running'
expect_eq check-loaded-vmx-ok "$(verdict "$j" vmx)" ok
expect_eq check-loaded-nested-ok "$(verdict "$j" nested)" ok
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
info "$(uxenctl stats)"
dmesg -c >/dev/null
check rmmod rmmod uxen
d=$(dmesg)
printf '%s\n' "$d" | grep 'uxen' | while read -r l; do info "dmesg: $l"; done
expect_match unload-logged "$d" "uxen: the hypervisor has left every CPU"
expect_match unload-unloaded "$d" "uxen: unloaded"
check_fails dev-uxen-removed test -e /dev/uxen
check insmod-again insmod /lib/modules/uxen.ko
check rmmod-again rmmod uxen
finish
