// SPDX-License-Identifier: GPL-2.0
//! `/dev/uxen` and the VM descriptors: the ioctl boundary.
//!
//! Every ioctl argument is copied in, validated here, and only then turned
//! into a hypercall; failures become an errno at this one place.

use crate::abi::{self, ioctl};
use crate::validate;
use crate::driver;
use core::ffi::c_void;
use core::sync::atomic::Ordering;
use kernel::prelude::*;
use kernel::uaccess::UserSlice;

/// Text of a NUL-padded version field.
pub(crate) fn version_str(v: &[u8]) -> &str {
    core::str::from_utf8(abi::cstr_bytes(v)).unwrap_or("?")
}

/// A refused argument: every rule of `shared-abi/src/validate.rs` is
/// `EINVAL` here.
fn invalid(_: validate::Invalid) -> Error {
    EINVAL
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
        ioctl::CREATE_VM => create_vm(drv, arg),
        ioctl::LIST => list(drv, arg),
        ioctl::DESTROY => destroy(drv, arg),
        ioctl::DEBUG_TRANSLATE => debug_translate(drv, arg),
        ioctl::DEBUG_POOL => debug_pool(drv, arg),
        ioctl::MERGE => merge(drv, arg),
        _ => Err(ENOTTY),
    })
}

fn need_active(drv: &crate::Driver) -> Result {
    if drv.hv.active() {
        Ok(())
    } else {
        Err(ENODEV)
    }
}

fn create_vm(drv: &crate::Driver, arg: usize) -> Result<i64> {
    need_active(drv)?;
    let mut req: abi::VmCreate = read_user(arg)?;
    validate::vm_create(&req).map_err(invalid)?;
    if req.tsc_khz != 0 {
        return Err(EINVAL);
    }
    // A Linux guest runs on the host's TSC and is told its rate.
    req.tsc_khz = crate::shim::tsc_khz();
    let mut b = HcBuf::new(req)?;
    let id = b.call_donating(drv, abi::hc::VM_CREATE)? as u32;
    let fd = match vm_fd(id) {
        Ok(fd) => fd,
        Err(e) => {
            destroy_id(drv, id);
            return Err(e);
        }
    };
    b.value.id = id;
    if let Err(e) = write_user(arg, &*b.value) {
        // The descriptor is installed; its release destroys the VM.
        return Err(e);
    }
    Ok(fd as i64)
}

/// A VM descriptor's private data.
struct VmHandle {
    id: u32,
}

fn vm_fd(id: u32) -> Result<i32> {
    let h = KBox::new(VmHandle { id }, GFP_KERNEL)?;
    let p = KBox::into_raw(h);
    // SAFETY: `p` stays valid until `uxen_vm_release`, which frees it.
    match unsafe { crate::shim::vm_fd(p.cast()) } {
        Ok(fd) => Ok(fd),
        Err(e) => {
            // SAFETY: the descriptor was not installed; we still own `p`.
            drop(unsafe { KBox::from_raw(p) });
            Err(e)
        }
    }
}

/// After a destroy: wake halted vCPUs (theirs may be gone) and give the
/// pool back if no VM is left.
fn destroyed(drv: &crate::Driver) {
    wake_halted(drv);
    drv.hv.reclaim_if_idle();
}

/// Wakes every vCPU halted in RUN, to look again at its VM: it may have
/// been destroyed, or have an interrupt to take.
fn wake_halted(drv: &crate::Driver) {
    drv.wake_gen.fetch_add(1, Ordering::AcqRel);
    drv.halt_wq.wake();
}

fn destroy_id(drv: &crate::Driver, id: u32) -> i64 {
    let Ok(mut b) = HcBuf::new(abi::VmId { id, reserved0: 0 }) else {
        return -(abi::errno::ENOMEM);
    };
    let r = b.call(drv, abi::hc::VM_DESTROY).err().map(|e| e.to_errno() as i64).unwrap_or(0);
    destroyed(drv);
    r
}

