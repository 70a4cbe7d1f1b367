//! Self-tests of the in-guest shell checks, run on the host: the helpers of
//! `tests/scripts/lib.sh`, and `bench-fork.sh` whole, against stub tools
//! that can be made to print nothing or fail. Each feeds the markers it
//! prints to the same judge as a real run, so that a check which cannot
//! fail shows up here rather than as a pass in the emulator.
//!
//! Where BusyBox is installed (the guest's tools come from it), the scripts
//! run with its `grep`, `awk`, `sed` and `sort`; elsewhere with the host's.
//! The shell is the host's `/bin/sh`, not BusyBox's: that one runs its own
//! applets (`insmod`, `rmmod`, `taskset`) before any stub on `PATH`, and
//! `bench-fork.sh` would load and unload modules on the host.

use crate::runner::Outcome;
use crate::suites::Expect;
use crate::tally::Tally;
use crate::util;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A scratch directory with a `bin/` of stubs ahead of the tools.
struct Sandbox {
    dir: PathBuf,
}

impl Sandbox {
    fn new() -> Sandbox {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!("uxen-shell-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::create_dir_all(dir.join("tools")).unwrap();
        if let Some(bb) = busybox() {
            for t in ["grep", "awk", "sed", "sort", "wc", "cat", "tr", "tail", "head", "cut"] {
                std::os::unix::fs::symlink(&bb, dir.join("tools").join(t)).unwrap();
            }
        }
        let s = Sandbox { dir };
        // `taskset -c CPU CMD...` runs CMD.
        s.stub("taskset", "shift 2\nexec \"$@\"\n");
        s
    }

    /// Writes an executable `bin/NAME` with a `sh` body.
    fn stub(&self, name: &str, body: &str) {
        let p = self.dir.join("bin").join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// Runs `script` with lib.sh (and after it `extra`, to override helpers
    /// that need the guest); returns its stdout and exit status.
    fn run(&self, extra: &str, script: &str) -> (String, i32) {
        let lib = util::root().join("tests/scripts/lib.sh");
        let prelude = self.dir.join("lib.sh");
        std::fs::write(&prelude, format!(". {}\n{extra}\n", lib.display())).unwrap();
        // Suite scripts source lib.sh themselves; snippets are given it.
        let source = format!(". {}", prelude.display());
        let script = if script.contains(". /tests/lib.sh") {
            script.replace(". /tests/lib.sh", &source)
        } else {
            format!("{source}\n{script}")
        };
        let path = format!("{}:{}:/usr/bin:/bin", self.dir.join("bin").display(), self.dir.join("tools").display());
        let out = Command::new("/bin/sh").args(["-c", &script]).env("PATH", path).env("STUB", &self.dir).output().unwrap();
        (String::from_utf8_lossy(&out.stdout).into_owned(), out.status.code().unwrap_or(-1))
    }

    /// Runs `checks` as a whole suite and judges it as a run would be.
    fn suite(&self, checks: &str) -> (String, Outcome) {
        let (text, _) = self.run("", &format!("{checks}\necho \"UXEN-SUITE-END: t rc=$FAILED\"\n"));
        let o = judge(&text);
        (text, o)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn busybox() -> Option<PathBuf> {
    ["/usr/bin/busybox", "/bin/busybox"].iter().map(PathBuf::from).find(|p| p.exists())
}

/// The outcome a run with this serial output would have.
fn judge(serial: &str) -> Outcome {
    Outcome::from_serial("shell", serial)
}

fn counted(o: &Outcome) -> Tally {
    let mut t = Tally::default();
    t.add(Expect::Pass, o);
    t
}

/// A `uxtest` whose `cpuid` prints `$STUB/cpuid` (or fails without it).
const UXTEST_CPUID: &str = "[ \"$1\" = cpuid ] && [ -e \"$STUB/cpuid\" ] && exec cat \"$STUB/cpuid\"\necho \"uxtest: $*: failed\" >&2\nexit 1\n";

/// What bare Bochs (`corei7_skylake_x`) answers at 0x40000000: its highest
/// basic leaf, 0x16 (the base, top and bus clocks in MHz).
const BARE: &str = "00000dac 00000fa0 00000064 00000000 ....d.......";
/// The hypervisor's answer: "uXen", "RsUX", "enRs".
const UXEN: &str = "40000001 6e655875 58557352 73526e65 uXenRsUXenRs";

fn native_check(line: Option<&str>, bare: Option<&str>) -> (String, Outcome) {
    let s = Sandbox::new();
    s.stub("uxtest", UXTEST_CPUID);
    if let Some(l) = line {
        std::fs::write(s.dir.join("cpuid"), l).unwrap();
    }
    let call = match bare {
        Some(b) => format!("expect_native native 1 '{b}'"),
        None => "expect_native native 1".to_string(),
    };
    s.suite(&call)
}

#[test]
fn expect_native_fails_on_no_answer() {
    // The old check, a comparison of `signature` with $SIG, passed here.
    for (line, bare) in [(None, None), (Some(""), None), (None, Some(BARE)), (Some("00000dac 00000fa0\n"), None)] {
        let (text, o) = native_check(line, bare);
        assert!(text.contains("UXEN-TEST: FAIL native: no CPUID 0x40000000 answer on cpu1"), "{line:?}: {text}");
        assert!(!o.passed(), "{text}");
        assert_eq!(counted(&o).failed, 1);
    }
}

#[test]
fn expect_native_fails_under_the_hypervisor_or_off_the_bare_answer() {
    let (text, o) = native_check(Some(&format!("{UXEN}\n")), None);
    assert!(text.contains("UXEN-TEST: FAIL native: the hypervisor answers on cpu1"), "{text}");
    assert!(!o.passed());
    let other = "00000dac 00000fa0 00000065 00000000 ....e.......";
    let (text, o) = native_check(Some(&format!("{other}\n")), Some(BARE));
    assert!(text.contains("UXEN-TEST: FAIL native: cpu1 answers"), "{text}");
    assert!(!o.passed());
    // An empty BARE (its own uxtest failed) matches no answer.
    let (_, o) = native_check(Some(&format!("{BARE}\n")), Some(""));
    assert!(!o.passed());
    let (text, o) = native_check(Some(&format!("{BARE}\n{BARE}\n")), None);
    assert!(!o.passed(), "{text}");
}

#[test]
fn expect_native_passes_on_a_bare_cpu() {
    for bare in [None, Some(BARE)] {
        let (text, o) = native_check(Some(&format!("{BARE}\n")), bare);
        assert!(text.contains("UXEN-TEST: PASS native"), "{text}");
        assert!(o.passed(), "{text}");
    }
}

#[test]
fn signature_checks_fail_on_no_answer() {
    // `expect_eq ... "$(signature N)" "$SIG"`, the positive checks, fail
    // when uxtest prints nothing.
    let s = Sandbox::new();
    s.stub("uxtest", UXTEST_CPUID);
    let (text, o) = s.suite("expect_eq sig \"$(signature 0)\" \"$SIG\"");
    assert!(text.contains("UXEN-TEST: FAIL sig"), "{text}");
    assert!(!o.passed());
    std::fs::write(s.dir.join("cpuid"), format!("{UXEN}\n")).unwrap();
    let (text, o) = s.suite("expect_eq sig \"$(signature 0)\" \"$SIG\"");
    assert!(o.passed(), "{text}");
}

#[test]
fn expect_same_needs_a_value() {
    let s = Sandbox::new();
    // Two checksums that both came out empty: expect_eq passed on them.
    let (text, o) = s.suite("expect_same sums \"$(false)\" \"$(false)\"");
    assert!(text.contains("UXEN-TEST: FAIL sums: no value to compare"), "{text}");
    assert!(!o.passed());
    let (_, o) = s.suite("expect_same sums 1a2b ''");
    assert!(!o.passed());
    let (_, o) = s.suite("expect_same sums 1a2b 1a2c");
    assert!(!o.passed());
    let (text, o) = s.suite("expect_same sums 1a2b 1a2b");
    assert!(o.passed(), "{text}");
}

/// `attack_frames` against stubs: `uxtest devmem write` does `mode`
/// (`blocked`: completes and is counted; `landed`: completes, not counted;
/// `refused`: fails), and the stats count blocked writes in `$STUB/writes`.
fn attack(mode: &str) -> (String, Outcome) {
    let s = Sandbox::new();
    std::fs::write(s.dir.join("writes"), "7").unwrap();
    s.stub(
        "uxenctl",
        r#"case $1 in
translate) echo 0x1000000 ;;
stats) echo "{\"blocked_host_writes\":$(cat "$STUB/writes")}" ;;
esac
"#,
    );
    let write = match mode {
        "blocked" => r#"echo $(($(cat "$STUB/writes") + 1)) >"$STUB/writes"; echo written=4096"#,
        "landed" => "echo written=4096",
        _ => "echo 'write 0x1000000: Operation not permitted' >&2; exit 1",
    };
    s.stub("uxtest", &format!("case $2 in\nread) echo 'bytes=4096 nonzero=0 hash=0' ;;\nwrite) {write} ;;\nesac\n"));
    s.suite("attack_frames gf 3 0x200000 0x400000")
}

#[test]
fn attack_frames_passes_when_every_write_is_made_and_blocked() {
    let (text, o) = attack("blocked");
    assert!(o.passed(), "{text}");
    assert_eq!(counted(&o), Tally { passed: 4, failed: 0, skipped: 0 }, "{text}");
}

#[test]
fn attack_frames_fails_when_a_write_lands_or_is_never_made() {
    // The old loop counted the writes made and checked nothing of them.
    let (text, o) = attack("landed");
    assert!(text.contains("UXEN-TEST: PASS gf-writes-made"), "{text}");
    assert!(text.contains("UXEN-TEST: FAIL gf-writes-blocked: 2 of 2 writes made, blocked writes '7' -> '7'"), "{text}");
    assert!(!o.passed());
    let (text, o) = attack("refused");
    assert!(text.contains("UXEN-TEST: FAIL gf-writes-made: got '0', want '2'"), "{text}");
    assert!(!o.passed());
}

#[test]
fn median_refuses_what_is_not_a_count() {
    let s = Sandbox::new();
    let median = |args: &str| s.run("", &format!("m=$(median {args}); echo \"rc=$? m=$m\""));
    assert_eq!(median("30 10 20").0, "rc=0 m=20\n");
    assert_eq!(median("7 7 100").0, "rc=0 m=7\n");
    // Sorted, the empty value came first and 20 passed for the median.
    for bad in ["'' 10 20", "30 '' 20", "10 20 x", "10 20 -5", "10 20", "10 20 30 40"] {
        assert_eq!(median(bad).0, "rc=1 m=\n", "median {bad}");
    }
}

#[test]
fn exits_of_reads_one_side_and_nothing_without_it() {
    let s = Sandbox::new();
    let j = r#"{"exits":{"host":{"total":{"cpuid":5,"hlt":3},"cpus":[{"cpuid":5}]},"guest":{"total":{"hlt":2},"cpus":[]}}}"#;
    let of = |args: &str| s.run("", &format!("n=$(exits_of {args} '{j}'); echo \"rc=$? n=$n\""));
    assert_eq!(of("host cpuid").0, "rc=0 n=5\n");
    assert_eq!(of("host hlt").0, "rc=0 n=3\n");
    assert_eq!(of("guest hlt").0, "rc=0 n=2\n");
    // A reason without exits yet counts 0; a side that is not there, or
    // stats without exits, give nothing and fail.
    assert_eq!(of("guest cpuid").0, "rc=0 n=0\n");
    assert_eq!(of("other hlt").0, "rc=1 n=\n");
    assert_eq!(s.run("", "n=$(exits_of host cpuid '{\"pool\":{}}'); echo \"rc=$? n=$n\"").0, "rc=1 n=\n");
}

/// `bench-fork.sh` against a stub `uxenctl` whose fork number `fail_at`
/// (counting from 1) fails, and whose cowcost guest prints `cow`.
fn bench_fork(fail_at: Option<u32>) -> (String, i32) {
    bench_fork_with(fail_at, "cowcost: parent first=900 next=700 copy4k=300\ncowcost: child first=950 next=720 copy4k=300")
}

fn bench_fork_with(fail_at: Option<u32>, cow: &str) -> (String, i32) {
    let s = Sandbox::new();
    std::fs::write(s.dir.join("cow"), format!("{cow}\n")).unwrap();
    s.stub("insmod", "exit 0\n");
    s.stub("rmmod", "exit 0\n");
    let fail = fail_at.unwrap_or(0);
    s.stub(
        "uxenctl",
        &format!(
            "case $1 in\n\
             create) echo 1 ;;\n\
             destroy) ;;\n\
             run) cat \"$STUB/cow\" ;;\n\
             fork)\n\
                 n=$(cat \"$STUB/forks\" 2>/dev/null || echo 0); n=$((n + 1)); echo $n >\"$STUB/forks\"\n\
                 [ $n -eq {fail} ] && {{ echo 'uxenctl: fork: failed' >&2; exit 1; }}\n\
                 echo \"[{{\\\"id\\\":$((n + 1)),\\\"tsc\\\":$((n * 100))}}]\" ;;\n\
             esac\n"
        ),
    );
    // The guest's consoles and kernel log are not here.
    let extra = "wait_console() { return 0; }\nwait_gone() { return 0; }\ncheck_kernel_clean() { pass kernel-log-clean; }";
    let script = std::fs::read_to_string(util::root().join("tests/scripts/bench-fork.sh")).unwrap();
    let (text, rc) = s.run(extra, &format!("{script}\n"));
    // `finish` exits with the number of failures; the runner's end marker
    // would carry it.
    (format!("{text}UXEN-SUITE-END: bench-fork rc={rc}\n"), rc)
}

#[test]
fn bench_fork_measures_with_every_fork() {
    let (text, rc) = bench_fork(None);
    assert_eq!(rc, 0, "{text}");
    assert!(judge(&text).passed(), "{text}");
    assert!(text.contains("UXEN-BENCH: fork mib=16 cow=200 copy=500\n"), "{text}");
    assert_eq!(text.matches("UXEN-BENCH: fork ").count(), 3, "{text}");
    assert!(text.contains("UXEN-BENCH: cow side=parent first=900 next=700 copy4k=300\n"), "{text}");
    assert!(text.contains("UXEN-BENCH: cow side=child first=950 next=720 copy4k=300\n"), "{text}");
}

#[test]
fn bench_fork_fails_without_cow_figures() {
    // The child printed nothing (or the guest died after the parent's line).
    let (text, rc) = bench_fork_with(None, "cowcost: parent first=900 next=700 copy4k=300");
    assert_ne!(rc, 0, "{text}");
    assert!(text.contains("UXEN-TEST: FAIL cow-child-measured"), "{text}");
    assert!(!text.contains("UXEN-BENCH: cow side=child"), "{text}");
    assert!(!judge(&text).passed());
    let (text, _) = bench_fork_with(None, "");
    assert!(text.contains("UXEN-TEST: FAIL cow-parent-measured"), "{text}");
}

#[test]
fn bench_fork_fails_when_a_fork_fails() {
    // The second CoW fork of 64 MiB fails: its median was the larger of
    // the other two, and the bench passed.
    let (text, rc) = bench_fork(Some(8));
    assert_ne!(rc, 0, "{text}");
    assert!(text.contains("UXEN-TEST: FAIL bench-64-measured: a fork gave no count"), "{text}");
    assert!(!text.contains("UXEN-BENCH: fork mib=64"), "{text}");
    let o = judge(&text);
    assert!(!o.passed());
    assert_eq!(counted(&o).failed, 1);
}

#[test]
fn the_stubs_stand_where_the_scripts_look() {
    // The sandbox's tools must be the ones the helpers run: a stub that
    // is not found would fail every case above for the wrong reason.
    let s = Sandbox::new();
    s.stub("uxtest", "echo stub\n");
    let (text, rc) = s.run("", "command -v uxtest; taskset -c 1 uxtest");
    assert_eq!(rc, 0);
    assert!(text.starts_with(&s.dir.join("bin/uxtest").display().to_string()), "{text}");
    assert!(text.ends_with("stub\n"), "{text}");
}
