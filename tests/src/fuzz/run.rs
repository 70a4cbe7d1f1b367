//! RUN and FORK: the exit records against the model, and the children's
//! starting state.

use super::*;

pub(super) fn vm_boot_regs(mem: u64) -> Regs {
    Regs { rsp: mem, rdi: mem, rflags: 2, cr3: guest::PML4_GPA, ..Default::default() }
}

impl Fuzz {
    pub(super) fn op_run(&mut self) {
        let Some(id) = self.some_vm() else { return };
        let fd = self.pick_fd(id);
        let vcpu = self.pick_vcpu(id);
        let vi = vcpu as usize;
        let flags = if self.rng.chance(92) {
            if self.rng.chance(50) {
                abi::VMRUN_NO_WAIT
            } else {
                0
            }
        } else {
            self.rng.next() as u32 | 2
        };
        let r0 = self.rng.next();
        let slice = self.rng.pick(&[0, 0, 1, 1000, 100_000, 4_000_000, u64::MAX, r0]);
        let pending = self.vms[&id].vcpus.get(vi).and_then(|v| v.pending);
        let mut rec = ExitRecord::default();
        if self.rng.chance(25) {
            let b: Vec<u8> = (0..std::mem::size_of::<ExitRecord>()).map(|_| self.rng.next() as u8).collect();
            rec = from_bytes(&b);
        } else if pending.is_some() {
            rec.data = self.rng.next();
            rec.hc_ret = self.rng.next();
        }
        let p = if self.rng.chance(4) {
            Ptr::ReadOnly
        } else if self.rng.chance(4) {
            self.rng.pick(&BAD_PTRS)
        } else {
            Ptr::Good
        };
        let reserved0 = if self.rng.chance(4) { 1 + self.rng.below(1 << 31) as u32 } else { 0 };
        let run = VmRun { vm: self.rng.next() as u32, vcpu, flags, reserved0, slice_tsc: slice, exit: rec, ..Default::default() };
        let (addr, off) = self.arena.place(p, &bytes_of(&run), &mut self.rng);
        alarm_every(RUN_ALARM_MS);
        let r = self.ioctl(fd, ioctl::VM_RUN, addr);
        alarm_every(0);
        self.bump("runs");
        let out: Option<VmRun> = match (&r, off) {
            (Ok(_), Some(o)) => Some(from_bytes(&self.arena.read(o, std::mem::size_of::<VmRun>()))),
            _ => None,
        };
        self.log(format!(
            "VM_RUN vm{id} vcpu {vcpu} flags={flags:#x} {p:?} -> {r:?} {}",
            out.map(|o| format!("kind {} reason {} port {:#x} data {:#x} hc {:#x}", o.exit.kind, o.exit.reason, o.exit.port, o.exit.data, o.exit.hc_nr)).unwrap_or_default()
        ));
        let ro = p == Ptr::ReadOnly;
        let no_wait = flags & abi::VMRUN_NO_WAIT != 0;
        if p.bad() {
            self.want("VM_RUN through a bad pointer", &r, &[EFAULT]);
            return;
        }
        if validate::vm_run(&run).is_err() {
            self.want("VM_RUN with undefined flags or reserved bits", &r, &[EINVAL]);
            return;
        }
        let vm = &self.vms[&id];
        let done = if ro { EFAULT } else { 0 };
        if !vm.destroyed && vi >= vm.vcpus.len() {
            // Not ENOENT, which the driver reports as the VM gone.
            self.want("VM_RUN of a vCPU the VM does not have", &r, &[EINVAL]);
            return;
        }
        if vm.destroyed {
            if self.want("VM_RUN of a destroyed VM", &r, &[done]) {
                if let Some(o) = out {
                    if o.exit.kind != exit::SHUTDOWN || o.exit.reason != stop::DESTROYED {
                        self.note(format!("VM_RUN vm{id} vcpu {vcpu}: kind {} reason {}, not destroyed", o.exit.kind, o.exit.reason));
                    }
                }
            }
            return;
        }
        if let (Some((kind, reason, data)), false) = (vm.fin, vm.fin_unknown) {
            if self.want("VM_RUN of an ended VM", &r, &[done]) {
                if let Some(o) = out {
                    let x = o.exit;
                    if x.kind != kind || (kind == exit::SHUTDOWN && x.reason != reason) || (kind == exit::GUEST_EXIT && x.data != data) {
                        self.note(format!("VM_RUN vm{id}: final record kind {} reason {} data {} changed to {} {} {}", kind, reason, data, x.kind, x.reason, x.data));
                    }
                }
            }
            return;
        }
        // It enters the guest: the completion of the previous exit is delivered.
        let fin_unknown = vm.fin_unknown;
        let v = vm.vcpus[vi];
        let expect = match v.pending {
            Some(Pend::In) => Expect::Out(Some(rec.data as u8)),
            Some(Pend::MmioRead) => Expect::MmioWrite(Some(rec.data)),
            Some(Pend::Call(_)) => Expect::Out(Some(rec.hc_ret as u8)),
            None => v.expect,
        };
        let want: &[i32] = match expect {
            _ if fin_unknown => &[0, EFAULT, EINTR],
            Expect::Spin => &[EINTR],
            Expect::Halt if !no_wait => &[EINTR],
            _ if ro => &[EFAULT, EINTR],
            _ => &[0, EINTR],
        };
        self.want(&format!("VM_RUN vm{id} vcpu {vcpu} expecting {expect:?}"), &r, want);
        let vm = self.vms.get_mut(&id).unwrap();
        if !fin_unknown {
            let v = &mut vm.vcpus[vi];
            v.pending = None;
            v.expect = expect;
            v.ready = true;
        }
        match r {
            Ok(_) if !ro => self.check_record(id, vi, out.unwrap().exit, no_wait, if fin_unknown { Expect::Any } else { expect }),
            Err(EINTR) => {
                vm.fin_unknown = false;
                vm.vcpus[vi].ready = true;
            }
            _ => {
                // The record went to a read-only page: whatever happened is
                // lost, a fork's child included.
                vm.fin_unknown = vm.fin.is_none();
                vm.vcpus[vi].expect = Expect::Any;
                vm.vcpus[vi].pending = None;
                if r.is_ok() || r == Err(EFAULT) {
                    self.adopt();
                }
            }
        }
    }

