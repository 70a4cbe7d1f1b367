//! TLB shootdowns across CPUs, by NMI.
//!
//! When the hypervisor takes permissions away in an EPT (a page donated by
//! the host, a guest page write-protected for copy-on-write or merging),
//! stale translations may live in other CPUs' TLBs. The initiator bumps a
//! global generation, sends an NMI to every other CPU, and waits until each
//! has performed INVEPT for that generation. NMIs exit from any guest (NMI
//! exiting is on in every VMCS) and interrupt the hypervisor too, so the
//! flush happens wherever the CPU is. A CPU parked in wait-for-SIPI cannot
//! access memory; it flushes when it is started.

use super::hv;
use crate::arch::x86::apic;
use crate::arch::x86::cpu::{this_cpu, PerCpu};
use crate::arch::x86::instr;
use crate::addr::Hpa;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

static FLUSH_GEN: AtomicU64 = AtomicU64::new(0);

/// Fault injection (tests; the driver's `debug_drop_shootdown_acks`):
/// CPUs ignore shootdown requests, neither flushing nor acknowledging, as a
/// CPU whose NMIs are lost would. Every shootdown then times out.
pub static DROP_ACKS: AtomicBool = AtomicBool::new(false);

/// Shootdowns that were not acknowledged in time, for `stats`.
pub static UNACKED: AtomicU64 = AtomicU64::new(0);

/// TSC ticks a shootdown waits for every CPU's acknowledgement before it
/// gives up: some 22 ms at 3 GHz, 1.3 s of emulated time in Bochs (whose
/// TSC counts instructions at 50 MHz); a kick is re-sent every
/// [`KICK_RESEND`] meanwhile. A caller that gets [`Unacked`] must not rely
/// on the flush: it undoes its change, or keeps what it would have freed.
pub const SHOOTDOWN_TIMEOUT: u64 = 1 << 26;

/// A CPU did not acknowledge a shootdown within [`SHOOTDOWN_TIMEOUT`]: it
/// may still hold translations made before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unacked {
    pub cpu: usize,
}

/// A successful shootdown's generation: translations made before it are
/// gone from every CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Flushed(u64);

/// What a failed shootdown could not release: EPT tables that a stale
/// paging-structure cache may still walk, and pool frames that a stale
/// translation may still reach, each with the generation of the shootdown
/// that failed. [`release_deferred`] frees them after a later one succeeds.
struct Deferred {
    tables: Vec<(u64, Hpa, u32)>,
    frames: Vec<(u64, Hpa)>,
}

static DEFERRED: spin::Mutex<Deferred> = spin::Mutex::new(Deferred { tables: Vec::new(), frames: Vec::new() });

/// Keeps a detached host-EPT subtree (`level`: of its entries) until a
/// later shootdown succeeds.
pub fn defer_table(t: Hpa, level: u32) {
    DEFERRED.lock().tables.push((FLUSH_GEN.load(Ordering::Acquire), t, level));
}

/// Keeps one pool reference to `pa` until a later shootdown succeeds.
pub fn defer_frame(pa: Hpa) {
    DEFERRED.lock().frames.push((FLUSH_GEN.load(Ordering::Acquire), pa));
}

/// Frames and tables waiting for a shootdown (for `stats` and tests).
pub fn deferred_count() -> usize {
    let d = DEFERRED.lock();
    d.tables.len() + d.frames.len()
}

/// Frees what failed shootdowns kept, where the successful shootdown `ok`
/// came after them. Returns the pool frames that this freed. Takes the
/// pool lock and the heap's: call it with neither held, nor a VM's memory.
pub fn release_deferred(ok: Flushed) -> u64 {
    let (tables, frames) = {
        let mut d = DEFERRED.lock();
        if d.tables.is_empty() && d.frames.is_empty() {
            return 0;
        }
        let (t, keep_t): (Vec<_>, Vec<_>) = d.tables.drain(..).partition(|x| x.0 < ok.0);
        let (f, keep_f): (Vec<_>, Vec<_>) = d.frames.drain(..).partition(|x| x.0 < ok.0);
        d.tables = keep_t;
        d.frames = keep_f;
        (t, f)
    };
    for (_, t, level) in tables {
        crate::ept::Ept::free_subtree(&super::memory::DirectMap, &mut super::memory::HeapFrames, t, level);
    }
    let mut freed = 0;
    let mut pool = super::vm::POOL.lock();
    for (_, pa) in frames {
        if let Ok(true) = pool.put(&super::memory::DirectMap, pa) {
            freed += 1;
        }
    }
    freed
}

/// Flushes this CPU's EPT-derived translations if a shootdown asked for it
/// (unless acknowledgements are being dropped, see [`DROP_ACKS`]).
pub fn flush_if_needed(pc: &PerCpu) {
    if DROP_ACKS.load(Ordering::Relaxed) {
        return;
    }
    flush_now(pc);
}

fn flush_now(pc: &PerCpu) {
    let g = FLUSH_GEN.load(Ordering::Acquire);
    if pc.flushed_gen.load(Ordering::Relaxed) < g {
        // SAFETY: INVEPT all-context in VMX operation.
        unsafe {
            let _ = instr::invept(2, 0);
        }
        pc.flushed_gen.store(g, Ordering::Release);
    }
}

/// Handles an NMI on this CPU (from a VM exit or taken in root operation).
/// Returns true if the NMI was the host's own, to be delivered to it.
///
/// A kick's NMI is recognised by `kick_pending`, which its sender set and
/// which is cleared here before anything else is looked at, so that the
/// work the kick asks for (a flush, leaving a guest, an INIT or SIPI) is
/// seen. An NMI that finds no kick pending is the host's. A host NMI and a
/// kick that reach the CPU together are one NMI (the CPU latches only one),
/// counted as the kick: the host loses that one, as it would on any CPU
/// where two NMI sources coincide.
pub fn on_nmi(pc: &PerCpu) -> bool {
    let kicked = pc.kick_pending.swap(0, Ordering::AcqRel) != 0;
    flush_if_needed(pc);
    !kicked
}

