//! A triple fault of the host VM: the host is beyond recovery. Log it and
//! reset the machine, as the hardware would have.

use super::{dump_vmcs, GuestRegs};
use crate::arch::x86::instr;

pub fn handle(_regs: &mut GuestRegs) {
    log::error!("the host VM triple-faulted; resetting the machine");
    dump_vmcs();
    // SAFETY: a system reset through the reset control register.
    unsafe { instr::outb(0xcf9, 0x06) };
    loop {
        // SAFETY: nothing is left to run on this CPU.
        unsafe {
            instr::cli();
            instr::hlt();
        }
    }
}
