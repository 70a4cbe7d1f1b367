//! Reading and checking the argument blocks of the host hypercalls.
//!
//! A block is host-physical memory named by RDI (address) and RSI (size);
//! `docs/hypercalls.md` gives the rules. Every read or write of one goes
//! through [`HostMem`], after [`HostMem::owned`] said the host owns it, and
//! every field is checked here, by the rules of [`shared_abi::validate`],
//! before a handler acts on it. Nothing here changes the hypervisor's
//! state.

use super::HcError;
use crate::addr::Hpa;
use alloc::vec::Vec;
use core::mem::{offset_of, size_of, MaybeUninit};
use shared_abi::validate;
use shared_abi::{
    DebugFaults, DebugTranslate, ExitRecord, HvStats, HvVersion, IocBuf, IocLoad, IocVersion, MemRange, MergeScan, VmCreate, VmFork, VmId, VmInfo, VmLoad, VmRegs,
    VmIrq, VmRun, VM_NAME_LEN,
};

/// Host memory as a hypercall sees it.
pub trait HostMem {
    /// Whether `[pa, pa + len)` is host RAM the host still owns, so that a
    /// hypercall may read or write it on the host's behalf (empty and
    /// wrapping ranges are not).
    fn owned(&self, pa: u64, len: u64) -> bool;
    /// Reads host memory that [`HostMem::owned`] accepted.
    fn read(&self, pa: u64, buf: &mut [u8]);
    /// Writes host memory that [`HostMem::owned`] accepted.
    fn write(&self, pa: u64, buf: &[u8]);
}

/// An argument block's type: a `#[repr(C)]` ABI structure.
///
/// # Safety
///
/// The type must have no padding bytes and be valid for every bit pattern,
/// so that it can be read from and written to host memory as bytes.
pub unsafe trait Block: Copy {}

macro_rules! blocks {
    ($($t:ty),* $(,)?) => {
        // SAFETY: `shared-abi` structures are `#[repr(C)]`, built of
        // fixed-width integers and byte arrays with explicit padding fields
        // (their sizes are asserted there); any bytes are a valid value.
        $(unsafe impl Block for $t {})*
    };
}
blocks!(u64, MemRange, VmCreate, VmId, VmIrq, VmLoad, VmRegs, VmRun, ExitRecord, VmFork, VmInfo, DebugTranslate, DebugFaults, HvVersion, HvStats, MergeScan);
// The ioctl arguments, for the driver model of the fuzz harnesses.
blocks!(IocVersion, IocBuf, IocLoad);

/// The bytes of a block.
pub fn as_bytes<T: Block>(v: &T) -> &[u8] {
    // SAFETY: `T: Block` has no padding; the slice covers exactly `*v`.
    unsafe { core::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

/// A block from the first bytes of `b`, if there are enough.
pub fn from_bytes<T: Block>(b: &[u8]) -> Option<T> {
    let size = size_of::<T>();
    if b.len() < size {
        return None;
    }
    let mut v = MaybeUninit::<T>::zeroed();
    // SAFETY: `b` holds at least `size` bytes and the destination is the
    // storage of `v`; `T: Block` is valid for any bytes.
    unsafe {
        core::ptr::copy_nonoverlapping(b.as_ptr(), v.as_mut_ptr().cast::<u8>(), size);
        Some(v.assume_init())
    }
}

/// Copies a `T` in from host memory at `pa`: `-EINVAL` if the block of
/// `len` bytes is too short, `-EFAULT` unless the host owns it.
pub fn copy_in<T: Block>(h: &impl HostMem, pa: u64, len: u64) -> Result<T, HcError> {
    let size = size_of::<T>() as u64;
    if len < size {
        return Err(HcError::Invalid);
    }
    if !h.owned(pa, size) {
        return Err(HcError::Fault);
    }
    let mut v = MaybeUninit::<T>::zeroed();
    // SAFETY: the slice covers exactly the storage of `v`, zeroed above.
    let buf = unsafe { core::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), size as usize) };
    h.read(pa, buf);
    // SAFETY: `T: Block` is valid for any bytes.
    Ok(unsafe { v.assume_init() })
}

/// Copies `value` out to host memory at `pa`, with the checks of
/// [`copy_in`].
pub fn copy_out<T: Block>(h: &impl HostMem, pa: u64, len: u64, value: &T) -> Result<(), HcError> {
    let size = size_of::<T>() as u64;
    if len < size {
        return Err(HcError::Invalid);
    }
    if !h.owned(pa, size) {
        return Err(HcError::Fault);
    }
    h.write(pa, as_bytes(value));
    Ok(())
}

/// DONATE: the ranges, each page aligned, 4 KiB to 1 GiB, host owned, and
/// not overlapping another range of the same call.
pub fn donate(h: &impl HostMem, arg: u64, len: u64) -> Result<Vec<MemRange>, HcError> {
    let n = validate::donate_ranges(len)?;
    if !h.owned(arg, len) {
        return Err(HcError::Fault);
    }
    let mut ranges: Vec<MemRange> = Vec::with_capacity(n as usize);
    for i in 0..n {
        let r: MemRange = copy_in(h, arg + i * size_of::<MemRange>() as u64, size_of::<MemRange>() as u64)?;
        validate::mem_range(&r)?;
        // Also refuses pages already donated (no longer the host's).
        if !h.owned(r.base, r.size) || ranges.iter().any(|o| r.base < o.base + o.size && o.base < r.base + r.size) {
            return Err(HcError::Fault);
        }
        ranges.push(r);
    }
    Ok(ranges)
}

