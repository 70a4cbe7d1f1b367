//! `vm-limit` and `vm-churn`: the limits, and create/fork/destroy churn.

use super::*;

impl Fuzz {
    /// RUN of vCPU 0 with a good argument, completing the previous exit
    /// with 0xab; checks and returns the record.
    pub(super) fn run_good(&mut self, id: u32) -> Option<ExitRecord> {
        let fd = self.vms[&id].fds[0];
        let rec = ExitRecord { data: 0xab, hc_ret: 0xab, ..Default::default() };
        let run = VmRun { vcpu: 0, flags: abi::VMRUN_NO_WAIT, exit: rec, ..Default::default() };
        self.arena.write(0, &bytes_of(&run));
        let v = self.vms[&id].vcpus[0];
        let ended = self.vms[&id].fin.is_some();
        let expect = match v.pending {
            Some(Pend::In) => Expect::Out(Some(0xab)),
            Some(Pend::MmioRead) => Expect::MmioWrite(Some(0xab)),
            Some(Pend::Call(_)) => Expect::Out(Some(0xab)),
            None => v.expect,
        };
        alarm_every(RUN_ALARM_MS);
        let r = self.ioctl(fd, ioctl::VM_RUN, self.arena.addr(0));
        alarm_every(0);
        self.bump("runs");
        if !self.want(&format!("VM_RUN vm{id}"), &r, &[0]) {
            return None;
        }
        let x = from_bytes::<VmRun>(&self.arena.read(0, std::mem::size_of::<VmRun>())).exit;
        if ended {
            return Some(x);
        }
        let vm = self.vms.get_mut(&id).unwrap();
        vm.vcpus[0].pending = None;
        vm.vcpus[0].expect = expect;
        self.check_record(id, 0, x, true, expect);
        Some(x)
    }

    /// VM_FORK with a good argument; returns the child's id.
    pub(super) fn fork_good(&mut self, id: u32, flags: u32) -> (Res, Option<u32>) {
        let fd = self.vms[&id].fds[0];
        self.arena.write(0, &bytes_of(&VmFork { flags, ..Default::default() }));
        let r = self.ioctl(fd, ioctl::VM_FORK, self.arena.addr(0));
        let Ok(cfd) = r else { return (r, None) };
        let out: VmFork = from_bytes(&self.arena.read(0, std::mem::size_of::<VmFork>()));
        self.adopt_child(id, out.child, cfd as i32);
        (r, Some(out.child))
    }

    /// CREATE_VM of a small VM without a program, or its errno.
    pub(super) fn create_small(&mut self) -> std::result::Result<u32, i32> {
        let c = VmCreate { mem_bytes: 2 * MIB, vcpus: 1, name: abi::padded(b"limit"), ..Default::default() };
        self.arena.write(0, &bytes_of(&c));
        let fd = self.ctl[0];
        let r = self.ioctl(fd, ioctl::CREATE_VM, self.arena.addr(0));
        let fd = r?;
        let out: VmCreate = from_bytes(&self.arena.read(0, std::mem::size_of::<VmCreate>()));
        self.vms.insert(out.id, VmM::new(out.id, fd as i32, c.mem_bytes, 1, 0, out.name));
        self.max_live = self.max_live.max(self.live());
        Ok(out.id)
    }

    pub(super) fn close_all(&mut self, id: u32) {
        for f in self.vms[&id].fds.clone() {
            self.close_vm_fd(id, f);
        }
    }

    pub(super) fn pool_used(&mut self) -> u64 {
        self.stats().map(|s| s.pool_frames_total - s.pool_frames_free).unwrap_or(0)
    }
}

pub(super) fn check(f: &mut Fuzz, what: &str, ok: bool) {
    println!("vm-limit: {what}: {}", if ok { "ok" } else { "FAILED" });
    if !ok {
        f.note(what.to_string());
    }
}

