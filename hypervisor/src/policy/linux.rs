//! What a Linux guest (`VM_FLAG_LINUX`) sees of the CPU: CPUID and MSRs.
//!
//! The smallest PC a stock x86-64 kernel accepts, and nothing it could
//! misuse. Each choice below answers a check in Linux's `arch/x86`:
//!
//! - The TSC rate comes from CPUID 0x15 (with a non-zero crystal, which
//!   makes it a *known* frequency) and 0x16, and the TSC-deadline timer and
//!   ARAT are advertised, so that `apic_needs_pit()` is false and Linux asks
//!   for no PIT, HPET or calibration loop.
//! - x2APIC is advertised, and kept: without interrupt remapping Linux
//!   keeps x2APIC only under a hypervisor it recognises
//!   (`x86_init.hyper.x2apic_available`), and would otherwise fall back to
//!   the xAPIC page, which the hypervisor does not emulate. (Reporting the
//!   x2APIC as locked through IA32_ARCH_CAPABILITIES is not enough: Linux
//!   6.12 then reads the APIC id through the xAPIC page before it installs
//!   its x2APIC driver, and faults.) The smallest paravirtual interface
//!   Linux knows is ACRN's: a CPUID signature, anywhere in the hypervisor
//!   range, and the TSC rate in leaf 0x4000_0010. The guest presents it
//!   beside its own signature, at [`ACRN_BASE`]; a kernel built with
//!   `CONFIG_ACRN_GUEST` recognises it and asks for nothing else (its
//!   callback vector is never raised).
//! - Everything the hypervisor does not switch or emulate is hidden: XSAVE
//!   and AVX, PCID/INVPCID, RDTSCP/RDPID, MTRRs and machine checks, the PMU,
//!   APERF/MPERF, MONITOR, VMX/SMX, TSX, speculation-control MSRs, TSC_ADJUST,
//!   5-level paging. The host's topology leaves (4, 0xB, 0x1F) are hidden
//!   too: they would describe the physical CPU Linux happens to run on.
//!
//! Every MSR a guest touches exits; those not listed in [`classify`] raise
//! #GP, which Linux's `rdmsr_safe`/`wrmsr_safe` expect of a missing MSR.

use super::{host_cpuid, Cpuid, CPUID_1_ECX_HYPERVISOR};

/// Where the ACRN-compatible signature is (`hypervisor_cpuid_base` scans
/// every 0x100 leaves from 0x4000_0000).
pub const ACRN_BASE: u32 = 0x4000_0100;
/// ACRN's timing leaf: EAX = the TSC rate in kHz (a fixed leaf number in
/// Linux's `acrn_get_tsc_khz`).
pub const ACRN_TIMING_LEAF: u32 = 0x4000_0010;

/// Highest basic leaf a Linux guest sees: 0x16, the frequency leaf.
pub const MAX_BASIC_LEAF: u32 = 0x16;

/// CPUID.1:ECX bits a Linux guest never sees: DTES64, MONITOR, DS-CPL,
/// VMX, SMX, EST, TM2, FMA (VEX), PDCM, PCID, DCA, XSAVE, OSXSAVE, AVX, F16C.
const LEAF1_ECX_HIDDEN: u32 = (1 << 2)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 7)
    | (1 << 8)
    | (1 << 12)
    | (1 << 15)
    | (1 << 17)
    | (1 << 18)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 29);
/// CPUID.1:ECX x2APIC and TSC-deadline.
pub const LEAF1_ECX_X2APIC: u32 = 1 << 21;
pub const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID.1:EDX bits hidden: MCE, MTRR, MCA, PSN, DS, ACPI (thermal), HTT,
/// TM, PBE.
const LEAF1_EDX_HIDDEN: u32 = (1 << 7) | (1 << 12) | (1 << 14) | (1 << 18) | (1 << 21) | (1 << 22) | (1 << 28) | (1 << 29) | (1 << 31);
/// CPUID.1:EDX APIC.
const LEAF1_EDX_APIC: u32 = 1 << 9;
/// CPUID.6:EAX ARAT: the APIC timer keeps running in deep C-states.
pub const LEAF6_EAX_ARAT: u32 = 1 << 2;
/// CPUID.7.0:EBX bits hidden: TSC_ADJUST, SGX, HLE, AVX2, INVPCID, RTM,
/// RDT-M, MPX, RDT-A, AVX-512 (F, DQ, IFMA, PF, ER, CD, BW, VL), PT.
const LEAF7_EBX_HIDDEN: u32 = (1 << 1)
    | (1 << 2)
    | (1 << 4)
    | (1 << 5)
    | (1 << 10)
    | (1 << 11)
    | (1 << 12)
    | (1 << 14)
    | (1 << 15)
    | (1 << 16)
    | (1 << 17)
    | (1 << 21)
    | (1 << 25)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 30)
    | (1 << 31);
