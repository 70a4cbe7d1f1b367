//! What the host VM sees of the CPU: CPUID and MSR policy.
//!
//! The host must see a CPU without VMX: CPUID hides the VMX feature bit,
//! `IA32_FEATURE_CONTROL` reads as locked with VMX disabled, the VMX
//! capability MSRs raise #GP, and writes to any of them are refused the way a
//! CPU refuses writes to a locked or read-only MSR.

use crate::arch::x86::msr::*;
use shared_abi::{ABI_REVISION, CPUID_LEAF_HV, CPUID_SIGNATURE};

pub mod linux;

/// CPUID output registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cpuid {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// CPUID.1:ECX.VMX.
pub const CPUID_1_ECX_VMX: u32 = 1 << 5;
/// CPUID.1:ECX "hypervisor present".
pub const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Highest hypervisor leaf.
pub const CPUID_LEAF_HV_MAX: u32 = CPUID_LEAF_HV + 1;

fn signature_word(i: usize) -> u32 {
    let s = &CPUID_SIGNATURE;
    u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]])
}

/// The host VM's view of CPUID `leaf`/`sub`, given the real CPU's answer.
pub fn host_cpuid(leaf: u32, sub: u32, native: impl Fn(u32, u32) -> Cpuid) -> Cpuid {
    match leaf {
        1 => {
            let mut r = native(1, sub);
            r.ecx &= !CPUID_1_ECX_VMX;
            r.ecx |= CPUID_1_ECX_HYPERVISOR;
            r
        }
        CPUID_LEAF_HV => Cpuid { eax: CPUID_LEAF_HV_MAX, ebx: signature_word(0), ecx: signature_word(1), edx: signature_word(2) },
        // Leaf 0x40000001: the ABI revision in EAX.
        l if l == CPUID_LEAF_HV + 1 => Cpuid { eax: ABI_REVISION, ..Cpuid::default() },
        l if (CPUID_LEAF_HV..CPUID_LEAF_HV + 0x100).contains(&l) => Cpuid::default(),
        _ => native(leaf, sub),
    }
}

/// CPUID.1:ECX bits of XSAVE, OSXSAVE and AVX: guests get no extended
/// state (the hypervisor does not switch it).
pub const CPUID_1_ECX_XSAVE_AVX: u32 = (1 << 26) | (1 << 27) | (1 << 28);

/// A guest's view of CPUID: like the host's, without XSAVE/AVX (leaf 7's
/// AVX2/AVX-512 bits too) and without the monitor/mwait feature.
pub fn guest_cpuid(leaf: u32, sub: u32, native: impl Fn(u32, u32) -> Cpuid) -> Cpuid {
    let mut r = host_cpuid(leaf, sub, native);
    match leaf {
        1 => r.ecx &= !(CPUID_1_ECX_XSAVE_AVX | (1 << 3)),
        7 if sub == 0 => {
            // AVX2, AVX-512 F/DQ/IFMA/PF/ER/CD/BW/VL.
            r.ebx &= !((1 << 5) | (1 << 16) | (1 << 17) | (1 << 21) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 30) | (1 << 31));
        }
        0xd => r = Cpuid::default(),
        _ => {}
    }
    r
}

/// Where a guest MSR lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestMsr {
    /// In this VMCS guest-state field.
    Vmcs(u32),
    /// The time-stamp counter (read only).
    Tsc,
    /// Not available to guests: #GP.
    None,
}

/// Which MSRs a guest may use. Every MSR exits for guests: the host's
/// syscall and per-CPU MSRs are not switched, so a guest must never write
/// the real ones.
pub fn guest_msr(msr: u32) -> GuestMsr {
    use crate::arch::x86::vmcs_fields as f;
    match msr {
        0x10 => GuestMsr::Tsc,
        IA32_EFER => GuestMsr::Vmcs(f::GUEST_IA32_EFER),
        IA32_PAT => GuestMsr::Vmcs(f::GUEST_IA32_PAT),
        IA32_FS_BASE => GuestMsr::Vmcs(f::GUEST_FS_BASE),
        IA32_GS_BASE => GuestMsr::Vmcs(f::GUEST_GS_BASE),
        IA32_SYSENTER_CS => GuestMsr::Vmcs(f::GUEST_IA32_SYSENTER_CS),
        IA32_SYSENTER_ESP => GuestMsr::Vmcs(f::GUEST_IA32_SYSENTER_ESP),
        IA32_SYSENTER_EIP => GuestMsr::Vmcs(f::GUEST_IA32_SYSENTER_EIP),
        _ => GuestMsr::None,
    }
}