fn destroy(drv: &crate::Driver, arg: usize) -> Result<i64> {
    need_active(drv)?;
    let v: abi::VmId = read_user(arg)?;
    validate::vm_id(&v).map_err(invalid)?;
    let mut b = HcBuf::new(v)?;
    b.call(drv, abi::hc::VM_DESTROY)?;
    destroyed(drv);
    Ok(0)
}

fn list(drv: &crate::Driver, arg: usize) -> Result<i64> {
    need_active(drv)?;
    let req: abi::IocBuf = read_user(arg)?;
    let size = core::mem::size_of::<abi::VmInfo>();
    let n = validate::list_records(req.len) as usize;
    let mut buf = KVec::<u8>::from_elem(0, n.max(1) * size, GFP_KERNEL)?;
    let pa = crate::shim::virt_to_phys(buf.as_mut_ptr());
    let (s, _) = drv.hv.call(abi::hc::VM_LIST, pa, (n * size) as u64);
    let total = crate::hv::status(s)? as usize;
    UserSlice::new(req.ptr as usize, n * size).writer().write_slice(&buf[..n.min(total) * size])?;
    Ok(total as i64)
}

/// MERGE: a whole re-merging pass (`merge.rs`).
fn merge(drv: &crate::Driver, arg: usize) -> Result<i64> {
    need_active(drv)?;
    let req: abi::MergeScan = read_user(arg)?;
    if req.flags != 0 || req.max_pages != 0 {
        return Err(EINVAL);
    }
    let out = crate::merge::pass(drv, req.vm)?;
    write_user(arg, &out)?;
    Ok(0)
}

/// Donates pages to the hypervisor's pool, or takes the free ones back, on
/// request: tests aim device DMA at donated pages with it.
fn debug_pool(drv: &crate::Driver, arg: usize) -> Result<i64> {
    need_active(drv)?;
    if !crate::shim::params().debug {
        return Err(EPERM);
    }
    let mut p: abi::DebugPool = read_user(arg)?;
    match p.op {
        abi::DEBUG_POOL_DONATE if (1..=512).contains(&p.pages) => {
            let (base, pages) = drv.hv.donate(p.pages as u64)?;
            p.base = base;
            p.pages = pages as u32;
        }
        abi::DEBUG_POOL_RECLAIM if p.pages == 0 => {
            p.base = 0;
            p.pages = drv.hv.reclaim_all() as u32;
        }
        _ => return Err(EINVAL),
    }
    write_user(arg, &p)?;
    Ok(0)
}

