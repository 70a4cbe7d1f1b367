//! Per-CPU state, and the hypervisor's own GDT, TSS and IDT.

use super::instr::{self, DescriptorTablePointer, FAULT_VECTOR_OFFSET, FIXUP_OFFSET};
use alloc::boxed::Box;
use core::any::Any;
use core::cell::{Ref, RefCell};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use shared_abi::EXIT_REASON_SLOTS;

/// The Linux state of a CPU when it entered, restored on roll-back and
/// unload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SavedState {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub gdtr: DescriptorTablePointer,
    pub idtr: DescriptorTablePointer,
    pub cs: u16,
    pub ss: u16,
    pub ds: u16,
    pub es: u16,
    pub fs: u16,
    pub gs: u16,
    pub tr: u16,
    pub ldtr: u16,
    pub fs_base: u64,
    pub gs_base: u64,
    pub efer: u64,
    pub pat: u64,
    pub debugctl: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub dr7: u64,
    pub rflags: u64,
}

/// Per-CPU area, at the start of the CPU's slice of the hypervisor region.
/// `gs:0` points here in VMX root operation.
///
/// Only shared references to it exist once it is set up ([`this_cpu`],
/// [`percpu_of`]): an NMI or exception can interrupt any code of the CPU
/// and reach the same area, so a `&mut PerCpu` held by that code would
/// alias. What changes after set-up is interior-mutable: atomics (which
/// the NMI and exception paths use, and other CPUs read), and the
/// [`GuestSlot`], which only the CPU's exit path touches.
#[repr(C, align(4096))]
pub struct PerCpu {
    /// This structure's own address (`gs:0`).
    pub self_ptr: u64,
    /// Where a fault in a `*_safe` instruction resumes (`gs:8`), or 0.
    /// Set and cleared by those instructions' assembly, taken by the
    /// exception handler.
    pub fixup_rip: AtomicU64,
    /// Vector of the last fault taken through `fixup_rip` (`gs:16`).
    pub fault_vector: AtomicU64,
    /// Non-zero when the next VM entry must be VMLAUNCH (`gs:24`); the exit
    /// stub clears it.
    pub launch_next: AtomicU64,
    pub index: u32,
    pub linux_id: u32,
    pub apic_id: u32,
    pub virtualized: AtomicU32,
    pub stack_top: u64,
    pub vmxon_pa: u64,
    pub vmcs_pa: u64,
    pub linux: SavedState,
    pub exits: AtomicU64,
    pub host_exits: AtomicU64,
    pub exit_tsc: AtomicU64,
    pub exits_by_reason: [AtomicU64; EXIT_REASON_SLOTS],
    /// The guests' part of `exits_by_reason`.
    pub guest_exits_by_reason: [AtomicU64; EXIT_REASON_SLOTS],
    pub gdt: [u64; 16],
    pub tss: Tss,
    /// The last TLB-flush generation this CPU performed (see `hv::tlb`).
    pub flushed_gen: AtomicU64,
    /// Non-zero while a kick's NMI (`hv::tlb::kick`) is on its way here:
    /// the TSC when it was sent. At most one is in flight, so each kick NMI
    /// is matched to the flag (but see `tlb::KICK_RESEND`).
    pub kick_pending: AtomicU64,
    /// CPUs inside `hv::tlb::kick` for this CPU (see `tlb::stop_kicks`).
    pub kickers: AtomicU32,
    /// An NMI meant for the host arrived while the hypervisor ran.
    pub host_nmi_pending: AtomicU32,
    /// 1 while the host VM waits for SIPI here (it cannot touch memory).
    pub parked: AtomicU32,
    /// Emulated INIT/SIPI (`hv::ipi`): state and the SIPI's vector.
    pub sipi_state: AtomicU32,
    pub sipi_vector: AtomicU32,
    /// What the layer above keeps for the guest vCPU this CPU runs, if any
    /// (`hv::run::Running`); opaque here.
    pub guest: GuestSlot,
}

/// The slot of [`PerCpu::guest`]: what the layer above keeps for the guest
/// vCPU the CPU runs.
///
/// Rules: only the CPU that owns the area touches its slot, and only from
/// its exit and hypercall path, never from an NMI or exception handler
/// (which may interrupt that path while it holds a borrow). Within those
/// rules a borrow held while the slot is replaced is a bug of the exit
/// path, and the `RefCell` turns it into a panic rather than a dangling
/// reference.
pub struct GuestSlot(RefCell<Option<Box<dyn Any>>>);

impl GuestSlot {
    /// Whether a guest is running here.
    pub fn is_some(&self) -> bool {
        self.0.borrow().is_some()
    }

    /// Records the guest this CPU now runs.
    pub fn put(&self, g: Box<dyn Any>) {
        *self.0.borrow_mut() = Some(g);
    }

    /// Ends the record of the guest this CPU ran, and returns it.
    pub fn take(&self) -> Option<Box<dyn Any>> {
        self.0.borrow_mut().take()
    }

