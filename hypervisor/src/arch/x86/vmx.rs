//! VMX operation: capabilities, VMXON, and the VMCS of the host VM.

use super::cpu::{PerCpu, SavedState, SEL_CODE, SEL_DATA, SEL_TSS};
use super::instr;
use super::msr::*;
use super::vmcs_fields::*;

/// The VMX capability MSRs, read once.
#[derive(Clone, Copy, Debug, Default)]
pub struct VmxCaps {
    pub basic: u64,
    pub pin: u64,
    pub proc1: u64,
    pub proc2: u64,
    pub exit: u64,
    pub entry: u64,
    pub misc: u64,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    pub ept_vpid: u64,
}

/// Why a CPU cannot run the hypervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxError {
    /// CPUID reports no VMX (or not an Intel CPU).
    NoVmx,
    /// Firmware locked IA32_FEATURE_CONTROL with VMX off.
    DisabledByFirmware,
    /// VMX lacks something the hypervisor needs (named).
    Missing(&'static str),
    /// A VMX instruction failed.
    InstructionFailed(&'static str, u64),
    /// Fault injection.
    Injected,
}

impl VmxError {
    pub fn errno(self) -> i64 {
        use shared_abi::errno::*;
        match self {
            VmxError::NoVmx | VmxError::DisabledByFirmware | VmxError::Missing(_) => -ENODEV,
            VmxError::InstructionFailed(..) => -EIO,
            VmxError::Injected => -EIO,
        }
    }
}

impl core::fmt::Display for VmxError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            VmxError::NoVmx => write!(f, "VT-x is unavailable on this CPU (CPUID.1:ECX.VMX is clear)"),
            VmxError::DisabledByFirmware => write!(f, "VT-x is disabled by the firmware (IA32_FEATURE_CONTROL locked)"),
            VmxError::Missing(what) => write!(f, "VT-x lacks {what}"),
            VmxError::InstructionFailed(what, err) => write!(f, "{what} failed (VM-instruction error {err})"),
            VmxError::Injected => write!(f, "entry failure injected by the fail_cpu parameter"),
        }
    }
}

/// Checks that this CPU has usable VMX, enabling it in
/// IA32_FEATURE_CONTROL if the firmware left it unlocked.
pub fn check_and_enable() -> Result<(), VmxError> {
    let v = instr::cpuid(0, 0);
    let intel = v[1] == u32::from_le_bytes(*b"Genu") && v[3] == u32::from_le_bytes(*b"ineI") && v[2] == u32::from_le_bytes(*b"ntel");
    if !intel || instr::cpuid(1, 0)[2] & (1 << 5) == 0 {
        return Err(VmxError::NoVmx);
    }
    // SAFETY: IA32_FEATURE_CONTROL exists on every CPU with VMX.
    let fc = unsafe { instr::rdmsr_safe(IA32_FEATURE_CONTROL) }.ok_or(VmxError::NoVmx)?;
    if fc & FC_LOCK != 0 {
        if fc & FC_VMX_OUTSIDE_SMX == 0 {
            return Err(VmxError::DisabledByFirmware);
        }
    } else {
        // SAFETY: enabling and locking VMX as firmware would.
        let ok = unsafe { instr::wrmsr_safe(IA32_FEATURE_CONTROL, fc | FC_LOCK | FC_VMX_OUTSIDE_SMX) };
        if !ok {
            return Err(VmxError::DisabledByFirmware);
        }
    }
    Ok(())
}

