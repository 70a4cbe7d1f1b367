//! A hypervisor without CPUs, for tests and fuzzing: the host hypercalls
//! over mock physical memory.
//!
//! [`Model::dispatch`] takes a hypercall as the host issues it (number,
//! block address, block size) and answers with RAX and RDX. It reads its
//! blocks through [`decode`] and acts through [`vmops`], the code the image
//! runs; what it does without VMX is kept to bookkeeping: a table of VMs,
//! the host's ownership of its RAM (what the host EPT would map), and the
//! vCPUs' initial register files. RUN enters no guest: it checks its block
//! and reports the guest preempted before its first instruction
//! (`exit::INTR`). MERGE is not modelled (`-ENOSYS`).

use super::decode::{self, HostMem};
use super::vmops::{self, Limits};
use super::{status, HcError, VmError};
use crate::addr::{Hpa, PAGE_SIZE};
use crate::guestmem::GuestMem;
use crate::mem::mock::MockMem;
use crate::mem::PhysMem;
use crate::pool::FramePool;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use core::mem::MaybeUninit;
use shared_abi::{
    exit, hc, vm_state, ExitRecord, HvStats, HvVersion, MemRange, Regs, VmInfo, ABI_REVISION, FORK_COPY, HV_FEATURE_EPT,
    HV_FEATURE_UNRESTRICTED, HV_FEATURE_VMX, HV_FEATURE_VPID, VERSION, VM_NAME_LEN,
};

/// The host's RAM in the model: 7 MiB at 1 MiB and 16 MiB at 16 MiB.
pub const RAM: [MemRange; 2] = [MemRange { base: 0x10_0000, size: 0x70_0000 }, MemRange { base: 0x100_0000, size: 0x100_0000 }];
/// The hypervisor region, inside the first RAM range: never host owned.
pub const REGION: MemRange = MemRange { base: 0x40_0000, size: 0x20_0000 };

/// Host physical memory and what of it the host owns.
pub struct Host {
    pub mem: MockMem,
    /// Pages out of the host's reach (its EPT no longer maps them): those
    /// in the pool.
    pub taken: BTreeSet<u64>,
}

impl Host {
    pub fn new() -> Self {
        Host { mem: MockMem::new(), taken: BTreeSet::new() }
    }
}

impl Default for Host {
    fn default() -> Self {
        Self::new()
    }
}

impl HostMem for Host {
    fn owned(&self, pa: u64, len: u64) -> bool {
        let Some(end) = pa.checked_add(len) else { return false };
        if len == 0 || !RAM.iter().any(|r| r.base <= pa && end <= r.base + r.size) {
            return false;
        }
        if pa < REGION.base + REGION.size && REGION.base < end {
            return false;
        }
        self.taken.range(pa / PAGE_SIZE..=(end - 1) / PAGE_SIZE).next().is_none()
    }

    fn read(&self, pa: u64, buf: &mut [u8]) {
        assert!(buf.is_empty() || self.owned(pa, buf.len() as u64), "a hypercall read {:#x}+{:#x}, which the host does not own", pa, buf.len());
        self.mem.read(Hpa(pa), buf);
    }

    fn write(&self, pa: u64, buf: &[u8]) {
        assert!(buf.is_empty() || self.owned(pa, buf.len() as u64), "a hypercall wrote {:#x}+{:#x}, which the host does not own", pa, buf.len());
        self.mem.write(Hpa(pa), buf);
    }
}

/// A VM of the model.
pub struct ModelVm {
    pub id: u32,
    pub parent: u32,
    pub name: [u8; VM_NAME_LEN],
    pub mem_bytes: u64,
    pub mem: GuestMem,
    /// One VMCS frame per vCPU.
    pub vmcs: Vec<Hpa>,
    /// The vCPUs' initial register files.
    pub init: Vec<Regs>,
    pub state: u32,
    /// Live children.
    pub children: u32,
}

/// The model hypervisor.
pub struct Model {
    pub host: Host,
    pub pool: FramePool,
    pub vms: BTreeMap<u32, ModelVm>,
    pub limits: Limits,
    /// `BOOT_FLAG_DEBUG`: DEBUG_TRANSLATE is enabled.
    pub debug: bool,
    /// UNLOAD succeeded: the host runs natively again.
    pub unloaded: bool,
    next_id: u32,
}

impl Model {
    pub fn new(limits: Limits, debug: bool) -> Self {
        Model { host: Host::new(), pool: FramePool::new(), vms: BTreeMap::new(), limits, debug, unloaded: false, next_id: 1 }
    }

