//! The operations on `/dev/uxen` and on VM descriptors, one call each, but
//! RUN and FORK (`run.rs`) and the races (`races.rs`).

use super::*;

impl Fuzz {
    pub(super) fn op_create(&mut self) {
        if self.live() >= LIVE_CAP || self.rng.chance(30) {
            // Invalid on purpose: each field broken in turn, or all random.
            let mut c = VmCreate { mem_bytes: 2 * MIB, vcpus: 1, ..Default::default() };
            match self.rng.below(10) {
                0 => c.mem_bytes = 0,
                1 => c.mem_bytes = self.rng.pick(&[3 * MIB, 2 * MIB + 4096, 1, 4095]),
                2 => c.mem_bytes = self.rng.pick(&[abi::VM_MAX_MEM + 2 * MIB, !(2 * MIB - 1), 1 << 63]),
                3 => c.vcpus = 0,
                4 => c.vcpus = self.rng.pick(&[abi::VM_MAX_VCPUS + 1, u32::MAX, 64]),
                5 => c.flags = 2 + self.rng.below(u32::MAX as u64 - 2) as u32,
                6 => c.tsc_khz = 1 + self.rng.below(1000) as u32,
                _ => {
                    let b: Vec<u8> = (0..std::mem::size_of::<VmCreate>()).map(|_| self.rng.next() as u8).collect();
                    c = from_bytes(&b);
                    // Keep any accident valid-but-huge small enough to run.
                    if self.live() >= LIVE_CAP {
                        c.flags |= 2;
                    }
                }
            }
            let p = self.ptr(10);
            if let Some(id) = self.create(c, p) {
                let mem = self.vms[&id].mem;
                let vcpus = self.vms[&id].vcpus.len() as u32;
                let prog = if mem <= (1 << 30) { self.random_prog(mem, vcpus) } else { Prog::None };
                self.program(id, prog);
            }
            return;
        }
        if self.rng.chance(90) {
            self.create_valid(None);
            return;
        }
        // Valid, through a hostile pointer, or big: 1 GiB, 4 GiB, 8 vCPUs.
        let mut c = VmCreate { mem_bytes: 2 * MIB, vcpus: 1, ..Default::default() };
        c.name = [0xff; abi::VM_NAME_LEN];
        match self.rng.below(3) {
            0 => c.mem_bytes = self.rng.pick(&[1 << 30, abi::VM_MAX_MEM]),
            1 => c.vcpus = abi::VM_MAX_VCPUS,
            _ => {}
        }
        let p = self.ptr(40);
        if let Some(id) = self.create(c, p) {
            let prog = self.rng.pick(&[Prog::None, Prog::Exit42, Prog::Io, Prog::Halt]);
            self.program(id, prog);
        }
    }

    pub(super) fn op_version(&mut self) {
        let p = self.ptr(15);
        let junk: Vec<u8> = (0..std::mem::size_of::<abi::IocVersion>()).map(|_| self.rng.next() as u8).collect();
        let (addr, off) = self.arena.place(p, &junk, &mut self.rng);
        let fd = self.ctl_fd();
        let r = self.ioctl(fd, ioctl::VERSION, addr);
        self.log(format!("VERSION {p:?} -> {r:?}"));
        let want = if p.bad() || p == Ptr::ReadOnly { EFAULT } else { 0 };
        if self.want("VERSION", &r, &[want]) && r.is_ok() {
            let v: abi::IocVersion = from_bytes(&self.arena.read(off.unwrap(), std::mem::size_of::<abi::IocVersion>()));
            if v.hv_active != 1 || v.driver_abi != abi::ABI_REVISION || v.image_abi != abi::ABI_REVISION || v.num_cpus == 0 {
                self.note(format!("VERSION says active {} ABI {}/{} on {} CPUs", v.hv_active, v.driver_abi, v.image_abi, v.num_cpus));
            }
        }
    }

