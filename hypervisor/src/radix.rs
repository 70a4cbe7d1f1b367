//! One engine for the hypervisor's 4-level radix tables: the EPT, the VT-d
//! second-level tables and the hypervisor's own page tables all index 512
//! 8-byte entries a level by bits 12 + 9 * (level - 1) of the address, and
//! differ only in the bits of an entry. [`Radix`] walks, builds, splits,
//! coalesces, counts and frees such a hierarchy for any entry format that
//! implements [`Entry`], touching memory only through [`PhysMem`] and
//! [`FrameAlloc`] so that `cargo test` runs it over mock memory.
//!
//! Levels are numbered as the SDM numbers the EPT's: 1 = PT (4 KiB leaves),
//! 2 = PD (2 MiB), 3 = PDPT (1 GiB), 4 = PML4. See: SDM Vol. 3A, 4.5
//! (4-level paging), Vol. 3C, 29.3.2 (EPT) and VT-d spec, 3.6 and 9.8.

use crate::addr::Hpa;
use crate::mem::{FrameAlloc, PhysMem};
use core::marker::PhantomData;

/// Entries in one table.
pub const ENTRIES: u64 = 512;

/// Bytes mapped by one entry at `level` (1 = PT, 2 = PD, 3 = PDPT, 4 = PML4).
pub const fn level_size(level: u32) -> u64 {
    1u64 << (12 + 9 * (level - 1))
}

/// The index of `addr`'s entry in its table at `level`.
pub const fn index(addr: u64, level: u32) -> u64 {
    (addr >> (12 + 9 * (level - 1))) & (ENTRIES - 1)
}

/// An entry format: what the engine must know of the bits of an entry.
pub trait Entry: Copy {
    /// The bits that hold the next table's or the page's address.
    const ADDR_MASK: u64;
    /// The bit that makes an entry above level 1 a leaf (PS / "large page").
    const LARGE: u64;
    /// The bits a non-leaf entry gets besides the address: every permission,
    /// so that the leaves alone decide (permissions are ANDed along a walk).
    const TABLE_BITS: u64;
    /// The levels at which [`Entry::LARGE`] makes a leaf, as a mask with bit
    /// `level` set; elsewhere above level 1 an entry always points to a table.
    const LARGE_LEVELS: u32;
    /// The bits of which any one makes the entry present (the hardware walks
    /// through or translates with it).
    const PRESENT: u64;

    fn from_raw(v: u64) -> Self;
    fn raw(self) -> u64;
    fn is_present(self) -> bool {
        self.raw() & Self::PRESENT != 0
    }
}

/// Implements [`Entry`] for a newtype over `u64`: the format's bits by name.
macro_rules! entry_format {
    ($t:ty: present $present:expr, address $addr:expr, large $large:expr, levels $levels:expr, table $table:expr) => {
        impl $crate::radix::Entry for $t {
            const ADDR_MASK: u64 = $addr;
            const LARGE: u64 = $large;
            const TABLE_BITS: u64 = $table;
            const LARGE_LEVELS: u32 = $levels;
            const PRESENT: u64 = $present;
            fn from_raw(v: u64) -> Self {
                Self(v)
            }
            fn raw(self) -> u64 {
                self.0
            }
        }
    };
}
pub(crate) use entry_format;

/// The levels that may hold large leaves in every format here: PDPT (1 GiB)
/// and PD (2 MiB); bit 7 of a PML4 entry is reserved.
pub const PDPT_AND_PD: u32 = (1 << 2) | (1 << 3);

/// The address an entry holds.
pub fn addr_of<E: Entry>(e: E) -> u64 {
    e.raw() & E::ADDR_MASK
}

/// Whether `e`, present at `level`, is a leaf (it maps a page rather than
/// pointing to a table).
pub fn is_leaf<E: Entry>(e: E, level: u32) -> bool {
    level == 1 || (E::LARGE_LEVELS & (1 << level) != 0 && e.raw() & E::LARGE != 0)
}

