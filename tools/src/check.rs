//! `uxenctl check`: whether this machine can run uxen-rs, found out before
//! anything is loaded.
//!
//! [`gather`] reads the system into [`Facts`]; [`evaluate`] turns the facts
//! into [`Finding`]s and touches nothing, so that every verdict can be
//! unit-tested with made-up facts.
//!
//! `UXEN_CHECK_ROOT=DIR` is a test hook: `gather` then reads the files it
//! takes from `/proc` and `/sys` under `DIR` instead (`DIR/proc/modules`,
//! ...), so that the test machines can pretend to have `kvm_intel` loaded or
//! a locked-down kernel. CPUID and the MSR are always the real CPU's.

use serde::Serialize;
use shared_abi as abi;
use std::path::{Path, PathBuf};

/// How much a finding stands in the way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    /// uxen.ko loads, but something is missing or could not be told.
    Warning,
    /// uxen.ko will not load, or must not be loaded, until this is fixed.
    Blocker,
}

impl Verdict {
    fn name(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warning => "warning",
            Verdict::Blocker => "blocker",
        }
    }
}

/// One thing checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
    /// What to do about it; empty when the verdict is `ok`.
    pub fix: String,
}

fn finding(name: &'static str, verdict: Verdict, detail: impl Into<String>, fix: impl Into<String>) -> Finding {
    let fix = if verdict == Verdict::Ok { String::new() } else { fix.into() };
    Finding { name, verdict, detail: detail.into(), fix }
}

/// What reading IA32_FEATURE_CONTROL gave.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum MsrRead {
    Value(u64),
    /// No `/dev/cpu/0/msr`: the msr driver is not loaded.
    #[default]
    NoDevice,
    /// The device is there but the read failed (not root, say).
    Failed(String),
}

/// Whether KVM's Intel half holds VT-x.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvmIntel {
    #[default]
    Absent,
    /// Loaded as a module: `rmmod` takes it out.
    Module,
    /// Built into the kernel: it cannot be unloaded.
    BuiltIn,
}

/// Where uxen.ko was found, and the kernel release it was built for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModuleLookup {
    Found { path: PathBuf, vermagic: Result<String, String> },
    NotFound { searched: Vec<PathBuf> },
}

impl Default for ModuleLookup {
    fn default() -> Self {
        ModuleLookup::NotFound { searched: Vec::new() }
    }
}

/// Everything the verdicts depend on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// CPUID leaf 0's vendor text.
    pub vendor: String,
    /// CPUID.1:ECX.VMX (bit 5).
    pub cpuid_vmx: bool,
    /// CPUID.1:ECX bit 31: Linux runs under a hypervisor.
    pub cpuid_hypervisor: bool,
    /// CPUID leaf 0x40000000's EBX, ECX, EDX, when bit 31 is set.
    pub hv_signature: Option<[u8; 12]>,
    /// IA32_FEATURE_CONTROL (MSR 0x3a) through `/dev/cpu/0/msr`.
    pub feature_control: MsrRead,
    pub kvm_intel: KvmIntel,
    /// `/sys/firmware/acpi/tables/DMAR` exists.
    pub dmar_table: bool,
    /// Linux booted through UEFI (`/sys/firmware/efi` exists).
    pub uefi: bool,
    /// The entries of `/sys/class/iommu`: IOMMUs that Linux drives.
    pub host_iommus: Vec<String>,
    /// `/proc/interrupts` names interrupt chips that remap (`IR-IO-APIC`,
    /// `IR-PCI-MSI`, ...).
    pub remapped_irqs: bool,
    /// `/proc/cmdline`.
    pub cmdline: String,
    /// `la57` among the CPU flags of `/proc/cpuinfo`: Linux clears it unless
    /// it runs with 5-level paging.
    pub la57: bool,
    /// The CPU's virtual address width from `/proc/cpuinfo`.
    pub virt_bits: Option<u32>,
    /// The mode `/sys/kernel/security/lockdown` marks, when it can be read.
    pub lockdown: Option<String>,
    /// `/sys/module/module/parameters/sig_enforce` is `Y`.
    pub sig_enforce: bool,
    /// The `SecureBoot` EFI variable; `None` without EFI variables.
    pub secure_boot: Option<bool>,
    /// The running kernel's release (`uname -r`).
    pub release: String,
    pub module: ModuleLookup,
}

const FC_LOCK: u64 = 1 << 0;
const FC_VMX_OUTSIDE_SMX: u64 = 1 << 2;
const BOOT_OFF_FIX: &str = "boot with intel_iommu=off intremap=off";
const SIGN_FIX: &str = "sign uxen.ko with a key the kernel trusts (scripts/sign-file, enrolled with mokutil --import), or turn Secure Boot off";

impl Facts {
    /// The hypervisor below Linux is uxen-rs itself.
    fn loaded(&self) -> bool {
        self.hv_signature == Some(abi::CPUID_SIGNATURE)
    }

    fn cmdline_has(&self, token: &str) -> bool {
        cmdline_has(&self.cmdline, token)
    }
}

