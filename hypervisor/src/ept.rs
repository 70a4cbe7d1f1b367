//! EPT tables: the generic walker and splitter, and the host VM's identity
//! map (all memory 1:1 in the largest pages that fit, less the holes).

use crate::addr::{Gpa, Hpa, PhysRange, HUGE_PAGE_SIZE, LARGE_PAGE_SIZE, PAGE_SIZE};
use crate::arch::x86::ept_entry::{EptEntry, EptFlags, MT_UC, MT_WB};
use crate::mem::{FrameAlloc, PhysMem};
use shared_abi::MemRange;

/// Bytes mapped by one entry at `level` (1 = PT, 2 = PD, 3 = PDPT, 4 = PML4).
pub const fn level_size(level: u32) -> u64 {
    1u64 << (12 + 9 * (level - 1))
}

const fn index(gpa: u64, level: u32) -> u64 {
    (gpa >> (12 + 9 * (level - 1))) & 0x1ff
}

/// A 4-level EPT hierarchy rooted at `root`.
#[derive(Debug)]
pub struct Ept {
    pub root: Hpa,
}

/// Leaf counts by page size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeafCounts {
    pub huge: u64,
    pub large: u64,
    pub small: u64,
    pub tables: u64,
}

impl Ept {
    pub fn new(mem: &impl PhysMem, alloc: &mut impl FrameAlloc) -> Option<Ept> {
        let root = alloc.alloc_frame()?;
        mem.zero_page(root);
        Some(Ept { root })
    }

    /// The leaf covering `gpa`: where the entry lives, the entry, its level.
    pub fn lookup(&self, mem: &impl PhysMem, gpa: Gpa) -> Option<(Hpa, EptEntry, u32)> {
        let mut table = self.root;
        for level in (1..=4).rev() {
            let at = Hpa(table.0 + index(gpa.0, level) * 8);
            let e = EptEntry(mem.read_u64(at));
            if !e.present() {
                return None;
            }
            if level == 1 || e.is_large() {
                return Some((at, e, level));
            }
            table = Hpa(e.addr());
        }
        None
    }

    /// Where `gpa` maps: the host-physical address and the leaf's flags.
    pub fn translate(&self, mem: &impl PhysMem, gpa: Gpa) -> Option<(Hpa, EptFlags)> {
        let (_, e, level) = self.lookup(mem, gpa)?;
        let off = gpa.0 & (level_size(level) - 1);
        Some((Hpa(e.addr() + off), e.flags()))
    }

    /// The address of the entry for `gpa` at `level`, creating tables and
    /// splitting larger leaves on the way. Returns `None` when out of frames.
    pub fn entry_at(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, gpa: Gpa, level: u32) -> Option<Hpa> {
        let mut table = self.root;
        for l in ((level + 1)..=4).rev() {
            let at = Hpa(table.0 + index(gpa.0, l) * 8);
            let e = EptEntry(mem.read_u64(at));
            let next = if !e.present() {
                let t = alloc.alloc_frame()?;
                mem.zero_page(t);
                mem.write_u64(at, EptEntry::table(t.0).0);
                t
            } else if e.is_large() {
                // Split the leaf into a table of smaller leaves, built fully
                // before it replaces the leaf in one 8-byte store.
                let t = alloc.alloc_frame()?;
                let small = level_size(l - 1);
                for i in 0..512u64 {
                    let mut child = e.0 + i * small;
                    if l - 1 == 1 {
                        child &= !EptFlags::LARGE.bits();
                    }
                    mem.write_u64(Hpa(t.0 + i * 8), child);
                }
                mem.write_u64(at, EptEntry::table(t.0).0);
                t
            } else {
                Hpa(e.addr())
            };
            table = next;
        }
        Some(Hpa(table.0 + index(gpa.0, level) * 8))
    }

    /// Writes `entry` as the leaf for `gpa` at `level`.
    pub fn set(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, gpa: Gpa, level: u32, entry: EptEntry) -> Option<()> {
        let at = self.entry_at(mem, alloc, gpa, level)?;
        mem.write_u64(at, entry.0);
        Some(())
    }

    /// Clears the entry for `gpa` at `level`. If it pointed to a table,
    /// returns that table: the caller frees it with [`Ept::free_subtree`]
    /// once no CPU can still walk it (after an INVEPT everywhere).
    pub fn unmap(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, gpa: Gpa, level: u32) -> Option<Option<Hpa>> {
        let at = self.entry_at(mem, alloc, gpa, level)?;
        let old = EptEntry(mem.read_u64(at));
        mem.write_u64(at, EptEntry::empty().0);
        Some((level > 1 && old.present() && !old.is_large()).then(|| Hpa(old.addr())))
    }

