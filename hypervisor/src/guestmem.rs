//! Guest memory: a guest's EPT over pool frames, with reference-counted
//! copy-on-write sharing of frames *and of page-table subtrees* between
//! forked VMs.
//!
//! A fork costs one table frame, whatever the VM's size: the child gets a
//! copy of the parent's root table, and both roots point, read-only, to the
//! same lower tables, whose reference counts go up. EPT permissions are the
//! AND of every level's, so a write anywhere under a shared subtree faults;
//! the fault clones the tables on its path (each clone shares its own
//! children the same way) and finally copies the data frame. Frames and
//! tables appear on first touch.
//!
//! The invariant that keeps this sound: an entry that grants write access
//! points to a table or frame with exactly one reference. When a shared
//! table is cloned, the entries in both the clone and the original lose
//! their write access, since their children are now shared.

use crate::addr::{Gpa, Hpa, PAGE_SIZE};
use crate::arch::x86::ept_entry::{EptEntry, EptFlags, MT_WB};
use crate::ept::Ept;
use crate::mem::PhysMem;
use crate::pool::{FramePool, PoolError};
use crate::radix::index;

/// Why a guest-memory operation could not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemError {
    /// The pool is short: donate this many pages and retry.
    NeedPages(u64),
    /// The address lies outside guest memory.
    OutOfRange,
    /// A frame's reference count is exhausted.
    Pool(PoolError),
}

impl From<PoolError> for MemError {
    fn from(e: PoolError) -> Self {
        MemError::Pool(e)
    }
}

/// Frames an operation on one page may need: three tables and the page.
const PAGE_OP_FRAMES: u64 = 4;

/// One guest's memory.
pub struct GuestMem {
    pub ept: Ept,
    pub size: u64,
}

/// Frame counts of one guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemStats {
    /// Mapped frames this guest alone references.
    pub private: u64,
    /// Mapped frames shared with other guests (or other mappings).
    pub shared: u64,
    /// EPT table frames this guest alone references.
    pub tables: u64,
}

/// What [`GuestMem::ensure_writable`] had to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Touch {
    /// The page was already writable, or became so in place.
    InPlace,
    /// A fresh zeroed frame now backs the page (first touch).
    Fresh,
    /// A copy of a shared frame now backs the page: other CPUs running this
    /// VM may still translate to the old one.
    Copied,
}

/// A pool frame's leaf entry.
pub fn leaf(pa: Hpa, writable: bool) -> EptEntry {
    let perms = if writable { EptFlags::RWX } else { EptFlags::RX | EptFlags::SW_COW };
    EptEntry::leaf(pa.0, perms | EptFlags::SW_POOL, MT_WB, false)
}

fn need(pool: &FramePool, n: u64) -> Result<(), MemError> {
    let free = pool.frames_free();
    if free < n {
        return Err(MemError::NeedPages(n - free));
    }
    Ok(())
}

pub fn writable(e: EptEntry) -> bool {
    e.flags().contains(EptFlags::WRITE)
}

/// `e` without write access.
pub fn read_only(e: EptEntry) -> EptEntry {
    e.with_flags(EptFlags::empty(), EptFlags::WRITE)
}

/// Copies the shared table `src` into a new table: both now share every
/// child, so every entry in both loses write access.
fn clone_table(mem: &impl PhysMem, pool: &mut FramePool, src: Hpa) -> Result<Hpa, MemError> {
    let dst = pool.alloc().ok_or(MemError::NeedPages(1))?;
    let entry = |i: u64| EptEntry(mem.read_u64(Hpa(src.0 + i * 8)));
    // Every child gains a reference first, in one sweep of the pool;
    // then both tables map them read-only.
    if let Err(e) = pool.get_each((0..512u64).map(entry).filter(|e| e.present()).map(|e| Hpa(e.addr()))) {
        let _ = pool.put(mem, dst);
        return Err(e.into());
    }
    for i in 0..512u64 {
        let e = entry(i);
        if e.present() {
            let ro = read_only(e);
            mem.write_u64(Hpa(src.0 + i * 8), ro.0);
            mem.write_u64(Hpa(dst.0 + i * 8), ro.0);
        }
    }
    Ok(dst)
}