impl VmxCaps {
    /// Reads the capability MSRs and checks what the hypervisor needs.
    pub fn read() -> Result<VmxCaps, VmxError> {
        // SAFETY: the VMX MSRs exist once CPUID reports VMX.
        let rd = |m| unsafe { instr::rdmsr_safe(m) }.unwrap_or(0);
        let basic = rd(IA32_VMX_BASIC);
        let true_ctls = basic & (1 << 55) != 0;
        let caps = VmxCaps {
            basic,
            pin: rd(if true_ctls { IA32_VMX_TRUE_PINBASED_CTLS } else { IA32_VMX_PINBASED_CTLS }),
            proc1: rd(if true_ctls { IA32_VMX_TRUE_PROCBASED_CTLS } else { IA32_VMX_PROCBASED_CTLS }),
            proc2: rd(IA32_VMX_PROCBASED_CTLS2),
            exit: rd(if true_ctls { IA32_VMX_TRUE_EXIT_CTLS } else { IA32_VMX_EXIT_CTLS }),
            entry: rd(if true_ctls { IA32_VMX_TRUE_ENTRY_CTLS } else { IA32_VMX_ENTRY_CTLS }),
            misc: rd(IA32_VMX_MISC),
            cr0_fixed0: rd(IA32_VMX_CR0_FIXED0),
            cr0_fixed1: rd(IA32_VMX_CR0_FIXED1),
            cr4_fixed0: rd(IA32_VMX_CR4_FIXED0),
            cr4_fixed1: rd(IA32_VMX_CR4_FIXED1),
            ept_vpid: rd(IA32_VMX_EPT_VPID_CAP),
        };
        if !true_ctls {
            return Err(VmxError::Missing("the true VMX control MSRs"));
        }
        if (basic >> 32) & 0x1fff > 4096 || (basic >> 50) & 0xf != 6 {
            return Err(VmxError::Missing("write-back VMCS regions of at most 4 KiB"));
        }
        if !controls_supported(proc1::ACTIVATE_SECONDARY | proc1::USE_MSR_BITMAPS | proc1::USE_IO_BITMAPS, caps.proc1) {
            return Err(VmxError::Missing("secondary controls and MSR/I/O bitmaps"));
        }
        for (bit, what) in [
            (proc2::ENABLE_EPT, "EPT"),
            (proc2::ENABLE_VPID, "VPID"),
            (proc2::UNRESTRICTED_GUEST, "unrestricted guest"),
        ] {
            if !controls_supported(bit, caps.proc2) {
                return Err(VmxError::Missing(what));
            }
        }
        if caps.ept_vpid & (1 << 6) == 0 || caps.ept_vpid & (1 << 14) == 0 {
            return Err(VmxError::Missing("4-level write-back EPT"));
        }
        if caps.ept_vpid & (1 << 20) == 0 || caps.ept_vpid & (1 << 32) == 0 {
            return Err(VmxError::Missing("INVEPT and INVVPID"));
        }
        Ok(caps)
    }

    pub fn revision(&self) -> u32 {
        (self.basic & 0x7fff_ffff) as u32
    }

    pub fn ept_huge_pages(&self) -> bool {
        self.ept_vpid & (1 << 17) != 0
    }

    /// CR0 bits the guest may not change on its own (with unrestricted
    /// guest, PE and PG are free).
    pub fn cr0_mask(&self) -> u64 {
        let must = self.cr0_fixed0 & !(1 | (1 << 31));
        (must | !self.cr0_fixed1) & 0xffff_ffff
    }

    pub fn cr4_mask(&self) -> u64 {
        (self.cr4_fixed0 | !self.cr4_fixed1) & 0xffff_ffff
    }
}

/// Enters VMX operation on this CPU.
///
/// # Safety
/// Once per CPU, with the per-CPU area initialised.
pub unsafe fn vmxon(pc: &PerCpu, caps: &VmxCaps) -> Result<(), VmxError> {
    // SAFETY: the VMXON region is this CPU's page; CR4.VMXE is required.
    unsafe {
        ((pc.self_ptr + super::cpu::area::VMXON) as *mut u32).write(caps.revision());
        ((pc.self_ptr + super::cpu::area::VMCS) as *mut u32).write(caps.revision());
        let cr0 = (instr::read_cr0() | caps.cr0_fixed0) & caps.cr0_fixed1;
        instr::write_cr0(cr0);
        instr::write_cr4((instr::read_cr4() | caps.cr4_fixed0 | (1 << 13)) & caps.cr4_fixed1);
        instr::vmxon(pc.vmxon_pa).map_err(|_| VmxError::InstructionFailed("VMXON", 0))?;
        instr::vmclear(pc.vmcs_pa).map_err(|_| VmxError::InstructionFailed("VMCLEAR", 0))?;
        instr::vmptrld(pc.vmcs_pa).map_err(|_| VmxError::InstructionFailed("VMPTRLD", 0))?;
    }
    Ok(())
}

/// Leaves VMX operation on this CPU, after a failed set-up or at unload:
/// VMCLEAR of its VMCS, VMXOFF, then CR4.VMXE cleared.
///
/// # Safety
/// In VMX operation on this CPU.
pub unsafe fn vmxoff(pc: &PerCpu) {
    // SAFETY: per the caller's contract.
    unsafe {
        let _ = instr::vmclear(pc.vmcs_pa);
        let _ = instr::vmxoff();
        instr::write_cr4(instr::read_cr4() & !(1 << 13));
    }
}

/// Makes `home` (this CPU's host VM VMCS) current again after `vmcs`:
/// VMCLEAR writes `vmcs` back to memory and makes it inactive, so that any
/// CPU may load it next (SDM Vol. 3C, 25.1 and 25.11.1), then VMPTRLD of `home`.
///
/// # Safety
/// In VMX operation; `vmcs` and `home` are VMCS regions of this
/// hypervisor, `vmcs` active on no other CPU and `home` this CPU's own.
pub unsafe fn switch_back(vmcs: u64, home: u64) {
    // SAFETY: per the caller's contract.
    unsafe {
        let _ = instr::vmclear(vmcs);
        let _ = instr::vmptrld(home);
    }
}

