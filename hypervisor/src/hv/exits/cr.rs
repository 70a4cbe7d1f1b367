//! MOV to CR0/CR4 (and CLTS/LMSW) that touch bits VMX fixes: the host keeps
//! its own view in the read shadow, and never sees or sets CR4.VMXE.

use super::{inject_gp, skip_instruction, GuestRegs};
use crate::arch::x86::instr;
use crate::arch::x86::vmcs_fields::*;
use crate::arch::x86::vmx;
use crate::policy::guest_cr4_write;

const PE: u64 = 1;
const TS: u64 = 1 << 3;
const NW: u64 = 1 << 29;
const CD: u64 = 1 << 30;
const PG: u64 = 1 << 31;
const VMXE: u64 = 1 << 13;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

pub fn handle(regs: &mut GuestRegs) {
    let q = vmx::read(EXIT_QUALIFICATION);
    let cr = q & 0xf;
    let kind = (q >> 4) & 3;
    let gpr = ((q >> 8) & 0xf) as usize;
    let ok = match kind {
        0 => {
            let v = if gpr == 4 { vmx::read(GUEST_RSP) } else { regs[gpr] };
            match cr {
                0 => write_cr0(v),
                4 => write_cr4(v),
                _ => false,
            }
        }
        // CLTS
        2 => write_cr0(vmx::read(CR0_READ_SHADOW) & !TS),
        // LMSW: loads PE, MP, EM, TS; cannot clear PE.
        3 => {
            let src = (q >> 16) & 0xf;
            let old = vmx::read(CR0_READ_SHADOW);
            write_cr0((old & !0xe) | (src & 0xe) | ((src | old) & PE))
        }
        _ => {
            log::warn!("unexpected MOV from CR{cr}");
            false
        }
    };
    if ok {
        skip_instruction();
    } else {
        inject_gp();
    }
}

fn write_cr0(v: u64) -> bool {
    let caps = &crate::hv::hv().caps;
    if v >> 32 != 0 || (v & PG != 0 && v & PE == 0) || (v & NW != 0 && v & CD == 0) {
        return false;
    }
    let old = vmx::read(GUEST_CR0);
    let real = (v | (caps.cr0_fixed0 & !(PE | PG))) & caps.cr0_fixed1;
    // With paging turned on or off here, long mode follows EFER.LME.
    let mut efer = vmx::read(GUEST_IA32_EFER);
    let mut entry = vmx::read(ENTRY_CONTROLS);
    if old & PG == 0 && v & PG != 0 && efer & EFER_LME != 0 {
        efer |= EFER_LMA;
        entry |= entry_ctl::IA32E_MODE_GUEST as u64;
    } else if old & PG != 0 && v & PG == 0 {
        efer &= !EFER_LMA;
        entry &= !(entry_ctl::IA32E_MODE_GUEST as u64);
    }
    vmx::set(GUEST_IA32_EFER, efer);
    vmx::set(ENTRY_CONTROLS, entry);
    vmx::set(GUEST_CR0, real);
    vmx::set(CR0_READ_SHADOW, v);
    flush_guest_tlb();
    true
}

fn write_cr4(v: u64) -> bool {
    let caps = &crate::hv::hv().caps;
    let Some(v) = guest_cr4_write(v, caps.cr4_fixed1) else {
        return false;
    };
    vmx::set(GUEST_CR4, v | caps.cr4_fixed0 | VMXE);
    vmx::set(CR4_READ_SHADOW, v);
    flush_guest_tlb();
    true
}

/// An emulated control-register write does not flush the TLB as the real
/// instruction would; do it for the host VM's VPID.
fn flush_guest_tlb() {
    // SAFETY: INVVPID single-context of the host VM's VPID.
    let _ = unsafe { instr::invvpid(1, vmx::read(VPID) as u16) };
}