/// Whether the kernel command line has `token` (`no5lvl`), or `key=value`
/// with `value` in the option's comma-separated list (`intel_iommu=off,sm_on`).
fn cmdline_has(cmdline: &str, token: &str) -> bool {
    let (key, value) = match token.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (token, None),
    };
    cmdline.split_whitespace().any(|w| match (w.split_once('='), value) {
        (None, None) => w == key,
        (Some((k, vs)), Some(v)) => k == key && vs.split(',').any(|x| x == v),
        _ => false,
    })
}

/// Who a CPUID 0x40000000 signature belongs to.
fn hypervisor_name(sig: &[u8; 12]) -> String {
    let known: &[(&[u8], &str)] = &[
        (b"KVMKVMKVM", "KVM"),
        (b"Microsoft Hv", "Hyper-V"),
        (b"VMwareVMware", "VMware"),
        (b"XenVMMXenVMM", "Xen"),
        (b"TCGTCGTCGTCG", "QEMU TCG"),
        (b"VBoxVBoxVBox", "VirtualBox"),
        (b"ACRNACRNACRN", "ACRN"),
        (b"bhyve bhyve ", "bhyve"),
        (b" lrpepyh  vr", "Parallels"),
    ];
    if let Some((_, n)) = known.iter().find(|(s, _)| sig.starts_with(s)) {
        return n.to_string();
    }
    let text: String = sig.iter().take_while(|&&b| b != 0).map(|&b| if b.is_ascii_graphic() || b == b' ' { b as char } else { '?' }).collect();
    if text.trim().is_empty() {
        "a hypervisor without a CPUID signature".into()
    } else {
        format!("a hypervisor signed \"{text}\"")
    }
}

/// The verdicts on `f`, in a fixed order; `loaded` only when uxen-rs runs.
pub fn evaluate(f: &Facts) -> Vec<Finding> {
    let mut out = Vec::new();
    if f.loaded() {
        out.push(finding("loaded", Verdict::Ok, "uxen-rs is already running (CPUID 0x40000000 answers uXenRsUXenRs)", ""));
    }
    out.push(vmx(f));
    out.push(kvm(f));
    out.push(dmar(f));
    out.push(intremap(f));
    out.push(la57(f));
    out.push(lockdown(f));
    out.push(vermagic(f));
    out.push(nested(f));
    out
}

fn vmx(f: &Facts) -> Finding {
    if f.loaded() {
        // The hypervisor hides VMX from its host, and IA32_FEATURE_CONTROL
        // reads locked without it: that is uxen-rs at work, not a fault.
        return finding("vmx", Verdict::Ok, "VT-x is in use by uxen-rs, which hides it from the host", "");
    }
    if f.vendor != "GenuineIntel" {
        return finding(
            "vmx",
            Verdict::Blocker,
            format!("the CPU is {}, not GenuineIntel: uxen-rs needs Intel VT-x", if f.vendor.is_empty() { "unknown" } else { &f.vendor }),
            "run on an Intel CPU with VT-x",
        );
    }
    if !f.cpuid_vmx {
        let under = if f.cpuid_hypervisor { " (a VM whose hypervisor offers no nested VT-x)" } else { "" };
        return finding(
            "vmx",
            Verdict::Blocker,
            format!("CPUID has no VT-x (leaf 1 ECX bit 5){under}"),
            "run on an Intel CPU with VT-x; in a VM, turn on nested VT-x",
        );
    }
    match &f.feature_control {
        MsrRead::Value(v) if v & FC_LOCK == 0 => finding(
            "vmx",
            Verdict::Ok,
            format!("VT-x in CPUID; IA32_FEATURE_CONTROL {v:#x} is unlocked, and the hypervisor enables VMX itself"),
            "",
        ),
        MsrRead::Value(v) if v & FC_VMX_OUTSIDE_SMX == 0 => finding(
            "vmx",
            Verdict::Blocker,
            // Linux locks an MSR the firmware left open at boot, and enables
            // VMX in it only when built with KVM_INTEL.
            format!(
                "VT-x is disabled (IA32_FEATURE_CONTROL {v:#x}: locked without VMX outside SMX), by the firmware \
                 or by a kernel without CONFIG_KVM_INTEL that found it unlocked"
            ),
            "enable Intel Virtualization Technology (VT-x) in the firmware setup; if it is on, boot a kernel with CONFIG_KVM_INTEL",
        ),
        MsrRead::Value(v) => finding("vmx", Verdict::Ok, format!("VT-x in CPUID and enabled (IA32_FEATURE_CONTROL {v:#x})"), ""),
        MsrRead::NoDevice => finding(
            "vmx",
            Verdict::Warning,
            "VT-x in CPUID; whether the firmware enabled it: could not tell (no /dev/cpu/*/msr; `modprobe msr`)",
            "modprobe msr",
        ),
        MsrRead::Failed(e) => finding(
            "vmx",
            Verdict::Warning,
            format!("VT-x in CPUID; whether the firmware enabled it: could not tell (reading /dev/cpu/0/msr: {e})"),
            "run uxenctl check as root",
        ),
    }
}

fn kvm(f: &Facts) -> Finding {
    match f.kvm_intel {
        KvmIntel::Absent => finding("kvm", Verdict::Ok, "kvm_intel is not loaded", ""),
        KvmIntel::Module => {
            finding("kvm", Verdict::Blocker, "kvm_intel is loaded and holds VT-x", "rmmod kvm_intel kvm")
        }
        KvmIntel::BuiltIn => finding(
            "kvm",
            Verdict::Blocker,
            "kvm_intel is built into the kernel and holds VT-x; it cannot be unloaded",
            "boot a kernel with KVM built as modules (CONFIG_KVM_INTEL=m), and rmmod kvm_intel kvm",
        ),
    }
}

