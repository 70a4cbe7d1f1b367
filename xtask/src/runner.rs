//! Emulator runners behind one interface.
//!
//! A run boots the test kernel and initramfs with `uxen.suite=NAME`; `/init`
//! runs `tests/scripts/NAME.sh`, whose checks print markers on the serial
//! port. The run's verdict comes from those markers, the script's exit status
//! and a hard timeout, never from the emulator's own exit code.

use crate::artifacts::{self, Artifacts};
use crate::util;
use anyhow::{Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Serial markers written by `tests/scripts/lib.sh`.
pub const PASS: &str = "UXEN-TEST: PASS ";
pub const FAIL: &str = "UXEN-TEST: FAIL ";
pub const END: &str = "UXEN-SUITE-END: ";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Bochs 2.7: VMX with EPT, 2 CPUs.
    Bochs,
    /// QEMU TCG, q35 with an Intel IOMMU and the edu DMA device; no VMX.
    QemuTcg,
    /// QEMU/KVM with nested VT-x, where the host has it.
    QemuKvm,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Bochs => "bochs",
            Backend::QemuTcg => "qemu",
            Backend::QemuKvm => "kvm",
        }
    }

    pub fn parse(s: &str) -> Option<Backend> {
        match s {
            "bochs" => Some(Backend::Bochs),
            "qemu" | "tcg" => Some(Backend::QemuTcg),
            "kvm" => Some(Backend::QemuKvm),
            _ => None,
        }
    }

    pub fn machine(self) -> Box<dyn Machine> {
        match self {
            Backend::Bochs => Box::new(Bochs),
            Backend::QemuTcg => Box::new(Qemu { kvm: false }),
            Backend::QemuKvm => Box::new(Qemu { kvm: true }),
        }
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub suite: String,
    pub timeout: Duration,
    /// Extra kernel command line.
    pub cmdline: String,
    pub cpus: u32,
    pub mem_mib: u32,
    /// The `-device`s of a QEMU machine (see [`QEMU_DEVICES`]).
    pub qemu_devices: &'static [&'static str],
    /// QEMU boots UEFI firmware ([`OVMF`]) instead of SeaBIOS.
    pub uefi: bool,
    /// Echo the serial console while running (the demo).
    pub live: bool,
    /// Treat the run as hung once its console has been silent this long.
    pub stall: Option<Duration>,
}

/// QEMU TCG's devices unless a suite asks otherwise: the Intel IOMMU (which
/// must come before the devices it translates for) and edu, a PCI device
/// that does DMA on request.
pub const QEMU_DEVICES: &[&str] = &["intel-iommu", "edu"];

/// The same under KVM, where interrupt remapping is off: QEMU would want
/// a split irqchip for it, and the hypervisor refuses a host that remaps
/// interrupts anyway (`docs/vtd.md`, section 9).
pub const KVM_DEVICES: &[&str] = &["intel-iommu,intremap=off", "edu"];

/// Debian's OVMF (package `ovmf`): UEFI firmware for QEMU's `-bios`, which
/// boots the kernel given by `-kernel` through its EFI stub.
pub const OVMF: &str = "/usr/share/ovmf/OVMF.fd";

/// One emulated machine kind.
pub trait Machine {
    fn backend(&self) -> Backend;
    /// `Err(why)` when this host cannot run it.
    fn available(&self) -> std::result::Result<(), String>;
    /// Starts the machine; its serial console goes to `serial`.
    fn start(&self, spec: &RunSpec, a: &Artifacts, dir: &Path, serial: &Path) -> Result<Child>;
    /// Stops a machine that ran out of time, leaving what it can of its
    /// state in the run's directory first.
    fn stop_hung(&self, child: &mut Child) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// One in-guest check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// The verdict of a run.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub suite: String,
    pub backend: Backend,
    pub checks: Vec<Check>,
    /// The script's exit status, if the end marker was seen.
    pub rc: Option<i32>,
    pub timed_out: bool,
    /// Problems outside the checks: kernel panic, missing end marker, ...
    pub problems: Vec<String>,
    pub wall: Duration,
    pub serial: PathBuf,
    pub skipped: Option<String>,
    /// For harness self-tests: whether `xtask run` exited non-zero.
    pub command_failed: Option<bool>,
    /// `UXEN-MARK: NAME` lines and the wall time since the start at which
    /// they were seen (to the runner's polling interval, 250 ms): benches
    /// time stretches of a run in real seconds with them.
    pub marks: Vec<(String, Duration)>,
}

