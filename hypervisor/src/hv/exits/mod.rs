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

pub use init_sipi::start_at_sipi;

/// MOV to/from CR0/CR4, CLTS, LMSW (host VM and guests alike).
pub fn cr_access(regs: &mut GuestRegs) {
    cr::handle(regs)
}

#[no_mangle]
extern "sysv64" fn uxen_vmexit_handler(regs: &mut GuestRegs) {
    let pc = this_cpu();
    let t0 = instr::rdtsc();
    let raw = vmx::read(EXIT_REASON) as u32;
    if pc.guest.is_some() {
        pc.count_exit((raw & 0xffff) as u16, false);
        super::run::guest_exit(pc, regs, raw);
        after_exit(pc, t0);
        return;
    }
    let (reason, entry_failed) = ExitReason::decode(raw);
    pc.count_exit((raw & 0xffff) as u16, true);
    super::tlb::flush_if_needed(pc);
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
        Ok(ExitReason::ExceptionOrNmi) => {
            let info = vmx::read(EXIT_INTERRUPTION_INFO) as u32;
            if (info >> 8) & 7 == 2 {
                super::tlb::nmi_exit(pc);
            }
        }
        Ok(ExitReason::NmiWindow) => {
            let p = vmx::read(PRIMARY_PROC_CONTROLS) & !(proc1::NMI_WINDOW_EXITING as u64);
            vmx::set(PRIMARY_PROC_CONTROLS, p);
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
    after_exit(pc, t0);
}

/// Common tail of every exit: deliver an NMI that belongs to the host once
/// the host VM is about to run, and account the time.
fn after_exit(pc: &crate::arch::x86::cpu::PerCpu, t0: u64) {
    if !pc.guest.is_some() {
        super::ipi::park_if_init(pc);
        if pc.host_nmi_pending.load(core::sync::atomic::Ordering::Acquire) != 0 {
            inject_host_nmi(pc);
        }
    }
    pc.exit_tsc.fetch_add(instr::rdtsc().wrapping_sub(t0), core::sync::atomic::Ordering::Relaxed);
}

/// Delivers the host's NMI now if it can take one, else at its NMI window.
fn inject_host_nmi(pc: &crate::arch::x86::cpu::PerCpu) {
    let blocked = vmx::read(GUEST_INTERRUPTIBILITY) & (1 << 3) != 0;
    let busy = vmx::read(ENTRY_INTERRUPTION_INFO) & (intr::VALID as u64) != 0;
    if blocked || busy {
        let p = vmx::read(PRIMARY_PROC_CONTROLS) | proc1::NMI_WINDOW_EXITING as u64;
        vmx::set(PRIMARY_PROC_CONTROLS, p);
        return;
    }
    vmx::set(ENTRY_INTERRUPTION_INFO, (intr::VALID | intr::TYPE_NMI | intr::VECTOR_NMI) as u64);
    pc.host_nmi_pending.store(0, core::sync::atomic::Ordering::Release);
}

#[no_mangle]
extern "sysv64" fn uxen_vmentry_failed(regs: &mut GuestRegs) {
    let pc = this_cpu();
    if pc.guest.is_some() {
        super::run::entry_failed(pc, regs);
        return;
    }
    let err = vmx::read(VM_INSTRUCTION_ERROR);
    dump_vmcs();
    panic!("VMRESUME/VMLAUNCH of the host VM failed: VM-instruction error {err}");
}

/// An NMI taken in root operation: a shootdown or kick is served at once;
/// the host's own NMI is delivered at the next entry into the host VM.
pub fn nmi_in_root() {
    let pc = this_cpu();
    if super::tlb::on_nmi(pc) {
        pc.host_nmi_pending.store(1, core::sync::atomic::Ordering::Release);
    }
}

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
