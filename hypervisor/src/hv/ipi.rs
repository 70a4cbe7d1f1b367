//! INIT and SIPI between host CPUs, emulated.
//!
//! A physical INIT must never reach a CPU in VMX non-root operation: it
//! would exit to the hypervisor, and real wait-for-SIPI handling differs
//! between CPUs and emulators (Bochs 2.7 keeps the INIT pending after the
//! exit, so the CPU never runs again). The hypervisor therefore owns the
//! ICR: the host's local APIC page is read-only in its EPT (and x2APIC ICR
//! writes exit), every APIC write is emulated, and an INIT or SIPI aimed at
//! a CPU under the hypervisor becomes a message to that CPU:
//!
//! - INIT: the target leaves the host VM's current context and parks in
//!   the hypervisor (`hlt` with interrupts off, woken by NMIs);
//! - SIPI, while parked: the target resumes the host VM in real mode at the
//!   vector, as after a real SIPI. Other SIPIs are ignored, as a CPU does.

use super::hv;
use crate::arch::x86::cpu::{this_cpu, PerCpu};
use crate::arch::x86::instr;
use core::sync::atomic::Ordering;

/// `PerCpu::sipi_state` values.
pub const RUNNING: u32 = 0;
pub const WAIT_SIPI: u32 = 1;
pub const SIPI_RECEIVED: u32 = 2;

const MODE_INIT: u32 = 5;
const MODE_SIPI: u32 = 6;

/// Handles a write of `low` to the ICR (with `dest` the destination APIC
/// ID from the ICR's high half). Returns true if the hypervisor took it;
/// false means: perform the write on the real APIC.
pub fn icr_write(low: u32, dest: u32) -> bool {
    let mode = (low >> 8) & 7;
    if mode != MODE_INIT && mode != MODE_SIPI {
        return false;
    }
    let level_assert = low & (1 << 14) != 0;
    let logical = low & (1 << 11) != 0;
    let shorthand = (low >> 18) & 3;
    let h = hv();
    let me = this_cpu().index as usize;
    let mut took = false;
    for i in 0..h.num_cpus() {
        let pc = h.percpu(i);
        let hit = match shorthand {
            0 => !logical && pc.apic_id == dest,
            1 => i == me,
            2 => true,
            _ => i != me,
        };
        if !hit || pc.virtualized.load(Ordering::Acquire) == 0 {
            continue;
        }
        took = true;
        if mode == MODE_INIT {
            // INIT level de-assert does nothing on modern CPUs.
            if level_assert && i != me {
                pc.sipi_vector.store(0, Ordering::Release);
                pc.sipi_state.store(WAIT_SIPI, Ordering::Release);
                super::tlb::kick(i);
            }
        } else if pc
            .sipi_state
            .compare_exchange(WAIT_SIPI, SIPI_RECEIVED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            pc.sipi_vector.store(low & 0xff, Ordering::Release);
            super::tlb::kick(i);
        }
    }
    took
}

/// Called on this CPU before it re-enters the host VM: after an emulated
/// INIT, park until the SIPI, then start the host VM's CPU at the vector.
pub fn park_if_init(pc: &PerCpu) -> bool {
    if pc.sipi_state.load(Ordering::Acquire) == RUNNING {
        return false;
    }
    log::info!("cpu{}: INIT: parked until SIPI", pc.index);
    pc.parked.store(1, Ordering::Release);
    // The INIT arrived as an NMI exit, which leaves NMIs blocked; the SIPI
    // comes as an NMI too.
    // SAFETY: in root operation on the hypervisor's GDT.
    unsafe { instr::unblock_nmis() };
    while pc.sipi_state.load(Ordering::Acquire) != SIPI_RECEIVED {
        // SAFETY: interrupts are off in root operation; the NMI that
        // delivers the SIPI (or a shootdown) wakes this CPU.
        unsafe { instr::hlt() };
    }
    let vector = pc.sipi_vector.load(Ordering::Acquire) as u64;
    super::exits::start_at_sipi(vector);
    super::tlb::flush_if_needed(pc);
    pc.sipi_state.store(RUNNING, Ordering::Release);
    pc.parked.store(0, Ordering::Release);
    log::info!("cpu{}: SIPI: starting at {:#x}", pc.index, vector << 12);
    true
}
