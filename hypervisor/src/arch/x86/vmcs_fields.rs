//! VMCS field encodings. See: SDM Vol. 3D, Appendix B.
#![allow(dead_code)]

// 16-bit control, guest-state and host-state fields.
pub const VPID: u32 = 0x0000;
pub const GUEST_ES_SELECTOR: u32 = 0x0800;
pub const GUEST_CS_SELECTOR: u32 = 0x0802;
pub const GUEST_SS_SELECTOR: u32 = 0x0804;
pub const GUEST_DS_SELECTOR: u32 = 0x0806;
pub const GUEST_FS_SELECTOR: u32 = 0x0808;
pub const GUEST_GS_SELECTOR: u32 = 0x080a;
pub const GUEST_LDTR_SELECTOR: u32 = 0x080c;
pub const GUEST_TR_SELECTOR: u32 = 0x080e;
pub const HOST_ES_SELECTOR: u32 = 0x0c00;
pub const HOST_CS_SELECTOR: u32 = 0x0c02;
pub const HOST_SS_SELECTOR: u32 = 0x0c04;
pub const HOST_DS_SELECTOR: u32 = 0x0c06;
pub const HOST_FS_SELECTOR: u32 = 0x0c08;
pub const HOST_GS_SELECTOR: u32 = 0x0c0a;
pub const HOST_TR_SELECTOR: u32 = 0x0c0c;

// 64-bit control fields.
pub const IO_BITMAP_A: u32 = 0x2000;
pub const IO_BITMAP_B: u32 = 0x2002;
pub const MSR_BITMAP: u32 = 0x2004;
pub const VM_EXIT_MSR_STORE_ADDR: u32 = 0x2006;
pub const VM_EXIT_MSR_LOAD_ADDR: u32 = 0x2008;
pub const VM_ENTRY_MSR_LOAD_ADDR: u32 = 0x200a;
pub const TSC_OFFSET: u32 = 0x2010;
pub const EPT_POINTER: u32 = 0x201a;
pub const XSS_EXIT_BITMAP: u32 = 0x202c;
pub const GUEST_PHYSICAL_ADDRESS: u32 = 0x2400;

// 64-bit guest-state fields.
pub const VMCS_LINK_POINTER: u32 = 0x2800;
pub const GUEST_IA32_DEBUGCTL: u32 = 0x2802;
pub const GUEST_IA32_PAT: u32 = 0x2804;
pub const GUEST_IA32_EFER: u32 = 0x2806;
pub const GUEST_PDPTE0: u32 = 0x280a;
pub const GUEST_PDPTE1: u32 = 0x280c;
pub const GUEST_PDPTE2: u32 = 0x280e;
pub const GUEST_PDPTE3: u32 = 0x2810;

// 64-bit host-state fields.
pub const HOST_IA32_PAT: u32 = 0x2c00;
pub const HOST_IA32_EFER: u32 = 0x2c02;

// 32-bit control fields.
pub const PIN_BASED_CONTROLS: u32 = 0x4000;
pub const PRIMARY_PROC_CONTROLS: u32 = 0x4002;
pub const EXCEPTION_BITMAP: u32 = 0x4004;
pub const PAGE_FAULT_ERROR_MASK: u32 = 0x4006;
pub const PAGE_FAULT_ERROR_MATCH: u32 = 0x4008;
pub const CR3_TARGET_COUNT: u32 = 0x400a;
pub const EXIT_CONTROLS: u32 = 0x400c;
pub const EXIT_MSR_STORE_COUNT: u32 = 0x400e;
pub const EXIT_MSR_LOAD_COUNT: u32 = 0x4010;
pub const ENTRY_CONTROLS: u32 = 0x4012;
pub const ENTRY_MSR_LOAD_COUNT: u32 = 0x4014;
pub const ENTRY_INTERRUPTION_INFO: u32 = 0x4016;
pub const ENTRY_EXCEPTION_ERROR_CODE: u32 = 0x4018;
pub const ENTRY_INSTRUCTION_LENGTH: u32 = 0x401a;
pub const TPR_THRESHOLD: u32 = 0x401c;
pub const SECONDARY_PROC_CONTROLS: u32 = 0x401e;

// 32-bit read-only data fields.
pub const VM_INSTRUCTION_ERROR: u32 = 0x4400;
pub const EXIT_REASON: u32 = 0x4402;
pub const EXIT_INTERRUPTION_INFO: u32 = 0x4404;
pub const EXIT_INTERRUPTION_ERROR_CODE: u32 = 0x4406;
pub const IDT_VECTORING_INFO: u32 = 0x4408;
pub const IDT_VECTORING_ERROR_CODE: u32 = 0x440a;
pub const EXIT_INSTRUCTION_LENGTH: u32 = 0x440c;
pub const EXIT_INSTRUCTION_INFO: u32 = 0x440e;

