//! Running guest vCPUs: the RUN hypercall switches this CPU from the host
//! VM's VMCS to the guest's; guest exits are handled here, and those the
//! host must see end the RUN with an exit record.

use super::exits::{inject_ud, skip_instruction, GuestRegs, RAX, RCX, RDI, RDX, RSI};
use super::memory::DirectMap;
use super::vm::{self, Pending, Vm, POOL};
use super::{hv, tlb};
use crate::addr::{Gpa, Hpa};
use crate::arch::x86::cpu::{this_cpu, PerCpu};
use crate::arch::x86::ept_entry::EptViolation;
use crate::arch::x86::exit_reason::ExitReason;
use crate::arch::x86::instr;
use crate::arch::x86::vmcs_fields::*;
use crate::arch::x86::vmx;
use crate::emulate::{complete_mmio_read, decode_mmio, EmuRegs, MmioOp};
use crate::guestmem::{MemError, Touch};
use crate::mem::PhysMem;
use crate::devices::uart::Access;
use crate::policy::linux::{classify, Msr as LinuxMsr, SWITCHED};
use crate::policy::{guest_cpuid, guest_efer_ok, guest_msr, Cpuid, GuestMsr};
use alloc::boxed::Box;
use alloc::sync::Arc;
use core::sync::atomic::Ordering;
use shared_abi::{errno::*, exit, ghc, guest, linux, stop, vm_state, ExitRecord, VmRun, HC_NEED_PAGES};

/// The guest a CPU runs, and the host context to go back to.
pub struct Running {
    pub vm: Arc<Vm>,
    pub vcpu: usize,
    /// The host VM's GPRs at its VMCALL (RIP already past it).
    pub host_regs: GuestRegs,
    /// Where the host's `VmRun` block is.
    pub arg_pa: u64,
    /// A pending MMIO load, to complete on the next RUN.
    pub mmio: Option<MmioOp>,
    /// TSC at which the slice ends and the guest yields to the host,
    /// however often it exits to the hypervisor meanwhile.
    pub deadline: u64,
    /// The host's values of the MSRs a Linux guest has its own of
    /// (`policy::linux::SWITCHED`), put back when the RUN ends.
    pub host_msrs: [u64; 5],
}

/// Default time slice, in TSC cycles, before the guest yields to the host.
const DEFAULT_SLICE: u64 = 4_000_000;

/// Longest time slice a RUN may ask for, in TSC cycles (about 5.6 ms at
/// 3 GHz). External interrupts should end a slice early, but an emulator
/// may take none while a guest keeps interrupts off (Bochs 2.7 does not),
/// and then the host waits the whole slice for its own interrupts.
const MAX_SLICE: u64 = 1 << 24;

/// An MSR bitmap with every bit set: guests' MSR accesses all exit.
static MSR_ALL: spin::Once<u64> = spin::Once::new();

fn msr_all_bitmap() -> u64 {
    *MSR_ALL.call_once(|| {
        let (pa, p) = super::memory::alloc_page().expect("heap exhausted");
        // SAFETY: a fresh heap page.
        unsafe { core::ptr::write_bytes(p, 0xff, 4096) };
        pa
    })
}

/// What a host hypercall did to this CPU's context.
pub enum Switch {
    /// Return to the host VM with (RAX, RDX).
    Return(i64, u64),
    /// The CPU now runs a guest; the exit stub enters it.
    Entered,
    /// Not now: the host VM resumes at its VMCALL, registers unchanged, and
    /// makes the call again (after the NMI injected meanwhile).
    Retry,
}

/// RUN: enters the guest, or returns at once if the VM has ended.
pub fn run(regs: &mut GuestRegs, arg: u64, len: u64) -> Switch {
    match try_run(regs, arg, len) {
        Ok(s) => s,
        Err(e) => Switch::Return(e, 0),
    }
}

