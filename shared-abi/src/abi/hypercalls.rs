// SPDX-License-Identifier: GPL-2.0
//! Hypercalls from the host VM: their numbers and argument blocks, which
//! the matching ioctls carry too. See `docs/hypercalls.md`.

use super::*;

// ---------------------------------------------------------------------------
// Hypercalls from the host VM (VMCALL in ring 0 of the host).
//
// RAX = number, RDI = physical address of the argument block, RSI = its size
// in bytes. Returns RAX = status (>= 0 success, -errno failure, or
// HC_NEED_PAGES with RDX = the number of pages to donate before retrying).
// ---------------------------------------------------------------------------

/// Host hypercall numbers. See `docs/hypercalls.md`.
pub mod hc {
    /// Out: [`super::HvVersion`].
    pub const VERSION: u64 = 0x01;
    /// Out: [`super::HvStats`].
    pub const STATS: u64 = 0x02;
    /// Leave VMX on this CPU; called on every CPU. No argument block.
    pub const UNLOAD: u64 = 0x03;
    /// In: an array of [`super::MemRange`] (page aligned) to give to the
    /// hypervisor. They leave the host's EPT and are scrubbed.
    pub const DONATE: u64 = 0x04;
    /// Out: an array of `u64` physical addresses of 4 KiB pages given back,
    /// scrubbed. Returns how many were written.
    pub const RECLAIM: u64 = 0x05;
    /// Reads the IOMMU's fault records, logs and counts each fault. No
    /// argument block; returns how many faults were new.
    pub const POLL: u64 = 0x06;
    /// CPU hotplug: the calling CPU is going offline (RDI = 0) or is back
    /// online (RDI = 1). No argument block; returns how many host CPUs are
    /// offline now. While any is, the host's APIC writes are emulated
    /// (INIT and SIPI); otherwise they take no exit.
    pub const HOST_CPU: u64 = 0x07;
    /// In/out: [`super::VmCreate`].
    pub const VM_CREATE: u64 = 0x10;
    /// In: [`super::VmId`].
    pub const VM_DESTROY: u64 = 0x11;
    /// In: [`super::VmLoad`].
    pub const VM_LOAD: u64 = 0x12;
    /// In/out: [`super::VmRegs`].
    pub const VM_GET_REGS: u64 = 0x13;
    /// In: [`super::VmRegs`].
    pub const VM_SET_REGS: u64 = 0x14;
    /// In/out: [`super::VmRun`].
    pub const VM_RUN: u64 = 0x15;
    /// In/out: [`super::VmFork`].
    pub const VM_FORK: u64 = 0x16;
    /// Out: an array of [`super::VmInfo`]. Returns how many were written.
    pub const VM_LIST: u64 = 0x17;
    /// Sets the level of, or pulses, an interrupt line of a VM's IOAPIC
    /// ([`super::VmIrq`]).
    pub const VM_IRQ: u64 = 0x18;
    /// In/out: [`super::MergeScan`].
    pub const MERGE: u64 = 0x20;
    /// In/out: [`super::DebugTranslate`]. Only with `BOOT_FLAG_DEBUG`.
    pub const DEBUG_TRANSLATE: u64 = 0x30;
    /// In: [`super::DebugFaults`]: fault injection for tests. Only with
    /// `BOOT_FLAG_DEBUG`.
    pub const DEBUG_FAULTS: u64 = 0x31;
}

/// Status meaning "donate RDX pages, then retry the same call".
pub const HC_NEED_PAGES: i64 = -0x1000;

/// [`hc::VERSION`] output.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HvVersion {
    pub abi_revision: u32,
    pub num_cpus: u32,
    pub version: [u8; 16],
    /// `HV_FEATURE_*`.
    pub features: u64,
}
const _: () = assert_size(core::mem::size_of::<HvVersion>(), 32);

pub const HV_FEATURE_VMX: u64 = 1 << 0;
pub const HV_FEATURE_EPT: u64 = 1 << 1;
pub const HV_FEATURE_VPID: u64 = 1 << 2;
pub const HV_FEATURE_IOMMU: u64 = 1 << 3;
pub const HV_FEATURE_UNRESTRICTED: u64 = 1 << 4;

/// Most bytes of a VM name.
pub const VM_NAME_LEN: usize = 32;