/// Runs `f` with the idle VMCS `vmcs` current (to read or write its
/// fields), then writes it back and makes `home` current again. `None`
/// if `vmcs` could not be loaded (and `f` did not run).
///
/// # Safety
/// In VMX operation, with `home` (this CPU's host VM VMCS) current;
/// `vmcs` is a VMCS region of this hypervisor that is clear, active on no
/// CPU (a vCPU that is not running). `f` must leave `vmcs` current.
pub unsafe fn with_idle_vmcs<R>(vmcs: u64, home: u64, f: impl FnOnce() -> R) -> Option<R> {
    // SAFETY: per the caller's contract; a clear VMCS may be loaded on any
    // CPU, and is written back by VMCLEAR before `home` is loaded again
    // (SDM Vol. 3C, 25.11.1).
    unsafe {
        let r = instr::vmptrld(vmcs).ok().map(|()| f());
        if r.is_some() {
            let _ = instr::vmclear(vmcs);
        }
        let _ = instr::vmptrld(home);
        r
    }
}

/// Writes a VMCS field, with the error carried to the caller.
pub fn write(field: u32, v: u64) -> Result<(), VmxError> {
    // SAFETY: a VMCS is current whenever this is called.
    unsafe { instr::vmwrite(field, v) }.map_err(|_| VmxError::InstructionFailed("VMWRITE", field as u64))
}

/// Reads a VMCS field (0 if it cannot be read).
pub fn read(field: u32) -> u64 {
    // SAFETY: a VMCS is current whenever this is called.
    unsafe { instr::vmread(field) }.unwrap_or(0)
}

/// Writes a field that must succeed (the VMCS is current and the field
/// exists on every CPU the hypervisor accepted).
pub fn set(field: u32, v: u64) {
    // SAFETY: as in `read`.
    if unsafe { instr::vmwrite(field, v) }.is_err() {
        panic!("VMWRITE of field {field:#x} failed");
    }
}

/// A segment's VMCS image, read from a GDT.
struct Segment {
    selector: u16,
    base: u64,
    limit: u32,
    ar: u32,
}

/// Reads 8 bytes of Linux's memory at linear `la`, through Linux's page
/// tables and the hypervisor's direct map.
fn read_linux(linux: &SavedState, la: u64) -> u64 {
    use crate::mem::PhysMem;
    use crate::paging::{translate, AccessKind, PagingMode};
    let mode = PagingMode { cr0: linux.cr0, cr3: linux.cr3, cr4: linux.cr4, efer: linux.efer };
    let kind = AccessKind { write: false, user: false };
    let mem = super::physmap::DirectMap;
    match translate(&mem, &mode, la, kind, |g| Some(crate::addr::Hpa(g.0))) {
        Ok(t) => mem.read_u64(crate::addr::Hpa(t.gpa.0)),
        Err(_) => 0,
    }
}

/// Reads the descriptor for `sel` from Linux's GDT.
fn segment(linux: &SavedState, sel: u16, system: bool) -> Segment {
    if sel & !7 == 0 {
        return Segment { selector: sel, base: 0, limit: 0, ar: 1 << 16 };
    }
    let at = linux.gdtr.base + (sel & !7) as u64;
    let d = read_linux(linux, at);
    let mut base = ((d >> 16) & 0xff_ffff) | (((d >> 56) & 0xff) << 24);
    if system {
        base |= read_linux(linux, at + 8) << 32;
    }
    let mut limit = ((d & 0xffff) | ((d >> 32) & 0xf_0000)) as u32;
    if d & (1 << 55) != 0 {
        limit = (limit << 12) | 0xfff;
    }
    let ar = ((d >> 40) & 0xf0ff) as u32;
    Segment { selector: sel, base, limit, ar }
}

/// Captures this CPU's state as Linux left it (`cr3`: Linux's, since the
/// trampoline already switched to the boot page tables).
pub fn save_linux_state(cr3: u64) -> SavedState {
    // SAFETY: reading the MSRs every x86-64 CPU has.
    let rd = |m| unsafe { instr::rdmsr(m) };
    SavedState {
        cr0: instr::read_cr0(),
        cr3,
        cr4: instr::read_cr4(),
        gdtr: instr::sgdt(),
        idtr: instr::sidt(),
        cs: instr::read_cs(),
        ss: instr::read_ss(),
        ds: instr::read_ds(),
        es: instr::read_es(),
        fs: instr::read_fs(),
        gs: instr::read_gs(),
        tr: instr::read_tr(),
        ldtr: instr::read_ldtr(),
        fs_base: rd(IA32_FS_BASE),
        gs_base: rd(IA32_GS_BASE),
        efer: rd(IA32_EFER),
        pat: rd(IA32_PAT),
        debugctl: rd(IA32_DEBUGCTL),
        sysenter_cs: rd(IA32_SYSENTER_CS),
        sysenter_esp: rd(IA32_SYSENTER_ESP),
        sysenter_eip: rd(IA32_SYSENTER_EIP),
        dr7: instr::read_dr7(),
        rflags: instr::read_rflags(),
    }
}