fn try_run(regs: &mut GuestRegs, arg: u64, len: u64) -> Result<Switch, i64> {
    let h = hv();
    let req = crate::control::decode::vm_run(&super::memory::HostBlocks, arg, len).map_err(|e| e.errno())?;
    let vm = vm::get(req.vm).map_err(|e| e.errno())?;
    let idx = req.vcpu as usize;
    let Some(vcpu) = vm.vcpus.get(idx) else {
        // Not ENOENT: the driver reads that as "the VM is gone".
        return Err(-EINVAL);
    };
    if vm.is_stopped() || vm.dying.load(Ordering::Acquire) {
        write_record(arg, &vm.final_record());
        return Ok(Switch::Return(0, 0));
    }
    if vm.flush_owed.load(Ordering::Acquire) {
        // A copy-on-write copy waits for the shootdown that failed: no vCPU
        // of the VM runs until one succeeds.
        if tlb::shootdown().is_err() {
            write_record(arg, &record(exit::NONE));
            return Ok(Switch::Return(0, 0));
        }
        vm.flush_owed.store(false, Ordering::Release);
    }
    match super::linux::pay_generation(&vm) {
        Ok(()) => {}
        Err(vm::VmError::Mem(MemError::NeedPages(n))) => {
            write_record(arg, &record(exit::NONE));
            return Ok(Switch::Return(HC_NEED_PAGES, n));
        }
        Err(e) => {
            // Nothing else can fail in a write to the VM's own buffer page.
            log::error!("vm{}: cannot write its new generation ID: {e:?}", vm.id);
            return Err(e.errno());
        }
    }
    if vcpu.running.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_err() {
        return Err(-EBUSY);
    }
    let pc = this_cpu();
    vcpu.cpu.store(pc.index, Ordering::Release);
    let mut st = *vcpu.state.lock();
    if st.start == vm::Start::WaitSipi {
        // An application processor that was not started: it sleeps in the
        // driver until an IPI wakes it (`exit::KICK`).
        vcpu.running.store(false, Ordering::Release);
        write_record(arg, &record(exit::HLT));
        return Ok(Switch::Return(0, 0));
    }

    // SAFETY: the vCPU's own VMCS region, not current on any CPU (it is
    // VMCLEAR'ed whenever it leaves one).
    if unsafe { instr::vmptrld(vcpu.vmcs.0) }.is_err() {
        vcpu.running.store(false, Ordering::Release);
        // SAFETY: back to the host VM's VMCS.
        unsafe {
            let _ = instr::vmptrld(pc.vmcs_pa);
        }
        return Err(-EIO);
    }
    if !st.ready {
        let init = vmx::GuestInit { regs: &st.init, eptp: vm.eptp, vpid: vm.vpid, msr_bitmap: msr_all_bitmap(), linux: vm.linux.is_some() };
        // SAFETY: the guest's VMCS is current.
        let r = unsafe { vmx::setup_guest_vm(&h.caps, &init) };
        if let Err(e) = r {
            log::error!("vm{}: cannot set up vCPU {idx}: {e}", vm.id);
            vm.stop(vm_state::STOPPED, stop::ENTRY_FAILED, 0);
            vcpu.running.store(false, Ordering::Release);
            // SAFETY: the guest's VMCS goes back to memory; the host VM's
            // becomes current again.
            unsafe { vmx::switch_back(vcpu.vmcs.0, pc.vmcs_pa) };
            write_record(arg, &vm.final_record());
            return Ok(Switch::Return(0, 0));
        }
        if let Some(snap) = st.snapshot.take() {
            // A forked vCPU continues exactly where its parent was: its
            // VMCS state, and the registers it was forked with.
            vmx::restore(&snap);
        } else {
            st.gpr = [0; 16];
            st.gpr[RDI] = st.init.rdi;
            st.gpr[RSI] = st.init.rsi;
            st.gpr[RDX] = st.init.rdx;
            st.gpr[RCX] = st.init.rcx;
            st.gpr[RAX] = st.init.rax;
            st.gpr[3] = st.init.rbx;
            st.gpr[5] = st.init.rbp;
            for (i, v) in [st.init.r8, st.init.r9, st.init.r10, st.init.r11, st.init.r12, st.init.r13, st.init.r14, st.init.r15].into_iter().enumerate() {
                st.gpr[8 + i] = v;
            }
        }
        st.ready = true;
    }
    if let vm::Start::Sipi(vector) = st.start {
        // Started by a STARTUP IPI: real mode at the vector, registers as
        // after INIT (SDM Vol. 3A, 10.1.1, Table 10-1).
        vmx::real_mode_at_sipi(&h.caps, vector);
        st.gpr = [0; 16];
        st.gpr[RDX] = 0x600;
        st.fx = instr::FxArea::reset();
        st.cr2 = 0;
        st.msrs = [0; 5];
        st.start = vm::Start::Running;
    }
    let _ = vmx::write_host_state(pc, h.cr3, &pc.linux);
    let slice = if req.slice_tsc == 0 { DEFAULT_SLICE } else { req.slice_tsc.min(MAX_SLICE) };

    // Complete what the previous exit left to the VMM.
    let mut mmio = None;
    match st.pending {
        Pending::None => {}
        Pending::PortIn { size } => {
            let v = req.exit.data;
            st.gpr[RAX] = match size {
                1 => (st.gpr[RAX] & !0xff) | (v & 0xff),
                2 => (st.gpr[RAX] & !0xffff) | (v & 0xffff),
                _ => v & 0xffff_ffff,
            };
        }
        Pending::MmioRead { size, reg, high_byte, dest_size, sign_extend, next_rip } => {
            mmio = Some(MmioOp { is_write: false, size, data: 0, reg, high_byte, dest_size, sign_extend, next_rip });
        }
        Pending::Hypercall => st.gpr[RAX] = req.exit.hc_ret,
    }
    st.pending = Pending::None;
    *vcpu.state.lock() = st;
    if let Some(op) = mmio {
        let mut er = EmuRegs { gpr: st.gpr, rip: vmx::read(GUEST_RIP), ..Default::default() };
        let full = MmioOp { dest_size: op.size.max(op.dest_size), ..op };
        complete_mmio_read(&mut er, &full, req.exit.data);
        st.gpr = er.gpr;
        vmx::set(GUEST_RIP, er.rip);
    }

    // Enter: the host context is kept for the way back.
    let deadline = instr::rdtsc().saturating_add(slice);
    let mut host_msrs = [0u64; 5];
    if vm.linux.is_some() {
        for (i, m) in SWITCHED.iter().enumerate() {
            // SAFETY: the syscall MSRs and KERNEL_GS_BASE exist on every
            // 64-bit CPU; the host's values are put back in `leave`, and the
            // hypervisor itself uses none of them.
            unsafe {
                host_msrs[i] = instr::rdmsr(*m);
                instr::wrmsr(*m, st.msrs[i]);
            }
        }
    }
    pc.guest.put(Box::new(Running { vm: vm.clone(), vcpu: idx, host_regs: *regs, arg_pa: arg, mmio: None, deadline, host_msrs }));
    let bit = 1u64 << (pc.index % 64);
    if vm.tlb_dirty.fetch_and(!bit, Ordering::AcqRel) & bit != 0 {
        // SAFETY: INVEPT of this guest's EPT.
        unsafe {
            let _ = instr::invept(1, vm.eptp);
        }
    }
    if vm.linux.is_some() {
        super::linux::before_entry(&vm, idx);
    } else {
        deliver_timer(&vm, idx);
    }
    arm_timers(&vm, idx, deadline);
    // The guest's own x87/SSE registers and CR2: the driver saved the
    // host's (kernel_fpu_begin) and the host's CR2 is dead.
    // SAFETY: the area was saved by FXSAVE or is the reset state; writing
    // CR2 affects nothing in the hypervisor, which takes no page faults.
    unsafe {
        instr::fxrstor(&st.fx);
        instr::write_cr2(st.cr2);
    }
    if vm.state.load(Ordering::Acquire) == vm_state::CREATED || vm.state.load(Ordering::Acquire) == vm_state::PAUSED {
        vm.state.store(vm_state::RUNNING, Ordering::Release);
    }
    *regs = st.gpr;
    pc.launch_next.store(1, Ordering::Relaxed);
    Ok(Switch::Entered)
}

