// SPDX-License-Identifier: GPL-2.0
//! `uxen.ko`: loads the uxen-rs hypervisor image under a running Linux,
//! demotes Linux into the host VM, and serves `/dev/uxen`.
//!
//! The module trusts nothing it gets back from user space and keeps no
//! policy of its own: it validates ioctl arguments, turns them into
//! hypercalls, donates pages when the hypervisor asks, and forwards the
//! hypervisor's log to dmesg.

use core::sync::atomic::{AtomicPtr, Ordering};
use kernel::prelude::*;

#[path = "../shared-abi/src/abi/mod.rs"]
#[allow(dead_code, clippy::all)]
mod abi;
#[path = "../shared-abi/src/validate.rs"]
#[allow(dead_code, clippy::all)]
mod validate;
mod dev;
mod hv;
mod launch;
mod merge;
mod shim;

module! {
    type: Uxen,
    name: "uxen",
    author: "uxen-rs",
    description: "uxen-rs late-launch hypervisor",
    license: "GPL",
}

/// The hypervisor image, embedded at build time.
pub(crate) static IMAGE: &[u8] = include_bytes!("hypervisor.bin");

/// The loaded driver. Reached from the file callbacks through [`DRIVER`].
pub(crate) struct Driver {
    pub(crate) header: abi::ImageHeader,
    pub(crate) hv: hv::Hypervisor,
    /// Halted vCPUs sleep here; a destroy or an interrupt wakes them.
    pub(crate) halt_wq: shim::WaitQueue,
    /// Bumped by every destroy and every `VM_IRQ`.
    pub(crate) wake_gen: core::sync::atomic::AtomicI32,
}

static DRIVER: AtomicPtr<Driver> = AtomicPtr::new(core::ptr::null_mut());

/// The driver, while `/dev/uxen` is registered.
pub(crate) fn driver() -> Option<&'static Driver> {
    let p = DRIVER.load(Ordering::Acquire);
    // SAFETY: `DRIVER` is set before the device is registered and cleared
    // after it is deregistered and every descriptor (which holds a module
    // reference) is gone, so the pointee outlives every caller.
    unsafe { p.as_ref() }
}

struct Uxen {
    driver: *mut Driver,
    /// Background re-merging; stopped before the driver goes.
    merger: Option<merge::Background>,
}

// SAFETY: the pointer is only dereferenced through `driver()`.
unsafe impl Sync for Uxen {}
// SAFETY: as above.
unsafe impl Send for Uxen {}

impl kernel::Module for Uxen {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let header = match abi::ImageHeader::parse(IMAGE) {
            Ok(h) => h,
            Err(e) => {
                pr_err!("refusing the embedded hypervisor image: {}\n", e.message());
                return Err(ENOEXEC);
            }
        };
        pr_info!(
            "hypervisor image {} (ABI {}), {} bytes, driver ABI {}\n",
            dev::version_str(&header.version),
            header.abi_revision,
            header.file_size,
            abi::ABI_REVISION
        );
        let halt_wq = shim::WaitQueue::new()?;
        let hv = hv::Hypervisor::start(&header)?;
        let driver = KBox::new(Driver { header, hv, halt_wq, wake_gen: core::sync::atomic::AtomicI32::new(0) }, GFP_KERNEL)?;
        let ptr = KBox::into_raw(driver);
        DRIVER.store(ptr, Ordering::Release);
        if let Err(e) = shim::misc_register() {
            DRIVER.store(core::ptr::null_mut(), Ordering::Release);
            // SAFETY: `ptr` came from `KBox::into_raw` and nobody else saw it.
            drop(unsafe { KBox::from_raw(ptr) });
            pr_err!("cannot register /dev/uxen ({:?})\n", e);
            return Err(e);
        }
        merge::sync_faults(crate::driver().unwrap());
        let merger = match merge::start() {
            Ok(m) => Some(m),
            Err(e) => {
                pr_warn!("no background re-merging ({:?})\n", e);
                None
            }
        };
        pr_info!("/dev/uxen ready\n");
        Ok(Uxen { driver: ptr, merger })
    }
}

impl Drop for Uxen {
    fn drop(&mut self) {
        shim::misc_deregister();
        drop(self.merger.take());
        DRIVER.store(core::ptr::null_mut(), Ordering::Release);
        // SAFETY: the device is gone and no descriptor is open (each holds a
        // module reference), so this is the last user of the driver.
        drop(unsafe { KBox::from_raw(self.driver) });
        pr_info!("unloaded\n");
    }
}
