//! The host hypercall dispatcher, over any [`Platform`]: the image runs it
//! on the hypervisor (`hv::hypercall`), the unit tests and fuzz harnesses
//! on the model.
//!
//! It decides what a call may do and in which order the machine acts;
//! the platform only carries the steps out. The calls that need the
//! running VMX context (UNLOAD, VM_RUN, VM_GET_REGS and VM_SET_REGS,
//! VM_IRQ, MERGE, POLL, HOST_CPU, DEBUG_FAULTS) stay with the caller,
//! which answers them before it comes here; anything else unknown here is
//! `-ENOSYS`.

use super::platform::Platform;
use super::{decode, vmops, HcError, VmError};
use crate::addr::{Hpa, PhysRange, PAGE_SIZE};
use alloc::boxed::Box;
use alloc::vec::Vec;
use shared_abi::{hc, HvStats, HvVersion, ABI_REVISION, FORK_COPY, VERSION};

/// Host hypercall `nr` with argument block `arg` of `len` bytes.
pub fn dispatch<P: Platform>(p: &mut P, nr: u64, arg: u64, len: u64) -> Result<i64, HcError> {
    match nr {
        hc::VERSION => version(p, arg, len),
        hc::STATS => stats(p, arg, len),
        hc::DONATE => donate(p, arg, len),
        hc::RECLAIM => reclaim(p, arg, len),
        hc::VM_LIST => vm_list(p, arg, len),
        hc::VM_CREATE | hc::VM_DESTROY | hc::VM_LOAD | hc::VM_FORK | hc::DEBUG_TRANSLATE if !p.vmx() => Err(HcError::NoVmx),
        hc::VM_CREATE => vm_create(p, arg, len),
        hc::VM_DESTROY => vm_destroy(p, arg, len),
        hc::VM_LOAD => vm_load(p, arg, len),
        hc::VM_FORK => vm_fork(p, arg, len),
        hc::DEBUG_TRANSLATE => debug_translate(p, arg, len),
        _ => Err(HcError::NoSys),
    }
}

fn version<P: Platform>(p: &mut P, arg: u64, len: u64) -> Result<i64, HcError> {
    let v = HvVersion { abi_revision: ABI_REVISION, num_cpus: p.num_cpus(), version: VERSION, features: p.features() };
    decode::copy_out(p.host(), arg, len, &v)?;
    Ok(0)
}

fn stats<P: Platform>(p: &mut P, arg: u64, len: u64) -> Result<i64, HcError> {
    // SAFETY: `HvStats` is a `Block`, valid for any bytes, zeros included.
    // It is too big for the hypervisor's stack.
    let mut s: Box<HvStats> = unsafe { Box::new_zeroed().assume_init() };
    s.abi_revision = ABI_REVISION;
    s.num_cpus = p.num_cpus();
    p.with_pool(|_, pool| {
        s.pool_frames_total = pool.frames_total();
        s.pool_frames_free = pool.frames_free();
        s.frames_shared = pool.frames_shared();
    });
    s.vms = p.vm_count();
    p.stats(&mut s);
    decode::copy_out(p.host(), arg, len, &*s)?;
    Ok(0)
}

/// DONATE: pages leave the host for the pool. The order is the point: no
/// CPU (host EPT, then the shootdown) and no device (the IOMMU) may reach
/// a page any more before it is scrubbed, and it is scrubbed before the
/// pool may hand it to a guest. If a step fails, the pages stay the
/// host's and nothing is scrubbed or pooled.
fn donate<P: Platform>(p: &mut P, arg: u64, len: u64) -> Result<i64, HcError> {
    // Also refuses pages already donated (no longer the host's) and
    // overlaps between ranges of this call.
    let ranges = decode::donate(p.host(), arg, len)?;
    let phys: Vec<PhysRange> = ranges.iter().map(|r| PhysRange::new(r.base, r.size)).collect();
    let unmapped = p.host_unmap(&ranges);
    // No CPU may keep a translation to the pages, even if only some of
    // them left the host's EPT.
    if p.shootdown().is_err() {
        p.host_map(&phys)?;
        return Err(HcError::Busy);
    }
    if let Err(e) = unmapped {
        p.host_map(&phys)?;
        return Err(e);
    }
    if let Err(e) = p.iommu_unmap(&phys) {
        // The IOMMU logs why; the pages go back to the host everywhere.
        let _ = p.iommu_map(&phys);
        p.host_map(&phys)?;
        return Err(HcError::Iommu(e));
    }
    for r in &ranges {
        p.scrub(r);
    }
    p.with_pool(|_, pool| vmops::donate(pool, &ranges)).map(|n| n as i64)
}