/// Injects the halt-wake timer's interrupt if it is due and the guest can
/// take it.
fn deliver_timer(vm: &Vm, idx: usize) -> bool {
    let mut st = vm.vcpus[idx].state.lock();
    if st.timer_deadline == 0 || instr::rdtsc() < st.timer_deadline {
        return false;
    }
    let can = vmx::read(GUEST_RFLAGS) & (1 << 9) != 0
        && vmx::read(GUEST_INTERRUPTIBILITY) & 3 == 0
        && vmx::read(ENTRY_INTERRUPTION_INFO) & (intr::VALID as u64) == 0;
    if !can {
        return false;
    }
    vmx::set(ENTRY_INTERRUPTION_INFO, (intr::VALID | intr::TYPE_EXTERNAL | st.timer_vector as u32) as u64);
    st.timer_deadline = 0;
    true
}

/// Writes an exit record into the host's `VmRun` block.
fn write_record(arg_pa: u64, rec: &ExitRecord) {
    let off = core::mem::offset_of!(VmRun, exit) as u64;
    let size = core::mem::size_of::<ExitRecord>() as u64;
    if hv().host_owned(arg_pa + off, size) {
        // SAFETY: checked host memory; plain data.
        unsafe { core::ptr::write_unaligned(super::memory::phys_ptr(arg_pa + off) as *mut ExitRecord, *rec) };
    }
}

/// Hands the console bytes the hypervisor batched to the host's `VmRun`
/// block (`VmRun::console`); `console_len` is written even when 0.
fn write_console(arg_pa: u64, vm: &Vm) {
    let mut out = [0u8; shared_abi::CONSOLE_BATCH];
    let off = core::mem::offset_of!(VmRun, console_len) as u64;
    let size = (4 + 4 + shared_abi::CONSOLE_BATCH) as u64;
    if !hv().host_owned(arg_pa + off, size) {
        return;
    }
    let n = super::linux::take_console(vm, &mut out);
    let p = super::memory::phys_ptr(arg_pa + off);
    // SAFETY: checked host memory, the tail of the host's `VmRun`: the
    // length, the reserved word, then the bytes.
    unsafe {
        core::ptr::write_unaligned(p as *mut u32, n as u32);
        core::ptr::copy_nonoverlapping(out.as_ptr(), p.add(8), n);
    }
}

/// Leaves the guest for the host: RUN returns `status` (and `aux`), with
/// `rec` as its exit record.
fn leave(pc: &PerCpu, regs: &mut GuestRegs, mut rec: ExitRecord, pending: Pending, status: i64, aux: u64) {
    let g = pc.guest.take().and_then(|g| g.downcast::<Running>().ok()).expect("leaving a guest that is not running");
    let vcpu = &g.vm.vcpus[g.vcpu];
    rec.rip = vmx::read(GUEST_RIP);
    {
        let mut st = vcpu.state.lock();
        st.gpr = *regs;
        st.pending = pending;
        instr::fxsave(&mut st.fx);
        st.cr2 = instr::read_cr2();
        if g.vm.linux.is_some() {
            for (i, m) in SWITCHED.iter().enumerate() {
                // SAFETY: as in `try_run`: the guest's values are kept, the
                // host's restored.
                unsafe {
                    st.msrs[i] = instr::rdmsr(*m);
                    instr::wrmsr(*m, g.host_msrs[i]);
                }
            }
        }
    }
    // SAFETY: the guest's VMCS goes back to memory (so that any CPU can
    // load it next) and the host VM's becomes current again.
    unsafe { vmx::switch_back(vcpu.vmcs.0, pc.vmcs_pa) };
    if status == 0 {
        write_record(g.arg_pa, &rec);
        if g.vm.linux.is_some() {
            write_console(g.arg_pa, &g.vm);
        }
    }
    *regs = g.host_regs;
    regs[RAX] = status as u64;
    regs[RDX] = aux;
    pc.launch_next.store(0, Ordering::Relaxed);
    if g.vm.state.load(Ordering::Acquire) == vm_state::RUNNING {
        g.vm.state.store(vm_state::PAUSED, Ordering::Release);
    }
    vcpu.running.store(false, Ordering::Release);
}

