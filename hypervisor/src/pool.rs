//! The frame pool: pages the host donated, each with a reference count.
//!
//! Every pool frame is owned by the hypervisor, out of the host's EPT (and
//! IOMMU tables). A frame is free (count 0, always zeroed), or mapped by one
//! or more guest mappings or used as a page-table or VMCS page. Freed frames
//! are scrubbed before they are reused or returned to the host.

use crate::addr::{Hpa, PAGE_SIZE};
use crate::mem::{FrameAlloc, PhysMem};
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

/// A run of donated pages. Its bookkeeping costs about 1.1 bytes per
/// frame, out of the hypervisor's small heap: a reference count byte
/// (counts of 255 and more live in [`FramePool::big`]), a free bit and a
/// gone bit (given back to the host).
struct Chunk {
    refs: Vec<u8>,
    free: Vec<u64>,
    gone: Vec<u64>,
    nfree: u32,
    ngone: u32,
}

const BIG: u8 = u8::MAX;

/// One more reference in the count `r` of frame `pfn` (counts from
/// [`BIG`] on live in `big`).
fn add_ref(r: &mut u8, big: &mut BTreeMap<u64, u32>, pfn: u64) -> Result<(), PoolError> {
    debug_assert!(*r > 0, "reference to a free frame");
    match *r {
        BIG => {
            let n = big.get_mut(&pfn).unwrap();
            *n = n.checked_add(1).ok_or(PoolError::RefOverflow)?;
        }
        r8 if r8 == BIG - 1 => {
            *r = BIG;
            big.insert(pfn, BIG as u32);
        }
        _ => *r += 1,
    }
    Ok(())
}

fn bit(v: &[u64], i: usize) -> bool {
    v[i / 64] & (1 << (i % 64)) != 0
}

fn set(v: &mut [u64], i: usize, on: bool) {
    if on {
        v[i / 64] |= 1 << (i % 64);
    } else {
        v[i / 64] &= !(1 << (i % 64));
    }
}

impl Chunk {
    fn new(n: usize) -> Self {
        let words = n.div_ceil(64);
        let mut free = alloc::vec![u64::MAX; words];
        if n % 64 != 0 {
            free[words - 1] = (1 << (n % 64)) - 1;
        }
        Chunk { refs: alloc::vec![0; n], free, gone: alloc::vec![0; words], nfree: n as u32, ngone: 0 }
    }

    fn len(&self) -> usize {
        self.refs.len()
    }

    fn first_free(&self) -> Option<usize> {
        self.free.iter().enumerate().find(|(_, w)| **w != 0).map(|(k, w)| k * 64 + w.trailing_zeros() as usize)
    }
}

/// Why a pool operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolError {
    /// The page is already in the pool.
    AlreadyDonated,
    /// The page is not a pool frame.
    NotPoolFrame,
    /// A frame's reference count would overflow.
    RefOverflow,
}

/// The pool, with its accounting.
#[derive(Default)]
pub struct FramePool {
    /// By first page frame number.
    chunks: BTreeMap<u64, Chunk>,
    /// Chunks with a free frame: frames come out in address order.
    with_free: BTreeSet<u64>,
    /// Reference counts of 255 and more, by page frame number.
    big: BTreeMap<u64, u32>,
    total: u64,
    free: u64,
}

impl FramePool {
    pub const fn new() -> Self {
        FramePool { chunks: BTreeMap::new(), with_free: BTreeSet::new(), big: BTreeMap::new(), total: 0, free: 0 }
    }

    pub fn frames_total(&self) -> u64 {
        self.total
    }

    pub fn frames_free(&self) -> u64 {
        self.free
    }

    /// Frames mapped more than once (shared copy-on-write).
    pub fn frames_shared(&self) -> u64 {
        self.chunks.values().flat_map(|c| c.refs.iter()).filter(|&&r| r > 1).count() as u64
    }

    /// References beyond the first, summed over every frame: the mappings
    /// (and index entries) that share a frame with another.
    pub fn refs_beyond_one(&self) -> u64 {
        let small: u64 = self.chunks.values().flat_map(|c| c.refs.iter()).filter(|&&r| r > 1 && r != BIG).map(|&r| r as u64 - 1).sum();
        small + self.big.values().map(|&n| n as u64 - 1).sum::<u64>()
    }

