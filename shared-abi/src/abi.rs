// SPDX-License-Identifier: GPL-2.0
//! uxen-rs wire formats.
//!
//! Rules (see `docs/`): `#[repr(C)]`, fixed-width integers, explicit
//! `reserved` fields, no `bool`/`Option`/Rust enums on the wire, a const size
//! assert for every structure, and [`ABI_REVISION`] bumped on any change.
//!
//! This file is also compiled as a plain module inside the kernel module, so
//! it holds no crate-level attributes and no dependencies.
#![allow(dead_code, unreachable_pub)]

/// Bumped on every change to anything in this file.
pub const ABI_REVISION: u32 = 5;

/// Version of the uxen-rs release, NUL-padded.
pub const VERSION: [u8; 16] = *b"0.1.0\0\0\0\0\0\0\0\0\0\0\0";

/// Most CPUs the hypervisor manages.
pub const MAX_CPUS: usize = 64;

/// Slots in the per-CPU exit counters; basic exit reasons at or above this
/// are counted in the last slot.
pub const EXIT_REASON_SLOTS: usize = 80;

const fn assert_size(actual: usize, expected: usize) {
    assert!(actual == expected, "shared-abi: structure size changed");
}

/// Turns a NUL-padded byte array into the text before the first NUL.
pub fn cstr_bytes(b: &[u8]) -> &[u8] {
    let mut n = 0;
    while n < b.len() && b[n] != 0 {
        n += 1;
    }
    &b[..n]
}

/// Copies `s` into a NUL-padded array, truncating (the last byte stays NUL).
pub const fn padded<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let mut i = 0;
    while i < s.len() && i + 1 < N {
        out[i] = s[i];
        i += 1;
    }
    out
}

// ---------------------------------------------------------------------------
// Linux errno values. Hypercalls and ioctls report failures as `-errno`.
// ---------------------------------------------------------------------------

/// Errno numbers used on every boundary (Linux x86-64 values).
pub mod errno {
    pub const EPERM: i64 = 1;
    pub const ENOENT: i64 = 2;
    pub const ESRCH: i64 = 3;
    pub const EINTR: i64 = 4;
    pub const EIO: i64 = 5;
    pub const E2BIG: i64 = 7;
    pub const ENOEXEC: i64 = 8;
    pub const EBADF: i64 = 9;
    pub const EAGAIN: i64 = 11;
    pub const ENOMEM: i64 = 12;
    pub const EACCES: i64 = 13;
    pub const EFAULT: i64 = 14;
    pub const EBUSY: i64 = 16;
    pub const EEXIST: i64 = 17;
    pub const ENODEV: i64 = 19;
    pub const EINVAL: i64 = 22;
    pub const ENOSPC: i64 = 28;
    pub const ENOTTY: i64 = 25;
    pub const ERANGE: i64 = 34;
    pub const ENOSYS: i64 = 38;
    pub const EOVERFLOW: i64 = 75;
    pub const EOPNOTSUPP: i64 = 95;
    pub const ENOTCONN: i64 = 107;
    pub const ESHUTDOWN: i64 = 108;
    pub const ETIMEDOUT: i64 = 110;
    pub const EALREADY: i64 = 114;
    pub const ECANCELED: i64 = 125;
}

// ---------------------------------------------------------------------------
// The hypervisor image header.
// ---------------------------------------------------------------------------

/// First bytes of every hypervisor image.
pub const IMAGE_MAGIC: [u8; 8] = *b"uXenRsHv";

/// At offset 0 of the flat image (and of the `.uxen_header` section of
/// `hypervisor.elf`). The build fills the layout fields after linking.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ImageHeader {
    /// [`IMAGE_MAGIC`].
    pub magic: [u8; 8],
    /// [`ABI_REVISION`] the image was built against.
    pub abi_revision: u32,
    /// `size_of::<ImageHeader>()`.
    pub header_size: u32,
    /// Release version, NUL-padded.
    pub version: [u8; 16],
    /// Bytes of the flat image file (what the driver copies).
    pub file_size: u64,
    /// Bytes the image occupies once loaded, `.bss` included; page aligned.
    pub mem_size: u64,
    /// Offset of the per-CPU entry point ([`EntryFn`]).
    pub entry_offset: u64,
    /// Offset and count of the `Elf64_Rela` records to apply at load time.
    pub rela_offset: u64,
    pub rela_count: u64,
    /// Bytes of heap the image needs, beyond `mem_size`.
    pub heap_size: u64,
    /// Bytes of per-CPU area (stacks, VMX regions) for each CPU.
    pub percpu_size: u64,
    /// Most CPUs the image supports.
    pub max_cpus: u32,
    pub reserved0: u32,
    /// Offset of the direct-call entry point ([`CallFn`]), used when the
    /// image runs without VMX (`BOOT_FLAG_IOMMU_ONLY`); 0 if it has none.
    pub call_offset: u64,
    pub reserved: [u64; 3],
}
const _: () = assert_size(core::mem::size_of::<ImageHeader>(), 128);

