//! What the image is once loaded: its header (which the build fills after
//! linking), the hash of its code and read-only data, its heap, and its
//! panic handler.

use crate::arch::x86::instr;
use crate::layout;
use core::sync::atomic::{AtomicU64, Ordering};
use shared_abi::{ImageHeader, ABI_REVISION, IMAGE_MAGIC, VERSION};

/// The image header. The build fills the layout fields after linking.
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
    call_offset: 0,
    reserved: [0; 3],
};

extern "C" {
    /// End of the code and read-only data (`layout.ld`).
    static __ro_end: u8;
}

static IMAGE_HASH: AtomicU64 = AtomicU64::new(0);

/// FNV-1a of the image's code and read-only data, as loaded.
pub fn image_hash() -> u64 {
    let start = &UXEN_IMAGE_HEADER as *const ImageHeader as *const u8;
    // SAFETY: taking the address of a linker symbol.
    let end = unsafe { &__ro_end as *const u8 };
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut p = start;
    while p < end {
        // SAFETY: `[start, end)` is the image's loaded code and data.
        h = (h ^ unsafe { p.read_volatile() } as u64).wrapping_mul(0x100_0000_01b3);
        // SAFETY: stays within `[start, end]`.
        p = unsafe { p.add(1) };
    }
    h
}

/// Records the hash that [`image_intact`] compares against, once the
/// global set-up is done.
pub(super) fn record_image_hash() {
    IMAGE_HASH.store(image_hash(), Ordering::Relaxed);
}

/// Whether the code and read-only data still hash as at start-up.
pub fn image_intact() -> bool {
    image_hash() == IMAGE_HASH.load(Ordering::Relaxed)
}

/// The header as loaded (the packer rewrote it after compilation).
pub(super) fn header() -> ImageHeader {
    // SAFETY: the static is always readable; volatile because its bytes
    // differ from the initialiser the compiler saw.
    unsafe { core::ptr::read_volatile(&UXEN_IMAGE_HEADER) }
}

#[global_allocator]
static HEAP: linked_list_allocator::LockedHeap = linked_list_allocator::LockedHeap::empty();

/// Hands the heap its range: the region's heap part, once, on CPU 0.
///
/// # Safety
///
/// `start..start + size` is the region's heap range, unused by anything
/// else, and nothing has allocated yet.
pub(super) unsafe fn init_heap(start: *mut u8, size: usize) {
    // SAFETY: the caller's promise.
    unsafe { HEAP.lock().init(start, size) };
}

/// The heap's size and free bytes.
pub fn heap_usage() -> (u64, u64) {
    let h = HEAP.lock();
    (h.size() as u64, h.free() as u64)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    log::error!("PANIC: {info}");
    loop {
        // SAFETY: nothing is left to run on this CPU.
        unsafe {
            instr::cli();
            instr::hlt();
        }
    }
}

const _: () = assert!(layout::PERCPU_SIZE == crate::arch::x86::cpu::area::STACK_TOP);