    /// The chunk covering `pfn` and the index in it, gone or not.
    fn covering(&self, pfn: u64) -> Option<(u64, usize)> {
        let (&base, c) = self.chunks.range(..=pfn).next_back()?;
        let i = (pfn - base) as usize;
        (i < c.len()).then_some((base, i))
    }

    fn slot(&self, pa: Hpa) -> Option<(u64, usize)> {
        let (b, i) = self.covering(pa.pfn())?;
        (!bit(&self.chunks[&b].gone, i)).then_some((b, i))
    }

    /// The chunk of pool frame `pa` and its index there, with a single
    /// search of the chunks: reference counts change once for every entry
    /// of each table a fork or a copy-on-write write clones, 512 at a
    /// time, so the lookup is on the fork's path.
    fn live_slot(chunks: &mut BTreeMap<u64, Chunk>, pa: Hpa) -> Option<(u64, &mut Chunk, usize)> {
        let pfn = pa.pfn();
        let (&base, c) = chunks.range_mut(..=pfn).next_back()?;
        let i = (pfn - base) as usize;
        (i < c.len() && !bit(&c.gone, i)).then_some((base, c, i))
    }

    /// Whether `pa` is a pool frame.
    pub fn contains(&self, pa: Hpa) -> bool {
        self.slot(pa).is_some()
    }

    /// Adds `n` pages starting at `base` (already zeroed and out of the
    /// host's reach) to the pool. Pages given back earlier come back into
    /// their old chunk.
    pub fn donate(&mut self, base: Hpa, n: usize) -> Result<(), PoolError> {
        let first = base.pfn();
        // Check the whole range before changing anything.
        for pfn in first..first + n as u64 {
            if let Some((b, i)) = self.covering(pfn) {
                if !bit(&self.chunks[&b].gone, i) {
                    return Err(PoolError::AlreadyDonated);
                }
            }
        }
        let mut run: Option<(u64, usize)> = None;
        for pfn in first..first + n as u64 {
            if let Some((b, i)) = self.covering(pfn) {
                if let Some((s, len)) = run.take() {
                    self.add_chunk(s, len);
                }
                let c = self.chunks.get_mut(&b).unwrap();
                set(&mut c.gone, i, false);
                set(&mut c.free, i, true);
                c.ngone -= 1;
                c.nfree += 1;
                self.with_free.insert(b);
            } else {
                run = match run {
                    Some((s, len)) => Some((s, len + 1)),
                    None => Some((pfn, 1)),
                };
            }
        }
        if let Some((s, len)) = run {
            self.add_chunk(s, len);
        }
        self.total += n as u64;
        self.free += n as u64;
        Ok(())
    }

    fn add_chunk(&mut self, first: u64, n: usize) {
        self.chunks.insert(first, Chunk::new(n));
        self.with_free.insert(first);
    }

    /// Takes a free frame (zeroed) with one reference.
    pub fn alloc(&mut self) -> Option<Hpa> {
        let &b = self.with_free.iter().next()?;
        let c = self.chunks.get_mut(&b).unwrap();
        let i = c.first_free().expect("a chunk listed with free frames has none");
        set(&mut c.free, i, false);
        c.refs[i] = 1;
        c.nfree -= 1;
        if c.nfree == 0 {
            self.with_free.remove(&b);
        }
        self.free -= 1;
        Some(Hpa::from_pfn(b + i as u64))
    }

    /// The reference count of `pa`.
    pub fn refs(&self, pa: Hpa) -> Option<u32> {
        let pfn = pa.pfn();
        let (&base, c) = self.chunks.range(..=pfn).next_back()?;
        let i = (pfn - base) as usize;
        if i >= c.len() || bit(&c.gone, i) {
            return None;
        }
        Some(match c.refs[i] {
            BIG => self.big[&pa.pfn()],
            r => r as u32,
        })
    }

    /// Adds a reference.
    pub fn get(&mut self, pa: Hpa) -> Result<(), PoolError> {
        let (_, c, i) = Self::live_slot(&mut self.chunks, pa).ok_or(PoolError::NotPoolFrame)?;
        add_ref(&mut c.refs[i], &mut self.big, pa.pfn())
    }