/// `Elf64_Rela.r_info` type of the only relocation the loader applies.
pub const R_X86_64_RELATIVE: u64 = 8;

/// One `Elf64_Rela` record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ElfRela {
    pub offset: u64,
    pub info: u64,
    pub addend: i64,
}
const _: () = assert_size(core::mem::size_of::<ElfRela>(), 24);

/// Why a header is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    TooShort,
    BadMagic,
    AbiMismatch,
    BadHeaderSize,
    BadLayout,
}

impl HeaderError {
    pub const fn message(self) -> &'static str {
        match self {
            HeaderError::TooShort => "image shorter than its header",
            HeaderError::BadMagic => "bad image signature",
            HeaderError::AbiMismatch => "image ABI revision differs from the driver's",
            HeaderError::BadHeaderSize => "image header size differs from the driver's",
            HeaderError::BadLayout => "image layout fields are inconsistent",
        }
    }
}

impl ImageHeader {
    /// Reads and checks the header at the start of `image`. All checks the
    /// driver relies on before it copies, relocates or calls the image.
    pub fn parse(image: &[u8]) -> Result<ImageHeader, HeaderError> {
        let size = core::mem::size_of::<ImageHeader>();
        if image.len() < size {
            return Err(HeaderError::TooShort);
        }
        // SAFETY: `image` holds at least `size` bytes and `ImageHeader` is
        // plain old data, valid for any bit pattern; the read is unaligned.
        let h: ImageHeader = unsafe { core::ptr::read_unaligned(image.as_ptr().cast()) };
        if h.magic != IMAGE_MAGIC {
            return Err(HeaderError::BadMagic);
        }
        if h.abi_revision != ABI_REVISION {
            return Err(HeaderError::AbiMismatch);
        }
        if h.header_size as usize != size {
            return Err(HeaderError::BadHeaderSize);
        }
        let rela_bytes = h.rela_count.checked_mul(core::mem::size_of::<ElfRela>() as u64);
        let rela_end = rela_bytes.and_then(|b| b.checked_add(h.rela_offset));
        let ok = h.file_size == image.len() as u64
            && h.mem_size >= h.file_size
            && h.mem_size % 4096 == 0
            && h.mem_size <= 64 << 20
            && h.entry_offset >= size as u64
            && h.entry_offset < h.file_size
            && (h.call_offset == 0 || (h.call_offset >= size as u64 && h.call_offset < h.file_size))
            && matches!(rela_end, Some(e) if e <= h.file_size)
            && h.rela_offset % 8 == 0
            && h.heap_size % 4096 == 0
            && h.heap_size <= 256 << 20
            && h.percpu_size % 4096 == 0
            && h.percpu_size <= 1 << 20
            && h.max_cpus >= 1
            && h.max_cpus as usize <= MAX_CPUS;
        if !ok {
            return Err(HeaderError::BadLayout);
        }
        Ok(h)
    }
}

// ---------------------------------------------------------------------------
// Boot info: what the driver hands the image on entry.
// ---------------------------------------------------------------------------

/// A physical address range.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemRange {
    pub base: u64,
    pub size: u64,
}
const _: () = assert_size(core::mem::size_of::<MemRange>(), 16);

/// Most RAM ranges in [`BootInfo`].
pub const MAX_RAM_RANGES: usize = 32;

/// Refuse to start without DMA protection.
pub const BOOT_FLAG_REQUIRE_IOMMU: u64 = 1 << 0;
/// Allow the debug hypercalls that reveal guest frame addresses (tests).
pub const BOOT_FLAG_DEBUG: u64 = 1 << 1;
/// Start only the VT-d part, without VMX (`iommu_only=1`; for testing DMA
/// protection on machines without VT-x). The host is not demoted.
pub const BOOT_FLAG_IOMMU_ONLY: u64 = 1 << 2;
/// Also write the log to I/O port 0xe9 (the emulators' debug console).
pub const BOOT_FLAG_LOG_E9: u64 = 1 << 3;

