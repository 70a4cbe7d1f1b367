# Late launch: the hypervisor takes every CPU, demotes Linux, protects
# itself, survives the host's work and CPU hotplug, and gives the machine
# back; a failure on one CPU rolls every CPU back.
. /tests/lib.sh

# --- The bare machine, for comparison: what each CPU answers at CPUID
# 0x40000000 before the hypervisor ever ran is what it must answer once
# the hypervisor is gone.
bare0=$(cpuid_line 0 0x40000000)
bare1=$(cpuid_line 1 0x40000000)
info "CPUID 0x40000000 on the bare machine: cpu0 '$bare0', cpu1 '$bare1'"
expect_native no-signature-before-cpu0 0 "$bare0"
expect_native no-signature-before-cpu1 1 "$bare1"
base_sum=$(uxtest checksum 4)
expect_match checksum-reference "$base_sum" '^[0-9a-f]{16}$'

# --- Rollback: one CPU fails its entry, every CPU rolls back.
out=$(uxtest modload /lib/modules/uxen.ko fail_cpu=1 2>&1)
expect_match rollback-insmod-fails "$out" "errno=5 "
expect_match rollback-logged "$(dmesg)" "uxen: hv: error: cpu1: entry failure injected"
expect_match rollback-all-cpus "$(dmesg)" "every CPU rolled back"
expect_native rollback-no-signature-cpu0 0 "$bare0"
expect_native rollback-no-signature-cpu1 1 "$bare1"
check_fails rollback-no-device test -e /dev/uxen

# --- Bochs has no VT-d: require_iommu=1 refuses to run without it. Nested
# QEMU/KVM has one (intel-iommu): VMX and DMA protection on together.
if [ -e /sys/firmware/acpi/tables/DMAR ]; then vtd=1; else vtd=0; fi
info "ACPI DMAR table: $vtd"
if [ $vtd = 0 ]; then
    out=$(uxtest modload /lib/modules/uxen.ko require_iommu=1 2>&1)
    expect_match require-iommu-refused "$out" "errno=95 "
    expect_match require-iommu-says-why "$(dmesg)" "uxen: hv: error: DMA protection is unavailable: no ACPI .*; refusing to start \(require_iommu=1\)"
    check_fails require-iommu-no-device test -e /dev/uxen
fi

# --- Load.
dmesg -c >/dev/null
if [ $vtd = 0 ]; then
    check insmod insmod /lib/modules/uxen.ko
else
    check insmod insmod /lib/modules/uxen.ko require_iommu=1
fi
d=$(dmesg)
expect_match demoted "$d" "the host now runs as a VM on 2 CPUs"
if [ $vtd = 0 ]; then
    expect_match dma-protection-unavailable "$d" "uxen: hv: warning: DMA protection is unavailable: no ACPI "
else
    expect_match dma-protection-on "$d" "uxen: hv: VT-d: DMA remapping on in [1-9]"
fi
for c in 0 1; do
    expect_eq "signature-cpu$c" "$(signature $c)" "$SIG"
    ecx=$(taskset -c $c uxtest cpuid 1 | awk '{print $3}')
    expect_eq "vmx-bit-hidden-cpu$c" "$(( 0x$ecx >> 5 & 1 ))" 0
done
j=$(stats_json)
info "$j"
expect_match stats-both-virtualized "$j" '"id":0,"apic_id":[0-9]+,"virtualized":true.*"id":1,"apic_id":[0-9]+,"virtualized":true'
expect_match stats-cpuid-exits "$j" '"CPUID":[1-9]'
expect_match stats-image-intact "$j" '"image_intact":true'
base=$(printf '%s' "$j" | sed -n 's/.*"hv_region":{"base":\([0-9]*\),"size":\([0-9]*\)}.*/\1/p')
size=$(printf '%s' "$j" | sed -n 's/.*"hv_region":{"base":\([0-9]*\),"size":\([0-9]*\)}.*/\2/p')
info "hypervisor region $base + $size"
if [ $vtd = 0 ]; then
    expect_match stats-no-iommu "$j" '"iommu":\{"enabled":false,"units":0,"faults":0,'
else
    # With the host demoted, a device's DMA into the region is blocked too
    # (edu reaches 256 MiB; the suite's machine has no more).
    expect_match stats-iommu-on "$j" '"iommu":\{"enabled":true,"units":[1-9][0-9]*,"faults":0,'
    check dma-to-region-runs uxtest edu dma-to "$base" 4095 0xcc
    j=$(stats_json)
    f=$(jnum "$j" faults)
    if [ "${f:-0}" -ge 1 ]; then pass dma-to-region-fault-counted; else fail dma-to-region-fault-counted "faults '$f'"; fi
    expect_eq dma-to-region-fault-addr "$(jnum "$j" last_fault_addr)" "$base"
    expect_eq dma-elsewhere-works "$(uxtest edu roundtrip)" ok
fi

# --- The host keeps working on both CPUs.
taskset -c 0 uxtest checksum 4 >/tmp/sum0 &
p0=$!
taskset -c 1 uxtest checksum 4 >/tmp/sum1
wait $p0
expect_same checksum-cpu0 "$(cat /tmp/sum0)" "$base_sum"
expect_same checksum-cpu1 "$(cat /tmp/sum1)" "$base_sum"
taskset -c 0 uxtest forkstorm 100 >/tmp/fork0 &
p0=$!
taskset -c 1 uxtest forkstorm 100 >/tmp/fork1
wait $p0
expect_eq forkstorm-cpu0 "$(cat /tmp/fork0)" "100/100"
expect_eq forkstorm-cpu1 "$(cat /tmp/fork1)" "100/100"