/// CPUID.7.0:ECX bits kept: PREFETCHWT1 (0), CET-less bit set below is
/// empty: UMIP, PKU, WAITPKG, the AVX-512 and VEX/EVEX extensions, LA57,
/// RDPID and the SGX bits all go.
const LEAF7_ECX_KEPT: u32 = 1 << 0;
/// CPUID.7.0:EDX ARCH_CAPABILITIES: the one bit kept, so that Linux reads
/// IA32_ARCH_CAPABILITIES and finds x2APIC locked.
pub const LEAF7_EDX_ARCH_CAPABILITIES: u32 = 1 << 29;
/// CPUID.0x80000001:EDX RDTSCP.
const EXT1_EDX_RDTSCP: u32 = 1 << 27;
/// CPUID.0x80000007:EDX invariant TSC.
const EXT7_EDX_INVARIANT_TSC: u32 = 1 << 8;

/// A Linux guest's view of CPUID `leaf`/`sub` on the vCPU with `apic_id`,
/// whose TSC runs at `tsc_khz`, given the real CPU's answer.
pub fn cpuid(leaf: u32, sub: u32, apic_id: u32, tsc_khz: u32, native: impl Fn(u32, u32) -> Cpuid) -> Cpuid {
    // Leaves the guest is told do not exist read as zero, as on a CPU
    // without them (beyond the maximum, a real CPU repeats its highest
    // leaf; zero is what Linux's checks need).
    let basic_max = native(0, 0).eax.min(MAX_BASIC_LEAF);
    match leaf {
        0 => Cpuid { eax: MAX_BASIC_LEAF, ..native(0, 0) },
        1 => {
            let mut r = host_cpuid(1, sub, &native);
            r.ecx = (r.ecx & !LEAF1_ECX_HIDDEN) | LEAF1_ECX_X2APIC | LEAF1_ECX_TSC_DEADLINE | CPUID_1_ECX_HYPERVISOR;
            r.edx = (r.edx & !LEAF1_EDX_HIDDEN) | LEAF1_EDX_APIC;
            // Initial APIC id; one logical processor per package (HTT is
            // clear); CLFLUSH line size and brand index kept.
            r.ebx = (apic_id << 24) | (1 << 16) | (r.ebx & 0xffff);
            r
        }
        6 => Cpuid { eax: LEAF6_EAX_ARAT, ..Cpuid::default() },
        7 if sub == 0 && basic_max >= 7 => {
            let r = native(7, 0);
            Cpuid { eax: 0, ebx: r.ebx & !LEAF7_EBX_HIDDEN, ecx: r.ecx & LEAF7_ECX_KEPT, edx: LEAF7_EDX_ARCH_CAPABILITIES }
        }
        0x15 => {
            // TSC = crystal * EBX / EAX, with the crystal at the TSC rate.
            Cpuid { eax: 1, ebx: 1, ecx: tsc_khz.saturating_mul(1000), edx: 0 }
        }
        0x16 => {
            let mhz = (tsc_khz / 1000).max(1);
            Cpuid { eax: mhz, ebx: mhz, ecx: 100, edx: 0 }
        }
        2 if leaf <= basic_max => native(leaf, sub),
        l if l < 0x4000_0000 => Cpuid::default(),
        ACRN_TIMING_LEAF => Cpuid { eax: tsc_khz, ..Cpuid::default() },
        ACRN_BASE => {
            let w = |i: usize| u32::from_le_bytes(*b"ACRNACRNACRN".split_at(4 * i).1.first_chunk::<4>().unwrap());
            Cpuid { eax: ACRN_BASE, ebx: w(0), ecx: w(1), edx: w(2) }
        }
        l if l < 0x8000_0000 => host_cpuid(l, sub, &native),
        0x8000_0000 => native(leaf, sub),
        0x8000_0001 => {
            let mut r = native(leaf, sub);
            r.edx &= !EXT1_EDX_RDTSCP;
            r
        }
        0x8000_0002..=0x8000_0004 | 0x8000_0006 | 0x8000_0008 => native(leaf, sub),
        0x8000_0007 => Cpuid { edx: native(leaf, sub).edx & EXT7_EDX_INVARIANT_TSC, ..Cpuid::default() },
        _ => Cpuid::default(),
    }
}

