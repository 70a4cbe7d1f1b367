//! `uxenctl`: the uxen-rs control CLI and VMM.

use anyhow::{anyhow, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;
use shared_abi as abi;
use std::path::PathBuf;
use std::process::ExitCode;

mod boot;
mod daemon;
mod dev;
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

#[derive(Subcommand)]
enum Cmd {
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
    /// Run a guest image in the foreground; exit with the guest's exit code.
    Run {
        image: PathBuf,
        /// Guest memory in MiB.
        #[arg(long, default_value = "16", value_parser = parse_mem)]
        mem: u64,
        #[arg(long, default_value = "1", value_parser = parse_vcpus)]
        vcpus: u32,
        #[arg(long, default_value = "run", value_parser = parse_name)]
        name: String,
        /// The guest's command line (docs/guest-abi.md).
        #[arg(long, default_value = "")]
        cmdline: String,
    },
    /// Start a guest image in the background; print its VM id.
    Create {
        image: PathBuf,
        #[arg(long, value_parser = parse_name)]
        name: Option<String>,
        /// Guest memory in MiB.
        #[arg(long, default_value = "16", value_parser = parse_mem)]
        mem: u64,
        #[arg(long, default_value = "1", value_parser = parse_vcpus)]
        vcpus: u32,
        /// The guest's command line (docs/guest-abi.md).
        #[arg(long, default_value = "")]
        cmdline: String,
    },
    /// List the VMs.
    List {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Print a detached VM's console output so far (-f: follow it).
    Console {
        vm: u32,
        #[arg(short, long)]
        follow: bool,
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
        Cmd::Run { image, mem, vcpus, name, cmdline } => {
            boot::check_cmdline(&cmdline)?;
            let d = dev::Device::open()?;
            let vm = d.create_vm(mem << 20, vcpus, &name).map_err(|e| anyhow!("{e}"))?;
            boot::load(&vm, &image, mem << 20, vcpus, &cmdline)?;
            vmm::install_signal_handlers();
            let id = vm.id;
            let end = vmm::serve(vm, vcpus, vmm::Mode::Foreground);
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
        Cmd::Create { image, name, mem, vcpus, cmdline } => {
            if !image.exists() {
                return Err(anyhow!("{}: no such file", image.display()));
            }
            boot::check_cmdline(&cmdline)?;
            dev::Device::open()?;
            let name = name.unwrap_or_else(|| {
                image.file_name().and_then(|n| n.to_str()).unwrap_or("vm").chars().take(abi::VM_NAME_LEN - 1).collect()
            });
            let id = daemon::create(&image, &name, mem, vcpus, &cmdline)?;
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::List { json } => list(json),
        Cmd::Console { vm, follow } => {
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
        Cmd::Merge { vm, json } => {
            let m = dev::Device::open()?.merge(vm.unwrap_or(0)).map_err(|e| match (vm, e.errno) {
                (Some(id), libc::ENOENT) => anyhow!("no VM with id {id}"),
                _ => anyhow!("{e}"),
            })?;
            if json {
                let j = serde_json::json!({
                    "scanned": m.scanned, "merged": m.merged, "zero": m.zero,
                    "frames_freed": m.frames_freed, "tsc": m.tsc,
                });
                println!("{j}");
            } else {
                println!(
                    "{} pages scanned: {} folded onto identical frames, {} zero pages dropped; {} frames freed",
                    m.scanned, m.merged, m.zero, m.frames_freed
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Translate { vm, gpa } => {
            let gpa = parse_u64(&gpa)?;
            let hpa = dev::Device::open()?.translate(vm, gpa).map_err(|e| anyhow!("{e}"))?;
            println!("{hpa:#x}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::VmmChild { fd, id, mode } => Ok(ExitCode::from(vmm::child_main(fd, id, mode == "detached"))),
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
            mem_mib: v.mem_bytes >> 20,
            frames_private: v.frames_private,
            frames_shared: v.frames_shared,
            parent: (v.parent != 0).then_some(v.parent),
            stop_reason: (v.state == abi::vm_state::STOPPED).then(|| abi::stop::name(v.stop_reason)),
            exit_code: (v.state == abi::vm_state::EXITED).then_some(v.exit_code),
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:>4}  {:<16} {:<8} {:>8} {:>9} {:>8} {:>6}", "ID", "NAME", "STATE", "MEM_MIB", "PRIVATE", "SHARED", "PARENT");
    for r in rows {
        println!(
            "{:>4}  {:<16} {:<8} {:>8} {:>9} {:>8} {:>6}",
            r.id,
            r.name,
            r.state,
            r.mem_mib,
            r.frames_private,
            r.frames_shared,
            r.parent.map(|p| p.to_string()).unwrap_or_else(|| "-".into())
        );
    }
    Ok(ExitCode::SUCCESS)
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
    fn the_command_line_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_child_vmm_takes_its_descriptor_id_and_mode() {
        let c = Cli::try_parse_from(["uxenctl", "__vmm-child", "5", "17", "detached"]).unwrap();
        assert!(matches!(c.cmd, Cmd::VmmChild { fd: 5, id: 17, ref mode } if mode == "detached"));
        assert!(Cli::try_parse_from(["uxenctl", "__vmm-child", "5", "17", "sideways"]).is_err());
    }
}
