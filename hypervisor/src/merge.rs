//! Re-merging: folding guest pages whose contents are identical again (or
//! all zeros) back onto one frame, so that forked VMs that wrote the same
//! data, or freed memory, stop costing a frame per page.
//!
//! A merge pass visits the VMs' private pages in chunks. For each chunk:
//!
//! 1. [`protect`]: every writable private page loses write access, in
//!    place. The caller then flushes every CPU's EPT translations, so that
//!    no vCPU can change a page while it is compared.
//! 2. [`Merger::fold`]: each page is hashed. An all-zero page is unmapped
//!    (the next touch gets a fresh zero frame); a page equal, byte for byte,
//!    to a frame already in the index is remapped read-only onto that
//!    frame; any other page joins the index. Frames that lose their last
//!    mapping are returned to the caller, which flushes the TLBs again
//!    before it frees them, since a stale translation might still read them.
//!
//! The index holds a reference to every frame in it. A frame with two
//! references is never written in place (a write copies it), so an indexed
//! frame stays immutable until [`Merger::finish`] drops those references,
//! even though the VMs that map it keep running between chunks.

use crate::addr::{Gpa, Hpa, PAGE_SIZE};
use crate::arch::x86::ept_entry::EptEntry;
use crate::guestmem::{leaf, read_only, writable, GuestMem};
use crate::mem::PhysMem;
use crate::pool::FramePool;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// What a merge pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeStats {
    /// Pages examined.
    pub scanned: u64,
    /// Pages remapped onto an identical frame.
    pub merged: u64,
    /// All-zero pages unmapped.
    pub zero: u64,
}

/// A page to examine: where its entry is, its address and its entry as it
/// was before [`protect`].
pub type Candidate = (Hpa, Gpa, EptEntry);

/// Takes write access from up to `max` private pages of `g` at or above
/// `from`. Returns them and where the next chunk starts, if anywhere. The
/// caller must flush every CPU's translations of `g` before [`Merger::fold`],
/// or, if that flush fails, give the pages back with [`unprotect`].
pub fn protect(g: &GuestMem, mem: &impl PhysMem, pool: &FramePool, from: Gpa, max: usize) -> (Vec<Candidate>, Option<Gpa>) {
    let (leaves, next) = g.private_leaves(mem, pool, from, max);
    for &(at, _, e) in leaves.iter() {
        if writable(e) {
            mem.write_u64(at, read_only(e).0);
        }
    }
    (leaves, next)
}

/// Undoes [`protect`]: every entry it changed, and that nothing changed
/// since, gets its old value back. For a chunk abandoned before any page
/// was compared (a shootdown that was not acknowledged); the caller still
/// holds the memory's lock. Returns how many entries it restored.
pub fn unprotect(mem: &impl PhysMem, cands: &[Candidate]) -> usize {
    let mut n = 0;
    for &(at, _, e) in cands {
        if writable(e) && mem.read_u64(at) == read_only(e).0 {
            mem.write_u64(at, e.0);
            n += 1;
        }
    }
    n
}

/// Words of a page that its digest covers: one in every eight, at a
/// different offset in each 64-byte line, so that a digest costs an eighth
/// of reading the page. Pages that agree on these words but not on the
/// rest meet in the index and are told apart by the full comparison
/// ([`PhysMem::pages_equal`]), which every fold makes anyway.
const SAMPLES: u64 = 64;

/// A 64-bit digest of sampled words of a page, and whether the whole page
/// is zeros (read in full only when every sampled word is zero).
fn digest(mem: &impl PhysMem, pa: Hpa) -> (u64, bool) {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut zero = true;
    for i in 0..SAMPLES {
        let v = mem.read_u64(Hpa(pa.0 + i * 64 + (i % 8) * 8));
        zero &= v == 0;
        h = (h ^ v).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(23);
    }
    if zero {
        zero = (0..PAGE_SIZE / 8).all(|w| mem.read_u64(Hpa(pa.0 + w * 8)) == 0);
    }
    (h, zero)
}

/// A digest of every word of a page, for pages whose sampled digest meets
/// a different page's.
fn full_digest(mem: &impl PhysMem, pa: Hpa) -> u64 {
    (0..PAGE_SIZE / 8).fold(0x8422_2325_cbf2_9ce4, |h: u64, w| (h ^ mem.read_u64(Hpa(pa.0 + w * 8))).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29))
}

