//! Re-merging passes (`hc::MERGE`), in bounded chunks: each hypercall
//! works on at most [`CHUNK`] pages of one VM, so that neither the calling
//! CPU nor a vCPU waiting for the VM's memory lock stays out of the host
//! for long. The pass and its index live here between calls. The steps are
//! the portable [`crate::merge`]'s, with the TLB flushes they call for.

use super::memory::DirectMap;
use super::tlb;
use super::vm::{self, POOL};
use crate::addr::Gpa;
use crate::merge::{protect, MergeStats, Merger};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

/// Pages per hypercall.
const CHUNK: usize = 2048;

/// A pass in progress.
struct Pass {
    merger: Merger,
    /// VMs still to visit, in order; the first is being visited.
    vms: Vec<u32>,
    from: Gpa,
    freed: u64,
    tsc: u64,
}

static PASS: spin::Mutex<Option<Pass>> = spin::Mutex::new(None);

/// Totals over every pass, for `stats`.
pub static SCANNED: AtomicU64 = AtomicU64::new(0);
pub static MERGED: AtomicU64 = AtomicU64::new(0);
pub static ZERO: AtomicU64 = AtomicU64::new(0);

/// The result of a finished pass.
pub struct Done {
    pub stats: MergeStats,
    pub freed: u64,
    pub tsc: u64,
}

/// Starts a pass over `vm` (0: every VM), dropping any unfinished one.
pub fn start(vm: u32) -> Result<(), vm::VmError> {
    let vms = if vm == 0 {
        vm::ids()
    } else {
        vm::get(vm)?;
        alloc::vec![vm]
    };
    let old = PASS.lock().replace(Pass { merger: Merger::new(), vms, from: Gpa(0), freed: 0, tsc: 0 });
    if let Some(p) = old {
        p.merger.finish(&DirectMap, &mut POOL.lock());
    }
    Ok(())
}

/// Does one chunk of the pass. Returns `None` while there is more to do,
/// and the pass's result when it is over. Err if no pass is running.
pub fn step() -> Result<Option<Done>, vm::VmError> {
    let mut guard = PASS.lock();
    let pass = guard.as_mut().ok_or(vm::VmError::Invalid)?;
    let t0 = crate::arch::x86::instr::rdtsc();
    let mem = DirectMap;
    if let Some(&id) = pass.vms.first() {
        let next = match vm::get(id) {
            Ok(v) => {
                let mut vm_mem = v.mem.lock();
                match vm_mem.as_mut() {
                    Some(g) => {
                        let (cands, next) = protect(g, &mem, &POOL.lock(), pass.from, CHUNK);
                        // No CPU may write the pages while they are compared.
                        tlb::shootdown();
                        let dropped = pass.merger.fold(&mem, &mut POOL.lock(), &cands);
                        // The VM's memory is consistent again: its vCPUs may
                        // take faults while the dropped frames wait.
                        drop(vm_mem);
                        if !dropped.is_empty() {
                            // Stale translations may still read them.
                            tlb::shootdown();
                            let mut pool = POOL.lock();
                            for pa in dropped {
                                if let Ok(true) = pool.put(&mem, pa) {
                                    pass.freed += 1;
                                }
                            }
                        }
                        next
                    }
                    None => None,
                }
            }
            // Destroyed meanwhile.
            Err(_) => None,
        };
        match next {
            Some(f) => pass.from = f,
            None => {
                pass.vms.remove(0);
                pass.from = Gpa(0);
            }
        }
    }
    pass.tsc += crate::arch::x86::instr::rdtsc() - t0;
    if !pass.vms.is_empty() {
        return Ok(None);
    }
    let p = guard.take().unwrap();
    drop(guard);
    let stats = p.merger.stats;
    let freed = p.freed + p.merger.finish(&mem, &mut POOL.lock());
    SCANNED.fetch_add(stats.scanned, Ordering::Relaxed);
    MERGED.fetch_add(stats.merged, Ordering::Relaxed);
    ZERO.fetch_add(stats.zero, Ordering::Relaxed);
    log::info!("merge: {} pages scanned, {} merged, {} zero, {} frames freed", stats.scanned, stats.merged, stats.zero, freed);
    Ok(Some(Done { stats, freed, tsc: p.tsc }))
}
