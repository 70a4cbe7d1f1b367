// SPDX-License-Identifier: GPL-2.0
//! The hypervisor image and its boot: the image header the driver checks
//! and relocates, the boot info it hands every CPU's entry, the direct-call
//! and return handshakes, the log ring, and the CPUID signature by which the
//! host sees that the hypervisor runs. See `docs/bootstrap.md`.

use super::*;

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
// CPUID signature.
// ---------------------------------------------------------------------------

/// CPUID leaf that answers with [`CPUID_SIGNATURE`] under the hypervisor.
pub const CPUID_LEAF_HV: u32 = 0x4000_0000;
/// EBX, ECX, EDX of leaf 0x40000000.
pub const CPUID_SIGNATURE: [u8; 12] = *b"uXenRsUXenRs";