    /// The guest this CPU runs, if any and of type `T`. Holding the result
    /// across `put` or `take` panics.
    pub fn get<T: Any>(&self) -> Option<Ref<'_, T>> {
        Ref::filter_map(self.0.borrow(), |g| g.as_deref().and_then(|g| g.downcast_ref())).ok()
    }
}

pub const LAUNCH_NEXT_OFFSET: usize = 24;
const _: () = assert!(core::mem::offset_of!(PerCpu, fixup_rip) == FIXUP_OFFSET);
const _: () = assert!(core::mem::offset_of!(PerCpu, fault_vector) == FAULT_VECTOR_OFFSET);
const _: () = assert!(core::mem::offset_of!(PerCpu, launch_next) == LAUNCH_NEXT_OFFSET);

/// Layout of the 64 KiB per-CPU area.
pub mod area {
    pub const PERCPU: u64 = 0x0000;
    pub const IDT: u64 = 0x2000;
    pub const VMXON: u64 = 0x3000;
    pub const VMCS: u64 = 0x4000;
    pub const STACK_TOP: u64 = 0x10000;
}
const _: () = assert!(core::mem::size_of::<PerCpu>() as u64 <= area::IDT);
const _: () = assert!(area::STACK_TOP == crate::layout::PERCPU_SIZE);

/// The 64-bit TSS. See: SDM Vol. 3A, 8.7.
#[repr(C, packed(4))]
#[derive(Clone, Copy, Default)]
pub struct Tss {
    reserved0: u32,
    pub rsp: [u64; 3],
    reserved1: u64,
    pub ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    pub iomap_base: u16,
}
const _: () = assert!(core::mem::size_of::<Tss>() == 104);

/// GDT selectors, matching Linux's so that an IRET with Linux's selectors
/// works on either GDT.
pub const SEL_CODE: u16 = 0x10;
pub const SEL_DATA: u16 = 0x18;
pub const SEL_TSS: u16 = 0x40;

static PERCPU_BASE: AtomicU64 = AtomicU64::new(0);
static PERCPU_STRIDE: AtomicU64 = AtomicU64::new(0);

/// Records where the per-CPU areas are.
pub fn set_percpu_base(base: u64, stride: u64) {
    PERCPU_BASE.store(base, Ordering::Relaxed);
    PERCPU_STRIDE.store(stride, Ordering::Relaxed);
}

/// Address of CPU `index`'s per-CPU area.
pub fn percpu_area(index: usize) -> u64 {
    PERCPU_BASE.load(Ordering::Relaxed) + index as u64 * PERCPU_STRIDE.load(Ordering::Relaxed)
}

/// CPU `index`'s area, shared: any CPU may read its atomics.
pub fn percpu_of(index: usize) -> &'static PerCpu {
    // SAFETY: the area was initialised by `PerCpu::init` before any reader.
    unsafe { &*(percpu_area(index) as *const PerCpu) }
}

/// This CPU's per-CPU area (through GS), shared.
///
/// It is a shared reference on purpose: the exit path, an NMI taken in
/// root operation and the exception handler may each call this while an
/// interrupted caller still holds its result, and no `&mut PerCpu` may
/// exist alongside. Fields that change after set-up are atomics or the
/// [`GuestSlot`] (see its rules); the NMI and exception paths use only the
/// atomics and the fields fixed at set-up.
pub fn this_cpu() -> &'static PerCpu {
    let p: u64;
    // SAFETY: in root operation GS base points at this CPU's `PerCpu`.
    unsafe { core::arch::asm!("mov {}, gs:[0]", out(reg) p, options(nostack, readonly, preserves_flags)) };
    // SAFETY: the area was initialised by `PerCpu::init` before GS pointed
    // at it, and after that it is only ever borrowed shared.
    unsafe { &*(p as *const PerCpu) }
}