/// IA32_ARCH_CAPABILITIES as a Linux guest reads it: RDCL_NO, SKIP_L1DFL,
/// MDS_NO (nothing to mitigate in a guest that shares no core state it
/// could leak), and XAPIC_DISABLE, which says that
/// IA32_XAPIC_DISABLE_STATUS exists.
pub const ARCH_CAPABILITIES: u64 = (1 << 0) | (1 << 3) | (1 << 5) | (1 << 21);
/// IA32_XAPIC_DISABLE_STATUS: bit 0, the xAPIC is disabled and x2APIC
/// locked.
pub const XAPIC_DISABLE_STATUS: u64 = 1;
/// IA32_MISC_ENABLE: fast strings.
pub const MISC_ENABLE: u64 = 1;

/// Where a Linux guest's MSR lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Msr {
    /// As for any guest (`super::guest_msr`): a VMCS field or the TSC.
    Common(super::GuestMsr),
    /// IA32_APIC_BASE, the x2APIC registers and IA32_TSC_DEADLINE: the
    /// vCPU's local APIC model.
    Apic,
    /// The syscall MSRs (STAR, LSTAR, CSTAR, FMASK) and KERNEL_GS_BASE: the
    /// guest's own values sit in the real MSRs while it runs; the index is
    /// into [`SWITCHED`].
    Switched(usize),
    /// Reads give this constant; writes are ignored.
    Constant(u64),
    /// Reads give this constant; writes raise #GP.
    ReadOnly(u64),
    /// #GP on read and write.
    Gp,
}

/// MSRs loaded with the guest's values while it runs and with the host's
/// in between (`hv/run.rs`).
pub const SWITCHED: [u32; 5] = [0xc000_0081, 0xc000_0082, 0xc000_0083, 0xc000_0084, 0xc000_0102];

/// Which of `SWITCHED` hold addresses (they must stay canonical).
pub const fn switched_is_address(i: usize) -> bool {
    matches!(i, 1 | 2 | 4)
}

/// Classifies MSR `msr` for a Linux guest.
pub fn classify(msr: u32) -> Msr {
    use super::GuestMsr;
    match msr {
        0x1b | 0x6e0 | 0x800..=0x8ff => Msr::Apic,
        // IA32_BIOS_SIGN_ID: Linux writes 0, runs CPUID and reads the
        // microcode revision with plain RDMSR/WRMSR.
        0x8b => Msr::Constant(0),
        0x1a0 => Msr::Constant(MISC_ENABLE),
        0x10a => Msr::ReadOnly(ARCH_CAPABILITIES),
        0xbd => Msr::ReadOnly(XAPIC_DISABLE_STATUS),
        m => {
            if let Some(i) = SWITCHED.iter().position(|&s| s == m) {
                return Msr::Switched(i);
            }
            match super::guest_msr(m) {
                GuestMsr::None => Msr::Gp,
                g => Msr::Common(g),
            }
        }
    }
}