    /// A user buffer for the driver to write `len` bytes to: good, or not.
    pub(super) fn out_buf(&mut self, len: usize) -> (u64, bool) {
        match self.rng.below(10) {
            0 => (self.arena.ro(), false),
            1 => (self.arena.addr(RW_PAGES * PAGE - len / 2), false),
            2 => {
                let p = self.rng.pick(&BAD_PTRS);
                (self.arena.place(p, &[0u8; 16], &mut self.rng).0, false)
            }
            _ => (self.arena.addr(DATA_OFF), true),
        }
    }

    pub(super) fn op_stats(&mut self) {
        let size = std::mem::size_of::<abi::HvStats>() as u64;
        let (len, len_ok) = match self.rng.below(6) {
            0 => (self.rng.pick(&[0, 8, 88, size - 1]), false),
            1 => (self.rng.pick(&[size + 1, u64::MAX, 1 << 40]), true),
            _ => (size, true),
        };
        let (buf, buf_ok) = self.out_buf(size as usize);
        let p = self.ptr(10);
        let (addr, _) = self.arena.place(p, &bytes_of(&IocBuf { ptr: buf, len }), &mut self.rng);
        let fd = self.ctl_fd();
        let r = self.ioctl(fd, ioctl::STATS, addr);
        self.log(format!("STATS len={len} buf_ok={buf_ok} {p:?} -> {r:?}"));
        let want = if p.bad() {
            EFAULT
        } else if !len_ok {
            EINVAL
        } else if !buf_ok {
            EFAULT
        } else {
            0
        };
        if self.want("STATS", &r, &[want]) && r.is_ok() && r != Ok(size as i64) {
            self.note(format!("STATS returned {r:?}, not {size}"));
        }
    }

    pub(super) fn op_list(&mut self) {
        let size = std::mem::size_of::<VmInfo>() as u64;
        let len = match self.rng.below(6) {
            0 => 0,
            1 => self.rng.below(size),
            2 => self.rng.pick(&[u64::MAX, 1 << 40, size * 1024 + 7]),
            _ => size * (1 + self.rng.below(64)),
        };
        let n = (len / size).min(abi::MAX_VMS as u64);
        // The driver writes the records it has, at most `n`.
        let written = n.min(self.live() as u64) * size;
        let (buf, buf_ok) = self.out_buf(written as usize);
        let p = self.ptr(10);
        let (addr, _) = self.arena.place(p, &bytes_of(&IocBuf { ptr: buf, len }), &mut self.rng);
        let fd = self.ctl_fd();
        let r = self.ioctl(fd, ioctl::LIST, addr);
        self.log(format!("LIST len={len} buf_ok={buf_ok} {p:?} -> {r:?}"));
        let live = self.live() as u64;
        let writes = n.min(live) > 0;
        let want = if p.bad() || (writes && !buf_ok) { EFAULT } else { 0 };
        if self.want("LIST", &r, &[want]) && r.is_ok() && r != Ok(live as i64) {
            self.note(format!("LIST counted {r:?} VMs, the model {live}"));
        }
    }

    pub(super) fn op_destroy(&mut self) {
        let live: Vec<u32> = self.vms.values().filter(|v| !v.destroyed).map(|v| v.id).collect();
        let dead: Vec<u32> = self.vms.values().filter(|v| v.destroyed).map(|v| v.id).collect();
        let id = match self.rng.below(10) {
            0..=5 if !live.is_empty() => self.rng.pick(&live),
            6 if !dead.is_empty() => self.rng.pick(&dead),
            _ => self.gone_id(),
        };
        let p = self.ptr(8);
        let reserved0 = if self.rng.chance(8) { 1 + self.rng.below(1 << 31) as u32 } else { 0 };
        let v = VmId { id, reserved0 };
        let (addr, _) = self.arena.place(p, &bytes_of(&v), &mut self.rng);
        let fd = self.ctl_fd();
        let r = self.ioctl(fd, ioctl::DESTROY, addr);
        self.log(format!("DESTROY vm{id} reserved0={reserved0:#x} {p:?} -> {r:?}"));
        let is_live = live.contains(&id) && validate::vm_id(&v).is_ok();
        let want = if p.bad() {
            EFAULT
        } else if validate::vm_id(&v).is_err() {
            EINVAL
        } else if is_live {
            0
        } else {
            ENOENT
        };
        self.want("DESTROY", &r, &[want]);
        if r.is_ok() && is_live {
            self.vm_gone(id);
            let vm = self.vms.get_mut(&id).unwrap();
            vm.destroyed = true;
            self.bump("VMs destroyed");
            if self.live() == 0 {
                self.check("last VM destroyed");
            }
        }
    }