    /// Checks a RUN's exit record against what vCPU `vi` had to do, and
    /// follows it.
    pub(super) fn check_record(&mut self, id: u32, vi: usize, x: ExitRecord, no_wait: bool, expect: Expect) {
        let live = self.live() as u32;
        let vm = &self.vms[&id];
        let (mem, prog, vcpus, children, name) = (vm.mem, vm.prog, vm.vcpus.len(), vm.children, vm.name);
        let io = |write: bool| x.kind == exit::IO && x.port == 0x80 && x.size == 1 && x.is_write == write as u8;
        let mmio = |write: bool| x.kind == exit::MMIO && x.addr == mem + 0x100 && x.size == 8 && x.is_write == write as u8;
        let ok = match expect {
            Expect::Exit42 => x.kind == exit::GUEST_EXIT && x.data == 42,
            Expect::Halt => no_wait && x.kind == exit::HLT,
            Expect::Spin => false,
            Expect::Shutdown(r) => x.kind == exit::SHUTDOWN && r.is_none_or(|r| x.reason == r),
            Expect::In => io(false),
            Expect::Out(b) => io(true) && b.is_none_or(|b| x.data == b as u64),
            Expect::MmioRead => mmio(false),
            Expect::MmioWrite(v) => mmio(true) && v.is_none_or(|v| x.data == v),
            Expect::Call(nr) => x.kind == exit::HYPERCALL && x.hc_nr == nr,
            Expect::ForkCall => {
                let err = if vcpus != 1 {
                    Some(EINVAL)
                } else if children >= abi::VM_MAX_CHILDREN {
                    Some(EAGAIN)
                } else if live >= abi::MAX_VMS {
                    Some(ENOSPC)
                } else {
                    None
                };
                match err {
                    Some(e) => io(true) && x.data == (-(e as i64)) as u8 as u64,
                    None => x.kind == exit::HYPERCALL && x.hc_nr == abi::ghc::FORK,
                }
            }
            Expect::Any => {
                matches!(x.kind, exit::IO | exit::MMIO | exit::GUEST_EXIT | exit::HYPERCALL | exit::SHUTDOWN) || (x.kind == exit::HLT && no_wait)
            }
        };
        *self.count.entry(match x.kind {
            exit::IO => "exits: port",
            exit::MMIO => "exits: mmio",
            exit::HLT => "exits: hlt",
            exit::GUEST_EXIT => "exits: guest exit",
            exit::HYPERCALL => "exits: hypercall",
            exit::SHUTDOWN => "exits: stop",
            _ => "exits: other",
        })
        .or_default() += 1;
        if !ok {
            self.note(format!(
                "VM_RUN vm{id} vcpu {vi} ({prog:?}): expected {expect:?}, got kind {} reason {} port {:#x} size {} write {} addr {:#x} data {:#x} hc_nr {:#x}",
                x.kind, x.reason, x.port, x.size, x.is_write, x.addr, x.data, x.hc_nr
            ));
        }
        let after_out = self.vms[&id].after_out();
        let vm = self.vms.get_mut(&id).unwrap();
        vm.fin_unknown = false;
        let v = &mut vm.vcpus[vi];
        v.ready = true;
        let mut next = match x.kind {
            exit::IO if x.is_write == 0 => {
                v.pending = Some(Pend::In);
                Expect::Out(None)
            }
            exit::IO if prog == Prog::Count => Expect::Out(Some((x.data as u8).wrapping_add(1))),
            exit::IO => after_out,
            exit::MMIO if x.is_write == 0 => {
                v.pending = Some(Pend::MmioRead);
                Expect::MmioWrite(None)
            }
            exit::MMIO => Expect::MmioRead,
            exit::HLT => Expect::Halt,
            exit::HYPERCALL => {
                v.pending = Some(Pend::Call(x.hc_nr));
                Expect::Out(None)
            }
            _ => Expect::Any,
        };
        if !ok || prog == Prog::Unknown {
            next = Expect::Any;
        }
        v.expect = next;
        if matches!(x.kind, exit::GUEST_EXIT | exit::SHUTDOWN) {
            vm.fin = Some((x.kind, x.reason, x.data));
        }
        if x.kind == exit::HYPERCALL && x.hc_nr == abi::ghc::FORK {
            // The driver put a descriptor for the child in this process.
            let (child, cfd) = (x.hc_args[0] as u32, x.hc_args[1] as i64);
            if cfd < 0 || cfd > i32::MAX as i64 {
                self.note(format!("guest fork of vm{id}: no descriptor for child vm{child}: {cfd}"));
                return;
            }
            if self.vms.contains_key(&child) || self.gone.contains(&child) {
                self.note(format!("guest fork of vm{id}: child id {child} is not new"));
            }
            let mut c = VmM::new(child, cfd as i32, mem, 1, id, name);
            c.prog = prog;
            c.vcpus[0].expect = if prog == Prog::Fork { Expect::Out(Some(0)) } else { Expect::Any };
            c.vcpus[0].snap = true;
            self.vms.get_mut(&id).unwrap().children += 1;
            self.vms.insert(child, c);
            self.bump("guest forks");
            self.max_live = self.max_live.max(self.live());
        }
    }