/// EFER bits a Linux guest may set: SCE, LME, LMA (kept as the CPU has
/// it), NXE.
const EFER_ALLOWED: u64 = (1 << 0) | (1 << 8) | (1 << 10) | (1 << 11);
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// A Linux guest's WRMSR of EFER (now `old`) with paging on or off: the new
/// value, or `None` for #GP. LME may change only while paging is off (the
/// application processors' trampoline sets it on the way to long mode); LMA
/// is the CPU's to set, so the written bit is ignored (SDM Vol. 3A, 9.8.5).
pub fn efer_write(old: u64, v: u64, paging: bool) -> Option<u64> {
    if v & !EFER_ALLOWED != 0 || (paging && (v ^ old) & EFER_LME != 0) {
        return None;
    }
    Some((v & !EFER_LMA) | (old & EFER_LMA))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::GuestMsr;

    /// A CPU like Bochs's Skylake-X: every feature bit set, max leaf 0x16,
    /// and its own (wrong for the guest) 0x15/0x16 and topology.
    fn native(leaf: u32, _sub: u32) -> Cpuid {
        match leaf {
            0 => Cpuid { eax: 0x16, ebx: 0x756e_6547, ecx: 0x6c65_746e, edx: 0x4965_6e69 },
            0x15 => Cpuid { eax: 2, ebx: 292, ecx: 24_000_000, edx: 0 },
            0x16 => Cpuid { eax: 3500, ebx: 3500, ecx: 100, edx: 0 },
            0xb => Cpuid { eax: 1, ebx: 2, ecx: 0x100, edx: 7 },
            0x8000_0000 => Cpuid { eax: 0x8000_0008, ..Cpuid::default() },
            _ => Cpuid { eax: u32::MAX, ebx: u32::MAX, ecx: u32::MAX, edx: u32::MAX },
        }
    }

    #[test]
    fn the_tsc_rate_is_known_and_timers_need_no_pit() {
        let r = cpuid(0x15, 0, 0, 50_000, native);
        assert_eq!((r.eax, r.ebx, r.ecx), (1, 1, 50_000_000));
        // Linux: tsc_khz = crystal_khz * ebx / eax.
        assert_eq!(r.ecx / 1000 * r.ebx / r.eax, 50_000);
        assert_eq!(cpuid(0x16, 0, 0, 50_000, native).eax, 50);
        assert_eq!(cpuid(0x16, 0, 0, 500, native).eax, 1, "a base frequency of 0 MHz would make Linux ignore the leaf");
        assert!(cpuid(0, 0, 0, 50_000, native).eax >= 0x16);
        let l1 = cpuid(1, 0, 0, 50_000, native);
        assert_ne!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_X2APIC, 0);
        assert_ne!(l1.edx & LEAF1_EDX_APIC, 0);
        assert_eq!(cpuid(6, 0, 0, 50_000, native).eax, LEAF6_EAX_ARAT);
    }

    #[test]
    fn leaf1_names_the_vcpu_not_the_cpu() {
        let r = cpuid(1, 0, 3, 50_000, native);
        assert_eq!(r.ebx >> 24, 3);
        assert_eq!((r.ebx >> 16) & 0xff, 1);
        assert_eq!(r.edx & (1 << 28), 0, "no HTT");
        // Topology leaves of the physical CPU are hidden.
        for leaf in [4, 0xb, 0x1f] {
            assert_eq!(cpuid(leaf, 0, 3, 50_000, native), Cpuid::default(), "leaf {leaf:#x}");
        }
    }

    #[test]
    fn what_the_hypervisor_does_not_switch_is_hidden() {
        let l1 = cpuid(1, 0, 0, 50_000, native);
        for bit in [3, 5, 6, 15, 17, 26, 27, 28] {
            assert_eq!(l1.ecx & (1 << bit), 0, "leaf 1 ECX bit {bit}");
        }
        for bit in [7, 12, 14] {
            assert_eq!(l1.edx & (1 << bit), 0, "leaf 1 EDX bit {bit}");
        }
        let l7 = cpuid(7, 0, 0, 50_000, native);
        for bit in [1, 5, 10, 11, 16] {
            assert_eq!(l7.ebx & (1 << bit), 0, "leaf 7 EBX bit {bit}");
        }
        for bit in [2, 3, 5, 16, 22] {
            assert_eq!(l7.ecx & (1 << bit), 0, "leaf 7 ECX bit {bit}");
        }
        assert_eq!(l7.edx, LEAF7_EDX_ARCH_CAPABILITIES);
        assert_eq!(cpuid(7, 1, 0, 50_000, native), Cpuid::default());
        assert_eq!(cpuid(0xa, 0, 0, 50_000, native), Cpuid::default(), "no PMU");
        assert_eq!(cpuid(0xd, 0, 0, 50_000, native), Cpuid::default(), "no XSAVE");
        assert_eq!(cpuid(0x8000_0001, 0, 0, 50_000, native).edx & EXT1_EDX_RDTSCP, 0);
        assert_eq!(cpuid(0x8000_0007, 0, 0, 50_000, native).edx, EXT7_EDX_INVARIANT_TSC);
        assert_eq!(cpuid(0x17, 0, 0, 50_000, native), Cpuid::default());
        assert_eq!(cpuid(0x9000_0000, 0, 0, 50_000, native), Cpuid::default());
        // The hypervisor's own leaves stay.
        assert_eq!(cpuid(shared_abi::CPUID_LEAF_HV, 0, 0, 50_000, native).ebx, u32::from_le_bytes(*b"uXen"));
    }

    #[test]
    fn linux_recognises_the_acrn_interface() {
        // Linux's hypervisor_cpuid_base("ACRNACRNACRN", 0): every 0x100
        // leaves of the hypervisor range, signature in EBX, ECX, EDX.
        let base = (0x4000_0000u32..0x4001_0000).step_by(0x100).find(|&b| {
            let r = cpuid(b, 0, 0, 50_000, native);
            let mut sig = [0u8; 12];
            sig[..4].copy_from_slice(&r.ebx.to_le_bytes());
            sig[4..8].copy_from_slice(&r.ecx.to_le_bytes());
            sig[8..].copy_from_slice(&r.edx.to_le_bytes());
            &sig == b"ACRNACRNACRN"
        });
        assert_eq!(base, Some(ACRN_BASE));
        // acrn_get_tsc_khz: cpuid_eax(0x40000010).
        assert_eq!(cpuid(0x4000_0010, 0, 0, 50_000, native).eax, 50_000);
    }

    #[test]
    fn efer_follows_the_trampoline_into_long_mode() {
        // Real mode, paging off: the trampoline sets LME and NXE.
        assert_eq!(efer_write(0, EFER_LME | (1 << 11) | 1, false), Some(EFER_LME | (1 << 11) | 1));
        // In long mode the kernel writes back what it read, LMA included.
        let lm = EFER_LME | EFER_LMA | 1;
        assert_eq!(efer_write(lm, lm | (1 << 11), true), Some(lm | (1 << 11)));
        // LMA is the CPU's: writing it does not set it, clearing it does
        // not clear it.
        assert_eq!(efer_write(0, EFER_LMA, false), Some(0));
        assert_eq!(efer_write(lm, EFER_LME | 1, true), Some(lm));
        // No leaving long mode with paging on; no other bits.
        assert_eq!(efer_write(lm, EFER_LMA | 1, true), None);
        assert_eq!(efer_write(0, 1 << 12, false), None);
        assert_eq!(efer_write(0, 1 << 2, false), None);
    }

    #[test]
    fn msrs_linux_needs_and_nothing_else() {
        assert_eq!(classify(0x1b), Msr::Apic);
        assert_eq!(classify(0x6e0), Msr::Apic);
        assert_eq!(classify(0x80f), Msr::Apic);
        assert_eq!(classify(0x8b), Msr::Constant(0));
        assert_eq!(classify(0x1a0), Msr::Constant(MISC_ENABLE));
        assert_eq!(classify(0x10a), Msr::ReadOnly(ARCH_CAPABILITIES));
        assert_ne!(ARCH_CAPABILITIES & (1 << 21), 0, "XAPIC_DISABLE");
        assert_eq!(classify(0xbd), Msr::ReadOnly(1));
        assert_eq!(classify(0xc000_0082), Msr::Switched(1));
        assert!(switched_is_address(1) && switched_is_address(4) && !switched_is_address(0));
        assert_eq!(classify(0xc000_0080), Msr::Common(GuestMsr::Vmcs(crate::arch::x86::vmcs_fields::GUEST_IA32_EFER)));
        assert_eq!(classify(0x10), Msr::Common(GuestMsr::Tsc));
        for m in [0x3a, 0x48, 0x49, 0x3b, 0xfe, 0x2ff, 0x179, 0xe7, 0xe8, 0xc000_0103, 0x1d9, 0x480] {
            assert_eq!(classify(m), Msr::Gp, "{m:#x}");
        }
    }
}