fn debug_translate(drv: &crate::Driver, arg: usize) -> Result<i64> {
    need_active(drv)?;
    if !crate::shim::params().debug {
        return Err(EPERM);
    }
    let t: abi::DebugTranslate = read_user(arg)?;
    validate::debug_translate(&t).map_err(invalid)?;
    let mut b = HcBuf::new(t)?;
    b.call(drv, abi::hc::DEBUG_TRANSLATE)?;
    write_user(arg, &*b.value)?;
    Ok(0)
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

    fn pa(&mut self) -> u64 {
        crate::shim::virt_to_phys((&mut *self.value as *mut T).cast())
    }

    /// Issues hypercall `nr` on this block.
    fn call(&mut self, drv: &crate::Driver, nr: u64) -> Result<i64> {
        let (s, _) = drv.hv.call(nr, self.pa(), core::mem::size_of::<T>() as u64);
        crate::hv::status(s)
    }

    /// Issues hypercall `nr` on this block, donating pages as asked.
    fn call_donating(&mut self, drv: &crate::Driver, nr: u64) -> Result<i64> {
        drv.hv.call_donating(nr, self.pa(), core::mem::size_of::<T>() as u64)
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
    validate::stats_buf(&req).map_err(invalid)?;
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
extern "C" fn uxen_vm_release(private: *mut c_void) {
    // SAFETY: the shim hands back the pointer `vm_fd` installed; this is its
    // last use.
    let h = unsafe { KBox::from_raw(private as *mut VmHandle) };
    if let Some(drv) = driver() {
        // A VM lives as long as its descriptor.
        destroy_id(drv, h.id);
    }
}

#[no_mangle]
extern "C" fn uxen_vm_ioctl(private: *mut c_void, cmd: u32, arg: usize) -> core::ffi::c_long {
    let Some(drv) = driver() else {
        return ENODEV.to_errno() as core::ffi::c_long;
    };
    // SAFETY: valid until release, which cannot run during an ioctl.
    let h = unsafe { &*(private as *const VmHandle) };
    to_ret(match cmd {
        ioctl::VM_LOAD => vm_load(drv, h, arg),
        ioctl::VM_GET_REGS => vm_regs(drv, h, arg, false),
        ioctl::VM_SET_REGS => vm_regs(drv, h, arg, true),
        ioctl::VM_RUN => vm_run(drv, h, arg),
        ioctl::VM_FORK => vm_fork(drv, h, arg),
        ioctl::VM_IRQ => vm_irq(drv, h, arg),
        ioctl::VM_ID => write_user(arg, &abi::VmId { id: h.id, reserved0: 0 }).map(|_| 0),
        _ => Err(ENOTTY),
    })
}

fn vm_load(drv: &crate::Driver, h: &VmHandle, arg: usize) -> Result<i64> {
    let req: abi::IocLoad = read_user(arg)?;
    validate::ioc_load(&req).map_err(invalid)?;
    let page = crate::shim::Pages::alloc(0)?;
    let mut reader = UserSlice::new(req.data as usize, req.len as usize).reader();
    for c in validate::load_chunks(&req) {
        // SAFETY: our page, 4096 bytes; a chunk is at most that.
        let dst = unsafe { core::slice::from_raw_parts_mut(page.virt(), c.len as usize) };
        reader.read_slice(dst)?;
        let mut b = HcBuf::new(abi::VmLoad { vm: h.id, reserved0: 0, gpa: c.gpa, src: page.phys(), len: c.len })?;
        b.call_donating(drv, abi::hc::VM_LOAD)?;
        crate::shim::cond_resched();
    }
    Ok(0)
}

fn vm_regs(drv: &crate::Driver, h: &VmHandle, arg: usize, set: bool) -> Result<i64> {
    let mut r: abi::VmRegs = read_user(arg)?;
    r.vm = h.id;
    if set {
        validate::regs(&r.regs).map_err(invalid)?;
    }
    let mut b = HcBuf::new(r)?;
    b.call(drv, if set { abi::hc::VM_SET_REGS } else { abi::hc::VM_GET_REGS })?;
    if !set {
        write_user(arg, &*b.value)?;
    }
    Ok(0)
}

/// FORK: a copy-on-write clone of the VM (its vCPUs must be out of RUN);
/// returns the child's descriptor.
fn vm_fork(drv: &crate::Driver, h: &VmHandle, arg: usize) -> Result<i64> {
    let req: abi::VmFork = read_user(arg)?;
    validate::vm_fork(&req).map_err(invalid)?;
    let mut b = HcBuf::new(abi::VmFork { vm: h.id, child: 0, flags: req.flags, reserved0: 0, tsc: 0 })?;
    let child = b.call_donating(drv, abi::hc::VM_FORK)? as u32;
    let fd = match vm_fd(child) {
        Ok(fd) => fd,
        Err(e) => {
            destroy_id(drv, child);
            return Err(e);
        }
    };
    write_user(arg, &abi::VmFork { vm: h.id, child, flags: req.flags, reserved0: 0, tsc: b.value.tsc })?;
    Ok(fd as i64)
}

/// VM_IRQ: drives an input of a Linux guest's IOAPIC, then wakes halted
/// vCPUs so that the one the interrupt went to takes it.
fn vm_irq(drv: &crate::Driver, h: &VmHandle, arg: usize) -> Result<i64> {
    let mut q: abi::VmIrq = read_user(arg)?;
    q.vm = h.id;
    validate::vm_irq(&q).map_err(invalid)?;
    let mut b = HcBuf::new(q)?;
    b.call(drv, abi::hc::VM_IRQ)?;
    wake_halted(drv);
    Ok(0)
}

/// Longest sleep of a halted vCPU before RUN looks again. A destroy wakes
/// it at once; so does a signal.
const HALT_POLL_MS: u32 = 1000;

fn vm_run(drv: &crate::Driver, h: &VmHandle, arg: usize) -> Result<i64> {
    let mut req: abi::VmRun = read_user(arg)?;
    req.vm = h.id;
    validate::vm_run(&req).map_err(invalid)?;
    let mut b = HcBuf::new(req)?;
    loop {
        let pa = b.pa();
        // Read before the guest runs: a wake-up that comes after the guest
        // halted, but before the sleep below, is not missed.
        let gen = drv.wake_gen.load(Ordering::Acquire);
        let (s, aux) = crate::shim::with_fpu(|| crate::hv::vmcall(abi::hc::VM_RUN, pa, core::mem::size_of::<abi::VmRun>() as u64));
        drv.hv.drain_log();
        if s == abi::HC_NEED_PAGES {
            drv.hv.donate(aux)?;
            continue;
        }
        if s == -(abi::errno::ENOENT) {
            // Destroyed through /dev/uxen while this descriptor lived.
            b.value.exit = abi::ExitRecord { kind: abi::exit::SHUTDOWN, reason: abi::stop::DESTROYED, ..Default::default() };
            break;
        }
        crate::hv::status(s)?;
        let kind = b.value.exit.kind;
        if b.value.console_len != 0 && matches!(kind, abi::exit::INTR | abi::exit::HLT | abi::exit::KICK) {
            // Console bytes for the VMM: it sees this exit (harmless to
            // it) rather than losing them to the next RUN.
            if kind == abi::exit::KICK {
                wake_halted(drv);
                b.value.exit.kind = abi::exit::INTR;
            }
            break;
        }
        match kind {
            abi::exit::INTR => {
                if crate::shim::signal_pending() {
                    return Err(EINTR);
                }
                crate::shim::cond_resched();
            }
            abi::exit::KICK => {
                // The guest sent an IPI to a vCPU that may sleep below.
                wake_halted(drv);
                if crate::shim::signal_pending() {
                    return Err(EINTR);
                }
            }
            abi::exit::HLT if req.flags & abi::VMRUN_NO_WAIT == 0 => {
                let deadline = b.value.exit.data;
                let ms = match crate::shim::tsc_khz() {
                    0 => HALT_POLL_MS,
                    khz if deadline != 0 => {
                        let now = crate::hv::rdtsc();
                        (deadline.saturating_sub(now) / khz as u64).min(HALT_POLL_MS as u64) as u32
                    }
                    _ => HALT_POLL_MS,
                };
                if ms > 0 {
                    drv.halt_wq.wait(&drv.wake_gen, gen, ms);
                }
                if crate::shim::signal_pending() {
                    return Err(EINTR);
                }
            }
            abi::exit::HYPERCALL if b.value.exit.hc_nr == abi::ghc::FORK => {
                // The guest forked itself: the child needs a descriptor in
                // this process before RUN returns, or nothing would own it.
                let child = b.value.exit.hc_args[0] as u32;
                b.value.exit.hc_args[1] = match vm_fd(child) {
                    Ok(fd) => fd as u64,
                    Err(e) => {
                        destroy_id(drv, child);
                        e.to_errno() as i64 as u64
                    }
                };
                break;
            }
            _ => break,
        }
        // Nothing for the VMM: the guest continues.
        b.value.exit = abi::ExitRecord::default();
    }
    write_user(arg, &*b.value)?;
    Ok(0)
}