/// Most frames the index of one pass holds: its entries live on the
/// hypervisor's small heap (some 40 bytes each). Beyond it, pages still
/// fold onto frames already indexed, and zero pages still go.
pub const INDEX_MAX: usize = 16384;

/// The index of a merge pass: content digest to frame.
#[derive(Default)]
pub struct Merger {
    index: BTreeMap<u64, Hpa>,
    pub stats: MergeStats,
}

impl Merger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds the candidates [`protect`] returned, after the TLB flush.
    /// Returns the frames whose mapping went away: the caller flushes the
    /// TLBs once more, then drops one reference to each.
    pub fn fold(&mut self, mem: &impl PhysMem, pool: &mut FramePool, cands: &[Candidate]) -> Vec<Hpa> {
        let mut dropped = Vec::new();
        for &(at, _, e) in cands {
            // The entry cannot have changed: the caller holds the memory's
            // lock. Take the current value all the same.
            let e = read_only(e);
            let e2 = EptEntry(mem.read_u64(at));
            if e2.0 != e.0 {
                continue;
            }
            let pa = Hpa(e.addr());
            self.stats.scanned += 1;
            let (h, zero) = digest(mem, pa);
            if zero {
                mem.write_u64(at, 0);
                dropped.push(pa);
                self.stats.zero += 1;
                continue;
            }
            // The sampled digest first; pages that share it with a
            // different page try a digest of the whole page (tagged so that
            // it cannot meet a sampled one), and keep apart only if that
            // collides too.
            let mut key = h;
            for round in 0..2 {
                match self.index.get(&key) {
                    Some(&c) if c == pa => {}
                    Some(&c) if mem.pages_equal(c, pa) => {
                        if pool.get(c).is_err() {
                            break;
                        }
                        mem.write_u64(at, leaf(c, false).0);
                        dropped.push(pa);
                        self.stats.merged += 1;
                    }
                    Some(_) if round == 0 => {
                        key = full_digest(mem, pa) | 1 << 63;
                        continue;
                    }
                    Some(_) => {}
                    None if self.index.len() >= INDEX_MAX => {}
                    None => {
                        if pool.get(pa).is_ok() {
                            self.index.insert(key, pa);
                        }
                    }
                }
                break;
            }
        }
        dropped
    }

    /// Frames the index holds (one pool reference each).
    pub fn indexed(&self) -> usize {
        self.index.len()
    }

    /// Ends the pass: drops the index's references. Returns how many frames
    /// that freed (those only the index still held).
    pub fn finish(self, mem: &impl PhysMem, pool: &mut FramePool) -> u64 {
        let mut freed = 0;
        for (_, pa) in self.index {
            if let Ok(true) = pool.put(mem, pa) {
                freed += 1;
            }
        }
        freed
    }
}

