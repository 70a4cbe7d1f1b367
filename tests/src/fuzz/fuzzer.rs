//! The fuzzer's state and the model's upkeep: descriptors, VMs, the checks
//! of the list and the pool against the model, and loading programs.
//!
//! Random commands avoid the ioctl numbers the kernel handles itself
//! before the driver sees them (fs/ioctl.c, do_vfs_ioctl).

use super::*;

pub(super) fn vfs_owned(cmd: u32) -> bool {
    matches!((cmd >> 8) & 0xff, 0x00 | 0x15 | 0x54 | 0x58 | 0x66 | 0x94)
}

pub(super) const DEV_CMDS: [u32; 8] =
    [ioctl::VERSION, ioctl::STATS, ioctl::CREATE_VM, ioctl::LIST, ioctl::DESTROY, ioctl::MERGE, ioctl::DEBUG_TRANSLATE, ioctl::DEBUG_POOL];
pub(super) const VM_CMDS: [u32; 7] = [ioctl::VM_LOAD, ioctl::VM_GET_REGS, ioctl::VM_SET_REGS, ioctl::VM_RUN, ioctl::VM_FORK, ioctl::VM_ID, ioctl::VM_IRQ];

pub(super) type Res = std::result::Result<i64, i32>;

/// Live VMs the generator aims to keep at most (children may double it).
pub(super) const LIVE_CAP: usize = 24;
/// Calls between two full checks of the list and the pool.
pub(super) const CHECK_EVERY: u64 = 250;
/// Period of the SIGALRM that interrupts a RUN, in milliseconds.
pub(super) const RUN_ALARM_MS: u64 = 15;

pub(super) const EFAULT: i32 = libc::EFAULT;
pub(super) const EINVAL: i32 = libc::EINVAL;
pub(super) const ENOENT: i32 = libc::ENOENT;
pub(super) const ENOTTY: i32 = libc::ENOTTY;
pub(super) const EBADF: i32 = libc::EBADF;
pub(super) const EBUSY: i32 = libc::EBUSY;
pub(super) const EINTR: i32 = libc::EINTR;
pub(super) const EAGAIN: i32 = libc::EAGAIN;
pub(super) const ENOSPC: i32 = libc::ENOSPC;

pub(super) struct Fuzz {
    pub(super) rng: Rng,
    pub(super) arena: Arena,
    /// Open `/dev/uxen` descriptors; the first stays open throughout.
    pub(super) ctl: Vec<i32>,
    /// Descriptors of files that are not ours.
    pub(super) others: Vec<i32>,
    pub(super) vms: BTreeMap<u32, VmM>,
    /// Ids of VMs that no longer exist.
    pub(super) gone: Vec<u32>,
    pub(super) debug: bool,
    pub(super) verbose: bool,
    pub(super) calls: u64,
    pub(super) ok: u64,
    pub(super) errnos: BTreeMap<i32, u64>,
    pub(super) mismatches: u64,
    pub(super) trace: Vec<String>,
    pub(super) count: BTreeMap<&'static str, u64>,
    pub(super) max_live: usize,
    pub(super) next_check: u64,
    /// A page of random bytes that loads repeat, for the merges to find.
    pub(super) shared_page: Vec<u8>,
    /// Operations to run (empty: all) and to leave out.
    pub(super) only: Vec<String>,
    pub(super) skip: Vec<String>,
}

pub(super) fn vm_info_name(n: &[u8; abi::VM_NAME_LEN]) -> String {
    String::from_utf8_lossy(abi::cstr_bytes(n)).into_owned()
}

