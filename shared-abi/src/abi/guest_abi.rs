// SPDX-License-Identifier: GPL-2.0
//! The guest ABI: the boot contract of a plain guest, the PC that a
//! [`VM_FLAG_LINUX`] VM is, the VM flags that choose it, and the guest
//! hypercalls. See `docs/guest-abi.md`.

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

/// [`VmCreate::flags`](super::VmCreate::flags): the VM is a PC for a Linux guest
/// (`docs/guest-abi.md`, part 2): a local x2APIC per vCPU and an IOAPIC
/// emulated in the hypervisor, Linux's CPUID and MSR policy, the 64-bit boot
/// protocol's entry state, and port I/O outside the COM1 UART answered by
/// the hypervisor.
pub const VM_FLAG_LINUX: u32 = 1 << 0;

/// [`VmCreate::flags`](super::VmCreate::flags), only with [`VM_FLAG_LINUX`]: the VM has a VM
/// generation ID (Microsoft's "Virtual Machine Generation ID", which
/// Linux's `vmgenid` driver reads), a 16-byte buffer at
/// [`linux::VMGENID_GPA`] that the VMM's ACPI tables describe. At every
/// fork the hypervisor writes a new ID into the parent's and the child's
/// own copy of it, and pulses IOAPIC input [`linux::VMGENID_GSI`] of each,
/// the interrupt of the ACPI Generic Event Device that notifies the
/// driver (`docs/guest-abi.md`, part 2).
pub const VM_FLAG_VMGENID: u32 = 1 << 1;

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
    /// Returns [`ABI_REVISION`](super::super::ABI_REVISION).
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
    /// First and last numbers passed to the VMM as [`exit::HYPERCALL`](super::super::exit::HYPERCALL).
    pub const VMM_FIRST: u64 = 0x1000;
    pub const VMM_LAST: u64 = 0x1fff;
}
