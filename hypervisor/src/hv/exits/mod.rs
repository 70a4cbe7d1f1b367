//! VM-exit dispatch: one handler per exit reason.

mod cpuid;
mod cr;
mod ept_violation;
mod init_sipi;
mod invd;
mod msr;
mod triple_fault;
mod vmcall;
mod xsetbv;

use crate::arch::x86::cpu::this_cpu;
use crate::arch::x86::exit_reason::{reason_name, ExitReason};
use crate::arch::x86::instr;
use crate::arch::x86::vmcs_fields::*;
use crate::arch::x86::vmx;

/// Guest GPRs as the exit stub saved them: RAX..R15 in encoding order (the
/// RSP slot is unused; RSP lives in the VMCS).
pub type GuestRegs = [u64; 16];

pub const RAX: usize = 0;
pub const RCX: usize = 1;
pub const RDX: usize = 2;
pub const RBX: usize = 3;
pub const RSI: usize = 6;
pub const RDI: usize = 7;

pub static DEBUG_TRACE: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// Moves the guest past the instruction that exited.
pub fn skip_instruction() {
    let rip = vmx::read(GUEST_RIP);
    let len = vmx::read(EXIT_INSTRUCTION_LENGTH);
    vmx::set(GUEST_RIP, rip.wrapping_add(len));
    // The instruction retired: any STI/MOV-SS blocking ends with it.
    let intr = vmx::read(GUEST_INTERRUPTIBILITY);
    if intr & 3 != 0 {
        vmx::set(GUEST_INTERRUPTIBILITY, intr & !3);
    }
}

/// Queues a hardware exception for the next VM entry.
pub fn inject_exception(vector: u32, error_code: Option<u32>) {
    let mut info = intr::VALID | intr::TYPE_HW_EXCEPTION | vector;
    if let Some(ec) = error_code {
        info |= intr::DELIVER_ERROR_CODE;
        vmx::set(ENTRY_EXCEPTION_ERROR_CODE, ec as u64);
    }
    vmx::set(ENTRY_INTERRUPTION_INFO, info as u64);
}

pub fn inject_ud() {
    inject_exception(intr::VECTOR_UD, None);
}

pub fn inject_gp() {
    inject_exception(intr::VECTOR_GP, Some(0));
}

/// The guest's current privilege level.
pub fn guest_cpl() -> u64 {
    (vmx::read(GUEST_SS_AR) >> 5) & 3
}

#[no_mangle]
extern "sysv64" fn uxen_vmexit_handler(regs: &mut GuestRegs) {
    let pc = this_cpu();
    let t0 = instr::rdtsc();
    let raw = vmx::read(EXIT_REASON) as u32;
    let (reason, entry_failed) = ExitReason::decode(raw);
    pc.count_exit((raw & 0xffff) as u16, true);
    if DEBUG_TRACE.load(core::sync::atomic::Ordering::Relaxed) > 0 && pc.index == 1 {
        DEBUG_TRACE.fetch_sub(1, core::sync::atomic::Ordering::Relaxed);
        log::info!("trace: exit {} rip {:#x} cs {:#x} qual {:#x} cr0 {:#x} rax {:#x}", raw & 0xffff, vmx::read(GUEST_RIP), vmx::read(GUEST_CS_SELECTOR), vmx::read(EXIT_QUALIFICATION), vmx::read(GUEST_CR0), regs[0]);
    }
    if entry_failed {
        dump_vmcs();
        panic!("VM entry of the host VM failed: exit reason {:#x} qualification {:#x}", raw, vmx::read(EXIT_QUALIFICATION));
    }
    match reason {
        Ok(ExitReason::Cpuid) => cpuid::handle(regs),
        Ok(ExitReason::Rdmsr) => msr::rdmsr(regs),
        Ok(ExitReason::Wrmsr) => msr::wrmsr(regs),
        Ok(ExitReason::CrAccess) => cr::handle(regs),
        Ok(ExitReason::Xsetbv) => xsetbv::handle(regs),
        Ok(ExitReason::Invd) => invd::handle(),
        Ok(ExitReason::Vmcall) => vmcall::handle(regs),
        Ok(r) if r.is_vmx_instruction() => inject_ud(),
        // No SMX either.
        Ok(ExitReason::Getsec) => inject_ud(),
        Ok(ExitReason::Init) => init_sipi::init(),
        Ok(ExitReason::Sipi) => init_sipi::sipi(),
        Ok(ExitReason::TripleFault) => triple_fault::handle(regs),
        Ok(ExitReason::EptViolation) => ept_violation::handle(regs),
        Ok(ExitReason::EptMisconfig) => {
            dump_vmcs();
            panic!("EPT misconfiguration at {:#x}", vmx::read(GUEST_PHYSICAL_ADDRESS));
        }
        _ => {
            log::warn!(
                "cpu{}: unexpected exit {} ({}) at rip {:#x}; raising #UD",
                pc.index,
                raw & 0xffff,
                reason_name((raw & 0xffff) as u16),
                vmx::read(GUEST_RIP)
            );
            inject_ud();
        }
    }
    pc.exit_tsc.fetch_add(instr::rdtsc().wrapping_sub(t0), core::sync::atomic::Ordering::Relaxed);
}

#[no_mangle]
extern "sysv64" fn uxen_vmentry_failed(_regs: &mut GuestRegs) {
    let err = vmx::read(VM_INSTRUCTION_ERROR);
    dump_vmcs();
    panic!("VMRESUME/VMLAUNCH of the host VM failed: VM-instruction error {err}");
}

/// An NMI taken in root operation.
pub fn nmi_in_root() {}

/// Logs the guest state of the current VMCS.
pub fn dump_vmcs() {
    let f = |n| vmx::read(n);
    log::error!(
        "VMCS: rip {:#x} rsp {:#x} rflags {:#x} cr0 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}",
        f(GUEST_RIP),
        f(GUEST_RSP),
        f(GUEST_RFLAGS),
        f(GUEST_CR0),
        f(GUEST_CR3),
        f(GUEST_CR4),
        f(GUEST_IA32_EFER)
    );
    log::error!(
        "VMCS: cs {:#x}/{:#x} ss {:#x}/{:#x} tr {:#x}/{:#x} activity {} intr {:#x} entry {:#x} exit-qual {:#x} gpa {:#x}",
        f(GUEST_CS_SELECTOR),
        f(GUEST_CS_AR),
        f(GUEST_SS_SELECTOR),
        f(GUEST_SS_AR),
        f(GUEST_TR_SELECTOR),
        f(GUEST_TR_AR),
        f(GUEST_ACTIVITY_STATE),
        f(GUEST_INTERRUPTIBILITY),
        f(ENTRY_CONTROLS),
        f(EXIT_QUALIFICATION),
        f(GUEST_PHYSICAL_ADDRESS)
    );
}
