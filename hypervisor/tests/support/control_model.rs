//! A hypervisor without CPUs, for tests and fuzzing: the host hypercalls
//! over mock physical memory.
//!
//! [`Model::dispatch`] takes a hypercall as the host issues it (number,
//! block address, block size) and answers with RAX and RDX. [`Model`] is a
//! [`Platform`]: every call but those that need VMX goes through
//! [`super::dispatch`], the dispatcher the image runs, and the model only
//! carries out its steps, kept to bookkeeping: a table of VMs, the host's
//! ownership of its RAM (what the host EPT would map), and the vCPUs'
//! initial register files. It records the steps ([`Call`]) and can make
//! the shootdown or the IOMMU fail ([`Faults`]), so that tests see the
//! order the dispatcher acts in and its way back from a failure.
//!
//! What needs VMX is modelled here: RUN enters no guest (it checks its
//! block and reports the guest preempted before its first instruction,
//! `exit::INTR`), GET_REGS and SET_REGS read and write the initial register
//! files, UNLOAD refuses while VMs exist. MERGE is not modelled
//! (`-ENOSYS`).

use super::decode::{self, HostMem};
use super::platform::{Platform, Unacked};
use super::vmops::{self, Limits};
use super::{status, HcError, VmError};
use crate::addr::{Hpa, PhysRange, PAGE_SIZE};
use crate::guestmem::GuestMem;
use crate::mem::mock::MockMem;
use crate::mem::PhysMem;
use crate::pool::FramePool;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use shared_abi::{
    exit, hc, vm_state, ExitRecord, HvStats, MemRange, Regs, VmCreate, VmInfo, HV_FEATURE_EPT, HV_FEATURE_UNRESTRICTED, HV_FEATURE_VMX,
    HV_FEATURE_VPID, VM_NAME_LEN,
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

/// A step the dispatcher asked of the model, in the order it asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    HostUnmap(Vec<MemRange>),
    HostMap(Vec<PhysRange>),
    Shootdown,
    IommuUnmap(Vec<PhysRange>),
    IommuMap(Vec<PhysRange>),
    Scrub(MemRange),
    /// The pool was taken (locked, in the image).
    Pool,
}

/// Steps the model makes fail, as the image's may.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// A CPU does not acknowledge the TLB shootdown.
    pub shootdown: bool,
    /// The IOMMU cannot take pages out of, or put them back into, the DMA
    /// view.
    pub iommu: bool,
    /// The heap has no frame to split a large page of the host EPT: the
    /// first range of a DONATE leaves the host's EPT, then the unmap fails.
    pub heap: bool,
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
    /// VMs with a vCPU in the guest (set by tests: the model runs none).
    pub running: BTreeSet<u32>,
    /// The steps of the calls so far.
    pub calls: Vec<Call>,
    pub faults: Faults,
    next_id: u32,
}

impl Model {
    pub fn new(limits: Limits, debug: bool) -> Self {
        Model {
            host: Host::new(),
            pool: FramePool::new(),
            vms: BTreeMap::new(),
            limits,
            debug,
            unloaded: false,
            running: BTreeSet::new(),
            calls: Vec::new(),
            faults: Faults::default(),
            next_id: 1,
        }
    }

    /// Issues host hypercall `nr` with block `arg` of `len` bytes; returns
    /// (RAX, RDX).
    pub fn dispatch(&mut self, nr: u64, arg: u64, len: u64) -> (i64, u64) {
        // The steps of one call are kept, for the tests that look at them.
        self.calls.clear();
        let r = match nr {
            hc::UNLOAD => self.unload(),
            hc::VM_GET_REGS => self.vm_regs(arg, len, false),
            hc::VM_SET_REGS => self.vm_regs(arg, len, true),
            hc::VM_RUN => self.vm_run(arg, len),
            _ => super::dispatch(self, nr, arg, len),
        };
        status(r)
    }

    fn unload(&mut self) -> Result<i64, HcError> {
        if !self.vms.is_empty() {
            return Err(HcError::Busy);
        }
        self.unloaded = true;
        Ok(0)
    }

    /// Destroys VM `id`: its frames go back to the pool.
    pub fn destroy(&mut self, id: u32) -> Result<(), VmError> {
        let vm = self.vms.remove(&id).ok_or(VmError::NoSuchVm)?;
        if let Some(p) = self.vms.get_mut(&vm.parent) {
            p.children = p.children.saturating_sub(1);
        }
        self.running.remove(&id);
        vmops::release(&self.host.mem, &mut self.pool, Some(vm.mem), &vm.vmcs);
        Ok(())
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
}

/// The IOMMU's failure in the model: a unit that does not answer.
const IOMMU_TIMEOUT: crate::vtd::Error = crate::vtd::Error::Timeout { unit: Hpa(0xfed9_0000), wait: crate::vtd::Wait::Iotlb };

impl Platform for Model {
    type Mem = MockMem;
    type Host = Host;
    type Vm = u32;

    fn mem(&self) -> &MockMem {
        &self.host.mem
    }

    fn host(&self) -> &Host {
        &self.host
    }

    fn with_pool<R>(&mut self, f: impl FnOnce(&MockMem, &mut FramePool) -> R) -> R {
        self.calls.push(Call::Pool);
        f(&self.host.mem, &mut self.pool)
    }

    fn vmx(&self) -> bool {
        true
    }

