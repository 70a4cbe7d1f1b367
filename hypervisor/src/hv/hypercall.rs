//! The host VM's hypercalls: the calls that need the running VMX context
//! (UNLOAD, RUN, the registers of a vCPU, VM_IRQ, MERGE, POLL, HOST_CPU,
//! DEBUG_FAULTS) are answered here; every other goes to the portable
//! dispatcher, `control::dispatch`, over this machine
//! ([`super::platform::Machine`]). Failures become `-errno` in
//! `control::status` only.

use super::exits::GuestRegs;
use super::{hv, memory};
use crate::arch::x86::cpu::this_cpu;
use crate::arch::x86::instr;
use crate::arch::x86::msr::*;
use crate::arch::x86::vmcs_fields::*;
use crate::arch::x86::vmx;
use core::sync::atomic::Ordering;
use super::run::{self, Switch};
use super::vm::{self, VmError};
use super::platform::Machine;
use crate::control::{self, decode, vmops, Block};
use shared_abi::{hc, ReturnState};

/// Host hypercall errors; `HcError::errno` turns them into `-errno` for
/// this dispatcher and no one else.
pub use crate::control::HcError;

/// Dispatches host hypercall `nr` with argument block `arg` of `len` bytes.
pub fn dispatch(nr: u64, arg: u64, len: u64, regs: &mut GuestRegs) -> Switch {
    let r = match nr {
        hc::UNLOAD => match unload(regs) {
            Ok(retry) => return retry,
            Err(e) => Err(e),
        },
        hc::POLL => Ok(super::iommu::poll() as i64),
        hc::HOST_CPU => match arg {
            0 | 1 => Ok(super::ipi::host_cpu(arg == 1)),
            _ => Err(HcError::Invalid),
        },
        hc::VM_GET_REGS => vm_regs(arg, len, false),
        hc::VM_SET_REGS => vm_regs(arg, len, true),
        hc::VM_RUN => return run::run(regs, arg, len),
        hc::VM_IRQ => vm_irq(arg, len),
        hc::MERGE => merge(arg, len),
        hc::DEBUG_FAULTS => debug_faults(arg, len),
        _ => control::dispatch(&mut Machine::default(), nr, arg, len),
    };
    let (status, pages) = control::status(r);
    Switch::Return(status, pages)
}

/// A direct call from the driver when there is no VMX to VMCALL
/// (`iommu_only=1`; `setup::uxen_call`): the hypercalls that need no VMX,
/// validated as VMCALLs are. The others fail with `ENODEV`.
pub fn direct(nr: u64, arg: u64, len: u64) -> (i64, u64) {
    let r = match nr {
        hc::UNLOAD => unload_without_vmx(),
        hc::POLL => Ok(super::iommu::poll() as i64),
        // These need VMX and are answered here; the VM calls the core
        // dispatcher serves, it refuses itself when there is no VMX.
        hc::HOST_CPU | hc::VM_GET_REGS | hc::VM_SET_REGS | hc::VM_RUN | hc::VM_IRQ | hc::MERGE | hc::DEBUG_FAULTS => Err(HcError::NoVmx),
        _ => control::dispatch(&mut Machine::default(), nr, arg, len),
    };
    control::status(r)
}

/// Copies a `T` in from host memory at `pa`, after checking the host owns it.
fn copy_in<T: Block>(pa: u64, len: u64) -> Result<T, HcError> {
    decode::copy_in(&memory::HostBlocks, pa, len)
}

/// VM_IRQ: drives an input of a Linux guest's IOAPIC.
fn vm_irq(arg: u64, len: u64) -> Result<i64, HcError> {
    let q = decode::vm_irq(&memory::HostBlocks, arg, len)?;
    let vm = vm::get(q.vm)?;
    super::linux::irq(&vm, q.gsi, q.level).ok_or(HcError::Invalid)?;
    Ok(0)
}

