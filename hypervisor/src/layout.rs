//! Sizes the image asks the driver for, written into the image header.

/// Heap, beyond the loaded image.
pub const HEAP_SIZE: u64 = 2 << 20;
/// Per-CPU area: stack, VMXON region, host-VM VMCS, GDT/TSS/IDT.
pub const PERCPU_SIZE: u64 = 64 << 10;
/// Hypervisor stack per CPU, at the top of its per-CPU area.
pub const STACK_SIZE: u64 = 32 << 10;
/// Most CPUs this image supports.
pub const MAX_CPUS: u32 = shared_abi::MAX_CPUS as u32;
