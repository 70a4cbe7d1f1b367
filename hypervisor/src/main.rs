//! The bare-metal hypervisor image.
#![no_std]
#![no_main]

use hypervisor::layout;
use shared_abi::{ImageHeader, ABI_REVISION, IMAGE_MAGIC, VERSION};

/// The image header. The layout fields (sizes, entry, relocations) are
/// filled in by the build after linking (`xtask`'s image packer).
#[used]
#[no_mangle]
#[link_section = ".uxen_header"]
static UXEN_IMAGE_HEADER: ImageHeader = ImageHeader {
    magic: IMAGE_MAGIC,
    abi_revision: ABI_REVISION,
    header_size: core::mem::size_of::<ImageHeader>() as u32,
    version: VERSION,
    file_size: 0,
    mem_size: 0,
    entry_offset: 0,
    rela_offset: 0,
    rela_count: 0,
    heap_size: layout::HEAP_SIZE,
    percpu_size: layout::PERCPU_SIZE,
    max_cpus: layout::MAX_CPUS,
    reserved0: 0,
    reserved: [0; 4],
};

/// Per-CPU entry.
///
/// # Safety
/// Called by the driver on every CPU with interrupts off.
#[no_mangle]
#[link_section = ".text.uxen_entry"]
pub unsafe extern "sysv64" fn uxen_entry(_cpu: u32, _info: *const shared_abi::BootInfo) -> i64 {
    -shared_abi::errno::ENOSYS
}

#[global_allocator]
static HEAP: linked_list_allocator::LockedHeap = linked_list_allocator::LockedHeap::empty();

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {
        core::hint::spin_loop();
    }
}
