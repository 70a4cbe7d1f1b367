//! VM operations on the frame pool and guest memory, shared by the image
//! (`hv::vm`, `hv::hypercall`) and the host-side [`model`](super::model).
//!
//! They hold the frame accounting of a VM's life: what it takes when it is
//! created or forked, what it gives back when it is destroyed, and how its
//! frames are counted. None of them touches VMX state; the image adds that
//! (VMCS formatting, VPIDs, vCPU states) around them.

use super::{HcError, VmError};
use crate::addr::{Gpa, Hpa, PAGE_SIZE};
use crate::guestmem::{GuestMem, MemError};
use crate::mem::PhysMem;
use crate::pool::FramePool;
use alloc::vec::Vec;
use shared_abi::{validate, MemRange, Regs, VmCreate, MAX_VMS, VM_MAX_CHILDREN};

/// Free frames VM_CREATE needs: the EPT root, one VMCS per vCPU, and room
/// for the first page (three tables and the page).
pub const fn create_need(vcpus: u32) -> u64 {
    1 + vcpus as u64 + 4
}

/// Free frames VM_FORK needs before it shares (or copies) the memory: the
/// child's VMCS pages and room for its root and first page.
pub const fn fork_need(vcpus: usize) -> u64 {
    vcpus as u64 + 8
}

/// Whether a VM of `mem_bytes` with `vcpus` vCPUs may exist.
pub fn check_shape(mem_bytes: u64, vcpus: u32) -> Result<(), VmError> {
    validate::vm_create(&VmCreate { mem_bytes, vcpus, ..Default::default() }).map_err(|_| VmError::Invalid)
}

/// The initial register file of vCPU 0 (docs/guest-abi.md): 64-bit mode,
/// paging on with CR3 at the boot PML4, RSP at the top of memory, RDI the
/// memory size.
pub fn boot_regs(mem_bytes: u64) -> Regs {
    Regs {
        rsp: mem_bytes,
        rdi: mem_bytes,
        rflags: 2,
        cr0: 0x8001_0033,
        cr3: shared_abi::guest::PML4_GPA,
        cr4: 0x20,
        efer: 0x500,
        ..Default::default()
    }
}

/// The initial register file VM_SET_REGS stores for `given` (which
/// [`shared_abi::validate::regs`] accepted): CR0, CR4 and EFER stay those
/// of [`boot_regs`], and RFLAGS bit 1 is set.
pub fn initial_regs(given: &Regs, mem_bytes: u64) -> Regs {
    let fixed = boot_regs(mem_bytes);
    Regs { cr0: fixed.cr0, cr4: fixed.cr4, efer: fixed.efer, rflags: given.rflags | 2, ..*given }
}

/// How many VMs may exist, and how many live children one VM may have.
/// The image uses [`LIMITS`]; the host-side model takes smaller ones, so
/// that fuzzing reaches them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub vms: u32,
    pub children: u32,
}

/// The ABI's limits: [`MAX_VMS`] and [`VM_MAX_CHILDREN`].
pub const LIMITS: Limits = Limits { vms: MAX_VMS, children: VM_MAX_CHILDREN };

/// A new VM's frames: its memory (`memory`, a fork's, or new and empty)
/// and one VMCS frame per vCPU, zeroed. `vms` VMs exist already. On
/// failure nothing is kept: a given memory is destroyed as well.
pub fn take_frames(
    mem: &impl PhysMem,
    pool: &mut FramePool,
    limits: &Limits,
    vms: u32,
    mem_bytes: u64,
    vcpus: u32,
    memory: Option<GuestMem>,
) -> Result<(GuestMem, Vec<Hpa>), VmError> {
    let need = create_need(vcpus);
    let free = pool.frames_free();
    let refused = if let Err(e) = check_shape(mem_bytes, vcpus) {
        Some(e)
    } else if vms >= limits.vms {
        Some(VmError::TooMany)
    } else if free < need {
        // The shortfall is counted before a fork's memory goes back to the
        // pool: counted after, it could be negative.
        Some(VmError::Mem(MemError::NeedPages(need - free)))
    } else {
        None
    };
    if let Some(e) = refused {
        release(mem, pool, memory, &[]);
        return Err(e);
    }
    let g = match memory {
        Some(m) => m,
        None => GuestMem::new(mem, pool, mem_bytes)?,
    };
    let mut vmcs = Vec::with_capacity(vcpus as usize);
    for _ in 0..vcpus {
        match pool.alloc() {
            Some(f) => vmcs.push(f),
            None => {
                release(mem, pool, Some(g), &vmcs);
                return Err(VmError::Mem(MemError::NeedPages(1)));
            }
        }
    }
    Ok((g, vmcs))
}

