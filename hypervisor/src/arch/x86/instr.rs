//! Privileged instruction wrappers: the only place they appear.
//!
//! Every function here is `unsafe`: each can reconfigure the CPU, and the
//! VMX ones are valid only in VMX operation.

use core::arch::asm;

/// Offset in the per-CPU area (GS) of the fault fix-up address; see
/// `cpu::PerCpu::fixup_rip`.
pub const FIXUP_OFFSET: usize = 8;
/// Offset in the per-CPU area of the vector of the last fixed-up fault.
pub const FAULT_VECTOR_OFFSET: usize = 16;

/// Reads an MSR.
///
/// # Safety
/// `msr` must exist; otherwise the CPU raises #GP.
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: per the caller's contract.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (hi as u64) << 32 | lo as u64
}

/// Writes an MSR.
///
/// # Safety
/// The write must be valid and must not break the hypervisor.
pub unsafe fn wrmsr(msr: u32, v: u64) {
    // SAFETY: per the caller's contract.
    unsafe { asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack, preserves_flags)) };
}

/// Runs the one instruction `$insn` with the exception fix-up armed:
/// `$failed` becomes 1 if it faulted (the exception handler resumes at
/// label 2 because the per-CPU fix-up address is set), else 0; the fix-up
/// is disarmed after. The operands are the instruction's.
macro_rules! with_fixup {
    ($insn:literal, $failed:ident, $($operands:tt)*) => {
        asm!(
            "lea {t}, [rip + 2f]",
            "mov gs:[{fix}], {t}",
            $insn,
            "xor {t:e}, {t:e}",
            "jmp 3f",
            "2:",
            "mov {t:e}, 1",
            "3:",
            "mov qword ptr gs:[{fix}], 0",
            t = out(reg) $failed,
            fix = const FIXUP_OFFSET,
            $($operands)*,
            options(nostack),
        )
    };
}

/// RDMSR that returns `None` instead of faulting.
///
/// # Safety
/// Needs the hypervisor's IDT and per-CPU GS base (fault fix-up).
pub unsafe fn rdmsr_safe(msr: u32) -> Option<u64> {
    let (lo, hi): (u32, u32);
    let failed: u64;
    // SAFETY: a #GP lands in the exception handler, which resumes at label 2
    // because the fix-up address is set; nothing else is touched.
    unsafe {
        with_fixup!("rdmsr", failed, in("ecx") msr, out("eax") lo, out("edx") hi)
    };
    if failed != 0 {
        None
    } else {
        Some((hi as u64) << 32 | lo as u64)
    }
}

/// WRMSR that returns `false` instead of faulting.
///
/// # Safety
/// As [`wrmsr`], except that a faulting write is harmless.
pub unsafe fn wrmsr_safe(msr: u32, v: u64) -> bool {
    let failed: u64;
    // SAFETY: as in `rdmsr_safe`.
    unsafe {
        with_fixup!("wrmsr", failed, in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32)
    };
    failed == 0
}

/// XSETBV that returns `false` instead of faulting.
///
/// # Safety
/// Changes XCR0 of this CPU.
pub unsafe fn xsetbv_safe(index: u32, v: u64) -> bool {
    let failed: u64;
    // SAFETY: as in `rdmsr_safe`.
    unsafe {
        with_fixup!("xsetbv", failed, in("ecx") index, in("eax") v as u32, in("edx") (v >> 32) as u32)
    };
    failed == 0
}

/// CPUID.
pub fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    [r.eax, r.ebx, r.ecx, r.edx]
}

macro_rules! cr {
    ($read:ident, $write:ident, $reg:literal) => {
        pub fn $read() -> u64 {
            let v: u64;
            // SAFETY: reading a control register has no side effects.
            unsafe { asm!(concat!("mov {}, ", $reg), out(reg) v, options(nomem, nostack, preserves_flags)) };
            v
        }

        /// # Safety
        /// The new value must keep the CPU in a state the hypervisor can run in.
        pub unsafe fn $write(v: u64) {
            // SAFETY: per the caller's contract.
            unsafe { asm!(concat!("mov ", $reg, ", {}"), in(reg) v, options(nostack, preserves_flags)) };
        }
    };
}

cr!(read_cr0, write_cr0, "cr0");
cr!(read_cr2, write_cr2, "cr2");
cr!(read_cr3, write_cr3, "cr3");
cr!(read_cr4, write_cr4, "cr4");

/// The legacy FXSAVE area: x87, MMX and SSE state.
#[derive(Clone, Copy)]
#[repr(C, align(16))]
pub struct FxArea(pub [u8; 512]);

impl FxArea {
    /// The state after reset: FCW 0x37f (all x87 exceptions masked), MXCSR
    /// 0x1f80 (all SSE exceptions masked), every register zero.
    pub const fn reset() -> Self {
        let mut a = [0u8; 512];
        a[0] = 0x7f;
        a[1] = 0x03;
        a[24] = 0x80;
        a[25] = 0x1f;
        FxArea(a)
    }
}

