//! INIT and SIPI: CPU offline/online in the host keeps working. INIT puts
//! the virtual CPU into wait-for-SIPI with the architectural reset state;
//! SIPI starts it in real mode at the vector (unrestricted guest runs it).
//! See: SDM Vol. 3A, 10.1.1 and Vol. 3C, 26.7 (INIT/SIPI in VMX).

use crate::arch::x86::instr;
use crate::arch::x86::vmcs_fields::*;
use crate::arch::x86::vmx;

pub fn init() {
    reset_state();
    crate::arch::x86::cpu::this_cpu().parked.store(1, core::sync::atomic::Ordering::Release);
    vmx::set(GUEST_ACTIVITY_STATE, activity::WAIT_FOR_SIPI);
    // SAFETY: the reset CPU starts with empty TLBs.
    unsafe {
        let _ = instr::invvpid(1, vmx::read(VPID) as u16);
    }
    log::info!("cpu{}: INIT: waiting for SIPI", crate::arch::x86::cpu::this_cpu().index);
}

/// The architectural state after INIT. See: SDM Vol. 3A, Table 10-1.
fn reset_state() {
    let caps = &crate::hv::hv().caps;
    let cr0 = 0x6000_0010u64;
    vmx::set(CR0_READ_SHADOW, cr0);
    vmx::set(GUEST_CR0, (cr0 | (caps.cr0_fixed0 & !(1 | (1 << 31)))) & caps.cr0_fixed1);
    vmx::set(CR4_READ_SHADOW, 0);
    vmx::set(GUEST_CR4, caps.cr4_fixed0 | (1 << 13));
    vmx::set(GUEST_CR3, 0);
    vmx::set(GUEST_DR7, 0x400);
    vmx::set(GUEST_RFLAGS, 2);
    vmx::set(GUEST_RIP, 0xfff0);
    vmx::set(GUEST_RSP, 0);
    vmx::set(GUEST_CS_SELECTOR, 0xf000);
    vmx::set(GUEST_CS_BASE, 0xffff_0000);
    vmx::set(GUEST_CS_LIMIT, 0xffff);
    vmx::set(GUEST_CS_AR, 0x9b);
    for (sel, base, limit, ar) in vmx::DATA_SEGMENTS {
        vmx::set(sel, 0);
        vmx::set(base, 0);
        vmx::set(limit, 0xffff);
        vmx::set(ar, 0x93);
    }
    vmx::set(GUEST_LDTR_SELECTOR, 0);
    vmx::set(GUEST_LDTR_BASE, 0);
    vmx::set(GUEST_LDTR_LIMIT, 0xffff);
    vmx::set(GUEST_LDTR_AR, 0x82);
    vmx::set(GUEST_TR_SELECTOR, 0);
    vmx::set(GUEST_TR_BASE, 0);
    vmx::set(GUEST_TR_LIMIT, 0xffff);
    vmx::set(GUEST_TR_AR, 0x8b);
    vmx::set(GUEST_GDTR_BASE, 0);
    vmx::set(GUEST_GDTR_LIMIT, 0xffff);
    vmx::set(GUEST_IDTR_BASE, 0);
    vmx::set(GUEST_IDTR_LIMIT, 0xffff);
    vmx::set(GUEST_IA32_EFER, 0);
    vmx::set(GUEST_IA32_DEBUGCTL, 0);
    let entry = vmx::read(ENTRY_CONTROLS) & !(entry_ctl::IA32E_MODE_GUEST as u64);
    vmx::set(ENTRY_CONTROLS, entry);
    vmx::set(GUEST_INTERRUPTIBILITY, 0);
    vmx::set(GUEST_PENDING_DBG_EXCEPTIONS, 0);
    vmx::set(ENTRY_INTERRUPTION_INFO, 0);
}

pub fn sipi() {
    let vector = vmx::read(EXIT_QUALIFICATION) & 0xff;
    let pc = crate::arch::x86::cpu::this_cpu();
    crate::hv::tlb::flush_if_needed(pc);
    pc.parked.store(0, core::sync::atomic::Ordering::Release);
    log::info!("cpu{}: SIPI: starting at {:#x}", pc.index, vector << 12);
    start_at_sipi(vector);
}

/// The host VM's CPU starts in real mode at `vector`, from the INIT state.
/// (The saved state of a SIPI exit is not usable: whatever the CPU held
/// while it waited.)
pub fn start_at_sipi(vector: u64) {
    reset_state();
    vmx::set(GUEST_CS_SELECTOR, vector << 8);
    vmx::set(GUEST_CS_BASE, vector << 12);
    vmx::set(GUEST_RIP, 0);
    vmx::set(GUEST_ACTIVITY_STATE, activity::ACTIVE);
    // SAFETY: the restarted CPU starts with empty TLBs.
    unsafe {
        let _ = instr::invvpid(1, vmx::read(VPID) as u16);
    }
}
