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
pub fn on_nmi(pc: &PerCpu) -> bool {
    flush_if_needed(pc);
    let mut n = pc.nmis_expected.load(Ordering::Acquire);
    while n > 0 {
        match pc.nmis_expected.compare_exchange(n, n - 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return false,
            Err(v) => n = v,
        }
    }
    true
}

/// Sends an NMI to CPU `index` (a kick: it leaves any guest it runs).
pub fn kick(index: usize) {
    let pc = hv().percpu(index);
    pc.nmis_expected.fetch_add(1, Ordering::AcqRel);
    apic::send_nmi(pc.apic_id);
}

/// Makes every CPU drop EPT translations made before this call.
pub fn shootdown() {
    let h = hv();
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
        while pc.flushed_gen.load(Ordering::Acquire) < g
            && pc.virtualized.load(Ordering::Acquire) != 0
            && pc.parked.load(Ordering::Acquire) == 0
        {
            if instr::rdtsc().wrapping_sub(t0) > 1 << 34 {
                log::error!("cpu{i} did not acknowledge a TLB shootdown");
                break;
            }
            core::hint::spin_loop();
        }
    }
}