/// Fills the current VMCS for the host VM: guest state = Linux as it was at
/// entry (`linux`), continuing at `rip`/`rsp`; host state = this CPU's
/// hypervisor environment.
///
/// # Safety
/// The VMCS is current; `linux` describes this CPU, and its GDT is mapped.
#[allow(clippy::too_many_arguments)]
pub unsafe fn setup_host_vm(
    pc: &PerCpu,
    caps: &VmxCaps,
    linux: &SavedState,
    rip: u64,
    rsp: u64,
    hv_cr3: u64,
    eptp: u64,
    msr_bitmap: u64,
    io_bitmaps: [u64; 2],
) -> Result<(), VmxError> {
    // Controls. NMIs exit so that the hypervisor can use them for TLB
    // shootdowns; the host's own NMIs are re-injected (virtual NMIs track
    // the host's NMI blocking).
    let pin = pin::NMI_EXITING | pin::VIRTUAL_NMIS;
    if !controls_supported(pin, caps.pin) {
        return Err(VmxError::Missing("NMI exiting and virtual NMIs"));
    }
    write(PIN_BASED_CONTROLS, adjust_controls(pin, caps.pin) as u64)?;
    let p1 = proc1::ACTIVATE_SECONDARY | proc1::USE_MSR_BITMAPS | proc1::USE_IO_BITMAPS;
    write(PRIMARY_PROC_CONTROLS, adjust_controls(p1, caps.proc1) as u64)?;
    let mut p2 = proc2::ENABLE_EPT | proc2::ENABLE_VPID | proc2::UNRESTRICTED_GUEST;
    // Without these, RDTSCP, INVPCID and XSAVES would raise #UD in the host.
    for opt in [proc2::ENABLE_RDTSCP, proc2::ENABLE_INVPCID, proc2::ENABLE_XSAVES] {
        if controls_supported(opt, caps.proc2) {
            p2 |= opt;
        }
    }
    let p2 = adjust_controls(p2, caps.proc2);
    write(SECONDARY_PROC_CONTROLS, p2 as u64)?;
    if p2 & proc2::ENABLE_XSAVES != 0 {
        // XSAVES/XRSTORS run natively for every XSS component.
        write(XSS_EXIT_BITMAP, 0)?;
    }
    let ex = exit_ctl::HOST_ADDRESS_SPACE_SIZE
        | exit_ctl::SAVE_IA32_PAT
        | exit_ctl::LOAD_IA32_PAT
        | exit_ctl::SAVE_IA32_EFER
        | exit_ctl::LOAD_IA32_EFER
        | exit_ctl::SAVE_DEBUG_CONTROLS;
    write(EXIT_CONTROLS, adjust_controls(ex, caps.exit) as u64)?;
    let mut en = entry_ctl::LOAD_IA32_PAT | entry_ctl::LOAD_IA32_EFER | entry_ctl::LOAD_DEBUG_CONTROLS;
    if linux.efer & (1 << 10) != 0 {
        en |= entry_ctl::IA32E_MODE_GUEST;
    }
    write(ENTRY_CONTROLS, adjust_controls(en, caps.entry) as u64)?;
    write(EXCEPTION_BITMAP, 0)?;
    write(PAGE_FAULT_ERROR_MASK, 0)?;
    write(PAGE_FAULT_ERROR_MATCH, 0)?;
    write(CR3_TARGET_COUNT, 0)?;
    write(EXIT_MSR_STORE_COUNT, 0)?;
    write(EXIT_MSR_LOAD_COUNT, 0)?;
    write(ENTRY_MSR_LOAD_COUNT, 0)?;
    write(ENTRY_INTERRUPTION_INFO, 0)?;
    write(MSR_BITMAP, msr_bitmap)?;
    write(IO_BITMAP_A, io_bitmaps[0])?;
    write(IO_BITMAP_B, io_bitmaps[1])?;
    write(EPT_POINTER, eptp)?;
    write(VPID, 1)?;
    write(VMCS_LINK_POINTER, u64::MAX)?;
    write(TSC_OFFSET, 0)?;

    // Control registers: the host VM may not see or change VMX's fixed bits.
    let cr0_mask = caps.cr0_mask();
    let cr4_mask = caps.cr4_mask();
    write(CR0_GUEST_HOST_MASK, cr0_mask)?;
    write(CR4_GUEST_HOST_MASK, cr4_mask)?;
    write(CR0_READ_SHADOW, linux.cr0)?;
    write(CR4_READ_SHADOW, linux.cr4)?;
    write(GUEST_CR0, (linux.cr0 | caps.cr0_fixed0) & caps.cr0_fixed1)?;
    write(GUEST_CR3, linux.cr3)?;
    write(GUEST_CR4, (linux.cr4 | caps.cr4_fixed0 | (1 << 13)) & caps.cr4_fixed1)?;
    write(GUEST_DR7, linux.dr7)?;

    // Segments, from Linux's GDT.
    let segs = [
        (GUEST_ES_SELECTOR, GUEST_ES_BASE, GUEST_ES_LIMIT, GUEST_ES_AR, linux.es, false),
        (GUEST_CS_SELECTOR, GUEST_CS_BASE, GUEST_CS_LIMIT, GUEST_CS_AR, linux.cs, false),
        (GUEST_SS_SELECTOR, GUEST_SS_BASE, GUEST_SS_LIMIT, GUEST_SS_AR, linux.ss, false),
        (GUEST_DS_SELECTOR, GUEST_DS_BASE, GUEST_DS_LIMIT, GUEST_DS_AR, linux.ds, false),
        (GUEST_FS_SELECTOR, GUEST_FS_BASE, GUEST_FS_LIMIT, GUEST_FS_AR, linux.fs, false),
        (GUEST_GS_SELECTOR, GUEST_GS_BASE, GUEST_GS_LIMIT, GUEST_GS_AR, linux.gs, false),
        (GUEST_LDTR_SELECTOR, GUEST_LDTR_BASE, GUEST_LDTR_LIMIT, GUEST_LDTR_AR, linux.ldtr, true),
        (GUEST_TR_SELECTOR, GUEST_TR_BASE, GUEST_TR_LIMIT, GUEST_TR_AR, linux.tr, true),
    ];
    for (sel_f, base_f, limit_f, ar_f, sel, system) in segs {
        let s = segment(linux, sel, system);
        write(sel_f, s.selector as u64)?;
        write(base_f, s.base)?;
        write(limit_f, s.limit as u64)?;
        write(ar_f, s.ar as u64)?;
    }
    // 64-bit FS/GS bases live in MSRs, not descriptors.
    write(GUEST_FS_BASE, linux.fs_base)?;
    write(GUEST_GS_BASE, linux.gs_base)?;
    write(GUEST_GDTR_BASE, linux.gdtr.base)?;
    write(GUEST_GDTR_LIMIT, linux.gdtr.limit as u64)?;
    write(GUEST_IDTR_BASE, linux.idtr.base)?;
    write(GUEST_IDTR_LIMIT, linux.idtr.limit as u64)?;
    write(GUEST_IA32_DEBUGCTL, linux.debugctl)?;
    write(GUEST_IA32_PAT, linux.pat)?;
    write(GUEST_IA32_EFER, linux.efer)?;
    write(GUEST_IA32_SYSENTER_CS, linux.sysenter_cs)?;
    write(GUEST_IA32_SYSENTER_ESP, linux.sysenter_esp)?;
    write(GUEST_IA32_SYSENTER_EIP, linux.sysenter_eip)?;
    write(GUEST_RSP, rsp)?;
    write(GUEST_RIP, rip)?;
    write(GUEST_RFLAGS, linux.rflags)?;
    write(GUEST_ACTIVITY_STATE, activity::ACTIVE)?;
    write(GUEST_INTERRUPTIBILITY, 0)?;
    write(GUEST_PENDING_DBG_EXCEPTIONS, 0)?;

    // Host state: the hypervisor's own environment on this CPU.
    write_host_state(pc, hv_cr3, linux)
}