/// Drops one reference to the table `t` at `level`; the last reference
/// releases its children and frees it.
fn release(mem: &impl PhysMem, pool: &mut FramePool, t: Hpa, level: u32) {
    if pool.refs(t) != Some(1) {
        let _ = pool.put(mem, t);
        return;
    }
    for i in 0..512u64 {
        let e = EptEntry(mem.read_u64(Hpa(t.0 + i * 8)));
        if !e.present() {
            continue;
        }
        if level > 1 {
            release(mem, pool, Hpa(e.addr()), level - 1);
        } else {
            let _ = pool.put(mem, Hpa(e.addr()));
        }
    }
    let _ = pool.put(mem, t);
}

impl GuestMem {
    /// Empty memory of `size` bytes.
    pub fn new(_mem: &impl PhysMem, pool: &mut FramePool, size: u64) -> Result<Self, MemError> {
        need(pool, 1)?;
        let root = pool.alloc().ok_or(MemError::NeedPages(1))?;
        Ok(GuestMem { ept: Ept { root }, size })
    }

    fn check(&self, gpa: Gpa) -> Result<Gpa, MemError> {
        if gpa.0 >= self.size {
            return Err(MemError::OutOfRange);
        }
        Ok(gpa.page_base())
    }

    /// The frame behind `gpa`, and whether the guest may write it (through
    /// every level).
    pub fn lookup(&self, mem: &impl PhysMem, gpa: Gpa) -> Option<(Hpa, bool)> {
        let mut t = self.ept.root;
        let mut w = true;
        for level in (2..=4).rev() {
            let e = EptEntry(mem.read_u64(Hpa(t.0 + index(gpa.0, level) * 8)));
            if !e.present() {
                return None;
            }
            w &= writable(e);
            t = Hpa(e.addr());
        }
        let e = EptEntry(mem.read_u64(Hpa(t.0 + index(gpa.0, 1) * 8)));
        e.present().then(|| (Hpa(e.addr()), w && writable(e)))
    }

    /// Makes every table on `gpa`'s path private and writable (creating
    /// missing ones); returns the leaf table.
    fn private_path(&mut self, mem: &impl PhysMem, pool: &mut FramePool, gpa: Gpa) -> Result<Hpa, MemError> {
        let mut t = self.ept.root;
        for level in (2..=4).rev() {
            let at = Hpa(t.0 + index(gpa.0, level) * 8);
            let e = EptEntry(mem.read_u64(at));
            let next = if !e.present() {
                let n = pool.alloc().ok_or(MemError::NeedPages(1))?;
                mem.write_u64(at, EptEntry::table(n.0).0);
                n
            } else if writable(e) {
                Hpa(e.addr())
            } else if pool.refs(Hpa(e.addr())) == Some(1) {
                // The other sharers are gone: take the table back.
                mem.write_u64(at, EptEntry::table(e.addr()).0);
                Hpa(e.addr())
            } else {
                let n = clone_table(mem, pool, Hpa(e.addr()))?;
                pool.put(mem, Hpa(e.addr()))?;
                mem.write_u64(at, EptEntry::table(n.0).0);
                n
            };
            t = next;
        }
        Ok(t)
    }

    /// Makes the page at `gpa` present (a fresh zeroed frame if untouched).
    pub fn ensure_present(&mut self, mem: &impl PhysMem, pool: &mut FramePool, gpa: Gpa) -> Result<Hpa, MemError> {
        let gpa = self.check(gpa)?;
        if let Some((pa, _)) = self.lookup(mem, gpa) {
            return Ok(pa);
        }
        self.ensure_writable(mem, pool, gpa)?;
        Ok(self.lookup(mem, gpa).unwrap().0)
    }