/// The table under `old`, an entry that sat at `level`, if it pointed to one.
pub fn subtree<E: Entry>(old: E, level: u32) -> Option<Hpa> {
    (old.is_present() && !is_leaf(old, level)).then(|| Hpa(addr_of(old)))
}

/// Leaf counts by page size, and table frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeafCounts {
    pub huge: u64,
    pub large: u64,
    pub small: u64,
    pub tables: u64,
}

/// What [`Radix::fill`] does with one chunk of the address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan<E> {
    /// Leave it as it is (unmapped, if nothing was there).
    Skip,
    /// Map it with this one leaf.
    Leaf(E),
    /// Go down a level and plan each of its 512 parts.
    Split,
}

/// A hierarchy of `levels` levels rooted at `root`: a view, cheap to copy;
/// the frames belong to whoever holds the root.
#[derive(Debug)]
pub struct Radix<E> {
    pub root: Hpa,
    pub levels: u32,
    entry: PhantomData<E>,
}

impl<E> Clone for Radix<E> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<E> Copy for Radix<E> {}

fn read<E: Entry>(mem: &impl PhysMem, at: Hpa) -> E {
    E::from_raw(mem.read_u64(at))
}

fn slot(table: Hpa, i: u64) -> Hpa {
    Hpa(table.0 + i * 8)
}

fn new_table(mem: &impl PhysMem, alloc: &mut impl FrameAlloc) -> Option<Hpa> {
    let t = alloc.alloc_frame()?;
    mem.zero_page(t);
    Some(t)
}

impl<E: Entry> Radix<E> {
    /// The hierarchy at `root` (an existing table).
    pub const fn at(root: Hpa, levels: u32) -> Self {
        Radix { root, levels, entry: PhantomData }
    }

    /// A new, empty hierarchy. `None` when out of frames.
    pub fn new(mem: &impl PhysMem, alloc: &mut impl FrameAlloc, levels: u32) -> Option<Self> {
        Some(Self::at(new_table(mem, alloc)?, levels))
    }

    /// The addresses the hierarchy spans: `[0, span)`.
    pub const fn span(&self) -> u64 {
        1u64 << (12 + 9 * self.levels)
    }

    /// Walks towards `addr`'s entry at `level` and returns where the walk
    /// stopped: the entry's address, the entry, and its level. That is
    /// `level` unless a missing entry or a leaf above it ends the walk.
    pub fn walk(&self, mem: &impl PhysMem, addr: u64, level: u32) -> (Hpa, E, u32) {
        let mut table = self.root;
        let mut l = self.levels;
        loop {
            let at = slot(table, index(addr, l));
            let e = read::<E>(mem, at);
            if l == level || !e.is_present() || is_leaf(e, l) {
                return (at, e, l);
            }
            table = Hpa(addr_of(e));
            l -= 1;
        }
    }

    /// The leaf covering `addr`: where the entry lives, the entry, its level.
    pub fn lookup(&self, mem: &impl PhysMem, addr: u64) -> Option<(Hpa, E, u32)> {
        let (at, e, l) = self.walk(mem, addr, 1);
        e.is_present().then_some((at, e, l))
    }

    /// Where `addr` maps: the page's address plus the offset in it, and the
    /// leaf.
    pub fn translate(&self, mem: &impl PhysMem, addr: u64) -> Option<(Hpa, E)> {
        let (_, e, level) = self.lookup(mem, addr)?;
        Some((Hpa(addr_of(e) + (addr & (level_size(level) - 1))), e))
    }