    /// The state a fork's child starts from, for one vCPU of the parent.
    pub(super) fn child_vcpu(pv: &VcpuM) -> VcpuM {
        let expect = if !pv.ready {
            pv.expect
        } else {
            match pv.pending {
                None => pv.expect,
                // The completion stays with the parent: the child's
                // IN has whatever AL held, its MMIO load runs again, and its
                // hypercall returns the number it was called with.
                Some(Pend::In) => Expect::Out(None),
                Some(Pend::MmioRead) => Expect::MmioRead,
                Some(Pend::Call(nr)) => Expect::Out(Some(nr as u8)),
            }
        };
        VcpuM { ready: false, snap: pv.ready || pv.snap, expect, pending: None }
    }

    pub(super) fn op_fork(&mut self) {
        let Some(id) = self.some_vm() else { return };
        if self.live() >= 2 * LIVE_CAP {
            return self.op_close();
        }
        let fd = self.pick_fd(id);
        let mut f = VmFork { vm: self.rng.next() as u32, child: self.rng.next() as u32, tsc: self.rng.next(), ..Default::default() };
        match self.rng.below(20) {
            0 => f.flags = abi::FORK_COPY,
            1 => f.flags = 2 + self.rng.below(1000) as u32,
            2 => f.reserved0 = 1 + self.rng.below(1000) as u32,
            _ => {}
        }
        let p = self.ptr(10);
        let (addr, off) = self.arena.place(p, &bytes_of(&f), &mut self.rng);
        let r = self.ioctl(fd, ioctl::VM_FORK, addr);
        self.log(format!("VM_FORK vm{id} flags={:#x} {p:?} -> {r:?}", f.flags));
        let vm = &self.vms[&id];
        let live = self.live() as u32;
        let want: &[i32] = if p.bad() {
            &[EFAULT]
        } else if validate::vm_fork(&f).is_err() {
            &[EINVAL]
        } else if vm.destroyed {
            &[ENOENT]
        } else if vm.fin_unknown {
            &[0, EFAULT, EINVAL, EAGAIN]
        } else if vm.fin.is_some() {
            &[EINVAL]
        } else if vm.children >= abi::VM_MAX_CHILDREN {
            &[EAGAIN]
        } else if live >= abi::MAX_VMS {
            &[ENOSPC]
        } else if p == Ptr::ReadOnly {
            &[EFAULT]
        } else {
            &[0]
        };
        self.want("VM_FORK", &r, want);
        if p == Ptr::ReadOnly {
            self.adopt();
            return;
        }
        let Ok(cfd) = r else { return };
        let out: VmFork = from_bytes(&self.arena.read(off.unwrap(), std::mem::size_of::<VmFork>()));
        if out.vm != id || out.child == 0 || self.vms.contains_key(&out.child) || self.gone.contains(&out.child) {
            self.note(format!("VM_FORK of vm{id} wrote back vm {} child {}", out.vm, out.child));
            return;
        }
        self.adopt_child(id, out.child, cfd as i32);
        self.bump(if f.flags == abi::FORK_COPY { "host forks (full copy)" } else { "host forks" });
    }

    /// Takes in the child `child` (descriptor `cfd`) that a fork of `id`
    /// gave: it has its parent's memory, program and vCPUs.
    pub(super) fn adopt_child(&mut self, id: u32, child: u32, cfd: i32) {
        let vm = &self.vms[&id];
        let mut c = VmM::new(child, cfd, vm.mem, vm.vcpus.len() as u32, id, vm.name);
        c.prog = vm.prog;
        c.vcpus = vm.vcpus.iter().map(Self::child_vcpu).collect();
        self.vms.get_mut(&id).unwrap().children += 1;
        self.vms.insert(child, c);
        self.max_live = self.max_live.max(self.live());
    }

}
