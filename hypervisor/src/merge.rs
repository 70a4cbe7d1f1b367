//! Re-merging: folding guest pages whose contents are identical again (or
//! all zeros) back onto one frame, so that forked VMs that wrote the same
//! data, or freed memory, stop costing a frame per page.
//!
//! A merge pass visits the VMs' private pages in chunks. For each chunk:
//!
//! 1. [`protect`]: every writable private page loses write access, in
//!    place. The caller then flushes every CPU's EPT translations, so that
//!    no vCPU can change a page while it is compared.
//! 2. [`Merger::fold`]: a page that an earlier pass mapped onto a stable
//!    frame is skipped unread; each other page is hashed. An all-zero page
//!    is unmapped (the next touch gets a fresh zero frame); a page equal,
//!    byte for byte, to a frame already in the index is remapped read-only
//!    onto that frame; any other page joins the index. Frames that lose
//!    their last mapping are returned to the caller, which flushes the TLBs
//!    again before it frees them, since a stale translation might still
//!    read them.
//!
//! The index ([`Index`], in pool frames) holds a reference to every frame
//! in it. A frame with two references is never written in place (a write
//! copies it), so an indexed frame stays immutable while it is indexed,
//! even though the VMs that map it keep running between chunks.
//! [`Merger::finish`] keeps the merged frames indexed for the next pass
//! (stable) and lets go of the others.

use crate::addr::{Gpa, Hpa, PAGE_SIZE};
use crate::arch::x86::ept_entry::{EptEntry, EptFlags};
use crate::guestmem::{leaf, read_only, writable, GuestMem};
use crate::mem::PhysMem;
use crate::pool::FramePool;
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
    /// Pages left alone, unread, because an earlier pass mapped them onto
    /// a frame that is still merged (counted in `scanned`).
    pub skipped: u64,
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
    let mut any = 0;
    // Sample `i` is word `i % 8` of line `i`: in each 512-byte block, word
    // k of line k, 72 bytes apart, constant offsets the compiler unrolls.
    for block in 0..SAMPLES / 8 {
        for k in 0..8 {
            let v = mem.read_u64(Hpa(pa.0 + block * 512 + k * 72));
            any |= v;
            h = (h ^ v).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(23);
        }
    }
    let mut zero = any == 0;
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

/// Slots in one frame of the index: a key word and a frame word each.
const SLOTS_PER_FRAME: usize = (PAGE_SIZE / 16) as usize;

/// Most pool frames the index's table takes: 2^22 slots, room for some
/// three million frames at the most the table is filled (three quarters).
pub const INDEX_FRAMES_MAX: usize = 16384;

/// Most hypervisor heap bytes the index takes: its list of table frames,
/// one address each. Everything else of it lives in pool frames.
pub const INDEX_HEAP_MAX: u64 = INDEX_FRAMES_MAX as u64 * 8;

/// A slot's frame word: empty.
const EMPTY: u64 = 0;
/// A slot's frame word: an entry was deleted here (lookups go on past it).
const TOMB: u64 = 1;
/// Frame-word flags of a live entry: live, and stable (the frame is
/// merged: shared by more than one mapping, so nothing writes it in place).
const LIVE: u64 = 2;
const STABLE: u64 = 4;

/// A content index, digest to frame, in pool frames: an open-addressing
/// hash table (linear probing) of 16-byte slots, 256 to a frame. Each
/// entry holds one pool reference to its frame, so that an indexed frame
/// is never written in place (a write copies it). Only the list of table
/// frames is on the heap ([`INDEX_HEAP_MAX`] at most).
///
/// The index outlives a pass: at its end ([`Merger::finish`]) the entries
/// whose frames are merged stay, as KSM's stable tree does, and the
/// others go (KSM's unstable tree).
#[derive(Default)]
pub struct Index {
    /// The table's frames; their slot count is a power of two (or zero).
    frames: Vec<Hpa>,
    /// Live entries, stable ones among them, and tombstones.
    len: usize,
    stable: usize,
    tombs: usize,
    /// The most heap bytes it ever took: both lists of frames while the
    /// table is rehashed.
    peak: u64,
}

