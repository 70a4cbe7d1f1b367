//! XSETBV: validated by the CPU itself, in root operation.

use super::{inject_gp, skip_instruction, GuestRegs, RAX, RCX, RDX};
use crate::arch::x86::instr;

pub fn handle(regs: &mut GuestRegs) {
    let v = (regs[RDX] << 32) | (regs[RAX] & 0xffff_ffff);
    // SAFETY: the hypervisor keeps no extended state; an invalid value faults
    // and is reflected to the guest.
    if unsafe { instr::xsetbv_safe(regs[RCX] as u32, v) } {
        skip_instruction();
    } else {
        inject_gp();
    }
}
