//! The DMA remapping tables: a root table, one context table, and one
//! second-level hierarchy that maps host memory 1:1 for every device.
//!
//! Every device gets the same context entry (domain [`HOST_DOMAIN`], the
//! same second-level tables), so one context table serves every bus and one
//! root table every unit and segment: three frames plus the second-level
//! tables in all. Giving one device its own domain later means giving its
//! bus a copy of the context table first.
//!
//! The second-level tables map `[0, top)` (top as for the host EPT: all RAM,
//! at least 4 GiB, in whole GiB) plus every RMRR, less the holes, in 4 KiB
//! granularity, with 1 GiB and 2 MiB leaves wherever no hole falls and every
//! unit supports them. See: VT-d spec, 3.6 (second-level translation) and
//! 9.8 (second-level paging entries).

use super::entry::{ContextEntry, Levels, RootEntry, SlEntry, SlFlags, TranslationType};
use super::regs::Cap;
use super::{Error, Iova, Result, HOST_DOMAIN};
use crate::addr::{Hpa, PhysRange, PAGE_SIZE};
use crate::ept::host_map_top;
use crate::mem::{FrameAlloc, PhysMem};
use crate::radix::{level_size, LeafCounts, Plan, Radix};
use alloc::vec::Vec;
use core::cell::RefCell;
use shared_abi::MemRange;

/// What the second-level tables may use: the intersection of what every
/// unit supports, since all units share them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableConfig {
    pub levels: Levels,
    /// The widest address the tables may map: the table depth's width,
    /// clipped to every unit's MGAW.
    pub address_bits: u32,
    /// 2 MiB / 1 GiB leaves (CAP.SLLPS).
    pub pages_2m: bool,
    pub pages_1g: bool,
}

impl TableConfig {
    /// The configuration every unit supports: 4-level (48-bit) tables if
    /// all units walk them, else 3-level (39-bit); large pages only if all
    /// units take them.
    pub fn common(caps: impl IntoIterator<Item = Cap>) -> Result<TableConfig> {
        let mut sagaw = 0x1f;
        let mut mgaw = 64;
        let (mut p2m, mut p1g) = (true, true);
        let mut any = false;
        for c in caps {
            any = true;
            sagaw &= c.sagaw();
            mgaw = mgaw.min(c.mgaw_bits());
            p2m &= c.pages_2m();
            p1g &= c.pages_1g();
        }
        if !any {
            return Err(Error::NoUnits);
        }
        let levels = if sagaw & Levels::Four.sagaw_bit() != 0 {
            Levels::Four
        } else if sagaw & Levels::Three.sagaw_bit() != 0 {
            Levels::Three
        } else {
            return Err(Error::Unsupported("no common 3- or 4-level second-level table (CAP.SAGAW)"));
        };
        // 1 GiB leaves without 2 MiB ones do not occur; keep them paired so
        // the builder's "largest leaf that fits" walk stays simple.
        Ok(TableConfig { levels, address_bits: levels.address_bits().min(mgaw), pages_2m: p2m, pages_1g: p1g && p2m })
    }

    /// Whether a leaf may sit at `level` (1 = 4 KiB, 2 = 2 MiB, 3 = 1 GiB).
    const fn leaf_ok(&self, level: u32) -> bool {
        match level {
            1 => true,
            2 => self.pages_2m,
            3 => self.pages_1g,
            _ => false,
        }
    }
}

/// What the DMA map covers.
pub struct DmaMap<'a> {
    /// System RAM; the map covers `[0, host_map_top(ram))`, MMIO below it
    /// included, so that peer-to-peer DMA keeps working.
    pub ram: &'a [MemRange],
    /// Left out in 4 KiB granularity: the hypervisor region, donated pages,
    /// the remapping units' register pages.
    pub holes: &'a [PhysRange],
    /// RMRRs from the DMAR: mapped 1:1 read-write even beyond the top.
    pub rmrrs: &'a [PhysRange],
}

impl DmaMap<'_> {
    fn top(&self) -> u64 {
        host_map_top(self.ram)
    }
    fn has_hole(&self, base: u64, size: u64) -> bool {
        self.holes.iter().any(|h| h.overlaps(base, size))
    }
    /// Whether all of `[base, base+size)` is to be mapped (holes aside).
    fn fully_covered(&self, base: u64, size: u64, top: u64) -> bool {
        base + size <= top || self.rmrrs.iter().any(|r| r.base.0 <= base && base + size <= r.end.0)
    }
    /// Whether any of `[base, base+size)` is to be mapped (holes aside).
    fn partly_covered(&self, base: u64, size: u64, top: u64) -> bool {
        base < top || self.rmrrs.iter().any(|r| r.overlaps(base, size))
    }
}

/// What [`DmaTables::unmap_page`] did, which decides how much the units
/// must invalidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unmapped {
    /// The page was mapped (else nothing changed).
    pub was_mapped: bool,
    /// A large leaf was split on the way: the IOTLB may hold the old large
    /// translation, so a domain-wide invalidation is due, not a page one.
    pub split: bool,
}

/// The root table, the shared context table and the second-level tables.
#[derive(Debug)]
pub struct DmaTables {
    pub root: Hpa,
    pub context: Hpa,
    /// The top of the second-level hierarchy (the context entries' SLPTPTR).
    pub slpt: Hpa,
    pub config: TableConfig,
    /// The end of the RAM-and-MMIO part of the map.
    pub top: u64,
    rmrrs: Vec<PhysRange>,
    /// Table pages written since the last [`DmaTables::take_dirty`], for
    /// units whose walks do not snoop the CPU caches.
    dirty: Vec<Hpa>,
}