impl Index {
    pub const fn new() -> Self {
        Index {
            frames: Vec::new(),
            len: 0,
            stable: 0,
            tombs: 0,
            peak: 0,
        }
    }

    fn cap(&self) -> usize {
        self.frames.len() * SLOTS_PER_FRAME
    }

    fn slot_at(&self, i: usize) -> Hpa {
        Hpa(self.frames[i / SLOTS_PER_FRAME].0 + (i % SLOTS_PER_FRAME) as u64 * 16)
    }

    fn home(&self, key: u64) -> usize {
        // The digests are hashes already; the multiply spreads their high
        // bits, which pick the slot.
        let bits = self.cap().trailing_zeros();
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - bits)) as usize
    }

    /// The entry for `key`: its slot, frame and whether it is stable.
    fn find(&self, mem: &impl PhysMem, key: u64) -> Option<(usize, Hpa, bool)> {
        if self.cap() == 0 {
            return None;
        }
        let mask = self.cap() - 1;
        let mut i = self.home(key);
        loop {
            let at = self.slot_at(i);
            let v = mem.read_u64(Hpa(at.0 + 8));
            if v == EMPTY {
                return None;
            }
            if v & LIVE != 0 && mem.read_u64(at) == key {
                return Some((i, Hpa(v & !(PAGE_SIZE - 1)), v & STABLE != 0));
            }
            i = (i + 1) & mask;
        }
    }

    /// Writes an entry into the first free slot from `key`'s home (the
    /// caller knows the key is absent and a slot is free).
    fn put_slot(&mut self, mem: &impl PhysMem, key: u64, v: u64) {
        let mask = self.cap() - 1;
        let mut i = self.home(key);
        loop {
            let at = self.slot_at(i);
            let old = mem.read_u64(Hpa(at.0 + 8));
            if old == EMPTY || old == TOMB {
                if old == TOMB {
                    self.tombs -= 1;
                }
                mem.write_u64(at, key);
                mem.write_u64(Hpa(at.0 + 8), v);
                return;
            }
            i = (i + 1) & mask;
        }
    }

    /// Moves every entry into a new table of `frames` frames (a power of
    /// two), dropping the tombstones. False, and nothing changed, if the
    /// pool is short.
    fn rehash(&mut self, mem: &impl PhysMem, pool: &mut FramePool, frames: usize) -> bool {
        let mut new = Vec::new();
        if new.try_reserve_exact(frames).is_err() {
            return false;
        }
        for _ in 0..frames {
            match pool.alloc() {
                Some(f) => new.push(f),
                None => {
                    for f in new {
                        let _ = pool.put(mem, f);
                    }
                    return false;
                }
            }
        }
        let old = core::mem::replace(&mut self.frames, new);
        self.peak = self.peak.max((old.capacity() + self.frames.capacity()) as u64 * 8);
        self.tombs = 0;
        for &f in &old {
            for s in 0..SLOTS_PER_FRAME as u64 {
                let at = Hpa(f.0 + s * 16);
                let v = mem.read_u64(Hpa(at.0 + 8));
                if v & LIVE != 0 {
                    self.put_slot(mem, mem.read_u64(at), v);
                }
            }
            let _ = pool.put(mem, f);
        }
        true
    }

    /// Adds an entry for `pa` (which gets a pool reference), growing the
    /// table if it is three quarters full. False if the table cannot grow
    /// (the pool is short, or it is at [`INDEX_FRAMES_MAX`]): the page
    /// stays out of the index.
    fn insert(
        &mut self,
        mem: &impl PhysMem,
        pool: &mut FramePool,
        key: u64,
        pa: Hpa,
        stable: bool,
    ) -> bool {
        if (self.len + self.tombs + 1) * 4 > self.cap() * 3 {
            // Twice the live entries' need, or the same size without the
            // tombstones.
            let want = ((self.len + 1) * 2)
                .div_ceil(SLOTS_PER_FRAME)
                .next_power_of_two()
                .max(self.frames.len());
            if want > INDEX_FRAMES_MAX || !self.rehash(mem, pool, want) {
                return false;
            }
        }
        if pool.get(pa).is_err() {
            return false;
        }
        self.put_slot(mem, key, pa.0 | LIVE | if stable { STABLE } else { 0 });
        self.len += 1;
        self.stable += stable as usize;
        true
    }

    fn make_stable(&mut self, mem: &impl PhysMem, slot: usize) {
        let at = Hpa(self.slot_at(slot).0 + 8);
        let v = mem.read_u64(at);
        if v & STABLE == 0 {
            mem.write_u64(at, v | STABLE);
            self.stable += 1;
        }
    }

    /// Keeps the entries `keep` says to keep (given the frame's reference
    /// count and whether the entry is stable; it returns whether the entry
    /// stays, and then whether it is stable), drops the others' references,
    /// and shrinks the table if it is mostly empty. Returns how many frames
    /// that freed (those only the index held).
    fn retain(
        &mut self,
        mem: &impl PhysMem,
        pool: &mut FramePool,
        keep: impl Fn(u32, bool) -> Option<bool>,
    ) -> u64 {
        let mut freed = 0;
        self.stable = 0;
        for i in 0..self.cap() {
            let at = Hpa(self.slot_at(i).0 + 8);
            let v = mem.read_u64(at);
            if v & LIVE == 0 {
                continue;
            }
            let pa = Hpa(v & !(PAGE_SIZE - 1));
            match keep(pool.refs(pa).unwrap_or(0), v & STABLE != 0) {
                Some(stable) => {
                    mem.write_u64(at, if stable { v | STABLE } else { v & !STABLE });
                    self.stable += stable as usize;
                }
                None => {
                    mem.write_u64(at, TOMB);
                    self.len -= 1;
                    self.tombs += 1;
                    if let Ok(true) = pool.put(mem, pa) {
                        freed += 1;
                    }
                }
            }
        }
        if self.len == 0 {
            for f in core::mem::take(&mut self.frames) {
                let _ = pool.put(mem, f);
            }
            self.tombs = 0;
        } else if self.tombs > 0 {
            // Without the tombstones, and at most half full; kept as it is
            // if the pool is short.
            let want = (self.len * 2).div_ceil(SLOTS_PER_FRAME).next_power_of_two();
            self.rehash(mem, pool, want);
        }
        freed
    }

    /// Drops the entries whose frames nothing but the index holds any more
    /// (their VMs are gone), and the table if no entry is left. Returns how
    /// many frames that freed besides the table's own.
    pub fn drop_unmapped(&mut self, mem: &impl PhysMem, pool: &mut FramePool) -> u64 {
        self.retain(mem, pool, |refs, stable| (refs >= 2).then_some(stable))
    }

    /// Drops every entry and the table. Returns how many frames that freed
    /// besides the table's own.
    pub fn clear(&mut self, mem: &impl PhysMem, pool: &mut FramePool) -> u64 {
        self.retain(mem, pool, |_, _| None)
    }

    /// Entries (one pool reference each).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries whose frames are merged: the stable part.
    pub fn stable(&self) -> usize {
        self.stable
    }

    /// Pool frames the table takes.
    pub fn table_frames(&self) -> usize {
        self.frames.len()
    }

    /// Heap bytes the index takes (at most [`INDEX_HEAP_MAX`]).
    pub fn heap_bytes(&self) -> u64 {
        self.frames.capacity() as u64 * 8
    }

    /// The most heap bytes it ever took (at most one and a half times
    /// [`INDEX_HEAP_MAX`], while the table doubles).
    pub fn peak_heap_bytes(&self) -> u64 {
        self.peak
    }
}