/// Saves the x87/SSE registers.
pub fn fxsave(area: &mut FxArea) {
    // SAFETY: FXSAVE64 writes 512 bytes to a 16-byte-aligned area we own.
    unsafe { asm!("fxsave64 [{}]", in(reg) area.0.as_mut_ptr(), options(nostack, preserves_flags)) };
}

/// Loads the x87/SSE registers.
///
/// # Safety
/// `area` must hold a valid state (MXCSR without reserved bits), as one
/// saved by [`fxsave`] or [`FxArea::reset`] does.
pub unsafe fn fxrstor(area: &FxArea) {
    // SAFETY: per the caller's contract; 16-byte-aligned, 512 bytes.
    unsafe { asm!("fxrstor64 [{}]", in(reg) area.0.as_ptr(), options(nostack, preserves_flags, readonly)) };
}

pub fn read_dr7() -> u64 {
    let v: u64;
    // SAFETY: reading DR7 has no side effects.
    unsafe { asm!("mov {}, dr7", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Writes DR7.
///
/// # Safety
/// `v` is a valid DR7 value that enables no breakpoint the running code
/// does not expect (a hit raises #DB, SDM Vol. 3B, 18.2.4).
pub unsafe fn write_dr7(v: u64) {
    // SAFETY: per the caller's contract.
    unsafe { asm!("mov dr7, {}", in(reg) v, options(nomem, nostack, preserves_flags)) };
}

pub fn read_rflags() -> u64 {
    let v: u64;
    // SAFETY: pushfq/pop only touch the stack.
    unsafe { asm!("pushfq", "pop {}", out(reg) v, options(preserves_flags)) };
    v
}

/// A descriptor-table register image (`sgdt`/`sidt` layout).
#[repr(C, packed)]
#[derive(Clone, Copy, Default, Debug)]
pub struct DescriptorTablePointer {
    pub limit: u16,
    pub base: u64,
}

pub fn sgdt() -> DescriptorTablePointer {
    let mut p = DescriptorTablePointer::default();
    // SAFETY: stores 10 bytes into `p`.
    unsafe { asm!("sgdt [{}]", in(reg) &mut p, options(nostack, preserves_flags)) };
    p
}

pub fn sidt() -> DescriptorTablePointer {
    let mut p = DescriptorTablePointer::default();
    // SAFETY: stores 10 bytes into `p`.
    unsafe { asm!("sidt [{}]", in(reg) &mut p, options(nostack, preserves_flags)) };
    p
}

/// # Safety
/// `p` must describe a valid GDT for the running code.
pub unsafe fn lgdt(p: &DescriptorTablePointer) {
    // SAFETY: per the caller's contract.
    unsafe { asm!("lgdt [{}]", in(reg) p, options(nostack, preserves_flags)) };
}

/// # Safety
/// `p` must describe a valid IDT.
pub unsafe fn lidt(p: &DescriptorTablePointer) {
    // SAFETY: per the caller's contract.
    unsafe { asm!("lidt [{}]", in(reg) p, options(nostack, preserves_flags)) };
}

macro_rules! read_seg {
    ($name:ident, $reg:literal) => {
        pub fn $name() -> u16 {
            let v: u16;
            // SAFETY: reading a segment selector has no side effects.
            unsafe { asm!(concat!("mov {:x}, ", $reg), out(reg) v, options(nomem, nostack, preserves_flags)) };
            v
        }
    };
}

read_seg!(read_cs, "cs");
read_seg!(read_ss, "ss");
read_seg!(read_ds, "ds");
read_seg!(read_es, "es");
read_seg!(read_fs, "fs");
read_seg!(read_gs, "gs");

pub fn read_tr() -> u16 {
    let v: u16;
    // SAFETY: `str` has no side effects.
    unsafe { asm!("str {:x}", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

pub fn read_ldtr() -> u16 {
    let v: u16;
    // SAFETY: `sldt` has no side effects.
    unsafe { asm!("sldt {:x}", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// RDRAND of 64 bits, where CPUID.1:ECX.RDRAND[bit 30] says the CPU has
/// it; `None` without it, or when it fails ten times in a row, which
/// Intel's DRNG guide says only a broken generator does (it sets CF when
/// the value is valid).
pub fn rdrand64() -> Option<u64> {
    if cpuid(1, 0)[2] & (1 << 30) == 0 {
        return None;
    }
    for _ in 0..10 {
        let (v, ok): (u64, u8);
        // SAFETY: RDRAND only writes its register and the flags; the CPU
        // has it (CPUID above).
        unsafe { asm!("rdrand {}", "setc {}", out(reg) v, out(reg_byte) ok, options(nomem, nostack)) };
        if ok != 0 {
            return Some(v);
        }
    }
    None
}

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// # Safety
/// Halts the CPU until the next interrupt.
pub unsafe fn hlt() {
    // SAFETY: per the caller's contract.
    unsafe { asm!("hlt", options(nomem, nostack)) };
}

/// # Safety
/// Disables maskable interrupts.
pub unsafe fn cli() {
    // SAFETY: per the caller's contract.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

/// # Safety
/// Writes back and invalidates the caches.
pub unsafe fn wbinvd() {
    // SAFETY: per the caller's contract.
    unsafe { asm!("wbinvd", options(nostack)) };
}

/// Writes the cache lines of one 4 KiB page back to memory (CLFLUSH each
/// 64-byte line), then fences, so that a device that does not snoop the
/// CPU caches reads what the CPU wrote. See: SDM Vol. 2A, CLFLUSH (ordered
/// by MFENCE); VT-d spec, 6.1 (ECAP.C = 0).
///
/// # Safety
/// `page` must be the mapped virtual address of a 4 KiB page.
pub unsafe fn clflush_page(page: u64) {
    for line in (page..page + 4096).step_by(64) {
        // SAFETY: the line lies in the mapped page (the caller's contract);
        // CLFLUSH changes no data.
        unsafe { asm!("clflush [{}]", in(reg) line, options(nostack, preserves_flags)) };
    }
    // SAFETY: a fence has no other effect.
    unsafe { asm!("mfence", options(nostack, preserves_flags)) };
}

/// # Safety
/// Port output has device side effects.
pub unsafe fn outb(port: u16, v: u8) {
    // SAFETY: per the caller's contract.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags)) };
}

// ---------------------------------------------------------------------------
// VMX. Each returns `Err(())` on VMfailInvalid/VMfailValid (CF or ZF set).
// ---------------------------------------------------------------------------

macro_rules! vmx_status {
    ($asm:literal, $($args:tt)*) => {{
        let fail: u8;
        // SAFETY: per the enclosing function's contract.
        unsafe { asm!($asm, "setna {fail_flag}", fail_flag = out(reg_byte) fail, $($args)*) };
        if fail != 0 { Err(()) } else { Ok(()) }
    }};
}

/// # Safety
/// CR4.VMXE must be set and `pa` must be a valid VMXON region.
pub unsafe fn vmxon(pa: u64) -> Result<(), ()> {
    vmx_status!("vmxon [{p}]", p = in(reg) &pa, options(nostack))
}

/// # Safety
/// Leaves VMX operation.
pub unsafe fn vmxoff() -> Result<(), ()> {
    vmx_status!("vmxoff", options(nostack))
}

/// # Safety
/// `pa` must be a VMCS region.
pub unsafe fn vmclear(pa: u64) -> Result<(), ()> {
    vmx_status!("vmclear [{p}]", p = in(reg) &pa, options(nostack))
}

/// # Safety
/// `pa` must be a VMCS region with the right revision.
pub unsafe fn vmptrld(pa: u64) -> Result<(), ()> {
    vmx_status!("vmptrld [{p}]", p = in(reg) &pa, options(nostack))
}

/// # Safety
/// A VMCS must be current.
pub unsafe fn vmwrite(field: u32, v: u64) -> Result<(), ()> {
    vmx_status!("vmwrite {f}, {v}", f = in(reg) field as u64, v = in(reg) v, options(nostack))
}

/// # Safety
/// A VMCS must be current.
pub unsafe fn vmread(field: u32) -> Result<u64, ()> {
    let v: u64;
    let fail: u8;
    // SAFETY: per the caller's contract.
    unsafe {
        asm!("vmread {v}, {f}", "setna {x}", f = in(reg) field as u64, v = out(reg) v, x = out(reg_byte) fail, options(nostack))
    };
    if fail != 0 {
        Err(())
    } else {
        Ok(v)
    }
}

/// INVEPT. `kind` 1 = single context (`eptp`), 2 = all contexts.
///
/// # Safety
/// VMX operation.
pub unsafe fn invept(kind: u64, eptp: u64) -> Result<(), ()> {
    let desc: [u64; 2] = [eptp, 0];
    vmx_status!("invept {k}, [{d}]", k = in(reg) kind, d = in(reg) &desc, options(nostack))
}

/// INVVPID. `kind` 1 = single context (`vpid`), 2 = all contexts.
///
/// # Safety
/// VMX operation.
pub unsafe fn invvpid(kind: u64, vpid: u16) -> Result<(), ()> {
    let desc: [u64; 2] = [vpid as u64, 0];
    vmx_status!("invvpid {k}, [{d}]", k = in(reg) kind, d = in(reg) &desc, options(nostack))
}

/// Ends NMI blocking with an IRET to the next instruction (NMIs stay
/// blocked in root operation after a VM exit caused by an NMI).
///
/// # Safety
/// Root operation with the hypervisor's GDT (code 0x10, data 0x18).
pub unsafe fn unblock_nmis() {
    // SAFETY: builds an IRET frame that returns to label 2 with the same
    // stack, flags and segments.
    unsafe {
        asm!(
            "mov {t}, rsp",
            "push 0x18",
            "push {t}",
            "pushfq",
            "push 0x10",
            "lea {t}, [rip + 2f]",
            "push {t}",
            "iretq",
            "2:",
            t = out(reg) _,
        )
    };
}