fn record(kind: u32) -> ExitRecord {
    ExitRecord { kind, ..Default::default() }
}

/// Ends the VM and returns the stop to the host.
fn stop_vm(pc: &PerCpu, regs: &mut GuestRegs, reason: u32) {
    end_vm(pc, regs, vm_state::STOPPED, reason)
}

/// Ends the VM in `state` (STOPPED, REBOOTED or PANICKED) with `reason`.
fn end_vm(pc: &PerCpu, regs: &mut GuestRegs, state: u32, reason: u32) {
    let vm = running(pc).unwrap().vm.clone();
    log::info!("vm{}: {}: {} at rip {:#x}", vm.id, vm_state::name(state), stop::name(reason), vmx::read(GUEST_RIP));
    vm.stop(state, reason, 0);
    let rec = vm.final_record();
    leave(pc, regs, rec, Pending::None, 0, 0);
}

/// Handles an exit of the guest this CPU runs; unless that left the guest,
/// ends the guest's slice if it is over.
pub fn guest_exit(pc: &PerCpu, regs: &mut GuestRegs, raw: u32) {
    handle_exit(pc, regs, raw);
    let Some(deadline) = running(pc).map(|g| g.deadline) else {
        return;
    };
    // The preemption timer restarts from its full value at every VM
    // entry: a guest that exits often (a CPUID loop, hypercalls the
    // hypervisor answers) would never see it fire. The slice is counted
    // here, across exits, and the timer gets what is left. (An external
    // interrupt should end the slice earlier, but Bochs 2.7 takes none
    // while the guest keeps interrupts off and only bounces through the
    // hypervisor.)
    if instr::rdtsc() >= deadline {
        return leave(pc, regs, record(exit::INTR), Pending::None, 0, 0);
    }
    let (vm, idx) = running(pc).map(|g| (g.vm.clone(), g.vcpu)).unwrap();
    if vm.linux.is_some() {
        super::linux::before_entry(&vm, idx);
    }
    arm_timers(&vm, idx, deadline);
}

/// Arms the VMX-preemption timer for whichever comes first: the end of the
/// slice, or a Linux guest's APIC timer (served here, without leaving the
/// guest to the host).
fn arm_timers(vm: &Vm, idx: usize, slice_end: u64) {
    let mut until = slice_end;
    if vm.linux.is_some() {
        if let Some(t) = super::linux::next_timer(vm, idx) {
            until = until.min(t);
        }
    }
    arm_preemption_timer(until.saturating_sub(instr::rdtsc()));
}

/// Makes the VMX-preemption timer fire after about `ticks` TSC ticks (it
/// counts at the TSC rate divided by 2^IA32_VMX_MISC[4:0]).
fn arm_preemption_timer(ticks: u64) {
    // The field is 32 bits wide: a larger value would be cut to its low
    // half (SDM Vol. 3C, 25.5.1).
    vmx::set(PREEMPTION_TIMER_VALUE, (ticks >> (hv().caps.misc & 0x1f)).clamp(1, u32::MAX as u64));
}