impl DmaTables {
    /// Builds the tables. Fails cleanly (freeing what it took) when out of
    /// frames or when the map reaches beyond the tables' address width.
    pub fn build(mem: &impl PhysMem, alloc: &mut impl FrameAlloc, config: TableConfig, map: &DmaMap) -> Result<DmaTables> {
        let top = map.top();
        let limit = 1u64 << config.address_bits;
        if top > limit {
            return Err(Error::AddressWidth { end: top, bits: config.address_bits });
        }
        for r in map.rmrrs {
            if r.end.0 > limit {
                return Err(Error::AddressWidth { end: r.end.0, bits: config.address_bits });
            }
            // Firmware-reserved memory never lies in the hypervisor region
            // or in donated RAM; if it does, the platform cannot be
            // protected and mapping it would expose our memory.
            if map.has_hole(r.base.0, r.size()) {
                return Err(Error::RmrrInHole { base: r.base });
            }
        }
        let mut t =
            DmaTables { root: Hpa(0), context: Hpa(0), slpt: Hpa(0), config, top, rmrrs: map.rmrrs.to_vec(), dirty: Vec::new() };
        if let Err(e) = t.build_inner(mem, alloc, map) {
            t.free(mem, alloc);
            return Err(e);
        }
        Ok(t)
    }

    fn build_inner(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, map: &DmaMap) -> Result<()> {
        let (config, top) = (self.config, self.top);
        let mem = &Noting::new(mem, &mut self.dirty);
        self.slpt = Radix::<SlEntry>::new(mem, alloc, config.levels.count()).ok_or(Error::NoFrames)?.root;
        let plan = &mut |base: u64, level: u32| {
            let size = level_size(level);
            if !map.partly_covered(base, size, top) {
                Plan::Skip
            } else if config.leaf_ok(level) && !map.has_hole(base, size) && map.fully_covered(base, size, top) {
                Plan::Leaf(SlEntry::leaf(base, SlFlags::RW, level > 1))
            } else {
                // Down to 4 KiB; a hole page stays out.
                Plan::Split
            }
        };
        Radix::at(self.slpt, config.levels.count()).fill(mem, alloc, plan).ok_or(Error::NoFrames)?;
        self.context = alloc.alloc_frame().ok_or(Error::NoFrames)?;
        let ce = ContextEntry::new(self.slpt.0, self.config.levels, HOST_DOMAIN, TranslationType::Untranslated);
        for devfn in 0..256u64 {
            mem.write_u64(Hpa(self.context.0 + devfn * 16), ce.lo);
            mem.write_u64(Hpa(self.context.0 + devfn * 16 + 8), ce.hi);
        }
        self.root = alloc.alloc_frame().ok_or(Error::NoFrames)?;
        let re = RootEntry::new(self.context.0);
        for bus in 0..256u64 {
            mem.write_u64(Hpa(self.root.0 + bus * 16), re.lo);
            mem.write_u64(Hpa(self.root.0 + bus * 16 + 8), re.hi);
        }
        Ok(())
    }

    /// The second-level hierarchy as the radix engine walks it.
    fn radix(&self) -> Radix<SlEntry> {
        Radix::at(self.slpt, self.config.levels.count())
    }

    /// Writes `entry` as `addr`'s entry at `level`, making missing tables
    /// and splitting larger leaves on the way; says whether it split. Every
    /// table page it writes is noted for [`DmaTables::take_dirty`].
    fn set(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, addr: u64, level: u32, entry: SlEntry) -> Result<bool> {
        let radix = self.radix();
        radix.set(&Noting::new(mem, &mut self.dirty), alloc, addr, level, entry).ok_or(Error::NoFrames)
    }

    /// The leaf covering `iova`: where the entry lives, the entry, its level.
    pub fn lookup(&self, mem: &impl PhysMem, iova: Iova) -> Option<(Hpa, SlEntry, u32)> {
        self.reaches(iova).then(|| self.radix().lookup(mem, iova.0))?
    }

    /// Whether `iova` lies within the tables' span (the walk indexes only
    /// the bits below it).
    fn reaches(&self, iova: Iova) -> bool {
        iova.0 >> self.config.levels.address_bits() == 0
    }

    /// Where a device's DMA to `iova` lands, and whether it may write.
    /// Walks the tables as the unit would, from the root entry of bus 0.
    pub fn translate(&self, mem: &impl PhysMem, iova: Iova) -> Option<(Hpa, bool)> {
        let (pa, e) = self.reaches(iova).then(|| self.radix().translate(mem, iova.0))??;
        Some((pa, e.writable()))
    }

    /// The context entry a device gets (what the unit reads for it).
    pub fn context_entry(&self, mem: &impl PhysMem, bus: u8, devfn: u8) -> ContextEntry {
        let root = Hpa(self.root.0 + bus as u64 * 16);
        let re = RootEntry { lo: mem.read_u64(root), hi: mem.read_u64(Hpa(root.0 + 8)) };
        if !re.present() {
            return ContextEntry::default();
        }
        let at = Hpa(re.context_table() + devfn as u64 * 16);
        ContextEntry { lo: mem.read_u64(at), hi: mem.read_u64(Hpa(at.0 + 8)) }
    }