/// One CPU as the driver sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BootCpu {
    /// Linux's CPU number.
    pub linux_id: u32,
    /// Its local APIC ID.
    pub apic_id: u32,
}
const _: () = assert_size(core::mem::size_of::<BootCpu>(), 8);

/// Handed to every CPU's entry. See `docs/bootstrap.md`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    pub abi_revision: u32,
    /// CPUs that enter; all of them must.
    pub num_cpus: u32,
    /// `BOOT_FLAG_*`.
    pub flags: u64,
    /// The hypervisor region: physical base, the virtual address the driver
    /// mapped it at, and its size. The image is loaded at its start.
    pub region_phys: u64,
    pub region_virt: u64,
    pub region_size: u64,
    /// Virtual address of physical address 0 in the host's direct map, which
    /// maps every RAM page at `direct_map_base + phys`.
    pub direct_map_base: u64,
    /// ACPI RSDP (module parameter `rsdp`), or 0. It takes precedence over
    /// `dmar_phys`.
    pub rsdp_phys: u64,
    /// A copy of the ACPI DMAR table that the host kernel found through its
    /// own ACPI (UEFI and BIOS machines alike), in host memory that stays
    /// valid until the entry returns on every CPU, and its length in bytes;
    /// both 0 when the kernel has none. With neither this nor `rsdp_phys`,
    /// the hypervisor searches the BIOS areas for the RSDP.
    pub dmar_phys: u64,
    pub dmar_len: u64,
    /// The driver's trampoline page: its virtual address (mapped at the same
    /// address in the host's and the hypervisor's page tables), its physical
    /// address, and the address of its return routine (see
    /// [`ReturnState`]).
    pub tramp_virt: u64,
    pub tramp_phys: u64,
    pub tramp_return: u64,
    /// The log ring ([`LogRing`]), in host memory.
    pub log_phys: u64,
    pub log_size: u64,
    /// Fault injection: the index of a CPU that must fail its entry, or -1.
    pub fail_cpu: i32,
    pub num_ram: u32,
    /// System RAM, sorted, not overlapping.
    pub ram: [MemRange; MAX_RAM_RANGES],
    /// Entering CPUs, indexed by the `cpu_index` given to the entry.
    pub cpus: [BootCpu; MAX_CPUS],
}
const _: () = assert_size(core::mem::size_of::<BootInfo>(), 120 + 16 * MAX_RAM_RANGES + 8 * MAX_CPUS);
const _: () = assert!(core::mem::size_of::<BootInfo>() <= 4096);

/// The image entry, called by the driver's trampoline on every CPU at once,
/// with interrupts off, on the hypervisor's boot page tables and on this
/// CPU's hypervisor stack.
///
/// On success it does not return: the CPU continues as the host VM at
/// `resume_rip` with `resume_rsp` and CR3 `linux_cr3`, every other register
/// unspecified (the trampoline restores what it saved). On failure it returns
/// `-errno` normally and the trampoline switches back to `linux_cr3`.
pub type EntryFn = unsafe extern "sysv64" fn(
    cpu_index: u32,
    info: *const BootInfo,
    resume_rip: u64,
    resume_rsp: u64,
    linux_cr3: u64,
) -> i64;

/// What a direct call returns: RAX and RDX, as a VMCALL does.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallResult {
    /// `>= 0` success, `-errno` failure, or [`HC_NEED_PAGES`].
    pub status: i64,
    /// With [`HC_NEED_PAGES`]: the pages to donate before retrying.
    pub aux: u64,
}
const _: () = assert_size(core::mem::size_of::<CallResult>(), 16);

/// The direct-call entry (`ImageHeader::call_offset`). Without VMX there
/// is no VMCALL: the driver calls the image through its trampoline instead,
/// with interrupts off, on the boot page tables and on this CPU's
/// hypervisor stack, and gets the hypercall's result back (a 16-byte
/// structure, so in RAX:RDX). Only the hypercalls that need no VMX are
/// served; see `docs/vtd.md`.
pub type CallFn = unsafe extern "sysv64" fn(cpu_index: u32, nr: u64, arg: u64, len: u64) -> CallResult;