/// `uxtest vm-limit`: a guest forks through the hypercall until its VM has
/// `VM_MAX_CHILDREN` live children, then gets EAGAIN, and again after one
/// child goes; the host's FORK says the same; then VMs are created until
/// `MAX_VMS` exist, and a creation, a guest fork and a host fork each get
/// ENOSPC. Failed forks must leave no frame behind: at the end the pool is
/// empty.
pub fn vm_limit(_args: &[String]) -> Result {
    install_handlers();
    raise_nofile(abi::MAX_VMS as u64 + 256);
    let mut f = Fuzz::new(7, false)?;
    let max = abi::VM_MAX_CHILDREN;
    // Forks need one vCPU: VMs of two are dropped until one has one.
    let p = loop {
        let Some(p) = f.create_valid(Some(Prog::Fork)) else { return Err("cannot create the forking VM".into()) };
        if f.vms[&p].vcpus.len() == 1 {
            break p;
        }
        f.close_all(p);
    };
    // 1. Guest forks up to the limit: each is a HYPERCALL exit, then the
    //    parent's `out` of the result.
    let mut forks = 0;
    for _ in 0..2 * max + 4 {
        match f.run_good(p) {
            Some(x) if x.kind == exit::HYPERCALL => forks += 1,
            Some(x) if x.kind == exit::IO && x.data == (-(EAGAIN as i64)) as u8 as u64 => break,
            Some(_) => {}
            None => break,
        }
    }
    let children = f.vms[&p].children;
    check(&mut f, &format!("guest forks until refused: {forks} children, then EAGAIN"), forks == max && children == max);
    let (r, _) = f.fork_good(p, 0);
    check(&mut f, &format!("host fork at the live-children limit: {}", r.err().map(errno_name).unwrap_or("ok".into())), r == Err(EAGAIN));
    // 2. One child goes: the guest may fork once more.
    let child = *f.vms.values().find(|v| v.parent == p).map(|v| &v.id).unwrap();
    f.close_all(child);
    let x = f.run_good(p);
    check(&mut f, "after one child is gone, the guest forks again", x.map(|x| x.kind) == Some(exit::HYPERCALL));
    let _ = f.run_good(p);
    let x = f.run_good(p);
    check(&mut f, "then it is refused again", x.map(|x| (x.kind, x.data)) == Some((exit::IO, (-(EAGAIN as i64)) as u8 as u64)));
    // 3. VMs up to the total limit.
    let mut made = 0;
    let err = loop {
        match f.create_small() {
            Ok(_) => made += 1,
            Err(e) => break e,
        }
        if made > abi::MAX_VMS {
            break 0;
        }
    };
    let live = f.live() as u32;
    check(&mut f, &format!("VMs created until refused: {live} in all, then {}", errno_name(err)), live == abi::MAX_VMS && err == ENOSPC);
    // 4. At the total limit a guest fork and a host fork fail cleanly, and
    //    take no frame with them.
    let c = f.vms.values().find(|v| v.parent == p && v.prog == Prog::Fork).map(|v| v.id).unwrap();
    let _ = f.run_good(c);
    let used0 = f.pool_used();
    let x = f.run_good(c);
    check(
        &mut f,
        &format!("guest fork with {} VMs: {:?}", abi::MAX_VMS, x.map(|x| (x.kind, x.data as u8 as i8))),
        x.map(|x| (x.kind, x.data)) == Some((exit::IO, (-(ENOSPC as i64)) as u8 as u64)),
    );
    let (r, _) = f.fork_good(c, 0);
    check(&mut f, &format!("host fork with {} VMs: {}", abi::MAX_VMS, r.err().map(errno_name).unwrap_or("ok".into())), r == Err(ENOSPC));
    let (r, _) = f.fork_good(c, abi::FORK_COPY);
    check(&mut f, &format!("full-copy fork with {} VMs: {}", abi::MAX_VMS, r.err().map(errno_name).unwrap_or("ok".into())), r == Err(ENOSPC));
    let used1 = f.pool_used();
    check(&mut f, &format!("refused forks take no frames ({used0} -> {used1} in use)"), used1 == used0);
    // 5. One VM fewer: the guest fork goes through.
    let plain = *f.vms.values().find(|v| v.prog == Prog::None).map(|v| &v.id).unwrap();
    f.close_all(plain);
    // The guest's next FORK hypercall exits to the VMM once it succeeds;
    // a RUN may first complete the OUT of the last refusal.
    let forked = (0..2).any(|_| f.run_good(c).map(|x| x.kind) == Some(exit::HYPERCALL));
    check(&mut f, "below the limit again, the guest forks", forked);
    f.check("at the limit");
    let leaked = f.finish();
    println!("vm-limit: {} VMs at most, {} calls, {} mismatches, frames_leaked={leaked}", f.max_live, f.calls, f.mismatches);
    if f.mismatches != 0 || leaked != 0 {
        return Err(format!("{} failures, {leaked} frames left in the pool", f.mismatches));
    }
    Ok(())
}