    /// The address of the entry for `addr` at `level`, creating missing
    /// tables and splitting larger leaves on the way, and whether it split
    /// one. `None` when out of frames (what was made so far stays, empty or
    /// mapping as before).
    pub fn entry_at(&self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, addr: u64, level: u32) -> Option<(Hpa, bool)> {
        let mut table = self.root;
        let mut split = false;
        for l in ((level + 1)..=self.levels).rev() {
            let at = slot(table, index(addr, l));
            let e = read::<E>(mem, at);
            table = if !e.is_present() {
                let t = new_table(mem, alloc)?;
                mem.write_u64(at, addr_of_table::<E>(t));
                t
            } else if is_leaf(e, l) {
                split = true;
                Self::split(mem, alloc, at, e, l)?
            } else {
                Hpa(addr_of(e))
            };
        }
        Some((slot(table, index(addr, level)), split))
    }

    /// Replaces the leaf `e` at `at` (level `level`) with a table of 512
    /// leaves one level down that map the same memory with the same bits,
    /// and returns the table. The table is built fully before it replaces
    /// the leaf in one 8-byte store, so a concurrent walk (a CPU's or a
    /// unit's) sees either the old or the new mapping. The caller
    /// invalidates the old translation (INVEPT, or an IOTLB flush).
    pub fn split(mem: &impl PhysMem, alloc: &mut impl FrameAlloc, at: Hpa, e: E, level: u32) -> Option<Hpa> {
        let t = alloc.alloc_frame()?;
        let step = level_size(level - 1);
        // At level 1 the large bit means something else (or nothing); a
        // 4 KiB leaf goes without it.
        let clear = if level - 1 == 1 { E::LARGE } else { 0 };
        for i in 0..ENTRIES {
            mem.write_u64(slot(t, i), (e.raw() + i * step) & !clear);
        }
        mem.write_u64(at, addr_of_table::<E>(t));
        Some(t)
    }

    /// The inverse of [`Radix::split`]: if `addr`'s entry at `level` points
    /// to a table of 512 leaves that map one aligned, contiguous block with
    /// the same bits, replaces the entry with one large leaf and returns
    /// the table, which the caller frees once no walk can still use it.
    pub fn coalesce(&self, mem: &impl PhysMem, addr: u64, level: u32) -> Option<Hpa> {
        if E::LARGE_LEVELS & (1 << level) == 0 {
            return None;
        }
        let (at, e, l) = self.walk(mem, addr, level);
        if l != level || !e.is_present() || is_leaf(e, level) {
            return None;
        }
        let t = Hpa(addr_of(e));
        let first = read::<E>(mem, t);
        if !first.is_present() || !is_leaf(first, level - 1) || addr_of(first) % level_size(level) != 0 {
            return None;
        }
        let step = level_size(level - 1);
        if (1..ENTRIES).any(|i| mem.read_u64(slot(t, i)) != first.raw() + i * step) {
            return None;
        }
        mem.write_u64(at, first.raw() | E::LARGE);
        Some(t)
    }

    /// Writes `entry` as `addr`'s entry at `level` (a leaf, or empty).
    /// Returns whether a larger leaf was split on the way.
    pub fn set(&self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, addr: u64, level: u32, entry: E) -> Option<bool> {
        let (at, split) = self.entry_at(mem, alloc, addr, level)?;
        mem.write_u64(at, entry.raw());
        Some(split)
    }

    /// Clears `addr`'s entry at `level` (splitting a larger leaf first) and
    /// returns the old entry and whether it split. A table the old entry
    /// pointed to ([`subtree`]) is the caller's to free once no walk can
    /// still use it.
    pub fn unmap(&self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, addr: u64, level: u32) -> Option<(E, bool)> {
        let (at, split) = self.entry_at(mem, alloc, addr, level)?;
        let old = read::<E>(mem, at);
        mem.write_u64(at, 0);
        Some((old, split))
    }

    /// Maps the whole span as `plan` says, chunk by chunk from the top
    /// level down: the largest leaves `plan` allows. `None` when out of
    /// frames.
    pub fn fill(
        &self,
        mem: &impl PhysMem,
        alloc: &mut impl FrameAlloc,
        plan: &mut impl FnMut(u64, u32) -> Plan<E>,
    ) -> Option<()> {
        for i in 0..ENTRIES {
            self.fill_chunk(mem, alloc, i * level_size(self.levels), self.levels, plan)?;
        }
        Some(())
    }

