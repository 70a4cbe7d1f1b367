//! The unload tail: leaving VMX operation for good on one CPU and resuming
//! the host natively, through the driver's return trampoline. `hv` decides
//! whether and with what state (`hv::hypercall::unload`); this runs it.

use super::cpu::PerCpu;
use super::{instr, vmx};
use shared_abi::ReturnState;

/// Leaves VMX operation on this CPU, restores the host's `msrs` and `dr7`,
/// and jumps to the driver's `trampoline` with RDI pointing at `st`, which
/// reloads the rest of the host's state and resumes it where it called.
/// Never returns.
///
/// # Safety
/// The CPU is in VMX root operation with `pc` its own area and the host
/// VM's VMCS (`pc.vmcs_pa`) current, and no guest VMCS is still active on
/// it. Every value (`msrs`, `dr7`, `st`) is the host's own, read from the
/// host VM's VMCS before this call: after VMXOFF nothing else restores
/// them. `st` lies on this CPU's stack, which the host's direct map also
/// covers, and `trampoline` is the driver's return routine
/// (`BootInfo::tramp_return`), mapped on the hypervisor's page tables.
/// No NMI must be on its way to this CPU from the hypervisor (a kick): it
/// would reach the host after VMXOFF.
pub unsafe fn return_to_host(pc: &PerCpu, msrs: &[(u32, u64)], dr7: u64, trampoline: u64, st: &ReturnState) -> ! {
    // SAFETY: per the contract, in VMX operation with the host VM's VMCS
    // current. `vmx::vmxoff` writes the VMCS back (VMCLEAR), leaves VMX
    // operation and then clears CR4.VMXE, which may only be cleared outside
    // it (SDM Vol. 3C, 24.7 and 24.8). The MSRs and DR7 are the host's values; an
    // MSR the CPU refuses is skipped rather than faulting. The trampoline
    // takes RDI and never comes back, as `noreturn` states.
    unsafe {
        vmx::vmxoff(pc);
        for &(m, v) in msrs {
            instr::wrmsr_safe(m, v);
        }
        instr::write_dr7(dr7);
        core::arch::asm!("jmp {t}", t = in(reg) trampoline, in("rdi") st as *const ReturnState, options(noreturn));
    }
}