    /// Adds a reference to each of `pas`, searching the chunks only when a
    /// frame lies outside the last one's chunk: the entries of a table
    /// that a fork clones mostly point into a few chunks. Stops at the
    /// first frame that is not a pool frame (the earlier ones keep their
    /// new reference).
    pub fn get_each(&mut self, pas: impl IntoIterator<Item = Hpa>) -> Result<(), PoolError> {
        let mut cur: Option<(u64, &mut Chunk)> = None;
        for pa in pas {
            let pfn = pa.pfn();
            if !matches!(&cur, Some((b, c)) if pfn >= *b && ((pfn - *b) as usize) < c.len()) {
                cur = self.chunks.range_mut(..=pfn).next_back().map(|(&b, c)| (b, c));
            }
            let (b, c) = cur.as_mut().ok_or(PoolError::NotPoolFrame)?;
            let i = (pfn - *b) as usize;
            if i >= c.len() || bit(&c.gone, i) {
                return Err(PoolError::NotPoolFrame);
            }
            add_ref(&mut c.refs[i], &mut self.big, pfn)?;
        }
        Ok(())
    }

    /// Drops a reference; the last one scrubs the frame and frees it.
    /// Returns whether the frame was freed.
    pub fn put(&mut self, mem: &impl PhysMem, pa: Hpa) -> Result<bool, PoolError> {
        let (b, c, i) = Self::live_slot(&mut self.chunks, pa).ok_or(PoolError::NotPoolFrame)?;
        let r = &mut c.refs[i];
        assert!(*r > 0, "double free of pool frame {pa:?}");
        if *r == BIG {
            let n = self.big.get_mut(&pa.pfn()).unwrap();
            *n -= 1;
            if *n < BIG as u32 {
                *r = *n as u8;
                self.big.remove(&pa.pfn());
            }
            return Ok(false);
        }
        *r -= 1;
        if *r == 0 {
            mem.zero_page(pa);
            set(&mut c.free, i, true);
            c.nfree += 1;
            self.with_free.insert(b);
            self.free += 1;
            return Ok(true);
        }
        Ok(false)
    }

    /// Gives up to `max` free frames back, removing them from the pool,
    /// highest addresses first. They are zeroed (every free frame is).
    pub fn reclaim(&mut self, max: usize) -> Vec<Hpa> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(&b) = self.with_free.iter().next_back() else { break };
            let c = self.chunks.get_mut(&b).unwrap();
            while out.len() < max {
                let Some(i) = c.first_free() else { break };
                set(&mut c.free, i, false);
                set(&mut c.gone, i, true);
                c.nfree -= 1;
                c.ngone += 1;
                out.push(Hpa::from_pfn(b + i as u64));
            }
            if c.nfree == 0 {
                self.with_free.remove(&b);
            }
            if c.ngone as usize == c.len() {
                self.chunks.remove(&b);
            }
        }
        self.total -= out.len() as u64;
        self.free -= out.len() as u64;
        out
    }
}

/// Page-table and VMCS frames straight from the pool.
pub struct PoolFrames<'a, M: PhysMem> {
    pub pool: &'a mut FramePool,
    pub mem: &'a M,
}

impl<M: PhysMem> FrameAlloc for PoolFrames<'_, M> {
    fn alloc_frame(&mut self) -> Option<Hpa> {
        self.pool.alloc()
    }
    fn free_frame(&mut self, pa: Hpa) {
        let _ = self.pool.put(self.mem, pa);
    }
}