fn vm_regs(arg: u64, len: u64, set: bool) -> Result<i64, HcError> {
    let mut r = decode::vm_regs(&memory::HostBlocks, arg, len, set)?;
    let vm = vm::get(r.vm)?;
    let vcpu = vm.vcpus.get(r.vcpu as usize).ok_or(HcError::Vm(VmError::NoSuchVcpu))?;
    if vcpu.running.load(Ordering::Acquire) {
        return Err(HcError::Busy);
    }
    let mut st = vcpu.state.lock();
    if set {
        if st.ready || st.snapshot.is_some() {
            // Only the initial state can be set (docs/ioctl.md); a forked
            // vCPU's is its parent's.
            return Err(HcError::Busy);
        }
        // `decode::vm_regs` checked them (shared_abi::validate::regs).
        st.init = vmops::initial_regs(&r.regs, vm.mem_bytes);
        return Ok(0);
    }
    r.regs = if st.ready || st.snapshot.is_some() {
        let mut out = st.init;
        let g = &st.gpr;
        out.rax = g[0];
        out.rcx = g[1];
        out.rdx = g[2];
        out.rbx = g[3];
        out.rbp = g[5];
        out.rsi = g[6];
        out.rdi = g[7];
        out.r8 = g[8];
        out.r9 = g[9];
        out.r10 = g[10];
        out.r11 = g[11];
        out.r12 = g[12];
        out.r13 = g[13];
        out.r14 = g[14];
        out.r15 = g[15];
        // RIP, RSP, RFLAGS and the control registers live in the VMCS, or
        // in the snapshot a forked vCPU starts from.
        if let Some(snap) = st.snapshot.as_ref().filter(|_| !st.ready) {
            let f = |field| vmx::snapshot_field(snap, field).unwrap_or(0);
            out.rip = f(GUEST_RIP);
            out.rsp = f(GUEST_RSP);
            out.rflags = f(GUEST_RFLAGS);
            out.cr0 = f(CR0_READ_SHADOW);
            out.cr3 = f(GUEST_CR3);
            out.cr4 = f(CR4_READ_SHADOW);
            out.efer = f(GUEST_IA32_EFER);
            drop(st);
            r.regs = out;
            copy_out(arg, len, &r)?;
            return Ok(0);
        }
        let pc = crate::arch::x86::cpu::this_cpu();
        // SAFETY: the vCPU is not running, so its VMCS is clear; load it
        // briefly, then make the host VM's current again.
        unsafe {
            if instr::vmptrld(vcpu.vmcs.0).is_ok() {
                out.rip = vmx::read(GUEST_RIP);
                out.rsp = vmx::read(GUEST_RSP);
                out.rflags = vmx::read(GUEST_RFLAGS);
                out.cr0 = vmx::read(CR0_READ_SHADOW);
                out.cr3 = vmx::read(GUEST_CR3);
                out.cr4 = vmx::read(CR4_READ_SHADOW);
                out.efer = vmx::read(GUEST_IA32_EFER);
                let _ = instr::vmclear(vcpu.vmcs.0);
            }
            let _ = instr::vmptrld(pc.vmcs_pa);
        }
        out
    } else {
        st.init
    };
    drop(st);
    copy_out(arg, len, &r)?;
    Ok(0)
}

/// MERGE: one chunk of a re-merging pass; 1 while there is more to do, 2
/// if the chunk was abandoned (a shootdown was not acknowledged), 0 when
/// the pass is over. The pass's figures so far are written back each time.
fn merge(arg: u64, len: u64) -> Result<i64, HcError> {
    let mut m: shared_abi::MergeScan = copy_in(arg, len)?;
    if m.flags & !(shared_abi::MERGE_CONTINUE | shared_abi::MERGE_END) != 0 || m.aborted != 0 {
        return Err(HcError::Invalid);
    }
    if m.flags & shared_abi::MERGE_END != 0 {
        super::merge::end();
        return Ok(0);
    }
    if m.flags & shared_abi::MERGE_CONTINUE == 0 {
        super::merge::start(m.vm)?;
    }
    let max = if m.max_pages == 0 { shared_abi::MERGE_CHUNK } else { m.max_pages.min(shared_abi::MERGE_CHUNK) };
    let (ret, p) = match super::merge::step(max as usize)? {
        super::merge::Step::More(p) => (1, p),
        super::merge::Step::Aborted(p) => (2, p),
        super::merge::Step::Done(p) => (0, p),
    };
    m.scanned = p.stats.scanned;
    m.merged = p.stats.merged;
    m.zero = p.stats.zero;
    m.frames_freed = p.freed;
    m.tsc = p.tsc;
    m.aborted = p.aborted;
    copy_out(arg, len, &m)?;
    Ok(ret)
}