    pub(super) fn op_merge(&mut self) {
        let live: Vec<u32> = self.vms.values().filter(|v| !v.destroyed).map(|v| v.id).collect();
        let vm = match self.rng.below(10) {
            0..=5 => 0,
            6..=8 if !live.is_empty() => self.rng.pick(&live),
            _ => self.gone_id(),
        };
        let flags = if self.rng.chance(90) { 0 } else { 1 + self.rng.below(0xffff) as u32 };
        let m = abi::MergeScan { vm, flags, scanned: self.rng.next(), ..Default::default() };
        let p = self.ptr(10);
        let (addr, off) = self.arena.place(p, &bytes_of(&m), &mut self.rng);
        let fd = self.ctl_fd();
        let r = self.ioctl(fd, ioctl::MERGE, addr);
        self.log(format!("MERGE vm{vm} flags={flags:#x} {p:?} -> {r:?}"));
        let want = p.errno(&[(flags != 0, EINVAL), (vm != 0 && !live.contains(&vm), ENOENT)]);
        if self.want("MERGE", &r, &[want]) && r.is_ok() {
            self.bump("merge passes");
            let out: abi::MergeScan = from_bytes(&self.arena.read(off.unwrap(), std::mem::size_of::<abi::MergeScan>()));
            if out.merged + out.zero > out.scanned {
                self.note(format!("MERGE: {} merged + {} zero > {} scanned", out.merged, out.zero, out.scanned));
            }
        }
    }

    /// DEBUG_POOL: taking the pool's free frames back at any time; requests
    /// it does not define. (Donations are left out: a pool that holds
    /// frames with no VM is what the checks look for.)
    pub(super) fn op_pool(&mut self) {
        let mut d = abi::DebugPool { op: abi::DEBUG_POOL_RECLAIM, pages: 0, base: self.rng.next() };
        let valid = match self.rng.below(5) {
            0 => {
                d.op = abi::DEBUG_POOL_DONATE;
                d.pages = self.rng.pick(&[0, 513, u32::MAX]);
                false
            }
            1 => {
                d.pages = 1 + self.rng.below(1000) as u32;
                false
            }
            2 => {
                d.op = self.rng.pick(&[0, 3, u32::MAX]);
                false
            }
            _ => true,
        };
        let p = self.ptr(10);
        let (addr, _) = self.arena.place(p, &bytes_of(&d), &mut self.rng);
        let fd = self.ctl_fd();
        let r = self.ioctl(fd, ioctl::DEBUG_POOL, addr);
        self.log(format!("DEBUG_POOL op {} pages {} {p:?} -> {r:?}", d.op, d.pages));
        let want = if !self.debug { libc::EPERM } else { p.errno(&[(!valid, EINVAL)]) };
        self.want("DEBUG_POOL", &r, &[want]);
    }