/// Where the parts of the hypervisor region lie, as offsets from its start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionLayout {
    /// The [`BootInfo`] page.
    pub boot_info: u64,
    pub heap_start: u64,
    pub heap_end: u64,
    pub percpu_start: u64,
    pub size: u64,
}

impl ImageHeader {
    /// The smallest region for `ncpus` CPUs.
    pub const fn region_min(&self, ncpus: u64) -> u64 {
        self.mem_size + 4096 + self.heap_size + self.percpu_size * ncpus
    }

    /// The layout of a region of `size` bytes for `ncpus` CPUs: the image,
    /// the boot-info page, the heap (all that is left), then the per-CPU
    /// areas.
    pub const fn layout(&self, size: u64, ncpus: u64) -> Option<RegionLayout> {
        if size < self.region_min(ncpus) || size % 4096 != 0 {
            return None;
        }
        let percpu_start = size - self.percpu_size * ncpus;
        Some(RegionLayout {
            boot_info: self.mem_size,
            heap_start: self.mem_size + 4096,
            heap_end: percpu_start,
            percpu_start,
            size,
        })
    }

    /// Offset of CPU `index`'s per-CPU area.
    pub const fn percpu_offset(&self, layout: &RegionLayout, index: u64) -> u64 {
        layout.percpu_start + index * self.percpu_size
    }

    /// Offset of the top of CPU `index`'s hypervisor stack: the end of its
    /// per-CPU area.
    pub const fn stack_top(&self, layout: &RegionLayout, index: u64) -> u64 {
        self.percpu_offset(layout, index) + self.percpu_size
    }
}

/// What the driver's trampoline return routine (`BootInfo::tramp_return`,
/// called with RDI pointing here, on the hypervisor's page tables, after
/// VMXOFF) loads to resume the host natively: CR3 first, then the descriptor
/// tables, TR, the data segments, FS/GS bases, CR0/CR4, the GPRs, RFLAGS,
/// and finally a jump to `rip` on `rsp`. It must be readable through the
/// host's direct map.
///
/// `ltr` writes the busy bit into the TSS descriptor, and the host's GDT may
/// be mapped read-only (Linux's fixmap GDT): TR is loaded with `gdtr_rw`, a
/// writable alias of the same GDT, before `gdtr` is loaded for good.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ReturnState {
    /// GDTR and IDTR images: limit in the first 2 bytes, base in the next 8.
    pub gdtr: [u8; 16],
    pub gdtr_rw: [u8; 16],
    pub idtr: [u8; 16],
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub tr: u16,
    pub ds: u16,
    pub es: u16,
    pub ss: u16,
    pub fs: u16,
    pub gs: u16,
    pub reserved0: u32,
    pub fs_base: u64,
    pub gs_base: u64,
    pub rsp: u64,
    pub rip: u64,
    pub rflags: u64,
    /// RAX..R15 in encoding order (the RSP slot is ignored).
    pub gpr: [u64; 16],
}
const _: () = assert_size(core::mem::size_of::<ReturnState>(), 128 + 128);

// ---------------------------------------------------------------------------
// Log ring: written by the hypervisor, drained into dmesg by the driver.
// ---------------------------------------------------------------------------

pub const LOG_MAGIC: u32 = 0x474f_4c55; // "ULOG"

/// Header of the log ring; `size` bytes of text follow it. The writer only
/// ever advances `head`, a byte count since the start; the text of byte `n`
/// lives at `n % size`. A reader keeps its own position and detects loss when
/// `head` moves more than `size` past it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LogRing {
    pub magic: u32,
    pub size: u32,
    pub head: u64,
}
const _: () = assert_size(core::mem::size_of::<LogRing>(), 16);

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
    /// ([`VmIrq`]).
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

/// Per-CPU counters.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CpuStats {
    /// Linux's CPU number.
    pub cpu_id: u32,
    pub apic_id: u32,
    /// 1 while the CPU runs under the hypervisor.
    pub virtualized: u32,
    pub reserved0: u32,
    /// All VM exits on this CPU, host VM and guests.
    pub exits: u64,
    /// Exits of the host VM alone.
    pub host_exits: u64,
    /// Emulated-TSC cycles spent in the hypervisor handling exits.
    pub exit_tsc: u64,
    /// Exits by basic exit reason (SDM Vol. 3D, Appendix C), host VM and
    /// guests; names in `exit_reason`.
    pub exits_by_reason: [u64; EXIT_REASON_SLOTS],
    /// The guests' share of `exits_by_reason` (the host VM's is the rest).
    pub guest_exits_by_reason: [u64; EXIT_REASON_SLOTS],
}
const _: () = assert_size(core::mem::size_of::<CpuStats>(), 40 + 16 * EXIT_REASON_SLOTS);