/// DEBUG_FAULTS: fault injection for tests (debug builds of the boot
/// flags only).
fn debug_faults(arg: u64, len: u64) -> Result<i64, HcError> {
    if hv().boot.flags & shared_abi::BOOT_FLAG_DEBUG == 0 {
        return Err(HcError::NoSys);
    }
    let f: shared_abi::DebugFaults = copy_in(arg, len)?;
    if f.faults & !shared_abi::DEBUG_FAULT_DROP_SHOOTDOWN_ACKS != 0 || f.reserved0 != 0 {
        return Err(HcError::Invalid);
    }
    let drop_acks = f.faults & shared_abi::DEBUG_FAULT_DROP_SHOOTDOWN_ACKS != 0;
    if super::tlb::DROP_ACKS.swap(drop_acks, Ordering::AcqRel) != drop_acks {
        log::warn!("debug: TLB shootdown acknowledgements {}", if drop_acks { "dropped" } else { "restored" });
    }
    Ok(0)
}

/// Copies `value` out to host memory at `pa`, after checking the host owns it.
fn copy_out<T: Block>(pa: u64, len: u64, value: &T) -> Result<(), HcError> {
    decode::copy_out(&memory::HostBlocks, pa, len, value)
}

/// Leaves VMX on this CPU and resumes the host natively where it called.
/// Returns only on failure, or with `Switch::Retry` when the host has an
/// NMI to take first.
fn unload(regs: &mut GuestRegs) -> Result<Switch, HcError> {
    let h = hv();
    if vm::count() != 0 {
        return Err(HcError::Busy);
    }
    h.unloading.store(true, Ordering::Relaxed);
    let pc = this_cpu();
    let caps = &h.caps;
    let cr0_mask = caps.cr0_mask();
    let cr4_mask = caps.cr4_mask();
    let cr0 = (vmx::read(GUEST_CR0) & !cr0_mask) | (vmx::read(CR0_READ_SHADOW) & cr0_mask);
    let cr4 = (vmx::read(GUEST_CR4) & !cr4_mask) | (vmx::read(CR4_READ_SHADOW) & cr4_mask);
    let dt = |limit: u32, base: u32| {
        let mut b = [0u8; 16];
        b[..2].copy_from_slice(&(vmx::read(limit) as u16).to_le_bytes());
        b[2..10].copy_from_slice(&vmx::read(base).to_le_bytes());
        b
    };
    let mut st = ReturnState {
        gdtr: dt(GUEST_GDTR_LIMIT, GUEST_GDTR_BASE),
        gdtr_rw: dt(GUEST_GDTR_LIMIT, GUEST_GDTR_BASE),
        idtr: dt(GUEST_IDTR_LIMIT, GUEST_IDTR_BASE),
        cr0,
        cr3: vmx::read(GUEST_CR3),
        cr4,
        tr: vmx::read(GUEST_TR_SELECTOR) as u16,
        ds: vmx::read(GUEST_DS_SELECTOR) as u16,
        es: vmx::read(GUEST_ES_SELECTOR) as u16,
        ss: vmx::read(GUEST_SS_SELECTOR) as u16,
        fs: vmx::read(GUEST_FS_SELECTOR) as u16,
        gs: vmx::read(GUEST_GS_SELECTOR) as u16,
        fs_base: vmx::read(GUEST_FS_BASE),
        gs_base: vmx::read(GUEST_GS_BASE),
        rsp: vmx::read(GUEST_RSP),
        rip: vmx::read(GUEST_RIP),
        rflags: vmx::read(GUEST_RFLAGS),
        gpr: *regs,
        ..Default::default()
    };
    st.gpr[0] = 0;
    st.gpr[2] = 0;
    // `ltr` needs Linux's TSS descriptor marked available again, and a
    // writable view of the GDT to mark it busy through.
    let Some(gdt_pa) = clear_tss_busy(vmx::read(GUEST_GDTR_BASE), st.tr, st.cr3) else {
        log::error!("cpu{}: cannot find Linux's TSS descriptor; unload refused", pc.index);
        return Err(HcError::Busy);
    };
    // Devices reach memory untranslated again before the region goes (the
    // first CPU to get here does it). A unit that does not answer may still
    // walk the tables: then no CPU leaves, and the region stays.
    super::iommu::teardown().map_err(|_| HcError::Busy)?;
    st.gdtr_rw[2..10].copy_from_slice(&(h.dm_base + gdt_pa).to_le_bytes());
    let msrs = [
        (IA32_SYSENTER_CS, vmx::read(GUEST_IA32_SYSENTER_CS)),
        (IA32_SYSENTER_ESP, vmx::read(GUEST_IA32_SYSENTER_ESP)),
        (IA32_SYSENTER_EIP, vmx::read(GUEST_IA32_SYSENTER_EIP)),
        (IA32_DEBUGCTL, vmx::read(GUEST_IA32_DEBUGCTL)),
        (IA32_PAT, vmx::read(GUEST_IA32_PAT)),
        (IA32_EFER, vmx::read(GUEST_IA32_EFER)),
    ];
    let dr7 = vmx::read(GUEST_DR7);
    // From here no kick is sent to this CPU, and one on its way is taken
    // now: after VMXOFF its NMI would reach Linux, which has no handler
    // for it ("NMI received for unknown reason").
    pc.virtualized.store(0, Ordering::SeqCst);
    if !super::tlb::stop_kicks(pc) {
        log::warn!("cpu{}: a kick's NMI did not arrive before unload", pc.index);
        pc.kick_pending.store(0, Ordering::Release);
    }
    if pc.host_nmi_pending.load(Ordering::Acquire) != 0 {
        // An NMI of the host's own came in (while this CPU waited, or
        // before): it is injected into the host VM on the way back (see
        // `exits::after_exit`), and the host makes the call again.
        pc.virtualized.store(1, Ordering::SeqCst);
        // Shootdowns passed this CPU by while it was marked as leaving.
        // SAFETY: INVEPT all-context in VMX operation.
        unsafe {
            let _ = instr::invept(2, 0);
        }
        return Ok(Switch::Retry);
    }
    log::info!("cpu{}: leaving VMX, the host runs natively again", pc.index);
    let tramp_return = h.boot.tramp_return;
    // SAFETY: the VMCS state was copied out above; from here this CPU runs
    // natively, restores Linux's MSRs and jumps to the driver's trampoline,
    // which reloads the rest from `st` (on this stack, which the host's
    // direct map covers) and resumes the host.
    unsafe {
        let _ = instr::vmclear(pc.vmcs_pa);
        let _ = instr::vmxoff();
        instr::write_cr4(instr::read_cr4() & !(1 << 13));
        for (m, v) in msrs {
            instr::wrmsr_safe(m, v);
        }
        core::arch::asm!("mov dr7, {}", in(reg) dr7, options(nostack));
        core::arch::asm!("jmp {t}", t = in(reg) tramp_return, in("rdi") &st, options(noreturn));
    }
}