    fn debug(&self) -> bool {
        self.debug
    }

    fn limits(&self) -> Limits {
        self.limits
    }

    fn host_unmap(&mut self, ranges: &[MemRange]) -> Result<(), HcError> {
        self.calls.push(Call::HostUnmap(ranges.to_vec()));
        for r in ranges {
            self.host.taken.extend(r.base / PAGE_SIZE..(r.base + r.size) / PAGE_SIZE);
            if self.faults.heap {
                return Err(HcError::NoMemory);
            }
        }
        Ok(())
    }

    fn host_map(&mut self, ranges: &[PhysRange]) -> Result<(), HcError> {
        self.calls.push(Call::HostMap(ranges.to_vec()));
        for r in ranges {
            for pfn in r.base.pfn()..r.end.pfn() {
                self.host.taken.remove(&pfn);
            }
        }
        Ok(())
    }

    fn shootdown(&mut self) -> Result<(), Unacked> {
        self.calls.push(Call::Shootdown);
        if self.faults.shootdown {
            return Err(Unacked);
        }
        Ok(())
    }

    fn iommu_unmap(&mut self, ranges: &[PhysRange]) -> Result<(), crate::vtd::Error> {
        self.calls.push(Call::IommuUnmap(ranges.to_vec()));
        if self.faults.iommu {
            return Err(IOMMU_TIMEOUT);
        }
        Ok(())
    }

    fn iommu_map(&mut self, ranges: &[PhysRange]) -> Result<(), crate::vtd::Error> {
        self.calls.push(Call::IommuMap(ranges.to_vec()));
        if self.faults.iommu {
            return Err(IOMMU_TIMEOUT);
        }
        Ok(())
    }

    fn scrub(&mut self, range: &MemRange) {
        self.calls.push(Call::Scrub(*range));
        vmops::scrub(&self.host.mem, range);
    }

    fn vm_count(&self) -> u32 {
        self.vms.len() as u32
    }

    fn vm(&self, id: u32) -> Result<u32, VmError> {
        self.vms.contains_key(&id).then_some(id).ok_or(VmError::NoSuchVm)
    }

    fn vm_running(&self, vm: &u32) -> bool {
        self.running.contains(vm)
    }

    fn with_vm_mem<R>(&mut self, vm: &u32, f: impl FnOnce(&MockMem, &mut FramePool, &mut GuestMem) -> R) -> Result<R, VmError> {
        let v = self.vms.get_mut(vm).ok_or(VmError::NoSuchVm)?;
        Ok(f(&self.host.mem, &mut self.pool, &mut v.mem))
    }

    fn vm_create(&mut self, c: &VmCreate) -> Result<u32, VmError> {
        let (g, vmcs) = vmops::take_frames(&self.host.mem, &mut self.pool, &self.limits, self.vms.len() as u32, c.mem_bytes, c.vcpus, None)?;
        let id = self.next_id;
        self.next_id += 1;
        let init = alloc::vec![vmops::boot_regs(c.mem_bytes); c.vcpus as usize];
        let vm = ModelVm { id, parent: 0, name: c.name, mem_bytes: c.mem_bytes, mem: g, vmcs, init, state: vm_state::CREATED, children: 0 };
        self.vms.insert(id, vm);
        Ok(id)
    }

    fn vm_destroy(&mut self, id: u32) -> Result<(), VmError> {
        self.destroy(id)
    }

    fn vm_ended(&self, _vm: &u32) -> bool {
        // The model's guests never run, so never end.
        false
    }

    fn vm_hold(&mut self, vm: &u32) -> bool {
        !self.running.contains(vm)
    }

    fn vm_release(&mut self, _vm: &u32) {}

    fn vm_fork(&mut self, vm: &u32, copy: bool) -> Result<u32, VmError> {
        let count = self.vms.len() as u32;
        let parent = self.vms.get_mut(vm).ok_or(VmError::NoSuchVm)?;
        let vcpus = parent.init.len();
        let child_mem = vmops::fork_memory(&self.host.mem, &mut self.pool, &self.limits, count, parent.children, &mut parent.mem, vcpus, copy)?;
        let (g, vmcs) = vmops::take_frames(&self.host.mem, &mut self.pool, &self.limits, count, parent.mem_bytes, vcpus as u32, Some(child_mem))?;
        parent.children += 1;
        let id = self.next_id;
        self.next_id += 1;
        let child = ModelVm {
            id,
            parent: *vm,
            name: parent.name,
            mem_bytes: parent.mem_bytes,
            mem: g,
            vmcs,
            init: parent.init.clone(),
            state: vm_state::PAUSED,
            children: 0,
        };
        self.vms.insert(id, child);
        Ok(id)
    }

    fn vm_list(&mut self) -> Vec<VmInfo> {
        self.vms.values().map(|v| self.info(v)).collect()
    }

    fn num_cpus(&self) -> u32 {
        1
    }

    fn features(&self) -> u64 {
        HV_FEATURE_VMX | HV_FEATURE_EPT | HV_FEATURE_VPID | HV_FEATURE_UNRESTRICTED
    }

    fn tsc(&self) -> u64 {
        0
    }

    fn stats(&mut self, s: &mut HvStats) {
        s.hv_region_base = REGION.base;
        s.hv_region_size = REGION.size;
        s.image_intact = 1;
    }
}
