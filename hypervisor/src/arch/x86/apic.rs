//! The local APIC, for the one thing the hypervisor sends: NMIs to other
//! CPUs (TLB shootdowns and kicks).

use super::instr;
use super::msr::{IA32_APIC_BASE, X2APIC_ICR};

const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;
const DELIVERY_NMI: u32 = 4 << 8;
const LEVEL_ASSERT: u32 = 1 << 14;
const DELIVERY_PENDING: u32 = 1 << 12;

/// Sends an NMI to the CPU with local APIC ID `apic_id`.
///
/// In xAPIC mode the host may be half-way through writing the ICR (high
/// half written, low half not yet) when the hypervisor runs on this CPU, so
/// the high half is restored afterwards.
pub fn send_nmi(apic_id: u32) {
    // SAFETY: the APIC base MSR exists on every CPU with an APIC.
    let base = unsafe { instr::rdmsr(IA32_APIC_BASE) };
    if base & (1 << 10) != 0 {
        // SAFETY: x2APIC ICR write: an NMI to one physical destination.
        unsafe { instr::wrmsr(X2APIC_ICR, ((apic_id as u64) << 32) | (DELIVERY_NMI | LEVEL_ASSERT) as u64) };
        return;
    }
    let mmio = super::physmap::phys_ptr(base & 0xf_ffff_f000);
    // SAFETY: the xAPIC page, mapped uncached through the direct map; 32-bit
    // accesses as the architecture requires.
    unsafe {
        let reg = |off: u64| mmio.add(off as usize) as *mut u32;
        let mut spins = 0;
        while reg(ICR_LOW).read_volatile() & DELIVERY_PENDING != 0 && spins < 1_000_000 {
            core::hint::spin_loop();
            spins += 1;
        }
        let saved_high = reg(ICR_HIGH).read_volatile();
        reg(ICR_HIGH).write_volatile(apic_id << 24);
        reg(ICR_LOW).write_volatile(DELIVERY_NMI | LEVEL_ASSERT);
        let mut spins = 0;
        while reg(ICR_LOW).read_volatile() & DELIVERY_PENDING != 0 && spins < 1_000_000 {
            core::hint::spin_loop();
            spins += 1;
        }
        reg(ICR_HIGH).write_volatile(saved_high);
    }
}