impl PerCpu {
    /// Prepares CPU `index`'s area: zeroed state, Linux's state `linux`,
    /// GDT, TSS and IDT. The only mutable borrow of the area is here; from
    /// then on it is shared (see [`PerCpu`]).
    ///
    /// # Safety
    /// Called once per CPU, by that CPU, before it uses the area and before
    /// it loads the area's IDT or points GS at it (so that no handler can
    /// reach the area meanwhile).
    pub unsafe fn init(index: usize, linux_id: u32, linux: SavedState) -> &'static PerCpu {
        let base = percpu_area(index);
        // SAFETY: the area is this CPU's, zeroed by the driver, and nothing
        // else can reach it yet (see the contract).
        let pc = unsafe { &mut *(base as *mut PerCpu) };
        // SAFETY: a field of the area, overwritten without dropping what
        // the zeroed memory holds, so that the slot is a well-formed empty
        // `RefCell` whatever the layout.
        unsafe { core::ptr::addr_of_mut!(pc.guest).write(GuestSlot(RefCell::new(None))) };
        pc.linux = linux;
        pc.self_ptr = base;
        pc.index = index as u32;
        pc.linux_id = linux_id;
        pc.apic_id = instr::cpuid(1, 0)[1] >> 24;
        pc.stack_top = base + area::STACK_TOP;
        pc.vmxon_pa = super::physmap::region_pa((base + area::VMXON) as *const u8);
        pc.vmcs_pa = super::physmap::region_pa((base + area::VMCS) as *const u8);
        pc.tss = Tss::default();
        pc.tss.iomap_base = core::mem::size_of::<Tss>() as u16;
        let tss_addr = &pc.tss as *const Tss as u64;
        pc.gdt = [0; 16];
        pc.gdt[2] = 0x00af_9b00_0000_ffff; // 64-bit code, DPL 0
        pc.gdt[3] = 0x00cf_9300_0000_ffff; // data, DPL 0
        let limit = core::mem::size_of::<Tss>() as u64 - 1;
        pc.gdt[8] = (limit & 0xffff)
            | ((tss_addr & 0xff_ffff) << 16)
            | (0x89u64 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((tss_addr >> 24) & 0xff) << 56);
        pc.gdt[9] = tss_addr >> 32;
        init_idt(base + area::IDT);
        pc
    }

    pub fn gdtr(&self) -> DescriptorTablePointer {
        DescriptorTablePointer { limit: (10 * 8 - 1) as u16, base: self.gdt.as_ptr() as u64 }
    }

    pub fn idtr(&self) -> DescriptorTablePointer {
        DescriptorTablePointer { limit: 256 * 16 - 1, base: self.self_ptr + area::IDT }
    }

    pub fn tss_base(&self) -> u64 {
        &self.tss as *const Tss as u64
    }

    /// Counts an exit.
    pub fn count_exit(&self, reason: u16, host: bool) {
        self.exits.fetch_add(1, Ordering::Relaxed);
        if host {
            self.host_exits.fetch_add(1, Ordering::Relaxed);
        }
        let slot = (reason as usize).min(EXIT_REASON_SLOTS - 1);
        self.exits_by_reason[slot].fetch_add(1, Ordering::Relaxed);
        if !host {
            self.guest_exits_by_reason[slot].fetch_add(1, Ordering::Relaxed);
        }
    }
}

extern "C" {
    /// 256 exception stubs, 16 bytes apart (`asm.rs`).
    static uxen_exception_stubs: u8;
}

fn init_idt(idt: u64) {
    // SAFETY: taking the address of an assembler symbol.
    let stubs = unsafe { &uxen_exception_stubs as *const u8 as u64 };
    for v in 0..256u64 {
        let handler = stubs + v * 16;
        // No IST: during set-up the task register is still Linux's, whose
        // IST stacks the hypervisor's page tables do not map.
        let ist = 0u64;
        let lo = (handler & 0xffff)
            | ((SEL_CODE as u64) << 16)
            | (ist << 32)
            | (0x8eu64 << 40)
            | (((handler >> 16) & 0xffff) << 48);
        let hi = handler >> 32;
        // SAFETY: the IDT page belongs to this CPU's area.
        unsafe {
            ((idt + v * 16) as *mut u64).write(lo);
            ((idt + v * 16 + 8) as *mut u64).write(hi);
        }
    }
}

/// What the exception stubs push.
#[repr(C)]
#[derive(Debug)]
pub struct ExceptionFrame {
    /// RAX..R15 in encoding order (RSP slot unused).
    pub gpr: [u64; 16],
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// What an NMI in root operation runs: the layer above's handler
/// (`hv::exits::nmi_in_root`), registered at set-up.
static NMI_HOOK: core::sync::atomic::AtomicPtr<()> = core::sync::atomic::AtomicPtr::new(core::ptr::null_mut());

/// Registers the handler of NMIs taken in root operation.
pub fn set_nmi_hook(f: fn()) {
    NMI_HOOK.store(f as *mut (), core::sync::atomic::Ordering::Release);
}

/// Called by the exception stubs in root operation.
#[no_mangle]
extern "sysv64" fn uxen_exception(f: &mut ExceptionFrame) {
    let pc = this_cpu();
    if f.vector == 2 {
        let hook = NMI_HOOK.load(core::sync::atomic::Ordering::Acquire);
        if !hook.is_null() {
            // SAFETY: only `set_nmi_hook` stores here, a `fn()`.
            unsafe { core::mem::transmute::<*mut (), fn()>(hook)() };
        }
        return;
    }
    // The fix-up address belongs to the instruction that faulted: it was
    // set by this CPU's own code just before, so relaxed ordering suffices.
    let fixup = pc.fixup_rip.load(Ordering::Relaxed);
    if fixup != 0 && matches!(f.vector, 6 | 13 | 14 | 17) {
        f.rip = fixup;
        pc.fault_vector.store(f.vector, Ordering::Relaxed);
        pc.fixup_rip.store(0, Ordering::Relaxed);
        return;
    }
    panic!(
        "exception {} error {:#x} at rip {:#x} rsp {:#x} cr2 {:#x} rax {:#x} rcx {:#x} rdx {:#x}",
        f.vector,
        f.error_code,
        f.rip,
        f.rsp,
        instr::read_cr2(),
        f.gpr[0],
        f.gpr[1],
        f.gpr[2]
    );
}
