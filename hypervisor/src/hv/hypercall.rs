//! The hypercall dispatcher for the host VM: the one place where host input
//! is validated and failures become `-errno`.

use super::exits::GuestRegs;
use super::{hv, memory};
use crate::arch::x86::cpu::this_cpu;
use crate::arch::x86::instr;
use crate::arch::x86::msr::*;
use crate::arch::x86::vmcs_fields::*;
use crate::arch::x86::vmx;
use alloc::boxed::Box;
use core::sync::atomic::Ordering;
use shared_abi::{errno::*, hc, HvStats, ReturnState, HvVersion, ABI_REVISION, EXIT_REASON_SLOTS, HV_FEATURE_EPT, HV_FEATURE_UNRESTRICTED, HV_FEATURE_VMX, HV_FEATURE_VPID, VERSION};

/// Host hypercall errors, turned into `-errno` here and nowhere else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HcError {
    /// Unknown hypercall number.
    NoSys,
    /// The argument block is not host memory the host may hand over.
    Fault,
    /// A malformed argument.
    Invalid,
    /// Not now (VMs exist, ...).
    Busy,
}

impl HcError {
    fn errno(self) -> i64 {
        -match self {
            HcError::NoSys => ENOSYS,
            HcError::Fault => EFAULT,
            HcError::Invalid => EINVAL,
            HcError::Busy => EBUSY,
        }
    }
}

/// Dispatches host hypercall `nr` with argument block `arg` of `len` bytes.
/// Returns `(RAX, RDX)`.
pub fn dispatch(nr: u64, arg: u64, len: u64, regs: &mut GuestRegs) -> (i64, u64) {
    let r = match nr {
        hc::VERSION => version(arg, len),
        hc::STATS => stats(arg, len),
        hc::UNLOAD => unload(regs),
        _ => Err(HcError::NoSys),
    };
    match r {
        Ok(v) => (v, 0),
        Err(e) => (e.errno(), 0),
    }
}

/// Copies `value` out to host memory at `pa`, after checking the host owns it.
fn copy_out<T: Copy>(pa: u64, len: u64, value: &T) -> Result<(), HcError> {
    let size = core::mem::size_of::<T>() as u64;
    if len < size {
        return Err(HcError::Invalid);
    }
    if !hv().host_owned(pa, size) {
        return Err(HcError::Fault);
    }
    // SAFETY: `T` is plain data; the destination is host RAM the host owns,
    // reachable through the direct map.
    unsafe { core::ptr::copy_nonoverlapping((value as *const T).cast::<u8>(), memory::phys_ptr(pa), size as usize) };
    Ok(())
}

fn version(arg: u64, len: u64) -> Result<i64, HcError> {
    let v = HvVersion {
        abi_revision: ABI_REVISION,
        num_cpus: hv().num_cpus() as u32,
        version: VERSION,
        features: HV_FEATURE_VMX | HV_FEATURE_EPT | HV_FEATURE_VPID | HV_FEATURE_UNRESTRICTED,
    };
    copy_out(arg, len, &v)?;
    Ok(0)
}

fn stats(arg: u64, len: u64) -> Result<i64, HcError> {
    let h = hv();
    // SAFETY: `HvStats` is plain data; all zeros is a valid value. It is
    // too big for the stack.
    let mut s: Box<HvStats> = unsafe { Box::new_zeroed().assume_init() };
    s.abi_revision = ABI_REVISION;
    s.num_cpus = h.num_cpus() as u32;
    s.hv_region_base = h.region.base.0;
    s.hv_region_size = h.region.size();
    s.blocked_host_reads = h.stats.blocked_reads.load(Ordering::Relaxed);
    s.blocked_host_writes = h.stats.blocked_writes.load(Ordering::Relaxed);
    s.last_blocked_gpa = h.stats.last_blocked_gpa.load(Ordering::Relaxed);
    let c = h.host_ept.lock().counts(&memory::DirectMap);
    s.host_ept_1g = c.huge;
    s.host_ept_2m = c.large;
    s.host_ept_4k = c.small;
    s.image_intact = super::setup::image_intact() as u32;
    for i in 0..h.num_cpus() {
        let pc = h.percpu(i);
        let d = &mut s.cpus[i];
        d.cpu_id = pc.linux_id;
        d.apic_id = pc.apic_id;
        d.virtualized = pc.virtualized.load(Ordering::Relaxed);
        d.exits = pc.exits.load(Ordering::Relaxed);
        d.host_exits = pc.host_exits.load(Ordering::Relaxed);
        d.exit_tsc = pc.exit_tsc.load(Ordering::Relaxed);
        for r in 0..EXIT_REASON_SLOTS {
            d.exits_by_reason[r] = pc.exits_by_reason[r].load(Ordering::Relaxed);
        }
    }
    copy_out(arg, len, &*s)?;
    Ok(0)
}

/// Leaves VMX on this CPU and resumes the host natively where it called.
fn unload(regs: &mut GuestRegs) -> Result<i64, HcError> {
    let h = hv();
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
    pc.virtualized.store(0, Ordering::Relaxed);
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