/// [`hc::VM_CREATE`] and the `CREATE_VM` ioctl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VmCreate {
    /// Guest memory in bytes; a multiple of 2 MiB.
    pub mem_bytes: u64,
    pub vcpus: u32,
    /// `VM_FLAG_*`.
    pub flags: u32,
    pub name: [u8; VM_NAME_LEN],
    /// Out: the new VM's id.
    pub id: u32,
    /// The TSC rate in kHz that a [`VM_FLAG_LINUX`] guest is told (CPUID
    /// leaves 0x15 and 0x16). The ioctl takes 0 and the driver fills in the
    /// host kernel's own rate: the guest's TSC is the host's.
    pub tsc_khz: u32,
}
const _: () = assert_size(core::mem::size_of::<VmCreate>(), 56);

/// Largest guest, in bytes.
pub const VM_MAX_MEM: u64 = 4 << 30;
/// Guest memory granule.
pub const VM_MEM_ALIGN: u64 = 2 << 20;
/// Most vCPUs in a VM.
pub const VM_MAX_VCPUS: u32 = 8;
/// Most VMs at once.
pub const MAX_VMS: u32 = 1024;

/// [`hc::VM_IRQ`] and the `VM_IRQ` ioctl: drive input `gsi` of a
/// [`VM_FLAG_LINUX`] VM's IOAPIC.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VmIrq {
    pub vm: u32,
    /// The IOAPIC input (0 to [`IOAPIC_PINS`] - 1).
    pub gsi: u32,
    /// [`IRQ_LOW`], [`IRQ_HIGH`] or [`IRQ_PULSE`].
    pub level: u32,
    pub reserved0: u32,
}
const _: () = assert_size(core::mem::size_of::<VmIrq>(), 16);

/// [`VmIrq::level`]: the line goes low.
pub const IRQ_LOW: u32 = 0;
/// [`VmIrq::level`]: the line goes high.
pub const IRQ_HIGH: u32 = 1;
/// [`VmIrq::level`]: the line goes high and low again (an edge).
pub const IRQ_PULSE: u32 = 2;
/// Inputs of the emulated IOAPIC.
pub const IOAPIC_PINS: u32 = 24;

/// A VM id (VM ids start at 1; 0 means none).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VmId {
    pub id: u32,
    pub reserved0: u32,
}
const _: () = assert_size(core::mem::size_of::<VmId>(), 8);

/// [`hc::VM_LOAD`]: copy `len` bytes from host-physical `src` into guest
/// memory at `gpa`. `src..src+len` lies within one host page.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VmLoad {
    pub vm: u32,
    pub reserved0: u32,
    pub gpa: u64,
    pub src: u64,
    pub len: u64,
}
const _: () = assert_size(core::mem::size_of::<VmLoad>(), 32);

/// vCPU register file.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub rsp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}
const _: () = assert_size(core::mem::size_of::<Regs>(), 22 * 8);

/// [`hc::VM_GET_REGS`]/[`hc::VM_SET_REGS`] and the matching ioctls.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VmRegs {
    pub vm: u32,
    pub vcpu: u32,
    pub regs: Regs,
}
const _: () = assert_size(core::mem::size_of::<VmRegs>(), 8 + 22 * 8);

/// Kinds of [`ExitRecord`].
pub mod exit {
    /// Nothing; the record is unused.
    pub const NONE: u32 = 0;
    /// Port I/O: `port`, `size`, `is_write`, `data`. For a read, the VMM
    /// puts the value in `data` and the next RUN completes the instruction.
    pub const IO: u32 = 1;
    /// Access to guest-physical memory outside RAM: `addr`, `size`,
    /// `is_write`, `data`. Reads complete like port reads.
    pub const MMIO: u32 = 2;
    /// The guest halted with interrupts enabled and nothing to deliver;
    /// returned only when RUN was asked not to wait (`VMRUN_NO_WAIT`).
    pub const HLT: u32 = 3;
    /// The guest ended itself: `data` is its exit code.
    pub const GUEST_EXIT: u32 = 4;
    /// A guest hypercall addressed to the VMM: `hc_nr`, `hc_args`. The VMM
    /// puts the result in `hc_ret` for the next RUN.
    pub const HYPERCALL: u32 = 5;
    /// The VM is stopped: `reason` says why ([`super::stop`]).
    pub const SHUTDOWN: u32 = 6;
    /// RUN returned early because the host needs its CPU (a signal).
    pub const INTR: u32 = 7;
    /// Another vCPU of this VM may have been sent an interrupt while it
    /// sleeps in a halted RUN: the driver wakes halted vCPUs and goes on
    /// running this one. The VMM never sees it.
    pub const KICK: u32 = 8;
}