/// [`hc::STATS`] output.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HvStats {
    pub abi_revision: u32,
    pub num_cpus: u32,
    /// The hypervisor region (physical).
    pub hv_region_base: u64,
    pub hv_region_size: u64,
    /// Host accesses to protected memory that were neutralised.
    pub blocked_host_reads: u64,
    pub blocked_host_writes: u64,
    /// Guest-physical address of the last one.
    pub last_blocked_gpa: u64,
    /// DMA remapping: 1 when on.
    pub iommu_enabled: u32,
    pub iommu_units: u32,
    pub iommu_faults: u64,
    pub iommu_last_fault_source: u64,
    pub iommu_last_fault_addr: u64,
    /// The frame pool donated by the host.
    pub pool_frames_total: u64,
    pub pool_frames_free: u64,
    /// Frames referenced by more than one mapping (copy-on-write).
    pub frames_shared: u64,
    pub cow_copies: u64,
    pub vms: u32,
    pub reserved0: u32,
    /// Re-merging totals.
    pub merge_scanned: u64,
    pub merge_merged: u64,
    pub merge_zero: u64,
    /// Host EPT leaf entries by page size: 1 GiB, 2 MiB, 4 KiB.
    pub host_ept_1g: u64,
    pub host_ept_2m: u64,
    pub host_ept_4k: u64,
    /// 1 while the hypervisor's code and read-only data still hash to what
    /// they did at start-up.
    pub image_intact: u32,
    pub reserved0b: u32,
    /// The hypervisor's own heap (page tables of the host EPT, the pool's
    /// bookkeeping, VM records), in bytes.
    pub heap_bytes_total: u64,
    pub heap_bytes_free: u64,
    /// Re-merging passes completed.
    pub merge_passes: u64,
    /// Merge chunks abandoned, every page left as it was, because a TLB
    /// shootdown was not acknowledged in time.
    pub merge_aborted: u64,
    /// Guest mappings beyond the first of each frame: the pages that
    /// sharing (merges and forks) saves right now. References the merge
    /// index itself holds are not counted.
    pub merge_pages_shared_now: u64,
    /// Frames the merge index holds (during a pass, and its stable part
    /// between passes), and the hypervisor heap bytes that index takes
    /// (bounded: `docs/design.md`).
    pub merge_indexed: u64,
    pub merge_index_heap_bytes: u64,
    /// TLB shootdowns that were not acknowledged in time (every one of them
    /// undone or kept back by its caller), and the EPT tables and frames
    /// still waiting for a later shootdown to be freed.
    pub shootdowns_unacked: u64,
    pub shootdown_deferred: u64,
    /// TSC ticks the hypervisor spent in merge chunks, over every pass.
    pub merge_tsc: u64,
    /// Index entries whose frames are merged (kept between passes), the
    /// pool frames the index's table takes, and pages passes skipped,
    /// unread, as mapped onto such a frame already.
    pub merge_stable: u64,
    pub merge_index_frames: u64,
    pub merge_skipped: u64,
    pub cpus: [CpuStats; MAX_CPUS],
}
const _: () = assert_size(
    core::mem::size_of::<HvStats>(),
    168 + 24 + 64 + 24 + MAX_CPUS * core::mem::size_of::<CpuStats>(),
);

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

/// [`VmCreate::flags`]: the VM is a PC for a Linux guest
/// (`docs/guest-abi.md`, part 2): a local x2APIC per vCPU and an IOAPIC
/// emulated in the hypervisor, Linux's CPUID and MSR policy, the 64-bit boot
/// protocol's entry state, and port I/O outside the COM1 UART answered by
/// the hypervisor.
pub const VM_FLAG_LINUX: u32 = 1 << 0;