    fn fill_chunk(
        &self,
        mem: &impl PhysMem,
        alloc: &mut impl FrameAlloc,
        base: u64,
        level: u32,
        plan: &mut impl FnMut(u64, u32) -> Plan<E>,
    ) -> Option<()> {
        match plan(base, level) {
            Plan::Skip => Some(()),
            Plan::Leaf(e) => self.set(mem, alloc, base, level, e).map(|_| ()),
            Plan::Split if level == 1 => Some(()),
            Plan::Split => {
                for i in 0..ENTRIES {
                    self.fill_chunk(mem, alloc, base + i * level_size(level - 1), level - 1, plan)?;
                }
                Some(())
            }
        }
    }

    /// Visits every present leaf: `(address, where the entry is, entry, level)`.
    pub fn for_each_leaf(&self, mem: &impl PhysMem, mut f: impl FnMut(u64, Hpa, E, u32)) {
        fn walk<E: Entry>(mem: &impl PhysMem, table: Hpa, level: u32, base: u64, f: &mut dyn FnMut(u64, Hpa, E, u32)) {
            for i in 0..ENTRIES {
                let at = slot(table, i);
                let e = read::<E>(mem, at);
                if !e.is_present() {
                    continue;
                }
                let a = base + i * level_size(level);
                if is_leaf(e, level) {
                    f(a, at, e, level);
                } else {
                    walk(mem, Hpa(addr_of(e)), level - 1, a, f);
                }
            }
        }
        walk(mem, self.root, self.levels, 0, &mut f);
    }

    /// Visits every table frame, the root last: `(table, level)`. Each
    /// table comes after the tables under it, so `f` may free it.
    pub fn for_each_table(&self, mem: &impl PhysMem, mut f: impl FnMut(Hpa, u32)) {
        Self::tables_under(mem, self.root, self.levels, &mut f);
    }

    fn tables_under(mem: &impl PhysMem, table: Hpa, level: u32, f: &mut dyn FnMut(Hpa, u32)) {
        if level > 1 {
            for i in 0..ENTRIES {
                if let Some(t) = subtree(read::<E>(mem, slot(table, i)), level) {
                    Self::tables_under(mem, t, level - 1, f);
                }
            }
        }
        f(table, level);
    }

    /// Leaves by size (levels 3 and up count as huge), and table frames.
    pub fn counts(&self, mem: &impl PhysMem) -> LeafCounts {
        let mut c = LeafCounts::default();
        self.for_each_table(mem, |_, _| c.tables += 1);
        self.for_each_leaf(mem, |_, _, _, level| match level {
            1 => c.small += 1,
            2 => c.large += 1,
            _ => c.huge += 1,
        });
        c
    }

    /// Frees `table`, a table at `level`, and the tables under it (not the
    /// pages the leaves map).
    pub fn free_subtree(mem: &impl PhysMem, alloc: &mut impl FrameAlloc, table: Hpa, level: u32) {
        Self::tables_under(mem, table, level, &mut |t, _| alloc.free_frame(t));
    }

    /// Frees every table frame, the root included.
    pub fn free(self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc) {
        Self::free_subtree(mem, alloc, self.root, self.levels);
    }
}