/// A fork's memory: `parent`'s shared copy-on-write, or with `copy` a full
/// private copy. `vms` VMs exist and the parent has `children` live
/// children. The parent's vCPUs must not run; after a shared fork the
/// parent's TLBs must be flushed before it runs again.
#[allow(clippy::too_many_arguments)]
pub fn fork_memory(
    mem: &impl PhysMem,
    pool: &mut FramePool,
    limits: &Limits,
    vms: u32,
    children: u32,
    parent: &mut GuestMem,
    vcpus: usize,
    copy: bool,
) -> Result<GuestMem, VmError> {
    if children >= limits.children {
        return Err(VmError::Limit);
    }
    if vms >= limits.vms {
        return Err(VmError::TooMany);
    }
    let need = fork_need(vcpus);
    let free = pool.frames_free();
    if free < need {
        return Err(VmError::Mem(MemError::NeedPages(need - free)));
    }
    Ok(if copy { parent.copy(mem, pool)? } else { parent.fork(mem, pool)? })
}

/// Gives a VM's frames back: every reference of its memory (frames shared
/// with other VMs stay with them) and its VMCS frames, scrubbed.
pub fn release(mem: &impl PhysMem, pool: &mut FramePool, memory: Option<GuestMem>, vmcs: &[Hpa]) {
    if let Some(g) = memory {
        g.destroy(mem, pool);
    }
    for &f in vmcs {
        let _ = pool.put(mem, f);
    }
}

/// VM_LOAD: copies `data` into guest memory at `gpa`.
pub fn load(mem: &impl PhysMem, pool: &mut FramePool, g: &mut GuestMem, gpa: u64, data: &[u8]) -> Result<(), VmError> {
    g.write(mem, pool, Gpa(gpa), data)?;
    Ok(())
}

/// A VM's frames for VM_LIST: (private, shared). Private counts the mapped
/// frames only it references, its own EPT tables and its VMCS pages.
pub fn frames(mem: &impl PhysMem, pool: &FramePool, g: Option<&GuestMem>, vcpus: usize) -> (u64, u64) {
    match g {
        Some(g) => {
            let s = g.stats(mem, pool);
            (s.private + s.tables + vcpus as u64, s.shared)
        }
        None => (0, 0),
    }
}

/// DEBUG_TRANSLATE: the host-physical address behind `gpa` (frame plus
/// offset), or 0 if the page has no frame yet. A `gpa` beyond guest memory
/// is `-EFAULT`: the EPT walk looks at bits 12-47 only, so it would
/// otherwise answer for an alias below 2^48.
pub fn translate(mem: &impl PhysMem, g: &GuestMem, gpa: u64) -> Result<u64, VmError> {
    if gpa >= g.size {
        return Err(VmError::Mem(MemError::OutOfRange));
    }
    Ok(g.lookup(mem, Gpa(gpa)).map(|(p, _)| p.0 + (gpa & (PAGE_SIZE - 1))).unwrap_or(0))
}

/// Zeroes every page of `range`.
pub fn scrub(mem: &impl PhysMem, range: &MemRange) {
    for p in 0..range.size / PAGE_SIZE {
        mem.zero_page(Hpa(range.base + p * PAGE_SIZE));
    }
}

/// DONATE, once the ranges are out of the host's reach and scrubbed: adds
/// them to the pool. Returns the number of pages.
pub fn donate(pool: &mut FramePool, ranges: &[MemRange]) -> Result<u64, HcError> {
    let mut total = 0;
    for r in ranges {
        let pages = r.size / PAGE_SIZE;
        pool.donate(Hpa(r.base), pages as usize).map_err(|_| HcError::Invalid)?;
        total += pages;
    }
    Ok(total)
}
