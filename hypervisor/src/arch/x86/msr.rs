//! Model-specific registers the hypervisor uses or guards.
#![allow(dead_code)]

pub const IA32_APIC_BASE: u32 = 0x1b;
pub const IA32_FEATURE_CONTROL: u32 = 0x3a;
pub const IA32_SYSENTER_CS: u32 = 0x174;
pub const IA32_SYSENTER_ESP: u32 = 0x175;
pub const IA32_SYSENTER_EIP: u32 = 0x176;
pub const IA32_DEBUGCTL: u32 = 0x1d9;
pub const IA32_PAT: u32 = 0x277;
pub const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const IA32_VMX_BASIC: u32 = 0x480;
pub const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
pub const IA32_VMX_EXIT_CTLS: u32 = 0x483;
pub const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
pub const IA32_VMX_MISC: u32 = 0x485;
pub const IA32_VMX_CR0_FIXED0: u32 = 0x486;
pub const IA32_VMX_CR0_FIXED1: u32 = 0x487;
pub const IA32_VMX_CR4_FIXED0: u32 = 0x488;
pub const IA32_VMX_CR4_FIXED1: u32 = 0x489;
pub const IA32_VMX_VMCS_ENUM: u32 = 0x48a;
pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48b;
pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48c;
pub const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48d;
pub const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48e;
pub const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48f;
pub const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
pub const IA32_VMX_VMFUNC: u32 = 0x491;
pub const IA32_VMX_PROCBASED_CTLS3: u32 = 0x492;
pub const IA32_VMX_EXIT_CTLS2: u32 = 0x493;
pub const IA32_EFER: u32 = 0xc000_0080;
pub const IA32_FS_BASE: u32 = 0xc000_0100;
pub const IA32_GS_BASE: u32 = 0xc000_0101;
pub const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const X2APIC_ICR: u32 = 0x830;

/// `IA32_FEATURE_CONTROL` bits. See: SDM Vol. 3C, 24.7.
pub const FC_LOCK: u64 = 1 << 0;
pub const FC_VMX_IN_SMX: u64 = 1 << 1;
pub const FC_VMX_OUTSIDE_SMX: u64 = 1 << 2;
/// SENTER local function enables and global enable (bits 14:8, 15).
pub const FC_SENTER_MASK: u64 = 0xff00;

/// Whether `msr` is one of the VMX capability MSRs.
pub const fn is_vmx_capability(msr: u32) -> bool {
    msr >= IA32_VMX_BASIC && msr <= IA32_VMX_EXIT_CTLS2
}
