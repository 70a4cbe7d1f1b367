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

use super::memory::DirectMap;
use super::tlb;
use super::vm::{self, POOL};
use crate::addr::Gpa;
use crate::merge::{protect, unprotect, MergeStats, Merger};
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

static PASS: spin::Mutex<Option<Pass>> = spin::Mutex::new(None);

/// Totals over every pass, for `stats`.
pub static SCANNED: AtomicU64 = AtomicU64::new(0);
pub static MERGED: AtomicU64 = AtomicU64::new(0);
pub static ZERO: AtomicU64 = AtomicU64::new(0);
pub static PASSES: AtomicU64 = AtomicU64::new(0);
pub static ABORTED: AtomicU64 = AtomicU64::new(0);
pub static TSC: AtomicU64 = AtomicU64::new(0);
/// Frames the running pass's index holds.
pub static INDEXED: AtomicU64 = AtomicU64::new(0);

/// Heap bytes per index entry, for `stats`: a B-tree entry of 16 bytes in
/// nodes of at most 11, with their headers and edges.
pub const INDEX_ENTRY_BYTES: u64 = 32;

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
    let old = PASS.lock().replace(Pass { merger: Merger::new(), vms, from: Gpa(0), freed: 0, tsc: 0, aborted: 0, counted });
    INDEXED.store(0, Ordering::Relaxed);
    if let Some(p) = old {
        p.merger.finish(&DirectMap, &mut POOL.lock());
    }
    Ok(())
}

/// Ends the running pass, if any, without another chunk: the index lets go
/// of its frames.
pub fn end() {
    let old = PASS.lock().take();
    INDEXED.store(0, Ordering::Relaxed);
    if let Some(p) = old {
        p.merger.finish(&DirectMap, &mut POOL.lock());
    }
}

/// Does one chunk of at most `max` pages of the pass. Err if no pass is
/// running.
///
/// Lock order: the pass, then a VM's memory, then the pool (the pool is
/// never held across a shootdown; the VM's memory is, across the first).
pub fn step(max: usize) -> Result<Step, vm::VmError> {
    let mut guard = PASS.lock();
    let pass = guard.as_mut().ok_or(vm::VmError::Invalid)?;
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
                        if tlb::shootdown().is_err() {
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
    INDEXED.store(pass.merger.indexed() as u64, Ordering::Relaxed);
    if aborted {
        return Ok(Step::Aborted(progress(pass)));
    }
    if !pass.vms.is_empty() {
        return Ok(Step::More(progress(pass)));
    }
    let p = guard.take().unwrap();
    drop(guard);
    INDEXED.store(0, Ordering::Relaxed);
    let mut out = progress(&p);
    let stats = p.merger.stats;
    out.freed += p.merger.finish(&mem, &mut POOL.lock());
    SCANNED.fetch_add(stats.scanned, Ordering::Relaxed);
    MERGED.fetch_add(stats.merged, Ordering::Relaxed);
    ZERO.fetch_add(stats.zero, Ordering::Relaxed);
    if p.counted {
        PASSES.fetch_add(1, Ordering::Relaxed);
    }
    if stats.merged + stats.zero != 0 {
        log::info!("merge: {} pages scanned, {} merged, {} zero, {} frames freed", stats.scanned, stats.merged, stats.zero, out.freed);
    }
    Ok(Step::Done(out))
}