fn dmar(f: &Facts) -> Finding {
    if f.dmar_table {
        // The driver hands the hypervisor the table that the kernel's own
        // ACPI found, so UEFI machines (no RSDP in the BIOS areas) need no
        // rsdp= either.
        let detail = if f.uefi {
            "ACPI DMAR table present: VT-d DMA protection is available (UEFI: the driver takes the table from the kernel, no rsdp= needed)"
        } else {
            "ACPI DMAR table present: VT-d DMA protection is available"
        };
        finding("dmar", Verdict::Ok, detail, "")
    } else {
        finding(
            "dmar",
            Verdict::Warning,
            "no ACPI DMAR table: no DMA protection; the hypervisor runs without it unless require_iommu=1",
            "enable VT-d in the firmware setup, if the machine has it",
        )
    }
}

fn intremap(f: &Facts) -> Finding {
    if !f.host_iommus.is_empty() {
        return finding(
            "intremap",
            Verdict::Blocker,
            format!(
                "Linux drives the IOMMU itself (/sys/class/iommu: {}); the driver refuses to load",
                f.host_iommus.join(", ")
            ),
            BOOT_OFF_FIX,
        );
    }
    if f.remapped_irqs {
        return finding(
            "intremap",
            Verdict::Blocker,
            "interrupt remapping is on (IR- interrupt chips in /proc/interrupts); the hypervisor must own the remapping units",
            BOOT_OFF_FIX,
        );
    }
    if !f.dmar_table {
        return finding("intremap", Verdict::Ok, "no remapping hardware (no DMAR table)", "");
    }
    let flags: Vec<&str> = ["intel_iommu=off", "intremap=off"].into_iter().filter(|t| f.cmdline_has(t)).collect();
    let booted = if flags.is_empty() { String::new() } else { format!(" (booted with {})", flags.join(" ")) };
    finding("intremap", Verdict::Ok, format!("Linux drives neither DMA nor interrupt remapping{booted}"), "")
}

fn la57(f: &Facts) -> Finding {
    if f.la57 {
        return finding(
            "la57",
            Verdict::Blocker,
            "Linux runs with 5-level paging (la57 in /proc/cpuinfo), which the driver refuses",
            "boot with no5lvl",
        );
    }
    if f.virt_bits == Some(57) {
        return finding("la57", Verdict::Ok, "the CPU has 5-level paging, but Linux uses 4 levels", "");
    }
    finding("la57", Verdict::Ok, "4-level paging", "")
}

fn lockdown(f: &Facts) -> Finding {
    match f.lockdown.as_deref() {
        Some(mode @ ("integrity" | "confidentiality")) => {
            return finding(
                "lockdown",
                Verdict::Blocker,
                format!("the kernel is locked down ({mode}): it refuses unsigned modules"),
                SIGN_FIX,
            );
        }
        _ if f.sig_enforce => {
            return finding(
                "lockdown",
                Verdict::Blocker,
                "module signatures are enforced (module.sig_enforce): an unsigned uxen.ko is refused",
                SIGN_FIX,
            );
        }
        None if f.secure_boot == Some(true) => {
            return finding(
                "lockdown",
                Verdict::Warning,
                "Secure Boot is on and the lockdown mode could not be read: the kernel may refuse unsigned modules",
                "mount -t securityfs securityfs /sys/kernel/security to tell; or sign uxen.ko",
            );
        }
        _ => {}
    }
    let sb = match f.secure_boot {
        Some(true) => "Secure Boot is on, but ",
        _ => "",
    };
    finding("lockdown", Verdict::Ok, format!("{sb}the kernel is not locked down and does not enforce module signatures"), "")
}

fn vermagic(f: &Facts) -> Finding {
    let rebuild = format!("rebuild it against the running kernel: cargo xtask module --kdir /lib/modules/{}/build", f.release);
    match &f.module {
        ModuleLookup::NotFound { searched } => finding(
            "vermagic",
            Verdict::Warning,
            format!(
                "uxen.ko not found (looked at {}); its kernel release is not checked",
                searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
            "give --module PATH, or build it with cargo xtask module",
        ),
        ModuleLookup::Found { path, vermagic: Err(e) } => {
            finding("vermagic", Verdict::Blocker, format!("{}: {e}", path.display()), rebuild)
        }
        ModuleLookup::Found { path, vermagic: Ok(v) } => {
            let built_for = v.split_whitespace().next().unwrap_or("");
            if built_for == f.release {
                finding("vermagic", Verdict::Ok, format!("{} is built for the running kernel, {}", path.display(), f.release), "")
            } else {
                finding(
                    "vermagic",
                    Verdict::Blocker,
                    format!("{} is built for Linux {built_for}, but the running kernel is {}", path.display(), f.release),
                    rebuild,
                )
            }
        }
    }
}

fn nested(f: &Facts) -> Finding {
    if !f.cpuid_hypervisor {
        return finding("nested", Verdict::Ok, "bare metal: no hypervisor below Linux", "");
    }
    if f.loaded() {
        return finding("nested", Verdict::Ok, "the hypervisor below Linux is uxen-rs itself", "");
    }
    let who = f.hv_signature.as_ref().map(hypervisor_name).unwrap_or_else(|| "an unnamed hypervisor".into());
    if f.cpuid_vmx {
        finding(
            "nested",
            Verdict::Warning,
            format!("Linux is a guest of {who}, which offers nested VT-x: uxen-rs runs nested, slower, and protects DMA only if that VM has a VT-d IOMMU"),
            "run on bare metal for full speed and DMA protection",
        )
    } else {
        finding(
            "nested",
            Verdict::Blocker,
            format!("Linux is a guest of {who}, which offers no nested VT-x"),
            "turn nested VT-x on in the outer hypervisor (KVM: kvm_intel nested=1, and QEMU -cpu host,+vmx)",
        )
    }
}

/// Counts of blockers and warnings.
pub fn tally(findings: &[Finding]) -> (usize, usize) {
    let n = |v| findings.iter().filter(|f| f.verdict == v).count();
    (n(Verdict::Blocker), n(Verdict::Warning))
}

#[derive(Serialize)]
struct Report<'a> {
    findings: &'a [Finding],
    blockers: usize,
    warnings: usize,
}