/// A merge pass: its figures, over the index it inherits from the last.
#[derive(Default)]
pub struct Merger {
    pub index: Index,
    pub stats: MergeStats,
}

impl Merger {
    /// A pass with an empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// A pass over the index an earlier pass left.
    pub fn with_index(index: Index) -> Self {
        Merger {
            index,
            stats: MergeStats::default(),
        }
    }

    /// Folds the candidates [`protect`] returned, after the TLB flush.
    /// Returns the frames whose mapping went away: the caller flushes the
    /// TLBs once more, then drops one reference to each.
    pub fn fold(
        &mut self,
        mem: &impl PhysMem,
        pool: &mut FramePool,
        cands: &[Candidate],
    ) -> Vec<Hpa> {
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
            // A page that a merge mapped onto a stable frame, still shared:
            // nothing to do, and no need to read it. (Once the index lets
            // go of that frame, fewer than two references are left.)
            if e.flags().contains(EptFlags::SW_MERGED) && pool.refs(pa).is_some_and(|r| r >= 2) {
                self.stats.skipped += 1;
                continue;
            }
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
            let mut key = h & !(1 << 63);
            for round in 0..2 {
                match self.index.find(mem, key) {
                    Some((slot, c, stable)) if c == pa => {
                        // Mapped onto an indexed frame already: if it is
                        // merged, later passes may skip this page.
                        if stable || pool.refs(c).is_some_and(|r| r > 2) {
                            self.index.make_stable(mem, slot);
                            mem.write_u64(at, merged_leaf(c).0);
                        }
                    }
                    Some((slot, c, _)) if mem.pages_equal(c, pa) => {
                        if pool.get(c).is_err() {
                            break;
                        }
                        self.index.make_stable(mem, slot);
                        mem.write_u64(at, merged_leaf(c).0);
                        dropped.push(pa);
                        self.stats.merged += 1;
                    }
                    Some(_) if round == 0 => {
                        key = full_digest(mem, pa) | 1 << 63;
                        continue;
                    }
                    Some(_) => {}
                    None => {
                        // A frame shared already (forks) is as immutable
                        // as a merged one.
                        let shared = pool.refs(pa).is_some_and(|r| r >= 2);
                        if self.index.insert(mem, pool, key, pa, shared) && shared {
                            mem.write_u64(at, merged_leaf(pa).0);
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

    /// Ends the pass. The index keeps the frames that are merged (two
    /// mappings or more besides its own reference), stable for the next
    /// pass, and lets go of the others. Returns how many frames that freed
    /// (those only the index still held) and the index to hand the next
    /// pass; the pass keeps its stats.
    pub fn finish(&mut self, mem: &impl PhysMem, pool: &mut FramePool) -> (u64, Index) {
        let freed = self.index.retain(mem, pool, |refs, _| (refs >= 3).then_some(true));
        (freed, core::mem::take(&mut self.index))
    }
}

/// The read-only leaf of a page that a merge mapped onto a stable frame.
fn merged_leaf(pa: Hpa) -> EptEntry {
    leaf(pa, false).with_flags(EptFlags::SW_MERGED, EptFlags::empty())
}

/// One pass over every page of `vms`, in one go, over the index an
/// earlier pass left (the host tests' driver of a pass; the hypervisor runs
/// the same steps in chunks, with TLB flushes between them). Returns the
/// stats, the frames freed and the index for the next pass.
pub fn merge_pass(
    mem: &impl PhysMem,
    pool: &mut FramePool,
    vms: &mut [&mut GuestMem],
    index: Index,
) -> (MergeStats, u64, Index) {
    let mut m = Merger::with_index(index);
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
    let (f, index) = m.finish(mem, pool);
    (stats, freed + f, index)
}

/// One pass with a fresh index, which it drops at the end. Returns the
/// stats and the frames freed.
pub fn merge_all(
    mem: &impl PhysMem,
    pool: &mut FramePool,
    vms: &mut [&mut GuestMem],
) -> (MergeStats, u64) {
    let (stats, freed, mut index) = merge_pass(mem, pool, vms, Index::default());
    (stats, freed + index.clear(mem, pool))
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
        assert_eq!(s, MergeStats { scanned: 10, merged: 6, zero: 2, skipped: 0 });
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
        assert_eq!(s, MergeStats { scanned: 6, merged: 2, zero: 0, skipped: 0 });
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
        let (freed, index) = m.finish(&mem, &mut pool);
        assert_eq!((freed, index.len(), index.table_frames()), (1, 0, 0));
        g.destroy(&mem, &mut pool);
        assert_eq!(used(&pool), 0);
    }

    #[test]
    fn merged_frames_stay_indexed_between_passes_until_their_vms_go() {
        let (mem, mut pool) = setup(256);
        let mut a = GuestMem::new(&mem, &mut pool, 4 << 20).unwrap();
        let mut b = GuestMem::new(&mem, &mut pool, 4 << 20).unwrap();
        for i in 0..4u64 {
            a.write(&mem, &mut pool, Gpa(i * 4096), &page(3)).unwrap();
            b.write(&mem, &mut pool, Gpa(i * 4096), &page(3)).unwrap();
        }
        b.write(&mem, &mut pool, Gpa(0x10_0000), &page(4)).unwrap();
        let (s, _, index) = merge_pass(&mem, &mut pool, &mut [&mut a, &mut b], Index::new());
        assert_eq!((s.scanned, s.merged, s.skipped), (9, 7, 0));
        // The unique page's entry went at the end of the pass.
        assert_eq!((index.len(), index.stable()), (1, 1));
        // The pages a merge remapped are skipped unread; the first page,
        // whose frame the others now share, is marked on the way.
        let (s, _, index) = merge_pass(&mem, &mut pool, &mut [&mut a, &mut b], index);
        assert_eq!((s.scanned, s.merged, s.skipped), (9, 0, 7));
        let (s, _, mut index) = merge_pass(&mem, &mut pool, &mut [&mut a, &mut b], index);
        assert_eq!((s.scanned, s.merged, s.skipped), (9, 0, 8));
        // A write copies the shared page; the others keep the contents.
        b.write(&mem, &mut pool, Gpa(0x2000), &[9]).unwrap();
        let mut r = [0u8; 4096];
        a.read(&mem, Gpa(0x2000), &mut r).unwrap();
        assert_eq!(r, page(3));
        // With both VMs gone, only the index holds the frame: it goes, and
        // the table with it.
        a.destroy(&mem, &mut pool);
        b.destroy(&mem, &mut pool);
        assert_eq!(used(&pool), 1 + index.table_frames() as u64);
        assert_eq!(index.drop_unmapped(&mem, &mut pool), 1);
        assert_eq!((index.len(), index.table_frames()), (0, 0));
        assert_eq!(used(&pool), 0);
    }

    /// Memory for a million-page test: a frame holds zeros, a generated
    /// page named by a tag (compared by tag, read word by word), or bytes
    /// (tables, the index). Counts the words read.
    mod big {
        use super::*;
        use std::cell::{Cell, RefCell};

        pub const BASE: u64 = 0x1_0000_0000;

        #[derive(Clone)]
        enum Frame {
            Zero,
            Tag(u32),
            Bytes(Box<[u64; 512]>),
        }

        pub struct TagMem {
            frames: RefCell<Vec<Frame>>,
            pub words_read: Cell<u64>,
        }

        fn word(tag: u32, w: u64) -> u64 {
            // splitmix64 of the tag and the word's place; never zero.
            let mut z = ((tag as u64) << 9 | w).wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) | 1
        }

        impl TagMem {
            pub fn new(frames: usize) -> Self {
                TagMem {
                    frames: RefCell::new(vec![Frame::Zero; frames]),
                    words_read: Cell::new(0),
                }
            }
            fn at(pa: Hpa) -> (usize, usize) {
                (
                    ((pa.0 - BASE) / PAGE_SIZE) as usize,
                    ((pa.0 % PAGE_SIZE) / 8) as usize,
                )
            }
            pub fn set_tag(&self, pa: Hpa, tag: u32) {
                self.frames.borrow_mut()[Self::at(pa).0] = Frame::Tag(tag);
            }
            pub fn tag(&self, pa: Hpa) -> Option<u32> {
                match self.frames.borrow()[Self::at(pa).0] {
                    Frame::Tag(t) => Some(t),
                    _ => None,
                }
            }
        }

        impl PhysMem for TagMem {
            fn read(&self, pa: Hpa, buf: &mut [u8]) {
                for (i, b) in buf.iter_mut().enumerate() {
                    let a = pa.0 + i as u64;
                    *b = (self.read_u64(Hpa(a & !7)) >> (8 * (a & 7))) as u8;
                }
            }
            fn write(&self, pa: Hpa, buf: &[u8]) {
                for (i, b) in buf.iter().enumerate() {
                    let a = pa.0 + i as u64;
                    let shift = 8 * (a & 7);
                    let w = self.read_u64(Hpa(a & !7)) & !(0xff << shift) | (*b as u64) << shift;
                    self.write_u64(Hpa(a & !7), w);
                }
            }
            fn read_u64(&self, pa: Hpa) -> u64 {
                self.words_read.set(self.words_read.get() + 1);
                let (f, w) = Self::at(pa);
                match &self.frames.borrow()[f] {
                    Frame::Zero => 0,
                    Frame::Tag(t) => word(*t, w as u64),
                    Frame::Bytes(b) => b[w],
                }
            }
            fn write_u64(&self, pa: Hpa, v: u64) {
                let (f, w) = Self::at(pa);
                let mut frames = self.frames.borrow_mut();
                let bytes = match &frames[f] {
                    Frame::Bytes(_) => None,
                    Frame::Zero => Some(Box::new([0; 512])),
                    Frame::Tag(t) => Some(Box::new(core::array::from_fn(|i| word(*t, i as u64)))),
                };
                if let Some(b) = bytes {
                    frames[f] = Frame::Bytes(b);
                }
                if let Frame::Bytes(b) = &mut frames[f] {
                    b[w] = v;
                }
            }
            fn zero_page(&self, pa: Hpa) {
                self.frames.borrow_mut()[Self::at(pa).0] = Frame::Zero;
            }
            fn copy_page(&self, dst: Hpa, src: Hpa) {
                let mut frames = self.frames.borrow_mut();
                frames[Self::at(dst).0] = frames[Self::at(src).0].clone();
            }
            fn pages_equal(&self, a: Hpa, b: Hpa) -> bool {
                match (self.tag(a), self.tag(b)) {
                    (Some(x), Some(y)) => x == y,
                    _ => (0..512).all(|w| {
                        self.read_u64(Hpa(a.0 + w * 8)) == self.read_u64(Hpa(b.0 + w * 8))
                    }),
                }
            }
        }
    }

    /// Acceptance 5: one pass over a million guest pages (4 GiB, eight
    /// guests of 512 MiB, every page private and touched) folds every
    /// duplicate and drops every zero page, with the index's heap within
    /// [`INDEX_HEAP_MAX`]; a second pass over the unchanged memory skips
    /// every merged page unread. Some 5 s in an optimised build, far more
    /// in a debug one: `cargo xtask merge-scale` runs it (release); plain
    /// `cargo test` runs the same check at a sixteenth of the size.
    #[test]
    #[cfg_attr(
        debug_assertions,
        ignore = "a million pages: `cargo xtask merge-scale` and `cargo xtask test` run it optimised"
    )]
    fn a_million_pages_in_one_pass_with_a_bounded_heap() {
        scale(8, 1 << 17);
    }

    #[test]
    fn a_sixteenth_of_a_million_pages() {
        scale(8, 1 << 13);
    }

    /// One pass, then a second over unchanged memory, over `guests` guests
    /// of `pages` touched pages each.
    fn scale(guests: u64, pages: u64) {
        use big::{TagMem, BASE};
        const SHARED_TAGS: u64 = 1024;
        let frames = (guests * pages) as usize + 16384;
        let mem = TagMem::new(frames);
        let mut pool = FramePool::new();
        // Donated 2 MiB at a time, as the host does.
        for c in 0..frames as u64 / 512 {
            pool.donate(Hpa(BASE + c * (2 << 20)), 512).unwrap();
        }
        // In every guest: a quarter of the pages hold one of 4096 contents
        // that every guest has, a quarter hold zeros again, half are unique.
        let tag = |g: u64, i: u64| -> Option<u32> {
            match i % 4 {
                0 => Some((i / 4 % SHARED_TAGS) as u32 + 1),
                2 => None,
                _ => Some((SHARED_TAGS + 1 + g * pages + i) as u32),
            }
        };
        let mut vms: Vec<GuestMem> = Vec::new();
        for g in 0..guests {
            let mut m = GuestMem::new(&mem, &mut pool, pages * PAGE_SIZE).unwrap();
            for i in 0..pages {
                m.ensure_writable(&mem, &mut pool, Gpa(i * PAGE_SIZE))
                    .unwrap();
                if let Some(t) = tag(g, i) {
                    mem.set_tag(m.lookup(&mem, Gpa(i * PAGE_SIZE)).unwrap().0, t);
                }
            }
            vms.push(m);
        }
        let total = guests * pages;
        let shared = total / 4;
        let used0 = used(&pool);
        mem.words_read.set(0);
        let mut all: Vec<&mut GuestMem> = vms.iter_mut().collect();
        let (s1, freed1, index) = merge_pass(&mem, &mut pool, &mut all, Index::new());
        let words1 = mem.words_read.get();
        assert_eq!(s1.scanned, total);
        assert_eq!(s1.zero, total / 4);
        assert_eq!(
            s1.merged,
            shared - SHARED_TAGS,
            "every duplicate folds: 100% of ideal"
        );
        assert_eq!(s1.skipped, 0);
        assert_eq!(
            index.len() as u64,
            SHARED_TAGS,
            "the merged frames stay, stable"
        );
        assert_eq!(index.stable(), index.len());
        assert!(index.heap_bytes() <= INDEX_HEAP_MAX);
        assert_eq!(used0 - used(&pool), freed1 - index.table_frames() as u64);
        assert_eq!(freed1, total / 4 + shared - SHARED_TAGS);
        // The second pass, over unchanged memory: every merged page is
        // skipped unread; only the unique ones are digested again.
        mem.words_read.set(0);
        let mut all: Vec<&mut GuestMem> = vms.iter_mut().collect();
        let (s2, freed2, mut index) = merge_pass(&mem, &mut pool, &mut all, index);
        let words2 = mem.words_read.get();
        assert_eq!(s2.scanned, total - total / 4);
        assert_eq!((s2.merged, s2.zero, freed2), (0, 0, 0));
        assert!(s2.skipped >= shared - SHARED_TAGS, "{s2:?}");
        assert!(index.heap_bytes() <= INDEX_HEAP_MAX);
        assert!(index.peak_heap_bytes() <= INDEX_HEAP_MAX * 3 / 2);
        eprintln!(
            "{total} pages: words read per page: first pass {}, second {}; index heap at most {} bytes, {} after the passes",
            words1 / s1.scanned,
            words2 / s2.scanned,
            index.peak_heap_bytes(),
            index.heap_bytes()
        );
        assert!(
            words2 * 2 < words1,
            "second pass {words2} words, first {words1}"
        );
        // Contents intact.
        for (g, m) in vms.iter().enumerate() {
            for i in (0..pages).step_by(97) {
                let e = m.lookup(&mem, Gpa(i * PAGE_SIZE));
                assert_eq!(
                    e.and_then(|(pa, _)| mem.tag(pa)),
                    tag(g as u64, i),
                    "guest {g} page {i}"
                );
            }
        }
        index.clear(&mem, &mut pool);
        for m in vms {
            m.destroy(&mem, &mut pool);
        }
        assert_eq!(used(&pool), 0);
    }
}