/// Handles a VM exit caused by an NMI (from the host VM or a guest).
///
/// Such an exit leaves NMIs blocked in root operation until the next IRET.
/// VM entry with virtual NMIs lifts that blocking on hardware, but Bochs
/// 2.7 keeps it through the host VM's run (IRET there only ends virtual-NMI
/// blocking): every later kick, shootdown or host NMI to this CPU then
/// waited, latched as one, until Linux's first IRET after unload, where it
/// arrived as "NMI received for unknown reason". An IRET here ends the
/// blocking on either; an NMI latched meanwhile is taken at once, in root
/// operation (`exits::nmi_in_root`).
pub fn nmi_exit(pc: &PerCpu) {
    if on_nmi(pc) {
        pc.host_nmi_pending.store(1, Ordering::Release);
    }
    // SAFETY: root operation on the hypervisor's GDT; the NMI handler runs
    // on this stack and returns.
    unsafe { instr::unblock_nmis() };
}

/// Sends an NMI to CPU `index` (a kick: it leaves any guest it runs),
/// unless one is already on its way there, which serves this kick too: the
/// target clears `kick_pending` before it looks at what was asked. A CPU
/// that is not virtualized (not yet, or no more: it left at unload) is not
/// sent anything, since its NMIs go to Linux.
pub fn kick(index: usize) {
    let pc = hv().percpu(index);
    // Registered before `virtualized` is read, so that `stop_kicks` either
    // sees this kick or this kick sees the CPU leaving (both SeqCst).
    pc.kickers.fetch_add(1, Ordering::SeqCst);
    if pc.virtualized.load(Ordering::SeqCst) != 0 {
        let now = instr::rdtsc().max(1);
        let sent = pc.kick_pending.load(Ordering::Acquire);
        // A kick NMI that has not arrived after KICK_RESEND ticks is taken
        // as lost, and sent again: an emulator may drop one, and a CPU
        // never kicked again would keep every shootdown waiting.
        let due = sent == 0 || now.wrapping_sub(sent) > KICK_RESEND;
        if due && pc.kick_pending.compare_exchange(sent, now, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            apic::send_nmi(pc.apic_id);
        }
    }
    pc.kickers.fetch_sub(1, Ordering::Release);
}

/// TSC ticks after which a kick NMI that has not arrived is sent again. A
/// late original then reaches the host as an NMI of its own.
pub const KICK_RESEND: u64 = 1 << 24;

/// Called by this CPU before it leaves VMX (`pc.virtualized` already 0, so
/// no new kick is sent here): waits until no other CPU is inside `kick`
/// for it, then takes the NMI of a kick still on its way, so that none
/// reaches Linux after VMXOFF. Returns false if that NMI did not arrive.
pub fn stop_kicks(pc: &PerCpu) -> bool {
    while pc.kickers.load(Ordering::SeqCst) != 0 {
        core::hint::spin_loop();
    }
    // SAFETY: root operation on the hypervisor's GDT. Ends any NMI blocking
    // left from an earlier NMI exit, so a latched NMI is taken now.
    unsafe { instr::unblock_nmis() };
    let t0 = instr::rdtsc();
    while pc.kick_pending.load(Ordering::Acquire) != 0 {
        if instr::rdtsc().wrapping_sub(t0) > 1 << 32 {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// Makes every CPU drop EPT translations made before this call, or fails
/// with [`Unacked`] after [`SHOOTDOWN_TIMEOUT`]: then translations made
/// before the call may live on, and the caller must undo its change or keep
/// what it would have freed (never go on as if the flush had happened).
#[must_use]
pub fn shootdown() -> Result<Flushed, Unacked> {
    let h = hv();
    if h.iommu_only() {
        // No VMX, no EPT in use: nothing to flush.
        return Ok(Flushed(FLUSH_GEN.load(Ordering::Acquire)));
    }
    let g = FLUSH_GEN.fetch_add(1, Ordering::AcqRel) + 1;
    let me = this_cpu().index as usize;
    for i in 0..h.num_cpus() {
        let pc = h.percpu(i);
        if i != me && pc.virtualized.load(Ordering::Acquire) != 0 && pc.parked.load(Ordering::Acquire) == 0 {
            kick(i);
        }
    }
    // The initiator flushes itself whatever `DROP_ACKS` says.
    flush_now(this_cpu());
    for i in 0..h.num_cpus() {
        let pc = h.percpu(i);
        let t0 = instr::rdtsc();
        let mut last = t0;
        while pc.flushed_gen.load(Ordering::Acquire) < g
            && pc.virtualized.load(Ordering::Acquire) != 0
            && pc.parked.load(Ordering::Acquire) == 0
        {
            let now = instr::rdtsc();
            if now.wrapping_sub(t0) > SHOOTDOWN_TIMEOUT {
                if UNACKED.fetch_add(1, Ordering::Relaxed) < 16 {
                    log::error!("cpu{i} did not acknowledge a TLB shootdown; the change is undone or kept back");
                }
                return Err(Unacked { cpu: i });
            }
            if now.wrapping_sub(last) > KICK_RESEND {
                // The kick may have been lost: kick again (sent only if
                // the first one is overdue).
                last = now;
                kick(i);
            }
            core::hint::spin_loop();
        }
    }
    Ok(Flushed(g))
}
