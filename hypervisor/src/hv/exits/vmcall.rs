//! VMCALL: hypercalls from ring 0 of the host VM; anything else gets #UD,
//! as on a CPU without VMX.

use super::{guest_cpl, inject_ud, skip_instruction, GuestRegs, RAX, RDI, RDX, RSI};
use crate::arch::x86::vmcs_fields::GUEST_RIP;
use crate::arch::x86::vmx;
use crate::hv::run::Switch;

pub fn handle(regs: &mut GuestRegs) {
    if guest_cpl() != 0 {
        inject_ud();
        return;
    }
    let rip = vmx::read(GUEST_RIP);
    skip_instruction();
    match crate::hv::hypercall::dispatch(regs[RAX], regs[RDI], regs[RSI], regs) {
        Switch::Return(status, aux) => {
            regs[RAX] = status as u64;
            regs[RDX] = aux;
        }
        Switch::Entered => {}
        // The host VM executes the VMCALL again when it resumes.
        Switch::Retry => vmx::set(GUEST_RIP, rip),
    }
}