impl Outcome {
    /// The outcome of a run of `suite` whose serial console printed
    /// `serial` and that ended by itself (host tests of the judgement).
    #[cfg(test)]
    pub fn from_serial(suite: &str, serial: &str) -> Outcome {
        let (checks, rc, problems) = parse_serial(serial);
        Outcome {
            suite: suite.into(),
            backend: Backend::Bochs,
            checks,
            rc,
            timed_out: false,
            problems,
            wall: Duration::ZERO,
            serial: PathBuf::new(),
            skipped: None,
            command_failed: None,
            marks: Vec::new(),
        }
    }

    /// Whether the suite ran and passed. A skipped suite did not run: it
    /// has not passed (nor failed; see `tally`).
    pub fn passed(&self) -> bool {
        self.skipped.is_none()
            && !self.timed_out
            && self.rc == Some(0)
            && self.problems.is_empty()
            && !self.checks.is_empty()
            && self.checks.iter().all(|c| c.passed)
    }
}

/// Reads the markers out of a serial log.
pub fn parse_serial(text: &str) -> (Vec<Check>, Option<i32>, Vec<String>) {
    let mut checks = Vec::new();
    let mut rc = None;
    let mut problems = Vec::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(i) = line.find(PASS) {
            let rest = &line[i + PASS.len()..];
            checks.push(Check { name: rest.trim().to_string(), passed: true, detail: String::new() });
        } else if let Some(i) = line.find(FAIL) {
            let rest = &line[i + FAIL.len()..];
            let (name, detail) = rest.split_once(": ").unwrap_or((rest, ""));
            checks.push(Check { name: name.trim().to_string(), passed: false, detail: detail.to_string() });
        } else if let Some(i) = line.find(END) {
            let rest = &line[i + END.len()..];
            rc = rest
                .split_whitespace()
                .find_map(|w| w.strip_prefix("rc="))
                .and_then(|v| v.parse().ok());
        }
        for bad in ["Kernel panic", "general protection fault", "BUG: unable to handle", "Oops:"] {
            if line.contains(bad) {
                problems.push(format!("console: {}", line.trim()));
            }
        }
    }
    if rc.is_none() {
        problems.push("the suite never reached its end marker".to_string());
    }
    (checks, rc, problems)
}

