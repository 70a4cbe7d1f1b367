//! INIT and SIPI between host CPUs, emulated while a host CPU is offline.
//!
//! The host's local APIC is its own: EOIs, the timer and its IPIs take no
//! VM exit, in xAPIC mode (the APIC page is writable in the host's EPT) and
//! in x2APIC mode (the MSR bitmap passes the APIC's MSRs). The one moment
//! the hypervisor needs the ICR is CPU hotplug: Linux brings an offline CPU
//! back with INIT and SIPI, and a physical INIT must not reach a CPU in VMX
//! non-root operation. It would exit to the hypervisor, and wait-for-SIPI
//! handling differs between CPUs and emulators (Bochs 2.7 keeps the INIT
//! pending after the exit, so the CPU never runs again). So from the moment
//! a host CPU says it is going offline (`hc::HOST_CPU`, from the driver's
//! CPU hotplug callback on that CPU) until every CPU is back, the hypervisor
//! owns the ICR: the APIC page is read-only in the host's EPT, x2APIC ICR
//! writes exit, every APIC write is emulated, and an INIT or SIPI aimed at a
//! CPU under the hypervisor becomes a message to that CPU:
//!
//! - INIT: the target leaves the host VM's current context and parks in
//!   the hypervisor (`hlt` with interrupts off, woken by NMIs);
//! - SIPI, while parked: the target resumes the host VM in real mode at the
//!   vector, as after a real SIPI. Other SIPIs are ignored, as a CPU does.
//!
//! A host that sends INIT without saying so first loses that CPU on such
//! an emulator (on hardware the INIT exit handler parks and restarts it,
//! `exits::init_sipi`); the hypervisor and other CPUs carry on.

use super::hv;
use crate::arch::x86::cpu::{this_cpu, PerCpu};
use crate::arch::x86::instr;
use core::sync::atomic::Ordering;

/// Host CPUs (by hypervisor index) that said they are going offline and
/// have not said they are back.
static OFFLINE: spin::Mutex<u64> = spin::Mutex::new(0);

/// `hc::HOST_CPU`: this CPU goes offline (`online` false) or is back. The
/// first CPU to go offline turns the ICR guard on, the last to come back
/// turns it off. Returns how many host CPUs are offline now.
pub fn host_cpu(online: bool) -> i64 {
    let me = this_cpu().index;
    let mut off = OFFLINE.lock();
    let was = *off;
    if online {
        *off &= !(1u64 << me);
    } else {
        *off |= 1u64 << me;
    }
    if (was == 0) != (*off == 0) {
        guard(*off != 0);
        log::info!("cpu{me}: {}", if *off != 0 { "going offline: INIT and SIPI from the host are emulated until it is back" } else { "online: the host's APIC writes take no exit again" });
    }
    off.count_ones() as i64
}

/// Whether the hypervisor emulates the host's APIC writes now.
pub fn guarded() -> bool {
    *OFFLINE.lock() != 0
}

/// Turns the ICR guard on or off on every CPU: the x2APIC ICR's write
/// intercept and the xAPIC page's write permission.
fn guard(on: bool) {
    let h = hv();
    // SAFETY: the host VM's MSR bitmap, a heap page only this function
    // changes after setup (under `OFFLINE`); the CPUs read it as they run.
    let bm = unsafe { &mut *(super::memory::phys_ptr(h.msr_bitmap.0) as *mut [u8; 4096]) };
    crate::policy::set_msr_write_intercept(bm, crate::policy::HOST_HOTPLUG_MSR, on);
    {
        use crate::arch::x86::ept_entry::{EptEntry, EptFlags, MT_UC};
        let flags = if on { EptFlags::READ.union(EptFlags::EXEC) } else { EptFlags::RWX };
        let mut ept = h.host_ept.lock();
        // The page's 4 KiB leaf exists since setup: nothing to allocate.
        let set = ept.set(&super::memory::DirectMap, &mut super::memory::HeapFrames, crate::addr::Gpa(h.apic_page), 1, EptEntry::leaf(h.apic_page, flags, MT_UC, false));
        debug_assert!(set.is_some());
    }
    // No CPU may keep a writable translation of the page: one would let an
    // INIT through. A CPU that does not acknowledge is asked again; turning
    // the guard off needs no flush to be right (a stale read-only
    // translation costs one spurious exit, after which the CPU walks the
    // tables again).
    for _ in 0..8 {
        if super::tlb::shootdown().is_ok() || !on {
            return;
        }
    }
    log::error!("a CPU did not acknowledge the APIC page's write protection: an INIT the host sends it may reach it");
}

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
