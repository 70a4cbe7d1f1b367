//! RDMSR/WRMSR of the MSRs the bitmap guards, and of MSRs outside the
//! bitmap's ranges (which always exit).

use super::{inject_gp, skip_instruction, GuestRegs, RAX, RCX, RDX};
use crate::arch::x86::instr;
use crate::arch::x86::msr::{IA32_APIC_BASE, X2APIC_ICR};
use crate::policy::{host_rdmsr, host_wrmsr, MsrRead, MsrWrite};

pub fn rdmsr(regs: &mut GuestRegs) {
    let msr = regs[RCX] as u32;
    // SAFETY: a faulting read is caught and reported as `None`.
    let native = unsafe { instr::rdmsr_safe(msr) };
    match host_rdmsr(msr, native) {
        MsrRead::Value(v) => {
            regs[RAX] = v & 0xffff_ffff;
            regs[RDX] = v >> 32;
            skip_instruction();
        }
        MsrRead::Gp => inject_gp(),
    }
}

pub fn wrmsr(regs: &mut GuestRegs) {
    let msr = regs[RCX] as u32;
    let v = (regs[RDX] << 32) | (regs[RAX] & 0xffff_ffff);
    if msr == X2APIC_ICR && crate::hv::ipi::icr_write(v as u32, (v >> 32) as u32) {
        return skip_instruction();
    }
    if msr == IA32_APIC_BASE {
        // SAFETY: the APIC base MSR exists.
        let old = unsafe { instr::rdmsr(IA32_APIC_BASE) };
        if !crate::policy::apic_base_write_ok(old, v) {
            log::info!("refused moving the host's APIC page to {v:#x}");
            return inject_gp();
        }
    }
    match host_wrmsr(msr, v) {
        MsrWrite::Allow => {
            // SAFETY: only MSRs outside the guarded set get here; a faulting
            // write is caught and becomes the host's #GP.
            if unsafe { instr::wrmsr_safe(msr, v) } {
                skip_instruction();
            } else {
                inject_gp();
            }
        }
        MsrWrite::Gp => {
            log::info!("refused host WRMSR {msr:#x} <- {v:#x}");
            inject_gp();
        }
    }
}
