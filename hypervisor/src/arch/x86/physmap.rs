//! How the image reaches physical memory: the hypervisor's direct map of
//! all of it, and its own region (image, heap, per-CPU areas) at the
//! address it was relocated for. The primitives below every other layer;
//! `hv::memory` builds the heap frames and page tables on them.

use crate::addr::{Hpa, PAGE_SIZE};
use crate::mem::PhysMem;
use core::sync::atomic::{AtomicU64, Ordering};

/// Virtual address of physical 0 (set once during set-up).
static DM_BASE: AtomicU64 = AtomicU64::new(0);
/// Region virtual and physical base, for heap address translation.
static REGION_VIRT: AtomicU64 = AtomicU64::new(0);
static REGION_PHYS: AtomicU64 = AtomicU64::new(0);
static REGION_SIZE: AtomicU64 = AtomicU64::new(0);

pub fn init(dm_base: u64, region_virt: u64, region_phys: u64, region_size: u64) {
    DM_BASE.store(dm_base, Ordering::Relaxed);
    REGION_VIRT.store(region_virt, Ordering::Relaxed);
    REGION_PHYS.store(region_phys, Ordering::Relaxed);
    REGION_SIZE.store(region_size, Ordering::Relaxed);
}

/// A pointer to physical memory through the direct map.
pub fn phys_ptr(pa: u64) -> *mut u8 {
    (DM_BASE.load(Ordering::Relaxed) + pa) as *mut u8
}

/// Physical address of a hypervisor-region pointer.
pub fn region_pa(p: *const u8) -> u64 {
    let v = p as u64;
    let base = REGION_VIRT.load(Ordering::Relaxed);
    debug_assert!(v >= base && v < base + REGION_SIZE.load(Ordering::Relaxed));
    REGION_PHYS.load(Ordering::Relaxed) + (v - base)
}

/// All physical memory, through the direct map.
#[derive(Clone, Copy, Default)]
pub struct DirectMap;

impl PhysMem for DirectMap {
    fn read(&self, pa: Hpa, buf: &mut [u8]) {
        // SAFETY: the direct map covers every physical address the callers
        // pass (RAM and the host EPT's range); the copy is volatile-free but
        // byte-exact, and the source is not aliased by a Rust reference.
        unsafe { core::ptr::copy_nonoverlapping(phys_ptr(pa.0), buf.as_mut_ptr(), buf.len()) }
    }
    fn write(&self, pa: Hpa, buf: &[u8]) {
        // SAFETY: as in `read`; callers only write memory they own.
        unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), phys_ptr(pa.0), buf.len()) }
    }
    fn read_u64(&self, pa: Hpa) -> u64 {
        // SAFETY: aligned 8-byte read through the direct map.
        unsafe { (phys_ptr(pa.0) as *const u64).read_volatile() }
    }
    fn write_u64(&self, pa: Hpa, v: u64) {
        // SAFETY: aligned 8-byte write through the direct map; page-table
        // entries are written in one store.
        unsafe { (phys_ptr(pa.0) as *mut u64).write_volatile(v) }
    }
    fn zero_page(&self, pa: Hpa) {
        // SAFETY: as in `write`; one page through the direct map, written
        // in place rather than copied from a zeroed buffer.
        unsafe { core::ptr::write_bytes(phys_ptr(pa.0), 0, PAGE_SIZE as usize) }
    }
    fn pages_equal(&self, a: Hpa, b: Hpa) -> bool {
        let (x, y) = (phys_ptr(a.0) as *const u64, phys_ptr(b.0) as *const u64);
        // Eight words at a time, their differences or'ed together: a load
        // and two ALU operations a word, and one branch per 64 bytes.
        (0..PAGE_SIZE as usize / 8).step_by(8).all(|i| {
            // SAFETY: aligned 8-byte reads of two pages through the direct
            // map (no copies); `i + k` stays below 512.
            (0..8).fold(0, |d, k| d | unsafe { x.add(i + k).read() ^ y.add(i + k).read() }) == 0
        })
    }
}

/// A pointer to region physical address `pa` through the region's own
/// mapping.
pub fn region_ptr(pa: u64) -> *mut u8 {
    let base = REGION_PHYS.load(Ordering::Relaxed);
    debug_assert!(pa >= base && pa < base + REGION_SIZE.load(Ordering::Relaxed));
    (REGION_VIRT.load(Ordering::Relaxed) + (pa - base)) as *mut u8
}