/// Writes the host-state area for this CPU into the current VMCS (also used
/// when a guest VMCS is loaded on a CPU).
pub fn write_host_state(pc: &PerCpu, hv_cr3: u64, linux: &SavedState) -> Result<(), VmxError> {
    write(HOST_CR0, instr::read_cr0())?;
    write(HOST_CR3, hv_cr3)?;
    write(HOST_CR4, instr::read_cr4())?;
    write(HOST_CS_SELECTOR, SEL_CODE as u64)?;
    write(HOST_SS_SELECTOR, SEL_DATA as u64)?;
    write(HOST_DS_SELECTOR, SEL_DATA as u64)?;
    write(HOST_ES_SELECTOR, SEL_DATA as u64)?;
    write(HOST_FS_SELECTOR, 0)?;
    write(HOST_GS_SELECTOR, 0)?;
    write(HOST_TR_SELECTOR, SEL_TSS as u64)?;
    write(HOST_FS_BASE, 0)?;
    write(HOST_GS_BASE, pc.self_ptr)?;
    write(HOST_TR_BASE, pc.tss_base())?;
    write(HOST_GDTR_BASE, pc.gdtr().base)?;
    write(HOST_IDTR_BASE, pc.idtr().base)?;
    write(HOST_IA32_SYSENTER_CS, 0)?;
    write(HOST_IA32_SYSENTER_ESP, 0)?;
    write(HOST_IA32_SYSENTER_EIP, 0)?;
    write(HOST_IA32_EFER, linux.efer)?;
    write(HOST_IA32_PAT, linux.pat)?;
    write(HOST_RSP, pc.stack_top)?;
    write(HOST_RIP, super::asm::uxen_vmexit as *const () as u64)
}

