//! `cargo xtask soak`: the long robustness run of issue 7, in Bochs.
//! `tests/scripts/soak.sh` loads and unloads the module many times with
//! VMs created, forked and destroyed in between, then fuzzes the ioctls
//! for far longer than the CI suite; every frame must come back.

use crate::runner::{self, RunSpec};
use crate::{artifacts, close_single, flag_value, report, suites, util};
use anyhow::Result;
use std::process::ExitCode;
use std::time::Duration;

pub fn soak(args: &[String]) -> Result<ExitCode> {
    let num = |name: &str, default: u64| -> Result<u64> {
        Ok(match flag_value(args, name) {
            Some(v) => v.parse()?,
            None => default,
        })
    };
    let cycles = num("--cycles", 20)?;
    let ops = num("--ops", 1000)?;
    let calls = num("--calls", 50_000)?;
    let seed = num("--seed", 11)?;
    let s = suites::soak();
    let spec = RunSpec {
        suite: s.name.to_string(),
        timeout: Duration::from_secs(num("--timeout", s.timeout_s)?),
        cmdline: format!("uxen.soak_cycles={cycles} uxen.soak_ops={ops} uxen.soak_calls={calls} uxen.seed={seed}"),
        cpus: s.cpus,
        mem_mib: s.mem_mib,
        qemu_devices: s.qemu_devices,
        uefi: s.uefi,
        live: args.iter().any(|a| a == "--live"),
        stall: None,
    };
    crate::setup::setup()?;
    let a = if args.iter().any(|a| a == "--no-build") { artifacts::existing()? } else { artifacts::build_all()? };
    util::step(&format!("soak in Bochs: {cycles} load cycles, {ops} create/fork/destroy operations, {calls} fuzzed ioctls (seed {seed})"));
    let o = runner::run(&runner::Bochs, &spec, &a)?;
    report(&[o.clone()]);
    Ok(close_single(&o, "the soak"))
}
