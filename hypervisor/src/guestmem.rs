//! Guest memory: a guest's EPT over pool frames, with reference-counted
//! copy-on-write sharing between forked VMs.
//!
//! Frames appear on first touch. A fork shares every frame: both sides map
//! it read-only with `SW_COW` and the frame's count goes up; the first write
//! from either side faults, and the writer gets its own copy (or, when it
//! holds the last reference, simply its write access back).

use crate::addr::{Gpa, Hpa, PAGE_SIZE};
use crate::arch::x86::ept_entry::{EptEntry, EptFlags, MT_WB};
use crate::ept::Ept;
use crate::mem::PhysMem;
use crate::pool::{FramePool, PoolError, PoolFrames};

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
    /// Mapped frames shared with other mappings.
    pub shared: u64,
    /// EPT table frames.
    pub tables: u64,
}

fn leaf(pa: Hpa, writable: bool) -> EptEntry {
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

impl GuestMem {
    /// Empty memory of `size` bytes.
    pub fn new(mem: &impl PhysMem, pool: &mut FramePool, size: u64) -> Result<Self, MemError> {
        need(pool, 1)?;
        let ept = Ept::new(mem, &mut PoolFrames { pool, mem }).ok_or(MemError::NeedPages(1))?;
        Ok(GuestMem { ept, size })
    }

    fn check(&self, gpa: Gpa) -> Result<Gpa, MemError> {
        if gpa.0 >= self.size {
            return Err(MemError::OutOfRange);
        }
        Ok(gpa.page_base())
    }

    /// The frame behind `gpa`, and whether the guest may write it.
    pub fn lookup(&self, mem: &impl PhysMem, gpa: Gpa) -> Option<(Hpa, bool)> {
        let (_, e, level) = self.ept.lookup(mem, gpa.page_base())?;
        debug_assert_eq!(level, 1);
        Some((Hpa(e.addr()), e.flags().contains(EptFlags::WRITE)))
    }

    /// Makes the page at `gpa` present (a fresh zeroed frame if untouched).
    pub fn ensure_present(&mut self, mem: &impl PhysMem, pool: &mut FramePool, gpa: Gpa) -> Result<Hpa, MemError> {
        let gpa = self.check(gpa)?;
        if let Some((pa, _)) = self.lookup(mem, gpa) {
            return Ok(pa);
        }
        self.ensure_writable(mem, pool, gpa)
    }

    /// Makes the page at `gpa` present and writable: allocates it, or
    /// breaks copy-on-write sharing.
    pub fn ensure_writable(&mut self, mem: &impl PhysMem, pool: &mut FramePool, gpa: Gpa) -> Result<Hpa, MemError> {
        let gpa = self.check(gpa)?;
        match self.lookup(mem, gpa) {
            Some((pa, true)) => Ok(pa),
            Some((pa, false)) if pool.refs(pa) == Some(1) => {
                // The last reference: take write access back, no copy.
                self.set(mem, pool, gpa, leaf(pa, true))?;
                Ok(pa)
            }
            Some((old, false)) => {
                need(pool, PAGE_OP_FRAMES)?;
                let new = pool.alloc().ok_or(MemError::NeedPages(1))?;
                mem.copy_page(new, old);
                self.set(mem, pool, gpa, leaf(new, true))?;
                pool.put(mem, old)?;
                Ok(new)
            }
            None => {
                need(pool, PAGE_OP_FRAMES)?;
                let new = pool.alloc().ok_or(MemError::NeedPages(1))?;
                self.set(mem, pool, gpa, leaf(new, true))?;
                Ok(new)
            }
        }
    }

    /// Maps `gpa` to pool frame `pa`, which already carries the reference
    /// for this mapping, read-only and shared (re-merging).
    pub fn map_shared(&mut self, mem: &impl PhysMem, pool: &mut FramePool, gpa: Gpa, pa: Hpa) -> Result<Option<Hpa>, MemError> {
        let gpa = self.check(gpa)?;
        let old = self.lookup(mem, gpa).map(|(p, _)| p);
        self.set(mem, pool, gpa, leaf(pa, false))?;
        Ok(old)
    }

    /// Marks the page at `gpa` read-only and shared, without changing the
    /// frame (the first step of a merge: the write-protect).
    pub fn write_protect(&mut self, mem: &impl PhysMem, gpa: Gpa) -> Option<Hpa> {
        let (at, e, _) = self.ept.lookup(mem, gpa.page_base())?;
        let ro = e.with_flags(EptFlags::SW_COW, EptFlags::WRITE);
        mem.write_u64(at, ro.0);
        Some(Hpa(e.addr()))
    }

    fn set(&mut self, mem: &impl PhysMem, pool: &mut FramePool, gpa: Gpa, e: EptEntry) -> Result<(), MemError> {
        self.ept.set(mem, &mut PoolFrames { pool, mem }, gpa, 1, e).ok_or(MemError::NeedPages(PAGE_OP_FRAMES))
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
            let pa = self.ensure_writable(mem, pool, Gpa(a))?;
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

    /// Table frames this memory uses.
    pub fn table_frames(&self, mem: &impl PhysMem) -> u64 {
        self.ept.counts(mem).tables
    }

    /// A copy-on-write clone: every frame becomes shared read-only by both.
    /// The caller must flush the parent's TLBs before it runs again.
    pub fn fork(&mut self, mem: &impl PhysMem, pool: &mut FramePool) -> Result<GuestMem, MemError> {
        need(pool, self.table_frames(mem))?;
        let root = pool.alloc().ok_or(MemError::NeedPages(1))?;
        fork_table(mem, pool, self.ept.root, root, 4)?;
        Ok(GuestMem { ept: Ept { root }, size: self.size })
    }

    /// Drops every frame reference and frees the tables.
    pub fn destroy(self, mem: &impl PhysMem, pool: &mut FramePool) {
        let mut frames = alloc::vec::Vec::new();
        self.ept.for_each_leaf(mem, |_, _, e, _| frames.push(Hpa(e.addr())));
        for f in frames {
            let _ = pool.put(mem, f);
        }
        self.ept.free_tables(mem, &mut PoolFrames { pool, mem });
    }

    /// Private and shared frames, and tables.
    pub fn stats(&self, mem: &impl PhysMem, pool: &FramePool) -> MemStats {
        let mut s = MemStats { tables: self.table_frames(mem), ..Default::default() };
        self.ept.for_each_leaf(mem, |_, _, e, _| match pool.refs(Hpa(e.addr())) {
            Some(1) => s.private += 1,
            Some(_) => s.shared += 1,
            None => {}
        });
        s
    }

    /// Visits every mapped page: `(gpa, frame, writable)`.
    pub fn for_each_page(&self, mem: &impl PhysMem, mut f: impl FnMut(Gpa, Hpa, bool)) {
        self.ept.for_each_leaf(mem, |gpa, _, e, _| f(gpa, Hpa(e.addr()), e.flags().contains(EptFlags::WRITE)));
    }
}

/// Copies the table `src` at `level` into the fresh frame `dst`, sharing
/// every leaf frame copy-on-write.
fn fork_table(mem: &impl PhysMem, pool: &mut FramePool, src: Hpa, dst: Hpa, level: u32) -> Result<(), MemError> {
    for i in 0..512u64 {
        let at = Hpa(src.0 + i * 8);
        let e = EptEntry(mem.read_u64(at));
        if !e.present() {
            continue;
        }
        if level == 1 {
            let shared = e.with_flags(EptFlags::SW_COW, EptFlags::WRITE);
            pool.get(Hpa(e.addr()))?;
            mem.write_u64(at, shared.0);
            mem.write_u64(Hpa(dst.0 + i * 8), shared.0);
        } else {
            let t = pool.alloc().ok_or(MemError::NeedPages(1))?;
            fork_table(mem, pool, Hpa(e.addr()), t, level - 1)?;
            mem.write_u64(Hpa(dst.0 + i * 8), EptEntry::table(t.0).0);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::mock::MockMem;

    fn setup(frames: usize) -> (MockMem, FramePool) {
        let mut pool = FramePool::new();
        pool.donate(Hpa(0x1_0000_0000), frames).unwrap();
        (MockMem::new(), pool)
    }

    #[test]
    fn demand_allocation_and_bounds() {
        let (mem, mut pool) = setup(64);
        let mut g = GuestMem::new(&mem, &mut pool, 16 << 20).unwrap();
        assert_eq!(g.lookup(&mem, Gpa(0x5000)), None);
        let pa = g.ensure_writable(&mem, &mut pool, Gpa(0x5123)).unwrap();
        assert_eq!(g.lookup(&mem, Gpa(0x5000)), Some((pa, true)));
        assert_eq!(g.ensure_writable(&mem, &mut pool, Gpa(16 << 20)), Err(MemError::OutOfRange));
        let s = g.stats(&mem, &pool);
        assert_eq!((s.private, s.shared, s.tables), (1, 0, 4));
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
    fn fork_shares_then_copies_on_write() {
        let (mem, mut pool) = setup(256);
        let mut p = GuestMem::new(&mem, &mut pool, 4 << 20).unwrap();
        for i in 0..8u64 {
            p.write(&mem, &mut pool, Gpa(i * 4096), &[i as u8 + 1; 4096]).unwrap();
        }
        let used_before = pool.frames_total() - pool.frames_free();
        let mut c = p.fork(&mem, &mut pool).unwrap();
        let used_after = pool.frames_total() - pool.frames_free();
        assert_eq!(used_after - used_before, 4, "a fork costs tables, not data frames");
        assert_eq!(c.stats(&mem, &pool).shared, 8);
        assert_eq!(p.lookup(&mem, Gpa(0)).unwrap().1, false, "the parent is write-protected too");
        // The child writes page 0: it gets a copy; the parent keeps its data.
        c.write(&mem, &mut pool, Gpa(0), &[0xee; 16]).unwrap();
        let mut b = [0u8; 16];
        p.read(&mem, Gpa(0), &mut b).unwrap();
        assert_eq!(b, [1; 16]);
        c.read(&mem, Gpa(0), &mut b).unwrap();
        assert_eq!(b, [0xee; 16]);
        // The parent writes page 0: it holds the last reference, no copy.
        let before = pool.frames_free();
        let pa = p.lookup(&mem, Gpa(0)).unwrap().0;
        assert_eq!(p.ensure_writable(&mem, &mut pool, Gpa(0)).unwrap(), pa);
        assert_eq!(pool.frames_free(), before);
        // Destroy both in either order: everything comes back.
        c.destroy(&mem, &mut pool);
        assert_eq!(p.stats(&mem, &pool).shared, 0);
        p.destroy(&mem, &mut pool);
        assert_eq!(pool.frames_free(), pool.frames_total());
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
}
