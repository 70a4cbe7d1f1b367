//! `ioctl-fuzz`: the loop, the table of operations and the entry.

use super::*;

impl Fuzz {
    pub(super) fn step(&mut self) {
        while self.live() > 2 * LIVE_CAP {
            self.op_close();
        }
        let total: u64 = OPS.iter().filter(|o| self.enabled(o.0)).map(|o| o.1).sum();
        let mut x = self.rng.below(total);
        let Some(&(name, _, op)) = OPS.iter().filter(|o| self.enabled(o.0)).find(|o| {
            if x < o.1 {
                true
            } else {
                x -= o.1;
                false
            }
        }) else {
            return;
        };
        self.bump(name);
        if self.verbose {
            // Before the call, so that a call that never returns is named.
            eprintln!("ioctl-fuzz: [{}] {name}", self.calls);
        }
        op(self);
        if self.calls >= self.next_check {
            self.next_check = self.calls + CHECK_EVERY;
            self.check("periodic check");
        }
    }

    /// Closes everything; then no VM may be left and the pool must be empty.
    /// Returns the frames left in the pool.
    pub(super) fn finish(&mut self) -> u64 {
        alarm_every(0);
        self.adopt();
        let ids: Vec<u32> = self.vms.keys().copied().collect();
        for id in ids {
            for f in self.vms[&id].fds.clone() {
                self.close_vm_fd(id, f);
            }
        }
        let orphans = self.adopt();
        if orphans != 0 {
            self.note(format!("{orphans} VM descriptors appeared that no call returned"));
            let ids: Vec<u32> = self.vms.keys().copied().collect();
            for id in ids {
                for f in self.vms[&id].fds.clone() {
                    self.close_vm_fd(id, f);
                }
            }
        }
        for fd in self.ctl.split_off(1) {
            close(fd);
        }
        let left = self.list().map(|l| l.len()).unwrap_or(usize::MAX);
        if left != 0 {
            self.note(format!("{left} VMs left after every descriptor was closed"));
        }
        let Some(s) = self.stats() else { return u64::MAX };
        if s.pool_frames_total != 0 {
            self.note(format!("the pool keeps {} frames ({} free) with no VM left", s.pool_frames_total, s.pool_frames_free));
        }
        self.check("at the end");
        s.pool_frames_total
    }
}

pub(super) type Op = fn(&mut Fuzz);

/// The operations, with their names (for `--only` and `--skip`) and
/// weights.
pub(super) const OPS: &[(&str, u64, Op)] = &[
    ("version", 40, Fuzz::op_version),
    ("stats", 40, Fuzz::op_stats),
    ("list", 50, Fuzz::op_list),
    ("create", 90, Fuzz::op_create),
    ("destroy", 40, Fuzz::op_destroy),
    ("merge", 20, Fuzz::op_merge),
    ("translate", 30, Fuzz::op_translate),
    ("pool", 10, Fuzz::op_pool),
    ("load", 70, Fuzz::op_load),
    ("get-regs", 40, Fuzz::op_get_regs),
    ("set-regs", 50, Fuzz::op_set_regs),
    ("run", 190, Fuzz::op_run),
    ("fork", 50, Fuzz::op_fork),
    ("vm-id", 20, Fuzz::op_vm_id),
    ("wrong-cmd", 60, Fuzz::op_wrong_cmd),
    ("bad-fd", 30, Fuzz::op_bad_fd),
    ("ctl", 20, Fuzz::op_ctl),
    ("close", 50, Fuzz::op_close),
    ("dup", 30, Fuzz::op_dup),
    ("syscalls", 20, Fuzz::op_syscalls),
    ("reprogram", 20, Fuzz::op_reprogram),
    ("race", 15, Fuzz::op_race),
    ("child", 10, Fuzz::op_child_process),
    ("kill", 8, Fuzz::op_kill_runner),
    ("exec", 7, Fuzz::op_exec),
];

/// `uxtest ioctl-fuzz --seed S --calls N [--only A,B] [--skip C,D] [--verbose]`.
pub fn ioctl_fuzz(args: &[String]) -> Result {
    let seed = flag_u64(args, "--seed", 1)?;
    let calls = flag_u64(args, "--calls", 5000)?;
    let verbose = args.iter().any(|a| a == "--verbose");
    let names = |flag: &str| -> Vec<String> {
        args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).map(|v| v.split(',').map(String::from).collect()).unwrap_or_default()
    };
    install_handlers();
    raise_nofile(4096);
    let mut f = Fuzz::new(seed, verbose)?;
    f.only = names("--only");
    f.skip = names("--skip");
    for n in f.only.iter().chain(&f.skip) {
        if !OPS.iter().any(|o| o.0 == n) {
            return Err(format!("no operation `{n}`; operations: {}", OPS.iter().map(|o| o.0).collect::<Vec<_>>().join(", ")));
        }
    }
    let t0 = std::time::Instant::now();
    let mut next_report = 1000;
    while f.calls < calls {
        f.step();
        if f.calls >= next_report {
            next_report += 1000;
            eprintln!("ioctl-fuzz: {} calls, {} VMs live, {} mismatches, {:.0} s", f.calls, f.live(), f.mismatches, t0.elapsed().as_secs_f64());
        }
    }
    let leaked = f.finish();
    let errnos: Vec<String> = f.errnos.iter().map(|(e, n)| format!("{}={n}", errno_name(*e))).collect();
    let failed: u64 = f.errnos.values().sum();
    let counts: Vec<String> = f.count.iter().map(|(k, n)| format!("{k}={n}")).collect();
    println!("ioctl-fuzz: counts: {}", counts.join(", "));
    println!(
        "ioctl-fuzz: seed={seed} calls={} ok={} failed={failed} errnos: {} mismatches={} max_live_vms={} frames_leaked={leaked} seconds={:.1}",
        f.calls,
        f.ok,
        errnos.join(" "),
        f.mismatches,
        f.max_live,
        t0.elapsed().as_secs_f64()
    );
    if f.mismatches != 0 || leaked != 0 {
        return Err(format!("{} mismatches, {leaked} frames left in the pool", f.mismatches));
    }
    Ok(())
}