/// [`VmCreate::flags`], only with [`VM_FLAG_LINUX`]: the VM has a VM
/// generation ID (Microsoft's "Virtual Machine Generation ID", which
/// Linux's `vmgenid` driver reads), a 16-byte buffer at
/// [`linux::VMGENID_GPA`] that the VMM's ACPI tables describe. At every
/// fork the hypervisor writes a new ID into the parent's and the child's
/// own copy of it, and pulses IOAPIC input [`linux::VMGENID_GSI`] of each,
/// the interrupt of the ACPI Generic Event Device that notifies the
/// driver (`docs/guest-abi.md`, part 2).
pub const VM_FLAG_VMGENID: u32 = 1 << 1;

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

/// The `LOAD` ioctl: copy user bytes at `data` into guest memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IocLoad {
    pub gpa: u64,
    pub data: u64,
    pub len: u64,
}
const _: () = assert_size(core::mem::size_of::<IocLoad>(), 24);

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

/// The DEBUG_POOL ioctl: move pages between the host and the hypervisor's
/// frame pool on request, so that tests can aim device DMA at a donated
/// page (tests; module parameter `debug=1`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DebugPool {
    /// [`DEBUG_POOL_DONATE`] or [`DEBUG_POOL_RECLAIM`].
    pub op: u32,
    /// In: pages to donate (1 to 512). Out: pages donated or reclaimed.
    pub pages: u32,
    /// Out, after a donation: the physical address of the first donated
    /// page.
    pub base: u64,
}
const _: () = assert_size(core::mem::size_of::<DebugPool>(), 16);

/// [`DebugPool::op`]: donate `pages` pages as the driver does when the
/// hypervisor asks for them (2 MiB blocks where it can).
pub const DEBUG_POOL_DONATE: u32 = 1;
/// [`DebugPool::op`]: take every free pool frame back.
pub const DEBUG_POOL_RECLAIM: u32 = 2;

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

// ---------------------------------------------------------------------------
// ioctls on /dev/uxen and on VM descriptors. See `docs/ioctl.md`.
// ---------------------------------------------------------------------------

/// The ioctl type byte.
pub const IOC_TYPE: u32 = b'U' as u32;

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// Linux's `_IOC(dir, type, nr, size)`.
pub const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32 & 0x3fff) << 16) | (IOC_TYPE << 8) | nr
}

/// The driver's and the image's identity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IocVersion {
    pub driver_version: [u8; 16],
    pub driver_abi: u32,
    pub image_abi: u32,
    pub image_version: [u8; 16],
    /// 1 while the hypervisor runs (the host is demoted).
    pub hv_active: u32,
    pub num_cpus: u32,
    /// `HV_FEATURE_*` reported by the running hypervisor.
    pub hv_features: u64,
}
const _: () = assert_size(core::mem::size_of::<IocVersion>(), 56);

/// A user buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IocBuf {
    pub ptr: u64,
    pub len: u64,
}
const _: () = assert_size(core::mem::size_of::<IocBuf>(), 16);

/// ioctl numbers.
pub mod ioctl {
    use super::*;
    use core::mem::size_of;

    /// `/dev/uxen`: out [`IocVersion`].
    pub const VERSION: u32 = ioc(IOC_READ, 0x00, size_of::<IocVersion>());
    /// `/dev/uxen`: in [`IocBuf`] for an [`HvStats`]. Returns bytes written.
    pub const STATS: u32 = ioc(IOC_WRITE, 0x01, size_of::<IocBuf>());
    /// `/dev/uxen`: in/out [`VmCreate`]. Returns a new VM descriptor.
    pub const CREATE_VM: u32 = ioc(IOC_READ | IOC_WRITE, 0x02, size_of::<VmCreate>());
    /// `/dev/uxen`: in [`IocBuf`] for an array of [`VmInfo`]. Returns how many.
    pub const LIST: u32 = ioc(IOC_WRITE, 0x03, size_of::<IocBuf>());
    /// `/dev/uxen`: in [`VmId`]. Destroys any VM.
    pub const DESTROY: u32 = ioc(IOC_WRITE, 0x04, size_of::<VmId>());
    /// `/dev/uxen`: in/out [`MergeScan`].
    pub const MERGE: u32 = ioc(IOC_READ | IOC_WRITE, 0x05, size_of::<MergeScan>());
    /// `/dev/uxen`: in/out [`DebugTranslate`] (module parameter `debug=1`).
    pub const DEBUG_TRANSLATE: u32 = ioc(IOC_READ | IOC_WRITE, 0x06, size_of::<DebugTranslate>());
    /// In/out: [`DebugPool`] (module parameter `debug=1`; tests).
    pub const DEBUG_POOL: u32 = ioc(IOC_READ | IOC_WRITE, 0x07, size_of::<DebugPool>());

