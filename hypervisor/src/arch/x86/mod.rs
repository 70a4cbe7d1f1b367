//! Intel VT-x: entry formats, VMCS fields and exit reasons (portable data),
//! and, in the image only, the privileged instructions and VMX operation.
pub mod ept_entry;
pub mod exit_reason;
pub mod msr;
pub mod vmcs_fields;

#[cfg(target_os = "none")]
pub mod apic;
#[cfg(target_os = "none")]
pub mod asm;
#[cfg(target_os = "none")]
pub mod cpu;
#[cfg(target_os = "none")]
pub mod instr;
#[cfg(target_os = "none")]
pub mod iommu;
#[cfg(target_os = "none")]
pub mod physmap;
#[cfg(target_os = "none")]
pub mod unload;
#[cfg(target_os = "none")]
pub mod vmx;
