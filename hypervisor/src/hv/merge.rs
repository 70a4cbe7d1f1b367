//! Re-merging passes (`hc::MERGE`), in bounded chunks: each hypercall
//! works on at most [`MERGE_CHUNK`] pages of one VM, so that neither the
//! calling CPU nor a vCPU waiting for the VM's memory lock stays out of the
//! host for long. The pass and its index live here between calls. The
//! steps are the portable [`crate::merge`]'s, with the TLB flushes they
//! call for.
//!
//! A flush that a CPU does not acknowledge in time aborts the chunk: the
//! first one (after [`protect`]) comes before any page is compared, so the
//! chunk gives every page its write access back and the pass stays where
//! it was; the second one (before frames whose mapping went away are
//! freed) keeps those frames until a later shootdown succeeds.
//!
//! The index outlives the pass: its stable part (merged frames) waits here
//! for the next one, and goes when the last VM does.

use super::memory::DirectMap;
use super::tlb;
use super::vm::{self, POOL};
use crate::addr::Gpa;
use crate::guestmem::writable;
use crate::merge::{protect, unprotect, Index, MergeStats, Merger};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use shared_abi::MERGE_CHUNK;

/// A pass in progress.
struct Pass {
    merger: Merger,
    /// VMs still to visit, in order; the first is being visited.
    vms: Vec<u32>,
    from: Gpa,
    freed: u64,
    tsc: u64,
    aborted: u32,
    /// Whether the pass had any VM to visit (only those count in `stats`).
    counted: bool,
}

/// The pass in progress, if any, and the index between passes.
struct State {
    pass: Option<Pass>,
    index: Index,
}

static PASS: spin::Mutex<State> = spin::Mutex::new(State { pass: None, index: Index::new() });

/// Totals over every pass, for `stats`.
pub static SCANNED: AtomicU64 = AtomicU64::new(0);
pub static MERGED: AtomicU64 = AtomicU64::new(0);
pub static ZERO: AtomicU64 = AtomicU64::new(0);
pub static PASSES: AtomicU64 = AtomicU64::new(0);
pub static ABORTED: AtomicU64 = AtomicU64::new(0);
pub static TSC: AtomicU64 = AtomicU64::new(0);
/// Pages skipped, unread, as mapped onto a stable frame already.
pub static SKIPPED: AtomicU64 = AtomicU64::new(0);
/// Frames the index holds (one reference each), those of them that are
/// stable, the pool frames of its table and its heap bytes.
pub static INDEXED: AtomicU64 = AtomicU64::new(0);
pub static STABLE: AtomicU64 = AtomicU64::new(0);
pub static INDEX_FRAMES: AtomicU64 = AtomicU64::new(0);
pub static INDEX_HEAP: AtomicU64 = AtomicU64::new(0);

/// Publishes the index's figures for `stats`.
fn publish(index: &Index) {
    INDEXED.store(index.len() as u64, Ordering::Relaxed);
    STABLE.store(index.stable() as u64, Ordering::Relaxed);
    INDEX_FRAMES.store(index.table_frames() as u64, Ordering::Relaxed);
    INDEX_HEAP.store(index.heap_bytes(), Ordering::Relaxed);
}

/// Ends the pass in `st`, if any: its index keeps the stable entries for
/// the next. Returns the pass and the frames that freed.
fn finish(st: &mut State) -> Option<(Pass, u64)> {
    let mut p = st.pass.take()?;
    let (freed, index) = p.merger.finish(&DirectMap, &mut POOL.lock());
    st.index = index;
    publish(&st.index);
    Some((p, freed))
}

/// Where a pass stands after a chunk.
pub struct Progress {
    pub stats: MergeStats,
    pub freed: u64,
    pub tsc: u64,
    pub aborted: u32,
}

/// What a chunk did.
pub enum Step {
    /// More to do.
    More(Progress),
    /// A shootdown was not acknowledged: the chunk left every page as it
    /// was, and the pass stays where it was.
    Aborted(Progress),
    /// The pass is over.
    Done(Progress),
}

fn progress(p: &Pass) -> Progress {
    Progress { stats: p.merger.stats, freed: p.freed, tsc: p.tsc, aborted: p.aborted }
}

/// Starts a pass over `vm` (0: every VM), dropping any unfinished one.
pub fn start(vm: u32) -> Result<(), vm::VmError> {
    let vms = if vm == 0 {
        vm::ids()
    } else {
        vm::get(vm)?;
        alloc::vec![vm]
    };
    let counted = !vms.is_empty();
    let mut st = PASS.lock();
    finish(&mut st);
    let merger = Merger::with_index(core::mem::take(&mut st.index));
    st.pass = Some(Pass { merger, vms, from: Gpa(0), freed: 0, tsc: 0, aborted: 0, counted });
    Ok(())
}