/// The raw non-leaf entry for the table at `t`.
fn addr_of_table<E: Entry>(t: Hpa) -> u64 {
    (t.0 & E::ADDR_MASK) | E::TABLE_BITS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86::ept_entry::{EptEntry, EptFlags, MT_WB};
    use crate::mem::mock::{MockFrames, MockMem};
    use crate::vtd::entry::{SlEntry, SlFlags};

    const GIB: u64 = level_size(3);
    const MIB2: u64 = level_size(2);

    fn setup() -> (MockMem, MockFrames) {
        (MockMem::new(), MockFrames::new(0x7_0000_0000, 256))
    }

    fn ept_leaf(pa: u64, level: u32) -> EptEntry {
        EptEntry::leaf(pa, EptFlags::RWX, MT_WB, level > 1)
    }

    fn sl_leaf(pa: u64, level: u32) -> SlEntry {
        SlEntry::leaf(pa, SlFlags::RW, level > 1)
    }

    /// The same checks over either format: `leaf(pa, level)` makes a leaf.
    fn set_split_coalesce_free<E: Entry + PartialEq + core::fmt::Debug>(levels: u32, leaf: fn(u64, u32) -> E) {
        let (mem, mut frames) = setup();
        let t = Radix::<E>::new(&mem, &mut frames, levels).unwrap();
        assert!(t.lookup(&mem, 0x1234).is_none());
        // A 1 GiB leaf mapping GiB 5 at GiB 1.
        assert_eq!(t.set(&mem, &mut frames, GIB, 3, leaf(5 * GIB, 3)), Some(false));
        let (pa, e) = t.translate(&mem, GIB + 0x1234_5678).unwrap();
        assert_eq!((pa, e), (Hpa(5 * GIB + 0x1234_5678), leaf(5 * GIB, 3)));
        assert_eq!(t.lookup(&mem, GIB).unwrap().2, 3);
        // Unmapping one page splits twice; the neighbours keep their bits.
        let (old, split) = t.unmap(&mem, &mut frames, GIB + 0x20_3000, 1).unwrap();
        assert!(split && old.is_present());
        assert_eq!(addr_of(old), 5 * GIB + 0x20_3000);
        assert!(t.lookup(&mem, GIB + 0x20_3000).is_none());
        let (at, e, level) = t.lookup(&mem, GIB + 0x20_4000).unwrap();
        assert_eq!((e, level), (leaf(5 * GIB + 0x20_4000, 1), 1));
        assert_eq!(t.lookup(&mem, GIB + 0x40_0000).unwrap(), (t.walk(&mem, GIB + 0x40_0000, 2).0, leaf(5 * GIB + 0x40_0000, 2), 2));
        assert_eq!(t.entry_at(&mem, &mut frames, GIB + 0x20_4000, 1), Some((at, false)));
        let c = t.counts(&mem);
        assert_eq!((c.huge, c.large, c.small), (0, 511, 511));
        // Not whole: no coalescing. Whole again: one 2 MiB leaf, then 1 GiB.
        assert_eq!(t.coalesce(&mem, GIB, 2), None);
        t.set(&mem, &mut frames, GIB + 0x20_3000, 1, leaf(5 * GIB + 0x20_3000, 1)).unwrap();
        let pt = t.coalesce(&mem, GIB + 0x20_0000, 2).expect("whole");
        Radix::<E>::free_subtree(&mem, &mut frames, pt, 1);
        assert_eq!(t.lookup(&mem, GIB + 0x20_3000).unwrap().1, leaf(5 * GIB + 0x20_0000, 2));
        assert_eq!(t.coalesce(&mem, GIB + 0x20_0000, 2), None, "already a leaf");
        let pd = t.coalesce(&mem, GIB, 3).expect("whole");
        Radix::<E>::free_subtree(&mem, &mut frames, pd, 2);
        assert_eq!(t.lookup(&mem, GIB).unwrap(), (t.walk(&mem, GIB, 3).0, leaf(5 * GIB, 3), 3));
        // A block at the wrong alignment is not a large page.
        t.set(&mem, &mut frames, 0, 2, E::from_raw(0)).unwrap();
        let pt = t.entry_at(&mem, &mut frames, 0, 1).unwrap().0.page_base();
        for i in 0..ENTRIES {
            mem.write_u64(slot(pt, i), leaf(0x1000 + i * 0x1000, 1).raw());
        }
        assert_eq!(t.coalesce(&mem, 0, 2), None);
        // Unmapping a table's entry hands back the table.
        let (old, split) = t.unmap(&mem, &mut frames, 0, 2).unwrap();
        assert_eq!((subtree(old, 2), split), (Some(pt), false));
        Radix::<E>::free_subtree(&mem, &mut frames, pt, 1);
        t.free(&mem, &mut frames);
        assert!(frames.live.is_empty());
    }

    #[test]
    fn ept_set_split_coalesce_free() {
        set_split_coalesce_free::<EptEntry>(4, ept_leaf);
    }

    #[test]
    fn sl_set_split_coalesce_free() {
        set_split_coalesce_free::<SlEntry>(4, sl_leaf);
        set_split_coalesce_free::<SlEntry>(3, sl_leaf);
    }

    #[test]
    fn fill_takes_the_largest_leaves_the_plan_allows() {
        // 3 GiB identity, less the 4 KiB page at 2 GiB + 8 KiB; 1 GiB
        // leaves allowed.
        let (mem, mut frames) = setup();
        let t = Radix::<SlEntry>::new(&mem, &mut frames, 3).unwrap();
        let hole = 2 * GIB + 0x2000;
        t.fill(&mem, &mut frames, &mut |base, level| {
            let size = level_size(level);
            if base >= 3 * GIB {
                Plan::Skip
            } else if level <= 3 && !(base..base + size).contains(&hole) {
                Plan::Leaf(sl_leaf(base, level))
            } else {
                Plan::Split
            }
        })
        .unwrap();
        assert_eq!(t.counts(&mem), LeafCounts { huge: 2, large: 511, small: 511, tables: 3 });
        let mut covered = 0;
        t.for_each_leaf(&mem, |a, at, e, level| {
            assert_eq!(addr_of(e), a);
            assert_eq!(mem.read_u64(at), e.raw());
            covered += level_size(level);
        });
        assert_eq!(covered, 3 * GIB - 0x1000);
        assert!(t.lookup(&mem, hole).is_none() && t.lookup(&mem, 3 * GIB).is_none());
        let mut tables = Vec::new();
        t.for_each_table(&mem, |tb, level| tables.push((tb, level)));
        assert_eq!(tables.last(), Some(&(t.root, 3)));
        assert_eq!(tables.iter().map(|x| x.1).collect::<Vec<_>>(), [1, 2, 3]);
        t.free(&mem, &mut frames);
        assert!(frames.live.is_empty());
    }

    #[test]
    fn out_of_frames_leaves_the_mapping_as_it_was() {
        let mem = MockMem::new();
        let mut frames = MockFrames::new(0x7_0000_0000, 3);
        let t = Radix::<EptEntry>::new(&mem, &mut frames, 4).unwrap();
        t.set(&mem, &mut frames, 0, 3, ept_leaf(0, 3)).unwrap();
        // Two frames used; a split to 4 KiB needs two more.
        assert_eq!(t.set(&mem, &mut frames, 0x5000, 1, EptEntry::empty()), None);
        assert_eq!(t.translate(&mem, 0x5000).unwrap().0, Hpa(0x5000));
        t.free(&mem, &mut frames);
        assert!(frames.live.is_empty());
    }

    #[test]
    fn large_bits_count_only_where_the_format_allows_them() {
        // Bit 7 in a PML4 entry does not make a leaf: the walk goes on.
        let (mem, mut frames) = setup();
        let t = Radix::<EptEntry>::new(&mem, &mut frames, 4).unwrap();
        t.set(&mem, &mut frames, MIB2, 2, ept_leaf(MIB2, 2)).unwrap();
        let pml4e = EptEntry(mem.read_u64(t.root));
        assert!(!is_leaf(pml4e.with_flags(EptFlags::LARGE, EptFlags::empty()), 4));
        assert!(is_leaf(ept_leaf(0, 3), 3) && is_leaf(EptEntry::empty(), 1));
        assert_eq!(t.walk(&mem, MIB2 + 0x1000, 1).2, 2);
        t.free(&mem, &mut frames);
        assert!(frames.live.is_empty());
    }
}
