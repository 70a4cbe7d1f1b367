//! IA-32e 4-level paging: a walk of a guest's own page tables that
//! translates a linear address the way the CPU would (with its permission
//! checks), for instruction emulation; and the entry format the radix
//! engine builds the hypervisor's own page tables in. See: SDM Vol. 3A, 4.5.

use crate::addr::{Gpa, Hpa, HUGE_PAGE_SIZE, LARGE_PAGE_SIZE};
use crate::mem::{FrameAlloc, PhysMem};
use crate::radix::{entry_format, Radix, PDPT_AND_PD};

const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const PS: u64 = 1 << 7;
const NX: u64 = 1 << 63;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// An IA-32e paging-structure entry. See: SDM Vol. 3A, 4.5: P (bit 0)
/// makes it present; PS (bit 7) makes a PDPTE (1 GiB) or a PDE (2 MiB) a
/// leaf, and is reserved in a PML4E.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageEntry(pub u64);

impl PageEntry {
    /// A supervisor leaf for `pa`, writable or not; `large` for 2 MiB and
    /// 1 GiB leaves.
    pub const fn leaf(pa: u64, writable: bool, large: bool) -> Self {
        PageEntry((pa & ADDR) | P | if writable { RW } else { 0 } | if large { PS } else { 0 })
    }
}

// The hypervisor's tables map nothing for CPL 3: a table entry is present
// and writable, supervisor only, and the leaves decide.
entry_format!(PageEntry: present P, address ADDR, large PS, levels PDPT_AND_PD, table P | RW);

/// Builds the hypervisor's page tables: physical memory `[0, top)` at
/// `dm_base` (the direct map) in 1 GiB leaves with `huge` or else 2 MiB
/// ones, both bases aligned to them, and the read-only page `tramp_phys` at
/// `tramp_virt`. Returns the PML4, or `None` when out of frames.
pub fn build_hypervisor_tables(
    mem: &impl PhysMem,
    alloc: &mut impl FrameAlloc,
    dm_base: u64,
    top: u64,
    tramp_virt: u64,
    tramp_phys: u64,
    huge: bool,
) -> Option<Hpa> {
    let t = Radix::<PageEntry>::new(mem, alloc, 4)?;
    let (level, step) = if huge { (3, HUGE_PAGE_SIZE) } else { (2, LARGE_PAGE_SIZE) };
    let mut pa = 0;
    while pa < top {
        t.set(mem, alloc, dm_base + pa, level, PageEntry::leaf(pa, true, true))?;
        pa += step;
    }
    t.set(mem, alloc, tramp_virt, 1, PageEntry::leaf(tramp_phys, false, false))?;
    Some(t.root)
}

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

    #[test]
    fn hypervisor_tables_translate_as_the_cpu_would() {
        // What the walk above (the CPU's rules) makes of the engine's tables.
        use crate::mem::mock::MockFrames;
        const DM: u64 = 0xffff_8880_0000_0000;
        const TRAMP: u64 = 0xffff_ffff_8000_5000;
        for huge in [true, false] {
            let mem = MockMem::new();
            let mut frames = MockFrames::new(0x7_0000_0000, 64);
            let pml4 = build_hypervisor_tables(&mem, &mut frames, DM, 6 << 30, TRAMP, 0x9_f000, huge).unwrap();
            let walk = |va, access| translate(&mem, &mode(pml4.0), va, access, |g| Some(Hpa(g.0)));
            for pa in [0, 0x1234_5678, (6 << 30) - 8] {
                assert_eq!(walk(DM + pa, KWRITE), Ok(Translation { gpa: Gpa(pa), writable: true, user: false }));
            }
            assert_eq!(walk(DM + (6 << 30), KREAD), Err(Some(PageFault { addr: DM + (6 << 30), error_code: 0 })));
            assert_eq!(walk(TRAMP + 0x10, KREAD).map(|t| (t.gpa, t.writable)), Ok((Gpa(0x9_f010), false)));
            assert!(walk(TRAMP, UWRITE).is_err());
            let leaves = crate::radix::Radix::<PageEntry>::at(pml4, 4).counts(&mem);
            assert_eq!((leaves.huge, leaves.large, leaves.small), if huge { (6, 0, 1) } else { (0, 3072, 1) });
        }
    }
}