/// Runs of physically contiguous frames, as ranges.
fn runs(frames: &[Hpa]) -> Vec<PhysRange> {
    let mut out: Vec<PhysRange> = Vec::new();
    for f in frames {
        match out.last_mut() {
            Some(r) if r.end == *f => r.end = Hpa(f.0 + PAGE_SIZE),
            _ => out.push(PhysRange::new(f.0, PAGE_SIZE)),
        }
    }
    out
}

/// RECLAIM: free pool frames (scrubbed when they were freed) go back to the
/// host.
fn reclaim<P: Platform>(p: &mut P, arg: u64, len: u64) -> Result<i64, HcError> {
    let max = decode::reclaim(p.host(), arg, len)?;
    let frames = p.with_pool(|_, pool| pool.reclaim(max));
    let back = runs(&frames);
    // Devices may reach them again. If the IOMMU cannot follow (it logs
    // why), the host still gets the pages; DMA to them keeps faulting.
    let _ = p.iommu_map(&back);
    p.host_map(&back)?;
    decode::reclaimed(p.host(), arg, &frames);
    Ok(frames.len() as i64)
}

fn vm_create<P: Platform>(p: &mut P, arg: u64, len: u64) -> Result<i64, HcError> {
    let mut c = decode::vm_create(p.host(), arg, len)?;
    c.id = p.vm_create(&c)?;
    log::info!("vm{}: created, {} MiB, {} vCPU{}", c.id, c.mem_bytes >> 20, c.vcpus, if c.flags & shared_abi::VM_FLAG_LINUX != 0 { ", Linux PC" } else { "" });
    decode::copy_out(p.host(), arg, len, &c)?;
    Ok(c.id as i64)
}

fn vm_destroy<P: Platform>(p: &mut P, arg: u64, len: u64) -> Result<i64, HcError> {
    let v = decode::vm_id(p.host(), arg, len)?;
    p.vm_destroy(v.id)?;
    log::info!("vm{}: destroyed", v.id);
    Ok(0)
}

/// VM_LOAD: only into a VM none of whose vCPUs is in the guest, which
/// could otherwise see its memory change under it.
fn vm_load<P: Platform>(p: &mut P, arg: u64, len: u64) -> Result<i64, HcError> {
    let mut buf = [0u8; 4096];
    let (l, data) = decode::vm_load(p.host(), arg, len, &mut buf)?;
    let vm = p.vm(l.vm)?;
    if p.vm_running(&vm) {
        return Err(HcError::Busy);
    }
    p.with_vm_mem(&vm, |m, pool, g| vmops::load(m, pool, g, l.gpa, data))??;
    Ok(0)
}

/// VM_FORK from the host: every vCPU of the VM is held out of the guest
/// while its memory is shared or copied.
fn vm_fork<P: Platform>(p: &mut P, arg: u64, len: u64) -> Result<i64, HcError> {
    let mut f = decode::vm_fork(p.host(), arg, len)?;
    let vm = p.vm(f.vm)?;
    if p.vm_ended(&vm) {
        return Err(HcError::Vm(VmError::Invalid));
    }
    if !p.vm_hold(&vm) {
        return Err(HcError::Busy);
    }
    let t0 = p.tsc();
    let copy = f.flags & FORK_COPY != 0;
    let r = p.vm_fork(&vm, copy);
    let tsc = p.tsc().wrapping_sub(t0);
    p.vm_release(&vm);
    f.child = r?;
    f.tsc = tsc;
    log::info!("vm{}: forked vm{}{}", f.vm, f.child, if copy { " (full copy)" } else { "" });
    decode::copy_out(p.host(), arg, len, &f)?;
    Ok(f.child as i64)
}

fn vm_list<P: Platform>(p: &mut P, arg: u64, len: u64) -> Result<i64, HcError> {
    let list = p.vm_list();
    let n = decode::vm_list(p.host(), arg, len, list.len())?;
    decode::listed(p.host(), arg, &list[..n]);
    Ok(list.len() as i64)
}

/// DEBUG_TRANSLATE: only with the debug boot flag.
fn debug_translate<P: Platform>(p: &mut P, arg: u64, len: u64) -> Result<i64, HcError> {
    if !p.debug() {
        return Err(HcError::NoSys);
    }
    let mut t = decode::debug_translate(p.host(), arg, len)?;
    let vm = p.vm(t.vm)?;
    t.hpa = p.with_vm_mem(&vm, |m, _, g| vmops::translate(m, g, t.gpa))??;
    decode::copy_out(p.host(), arg, len, &t)?;
    Ok(0)
}