/// The JSON report: `{"findings":[...],"blockers":N,"warnings":N}`.
pub fn to_json(findings: &[Finding]) -> String {
    let (blockers, warnings) = tally(findings);
    serde_json::to_string(&Report { findings, blockers, warnings }).expect("plain data serializes")
}

/// The text report: one line per finding, then a summary.
pub fn to_text(findings: &[Finding]) -> String {
    let mut s = String::new();
    for f in findings {
        s += &format!("{:<8} {:<9} {}", f.verdict.name(), f.name, f.detail);
        if !f.fix.is_empty() {
            s += &format!(" -- fix: {}", f.fix);
        }
        s.push('\n');
    }
    let (b, w) = tally(findings);
    let plural = |n: usize, one: &str| format!("{n} {one}{}", if n == 1 { "" } else { "s" });
    if b == 0 {
        s += &format!("{}, {}: uxen.ko can be loaded\n", plural(b, "blocker"), plural(w, "warning"));
    } else {
        s += &format!("{}, {}: fix the blockers before loading uxen.ko\n", plural(b, "blocker"), plural(w, "warning"));
    }
    s
}

// --- Reading the system.

/// The kernel release a module was built for: the `vermagic=` entry of the
/// ELF file's `.modinfo` section.
pub fn modinfo_vermagic(elf: &[u8]) -> Result<String, String> {
    let modinfo = elf_section(elf, ".modinfo")?;
    modinfo
        .split(|&b| b == 0)
        .find_map(|e| e.strip_prefix(b"vermagic="))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .ok_or_else(|| "no vermagic in .modinfo".to_string())
}

/// The contents of the section `name` of a little-endian ELF64 file.
fn elf_section<'a>(elf: &'a [u8], name: &str) -> Result<&'a [u8], String> {
    let bad = || "not an ELF64 kernel module".to_string();
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return Err(bad());
    }
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |o: usize| elf.get(o..o + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize);
    let u64_at = |o: usize| elf.get(o..o + 8).and_then(|b| usize::try_from(u64::from_le_bytes(b.try_into().unwrap())).ok());
    let shoff = u64_at(0x28).ok_or_else(bad)?;
    let (shentsize, shnum, shstrndx) = (u16_at(0x3a).ok_or_else(bad)?, u16_at(0x3c).ok_or_else(bad)?, u16_at(0x3e).ok_or_else(bad)?);
    if shentsize < 64 || shstrndx >= shnum {
        return Err(bad());
    }
    let section = |i: usize| -> Option<(usize, &'a [u8])> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let (off, size) = (u64_at(h + 0x18)?, u64_at(h + 0x20)?);
        Some((u32_at(h)?, elf.get(off..off.checked_add(size)?)?))
    };
    let (_, names) = section(shstrndx).ok_or_else(bad)?;
    for i in 0..shnum {
        let (n, data) = section(i).ok_or_else(bad)?;
        let sname = names.get(n..).and_then(|s| s.split(|&b| b == 0).next()).unwrap_or(&[]);
        if sname == name.as_bytes() {
            return Ok(data);
        }
    }
    Err(format!("no {name} section: not a kernel module"))
}

/// Whether `/proc/modules` lists `kvm_intel`.
fn modules_have(text: &str, module: &str) -> bool {
    text.lines().any(|l| l.split_whitespace().next() == Some(module))
}

/// Whether `/proc/interrupts` names a remapping interrupt chip.
fn remapped_irqs(interrupts: &str) -> bool {
    interrupts.split_whitespace().any(|w| w.starts_with("IR-"))
}

/// The `la57` flag and the virtual address width from `/proc/cpuinfo`.
fn cpuinfo_la57(cpuinfo: &str) -> (bool, Option<u32>) {
    let field = |key: &str| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
    };
    let la57 = field("flags").map(|f| f.split_whitespace().any(|x| x == "la57")).unwrap_or(false);
    // "address sizes	: 46 bits physical, 57 bits virtual"
    let virt = field("address sizes").and_then(|s| {
        s.split(',').find_map(|p| p.trim().strip_suffix(" bits virtual").and_then(|n| n.trim().parse().ok()))
    });
    (la57, virt)
}

