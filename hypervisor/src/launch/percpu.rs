//! Each CPU's part of the launch: taking over its own area, entering VMX
//! operation and preparing the host VM's VMCS, launching it together with
//! the others or rolling back, and giving the CPU back to Linux when the
//! launch fails.

use super::global::roll_back_global;
use super::rendezvous::{barrier, failure, FAILED, READY};
use crate::arch::x86::cpu::{self, PerCpu};
use crate::arch::x86::instr;
use crate::arch::x86::msr::IA32_GS_BASE;
use crate::arch::x86::vmx::{self, VmxError};
use crate::hv::memory;
use crate::hv::Hv;
use core::sync::atomic::Ordering;
use shared_abi::{errno::*, BootInfo, ImageHeader, RegionLayout};

/// The first step, on every CPU, still on the boot tables: the region's
/// addresses, this CPU's area with Linux's state saved in it, and the
/// hypervisor's IDT and per-CPU GS base.
pub(super) fn arrive(info: &BootInfo, index: u32, h: &ImageHeader, l: &RegionLayout, linux_cr3: u64) -> &'static mut PerCpu {
    let i = index as usize;
    memory::init(info.direct_map_base, info.region_virt, info.region_phys, info.region_size);
    cpu::set_percpu_base(info.region_virt + l.percpu_start, h.percpu_size);
    cpu::set_nmi_hook(crate::hv::exits::nmi_in_root);
    let linux = vmx::save_linux_state(linux_cr3);
    // SAFETY: each CPU initialises its own area once.
    let pc = unsafe { PerCpu::init(i, info.cpus[i].linux_id) };
    pc.linux = linux;
    // Our IDT and per-CPU GS from here; Linux's are restored on failure.
    // SAFETY: the IDT is valid; interrupts are off.
    unsafe {
        instr::lidt(&pc.idtr());
        instr::wrmsr(IA32_GS_BASE, pc.self_ptr);
    }
    pc
}

/// Gives the CPU back to Linux after a failure: its IDT and GS base. The
/// trampoline restores CR3.
pub(super) fn leave(pc: &PerCpu, err: i64) -> i64 {
    let l = &pc.linux;
    // SAFETY: the values are Linux's own, saved at entry on this CPU.
    unsafe {
        instr::lidt(&l.idtr);
        instr::wrmsr(IA32_GS_BASE, l.gs_base);
    }
    err
}

/// Loads the hypervisor's page tables and drops every translation left
/// from the host's (global ones included).
pub(super) fn switch_tables(cr3: u64) {
    // SAFETY: the new tables map the region (this code, the stack) and the
    // trampoline page exactly as the boot tables did.
    unsafe {
        instr::write_cr3(cr3);
        let cr4 = instr::read_cr4();
        instr::write_cr4(cr4 & !(1 << 7));
        instr::write_cr4(cr4);
    }
}

/// The last step with VMX: this CPU's own set-up, then a barrier with the
/// others; if every CPU is ready, VMLAUNCH of the host VM, which on success
/// does not return. Otherwise every CPU rolls back and returns `-errno`.
pub(super) fn launch_host(pc: &mut PerCpu, hv: &Hv, info: &BootInfo, rip: u64, rsp: u64, n: u32) -> i64 {
    let i = pc.index;
    let r = percpu_setup(pc, hv, info, rip, rsp);
    if let Err(e) = r {
        log::error!("cpu{i}: {e}");
        FAILED.fetch_add(1, Ordering::AcqRel);
    }
    let synced = barrier(&READY, n);
    if r.is_err() || !synced || FAILED.load(Ordering::Acquire) != 0 {
        if r.is_ok() {
            // SAFETY: this CPU entered VMX operation in `percpu_setup`.
            unsafe { vmx::vmxoff(pc) };
            log::info!("cpu{i}: rolled back");
        }
        if i == 0 {
            roll_back_global();
        }
        return leave(pc, failure(r.map_err(|e| e.errno()), synced));
    }
    pc.virtualized.store(1, Ordering::Release);
    // SAFETY: the VMCS is complete; on success the CPU continues as the host
    // VM at `rip` and never comes back here.
    let err = unsafe { vmx::launch() };
    pc.virtualized.store(0, Ordering::Release);
    log::error!("cpu{i}: VMLAUNCH of the host VM failed: VM-instruction error {err}");
    crate::hv::exits::dump_vmcs();
    // SAFETY: in VMX operation.
    unsafe { vmx::vmxoff(pc) };
    // The load fails: devices must not keep walking tables in a region the
    // driver frees (another CPU's unload would do it too; it is idempotent).
    roll_back_global();
    leave(pc, -EIO)
}

/// Without VMX (`iommu_only=1`) each CPU only prepared its area for direct
/// calls; after the last barrier it goes back to Linux, which keeps running
/// natively. `fail_cpu` fails a CPU here as it fails a VMX set-up.
pub(super) fn iommu_only_finish(pc: &PerCpu, info: &BootInfo, n: u32) -> i64 {
    let i = pc.index;
    let r = if info.fail_cpu >= 0 && info.fail_cpu as u32 == i {
        log::error!("cpu{i}: {}", VmxError::Injected);
        FAILED.fetch_add(1, Ordering::AcqRel);
        Err(VmxError::Injected.errno())
    } else {
        Ok(())
    };
    let synced = barrier(&READY, n);
    if r.is_err() || !synced || FAILED.load(Ordering::Acquire) != 0 {
        if i == 0 {
            roll_back_global();
        }
        return leave(pc, failure(r, synced));
    }
    if i == 0 {
        log::info!("DMA protection only (iommu_only=1): no VMX; the host keeps running natively on {n} CPUs");
    }
    leave(pc, 0)
}

/// This CPU's VMX set-up: VMXON and the host VM's VMCS, with Linux's state
/// as the guest state.
fn percpu_setup(pc: &mut PerCpu, hv: &Hv, info: &BootInfo, rip: u64, rsp: u64) -> Result<(), VmxError> {
    vmx::check_and_enable()?;
    if info.fail_cpu >= 0 && info.fail_cpu as u32 == pc.index {
        return Err(VmxError::Injected);
    }
    // SAFETY: once on this CPU, with its area initialised.
    unsafe { vmx::vmxon(pc, &hv.caps)? };
    let linux = pc.linux;
    // SAFETY: the VMCS is current; `linux` is this CPU's state.
    let r = unsafe {
        vmx::setup_host_vm(pc, &hv.caps, &linux, rip, rsp, hv.cr3, hv.host_eptp, hv.msr_bitmap.0, [hv.io_bitmaps[0].0, hv.io_bitmaps[1].0])
    };
    if let Err(e) = r {
        // SAFETY: in VMX operation.
        unsafe { vmx::vmxoff(pc) };
        return Err(e);
    }
    // SAFETY: in VMX operation; start with no stale translations.
    unsafe {
        let _ = instr::invept(2, 0);
        let _ = instr::invvpid(2, 0);
    }
    Ok(())
}
