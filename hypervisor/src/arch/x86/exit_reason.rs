//! Basic VM-exit reasons. See: SDM Vol. 3D, Appendix C.

/// A basic exit reason (bits 15:0 of the exit-reason field).
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    ExceptionOrNmi = 0,
    ExternalInterrupt = 1,
    TripleFault = 2,
    Init = 3,
    Sipi = 4,
    IoSmi = 5,
    OtherSmi = 6,
    InterruptWindow = 7,
    NmiWindow = 8,
    TaskSwitch = 9,
    Cpuid = 10,
    Getsec = 11,
    Hlt = 12,
    Invd = 13,
    Invlpg = 14,
    Rdpmc = 15,
    Rdtsc = 16,
    Rsm = 17,
    Vmcall = 18,
    Vmclear = 19,
    Vmlaunch = 20,
    Vmptrld = 21,
    Vmptrst = 22,
    Vmread = 23,
    Vmresume = 24,
    Vmwrite = 25,
    Vmxoff = 26,
    Vmxon = 27,
    CrAccess = 28,
    DrAccess = 29,
    IoInstruction = 30,
    Rdmsr = 31,
    Wrmsr = 32,
    EntryFailGuestState = 33,
    EntryFailMsrLoad = 34,
    Mwait = 36,
    MonitorTrapFlag = 37,
    Monitor = 39,
    Pause = 40,
    EntryFailMachineCheck = 41,
    TprBelowThreshold = 43,
    ApicAccess = 44,
    VirtualizedEoi = 45,
    GdtrIdtrAccess = 46,
    LdtrTrAccess = 47,
    EptViolation = 48,
    EptMisconfig = 49,
    Invept = 50,
    Rdtscp = 51,
    PreemptionTimer = 52,
    Invvpid = 53,
    Wbinvd = 54,
    Xsetbv = 55,
    ApicWrite = 56,
    Rdrand = 57,
    Invpcid = 58,
    Vmfunc = 59,
    Encls = 60,
    Rdseed = 61,
    PmlFull = 62,
    Xsaves = 63,
    Xrstors = 64,
    Pconfig = 65,
    SppEvent = 66,
    Umwait = 67,
    Tpause = 68,
    Loadiwkey = 69,
    Enclv = 70,
    EnqcmdPasid = 72,
    EnqcmdsPasid = 73,
    BusLock = 74,
    InstructionTimeout = 75,
    Seamcall = 76,
    Tdcall = 77,
}

impl TryFrom<u16> for ExitReason {
    type Error = u16;

    fn try_from(v: u16) -> Result<Self, u16> {
        use ExitReason::*;
        Ok(match v {
            0 => ExceptionOrNmi,
            1 => ExternalInterrupt,
            2 => TripleFault,
            3 => Init,
            4 => Sipi,
            5 => IoSmi,
            6 => OtherSmi,
            7 => InterruptWindow,
            8 => NmiWindow,
            9 => TaskSwitch,
            10 => Cpuid,
            11 => Getsec,
            12 => Hlt,
            13 => Invd,
            14 => Invlpg,
            15 => Rdpmc,
            16 => Rdtsc,
            17 => Rsm,
            18 => Vmcall,
            19 => Vmclear,
            20 => Vmlaunch,
            21 => Vmptrld,
            22 => Vmptrst,
            23 => Vmread,
            24 => Vmresume,
            25 => Vmwrite,
            26 => Vmxoff,
            27 => Vmxon,
            28 => CrAccess,
            29 => DrAccess,
            30 => IoInstruction,
            31 => Rdmsr,
            32 => Wrmsr,
            33 => EntryFailGuestState,
            34 => EntryFailMsrLoad,
            36 => Mwait,
            37 => MonitorTrapFlag,
            39 => Monitor,
            40 => Pause,
            41 => EntryFailMachineCheck,
            43 => TprBelowThreshold,
            44 => ApicAccess,
            45 => VirtualizedEoi,
            46 => GdtrIdtrAccess,
            47 => LdtrTrAccess,
            48 => EptViolation,
            49 => EptMisconfig,
            50 => Invept,
            51 => Rdtscp,
            52 => PreemptionTimer,
            53 => Invvpid,
            54 => Wbinvd,
            55 => Xsetbv,
            56 => ApicWrite,
            57 => Rdrand,
            58 => Invpcid,
            59 => Vmfunc,
            60 => Encls,
            61 => Rdseed,
            62 => PmlFull,
            63 => Xsaves,
            64 => Xrstors,
            65 => Pconfig,
            66 => SppEvent,
            67 => Umwait,
            68 => Tpause,
            69 => Loadiwkey,
            70 => Enclv,
            72 => EnqcmdPasid,
            73 => EnqcmdsPasid,
            74 => BusLock,
            75 => InstructionTimeout,
            76 => Seamcall,
            77 => Tdcall,
            _ => return Err(v),
        })
    }
}