/// The bracketed mode of `/sys/kernel/security/lockdown`
/// (`none [integrity] confidentiality`).
fn lockdown_mode(text: &str) -> Option<String> {
    text.split_whitespace().find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']'))).map(String::from)
}

/// The `SecureBoot` EFI variable: four attribute bytes, then the value.
fn secure_boot_on(var: &[u8]) -> bool {
    var.last() == Some(&1)
}

/// Where `check` looks for uxen.ko when no `--module` is given, in order.
pub fn module_search_list(release: &str, exe_dir: Option<&Path>) -> Vec<PathBuf> {
    let mut v = vec![PathBuf::from(format!("/lib/modules/{release}/extra/uxen.ko"))];
    if let Some(d) = exe_dir {
        // `cargo xtask module` writes target/uxen/module/uxen.ko, beside
        // target/uxen/uxenctl.
        v.push(d.join("module/uxen.ko"));
        v.push(d.join("uxen.ko"));
    }
    v.push(PathBuf::from("/lib/modules/uxen.ko"));
    v
}

fn find_module(candidates: Vec<PathBuf>) -> ModuleLookup {
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => {
            let vermagic = std::fs::read(p).map_err(|e| format!("cannot read: {e}")).and_then(|b| modinfo_vermagic(&b));
            ModuleLookup::Found { path: p.clone(), vermagic }
        }
        None => ModuleLookup::NotFound { searched: candidates },
    }
}

#[cfg(target_arch = "x86_64")]
fn cpuid(leaf: u32) -> [u32; 4] {
    // `__cpuid` is safe to call on any x86-64 CPU; older toolchains still
    // declare it `unsafe`.
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86-64 CPU and has no side effects.
    let r = unsafe { core::arch::x86_64::__cpuid(leaf) };
    [r.eax, r.ebx, r.ecx, r.edx]
}

#[cfg(not(target_arch = "x86_64"))]
fn cpuid(_leaf: u32) -> [u32; 4] {
    [0; 4]
}

fn read_msr(index: u64) -> MsrRead {
    use std::os::unix::fs::FileExt;
    let f = match std::fs::File::open("/dev/cpu/0/msr") {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return MsrRead::NoDevice,
        Err(e) => return MsrRead::Failed(e.to_string()),
    };
    let mut b = [0u8; 8];
    match f.read_at(&mut b, index) {
        Ok(8) => MsrRead::Value(u64::from_le_bytes(b)),
        Ok(n) => MsrRead::Failed(format!("short read of {n} bytes")),
        Err(e) => MsrRead::Failed(e.to_string()),
    }
}

fn words(regs: &[u32]) -> Vec<u8> {
    regs.iter().flat_map(|r| r.to_le_bytes()).collect()
}

/// Reads the machine: CPUID, the MSR, and files under `/proc` and `/sys`
/// (under `$UXEN_CHECK_ROOT` when it is set). `module` is `--module`.
pub fn gather(module: Option<&Path>) -> Facts {
    let root = PathBuf::from(std::env::var_os("UXEN_CHECK_ROOT").unwrap_or_else(|| "/".into()));
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    let text = |p: &str| std::fs::read_to_string(at(p)).unwrap_or_default();

    let l0 = cpuid(0);
    let vendor = String::from_utf8_lossy(&words(&[l0[1], l0[3], l0[2]])).into_owned();
    let l1 = cpuid(1);
    let cpuid_vmx = l1[2] & (1 << 5) != 0;
    let cpuid_hypervisor = l1[2] & (1 << 31) != 0;
    // Leaf 0x40000000 means something only under a hypervisor: bare metal
    // answers with its highest basic leaf.
    let hv_signature = cpuid_hypervisor.then(|| {
        let l = cpuid(abi::CPUID_LEAF_HV);
        words(&l[1..]).try_into().unwrap()
    });
    let feature_control = read_msr(0x3a);

    let kvm_intel = if modules_have(&text("/proc/modules"), "kvm_intel") {
        KvmIntel::Module
    } else if at("/sys/module/kvm_intel").exists() {
        // A loaded module has an `initstate`; a built-in one does not.
        if at("/sys/module/kvm_intel/initstate").exists() {
            KvmIntel::Module
        } else {
            KvmIntel::BuiltIn
        }
    } else {
        KvmIntel::Absent
    };
    let mut host_iommus: Vec<String> = std::fs::read_dir(at("/sys/class/iommu"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    host_iommus.sort();
    let (la57, virt_bits) = cpuinfo_la57(&text("/proc/cpuinfo"));
    let lockdown = std::fs::read_to_string(at("/sys/kernel/security/lockdown")).ok().and_then(|t| lockdown_mode(&t));
    let secure_boot = std::fs::read_dir(at("/sys/firmware/efi/efivars")).ok().and_then(|d| {
        d.filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with("SecureBoot-"))
            .and_then(|e| std::fs::read(e.path()).ok())
            .map(|v| secure_boot_on(&v))
    });
    let mut release = text("/proc/sys/kernel/osrelease").trim().to_string();
    if release.is_empty() {
        release = uname_release();
    }
    let candidates = match module {
        Some(p) => vec![p.to_path_buf()],
        None => {
            let exe_dir = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf));
            module_search_list(&release, exe_dir.as_deref())
        }
    };
    Facts {
        vendor,
        cpuid_vmx,
        cpuid_hypervisor,
        hv_signature,
        feature_control,
        kvm_intel,
        dmar_table: at("/sys/firmware/acpi/tables/DMAR").exists(),
        uefi: at("/sys/firmware/efi").is_dir(),
        host_iommus,
        remapped_irqs: remapped_irqs(&text("/proc/interrupts")),
        cmdline: text("/proc/cmdline").trim().to_string(),
        la57,
        virt_bits,
        lockdown,
        sig_enforce: text("/sys/module/module/parameters/sig_enforce").trim() == "Y",
        secure_boot,
        release,
        module: find_module(candidates),
    }
}

