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
use super::run::{self, Switch};
use super::vm::{self, VmError};
use crate::guestmem::MemError;
use crate::mem::PhysMem;
use shared_abi::{DebugTranslate, MemRange, VmCreate, VmFork, VmId, VmInfo, VmLoad, VmRegs, HC_NEED_PAGES, VM_NAME_LEN};
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
    /// Not now (VMs exist, the vCPU runs, ...).
    Busy,
    /// The hypervisor's own heap is exhausted.
    NoMemory,
    /// The pool needs this many more pages.
    NeedPages(u64),
    /// A VM operation failed.
    Vm(VmError),
}

impl HcError {
    fn errno(self) -> i64 {
        match self {
            HcError::NoSys => -ENOSYS,
            HcError::Fault => -EFAULT,
            HcError::Invalid => -EINVAL,
            HcError::Busy => -EBUSY,
            HcError::NoMemory => -ENOMEM,
            HcError::NeedPages(_) => HC_NEED_PAGES,
            HcError::Vm(e) => e.errno(),
        }
    }
}

/// Dispatches host hypercall `nr` with argument block `arg` of `len` bytes.
pub fn dispatch(nr: u64, arg: u64, len: u64, regs: &mut GuestRegs) -> Switch {
    let r = match nr {
        hc::VERSION => version(arg, len),
        hc::STATS => stats(arg, len),
        hc::UNLOAD => unload(regs),
        hc::DONATE => donate(arg, len),
        hc::RECLAIM => reclaim(arg, len),
        hc::VM_CREATE => vm_create(arg, len),
        hc::VM_DESTROY => vm_destroy(arg, len),
        hc::VM_LOAD => vm_load(arg, len),
        hc::VM_GET_REGS => vm_regs(arg, len, false),
        hc::VM_SET_REGS => vm_regs(arg, len, true),
        hc::VM_RUN => return run::run(regs, arg, len),
        hc::VM_LIST => vm_list(arg, len),
        hc::VM_FORK => vm_fork(arg, len),
        hc::MERGE => merge(arg, len),
        hc::DEBUG_TRANSLATE => debug_translate(arg, len),
        _ => Err(HcError::NoSys),
    };
    match r {
        Ok(v) => Switch::Return(v, 0),
        Err(HcError::NeedPages(n)) => Switch::Return(HC_NEED_PAGES, n),
        Err(e) => Switch::Return(e.errno(), 0),
    }
}

/// Copies a `T` in from host memory at `pa`, after checking the host owns it.
fn copy_in<T: Copy>(pa: u64, len: u64) -> Result<T, HcError> {
    let size = core::mem::size_of::<T>() as u64;
    if len < size {
        return Err(HcError::Invalid);
    }
    if !hv().host_owned(pa, size) {
        return Err(HcError::Fault);
    }
    // SAFETY: `T` is plain data; the source is host RAM the host owns.
    Ok(unsafe { core::ptr::read_unaligned(memory::phys_ptr(pa) as *const T) })
}

impl From<VmError> for HcError {
    fn from(e: VmError) -> Self {
        match e {
            VmError::Mem(MemError::NeedPages(n)) => HcError::NeedPages(n),
            e => HcError::Vm(e),
        }
    }
}

/// DONATE: pages leave the host for the pool.
fn donate(arg: u64, len: u64) -> Result<i64, HcError> {
    let h = hv();
    let n = (len / core::mem::size_of::<MemRange>() as u64) as usize;
    if n == 0 || n > 256 || !h.host_owned(arg, len) {
        return Err(if n == 0 || n > 256 { HcError::Invalid } else { HcError::Fault });
    }
    let mut ranges = alloc::vec::Vec::with_capacity(n);
    for i in 0..n {
        let r: MemRange = copy_in(arg + (i * 16) as u64, 16)?;
        if r.base % 4096 != 0 || r.size == 0 || r.size % 4096 != 0 || r.size > 1 << 30 {
            return Err(HcError::Invalid);
        }
        // Also refuses pages already donated (no longer the host's) and
        // overlaps between ranges of this call (the first unmaps them).
        if !h.host_owned(r.base, r.size) || ranges.iter().any(|o: &MemRange| r.base < o.base + o.size && o.base < r.base + r.size) {
            return Err(HcError::Fault);
        }
        ranges.push(r);
    }
    {
        let mut ept = h.host_ept.lock();
        let mut frames = memory::HeapFrames;
        for r in &ranges {
            let mut a = r.base;
            while a < r.base + r.size {
                let big = a % (2 << 20) == 0 && a + (2 << 20) <= r.base + r.size;
                let (level, step) = if big { (2, 2u64 << 20) } else { (1, 4096) };
                ept.set(&memory::DirectMap, &mut frames, crate::addr::Gpa(a), level, crate::arch::x86::ept_entry::EptEntry::empty())
                    .ok_or(HcError::NoMemory)?;
                a += step;
            }
        }
    }
    // No CPU may keep a translation to the donated pages.
    super::tlb::shootdown();
    let mut pool = vm::POOL.lock();
    let mut total = 0;
    for r in &ranges {
        let pages = (r.size / 4096) as usize;
        for p in 0..pages as u64 {
            memory::DirectMap.zero_page(crate::addr::Hpa(r.base + p * 4096));
        }
        pool.donate(crate::addr::Hpa(r.base), pages).map_err(|_| HcError::Invalid)?;
        total += pages;
    }
    Ok(total as i64)
}