    /// Takes one 4 KiB page out of the device-visible map, splitting large
    /// leaves as needed. The caller must then invalidate every enabled unit
    /// before it hands the page to anyone else.
    pub fn unmap_page(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, pa: Hpa) -> Result<Unmapped> {
        self.check_page(pa)?;
        let not_mapped = Unmapped { was_mapped: false, split: false };
        if self.lookup(mem, Iova(pa.0)).is_none() {
            return Ok(not_mapped);
        }
        let split = self.set(mem, alloc, pa.0, 1, SlEntry::empty())?;
        Ok(Unmapped { was_mapped: true, split })
    }

    /// Puts one 4 KiB page back into the map, read-write. Pages beyond the
    /// map's top (other than RMRR pages) were never mapped and stay out.
    pub fn map_page(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, pa: Hpa) -> Result<()> {
        self.check_page(pa)?;
        if pa.0 >= self.top && !self.rmrrs.iter().any(|r| r.contains(pa)) {
            return Err(Error::OutOfRange { addr: pa.0 });
        }
        self.set(mem, alloc, pa.0, 1, SlEntry::leaf(pa.0, SlFlags::RW, false))?;
        Ok(())
    }

    fn check_page(&self, pa: Hpa) -> Result<()> {
        if !pa.is_page_aligned() || pa.0 >> self.config.address_bits != 0 {
            return Err(Error::OutOfRange { addr: pa.0 });
        }
        if self.rmrrs.iter().any(|r| r.contains(pa)) {
            // Firmware's devices rely on these; they are never donated.
            return Err(Error::RmrrPage { addr: pa.0 });
        }
        Ok(())
    }

    /// Checks a range as [`DmaTables::check_page`] checks a page: 4 KiB
    /// aligned, not empty, inside the tables' width, clear of every RMRR.
    pub fn check_range(&self, range: PhysRange) -> Result<()> {
        let (base, end) = (range.base.0, range.end.0);
        if !range.base.is_page_aligned() || !range.end.is_page_aligned() || end <= base {
            return Err(Error::OutOfRange { addr: base });
        }
        if end > 1u64 << self.config.address_bits {
            return Err(Error::OutOfRange { addr: end });
        }
        if let Some(r) = self.rmrrs.iter().find(|r| r.overlaps(base, end - base)) {
            return Err(Error::RmrrPage { addr: r.base.0.max(base) });
        }
        Ok(())
    }

    /// The entry that decides `addr` at `level` or above: the walk stops at
    /// a large leaf or at `level`, and gives `None` at a missing entry.
    /// Returns the entry and the level it sits at.
    fn probe(&self, mem: &impl PhysMem, addr: u64, level: u32) -> Option<(SlEntry, u32)> {
        let (_, e, l) = self.radix().walk(mem, addr, level);
        e.present().then_some((e, l))
    }

    /// Takes a range out of the device-visible map, as donation does. A
    /// whole 2 MiB block that a large leaf maps goes by clearing one entry
    /// at the 2 MiB level (a 1 GiB leaf is split first: one table), so a
    /// donation of 2 MiB blocks costs no 4 KiB tables; the rest goes page by
    /// page. The range is checked before anything changes. The caller must
    /// invalidate every enabled unit before the pages change hands.
    pub fn unmap_range(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, range: PhysRange) -> Result<Unmapped> {
        self.check_range(range)?;
        let block = level_size(2);
        let mut out = Unmapped { was_mapped: false, split: false };
        let mut a = range.base.0;
        while a < range.end.0 {
            if a.is_multiple_of(block) && a + block <= range.end.0 {
                match self.probe(mem, a, 2) {
                    None => {}
                    Some((e, l)) if l > 2 || e.is_large() => {
                        out.split |= self.set(mem, alloc, a, 2, SlEntry::empty())?;
                        out.was_mapped = true;
                    }
                    Some(_) => {
                        // Already split into 4 KiB leaves: clear them; the
                        // table stays, for the pages to come back to.
                        for p in (a..a + block).step_by(PAGE_SIZE as usize) {
                            let u = self.unmap_page(mem, alloc, Hpa(p))?;
                            out.was_mapped |= u.was_mapped;
                            out.split |= u.split;
                        }
                    }
                }
                a += block;
            } else {
                let u = self.unmap_page(mem, alloc, Hpa(a))?;
                out.was_mapped |= u.was_mapped;
                out.split |= u.split;
                a += PAGE_SIZE;
            }
        }
        Ok(out)
    }

    /// Puts a range back into the map, read-write, as a return of donated
    /// pages does: a whole 2 MiB block whose entry is empty gets one 2 MiB
    /// leaf again (where every unit takes them), the rest 4 KiB leaves. The
    /// range must lie below the map's top.
    pub fn map_range(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, range: PhysRange) -> Result<()> {
        self.check_range(range)?;
        if range.end.0 > self.top {
            return Err(Error::OutOfRange { addr: range.base.0.max(self.top) });
        }
        let block = level_size(2);
        let mut a = range.base.0;
        while a < range.end.0 {
            if self.config.pages_2m && a.is_multiple_of(block) && a + block <= range.end.0 {
                match self.probe(mem, a, 2) {
                    Some((e, l)) if l > 2 || e.is_large() => {}
                    Some(_) => {
                        for p in (a..a + block).step_by(PAGE_SIZE as usize) {
                            self.map_page(mem, alloc, Hpa(p))?;
                        }
                    }
                    None => {
                        self.set(mem, alloc, a, 2, SlEntry::leaf(a, SlFlags::RW, true))?;
                    }
                }
                a += block;
            } else {
                self.map_page(mem, alloc, Hpa(a))?;
                a += PAGE_SIZE;
            }
        }
        Ok(())
    }