    /// Issues host hypercall `nr` with block `arg` of `len` bytes; returns
    /// (RAX, RDX).
    pub fn dispatch(&mut self, nr: u64, arg: u64, len: u64) -> (i64, u64) {
        let r = match nr {
            hc::VERSION => self.version(arg, len),
            hc::STATS => self.stats(arg, len),
            hc::UNLOAD => self.unload(),
            hc::DONATE => self.donate(arg, len),
            hc::RECLAIM => self.reclaim(arg, len),
            hc::VM_CREATE => self.vm_create(arg, len),
            hc::VM_DESTROY => self.vm_destroy(arg, len),
            hc::VM_LOAD => self.vm_load(arg, len),
            hc::VM_GET_REGS => self.vm_regs(arg, len, false),
            hc::VM_SET_REGS => self.vm_regs(arg, len, true),
            hc::VM_RUN => self.vm_run(arg, len),
            hc::VM_LIST => self.vm_list(arg, len),
            hc::VM_FORK => self.vm_fork(arg, len),
            hc::DEBUG_TRANSLATE => self.debug_translate(arg, len),
            _ => Err(HcError::NoSys),
        };
        status(r)
    }

    fn version(&mut self, arg: u64, len: u64) -> Result<i64, HcError> {
        let v = HvVersion {
            abi_revision: ABI_REVISION,
            num_cpus: 1,
            version: VERSION,
            features: HV_FEATURE_VMX | HV_FEATURE_EPT | HV_FEATURE_VPID | HV_FEATURE_UNRESTRICTED,
        };
        decode::copy_out(&self.host, arg, len, &v)?;
        Ok(0)
    }

    fn stats(&mut self, arg: u64, len: u64) -> Result<i64, HcError> {
        // SAFETY: `HvStats` is plain data; all zeros is a valid value.
        let mut s: alloc::boxed::Box<HvStats> = unsafe { alloc::boxed::Box::new(MaybeUninit::<HvStats>::zeroed().assume_init()) };
        s.abi_revision = ABI_REVISION;
        s.num_cpus = 1;
        s.hv_region_base = REGION.base;
        s.hv_region_size = REGION.size;
        s.pool_frames_total = self.pool.frames_total();
        s.pool_frames_free = self.pool.frames_free();
        s.frames_shared = self.pool.frames_shared();
        s.vms = self.vms.len() as u32;
        s.image_intact = 1;
        decode::copy_out(&self.host, arg, len, &*s)?;
        Ok(0)
    }

    fn unload(&mut self) -> Result<i64, HcError> {
        if !self.vms.is_empty() {
            return Err(HcError::Busy);
        }
        self.unloaded = true;
        Ok(0)
    }

    fn donate(&mut self, arg: u64, len: u64) -> Result<i64, HcError> {
        let ranges = decode::donate(&self.host, arg, len)?;
        // The ranges leave the host's EPT.
        for r in &ranges {
            self.host.taken.extend(r.base / PAGE_SIZE..(r.base + r.size) / PAGE_SIZE);
        }
        vmops::donate(&self.host.mem, &mut self.pool, &ranges).map(|n| n as i64)
    }

    fn reclaim(&mut self, arg: u64, len: u64) -> Result<i64, HcError> {
        let max = decode::reclaim(&self.host, arg, len)?;
        let frames = self.pool.reclaim(max);
        for f in &frames {
            self.host.taken.remove(&f.pfn());
        }
        decode::reclaimed(&self.host, arg, &frames);
        Ok(frames.len() as i64)
    }

    fn vm_create(&mut self, arg: u64, len: u64) -> Result<i64, HcError> {
        let mut c = decode::vm_create(&self.host, arg, len)?;
        let (g, vmcs) = vmops::take_frames(&self.host.mem, &mut self.pool, &self.limits, self.vms.len() as u32, c.mem_bytes, c.vcpus, None)?;
        let id = self.next_id;
        self.next_id += 1;
        let init = alloc::vec![vmops::boot_regs(c.mem_bytes); c.vcpus as usize];
        let vm = ModelVm { id, parent: 0, name: c.name, mem_bytes: c.mem_bytes, mem: g, vmcs, init, state: vm_state::CREATED, children: 0 };
        self.vms.insert(id, vm);
        c.id = id;
        decode::copy_out(&self.host, arg, len, &c)?;
        Ok(id as i64)
    }

    /// Destroys VM `id`: its frames go back to the pool.
    pub fn destroy(&mut self, id: u32) -> Result<(), VmError> {
        let vm = self.vms.remove(&id).ok_or(VmError::NoSuchVm)?;
        if let Some(p) = self.vms.get_mut(&vm.parent) {
            p.children = p.children.saturating_sub(1);
        }
        vmops::release(&self.host.mem, &mut self.pool, Some(vm.mem), &vm.vmcs);
        Ok(())
    }

