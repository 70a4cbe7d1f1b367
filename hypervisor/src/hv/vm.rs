//! Guest VMs: the table of VMs, their memory, their vCPUs.

use super::memory::DirectMap;
use crate::addr::Hpa;
use crate::control::vmops;
use crate::guestmem::GuestMem;
use crate::pool::FramePool;
use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use crate::devices::lapic::Lapic;
use shared_abi::{exit, stop, vm_state, ExitRecord, Regs, VmInfo, VM_NAME_LEN};

/// The frame pool, shared by all VMs.
pub static POOL: spin::Mutex<FramePool> = spin::Mutex::new(FramePool::new());

/// Every VM, by id.
static VMS: spin::Mutex<BTreeMap<u32, Arc<Vm>>> = spin::Mutex::new(BTreeMap::new());
static NEXT_ID: AtomicU32 = AtomicU32::new(1);

/// Why a VM operation failed; turned into `-errno` by the dispatcher.
pub use crate::control::VmError;

/// A vCPU's state while it is not running.
#[derive(Clone, Copy)]
pub struct VcpuState {
    /// RAX..R15 (RSP lives in the VMCS).
    pub gpr: [u64; 16],
    /// The initial register file, applied at the first run.
    pub init: Regs,
    /// The VMCS has been filled.
    pub ready: bool,
    /// The previous exit waits for the VMM's answer (a port or MMIO read,
    /// or a VMM hypercall): what to complete on the next RUN.
    pub pending: Pending,
    /// Halt-wake timer: TSC deadline (0: none) and vector.
    pub timer_deadline: u64,
    pub timer_vector: u8,
    /// A forked vCPU's VMCS state, applied at its first run.
    pub snapshot: Option<crate::arch::x86::vmx::Snapshot>,
    /// State the VMCS does not hold, kept across RUNs (the host uses the
    /// registers in between): x87/SSE and CR2.
    pub fx: crate::arch::x86::instr::FxArea,
    pub cr2: u64,
    /// Whether the vCPU runs, or waits for a STARTUP IPI (a Linux guest's
    /// application processors, before they are started and after INIT).
    pub start: Start,
    /// A Linux guest's syscall MSRs and KERNEL_GS_BASE
    /// (`policy::linux::SWITCHED`), in the real MSRs while it runs.
    pub msrs: [u64; 5],
}

/// A vCPU's place in the INIT/STARTUP protocol (SDM Vol. 3A, 9.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    Running,
    /// Waiting for a STARTUP IPI: RUN does not enter the guest.
    WaitSipi,
    /// Started by a STARTUP IPI with this vector: the next RUN enters in
    /// real mode at `vector << 12`.
    Sipi(u8),
}

/// What the next RUN must complete before entering the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pending {
    None,
    /// A port read of `size` bytes into RAX.
    PortIn { size: u8 },
    /// An MMIO read of `size` bytes into GPR `reg`, then RIP = `next_rip`.
    /// MOVZX/MOVSX loads widen into `dest_size` bytes.
    MmioRead { size: u8, reg: u8, high_byte: bool, dest_size: u8, sign_extend: bool, next_rip: u64 },
    /// A VMM hypercall's result into RAX.
    Hypercall,
}

pub struct Vcpu {
    /// Its VMCS region (a pool frame).
    pub vmcs: Hpa,
    /// Owned by the CPU that runs it.
    pub running: AtomicBool,
    /// Index of the CPU running it, while `running`.
    pub cpu: AtomicU32,
    pub state: spin::Mutex<VcpuState>,
    /// Its local APIC (used by `VM_FLAG_LINUX` VMs only). Locked on its
    /// own, so that another CPU can post an interrupt while this vCPU runs;
    /// never held together with `Vm::linux`'s IOAPIC lock.
    pub lapic: spin::Mutex<Lapic>,
}

/// A guest VM.
pub struct Vm {
    pub id: u32,
    pub parent: u32,
    pub name: [u8; VM_NAME_LEN],
    pub vpid: u16,
    pub mem_bytes: u64,
    pub mem: spin::Mutex<Option<GuestMem>>,
    pub eptp: u64,
    pub vcpus: Vec<Vcpu>,
    /// `vm_state` value.
    pub state: AtomicU32,
    pub stop_reason: AtomicU32,
    pub exit_code: AtomicU64,
    /// Being destroyed: running vCPUs leave at once.
    pub dying: AtomicBool,
    /// Children forked through the hypercall.
    pub children: AtomicU32,
    /// Per-CPU bit: that CPU may hold stale translations for this EPT.
    pub tlb_dirty: AtomicU64,
    /// The PC of a `VM_FLAG_LINUX` VM (`hv/linux.rs`).
    pub linux: Option<super::linux::Platform>,
    /// A shootdown after a copy-on-write copy was not acknowledged: no
    /// vCPU enters until one succeeds.
    pub flush_owed: AtomicBool,
}