# --- CPU hotplug under the hypervisor.
check cpu1-offline sh -c 'echo 0 > /sys/devices/system/cpu/cpu1/online'
expect_eq cpu1-is-offline "$(cat /sys/devices/system/cpu/online)" "0"
check cpu1-online sh -c 'echo 1 > /sys/devices/system/cpu/cpu1/online'
expect_eq cpu1-is-online "$(cat /sys/devices/system/cpu/online)" "0-1"
expect_eq signature-cpu1-after-hotplug "$(signature 1)" "$SIG"
# Any hypercall forwards the hypervisor's log.
uxenctl stats >/dev/null
expect_match hotplug-init-emulated "$(dmesg)" "uxen: hv: cpu1: INIT: parked until SIPI"
expect_match hotplug-sipi-emulated "$(dmesg)" "uxen: hv: cpu1: SIPI: starting at 0x"
expect_match hotplug-cpu1-virtualized "$(stats_json)" '"id":1,"apic_id":[0-9]+,"virtualized":true'
taskset -c 1 uxtest checksum 4 >/tmp/sum1
expect_same checksum-cpu1-after-hotplug "$(cat /tmp/sum1)" "$base_sum"

# --- The host tries to read and write the hypervisor's memory.
b0=$(jnum "$(stats_json)" blocked_host_accesses)
for off in 0 4096 65536 $((size / 2)) $((size - 65536)) $((size - 4096)); do
    a=$((base + off))
    out=$(uxtest devmem read $a 4096)
    expect_match "devmem-read-zeros-$off" "$out" "bytes=4096 nonzero=0 "
done
out=$(uxtest devmem mmap $((base + 4096)) 4096)
expect_match devmem-mmap-zeros "$out" "bytes=4096 nonzero=0 "
b1=$(jnum "$(stats_json)" blocked_host_accesses)
if [ "$b1" -gt "$b0" ]; then pass blocked-reads-counted; else fail blocked-reads-counted "$b0 -> $b1"; fi
for off in 0 8192 $((size / 2)) $((size - 65536)) $((size - 4096)); do
    check "devmem-write-$off" uxtest devmem write $((base + off)) 4096 0xcc
done
j=$(stats_json)
b2=$(jnum "$j" blocked_host_writes)
if [ "$b2" -gt 0 ]; then pass blocked-writes-counted; else fail blocked-writes-counted "$b2"; fi
expect_match image-intact-after-writes "$j" '"image_intact":true'
expect_match still-virtualized-after-writes "$j" '"id":1,"apic_id":[0-9]+,"virtualized":true'
expect_match blocked-logged "$(dmesg)" "uxen: hv: cpu[01]: blocked host (read|write) of protected"

# --- VMX from the host: ring 3 and ring 0, and the VMX MSRs.
for insn in vmxon vmcall invept vmread vmxoff; do
    expect_eq "ring3-$insn-sigill" "$(uxtest ring3 $insn)" SIGILL
done
check probe-load insmod /lib/modules/uxen_probe.ko
p=$(dmesg | grep 'uxen_probe:')
info "$p"
expect_match probe-vmx-insns-fault "$p" "vmxon=fault vmxoff=fault vmclear=fault vmptrld=fault vmread=fault vmwrite=fault vmlaunch=fault invept=fault invvpid=fault"
expect_match probe-cr4-vmxe-refused "$p" "cr4.vmxe=fault"
expect_match probe-feature-control "$p" "feature_control=0x1 read=ok write=fault vmx_basic_read=fault"
expect_match probe-vmcall-enosys "$p" "vmcall_unknown=-38"
check probe-unload rmmod uxen_probe
out=$(uxtest msr write 0 0x3a 0x5)
expect_eq msr-feature-control-write-refused "$out" "errno=5"
out=$(uxtest msr write 1 0x3a 0x0)
expect_eq msr-feature-control-write-refused-cpu1 "$out" "errno=5"
expect_eq msr-feature-control-reads-locked "$(uxtest msr read 0 0x3a)" "0x1"
expect_eq msr-vmx-basic-faults "$(uxtest msr read 0 0x480)" "errno=5"
j=$(stats_json)
expect_match host-alive-after-attacks "$j" '"id":0,"apic_id":[0-9]+,"virtualized":true'

# --- Unload, and load/unload again.
check rmmod rmmod uxen
expect_native no-signature-after-cpu0 0 "$bare0"
expect_native no-signature-after-cpu1 1 "$bare1"
check_fails no-device-after-rmmod test -e /dev/uxen
cycles=0
for i in 1 2 3 4 5; do
    insmod /lib/modules/uxen.ko && rmmod uxen && cycles=$((cycles + 1))
done
expect_eq load-unload-5-cycles "$cycles" 5
check insmod-after-cycles insmod /lib/modules/uxen.ko
for c in 0 1; do
    expect_eq "signature-after-cycles-cpu$c" "$(signature $c)" "$SIG"
done
j=$(stats_json)
base=$(printf '%s' "$j" | sed -n 's/.*"hv_region":{"base":\([0-9]*\),.*/\1/p')
expect_match devmem-zeros-after-cycles "$(uxtest devmem read $((base + 4096)) 4096)" "nonzero=0 "
taskset -c 1 uxtest checksum 4 >/tmp/sum1
expect_same checksum-after-cycles "$(cat /tmp/sum1)" "$base_sum"
check cpu1-offline-after-cycles sh -c 'echo 0 > /sys/devices/system/cpu/cpu1/online'
check cpu1-online-after-cycles sh -c 'echo 1 > /sys/devices/system/cpu/cpu1/online'
expect_eq signature-cpu1-after-cycles "$(signature 1)" "$SIG"
check rmmod-final rmmod uxen
finish
