//! `uxenctl`: the uxen-rs control CLI and VMM.

use anyhow::Result;
use clap::{Parser, Subcommand};
use serde::Serialize;
use shared_abi as abi;
use std::process::ExitCode;

mod dev;
mod stats;

#[derive(Parser)]
#[command(name = "uxenctl", version, about = "Control the uxen-rs hypervisor and run its VMs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
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
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(abi::cstr_bytes(b)).into_owned()
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