/// RECLAIM: free pool frames go back to the host.
fn reclaim(arg: u64, len: u64) -> Result<i64, HcError> {
    let h = hv();
    let max = (len / 8).min(512) as usize;
    if max == 0 {
        return Err(HcError::Invalid);
    }
    if !h.host_owned(arg, max as u64 * 8) {
        return Err(HcError::Fault);
    }
    let frames = vm::POOL.lock().reclaim(max);
    {
        let mut ept = h.host_ept.lock();
        let map = crate::ept::HostMap { ram: &h.ram, top: h.host_ept_top, holes: &[], huge_pages: h.host_ept_huge };
        for f in &frames {
            // Scrubbed when freed; mapped back for the host.
            crate::ept::host_map_page(&mut ept, &memory::DirectMap, &mut memory::HeapFrames, &map, *f).ok_or(HcError::NoMemory)?;
        }
    }
    for (i, f) in frames.iter().enumerate() {
        // SAFETY: host memory checked above.
        unsafe { core::ptr::write_unaligned(memory::phys_ptr(arg + 8 * i as u64) as *mut u64, f.0) };
    }
    Ok(frames.len() as i64)
}

fn vm_create(arg: u64, len: u64) -> Result<i64, HcError> {
    let mut c: VmCreate = copy_in(arg, len)?;
    c.name[VM_NAME_LEN - 1] = 0;
    let vm = vm::create(c.mem_bytes, c.vcpus, c.name, 0)?;
    c.id = vm.id;
    log::info!("vm{}: created, {} MiB, {} vCPU", vm.id, c.mem_bytes >> 20, c.vcpus);
    copy_out(arg, len, &c)?;
    Ok(vm.id as i64)
}

fn vm_destroy(arg: u64, len: u64) -> Result<i64, HcError> {
    let v: VmId = copy_in(arg, len)?;
    vm::destroy(v.id)?;
    log::info!("vm{}: destroyed", v.id);
    Ok(0)
}

fn vm_load(arg: u64, len: u64) -> Result<i64, HcError> {
    let l: VmLoad = copy_in(arg, len)?;
    if l.len == 0 || l.len > 4096 || (l.src % 4096) + l.len > 4096 {
        return Err(HcError::Invalid);
    }
    if !hv().host_owned(l.src, l.len) {
        return Err(HcError::Fault);
    }
    let vm = vm::get(l.vm)?;
    if vm.vcpus.iter().any(|v| v.running.load(Ordering::Acquire)) {
        return Err(HcError::Busy);
    }
    let mut buf = [0u8; 4096];
    memory::DirectMap.read(crate::addr::Hpa(l.src), &mut buf[..l.len as usize]);
    vm::load(&vm, l.gpa, &buf[..l.len as usize])?;
    Ok(0)
}

