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
        _ => Err(ENOTTY),
    })
}

fn version(drv: &crate::Driver, arg: usize) -> Result<i64> {
    let v = abi::IocVersion {
        driver_version: abi::VERSION,
        driver_abi: abi::ABI_REVISION,
        image_abi: drv.header.abi_revision,
        image_version: drv.header.version,
        hv_active: drv.hv.active() as u32,
        num_cpus: 0,
        hv_features: 0,
    };
    write_user(arg, &v)?;
    Ok(0)
}

#[no_mangle]
extern "C" fn uxen_vm_release(_private: *mut c_void) {}

#[no_mangle]
extern "C" fn uxen_vm_ioctl(_private: *mut c_void, _cmd: u32, _arg: usize) -> core::ffi::c_long {
    ENOTTY.to_errno() as core::ffi::c_long
}
