//! Races: a vCPU running on another thread, or in another process, while
//! this one works on its VM, kills the runner, or execs.

use super::*;

/// What the RUN thread of a race saw.
pub(super) enum RaceEnd {
    /// Interrupted by our signal.
    Interrupted,
    /// The VM was destroyed under it.
    Destroyed,
    Error(i32),
    Unexpected(ExitRecord),
}

impl RaceEnd {
    pub(super) fn describe(&self) -> String {
        match self {
            RaceEnd::Interrupted => "interrupted".into(),
            RaceEnd::Destroyed => "destroyed".into(),
            RaceEnd::Error(e) => format!("error {}", errno_name(*e)),
            RaceEnd::Unexpected(x) => format!("exit kind {} reason {} port {:#x} data {:#x}", x.kind, x.reason, x.port, x.data),
        }
    }
}

pub(super) fn pthread_self() -> libc::pthread_t {
    // SAFETY: no preconditions.
    unsafe { libc::pthread_self() }
}

impl Fuzz {
    /// A vCPU runs on another thread while this one works on its VM: RUN
    /// again, LOAD, the registers, FORK, MERGE, and DESTROY or close.
    pub(super) fn op_race(&mut self) {
        let prog = if self.rng.chance(50) { Prog::Spin } else { Prog::Twins };
        let Some(id) = self.create_valid(Some(prog)) else { return };
        if self.vms[&id].vcpus.len() != 1 {
            // Twins counts on one vCPU; the model's races use one.
            return;
        }
        let fd = self.vms[&id].fds[0];
        let stop = AtomicBool::new(false);
        let tid = AtomicU64::new(0);
        let thread_calls = AtomicU64::new(0);
        let ios = AtomicU64::new(0);
        let ending = self.rng.below(4);
        self.bump("races");
        let end = std::thread::scope(|s| {
            let h = s.spawn(|| {
                // SIGALRM is for the main thread's RUNs.
                // SAFETY: changing this thread's signal mask.
                unsafe {
                    let mut set: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut set);
                    libc::sigaddset(&mut set, libc::SIGALRM);
                    libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                }
                tid.store(pthread_self() as u64, Ordering::Release);
                let mut run = VmRun::default();
                loop {
                    if stop.load(Ordering::Acquire) {
                        return RaceEnd::Interrupted;
                    }
                    thread_calls.fetch_add(1, Ordering::Relaxed);
                    let r = raw_ioctl(fd, ioctl::VM_RUN, &mut run as *mut VmRun as u64);
                    let x = run.exit;
                    run.exit = ExitRecord::default();
                    match r {
                        Err(EINTR) => continue,
                        // The main thread entered the vCPU between two RUNs.
                        Err(EBUSY) => usleep(500),
                        Err(e) => return RaceEnd::Error(e),
                        Ok(_) if x.kind == exit::IO && x.port == 0x80 && x.is_write == 1 && x.data == 0 => {
                            ios.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) if x.kind == exit::SHUTDOWN && x.reason == stop::DESTROYED => return RaceEnd::Destroyed,
                        Ok(_) => return RaceEnd::Unexpected(x),
                    }
                }
            });
            // Wait until the vCPU is in the guest.
            for _ in 0..400 {
                let running = self.list().map(|l| l.iter().any(|i| i.id == id && i.state == abi::vm_state::RUNNING)).unwrap_or(false);
                if running || ios.load(Ordering::Relaxed) > 0 {
                    break;
                }
                usleep(2000);
            }
            let mut closed = false;
            for _ in 0..3 + self.rng.below(10) {
                self.race_op(id, fd);
            }
            match ending {
                0 => {
                    let v = VmId { id, reserved0: 0 };
                    self.arena.write(0, &bytes_of(&v));
                    let c = self.ctl[0];
                    let r = self.ioctl(c, ioctl::DESTROY, self.arena.addr(0));
                    self.want("DESTROY of a VM whose vCPU runs", &r, &[0]);
                    self.vm_gone(id);
                    self.vms.get_mut(&id).unwrap().destroyed = true;
                }
                1 => {
                    // The descriptor goes while RUN holds the file: the VM
                    // lives until RUN returns.
                    for f in self.vms[&id].fds.clone() {
                        close(f);
                    }
                    closed = true;
                }
                _ => {}
            }
            stop.store(true, Ordering::Release);
            while !h.is_finished() {
                let t = tid.load(Ordering::Acquire);
                if t != 0 {
                    // SAFETY: signalling our own live thread, which handles
                    // SIGUSR1.
                    unsafe { libc::pthread_kill(t as libc::pthread_t, libc::SIGUSR1) };
                }
                usleep(1000);
            }
            (h.join().unwrap(), closed)
        });
        let (end, closed) = end;
        let n = thread_calls.load(Ordering::Relaxed);
        self.calls += n;
        self.log(format!("race on vm{id} ({prog:?}), ending {ending}: {} after {n} RUNs, {} port exits", end.describe(), ios.load(Ordering::Relaxed)));
        // After the close (ending 1), a RUN the thread starts anew finds no
        // descriptor: EBADF is the right answer then.
        let good = matches!((&end, ending), (RaceEnd::Interrupted, _) | (RaceEnd::Destroyed, 0) | (RaceEnd::Error(EBADF), 1));
        if !good {
            self.note(format!("race on vm{id} ({prog:?}), ending {ending}: the RUN thread ended with {}", end.describe()));
        }
        if closed {
            let fds = self.vms[&id].fds.clone();
            for f in fds {
                self.fd_dropped(id, f);
            }
            if self.list().map(|l| l.iter().any(|i| i.id == id)).unwrap_or(true) {
                self.note(format!("vm{id} still listed after its descriptor was closed during RUN and RUN returned"));
            }
        } else if let Some(vm) = self.vms.get_mut(&id) {
            vm.vcpus[0].ready = true;
            vm.vcpus[0].pending = None;
            vm.vcpus[0].expect = first_expect(prog);
            if prog == Prog::Twins {
                vm.vcpus[0].expect = Expect::Out(Some(0));
            }
        }
        self.check("after a race");
    }

    pub(super) fn race_op(&mut self, id: u32, fd: i32) {
        let r;
        let what;
        let want: &[i32];
        match self.rng.below(7) {
            0 => {
                let run = VmRun { vcpu: 0, ..Default::default() };
                self.arena.write(0, &bytes_of(&run));
                alarm_every(RUN_ALARM_MS);
                r = self.ioctl(fd, ioctl::VM_RUN, self.arena.addr(0));
                alarm_every(0);
                what = "RUN of a vCPU that another thread runs";
                let x: VmRun = from_bytes(&self.arena.read(0, std::mem::size_of::<VmRun>()));
                // Between two RUNs of the other thread this one may enter.
                want = if r.is_ok() && x.exit.kind == exit::IO && x.exit.port == 0x80 { &[0] } else { &[EBUSY, EINTR] };
            }
            1 => {
                let data = self.arena.addr(DATA_OFF);
                self.arena.write(0, &bytes_of(&IocLoad { gpa: SCRATCH_GPA, data, len: 4096 }));
                r = self.ioctl(fd, ioctl::VM_LOAD, self.arena.addr(0));
                what = "LOAD while a vCPU runs";
                want = &[0, EBUSY];
            }
            2 => {
                self.arena.write(0, &bytes_of(&VmRegs::default()));
                r = self.ioctl(fd, ioctl::VM_GET_REGS, self.arena.addr(0));
                what = "GET_REGS while a vCPU runs";
                want = &[0, EBUSY];
            }
            3 => {
                self.arena.write(0, &bytes_of(&VmRegs { regs: prog_regs(Prog::Spin, 2 * MIB), ..Default::default() }));
                r = self.ioctl(fd, ioctl::VM_SET_REGS, self.arena.addr(0));
                what = "SET_REGS while a vCPU runs";
                want = &[EBUSY];
            }
            4 | 5 if self.enabled("merge") => {
                let m = abi::MergeScan { vm: if self.rng.chance(50) { id } else { 0 }, ..Default::default() };
                self.arena.write(0, &bytes_of(&m));
                let c = self.ctl[0];
                r = self.ioctl(c, ioctl::MERGE, self.arena.addr(0));
                what = "MERGE while a vCPU writes";
                want = &[0];
                if r.is_ok() {
                    self.bump("merges during a race");
                }
            }
            _ => {
                self.arena.write(0, &bytes_of(&VmFork::default()));
                r = self.ioctl(fd, ioctl::VM_FORK, self.arena.addr(0));
                what = "FORK while a vCPU runs";
                want = &[0, EBUSY];
                if let Ok(cfd) = r {
                    let out: VmFork = from_bytes(&self.arena.read(0, std::mem::size_of::<VmFork>()));
                    let vm = &self.vms[&id];
                    let mut c = VmM::new(out.child, cfd as i32, vm.mem, 1, id, vm.name);
                    c.prog = vm.prog;
                    c.vcpus[0].expect = if vm.prog == Prog::Twins { Expect::Out(Some(0)) } else { Expect::Spin };
                    c.vcpus[0].snap = true;
                    self.vms.get_mut(&id).unwrap().children += 1;
                    self.vms.insert(out.child, c);
                    self.bump("forks during a race");
                }
            }
        }
        self.log(format!("race: {what} -> {r:?}"));
        self.want(what, &r, want);
    }

    /// fork(2): the child process uses the inherited descriptors and exits;
    /// the VMs stay with the parent.
    pub(super) fn op_child_process(&mut self) {
        let mut fds: Vec<(i32, u32)> = Vec::new();
        for _ in 0..3 {
            if let Some(id) = self.pick_vm() {
                let fd = self.pick_fd(id);
                fds.push((fd, id));
            }
        }
        // SAFETY: no other thread runs; the child only issues ioctls on
        // inherited descriptors into a stack buffer and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let mut code = 0;
            for &(fd, id) in &fds {
                let mut v = VmId::default();
                if raw_ioctl(fd, ioctl::VM_ID, &mut v as *mut VmId as u64).is_err() || v.id != id {
                    code = 1;
                }
            }
            // SAFETY: leaving the child without running the parent's
            // destructors (the descriptors close with the process).
            unsafe { libc::_exit(code) };
        }
        let mut st = 0;
        // SAFETY: reaping our child.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        self.calls += fds.len() as u64;
        self.bump("child processes");
        if !(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0) {
            self.note(format!("a child process saw the wrong VMs through inherited descriptors (status {st:#x})"));
        }
        self.check("after a child process");
    }

    /// A process that owns a VM is killed with SIGKILL in the middle of a
    /// RUN: the VM goes, its frames with it.
    pub(super) fn op_kill_runner(&mut self) {
        let prog = self.rng.pick(&[Prog::Spin, Prog::Halt, Prog::Twins]);
        let Some(id) = self.create_valid(Some(prog)) else { return };
        let fds = self.vms[&id].fds.clone();
        let fd = fds[0];
        // SAFETY: no other thread runs; the child only loops on RUN.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let mut run = VmRun::default();
            loop {
                run.exit = ExitRecord::default();
                if let Err(e) = raw_ioctl(fd, ioctl::VM_RUN, &mut run as *mut VmRun as u64) {
                    if e != EINTR {
                        // SAFETY: leaving the child.
                        unsafe { libc::_exit(3) };
                    }
                }
            }
        }
        for f in fds {
            close(f);
        }
        // Wait until it has entered the guest at least once.
        let mut running = false;
        for _ in 0..500 {
            if let Some(l) = self.list() {
                running = l.iter().any(|i| i.id == id && (i.state == abi::vm_state::RUNNING || i.state == abi::vm_state::PAUSED));
            }
            if running {
                break;
            }
            usleep(2000);
        }
        // SAFETY: killing and reaping our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        self.bump("VMM processes killed in RUN");
        if !running {
            self.note(format!("vm{id} never ran in the child process"));
        }
        let vm = self.vms.get_mut(&id).unwrap();
        let fds = vm.fds.clone();
        for f in fds {
            self.fd_dropped(id, f);
        }
        if self.list().map(|l| l.iter().any(|i| i.id == id)).unwrap_or(true) {
            self.note(format!("vm{id} is still listed after SIGKILL of the process running it"));
        }
        self.check("after SIGKILL of a RUN");
    }

    /// `execve` closes VM descriptors (O_CLOEXEC): the VM is gone while the
    /// new program still runs.
    pub(super) fn op_exec(&mut self) {
        let Some(id) = self.create_valid(Some(Prog::Halt)) else { return };
        let fds = self.vms[&id].fds.clone();
        let mut p = [0i32; 2];
        // SAFETY: creating a pipe.
        unsafe { libc::pipe(p.as_mut_ptr()) };
        // SAFETY: no other thread runs; the child only rewires its stdin
        // and execs.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: in the child: stdin from the pipe, then the shell.
            unsafe {
                libc::dup2(p[0], 0);
                libc::close(p[1]);
                let argv = [c"sh".as_ptr(), c"-c".as_ptr(), c"read x".as_ptr(), std::ptr::null()];
                libc::execv(c"/bin/sh".as_ptr(), argv.as_ptr());
                libc::_exit(127);
            }
        }
        close(p[0]);
        for f in &fds {
            close(*f);
        }
        let mut gone = false;
        for _ in 0..1000 {
            if let Some(l) = self.list() {
                if !l.iter().any(|i| i.id == id) {
                    gone = true;
                    break;
                }
            }
            usleep(2000);
        }
        close(p[1]);
        // SAFETY: reaping our child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        self.bump("descriptors closed by execve");
        if !gone {
            self.note(format!("vm{id} outlived execve in a process that only inherited its descriptor"));
        }
        for f in fds {
            self.fd_dropped(id, f);
        }
    }
}