/// Merges every page of `vms` in one go (the host tests' driver of a
/// pass; the hypervisor runs the same steps in chunks, with TLB flushes
/// between them). Returns the stats and the frames freed.
pub fn merge_all(mem: &impl PhysMem, pool: &mut FramePool, vms: &mut [&mut GuestMem]) -> (MergeStats, u64) {
    let mut m = Merger::new();
    let mut freed = 0;
    for g in vms.iter_mut() {
        let mut from = Some(Gpa(0));
        while let Some(f) = from {
            let (cands, next) = protect(g, mem, pool, f, 64);
            for pa in m.fold(mem, pool, &cands) {
                if let Ok(true) = pool.put(mem, pa) {
                    freed += 1;
                }
            }
            from = next;
        }
    }
    let stats = m.stats;
    freed += m.finish(mem, pool);
    (stats, freed)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::mem::mock::{used, with_pool as setup};

    fn page(b: u8) -> [u8; 4096] {
        let mut p = [b; 4096];
        p[17] = b.wrapping_mul(3);
        p
    }

    #[test]
    fn identical_pages_fold_and_zero_pages_go() {
        let (mem, mut pool) = setup(256);
        let mut g = GuestMem::new(&mem, &mut pool, 16 << 20).unwrap();
        for i in 0..8u64 {
            g.write(&mem, &mut pool, Gpa(i * 4096), &page(if i < 6 { 5 } else { 9 })).unwrap();
        }
        // Two touched pages that hold zeros again.
        g.write(&mem, &mut pool, Gpa(0x10_0000), &[0; 8]).unwrap();
        g.write(&mem, &mut pool, Gpa(0x20_0000), &[0; 8]).unwrap();
        let before = used(&pool);
        let (s, freed) = merge_all(&mem, &mut pool, &mut [&mut g]);
        assert_eq!(s, MergeStats { scanned: 10, merged: 6, zero: 2 });
        assert_eq!(freed, 8);
        assert_eq!(before - used(&pool), 8);
        // Contents unchanged; merged pages are shared and read-only.
        let mut b = [0u8; 4096];
        for i in 0..8u64 {
            g.read(&mem, Gpa(i * 4096), &mut b).unwrap();
            assert_eq!(b, page(if i < 6 { 5 } else { 9 }));
        }
        assert_eq!(g.lookup(&mem, Gpa(0)).unwrap().0, g.lookup(&mem, Gpa(0x5000)).unwrap().0);
        assert!(!g.lookup(&mem, Gpa(0x3000)).unwrap().1);
        assert_eq!(g.lookup(&mem, Gpa(0x10_0000)), None);
        // A write after the merge copies: the other pages keep their data.
        g.write(&mem, &mut pool, Gpa(0x3000), &[1]).unwrap();
        g.read(&mem, Gpa(0x4000), &mut b).unwrap();
        assert_eq!(b, page(5));
        // Pages 6 and 7 share the other frame.
        let pa6 = g.lookup(&mem, Gpa(0x6000)).unwrap().0;
        let pa7 = g.lookup(&mem, Gpa(0x7000)).unwrap().0;
        assert_eq!(pa6, pa7);
        g.destroy(&mem, &mut pool);
        assert_eq!(used(&pool), 0);
    }

    #[test]
    fn forked_vms_that_wrote_the_same_data_merge_back() {
        let (mem, mut pool) = setup(2048);
        let mut p = GuestMem::new(&mem, &mut pool, 64 << 20).unwrap();
        for i in 0..64u64 {
            p.write(&mem, &mut pool, Gpa(i * 4096), &page(i as u8 + 1)).unwrap();
        }
        let alone = used(&pool);
        let mut kids: Vec<GuestMem> = (0..4).map(|_| p.fork(&mem, &mut pool).unwrap()).collect();
        // Every child writes the same new data over the same 32 pages.
        for k in kids.iter_mut() {
            for i in 0..32u64 {
                k.write(&mem, &mut pool, Gpa(i * 4096), &page(200)).unwrap();
            }
        }
        let diverged = used(&pool);
        assert!(diverged >= alone + 4 * 32);
        let mut all: Vec<&mut GuestMem> = kids.iter_mut().collect();
        all.push(&mut p);
        let (s, freed) = merge_all(&mem, &mut pool, &mut all);
        // Each child's 32 pages fold onto one frame: 4 * 32 - 1 freed.
        assert_eq!(s.merged, 4 * 32 - 1, "{s:?}");
        assert_eq!(freed, 4 * 32 - 1);
        let mut b = [0u8; 4096];
        for k in kids.iter() {
            k.read(&mem, Gpa(31 * 4096), &mut b).unwrap();
            assert_eq!(b, page(200));
            k.read(&mem, Gpa(40 * 4096), &mut b).unwrap();
            assert_eq!(b, page(41));
        }
        p.read(&mem, Gpa(0), &mut b).unwrap();
        assert_eq!(b, page(1));
        // A child's write after the merge stays its own.
        kids[0].write(&mem, &mut pool, Gpa(0), &[0xaa]).unwrap();
        kids[1].read(&mem, Gpa(0), &mut b).unwrap();
        assert_eq!(b, page(200));
        for k in kids {
            k.destroy(&mem, &mut pool);
        }
        p.destroy(&mem, &mut pool);
        assert_eq!(used(&pool), 0);
    }

    #[test]
    fn chunks_resume_where_they_stopped() {
        let (mem, mut pool) = setup(512);
        let mut g = GuestMem::new(&mem, &mut pool, 1 << 30).unwrap();
        let gpas: Vec<u64> = (0..50u64).map(|i| (i * 37 % 50) * (5 << 20) + (i % 7) * 4096).collect();
        for &a in &gpas {
            g.write(&mem, &mut pool, Gpa(a), &[1]).unwrap();
        }
        let mut seen = Vec::new();
        let mut from = Some(Gpa(0));
        while let Some(f) = from {
            let (c, next) = g.private_leaves(&mem, &pool, f, 7);
            assert!(c.len() <= 7);
            seen.extend(c.iter().map(|x| x.1 .0));
            from = next;
        }
        let mut want = gpas.clone();
        want.sort();
        assert_eq!(seen, want);
    }

    #[test]
    fn pages_alike_in_the_sampled_words_only_stay_apart() {
        let (mem, mut pool) = setup(64);
        let mut g = GuestMem::new(&mem, &mut pool, 4 << 20).unwrap();
        let a = page(4);
        let mut b = page(4);
        // Word 1 is not sampled (word 0 of line 0 is).
        b[8] ^= 0xff;
        let mut b2 = b;
        b2[16] ^= 0xff;
        let mut z = [0u8; 4096];
        z[8] = 1;
        g.write(&mem, &mut pool, Gpa(0), &a).unwrap();
        g.write(&mem, &mut pool, Gpa(0x1000), &b).unwrap();
        g.write(&mem, &mut pool, Gpa(0x2000), &a).unwrap();
        g.write(&mem, &mut pool, Gpa(0x3000), &z).unwrap();
        // Alike in the samples, and the same as each other: they still fold.
        g.write(&mem, &mut pool, Gpa(0x4000), &b).unwrap();
        // Alike in the samples, different from both: kept apart.
        g.write(&mem, &mut pool, Gpa(0x5000), &b2).unwrap();
        let mut r = [0u8; 4096];
        let (s, _) = merge_all(&mem, &mut pool, &mut [&mut g]);
        assert_eq!(s, MergeStats { scanned: 6, merged: 2, zero: 0 });
        assert_eq!(g.lookup(&mem, Gpa(0x1000)).unwrap().0, g.lookup(&mem, Gpa(0x4000)).unwrap().0);
        g.read(&mem, Gpa(0x5000), &mut r).unwrap();
        assert_eq!(r, b2);
        g.read(&mem, Gpa(0x1000), &mut r).unwrap();
        assert_eq!(r, b);
        g.read(&mem, Gpa(0x3000), &mut r).unwrap();
        assert_eq!(r, z);
        g.destroy(&mem, &mut pool);
    }

    #[test]
    fn an_abandoned_chunk_leaves_every_page_as_it_was() {
        let (mem, mut pool) = setup(64);
        let mut g = GuestMem::new(&mem, &mut pool, 4 << 20).unwrap();
        for i in 0..4u64 {
            g.write(&mem, &mut pool, Gpa(i * 4096), &page(3)).unwrap();
        }
        // One page read-only already (shared, then made private again).
        let before: Vec<_> = (0..4u64).map(|i| g.lookup(&mem, Gpa(i * 4096)).unwrap()).collect();
        let (c, _) = protect(&g, &mem, &pool, Gpa(0), 10);
        assert_eq!(c.len(), 4);
        assert!((0..4u64).all(|i| !g.lookup(&mem, Gpa(i * 4096)).unwrap().1));
        assert_eq!(unprotect(&mem, &c), 4);
        let after: Vec<_> = (0..4u64).map(|i| g.lookup(&mem, Gpa(i * 4096)).unwrap()).collect();
        assert_eq!(before, after);
        // Nothing folded, nothing freed.
        let mut b = [0u8; 4096];
        g.read(&mem, Gpa(0x3000), &mut b).unwrap();
        assert_eq!(b, page(3));
        g.destroy(&mem, &mut pool);
        assert_eq!(used(&pool), 0);
    }

    #[test]
    fn indexed_frames_stay_immutable() {
        let (mem, mut pool) = setup(64);
        let mut g = GuestMem::new(&mem, &mut pool, 4 << 20).unwrap();
        g.write(&mem, &mut pool, Gpa(0), &page(7)).unwrap();
        let mut m = Merger::new();
        let (c, _) = protect(&g, &mem, &pool, Gpa(0), 10);
        assert!(m.fold(&mem, &mut pool, &c).is_empty());
        let pa = g.lookup(&mem, Gpa(0)).unwrap().0;
        // While the pass holds the frame, a write copies it.
        g.write(&mem, &mut pool, Gpa(0), &[0]).unwrap();
        assert_ne!(g.lookup(&mem, Gpa(0)).unwrap().0, pa);
        let mut b = [0u8; 4096];
        mem.read(pa, &mut b);
        assert_eq!(b, page(7));
        assert_eq!(m.finish(&mem, &mut pool), 1);
        g.destroy(&mem, &mut pool);
        assert_eq!(used(&pool), 0);
    }
}