impl ExitReason {
    /// Decodes the exit-reason field: bit 31 means the VM entry failed.
    pub fn decode(field: u32) -> (Result<ExitReason, u16>, bool) {
        (ExitReason::try_from((field & 0xffff) as u16), field & (1 << 31) != 0)
    }

    /// VMX instructions that a guest without VMX must see raise #UD.
    pub fn is_vmx_instruction(self) -> bool {
        use ExitReason::*;
        matches!(
            self,
            Vmclear | Vmlaunch | Vmptrld | Vmptrst | Vmread | Vmresume | Vmwrite | Vmxoff | Vmxon | Invept | Invvpid | Vmfunc
        )
    }

    /// A short name for statistics.
    pub fn name(self) -> &'static str {
        reason_name(self as u16)
    }
}

/// Name of a basic exit reason number, also for unknown numbers (the
/// table is `shared_abi::exit_reason`).
pub fn reason_name(n: u16) -> &'static str {
    shared_abi::exit_reason::name(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    use ExitReason::*;

    /// Every variant, its SDM number and its name in `shared_abi`, written
    /// out by hand: the enum, `try_from` and the shared table are three
    /// copies of SDM Vol. 3D, Table C-1, and this is the fourth that they
    /// must all agree with.
    const TABLE: &[(ExitReason, u16, &str)] = &[
        (ExceptionOrNmi, 0, "EXCEPTION_NMI"),
        (ExternalInterrupt, 1, "EXTERNAL_INTERRUPT"),
        (TripleFault, 2, "TRIPLE_FAULT"),
        (Init, 3, "INIT"),
        (Sipi, 4, "SIPI"),
        (IoSmi, 5, "IO_SMI"),
        (OtherSmi, 6, "OTHER_SMI"),
        (InterruptWindow, 7, "INTERRUPT_WINDOW"),
        (NmiWindow, 8, "NMI_WINDOW"),
        (TaskSwitch, 9, "TASK_SWITCH"),
        (Cpuid, 10, "CPUID"),
        (Getsec, 11, "GETSEC"),
        (Hlt, 12, "HLT"),
        (Invd, 13, "INVD"),
        (Invlpg, 14, "INVLPG"),
        (Rdpmc, 15, "RDPMC"),
        (Rdtsc, 16, "RDTSC"),
        (Rsm, 17, "RSM"),
        (Vmcall, 18, "VMCALL"),
        (Vmclear, 19, "VMCLEAR"),
        (Vmlaunch, 20, "VMLAUNCH"),
        (Vmptrld, 21, "VMPTRLD"),
        (Vmptrst, 22, "VMPTRST"),
        (Vmread, 23, "VMREAD"),
        (Vmresume, 24, "VMRESUME"),
        (Vmwrite, 25, "VMWRITE"),
        (Vmxoff, 26, "VMXOFF"),
        (Vmxon, 27, "VMXON"),
        (CrAccess, 28, "CR_ACCESS"),
        (DrAccess, 29, "DR_ACCESS"),
        (IoInstruction, 30, "IO_INSTRUCTION"),
        (Rdmsr, 31, "RDMSR"),
        (Wrmsr, 32, "WRMSR"),
        (EntryFailGuestState, 33, "ENTRY_FAIL_GUEST_STATE"),
        (EntryFailMsrLoad, 34, "ENTRY_FAIL_MSR_LOAD"),
        (Mwait, 36, "MWAIT"),
        (MonitorTrapFlag, 37, "MONITOR_TRAP_FLAG"),
        (Monitor, 39, "MONITOR"),
        (Pause, 40, "PAUSE"),
        (EntryFailMachineCheck, 41, "ENTRY_FAIL_MCE"),
        (TprBelowThreshold, 43, "TPR_BELOW_THRESHOLD"),
        (ApicAccess, 44, "APIC_ACCESS"),
        (VirtualizedEoi, 45, "VIRTUALIZED_EOI"),
        (GdtrIdtrAccess, 46, "GDTR_IDTR"),
        (LdtrTrAccess, 47, "LDTR_TR"),
        (EptViolation, 48, "EPT_VIOLATION"),
        (EptMisconfig, 49, "EPT_MISCONFIG"),
        (Invept, 50, "INVEPT"),
        (Rdtscp, 51, "RDTSCP"),
        (PreemptionTimer, 52, "PREEMPTION_TIMER"),
        (Invvpid, 53, "INVVPID"),
        (Wbinvd, 54, "WBINVD"),
        (Xsetbv, 55, "XSETBV"),
        (ApicWrite, 56, "APIC_WRITE"),
        (Rdrand, 57, "RDRAND"),
        (Invpcid, 58, "INVPCID"),
        (Vmfunc, 59, "VMFUNC"),
        (Encls, 60, "ENCLS"),
        (Rdseed, 61, "RDSEED"),
        (PmlFull, 62, "PML_FULL"),
        (Xsaves, 63, "XSAVES"),
        (Xrstors, 64, "XRSTORS"),
        (Pconfig, 65, "PCONFIG"),
        (SppEvent, 66, "SPP"),
        (Umwait, 67, "UMWAIT"),
        (Tpause, 68, "TPAUSE"),
        (Loadiwkey, 69, "LOADIWKEY"),
        (Enclv, 70, "ENCLV"),
        (EnqcmdPasid, 72, "ENQCMD_PASID"),
        (EnqcmdsPasid, 73, "ENQCMDS_PASID"),
        (BusLock, 74, "BUS_LOCK"),
        (InstructionTimeout, 75, "INSTRUCTION_TIMEOUT"),
        (Seamcall, 76, "SEAMCALL"),
        (Tdcall, 77, "TDCALL"),
    ];

    /// The numbers the SDM leaves unassigned: no variant, and a
    /// placeholder name.
    const GAPS: &[u16] = &[35, 38, 42, 71];

    #[test]
    fn every_variant_has_its_sdm_number_and_name() {
        for &(r, n, name) in TABLE {
            assert_eq!(r as u16, n, "{r:?}");
            assert_eq!(ExitReason::try_from(n), Ok(r), "{n}");
            assert_eq!(r.name(), name, "{r:?}");
            assert_eq!(reason_name(n), name, "{n}");
        }
    }

    #[test]
    fn every_number_decodes_to_a_listed_variant_or_to_nothing() {
        // 0 to 77 is the SDM's range: each number is either in the table
        // above or one of its gaps, never both.
        for n in 0u16..=u16::MAX {
            let listed = TABLE.iter().find(|e| e.1 == n);
            match (ExitReason::try_from(n), listed) {
                (Ok(r), Some(&(want, _, _))) => assert_eq!(r, want, "{n}"),
                (Err(e), None) => {
                    assert_eq!(e, n);
                    let gap = GAPS.contains(&n);
                    assert!(gap || n > 77, "{n} has no variant");
                    let want = if gap { format!("REASON_{n}") } else { "UNKNOWN".into() };
                    assert_eq!(reason_name(n), want, "{n}");
                }
                (got, want) => panic!("{n}: try_from gives {got:?}, the table {want:?}"),
            }
        }
        assert_eq!(TABLE.len() + GAPS.len(), 78);
    }

    #[test]
    fn decode_roundtrip() {
        assert_eq!(ExitReason::try_from(10), Ok(ExitReason::Cpuid));
        assert_eq!(ExitReason::try_from(35), Err(35));
        assert_eq!(ExitReason::try_from(999), Err(999));
    }

    #[test]
    fn entry_failure_bit() {
        let (r, failed) = ExitReason::decode(0x8000_0021);
        assert_eq!(r, Ok(ExitReason::EntryFailGuestState));
        assert!(failed);
        let (r, failed) = ExitReason::decode(48);
        assert_eq!(r, Ok(ExitReason::EptViolation));
        assert!(!failed);
    }

    #[test]
    fn vmx_instructions() {
        assert!(ExitReason::Vmxon.is_vmx_instruction());
        assert!(ExitReason::Invept.is_vmx_instruction());
        assert!(!ExitReason::Vmcall.is_vmx_instruction());
        assert!(!ExitReason::Cpuid.is_vmx_instruction());
    }

    #[test]
    fn names_are_aligned() {
        assert_eq!(reason_name(48), "EPT_VIOLATION");
        assert_eq!(reason_name(55), "XSETBV");
        assert_eq!(reason_name(77), "TDCALL");
        assert_eq!(reason_name(200), "UNKNOWN");
    }
}
