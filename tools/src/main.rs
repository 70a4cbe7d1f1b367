//! `uxenctl`: the uxen-rs control CLI and VMM.

use anyhow::{anyhow, Result};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use shared_abi as abi;
use std::path::PathBuf;
use std::process::ExitCode;

mod acpi;
mod automerge;
mod boot;
mod check;
mod console;
mod daemon;
mod dev;
mod linux;
mod mptable;
mod stats;
mod vmm;

#[derive(Parser)]
#[command(name = "uxenctl", version, about = "Control the uxen-rs hypervisor and run its VMs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Guest memory in MiB: a positive multiple of 2, at most 4096.
fn parse_mem(s: &str) -> std::result::Result<u64, String> {
    let v: u64 = s.parse().map_err(|_| format!("`{s}` is not a number of MiB"))?;
    // The driver's own rule (shared_abi::validate), checked before the ioctl.
    let probe = abi::VmCreate { mem_bytes: v.saturating_mul(1 << 20), vcpus: 1, ..Default::default() };
    if abi::validate::vm_create(&probe).is_err() {
        return Err(format!("{v} MiB: guest memory must be a multiple of 2 MiB, between 2 and 4096"));
    }
    Ok(v)
}

fn parse_vcpus(s: &str) -> std::result::Result<u32, String> {
    let v: u32 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    let probe = abi::VmCreate { mem_bytes: abi::VM_MEM_ALIGN, vcpus: v, ..Default::default() };
    if abi::validate::vm_create(&probe).is_err() {
        return Err(format!("{v} vCPUs: between 1 and {}", abi::VM_MAX_VCPUS));
    }
    Ok(v)
}

fn parse_name(s: &str) -> std::result::Result<String, String> {
    if s.is_empty() || s.len() >= abi::VM_NAME_LEN || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("VM names are 1 to {} printable characters without spaces", abi::VM_NAME_LEN - 1));
    }
    Ok(s.to_string())
}

/// What `uxenctl run --help` says after the options.
const RUN_AFTER_HELP: &str = "\
Exit status: the guest's exit code (a Linux guest that powers off: 0); 71 when a
Linux guest rebooted; 72 after a kernel panic; 70 when the VM was stopped
otherwise; 1 when uxenctl failed before the VM ran.

With --kernel, standard input (a terminal, in raw mode, or a pipe) goes to the
guest's console, COM1. On a terminal, Ctrl-A x ends the VM.";

/// A VM's name when `--name` is not given: its file's name, cut to fit.
fn default_name(file: Option<&std::path::Path>) -> String {
    file.and_then(|f| f.file_name())
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty())
        .unwrap_or("vm")
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(abi::VM_NAME_LEN - 1)
        .collect()
}

/// `--mem` of a test guest when it is not given.
const TEST_MEM_MIB: u64 = 16;

/// What `run` and `create` start: a test guest or a Linux kernel.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("guest").args(["image", "kernel"]).required(true)))]
struct GuestArgs {
    /// A test guest: a static ELF64 x86-64 executable (docs/guest-abi.md, part 1).
    #[arg(conflicts_with = "kernel")]
    image: Option<PathBuf>,
    /// A Linux kernel, a bzImage or an uncompressed vmlinux (docs/guest-abi.md, part 2).
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// An initrd or initramfs for --kernel.
    #[arg(long, value_name = "FILE", requires = "kernel", conflicts_with = "image")]
    initrd: Option<PathBuf>,
    /// Guest memory in MiB [default: 16 with IMAGE, 64 with --kernel].
    #[arg(long, value_name = "MIB", value_parser = parse_mem)]
    mem: Option<u64>,
    /// Number of vCPUs, 1 to 8.
    #[arg(long, default_value = "1", value_parser = parse_vcpus)]
    vcpus: u32,
    /// The guest's command line [default: empty with IMAGE; with --kernel
    /// "console=ttyS0 quiet tsc=reliable mitigations=off"]. With --kernel,
    /// " reboot=t,panic_warm panic=-1 x2apic_phys" is always appended.
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
}