    pub(super) fn op_translate(&mut self) {
        let id = self.some_vm();
        let (vm, live, mem) = match id {
            Some(id) if self.rng.chance(85) => (id, !self.vms[&id].destroyed, self.vms[&id].mem),
            _ => (self.gone_id(), false, 0),
        };
        let gpa = match self.rng.below(6) {
            0 => CODE_GPA + self.rng.below(64),
            1 => SCRATCH_GPA + self.rng.below(16 * PAGE as u64),
            2 => mem + self.rng.below(1 << 30),
            3 => self.rng.pick(&[u64::MAX, 1 << 52, 1 << 63]),
            _ => self.rng.below(mem.max(1)),
        };
        let reserved0 = if self.rng.chance(8) { 1 + self.rng.below(1 << 31) as u32 } else { 0 };
        let t = abi::DebugTranslate { vm, reserved0, gpa, hpa: self.rng.next() };
        let p = self.ptr(10);
        let (addr, off) = self.arena.place(p, &bytes_of(&t), &mut self.rng);
        let fd = self.ctl_fd();
        let r = self.ioctl(fd, ioctl::DEBUG_TRANSLATE, addr);
        self.log(format!("DEBUG_TRANSLATE vm{vm} gpa={gpa:#x} {p:?} -> {r:?}"));
        let want = if !self.debug {
            libc::EPERM
        } else if p.bad() {
            EFAULT
        } else if validate::debug_translate(&t).is_err() {
            EINVAL
        } else if !live {
            ENOENT
        } else if p == Ptr::ReadOnly || gpa >= mem {
            // Beyond its memory a VM has no frames to show.
            EFAULT
        } else {
            0
        };
        if self.want("DEBUG_TRANSLATE", &r, &[want]) && r.is_ok() {
            let out: abi::DebugTranslate = from_bytes(&self.arena.read(off.unwrap(), 24));
            let bad = out.hpa != 0 && (out.hpa & 0xfff != gpa & 0xfff || gpa >= mem);
            if bad || out.vm != vm || out.gpa != gpa {
                self.note(format!("DEBUG_TRANSLATE vm{vm} gpa {gpa:#x} (memory {mem:#x}) gave hpa {:#x}", out.hpa));
            }
        }
    }

    pub(super) fn op_load(&mut self) {
        let Some(id) = self.some_vm() else { return };
        let fd = self.pick_fd(id);
        let (mem, destroyed) = (self.vms[&id].mem, self.vms[&id].destroyed);
        let max_data = (RW_PAGES - 1) * PAGE;
        // (gpa, len, data address, what happens)
        enum Want {
            Ok,
            Inval,
            /// The data or the guest range is bad; chunks before it load.
            Fault,
        }
        let content = self.rng.below(4);
        let fill: Vec<u8> = match content {
            0 => vec![0; max_data],
            1 => self.shared_page.repeat(max_data / PAGE),
            2 => vec![0x55; max_data],
            _ => (0..max_data).map(|_| self.rng.next() as u8).collect(),
        };
        self.arena.write(DATA_OFF, &fill);
        let data_good = self.arena.addr(DATA_OFF);
        let scratch_len = |r: &mut Rng| 1 + r.below(16 * PAGE as u64);
        let (gpa, len, data, w) = match self.rng.below(12) {
            0 => (SCRATCH_GPA, 0, data_good, Want::Inval),
            1 => (SCRATCH_GPA, self.rng.pick(&[abi::VM_MAX_MEM + 1, u64::MAX]), data_good, Want::Inval),
            2 => (u64::MAX - self.rng.below(4096), 4096 + self.rng.below(4096), data_good, Want::Inval),
            3 => (mem + self.rng.below(1 << 20), 1 + self.rng.below(4096), data_good, Want::Fault),
            4 => (mem - 2048, 4096, data_good, Want::Fault),
            5 => {
                let p = self.rng.pick(&BAD_PTRS);
                let a = self.arena.place(p, &[0u8; 8], &mut self.rng).0;
                let a = if p == Ptr::Straddle { self.arena.addr(RW_PAGES * PAGE - 100) } else { a };
                (SCRATCH_GPA, 200 + self.rng.below(8000), a, Want::Fault)
            }
            // Longer than the data: the copy stops at the guard page.
            6 => (SCRATCH_GPA, self.rng.pick(&[1 << 30, 200 * PAGE as u64]), data_good, Want::Fault),
            7 => {
                let l = 1 + self.rng.below(PAGE as u64);
                self.arena.set_ro(&fill[..PAGE]);
                (SCRATCH_GPA + self.rng.below(8) * 512, l, self.arena.ro(), Want::Ok)
            }
            // Anywhere in memory: the program may change.
            8 => {
                let l = scratch_len(&mut self.rng);
                (self.rng.below(mem - l), l, data_good, Want::Ok)
            }
            _ => {
                let l = scratch_len(&mut self.rng);
                (SCRATCH_GPA + self.rng.below(32 * PAGE as u64), l, data_good + self.rng.below(8), Want::Ok)
            }
        };
        let p = self.ptr(8);
        let l = IocLoad { gpa, data, len };
        let (addr, _) = self.arena.place(p, &bytes_of(&l), &mut self.rng);
        let r = self.ioctl(fd, ioctl::VM_LOAD, addr);
        self.log(format!("VM_LOAD vm{id} gpa={gpa:#x} len={len:#x} {p:?} -> {r:?}"));
        let reads_data = !p.bad() && !matches!(w, Want::Inval);
        let want: &[i32] = if p.bad() {
            &[EFAULT]
        } else {
            match w {
                Want::Inval => &[EINVAL],
                _ if destroyed => {
                    // Reading the first chunk fails first if the data is bad.
                    if matches!(w, Want::Fault) && gpa < mem {
                        &[EFAULT, ENOENT]
                    } else if matches!(w, Want::Fault) {
                        &[ENOENT, EFAULT]
                    } else {
                        &[ENOENT]
                    }
                }
                Want::Fault => &[EFAULT],
                Want::Ok => &[0],
            }
        };
        self.want("VM_LOAD", &r, want);
        // Did bytes land where the program lives?
        if reads_data && !destroyed {
            let end = gpa.saturating_add(len.min(max_data as u64 + PAGE as u64));
            let hits = |a: u64, b: u64| gpa < b && a < end;
            if hits(guest::GDT_GPA, guest::CMDLINE_GPA) || hits(CODE_GPA, CODE_GPA + 64) || hits(0x18_0000, 0x18_2000) {
                let vm = self.vms.get_mut(&id).unwrap();
                if vm.prog != Prog::Unknown {
                    vm.set_unknown();
                    self.bump("programs overwritten");
                }
            }
        }
    }