impl Fuzz {
    pub(super) fn new(seed: u64, verbose: bool) -> std::result::Result<Fuzz, String> {
        let ctl = open_dev(libc::O_RDWR).map_err(|e| format!("cannot open /dev/uxen: {}", errno_name(e)))?;
        // SAFETY: opening paths given as NUL-terminated strings.
        let others = unsafe {
            [libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC), libc::open(c"/proc/self/stat".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC)]
        };
        let debug = std::fs::read_to_string("/sys/module/uxen/parameters/debug").map(|s| s.trim() == "Y").unwrap_or(false);
        let mut rng = Rng::new(seed);
        let shared_page = (0..PAGE).map(|_| rng.next() as u8).collect();
        let mut f = Fuzz {
            rng,
            arena: Arena::new()?,
            ctl: vec![ctl],
            others: others.to_vec(),
            vms: BTreeMap::new(),
            gone: Vec::new(),
            debug,
            verbose,
            calls: 0,
            ok: 0,
            errnos: BTreeMap::new(),
            mismatches: 0,
            trace: Vec::new(),
            count: BTreeMap::new(),
            max_live: 0,
            next_check: CHECK_EVERY,
            shared_page,
            only: Vec::new(),
            skip: Vec::new(),
        };
        let n = f.list().map(|l| l.len()).unwrap_or(usize::MAX);
        if n != 0 {
            return Err(format!("the fuzzer needs a machine without VMs; LIST says {n}"));
        }
        Ok(f)
    }

    pub(super) fn enabled(&self, op: &str) -> bool {
        (self.only.is_empty() || self.only.iter().any(|o| o == op)) && !self.skip.iter().any(|o| o == op)
    }

    pub(super) fn bump(&mut self, what: &'static str) {
        *self.count.entry(what).or_default() += 1;
    }

    pub(super) fn log(&mut self, s: String) {
        if self.verbose {
            println!("ioctl-fuzz: [{}] {s}", self.calls);
        }
        self.trace.push(s);
        if self.trace.len() > 24 {
            self.trace.remove(0);
        }
    }

    pub(super) fn note(&mut self, msg: String) {
        self.mismatches += 1;
        if self.mismatches <= 40 {
            println!("ioctl-fuzz: MISMATCH at call {}: {msg}", self.calls);
            let n = if self.mismatches == 1 { self.trace.len() } else { 1 };
            for t in &self.trace[self.trace.len() - n.min(self.trace.len())..] {
                println!("ioctl-fuzz:   after: {t}");
            }
        }
    }

    pub(super) fn count_result(&mut self, r: &Res) {
        self.calls += 1;
        match r {
            Ok(_) => self.ok += 1,
            Err(e) => *self.errnos.entry(*e).or_default() += 1,
        }
    }

    pub(super) fn ioctl(&mut self, fd: i32, cmd: u32, arg: u64) -> Res {
        let r = raw_ioctl(fd, cmd, arg);
        self.count_result(&r);
        r
    }

    /// Checks `r` against `want` (0 for success, else errno values).
    pub(super) fn want(&mut self, what: &str, r: &Res, want: &[i32]) -> bool {
        let got = match r {
            Ok(_) => 0,
            Err(e) => *e,
        };
        if want.contains(&got) {
            return true;
        }
        let names: Vec<String> = want.iter().map(|&w| if w == 0 { "ok".to_string() } else { errno_name(w) }).collect();
        self.note(format!("{what}: got {} want {}", if got == 0 { "ok".to_string() } else { errno_name(got) }, names.join("|")));
        false
    }

    pub(super) fn live(&self) -> usize {
        self.vms.values().filter(|v| !v.destroyed).count()
    }

    pub(super) fn ctl_fd(&mut self) -> i32 {
        let i = self.rng.below(self.ctl.len() as u64) as usize;
        self.ctl[i]
    }

    /// A pointer kind: bad `bad` percent of the time (read-only included).
    pub(super) fn ptr(&mut self, bad: u64) -> Ptr {
        if self.rng.chance(bad) {
            if self.rng.chance(20) {
                Ptr::ReadOnly
            } else {
                self.rng.pick(&BAD_PTRS)
            }
        } else if self.rng.chance(20) {
            Ptr::Misaligned
        } else {
            Ptr::Good
        }
    }

    pub(super) fn pick_vm(&mut self) -> Option<u32> {
        if self.vms.is_empty() {
            return None;
        }
        let i = self.rng.below(self.vms.len() as u64) as usize;
        self.vms.keys().nth(i).copied()
    }

    /// A VM, creating one with a program if there is none.
    pub(super) fn some_vm(&mut self) -> Option<u32> {
        if self.vms.is_empty() || (self.live() == 0 && self.rng.chance(50)) {
            self.create_valid(None);
        }
        self.pick_vm()
    }

    pub(super) fn pick_fd(&mut self, id: u32) -> i32 {
        let fds = &self.vms[&id].fds;
        fds[self.rng.below(fds.len() as u64) as usize]
    }

    pub(super) fn gone_id(&mut self) -> u32 {
        if !self.gone.is_empty() && self.rng.chance(50) {
            let i = self.rng.below(self.gone.len() as u64) as usize;
            return self.gone[i];
        }
        self.rng.pick(&[0, u32::MAX, 0x7fff_ffff, 1 << 20])
    }

    // --- Model upkeep -----------------------------------------------------

    /// The hypervisor drops VM `id`: its parent has one live child less.
    pub(super) fn vm_gone(&mut self, id: u32) {
        let parent = self.vms[&id].parent;
        if let Some(p) = self.vms.get_mut(&parent) {
            if !p.destroyed {
                p.children = p.children.saturating_sub(1);
            }
        }
    }

    /// Descriptor `fd` of VM `id` no longer refers to it (closed, or
    /// replaced by `dup2`).
    pub(super) fn fd_dropped(&mut self, id: u32, fd: i32) {
        let vm = self.vms.get_mut(&id).unwrap();
        vm.fds.retain(|&f| f != fd);
        if vm.fds.is_empty() {
            let destroyed = vm.destroyed;
            if !destroyed {
                self.vm_gone(id);
            }
            self.vms.remove(&id);
            self.gone.push(id);
            self.bump("vms released");
            if self.live() == 0 {
                self.check("last VM released");
            }
        }
    }

    pub(super) fn close_vm_fd(&mut self, id: u32, fd: i32) {
        close(fd);
        self.fd_dropped(id, fd);
    }

    pub(super) fn owner_of(&self, fd: i32) -> Option<u32> {
        self.vms.values().find(|v| v.fds.contains(&fd)).map(|v| v.id)
    }

    /// Takes in VM descriptors the driver installed but whose number never
    /// reached us (a copy-out to a read-only argument failed).
    pub(super) fn adopt(&mut self) -> usize {
        let mut found = Vec::new();
        if let Ok(rd) = std::fs::read_dir("/proc/self/fd") {
            for e in rd.flatten() {
                let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
                let Ok(link) = std::fs::read_link(e.path()) else { continue };
                if link.to_string_lossy() == "anon_inode:uxen-vm" && self.owner_of(fd).is_none() {
                    found.push(fd);
                }
            }
        }
        for &fd in &found {
            let r = self.ioctl(fd, ioctl::VM_ID, self.arena.addr(0));
            if !self.want("VM_ID of an adopted descriptor", &r, &[0]) {
                continue;
            }
            let id = from_bytes::<VmId>(&self.arena.read(0, 8)).id;
            if let Some(v) = self.vms.get_mut(&id) {
                v.fds.push(fd);
                continue;
            }
            let Some(list) = self.list() else { continue };
            let Some(info) = list.iter().find(|i| i.id == id) else {
                self.note(format!("adopted descriptor {fd} names vm{id}, which LIST does not show"));
                close(fd);
                continue;
            };
            let mut vm = VmM::new(id, fd, info.mem_bytes, info.vcpus, info.parent, info.name);
            vm.set_unknown();
            vm.fin_unknown = true;
            if let Some(p) = self.vms.get_mut(&info.parent) {
                if !p.destroyed {
                    p.children += 1;
                }
            }
            self.vms.insert(id, vm);
            self.bump("descriptors adopted");
        }
        found.len()
    }

    // --- LIST and STATS, for the checks -------------------------------------

    pub(super) fn list(&mut self) -> Option<Vec<VmInfo>> {
        // Room for every VM there can be, outside the arena.
        let size = std::mem::size_of::<VmInfo>();
        let n = abi::MAX_VMS as usize;
        let mut b = vec![0u8; n * size];
        let req = IocBuf { ptr: b.as_mut_ptr() as u64, len: (n * size) as u64 };
        self.arena.write(0, &bytes_of(&req));
        let fd = self.ctl[0];
        let r = self.ioctl(fd, ioctl::LIST, self.arena.addr(0));
        if !self.want("LIST for a check", &r, &[0]) {
            return None;
        }
        let total = r.unwrap() as usize;
        Some((0..total.min(n)).map(|i| from_bytes::<VmInfo>(&b[i * size..])).collect())
    }

    pub(super) fn stats(&mut self) -> Option<Box<abi::HvStats>> {
        let size = std::mem::size_of::<abi::HvStats>();
        let req = IocBuf { ptr: self.arena.addr(DATA_OFF), len: size as u64 };
        self.arena.write(0, &bytes_of(&req));
        let fd = self.ctl[0];
        let r = self.ioctl(fd, ioctl::STATS, self.arena.addr(0));
        if !self.want("STATS for a check", &r, &[0]) {
            return None;
        }
        let b = self.arena.read(DATA_OFF, size);
        // SAFETY: `HvStats` is plain data valid for any bytes; `b` holds
        // `size` of them.
        let mut s: Box<abi::HvStats> = unsafe { Box::new_zeroed().assume_init() };
        // SAFETY: copying `size` bytes into the box's storage.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut *s as *mut abi::HvStats).cast::<u8>(), size) };
        Some(s)
    }

    /// The VM list and the pool against the model.
    pub(super) fn check(&mut self, why: &str) {
        self.bump("checks");
        let Some(list) = self.list() else { return };
        let want: Vec<u32> = self.vms.values().filter(|v| !v.destroyed).map(|v| v.id).collect();
        let got: Vec<u32> = list.iter().map(|i| i.id).collect();
        if got != want {
            self.note(format!("{why}: LIST shows {got:?}, the model {want:?}"));
        }
        for info in &list {
            let Some(vm) = self.vms.get(&info.id) else { continue };
            let mut bad = Vec::new();
            if info.parent != vm.parent {
                bad.push(format!("parent {} != {}", info.parent, vm.parent));
            }
            if info.vcpus as usize != vm.vcpus.len() || info.mem_bytes != vm.mem {
                bad.push(format!("{} vCPUs {} bytes != {} {}", info.vcpus, info.mem_bytes, vm.vcpus.len(), vm.mem));
            }
            if info.name != vm.name {
                bad.push(format!("name {:?} != {:?}", vm_info_name(&info.name), vm_info_name(&vm.name)));
            }
            if !vm.fin_unknown {
                let want_state = match vm.fin {
                    Some((exit::GUEST_EXIT, _, _)) => abi::vm_state::EXITED,
                    Some(_) => abi::vm_state::STOPPED,
                    None if vm.entered() || vm.parent != 0 => abi::vm_state::PAUSED,
                    None => abi::vm_state::CREATED,
                };
                if info.state != want_state {
                    bad.push(format!("state {} != {}", abi::vm_state::name(info.state), abi::vm_state::name(want_state)));
                }
                match vm.fin {
                    Some((exit::GUEST_EXIT, _, code)) if info.exit_code != code => bad.push(format!("exit code {} != {code}", info.exit_code)),
                    Some((exit::SHUTDOWN, reason, _)) if info.stop_reason != reason => bad.push(format!("stop reason {} != {reason}", info.stop_reason)),
                    _ => {}
                }
            }
            if !bad.is_empty() {
                self.note(format!("{why}: vm{}: {}", info.id, bad.join(", ")));
            }
        }
        let Some(s) = self.stats() else { return };
        if s.pool_frames_free > s.pool_frames_total {
            self.note(format!("{why}: pool free {} > total {}", s.pool_frames_free, s.pool_frames_total));
        }
        if s.vms as usize != list.len() {
            self.note(format!("{why}: STATS counts {} VMs, LIST {}", s.vms, list.len()));
        }
        if list.is_empty() && (s.pool_frames_total != 0 || s.pool_frames_free != 0) {
            self.note(format!("{why}: no VM left, yet the pool holds {} frames ({} free)", s.pool_frames_total, s.pool_frames_free));
        }
        if s.image_intact != 1 {
            self.note(format!("{why}: the hypervisor image no longer hashes as at start-up"));
        }
        let off = (0..s.num_cpus as usize).filter(|&i| s.cpus[i].virtualized != 1).count();
        if off != 0 {
            self.note(format!("{why}: {off} CPUs are not virtualized"));
        }
    }

    // --- Guests ---------------------------------------------------------------

    pub(super) fn load_ok(&mut self, fd: i32, gpa: u64, data: &[u8]) -> bool {
        self.arena.write(DATA_OFF, data);
        let l = IocLoad { gpa, data: self.arena.addr(DATA_OFF), len: data.len() as u64 };
        self.arena.write(0, &bytes_of(&l));
        let r = self.ioctl(fd, ioctl::VM_LOAD, self.arena.addr(0));
        self.want("VM_LOAD of a program", &r, &[0])
    }

    pub(super) fn set_regs_ok(&mut self, fd: i32, vcpu: u32, regs: Regs) -> bool {
        let v = VmRegs { vm: self.rng.next() as u32, vcpu, regs };
        self.arena.write(0, &bytes_of(&v));
        let r = self.ioctl(fd, ioctl::VM_SET_REGS, self.arena.addr(0));
        self.want("VM_SET_REGS of a program", &r, &[0])
    }

    /// Loads `prog` into a VM that has not run.
    pub(super) fn program(&mut self, id: u32, prog: Prog) {
        let (fd, mem, vcpus) = {
            let v = &self.vms[&id];
            (v.fds[0], v.mem, v.vcpus.len() as u32)
        };
        if prog != Prog::None {
            let blob = boot_blob(mem, prog == Prog::Mmio);
            // The blob may be larger than the arena's data area for the
            // biggest guests: load it in pieces.
            for (i, chunk) in blob.chunks(16 * PAGE).enumerate() {
                self.load_ok(fd, guest::GDT_GPA + (i * 16 * PAGE) as u64, chunk);
            }
            self.load_ok(fd, CODE_GPA, &code(prog));
            for v in 0..vcpus {
                self.set_regs_ok(fd, v, prog_regs(prog, mem));
            }
        }
        let vm = self.vms.get_mut(&id).unwrap();
        vm.prog = prog;
        for v in &mut vm.vcpus {
            v.expect = first_expect(prog);
            v.pending = None;
        }
    }

    pub(super) fn random_prog(&mut self, mem: u64, vcpus: u32) -> Prog {
        loop {
            let p = match self.rng.below(14) {
                0 => Prog::None,
                1 => Prog::Exit42,
                2 => Prog::Halt,
                3 | 4 => Prog::Io,
                5 => Prog::VmmCall,
                6 => Prog::Fork,
                7 => Prog::BadCall(self.rng.pick(&BAD_CALLS)),
                8 => Prog::Ud2,
                9 => Prog::Spin,
                10 => Prog::Mmio,
                11 => Prog::PtOob,
                12 => Prog::Count,
                _ => Prog::Twins,
            };
            let ok = match p {
                Prog::Mmio => mem < (1 << 30),
                Prog::Count | Prog::Twins => vcpus == 1,
                _ => true,
            };
            if ok {
                return p;
            }
        }
    }

    /// Creates a valid VM, with a program (`Some(None)`: without one).
    pub(super) fn create_valid(&mut self, prog: Option<Prog>) -> Option<u32> {
        let mem = self.rng.pick(&[2, 2, 4, 6, 8]) * MIB;
        let one = matches!(prog, Some(Prog::Count | Prog::Twins));
        let vcpus = if one || self.rng.chance(80) { 1 } else { 2 };
        let name: [u8; abi::VM_NAME_LEN] = abi::padded(format!("fz{}", self.calls).as_bytes());
        let id = self.create(VmCreate { mem_bytes: mem, vcpus, flags: 0, name, id: 0, tsc_khz: 0 }, Ptr::Good)?;
        let p = prog.unwrap_or_else(|| self.random_prog(mem, vcpus));
        self.program(id, p);
        Some(id)
    }

    /// CREATE_VM with `c` placed as `p`; returns the new VM's id if the
    /// model knows it.
    pub(super) fn create(&mut self, c: VmCreate, p: Ptr) -> Option<u32> {
        // The driver fills in the TSC rate itself and refuses a caller's.
        let valid = validate::vm_create(&c).is_ok() && c.tsc_khz == 0;
        let (addr, off) = self.arena.place(p, &bytes_of(&c), &mut self.rng);
        let fd = self.ctl_fd();
        let r = self.ioctl(fd, ioctl::CREATE_VM, addr);
        self.log(format!("CREATE_VM mem={:#x} vcpus={} flags={:#x} {p:?} -> {r:?}", c.mem_bytes, c.vcpus, c.flags));
        let want = p.errno(&[(!valid, EINVAL)]);
        if !self.want("CREATE_VM", &r, &[want]) {
            if r.is_ok() {
                // Keep the model whole: take the VM in.
                self.adopt();
            }
            return None;
        }
        if p == Ptr::ReadOnly && valid {
            // Created, but its descriptor number was not written back.
            self.adopt();
            return None;
        }
        let fd = r.ok()? as i32;
        let out: VmCreate = from_bytes(&self.arena.read(off.unwrap(), std::mem::size_of::<VmCreate>()));
        let mut name = c.name;
        name[abi::VM_NAME_LEN - 1] = 0;
        if out.id == 0 || self.vms.contains_key(&out.id) || self.gone.contains(&out.id) || out.name != name || out.mem_bytes != c.mem_bytes {
            self.note(format!("CREATE_VM wrote back id {} name {:?} mem {:#x}", out.id, vm_info_name(&out.name), out.mem_bytes));
        }
        self.bump("VMs created");
        self.vms.insert(out.id, VmM::new(out.id, fd, c.mem_bytes, c.vcpus, 0, name));
        self.max_live = self.max_live.max(self.live());
        Some(out.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn random_commands_avoid_the_vfs() {
        // FIOCLEX, FIONBIO, FIFREEZE, FS_IOC_GETFLAGS, FICLONE, FIGETBSZ.
        for c in [0x5451u32, 0x5421, 0xc004_5877, 0x8008_6601, 0x4004_9409, 2] {
            assert!(vfs_owned(c), "{c:#x}");
        }
        assert!(!vfs_owned(ioctl::VM_RUN) && !vfs_owned(ioctl::CREATE_VM));
    }
}