impl Vm {
    pub fn is_stopped(&self) -> bool {
        matches!(self.state.load(Ordering::Acquire), vm_state::EXITED | vm_state::STOPPED | vm_state::REBOOTED | vm_state::PANICKED)
    }

    /// Ends the VM for good with `reason` (a `stop` value) or an exit code.
    pub fn stop(&self, state: u32, reason: u32, code: u64) {
        self.stop_reason.store(reason, Ordering::Release);
        self.exit_code.store(code, Ordering::Release);
        self.state.store(state, Ordering::Release);
    }

    /// The exit record RUN returns once the VM has ended.
    pub fn final_record(&self) -> ExitRecord {
        let mut r = ExitRecord::default();
        if self.state.load(Ordering::Acquire) == vm_state::EXITED {
            r.kind = exit::GUEST_EXIT;
            r.data = self.exit_code.load(Ordering::Acquire);
        } else {
            r.kind = exit::SHUTDOWN;
            r.reason = self.stop_reason.load(Ordering::Acquire);
        }
        r
    }

    /// Marks the TLBs of every CPU stale for this VM.
    pub fn mark_tlbs_stale(&self) {
        self.tlb_dirty.store(u64::MAX, Ordering::Release);
    }
}

/// Looks up a VM.
pub fn get(id: u32) -> Result<Arc<Vm>, VmError> {
    VMS.lock().get(&id).cloned().ok_or(VmError::NoSuchVm)
}

/// Copy-on-write copies made on guest writes, for `stats`.
pub static COW_COPIES: AtomicU64 = AtomicU64::new(0);

/// The ids of every VM, in order.
pub fn ids() -> Vec<u32> {
    VMS.lock().keys().copied().collect()
}

pub fn count() -> u32 {
    VMS.lock().len() as u32
}

/// VPIDs: 1 is the host VM's; guests take from 2 up.
static VPIDS: spin::Mutex<[u64; 1024]> = spin::Mutex::new([0; 1024]);

fn alloc_vpid() -> Option<u16> {
    let mut v = VPIDS.lock();
    for (w, word) in v.iter_mut().enumerate() {
        if *word != u64::MAX {
            let b = (!*word).trailing_zeros() as usize;
            let id = w * 64 + b;
            *word |= 1 << b;
            if id < 2 {
                continue;
            }
            return Some(id as u16);
        }
    }
    None
}

fn free_vpid(id: u16) {
    VPIDS.lock()[id as usize / 64] &= !(1 << (id % 64));
}

/// The initial register file of vCPU 0 (docs/guest-abi.md).
pub use crate::control::vmops::boot_regs;

/// Creates a VM. Needs pool frames for its EPT root and VMCS pages. A
/// Linux guest's VM (`linux_tsc_khz` given) gets a PC: local APICs and an
/// IOAPIC, and with `vmgenid` a VM generation ID.
pub fn create(mem_bytes: u64, vcpus: u32, name: [u8; VM_NAME_LEN], parent: u32, linux_tsc_khz: Option<u32>, vmgenid: bool) -> Result<Arc<Vm>, VmError> {
    let platform = linux_tsc_khz.map(|khz| super::linux::Platform::new(khz, vmgenid));
    create_with(mem_bytes, vcpus, name, parent, None, None, platform)
}