    /// Makes the page at `gpa` present and writable: allocates it, takes it
    /// back, or copies it (breaking copy-on-write sharing).
    pub fn ensure_writable(&mut self, mem: &impl PhysMem, pool: &mut FramePool, gpa: Gpa) -> Result<Touch, MemError> {
        let gpa = self.check(gpa)?;
        if let Some((_, true)) = self.lookup(mem, gpa) {
            return Ok(Touch::InPlace);
        }
        need(pool, PAGE_OP_FRAMES)?;
        let table = self.private_path(mem, pool, gpa)?;
        let at = Hpa(table.0 + index(gpa.0, 1) * 8);
        let e = EptEntry(mem.read_u64(at));
        if !e.present() {
            let new = pool.alloc().ok_or(MemError::NeedPages(1))?;
            mem.write_u64(at, leaf(new, true).0);
            return Ok(Touch::Fresh);
        }
        let old = Hpa(e.addr());
        if pool.refs(old) == Some(1) {
            mem.write_u64(at, leaf(old, true).0);
            return Ok(Touch::InPlace);
        }
        let new = pool.alloc().ok_or(MemError::NeedPages(1))?;
        mem.copy_page(new, old);
        mem.write_u64(at, leaf(new, true).0);
        pool.put(mem, old)?;
        Ok(Touch::Copied)
    }

    /// Maps `gpa` read-only to pool frame `pa`, which already carries the
    /// reference for this mapping (re-merging). Returns the frame it
    /// replaced, whose reference the caller must drop.
    pub fn map_shared(&mut self, mem: &impl PhysMem, pool: &mut FramePool, gpa: Gpa, pa: Hpa) -> Result<Option<Hpa>, MemError> {
        let gpa = self.check(gpa)?;
        let table = self.private_path(mem, pool, gpa)?;
        let at = Hpa(table.0 + index(gpa.0, 1) * 8);
        let e = EptEntry(mem.read_u64(at));
        mem.write_u64(at, leaf(pa, false).0);
        Ok(e.present().then(|| Hpa(e.addr())))
    }

    /// Takes write access to the page at `gpa` away, without changing the
    /// frame (the first step of a merge). The page's path becomes private.
    pub fn write_protect(&mut self, mem: &impl PhysMem, pool: &mut FramePool, gpa: Gpa) -> Result<Option<Hpa>, MemError> {
        let gpa = self.check(gpa)?;
        if self.lookup(mem, gpa).is_none() {
            return Ok(None);
        }
        let table = self.private_path(mem, pool, gpa)?;
        let at = Hpa(table.0 + index(gpa.0, 1) * 8);
        let e = EptEntry(mem.read_u64(at));
        mem.write_u64(at, read_only(e).with_flags(EptFlags::SW_COW, EptFlags::empty()).0);
        Ok(Some(Hpa(e.addr())))
    }

    /// Copies `data` into guest memory at `gpa` (the LOAD path).
    pub fn write(&mut self, mem: &impl PhysMem, pool: &mut FramePool, gpa: Gpa, data: &[u8]) -> Result<(), MemError> {
        let end = gpa.0.checked_add(data.len() as u64).ok_or(MemError::OutOfRange)?;
        if end > self.size {
            return Err(MemError::OutOfRange);
        }
        let mut done = 0usize;
        while done < data.len() {
            let a = gpa.0 + done as u64;
            let n = ((PAGE_SIZE - (a & (PAGE_SIZE - 1))) as usize).min(data.len() - done);
            self.ensure_writable(mem, pool, Gpa(a))?;
            let pa = self.lookup(mem, Gpa(a)).unwrap().0;
            mem.write(Hpa(pa.0 + (a & (PAGE_SIZE - 1))), &data[done..done + n]);
            done += n;
        }
        Ok(())
    }