fn handle_exit(pc: &PerCpu, regs: &mut GuestRegs, raw: u32) {
    let (reason, entry_failed) = ExitReason::decode(raw);
    tlb::flush_if_needed(pc);
    if entry_failed {
        log::error!("vm{}: VM entry failed: exit reason {:#x} qualification {:#x}", running(pc).unwrap().vm.id, raw, vmx::read(EXIT_QUALIFICATION));
        super::exits::dump_vmcs();
        return stop_vm(pc, regs, stop::ENTRY_FAILED);
    }
    let vm = running(pc).unwrap().vm.clone();
    let idx = running(pc).unwrap().vcpu;
    // An event whose delivery this exit interrupted is delivered again at
    // the next entry, whenever that is.
    super::linux::requeue_interrupted_event();
    let linux = vm.linux.is_some();
    match reason {
        Ok(ExitReason::ExternalInterrupt) => {
            return leave(pc, regs, record(exit::INTR), Pending::None, 0, 0);
        }
        // The end of the slice (checked by the caller), or an APIC timer,
        // which `linux::before_entry` fires.
        Ok(ExitReason::PreemptionTimer) | Ok(ExitReason::InterruptWindow) => {}
        Ok(ExitReason::ExceptionOrNmi) => {
            let info = vmx::read(EXIT_INTERRUPTION_INFO) as u32;
            if (info >> 8) & 7 == 2 {
                // A host NMI (this one, or one taken as `nmi_exit` unblocks
                // NMIs) ends the RUN below.
                tlb::nmi_exit(pc);
            } else {
                return stop_vm(pc, regs, stop::BAD_INSTRUCTION);
            }
        }
        Ok(ExitReason::TripleFault) if linux => {
            let reason = super::linux::reset_reason(&vm);
            let state = if reason == stop::PANIC { vm_state::PANICKED } else { vm_state::REBOOTED };
            return end_vm(pc, regs, state, reason);
        }
        Ok(ExitReason::TripleFault) => return stop_vm(pc, regs, stop::TRIPLE_FAULT),
        Ok(ExitReason::Hlt) if linux => {
            skip_instruction();
            if vmx::read(GUEST_RFLAGS) & (1 << 9) == 0 {
                // Linux halts with interrupts off when it powers off
                // without ACPI (`kernel_halt`, `stop_this_cpu`): on the
                // boot vCPU that is the end of the machine.
                if idx == 0 {
                    log::info!("vm{}: powered off", vm.id);
                    vm.stop(vm_state::EXITED, stop::NONE, 0);
                    return leave(pc, regs, vm.final_record(), Pending::None, 0, 0);
                }
                let mut rec = record(exit::HLT);
                rec.data = 0;
                return leave(pc, regs, rec, Pending::None, 0, 0);
            }
            if !super::linux::has_pending(&vm, idx) {
                let mut rec = record(exit::HLT);
                rec.data = super::linux::next_timer(&vm, idx).unwrap_or(0);
                return leave(pc, regs, rec, Pending::None, 0, 0);
            }
        }
        Ok(ExitReason::Hlt) => {
            if vmx::read(GUEST_RFLAGS) & (1 << 9) == 0 {
                return stop_vm(pc, regs, stop::HLT_IRQS_OFF);
            }
            skip_instruction();
            if !deliver_timer(&vm, idx) {
                let mut rec = record(exit::HLT);
                rec.data = vm.vcpus[idx].state.lock().timer_deadline;
                return leave(pc, regs, rec, Pending::None, 0, 0);
            }
        }
        Ok(ExitReason::IoInstruction) => return port_io(pc, regs, &vm),
        Ok(ExitReason::EptViolation) => return ept_violation(pc, regs, &vm),
        Ok(ExitReason::EptMisconfig) => return stop_vm(pc, regs, stop::ENTRY_FAILED),
        Ok(ExitReason::Cpuid) => {
            let native = |l, s| {
                let [eax, ebx, ecx, edx] = instr::cpuid(l, s);
                Cpuid { eax, ebx, ecx, edx }
            };
            let (leaf, sub) = (regs[RAX] as u32, regs[RCX] as u32);
            let r = match vm.linux.as_ref() {
                Some(p) => crate::policy::linux::cpuid(leaf, sub, idx as u32, p.tsc_khz, native),
                None => guest_cpuid(leaf, sub, native),
            };
            regs[RAX] = r.eax as u64;
            regs[3] = r.ebx as u64;
            regs[RCX] = r.ecx as u64;
            regs[RDX] = r.edx as u64;
            skip_instruction();
        }
        Ok(ExitReason::Rdmsr) if linux => linux_rdmsr(regs, &vm, idx),
        Ok(ExitReason::Wrmsr) if linux => {
            if linux_wrmsr(regs, &vm, idx) {
                return leave(pc, regs, record(exit::KICK), Pending::None, 0, 0);
            }
        }
        Ok(ExitReason::Rdmsr) => match guest_msr(regs[RCX] as u32) {
            GuestMsr::Vmcs(f) => {
                let v = vmx::read(f);
                regs[RAX] = v & 0xffff_ffff;
                regs[RDX] = v >> 32;
                skip_instruction();
            }
            GuestMsr::Tsc => {
                let v = instr::rdtsc();
                regs[RAX] = v & 0xffff_ffff;
                regs[RDX] = v >> 32;
                skip_instruction();
            }
            GuestMsr::None => super::exits::inject_gp(),
        },
        Ok(ExitReason::Wrmsr) => {
            let v = (regs[RDX] << 32) | (regs[RAX] & 0xffff_ffff);
            match guest_msr(regs[RCX] as u32) {
                GuestMsr::Vmcs(GUEST_IA32_EFER) if !guest_efer_ok(vmx::read(GUEST_IA32_EFER), v) => super::exits::inject_gp(),
                GuestMsr::Vmcs(f) if f == GUEST_FS_BASE || f == GUEST_GS_BASE => {
                    if ((v as i64) << 16 >> 16) as u64 != v {
                        super::exits::inject_gp();
                    } else {
                        vmx::set(f, v);
                        skip_instruction();
                    }
                }
                GuestMsr::Vmcs(f) => {
                    vmx::set(f, v);
                    skip_instruction();
                }
                _ => super::exits::inject_gp(),
            }
        }
        Ok(ExitReason::CrAccess) => {
            let q = vmx::read(EXIT_QUALIFICATION);
            if q & 0xf == 8 {
                // CR8 is the host's TPR: the guest gets a private one, ignored.
                if (q >> 4) & 3 == 1 {
                    regs[((q >> 8) & 0xf) as usize] = 0;
                }
                skip_instruction();
            } else {
                super::exits::cr_access(regs);
            }
        }
        Ok(ExitReason::Vmcall) => return hypercall(pc, regs, &vm, idx),
        Ok(ExitReason::Invd) | Ok(ExitReason::Wbinvd) => skip_instruction(),
        Ok(ExitReason::Init) | Ok(ExitReason::Sipi) => {}
        Ok(_) => inject_ud(),
        Err(_) => return stop_vm(pc, regs, stop::BAD_INSTRUCTION),
    }
    if vm.dying.load(Ordering::Acquire) {
        return leave(pc, regs, vm.final_record(), Pending::None, 0, 0);
    }
    if pc.host_nmi_pending.load(Ordering::Acquire) != 0 {
        leave(pc, regs, record(exit::INTR), Pending::None, 0, 0);
    }
}

