//! Build and run orchestration for uxen-rs.
//!
//! `cargo xtask demo` boots the real stack in Bochs and shows it working;
//! `cargo xtask test` runs every test. Both install what they need first.

mod artifacts;
mod bench;
mod fuzz;
mod image;
mod kernel;
mod runner;
mod setup;
#[cfg(test)]
mod shell;
mod soak;
mod suites;
mod tally;
mod util;

use anyhow::{bail, Result};
use runner::{Backend, Outcome, RunSpec};
use tally::Tally;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  demo                      set up, build, and boot the demo in Bochs
  test [--no-unit] [--only SUITE]
                            set up, build, run the unit tests and every system test
                            (--only kdir: only `module`'s checks on the project's kernels)
  setup                     install the toolchain and the emulators
  build                     build every artifact into target/uxen/
  module [--kdir DIR]       build uxen.ko against a Rust-enabled Linux 6.12+ build tree
                            (default /lib/modules/$(uname -r)/build) into
                            target/uxen/module/uxen.ko, and target/uxen/uxenctl
  run BACKEND SUITE [--timeout S] [--stall S] [--live] [--no-build]
                            boot one suite (BACKEND: bochs, qemu, kvm)
  soak [--cycles N] [--ops N] [--calls N] [--seed S] [--timeout S] [--no-build]
                            the long robustness run in Bochs (module cycles, VM churn, ioctl fuzz)
  bench [exits|fork|linux|all] [--no-build]
                            measure in Bochs against same-run baselines
  unit                      run the host unit tests
  merge-scale               one merge pass over a million guest pages (mock
                            memory, optimised build: some seconds)
  fuzz [--time SECS] [--target NAME] [--proptest]
                            fuzz the hypercall and ioctl boundaries (cargo-fuzz,
                            else proptest); SECS per target, default 300
  kernel-key                print the kernel build's cache key
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match dispatch(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(args: &[String]) -> Result<ExitCode> {
    let cmd = args.first().map(String::as_str).unwrap_or("");
    let rest = &args[args.len().min(1)..];
    match cmd {
        "setup" => setup::setup().map(|_| ExitCode::SUCCESS),
        "build" => {
            setup::setup()?;
            artifacts::build_all()?;
            Ok(ExitCode::SUCCESS)
        }
        "module" => {
            let kdir = flag_value(rest, "--kdir").map(std::path::PathBuf::from).unwrap_or_else(artifacts::default_kdir);
            let ko = artifacts::build_kdir_module(&kdir)?;
            println!("{}", ko.display());
            Ok(ExitCode::SUCCESS)
        }
        "kernel-key" => {
            println!("{}", kernel::key()?);
            Ok(ExitCode::SUCCESS)
        }
        "unit" => {
            let u = unit_tests()?;
            println!("{} passed, {} failed", u.0, u.1);
            Ok(if u.1 == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        "merge-scale" => merge_scale(),
        "run" => run_one(rest),
        "test" => test(rest),
        "demo" => demo(),
        "bench" => bench::bench(rest).map(|_| ExitCode::SUCCESS),
        "soak" => soak::soak(rest),
        "fuzz" => fuzz::fuzz(rest),
        "" | "help" | "-h" | "--help" => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => bail!("unknown command `{other}`\n{USAGE}"),
    }
}

fn flag_value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}

fn spec_for(s: &suites::Suite, live: bool) -> RunSpec {
    RunSpec {
        suite: s.name.to_string(),
        timeout: Duration::from_secs(s.timeout_s),
        cmdline: s.cmdline.to_string(),
        cpus: s.cpus,
        mem_mib: s.mem_mib,
        qemu_devices: s.qemu_devices,
        uefi: s.uefi,
        live,
        stall: None,
    }
}

/// `run BACKEND SUITE`: exits non-zero unless the run passed.
fn run_one(args: &[String]) -> Result<ExitCode> {
    let (Some(b), Some(name)) = (args.first(), args.get(1)) else {
        bail!("run needs a backend and a suite\n{USAGE}");
    };
    let backend = Backend::parse(b).ok_or_else(|| anyhow::anyhow!("unknown backend `{b}`"))?;
    let suite = suites::find(name, backend);
    let mut spec = spec_for(&suite, args.iter().any(|a| a == "--live"));
    if let Some(t) = flag_value(args, "--timeout") {
        spec.timeout = Duration::from_secs(t.parse()?);
    }
    if let Some(t) = flag_value(args, "--stall") {
        spec.stall = Some(Duration::from_secs(t.parse()?));
    }
    let a = if args.iter().any(|a| a == "--no-build") { artifacts::existing()? } else { artifacts::build_all()? };
    let o = runner::run(backend.machine().as_ref(), &spec, &a)?;
    report(&[o.clone()]);
    Ok(close_single(&o, "the run"))
}

/// The end of a command that runs one suite (`run`, `demo`, `soak`): the
/// closing line, and success only when the suite ran and passed. A suite
/// skipped here showed nothing, which is not a pass.
fn close_single(o: &Outcome, what: &str) -> ExitCode {
    let mut t = Tally::default();
    t.add(suites::Expect::Pass, o);
    if let Some(why) = &o.skipped {
        eprintln!("{what} was skipped: {why}");
    }
    println!("{}", t.closing_line());
    if o.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs `cargo test` on the workspace; returns (passed, failed).
/// `merge-scale`: the million-page merge check, which a debug build runs
/// too slowly for `cargo test` (it runs a sixteenth of it there).
fn merge_scale() -> Result<ExitCode> {
    Ok(if merge_scale_check()? { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Runs the million-page merge check optimised; whether it passed.
fn merge_scale_check() -> Result<bool> {
    util::step("merge over a million guest pages: cargo test --release");
    let test = "merge::tests::a_million_pages_in_one_pass_with_a_bounded_heap";
    Ok(Command::new("cargo")
        .current_dir(util::root())
        .args(["test", "--release", "-p", "hypervisor", "--lib", test, "--", "--exact", "--nocapture"])
        .status()?
        .success())
}

fn unit_tests() -> Result<(u64, u64)> {
    util::step("unit tests: cargo test --workspace");
    let out = Command::new("cargo")
        .current_dir(util::root())
        .args(["test", "--workspace", "--no-fail-fast"])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}");
    let (mut passed, mut failed) = (0, 0);
    for l in text.lines() {
        if let Some(r) = l.strip_prefix("test result: ") {
            for part in r.split(';') {
                let part = part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ");
                if let Some(n) = part.strip_suffix(" passed") {
                    passed += n.trim().parse::<u64>().unwrap_or(0);
                } else if let Some(n) = part.strip_suffix(" failed") {
                    failed += n.trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    if !out.status.success() && failed == 0 {
        failed = 1;
        eprintln!("cargo test failed to build or run");
    }
    Ok((passed, failed))
}

fn test(args: &[String]) -> Result<ExitCode> {
    let t0 = Instant::now();
    setup::setup()?;
    let only = flag_value(args, "--only");
    let (mut upass, mut ufail) = (0u64, 0u64);
    if !args.iter().any(|a| a == "--no-unit") && only.is_none() {
        (upass, ufail) = unit_tests()?;
        // The one unit check a debug build is too slow for.
        if merge_scale_check()? {
            upass += 1;
        } else {
            ufail += 1;
        }
    }
    let a = artifacts::build_all()?;
    let (mut kpass, mut kfail) = (0, 0);
    if only.is_none() || only == Some("kdir") {
        (kpass, kfail) = kdir_checks()?;
    }
    let mut outcomes: Vec<(suites::Suite, Outcome)> = Vec::new();
    for s in suites::all() {
        if only.map(|o| o != s.name).unwrap_or(false) {
            continue;
        }
        util::step(&format!("system test: {} on {} ({})", s.name, s.backend.name(), s.about));
        let o = if s.expect == suites::Expect::Fail {
            harness_selftest(&s)?
        } else {
            runner::run(s.backend.machine().as_ref(), &spec_for(&s, false), &a)?
        };
        eprintln!("    {}", one_line(&o, s.expect));
        outcomes.push((s, o));
    }
    report(&outcomes.iter().map(|(_, o)| o.clone()).collect::<Vec<_>>());

    let mut system = Tally::default();
    // The module builds against the kernel trees (`kdir_checks`) count as
    // system checks.
    system.add_unit(kpass, kfail);
    for (s, o) in &outcomes {
        if let Some(why) = &o.skipped {
            eprintln!("skipped {} on {}: {why}", s.name, s.backend.name());
        } else if s.expect == suites::Expect::Fail && !tally::self_test_failed_as_built(o) {
            eprintln!("harness self-test {} did not make the command fail", s.name);
        }
        system.add(s.expect, o);
    }
    let mut all = system;
    all.add_unit(upass, ufail);
    println!();
    println!("unit tests:   {upass} passed, {ufail} failed");
    println!("system tests: {} passed, {} failed, {} suites skipped", system.passed, system.failed, system.skipped);
    println!("total time:   {:.0}s", t0.elapsed().as_secs_f64());
    println!("{}", all.closing_line());
    Ok(if all.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `cargo xtask module` on the two kernels `build` made: against the host
/// kernel's tree it builds uxen.ko (into the build directory, not over the
/// module of `cargo xtask module`), and the guest kernel's tree, without
/// `CONFIG_RUST`, is refused with its one line. Returns (passed, failed).
fn kdir_checks() -> Result<(u64, u64)> {
    util::step("module: `cargo xtask module` against the host and guest kernel trees");
    let host = kernel::HOST.build_dir()?;
    let guest = kernel::GUEST.build_dir()?;
    let flat = std::fs::read(util::work().join("hypervisor.bin"))?;
    let ko = util::work().join("kdir-check/uxen.ko");
    let _ = std::fs::remove_file(&ko);
    let host_ok = artifacts::check_kernel_tree(&host)
        .and_then(|t| artifacts::module_for_tree(&host, &t, &flat, &ko))
        .and_then(|_| if ko.exists() { Ok(()) } else { Err(anyhow::anyhow!("no {}", ko.display())) })
        .map(|_| String::new())
        .unwrap_or_else(|e| format!("{e:#}"));
    let want = format!("{}: CONFIG_RUST is not set; uxen.ko needs a Rust-enabled kernel", guest.display());
    let guest_says = match artifacts::check_kernel_tree(&guest) {
        Ok(_) => "accepted".to_string(),
        Err(e) => format!("{e:#}"),
    };
    let results = [
        ("kdir-host-kernel-builds", host_ok.is_empty(), host_ok),
        ("kdir-guest-kernel-refused", guest_says == want, format!("got `{guest_says}`, want `{want}`")),
    ];
    let mut n = (0, 0);
    for (name, ok, why) in results {
        if ok {
            n.0 += 1;
            eprintln!("    ok {name}");
        } else {
            n.1 += 1;
            eprintln!("    FAILED {name}: {why}");
        }
    }
    Ok(n)
}

/// Runs a suite that must fail through `xtask run` in a child process, so
/// that what is checked is the exit status of the command itself. The
/// returned outcome is the child's verdict, read back from its serial log.
fn harness_selftest(s: &suites::Suite) -> Result<Outcome> {
    let exe = std::env::current_exe()?;
    let t0 = Instant::now();
    let out = Command::new(exe)
        .args(["run", s.backend.name(), s.name, "--no-build", "--timeout", &s.timeout_s.to_string()])
        .output()?;
    let serial = util::out().join(format!("runs/{}-{}/serial.log", s.backend.name(), s.name));
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    let (checks, rc, problems) = runner::parse_serial(&text);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("    `xtask run {} {}` exited with {}", s.backend.name(), s.name, out.status);
    Ok(Outcome {
        suite: s.name.to_string(),
        backend: s.backend,
        checks,
        rc,
        timed_out: stdout.contains("timed out"),
        problems,
        wall: t0.elapsed(),
        serial,
        skipped: None,
        command_failed: Some(!out.status.success()),
        marks: Vec::new(),
    })
}

fn one_line(o: &Outcome, expect: suites::Expect) -> String {
    if let Some(why) = &o.skipped {
        return format!("SKIPPED: {why}");
    }
    let ok = match expect {
        suites::Expect::Pass => o.passed(),
        suites::Expect::Fail => tally::self_test_failed_as_built(o),
    };
    format!(
        "{} in {:.0}s: {} checks passed, {} failed, rc={}{}",
        if ok { "ok" } else { "FAILED" },
        o.wall.as_secs_f64(),
        o.checks.iter().filter(|c| c.passed).count(),
        o.checks.iter().filter(|c| !c.passed).count(),
        o.rc.map(|r| r.to_string()).unwrap_or_else(|| "none".into()),
        if o.problems.is_empty() { String::new() } else { format!("; {}", o.problems.join("; ")) }
    )
}

/// Prints the table of runs and their failures.
fn report(outcomes: &[Outcome]) {
    println!();
    println!("{:<16} {:<8} {:>6} {:>6} {:>7} {:>5}  serial log", "suite", "machine", "pass", "fail", "wall", "rc");
    for o in outcomes {
        let rc = o.rc.map(|r| r.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "{:<16} {:<8} {:>6} {:>6} {:>6.0}s {:>5}  {}",
            o.suite,
            o.backend.name(),
            o.checks.iter().filter(|c| c.passed).count(),
            o.checks.iter().filter(|c| !c.passed).count(),
            o.wall.as_secs_f64(),
            if o.skipped.is_some() { "skip".into() } else { rc },
            o.serial.strip_prefix(util::root()).unwrap_or(&o.serial).display()
        );
        if let Some(why) = &o.skipped {
            println!("    skipped: {why}");
        }
        for c in o.checks.iter().filter(|c| !c.passed) {
            println!("    FAIL {}: {}", c.name, c.detail);
        }
        for p in &o.problems {
            println!("    problem: {p}");
        }
    }
}

fn demo() -> Result<ExitCode> {
    setup::setup()?;
    let a = artifacts::build_all()?;
    let s = suites::demo();
    util::step("demo: booting Linux in Bochs (VMX, 2 CPUs); the serial console follows");
    let o = runner::run(&runner::Bochs, &spec_for(&s, true), &a)?;
    report(&[o.clone()]);
    Ok(close_single(&o, "the demo"))
}
