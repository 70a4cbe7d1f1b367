//! `/dev/uxen` and VM descriptors: thin, typed ioctl wrappers.

use anyhow::{anyhow, Result};
use shared_abi as abi;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;

pub const DEVICE: &str = "/dev/uxen";

/// An ioctl failure with its errno.
#[derive(Debug)]
pub struct IoctlError {
    pub what: &'static str,
    pub errno: i32,
}

impl std::fmt::Display for IoctlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, std::io::Error::from_raw_os_error(self.errno))
    }
}

impl std::error::Error for IoctlError {}

/// Issues `cmd` with a pointer to `arg`; returns the ioctl's value.
///
/// # Safety
/// `T` must be the structure the ioctl `cmd` expects.
unsafe fn ioctl_ptr<T>(fd: i32, what: &'static str, cmd: u32, arg: *mut T) -> std::result::Result<i64, IoctlError> {
    // SAFETY: per the caller's contract `arg` points to what `cmd` expects.
    let r = unsafe { libc::ioctl(fd, cmd as libc::c_ulong, arg) };
    if r < 0 {
        Err(IoctlError { what, errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0) })
    } else {
        Ok(r as i64)
    }
}

/// The control device.
pub struct Device {
    file: File,
}

impl Device {
    pub fn open() -> Result<Device> {
        match OpenOptions::new().read(true).write(true).open(DEVICE) {
            Ok(file) => Ok(Device { file }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(anyhow!(
                "cannot open {DEVICE}: {e} (is the uxen module loaded? load it with `insmod uxen.ko`)"
            )),
            Err(e) => Err(anyhow!("cannot open {DEVICE}: {e}")),
        }
    }

    fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// The hypervisor's counters.
    pub fn stats(&self) -> Result<Box<abi::HvStats>> {
        // SAFETY: `HvStats` is plain data; zero is a valid value.
        let mut s: Box<abi::HvStats> = unsafe { Box::new_zeroed().assume_init() };
        let mut req = abi::IocBuf { ptr: &mut *s as *mut abi::HvStats as u64, len: std::mem::size_of::<abi::HvStats>() as u64 };
        // SAFETY: STATS takes an `IocBuf` describing a buffer of that size.
        unsafe { ioctl_ptr(self.fd(), "stats", abi::ioctl::STATS, &mut req) }?;
        Ok(s)
    }

    pub fn version(&self) -> Result<abi::IocVersion> {
        let mut v = abi::IocVersion::default();
        // SAFETY: VERSION takes an `IocVersion`.
        unsafe { ioctl_ptr(self.fd(), "version", abi::ioctl::VERSION, &mut v) }?;
        Ok(v)
    }
}