/// A Linux guest's RDMSR (`policy::linux::classify`).
fn linux_rdmsr(regs: &mut GuestRegs, vm: &Vm, idx: usize) {
    let msr = regs[RCX] as u32;
    let v = match classify(msr) {
        LinuxMsr::Apic => super::linux::apic_rdmsr(vm, idx, msr),
        // SAFETY: the guest's own value is in the real MSR while it runs.
        LinuxMsr::Switched(_) => Some(unsafe { instr::rdmsr(msr) }),
        LinuxMsr::Constant(v) | LinuxMsr::ReadOnly(v) => Some(v),
        LinuxMsr::Common(GuestMsr::Vmcs(f)) => Some(vmx::read(f)),
        LinuxMsr::Common(GuestMsr::Tsc) => Some(instr::rdtsc()),
        LinuxMsr::Common(GuestMsr::None) | LinuxMsr::Gp => None,
    };
    match v {
        Some(v) => {
            regs[RAX] = v & 0xffff_ffff;
            regs[RDX] = v >> 32;
            skip_instruction();
        }
        None => super::exits::inject_gp(),
    }
}

/// A Linux guest's WRMSR. Returns true when a halted vCPU of the VM must
/// be woken (an IPI went to it).
fn linux_wrmsr(regs: &mut GuestRegs, vm: &Vm, idx: usize) -> bool {
    let msr = regs[RCX] as u32;
    let v = (regs[RDX] << 32) | (regs[RAX] & 0xffff_ffff);
    let canonical = ((v as i64) << 16 >> 16) as u64 == v;
    let mut wake = false;
    let ok = match classify(msr) {
        LinuxMsr::Apic => match super::linux::apic_wrmsr(vm, idx, msr, v) {
            Some(w) => {
                wake = w;
                true
            }
            None => false,
        },
        LinuxMsr::Switched(i) if crate::policy::linux::switched_is_address(i) && !canonical => false,
        LinuxMsr::Switched(_) => {
            // SAFETY: a syscall MSR or KERNEL_GS_BASE, canonical where it
            // holds an address; the host's value is restored in `leave`.
            unsafe { instr::wrmsr(msr, v) };
            true
        }
        LinuxMsr::Constant(_) => true,
        LinuxMsr::Common(GuestMsr::Vmcs(GUEST_IA32_EFER)) => {
            let paging = vmx::read(GUEST_CR0) & (1 << 31) != 0;
            match crate::policy::linux::efer_write(vmx::read(GUEST_IA32_EFER), v, paging) {
                Some(e) => {
                    vmx::set(GUEST_IA32_EFER, e);
                    true
                }
                None => false,
            }
        }
        LinuxMsr::Common(GuestMsr::Vmcs(f)) if f == GUEST_FS_BASE || f == GUEST_GS_BASE => {
            if canonical {
                vmx::set(f, v);
            }
            canonical
        }
        LinuxMsr::Common(GuestMsr::Vmcs(f)) => {
            vmx::set(f, v);
            true
        }
        LinuxMsr::Common(_) | LinuxMsr::ReadOnly(_) | LinuxMsr::Gp => false,
    };
    if ok {
        skip_instruction();
    } else {
        super::exits::inject_gp();
    }
    wake
}

fn port_io(pc: &PerCpu, regs: &mut GuestRegs, vm: &Arc<Vm>) {
    let q = vmx::read(EXIT_QUALIFICATION);
    let size = (q & 7) as u8 + 1;
    let is_in = q & 8 != 0;
    let port = (q >> 16) as u16;
    if q & 16 != 0 {
        // String I/O is not part of the guest contract.
        return stop_vm(pc, regs, stop::BAD_INSTRUCTION);
    }
    let mask = if size == 4 { 0xffff_ffff } else { (1u64 << (8 * size as u32)) - 1 };
    skip_instruction();
    if vm.linux.is_some() && super::linux::port_to_vmm(port) {
        let write = (!is_in).then_some(regs[RAX] as u8);
        if size == 1 {
            if let Access::Done(v) = super::linux::uart_access(vm, port - linux::UART_PORT_FIRST, write) {
                if is_in {
                    regs[RAX] = (regs[RAX] & !0xff) | v as u64;
                }
                return;
            }
        }
    } else if vm.linux.is_some() && port == linux::HYPERCALL_PORT && is_in && size == 4 {
        return port_hypercall(pc, regs, vm);
    } else if vm.linux.is_some() && port != guest::EXIT_PORT {
        let v = super::linux::port_io(vm, port, (!is_in).then_some(regs[RAX] & mask), mask);
        if is_in {
            regs[RAX] = (regs[RAX] & !mask) | (v & mask);
        }
        return;
    }
    if port == guest::EXIT_PORT && !is_in {
        let code = regs[RAX] & mask;
        log::info!("vm{}: exited with code {}", vm.id, code);
        vm.stop(vm_state::EXITED, stop::NONE, code);
        return leave(pc, regs, vm.final_record(), Pending::None, 0, 0);
    }
    let mut rec = record(exit::IO);
    rec.port = port;
    rec.size = size;
    rec.is_write = !is_in as u8;
    rec.data = if is_in { 0 } else { regs[RAX] & mask };
    let pending = if is_in { Pending::PortIn { size } } else { Pending::None };
    leave(pc, regs, rec, pending, 0, 0)
}

/// Drops this CPU's cached translations of `vm`'s memory, after a change
/// that an EPT violation alone need not have flushed (a table clone above
/// the faulting entry).
fn flush_local(vm: &Vm) {
    // SAFETY: INVEPT of this guest's EPT.
    unsafe {
        let _ = instr::invept(1, vm.eptp);
    }
}