    pub(super) fn pick_vcpu(&mut self, id: u32) -> u32 {
        let n = self.vms[&id].vcpus.len() as u32;
        match self.rng.below(20) {
            0 => n,
            1 => self.rng.pick(&[u32::MAX, abi::VM_MAX_VCPUS, 1 << 31]),
            _ => self.rng.below(n as u64) as u32,
        }
    }

    pub(super) fn op_get_regs(&mut self) {
        let Some(id) = self.some_vm() else { return };
        let fd = self.pick_fd(id);
        let vcpu = self.pick_vcpu(id);
        let p = self.ptr(10);
        let v = VmRegs { vm: self.rng.next() as u32, vcpu, regs: Regs::default() };
        let (addr, off) = self.arena.place(p, &bytes_of(&v), &mut self.rng);
        let r = self.ioctl(fd, ioctl::VM_GET_REGS, addr);
        self.log(format!("VM_GET_REGS vm{id} vcpu {vcpu} {p:?} -> {r:?}"));
        let vm = &self.vms[&id];
        let valid = (vcpu as usize) < vm.vcpus.len();
        let want = p.errno(&[(vm.destroyed || !valid, ENOENT)]);
        // A vCPU that has run, or was forked from one that had, shows where
        // it stands; any other its initial registers.
        let (prog, ready) = (vm.prog, valid && (vm.vcpus[vcpu as usize].ready || vm.vcpus[vcpu as usize].snap));
        if self.want("VM_GET_REGS", &r, &[want]) && r.is_ok() {
            let out: VmRegs = from_bytes(&self.arena.read(off.unwrap(), std::mem::size_of::<VmRegs>()));
            let rip = out.regs.rip;
            let bad = match prog {
                Prog::Unknown => false,
                Prog::None => !ready && rip != 0,
                _ if !ready => rip != CODE_GPA,
                Prog::PtOob => false,
                _ => !(CODE_GPA..CODE_GPA + 64).contains(&rip),
            };
            if bad || out.vm != id || out.vcpu != vcpu || out.regs.cr0 & 0x8000_0001 != 0x8000_0001 {
                self.note(format!("VM_GET_REGS vm{id} vcpu {vcpu} ({prog:?}, entered {ready}): rip {rip:#x} cr0 {:#x} vm {}", out.regs.cr0, out.vm));
            }
        }
    }