// 32-bit guest-state fields.
pub const GUEST_ES_LIMIT: u32 = 0x4800;
pub const GUEST_CS_LIMIT: u32 = 0x4802;
pub const GUEST_SS_LIMIT: u32 = 0x4804;
pub const GUEST_DS_LIMIT: u32 = 0x4806;
pub const GUEST_FS_LIMIT: u32 = 0x4808;
pub const GUEST_GS_LIMIT: u32 = 0x480a;
pub const GUEST_LDTR_LIMIT: u32 = 0x480c;
pub const GUEST_TR_LIMIT: u32 = 0x480e;
pub const GUEST_GDTR_LIMIT: u32 = 0x4810;
pub const GUEST_IDTR_LIMIT: u32 = 0x4812;
pub const GUEST_ES_AR: u32 = 0x4814;
pub const GUEST_CS_AR: u32 = 0x4816;
pub const GUEST_SS_AR: u32 = 0x4818;
pub const GUEST_DS_AR: u32 = 0x481a;
pub const GUEST_FS_AR: u32 = 0x481c;
pub const GUEST_GS_AR: u32 = 0x481e;
pub const GUEST_LDTR_AR: u32 = 0x4820;
pub const GUEST_TR_AR: u32 = 0x4822;
pub const GUEST_INTERRUPTIBILITY: u32 = 0x4824;
pub const GUEST_ACTIVITY_STATE: u32 = 0x4826;
pub const GUEST_SMBASE: u32 = 0x4828;
pub const GUEST_IA32_SYSENTER_CS: u32 = 0x482a;
pub const PREEMPTION_TIMER_VALUE: u32 = 0x482e;

// 32-bit host-state field.
pub const HOST_IA32_SYSENTER_CS: u32 = 0x4c00;

// Natural-width control fields.
pub const CR0_GUEST_HOST_MASK: u32 = 0x6000;
pub const CR4_GUEST_HOST_MASK: u32 = 0x6002;
pub const CR0_READ_SHADOW: u32 = 0x6004;
pub const CR4_READ_SHADOW: u32 = 0x6006;

// Natural-width read-only data fields.
pub const EXIT_QUALIFICATION: u32 = 0x6400;
pub const GUEST_LINEAR_ADDRESS: u32 = 0x640a;

// Natural-width guest-state fields.
pub const GUEST_CR0: u32 = 0x6800;
pub const GUEST_CR3: u32 = 0x6802;
pub const GUEST_CR4: u32 = 0x6804;
pub const GUEST_ES_BASE: u32 = 0x6806;
pub const GUEST_CS_BASE: u32 = 0x6808;
pub const GUEST_SS_BASE: u32 = 0x680a;
pub const GUEST_DS_BASE: u32 = 0x680c;
pub const GUEST_FS_BASE: u32 = 0x680e;
pub const GUEST_GS_BASE: u32 = 0x6810;
pub const GUEST_LDTR_BASE: u32 = 0x6812;
pub const GUEST_TR_BASE: u32 = 0x6814;
pub const GUEST_GDTR_BASE: u32 = 0x6816;
pub const GUEST_IDTR_BASE: u32 = 0x6818;
pub const GUEST_DR7: u32 = 0x681a;
pub const GUEST_RSP: u32 = 0x681c;
pub const GUEST_RIP: u32 = 0x681e;
pub const GUEST_RFLAGS: u32 = 0x6820;
pub const GUEST_PENDING_DBG_EXCEPTIONS: u32 = 0x6822;
pub const GUEST_IA32_SYSENTER_ESP: u32 = 0x6824;
pub const GUEST_IA32_SYSENTER_EIP: u32 = 0x6826;

// Natural-width host-state fields.
pub const HOST_CR0: u32 = 0x6c00;
pub const HOST_CR3: u32 = 0x6c02;
pub const HOST_CR4: u32 = 0x6c04;
pub const HOST_FS_BASE: u32 = 0x6c06;
pub const HOST_GS_BASE: u32 = 0x6c08;
pub const HOST_TR_BASE: u32 = 0x6c0a;
pub const HOST_GDTR_BASE: u32 = 0x6c0c;
pub const HOST_IDTR_BASE: u32 = 0x6c0e;
pub const HOST_IA32_SYSENTER_ESP: u32 = 0x6c10;
pub const HOST_IA32_SYSENTER_EIP: u32 = 0x6c12;
pub const HOST_RSP: u32 = 0x6c14;
pub const HOST_RIP: u32 = 0x6c16;

/// Pin-based VM-execution controls. See: SDM Vol. 3C, 25.6.1.
pub mod pin {
    pub const EXTERNAL_INTERRUPT_EXITING: u32 = 1 << 0;
    pub const NMI_EXITING: u32 = 1 << 3;
    pub const VIRTUAL_NMIS: u32 = 1 << 5;
    pub const PREEMPTION_TIMER: u32 = 1 << 6;
}