fn uname_release() -> String {
    // SAFETY: `uname` fills the zeroed structure it is given.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::new();
    }
    let bytes: Vec<u8> = u.release.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bare-metal Intel machine where everything is in order.
    fn good() -> Facts {
        Facts {
            vendor: "GenuineIntel".into(),
            cpuid_vmx: true,
            feature_control: MsrRead::Value(0x5),
            dmar_table: true,
            cmdline: "root=/dev/sda1 intel_iommu=off intremap=off".into(),
            virt_bits: Some(48),
            lockdown: Some("none".into()),
            release: "6.12.1".into(),
            module: ModuleLookup::Found { path: "/lib/modules/6.12.1/extra/uxen.ko".into(), vermagic: Ok("6.12.1 SMP mod_unload ".into()) },
            ..Facts::default()
        }
    }

    fn get(f: &Facts, name: &str) -> Finding {
        evaluate(f).into_iter().find(|x| x.name == name).unwrap_or_else(|| panic!("no finding {name}"))
    }

    fn verdict(f: &Facts, name: &str) -> Verdict {
        get(f, name).verdict
    }

    #[test]
    fn a_good_machine_has_no_blocker_or_warning() {
        let all = evaluate(&good());
        let names: Vec<_> = all.iter().map(|f| f.name).collect();
        assert_eq!(names, ["vmx", "kvm", "dmar", "intremap", "la57", "lockdown", "vermagic", "nested"]);
        assert!(all.iter().all(|f| f.verdict == Verdict::Ok && f.fix.is_empty()), "{all:#?}");
        assert_eq!(tally(&all), (0, 0));
        assert!(get(&good(), "intremap").detail.contains("booted with intel_iommu=off intremap=off"));
    }

    #[test]
    fn vmx_verdicts() {
        let mut f = good();
        f.vendor = "AuthenticAMD".into();
        let x = get(&f, "vmx");
        assert_eq!(x.verdict, Verdict::Blocker);
        assert!(x.detail.contains("AuthenticAMD"));

        let mut f = good();
        f.cpuid_vmx = false;
        assert_eq!(verdict(&f, "vmx"), Verdict::Blocker);

        let mut f = good();
        f.feature_control = MsrRead::Value(0x1);
        let x = get(&f, "vmx");
        assert_eq!(x.verdict, Verdict::Blocker);
        assert!(x.fix.contains("firmware"));

        // Unlocked: the hypervisor sets it itself.
        let mut f = good();
        f.feature_control = MsrRead::Value(0);
        assert_eq!(verdict(&f, "vmx"), Verdict::Ok);
        f.feature_control = MsrRead::Value(0x4);
        assert_eq!(verdict(&f, "vmx"), Verdict::Ok);

        let mut f = good();
        f.feature_control = MsrRead::NoDevice;
        let x = get(&f, "vmx");
        assert_eq!(x.verdict, Verdict::Warning);
        assert!(x.detail.contains("could not tell (no /dev/cpu/*/msr; `modprobe msr`)"));

        f.feature_control = MsrRead::Failed("Permission denied".into());
        let x = get(&f, "vmx");
        assert_eq!(x.verdict, Verdict::Warning);
        assert!(x.detail.contains("Permission denied"));
    }

    #[test]
    fn under_uxen_rs_vmx_is_hidden_and_that_is_fine() {
        let mut f = good();
        f.cpuid_vmx = false;
        f.cpuid_hypervisor = true;
        f.hv_signature = Some(abi::CPUID_SIGNATURE);
        f.feature_control = MsrRead::Value(FC_LOCK);
        let all = evaluate(&f);
        assert_eq!(all[0], finding("loaded", Verdict::Ok, "uxen-rs is already running (CPUID 0x40000000 answers uXenRsUXenRs)", ""));
        assert_eq!(verdict(&f, "vmx"), Verdict::Ok);
        assert_eq!(verdict(&f, "nested"), Verdict::Ok);
        assert_eq!(tally(&all), (0, 0));
        assert!(!evaluate(&good()).iter().any(|x| x.name == "loaded"));
    }

    #[test]
    fn kvm_verdicts() {
        let mut f = good();
        assert_eq!(verdict(&f, "kvm"), Verdict::Ok);
        f.kvm_intel = KvmIntel::Module;
        let x = get(&f, "kvm");
        assert_eq!((x.verdict, x.fix.as_str()), (Verdict::Blocker, "rmmod kvm_intel kvm"));
        f.kvm_intel = KvmIntel::BuiltIn;
        assert_eq!(verdict(&f, "kvm"), Verdict::Blocker);
        assert!(modules_have("kvm_intel 413696 0 - Live 0x0000000000000000\nkvm 1 1 kvm_intel, Live 0x0\n", "kvm_intel"));
        assert!(!modules_have("kvm 1 0 - Live 0x0\nuxen 2 0 - Live 0x0\n", "kvm_intel"));
    }

    #[test]
    fn dmar_verdicts() {
        let mut f = good();
        assert_eq!(verdict(&f, "dmar"), Verdict::Ok);
        f.dmar_table = false;
        let x = get(&f, "dmar");
        assert_eq!(x.verdict, Verdict::Warning);
        assert!(x.detail.contains("require_iommu=1"));

        // UEFI: the driver takes the table from the kernel; no rsdp= needed.
        let mut f = good();
        f.uefi = true;
        let x = get(&f, "dmar");
        assert_eq!(x.verdict, Verdict::Ok);
        assert!(x.detail.contains("UEFI: the driver takes the table from the kernel, no rsdp= needed"), "{}", x.detail);
        assert_eq!(x.fix, "");
        f.dmar_table = false;
        assert_eq!(verdict(&f, "dmar"), Verdict::Warning);
    }

    #[test]
    fn intremap_verdicts() {
        let mut f = good();
        f.host_iommus = vec!["dmar0".into(), "dmar1".into()];
        let x = get(&f, "intremap");
        assert_eq!((x.verdict, x.fix.as_str()), (Verdict::Blocker, "boot with intel_iommu=off intremap=off"));
        assert!(x.detail.contains("dmar0, dmar1"));

        let mut f = good();
        f.remapped_irqs = true;
        assert_eq!(verdict(&f, "intremap"), Verdict::Blocker);

        let mut f = good();
        f.dmar_table = false;
        f.cmdline = String::new();
        assert_eq!(get(&f, "intremap").detail, "no remapping hardware (no DMAR table)");
        f.dmar_table = true;
        assert_eq!(verdict(&f, "intremap"), Verdict::Ok);

        assert!(remapped_irqs("  0:  44  IR-IO-APIC    2-edge      timer\n"));
        assert!(remapped_irqs(" 25:   0  IR-PCI-MSIX-0000:00:1f.6    0-edge  eth0\n"));
        assert!(!remapped_irqs("  0:  44  IO-APIC    2-edge      timer\n 24: 0 PCI-MSI 512-edge ahci\n"));
    }

    #[test]
    fn la57_verdicts() {
        let mut f = good();
        f.la57 = true;
        let x = get(&f, "la57");
        assert_eq!((x.verdict, x.fix.as_str()), (Verdict::Blocker, "boot with no5lvl"));
        f.la57 = false;
        f.virt_bits = Some(57);
        let x = get(&f, "la57");
        assert_eq!(x.verdict, Verdict::Ok);
        assert!(x.detail.contains("Linux uses 4 levels"));

        let ci = "processor\t: 0\nflags\t\t: fpu vme la57 vmx\naddress sizes\t: 46 bits physical, 57 bits virtual\n";
        assert_eq!(cpuinfo_la57(ci), (true, Some(57)));
        let ci = "flags\t\t: fpu vme vmx\naddress sizes\t: 39 bits physical, 48 bits virtual\n";
        assert_eq!(cpuinfo_la57(ci), (false, Some(48)));
        assert_eq!(cpuinfo_la57(""), (false, None));
    }

    #[test]
    fn lockdown_verdicts() {
        let mut f = good();
        for mode in ["integrity", "confidentiality"] {
            f.lockdown = Some(mode.into());
            let x = get(&f, "lockdown");
            assert_eq!(x.verdict, Verdict::Blocker, "{mode}");
            assert!(x.detail.contains(mode));
        }
        let mut f = good();
        f.sig_enforce = true;
        assert_eq!(verdict(&f, "lockdown"), Verdict::Blocker);

        // Secure Boot without lockdown loads; Secure Boot with the lockdown
        // unknown may not.
        let mut f = good();
        f.secure_boot = Some(true);
        assert_eq!(verdict(&f, "lockdown"), Verdict::Ok);
        f.lockdown = None;
        assert_eq!(verdict(&f, "lockdown"), Verdict::Warning);
        f.secure_boot = Some(false);
        assert_eq!(verdict(&f, "lockdown"), Verdict::Ok);
        f.secure_boot = None;
        assert_eq!(verdict(&f, "lockdown"), Verdict::Ok);

        assert_eq!(lockdown_mode("none [integrity] confidentiality\n").as_deref(), Some("integrity"));
        assert_eq!(lockdown_mode("[none] integrity confidentiality\n").as_deref(), Some("none"));
        assert!(secure_boot_on(&[6, 0, 0, 0, 1]));
        assert!(!secure_boot_on(&[6, 0, 0, 0, 0]));
    }

    #[test]
    fn vermagic_verdicts() {
        let mut f = good();
        f.release = "6.13.0-rc1".into();
        let x = get(&f, "vermagic");
        assert_eq!(x.verdict, Verdict::Blocker);
        assert!(x.detail.contains("built for Linux 6.12.1, but the running kernel is 6.13.0-rc1"), "{}", x.detail);
        assert!(x.fix.contains("cargo xtask module --kdir /lib/modules/6.13.0-rc1/build"));

        let mut f = good();
        f.module = ModuleLookup::NotFound { searched: vec!["/a/uxen.ko".into(), "/b/uxen.ko".into()] };
        let x = get(&f, "vermagic");
        assert_eq!(x.verdict, Verdict::Warning);
        assert!(x.detail.contains("/a/uxen.ko, /b/uxen.ko"));

        f.module = ModuleLookup::Found { path: "/x.ko".into(), vermagic: Err("not an ELF64 kernel module".into()) };
        assert_eq!(verdict(&f, "vermagic"), Verdict::Blocker);

        let l = module_search_list("6.12.1", Some(Path::new("/opt/uxen")));
        assert_eq!(
            l,
            ["/lib/modules/6.12.1/extra/uxen.ko", "/opt/uxen/module/uxen.ko", "/opt/uxen/uxen.ko", "/lib/modules/uxen.ko"]
                .map(PathBuf::from)
        );
    }

    /// A minimal ELF64 file: a null section, `.modinfo` and `.shstrtab`.
    fn elf_with_modinfo(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let mut e = vec![0u8; 64];
        e[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let modinfo_off = e.len();
        e.extend_from_slice(modinfo);
        let shstr_off = e.len();
        e.extend_from_slice(shstrtab);
        let shoff = e.len();
        e[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        e[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        e[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        e[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        for (name, off, size) in [(0u32, 0usize, 0usize), (1, modinfo_off, modinfo.len()), (10, shstr_off, shstrtab.len())] {
            let mut h = [0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            e.extend_from_slice(&h);
        }
        e
    }

    #[test]
    fn vermagic_is_read_from_modinfo() {
        let elf = elf_with_modinfo(b"license=GPL\0vermagic=6.12.1 SMP mod_unload \0name=uxen\0");
        assert_eq!(modinfo_vermagic(&elf).as_deref(), Ok("6.12.1 SMP mod_unload "));
        let elf = elf_with_modinfo(b"license=GPL\0name=uxen\0");
        assert_eq!(modinfo_vermagic(&elf), Err("no vermagic in .modinfo".into()));
        assert!(modinfo_vermagic(b"#!/bin/sh\n").is_err());
        // Truncated anywhere before the last section header's size field:
        // an error, never a panic (the rest of that header is not read).
        let elf = elf_with_modinfo(b"vermagic=6.12.1 \0");
        for n in 0..elf.len() - 24 {
            assert!(modinfo_vermagic(&elf[..n]).is_err(), "{n}");
        }
    }

    #[test]
    fn nested_verdicts() {
        let mut f = good();
        assert_eq!(verdict(&f, "nested"), Verdict::Ok);
        f.cpuid_hypervisor = true;
        f.hv_signature = Some(*b"KVMKVMKVM\0\0\0");
        let x = get(&f, "nested");
        assert_eq!(x.verdict, Verdict::Warning);
        assert!(x.detail.contains("guest of KVM"));
        f.cpuid_vmx = false;
        f.hv_signature = Some(*b"Microsoft Hv");
        let x = get(&f, "nested");
        assert_eq!(x.verdict, Verdict::Blocker);
        assert!(x.detail.contains("Hyper-V"));
        assert_eq!(hypervisor_name(b"VMwareVMware"), "VMware");
        assert_eq!(hypervisor_name(&[0; 12]), "a hypervisor without a CPUID signature");
        assert_eq!(hypervisor_name(b"Abc\0\0\0\0\0\0\0\0\0"), "a hypervisor signed \"Abc\"");
    }

    #[test]
    fn cmdline_options() {
        let c = "BOOT_IMAGE=/vmlinuz intel_iommu=off,sm_on intremap=off no5lvl";
        assert!(cmdline_has(c, "intel_iommu=off") && cmdline_has(c, "intremap=off") && cmdline_has(c, "no5lvl"));
        assert!(!cmdline_has("intel_iommu=on", "intel_iommu=off"));
        assert!(!cmdline_has("no5lvl=1", "no5lvl"));
    }

    #[test]
    fn reports() {
        let mut f = good();
        f.kvm_intel = KvmIntel::Module;
        f.dmar_table = false;
        let all = evaluate(&f);
        let j = to_json(&all);
        assert!(j.starts_with(r#"{"findings":[{"name":"vmx","verdict":"ok","detail":""#), "{j}");
        assert!(j.contains(r#"{"name":"kvm","verdict":"blocker","detail":"kvm_intel is loaded and holds VT-x","fix":"rmmod kvm_intel kvm"}"#), "{j}");
        assert!(j.ends_with(r#"],"blockers":1,"warnings":1}"#), "{j}");
        let t = to_text(&all);
        assert_eq!(t.lines().count(), all.len() + 1);
        assert!(t.contains("blocker  kvm       kvm_intel is loaded and holds VT-x -- fix: rmmod kvm_intel kvm\n"), "{t}");
        assert!(t.ends_with("1 blocker, 1 warning: fix the blockers before loading uxen.ko\n"), "{t}");
        assert!(to_text(&evaluate(&good())).ends_with("0 blockers, 0 warnings: uxen.ko can be loaded\n"));
    }
}
