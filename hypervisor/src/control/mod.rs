//! The host's control interface without VMX: what the host hypercalls take
//! in and what they do to the frame pool and to guest memory.
//!
//! - [`decode`] reads and validates the argument block of every host
//!   hypercall through [`HostMem`], by the rules of
//!   [`shared_abi::validate`] (the same functions the driver's ioctl
//!   handler calls);
//! - [`vmops`] holds the VM operations on [`FramePool`](crate::pool::FramePool)
//!   and [`GuestMem`](crate::guestmem::GuestMem): the frames a VM takes at
//!   creation and at a fork, what its destruction gives back, loads,
//!   translations and its frame accounting;
//! - [`dispatch`] is the host hypercall dispatcher, generic over the
//!   machine it runs on, a [`Platform`]: what each call may do and in which
//!   order the machine acts.
//!
//! The image runs [`dispatch`] over the hypervisor (`hv::platform`), and
//! answers itself only the calls that need the running VMX context
//! (`hv::hypercall`, `hv::run`). [`model`], a hypervisor without CPUs over
//! mock physical memory, is a [`Platform`] too: the unit tests and the fuzz
//! harnesses in [`fuzz`] drive the same dispatcher with arbitrary
//! hypercalls and ioctls (see `docs/fuzzing.md`).
//!
//! Errors become `-errno` in exactly one place per boundary:
//! [`HcError::errno`], called by the dispatchers.

pub mod decode;
pub mod dispatch;
pub mod platform;
pub mod vmops;

// Test code lives outside `src/` (`hypervisor/tests/support/`), compiled
// into this module for the unit tests and the fuzz targets, which need its
// private items.
#[cfg(any(test, feature = "fuzzing"))]
#[path = "../../tests/support/control_fuzz.rs"]
pub mod fuzz;
#[cfg(any(test, feature = "fuzzing"))]
#[path = "../../tests/support/control_model.rs"]
pub mod model;
#[cfg(test)]
#[path = "../../tests/support/control_tests.rs"]
mod tests;

use crate::guestmem::MemError;
use shared_abi::errno::*;
use shared_abi::validate::Invalid;
use shared_abi::HC_NEED_PAGES;

pub use decode::{Block, HostMem};
pub use dispatch::dispatch;
pub use platform::{Platform, Unacked};

/// Why a VM operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmError {
    /// No VM with that id.
    NoSuchVm,
    /// The VM has no vCPU with that index.
    NoSuchVcpu,
    /// A vCPU of the VM is running.
    Busy,
    /// The VM cannot do that in its state, or an argument is malformed.
    Invalid,
    /// [`shared_abi::MAX_VMS`] VMs exist, or no VPID is left.
    TooMany,
    /// The parent has [`shared_abi::VM_MAX_CHILDREN`] live children.
    Limit,
    /// Guest memory operation failed.
    Mem(MemError),
}

impl VmError {
    /// The `-errno` of this error.
    pub fn errno(self) -> i64 {
        -match self {
            VmError::NoSuchVm | VmError::NoSuchVcpu => ENOENT,
            VmError::Busy => EBUSY,
            VmError::Invalid => EINVAL,
            VmError::TooMany => ENOSPC,
            VmError::Limit => EAGAIN,
            VmError::Mem(MemError::OutOfRange) => EFAULT,
            VmError::Mem(MemError::Pool(_)) => EOVERFLOW,
            VmError::Mem(MemError::NeedPages(_)) => ENOMEM,
        }
    }
}

impl From<MemError> for VmError {
    fn from(e: MemError) -> Self {
        VmError::Mem(e)
    }
}

/// Host hypercall errors, turned into `-errno` by the dispatcher and
/// nowhere else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HcError {
    /// Unknown hypercall number.
    NoSys,
    /// The argument block is not host memory the host may hand over.
    Fault,
    /// A malformed argument.
    Invalid,
    /// Not now (VMs exist, the vCPU runs, ...).
    Busy,
    /// The hypervisor's own heap is exhausted.
    NoMemory,
    /// The pool needs this many more pages.
    NeedPages(u64),
    /// A VM operation failed.
    Vm(VmError),
    /// The IOMMU could not follow a change of owner.
    Iommu(crate::vtd::Error),
    /// The call needs VMX, and the hypervisor runs without it
    /// (`iommu_only=1`).
    NoVmx,
}

impl HcError {
    /// The status the hypercall returns in RAX: `-errno`, or
    /// [`HC_NEED_PAGES`] (the page count goes in RDX, see [`status`]).
    pub fn errno(self) -> i64 {
        match self {
            HcError::NoSys => -ENOSYS,
            HcError::Fault => -EFAULT,
            HcError::Invalid => -EINVAL,
            HcError::Busy => -EBUSY,
            HcError::NoMemory => -ENOMEM,
            HcError::NeedPages(_) => HC_NEED_PAGES,
            HcError::Vm(e) => e.errno(),
            HcError::Iommu(e) => e.errno(),
            HcError::NoVmx => -ENODEV,
        }
    }
}

/// A handler's result as the hypercall returns it: (RAX, RDX).
pub fn status(r: Result<i64, HcError>) -> (i64, u64) {
    match r {
        Ok(v) => (v, 0),
        Err(HcError::NeedPages(n)) => (HC_NEED_PAGES, n),
        Err(e) => (e.errno(), 0),
    }
}

impl From<VmError> for HcError {
    fn from(e: VmError) -> Self {
        match e {
            VmError::Mem(MemError::NeedPages(n)) => HcError::NeedPages(n),
            e => HcError::Vm(e),
        }
    }
}

impl From<Invalid> for HcError {
    fn from(_: Invalid) -> Self {
        HcError::Invalid
    }
}