/// Whether a guest may write `v` to its EFER: only SCE, LME, LMA and NXE,
/// and never leave long mode while paging is on.
pub fn guest_efer_ok(old: u64, v: u64) -> bool {
    const ALLOWED: u64 = (1 << 0) | (1 << 8) | (1 << 10) | (1 << 11);
    v & !ALLOWED == 0 && (v & (1 << 10)) == (old & (1 << 10)) && (v & (1 << 8)) == (old & (1 << 8))
}

/// The result of a guarded RDMSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrRead {
    Value(u64),
    /// Raise #GP(0) in the guest.
    Gp,
}

/// The result of a guarded WRMSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrWrite {
    /// Perform the write on the real MSR.
    Allow,
    /// Raise #GP(0) in the guest.
    Gp,
}

/// MSRs the host VM's MSR bitmap always intercepts (reads and writes): the
/// VMX ones and the APIC base (the APIC page must not move: the hypervisor
/// write-protects it while a host CPU is offline). The rest of the x2APIC,
/// EOI, timer and ICR among them, is the host's own: see
/// [`HOST_HOTPLUG_MSR`].
pub fn host_guarded_msrs() -> impl Iterator<Item = u32> {
    [IA32_FEATURE_CONTROL, IA32_APIC_BASE].into_iter().chain(IA32_VMX_BASIC..=IA32_VMX_EXIT_CTLS2)
}

/// The one MSR whose writes the host VM's bitmap intercepts only while a
/// host CPU is offline: the x2APIC ICR, through which the host will send
/// that CPU INIT and SIPI (`hv::ipi`).
pub const HOST_HOTPLUG_MSR: u32 = X2APIC_ICR;

/// Sets or clears the write intercept of `msr` in an MSR bitmap, leaving
/// its read intercept alone.
pub fn set_msr_write_intercept(bitmap: &mut [u8; 4096], msr: u32, on: bool) {
    if let Some((byte, bit)) = msr_bitmap_bit(msr, true) {
        if on {
            bitmap[byte] |= bit;
        } else {
            bitmap[byte] &= !bit;
        }
    }
}

/// Whether the host may write `new` to IA32_APIC_BASE (now `old`): it may
/// switch modes, not move the page.
pub fn apic_base_write_ok(old: u64, new: u64) -> bool {
    const BASE: u64 = 0x000f_ffff_ffff_f000;
    old & BASE == new & BASE
}

/// The host VM's RDMSR of a guarded MSR. `native` is the real value, or
/// `None` if the real RDMSR faulted.
pub fn host_rdmsr(msr: u32, native: Option<u64>) -> MsrRead {
    match msr {
        IA32_FEATURE_CONTROL => match native {
            // Locked, with VMX and SENTER disabled: what a CPU without VMX shows.
            Some(v) => MsrRead::Value((v | FC_LOCK) & !(FC_VMX_IN_SMX | FC_VMX_OUTSIDE_SMX | FC_SENTER_MASK)),
            None => MsrRead::Value(FC_LOCK),
        },
        m if is_vmx_capability(m) => MsrRead::Gp,
        _ => native.map(MsrRead::Value).unwrap_or(MsrRead::Gp),
    }
}

/// The host VM's WRMSR of `msr`.
pub fn host_wrmsr(msr: u32, _value: u64) -> MsrWrite {
    match msr {
        // It reads as locked, and a locked IA32_FEATURE_CONTROL refuses writes.
        IA32_FEATURE_CONTROL => MsrWrite::Gp,
        // Read-only capability MSRs (and absent without VMX).
        m if is_vmx_capability(m) => MsrWrite::Gp,
        _ => MsrWrite::Allow,
    }
}

/// Byte offsets in the 4 KiB MSR bitmap. See: SDM Vol. 3C, 25.6.9.
pub fn msr_bitmap_bit(msr: u32, write: bool) -> Option<(usize, u8)> {
    let (base, idx) = match msr {
        0..=0x1fff => (0usize, msr),
        0xc000_0000..=0xc000_1fff => (1024usize, msr - 0xc000_0000),
        _ => return None,
    };
    let base = base + if write { 2048 } else { 0 };
    Some((base + (idx / 8) as usize, 1u8 << (idx % 8)))
}