    /// VM descriptor: in [`IocLoad`].
    pub const VM_LOAD: u32 = ioc(IOC_WRITE, 0x10, size_of::<IocLoad>());
    /// VM descriptor: in/out [`VmRegs`] (`vm` is ignored).
    pub const VM_GET_REGS: u32 = ioc(IOC_READ | IOC_WRITE, 0x11, size_of::<VmRegs>());
    /// VM descriptor: in [`VmRegs`] (`vm` is ignored).
    pub const VM_SET_REGS: u32 = ioc(IOC_WRITE, 0x12, size_of::<VmRegs>());
    /// VM descriptor: in/out [`VmRun`] (`vm` is ignored).
    pub const VM_RUN: u32 = ioc(IOC_READ | IOC_WRITE, 0x13, size_of::<VmRun>());
    /// VM descriptor: in/out [`VmFork`]. Returns the child's descriptor.
    pub const VM_FORK: u32 = ioc(IOC_READ | IOC_WRITE, 0x14, size_of::<VmFork>());
    /// VM descriptor: out [`VmId`].
    pub const VM_ID: u32 = ioc(IOC_READ, 0x15, size_of::<VmId>());
    /// VM descriptor: in [`VmIrq`] (`vm` is ignored).
    pub const VM_IRQ: u32 = ioc(IOC_WRITE, 0x16, size_of::<VmIrq>());
}

// ---------------------------------------------------------------------------
// Guest boot contract and guest hypercalls. See `docs/guest-abi.md`.
// ---------------------------------------------------------------------------

/// Guest-physical layout set up by the VMM before the first RUN.
pub mod guest {
    /// The boot GDT: null, 64-bit code (0x08), data (0x10).
    pub const GDT_GPA: u64 = 0x1000;
    /// PML4; identity-maps guest memory with 2 MiB pages.
    pub const PML4_GPA: u64 = 0x2000;
    pub const PDPT_GPA: u64 = 0x3000;
    /// First of up to four page directories.
    pub const PD_GPA: u64 = 0x4000;
    /// The guest's command line (`uxenctl run --cmdline`), NUL-terminated;
    /// RDX points here at entry.
    pub const CMDLINE_GPA: u64 = 0x8000;
    /// Longest command line, without its NUL.
    pub const CMDLINE_MAX: usize = 4095;
    /// Images load at or above this address.
    pub const IMAGE_MIN_GPA: u64 = 0x10_0000;
    pub const CODE_SELECTOR: u16 = 0x08;
    pub const DATA_SELECTOR: u16 = 0x10;
    /// The console UART (16550).
    pub const UART_PORT: u16 = 0x3f8;
    /// A write of `v` ends the VM with exit code `v`.
    pub const EXIT_PORT: u16 = 0xf4;
}

