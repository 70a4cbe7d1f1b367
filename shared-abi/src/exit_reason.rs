// SPDX-License-Identifier: GPL-2.0
//! The names of VMX basic exit reasons (SDM Vol. 3D, Appendix C), the one
//! table the hypervisor's logs and `uxenctl stats` share. Names are the
//! SDM's, upper case with underscores; [`json_name`] gives the lower-case
//! form that `uxenctl stats --json` uses as a key.

/// Basic exit reasons 0 to 77, by number.
pub const NAMES: [&str; 78] = [
    "EXCEPTION_NMI", "EXTERNAL_INTERRUPT", "TRIPLE_FAULT", "INIT", "SIPI", "IO_SMI", "OTHER_SMI",
    "INTERRUPT_WINDOW", "NMI_WINDOW", "TASK_SWITCH", "CPUID", "GETSEC", "HLT", "INVD", "INVLPG",
    "RDPMC", "RDTSC", "RSM", "VMCALL", "VMCLEAR", "VMLAUNCH", "VMPTRLD", "VMPTRST", "VMREAD",
    "VMRESUME", "VMWRITE", "VMXOFF", "VMXON", "CR_ACCESS", "DR_ACCESS", "IO_INSTRUCTION", "RDMSR",
    "WRMSR", "ENTRY_FAIL_GUEST_STATE", "ENTRY_FAIL_MSR_LOAD", "REASON_35", "MWAIT", "MONITOR_TRAP_FLAG",
    "REASON_38", "MONITOR", "PAUSE", "ENTRY_FAIL_MCE", "REASON_42", "TPR_BELOW_THRESHOLD",
    "APIC_ACCESS", "VIRTUALIZED_EOI", "GDTR_IDTR", "LDTR_TR", "EPT_VIOLATION", "EPT_MISCONFIG",
    "INVEPT", "RDTSCP", "PREEMPTION_TIMER", "INVVPID", "WBINVD", "XSETBV", "APIC_WRITE", "RDRAND",
    "INVPCID", "VMFUNC", "ENCLS", "RDSEED", "PML_FULL", "XSAVES", "XRSTORS", "PCONFIG", "SPP",
    "UMWAIT", "TPAUSE", "LOADIWKEY", "ENCLV", "REASON_71", "ENQCMD_PASID", "ENQCMDS_PASID",
    "BUS_LOCK", "INSTRUCTION_TIMEOUT", "SEAMCALL", "TDCALL",
];

/// The name of basic exit reason `n`; `UNKNOWN` past the table.
pub const fn name(n: u16) -> &'static str {
    if (n as usize) < NAMES.len() {
        NAMES[n as usize]
    } else {
        "UNKNOWN"
    }
}

/// The name of a statistics slot (`CpuStats::exits_by_reason`): the last
/// slot counts every reason past the others, `OTHER`.
pub const fn slot_name(slot: usize) -> &'static str {
    if slot == crate::EXIT_REASON_SLOTS - 1 {
        "OTHER"
    } else {
        name(slot as u16)
    }
}

/// The name in lower case, as a JSON key (`ept_violation`, `cpuid`).
pub fn json_name(slot: usize) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (o, b) in out.iter_mut().zip(slot_name(slot).bytes()) {
        *o = b.to_ascii_lowercase();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_sdm_numbers() {
        // A few fixed points of SDM Vol. 3D, Table C-1: a shift in the
        // table moves all of them.
        assert_eq!(name(0), "EXCEPTION_NMI");
        assert_eq!(name(10), "CPUID");
        assert_eq!(name(30), "IO_INSTRUCTION");
        assert_eq!(name(48), "EPT_VIOLATION");
        assert_eq!(name(52), "PREEMPTION_TIMER");
        assert_eq!(name(55), "XSETBV");
        assert_eq!(name(77), "TDCALL");
        assert_eq!(name(78), "UNKNOWN");
        assert_eq!(slot_name(crate::EXIT_REASON_SLOTS - 1), "OTHER");
        let j = json_name(48);
        assert_eq!(&j[..13], b"ept_violation");
        assert_eq!(j[13], 0);
        // Every name fits the JSON buffer and is distinct.
        for (i, a) in NAMES.iter().enumerate() {
            assert!(a.len() < 32);
            assert!(NAMES[i + 1..].iter().all(|b| a != b), "{a} twice");
        }
    }
}
