//! The frame pool: pages the host donated, each with a reference count.
//!
//! Every pool frame is owned by the hypervisor, out of the host's EPT (and
//! IOMMU tables). A frame is free (count 0, always zeroed), or mapped by one
//! or more guest mappings or used as a page-table or VMCS page. Freed frames
//! are scrubbed before they are reused or returned to the host.

use crate::addr::{Hpa, PAGE_SIZE};
use crate::mem::{FrameAlloc, PhysMem};
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// A run of donated pages.
struct Chunk {
    refs: Vec<u32>,
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
    chunks: BTreeMap<u64, Chunk>,
    free: Vec<Hpa>,
    total: u64,
}

impl FramePool {
    pub const fn new() -> Self {
        FramePool { chunks: BTreeMap::new(), free: Vec::new(), total: 0 }
    }

    pub fn frames_total(&self) -> u64 {
        self.total
    }

    pub fn frames_free(&self) -> u64 {
        self.free.len() as u64
    }

    /// Frames mapped more than once (shared copy-on-write).
    pub fn frames_shared(&self) -> u64 {
        self.chunks.values().flat_map(|c| c.refs.iter()).filter(|&&r| r > 1).count() as u64
    }

    fn slot(&self, pa: Hpa) -> Option<(u64, usize)> {
        let pfn = pa.pfn();
        let (&base, c) = self.chunks.range(..=pfn).next_back()?;
        let i = (pfn - base) as usize;
        (i < c.refs.len()).then_some((base, i))
    }

    /// Whether `pa` is a pool frame.
    pub fn contains(&self, pa: Hpa) -> bool {
        self.slot(pa).is_some()
    }

    /// Adds `n` pages starting at `base` (already zeroed and out of the
    /// host's reach) to the pool.
    pub fn donate(&mut self, base: Hpa, n: usize) -> Result<(), PoolError> {
        let first = base.pfn();
        let last = first + n as u64 - 1;
        if self.chunks.range(..=last).next_back().map(|(&b, c)| b + c.refs.len() as u64 > first).unwrap_or(false) {
            return Err(PoolError::AlreadyDonated);
        }
        self.chunks.insert(first, Chunk { refs: alloc::vec![0; n] });
        for i in (0..n as u64).rev() {
            self.free.push(Hpa::from_pfn(first + i));
        }
        self.total += n as u64;
        Ok(())
    }

    /// Takes a free frame (zeroed) with one reference.
    pub fn alloc(&mut self) -> Option<Hpa> {
        let pa = self.free.pop()?;
        let (b, i) = self.slot(pa).expect("free frame outside the pool");
        self.chunks.get_mut(&b).unwrap().refs[i] = 1;
        Some(pa)
    }

    /// The reference count of `pa`.
    pub fn refs(&self, pa: Hpa) -> Option<u32> {
        let (b, i) = self.slot(pa)?;
        Some(self.chunks[&b].refs[i])
    }

    /// Adds a reference.
    pub fn get(&mut self, pa: Hpa) -> Result<(), PoolError> {
        let (b, i) = self.slot(pa).ok_or(PoolError::NotPoolFrame)?;
        let r = &mut self.chunks.get_mut(&b).unwrap().refs[i];
        debug_assert!(*r > 0, "reference to a free frame");
        *r = r.checked_add(1).ok_or(PoolError::RefOverflow)?;
        Ok(())
    }

    /// Drops a reference; the last one scrubs the frame and frees it.
    /// Returns whether the frame was freed.
    pub fn put(&mut self, mem: &impl PhysMem, pa: Hpa) -> Result<bool, PoolError> {
        let (b, i) = self.slot(pa).ok_or(PoolError::NotPoolFrame)?;
        let r = &mut self.chunks.get_mut(&b).unwrap().refs[i];
        assert!(*r > 0, "double free of pool frame {pa:?}");
        *r -= 1;
        if *r == 0 {
            mem.zero_page(pa);
            self.free.push(pa);
            return Ok(true);
        }
        Ok(false)
    }

    /// Gives up to `max` free frames back, removing them from the pool.
    /// They are zeroed (every free frame is).
    pub fn reclaim(&mut self, max: usize) -> Vec<Hpa> {
        let mut out = Vec::new();
        let mut keep = Vec::new();
        while out.len() < max {
            let Some(pa) = self.free.pop() else { break };
            out.push(pa);
        }
        for &pa in &out {
            let (b, i) = self.slot(pa).unwrap();
            let c = self.chunks.get_mut(&b).unwrap();
            // Split the chunk around the page.
            let tail: Vec<u32> = c.refs.split_off(i + 1);
            c.refs.pop();
            let head_empty = c.refs.is_empty();
            if !tail.is_empty() {
                self.chunks.insert(pa.pfn() + 1, Chunk { refs: tail });
            }
            if head_empty {
                self.chunks.remove(&b);
            }
            self.total -= 1;
        }
        keep.append(&mut self.free);
        self.free = keep;
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