impl GuestArgs {
    fn mem_mib(&self) -> u64 {
        self.mem.unwrap_or(if self.kernel.is_some() { linux::DEFAULT_MEM_MIB } else { TEST_MEM_MIB })
    }

    /// Reads and checks everything, and lays the guest out; no VM exists
    /// yet, so that bad input creates none.
    fn prepare(&self) -> Result<boot::Guest> {
        let mem_bytes = self.mem_mib() << 20;
        if let Some(kernel) = &self.kernel {
            let spec = linux::Spec {
                kernel,
                initrd: self.initrd.as_deref(),
                cmdline: self.cmdline.as_deref(),
                mem_bytes,
                vcpus: self.vcpus,
            };
            return Ok(boot::Guest::Linux(Box::new(linux::prepare(&spec)?)));
        }
        let image = self.image.as_deref().ok_or_else(|| anyhow!("give IMAGE or --kernel"))?;
        Ok(boot::Guest::Test(boot::prepare(image, mem_bytes, self.cmdline.as_deref().unwrap_or(""))?))
    }

    /// The file a VM takes its default name from.
    fn file(&self) -> Option<&std::path::Path> {
        self.kernel.as_deref().or(self.image.as_deref())
    }
}

/// What `uxenctl check --help` says after the options.
const CHECK_AFTER_HELP: &str = "\
Findings: vmx, kvm, dmar, intremap, la57, lockdown, vermagic, nested, and
loaded when uxen-rs already runs. Each is ok, warning or blocker.
Exit status: 0 without blockers, 1 with any.

Without --module, uxen.ko is looked for at /lib/modules/$(uname -r)/extra/uxen.ko,
then module/uxen.ko and uxen.ko beside the uxenctl executable, then
/lib/modules/uxen.ko.

UXEN_CHECK_ROOT=DIR (a test hook) reads /proc and /sys under DIR instead.";