fn vm_regs(arg: u64, len: u64, set: bool) -> Result<i64, HcError> {
    let mut r: VmRegs = copy_in(arg, len)?;
    let vm = vm::get(r.vm)?;
    let vcpu = vm.vcpus.get(r.vcpu as usize).ok_or(HcError::Vm(VmError::NoSuchVcpu))?;
    if vcpu.running.load(Ordering::Acquire) {
        return Err(HcError::Busy);
    }
    let mut st = vcpu.state.lock();
    if set {
        if st.ready {
            // Only the initial state can be set (docs/ioctl.md).
            return Err(HcError::Busy);
        }
        let n = r.regs;
        let canonical = |v: u64| ((v as i64) << 16 >> 16) as u64 == v;
        if n.rflags & !0x00ff_fcd7 != 0 || n.rflags & (1 << 17) != 0 || !canonical(n.rip) || n.cr3 & 0xfff0_0000_0000_0fff != 0 {
            return Err(HcError::Invalid);
        }
        let fixed = vm::boot_regs(vm.mem_bytes);
        st.init = shared_abi::Regs { cr0: fixed.cr0, cr4: fixed.cr4, efer: fixed.efer, rflags: n.rflags | 2, ..n };
        return Ok(0);
    }
    r.regs = if st.ready {
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
        // RIP, RSP, RFLAGS and the control registers live in the VMCS.
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

/// FORK from the host: the VM's vCPUs must be out of the guest.
fn vm_fork(arg: u64, len: u64) -> Result<i64, HcError> {
    let mut f: VmFork = copy_in(arg, len)?;
    let vm = vm::get(f.vm)?;
    if vm.is_stopped() || vm.dying.load(Ordering::Acquire) {
        return Err(HcError::Vm(VmError::Invalid));
    }
    if f.flags & !shared_abi::FORK_COPY != 0 || f.reserved0 != 0 {
        return Err(HcError::Invalid);
    }
    // Hold every vCPU as if running it, so that none starts meanwhile.
    let mut held = 0;
    for v in vm.vcpus.iter() {
        if v.running.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_err() {
            break;
        }
        held += 1;
    }
    let r = if held < vm.vcpus.len() {
        Err(HcError::Busy)
    } else {
        let t0 = instr::rdtsc();
        let states = vm.vcpus.iter().map(vm::capture_idle).collect();
        vm::fork(&vm, states, f.flags & shared_abi::FORK_COPY != 0).map(|c| (c, instr::rdtsc() - t0)).map_err(HcError::from)
    };
    for v in vm.vcpus.iter().take(held) {
        v.running.store(false, Ordering::Release);
    }
    let (child, tsc) = r?;
    log::info!("vm{}: forked vm{}{}", vm.id, child.id, if f.flags & shared_abi::FORK_COPY != 0 { " (full copy)" } else { "" });
    f.child = child.id;
    f.tsc = tsc;
    copy_out(arg, len, &f)?;
    Ok(child.id as i64)
}

fn vm_list(arg: u64, len: u64) -> Result<i64, HcError> {
    let size = core::mem::size_of::<VmInfo>() as u64;
    let list = vm::list();
    let n = (len / size).min(list.len() as u64) as usize;
    if n > 0 && !hv().host_owned(arg, n as u64 * size) {
        return Err(HcError::Fault);
    }
    for (i, v) in list.iter().take(n).enumerate() {
        // SAFETY: host memory checked above; plain data.
        unsafe { core::ptr::write_unaligned(memory::phys_ptr(arg + i as u64 * size) as *mut VmInfo, *v) };
    }
    Ok(list.len() as i64)
}

/// MERGE: one chunk of a re-merging pass; 1 while there is more to do.
fn merge(arg: u64, len: u64) -> Result<i64, HcError> {
    let mut m: shared_abi::MergeScan = copy_in(arg, len)?;
    if m.flags & !shared_abi::MERGE_CONTINUE != 0 {
        return Err(HcError::Invalid);
    }
    if m.flags & shared_abi::MERGE_CONTINUE == 0 {
        super::merge::start(m.vm)?;
    }
    let Some(done) = super::merge::step()? else {
        return Ok(1);
    };
    m.scanned = done.stats.scanned;
    m.merged = done.stats.merged;
    m.zero = done.stats.zero;
    m.frames_freed = done.freed;
    m.tsc = done.tsc;
    copy_out(arg, len, &m)?;
    Ok(0)
}

fn debug_translate(arg: u64, len: u64) -> Result<i64, HcError> {
    if hv().boot.flags & shared_abi::BOOT_FLAG_DEBUG == 0 {
        return Err(HcError::NoSys);
    }
    let mut t: DebugTranslate = copy_in(arg, len)?;
    let vm = vm::get(t.vm)?;
    let mem = vm.mem.lock();
    let g = mem.as_ref().ok_or(HcError::Vm(VmError::NoSuchVm))?;
    t.hpa = g.lookup(&memory::DirectMap, crate::addr::Gpa(t.gpa)).map(|(p, _)| p.0 + (t.gpa & 0xfff)).unwrap_or(0);
    drop(mem);
    copy_out(arg, len, &t)?;
    Ok(0)
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
    {
        let pool = vm::POOL.lock();
        s.pool_frames_total = pool.frames_total();
        s.pool_frames_free = pool.frames_free();
        s.frames_shared = pool.frames_shared();
    }
    s.vms = vm::count();
    s.cow_copies = vm::COW_COPIES.load(Ordering::Relaxed);
    s.merge_scanned = super::merge::SCANNED.load(Ordering::Relaxed);
    s.merge_merged = super::merge::MERGED.load(Ordering::Relaxed);
    s.merge_zero = super::merge::ZERO.load(Ordering::Relaxed);
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