/// `uxtest vm-churn --ops N --seed S`: creates (with a program, run once),
/// forks and destroys VMs in random order; checks the list and the pool
/// along the way and the pool's return at the end.
pub fn vm_churn(args: &[String]) -> Result {
    let ops = flag_u64(args, "--ops", 1000)?;
    let seed = flag_u64(args, "--seed", 1)?;
    install_handlers();
    raise_nofile(4096);
    let mut f = Fuzz::new(seed, args.iter().any(|a| a == "--verbose"))?;
    let (mut creates, mut forks, mut destroys) = (0u64, 0u64, 0u64);
    while creates + forks + destroys < ops {
        let live: Vec<u32> = f.vms.values().filter(|v| !v.destroyed).map(|v| v.id).collect();
        let choice = f.rng.below(10);
        if live.is_empty() || (choice < 4 && live.len() < LIVE_CAP) {
            let prog = f.rng.pick(&[Prog::Exit42, Prog::Io, Prog::Count, Prog::Halt, Prog::Fork, Prog::None, Prog::Mmio]);
            if let Some(id) = f.create_valid(Some(prog)) {
                creates += 1;
                if f.rng.chance(60) {
                    f.run_good(id);
                }
            }
        } else if choice < 7 {
            let id = f.rng.pick(&live);
            let vm = &f.vms[&id];
            let want = if vm.fin.is_some() {
                EINVAL
            } else if vm.children >= abi::VM_MAX_CHILDREN {
                EAGAIN
            } else {
                0
            };
            let flags = if f.rng.chance(10) { abi::FORK_COPY } else { 0 };
            let (r, child) = f.fork_good(id, flags);
            if f.want("VM_FORK in the churn", &r, &[want]) && r.is_ok() {
                forks += 1;
                if f.rng.chance(50) {
                    f.run_good(child.unwrap());
                }
            }
        } else {
            let id = f.rng.pick(&live);
            if f.rng.chance(50) {
                f.arena.write(0, &bytes_of(&VmId { id, reserved0: 0 }));
                let c = f.ctl[0];
                let r = f.ioctl(c, ioctl::DESTROY, f.arena.addr(0));
                f.want("DESTROY in the churn", &r, &[0]);
                f.vm_gone(id);
                f.vms.get_mut(&id).unwrap().destroyed = true;
            }
            f.close_all(id);
            destroys += 1;
        }
        if (creates + forks + destroys) % 50 == 0 {
            f.check("churn");
        }
    }
    let leaked = f.finish();
    println!(
        "vm-churn: seed={seed} ops={} creates={creates} forks={forks} destroys={destroys} max_live_vms={} calls={} mismatches={} frames_leaked={leaked}",
        creates + forks + destroys,
        f.max_live,
        f.calls,
        f.mismatches
    );
    if f.mismatches != 0 || leaked != 0 {
        return Err(format!("{} mismatches, {leaked} frames left in the pool", f.mismatches));
    }
    Ok(())
}
