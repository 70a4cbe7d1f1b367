//! CPU 0's part of the launch, done once for all: the heap and the
//! hypervisor's page tables (on the boot tables), then the log, the VMX
//! capabilities, the host VM's EPT, the bitmaps and DMA remapping (on the
//! hypervisor's own tables); and its undoing when the launch fails.

use super::image;
use super::rendezvous::FINAL_CR3;
use crate::addr::{Hpa, PhysRange};
use crate::arch::x86::instr;
use crate::arch::x86::vmx::{self, VmxCaps};
use crate::ept::{build_host_ept, host_map_top, HostMap};
use crate::hv::memory::{self, HeapFrames, RegionMem};
use crate::hv::{install, GlobalStats, Hv};
use crate::policy;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;
use shared_abi::{errno::*, BootInfo, ImageHeader, VERSION};

/// CPU 0, on the boot tables: the heap and the hypervisor's page tables.
pub(super) fn build_tables(info: &BootInfo, l: &shared_abi::RegionLayout) -> Option<u64> {
    // SAFETY: the heap range is the region's, unused by anything else.
    unsafe { image::init_heap((info.region_virt + l.heap_start) as *mut u8, (l.heap_end - l.heap_start) as usize) };
    let ram = &info.ram[..info.num_ram as usize];
    let huge = instr::cpuid(0x8000_0001, 0)[3] & (1 << 26) != 0;
    memory::build_page_tables(info.direct_map_base, host_map_top(ram), info.tramp_virt, info.tramp_phys, huge)
}

/// CPU 0, on the hypervisor's tables: the log, VMX capabilities, the host
/// VM's EPT and the bitmaps.
pub(super) fn global_setup(info: &BootInfo, _h: &ImageHeader, l: &shared_abi::RegionLayout) -> Result<(), i64> {
    crate::hv::logger::E9.store(info.flags & shared_abi::BOOT_FLAG_LOG_E9 != 0, Ordering::Relaxed);
    if info.log_phys != 0 && info.log_size >= 4096 {
        // SAFETY: the driver's log ring, reachable through the direct map.
        unsafe { crate::hv::logger::init(memory::phys_ptr(info.log_phys), info.log_size as usize) };
    }
    log::info!(
        "uxen-rs {} starting on {} CPUs; region {:#x}+{:#x} (heap {} KiB)",
        core::str::from_utf8(shared_abi::cstr_bytes(&VERSION)).unwrap_or("?"),
        info.num_cpus,
        info.region_phys,
        info.region_size,
        (l.heap_end - l.heap_start) >> 10
    );
    let iommu_only = info.flags & shared_abi::BOOT_FLAG_IOMMU_ONLY != 0;
    let caps = if iommu_only {
        VmxCaps::default()
    } else {
        vmx::check_and_enable().map_err(|e| {
            log::error!("{e}");
            e.errno()
        })?;
        VmxCaps::read().map_err(|e| {
            log::error!("{e}");
            e.errno()
        })?
    };

    let ram: Vec<shared_abi::MemRange> = info.ram[..info.num_ram as usize].to_vec();
    let top = host_map_top(&ram);
    let region = PhysRange::new(info.region_phys, info.region_size);
    // The remapping units, their tables built but not yet on. Their
    // register pages are hidden from the host like the region.
    let iommu = crate::hv::iommu::discover(info, &ram, region)?;
    let mut holes = alloc::vec![region];
    if let Some(f) = &iommu {
        holes.extend_from_slice(f.registers());
    }
    // Without VMX this map is never walked by a CPU: it stays the record of
    // which pages the host owns, which the hypercalls check.
    let map = HostMap { ram: &ram, top, holes: &holes, huge_pages: caps.ept_huge_pages() };
    let mut ept = build_host_ept(&RegionMem, &mut HeapFrames, &map).ok_or(-ENOMEM)?;
    // The local APIC page: the host's, but in a 4 KiB leaf of its own, so
    // that CPU hotplug can write-protect it alone (`ipi::host_cpu`).
    // SAFETY: the APIC base MSR exists.
    let apic_page = unsafe { instr::rdmsr(crate::arch::x86::msr::IA32_APIC_BASE) } & 0x000f_ffff_ffff_f000;
    let rw = crate::arch::x86::ept_entry::EptEntry::leaf(apic_page, crate::arch::x86::ept_entry::EptFlags::RWX, crate::arch::x86::ept_entry::MT_UC, false);
    ept.set(&RegionMem, &mut HeapFrames, crate::addr::Gpa(apic_page), 1, rw).ok_or(-ENOMEM)?;
    let eptp = crate::arch::x86::ept_entry::eptp(ept.root.0, false);
    let counts = ept.counts(&RegionMem);
    log::info!(
        "host EPT: {:#x} bytes identity-mapped in {} 1G + {} 2M + {} 4K pages, less the region{}",
        top,
        counts.huge,
        counts.large,
        counts.small,
        if holes.len() > 1 { " and the VT-d registers" } else { "" }
    );

    let (msr_bitmap, msr_ptr) = memory::alloc_page().ok_or(-ENOMEM)?;
    // SAFETY: a fresh, zeroed heap page.
    let bm = unsafe { &mut *(msr_ptr as *mut [u8; 4096]) };
    policy::build_msr_bitmap(bm, policy::host_guarded_msrs());
    let (io_a, _) = memory::alloc_page().ok_or(-ENOMEM)?;
    let (io_b, _) = memory::alloc_page().ok_or(-ENOMEM)?;

    // Last, so that nothing after it can fail: DMA remapping on.
    if let Some(f) = iommu {
        crate::hv::iommu::enable(f)?;
    }
    image::record_image_hash();
    install(Hv {
        boot: *info,
        region,
        region_virt: info.region_virt,
        dm_base: info.direct_map_base,
        cr3: FINAL_CR3.load(Ordering::Acquire),
        ram,
        caps,
        host_ept: spin::Mutex::new(ept),
        host_eptp: eptp,
        host_ept_top: top,
        host_ept_huge: caps.ept_huge_pages(),
        msr_bitmap: Hpa(msr_bitmap),
        apic_page,
        io_bitmaps: [Hpa(io_a), Hpa(io_b)],
        stats: GlobalStats::default(),
        unloading: core::sync::atomic::AtomicBool::new(false),
    });
    Ok(())
}

/// Undoes what the global set-up turned on in hardware when the load fails
/// after it: DMA remapping.
pub(super) fn roll_back_global() {
    if crate::hv::iommu::teardown().is_err() {
        log::error!("DMA remapping is still on after a failed load: the region's tables must stay");
    }
}
