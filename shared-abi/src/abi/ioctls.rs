// SPDX-License-Identifier: GPL-2.0
//! ioctls on `/dev/uxen` and on VM descriptors: their numbers and the
//! argument blocks only the driver reads. See `docs/ioctl.md`.

use super::*;

/// The ioctl type byte.
pub const IOC_TYPE: u32 = b'U' as u32;

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// Linux's `_IOC(dir, type, nr, size)`.
pub const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32 & 0x3fff) << 16) | (IOC_TYPE << 8) | nr
}

/// The driver's and the image's identity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IocVersion {
    pub driver_version: [u8; 16],
    pub driver_abi: u32,
    pub image_abi: u32,
    pub image_version: [u8; 16],
    /// 1 while the hypervisor runs (the host is demoted).
    pub hv_active: u32,
    pub num_cpus: u32,
    /// `HV_FEATURE_*` reported by the running hypervisor.
    pub hv_features: u64,
}
const _: () = assert_size(core::mem::size_of::<IocVersion>(), 56);

/// A user buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IocBuf {
    pub ptr: u64,
    pub len: u64,
}
const _: () = assert_size(core::mem::size_of::<IocBuf>(), 16);

/// The `LOAD` ioctl: copy user bytes at `data` into guest memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IocLoad {
    pub gpa: u64,
    pub data: u64,
    pub len: u64,
}
const _: () = assert_size(core::mem::size_of::<IocLoad>(), 24);

/// The DEBUG_POOL ioctl: move pages between the host and the hypervisor's
/// frame pool on request, so that tests can aim device DMA at a donated
/// page (tests; module parameter `debug=1`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DebugPool {
    /// [`DEBUG_POOL_DONATE`] or [`DEBUG_POOL_RECLAIM`].
    pub op: u32,
    /// In: pages to donate (1 to 512). Out: pages donated or reclaimed.
    pub pages: u32,
    /// Out, after a donation: the physical address of the first donated
    /// page.
    pub base: u64,
}
const _: () = assert_size(core::mem::size_of::<DebugPool>(), 16);

/// [`DebugPool::op`]: donate `pages` pages as the driver does when the
/// hypervisor asks for them (2 MiB blocks where it can).
pub const DEBUG_POOL_DONATE: u32 = 1;
/// [`DebugPool::op`]: take every free pool frame back.
pub const DEBUG_POOL_RECLAIM: u32 = 2;

/// ioctl numbers.
pub mod ioctl {
    use super::*;
    use core::mem::size_of;

    /// `/dev/uxen`: out [`IocVersion`].
    pub const VERSION: u32 = ioc(IOC_READ, 0x00, size_of::<IocVersion>());
    /// `/dev/uxen`: in [`IocBuf`] for an [`HvStats`]. Returns bytes written.
    pub const STATS: u32 = ioc(IOC_WRITE, 0x01, size_of::<IocBuf>());
    /// `/dev/uxen`: in/out [`VmCreate`]. Returns a new VM descriptor.
    pub const CREATE_VM: u32 = ioc(IOC_READ | IOC_WRITE, 0x02, size_of::<VmCreate>());
    /// `/dev/uxen`: in [`IocBuf`] for an array of [`VmInfo`]. Returns how many.
    pub const LIST: u32 = ioc(IOC_WRITE, 0x03, size_of::<IocBuf>());
    /// `/dev/uxen`: in [`VmId`]. Destroys any VM.
    pub const DESTROY: u32 = ioc(IOC_WRITE, 0x04, size_of::<VmId>());
    /// `/dev/uxen`: in/out [`MergeScan`].
    pub const MERGE: u32 = ioc(IOC_READ | IOC_WRITE, 0x05, size_of::<MergeScan>());
    /// `/dev/uxen`: in/out [`DebugTranslate`] (module parameter `debug=1`).
    pub const DEBUG_TRANSLATE: u32 = ioc(IOC_READ | IOC_WRITE, 0x06, size_of::<DebugTranslate>());
    /// In/out: [`DebugPool`] (module parameter `debug=1`; tests).
    pub const DEBUG_POOL: u32 = ioc(IOC_READ | IOC_WRITE, 0x07, size_of::<DebugPool>());

    /// VM descriptor: in [`IocLoad`].
    pub const VM_LOAD: u32 = ioc(IOC_WRITE, 0x10, size_of::<IocLoad>());
    /// VM descriptor: in/out [`VmRegs`] (`vm` is ignored).
    pub const VM_GET_REGS: u32 = ioc(IOC_READ | IOC_WRITE, 0x11, size_of::<VmRegs>());
    /// VM descriptor: in [`VmRegs`] (`vm` is ignored).
    pub const VM_SET_REGS: u32 = ioc(IOC_WRITE, 0x12, size_of::<VmRegs>());
    /// VM descriptor: in/out [`VmRun`] (`vm` is ignored).
    pub const VM_RUN: u32 = ioc(IOC_READ | IOC_WRITE, 0x13, size_of::<VmRun>());
    /// VM descriptor: in/out [`VmFork`]. Returns the child's descriptor.
    pub const VM_FORK: u32 = ioc(IOC_READ | IOC_WRITE, 0x14, size_of::<VmFork>());
    /// VM descriptor: out [`VmId`].
    pub const VM_ID: u32 = ioc(IOC_READ, 0x15, size_of::<VmId>());
    /// VM descriptor: in [`VmIrq`] (`vm` is ignored).
    pub const VM_IRQ: u32 = ioc(IOC_WRITE, 0x16, size_of::<VmIrq>());
}