fn ept_violation(pc: &PerCpu, regs: &mut GuestRegs, vm: &Vm) {
    let gpa = vmx::read(GUEST_PHYSICAL_ADDRESS);
    let q = EptViolation::from_qualification(vmx::read(EXIT_QUALIFICATION));
    if gpa < vm.mem_bytes {
        let r = {
            let mut mem = vm.mem.lock();
            let Some(g) = mem.as_mut() else {
                return leave(pc, regs, vm.final_record(), Pending::None, 0, 0);
            };
            let mut pool = POOL.lock();
            if q.write {
                g.ensure_writable(&DirectMap, &mut pool, Gpa(gpa))
            } else {
                g.ensure_present(&DirectMap, &mut pool, Gpa(gpa)).map(|_| Touch::Fresh)
            }
        };
        return match r {
            Ok(Touch::InPlace | Touch::Fresh) => flush_local(vm),
            Ok(Touch::Copied) => {
                vm::COW_COPIES.fetch_add(1, Ordering::Relaxed);
                flush_local(vm);
                if vm.vcpus.len() > 1 && tlb::shootdown().is_err() {
                    // Another vCPU of this VM may still read the old frame:
                    // the write must wait until none can. The VM enters
                    // again only after a shootdown succeeds (`try_run`).
                    vm.flush_owed.store(true, Ordering::Release);
                    return leave(pc, regs, record(exit::NONE), Pending::None, 0, 0);
                }
            }
            // The instruction is retried once the host has donated.
            Err(MemError::NeedPages(n)) => leave(pc, regs, record(exit::NONE), Pending::None, HC_NEED_PAGES, n),
            Err(_) => stop_vm(pc, regs, stop::OUT_OF_MEMORY),
        };
    }
    if !q.final_translation || q.fetch {
        // The guest's page tables, or its code, lie outside its memory.
        return stop_vm(pc, regs, stop::BAD_INSTRUCTION);
    }
    let Some((op, er)) = decode_guest_mmio(vm, regs) else {
        return stop_vm(pc, regs, stop::BAD_INSTRUCTION);
    };
    if vm.linux.is_some() {
        return platform_mmio(regs, vm, gpa, op, er);
    }
    // MMIO: the access goes to the VMM.
    let mut rec = record(exit::MMIO);
    rec.addr = gpa;
    rec.size = op.size;
    rec.is_write = op.is_write as u8;
    rec.data = op.data;
    if op.is_write {
        vmx::set(GUEST_RIP, op.next_rip);
        return leave(pc, regs, rec, Pending::None, 0, 0);
    }
    let pending = Pending::MmioRead {
        size: op.size,
        reg: op.reg,
        high_byte: op.high_byte,
        dest_size: op.dest_size,
        sign_extend: op.sign_extend,
        next_rip: op.next_rip,
    };
    leave(pc, regs, rec, pending, 0, 0)
}

/// Decodes the guest's access outside its memory at RIP (MOV, MOVZX,
/// MOVSX, MOVSXD between memory and a register or an immediate).
fn decode_guest_mmio(vm: &Vm, regs: &GuestRegs) -> Option<(MmioOp, EmuRegs)> {
    let rip = vmx::read(GUEST_RIP);
    let mut bytes = [0u8; 15];
    let n = read_guest_code(vm, rip, &mut bytes);
    let er = EmuRegs { gpr: *regs, rip, ..Default::default() };
    let op = (n > 0).then(|| decode_mmio(&bytes[..n], 64, &er)).flatten()?;
    Some((op, er))
}

/// An access of a Linux guest outside its RAM, emulated here: performed
/// on the IOAPIC, or, anywhere else, reads all ones and writes nothing, as
/// a PC's unclaimed addresses do. The guest goes on after it.
fn platform_mmio(regs: &mut GuestRegs, vm: &Vm, gpa: u64, op: MmioOp, er: EmuRegs) {
    let ioapic = super::linux::is_ioapic(gpa);
    if op.is_write {
        if ioapic {
            super::linux::ioapic_access(vm, gpa, Some(op.data as u32));
        }
        vmx::set(GUEST_RIP, op.next_rip);
        return;
    }
    let v = if ioapic { super::linux::ioapic_access(vm, gpa, None) as u64 } else { u64::MAX };
    let mut er = er;
    let full = MmioOp { dest_size: op.size.max(op.dest_size), ..op };
    complete_mmio_read(&mut er, &full, v);
    *regs = er.gpr;
    vmx::set(GUEST_RIP, er.rip);
}

/// Reads up to 15 bytes of guest code at linear `rip`; returns how many.
fn read_guest_code(vm: &Vm, rip: u64, out: &mut [u8; 15]) -> usize {
    use crate::paging::{translate, AccessKind, PagingMode};
    let mode = PagingMode {
        cr0: vmx::read(GUEST_CR0),
        cr3: vmx::read(GUEST_CR3),
        cr4: vmx::read(CR4_READ_SHADOW),
        efer: vmx::read(GUEST_IA32_EFER),
    };
    let mem = vm.mem.lock();
    let Some(g) = mem.as_ref() else { return 0 };
    let kind = AccessKind { write: false, user: false };
    let mut n = 0usize;
    while n < 15 {
        let la = rip + n as u64;
        let Ok(t) = translate(&DirectMap, &mode, la, kind, |gpa| g.lookup(&DirectMap, gpa).map(|(pa, _)| Hpa(pa.0 + gpa.page_offset()))) else {
            break;
        };
        let Some((pa, _)) = g.lookup(&DirectMap, t.gpa) else { break };
        let chunk = ((4096 - (la & 4095)) as usize).min(15 - n);
        DirectMap.read(Hpa(pa.0 + t.gpa.page_offset()), &mut out[n..n + chunk]);
        n += chunk;
    }
    n
}