    fn vm_destroy(&mut self, arg: u64, len: u64) -> Result<i64, HcError> {
        let v = decode::vm_id(&self.host, arg, len)?;
        self.destroy(v.id)?;
        Ok(0)
    }

    fn vm_load(&mut self, arg: u64, len: u64) -> Result<i64, HcError> {
        let mut buf = [0u8; 4096];
        let (l, data) = decode::vm_load(&self.host, arg, len, &mut buf)?;
        let vm = self.vms.get_mut(&l.vm).ok_or(VmError::NoSuchVm)?;
        vmops::load(&self.host.mem, &mut self.pool, &mut vm.mem, l.gpa, data)?;
        Ok(0)
    }

    fn vm_regs(&mut self, arg: u64, len: u64, set: bool) -> Result<i64, HcError> {
        let mut r = decode::vm_regs(&self.host, arg, len, set)?;
        let vm = self.vms.get_mut(&r.vm).ok_or(VmError::NoSuchVm)?;
        let mem_bytes = vm.mem_bytes;
        let init = vm.init.get_mut(r.vcpu as usize).ok_or(VmError::NoSuchVcpu)?;
        if set {
            *init = vmops::initial_regs(&r.regs, mem_bytes);
            return Ok(0);
        }
        r.regs = *init;
        decode::copy_out(&self.host, arg, len, &r)?;
        Ok(0)
    }

    fn vm_run(&mut self, arg: u64, len: u64) -> Result<i64, HcError> {
        let r = decode::vm_run(&self.host, arg, len)?;
        let vm = self.vms.get(&r.vm).ok_or(VmError::NoSuchVm)?;
        if r.vcpu as usize >= vm.init.len() {
            // Not ENOENT, as `hv::run` answers: the driver reads that as
            // "the VM is gone".
            return Err(HcError::Invalid);
        }
        decode::run_record(&self.host, arg, &ExitRecord { kind: exit::INTR, ..Default::default() });
        Ok(0)
    }

    fn vm_fork(&mut self, arg: u64, len: u64) -> Result<i64, HcError> {
        let mut f = decode::vm_fork(&self.host, arg, len)?;
        let count = self.vms.len() as u32;
        let parent = self.vms.get_mut(&f.vm).ok_or(VmError::NoSuchVm)?;
        let vcpus = parent.init.len();
        let copy = f.flags & FORK_COPY != 0;
        let child_mem = vmops::fork_memory(&self.host.mem, &mut self.pool, &self.limits, count, parent.children, &mut parent.mem, vcpus, copy)?;
        let (g, vmcs) = vmops::take_frames(&self.host.mem, &mut self.pool, &self.limits, count, parent.mem_bytes, vcpus as u32, Some(child_mem))?;
        parent.children += 1;
        let id = self.next_id;
        self.next_id += 1;
        let child = ModelVm {
            id,
            parent: f.vm,
            name: parent.name,
            mem_bytes: parent.mem_bytes,
            mem: g,
            vmcs,
            init: parent.init.clone(),
            state: vm_state::PAUSED,
            children: 0,
        };
        self.vms.insert(id, child);
        f.child = id;
        f.tsc = 0;
        decode::copy_out(&self.host, arg, len, &f)?;
        Ok(id as i64)
    }

    /// VM `vm`'s line in VM_LIST.
    pub fn info(&self, vm: &ModelVm) -> VmInfo {
        let (private, shared) = vmops::frames(&self.host.mem, &self.pool, Some(&vm.mem), vm.vmcs.len());
        VmInfo {
            id: vm.id,
            parent: vm.parent,
            state: vm.state,
            vcpus: vm.init.len() as u32,
            mem_bytes: vm.mem_bytes,
            frames_private: private,
            frames_shared: shared,
            exit_code: 0,
            stop_reason: 0,
            reserved0: 0,
            name: vm.name,
        }
    }

    fn vm_list(&mut self, arg: u64, len: u64) -> Result<i64, HcError> {
        let n = decode::vm_list(&self.host, arg, len, self.vms.len())?;
        let records: Vec<VmInfo> = self.vms.values().take(n).map(|v| self.info(v)).collect();
        decode::listed(&self.host, arg, &records);
        Ok(self.vms.len() as i64)
    }

    fn debug_translate(&mut self, arg: u64, len: u64) -> Result<i64, HcError> {
        if !self.debug {
            return Err(HcError::NoSys);
        }
        let mut t = decode::debug_translate(&self.host, arg, len)?;
        let vm = self.vms.get(&t.vm).ok_or(VmError::NoSuchVm)?;
        t.hpa = vmops::translate(&self.host.mem, &vm.mem, t.gpa)?;
        decode::copy_out(&self.host, arg, len, &t)?;
        Ok(0)
    }
}