/// Creates a VM, with its memory and vCPU states given (a fork) or new.
fn create_with(
    mem_bytes: u64,
    vcpus: u32,
    name: [u8; VM_NAME_LEN],
    parent: u32,
    memory: Option<GuestMem>,
    states: Option<Vec<VcpuState>>,
    linux: Option<super::linux::Platform>,
) -> Result<Arc<Vm>, VmError> {
    let tsc_khz = linux.as_ref().map_or(0, |p| p.tsc_khz);
    let mem = DirectMap;
    // Counted before the pool is locked: VMS is never taken under POOL.
    let vms = count();
    let mut pool = POOL.lock();
    // On failure a fork's memory is given back too.
    let (g, frames) = vmops::take_frames(&mem, &mut pool, &vmops::LIMITS, vms, mem_bytes, vcpus, memory)?;
    let mut list = Vec::new();
    for (i, vmcs) in frames.into_iter().enumerate() {
        // A VMCS region starts with the revision identifier; VMCLEAR makes
        // it ready for its first VMPTRLD on any CPU.
        crate::mem::PhysMem::write(&DirectMap, vmcs, &super::hv().caps.revision().to_le_bytes());
        // SAFETY: a fresh frame of ours, formatted above.
        unsafe {
            let _ = crate::arch::x86::instr::vmclear(vmcs.0);
        }
        list.push(Vcpu {
            vmcs,
            running: AtomicBool::new(false),
            cpu: AtomicU32::new(0),
            state: spin::Mutex::new(match &states {
                Some(s) => s[i],
                None => VcpuState {
                    gpr: [0; 16],
                    init: boot_regs(mem_bytes),
                    ready: false,
                    pending: Pending::None,
                    timer_deadline: 0,
                    timer_vector: 0,
                    snapshot: None,
                    fx: crate::arch::x86::instr::FxArea::reset(),
                    cr2: 0,
                    start: if linux.is_some() && i > 0 { Start::WaitSipi } else { Start::Running },
                    msrs: [0; 5],
                },
            }),
            lapic: spin::Mutex::new(Lapic::new(i as u32, i == 0, tsc_khz)),
        });
    }
    let Some(vpid) = alloc_vpid() else {
        // Give back what was taken for it.
        let vmcs: Vec<Hpa> = list.iter().map(|v| v.vmcs).collect();
        vmops::release(&mem, &mut pool, Some(g), &vmcs);
        return Err(VmError::TooMany);
    };
    drop(pool);
    let id = NEXT_ID.fetch_add(1, Ordering::AcqRel);
    let eptp = crate::arch::x86::ept_entry::eptp(g.ept.root.0, false);
    let vm = Arc::new(Vm {
        id,
        parent,
        name,
        vpid,
        mem_bytes,
        mem: spin::Mutex::new(Some(g)),
        eptp,
        vcpus: list,
        state: AtomicU32::new(if parent != 0 { vm_state::PAUSED } else { vm_state::CREATED }),
        stop_reason: AtomicU32::new(stop::NONE),
        exit_code: AtomicU64::new(0),
        dying: AtomicBool::new(false),
        children: AtomicU32::new(0),
        tlb_dirty: AtomicU64::new(u64::MAX),
        flush_owed: AtomicBool::new(false),
        linux,
    });
    VMS.lock().insert(id, vm.clone());
    Ok(vm)
}

/// Destroys a VM: stops its running vCPUs, frees its frames (scrubbed) and
/// its VPID. Its children keep their shared frames.
pub fn destroy(id: u32) -> Result<(), VmError> {
    let vm = {
        let mut vms = VMS.lock();
        let vm = vms.remove(&id).ok_or(VmError::NoSuchVm)?;
        if let Some(p) = vms.get(&vm.parent) {
            let _ = p.children.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| c.checked_sub(1));
        }
        vm
    };
    vm.dying.store(true, Ordering::Release);
    if !vm.is_stopped() {
        vm.stop(vm_state::STOPPED, stop::DESTROYED, 0);
    }
    // A vCPU in the guest on another CPU leaves at the kick.
    for v in &vm.vcpus {
        let t0 = crate::arch::x86::instr::rdtsc();
        while v.running.load(Ordering::Acquire) {
            let cpu = v.cpu.load(Ordering::Acquire) as usize;
            if cpu != crate::arch::x86::cpu::this_cpu().index as usize {
                super::tlb::kick(cpu);
            }
            let t1 = crate::arch::x86::instr::rdtsc();
            while v.running.load(Ordering::Acquire) && crate::arch::x86::instr::rdtsc().wrapping_sub(t1) < 1 << 24 {
                core::hint::spin_loop();
            }
            if crate::arch::x86::instr::rdtsc().wrapping_sub(t0) > 1 << 36 {
                log::error!("vm{id}: a vCPU does not stop; its memory is kept");
                return Ok(());
            }
        }
    }
    let g = vm.mem.lock().take();
    // The VMCS pages are not running any more: VMCLEAR'ed when they last
    // left a CPU.
    let vmcs: Vec<Hpa> = vm.vcpus.iter().map(|v| v.vmcs).collect();
    vmops::release(&DirectMap, &mut POOL.lock(), g, &vmcs);
    free_vpid(vm.vpid);
    if count() == 0 {
        // The merge index (a pass's, or the stable one between passes) may
        // still hold frames of the VMs that are gone: with no VM left, the
        // pass has nothing to do, and every frame must go back to the pool.
        super::merge::forget();
    } else {
        // Frames of this VM that only the index still holds go back now.
        super::merge::vm_gone();
    }
    Ok(())
}

