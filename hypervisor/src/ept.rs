//! EPT tables: the EPT entry format for the radix engine ([`crate::radix`]),
//! [`Ept`] over it, and the host VM's identity map (all memory 1:1 in the
//! largest pages that fit, less the holes).

use crate::addr::{Gpa, Hpa, PhysRange, HUGE_PAGE_SIZE, LARGE_PAGE_SIZE, PAGE_SIZE};
use crate::arch::x86::ept_entry::{EptEntry, EptFlags, ADDR_MASK, MT_UC, MT_WB};
use crate::mem::{FrameAlloc, PhysMem};
use crate::radix::{entry_format, subtree, Plan, Radix, PDPT_AND_PD};
use shared_abi::MemRange;

pub use crate::radix::{level_size, LeafCounts};

// EPT entries for the radix engine. See: SDM Vol. 3C, 29.3.2: an entry is
// present when any of bits 2:0 (R, W, X) is set; bit 7 makes a PDPTE or a
// PDE a leaf; a table entry grants everything so the leaves decide.
entry_format!(EptEntry: present EptFlags::RWX.bits(), address ADDR_MASK,
    large EptFlags::LARGE.bits(), levels PDPT_AND_PD, table EptFlags::RWX.bits());

/// A 4-level EPT hierarchy rooted at `root`.
#[derive(Debug)]
pub struct Ept {
    pub root: Hpa,
}

impl Ept {
    /// The hierarchy as the radix engine walks it.
    fn radix(&self) -> Radix<EptEntry> {
        Radix::at(self.root, 4)
    }

    pub fn new(mem: &impl PhysMem, alloc: &mut impl FrameAlloc) -> Option<Ept> {
        Some(Ept { root: Radix::<EptEntry>::new(mem, alloc, 4)?.root })
    }

    /// The leaf covering `gpa`: where the entry lives, the entry, its level.
    pub fn lookup(&self, mem: &impl PhysMem, gpa: Gpa) -> Option<(Hpa, EptEntry, u32)> {
        self.radix().lookup(mem, gpa.0)
    }

    /// Where `gpa` maps: the host-physical address and the leaf's flags.
    pub fn translate(&self, mem: &impl PhysMem, gpa: Gpa) -> Option<(Hpa, EptFlags)> {
        self.radix().translate(mem, gpa.0).map(|(pa, e)| (pa, e.flags()))
    }

    /// The address of the entry for `gpa` at `level`, creating tables and
    /// splitting larger leaves on the way. Returns `None` when out of frames.
    pub fn entry_at(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, gpa: Gpa, level: u32) -> Option<Hpa> {
        self.radix().entry_at(mem, alloc, gpa.0, level).map(|(at, _)| at)
    }

    /// Writes `entry` as the leaf for `gpa` at `level`.
    pub fn set(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, gpa: Gpa, level: u32, entry: EptEntry) -> Option<()> {
        self.radix().set(mem, alloc, gpa.0, level, entry).map(|_| ())
    }

    /// Clears the entry for `gpa` at `level`. If it pointed to a table,
    /// returns that table: the caller frees it with [`Ept::free_subtree`]
    /// once no CPU can still walk it (after an INVEPT everywhere).
    pub fn unmap(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, gpa: Gpa, level: u32) -> Option<Option<Hpa>> {
        let (old, _) = self.radix().unmap(mem, alloc, gpa.0, level)?;
        Some(subtree(old, level))
    }

    /// If the 2 MiB at `base` maps through a table of 512 identity 4 KiB
    /// leaves with the same permissions and memory type, replaces the table
    /// with one 2 MiB leaf. Returns the table: the caller frees it once no
    /// CPU can still walk it (after an INVEPT everywhere).
    pub fn coalesce_identity(&mut self, mem: &impl PhysMem, base: Gpa) -> Option<Hpa> {
        // The engine checks the block is whole and aligned; identity is
        // the host map's own rule.
        let (_, first, _) = self.radix().walk(mem, base.0, 1);
        if first.addr() != base.0 {
            return None;
        }
        self.radix().coalesce(mem, base.0, 2)
    }

    /// Frees `table`, an entry's table at `level`, and the tables under it.
    pub fn free_subtree(mem: &impl PhysMem, alloc: &mut impl FrameAlloc, table: Hpa, level: u32) {
        Radix::<EptEntry>::free_subtree(mem, alloc, table, level);
    }

    /// Visits every present leaf: `(gpa, entry address, entry, level)`.
    pub fn for_each_leaf(&self, mem: &impl PhysMem, mut f: impl FnMut(Gpa, Hpa, EptEntry, u32)) {
        self.radix().for_each_leaf(mem, |a, at, e, level| f(Gpa(a), at, e, level));
    }

    /// Counts leaves by size, and table frames.
    pub fn counts(&self, mem: &impl PhysMem) -> LeafCounts {
        self.radix().counts(mem)
    }

    /// Frees every table frame (not the frames the leaves map).
    pub fn free_tables(self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc) {
        self.radix().free(mem, alloc);
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

/// Builds the host VM's identity map: the largest leaves that fit, down
/// to 4 KiB around the holes.
pub fn build_host_ept(mem: &impl PhysMem, alloc: &mut impl FrameAlloc, map: &HostMap) -> Option<Ept> {
    let ept = Ept::new(mem, alloc)?;
    ept.radix().fill(mem, alloc, &mut |base, level| {
        let size = level_size(level);
        let can_leaf = level == 1 || level == 2 || (level == 3 && map.huge_pages);
        if base >= map.top {
            return Plan::Skip;
        }
        if can_leaf && !map.has_hole(base, size) {
            if let Some(mt) = if level == 1 { Some(map.type_of_page(base)) } else { map.uniform_type(base, size) } {
                return Plan::Leaf(EptEntry::leaf(base, EptFlags::RWX, mt, level > 1));
            }
        }
        // A 4 KiB hole stays unmapped.
        Plan::Split
    })?;
    Some(ept)
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
    use crate::mem::mock::{pc_ram as ram, MockFrames, MockMem};

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