    /// Every table page written since the last call, sorted, once each: the
    /// pages to flush for a unit without coherent page walks (ECAP.C = 0).
    pub fn take_dirty(&mut self) -> Vec<Hpa> {
        let mut d = core::mem::take(&mut self.dirty);
        d.sort_unstable();
        d.dedup();
        d
    }

    /// Visits every present leaf: `(iova, entry, level)`.
    pub fn for_each_leaf(&self, mem: &impl PhysMem, mut f: impl FnMut(Iova, SlEntry, u32)) {
        self.radix().for_each_leaf(mem, |a, _, e, level| f(Iova(a), e, level));
    }

    /// Leaves by size, and second-level table frames.
    pub fn counts(&self, mem: &impl PhysMem) -> LeafCounts {
        self.radix().counts(mem)
    }

    /// Frees every table frame: the second-level tables, the context table
    /// and the root table. Only once no unit uses them.
    pub fn free(self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc) {
        if self.slpt.0 != 0 {
            self.radix().free(mem, alloc);
        }
        for t in [self.context, self.root].into_iter().filter(|t| t.0 != 0) {
            alloc.free_frame(t);
        }
    }
}

/// Memory that notes every page written through it: the table pages a unit
/// without coherent page walks (ECAP.C = 0) must have flushed from the CPU
/// caches before it reads them. See: VT-d spec, 6.1 (caching and
/// coherency). A write is noted by the page it starts in; tables are
/// written an entry or a page at a time.
struct Noting<'a, M> {
    mem: &'a M,
    dirty: RefCell<&'a mut Vec<Hpa>>,
}

impl<'a, M: PhysMem> Noting<'a, M> {
    fn new(mem: &'a M, dirty: &'a mut Vec<Hpa>) -> Self {
        Noting { mem, dirty: RefCell::new(dirty) }
    }

    fn note(&self, pa: Hpa) {
        let page = pa.page_base();
        let mut d = self.dirty.borrow_mut();
        // Runs of writes to one table (a split, a fill) are noted once;
        // take_dirty removes the other repeats.
        if d.last() != Some(&page) {
            d.push(page);
        }
    }
}

impl<M: PhysMem> PhysMem for Noting<'_, M> {
    fn read(&self, pa: Hpa, buf: &mut [u8]) {
        self.mem.read(pa, buf)
    }
    fn write(&self, pa: Hpa, buf: &[u8]) {
        self.note(pa);
        self.mem.write(pa, buf)
    }
    fn read_u64(&self, pa: Hpa) -> u64 {
        self.mem.read_u64(pa)
    }
    fn write_u64(&self, pa: Hpa, v: u64) {
        // The inner memory's own 8-byte store: an entry changes in one
        // write, as a concurrent walk by a unit requires.
        self.note(pa);
        self.mem.write_u64(pa, v)
    }
    fn zero_page(&self, pa: Hpa) {
        self.note(pa);
        self.mem.zero_page(pa)
    }
}

