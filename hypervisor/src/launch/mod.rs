//! Late launch: every CPU enters through `uxen_entry`, they meet at
//! barriers, the first does the global set-up, each does its own, and all
//! launch the host VM together, or all roll back. See `docs/bootstrap.md`.
//!
//! `uxen_entry` below is the sequence, one named step a line; the steps
//! live beside it:
//!
//! | file | what |
//! | --- | --- |
//! | `image.rs` | the image header, its hash, the heap, the panic handler |
//! | `rendezvous.rs` | the barriers, and the results CPU 0 publishes |
//! | `global.rs` | CPU 0's steps: page tables, global set-up, their undoing |
//! | `percpu.rs` | each CPU's steps: its area, VMX and the host VM, going back to Linux |
//! | `call.rs` | the direct-call entry, without VMX |
//!
//! Built only into the image, at the level of `hv`, whose state it sets up.

mod call;
mod global;
pub mod image;
mod percpu;
mod rendezvous;

use core::sync::atomic::Ordering;
use rendezvous::{barrier, wait_for, ARRIVED, FINAL_CR3, GLOBAL, TABLES};
use shared_abi::{errno::*, BootInfo, ImageHeader, RegionLayout, ABI_REVISION, MAX_CPUS};

pub use image::{heap_usage, image_hash, image_intact};

/// Whether the driver's boot info and this CPU's index make sense for the
/// image as loaded.
fn valid(info: &BootInfo, index: u32) -> bool {
    let h = image::header();
    info.abi_revision == ABI_REVISION
        && info.num_cpus >= 1
        && info.num_cpus as usize <= MAX_CPUS
        && index < info.num_cpus
        && info.num_ram as usize <= info.ram.len()
        && info.region_virt == info.direct_map_base.wrapping_add(info.region_phys)
        && h.layout(info.region_size, info.num_cpus as u64).is_some()
}

/// The image entry (see `shared_abi::EntryFn`): on this CPU's hypervisor
/// stack and the boot page tables. Returns only on failure.
#[no_mangle]
#[link_section = ".text.uxen_entry"]
extern "sysv64" fn uxen_entry(index: u32, info: *const BootInfo, rip: u64, rsp: u64, linux_cr3: u64) -> i64 {
    // SAFETY: the driver passes the boot-info page of the region.
    let info = unsafe { &*info };
    if !valid(info, index) {
        return -EINVAL;
    }
    let n = info.num_cpus;
    let h = image::header();
    let l = h.layout(info.region_size, n as u64).unwrap();
    let pc = percpu::arrive(info, index, &h, &l, linux_cr3);
    if !barrier(&ARRIVED, n) {
        return percpu::leave(pc, -ETIMEDOUT);
    }
    let r = shared_tables(index, info, &l);
    if r != 0 {
        return percpu::leave(pc, r);
    }
    let r = shared_setup(index, info, &h, &l);
    if r != 0 {
        return percpu::leave(pc, r);
    }
    let hv = crate::hv::hv();
    if hv.iommu_only() {
        return percpu::iommu_only_finish(pc, info, n);
    }
    percpu::launch_host(pc, hv, info, rip, rsp, n)
}

/// CPU 0 builds the heap and the hypervisor's page tables while the others
/// wait; then every CPU switches to them. Returns 0 or `-errno`.
fn shared_tables(index: u32, info: &BootInfo, l: &RegionLayout) -> i64 {
    if index == 0 {
        let r = match global::build_tables(info, l) {
            Some(cr3) => {
                FINAL_CR3.store(cr3, Ordering::Release);
                0
            }
            None => -ENOMEM,
        };
        TABLES.store(r, Ordering::Release);
    }
    let r = wait_for(&TABLES);
    if r == 0 {
        percpu::switch_tables(FINAL_CR3.load(Ordering::Acquire));
    }
    r
}

/// CPU 0 does the global set-up while the others wait. Returns 0 or
/// `-errno`.
fn shared_setup(index: u32, info: &BootInfo, h: &ImageHeader, l: &RegionLayout) -> i64 {
    if index == 0 {
        let r = match global::global_setup(info, h, l) {
            Ok(()) => 0,
            Err(e) => e,
        };
        GLOBAL.store(r, Ordering::Release);
    }
    wait_for(&GLOBAL)
}