/// Why a VM stopped ([`exit::SHUTDOWN`]).
pub mod stop {
    pub const NONE: u32 = 0;
    pub const TRIPLE_FAULT: u32 = 1;
    /// A VMCALL with a number outside every defined range.
    pub const BAD_HYPERCALL: u32 = 2;
    /// HLT with interrupts disabled.
    pub const HLT_IRQS_OFF: u32 = 3;
    /// An instruction the hypervisor refuses to run for a guest.
    pub const BAD_INSTRUCTION: u32 = 4;
    /// The VM was destroyed while running.
    pub const DESTROYED: u32 = 5;
    /// Invalid guest state at VM entry.
    pub const ENTRY_FAILED: u32 = 6;
    /// The guest's memory could not be provided.
    pub const OUT_OF_MEMORY: u32 = 7;
    /// A Linux guest reset itself (`reboot`): a triple fault without the
    /// warm-reset flag ([`super::linux::RESET_FLAG_GPA`]).
    pub const REBOOT: u32 = 8;
    /// A Linux guest reset itself after a kernel panic: a triple fault with
    /// the warm-reset flag that `reboot=panic_warm` makes Linux set.
    pub const PANIC: u32 = 9;

    pub const fn name(reason: u32) -> &'static str {
        match reason {
            NONE => "none",
            TRIPLE_FAULT => "triple-fault",
            BAD_HYPERCALL => "bad-hypercall",
            HLT_IRQS_OFF => "hlt-with-interrupts-off",
            BAD_INSTRUCTION => "bad-instruction",
            DESTROYED => "destroyed",
            ENTRY_FAILED => "entry-failed",
            OUT_OF_MEMORY => "out-of-memory",
            REBOOT => "reboot",
            PANIC => "panic",
            _ => "unknown",
        }
    }
}

/// What RUN returns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitRecord {
    /// [`exit`] kind.
    pub kind: u32,
    /// [`stop`] reason for [`exit::SHUTDOWN`].
    pub reason: u32,
    pub port: u16,
    /// Access size in bytes: 1, 2, 4 or 8.
    pub size: u8,
    /// 1 for an OUT or a store.
    pub is_write: u8,
    pub reserved0: u32,
    /// Guest-physical address of an MMIO access or fault.
    pub addr: u64,
    /// Data of an access, or the guest's exit code.
    pub data: u64,
    pub hc_nr: u64,
    pub hc_args: [u64; 3],
    pub hc_ret: u64,
    /// Guest RIP at the exit.
    pub rip: u64,
    pub reserved: [u64; 4],
}
const _: () = assert_size(core::mem::size_of::<ExitRecord>(), 112);

/// Do not sleep in RUN when the guest halts; return [`exit::HLT`].
pub const VMRUN_NO_WAIT: u32 = 1 << 0;

/// [`hc::VM_RUN`] and the RUN ioctl. `exit` carries the completion of the
/// previous exit in, and the new exit out.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VmRun {
    pub vm: u32,
    pub vcpu: u32,
    pub flags: u32,
    pub reserved0: u32,
    /// Time slice in TSC cycles (0: the hypervisor's default).
    pub slice_tsc: u64,
    pub exit: ExitRecord,
    /// Out (a [`VM_FLAG_LINUX`] VM): how many bytes of `console` are
    /// valid. Bytes the guest wrote to COM1's transmit register while the
    /// UART was in plain polled transmission (no divisor latch, no
    /// loopback, no transmit interrupt) are kept by the hypervisor instead
    /// of exiting for each, and handed over with the next RUN that
    /// returns; the VMM writes them to its UART, in order, before it looks
    /// at `exit`.
    pub console_len: u32,
    pub reserved1: u32,
    pub console: [u8; CONSOLE_BATCH],
}
const _: () = assert_size(core::mem::size_of::<VmRun>(), 24 + 112 + 8 + CONSOLE_BATCH);

impl Default for VmRun {
    fn default() -> Self {
        VmRun {
            vm: 0,
            vcpu: 0,
            flags: 0,
            reserved0: 0,
            slice_tsc: 0,
            exit: ExitRecord::default(),
            console_len: 0,
            reserved1: 0,
            console: [0; CONSOLE_BATCH],
        }
    }
}

/// Most console bytes one RUN hands over ([`VmRun::console`]).
pub const CONSOLE_BATCH: usize = 256;

/// [`hc::VM_FORK`] and the FORK ioctl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VmFork {
    pub vm: u32,
    /// Out: the child's id.
    pub child: u32,
    /// `FORK_*` flags.
    pub flags: u32,
    pub reserved0: u32,
    /// Out: the hypervisor's cost of the fork, in TSC ticks (taking the
    /// vCPU state, sharing or copying the memory, creating the child).
    pub tsc: u64,
}
const _: () = assert_size(core::mem::size_of::<VmFork>(), 24);