const _: () = assert!(PAGE_SIZE == level_size(1));

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{HUGE_PAGE_SIZE, LARGE_PAGE_SIZE};
    use crate::mem::mock::{pc_ram as ram, MockFrames, MockMem};

    const HV: PhysRange = PhysRange::new(0x1_0040_0000, 4 << 20);

    fn cfg(levels: Levels, large: bool) -> TableConfig {
        TableConfig { levels, address_bits: levels.address_bits(), pages_2m: large, pages_1g: large }
    }

    fn build_with(config: TableConfig, holes: &[PhysRange], rmrrs: &[PhysRange]) -> (MockMem, MockFrames, DmaTables) {
        let mem = MockMem::new();
        let mut frames = MockFrames::new(0x7_0000_0000, 1 << 14);
        let ram = ram();
        let t = DmaTables::build(&mem, &mut frames, config, &DmaMap { ram: &ram, holes, rmrrs }).unwrap();
        (mem, frames, t)
    }

    fn level_of(t: &DmaTables, mem: &MockMem, a: u64) -> Option<u32> {
        t.lookup(mem, Iova(a)).map(|l| l.2)
    }

    #[test]
    fn common_config() {
        let q = Cap((2 << 8) | (38 << 16) | (3 << 34));
        let c = TableConfig::common([q]).unwrap();
        assert_eq!(c, TableConfig { levels: Levels::Three, address_bits: 39, pages_2m: true, pages_1g: true });
        let big = Cap((6 << 8) | (47 << 16) | (1 << 34));
        let c = TableConfig::common([big]).unwrap();
        assert_eq!(c, TableConfig { levels: Levels::Four, address_bits: 48, pages_2m: true, pages_1g: false });
        // Mixed units: 3-level, only 2 MiB pages.
        let c = TableConfig::common([q, big]).unwrap();
        assert_eq!((c.levels, c.pages_2m, c.pages_1g), (Levels::Three, true, false));
        // MGAW narrower than the tables clips the width.
        let narrow = Cap((4 << 8) | (35 << 16));
        assert_eq!(TableConfig::common([narrow]).unwrap().address_bits, 36);
        // 5-level only, or nothing in common.
        assert!(matches!(TableConfig::common([Cap(8 << 8)]), Err(Error::Unsupported(_))));
        assert!(matches!(TableConfig::common([Cap(2 << 8), Cap(4 << 8)]), Err(Error::Unsupported(_))));
        assert_eq!(TableConfig::common([]), Err(Error::NoUnits));
    }

    #[test]
    fn identity_with_large_pages_and_a_hole() {
        for levels in [Levels::Three, Levels::Four] {
            let (mem, _f, t) = build_with(cfg(levels, true), &[HV], &[]);
            assert_eq!(t.top, 6 << 30);
            assert_eq!(t.translate(&mem, Iova(0x1234_5678)), Some((Hpa(0x1234_5678), true)));
            // The 1 GiB above 4 GiB that has no hole is one 1 GiB leaf; the
            // MMIO gap below 4 GiB is mapped too.
            assert_eq!(level_of(&t, &mem, 0x1_4000_0000), Some(3));
            assert_eq!(level_of(&t, &mem, 0xfee0_0000), Some(3));
            // The hole is out; its neighbours are in, in 2 MiB leaves.
            assert_eq!(t.translate(&mem, Iova(HV.base.0)), None);
            assert_eq!(t.translate(&mem, Iova(HV.end.0 - 1)), None);
            assert_eq!(level_of(&t, &mem, HV.base.0 - 0x1000), Some(2));
            assert_eq!(level_of(&t, &mem, HV.end.0), Some(2));
            // Nothing at or above the top.
            assert_eq!(t.translate(&mem, Iova(6 << 30)), None);
            assert_eq!(t.translate(&mem, Iova(u64::MAX)), None);
        }
    }

    #[test]
    fn hole_in_4k_granularity() {
        let holes = [PhysRange::new(0x20_3000, 0x1000), PhysRange::new(0x20_5000, 0x2000)];
        let (mem, _f, t) = build_with(cfg(Levels::Four, true), &holes, &[]);
        for (a, mapped) in
            [(0x20_2000, true), (0x20_3000, false), (0x20_4000, true), (0x20_5000, false), (0x20_6fff, false), (0x20_7000, true)]
        {
            assert_eq!(t.translate(&mem, Iova(a)).is_some(), mapped, "{a:#x}");
            if mapped {
                assert_eq!(level_of(&t, &mem, a), Some(1));
            }
        }
        assert_eq!(level_of(&t, &mem, 0x40_0000), Some(2));
    }

    #[test]
    fn without_large_pages() {
        let (mem, frames, t) = build_with(cfg(Levels::Three, false), &[HV], &[]);
        let c = t.counts(&mem);
        assert_eq!((c.huge, c.large), (0, 0));
        assert_eq!(c.small, ((6u64 << 30) - HV.size()) / PAGE_SIZE);
        assert_eq!(c.tables as usize + 2, frames.live.len());
        assert_eq!(t.translate(&mem, Iova(0x1_5000_1000)), Some((Hpa(0x1_5000_1000), true)));
    }

    #[test]
    fn only_2m_pages() {
        let config = TableConfig { pages_1g: false, ..cfg(Levels::Four, true) };
        let (mem, _f, t) = build_with(config, &[HV], &[]);
        let c = t.counts(&mem);
        assert_eq!(c.huge, 0);
        assert_eq!(c.large, ((6u64 << 30) - HV.size()) / LARGE_PAGE_SIZE);
    }

    #[test]
    fn leaves_cover_everything_but_the_holes() {
        let holes = [HV, PhysRange::new(0x8000_1000, 0x3000)];
        let (mem, _f, t) = build_with(cfg(Levels::Four, true), &holes, &[]);
        let mut covered = 0;
        t.for_each_leaf(&mem, |iova, e, level| {
            assert_eq!(e.addr(), iova.0, "not identity");
            assert!(e.writable());
            assert!(!holes.iter().any(|h| h.overlaps(iova.0, level_size(level))));
            covered += level_size(level);
        });
        assert_eq!(covered, (6u64 << 30) - HV.size() - 0x3000);
    }

    #[test]
    fn rmrrs_are_mapped_even_above_the_top() {
        // One RMRR below 4 GiB (already in the map) and one far above the top.
        let rmrrs = [PhysRange::new(0x7b80_0000, 0x80_0000), PhysRange::new(0x20_0000_3000, 0x2000)];
        let (mem, _f, t) = build_with(cfg(Levels::Four, true), &[HV], &rmrrs);
        assert_eq!(t.translate(&mem, Iova(0x7b80_0000)), Some((Hpa(0x7b80_0000), true)));
        assert_eq!(t.translate(&mem, Iova(0x20_0000_3000)), Some((Hpa(0x20_0000_3000), true)));
        assert_eq!(t.translate(&mem, Iova(0x20_0000_4fff)), Some((Hpa(0x20_0000_4fff), true)));
        assert_eq!(t.translate(&mem, Iova(0x20_0000_2000)), None);
        assert_eq!(t.translate(&mem, Iova(0x20_0000_5000)), None);
        assert_eq!(level_of(&t, &mem, 0x20_0000_3000), Some(1));
    }

    #[test]
    fn rmrr_in_a_hole_is_refused() {
        let mem = MockMem::new();
        let mut frames = MockFrames::new(0x7_0000_0000, 1 << 12);
        let ram = ram();
        let rmrrs = [PhysRange::new(HV.base.0 + 0x1000, 0x1000)];
        let r = DmaTables::build(&mem, &mut frames, cfg(Levels::Four, true), &DmaMap { ram: &ram, holes: &[HV], rmrrs: &rmrrs });
        assert_eq!(r.unwrap_err(), Error::RmrrInHole { base: Hpa(HV.base.0 + 0x1000) });
        assert!(frames.live.is_empty());
    }

    #[test]
    fn address_width_limits() {
        let mem = MockMem::new();
        let mut frames = MockFrames::new(0x7_0000_0000, 1 << 12);
        // 1 TiB of RAM does not fit 39-bit tables.
        let big = [MemRange { base: 0, size: 1 << 40 }];
        let r = DmaTables::build(&mem, &mut frames, cfg(Levels::Three, true), &DmaMap { ram: &big, holes: &[], rmrrs: &[] });
        assert_eq!(r.unwrap_err(), Error::AddressWidth { end: 1 << 40, bits: 39 });
        let ram = ram();
        let rmrrs = [PhysRange::new(1 << 39, 0x1000)];
        let r = DmaTables::build(&mem, &mut frames, cfg(Levels::Three, true), &DmaMap { ram: &ram, holes: &[], rmrrs: &rmrrs });
        assert_eq!(r.unwrap_err(), Error::AddressWidth { end: (1 << 39) + 0x1000, bits: 39 });
        assert!(frames.live.is_empty());
    }

    #[test]
    fn out_of_frames_frees_everything() {
        // The whole build takes five frames: the top table, a PDPT, a PD for
        // the GiB with the hole, the context table and the root table.
        for n in 0..5 {
            let mem = MockMem::new();
            let mut frames = MockFrames::new(0x7_0000_0000, n);
            let ram = ram();
            let r = DmaTables::build(&mem, &mut frames, cfg(Levels::Four, true), &DmaMap { ram: &ram, holes: &[HV], rmrrs: &[] });
            assert_eq!(r.unwrap_err(), Error::NoFrames);
            assert!(frames.live.is_empty(), "leaked with {n} frames");
        }
    }

    #[test]
    fn every_device_gets_the_host_domain() {
        let (mem, _f, t) = build_with(cfg(Levels::Three, true), &[], &[]);
        for (bus, devfn) in [(0u8, 0u8), (0, 0x18), (0xff, 0xff), (3, 0x81)] {
            let c = t.context_entry(&mem, bus, devfn);
            assert!(c.present());
            assert_eq!((c.slptptr(), c.domain(), c.aw(), c.translation_type()), (t.slpt.0, HOST_DOMAIN, 1, 0));
        }
        let (mem, _f, t) = build_with(cfg(Levels::Four, true), &[], &[]);
        assert_eq!(t.context_entry(&mem, 7, 7).aw(), 2);
    }

    #[test]
    fn remove_and_restore_pages() {
        let (mem, mut frames, mut t) = build_with(cfg(Levels::Four, true), &[HV], &[]);
        let before = t.counts(&mem);
        let pa = Hpa(0x1_5000_3000); // inside a 1 GiB leaf
        assert_eq!(t.unmap_page(&mem, &mut frames, pa).unwrap(), Unmapped { was_mapped: true, split: true });
        assert_eq!(t.translate(&mem, Iova(pa.0)), None);
        assert_eq!(t.translate(&mem, Iova(pa.0 + 0x1000)), Some((Hpa(pa.0 + 0x1000), true)));
        assert_eq!(t.translate(&mem, Iova(pa.0 - 1)), Some((Hpa(pa.0 - 1), true)));
        assert_eq!(level_of(&t, &mem, 0x1_6000_0000), Some(2));
        let after = t.counts(&mem);
        assert_eq!((after.huge, after.large, after.small), (before.huge - 1, before.large + 511, before.small + 511));
        // Its neighbour needs no split now; the same page again is a no-op.
        assert_eq!(t.unmap_page(&mem, &mut frames, Hpa(pa.0 + 0x1000)).unwrap(), Unmapped { was_mapped: true, split: false });
        assert_eq!(t.unmap_page(&mem, &mut frames, pa).unwrap(), Unmapped { was_mapped: false, split: false });
        // A page in a hole was never mapped, and no table is made for it.
        let live = frames.live.len();
        assert!(!t.unmap_page(&mem, &mut frames, Hpa(HV.base.0 + 0x5000)).unwrap().was_mapped);
        assert_eq!(frames.live.len(), live);
        // Put back.
        t.map_page(&mem, &mut frames, pa).unwrap();
        t.map_page(&mem, &mut frames, Hpa(pa.0 + 0x1000)).unwrap();
        assert_eq!(t.translate(&mem, Iova(pa.0 + 0x123)), Some((Hpa(pa.0 + 0x123), true)));
        assert_eq!(t.translate(&mem, Iova(pa.0 + 0x1123)), Some((Hpa(pa.0 + 0x1123), true)));
        // Bad addresses.
        assert_eq!(t.unmap_page(&mem, &mut frames, Hpa(0x1001)), Err(Error::OutOfRange { addr: 0x1001 }));
        assert_eq!(t.map_page(&mem, &mut frames, Hpa(7 << 30)), Err(Error::OutOfRange { addr: 7 << 30 }));
        assert_eq!(t.unmap_page(&mem, &mut frames, Hpa(1 << 50)), Err(Error::OutOfRange { addr: 1 << 50 }));
    }

    #[test]
    fn remove_splits_2m_leaves_too() {
        let (mem, mut frames, mut t) = build_with(cfg(Levels::Three, true), &[HV], &[]);
        let pa = Hpa(HV.base.0 - LARGE_PAGE_SIZE + 0x7000); // inside a 2 MiB leaf
        assert_eq!(level_of(&t, &mem, pa.0), Some(2));
        assert!(t.unmap_page(&mem, &mut frames, pa).unwrap().split);
        assert_eq!(t.translate(&mem, Iova(pa.0)), None);
        assert_eq!(level_of(&t, &mem, pa.0 + 0x1000), Some(1));
    }

    #[test]
    fn rmrr_pages_are_never_removed() {
        let rmrrs = [PhysRange::new(0xe_8000, 0x8000)];
        let (mem, mut frames, mut t) = build_with(cfg(Levels::Four, true), &[], &rmrrs);
        assert_eq!(t.unmap_page(&mem, &mut frames, Hpa(0xe_9000)), Err(Error::RmrrPage { addr: 0xe_9000 }));
        assert!(t.translate(&mem, Iova(0xe_9000)).is_some());
    }

    #[test]
    fn dirty_pages_are_tracked() {
        let (mem, mut frames, mut t) = build_with(cfg(Levels::Four, true), &[HV], &[]);
        let d = t.take_dirty();
        // Every table page the build wrote, once each.
        assert_eq!(d.len(), frames.live.len());
        assert!(d.windows(2).all(|w| w[0] < w[1]));
        assert!(t.take_dirty().is_empty());
        // Unmapping inside a 1 GiB leaf writes two new tables (a PD and a
        // PT) and the PDPT that now points to the PD.
        t.unmap_page(&mem, &mut frames, Hpa(0x1_5000_3000)).unwrap();
        let d = t.take_dirty();
        assert_eq!(d.len(), 3);
        let leaf = t.lookup(&mem, Iova(0x1_5000_4000)).unwrap().0.page_base();
        assert!(d.contains(&leaf));
        // Unmapping its neighbour touches only the leaf table.
        t.unmap_page(&mem, &mut frames, Hpa(0x1_5000_4000)).unwrap();
        assert_eq!(t.take_dirty(), vec![leaf]);
    }

    #[test]
    fn tables_are_freed() {
        let (mem, mut frames, mut t) = build_with(cfg(Levels::Four, true), &[HV], &[]);
        t.unmap_page(&mem, &mut frames, Hpa(0x1_5000_3000)).unwrap();
        let used = frames.live.len();
        assert!(used > 3 && used < 64, "an identity map should need few tables, used {used}");
        t.free(&mem, &mut frames);
        assert!(frames.live.is_empty());
    }

    #[test]
    fn donated_2m_blocks_cost_no_4k_tables() {
        let (mem, mut frames, mut t) = build_with(cfg(Levels::Four, true), &[HV], &[]);
        let before = t.counts(&mem);
        let live = frames.live.len();
        // Two 2 MiB blocks inside a 1 GiB leaf: one split, no 4 KiB table.
        let r = PhysRange::new(0x1_5000_0000, 2 * LARGE_PAGE_SIZE);
        assert_eq!(t.unmap_range(&mem, &mut frames, r).unwrap(), Unmapped { was_mapped: true, split: true });
        assert_eq!(frames.live.len(), live + 1);
        for a in [r.base.0, r.base.0 + 0x1234, r.end.0 - 1] {
            assert_eq!(t.translate(&mem, Iova(a)), None, "{a:#x}");
        }
        assert_eq!(t.translate(&mem, Iova(r.base.0 - 1)), Some((Hpa(r.base.0 - 1), true)));
        assert_eq!(t.translate(&mem, Iova(r.end.0)), Some((r.end, true)));
        assert_eq!(level_of(&t, &mem, r.end.0), Some(2));
        let c = t.counts(&mem);
        assert_eq!((c.huge, c.large, c.small), (before.huge - 1, before.large + 510, before.small));
        // Again: nothing is mapped there any more.
        assert!(!t.unmap_range(&mem, &mut frames, r).unwrap().was_mapped);
        // Given back whole: 2 MiB leaves again, still no 4 KiB table.
        t.map_range(&mem, &mut frames, r).unwrap();
        assert_eq!(frames.live.len(), live + 1);
        assert_eq!(level_of(&t, &mem, r.base.0), Some(2));
        assert_eq!(t.translate(&mem, Iova(r.base.0 + 0x1234)), Some((Hpa(r.base.0 + 0x1234), true)));
        let c = t.counts(&mem);
        assert_eq!((c.huge, c.large, c.small), (before.huge - 1, before.large + 512, before.small));
    }

    #[test]
    fn ranges_mix_blocks_and_pages() {
        let (mem, mut frames, mut t) = build_with(cfg(Levels::Three, true), &[HV], &[]);
        // Three pages before a 2 MiB boundary, then a whole 2 MiB block.
        let r = PhysRange { base: Hpa(0x4020_0000 - 0x3000), end: Hpa(0x4040_0000) };
        let u = t.unmap_range(&mem, &mut frames, r).unwrap();
        assert!(u.was_mapped && u.split);
        assert_eq!(t.translate(&mem, Iova(r.base.0 - 1)), Some((Hpa(r.base.0 - 1), true)));
        assert_eq!(level_of(&t, &mem, r.base.0 - 0x1000), Some(1));
        for a in (r.base.0..r.end.0).step_by(0x1000) {
            assert_eq!(t.translate(&mem, Iova(a)), None, "{a:#x}");
        }
        // The hypervisor region right after it was never mapped.
        assert_eq!(t.translate(&mem, Iova(HV.base.0)), None);
        t.map_range(&mem, &mut frames, r).unwrap();
        for a in (r.base.0..r.end.0).step_by(0x1000) {
            assert_eq!(t.translate(&mem, Iova(a)), Some((Hpa(a), true)), "{a:#x}");
        }
        assert_eq!(t.translate(&mem, Iova(HV.base.0)), None);
    }

    #[test]
    fn a_block_already_in_4k_leaves_keeps_its_table() {
        let (mem, mut frames, mut t) = build_with(cfg(Levels::Four, true), &[HV], &[]);
        let block = PhysRange::new(0x1_5000_0000, LARGE_PAGE_SIZE);
        t.unmap_page(&mem, &mut frames, Hpa(block.base.0 + 0x5000)).unwrap();
        let live = frames.live.len();
        let u = t.unmap_range(&mem, &mut frames, block).unwrap();
        assert_eq!(u, Unmapped { was_mapped: true, split: false });
        assert_eq!(frames.live.len(), live);
        assert!((block.base.0..block.end.0).step_by(0x1000).all(|a| t.translate(&mem, Iova(a)).is_none()));
        t.map_range(&mem, &mut frames, block).unwrap();
        assert_eq!(frames.live.len(), live);
        assert!((block.base.0..block.end.0).step_by(0x1000).all(|a| t.translate(&mem, Iova(a)) == Some((Hpa(a), true))));
        assert_eq!(level_of(&t, &mem, block.base.0), Some(1));
    }

    #[test]
    fn bad_ranges_change_nothing() {
        let rmrrs = [PhysRange::new(0x7b80_0000, 0x10_0000)];
        let (mem, mut frames, mut t) = build_with(cfg(Levels::Three, true), &[HV], &rmrrs);
        let live = frames.live.len();
        let bad = [
            (PhysRange::new(0x1000_0800, 0x1000), Error::OutOfRange { addr: 0x1000_0800 }),
            (PhysRange::new(0x1000_0000, 0x800), Error::OutOfRange { addr: 0x1000_0000 }),
            (PhysRange::new(0x1000_0000, 0), Error::OutOfRange { addr: 0x1000_0000 }),
            (PhysRange::new((1 << 39) - 0x1000, 0x2000), Error::OutOfRange { addr: (1 << 39) + 0x1000 }),
            // Overlapping an RMRR: refused whole, even the part before it.
            (PhysRange::new(0x7b60_0000, 0x40_0000), Error::RmrrPage { addr: 0x7b80_0000 }),
        ];
        for (r, e) in bad {
            assert_eq!(t.unmap_range(&mem, &mut frames, r), Err(e), "{r:?}");
            assert_eq!(t.map_range(&mem, &mut frames, r), Err(e), "{r:?}");
        }
        assert_eq!(t.translate(&mem, Iova(0x7b60_0000)), Some((Hpa(0x7b60_0000), true)));
        assert_eq!(frames.live.len(), live);
        // Above the map's top there is nothing to give back.
        assert_eq!(t.map_range(&mem, &mut frames, PhysRange::new(7 << 30, 0x1000)), Err(Error::OutOfRange { addr: 7 << 30 }));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]
        /// Donations and returns in any order, by page or by block, against
        /// a model of which pages devices may reach.
        #[test]
        fn donations_and_returns_match_a_model(
            ops in proptest::collection::vec((proptest::bool::ANY, 0u64..2048, 1u64..1100, proptest::bool::ANY), 1..40)
        ) {
            // 8 MiB starting in the middle of a 1 GiB leaf.
            const BASE: u64 = 0x1_5000_0000;
            let (mem, mut frames, mut t) = build_with(cfg(Levels::Four, true), &[HV], &[]);
            let mut out = vec![false; 2048];
            for (remove, first, n, blocks) in ops {
                let (first, n) = if blocks { (first / 512 * 512, (n / 512).max(1) * 512) } else { (first, n) };
                let n = n.min(2048 - first);
                let r = PhysRange::new(BASE + first * PAGE_SIZE, n * PAGE_SIZE);
                if remove {
                    t.unmap_range(&mem, &mut frames, r).unwrap();
                } else {
                    t.map_range(&mem, &mut frames, r).unwrap();
                }
                out[first as usize..(first + n) as usize].fill(remove);
            }
            for (i, &gone) in out.iter().enumerate() {
                let a = BASE + i as u64 * PAGE_SIZE;
                let want = if gone { None } else { Some((Hpa(a + 8), true)) };
                proptest::prop_assert_eq!(t.translate(&mem, Iova(a + 8)), want, "page {}", i);
            }
            // Outside the window nothing moved.
            proptest::prop_assert_eq!(t.translate(&mem, Iova(BASE - 8)), Some((Hpa(BASE - 8), true)));
            proptest::prop_assert_eq!(t.translate(&mem, Iova(BASE + (8 << 20))), Some((Hpa(BASE + (8 << 20)), true)));
            t.free(&mem, &mut frames);
            proptest::prop_assert!(frames.live.is_empty());
        }
    }

    #[test]
    fn few_tables_for_a_big_machine() {
        // 256 GiB of RAM in 1 GiB pages: a handful of tables.
        let mem = MockMem::new();
        let mut frames = MockFrames::new(0x70_0000_0000, 64);
        let ram = [MemRange { base: 0, size: 256 * HUGE_PAGE_SIZE }];
        let t =
            DmaTables::build(&mem, &mut frames, cfg(Levels::Three, true), &DmaMap { ram: &ram, holes: &[], rmrrs: &[] }).unwrap();
        assert_eq!(t.counts(&mem), LeafCounts { huge: 256, large: 0, small: 0, tables: 1 });
        assert_eq!(frames.live.len(), 3);
    }
}
