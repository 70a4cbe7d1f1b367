//! `/dev/uxen` and VM descriptors: thin, typed ioctl wrappers.

use anyhow::{anyhow, Result};
use shared_abi as abi;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

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

    pub fn version(&self) -> Result<abi::IocVersion> {
        let mut v = abi::IocVersion::default();
        // SAFETY: VERSION takes an `IocVersion`.
        unsafe { ioctl_ptr(self.fd(), "version", abi::ioctl::VERSION, &mut v) }?;
        Ok(v)
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

    /// Creates a VM with `VM_FLAG_*` `flags`; it lives as long as the
    /// returned descriptor. The driver fills in `tsc_khz`.
    pub fn create_vm(&self, mem_bytes: u64, vcpus: u32, name: &str, flags: u32) -> std::result::Result<Vm, IoctlError> {
        let mut c = abi::VmCreate { mem_bytes, vcpus, flags, name: abi::padded(name.as_bytes()), ..Default::default() };
        // SAFETY: CREATE_VM takes a `VmCreate`.
        let fd = unsafe { ioctl_ptr(self.fd(), "create VM", abi::ioctl::CREATE_VM, &mut c) }?;
        // SAFETY: the driver installed `fd` for this process.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Vm { fd, id: c.id })
    }

    /// Every VM.
    pub fn list(&self) -> Result<Vec<abi::VmInfo>> {
        let mut buf = vec![abi::VmInfo::default(); abi::MAX_VMS as usize];
        let mut req = abi::IocBuf { ptr: buf.as_mut_ptr() as u64, len: (buf.len() * std::mem::size_of::<abi::VmInfo>()) as u64 };
        // SAFETY: LIST takes an `IocBuf` describing an array of `VmInfo`.
        let n = unsafe { ioctl_ptr(self.fd(), "list", abi::ioctl::LIST, &mut req) }? as usize;
        buf.truncate(n.min(buf.len()));
        Ok(buf)
    }

    pub fn destroy(&self, id: u32) -> std::result::Result<(), IoctlError> {
        let mut v = abi::VmId { id, reserved0: 0 };
        // SAFETY: DESTROY takes a `VmId`.
        unsafe { ioctl_ptr(self.fd(), "destroy", abi::ioctl::DESTROY, &mut v) }?;
        Ok(())
    }

    /// One re-merging pass over VM `vm` (0: every VM).
    pub fn merge(&self, vm: u32) -> std::result::Result<abi::MergeScan, IoctlError> {
        let mut m = abi::MergeScan { vm, ..Default::default() };
        // SAFETY: MERGE takes a `MergeScan`.
        unsafe { ioctl_ptr(self.fd(), "merge", abi::ioctl::MERGE, &mut m) }?;
        Ok(m)
    }

    /// The host frame behind a guest page (needs the module's `debug=1`).
    pub fn translate(&self, vm: u32, gpa: u64) -> std::result::Result<u64, IoctlError> {
        let mut t = abi::DebugTranslate { vm, gpa, ..Default::default() };
        // SAFETY: DEBUG_TRANSLATE takes a `DebugTranslate`.
        unsafe { ioctl_ptr(self.fd(), "translate", abi::ioctl::DEBUG_TRANSLATE, &mut t) }?;
        Ok(t.hpa)
    }

    /// Donates `pages` pages to the hypervisor's pool (at least a 2 MiB
    /// block's worth), or with `pages == 0` takes every free one back
    /// (needs the module's `debug=1`). Returns the first donated page and
    /// the count.
    pub fn debug_pool(&self, pages: u32) -> std::result::Result<(u64, u32), IoctlError> {
        let op = if pages == 0 { abi::DEBUG_POOL_RECLAIM } else { abi::DEBUG_POOL_DONATE };
        let mut p = abi::DebugPool { op, pages, base: 0 };
        // SAFETY: DEBUG_POOL takes a `DebugPool`.
        unsafe { ioctl_ptr(self.fd(), "pool", abi::ioctl::DEBUG_POOL, &mut p) }?;
        Ok((p.base, p.pages))
    }
}

/// A VM descriptor.
pub struct Vm {
    pub fd: OwnedFd,
    pub id: u32,
}

impl Vm {
    fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Copies `data` into guest memory at `gpa`.
    pub fn load(&self, gpa: u64, data: &[u8]) -> std::result::Result<(), IoctlError> {
        let mut l = abi::IocLoad { gpa, data: data.as_ptr() as u64, len: data.len() as u64 };
        // SAFETY: LOAD takes an `IocLoad` describing `data`.
        unsafe { ioctl_ptr(self.fd(), "load", abi::ioctl::VM_LOAD, &mut l) }?;
        Ok(())
    }

    pub fn set_regs(&self, vcpu: u32, regs: &abi::Regs) -> std::result::Result<(), IoctlError> {
        let mut r = abi::VmRegs { vm: self.id, vcpu, regs: *regs };
        // SAFETY: SET_REGS takes a `VmRegs`.
        unsafe { ioctl_ptr(self.fd(), "set regs", abi::ioctl::VM_SET_REGS, &mut r) }?;
        Ok(())
    }

    /// Drives input `gsi` of the VM's IOAPIC: `IRQ_LOW`, `IRQ_HIGH` or
    /// `IRQ_PULSE` (a Linux VM only). A vCPU halted in RUN wakes up.
    pub fn irq(&self, gsi: u32, level: u32) -> std::result::Result<(), IoctlError> {
        let mut q = abi::VmIrq { vm: self.id, gsi, level, reserved0: 0 };
        // SAFETY: VM_IRQ takes a `VmIrq`.
        unsafe { ioctl_ptr(self.fd(), "irq", abi::ioctl::VM_IRQ, &mut q) }?;
        Ok(())
    }

    /// A copy-on-write clone; its vCPUs must be out of RUN.
    /// FORK with `FORK_*` flags; also returns the hypervisor's cost in TSC
    /// ticks.
    pub fn fork_with(&self, flags: u32) -> std::result::Result<(Vm, u64), IoctlError> {
        let mut f = abi::VmFork { vm: self.id, flags, ..Default::default() };
        // SAFETY: FORK takes a `VmFork`.
        let fd = unsafe { ioctl_ptr(self.fd(), "fork", abi::ioctl::VM_FORK, &mut f) }?;
        // SAFETY: the driver installed `fd` for this process.
        Ok((Vm { fd: unsafe { OwnedFd::from_raw_fd(fd as i32) }, id: f.child }, f.tsc))
    }

    /// A raw descriptor for sharing across threads.
    pub fn raw_fd(&self) -> i32 {
        self.fd()
    }
}

/// Runs vCPU `run.vcpu` of the VM behind `fd` (for vCPU threads).
pub fn run_fd(fd: i32, run: &mut abi::VmRun) -> std::result::Result<(), IoctlError> {
    // SAFETY: RUN takes a `VmRun`; `fd` is a live VM descriptor.
    unsafe { ioctl_ptr(fd, "run", abi::ioctl::VM_RUN, run) }?;
    Ok(())
}
