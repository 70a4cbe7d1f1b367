//! Physical memory in the image: the direct map, heap frames, and the
//! hypervisor's own page tables.

use crate::addr::Hpa;
use crate::mem::{FrameAlloc, PhysMem};

pub use crate::arch::x86::physmap::{init, phys_ptr, region_pa, region_ptr, DirectMap};

/// Host memory as the hypercall decoders see it (`control::decode`):
/// ownership as [`super::Hv::host_owned`] judges it, contents through the
/// direct map.
#[derive(Clone, Copy, Default)]
pub struct HostBlocks;

impl crate::control::HostMem for HostBlocks {
    fn owned(&self, pa: u64, len: u64) -> bool {
        super::hv().host_owned(pa, len)
    }
    fn read(&self, pa: u64, buf: &mut [u8]) {
        DirectMap.read(Hpa(pa), buf);
    }
    fn write(&self, pa: u64, buf: &[u8]) {
        DirectMap.write(Hpa(pa), buf);
    }
}

/// Page-table frames from the hypervisor heap.
pub struct HeapFrames;

impl FrameAlloc for HeapFrames {
    fn alloc_frame(&mut self) -> Option<Hpa> {
        let layout = core::alloc::Layout::from_size_align(4096, 4096).ok()?;
        // SAFETY: a valid, non-zero-size layout.
        let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
        if p.is_null() {
            return None;
        }
        Some(Hpa(region_pa(p)))
    }
    fn free_frame(&mut self, pa: Hpa) {
        let layout = core::alloc::Layout::from_size_align(4096, 4096).unwrap();
        // SAFETY: `pa` came from `alloc_frame`, with the same layout.
        unsafe { alloc::alloc::dealloc(region_ptr(pa.0), layout) }
    }
}

/// Allocates one zeroed, page-aligned heap page and returns its physical
/// address and pointer.
pub fn alloc_page() -> Option<(u64, *mut u8)> {
    let pa = HeapFrames.alloc_frame()?;
    Some((pa.0, region_ptr(pa.0)))
}

/// Builds the hypervisor's page tables in heap frames
/// ([`crate::paging::build_hypervisor_tables`]): all physical memory below
/// `top` at `dm_base` (1 GiB or 2 MiB pages; the region itself is in there,
/// at the address the image was relocated for), and the driver's trampoline
/// page at `tramp_virt`. Returns the PML4's physical address.
pub fn build_page_tables(dm_base: u64, top: u64, tramp_virt: u64, tramp_phys: u64, huge: bool) -> Option<u64> {
    crate::paging::build_hypervisor_tables(&RegionMem, &mut HeapFrames, dm_base, top, tramp_virt, tramp_phys, huge).map(|t| t.0)
}

/// Heap frames through the region's own mapping, which the boot page
/// tables already have (before the hypervisor's direct map exists).
#[derive(Clone, Copy, Default)]
pub struct RegionMem;

impl RegionMem {
    fn ptr(pa: Hpa) -> *mut u8 {
        region_ptr(pa.0)
    }
}

impl PhysMem for RegionMem {
    fn read(&self, pa: Hpa, buf: &mut [u8]) {
        // SAFETY: callers pass heap frames, which lie in the mapped region.
        unsafe { core::ptr::copy_nonoverlapping(Self::ptr(pa), buf.as_mut_ptr(), buf.len()) }
    }
    fn write(&self, pa: Hpa, buf: &[u8]) {
        // SAFETY: as in `read`.
        unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), Self::ptr(pa), buf.len()) }
    }
    fn read_u64(&self, pa: Hpa) -> u64 {
        // SAFETY: as in `read`; aligned.
        unsafe { (Self::ptr(pa) as *const u64).read_volatile() }
    }
    fn write_u64(&self, pa: Hpa, v: u64) {
        // SAFETY: as in `read`; aligned, one store per entry.
        unsafe { (Self::ptr(pa) as *mut u64).write_volatile(v) }
    }
}