/// Primary processor-based controls. See: SDM Vol. 3C, 25.6.2.
pub mod proc1 {
    pub const INTERRUPT_WINDOW_EXITING: u32 = 1 << 2;
    pub const USE_TSC_OFFSETTING: u32 = 1 << 3;
    pub const HLT_EXITING: u32 = 1 << 7;
    pub const INVLPG_EXITING: u32 = 1 << 9;
    pub const MWAIT_EXITING: u32 = 1 << 10;
    pub const RDPMC_EXITING: u32 = 1 << 11;
    pub const RDTSC_EXITING: u32 = 1 << 12;
    pub const CR3_LOAD_EXITING: u32 = 1 << 15;
    pub const CR3_STORE_EXITING: u32 = 1 << 16;
    pub const CR8_LOAD_EXITING: u32 = 1 << 19;
    pub const CR8_STORE_EXITING: u32 = 1 << 20;
    pub const NMI_WINDOW_EXITING: u32 = 1 << 22;
    pub const MOV_DR_EXITING: u32 = 1 << 23;
    pub const UNCONDITIONAL_IO_EXITING: u32 = 1 << 24;
    pub const USE_IO_BITMAPS: u32 = 1 << 25;
    pub const MONITOR_TRAP_FLAG: u32 = 1 << 27;
    pub const USE_MSR_BITMAPS: u32 = 1 << 28;
    pub const MONITOR_EXITING: u32 = 1 << 29;
    pub const PAUSE_EXITING: u32 = 1 << 30;
    pub const ACTIVATE_SECONDARY: u32 = 1 << 31;
}

/// Secondary processor-based controls. See: SDM Vol. 3C, 25.6.2.
pub mod proc2 {
    pub const ENABLE_EPT: u32 = 1 << 1;
    pub const DESCRIPTOR_TABLE_EXITING: u32 = 1 << 2;
    pub const ENABLE_RDTSCP: u32 = 1 << 3;
    pub const ENABLE_VPID: u32 = 1 << 5;
    pub const WBINVD_EXITING: u32 = 1 << 6;
    pub const UNRESTRICTED_GUEST: u32 = 1 << 7;
    pub const ENABLE_INVPCID: u32 = 1 << 12;
    pub const ENABLE_VMFUNC: u32 = 1 << 13;
    pub const ENABLE_XSAVES: u32 = 1 << 20;
}

/// VM-exit controls. See: SDM Vol. 3C, 25.7.1.
pub mod exit_ctl {
    pub const SAVE_DEBUG_CONTROLS: u32 = 1 << 2;
    pub const HOST_ADDRESS_SPACE_SIZE: u32 = 1 << 9;
    pub const ACK_INTERRUPT_ON_EXIT: u32 = 1 << 15;
    pub const SAVE_IA32_PAT: u32 = 1 << 18;
    pub const LOAD_IA32_PAT: u32 = 1 << 19;
    pub const SAVE_IA32_EFER: u32 = 1 << 20;
    pub const LOAD_IA32_EFER: u32 = 1 << 21;
    pub const SAVE_PREEMPTION_TIMER: u32 = 1 << 22;
}

/// VM-entry controls. See: SDM Vol. 3C, 25.8.1.
pub mod entry_ctl {
    pub const LOAD_DEBUG_CONTROLS: u32 = 1 << 2;
    pub const IA32E_MODE_GUEST: u32 = 1 << 9;
    pub const LOAD_IA32_PAT: u32 = 1 << 14;
    pub const LOAD_IA32_EFER: u32 = 1 << 15;
}

/// Guest activity states. See: SDM Vol. 3C, 25.4.2.
pub mod activity {
    pub const ACTIVE: u64 = 0;
    pub const HLT: u64 = 1;
    pub const SHUTDOWN: u64 = 2;
    pub const WAIT_FOR_SIPI: u64 = 3;
}

/// VM-entry interruption-information field. See: SDM Vol. 3C, 25.8.3.
pub mod intr {
    pub const VALID: u32 = 1 << 31;
    pub const DELIVER_ERROR_CODE: u32 = 1 << 11;
    pub const TYPE_EXTERNAL: u32 = 0 << 8;
    pub const TYPE_NMI: u32 = 2 << 8;
    pub const TYPE_HW_EXCEPTION: u32 = 3 << 8;
    pub const VECTOR_GP: u32 = 13;
    pub const VECTOR_UD: u32 = 6;
    pub const VECTOR_PF: u32 = 14;
    pub const VECTOR_NMI: u32 = 2;
}

/// Adjusts desired control bits to what the CPU allows: `allowed` is an
/// `IA32_VMX_*_CTLS` MSR (low half: must be 1, high half: may be 1).
pub fn adjust_controls(desired: u32, allowed: u64) -> u32 {
    let must1 = allowed as u32;
    let may1 = (allowed >> 32) as u32;
    (desired | must1) & may1
}

/// Whether every bit of `wanted` survives [`adjust_controls`].
pub fn controls_supported(wanted: u32, allowed: u64) -> bool {
    adjust_controls(wanted, allowed) & wanted == wanted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_adjustment() {
        // must be 1: bit 1; may be 1: bits 0..=3.
        let allowed = (0xfu64 << 32) | 0x2;
        assert_eq!(adjust_controls(0x1, allowed), 0x3);
        assert_eq!(adjust_controls(0x10, allowed), 0x2);
        assert!(controls_supported(0x8, allowed));
        assert!(!controls_supported(0x10, allowed));
    }
}
