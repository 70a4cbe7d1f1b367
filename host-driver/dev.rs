// SPDX-License-Identifier: GPL-2.0
//! `/dev/uxen` and the VM descriptors: the ioctl boundary.
//!
//! Every ioctl argument is copied in, validated here, and only then turned
//! into a hypercall; failures become an errno at this one place.

use crate::abi::{self, ioctl};
use crate::driver;
use core::ffi::c_void;
use kernel::prelude::*;
use kernel::uaccess::UserSlice;

/// Text of a NUL-padded version field.
pub(crate) fn version_str(v: &[u8]) -> &str {
    core::str::from_utf8(abi::cstr_bytes(v)).unwrap_or("?")
}

fn to_ret(r: Result<i64>) -> core::ffi::c_long {
    match r {
        Ok(v) => v as core::ffi::c_long,
        Err(e) => e.to_errno() as core::ffi::c_long,
    }
}

/// Copies a `T` in from user space.
fn read_user<T: Copy + Default>(arg: usize) -> Result<T> {
    let mut value = T::default();
    let size = core::mem::size_of::<T>();
    let mut reader = UserSlice::new(arg, size).reader();
    // SAFETY: `T` is a plain-old-data ABI structure: any bytes are valid,
    // and the slice covers exactly its storage.
    let bytes = unsafe { core::slice::from_raw_parts_mut((&mut value as *mut T).cast::<u8>(), size) };
    reader.read_slice(bytes)?;
    Ok(value)
}

/// Copies a `T` out to user space.
fn write_user<T: Copy>(arg: usize, value: &T) -> Result {
    let size = core::mem::size_of::<T>();
    // SAFETY: `T` is a plain-old-data ABI structure without padding bytes.
    let bytes = unsafe { core::slice::from_raw_parts((value as *const T).cast::<u8>(), size) };
    UserSlice::new(arg, size).writer().write_slice(bytes)
}

#[no_mangle]
extern "C" fn uxen_dev_open(private: *mut *mut c_void) -> core::ffi::c_long {
    if driver().is_none() {
        return ENODEV.to_errno() as core::ffi::c_long;
    }
    // SAFETY: the shim passes a valid out-pointer.
    unsafe { *private = core::ptr::null_mut() };
    0
}

#[no_mangle]
extern "C" fn uxen_dev_release(_private: *mut c_void) {}

#[no_mangle]
extern "C" fn uxen_dev_ioctl(_private: *mut c_void, cmd: u32, arg: usize) -> core::ffi::c_long {
    let Some(drv) = driver() else {
        return ENODEV.to_errno() as core::ffi::c_long;
    };
    to_ret(match cmd {
        ioctl::VERSION => version(drv, arg),
        ioctl::STATS => stats(drv, arg),
        _ => Err(ENOTTY),
    })
}

/// A kernel buffer for a hypercall argument block: physically contiguous
/// host memory that the hypervisor reads or writes.
struct HcBuf<T: Copy + Default> {
    value: KBox<T>,
}

impl<T: Copy + Default> HcBuf<T> {
    fn new(value: T) -> Result<Self> {
        Ok(HcBuf { value: KBox::new(value, GFP_KERNEL)? })
    }

    /// Issues hypercall `nr` on this block.
    fn call(&mut self, drv: &crate::Driver, nr: u64) -> Result<i64> {
        let pa = crate::shim::virt_to_phys((&mut *self.value as *mut T).cast());
        let (s, _) = drv.hv.call(nr, pa, core::mem::size_of::<T>() as u64);
        crate::hv::status(s)
    }
}

fn version(drv: &crate::Driver, arg: usize) -> Result<i64> {
    let mut v = abi::IocVersion {
        driver_version: abi::VERSION,
        driver_abi: abi::ABI_REVISION,
        image_abi: drv.header.abi_revision,
        image_version: drv.header.version,
        hv_active: drv.hv.active() as u32,
        num_cpus: 0,
        hv_features: 0,
    };
    if drv.hv.active() {
        let mut b = HcBuf::new(abi::HvVersion::default())?;
        b.call(drv, abi::hc::VERSION)?;
        v.num_cpus = b.value.num_cpus;
        v.hv_features = b.value.features;
    }
    write_user(arg, &v)?;
    Ok(0)
}

fn stats(drv: &crate::Driver, arg: usize) -> Result<i64> {
    let req: abi::IocBuf = read_user(arg)?;
    let size = core::mem::size_of::<abi::HvStats>();
    if (req.len as usize) < size {
        return Err(EINVAL);
    }
    if !drv.hv.active() {
        return Err(ENODEV);
    }
    let mut buf = KVec::<u8>::from_elem(0, size, GFP_KERNEL)?;
    let pa = crate::shim::virt_to_phys(buf.as_mut_ptr());
    let (s, _) = drv.hv.call(abi::hc::STATS, pa, size as u64);
    crate::hv::status(s)?;
    UserSlice::new(req.ptr as usize, size).writer().write_slice(&buf)?;
    Ok(size as i64)
}

#[no_mangle]
extern "C" fn uxen_vm_release(_private: *mut c_void) {}

#[no_mangle]
extern "C" fn uxen_vm_ioctl(_private: *mut c_void, _cmd: u32, _arg: usize) -> core::ffi::c_long {
    ENOTTY.to_errno() as core::ffi::c_long
}
