//! VMCALL: hypercalls from ring 0 of the host VM; anything else gets #UD,
//! as on a CPU without VMX.

use super::{guest_cpl, inject_ud, skip_instruction, GuestRegs, RAX, RDI, RDX, RSI};

pub fn handle(regs: &mut GuestRegs) {
    if guest_cpl() != 0 {
        inject_ud();
        return;
    }
    skip_instruction();
    match crate::hv::hypercall::dispatch(regs[RAX], regs[RDI], regs[RSI], regs) {
        crate::hv::run::Switch::Return(status, aux) => {
            regs[RAX] = status as u64;
            regs[RDX] = aux;
        }
        crate::hv::run::Switch::Entered => {}
    }
}