const _: () = assert!(PAGE_SIZE == 4096);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::mock::MockMem;

    #[test]
    fn donate_alloc_put() {
        let mem = MockMem::new();
        let mut p = FramePool::new();
        p.donate(Hpa(0x10_0000), 4).unwrap();
        assert_eq!((p.frames_total(), p.frames_free()), (4, 4));
        assert_eq!(p.donate(Hpa(0x10_2000), 1), Err(PoolError::AlreadyDonated));
        let a = p.alloc().unwrap();
        assert_eq!(a, Hpa(0x10_0000), "frames come out in address order");
        mem.write(a, b"secret");
        p.get(a).unwrap();
        assert_eq!(p.refs(a), Some(2));
        assert!(!p.put(&mem, a).unwrap());
        assert!(p.put(&mem, a).unwrap());
        assert!(mem.page_is_zero(a), "freed frames are scrubbed");
        assert_eq!(p.frames_free(), 4);
        assert_eq!(p.put(&mem, Hpa(0x20_0000)), Err(PoolError::NotPoolFrame));
    }

    #[test]
    fn big_reference_counts() {
        let mem = MockMem::new();
        let mut p = FramePool::new();
        p.donate(Hpa(0x10_0000), 2).unwrap();
        let a = p.alloc().unwrap();
        for _ in 0..1000 {
            p.get(a).unwrap();
        }
        assert_eq!(p.refs(a), Some(1001));
        for _ in 0..1000 {
            assert!(!p.put(&mem, a).unwrap());
        }
        assert_eq!(p.refs(a), Some(1));
        assert!(p.big.is_empty());
        assert!(p.put(&mem, a).unwrap());
        assert_eq!(p.frames_free(), 2);
    }

    #[test]
    fn get_each_counts_like_get_across_chunks() {
        let mut p = FramePool::new();
        p.donate(Hpa(0x10_0000), 3).unwrap();
        p.donate(Hpa(0x40_0000), 2).unwrap();
        let f: Vec<Hpa> = (0..5).map(|_| p.alloc().unwrap()).collect();
        // Out of order, across both chunks, one frame past its count of 254.
        for _ in 0..254 {
            p.get(f[4]).unwrap();
        }
        p.get_each([f[3], f[0], f[4], f[0], f[2], f[3]]).unwrap();
        let want = [3, 1, 2, 3, 256];
        for (a, n) in f.iter().zip(want) {
            assert_eq!(p.refs(*a), Some(n), "{a:?}");
        }
        // A frame that is not the pool's stops it there.
        assert_eq!(p.get_each([f[1], Hpa(0x20_0000), f[1]]), Err(PoolError::NotPoolFrame));
        assert_eq!(p.refs(f[1]), Some(2));
        assert_eq!(p.get_each([Hpa(0x10_3000)]), Err(PoolError::NotPoolFrame), "just past a chunk");
    }

    #[test]
    fn bookkeeping_stays_small() {
        // 1 GiB of frames: well under two bytes each.
        let mut p = FramePool::new();
        for c in 0..512u64 {
            p.donate(Hpa(0x1_0000_0000 + c * (2 << 20)), 512).unwrap();
        }
        let bytes: usize = p.chunks.values().map(|c| c.refs.len() + 8 * (c.free.len() + c.gone.len())).sum();
        assert!(bytes < 2 * 262_144, "{bytes} bytes");
        assert_eq!(p.frames_free(), 262_144);
    }

    #[test]
    fn donated_again_after_reclaim() {
        let mem = MockMem::new();
        let mut p = FramePool::new();
        p.donate(Hpa(0x10_0000), 8).unwrap();
        let held = p.alloc().unwrap();
        let back = p.reclaim(7);
        assert_eq!(p.frames_total(), 1);
        // A range across gone pages and new ones.
        p.donate(Hpa(0x10_6000), 6).unwrap();
        assert_eq!(p.frames_total(), 7);
        assert_eq!(p.donate(Hpa(0x10_0000), 2), Err(PoolError::AlreadyDonated), "0x100000 is held");
        assert_eq!(p.frames_total(), 7, "a refused donation changes nothing");
        assert!(back.contains(&Hpa(0x10_6000)));
        let mut got = Vec::new();
        while let Some(a) = p.alloc() {
            got.push(a);
        }
        assert_eq!(got.len(), 6);
        assert!(got.contains(&Hpa(0x10_b000)));
        for a in got {
            p.put(&mem, a).unwrap();
        }
        p.put(&mem, held).unwrap();
        assert_eq!(p.reclaim(usize::MAX).len(), 7);
        assert_eq!((p.frames_total(), p.frames_free()), (0, 0));
        assert!(p.chunks.is_empty());
    }

    #[test]
    fn reclaim_splits_chunks() {
        let mut p = FramePool::new();
        p.donate(Hpa(0x10_0000), 8).unwrap();
        let used = p.alloc().unwrap();
        let back = p.reclaim(3);
        assert_eq!(back.len(), 3);
        assert_eq!(p.frames_total(), 5);
        for b in &back {
            assert!(!p.contains(*b));
        }
        assert!(p.contains(used));
        assert_eq!(p.refs(used), Some(1));
        let rest = p.reclaim(100);
        assert_eq!(rest.len(), 4);
        assert_eq!(p.frames_total(), 1);
        // The returned pages can be donated again.
        p.donate(back[0], 1).unwrap();
        assert_eq!(p.frames_total(), 2);
    }
}