    pub(super) fn op_set_regs(&mut self) {
        let Some(id) = self.some_vm() else { return };
        let fd = self.pick_fd(id);
        let vcpu = self.pick_vcpu(id);
        let (mem, prog) = (self.vms[&id].mem, self.vms[&id].prog);
        let mut regs = prog_regs(if prog == Prog::Unknown { Prog::Exit42 } else { prog }, mem);
        if prog == Prog::None {
            regs = vm_boot_regs(mem);
        }
        // 0: the program's own, 1..4: invalid, 5: valid but random.
        let kind = self.rng.below(7);
        match kind {
            1 => regs.rflags = self.rng.pick(&[1 << 17, 1 << 22, u64::MAX, 0x8000_0000_0000_0002, 2 | 1 << 3, 2 | 1 << 15]),
            2 => regs.rip = self.rng.pick(&[0x8000_0000_0000_0000, 0x0000_8000_0000_0000, 0xdead_beef_dead_beef]),
            3 => regs.cr3 = self.rng.pick(&[0x2001, 0x2fff, 1 << 52, 0xfff0_0000_0000_0000]),
            4 => {
                regs.rflags = 1 << 17;
                regs.cr3 = 7;
            }
            5 => {
                regs.rip = self.rng.next() & 0x7fff_ffff_ffff;
                regs.rsp = self.rng.next();
                regs.rax = self.rng.next();
                regs.cr0 = self.rng.next();
                regs.cr4 = self.rng.next();
                regs.efer = self.rng.next();
            }
            _ => {}
        }
        let invalid = validate::regs(&regs).is_err();
        let p = self.ptr(8);
        let v = VmRegs { vm: self.rng.next() as u32, vcpu, regs };
        let (addr, _) = self.arena.place(p, &bytes_of(&v), &mut self.rng);
        let r = self.ioctl(fd, ioctl::VM_SET_REGS, addr);
        self.log(format!("VM_SET_REGS vm{id} vcpu {vcpu} kind {kind} {p:?} -> {r:?}"));
        let vm = &self.vms[&id];
        let valid_vcpu = (vcpu as usize) < vm.vcpus.len();
        // The driver checks the registers before the hypervisor looks for
        // the vCPU.
        let want = if p.bad() {
            EFAULT
        } else if invalid {
            EINVAL
        } else if vm.destroyed || !valid_vcpu {
            ENOENT
        } else if vm.vcpus[vcpu as usize].ready || vm.vcpus[vcpu as usize].snap {
            // A forked vCPU's registers are its parent's.
            EBUSY
        } else {
            0
        };
        let want: &[i32] = if vm.fin_unknown && want == 0 { &[0, EBUSY] } else { &[want] };
        self.want("VM_SET_REGS", &r, want);
        if r.is_ok() && kind == 5 {
            self.vms.get_mut(&id).unwrap().set_unknown();
        }
    }
}


impl Fuzz {
    pub(super) fn op_vm_id(&mut self) {
        let Some(id) = self.some_vm() else { return };
        let fd = self.pick_fd(id);
        let p = self.ptr(15);
        let (addr, off) = self.arena.place(p, &[0xa5; 8], &mut self.rng);
        let r = self.ioctl(fd, ioctl::VM_ID, addr);
        self.log(format!("VM_ID fd {fd} {p:?} -> {r:?}"));
        let want = if p.bad() || p == Ptr::ReadOnly { EFAULT } else { 0 };
        if self.want("VM_ID", &r, &[want]) && r.is_ok() {
            let v: VmId = from_bytes(&self.arena.read(off.unwrap(), 8));
            if v.id != id || v.reserved0 != 0 {
                self.note(format!("VM_ID on a descriptor of vm{id} says vm{} ({})", v.id, v.reserved0));
            }
        }
    }