/// UNLOAD without VMX (`iommu_only=1`): turns DMA remapping off, after
/// which the driver may free the region. Called once, on any CPU.
fn unload_without_vmx() -> Result<i64, HcError> {
    if vm::count() != 0 {
        return Err(HcError::Busy);
    }
    super::iommu::teardown().map_err(HcError::Iommu)?;
    hv().unloading.store(true, Ordering::Relaxed);
    log::info!("unloaded: devices reach memory untranslated again");
    Ok(0)
}

/// Marks the TSS descriptor `tr` in the GDT at linear `gdt` available;
/// returns the GDT's physical address.
fn clear_tss_busy(gdt: u64, tr: u16, cr3: u64) -> Option<u64> {
    use crate::paging::{translate, AccessKind, PagingMode};
    let mode = PagingMode {
        cr0: vmx::read(GUEST_CR0),
        cr3,
        cr4: vmx::read(CR4_READ_SHADOW),
        efer: vmx::read(GUEST_IA32_EFER),
    };
    let kind = AccessKind { write: false, user: false };
    let walk = |la: u64| translate(&memory::DirectMap, &mode, la, kind, |g| Some(crate::addr::Hpa(g.0))).ok();
    let base = walk(gdt)?.gpa.0;
    let desc = walk(gdt + (tr & !7) as u64 + 5)?.gpa.0;
    // The GDT must be one physically contiguous page for the writable alias.
    if gdt & 0xfff != 0 || desc - base != (tr & !7) as u64 + 5 {
        return None;
    }
    let p = memory::phys_ptr(desc);
    // SAFETY: the byte is the type field of Linux's TSS descriptor, in host
    // RAM reachable through the direct map.
    unsafe { p.write_volatile(p.read_volatile() & !0x02) };
    Some(base)
}