/// Fills an MSR bitmap that intercepts reads and writes of `msrs`.
pub fn build_msr_bitmap(bitmap: &mut [u8; 4096], msrs: impl Iterator<Item = u32>) {
    bitmap.fill(0);
    for m in msrs {
        for w in [false, true] {
            if let Some((byte, bit)) = msr_bitmap_bit(m, w) {
                bitmap[byte] |= bit;
            }
        }
    }
}

/// CR4 as the guest may set it: `value` validated against what the real CPU
/// allows (`fixed1` = IA32_VMX_CR4_FIXED1), with VMXE refused because the
/// guest sees no VMX. Returns `None` for a write that must raise #GP.
pub fn guest_cr4_write(value: u64, fixed1: u64) -> Option<u64> {
    const VMXE: u64 = 1 << 13;
    if value & VMXE != 0 || value & !fixed1 != 0 {
        return None;
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_apic_is_its_own_but_for_the_icr_during_hotplug() {
        let mut bm = [0u8; 4096];
        build_msr_bitmap(&mut bm, host_guarded_msrs());
        let hit = |bm: &[u8; 4096], m: u32, w: bool| msr_bitmap_bit(m, w).is_some_and(|(b, bit)| bm[b] & bit != 0);
        // EOI, TPR, the timer, the TSC deadline and the ICR pass.
        for m in [0x80b, 0x808, 0x832, 0x838, 0x6e0, X2APIC_ICR] {
            assert!(!hit(&bm, m, true) && !hit(&bm, m, false), "{m:#x}");
        }
        assert!(hit(&bm, IA32_APIC_BASE, true) && hit(&bm, IA32_FEATURE_CONTROL, false));
        set_msr_write_intercept(&mut bm, HOST_HOTPLUG_MSR, true);
        assert!(hit(&bm, X2APIC_ICR, true) && !hit(&bm, X2APIC_ICR, false));
        assert!(!hit(&bm, 0x80b, true) && hit(&bm, IA32_APIC_BASE, true));
        set_msr_write_intercept(&mut bm, HOST_HOTPLUG_MSR, false);
        assert!(!hit(&bm, X2APIC_ICR, true));
        assert!(hit(&bm, IA32_APIC_BASE, true), "the neighbours' bits stay");
    }

    fn native(leaf: u32, _sub: u32) -> Cpuid {
        match leaf {
            1 => Cpuid { eax: 0x50654, ebx: 0x0100_0800, ecx: 0x7ffa_fbff, edx: 0xbfeb_fbff },
            0x4000_0000 => Cpuid { eax: 0xd, ebx: 1, ecx: 2, edx: 3 },
            _ => Cpuid { eax: leaf, ebx: 0, ecx: 0, edx: 0 },
        }
    }

    #[test]
    fn cpuid_hides_vmx_and_signs() {
        let r = host_cpuid(1, 0, native);
        assert_eq!(r.ecx & CPUID_1_ECX_VMX, 0);
        assert_ne!(r.ecx & CPUID_1_ECX_HYPERVISOR, 0);
        assert_eq!(r.edx, 0xbfeb_fbff);
        let s = host_cpuid(CPUID_LEAF_HV, 0, native);
        let mut text = [0u8; 12];
        text[..4].copy_from_slice(&s.ebx.to_le_bytes());
        text[4..8].copy_from_slice(&s.ecx.to_le_bytes());
        text[8..].copy_from_slice(&s.edx.to_le_bytes());
        assert_eq!(&text, &CPUID_SIGNATURE);
        assert_eq!(s.eax, CPUID_LEAF_HV_MAX);
        assert_eq!(host_cpuid(CPUID_LEAF_HV + 1, 0, native).eax, ABI_REVISION);
        assert_eq!(host_cpuid(CPUID_LEAF_HV + 5, 0, native), Cpuid::default());
        assert_eq!(host_cpuid(7, 0, native).eax, 7);
    }

    #[test]
    fn feature_control_reads_locked_without_vmx() {
        assert_eq!(host_rdmsr(IA32_FEATURE_CONTROL, Some(0x5)), MsrRead::Value(FC_LOCK));
        assert_eq!(host_rdmsr(IA32_FEATURE_CONTROL, Some(0xff07)), MsrRead::Value(FC_LOCK));
        assert_eq!(host_rdmsr(IA32_FEATURE_CONTROL, Some(0x0)), MsrRead::Value(FC_LOCK));
        assert_eq!(host_wrmsr(IA32_FEATURE_CONTROL, 5), MsrWrite::Gp);
        assert_eq!(host_wrmsr(IA32_FEATURE_CONTROL, 0), MsrWrite::Gp);
    }

    #[test]
    fn vmx_msrs_fault() {
        for m in IA32_VMX_BASIC..=IA32_VMX_EXIT_CTLS2 {
            assert_eq!(host_rdmsr(m, Some(1)), MsrRead::Gp);
            assert_eq!(host_wrmsr(m, 1), MsrWrite::Gp);
        }
        assert_eq!(host_wrmsr(IA32_EFER, 0xd01), MsrWrite::Allow);
        assert_eq!(host_rdmsr(0x10, Some(42)), MsrRead::Value(42));
        assert_eq!(host_rdmsr(0x12345678, None), MsrRead::Gp);
    }

    #[test]
    fn bitmap_layout() {
        let mut bm = [0u8; 4096];
        build_msr_bitmap(&mut bm, host_guarded_msrs());
        // IA32_FEATURE_CONTROL = 0x3a: read-low byte 7 bit 2, write-low at 2048.
        assert_eq!(bm[7], 1 << 2);
        assert_eq!(bm[2048 + 7], 1 << 2);
        // 0x480..=0x493 set, 0x494 not.
        assert_ne!(bm[0x480 / 8] & 1, 0);
        assert_eq!(bm[0x494 / 8] & (1 << (0x494 % 8)), 0);
        // FEATURE_CONTROL, APIC_BASE and the 20 VMX capability MSRs (the
        // x2APIC ICR only during hotplug).
        assert_eq!(bm.iter().map(|b| b.count_ones()).sum::<u32>(), 2 * (2 + 20));
        assert!(apic_base_write_ok(0xfee0_0900, 0xfee0_0d00));
        assert!(!apic_base_write_ok(0xfee0_0900, 0x1000_0900));
        assert_eq!(msr_bitmap_bit(0xc000_0080, false), Some((1024 + 16, 1)));
        assert_eq!(msr_bitmap_bit(0xc000_0080, true), Some((3072 + 16, 1)));
        assert_eq!(msr_bitmap_bit(0x4000_0000, true), None);
    }

    #[test]
    fn guests_see_no_extended_state() {
        let n = |leaf: u32, _sub: u32| match leaf {
            1 => Cpuid { eax: 0, ebx: 0, ecx: 0xffff_ffff, edx: 0 },
            7 => Cpuid { eax: 0, ebx: 0xffff_ffff, ecx: 0, edx: 0 },
            0xd => Cpuid { eax: 7, ebx: 0x340, ecx: 0x340, edx: 0 },
            _ => Cpuid::default(),
        };
        let r = guest_cpuid(1, 0, n);
        assert_eq!(r.ecx & (CPUID_1_ECX_XSAVE_AVX | CPUID_1_ECX_VMX | (1 << 3)), 0);
        assert_ne!(r.ecx & CPUID_1_ECX_HYPERVISOR, 0);
        assert_eq!(guest_cpuid(7, 0, n).ebx & (1 << 5), 0);
        assert_eq!(guest_cpuid(0xd, 0, n), Cpuid::default());
        assert_eq!(guest_cpuid(CPUID_LEAF_HV, 0, n).eax, CPUID_LEAF_HV_MAX);
    }

    #[test]
    fn guest_msrs() {
        assert_eq!(guest_msr(IA32_EFER), GuestMsr::Vmcs(crate::arch::x86::vmcs_fields::GUEST_IA32_EFER));
        assert_eq!(guest_msr(0xc000_0082), GuestMsr::None, "LSTAR is the host's");
        assert_eq!(guest_msr(IA32_KERNEL_GS_BASE), GuestMsr::None);
        assert_eq!(guest_msr(IA32_FEATURE_CONTROL), GuestMsr::None);
        assert!(guest_efer_ok(0x500, 0xd01));
        assert!(!guest_efer_ok(0x500, 0x100), "leaving long mode");
        assert!(!guest_efer_ok(0x500, 0x500 | (1 << 12)));
    }

    #[test]
    fn cr4_vmxe_refused() {
        let fixed1 = 0x3727ff;
        assert_eq!(guest_cr4_write(0x6f0, fixed1), Some(0x6f0));
        assert_eq!(guest_cr4_write(0x6f0 | (1 << 13), fixed1), None);
        assert_eq!(guest_cr4_write(1 << 30, fixed1), None);
    }
}