    /// Reads guest memory; untouched pages read as zeros.
    pub fn read(&self, mem: &impl PhysMem, gpa: Gpa, buf: &mut [u8]) -> Result<(), MemError> {
        let end = gpa.0.checked_add(buf.len() as u64).ok_or(MemError::OutOfRange)?;
        if end > self.size {
            return Err(MemError::OutOfRange);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let a = gpa.0 + done as u64;
            let n = ((PAGE_SIZE - (a & (PAGE_SIZE - 1))) as usize).min(buf.len() - done);
            match self.lookup(mem, Gpa(a)) {
                Some((pa, _)) => mem.read(Hpa(pa.0 + (a & (PAGE_SIZE - 1))), &mut buf[done..done + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(())
    }

    /// Table frames reachable from this memory's root (shared ones too).
    pub fn table_frames(&self, mem: &impl PhysMem) -> u64 {
        self.ept.counts(mem).tables
    }

    /// A copy-on-write clone sharing every table below the root: one frame.
    /// The caller must flush the parent's TLBs before it runs again.
    pub fn fork(&mut self, mem: &impl PhysMem, pool: &mut FramePool) -> Result<GuestMem, MemError> {
        need(pool, 1)?;
        let root = clone_table(mem, pool, self.ept.root)?;
        Ok(GuestMem { ept: Ept { root }, size: self.size })
    }

    /// A full, private copy of this memory: every table and every frame
    /// duplicated now. What a fork would cost without copy-on-write; the
    /// baseline of the fork benchmark.
    pub fn copy(&self, mem: &impl PhysMem, pool: &mut FramePool) -> Result<GuestMem, MemError> {
        fn walk(mem: &impl PhysMem, pool: &mut FramePool, src: Hpa, dst: Hpa, level: u32) -> Result<(), MemError> {
            for i in 0..512u64 {
                let e = EptEntry(mem.read_u64(Hpa(src.0 + i * 8)));
                if !e.present() {
                    continue;
                }
                let n = pool.alloc().ok_or(MemError::NeedPages(1))?;
                if level > 1 {
                    mem.write_u64(Hpa(dst.0 + i * 8), EptEntry::table(n.0).0);
                    walk(mem, pool, Hpa(e.addr()), n, level - 1)?;
                } else {
                    mem.copy_page(n, Hpa(e.addr()));
                    mem.write_u64(Hpa(dst.0 + i * 8), leaf(n, true).0);
                }
            }
            Ok(())
        }
        let c = self.ept.counts(mem);
        need(pool, c.tables + c.small)?;
        let root = pool.alloc().ok_or(MemError::NeedPages(1))?;
        let copy = GuestMem { ept: Ept { root }, size: self.size };
        if let Err(e) = walk(mem, pool, self.ept.root, root, 4) {
            copy.destroy(mem, pool);
            return Err(e);
        }
        Ok(copy)
    }

    /// Drops every reference this memory holds.
    pub fn destroy(self, mem: &impl PhysMem, pool: &mut FramePool) {
        release(mem, pool, self.ept.root, 4);
    }

    /// Private and shared frames, and private tables.
    pub fn stats(&self, mem: &impl PhysMem, pool: &FramePool) -> MemStats {
        fn walk(mem: &impl PhysMem, pool: &FramePool, t: Hpa, level: u32, shared_above: bool, s: &mut MemStats) {
            let shared = shared_above || pool.refs(t).map(|r| r > 1).unwrap_or(false);
            if !shared {
                s.tables += 1;
            }
            for i in 0..512u64 {
                let e = EptEntry(mem.read_u64(Hpa(t.0 + i * 8)));
                if !e.present() {
                    continue;
                }
                if level > 1 {
                    walk(mem, pool, Hpa(e.addr()), level - 1, shared, s);
                } else if shared || pool.refs(Hpa(e.addr())).map(|r| r > 1).unwrap_or(false) {
                    s.shared += 1;
                } else {
                    s.private += 1;
                }
            }
        }
        let mut s = MemStats::default();
        walk(mem, pool, self.ept.root, 4, false, &mut s);
        s
    }

    /// Up to `max` leaves at or above `from` that this memory reaches
    /// through tables it alone holds: `(where the entry is, gpa, entry)`.
    /// Leaves under shared tables are left out: they are shared already.
    /// Also returns where to go on, if the walk stopped early.
    pub fn private_leaves(&self, mem: &impl PhysMem, pool: &FramePool, from: Gpa, max: usize) -> (alloc::vec::Vec<(Hpa, Gpa, EptEntry)>, Option<Gpa>) {
        fn walk(
            mem: &impl PhysMem,
            pool: &FramePool,
            t: Hpa,
            level: u32,
            base: u64,
            from: u64,
            max: usize,
            out: &mut alloc::vec::Vec<(Hpa, Gpa, EptEntry)>,
        ) -> Option<u64> {
            let span = 1u64 << (12 + 9 * (level - 1));
            for i in 0..512u64 {
                let gpa = base + i * span;
                if gpa + span <= from {
                    continue;
                }
                let at = Hpa(t.0 + i * 8);
                let e = EptEntry(mem.read_u64(at));
                if !e.present() {
                    continue;
                }
                if level > 1 {
                    if pool.refs(Hpa(e.addr())) != Some(1) {
                        continue;
                    }
                    if let Some(next) = walk(mem, pool, Hpa(e.addr()), level - 1, gpa, from, max, out) {
                        return Some(next);
                    }
                } else {
                    if out.len() == max {
                        return Some(gpa);
                    }
                    out.push((at, Gpa(gpa), e));
                }
            }
            None
        }
        let mut out = alloc::vec::Vec::new();
        let next = walk(mem, pool, self.ept.root, 4, 0, from.0, max, &mut out);
        (out, next.map(Gpa))
    }

    /// Visits every mapped page: `(gpa, frame, writable at the leaf)`.
    pub fn for_each_page(&self, mem: &impl PhysMem, mut f: impl FnMut(Gpa, Hpa, bool)) {
        self.ept.for_each_leaf(mem, |gpa, _, e, _| f(gpa, Hpa(e.addr()), writable(e)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::mem::mock::{used, with_pool as setup};

    #[test]
    fn demand_allocation_and_bounds() {
        let (mem, mut pool) = setup(64);
        let mut g = GuestMem::new(&mem, &mut pool, 16 << 20).unwrap();
        assert_eq!(g.lookup(&mem, Gpa(0x5000)), None);
        assert_eq!(g.ensure_writable(&mem, &mut pool, Gpa(0x5123)).unwrap(), Touch::Fresh);
        assert!(g.lookup(&mem, Gpa(0x5000)).unwrap().1);
        assert_eq!(g.ensure_writable(&mem, &mut pool, Gpa(0x5000)).unwrap(), Touch::InPlace);
        assert_eq!(g.ensure_writable(&mem, &mut pool, Gpa(16 << 20)), Err(MemError::OutOfRange));
        let s = g.stats(&mem, &pool);
        assert_eq!((s.private, s.shared, s.tables), (1, 0, 4));
        g.destroy(&mem, &mut pool);
        assert_eq!(used(&pool), 0);
    }

    #[test]
    fn write_read_across_pages() {
        let (mem, mut pool) = setup(64);
        let mut g = GuestMem::new(&mem, &mut pool, 2 << 20).unwrap();
        let data: Vec<u8> = (0..10000u32).map(|i| i as u8).collect();
        g.write(&mem, &mut pool, Gpa(0x1ff0), &data).unwrap();
        let mut back = vec![0u8; data.len()];
        g.read(&mem, Gpa(0x1ff0), &mut back).unwrap();
        assert_eq!(back, data);
        let mut z = [1u8; 16];
        g.read(&mem, Gpa(0x10_0000), &mut z).unwrap();
        assert_eq!(z, [0; 16]);
        assert_eq!(g.write(&mem, &mut pool, Gpa((2 << 20) - 4), &[0; 8]), Err(MemError::OutOfRange));
    }

    #[test]
    fn fork_costs_one_frame_and_copies_on_write() {
        let (mem, mut pool) = setup(4096);
        let mut p = GuestMem::new(&mem, &mut pool, 64 << 20).unwrap();
        for i in 0..1024u64 {
            p.write(&mem, &mut pool, Gpa(i * 16384), &[(i % 250) as u8 + 1; 64]).unwrap();
        }
        let before = used(&pool);
        let mut c = p.fork(&mem, &mut pool).unwrap();
        assert_eq!(used(&pool) - before, 1, "a fork costs its root table, whatever the size");
        assert_eq!(c.stats(&mem, &pool).shared, 1024);
        assert!(!p.lookup(&mem, Gpa(0)).unwrap().1, "the parent is write-protected too");
        // The child writes page 0: its path is cloned, the frame copied.
        c.write(&mem, &mut pool, Gpa(0), &[0xee; 16]).unwrap();
        let mut b = [0u8; 16];
        p.read(&mem, Gpa(0), &mut b).unwrap();
        assert_eq!(b[..4], [1; 4]);
        c.read(&mem, Gpa(0), &mut b).unwrap();
        assert_eq!(b, [0xee; 16]);
        assert_eq!(used(&pool) - before, 1 + 3 + 1, "root, three tables on the path, one data frame");
        // The parent writes page 0: it holds the last reference, no copy.
        let before = pool.frames_free();
        let pa = p.lookup(&mem, Gpa(0)).unwrap().0;
        assert_eq!(p.ensure_writable(&mem, &mut pool, Gpa(0)).unwrap(), Touch::InPlace);
        assert_eq!(p.lookup(&mem, Gpa(0)).unwrap().0, pa);
        assert!(pool.frames_free() + 3 >= before);
        c.destroy(&mem, &mut pool);
        assert_eq!(p.stats(&mem, &pool).shared, 0);
        p.destroy(&mem, &mut pool);
        assert_eq!(used(&pool), 0);
    }

    #[test]
    fn full_copy_duplicates_every_frame() {
        let (mem, mut pool) = setup(256);
        let mut p = GuestMem::new(&mem, &mut pool, 64 << 20).unwrap();
        for i in 0..20u64 {
            p.write(&mem, &mut pool, Gpa(i * (3 << 20)), &[i as u8 + 1; 32]).unwrap();
        }
        let before = used(&pool);
        let ps = p.stats(&mem, &pool);
        let c = p.copy(&mem, &mut pool).unwrap();
        assert_eq!(used(&pool) - before, ps.private + ps.tables);
        assert_eq!(c.stats(&mem, &pool), ps);
        assert!(p.lookup(&mem, Gpa(0)).unwrap().1, "the parent keeps write access");
        let mut b = [0u8; 32];
        c.read(&mem, Gpa(19 * (3 << 20)), &mut b).unwrap();
        assert_eq!(b, [20; 32]);
        assert_ne!(c.lookup(&mem, Gpa(0)).unwrap().0, p.lookup(&mem, Gpa(0)).unwrap().0);
        // Short of frames: nothing leaks.
        let (mem2, mut small) = setup(22);
        let mut q = GuestMem::new(&mem2, &mut small, 64 << 20).unwrap();
        for i in 0..5u64 {
            q.write(&mem2, &mut small, Gpa(i << 21), &[1]).unwrap();
        }
        let free = small.frames_free();
        assert!(matches!(q.copy(&mem2, &mut small), Err(MemError::NeedPages(_))));
        assert_eq!(small.frames_free(), free);
        c.destroy(&mem, &mut pool);
        p.destroy(&mem, &mut pool);
        assert_eq!(used(&pool), 0);
    }

    #[test]
    fn merge_primitives() {
        let (mem, mut pool) = setup(64);
        let mut g = GuestMem::new(&mem, &mut pool, 4 << 20).unwrap();
        g.write(&mem, &mut pool, Gpa(0), &[7; 4096]).unwrap();
        g.write(&mem, &mut pool, Gpa(0x1000), &[7; 4096]).unwrap();
        let a = g.write_protect(&mem, &mut pool, Gpa(0)).unwrap().unwrap();
        let b = g.write_protect(&mem, &mut pool, Gpa(0x1000)).unwrap().unwrap();
        assert!(mem.pages_equal(a, b));
        pool.get(a).unwrap();
        let old = g.map_shared(&mem, &mut pool, Gpa(0x1000), a).unwrap().unwrap();
        assert_eq!(old, b);
        assert!(pool.put(&mem, b).unwrap());
        assert_eq!(g.stats(&mem, &pool).shared, 2);
        g.write(&mem, &mut pool, Gpa(0x1000), &[9]).unwrap();
        let mut x = [0u8; 2];
        g.read(&mem, Gpa(0), &mut x).unwrap();
        assert_eq!(x, [7, 7]);
        g.read(&mem, Gpa(0x1000), &mut x).unwrap();
        assert_eq!(x, [9, 7]);
    }

    #[test]
    fn out_of_frames_asks_for_pages() {
        let (mem, mut pool) = setup(5);
        let mut g = GuestMem::new(&mem, &mut pool, 16 << 20).unwrap();
        g.ensure_writable(&mem, &mut pool, Gpa(0)).unwrap();
        // 5 - 1 root - 3 tables - 1 page = 0 left.
        assert!(matches!(g.ensure_writable(&mem, &mut pool, Gpa(0x1000)), Err(MemError::NeedPages(_))));
        pool.donate(Hpa(0x2_0000_0000), 8).unwrap();
        g.ensure_writable(&mem, &mut pool, Gpa(0x1000)).unwrap();
    }

    mod model {
        //! Copy-on-write over fork chains, against a reference model: each
        //! VM is a map page -> byte; random writes, forks, merges and
        //! destroys in any order; every read must match the model, and destroying every VM
        //! must free every frame.
        use super::*;
        use proptest::prelude::*;
        use std::collections::HashMap;

        #[derive(Clone, Debug)]
        enum Op {
            Write { vm: usize, page: u64, byte: u8 },
            Fork { vm: usize },
            Destroy { vm: usize },
            Merge,
            Check { vm: usize, page: u64 },
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (0..6usize, 0..40u64, any::<u8>()).prop_map(|(vm, page, byte)| Op::Write { vm, page, byte }),
                1 => (0..6usize).prop_map(|vm| Op::Fork { vm }),
                1 => (0..6usize).prop_map(|vm| Op::Destroy { vm }),
                3 => (0..6usize, 0..40u64).prop_map(|(vm, page)| Op::Check { vm, page }),
                1 => Just(Op::Merge),
            ]
        }

        /// Pages spread over several tables at every level.
        fn gpa(page: u64) -> Gpa {
            Gpa((page % 8) * 4096 + (page / 8) * (2 << 20) * 37 % (1 << 30))
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
            #[test]
            fn cow_matches_model(ops in proptest::collection::vec(op(), 1..120)) {
                let (mem, mut pool) = setup(20000);
                let mut vms: Vec<Option<(GuestMem, HashMap<u64, u8>)>> = Vec::new();
                vms.push(Some((GuestMem::new(&mem, &mut pool, 1 << 30).unwrap(), HashMap::new())));
                for o in ops {
                    let live: Vec<usize> = (0..vms.len()).filter(|&i| vms[i].is_some()).collect();
                    if live.is_empty() {
                        break;
                    }
                    match o {
                        Op::Write { vm, page, byte } => {
                            let i = live[vm % live.len()];
                            let (g, m) = vms[i].as_mut().unwrap();
                            g.write(&mem, &mut pool, gpa(page), &[byte; 8]).unwrap();
                            m.insert(page, byte);
                        }
                        Op::Fork { vm } => {
                            let i = live[vm % live.len()];
                            let (g, m) = vms[i].as_mut().unwrap();
                            let child = g.fork(&mem, &mut pool).unwrap();
                            let model = m.clone();
                            vms.push(Some((child, model)));
                        }
                        Op::Destroy { vm } => {
                            let i = live[vm % live.len()];
                            let (g, _) = vms[i].take().unwrap();
                            g.destroy(&mem, &mut pool);
                        }
                        Op::Merge => {
                            let mut all: Vec<&mut GuestMem> = vms.iter_mut().flatten().map(|(g, _)| g).collect();
                            crate::merge::merge_all(&mem, &mut pool, &mut all);
                        }
                        Op::Check { vm, page } => {
                            let i = live[vm % live.len()];
                            let (g, m) = vms[i].as_ref().unwrap();
                            let mut b = [0u8; 8];
                            g.read(&mem, gpa(page), &mut b).unwrap();
                            prop_assert_eq!(b, [*m.get(&page).unwrap_or(&0); 8]);
                        }
                    }
                }
                // Every VM sees exactly its own history.
                for (g, m) in vms.iter().flatten() {
                    for page in 0..40u64 {
                        let mut b = [0u8; 8];
                        g.read(&mem, gpa(page), &mut b).unwrap();
                        prop_assert_eq!(b, [*m.get(&page).unwrap_or(&0); 8]);
                    }
                }
                for v in vms.into_iter().flatten() {
                    v.0.destroy(&mem, &mut pool);
                }
                prop_assert_eq!(pool.frames_free(), pool.frames_total(), "frames leaked");
            }
        }
    }
}