/// Ends the running pass, if any, without another chunk: the index lets go
/// of every frame but the stable ones.
pub fn end() {
    finish(&mut PASS.lock());
}

/// A VM is gone: the index (the running pass's, or the one between
/// passes) lets go of the frames only it still holds, so that they go back
/// to the pool now rather than at the end of a later pass.
pub fn vm_gone() {
    let mut st = PASS.lock();
    let st = &mut *st;
    let index = match st.pass.as_mut() {
        Some(p) => &mut p.merger.index,
        None => &mut st.index,
    };
    index.drop_unmapped(&DirectMap, &mut POOL.lock());
    publish(index);
}

/// Ends the running pass and drops the whole index, stable part and table
/// (when no VM is left: every frame goes back to the pool).
pub fn forget() {
    let mut st = PASS.lock();
    finish(&mut st);
    st.index.clear(&DirectMap, &mut POOL.lock());
    publish(&st.index);
}

/// Does one chunk of at most `max` pages of the pass. Err if no pass is
/// running.
///
/// Lock order: the pass, then a VM's memory, then the pool (the pool is
/// never held across a shootdown; the VM's memory is, across the first).
pub fn step(max: usize) -> Result<Step, vm::VmError> {
    let mut guard = PASS.lock();
    let pass = guard.pass.as_mut().ok_or(vm::VmError::Invalid)?;
    let t0 = crate::arch::x86::instr::rdtsc();
    let mem = DirectMap;
    let mut aborted = false;
    if let Some(&id) = pass.vms.first() {
        let next = match vm::get(id) {
            Ok(v) => {
                let mut vm_mem = v.mem.lock();
                match vm_mem.as_mut() {
                    Some(g) => {
                        let (cands, next) = protect(g, &mem, &POOL.lock(), pass.from, max.clamp(1, MERGE_CHUNK as usize));
                        // No CPU may write the pages while they are compared.
                        // Pages that were read-only already were flushed
                        // when they lost write access: a chunk of only those
                        // needs no shootdown.
                        if cands.iter().any(|c| writable(c.2)) && tlb::shootdown().is_err() {
                            // One may: nothing is compared, and every page
                            // gets its write access back.
                            unprotect(&mem, &cands);
                            aborted = true;
                            None
                        } else {
                            let dropped = pass.merger.fold(&mem, &mut POOL.lock(), &cands);
                            // The VM's memory is consistent again: its vCPUs
                            // may take faults while the dropped frames wait.
                            drop(vm_mem);
                            if !dropped.is_empty() {
                                // Stale translations may still read them.
                                match tlb::shootdown() {
                                    Ok(ok) => {
                                        let mut pool = POOL.lock();
                                        for pa in dropped {
                                            if let Ok(true) = pool.put(&mem, pa) {
                                                pass.freed += 1;
                                            }
                                        }
                                        drop(pool);
                                        pass.freed += tlb::release_deferred(ok);
                                    }
                                    // Kept until a later shootdown succeeds.
                                    Err(_) => dropped.into_iter().for_each(tlb::defer_frame),
                                }
                            }
                            next
                        }
                    }
                    None => None,
                }
            }
            // Destroyed meanwhile.
            Err(_) => None,
        };
        if aborted {
            pass.aborted += 1;
            ABORTED.fetch_add(1, Ordering::Relaxed);
        } else {
            match next {
                Some(f) => pass.from = f,
                None => {
                    pass.vms.remove(0);
                    pass.from = Gpa(0);
                }
            }
        }
    }
    let dt = crate::arch::x86::instr::rdtsc() - t0;
    pass.tsc += dt;
    TSC.fetch_add(dt, Ordering::Relaxed);
    publish(&pass.merger.index);
    if aborted {
        return Ok(Step::Aborted(progress(pass)));
    }
    if !pass.vms.is_empty() {
        return Ok(Step::More(progress(pass)));
    }
    let (p, freed) = finish(&mut guard).unwrap();
    drop(guard);
    let mut out = progress(&p);
    let stats = p.merger.stats;
    out.freed += freed;
    SKIPPED.fetch_add(stats.skipped, Ordering::Relaxed);
    SCANNED.fetch_add(stats.scanned, Ordering::Relaxed);
    MERGED.fetch_add(stats.merged, Ordering::Relaxed);
    ZERO.fetch_add(stats.zero, Ordering::Relaxed);
    if p.counted {
        PASSES.fetch_add(1, Ordering::Relaxed);
    }
    if stats.merged + stats.zero != 0 {
        log::info!("merge: {} pages scanned ({} skipped as stable), {} merged, {} zero, {} frames freed", stats.scanned, stats.skipped, stats.merged, stats.zero, out.freed);
    }
    Ok(Step::Done(out))
}