/// The PC that a [`VM_FLAG_LINUX`] VM is (`docs/guest-abi.md`, part 2):
/// what the hypervisor emulates and where the VMM puts the boot structures.
pub mod linux {
    /// The IOAPIC's registers (one 4 KiB page).
    pub const IOAPIC_BASE: u64 = 0xfec0_0000;
    /// The IOAPIC's APIC id (MP table and IOAPIC ID register).
    pub const IOAPIC_ID: u8 = 0x10;
    /// The local APIC's xAPIC address, reported in IA32_APIC_BASE; the
    /// guest's APIC runs in x2APIC mode and has no MMIO page.
    pub const LAPIC_BASE: u64 = 0xfee0_0000;
    /// The IOAPIC input of the COM1 UART.
    pub const UART_GSI: u32 = 4;
    /// First and last port of COM1, the only ports that reach the VMM.
    pub const UART_PORT_FIRST: u16 = 0x3f8;
    pub const UART_PORT_LAST: u16 = 0x3ff;
    /// The BIOS data area word Linux writes before a reset: 0x1234 for a
    /// warm reset (`reboot_mode`), else 0.
    pub const RESET_FLAG_GPA: u64 = 0x472;
    pub const RESET_FLAG_WARM: u16 = 0x1234;
    /// The boot GDT (null, null, 0x10 code, 0x18 data).
    pub const GDT_GPA: u64 = 0x500;
    /// The identity page tables: PML4, PDPT, then up to four page
    /// directories of 2 MiB pages.
    pub const PML4_GPA: u64 = 0x9000;
    pub const PDPT_GPA: u64 = 0xa000;
    pub const PD_GPA: u64 = 0xb000;
    /// `struct boot_params` (the zero page); RSI at entry.
    pub const ZERO_PAGE_GPA: u64 = 0x7000;
    /// The MP floating pointer and configuration table (Linux scans the
    /// last KiB of base memory).
    pub const MPTABLE_GPA: u64 = 0x9_fc00;
    /// End of the low RAM in the e820 map.
    pub const LOW_RAM_END: u64 = 0x9_fc00;
    /// The ACPI tables: the RSDP (where Linux also finds it by scanning
    /// 0xe_0000-0xf_ffff), then the XSDT, FADT, MADT and DSDT. In the
    /// e820 map's reserved part.
    pub const ACPI_GPA: u64 = 0xe_0000;
    /// Most bytes of ACPI tables, from [`ACPI_GPA`].
    pub const ACPI_MAX: u64 = 0x1000;
    /// The VM generation ID: 16 bytes, alone in their page, which a fork
    /// copies for each side before the hypervisor writes a new ID there
    /// (`super::VM_FLAG_VMGENID`).
    pub const VMGENID_GPA: u64 = 0xe_1000;
    pub const VMGENID_LEN: usize = 16;
    /// The IOAPIC input the hypervisor pulses after it wrote a new
    /// generation ID: the interrupt of the ACPI Generic Event Device, which
    /// notifies the generation-ID device. Edge-triggered, active high, as
    /// an ISA input; unused otherwise.
    pub const VMGENID_GSI: u32 = 5;
    /// The kernel command line.
    pub const CMDLINE_GPA: u64 = 0x2_0000;
    /// Longest command line, without its NUL.
    pub const CMDLINE_MAX: usize = 4095;
    /// Where a bzImage's protected-mode kernel is loaded.
    pub const KERNEL_GPA: u64 = 0x100_0000;
    pub const CODE_SELECTOR: u16 = 0x10;
    pub const DATA_SELECTOR: u16 = 0x18;
    /// The guest hypercalls a user process may make: a 32-bit IN from this
    /// port with EAX = the number (`ghc::VERSION`, `ghc::VM_ID` or
    /// `ghc::FORK`) makes that hypercall, its result in EAX (as an i32).
    /// VMCALL needs ring 0; the port is the guest kernel's to grant
    /// (`ioperm` of its 4 ports, which needs CAP_SYS_RAWIO), checked by the CPU before any
    /// exit. `uxen-fork` in the guest initramfs uses it.
    pub const HYPERCALL_PORT: u16 = 0xe90;
}

/// Guest hypercalls: VMCALL with RAX = number, RDI/RSI/RDX = arguments; the
/// result comes back in RAX (>= 0, or -errno).
pub mod ghc {
    /// Returns [`super::ABI_REVISION`].
    pub const VERSION: u64 = 0x00;
    /// Returns this VM's id.
    pub const VM_ID: u64 = 0x01;
    /// fork(): the parent gets the child's id, the child 0.
    pub const FORK: u64 = 0x02;
    /// Returns the emulated TSC frequency hint in kHz, or 0 if unknown.
    pub const TSC_KHZ: u64 = 0x03;
    /// Halt-wake timer: RDI = TSC deadline (absolute); RSI = vector
    /// (32..=255). Returns 0. A deadline of 0 cancels.
    pub const SET_TIMER: u64 = 0x04;
    /// First and last numbers passed to the VMM as [`super::exit::HYPERCALL`].
    pub const VMM_FIRST: u64 = 0x1000;
    pub const VMM_LAST: u64 = 0x1fff;
}

/// Most live children a VM may have, however forked (the fork-bomb limit):
/// a further fork fails with EAGAIN until one is destroyed.
pub const VM_MAX_CHILDREN: u32 = 64;

// ---------------------------------------------------------------------------
// CPUID signature.
// ---------------------------------------------------------------------------

/// CPUID leaf that answers with [`CPUID_SIGNATURE`] under the hypervisor.
pub const CPUID_LEAF_HV: u32 = 0x4000_0000;
/// EBX, ECX, EDX of leaf 0x40000000.
pub const CPUID_SIGNATURE: [u8; 12] = *b"uXenRsUXenRs";