/// Copies `data` into a VM's memory.
pub fn load(vm: &Vm, gpa: u64, data: &[u8]) -> Result<(), VmError> {
    let mut mem = vm.mem.lock();
    let g = mem.as_mut().ok_or(VmError::NoSuchVm)?;
    vmops::load(&DirectMap, &mut POOL.lock(), g, gpa, data)
}

/// The VM's one-line description.
pub fn info(vm: &Vm) -> VmInfo {
    let (private, shared) = vmops::frames(&DirectMap, &POOL.lock(), vm.mem.lock().as_ref(), vm.vcpus.len());
    let running = vm.vcpus.iter().any(|v| v.running.load(Ordering::Acquire));
    let mut state = vm.state.load(Ordering::Acquire);
    if state == vm_state::PAUSED && running {
        state = vm_state::RUNNING;
    }
    VmInfo {
        id: vm.id,
        parent: vm.parent,
        state,
        vcpus: vm.vcpus.len() as u32,
        mem_bytes: vm.mem_bytes,
        frames_private: private,
        frames_shared: shared,
        exit_code: vm.exit_code.load(Ordering::Acquire),
        stop_reason: vm.stop_reason.load(Ordering::Acquire),
        reserved0: 0,
        name: vm.name,
    }
}

/// Every VM's description, in id order.
pub fn list() -> Vec<VmInfo> {
    let vms: Vec<Arc<Vm>> = VMS.lock().values().cloned().collect();
    vms.iter().map(|v| info(v)).collect()
}

/// A vCPU's state for a fork's child: its registers and VMCS contents.
pub fn child_state(st: &VcpuState, snapshot: Option<crate::arch::x86::vmx::Snapshot>) -> VcpuState {
    VcpuState { ready: false, pending: Pending::None, snapshot: snapshot.or(st.snapshot), ..*st }
}

/// Forks `parent`: the child shares every frame copy-on-write (or, with
/// `copy`, gets its own copy of every frame) and starts from `states`. The
/// parent's vCPUs must not run on other CPUs.
pub fn fork(parent: &Arc<Vm>, states: Vec<VcpuState>, copy: bool) -> Result<Arc<Vm>, VmError> {
    let children = parent.children.load(Ordering::Acquire);
    let vms = count();
    let child_mem = {
        let mut pm = parent.mem.lock();
        let g = pm.as_mut().ok_or(VmError::NoSuchVm)?;
        let mut pool = POOL.lock();
        vmops::fork_memory(&DirectMap, &mut pool, &vmops::LIMITS, vms, children, g, parent.vcpus.len(), copy).inspect_err(|e| {
            if *e == VmError::Limit {
                log::info!("vm{}: fork refused: {} live children is the limit", parent.id, shared_abi::VM_MAX_CHILDREN);
            }
        })?
    };
    // The parent's mappings became read-only: no CPU may keep a writable
    // translation.
    if !copy {
        parent.mark_tlbs_stale();
    }
    // The child's PC is the parent's as it stands: its APICs with their
    // pending interrupts and armed timers, its IOAPIC.
    let platform = parent.linux.as_ref().map(|p| p.clone_state());
    let child = create_with(parent.mem_bytes, parent.vcpus.len() as u32, parent.name, parent.id, Some(child_mem), Some(states), platform)?;
    for (c, p) in child.vcpus.iter().zip(&parent.vcpus) {
        *c.lapic.lock() = *p.lapic.lock();
    }
    parent.children.fetch_add(1, Ordering::AcqRel);
    // Each side gets a new VM generation ID before it runs again, written
    // as it enters.
    super::linux::owe_generation(&child);
    super::linux::owe_generation(parent);
    Ok(child)
}

/// The state of a vCPU that is not running, with its VMCS contents.
pub fn capture_idle(v: &Vcpu) -> VcpuState {
    let st = *v.state.lock();
    if !st.ready {
        return st;
    }
    let pc = crate::arch::x86::cpu::this_cpu();
    // SAFETY: the vCPU is not running, so its VMCS is clear in memory; the
    // host VM's VMCS is current (a hypercall of the host's).
    let snap = unsafe { crate::arch::x86::vmx::with_idle_vmcs(v.vmcs.0, pc.vmcs_pa, crate::arch::x86::vmx::capture) };
    child_state(&st, snap)
}
