//! The direct-call entry (`shared_abi::CallFn`): the driver's way in when
//! there is no VMX to VMCALL (`iommu_only=1`). See `docs/vtd.md`.

use super::percpu::switch_tables;
use crate::arch::x86::instr;
use crate::arch::x86::msr::IA32_GS_BASE;
use core::sync::atomic::Ordering;
use shared_abi::errno::*;

/// The direct-call entry. It arrives on the boot page tables and CPU
/// `index`'s stack, with interrupts off; switches to the hypervisor's page
/// tables, IDT and per-CPU GS for the call; serves the hypercalls that need
/// no VMX; and puts Linux's IDT and GS base back. The trampoline restores
/// CR3 and the stack.
#[no_mangle]
#[link_section = ".text.uxen_call"]
extern "sysv64" fn uxen_call(index: u32, nr: u64, arg: u64, len: u64) -> shared_abi::CallResult {
    let refuse = |e: i64| shared_abi::CallResult { status: e, aux: 0 };
    let Some(h) = crate::hv::try_hv() else { return refuse(-ENODEV) };
    if !h.iommu_only() {
        // With VMX the host is demoted and must use VMCALL.
        return refuse(-EPERM);
    }
    if index >= h.boot.num_cpus {
        return refuse(-EINVAL);
    }
    switch_tables(h.cr3);
    let pc = h.percpu(index as usize);
    let linux_idt = instr::sidt();
    // SAFETY: GS base exists on every x86-64 CPU.
    let linux_gs = unsafe { instr::rdmsr(IA32_GS_BASE) };
    // SAFETY: this CPU's IDT and `PerCpu`, initialised at entry; interrupts
    // are off, and NMIs now reach the hypervisor's handler.
    unsafe {
        instr::lidt(&pc.idtr());
        instr::wrmsr(IA32_GS_BASE, pc.self_ptr);
    }
    let (status, aux) = crate::hv::hypercall::direct(nr, arg, len);
    if pc.host_nmi_pending.swap(0, Ordering::AcqRel) != 0 {
        log::warn!("cpu{index}: an NMI arrived during a direct call; the host does not see it");
    }
    // SAFETY: Linux's own values, read above on this CPU.
    unsafe {
        instr::lidt(&linux_idt);
        instr::wrmsr(IA32_GS_BASE, linux_gs);
    }
    shared_abi::CallResult { status, aux }
}