    /// Commands the driver does not know, or knows for the other kind of
    /// descriptor: ENOTTY, whatever the argument.
    pub(super) fn op_wrong_cmd(&mut self) {
        let vm_fd = self.some_vm().map(|id| self.pick_fd(id));
        let on_vm = vm_fd.is_some() && self.rng.chance(50);
        let fd = if on_vm { vm_fd.unwrap() } else { self.ctl_fd() };
        let cmd = loop {
            let c = match self.rng.below(5) {
                0 => {
                    if on_vm {
                        self.rng.pick(&DEV_CMDS)
                    } else {
                        self.rng.pick(&VM_CMDS)
                    }
                }
                1 => {
                    let c = self.rng.pick(&DEV_CMDS) | self.rng.pick(&VM_CMDS);
                    (c & !(0x3fff << 16)) | ((self.rng.below(0x3fff) as u32) << 16)
                }
                2 => self.rng.pick(&DEV_CMDS) ^ (self.rng.pick(&[1u32, 2, 3]) << 30),
                3 => (self.rng.pick(&VM_CMDS) & !0xff00) | ((self.rng.below(256) as u32) << 8),
                _ => self.rng.next() as u32,
            };
            let mine = if on_vm { VM_CMDS.contains(&c) } else { DEV_CMDS.contains(&c) };
            if !mine && !vfs_owned(c) {
                break c;
            }
        };
        let p = self.rng.pick(&[Ptr::Good, Ptr::Null, Ptr::Kernel, Ptr::ReadOnly]);
        let (addr, _) = self.arena.place(p, &[0u8; 64], &mut self.rng);
        let r = self.ioctl(fd, cmd, addr);
        self.log(format!("ioctl {cmd:#x} on {} -> {r:?}", if on_vm { "a VM" } else { "/dev/uxen" }));
        self.want(&format!("unknown command {cmd:#x}"), &r, &[ENOTTY]);
        self.bump("unknown commands");
    }

    /// Our commands on descriptors that are closed, never opened, or not
    /// ours.
    pub(super) fn op_bad_fd(&mut self) {
        let cmd = if self.rng.chance(50) { self.rng.pick(&DEV_CMDS) } else { self.rng.pick(&VM_CMDS) };
        let (fd, want) = match self.rng.below(4) {
            0 => (-1 - self.rng.below(1000) as i32, EBADF),
            1 => (600 + self.rng.below(400) as i32, EBADF),
            _ => (self.rng.pick(&self.others.clone()), ENOTTY),
        };
        let (addr, _) = self.arena.place(Ptr::Good, &[0u8; 200], &mut self.rng);
        let r = self.ioctl(fd, cmd, addr);
        self.log(format!("ioctl {cmd:#x} on fd {fd} -> {r:?}"));
        self.want(&format!("command {cmd:#x} on descriptor {fd}"), &r, &[want]);
    }

    /// Opens and closes `/dev/uxen`, and uses a descriptor just closed.
    pub(super) fn op_ctl(&mut self) {
        if self.ctl.len() < 4 && self.rng.chance(55) {
            let flags = self.rng.pick(&[libc::O_RDWR, libc::O_RDONLY, libc::O_WRONLY, libc::O_RDWR | libc::O_NONBLOCK]);
            self.calls += 1;
            match open_dev(flags) {
                Ok(fd) => self.ctl.push(fd),
                Err(e) => self.note(format!("open /dev/uxen: {}", errno_name(e))),
            }
            return;
        }
        if self.ctl.len() < 2 {
            return;
        }
        let i = 1 + self.rng.below(self.ctl.len() as u64 - 1) as usize;
        let fd = self.ctl.remove(i);
        close(fd);
        let cmd = self.rng.pick(&DEV_CMDS);
        let r = self.ioctl(fd, cmd, self.arena.addr(0));
        self.log(format!("ioctl {cmd:#x} on closed /dev/uxen fd {fd} -> {r:?}"));
        self.want("a command on a closed /dev/uxen descriptor", &r, &[EBADF]);
    }

    pub(super) fn op_close(&mut self) {
        let Some(id) = self.pick_vm() else { return };
        let fd = self.pick_fd(id);
        self.close_vm_fd(id, fd);
        self.bump("VM descriptors closed");
        if self.rng.chance(50) {
            let cmd = self.rng.pick(&VM_CMDS);
            let r = self.ioctl(fd, cmd, self.arena.addr(0));
            self.log(format!("ioctl {cmd:#x} on closed VM fd {fd} -> {r:?}"));
            self.want("a command on a closed VM descriptor", &r, &[EBADF]);
        }
    }