/// VMLAUNCH of the current VMCS. Returns only on failure, with the
/// VM-instruction error.
///
/// # Safety
/// The current VMCS must be complete.
pub unsafe fn launch() -> u64 {
    // SAFETY: per the caller's contract; on success control continues in
    // the guest and this frame is abandoned.
    unsafe { core::arch::asm!("vmlaunch", options(nostack)) };
    read(VM_INSTRUCTION_ERROR)
}

/// What a guest vCPU starts with.
pub struct GuestInit<'a> {
    pub regs: &'a shared_abi::Regs,
    pub eptp: u64,
    pub vpid: u16,
    /// An MSR bitmap that intercepts every MSR.
    pub msr_bitmap: u64,
    /// Enter as the 64-bit Linux boot protocol asks (`VM_FLAG_LINUX`):
    /// CS = `__BOOT_CS` (0x10), DS/ES/SS = `__BOOT_DS` (0x18), and the
    /// VMM's boot GDT at `shared_abi::linux::GDT_GPA`.
    pub linux: bool,
}

/// The guest-state fields of the data segments (DS, ES, FS, GS, SS):
/// selector, base, limit, access rights.
pub const DATA_SEGMENTS: [(u32, u32, u32, u32); 5] = [
    (GUEST_DS_SELECTOR, GUEST_DS_BASE, GUEST_DS_LIMIT, GUEST_DS_AR),
    (GUEST_ES_SELECTOR, GUEST_ES_BASE, GUEST_ES_LIMIT, GUEST_ES_AR),
    (GUEST_FS_SELECTOR, GUEST_FS_BASE, GUEST_FS_LIMIT, GUEST_FS_AR),
    (GUEST_GS_SELECTOR, GUEST_GS_BASE, GUEST_GS_LIMIT, GUEST_GS_AR),
    (GUEST_SS_SELECTOR, GUEST_SS_BASE, GUEST_SS_LIMIT, GUEST_SS_AR),
];

