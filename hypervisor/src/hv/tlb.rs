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
use core::sync::atomic::{AtomicU64, Ordering};

static FLUSH_GEN: AtomicU64 = AtomicU64::new(0);

/// Flushes this CPU's EPT-derived translations if a shootdown asked for it.
pub fn flush_if_needed(pc: &PerCpu) {
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

/// Makes every CPU drop EPT translations made before this call.
pub fn shootdown() {
    let h = hv();
    if h.iommu_only() {
        // No VMX, no EPT in use: nothing to flush.
        return;
    }
    let g = FLUSH_GEN.fetch_add(1, Ordering::AcqRel) + 1;
    let me = this_cpu().index as usize;
    for i in 0..h.num_cpus() {
        let pc = h.percpu(i);
        if i != me && pc.virtualized.load(Ordering::Acquire) != 0 && pc.parked.load(Ordering::Acquire) == 0 {
            kick(i);
        }
    }
    flush_if_needed(this_cpu());
    for i in 0..h.num_cpus() {
        let pc = h.percpu(i);
        let t0 = instr::rdtsc();
        let mut last = t0;
        while pc.flushed_gen.load(Ordering::Acquire) < g
            && pc.virtualized.load(Ordering::Acquire) != 0
            && pc.parked.load(Ordering::Acquire) == 0
        {
            let now = instr::rdtsc();
            if now.wrapping_sub(t0) > 1 << 34 {
                log::error!("cpu{i} did not acknowledge a TLB shootdown");
                break;
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
}