/// RECLAIM: how many frames the block has room for (at most 512).
pub fn reclaim(h: &impl HostMem, arg: u64, len: u64) -> Result<usize, HcError> {
    let max = validate::reclaim_count(len)?;
    if !h.owned(arg, max * 8) {
        return Err(HcError::Fault);
    }
    Ok(max as usize)
}

/// RECLAIM: writes the frames given back into the block [`reclaim`]
/// accepted.
pub fn reclaimed(h: &impl HostMem, arg: u64, frames: &[Hpa]) {
    for (i, f) in frames.iter().enumerate() {
        h.write(arg + 8 * i as u64, &f.0.to_le_bytes());
    }
}

/// VM_CREATE: the request, with its name NUL-terminated.
pub fn vm_create(h: &impl HostMem, arg: u64, len: u64) -> Result<VmCreate, HcError> {
    let mut c: VmCreate = copy_in(h, arg, len)?;
    validate::vm_create(&c)?;
    // A Linux guest is told its TSC rate (the driver fills it in); without
    // one it could not boot without a PIT.
    if c.flags & shared_abi::VM_FLAG_LINUX != 0 && c.tsc_khz == 0 {
        return Err(HcError::Invalid);
    }
    c.name[VM_NAME_LEN - 1] = 0;
    Ok(c)
}

/// VM_DESTROY.
pub fn vm_id(h: &impl HostMem, arg: u64, len: u64) -> Result<VmId, HcError> {
    let v: VmId = copy_in(h, arg, len)?;
    validate::vm_id(&v)?;
    Ok(v)
}

/// VM_IRQ.
pub fn vm_irq(h: &impl HostMem, arg: u64, len: u64) -> Result<VmIrq, HcError> {
    let q: VmIrq = copy_in(h, arg, len)?;
    validate::vm_irq(&q)?;
    Ok(q)
}

/// VM_LOAD: the request and the bytes to load, read from the host page
/// into `buf`.
pub fn vm_load<'a>(h: &impl HostMem, arg: u64, len: u64, buf: &'a mut [u8; 4096]) -> Result<(VmLoad, &'a [u8]), HcError> {
    let l: VmLoad = copy_in(h, arg, len)?;
    validate::vm_load(&l)?;
    if !h.owned(l.src, l.len) {
        return Err(HcError::Fault);
    }
    let data = &mut buf[..l.len as usize];
    h.read(l.src, data);
    Ok((l, data))
}

/// VM_GET_REGS and VM_SET_REGS; for SET the register file is checked.
pub fn vm_regs(h: &impl HostMem, arg: u64, len: u64, set: bool) -> Result<VmRegs, HcError> {
    let r: VmRegs = copy_in(h, arg, len)?;
    if set {
        validate::regs(&r.regs)?;
    }
    Ok(r)
}

/// VM_RUN: a block too short is `-EFAULT`, like one the host does not own
/// (docs/hypercalls.md).
pub fn vm_run(h: &impl HostMem, arg: u64, len: u64) -> Result<VmRun, HcError> {
    let size = size_of::<VmRun>() as u64;
    if len < size {
        return Err(HcError::Fault);
    }
    let r: VmRun = copy_in(h, arg, size)?;
    validate::vm_run(&r)?;
    Ok(r)
}

/// VM_RUN: writes the exit record into the block [`vm_run`] accepted.
pub fn run_record(h: &impl HostMem, arg: u64, rec: &ExitRecord) {
    h.write(arg + offset_of!(VmRun, exit) as u64, as_bytes(rec));
}

/// VM_FORK.
pub fn vm_fork(h: &impl HostMem, arg: u64, len: u64) -> Result<VmFork, HcError> {
    let f: VmFork = copy_in(h, arg, len)?;
    validate::vm_fork(&f)?;
    Ok(f)
}

/// VM_LIST: how many of `total` records the block has room for; those
/// must be host owned. A block shorter than one record only counts.
pub fn vm_list(h: &impl HostMem, arg: u64, len: u64, total: usize) -> Result<usize, HcError> {
    let size = size_of::<VmInfo>() as u64;
    let n = (len / size).min(total as u64);
    if n > 0 && !h.owned(arg, n * size) {
        return Err(HcError::Fault);
    }
    Ok(n as usize)
}

/// VM_LIST: writes the records into the block [`vm_list`] accepted.
pub fn listed(h: &impl HostMem, arg: u64, records: &[VmInfo]) {
    for (i, v) in records.iter().enumerate() {
        h.write(arg + (i * size_of::<VmInfo>()) as u64, as_bytes(v));
    }
}

/// DEBUG_TRANSLATE.
pub fn debug_translate(h: &impl HostMem, arg: u64, len: u64) -> Result<DebugTranslate, HcError> {
    let t: DebugTranslate = copy_in(h, arg, len)?;
    validate::debug_translate(&t)?;
    Ok(t)
}