/// [`VmFork::flags`]: copy every frame now instead of sharing it
/// copy-on-write (the baseline of the fork benchmark).
pub const FORK_COPY: u32 = 1;

/// VM states in [`VmInfo`].
pub mod vm_state {
    pub const CREATED: u32 = 1;
    pub const RUNNING: u32 = 2;
    pub const PAUSED: u32 = 3;
    pub const EXITED: u32 = 4;
    pub const STOPPED: u32 = 5;
    /// A Linux guest rebooted (`stop::REBOOT`).
    pub const REBOOTED: u32 = 6;
    /// A Linux guest's kernel panicked (`stop::PANIC`).
    pub const PANICKED: u32 = 7;

    pub const fn name(state: u32) -> &'static str {
        match state {
            CREATED => "created",
            RUNNING => "running",
            PAUSED => "paused",
            EXITED => "exited",
            STOPPED => "stopped",
            REBOOTED => "rebooted",
            PANICKED => "panicked",
            _ => "unknown",
        }
    }
}

/// One VM in [`hc::VM_LIST`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VmInfo {
    pub id: u32,
    /// Id of the VM it was forked from, or 0.
    pub parent: u32,
    /// [`vm_state`].
    pub state: u32,
    pub vcpus: u32,
    pub mem_bytes: u64,
    /// Frames only this VM maps.
    pub frames_private: u64,
    /// Frames this VM maps that are shared with other mappings.
    pub frames_shared: u64,
    pub exit_code: u64,
    /// [`stop`] reason when `state` is STOPPED.
    pub stop_reason: u32,
    pub reserved0: u32,
    pub name: [u8; VM_NAME_LEN],
}
const _: () = assert_size(core::mem::size_of::<VmInfo>(), 88);

/// [`hc::MERGE`] and the MERGE ioctl: one re-merging pass.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MergeScan {
    /// The VM whose pages to fold (onto each other and onto frames already
    /// shared); 0: every VM, across VMs.
    pub vm: u32,
    /// `MERGE_*` flags. The ioctl takes 0.
    pub flags: u32,
    /// Out: pages examined, pages folded onto an identical frame, all-zero
    /// pages unmapped, frames given back to the pool.
    pub scanned: u64,
    pub merged: u64,
    pub zero: u64,
    pub frames_freed: u64,
    /// Out: the hypervisor's time for the pass, in TSC ticks.
    pub tsc: u64,
    /// In (hypercall): most pages this call examines, 0 for the default
    /// chunk ([`MERGE_CHUNK`]); larger values are cut to it. The ioctl
    /// takes 0.
    pub max_pages: u32,
    /// Out: chunks of this pass abandoned because a TLB shootdown was not
    /// acknowledged (every page left as it was). The hypercall returns 2
    /// for such a chunk; the pass stays where it was and may go on. The
    /// ioctl ends the pass at the first.
    pub aborted: u32,
}
const _: () = assert_size(core::mem::size_of::<MergeScan>(), 56);

/// Most pages one MERGE hypercall examines.
pub const MERGE_CHUNK: u32 = 2048;

/// [`MergeScan::flags`] of the hypercall: go on with the pass that the
/// previous MERGE started (the hypercall works in bounded chunks; it
/// returns 1 while there is more to do, 0 when the pass is over).
pub const MERGE_CONTINUE: u32 = 1;
/// [`MergeScan::flags`] of the hypercall: end the running pass (if any)
/// without another chunk, dropping its index; returns 0.
pub const MERGE_END: u32 = 2;

/// [`hc::DEBUG_FAULTS`]: faults the hypervisor injects into itself, for
/// tests (the driver's `debug_drop_shootdown_acks` parameter sets them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DebugFaults {
    /// `DEBUG_FAULT_*` bits; the others must be 0.
    pub faults: u32,
    pub reserved0: u32,
}
const _: () = assert_size(core::mem::size_of::<DebugFaults>(), 8);

/// Every CPU ignores TLB shootdown requests (no flush, no acknowledgement),
/// so every shootdown times out and its caller backs off.
pub const DEBUG_FAULT_DROP_SHOOTDOWN_ACKS: u32 = 1 << 0;

/// [`hc::DEBUG_TRANSLATE`]: the host frame behind a guest page (tests).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DebugTranslate {
    pub vm: u32,
    pub reserved0: u32,
    pub gpa: u64,
    /// Out.
    pub hpa: u64,
}
const _: () = assert_size(core::mem::size_of::<DebugTranslate>(), 24);

/// Most live children a VM may have, however forked (the fork-bomb limit):
/// a further fork fails with EAGAIN until one is destroyed.
pub const VM_MAX_CHILDREN: u32 = 64;
