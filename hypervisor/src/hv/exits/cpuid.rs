//! CPUID: the host sees the hypervisor's signature and no VMX.

use super::{skip_instruction, GuestRegs, RAX, RBX, RCX, RDX};
use crate::arch::x86::instr;
use crate::policy::{host_cpuid, Cpuid};

pub fn handle(regs: &mut GuestRegs) {
    let leaf = regs[RAX] as u32;
    let sub = regs[RCX] as u32;
    let r = host_cpuid(leaf, sub, |l, s| {
        let [eax, ebx, ecx, edx] = instr::cpuid(l, s);
        Cpuid { eax, ebx, ecx, edx }
    });
    regs[RAX] = r.eax as u64;
    regs[RBX] = r.ebx as u64;
    regs[RCX] = r.ecx as u64;
    regs[RDX] = r.edx as u64;
    skip_instruction();
}