    /// If the 2 MiB at `base` maps through a table of 512 identity 4 KiB
    /// leaves with the same permissions and memory type, replaces the table
    /// with one 2 MiB leaf. Returns the table: the caller frees it once no
    /// CPU can still walk it (after an INVEPT everywhere).
    pub fn coalesce_identity(&mut self, mem: &impl PhysMem, base: Gpa) -> Option<Hpa> {
        let (at, e, level) = self.lookup_entry(mem, base, 2)?;
        if level != 2 || !e.present() || e.is_large() || base.0 % LARGE_PAGE_SIZE != 0 {
            return None;
        }
        let t = Hpa(e.addr());
        let first = EptEntry(mem.read_u64(t));
        if !first.present() || first.addr() != base.0 {
            return None;
        }
        // Every leaf: the first one's bits, 4 KiB further on each time.
        if (1..512u64).any(|i| mem.read_u64(Hpa(t.0 + i * 8)) != first.0 + i * PAGE_SIZE) {
            return None;
        }
        mem.write_u64(at, first.with_flags(EptFlags::LARGE, EptFlags::empty()).0);
        Some(t)
    }

    /// The entry for `gpa` at `level` if the walk gets there: where it
    /// lives, the entry, and the level it was found at (higher if a large
    /// leaf or a hole ends the walk early).
    fn lookup_entry(&self, mem: &impl PhysMem, gpa: Gpa, level: u32) -> Option<(Hpa, EptEntry, u32)> {
        let mut table = self.root;
        for l in (level..=4).rev() {
            let at = Hpa(table.0 + index(gpa.0, l) * 8);
            let e = EptEntry(mem.read_u64(at));
            if l == level || !e.present() || e.is_large() {
                return Some((at, e, l));
            }
            table = Hpa(e.addr());
        }
        None
    }

    /// Frees `table`, an entry's table at `level`, and the tables under it.
    pub fn free_subtree(mem: &impl PhysMem, alloc: &mut impl FrameAlloc, table: Hpa, level: u32) {
        if level > 1 {
            for i in 0..512u64 {
                let e = EptEntry(mem.read_u64(Hpa(table.0 + i * 8)));
                if e.present() && !e.is_large() {
                    Self::free_subtree(mem, alloc, Hpa(e.addr()), level - 1);
                }
            }
        }
        alloc.free_frame(table);
    }

    /// Visits every present leaf: `(gpa, entry address, entry, level)`.
    pub fn for_each_leaf(&self, mem: &impl PhysMem, mut f: impl FnMut(Gpa, Hpa, EptEntry, u32)) {
        fn walk(mem: &impl PhysMem, table: Hpa, level: u32, base: u64, f: &mut dyn FnMut(Gpa, Hpa, EptEntry, u32)) {
            for i in 0..512u64 {
                let at = Hpa(table.0 + i * 8);
                let e = EptEntry(mem.read_u64(at));
                if !e.present() {
                    continue;
                }
                let gpa = base + i * level_size(level);
                if level == 1 || e.is_large() {
                    f(Gpa(gpa), at, e, level);
                } else {
                    walk(mem, Hpa(e.addr()), level - 1, gpa, f);
                }
            }
        }
        walk(mem, self.root, 4, 0, &mut f);
    }

    /// Counts leaves by size, and table frames.
    pub fn counts(&self, mem: &impl PhysMem) -> LeafCounts {
        fn walk(mem: &impl PhysMem, table: Hpa, level: u32, c: &mut LeafCounts) {
            c.tables += 1;
            for i in 0..512u64 {
                let e = EptEntry(mem.read_u64(Hpa(table.0 + i * 8)));
                if !e.present() {
                    continue;
                }
                match (level, e.is_large()) {
                    (1, _) => c.small += 1,
                    (2, true) => c.large += 1,
                    (3, true) => c.huge += 1,
                    _ => walk(mem, Hpa(e.addr()), level - 1, c),
                }
            }
        }
        let mut c = LeafCounts::default();
        walk(mem, self.root, 4, &mut c);
        c
    }

    /// Frees every table frame (not the frames the leaves map).
    pub fn free_tables(self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc) {
        Self::free_subtree(mem, alloc, self.root, 4);
    }
}

