//! Walks a guest's own page tables (IA-32e 4-level paging) to translate a
//! linear address, the way the CPU would, for instruction emulation.
//! See: SDM Vol. 3A, 4.5.

use crate::addr::{Gpa, Hpa};
use crate::mem::PhysMem;

const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const PS: u64 = 1 << 7;
const NX: u64 = 1 << 63;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Paging-relevant guest control state.
#[derive(Clone, Copy, Debug, Default)]
pub struct PagingMode {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

impl PagingMode {
    fn paging(&self) -> bool {
        self.cr0 & (1 << 31) != 0
    }
    fn long_mode(&self) -> bool {
        self.efer & (1 << 10) != 0
    }
    fn write_protect(&self) -> bool {
        self.cr0 & (1 << 16) != 0
    }
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    pub gpa: Gpa,
    pub writable: bool,
    pub user: bool,
}

/// Why a translation failed: the #PF the CPU would raise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFault {
    pub addr: u64,
    /// #PF error code: P, W/R, U/S.
    pub error_code: u32,
}

/// Kinds of access for permission checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccessKind {
    pub write: bool,
    pub user: bool,
}

/// Translates `gva`. `table_hpa` maps the guest-physical address of a page
/// table to where its bytes are (identity for the host VM; through the
/// guest's EPT for guests); `None` ends the walk with `Err(None)`.
#[allow(clippy::result_large_err)]
pub fn translate(
    mem: &impl PhysMem,
    mode: &PagingMode,
    gva: u64,
    access: AccessKind,
    table_hpa: impl Fn(Gpa) -> Option<Hpa>,
) -> Result<Translation, Option<PageFault>> {
    if !mode.paging() {
        return Ok(Translation { gpa: Gpa(gva & 0xffff_ffff), writable: true, user: true });
    }
    if !mode.long_mode() || mode.cr4 & (1 << 12) != 0 {
        // Only 4-level IA-32e paging is emulated; the host runs in long mode
        // whenever it can touch protected memory.
        return Err(None);
    }
    let ec_base = (access.write as u32) << 1 | (access.user as u32) << 2;
    let fault = |present: bool| Err(Some(PageFault { addr: gva, error_code: ec_base | present as u32 }));
    let canonical = ((gva as i64) << 16 >> 16) as u64 == gva;
    if !canonical {
        return Err(None);
    }
    let mut table = mode.cr3 & ADDR;
    let mut writable = true;
    let mut user = true;
    for level in (1..=4u32).rev() {
        let idx = (gva >> (12 + 9 * (level - 1))) & 0x1ff;
        let Some(hpa) = table_hpa(Gpa(table + idx * 8)) else {
            return Err(None);
        };
        let e = mem.read_u64(hpa);
        if e & P == 0 {
            return fault(false);
        }
        writable &= e & RW != 0;
        user &= e & US != 0;
        let _ = e & NX;
        let leaf = level == 1 || (e & PS != 0 && level <= 3);
        if leaf {
            let page_mask = (1u64 << (12 + 9 * (level - 1))) - 1;
            let gpa = (e & ADDR & !page_mask) | (gva & page_mask);
            let ok = (!access.user || user) && (!access.write || writable || (!access.user && !mode.write_protect()));
            if !ok {
                return fault(true);
            }
            return Ok(Translation { gpa: Gpa(gpa), writable, user });
        }
        table = e & ADDR;
    }
    unreachable!()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::mock::MockMem;

    fn mode(cr3: u64) -> PagingMode {
        PagingMode { cr0: (1 << 31) | (1 << 16) | 1, cr3, cr4: 1 << 5, efer: (1 << 10) | (1 << 8) }
    }

    /// Maps `va` -> `pa` with a 4 KiB page, tables at 0x1000.. .
    fn map(mem: &MockMem, va: u64, pa: u64, flags: u64) {
        let pml4 = 0x1000;
        let pdpt = 0x2000;
        let pd = 0x3000;
        let pt = 0x4000;
        mem.write_u64(Hpa(pml4 + ((va >> 39) & 511) * 8), pdpt | P | RW | US);
        mem.write_u64(Hpa(pdpt + ((va >> 30) & 511) * 8), pd | P | RW | US);
        mem.write_u64(Hpa(pd + ((va >> 21) & 511) * 8), pt | P | RW | US);
        mem.write_u64(Hpa(pt + ((va >> 12) & 511) * 8), pa | flags);
    }

    const KREAD: AccessKind = AccessKind { write: false, user: false };
    const KWRITE: AccessKind = AccessKind { write: true, user: false };
    const UWRITE: AccessKind = AccessKind { write: true, user: true };

    #[test]
    fn four_k() {
        let mem = MockMem::new();
        map(&mem, 0xffff_8880_0012_3000, 0x55_5000, P | RW);
        let t = translate(&mem, &mode(0x1000), 0xffff_8880_0012_3abc, KREAD, |g| Some(Hpa(g.0))).unwrap();
        assert_eq!(t.gpa, Gpa(0x55_5abc));
        assert!(t.writable && !t.user);
    }

    #[test]
    fn not_present_faults() {
        let mem = MockMem::new();
        map(&mem, 0x40_0000, 0x55_5000, P | RW | US);
        let e = translate(&mem, &mode(0x1000), 0x40_1000, UWRITE, |g| Some(Hpa(g.0))).unwrap_err();
        assert_eq!(e, Some(PageFault { addr: 0x40_1000, error_code: 0b110 }));
    }

    #[test]
    fn protection_faults() {
        let mem = MockMem::new();
        map(&mem, 0x40_0000, 0x55_5000, P | US);
        let e = translate(&mem, &mode(0x1000), 0x40_0010, UWRITE, |g| Some(Hpa(g.0))).unwrap_err();
        assert_eq!(e, Some(PageFault { addr: 0x40_0010, error_code: 0b111 }));
        // Supervisor write with CR0.WP set faults too.
        assert!(translate(&mem, &mode(0x1000), 0x40_0010, KWRITE, |g| Some(Hpa(g.0))).is_err());
    }

    #[test]
    fn large_pages() {
        let mem = MockMem::new();
        mem.write_u64(Hpa(0x1000), 0x2000 | P | RW);
        mem.write_u64(Hpa(0x2000), 0x3000 | P | RW);
        mem.write_u64(Hpa(0x3000 + 8), 0x4000_0000 | P | RW | PS); // 2 MiB at va 2 MiB
        let t = translate(&mem, &mode(0x1000), 0x20_1234, KREAD, |g| Some(Hpa(g.0))).unwrap();
        assert_eq!(t.gpa, Gpa(0x4000_1234));
        mem.write_u64(Hpa(0x2000 + 8), 0x8000_0000 | P | RW | PS); // 1 GiB at va 1 GiB
        let t = translate(&mem, &mode(0x1000), 0x4123_4567, KREAD, |g| Some(Hpa(g.0))).unwrap();
        assert_eq!(t.gpa, Gpa(0x8123_4567));
    }

    #[test]
    fn non_canonical_and_unmapped_tables() {
        let mem = MockMem::new();
        assert_eq!(translate(&mem, &mode(0x1000), 0x0000_8000_0000_0000, KREAD, |g| Some(Hpa(g.0))), Err(None));
        assert_eq!(translate(&mem, &mode(0x1000), 0x1000, KREAD, |_| None), Err(None));
    }
}
