//! A VT-d remapping unit's registers, as the hypervisor reaches them: MMIO
//! through the direct map. The register formats and the sequences that use
//! them are portable (`crate::vtd`); this is only the access.
//!
//! The direct map covers the register page with write-back PAT entries. The
//! firmware's MTRRs make the MMIO range below 4 GiB uncacheable, and a
//! write-back PAT type under an uncacheable MTRR gives an uncacheable
//! access. See: SDM Vol. 3A, 13.5.2.2 (selecting memory types with PAT and
//! MTRRs); VT-d spec, 10.2 (register access).

use super::instr;
use crate::addr::Hpa;
use crate::vtd::VtdRegs;

/// One unit's register page(s), mapped at `virt`.
pub struct MmioRegs {
    virt: u64,
    /// Bytes of registers (the DRHD's size field), for the bounds check.
    len: u32,
    /// Where physical memory is mapped, for flushing table pages.
    dm_base: u64,
}

impl MmioRegs {
    /// # Safety
    /// `virt` must map the unit's `len` bytes of registers for as long as
    /// the value lives, and `dm_base + pa` must map every page passed to
    /// [`VtdRegs::sync_for_device`].
    pub unsafe fn new(virt: u64, len: u32, dm_base: u64) -> Self {
        MmioRegs { virt, len, dm_base }
    }

    fn at(&self, off: u32, size: u32) -> u64 {
        // A bad offset is a bug in the register sequences, not an input.
        assert!(off % size == 0 && off + size <= self.len, "VT-d register offset {off:#x} out of range");
        self.virt + off as u64
    }
}

impl VtdRegs for MmioRegs {
    fn read32(&self, off: u32) -> u32 {
        // SAFETY: an aligned register inside the mapped page (`at`).
        unsafe { (self.at(off, 4) as *const u32).read_volatile() }
    }
    fn read64(&self, off: u32) -> u64 {
        // SAFETY: as in `read32`; the spec allows 64-bit accesses to the
        // 64-bit registers on 64-bit hosts (10.2).
        unsafe { (self.at(off, 8) as *const u64).read_volatile() }
    }
    fn write32(&self, off: u32, v: u32) {
        // SAFETY: as in `read32`.
        unsafe { (self.at(off, 4) as *mut u32).write_volatile(v) }
    }
    fn write64(&self, off: u32, v: u64) {
        // SAFETY: as in `read64`.
        unsafe { (self.at(off, 8) as *mut u64).write_volatile(v) }
    }
    fn sync_for_device(&self, page: Hpa) {
        // SAFETY: `dm_base + page` maps the table page (the contract of
        // `new`).
        unsafe { instr::clflush_page(self.dm_base + page.0) }
    }
}
