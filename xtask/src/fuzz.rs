//! `xtask fuzz`: the long fuzzing budget for the two host boundaries.
//!
//! With cargo-fuzz (installed on demand into the cache, like bindgen) each
//! libFuzzer target in `fuzz/` runs for `--time` seconds, starting from the
//! checked-in seeds in `fuzz/corpus/<target>/` and growing a working corpus
//! in `target/uxen/fuzz/corpus/<target>/`, so the repository's corpus stays
//! small. Without cargo-fuzz the proptest harnesses of `cargo test` run
//! with many more cases. The short budget is part of `cargo test`
//! (`hypervisor::control::tests`). See `docs/fuzzing.md`.

use crate::util::{self, step};
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

/// The libFuzzer targets (`fuzz/fuzz_targets/*.rs`).
pub const TARGETS: [&str; 3] = ["hypercall", "ioctl_args", "guestmem_ops"];

/// The cargo-fuzz release `xtask fuzz` installs.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Seconds per target unless `--time` says otherwise.
const DEFAULT_SECS: u64 = 300;

fn cargo_fuzz() -> PathBuf {
    util::cache().join("tools/bin/cargo-fuzz")
}

/// cargo-fuzz, from the cache or from `PATH`, installing it if it is in
/// neither; `None` if it cannot be had.
fn find_cargo_fuzz() -> Option<PathBuf> {
    let works = |p: &PathBuf| Command::new(p).args(["fuzz", "--version"]).stdout(Stdio::null()).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false);
    let cached = cargo_fuzz();
    if works(&cached) {
        return Some(cached);
    }
    let on_path = PathBuf::from("cargo-fuzz");
    if works(&on_path) {
        return Some(on_path);
    }
    eprintln!("    installing cargo-fuzz {CARGO_FUZZ_VERSION} from crates.io");
    let log = util::cache().join("logs/cargo-fuzz.log");
    let r = util::run_logged(
        Command::new("cargo").args([
            "install",
            "--locked",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--root",
            util::cache().join("tools").to_str().unwrap(),
        ]),
        &log,
    );
    match r {
        Ok(()) if works(&cached) => Some(cached),
        _ => {
            eprintln!("    cargo-fuzz is not available (log in {}); falling back to proptest", log.display());
            None
        }
    }
}

/// One target's run, from libFuzzer's final statistics.
struct Run {
    target: &'static str,
    execs: u64,
    secs: f64,
    new_units: u64,
    corpus: usize,
    crash: Option<String>,
}

/// `fuzz [--time SECS] [--target NAME] [--proptest]`.
pub fn fuzz(args: &[String]) -> Result<ExitCode> {
    let secs: u64 = match crate::flag_value(args, "--time") {
        Some(t) => t.parse()?,
        None => DEFAULT_SECS,
    };
    let only = crate::flag_value(args, "--target");
    if let Some(t) = only {
        if !TARGETS.contains(&t) {
            bail!("unknown fuzz target `{t}` (targets: {})", TARGETS.join(", "));
        }
    }
    let targets: Vec<&'static str> = TARGETS.iter().copied().filter(|t| only.map(|o| o == *t).unwrap_or(true)).collect();
    step("fuzz: the hypercall and ioctl boundaries, against the portable core");
    let tool = if args.iter().any(|a| a == "--proptest") { None } else { find_cargo_fuzz() };
    match tool {
        Some(tool) => libfuzzer(&tool, &targets, secs),
        None => proptest(secs * targets.len() as u64),
    }
}

fn libfuzzer(tool: &PathBuf, targets: &[&'static str], secs: u64) -> Result<ExitCode> {
    let root = util::root();
    let work = util::out().join("fuzz");
    // `-a`: debug assertions and overflow checks, as in `cargo test`.
    // RUSTC_BOOTSTRAP lets the stable toolchain take cargo-fuzz's -Z flags
    // (sanitizer coverage, AddressSanitizer).
    let fuzz_cmd = |sub: &str| {
        let mut c = Command::new(tool);
        c.current_dir(&root).env("RUSTC_BOOTSTRAP", "1").args(["fuzz", sub, "-a", "--target-dir"]).arg(work.join("build"));
        c
    };
    step("fuzz: building the targets (cargo fuzz build)");
    util::run_logged(&mut fuzz_cmd("build"), &work.join("build.log"))?;
    let mut runs = Vec::new();
    for &t in targets {
        let corpus = work.join("corpus").join(t);
        let artifacts = work.join("artifacts").join(t);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&artifacts)?;
        step(&format!("fuzz: {t} for {secs}s"));
        let log = work.join(format!("{t}.log"));
        let t0 = Instant::now();
        let status = fuzz_cmd("run")
            .arg(t)
            .arg(&corpus)
            .arg(root.join("fuzz/corpus").join(t))
            .arg("--")
            .arg(format!("-max_total_time={secs}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1")
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(&log).and_then(|_| std::fs::OpenOptions::new().append(true).open(&log))?)
            .status()?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let stat = |name: &str| -> u64 {
            text.lines().rev().find_map(|l| l.strip_prefix(&format!("stat::{name}:"))).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
        };
        let crash = (!status.success()).then(|| {
            text.lines()
                .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim().to_string()))
                .unwrap_or_else(|| format!("{status}; see {}", log.display()))
        });
        runs.push(Run {
            target: t,
            execs: stat("number_of_executed_units"),
            secs: t0.elapsed().as_secs_f64(),
            new_units: stat("new_units_added"),
            corpus: std::fs::read_dir(&corpus).map(|d| d.count()).unwrap_or(0),
            crash,
        });
    }
    println!();
    println!("{:<14} {:>12} {:>8} {:>9} {:>9} {:>8}  result", "target", "execs", "time", "execs/s", "new units", "corpus");
    for r in &runs {
        println!(
            "{:<14} {:>12} {:>7.0}s {:>9.0} {:>9} {:>8}  {}",
            r.target,
            r.execs,
            r.secs,
            r.execs as f64 / r.secs.max(1.0),
            r.new_units,
            r.corpus,
            r.crash.as_deref().map(|c| format!("FAILED: {c}")).unwrap_or_else(|| "ok".into())
        );
    }
    let failed = runs.iter().filter(|r| r.crash.is_some()).count();
    if failed > 0 {
        eprintln!(
            "a failing input reproduces with `RUSTC_BOOTSTRAP=1 cargo fuzz run -a <target> <file>`; once fixed, \
             add it to fuzz/corpus/<target>/ as regress-<what> (cargo test replays the corpus)"
        );
    }
    println!("{} passed, {} failed", runs.len() - failed, failed);
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The proptest harnesses with a large case count, in the test profile
/// (overflow checks on): roughly `secs` seconds on two cores.
fn proptest(secs: u64) -> Result<ExitCode> {
    let cases = (secs * 4).max(500);
    step(&format!("fuzz: proptest harnesses, UXEN_FUZZ_CASES={cases}"));
    let t0 = Instant::now();
    let status = Command::new("cargo")
        .current_dir(util::root())
        .env("UXEN_FUZZ_CASES", cases.to_string())
        .env("RUST_BACKTRACE", "0")
        .args(["test", "-p", "hypervisor", "--lib", "control::tests"])
        .status()?;
    println!("proptest: UXEN_FUZZ_CASES={cases} ({cases} cases per hypercall and ioctl harness, half as many for guest memory) in {:.0}s", t0.elapsed().as_secs_f64());
    println!("{} passed, {} failed", status.success() as u32, !status.success() as u32);
    Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