#[derive(Subcommand)]
enum Cmd {
    /// Check, before loading anything, whether this machine can run
    /// uxen-rs: VT-x, KVM, VT-d, paging, lockdown, the module's kernel.
    #[command(after_help = CHECK_AFTER_HELP)]
    Check {
        /// Print one JSON object: {"findings":[{"name","verdict","detail","fix"}...],"blockers":N,"warnings":N}.
        #[arg(long)]
        json: bool,
        /// The uxen.ko whose kernel release to check.
        #[arg(long, value_name = "PATH")]
        module: Option<PathBuf>,
    },
    /// Print the driver's and the hypervisor image's versions and ABI revisions.
    Version {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print the hypervisor's counters: per-CPU exits by reason, blocked host
    /// accesses, DMA protection, the frame pool.
    Stats {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Run a guest in the foreground: a test guest IMAGE, or a Linux
    /// kernel with --kernel.
    #[command(after_help = RUN_AFTER_HELP)]
    Run {
        #[command(flatten)]
        guest: GuestArgs,
        /// The VM's name in `uxenctl list`.
        #[arg(long, default_value = "run", value_parser = parse_name)]
        name: String,
    },
    /// Start a guest in the background (a test guest IMAGE, or a Linux
    /// kernel with --kernel); print its VM id.
    Create {
        #[command(flatten)]
        guest: GuestArgs,
        /// The VM's name in `uxenctl list` [default: the file name of IMAGE
        /// or --kernel].
        #[arg(long, value_parser = parse_name)]
        name: Option<String>,
    },
    /// List the VMs.
    List {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Print a detached VM's console output so far (-f: follow it), or
    /// with --send type into a Linux guest's console.
    Console {
        vm: u32,
        /// Keep printing the console as it grows, until the VM ends.
        #[arg(short, long)]
        follow: bool,
        /// Send TEXT to the console's input (a Linux guest), and print the
        /// console only with -f. Escapes: \n, \r, \t, \\ and \xHH.
        #[arg(long, value_name = "TEXT")]
        send: Option<String>,
        /// Wait until a line the console prints from now on (after what
        /// --send sent) matches REGEX, print that line and exit 0; exit 1
        /// if the time runs out or the VM ends first.
        #[arg(long, value_name = "REGEX", conflicts_with = "follow")]
        expect: Option<String>,
        /// How long --expect waits, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 60_000, requires = "expect")]
        timeout: u64,
    },
    /// Destroy a VM.
    Destroy { vm: u32 },
    /// Fork a running VM started with `create`: copy-on-write clones, run
    /// by their own VMMs. Prints the children's ids.
    Fork {
        vm: u32,
        #[arg(long, default_value = "1", value_parser = clap::value_parser!(u32).range(1..=64))]
        count: u32,
        /// Copy every frame now instead of sharing it (a baseline to compare
        /// against).
        #[arg(long)]
        copy: bool,
        /// Print a JSON array of {"id", "tsc"}: each child and the
        /// hypervisor's cost of making it in TSC ticks.
        #[arg(long)]
        json: bool,
    },
    /// Fold identical guest pages back onto one frame and drop all-zero
    /// pages, across every VM or within one; the freed frames go back to
    /// the host.
    Merge {
        /// Only this VM's pages (folded onto each other and onto frames it
        /// already shares).
        vm: Option<u32>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Merge in the background instead, from now on (the driver's
        /// kernel thread); `--auto off` stops it. Sets the module
        /// parameters merge_interval_ms and merge_batch.
        #[arg(long, num_args = 0..=1, default_missing_value = "on", value_name = "off")]
        auto: Option<String>,
        /// With --auto: milliseconds between wake-ups (default: as set, or 100).
        #[arg(long, value_name = "MS", requires = "auto")]
        interval: Option<String>,
        /// With --auto: guest pages examined per wake-up.
        #[arg(long, value_name = "N", requires = "auto")]
        batch: Option<String>,
    },
    /// The host frame behind a guest page (module parameter debug=1; tests).
    Translate { vm: u32, gpa: String },
    /// Move pages between the host and the hypervisor's frame pool (module
    /// parameter debug=1; tests): `donate` prints `base=ADDR pages=N` (N is
    /// at least 512, a 2 MiB block), `reclaim` prints `pages=N`.
    Pool {
        #[arg(value_parser = ["donate", "reclaim"])]
        op: String,
        /// Pages to donate.
        #[arg(long, default_value = "512", value_parser = clap::value_parser!(u32).range(1..=512))]
        pages: u32,
    },
    /// The VMM of a forked child VM, started by its parent's VMM, which
    /// passes the child's descriptor (internal).
    #[command(hide = true, name = "__vmm-child")]
    VmmChild {
        fd: i32,
        id: u32,
        #[arg(value_parser = ["detached", "foreground"])]
        mode: String,
        /// The VM is a Linux guest (UART interrupts, console input).
        #[arg(long)]
        linux: bool,
        /// The UART's registers as the parent's were at the fork.
        #[arg(long, value_parser = vmm::parse_uart_regs)]
        uart: Option<vmm::UartRegs>,
        /// The VM's vCPUs (the parent's).
        #[arg(long, default_value = "1", value_parser = parse_vcpus)]
        vcpus: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("uxenctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Check { json, module } => {
            let findings = check::evaluate(&check::gather(module.as_deref()));
            if json {
                println!("{}", check::to_json(&findings));
            } else {
                print!("{}", check::to_text(&findings));
            }
            Ok(if check::tally(&findings).0 == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Cmd::Version { json } => version(json),
        Cmd::Stats { json } => {
            let s = dev::Device::open()?.stats()?;
            if json {
                println!("{}", serde_json::to_string(&stats::to_json(&s))?);
            } else {
                stats::print_text(&s);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run { guest, name } => {
            let (mem, vcpus) = (guest.mem_mib(), guest.vcpus);
            let g = guest.prepare()?;
            let d = dev::Device::open()?;
            let vm = d.create_vm(mem << 20, vcpus, &name, g.vm_flags()).map_err(|e| anyhow!("{e}"))?;
            g.install(&vm, mem << 20, vcpus)?;
            drop(g);
            vmm::install_signal_handlers();
            let id = vm.id;
            // A Linux guest's console takes standard input: a terminal in raw
            // mode (with the Ctrl-A escapes), or a pipe as it is.
            let (kind, raw) = if guest.kernel.is_none() {
                (vmm::Kind::Test, None)
            } else {
                match console::stdin_kind() {
                    console::StdinKind::Terminal => match console::RawTerminal::enter() {
                        Some(raw) => {
                            eprintln!("uxenctl: vm {id}: the console is on this terminal; Ctrl-A x ends the VM, Ctrl-A h lists the escapes");
                            (vmm::Kind::Linux { stdin: vmm::Stdin::Terminal }, Some(raw))
                        }
                        None => (vmm::Kind::Linux { stdin: vmm::Stdin::Plain }, None),
                    },
                    console::StdinKind::Background => (vmm::Kind::Linux { stdin: vmm::Stdin::No }, None),
                    console::StdinKind::Other => (vmm::Kind::Linux { stdin: vmm::Stdin::Plain }, None),
                }
            };
            let end = vmm::serve(vm, vcpus, vmm::Mode::Foreground, kind, None);
            // The terminal comes back before anything more is printed.
            drop(raw);
            if !matches!(end, vmm::End::Exited(_)) {
                eprintln!("uxenctl: vm {id} {}", end.describe());
            }
            // Forked children run in child processes: wait for them all.
            let mut failed = 0;
            loop {
                let mut st = 0;
                // SAFETY: reaping our own children.
                let pid = unsafe { libc::wait(&mut st) };
                if pid < 0 {
                    break;
                }
                if !(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0) {
                    failed += 1;
                }
            }
            if failed > 0 {
                eprintln!("uxenctl: {failed} forked VMs did not exit with code 0");
                return Ok(ExitCode::from(if end.status() == 0 { 1 } else { end.status() }));
            }
            Ok(ExitCode::from(end.status()))
        }
        Cmd::Create { guest, name } => {
            if let Some(image) = &guest.image {
                if !image.exists() {
                    return Err(anyhow!("{}: no such file", image.display()));
                }
            }
            let g = guest.prepare()?;
            dev::Device::open()?;
            let name = name.unwrap_or_else(|| default_name(guest.file()));
            let id = daemon::create(&g, &name, guest.mem_mib(), guest.vcpus)?;
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::List { json } => list(json),
        Cmd::Console { vm, follow, send, expect, timeout } => {
            if let Some(re) = expect {
                let re = regex::Regex::new(&re).map_err(|e| anyhow!("bad --expect regex: {e}"))?;
                let from = daemon::console_len(vm)?;
                if let Some(text) = send {
                    let bytes = console::parse_escapes(&text).map_err(|e| anyhow!(e))?;
                    vmm::request_input(vm, &bytes)?;
                }
                println!("{}", daemon::expect(vm, from, &re, std::time::Duration::from_millis(timeout))?);
                return Ok(ExitCode::SUCCESS);
            }
            if let Some(text) = send {
                let bytes = console::parse_escapes(&text).map_err(|e| anyhow!(e))?;
                vmm::request_input(vm, &bytes)?;
                if !follow {
                    return Ok(ExitCode::SUCCESS);
                }
            }
            daemon::console(vm, follow)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Destroy { vm } => {
            let d = dev::Device::open()?;
            d.destroy(vm).map_err(|e| {
                if e.errno == libc::ENOENT {
                    anyhow!("no VM with id {vm}")
                } else {
                    anyhow!("{e}")
                }
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Fork { vm, count, copy, json } => {
            let children = vmm::request_fork(vm, count, copy)?;
            if json {
                println!("{}", serde_json::to_string(&children)?);
            } else {
                for c in children {
                    println!("{}", c.id);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Merge { vm, json, auto: Some(auto), interval, batch } => {
            if vm.is_some() {
                return Err(anyhow!("--auto merges every VM; it takes no VM id"));
            }
            let a = automerge::parse(&auto, interval.as_deref(), batch.as_deref())?;
            let (i, b) = automerge::apply(&automerge::params_dir(), &a)?;
            if json {
                println!("{}", serde_json::json!({ "interval_ms": i, "batch": b }));
            } else if i == 0 {
                println!("background merging off");
            } else {
                println!("background merging on: {b} pages every {i} ms");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Merge { vm, json, auto: None, .. } => {
            let m = dev::Device::open()?.merge(vm.unwrap_or(0)).map_err(|e| match (vm, e.errno) {
                (Some(id), libc::ENOENT) => anyhow!("no VM with id {id}"),
                _ => anyhow!("{e}"),
            })?;
            if json {
                let j = serde_json::json!({
                    "scanned": m.scanned, "merged": m.merged, "zero": m.zero,
                    "frames_freed": m.frames_freed, "tsc": m.tsc, "aborted": m.aborted,
                });
                println!("{j}");
            } else {
                println!(
                    "{} pages scanned: {} folded onto identical frames, {} zero pages dropped; {} frames freed",
                    m.scanned, m.merged, m.zero, m.frames_freed
                );
                if m.aborted != 0 {
                    println!("aborted: a TLB shootdown was not acknowledged; the pages of the last chunk are as they were");
                }
            }
            Ok(if m.aborted != 0 { ExitCode::from(3) } else { ExitCode::SUCCESS })
        }
        Cmd::Translate { vm, gpa } => {
            let gpa = parse_u64(&gpa)?;
            let hpa = dev::Device::open()?.translate(vm, gpa).map_err(|e| anyhow!("{e}"))?;
            println!("{hpa:#x}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::VmmChild { fd, id, mode, linux, uart, vcpus } => Ok(ExitCode::from(vmm::child_main(fd, id, mode == "detached", linux, vcpus, uart))),
        Cmd::Pool { op, pages } => {
            let d = dev::Device::open()?;
            let (base, n) = d.debug_pool(if op == "donate" { pages } else { 0 }).map_err(|e| anyhow!("{e}"))?;
            if op == "donate" {
                println!("base={base:#x} pages={n}");
            } else {
                println!("pages={n}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn parse_u64(s: &str) -> Result<u64> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| anyhow!("`{s}` is not a number"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(abi::cstr_bytes(b)).into_owned()
}

#[derive(Serialize)]
struct VmJson {
    id: u32,
    name: String,
    state: &'static str,
    vcpus: u32,
    mem_mib: u64,
    frames_private: u64,
    frames_shared: u64,
    parent: Option<u32>,
    stop_reason: Option<&'static str>,
    exit_code: Option<u64>,
}

fn list(json: bool) -> Result<ExitCode> {
    let vms = dev::Device::open()?.list()?;
    let rows: Vec<VmJson> = vms
        .iter()
        .map(|v| VmJson {
            id: v.id,
            name: text(&v.name),
            state: abi::vm_state::name(v.state),
            vcpus: v.vcpus,
            mem_mib: v.mem_bytes >> 20,
            frames_private: v.frames_private,
            frames_shared: v.frames_shared,
            parent: (v.parent != 0).then_some(v.parent),
            stop_reason: has_stop_reason(v.state).then(|| abi::stop::name(v.stop_reason)),
            exit_code: (v.state == abi::vm_state::EXITED).then_some(v.exit_code),
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:>4}  {:<16} {:<8} {:>8} {:>9} {:>8} {:>6}  END", "ID", "NAME", "STATE", "MEM_MIB", "PRIVATE", "SHARED", "PARENT");
    for r in rows {
        println!(
            "{:>4}  {:<16} {:<8} {:>8} {:>9} {:>8} {:>6}  {}",
            r.id,
            r.name,
            r.state,
            r.mem_mib,
            r.frames_private,
            r.frames_shared,
            r.parent.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            end_text(r.exit_code, r.stop_reason)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// States that come with a `stop` reason: a stop, a Linux guest's reboot
/// or its kernel panic.
fn has_stop_reason(state: u32) -> bool {
    matches!(state, abi::vm_state::STOPPED | abi::vm_state::REBOOTED | abi::vm_state::PANICKED)
}

/// The END column of `list`: how an ended VM ended.
fn end_text(exit_code: Option<u64>, stop_reason: Option<&str>) -> String {
    match (exit_code, stop_reason) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(r)) => r.to_string(),
        (None, None) => "-".into(),
    }
}

#[derive(Serialize)]
struct VersionJson {
    uxenctl_version: &'static str,
    uxenctl_abi: u32,
    driver_version: String,
    driver_abi: u32,
    image_version: String,
    image_abi: u32,
    hv_active: bool,
    num_cpus: u32,
    hv_features: u64,
}

fn version(json: bool) -> Result<ExitCode> {
    let d = dev::Device::open()?;
    let v = d.version()?;
    if json {
        let j = VersionJson {
            uxenctl_version: env!("CARGO_PKG_VERSION"),
            uxenctl_abi: abi::ABI_REVISION,
            driver_version: text(&v.driver_version),
            driver_abi: v.driver_abi,
            image_version: text(&v.image_version),
            image_abi: v.image_abi,
            hv_active: v.hv_active != 0,
            num_cpus: v.num_cpus,
            hv_features: v.hv_features,
        };
        println!("{}", serde_json::to_string(&j)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("uxenctl {:<8} (ABI {})", env!("CARGO_PKG_VERSION"), abi::ABI_REVISION);
    println!("driver  {:<8} (ABI {})", text(&v.driver_version), v.driver_abi);
    println!("image   {:<8} (ABI {})", text(&v.image_version), v.image_abi);
    if v.hv_active != 0 {
        println!("hypervisor: running on {} CPUs", v.num_cpus);
    } else {
        println!("hypervisor: not running");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn console_expect_arguments() {
        let c = Cli::try_parse_from(["uxenctl", "console", "3", "--send", "echo hi\\n", "--expect", "^hi", "--timeout", "500"]).unwrap();
        assert!(matches!(c.cmd, Cmd::Console { vm: 3, expect: Some(ref r), timeout: 500, .. } if r == "^hi"));
        assert!(Cli::try_parse_from(["uxenctl", "console", "3", "-f", "--expect", "x"]).is_err());
        assert!(Cli::try_parse_from(["uxenctl", "console", "3", "--timeout", "5"]).is_err());
    }

    #[test]
    fn the_command_line_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_child_vmm_takes_its_descriptor_id_and_mode() {
        let c = Cli::try_parse_from(["uxenctl", "__vmm-child", "5", "17", "detached"]).unwrap();
        assert!(matches!(c.cmd, Cmd::VmmChild { fd: 5, id: 17, ref mode, linux: false, uart: None, vcpus: 1 } if mode == "detached"));
        let c = Cli::try_parse_from(["uxenctl", "__vmm-child", "5", "17", "detached", "--vcpus", "2"]).unwrap();
        assert!(matches!(c.cmd, Cmd::VmmChild { vcpus: 2, .. }));
        assert!(Cli::try_parse_from(["uxenctl", "__vmm-child", "5", "17", "detached", "--vcpus", "0"]).is_err());
        let c = Cli::try_parse_from(["uxenctl", "__vmm-child", "5", "17", "foreground", "--linux"]).unwrap();
        assert!(matches!(c.cmd, Cmd::VmmChild { linux: true, .. }));
        assert!(Cli::try_parse_from(["uxenctl", "__vmm-child", "5", "17", "sideways"]).is_err());
        let c = Cli::try_parse_from(["uxenctl", "__vmm-child", "5", "17", "detached", "--linux", "--uart", "0c000501030360b000"]).unwrap();
        assert!(matches!(c.cmd, Cmd::VmmChild { uart: Some([0x0c, 0, 5, 1, 3, 3, 0x60, 0xb0, 0]), .. }));
        for bad in ["0c00", "0c000501030360b0zz", "0c000501030360b00000"] {
            assert!(Cli::try_parse_from(["uxenctl", "__vmm-child", "5", "17", "detached", "--uart", bad]).is_err(), "{bad}");
        }
    }

    fn guest_of(args: &[&str]) -> std::result::Result<GuestArgs, clap::Error> {
        let mut v = vec!["uxenctl"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).map(|c| match c.cmd {
            Cmd::Run { guest, .. } | Cmd::Create { guest, .. } => guest,
            _ => unreachable!(),
        })
    }

    #[test]
    fn image_or_kernel() {
        for cmd in ["run", "create"] {
            let g = guest_of(&[cmd, "guest.elf"]).unwrap();
            assert_eq!((g.image.as_deref(), g.kernel.as_deref(), g.mem_mib()), (Some(std::path::Path::new("guest.elf")), None, 16));
            let g = guest_of(&[cmd, "--kernel", "bzImage", "--initrd", "rd.gz", "--cmdline", "init=/bin/sh", "--vcpus", "2"]).unwrap();
            assert_eq!(g.mem_mib(), 64, "--kernel defaults to 64 MiB");
            assert_eq!((g.initrd.as_deref(), g.cmdline.as_deref(), g.vcpus), (Some(std::path::Path::new("rd.gz")), Some("init=/bin/sh"), 2));
            assert_eq!(guest_of(&[cmd, "--kernel", "k", "--mem", "128"]).unwrap().mem_mib(), 128);
            assert_eq!(guest_of(&[cmd, "g", "--mem", "4"]).unwrap().mem_mib(), 4);
            // Exactly one of IMAGE and --kernel; --initrd only with --kernel.
            assert!(guest_of(&[cmd]).is_err());
            assert!(guest_of(&[cmd, "guest.elf", "--kernel", "bzImage"]).is_err());
            assert!(guest_of(&[cmd, "guest.elf", "--initrd", "rd.gz"]).is_err());
            assert!(guest_of(&[cmd, "--initrd", "rd.gz"]).is_err());
            assert!(guest_of(&[cmd, "--kernel", "k", "--mem", "3"]).is_err());
        }
        assert_eq!(default_name(Some(std::path::Path::new("/boot/bzImage"))), "bzImage");
        assert_eq!(default_name(None), "vm");
        assert_eq!(default_name(Some(std::path::Path::new(&"k".repeat(40)))).len(), abi::VM_NAME_LEN - 1);
    }

    #[test]
    fn console_send() {
        let c = Cli::try_parse_from(["uxenctl", "console", "3", "--send", "ls\\n"]).unwrap();
        assert!(matches!(c.cmd, Cmd::Console { vm: 3, follow: false, send: Some(ref t), expect: None, .. } if t == "ls\\n"));
        let c = Cli::try_parse_from(["uxenctl", "console", "3", "-f"]).unwrap();
        assert!(matches!(c.cmd, Cmd::Console { vm: 3, follow: true, send: None, expect: None, .. }));
    }

    #[test]
    fn list_shows_how_vms_ended() {
        use abi::vm_state::*;
        assert!(has_stop_reason(STOPPED) && has_stop_reason(REBOOTED) && has_stop_reason(PANICKED));
        assert!(!has_stop_reason(RUNNING) && !has_stop_reason(EXITED));
        assert_eq!(end_text(Some(0), None), "exit 0");
        assert_eq!(end_text(None, Some(abi::stop::name(abi::stop::PANIC))), "panic");
        assert_eq!(end_text(None, None), "-");
        assert_eq!(abi::vm_state::name(REBOOTED), "rebooted");
    }
}
