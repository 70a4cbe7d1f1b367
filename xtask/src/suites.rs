//! The system test suites: which in-guest script runs on which machine.

use crate::runner::{Backend, KVM_DEVICES, QEMU_DEVICES};

/// What a suite must end with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Pass,
    /// Harness self-tests: the run must be judged failed.
    Fail,
}

#[derive(Clone, Debug)]
pub struct Suite {
    /// `tests/scripts/<name>.sh`.
    pub name: &'static str,
    pub backend: Backend,
    pub timeout_s: u64,
    pub cmdline: &'static str,
    pub cpus: u32,
    pub mem_mib: u32,
    /// QEMU's `-device`s.
    pub qemu_devices: &'static [&'static str],
    /// QEMU boots UEFI firmware (OVMF) instead of SeaBIOS.
    pub uefi: bool,
    pub expect: Expect,
    /// What it shows, for the report.
    pub about: &'static str,
}

const fn suite(name: &'static str, backend: Backend, timeout_s: u64, about: &'static str) -> Suite {
    let qemu_devices = if matches!(backend, Backend::QemuKvm) { KVM_DEVICES } else { QEMU_DEVICES };
    Suite { name, backend, timeout_s, cmdline: "", cpus: 2, mem_mib: 512, qemu_devices, uefi: false, expect: Expect::Pass, about }
}

/// Every suite `xtask test` runs, in order.
pub fn all() -> Vec<Suite> {
    vec![
        Suite { expect: Expect::Fail, ..suite("selftest-fail", Backend::QemuTcg, 120, "harness: a FAIL marker fails the run") },
        Suite { expect: Expect::Fail, ..suite("selftest-hang", Backend::QemuTcg, 25, "harness: a hung guest times out and fails") },
        suite("foundation", Backend::Bochs, 600, "module load, /dev/uxen, version ioctl, refusal of a corrupt image"),
        suite("latelaunch", Backend::Bochs, 1200, "late launch, protection, hotplug, VMX from the host, reloads, roll-back"),
        suite("guests", Backend::Bochs, 1800, "guest VMs: run, exit codes, isolation from the host, faulty guests, no leaks"),
        suite("linux", Backend::Bochs, 2400, "Linux guests: boot to a shell, console in and out, poweroff/reboot/panic, SMP, bad input, no leaks"),
        suite("linux-fork", Backend::Bochs, 2400, "clones of a booted Linux guest: 8 forks with unique UUIDs, a 2-vCPU fork, uxen-fork inside, shared memory, no leaks"),
        suite("fork", Backend::Bochs, 1800, "vmfork: guest and outside forks, exact memory, accounting, destroy orders"),
        suite("merge", Backend::Bochs, 1500, "re-merging as a service: knobs, one pass over eight guests, background merging, a writer racing merges, aborts on unacknowledged shootdowns"),
        suite("mergefork", Backend::Bochs, 1200, "merge, then forks of merged VMs, 12 rounds: memory intact, nothing leaked, a steady heap"),
        hostile(),
        // QEMU's `-cpu max` has 5-level paging, which the hypervisor's page
        // tables do not follow: the QEMU suites boot with no5lvl.
        Suite { cmdline: "no5lvl", ..suite("qemu-novmx", Backend::QemuTcg, 300, "no VT-x: the load fails cleanly") },
        // edu masks DMA addresses to 28 bits: with 256 MiB every page,
        // the hypervisor region included, is within its reach.
        Suite {
            cmdline: "no5lvl intel_iommu=off intremap=off",
            mem_mib: 256,
            ..suite("vtd", Backend::QemuTcg, 600, "VT-d without VMX (iommu_only): device DMA kept out of the hypervisor and donated pages; teardown")
        },
        Suite {
            cmdline: "no5lvl intel_iommu=on",
            ..suite("vtd-busy", Backend::QemuTcg, 300, "VT-d: a host that drives the IOMMU itself is refused")
        },
        Suite {
            cmdline: "no5lvl",
            qemu_devices: &["edu"],
            ..suite("vtd-none", Backend::QemuTcg, 300, "no DMAR: DMA protection unavailable, or refused with require_iommu=1")
        },
        // Without no5lvl: Linux runs with 5-level paging, which the load
        // refuses (docs/real-machines.md).
        suite("la57", Backend::QemuTcg, 300, "a host with 5-level paging: the load is refused, saying why"),
        // UEFI firmware: the driver hands the hypervisor the DMAR that
        // Linux found through EFI, with no rsdp=.
        Suite {
            cmdline: "no5lvl intel_iommu=off intremap=off",
            mem_mib: 256,
            uefi: true,
            ..suite("vtd-uefi", Backend::QemuTcg, 600, "VT-d under UEFI (OVMF): the DMAR from the kernel's ACPI without rsdp=, device DMA into the hypervisor blocked")
        },
        // Nested VT-x with the IOMMU: VMX and VT-d on together. 256 MiB
        // keeps every page within edu's reach.
        Suite {
            cmdline: "no5lvl intel_iommu=off intremap=off",
            mem_mib: 256,
            ..suite("latelaunch", Backend::QemuKvm, 600, "late launch on nested VT-x, the IOMMU on: device DMA into the hypervisor blocked")
        },
        Suite {
            cmdline: "no5lvl intel_iommu=off intremap=off",
            mem_mib: 256,
            ..suite("vtd", Backend::QemuKvm, 600, "VT-d on a nested VT-x machine (iommu_only)")
        },
        Suite {
            cmdline: "no5lvl intel_iommu=off intremap=off",
            ..suite("guests", Backend::QemuKvm, 1200, "guest VMs on nested VT-x, the IOMMU on")
        },
    ]
}

/// The hostile suite: ioctl fuzzing, a hostile host, hostile guests.
pub fn hostile() -> Suite {
    suite("hostile", Backend::Bochs, 1200, "security: ioctl fuzzing, a hostile host and hostile guests, the limits, no leaks")
}

/// The soak (`cargo xtask soak`): hours in Bochs, not part of `xtask test`.
pub fn soak() -> Suite {
    Suite { mem_mib: 1024, ..suite("soak", Backend::Bochs, 4 * 3600, "soak: module cycles, VM churn, long ioctl fuzz, no leaks") }
}

/// The demo's suite.
pub fn demo() -> Suite {
    suite("demo", Backend::Bochs, 900, "the demo")
}

pub fn find(name: &str, backend: Backend) -> Suite {
    all()
        .into_iter()
        .chain([demo(), soak()])
        .find(|s| s.name == name && s.backend == backend)
        .unwrap_or_else(|| suite(Box::leak(name.to_string().into_boxed_str()), backend, 600, "ad hoc"))
}
