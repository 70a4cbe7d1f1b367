// SPDX-License-Identifier: GPL-2.0
//! Statistics: the per-CPU and global counters that [`hc::STATS`] returns.

use super::*;

/// Slots in the per-CPU exit counters; basic exit reasons at or above this
/// are counted in the last slot.
pub const EXIT_REASON_SLOTS: usize = 80;

/// Per-CPU counters.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CpuStats {
    /// Linux's CPU number.
    pub cpu_id: u32,
    pub apic_id: u32,
    /// 1 while the CPU runs under the hypervisor.
    pub virtualized: u32,
    pub reserved0: u32,
    /// All VM exits on this CPU, host VM and guests.
    pub exits: u64,
    /// Exits of the host VM alone.
    pub host_exits: u64,
    /// Emulated-TSC cycles spent in the hypervisor handling exits.
    pub exit_tsc: u64,
    /// Exits by basic exit reason (SDM Vol. 3D, Appendix C), host VM and
    /// guests; names in `exit_reason`.
    pub exits_by_reason: [u64; EXIT_REASON_SLOTS],
    /// The guests' share of `exits_by_reason` (the host VM's is the rest).
    pub guest_exits_by_reason: [u64; EXIT_REASON_SLOTS],
}
const _: () = assert_size(core::mem::size_of::<CpuStats>(), 40 + 16 * EXIT_REASON_SLOTS);

/// [`hc::STATS`] output.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HvStats {
    pub abi_revision: u32,
    pub num_cpus: u32,
    /// The hypervisor region (physical).
    pub hv_region_base: u64,
    pub hv_region_size: u64,
    /// Host accesses to protected memory that were neutralised.
    pub blocked_host_reads: u64,
    pub blocked_host_writes: u64,
    /// Guest-physical address of the last one.
    pub last_blocked_gpa: u64,
    /// DMA remapping: 1 when on.
    pub iommu_enabled: u32,
    pub iommu_units: u32,
    pub iommu_faults: u64,
    pub iommu_last_fault_source: u64,
    pub iommu_last_fault_addr: u64,
    /// The frame pool donated by the host.
    pub pool_frames_total: u64,
    pub pool_frames_free: u64,
    /// Frames referenced by more than one mapping (copy-on-write).
    pub frames_shared: u64,
    pub cow_copies: u64,
    pub vms: u32,
    pub reserved0: u32,
    /// Re-merging totals.
    pub merge_scanned: u64,
    pub merge_merged: u64,
    pub merge_zero: u64,
    /// Host EPT leaf entries by page size: 1 GiB, 2 MiB, 4 KiB.
    pub host_ept_1g: u64,
    pub host_ept_2m: u64,
    pub host_ept_4k: u64,
    /// 1 while the hypervisor's code and read-only data still hash to what
    /// they did at start-up.
    pub image_intact: u32,
    pub reserved0b: u32,
    /// The hypervisor's own heap (page tables of the host EPT, the pool's
    /// bookkeeping, VM records), in bytes.
    pub heap_bytes_total: u64,
    pub heap_bytes_free: u64,
    /// Re-merging passes completed.
    pub merge_passes: u64,
    /// Merge chunks abandoned, every page left as it was, because a TLB
    /// shootdown was not acknowledged in time.
    pub merge_aborted: u64,
    /// Guest mappings beyond the first of each frame: the pages that
    /// sharing (merges and forks) saves right now. References the merge
    /// index itself holds are not counted.
    pub merge_pages_shared_now: u64,
    /// Frames the merge index holds (during a pass, and its stable part
    /// between passes), and the hypervisor heap bytes that index takes
    /// (bounded: `docs/design.md`).
    pub merge_indexed: u64,
    pub merge_index_heap_bytes: u64,
    /// TLB shootdowns that were not acknowledged in time (every one of them
    /// undone or kept back by its caller), and the EPT tables and frames
    /// still waiting for a later shootdown to be freed.
    pub shootdowns_unacked: u64,
    pub shootdown_deferred: u64,
    /// TSC ticks the hypervisor spent in merge chunks, over every pass.
    pub merge_tsc: u64,
    /// Index entries whose frames are merged (kept between passes), the
    /// pool frames the index's table takes, and pages passes skipped,
    /// unread, as mapped onto such a frame already.
    pub merge_stable: u64,
    pub merge_index_frames: u64,
    pub merge_skipped: u64,
    pub cpus: [CpuStats; MAX_CPUS],
}
const _: () = assert_size(
    core::mem::size_of::<HvStats>(),
    168 + 24 + 64 + 24 + MAX_CPUS * core::mem::size_of::<CpuStats>(),
);
