//! What the host hypercall dispatcher ([`super::dispatch`]) needs of the
//! machine it runs on.
//!
//! The image implements [`Platform`] over the running hypervisor (the host
//! EPT, the TLB shootdown, VT-d, the table of VMs with their vCPUs and
//! VMCS pages); the model of the unit tests and fuzz harnesses implements
//! it over mock memory. Both run the one dispatcher, so what it decides,
//! and in which order it asks the machine to act, is tested as shipped.
//!
//! Each method is one step the dispatcher orders; none decides whether a
//! call is allowed, only how the step is done on this machine.

use super::vmops::Limits;
use super::{HcError, HostMem, VmError};
use crate::addr::PhysRange;
use crate::guestmem::GuestMem;
use crate::mem::PhysMem;
use crate::pool::FramePool;
use alloc::vec::Vec;
use shared_abi::{HvStats, MemRange, VmCreate, VmInfo};

/// A TLB shootdown was not acknowledged in time: a CPU may still hold
/// translations made before it, so the change it was to make final must be
/// undone (or what it would have freed kept).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unacked;

/// The machine under the host hypercall dispatcher.
pub trait Platform {
    /// Physical memory: pool frames and guest memory.
    type Mem: PhysMem;
    /// Host memory as the argument blocks are read and written.
    type Host: HostMem;
    /// A reference to one VM, held for the length of a hypercall.
    type Vm;

    /// Physical memory.
    fn mem(&self) -> &Self::Mem;
    /// The host's memory, for the argument blocks.
    fn host(&self) -> &Self::Host;
    /// Runs `f` with the frame pool (locked for the length of `f`).
    fn with_pool<R>(&mut self, f: impl FnOnce(&Self::Mem, &mut FramePool) -> R) -> R;
    /// Whether the hypervisor runs guests (VT-x on); without it only the
    /// calls that need no VMX are served.
    fn vmx(&self) -> bool;
    /// Whether the debug hypercalls are enabled (`BOOT_FLAG_DEBUG`).
    fn debug(&self) -> bool;
    /// The VM limits.
    fn limits(&self) -> Limits;

    /// Takes `ranges` out of the host's EPT. On failure some pages may be
    /// out already; [`Platform::host_map`] puts them back. Tables the EPT no
    /// longer needs are freed only after the next successful
    /// [`Platform::shootdown`].
    fn host_unmap(&mut self, ranges: &[MemRange]) -> Result<(), HcError>;
    /// Maps `ranges` back into the host's EPT (whole 2 MiB blocks may
    /// become large pages again).
    fn host_map(&mut self, ranges: &[PhysRange]) -> Result<(), HcError>;
    /// Makes every CPU drop the EPT translations made before the call.
    fn shootdown(&mut self) -> Result<(), Unacked>;
    /// Takes `ranges` out of every device's DMA view; on failure they may
    /// still be reachable.
    fn iommu_unmap(&mut self, ranges: &[PhysRange]) -> Result<(), crate::vtd::Error>;
    /// Puts `ranges` back into every device's DMA view.
    fn iommu_map(&mut self, ranges: &[PhysRange]) -> Result<(), crate::vtd::Error>;
    /// Zeroes every page of `range`, so that no host data reaches a guest.
    fn scrub(&mut self, range: &MemRange) {
        super::vmops::scrub(self.mem(), range);
    }

    /// The number of VMs.
    fn vm_count(&self) -> u32;
    /// VM `id`.
    fn vm(&self, id: u32) -> Result<Self::Vm, VmError>;
    /// Whether a vCPU of `vm` is in the guest now.
    fn vm_running(&self, vm: &Self::Vm) -> bool;
    /// Runs `f` with `vm`'s memory and the pool (locked in that order);
    /// [`VmError::NoSuchVm`] if the VM is being destroyed.
    fn with_vm_mem<R>(&mut self, vm: &Self::Vm, f: impl FnOnce(&Self::Mem, &mut FramePool, &mut GuestMem) -> R) -> Result<R, VmError>;
    /// Creates a VM as `c` (checked by `decode::vm_create`) asks; returns its
    /// id. On failure nothing is kept.
    fn vm_create(&mut self, c: &VmCreate) -> Result<u32, VmError>;
    /// Destroys VM `id`; its frames go back to the pool.
    fn vm_destroy(&mut self, id: u32) -> Result<(), VmError>;
    /// Whether `vm` has ended or is being destroyed: it cannot be forked.
    fn vm_ended(&self, vm: &Self::Vm) -> bool;
    /// Holds every vCPU of `vm` out of the guest, or none if one is in it
    /// (then `false`).
    fn vm_hold(&mut self, vm: &Self::Vm) -> bool;
    /// Lets the vCPUs [`Platform::vm_hold`] held run again.
    fn vm_release(&mut self, vm: &Self::Vm);
    /// Forks `vm`, whose vCPUs are held: the child shares its memory
    /// copy-on-write, or with `copy` gets a full copy. Returns the child's
    /// id.
    fn vm_fork(&mut self, vm: &Self::Vm, copy: bool) -> Result<u32, VmError>;
    /// Every VM's line for VM_LIST, in id order.
    fn vm_list(&mut self) -> Vec<VmInfo>;

    /// The number of CPUs.
    fn num_cpus(&self) -> u32;
    /// The `HV_FEATURE_*` bits.
    fn features(&self) -> u64;
    /// A time stamp, in TSC ticks.
    fn tsc(&self) -> u64;
    /// Fills the figures of STATS only this machine knows (the host EPT,
    /// the CPUs, the heap, VT-d, merging). The dispatcher fills the rest.
    fn stats(&mut self, s: &mut HvStats);
}