/// What the host VM's EPT maps.
pub struct HostMap<'a> {
    /// System RAM (write-back); everything else below `top` is mapped
    /// uncacheable (MMIO, firmware).
    pub ram: &'a [MemRange],
    /// Map `[0, top)`; a multiple of 1 GiB.
    pub top: u64,
    /// Pages left out (the hypervisor region, donated frames, the DMAR
    /// register pages).
    pub holes: &'a [PhysRange],
    /// Whether the CPU's EPT supports 1 GiB pages.
    pub huge_pages: bool,
}

impl HostMap<'_> {
    /// The memory type of `[base, base+size)` if uniform.
    fn uniform_type(&self, base: u64, size: u64) -> Option<u64> {
        let end = base + size;
        let mut overlap = false;
        for r in self.ram {
            let (rb, re) = (r.base, r.base + r.size);
            if rb <= base && end <= re {
                return Some(MT_WB);
            }
            if rb < end && re > base {
                overlap = true;
            }
        }
        if overlap {
            None
        } else {
            Some(MT_UC)
        }
    }

    fn has_hole(&self, base: u64, size: u64) -> bool {
        self.holes.iter().any(|h| h.overlaps(base, size))
    }

    fn type_of_page(&self, pa: u64) -> u64 {
        self.uniform_type(pa, PAGE_SIZE).unwrap_or(MT_UC)
    }
}

/// Builds the host VM's identity map.
pub fn build_host_ept(mem: &impl PhysMem, alloc: &mut impl FrameAlloc, map: &HostMap) -> Option<Ept> {
    let mut ept = Ept::new(mem, alloc)?;
    let mut gb = 0;
    while gb < map.top {
        map_chunk(&mut ept, mem, alloc, map, gb, 3)?;
        gb += HUGE_PAGE_SIZE;
    }
    Some(ept)
}

fn map_chunk(ept: &mut Ept, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, map: &HostMap, base: u64, level: u32) -> Option<()> {
    let size = level_size(level);
    let can_leaf = level == 1 || level == 2 || (level == 3 && map.huge_pages);
    if can_leaf && !map.has_hole(base, size) {
        if let Some(mt) = if level == 1 { Some(map.type_of_page(base)) } else { map.uniform_type(base, size) } {
            return ept.set(mem, alloc, Gpa(base), level, EptEntry::leaf(base, EptFlags::RWX, mt, level > 1));
        }
    }
    if level == 1 {
        // A hole: leave it unmapped.
        return Some(());
    }
    let step = level_size(level - 1);
    for i in 0..512 {
        map_chunk(ept, mem, alloc, map, base + i * step, level - 1)?;
    }
    Some(())
}

/// Removes one 4 KiB page from the host map (splitting large pages).
pub fn host_unmap_page(ept: &mut Ept, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, pa: Hpa) -> Option<()> {
    ept.set(mem, alloc, Gpa(pa.0), 1, EptEntry::empty())
}

/// Maps one 4 KiB page back into the host map.
pub fn host_map_page(ept: &mut Ept, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, map: &HostMap, pa: Hpa) -> Option<()> {
    let e = EptEntry::leaf(pa.0, EptFlags::RWX, map.type_of_page(pa.0), false);
    ept.set(mem, alloc, Gpa(pa.0), 1, e)
}

/// The 1 GiB-aligned end of what the host map must cover.
pub fn host_map_top(ram: &[MemRange]) -> u64 {
    let ram_end = ram.iter().map(|r| r.base + r.size).max().unwrap_or(0);
    let top = ram_end.max(4 << 30);
    (top + HUGE_PAGE_SIZE - 1) & !(HUGE_PAGE_SIZE - 1)
}

