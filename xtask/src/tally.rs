//! What a run of suites adds up to, and the closing line that says so.
//!
//! `.ci/run` reads the last line of `cargo xtask test`: exactly
//! `N passed, N failed`, or `N passed, N failed, N skipped` when a suite
//! could not run on this host. A skipped suite is neither: it must not pass
//! for a check that never ran, nor fail a run on a host that lacks, say,
//! nested VT-x.

use crate::runner::Outcome;
use crate::suites::Expect;

/// Tests passed and failed, and suites skipped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
    pub skipped: u64,
}

impl Tally {
    /// Counts one suite's outcome. Every in-guest check counts as a test.
    /// A suite that must fail (a harness self-test) counts as one test,
    /// which passes when `xtask run` exited non-zero for the reason the
    /// suite was built to produce. A run judged failed although every check
    /// passed (a timeout, a panic, no end marker, no checks at all) counts
    /// one failure more, so that it cannot add up to a clean run.
    pub fn add(&mut self, expect: Expect, o: &Outcome) {
        if o.skipped.is_some() {
            self.skipped += 1;
            return;
        }
        match expect {
            Expect::Fail => {
                if self_test_failed_as_built(o) {
                    self.passed += 1;
                } else {
                    self.failed += 1;
                }
            }
            Expect::Pass => {
                self.passed += o.checks.iter().filter(|c| c.passed).count() as u64;
                self.failed += o.checks.iter().filter(|c| !c.passed).count() as u64;
                if !o.passed() && o.checks.iter().all(|c| c.passed) {
                    self.failed += 1;
                }
            }
        }
    }

    /// Adds the host unit tests' counts.
    pub fn add_unit(&mut self, passed: u64, failed: u64) {
        self.passed += passed;
        self.failed += failed;
    }

    /// Whether the run succeeded: nothing failed. Skipped suites neither
    /// help nor hurt.
    pub fn ok(&self) -> bool {
        self.failed == 0
    }

    /// The closing line, for `.ci/run`: printed alone on the last line.
    pub fn closing_line(&self) -> String {
        if self.skipped == 0 {
            format!("{} passed, {} failed", self.passed, self.failed)
        } else {
            format!("{} passed, {} failed, {} skipped", self.passed, self.failed, self.skipped)
        }
    }
}

/// A harness self-test did its job: the command exited non-zero, and for
/// the reason the suite was built to produce (a failed check or a timeout),
/// not because, say, the emulator would not start.
pub fn self_test_failed_as_built(o: &Outcome) -> bool {
    let reason_seen = o.checks.iter().any(|c| !c.passed) || o.timed_out;
    o.command_failed == Some(true) && reason_seen
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The outcome of a run whose serial console printed `serial`.
    fn from_serial(serial: &str) -> Outcome {
        Outcome::from_serial("s", serial)
    }

    fn skipped(why: &str) -> Outcome {
        Outcome { skipped: Some(why.into()), ..from_serial("") }
    }

    const CLEAN: &str = "UXEN-TEST: PASS a\nUXEN-TEST: PASS b\nUXEN-SUITE-END: s rc=0\n";

    #[test]
    fn a_clean_run_passes_and_counts_its_checks() {
        let o = from_serial(CLEAN);
        assert!(o.passed());
        let mut t = Tally::default();
        t.add(Expect::Pass, &o);
        assert_eq!(t, Tally { passed: 2, failed: 0, skipped: 0 });
        assert!(t.ok());
        assert_eq!(t.closing_line(), "2 passed, 0 failed");
    }

    #[test]
    fn a_skipped_suite_is_not_passed_and_does_not_fail_the_run() {
        let o = skipped("no /dev/kvm on this host");
        assert!(!o.passed());
        let mut t = Tally::default();
        t.add(Expect::Pass, &from_serial(CLEAN));
        t.add(Expect::Pass, &o);
        assert_eq!(t, Tally { passed: 2, failed: 0, skipped: 1 });
        assert!(t.ok());
        assert_eq!(t.closing_line(), "2 passed, 0 failed, 1 skipped");
        // Nor does a skipped self-test count as one that failed as built.
        let mut t = Tally::default();
        t.add(Expect::Fail, &Outcome { command_failed: Some(true), ..o });
        assert_eq!(t, Tally { passed: 0, failed: 0, skipped: 1 });
    }

    #[test]
    fn the_closing_line_adds_the_unit_tests_and_stays_one_line() {
        let mut t = Tally::default();
        t.add_unit(40, 1);
        t.add(Expect::Pass, &from_serial("UXEN-TEST: PASS a\nUXEN-TEST: FAIL b: why\nUXEN-SUITE-END: s rc=1\n"));
        t.add(Expect::Pass, &skipped("x"));
        t.add(Expect::Pass, &skipped("y"));
        assert!(!t.ok());
        let line = t.closing_line();
        assert_eq!(line, "41 passed, 2 failed, 2 skipped");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn an_empty_signature_fails_the_suite() {
        // What `expect_native` prints when `uxtest cpuid` printed nothing:
        // the run is judged failed, and the failure is counted.
        let o = from_serial(
            "UXEN-TEST: PASS insmod\n\
             UXEN-TEST: FAIL no-signature-after-cpu1: no CPUID 0x40000000 answer on cpu1: ''\n\
             UXEN-SUITE-END: latelaunch rc=1\n",
        );
        assert!(!o.passed());
        let mut t = Tally::default();
        t.add(Expect::Pass, &o);
        assert_eq!(t, Tally { passed: 1, failed: 1, skipped: 0 });
        assert_eq!(o.checks[1].name, "no-signature-after-cpu1");
    }

    #[test]
    fn a_run_that_proves_nothing_fails() {
        // No checks at all, a script that exited non-zero, a missing end
        // marker, a panic: each a failure although no check failed.
        for serial in [
            "UXEN-SUITE-END: s rc=0\n",
            "UXEN-TEST: PASS a\nUXEN-SUITE-END: s rc=3\n",
            "UXEN-TEST: PASS a\n",
            "UXEN-TEST: PASS a\nKernel panic - not syncing\nUXEN-SUITE-END: s rc=0\n",
        ] {
            let o = from_serial(serial);
            assert!(!o.passed(), "{serial}");
            let mut t = Tally::default();
            t.add(Expect::Pass, &o);
            assert!(!t.ok(), "{serial}");
        }
        let o = Outcome { timed_out: true, ..from_serial(CLEAN) };
        assert!(!o.passed());
    }

    #[test]
    fn a_self_test_passes_only_when_it_failed_as_built() {
        let failing = from_serial("UXEN-TEST: FAIL deliberate: x\nUXEN-SUITE-END: s rc=1\n");
        let mut t = Tally::default();
        t.add(Expect::Fail, &Outcome { command_failed: Some(true), ..failing.clone() });
        assert_eq!(t, Tally { passed: 1, failed: 0, skipped: 0 });
        // The command succeeded: the harness let a failure through.
        let mut t = Tally::default();
        t.add(Expect::Fail, &Outcome { command_failed: Some(false), ..failing });
        assert_eq!(t, Tally { passed: 0, failed: 1, skipped: 0 });
        // The command failed, but not for the suite's reason.
        let mut t = Tally::default();
        t.add(Expect::Fail, &Outcome { command_failed: Some(true), ..from_serial(CLEAN) });
        assert_eq!(t, Tally { passed: 0, failed: 1, skipped: 0 });
    }
}