    pub(super) fn op_dup(&mut self) {
        let Some(id) = self.some_vm() else { return };
        let fd = self.pick_fd(id);
        if self.rng.chance(20) {
            // dup2 over another VM's descriptor: that one is closed first.
            let Some(other) = self.pick_vm() else { return };
            let ofd = self.pick_fd(other);
            if ofd == fd {
                return;
            }
            // SAFETY: both are descriptors of this process.
            let r = unsafe { libc::dup2(fd, ofd) };
            if r != ofd {
                self.note(format!("dup2({fd}, {ofd}): {}", errno_name(E())));
                return;
            }
            self.fd_dropped(other, ofd);
            if let Some(v) = self.vms.get_mut(&id) {
                v.fds.push(ofd);
            }
            self.bump("dup2 over a VM descriptor");
            return;
        }
        // SAFETY: duplicating a descriptor of this process.
        let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if n < 0 {
            self.note(format!("dup({fd}): {}", errno_name(E())));
            return;
        }
        self.vms.get_mut(&id).unwrap().fds.push(n);
        self.bump("VM descriptors duplicated");
    }

    /// read, write, mmap and fsync on our descriptors: none is defined.
    pub(super) fn op_syscalls(&mut self) {
        // Descriptors opened read-write: a read-only or write-only one would
        // answer EBADF first.
        let fd = match self.some_vm() {
            Some(id) if self.rng.chance(60) => self.pick_fd(id),
            _ => self.ctl[0],
        };
        let buf = self.arena.addr(0) as *mut libc::c_void;
        let (what, r, want) = match self.rng.below(4) {
            // SAFETY: reads into / writes from the arena's first page.
            0 => ("read", unsafe { libc::read(fd, buf, 64) } as i64, EINVAL),
            // SAFETY: as above.
            1 => ("write", unsafe { libc::write(fd, buf, 64) } as i64, EINVAL),
            2 => {
                // SAFETY: a new mapping, unmapped at once if it is made.
                let p = unsafe { libc::mmap(std::ptr::null_mut(), PAGE, libc::PROT_READ, libc::MAP_SHARED, fd, 0) };
                if p != libc::MAP_FAILED {
                    // SAFETY: unmapping what was just mapped.
                    unsafe { libc::munmap(p, PAGE) };
                }
                ("mmap", if p == libc::MAP_FAILED { -1 } else { 0 }, libc::ENODEV)
            }
            // SAFETY: fsync of our descriptor.
            _ => ("fsync", unsafe { libc::fsync(fd) } as i64, EINVAL),
        };
        let r = if r < 0 { Err(E()) } else { Ok(r) };
        self.count_result(&r);
        self.want(&format!("{what} on a uxen descriptor"), &r, &[want]);
    }

    /// Rewrites the program of a VM that has not run, after any forks: the
    /// children keep the old code (the write copies the shared page).
    pub(super) fn op_reprogram(&mut self) {
        let cands: Vec<u32> = self
            .vms
            .values()
            .filter(|v| {
                !v.destroyed
                    && v.parent == 0
                    && !v.entered()
                    && v.vcpus.len() == 1
                    && matches!(v.prog, Prog::Exit42 | Prog::Halt | Prog::Io | Prog::VmmCall | Prog::Spin | Prog::Ud2 | Prog::Fork | Prog::Count)
            })
            .map(|v| v.id)
            .collect();
        if cands.is_empty() {
            return;
        }
        let id = self.rng.pick(&cands);
        let prog = self.rng.pick(&[Prog::Exit42, Prog::Halt, Prog::Io, Prog::VmmCall, Prog::Spin, Prog::Ud2, Prog::Fork, Prog::Count]);
        let fd = self.vms[&id].fds[0];
        if self.load_ok(fd, CODE_GPA, &code(prog)) {
            let vm = self.vms.get_mut(&id).unwrap();
            vm.prog = prog;
            vm.vcpus[0].expect = first_expect(prog);
            self.bump("programs replaced");
        }
    }
}