/// Boots `spec` on `machine` and judges it.
pub fn run(machine: &dyn Machine, spec: &RunSpec, a: &Artifacts) -> Result<Outcome> {
    let backend = machine.backend();
    let dir = util::out().join(format!("runs/{}-{}", backend.name(), spec.suite));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let serial = dir.join("serial.log");
    if let Err(why) = machine.available() {
        return Ok(Outcome {
            suite: spec.suite.clone(),
            backend,
            checks: Vec::new(),
            rc: None,
            timed_out: false,
            problems: Vec::new(),
            wall: Duration::ZERO,
            serial,
            skipped: Some(why),
            command_failed: None,
            marks: Vec::new(),
        });
    }
    std::fs::write(&serial, b"")?;
    let t0 = Instant::now();
    let mut child = machine.start(spec, a, &dir, &serial)?;
    let mut echoed = 0usize;
    let mut ended_at: Option<Instant> = None;
    let mut timed_out = false;
    let mut stalled = false;
    let (mut seen, mut quiet_since) = (0usize, Instant::now());
    let (mut marks, mut marked) = (Vec::new(), 0usize);
    loop {
        let text = read_lossy(&serial);
        if text.len() != seen {
            (seen, quiet_since) = (text.len(), Instant::now());
        }
        // Whole lines only: a mark still being written is seen next time.
        let done = text.rfind('\n').map_or(marked, |i| i + 1).max(marked);
        marks.extend(find_marks(&text[marked..done]).map(|m| (m, t0.elapsed())));
        marked = done;
        if spec.live && text.len() > echoed {
            eprint!("{}", &text[echoed..]);
            echoed = text.len();
        }
        if ended_at.is_none() && text.contains(END) {
            ended_at = Some(Instant::now());
        }
        if let Some(status) = child.try_wait()? {
            let _ = status;
            break;
        }
        // The script powers the machine off after its end marker; give it a
        // moment, then stop the emulator ourselves.
        if ended_at.map(|t| t.elapsed() > Duration::from_secs(10)).unwrap_or(false) {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        stalled = spec.stall.map(|d| quiet_since.elapsed() > d).unwrap_or(false);
        if t0.elapsed() > spec.timeout || stalled {
            timed_out = true;
            machine.stop_hung(&mut child);
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let wall = t0.elapsed();
    let text = read_lossy(&serial);
    if spec.live && text.len() > echoed {
        eprint!("{}", &text[echoed..]);
    }
    let (checks, rc, mut problems) = parse_serial(&text);
    if stalled {
        problems.push(format!("no console output for {}s", spec.stall.unwrap_or_default().as_secs()));
    } else if timed_out {
        problems.push(format!("timed out after {}s", spec.timeout.as_secs()));
    }
    Ok(Outcome {
        suite: spec.suite.clone(),
        backend,
        checks,
        rc,
        timed_out,
        problems,
        wall,
        serial,
        skipped: None,
        command_failed: None,
        marks,
    })
}

const MARK: &str = "UXEN-MARK: ";

/// The names of the `UXEN-MARK: NAME` lines in `text`.
fn find_marks(text: &str) -> impl Iterator<Item = String> + '_ {
    text.lines().filter_map(|l| l.split_once(MARK)).map(|(_, m)| m.trim().to_string())
}

fn read_lossy(p: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = std::fs::File::open(p) {
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Debugger commands: run; once interrupted, each CPU's registers, its
/// stack and a short trace of what it executes next; the IOAPIC and PIC;
/// the kernel's jiffies, clocksource and timekeeper before and after 20
/// million more instructions (whether time still moves); then quit.
fn hang_dump(cpus: u32) -> String {
    let mut s = String::from("c\n");
    for c in 0..cpus {
        s += &format!("set $cpu = {c}\nr\nsreg\ncreg\nprint-stack 32\ntrace on\ns {c} 400\ntrace off\nr\n");
    }
    s += "info device ioapic\ninfo device pic\n";
    // System.map lines: address, type, name.
    let map = std::fs::read_to_string(util::out().join("System.map")).unwrap_or_default();
    let addr = |want: &str| {
        map.lines().find_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [a, _, name] if name == want => Some(a.to_string()),
            _ => None,
        })
    };
    let probe: String = [("jiffies_64", 1), ("curr_clocksource", 1), ("tick_do_timer_cpu", 1), ("tk_core", 24)]
        .into_iter()
        .filter_map(|(name, qwords)| addr(name).map(|a| format!("x /{qwords}gx 0x{a}\n")))
        .collect();
    s + &probe + "s all 20000000\n" + &probe + "quit\n"
}

/// Bochs with VMX (`corei7_skylake_x`), `clock: sync=none`.
pub struct Bochs;

/// Instructions per emulated second; lower is faster here, and with
/// `sync=none` the emulated TSC advances with emulated instructions.
pub const BOCHS_IPS: u64 = 50_000_000;

impl Machine for Bochs {
    fn backend(&self) -> Backend {
        Backend::Bochs
    }

    fn available(&self) -> std::result::Result<(), String> {
        which("bochs").map_err(|_| "bochs is not installed (run `cargo xtask setup`)".to_string())
    }

    /// Interrupts Bochs into its debugger, which runs the rest of
    /// `dbg.rc` (the CPUs' state, into `bochs.stdout`) and quits.
    fn stop_hung(&self, child: &mut Child) {
        let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn start(&self, spec: &RunSpec, a: &Artifacts, dir: &Path, serial: &Path) -> Result<Child> {
        // With `sync=none` the TSC advances one tick per emulated
        // instruction, BOCHS_IPS a second, but the CPU model claims some
        // GHz: Linux would keep time (sleeps, timeouts) at a small fraction
        // of the emulated clock that drives jiffies and the PIT.
        let cmdline = format!("tsc_early_khz={} {}", BOCHS_IPS / 1000, spec.cmdline);
        let iso = artifacts::iso(a, &spec.suite, cmdline.trim())?;
        let rc = format!(
            "plugin_ctrl: unmapped=1, biosdev=1, speaker=0, extfpuirq=1, parallel=0, serial=1, gameport=0, \
             e1000=0, ne2k=0, sb16=0, es1370=0, usb_uhci=0, usb_ohci=0, usb_ehci=0, usb_xhci=0\n\
             config_interface: textconfig\n\
             display_library: term\n\
             megs: {mem}\n\
             cpu: model=corei7_skylake_x, count={cpus}, ips={ips}, reset_on_triple_fault=0\n\
             clock: sync=none, time0=local\n\
             romimage: file=/usr/share/bochs/BIOS-bochs-latest, options=fastboot\n\
             vgaromimage: file=/usr/share/bochs/VGABIOS-lgpl-latest\n\
             pci: enabled=1, chipset=i440fx\n\
             ata0: enabled=1, ioaddr1=0x1f0, ioaddr2=0x3f0, irq=14\n\
             ata0-master: type=cdrom, path={iso}, status=inserted\n\
             boot: cdrom\n\
             port_e9_hack: enabled=1\n\
             com1: enabled=1, mode=file, dev={serial}\n\
             log: {log}\n\
             panic: action=fatal\n\
             error: action=report\n\
             info: action=report\n\
             debug: action=ignore\n",
            mem = spec.mem_mib,
            cpus = spec.cpus,
            ips = BOCHS_IPS,
            iso = iso.display(),
            serial = serial.display(),
            log = dir.join("bochs.log").display(),
        );
        std::fs::write(dir.join("bochsrc.txt"), rc)?;
        // The Debian build has the internal debugger: feed it "continue",
        // then, should the run hang and be interrupted, where every CPU is.
        std::fs::write(dir.join("dbg.rc"), hang_dump(spec.cpus))?;
        let out = std::fs::File::create(dir.join("bochs.stdout"))?;
        Command::new("bochs")
            .current_dir(dir)
            .env("TERM", "dumb")
            .args(["-q", "-f", "bochsrc.txt", "-rc", "dbg.rc"])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("cannot start bochs")
    }
}

/// QEMU: TCG (q35 + intel-iommu + edu), or KVM with nested VT-x (the same
/// devices, `KVM_DEVICES`), with SeaBIOS or, for `RunSpec::uefi`, OVMF.
pub struct Qemu {
    pub kvm: bool,
}

impl Machine for Qemu {
    fn backend(&self) -> Backend {
        if self.kvm {
            Backend::QemuKvm
        } else {
            Backend::QemuTcg
        }
    }

    fn available(&self) -> std::result::Result<(), String> {
        which("qemu-system-x86_64").map_err(|_| "qemu-system-x86_64 is not installed".to_string())?;
        if self.kvm {
            if !Path::new("/dev/kvm").exists() {
                return Err("no /dev/kvm on this host: nested VT-x runs are skipped".into());
            }
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            if !cpuinfo.split_whitespace().any(|w| w == "vmx") {
                return Err("the host CPU has no VT-x: nested VT-x runs are skipped".into());
            }
            let nested = std::fs::read_to_string("/sys/module/kvm_intel/parameters/nested").unwrap_or_default();
            if !matches!(nested.trim(), "Y" | "1") {
                return Err("kvm_intel has nested=0: nested VT-x runs are skipped".into());
            }
        }
        Ok(())
    }

    fn start(&self, spec: &RunSpec, a: &Artifacts, dir: &Path, serial: &Path) -> Result<Child> {
        let mut c = Command::new("qemu-system-x86_64");
        c.current_dir(dir);
        if self.kvm {
            c.args(["-enable-kvm", "-M", "q35", "-cpu", "host,+vmx"]);
        } else {
            c.args(["-M", "q35", "-cpu", "max"]);
        }
        for d in spec.qemu_devices {
            c.args(["-device", d]);
        }
        if spec.uefi {
            if !Path::new(OVMF).exists() {
                anyhow::bail!("{OVMF} is missing: install the ovmf package (cargo xtask setup)");
            }
            c.args(["-bios", OVMF]);
        }
        c.args(["-smp", &spec.cpus.to_string(), "-m", &spec.mem_mib.to_string()])
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-kernel")
            .arg(&a.bzimage)
            .arg("-initrd")
            .arg(&a.initramfs)
            .arg("-append")
            .arg(artifacts::kernel_cmdline(&spec.suite, &spec.cmdline));
        let out = std::fs::File::create(dir.join("qemu.stdout"))?;
        c.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out).spawn().context("cannot start qemu")
    }
}

fn which(prog: &str) -> std::result::Result<(), ()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|d| d.join(prog).exists()) {
        Ok(())
    } else {
        Err(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hang_dump_runs_first_then_visits_every_cpu_and_quits() {
        let d = hang_dump(2);
        assert!(d.starts_with("c\n"));
        assert!(d.ends_with("quit\n"));
        for c in 0..2 {
            assert!(d.contains(&format!("set $cpu = {c}\nr\n")), "{d}");
        }
        assert!(!d.contains("set $cpu = 2"));
    }

    #[test]
    fn markers_decide() {
        let log = "boot\nUXEN-TEST: PASS a\nUXEN-TEST: FAIL b: wrong value\nUXEN-SUITE-END: x rc=1 uptime=3.2\n";
        let (checks, rc, problems) = parse_serial(log);
        assert_eq!(checks.len(), 2);
        assert!(checks[0].passed);
        assert!(!checks[1].passed);
        assert_eq!(checks[1].detail, "wrong value");
        assert_eq!(rc, Some(1));
        assert!(problems.is_empty());
    }

    #[test]
    fn missing_end_is_a_problem() {
        let (_, rc, problems) = parse_serial("UXEN-TEST: PASS a\n");
        assert_eq!(rc, None);
        assert_eq!(problems.len(), 1);
    }

    #[test]
    fn panic_is_a_problem() {
        let (_, _, problems) = parse_serial("UXEN-TEST: PASS a\nKernel panic - not syncing: x\nUXEN-SUITE-END: s rc=0\n");
        assert_eq!(problems.len(), 1);
    }
}
