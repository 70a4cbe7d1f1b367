//! The running hypervisor: global state, exit handling and hypercalls (the
//! launch that sets it up is `crate::launch`). Built only into the image;
//! the decisions it takes come from the portable modules (`policy`,
//! `emulate`, `ept`, `paging`).

pub mod exits;
pub mod hypercall;
pub mod iommu;
pub mod ipi;
pub mod linux;
pub mod logger;
pub mod memory;
pub mod merge;
pub mod platform;
pub mod run;
pub mod tlb;
pub mod vm;

/// The image's hash and heap, which the statistics report, under the path
/// the hypercalls name them by; the launch code that owns them is
/// `crate::launch`.
pub use crate::launch as setup;

use crate::addr::{Hpa, PhysRange};
use crate::arch::x86::cpu::PerCpu;
use crate::arch::x86::vmx::VmxCaps;
use crate::ept::Ept;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use shared_abi::{BootInfo, MemRange};

/// Global hypervisor state, set up once by the first CPU.
pub struct Hv {
    pub boot: BootInfo,
    /// The hypervisor region (physical) and where it is mapped.
    pub region: PhysRange,
    pub region_virt: u64,
    /// Physical memory is mapped at `dm_base + pa` in the hypervisor's page
    /// tables (the same offset as the host's direct map).
    pub dm_base: u64,
    /// The hypervisor's own page tables.
    pub cr3: u64,
    pub ram: Vec<MemRange>,
    pub caps: VmxCaps,
    /// The host VM's EPT and its pointer.
    pub host_ept: spin::Mutex<Ept>,
    pub host_eptp: u64,
    pub host_ept_top: u64,
    pub host_ept_huge: bool,
    pub msr_bitmap: Hpa,
    /// The host's local APIC page, read-only in its EPT.
    pub apic_page: u64,
    pub io_bitmaps: [Hpa; 2],
    pub stats: GlobalStats,
    pub unloading: AtomicBool,
}

/// Counters shared by all CPUs.
#[derive(Default)]
pub struct GlobalStats {
    pub blocked_reads: AtomicU64,
    pub blocked_writes: AtomicU64,
    pub last_blocked_gpa: AtomicU64,
}

static HV: spin::Once<Hv> = spin::Once::new();

/// The hypervisor state; only valid after set-up.
pub fn hv() -> &'static Hv {
    HV.get().expect("hypervisor used before set-up")
}

pub(crate) fn install(h: Hv) -> &'static Hv {
    HV.call_once(|| h)
}

pub fn try_hv() -> Option<&'static Hv> {
    HV.get()
}

impl Hv {
    /// Whether `[pa, pa+len)` is host RAM that the host still owns, so that a
    /// hypercall may read or write it on the host's behalf.
    pub fn host_owned(&self, pa: u64, len: u64) -> bool {
        let Some(end) = pa.checked_add(len) else { return false };
        if len == 0 || !self.ram.iter().any(|r| r.base <= pa && end <= r.base + r.size) {
            return false;
        }
        if self.region.overlaps(pa, len) {
            return false;
        }
        let ept = self.host_ept.lock();
        let mem = memory::DirectMap;
        let mut page = pa & !0xfff;
        while page < end {
            match ept.translate(&mem, crate::addr::Gpa(page)) {
                Some((hpa, f)) if hpa.0 == page && f.contains(crate::arch::x86::ept_entry::EptFlags::WRITE) => {}
                _ => return false,
            }
            page += 0x1000;
        }
        true
    }

    /// Whether the hypervisor runs without VMX (`iommu_only=1`): it
    /// protects memory from device DMA only, the host is not demoted, and
    /// the driver reaches it by direct calls instead of VMCALL.
    pub fn iommu_only(&self) -> bool {
        self.boot.flags & shared_abi::BOOT_FLAG_IOMMU_ONLY != 0
    }

    /// Number of CPUs under the hypervisor.
    pub fn num_cpus(&self) -> usize {
        self.boot.num_cpus as usize
    }

    pub fn percpu(&self, index: usize) -> &'static PerCpu {
        crate::arch::x86::cpu::percpu_of(index)
    }
}

/// Counts a blocked host access.
pub fn count_blocked(gpa: u64, reads: u32, writes: u32) {
    let s = &hv().stats;
    s.blocked_reads.fetch_add(reads as u64, Ordering::Relaxed);
    s.blocked_writes.fetch_add(writes as u64, Ordering::Relaxed);
    s.last_blocked_gpa.store(gpa, Ordering::Relaxed);
}