const _: () = assert!(LARGE_PAGE_SIZE == level_size(2) && HUGE_PAGE_SIZE == level_size(3));

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::mock::{MockFrames, MockMem};

    fn ram() -> Vec<MemRange> {
        // 0-640 KiB, 1 MiB - 3 GiB, 4 GiB - 6 GiB, like a PC.
        vec![
            MemRange { base: 0, size: 0xa_0000 },
            MemRange { base: 0x10_0000, size: (3 << 30) - 0x10_0000 },
            MemRange { base: 4 << 30, size: 2 << 30 },
        ]
    }

    fn hv_region() -> PhysRange {
        PhysRange::new(0x1_0040_0000, 4 << 20)
    }

    fn build(huge: bool) -> (MockMem, MockFrames, Ept, Vec<MemRange>, Vec<PhysRange>) {
        let mem = MockMem::new();
        let mut frames = MockFrames::new(0x7_0000_0000, 4096);
        let ram = ram();
        let holes = vec![hv_region()];
        let map = HostMap { ram: &ram, top: host_map_top(&ram), holes: &holes, huge_pages: huge };
        let ept = build_host_ept(&mem, &mut frames, &map).unwrap();
        (mem, frames, ept, ram, holes)
    }

    #[test]
    fn identity_with_large_pages_and_a_hole() {
        let (mem, _frames, ept, _, _) = build(true);
        // RAM is identity, write-back.
        let (hpa, f) = ept.translate(&mem, Gpa(0x1234_5678)).unwrap();
        assert_eq!(hpa, Hpa(0x1234_5678));
        assert!(f.contains(EptFlags::RWX));
        let (_, e, level) = ept.lookup(&mem, Gpa(0x1234_5678)).unwrap();
        assert_eq!((e.mem_type(), level), (MT_WB, 2));
        // The 1 GiB above 4 GiB that has no hole is one 1 GiB page.
        let (_, e, level) = ept.lookup(&mem, Gpa(0x1_4000_0000)).unwrap();
        assert_eq!((level, e.mem_type()), (3, MT_WB));
        // The hole is not mapped; its neighbours are, in 2 MiB pages.
        assert!(ept.lookup(&mem, Gpa(0x1_0040_0000)).is_none());
        assert!(ept.lookup(&mem, Gpa(0x1_007f_f000)).is_none());
        assert_eq!(ept.lookup(&mem, Gpa(0x1_003f_f000)).unwrap().2, 2);
        assert_eq!(ept.lookup(&mem, Gpa(0x1_0080_0000)).unwrap().2, 2);
        // The PCI hole below 4 GiB is uncacheable and mapped.
        let (_, e, level) = ept.lookup(&mem, Gpa(0xfee0_0000)).unwrap();
        assert_eq!((e.mem_type(), level), (MT_UC, 3));
        // The VGA window is uncacheable in 4 KiB pages; low RAM is WB.
        let (_, e, level) = ept.lookup(&mem, Gpa(0xb_8000)).unwrap();
        assert_eq!((e.mem_type(), level), (MT_UC, 1));
        assert_eq!(ept.lookup(&mem, Gpa(0x9_f000)).unwrap().1.mem_type(), MT_WB);
    }

    #[test]
    fn a_remapping_unit_register_page_is_hidden() {
        // The VT-d registers (QEMU's unit) are a hole in uncacheable MMIO:
        // the host's accesses fault to the hypervisor, its neighbours pass.
        let mem = MockMem::new();
        let mut frames = MockFrames::new(0x7_0000_0000, 4096);
        let ram = ram();
        let holes = [hv_region(), PhysRange::new(0xfed9_0000, 0x1000)];
        let map = HostMap { ram: &ram, top: host_map_top(&ram), holes: &holes, huge_pages: true };
        let ept = build_host_ept(&mem, &mut frames, &map).unwrap();
        assert!(ept.lookup(&mem, Gpa(0xfed9_0000)).is_none());
        assert!(ept.lookup(&mem, Gpa(0xfed9_0ffc)).is_none());
        let (_, e, level) = ept.lookup(&mem, Gpa(0xfed9_1000)).unwrap();
        assert_eq!((level, e.mem_type()), (1, MT_UC));
        let (_, e, level) = ept.lookup(&mem, Gpa(0xfed8_f000)).unwrap();
        assert_eq!((level, e.mem_type()), (1, MT_UC));
        let (_, e, level) = ept.lookup(&mem, Gpa(0xfee0_0000)).unwrap();
        assert_eq!((level, e.mem_type()), (2, MT_UC));
    }

    #[test]
    fn without_huge_pages() {
        let (mem, _f, ept, _, _) = build(false);
        let c = ept.counts(&mem);
        assert_eq!(c.huge, 0);
        assert!(c.large > 3000);
        assert!(ept.lookup(&mem, Gpa(0x1_0040_0000)).is_none());
    }

    #[test]
    fn a_whole_large_page_unmapped_hands_back_its_split_table() {
        let (mem, mut frames, mut ept, ram, holes) = build(true);
        let map = HostMap { ram: &ram, top: host_map_top(&ram), holes: &holes, huge_pages: true };
        let base = Hpa(0x1_5000_0000);
        // Pages given away one by one and back split the 2 MiB leaf.
        host_unmap_page(&mut ept, &mem, &mut frames, base).unwrap();
        host_map_page(&mut ept, &mem, &mut frames, &map, base).unwrap();
        let live = frames.live.len();
        // Then the whole 2 MiB goes at once: its table of small pages is
        // the caller's to free, and nothing leaks.
        let t = ept.unmap(&mem, &mut frames, Gpa(base.0), 2).unwrap().expect("a table was there");
        assert!(ept.lookup(&mem, Gpa(base.0 + 0x5000)).is_none());
        Ept::free_subtree(&mem, &mut frames, t, 1);
        assert_eq!(frames.live.len(), live - 1);
        // Pages given back one by one: once the 2 MiB is whole again, it
        // is one large leaf again and its table is the caller's to free.
        let other = Hpa(0x1_5040_0000);
        host_unmap_page(&mut ept, &mem, &mut frames, other).unwrap();
        assert_eq!(ept.coalesce_identity(&mem, Gpa(other.0)), None, "a page is missing");
        host_map_page(&mut ept, &mem, &mut frames, &map, other).unwrap();
        let live = frames.live.len();
        let t = ept.coalesce_identity(&mem, Gpa(other.0)).expect("whole again");
        Ept::free_subtree(&mem, &mut frames, t, 1);
        assert_eq!(frames.live.len(), live - 1);
        let (_, e, level) = ept.lookup(&mem, Gpa(other.0 + 0x1234)).unwrap();
        assert_eq!((level, e.mem_type(), e.addr()), (2, MT_WB, other.0));
        assert!(e.flags().contains(EptFlags::RWX));
        assert_eq!(ept.coalesce_identity(&mem, Gpa(other.0)), None, "already large");
        // A large leaf unmapped has no table to hand back.
        assert_eq!(ept.unmap(&mem, &mut frames, Gpa(base.0 + (2 << 20)), 2).unwrap(), None);
    }

    #[test]
    fn remove_and_restore_a_page() {
        let (mem, mut frames, mut ept, ram, holes) = build(true);
        let map = HostMap { ram: &ram, top: host_map_top(&ram), holes: &holes, huge_pages: true };
        let before = ept.counts(&mem);
        let pa = Hpa(0x1_5000_3000); // inside a 1 GiB page
        host_unmap_page(&mut ept, &mem, &mut frames, pa).unwrap();
        assert!(ept.lookup(&mem, Gpa(pa.0)).is_none());
        // Neighbours still map identically, now through 2 MiB and 4 KiB leaves.
        assert_eq!(ept.translate(&mem, Gpa(pa.0 + 0x1000)).unwrap().0, Hpa(pa.0 + 0x1000));
        assert_eq!(ept.translate(&mem, Gpa(pa.0 - 0x1000)).unwrap().0, Hpa(pa.0 - 0x1000));
        assert_eq!(ept.translate(&mem, Gpa(0x1_6000_0000)).unwrap().0, Hpa(0x1_6000_0000));
        let after = ept.counts(&mem);
        assert_eq!(after.huge, before.huge - 1);
        assert_eq!(after.large, before.large + 511);
        assert_eq!(after.small, before.small + 511);
        host_map_page(&mut ept, &mem, &mut frames, &map, pa).unwrap();
        let (hpa, f) = ept.translate(&mem, Gpa(pa.0)).unwrap();
        assert_eq!(hpa, pa);
        assert!(f.contains(EptFlags::WRITE));
        assert_eq!(ept.lookup(&mem, Gpa(pa.0)).unwrap().1.mem_type(), MT_WB);
    }

    #[test]
    fn leaves_cover_everything_but_the_holes() {
        let (mem, _f, ept, _, holes) = build(true);
        let mut covered = 0u64;
        ept.for_each_leaf(&mem, |gpa, _, e, level| {
            assert_eq!(e.addr(), gpa.0, "not identity");
            covered += level_size(level);
        });
        assert_eq!(covered, host_map_top(&ram()) - holes[0].size());
    }

    #[test]
    fn tables_are_freed() {
        let (mem, mut frames, ept, _, _) = build(true);
        let used = frames.live.len();
        assert!(used > 0 && used < 64, "a host map should need only a few tables, used {used}");
        ept.free_tables(&mem, &mut frames);
        assert!(frames.live.is_empty());
    }
}
