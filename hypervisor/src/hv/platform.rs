//! The running hypervisor as the machine under the host hypercall
//! dispatcher (`control::Platform`): the host EPT, TLB shootdowns, VT-d,
//! the frame pool and the table of VMs. Each method carries out one step
//! the dispatcher orders; the decisions are in `control::dispatch`.

use super::memory::{DirectMap, HeapFrames, HostBlocks};
use super::vm::{self, Vm, VmError};
use super::{hv, iommu, tlb};
use crate::addr::{Gpa, Hpa, PhysRange, LARGE_PAGE_SIZE};
use crate::arch::x86::instr;
use crate::control::vmops::{self, Limits};
use crate::control::{HcError, Platform, Unacked};
use crate::ept::{Ept, HostMap};
use crate::guestmem::GuestMem;
use crate::pool::FramePool;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;
use shared_abi::{HvStats, MemRange, VmCreate, VmInfo, EXIT_REASON_SLOTS};

/// The hypervisor, for one host hypercall.
#[derive(Default)]
pub struct Machine {
    /// Host EPT tables that unmapping or coalescing dropped, with their
    /// level: a CPU may still walk them until the next shootdown.
    dropped: Vec<(Hpa, u32)>,
}

impl Platform for Machine {
    type Mem = DirectMap;
    type Host = HostBlocks;
    type Vm = Arc<Vm>;

    fn mem(&self) -> &DirectMap {
        &DirectMap
    }

    fn host(&self) -> &HostBlocks {
        &HostBlocks
    }

    fn with_pool<R>(&mut self, f: impl FnOnce(&DirectMap, &mut FramePool) -> R) -> R {
        f(&DirectMap, &mut vm::POOL.lock())
    }

    fn vmx(&self) -> bool {
        !hv().iommu_only()
    }

    fn debug(&self) -> bool {
        hv().boot.flags & shared_abi::BOOT_FLAG_DEBUG != 0
    }

    fn limits(&self) -> Limits {
        vmops::LIMITS
    }

    fn host_unmap(&mut self, ranges: &[MemRange]) -> Result<(), HcError> {
        let mut ept = hv().host_ept.lock();
        let mut frames = HeapFrames;
        for r in ranges {
            let mut a = r.base;
            while a < r.base + r.size {
                // Whole 2 MiB go in one entry; the table of 4 KiB pages
                // that replaced it (pages given back one by one) is dropped.
                let big = a % LARGE_PAGE_SIZE == 0 && a + LARGE_PAGE_SIZE <= r.base + r.size;
                let (level, step) = if big { (2, LARGE_PAGE_SIZE) } else { (1, 4096) };
                let old = ept.unmap(&DirectMap, &mut frames, Gpa(a), level).ok_or(HcError::NoMemory)?;
                self.dropped.extend(old.map(|t| (t, level - 1)));
                a += step;
            }
        }
        Ok(())
    }

    fn host_map(&mut self, ranges: &[PhysRange]) -> Result<(), HcError> {
        let h = hv();
        let tables = {
            let mut ept = h.host_ept.lock();
            let map = HostMap { ram: &h.ram, top: h.host_ept_top, holes: &[], huge_pages: h.host_ept_huge };
            for r in ranges {
                for a in (r.base.0..r.end.0).step_by(4096) {
                    crate::ept::host_map_page(&mut ept, &DirectMap, &mut HeapFrames, &map, Hpa(a)).ok_or(HcError::NoMemory)?;
                }
            }
            // 2 MiB wholly the host's again go back to one large leaf, and
            // their table to the heap.
            let mut bases: Vec<u64> = ranges.iter().flat_map(|r| (r.base.0 & !(LARGE_PAGE_SIZE - 1)..r.end.0).step_by(LARGE_PAGE_SIZE as usize)).collect();
            bases.dedup();
            bases.into_iter().filter_map(|b| ept.coalesce_identity(&DirectMap, Gpa(b))).collect::<Vec<_>>()
        };
        if !tables.is_empty() {
            // A stale paging-structure cache may still walk the tables
            // until a shootdown; without one they wait for a later one (the
            // pages are the host's either way).
            self.dropped.extend(tables.into_iter().map(|t| (t, 1)));
            let _ = self.shootdown();
        }
        Ok(())
    }

    fn shootdown(&mut self) -> Result<(), Unacked> {
        match tlb::shootdown() {
            Ok(ok) => {
                for (t, level) in self.dropped.drain(..) {
                    Ept::free_subtree(&DirectMap, &mut HeapFrames, t, level);
                }
                tlb::release_deferred(ok);
                Ok(())
            }
            Err(_) => {
                for (t, level) in self.dropped.drain(..) {
                    tlb::defer_table(t, level);
                }
                Err(Unacked)
            }
        }
    }

    fn iommu_unmap(&mut self, ranges: &[PhysRange]) -> Result<(), crate::vtd::Error> {
        iommu::remove(ranges)
    }

    fn iommu_map(&mut self, ranges: &[PhysRange]) -> Result<(), crate::vtd::Error> {
        iommu::restore(ranges)
    }

    fn vm_count(&self) -> u32 {
        vm::count()
    }

    fn vm(&self, id: u32) -> Result<Arc<Vm>, VmError> {
        vm::get(id)
    }

    fn vm_running(&self, vm: &Arc<Vm>) -> bool {
        vm.vcpus.iter().any(|v| v.running.load(Ordering::Acquire))
    }

    fn with_vm_mem<R>(&mut self, vm: &Arc<Vm>, f: impl FnOnce(&DirectMap, &mut FramePool, &mut GuestMem) -> R) -> Result<R, VmError> {
        let mut mem = vm.mem.lock();
        let g = mem.as_mut().ok_or(VmError::NoSuchVm)?;
        Ok(f(&DirectMap, &mut vm::POOL.lock(), g))
    }