fn hypercall(pc: &PerCpu, regs: &mut GuestRegs, vm: &Arc<Vm>, idx: usize) {
    if super::exits::guest_cpl() != 0 {
        return inject_ud();
    }
    let nr = regs[RAX];
    let (a0, a1) = (regs[RDI], regs[RSI]);
    skip_instruction();
    if nr == ghc::FORK {
        return guest_fork(pc, regs, vm);
    }
    let ret: i64 = match nr {
        ghc::VERSION => shared_abi::ABI_REVISION as i64,
        ghc::VM_ID => vm.id as i64,
        ghc::TSC_KHZ => 0,
        ghc::SET_TIMER => {
            if a0 != 0 && !(32..=255).contains(&a1) {
                -EINVAL
            } else {
                let mut st = vm.vcpus[idx].state.lock();
                st.timer_deadline = a0;
                st.timer_vector = a1 as u8;
                0
            }
        }
        n if (ghc::VMM_FIRST..=ghc::VMM_LAST).contains(&n) => {
            let mut rec = record(exit::HYPERCALL);
            rec.hc_nr = n;
            rec.hc_args = [a0, a1, regs[RDX]];
            return leave(pc, regs, rec, Pending::Hypercall, 0, 0);
        }
        _ => {
            log::info!("vm{}: unknown hypercall {:#x}", vm.id, nr);
            return stop_vm(pc, regs, stop::BAD_HYPERCALL);
        }
    };
    regs[RAX] = ret as u64;
}

/// The fork hypercall: the child is created here; the VMM takes it (the
/// driver gives it a descriptor) and answers with the child's id, which
/// becomes the parent's RAX. The child starts with RAX = 0.
/// A Linux guest's hypercall through `linux::HYPERCALL_PORT` (an IN of 32
/// bits, already skipped): EAX holds the number, and gets the result as
/// an i32, zero-extended into RAX as the IN would.
fn port_hypercall(pc: &PerCpu, regs: &mut GuestRegs, vm: &Arc<Vm>) {
    let nr = regs[RAX] & 0xffff_ffff;
    let r: i64 = match nr {
        ghc::FORK => {
            guest_fork(pc, regs, vm);
            // A result set here (an error) is an i32 like every other; a
            // fork that reached the VMM gets its result with the next RUN.
            regs[RAX] &= 0xffff_ffff;
            return;
        }
        ghc::VERSION => shared_abi::ABI_REVISION as i64,
        ghc::VM_ID => vm.id as i64,
        _ => -ENOSYS,
    };
    regs[RAX] = r as u64 & 0xffff_ffff;
}

/// The guest vCPU `pc` runs, if any. The borrow must end before the guest
/// is left (`leave`), which takes it out of the slot.
pub fn running(pc: &PerCpu) -> Option<core::cell::Ref<'_, Running>> {
    pc.guest.get()
}

fn guest_fork(pc: &PerCpu, regs: &mut GuestRegs, vm: &Arc<Vm>) {
    if vm.vcpus.len() != 1 {
        regs[RAX] = -EINVAL as u64;
        return;
    }
    let mut st = *vm.vcpus[0].state.lock();
    st.gpr = *regs;
    st.gpr[RAX] = 0;
    instr::fxsave(&mut st.fx);
    st.cr2 = instr::read_cr2();
    if vm.linux.is_some() {
        // The guest's syscall and GS MSRs are live on this CPU; the saved
        // ones are those of the vCPU's last exit to the host (a call from
        // user mode finds KERNEL_GS_BASE swapped since).
        for (i, m) in SWITCHED.iter().enumerate() {
            // SAFETY: reading MSRs the hypervisor switches for the guest.
            st.msrs[i] = unsafe { instr::rdmsr(*m) };
        }
    }
    let state = vm::child_state(&st, Some(vmx::capture()));
    match vm::fork(vm, alloc::vec![state], false) {
        Ok(child) => {
            log::info!("vm{}: forked vm{} (guest request)", vm.id, child.id);
            // This CPU runs the parent on: its write access is gone.
            // SAFETY: INVEPT of the parent's EPT.
            unsafe {
                let _ = instr::invept(1, vm.eptp);
            }
            let mut rec = record(exit::HYPERCALL);
            rec.hc_nr = ghc::FORK;
            rec.hc_args = [child.id as u64, 0, 0];
            leave(pc, regs, rec, Pending::Hypercall, 0, 0)
        }
        Err(vm::VmError::Mem(MemError::NeedPages(n))) => {
            // Retry the VMCALL once the host has donated.
            let len = vmx::read(EXIT_INSTRUCTION_LENGTH);
            vmx::set(GUEST_RIP, vmx::read(GUEST_RIP).wrapping_sub(len));
            leave(pc, regs, record(exit::NONE), Pending::None, HC_NEED_PAGES, n)
        }
        Err(e) => regs[RAX] = e.errno() as u64,
    }
}

/// A guest VM entry failed (VMLAUNCH/VMRESUME): the VM stops.
pub fn entry_failed(pc: &PerCpu, regs: &mut GuestRegs) {
    let err = vmx::read(VM_INSTRUCTION_ERROR);
    log::error!("vm{}: VM entry failed: VM-instruction error {err}", running(pc).unwrap().vm.id);
    super::exits::dump_vmcs();
    stop_vm(pc, regs, stop::ENTRY_FAILED);
}