/// Fills the current VMCS for a guest vCPU (docs/guest-abi.md): 64-bit
/// mode with paging, flat segments, the GDT at `guest::GDT_GPA`. Every port,
/// every MSR, HLT, MWAIT, RDPMC, CR8 and external interrupts exit.
///
/// # Safety
/// A guest VMCS is current.
pub unsafe fn setup_guest_vm(caps: &VmxCaps, g: &GuestInit) -> Result<(), VmxError> {
    let pin = pin::EXTERNAL_INTERRUPT_EXITING | pin::NMI_EXITING | pin::VIRTUAL_NMIS | pin::PREEMPTION_TIMER;
    if !controls_supported(pin, caps.pin) {
        return Err(VmxError::Missing("NMI exiting, virtual NMIs and the preemption timer"));
    }
    write(PIN_BASED_CONTROLS, adjust_controls(pin, caps.pin) as u64)?;
    let p1 = proc1::ACTIVATE_SECONDARY
        | proc1::USE_MSR_BITMAPS
        | proc1::UNCONDITIONAL_IO_EXITING
        | proc1::HLT_EXITING
        | proc1::MWAIT_EXITING
        | proc1::MONITOR_EXITING
        | proc1::RDPMC_EXITING
        | proc1::CR8_LOAD_EXITING
        | proc1::CR8_STORE_EXITING;
    write(PRIMARY_PROC_CONTROLS, adjust_controls(p1, caps.proc1) as u64)?;
    let mut p2 = proc2::ENABLE_EPT | proc2::ENABLE_VPID;
    if g.linux {
        // A Linux guest's application processors start in real mode at
        // their STARTUP vector.
        p2 |= proc2::UNRESTRICTED_GUEST;
    }
    if controls_supported(proc2::ENABLE_RDTSCP, caps.proc2) {
        p2 |= proc2::ENABLE_RDTSCP;
    }
    write(SECONDARY_PROC_CONTROLS, adjust_controls(p2, caps.proc2) as u64)?;
    let ex = exit_ctl::HOST_ADDRESS_SPACE_SIZE
        | exit_ctl::SAVE_IA32_PAT
        | exit_ctl::LOAD_IA32_PAT
        | exit_ctl::SAVE_IA32_EFER
        | exit_ctl::LOAD_IA32_EFER;
    write(EXIT_CONTROLS, adjust_controls(ex, caps.exit) as u64)?;
    let en = entry_ctl::LOAD_IA32_PAT | entry_ctl::LOAD_IA32_EFER | entry_ctl::IA32E_MODE_GUEST;
    write(ENTRY_CONTROLS, adjust_controls(en, caps.entry) as u64)?;
    for f in [EXCEPTION_BITMAP, PAGE_FAULT_ERROR_MASK, PAGE_FAULT_ERROR_MATCH, CR3_TARGET_COUNT] {
        write(f, 0)?;
    }
    for f in [EXIT_MSR_STORE_COUNT, EXIT_MSR_LOAD_COUNT, ENTRY_MSR_LOAD_COUNT, ENTRY_INTERRUPTION_INFO] {
        write(f, 0)?;
    }
    write(MSR_BITMAP, g.msr_bitmap)?;
    write(EPT_POINTER, g.eptp)?;
    write(VPID, g.vpid as u64)?;
    write(VMCS_LINK_POINTER, u64::MAX)?;
    write(TSC_OFFSET, 0)?;
    write(CR0_GUEST_HOST_MASK, if g.linux { caps.cr0_mask() } else { caps.cr0_fixed0 | !caps.cr0_fixed1 & 0xffff_ffff })?;
    write(CR4_GUEST_HOST_MASK, caps.cr4_mask())?;
    let r = g.regs;
    write(CR0_READ_SHADOW, r.cr0)?;
    write(CR4_READ_SHADOW, r.cr4)?;
    write(GUEST_CR0, (r.cr0 | caps.cr0_fixed0) & caps.cr0_fixed1)?;
    write(GUEST_CR3, r.cr3)?;
    write(GUEST_CR4, (r.cr4 | caps.cr4_fixed0 | (1 << 13)) & caps.cr4_fixed1)?;
    write(GUEST_DR7, 0x400)?;
    let (code, data, gdt, gdt_limit) = if g.linux {
        use shared_abi::linux as l;
        (l::CODE_SELECTOR as u64, l::DATA_SELECTOR as u64, l::GDT_GPA, 0x1f)
    } else {
        use shared_abi::guest as t;
        (t::CODE_SELECTOR as u64, t::DATA_SELECTOR as u64, t::GDT_GPA, 23)
    };
    write(GUEST_CS_SELECTOR, code)?;
    write(GUEST_CS_BASE, 0)?;
    write(GUEST_CS_LIMIT, 0xffff_ffff)?;
    write(GUEST_CS_AR, 0xa09b)?;
    for (sel, base, limit, ar) in DATA_SEGMENTS {
        write(sel, data)?;
        write(base, 0)?;
        write(limit, 0xffff_ffff)?;
        write(ar, 0xc093)?;
    }
    write(GUEST_LDTR_SELECTOR, 0)?;
    write(GUEST_LDTR_BASE, 0)?;
    write(GUEST_LDTR_LIMIT, 0)?;
    write(GUEST_LDTR_AR, 1 << 16)?;
    write(GUEST_TR_SELECTOR, 0)?;
    write(GUEST_TR_BASE, 0)?;
    write(GUEST_TR_LIMIT, 0x67)?;
    write(GUEST_TR_AR, 0x8b)?;
    write(GUEST_GDTR_BASE, gdt)?;
    write(GUEST_GDTR_LIMIT, gdt_limit)?;
    write(GUEST_IDTR_BASE, 0)?;
    write(GUEST_IDTR_LIMIT, 0)?;
    write(GUEST_IA32_DEBUGCTL, 0)?;
    write(GUEST_IA32_PAT, 0x0007_0406_0007_0406)?;
    write(GUEST_IA32_EFER, r.efer)?;
    write(GUEST_IA32_SYSENTER_CS, 0)?;
    write(GUEST_IA32_SYSENTER_ESP, 0)?;
    write(GUEST_IA32_SYSENTER_EIP, 0)?;
    write(GUEST_RSP, r.rsp)?;
    write(GUEST_RIP, r.rip)?;
    write(GUEST_RFLAGS, r.rflags | 2)?;
    write(GUEST_ACTIVITY_STATE, activity::ACTIVE)?;
    write(GUEST_INTERRUPTIBILITY, 0)?;
    write(GUEST_PENDING_DBG_EXCEPTIONS, 0)?;
    Ok(())
}