    fn vm_create(&mut self, c: &VmCreate) -> Result<u32, VmError> {
        let linux = (c.flags & shared_abi::VM_FLAG_LINUX != 0).then_some(c.tsc_khz);
        vm::create(c.mem_bytes, c.vcpus, c.name, 0, linux, c.flags & shared_abi::VM_FLAG_VMGENID != 0).map(|v| v.id)
    }

    fn vm_destroy(&mut self, id: u32) -> Result<(), VmError> {
        vm::destroy(id)
    }

    fn vm_ended(&self, vm: &Arc<Vm>) -> bool {
        vm.is_stopped() || vm.dying.load(Ordering::Acquire)
    }

    fn vm_hold(&mut self, vm: &Arc<Vm>) -> bool {
        // Each vCPU is held as if this CPU ran it, so that none starts
        // meanwhile.
        let held = vm.vcpus.iter().take_while(|v| v.running.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok()).count();
        if held < vm.vcpus.len() {
            for v in vm.vcpus.iter().take(held) {
                v.running.store(false, Ordering::Release);
            }
            return false;
        }
        true
    }

    fn vm_release(&mut self, vm: &Arc<Vm>) {
        for v in vm.vcpus.iter() {
            v.running.store(false, Ordering::Release);
        }
    }

    fn vm_fork(&mut self, vm: &Arc<Vm>, copy: bool) -> Result<u32, VmError> {
        let states = vm.vcpus.iter().map(vm::capture_idle).collect();
        vm::fork(vm, states, copy).map(|c| c.id)
    }

    fn vm_list(&mut self) -> Vec<VmInfo> {
        vm::list()
    }

    fn num_cpus(&self) -> u32 {
        hv().num_cpus() as u32
    }

    fn features(&self) -> u64 {
        use shared_abi::{HV_FEATURE_EPT, HV_FEATURE_IOMMU, HV_FEATURE_UNRESTRICTED, HV_FEATURE_VMX, HV_FEATURE_VPID};
        let vmx = if self.vmx() { HV_FEATURE_VMX | HV_FEATURE_EPT | HV_FEATURE_VPID | HV_FEATURE_UNRESTRICTED } else { 0 };
        vmx | if iommu::enabled() { HV_FEATURE_IOMMU } else { 0 }
    }

    fn tsc(&self) -> u64 {
        instr::rdtsc()
    }

    fn stats(&mut self, s: &mut HvStats) {
        use super::merge;
        let h = hv();
        s.hv_region_base = h.region.base.0;
        s.hv_region_size = h.region.size();
        s.blocked_host_reads = h.stats.blocked_reads.load(Ordering::Relaxed);
        s.blocked_host_writes = h.stats.blocked_writes.load(Ordering::Relaxed);
        s.last_blocked_gpa = h.stats.last_blocked_gpa.load(Ordering::Relaxed);
        let c = h.host_ept.lock().counts(&DirectMap);
        s.host_ept_1g = c.huge;
        s.host_ept_2m = c.large;
        s.host_ept_4k = c.small;
        s.image_intact = super::setup::image_intact() as u32;
        (s.heap_bytes_total, s.heap_bytes_free) = super::setup::heap_usage();
        iommu::poll();
        iommu::summary().fill(s);
        {
            // Read under the pool's lock, which a merge chunk holds while it
            // changes the index.
            let pool = vm::POOL.lock();
            s.merge_indexed = merge::INDEXED.load(Ordering::Relaxed);
            s.merge_pages_shared_now = pool.refs_beyond_one().saturating_sub(s.merge_indexed);
        }
        s.merge_index_heap_bytes = merge::INDEX_HEAP.load(Ordering::Relaxed);
        s.merge_stable = merge::STABLE.load(Ordering::Relaxed);
        s.merge_index_frames = merge::INDEX_FRAMES.load(Ordering::Relaxed);
        s.merge_skipped = merge::SKIPPED.load(Ordering::Relaxed);
        s.merge_passes = merge::PASSES.load(Ordering::Relaxed);
        s.merge_aborted = merge::ABORTED.load(Ordering::Relaxed);
        s.merge_tsc = merge::TSC.load(Ordering::Relaxed);
        s.shootdowns_unacked = tlb::UNACKED.load(Ordering::Relaxed);
        s.shootdown_deferred = tlb::deferred_count() as u64;
        s.cow_copies = vm::COW_COPIES.load(Ordering::Relaxed);
        s.merge_scanned = merge::SCANNED.load(Ordering::Relaxed);
        s.merge_merged = merge::MERGED.load(Ordering::Relaxed);
        s.merge_zero = merge::ZERO.load(Ordering::Relaxed);
        for i in 0..h.num_cpus() {
            let pc = h.percpu(i);
            let d = &mut s.cpus[i];
            d.cpu_id = pc.linux_id;
            d.apic_id = pc.apic_id;
            d.virtualized = pc.virtualized.load(Ordering::Relaxed);
            d.exits = pc.exits.load(Ordering::Relaxed);
            d.host_exits = pc.host_exits.load(Ordering::Relaxed);
            d.exit_tsc = pc.exit_tsc.load(Ordering::Relaxed);
            for r in 0..EXIT_REASON_SLOTS {
                d.exits_by_reason[r] = pc.exits_by_reason[r].load(Ordering::Relaxed);
                d.guest_exits_by_reason[r] = pc.guest_exits_by_reason[r].load(Ordering::Relaxed);
            }
        }
    }
}