/// Puts the current VMCS's guest in the state a STARTUP IPI with
/// `vector` leaves an application processor in: real mode, CS:IP =
/// `vector << 8`:0, other segments at 0 with 64 KiB limits, paging and
/// protection off, interrupts off (SDM Vol. 3A, 9.1.1 and 10.4.4.1). Needs
/// unrestricted guest (`setup_guest_vm` with `linux`).
pub fn real_mode_at_sipi(caps: &VmxCaps, vector: u8) {
    let cs = (vector as u64) << 8;
    set(GUEST_CS_SELECTOR, cs);
    set(GUEST_CS_BASE, cs << 4);
    set(GUEST_CS_LIMIT, 0xffff);
    set(GUEST_CS_AR, 0x9b);
    for (sel, base, limit, ar) in DATA_SEGMENTS {
        set(sel, 0);
        set(base, 0);
        set(limit, 0xffff);
        set(ar, 0x93);
    }
    set(GUEST_TR_SELECTOR, 0);
    set(GUEST_TR_BASE, 0);
    set(GUEST_TR_LIMIT, 0xffff);
    set(GUEST_TR_AR, 0x8b);
    set(GUEST_LDTR_AR, 1 << 16);
    set(GUEST_GDTR_BASE, 0);
    set(GUEST_GDTR_LIMIT, 0xffff);
    set(GUEST_IDTR_BASE, 0);
    set(GUEST_IDTR_LIMIT, 0xffff);
    // CD and NW as at reset; ET; NE is fixed under VMX and hidden.
    let cr0 = 0x6000_0010u64;
    set(CR0_READ_SHADOW, cr0);
    set(GUEST_CR0, (cr0 | (caps.cr0_fixed0 & !(1 | (1 << 31)))) & caps.cr0_fixed1);
    set(CR4_READ_SHADOW, 0);
    set(GUEST_CR4, caps.cr4_fixed0 & caps.cr4_fixed1);
    set(GUEST_CR3, 0);
    set(GUEST_IA32_EFER, 0);
    set(ENTRY_CONTROLS, read(ENTRY_CONTROLS) & !(entry_ctl::IA32E_MODE_GUEST as u64));
    set(GUEST_RIP, 0);
    set(GUEST_RSP, 0);
    set(GUEST_RFLAGS, 2);
    set(GUEST_ACTIVITY_STATE, activity::ACTIVE);
    set(GUEST_INTERRUPTIBILITY, 0);
    set(ENTRY_INTERRUPTION_INFO, 0);
}

/// The guest-state fields a fork copies from parent to child (everything
/// the VMCS holds of a vCPU but its GPRs).
pub const SNAPSHOT_FIELDS: [u32; 52] = [
    GUEST_ES_SELECTOR, GUEST_CS_SELECTOR, GUEST_SS_SELECTOR, GUEST_DS_SELECTOR, GUEST_FS_SELECTOR,
    GUEST_GS_SELECTOR, GUEST_LDTR_SELECTOR, GUEST_TR_SELECTOR, GUEST_ES_LIMIT, GUEST_CS_LIMIT,
    GUEST_SS_LIMIT, GUEST_DS_LIMIT, GUEST_FS_LIMIT, GUEST_GS_LIMIT, GUEST_LDTR_LIMIT, GUEST_TR_LIMIT,
    GUEST_GDTR_LIMIT, GUEST_IDTR_LIMIT, GUEST_ES_AR, GUEST_CS_AR, GUEST_SS_AR, GUEST_DS_AR, GUEST_FS_AR,
    GUEST_GS_AR, GUEST_LDTR_AR, GUEST_TR_AR, GUEST_INTERRUPTIBILITY, GUEST_ACTIVITY_STATE,
    GUEST_IA32_SYSENTER_CS, GUEST_IA32_DEBUGCTL, GUEST_IA32_PAT, GUEST_IA32_EFER, GUEST_CR0, GUEST_CR3,
    GUEST_CR4, GUEST_ES_BASE, GUEST_CS_BASE, GUEST_SS_BASE, GUEST_DS_BASE, GUEST_FS_BASE, GUEST_GS_BASE,
    GUEST_LDTR_BASE, GUEST_TR_BASE, GUEST_GDTR_BASE, GUEST_IDTR_BASE, GUEST_DR7, GUEST_RSP, GUEST_RIP,
    GUEST_RFLAGS, GUEST_PENDING_DBG_EXCEPTIONS, CR0_READ_SHADOW, CR4_READ_SHADOW,
];

/// A vCPU's VMCS guest state, as values of [`SNAPSHOT_FIELDS`], plus the
/// IA-32e entry control.
pub type Snapshot = [u64; 53];

/// Reads the current VMCS's guest state.
pub fn capture() -> Snapshot {
    let mut s = [0u64; 53];
    for (i, f) in SNAPSHOT_FIELDS.iter().enumerate() {
        s[i] = read(*f);
    }
    s[52] = read(ENTRY_CONTROLS) & entry_ctl::IA32E_MODE_GUEST as u64;
    s
}

/// The value of `field` in a snapshot, if the snapshot holds it.
pub fn snapshot_field(s: &Snapshot, field: u32) -> Option<u64> {
    SNAPSHOT_FIELDS.iter().position(|&f| f == field).map(|i| s[i])
}

/// Writes a captured guest state into the current VMCS.
pub fn restore(s: &Snapshot) {
    for (i, f) in SNAPSHOT_FIELDS.iter().enumerate() {
        set(*f, s[i]);
    }
    let e = (read(ENTRY_CONTROLS) & !(entry_ctl::IA32E_MODE_GUEST as u64)) | s[52];
    set(ENTRY_CONTROLS, e);
}
