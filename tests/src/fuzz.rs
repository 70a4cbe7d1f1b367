//! The ioctl boundary under attack, from user space (issue 7):
//!
//! - `ioctl-fuzz --seed S --calls N`: a seeded generator of valid, invalid
//!   and out-of-order calls on `/dev/uxen` and on VM descriptors. Every call
//!   is checked against a model of the driver (`docs/ioctl.md`): the errno
//!   where the contract defines one, the exit record of every RUN, and at
//!   intervals the VM list and the pool against the model's VMs.
//! - `vm-limit`: the live-children limit of one VM (guest and host forks)
//!   and the limit on VMs in total, with the errors they give.
//! - `vm-churn --ops N --seed S`: create, fork and destroy operations only,
//!   for the soak.
//!
//! The guests are a few bytes of code loaded with `VM_LOAD` at 1 MiB, with
//! the boot structures of `docs/guest-abi.md`: enough to get every kind of
//! exit (port and MMIO accesses with their completions, HLT, VMM and fork
//! hypercalls, exits and stops) with an outcome the model knows in advance.
//! Each ends with one summary line; the exit status is non-zero if any call
//! broke the contract or a frame stayed in the pool.

use crate::probes::{parse_u64, Result};
use shared_abi::{self as abi, exit, guest, ioctl, stop, validate, ExitRecord, IocBuf, IocLoad, Regs, VmCreate, VmFork, VmId, VmInfo, VmRegs, VmRun};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const E: fn() -> i32 = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);

// ---------------------------------------------------------------------------
// Randomness: splitmix64, so that a seed names one run exactly.
// ---------------------------------------------------------------------------

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x6a09_e667_f3bc_c909)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

// ---------------------------------------------------------------------------
// Errno names and raw system calls.
// ---------------------------------------------------------------------------

pub fn errno_name(e: i32) -> String {
    let n = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENOTTY => "ENOTTY",
        libc::ENOSPC => "ENOSPC",
        libc::ENOSYS => "ENOSYS",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::EMFILE => "EMFILE",
        _ => return format!("errno{e}"),
    };
    n.to_string()
}

/// An ioctl with a raw argument: `Ok(value)` or `Err(errno)`.
fn raw_ioctl(fd: i32, cmd: u32, arg: u64) -> std::result::Result<i64, i32> {
    // SAFETY: the argument may name any address: the kernel validates it and
    // answers EFAULT for memory this process cannot hand over, which is what
    // is tested. Memory it may write is the arena's, which Rust code only
    // reaches through raw pointers.
    let r = unsafe { libc::ioctl(fd, cmd as libc::c_ulong, arg as usize as *mut libc::c_void) };
    if r < 0 {
        Err(E())
    } else {
        Ok(r as i64)
    }
}

fn close(fd: i32) {
    // SAFETY: closing a descriptor this process owns (or a stale number, which
    // only gives EBADF).
    unsafe { libc::close(fd) };
}

/// The bytes of a wire structure.
fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: ABI structures are plain data without padding (shared-abi).
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }.to_vec()
}

fn from_bytes<T: Copy>(b: &[u8]) -> T {
    assert!(b.len() >= std::mem::size_of::<T>());
    // SAFETY: ABI structures are valid for any bytes; the read is unaligned.
    unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) }
}

extern "C" fn on_signal(_: libc::c_int) {}

/// SIGALRM and SIGUSR1 interrupt system calls (no SA_RESTART): that is how
/// a RUN that would wait or spin forever comes back with EINTR.
fn install_handlers() {
    for sig in [libc::SIGALRM, libc::SIGUSR1] {
        // SAFETY: an empty handler; no other state is touched.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Arms (or with 0 disarms) a repeating SIGALRM every `ms` milliseconds.
fn alarm_every(ms: u64) {
    let t = libc::timeval { tv_sec: (ms / 1000) as libc::time_t, tv_usec: ((ms % 1000) * 1000) as libc::suseconds_t };
    let it = libc::itimerval { it_interval: t, it_value: t };
    // SAFETY: setting this process's real-time interval timer.
    unsafe { libc::setitimer(libc::ITIMER_REAL, &it, std::ptr::null_mut()) };
}

fn usleep(us: u32) {
    // SAFETY: sleeping has no memory-safety preconditions.
    unsafe { libc::usleep(us) };
}

/// Raises the descriptor limit: the limit tests hold a descriptor per VM.
fn raise_nofile(n: u64) {
    let r = libc::rlimit { rlim_cur: n, rlim_max: n };
    // SAFETY: setting our own resource limit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) };
}

fn open_dev(flags: i32) -> std::result::Result<i32, i32> {
    // SAFETY: opening a path given as a NUL-terminated string.
    let fd = unsafe { libc::open(c"/dev/uxen".as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        Err(E())
    } else {
        Ok(fd)
    }
}

fn flag_u64(args: &[String], name: &str, default: u64) -> std::result::Result<u64, String> {
    match args.iter().position(|a| a == name) {
        Some(i) => parse_u64(args.get(i + 1).ok_or(format!("{name} needs a value"))?),
        None => Ok(default),
    }
}

// ---------------------------------------------------------------------------
// Tiny guests: boot structures and a few bytes of code at 1 MiB.
// ---------------------------------------------------------------------------

const CODE_GPA: u64 = guest::IMAGE_MIN_GPA;
/// Where loads that must not change the program go.
const SCRATCH_GPA: u64 = 0x10_2000;
const MIB: u64 = 1 << 20;

/// What a test VM runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prog {
    /// Nothing loaded: RIP 0 over zeroed page tables, a triple fault.
    None,
    /// `mov al, 42; out 0xf4, al`: exits with code 42.
    Exit42,
    /// `sti; hlt` in a loop.
    Halt,
    /// `in al, 0x80; out 0x80, al` in a loop: the value read comes back out.
    Io,
    /// VMM hypercall 0x1000, then `out 0x80, al` of its result.
    VmmCall,
    /// The fork hypercall, then `out 0x80, al` of its result.
    Fork,
    /// An undefined hypercall number with hostile arguments.
    BadCall(u64),
    /// `ud2` without an IDT.
    Ud2,
    /// `jmp $`.
    Spin,
    /// `inc qword [0x180000]; mov al, [0x180000]; out 0x80, al` in a loop:
    /// a counter in guest memory, seen through the port.
    Count,
    /// A tight loop that increments counters on two pages and compares
    /// them; every 64Ki rounds `out 0x80`; a difference ends the VM with
    /// code 1. Identical pages, written all the time: what a merge must
    /// not break.
    Twins,
    /// `mov rax, [rbx]; mov [rbx], rax` with RBX past the end of memory.
    Mmio,
    /// Any program, with CR3 beyond the end of guest memory.
    PtOob,
    /// State the model cannot predict (random registers or code).
    Unknown,
}

const BAD_CALLS: [u64; 8] = [5, 0xfff, 0x2000, 0x2001, u64::MAX, 1 << 63, 0xdead_beef_0000_0001, 0x1_0000_0000];

fn code(p: Prog) -> Vec<u8> {
    match p {
        Prog::Exit42 | Prog::PtOob => vec![0xb0, 0x2a, 0xe6, 0xf4, 0xeb, 0xfe],
        Prog::Halt => vec![0xfb, 0xf4, 0xeb, 0xfd],
        Prog::Io => vec![0xe4, 0x80, 0xe6, 0x80, 0xeb, 0xfa],
        Prog::VmmCall => vec![0xb8, 0x00, 0x10, 0x00, 0x00, 0x0f, 0x01, 0xc1, 0xe6, 0x80, 0xeb, 0xf4],
        Prog::Fork => vec![0xb8, 0x02, 0x00, 0x00, 0x00, 0x0f, 0x01, 0xc1, 0xe6, 0x80, 0xeb, 0xf4],
        Prog::BadCall(nr) => {
            let mut c = vec![0x48, 0xb8];
            c.extend_from_slice(&nr.to_le_bytes());
            // mov rdi, -1; mov rsi, i64::MIN; mov rdx, u64::MAX
            c.extend_from_slice(&[0x48, 0xc7, 0xc7, 0xff, 0xff, 0xff, 0xff]);
            c.extend_from_slice(&[0x48, 0xbe]);
            c.extend_from_slice(&(1u64 << 63).to_le_bytes());
            c.extend_from_slice(&[0x48, 0xc7, 0xc2, 0xff, 0xff, 0xff, 0xff]);
            c.extend_from_slice(&[0x0f, 0x01, 0xc1, 0xeb, 0xfe]);
            c
        }
        Prog::Ud2 => vec![0x0f, 0x0b],
        Prog::Spin => vec![0xeb, 0xfe],
        Prog::Mmio => vec![0x48, 0x8b, 0x03, 0x48, 0x89, 0x03, 0xeb, 0xf8],
        Prog::Count => vec![
            0x48, 0xff, 0x04, 0x25, 0x00, 0x00, 0x18, 0x00, // inc qword [0x180000]
            0x8a, 0x04, 0x25, 0x00, 0x00, 0x18, 0x00, // mov al, [0x180000]
            0xe6, 0x80, // out 0x80, al
            0xeb, 0xed, // jmp 0
        ],
        Prog::Twins => vec![
            0x48, 0xc7, 0xc1, 0x00, 0x00, 0x01, 0x00, // 0: mov rcx, 0x10000
            0x48, 0xff, 0x04, 0x25, 0x00, 0x00, 0x18, 0x00, // 7: inc qword [0x180000]
            0x48, 0xff, 0x04, 0x25, 0x00, 0x10, 0x18, 0x00, // 15: inc qword [0x181000]
            0x48, 0x8b, 0x04, 0x25, 0x00, 0x00, 0x18, 0x00, // 23: mov rax, [0x180000]
            0x48, 0x3b, 0x04, 0x25, 0x00, 0x10, 0x18, 0x00, // 31: cmp rax, [0x181000]
            0x75, 0x0b, // 39: jne 52
            0x48, 0xff, 0xc9, // 41: dec rcx
            0x75, 0xd9, // 44: jnz 7
            0xe6, 0x80, // 46: out 0x80, al
            0xeb, 0xce, // 48: jmp 0
            0x90, 0x90, // 50
            0xb0, 0x01, // 52: mov al, 1
            0xe6, 0xf4, // 54: out 0xf4, al
            0xeb, 0xfe, // 56: jmp $
        ],
        Prog::None | Prog::Unknown => vec![],
    }
}

/// The GDT, PML4, PDPT and page directories of `docs/guest-abi.md`, as one
/// block at `GDT_GPA`. With `mmio`, the 2 MiB just past memory is mapped too.
fn boot_blob(mem: u64, mmio: bool) -> Vec<u8> {
    let gigs = mem.div_ceil(1 << 30);
    let mut b = vec![0u8; (0x3000 + gigs * 0x1000) as usize];
    let put = |b: &mut Vec<u8>, gpa: u64, v: u64| {
        let o = (gpa - guest::GDT_GPA) as usize;
        b[o..o + 8].copy_from_slice(&v.to_le_bytes());
    };
    put(&mut b, guest::GDT_GPA + 8, 0x00af_9b00_0000_ffff);
    put(&mut b, guest::GDT_GPA + 16, 0x00cf_9300_0000_ffff);
    put(&mut b, guest::PML4_GPA, guest::PDPT_GPA | 3);
    for g in 0..gigs {
        put(&mut b, guest::PDPT_GPA + 8 * g, (guest::PD_GPA + g * 4096) | 3);
    }
    let mut a = 0;
    while a < mem {
        put(&mut b, guest::PD_GPA + 8 * (a >> 21), a | 0x83);
        a += 2 * MIB;
    }
    if mmio {
        put(&mut b, guest::PD_GPA + 8 * (mem >> 21), mem | 0x83);
    }
    b
}

fn prog_regs(p: Prog, mem: u64) -> Regs {
    Regs {
        rip: CODE_GPA,
        rsp: mem,
        rdi: mem,
        rbx: mem + 0x100,
        rflags: 2,
        cr3: if p == Prog::PtOob { mem + 0x1000 } else { guest::PML4_GPA },
        ..Default::default()
    }
}

/// What the next exit of a vCPU must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Any,
    Exit42,
    Halt,
    Spin,
    /// A stop, with this reason if known.
    Shutdown(Option<u32>),
    In,
    /// A write of this byte (if known) to port 0x80.
    Out(Option<u8>),
    MmioRead,
    MmioWrite(Option<u64>),
    Call(u64),
    ForkCall,
}

fn first_expect(p: Prog) -> Expect {
    match p {
        Prog::None => Expect::Shutdown(None),
        Prog::Exit42 => Expect::Exit42,
        Prog::Halt => Expect::Halt,
        Prog::Io => Expect::In,
        Prog::VmmCall => Expect::Call(abi::ghc::VMM_FIRST),
        Prog::Fork => Expect::ForkCall,
        Prog::BadCall(_) => Expect::Shutdown(Some(stop::BAD_HYPERCALL)),
        Prog::Ud2 => Expect::Shutdown(Some(stop::TRIPLE_FAULT)),
        Prog::Spin => Expect::Spin,
        Prog::Count => Expect::Out(Some(1)),
        Prog::Twins => Expect::Out(Some(0)),
        Prog::Mmio => Expect::MmioRead,
        Prog::PtOob => Expect::Shutdown(Some(stop::BAD_INSTRUCTION)),
        Prog::Unknown => Expect::Any,
    }
}

/// A completion the next RUN of a vCPU delivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pend {
    In,
    MmioRead,
    /// A hypercall with this number waits for `hc_ret`.
    Call(u64),
}

#[derive(Clone, Copy, Debug)]
struct VcpuM {
    /// Entered at least once: its initial registers are fixed.
    ready: bool,
    /// Forked from a vCPU that had run: it starts where that one stood.
    snap: bool,
    expect: Expect,
    pending: Option<Pend>,
}

/// The model of one VM.
#[derive(Clone, Debug)]
struct VmM {
    id: u32,
    fds: Vec<i32>,
    mem: u64,
    vcpus: Vec<VcpuM>,
    prog: Prog,
    parent: u32,
    /// Live children, as the hypervisor counts them for the limit.
    children: u32,
    /// Destroyed through DESTROY while descriptors remain.
    destroyed: bool,
    /// The final record once the VM has ended: (kind, reason, data).
    fin: Option<(u32, u32, u64)>,
    /// A RUN whose record was lost may have ended it.
    fin_unknown: bool,
    name: [u8; abi::VM_NAME_LEN],
}

impl VmM {
    fn new(id: u32, fd: i32, mem: u64, vcpus: u32, parent: u32, name: [u8; abi::VM_NAME_LEN]) -> VmM {
        VmM {
            id,
            fds: vec![fd],
            mem,
            vcpus: vec![VcpuM { ready: false, snap: false, expect: Expect::Shutdown(None), pending: None }; vcpus as usize],
            prog: Prog::None,
            parent,
            children: 0,
            destroyed: false,
            fin: None,
            fin_unknown: false,
            name,
        }
    }

    fn entered(&self) -> bool {
        self.vcpus.iter().any(|v| v.ready)
    }

    /// What follows an `out 0x80` in this VM's program.
    fn after_out(&self) -> Expect {
        match self.prog {
            Prog::Io => Expect::In,
            Prog::VmmCall => Expect::Call(abi::ghc::VMM_FIRST),
            Prog::Fork => Expect::ForkCall,
            Prog::Twins => Expect::Out(Some(0)),
            _ => Expect::Any,
        }
    }

    fn set_unknown(&mut self) {
        self.prog = Prog::Unknown;
        for v in &mut self.vcpus {
            v.expect = Expect::Any;
        }
    }
}

// ---------------------------------------------------------------------------
// The arena: where arguments live, with a guard page and a read-only page.
// ---------------------------------------------------------------------------

const PAGE: usize = 4096;
/// Read-write pages: the argument at the start, data buffers after it.
const RW_PAGES: usize = 32;
const DATA_OFF: usize = PAGE;

struct Arena {
    base: *mut u8,
}

/// Where an argument is placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ptr {
    Good,
    Misaligned,
    /// A read-only page: the driver can read it, not write it.
    ReadOnly,
    Null,
    Low,
    Kernel,
    KernelText,
    NonCanonical,
    Guard,
    /// Half in the last read-write page, half in the guard page.
    Straddle,
    UserTop,
    AllOnes,
}

impl Ptr {
    /// The kernel can neither read nor write it.
    fn bad(self) -> bool {
        !matches!(self, Ptr::Good | Ptr::Misaligned | Ptr::ReadOnly)
    }
}

const BAD_PTRS: [Ptr; 9] = [Ptr::Null, Ptr::Low, Ptr::Kernel, Ptr::KernelText, Ptr::NonCanonical, Ptr::Guard, Ptr::Straddle, Ptr::UserTop, Ptr::AllOnes];

impl Arena {
    fn new() -> std::result::Result<Arena, String> {
        let len = (RW_PAGES + 2) * PAGE;
        // SAFETY: a fresh anonymous private mapping, owned by the arena.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        let a = Arena { base: p.cast() };
        // SAFETY: changing the protection of pages of our own mapping.
        unsafe {
            libc::mprotect(a.base.add(RW_PAGES * PAGE).cast(), PAGE, libc::PROT_NONE);
            libc::mprotect(a.base.add((RW_PAGES + 1) * PAGE).cast(), PAGE, libc::PROT_READ);
        }
        Ok(a)
    }

    fn addr(&self, off: usize) -> u64 {
        self.base as u64 + off as u64
    }

    fn guard(&self) -> u64 {
        self.addr(RW_PAGES * PAGE)
    }

    fn ro(&self) -> u64 {
        self.addr((RW_PAGES + 1) * PAGE)
    }

    fn write(&self, off: usize, b: &[u8]) {
        assert!(off + b.len() <= RW_PAGES * PAGE);
        // SAFETY: within the read-write pages of the mapping.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.base.add(off), b.len()) };
    }

    fn read(&self, off: usize, n: usize) -> Vec<u8> {
        assert!(off + n <= RW_PAGES * PAGE);
        let mut v = vec![0u8; n];
        // SAFETY: as in `write`; the kernel wrote these bytes, if anything.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(off), v.as_mut_ptr(), n) };
        v
    }

    fn set_ro(&self, b: &[u8]) {
        let ro = (RW_PAGES + 1) * PAGE;
        // SAFETY: our read-only page, made writable for the copy only.
        unsafe {
            libc::mprotect(self.base.add(ro).cast(), PAGE, libc::PROT_READ | libc::PROT_WRITE);
            std::ptr::copy_nonoverlapping(b.as_ptr(), self.base.add(ro), b.len().min(PAGE));
            libc::mprotect(self.base.add(ro).cast(), PAGE, libc::PROT_READ);
        }
    }

    /// Puts `b` where `p` says; returns the address and, for memory the
    /// test can read back, the arena offset.
    fn place(&self, p: Ptr, b: &[u8], rng: &mut Rng) -> (u64, Option<usize>) {
        match p {
            Ptr::Good => {
                self.write(0, b);
                (self.addr(0), Some(0))
            }
            Ptr::Misaligned => {
                let off = 1 + rng.below(7) as usize;
                self.write(off, b);
                (self.addr(off), Some(off))
            }
            Ptr::ReadOnly => {
                self.set_ro(b);
                (self.ro(), None)
            }
            Ptr::Null => (0, None),
            Ptr::Low => (1 + rng.below(4095), None),
            Ptr::Kernel => (0xffff_8880_0010_0000 + rng.below(1 << 20), None),
            Ptr::KernelText => (0xffff_ffff_8100_0000, None),
            Ptr::NonCanonical => (rng.pick(&[0x0000_8000_0000_0000, 0x8000_0000_0000_0000, 0x1234_5678_9abc_d000]), None),
            Ptr::Guard => (self.guard(), None),
            Ptr::Straddle => {
                let half = b.len() / 2;
                let off = RW_PAGES * PAGE - half;
                self.write(off, &b[..half]);
                (self.addr(off), None)
            }
            Ptr::UserTop => (0x7fff_ffff_f000 - (b.len() as u64 / 2), None),
            Ptr::AllOnes => (u64::MAX - rng.below(64), None),
        }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping `new` made.
        unsafe { libc::munmap(self.base.cast(), (RW_PAGES + 2) * PAGE) };
    }
}

// ---------------------------------------------------------------------------
// ioctl numbers the kernel handles itself before the driver sees them
// (fs/ioctl.c, do_vfs_ioctl): random commands must avoid them.
// ---------------------------------------------------------------------------

fn vfs_owned(cmd: u32) -> bool {
    matches!((cmd >> 8) & 0xff, 0x00 | 0x15 | 0x54 | 0x58 | 0x66 | 0x94)
}

const DEV_CMDS: [u32; 8] =
    [ioctl::VERSION, ioctl::STATS, ioctl::CREATE_VM, ioctl::LIST, ioctl::DESTROY, ioctl::MERGE, ioctl::DEBUG_TRANSLATE, ioctl::DEBUG_POOL];
const VM_CMDS: [u32; 7] = [ioctl::VM_LOAD, ioctl::VM_GET_REGS, ioctl::VM_SET_REGS, ioctl::VM_RUN, ioctl::VM_FORK, ioctl::VM_ID, ioctl::VM_IRQ];

// ---------------------------------------------------------------------------
// The fuzzer.
// ---------------------------------------------------------------------------

type Res = std::result::Result<i64, i32>;

/// Live VMs the generator aims to keep at most (children may double it).
const LIVE_CAP: usize = 24;
/// Calls between two full checks of the list and the pool.
const CHECK_EVERY: u64 = 250;
/// Period of the SIGALRM that interrupts a RUN, in milliseconds.
const RUN_ALARM_MS: u64 = 15;

const EFAULT: i32 = libc::EFAULT;
const EINVAL: i32 = libc::EINVAL;
const ENOENT: i32 = libc::ENOENT;
const ENOTTY: i32 = libc::ENOTTY;
const EBADF: i32 = libc::EBADF;
const EBUSY: i32 = libc::EBUSY;
const EINTR: i32 = libc::EINTR;
const EAGAIN: i32 = libc::EAGAIN;
const ENOSPC: i32 = libc::ENOSPC;

struct Fuzz {
    rng: Rng,
    arena: Arena,
    /// Open `/dev/uxen` descriptors; the first stays open throughout.
    ctl: Vec<i32>,
    /// Descriptors of files that are not ours.
    others: Vec<i32>,
    vms: BTreeMap<u32, VmM>,
    /// Ids of VMs that no longer exist.
    gone: Vec<u32>,
    debug: bool,
    verbose: bool,
    calls: u64,
    ok: u64,
    errnos: BTreeMap<i32, u64>,
    mismatches: u64,
    trace: Vec<String>,
    count: BTreeMap<&'static str, u64>,
    max_live: usize,
    next_check: u64,
    /// A page of random bytes that loads repeat, for the merges to find.
    shared_page: Vec<u8>,
    /// Operations to run (empty: all) and to leave out.
    only: Vec<String>,
    skip: Vec<String>,
}

fn vm_info_name(n: &[u8; abi::VM_NAME_LEN]) -> String {
    String::from_utf8_lossy(abi::cstr_bytes(n)).into_owned()
}

impl Fuzz {
    fn new(seed: u64, verbose: bool) -> std::result::Result<Fuzz, String> {
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

    fn enabled(&self, op: &str) -> bool {
        (self.only.is_empty() || self.only.iter().any(|o| o == op)) && !self.skip.iter().any(|o| o == op)
    }

    fn bump(&mut self, what: &'static str) {
        *self.count.entry(what).or_default() += 1;
    }

    fn log(&mut self, s: String) {
        if self.verbose {
            println!("ioctl-fuzz: [{}] {s}", self.calls);
        }
        self.trace.push(s);
        if self.trace.len() > 24 {
            self.trace.remove(0);
        }
    }

    fn note(&mut self, msg: String) {
        self.mismatches += 1;
        if self.mismatches <= 40 {
            println!("ioctl-fuzz: MISMATCH at call {}: {msg}", self.calls);
            let n = if self.mismatches == 1 { self.trace.len() } else { 1 };
            for t in &self.trace[self.trace.len() - n.min(self.trace.len())..] {
                println!("ioctl-fuzz:   after: {t}");
            }
        }
    }

    fn count_result(&mut self, r: &Res) {
        self.calls += 1;
        match r {
            Ok(_) => self.ok += 1,
            Err(e) => *self.errnos.entry(*e).or_default() += 1,
        }
    }

    fn ioctl(&mut self, fd: i32, cmd: u32, arg: u64) -> Res {
        let r = raw_ioctl(fd, cmd, arg);
        self.count_result(&r);
        r
    }

    /// Checks `r` against `want` (0 for success, else errno values).
    fn want(&mut self, what: &str, r: &Res, want: &[i32]) -> bool {
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

    fn live(&self) -> usize {
        self.vms.values().filter(|v| !v.destroyed).count()
    }

    fn ctl_fd(&mut self) -> i32 {
        let i = self.rng.below(self.ctl.len() as u64) as usize;
        self.ctl[i]
    }

    /// A pointer kind: bad `bad` percent of the time (read-only included).
    fn ptr(&mut self, bad: u64) -> Ptr {
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

    fn pick_vm(&mut self) -> Option<u32> {
        if self.vms.is_empty() {
            return None;
        }
        let i = self.rng.below(self.vms.len() as u64) as usize;
        self.vms.keys().nth(i).copied()
    }

    /// A VM, creating one with a program if there is none.
    fn some_vm(&mut self) -> Option<u32> {
        if self.vms.is_empty() || (self.live() == 0 && self.rng.chance(50)) {
            self.create_valid(None);
        }
        self.pick_vm()
    }

    fn pick_fd(&mut self, id: u32) -> i32 {
        let fds = &self.vms[&id].fds;
        fds[self.rng.below(fds.len() as u64) as usize]
    }

    fn gone_id(&mut self) -> u32 {
        if !self.gone.is_empty() && self.rng.chance(50) {
            let i = self.rng.below(self.gone.len() as u64) as usize;
            return self.gone[i];
        }
        self.rng.pick(&[0, u32::MAX, 0x7fff_ffff, 1 << 20])
    }

    // --- Model upkeep -----------------------------------------------------

    /// The hypervisor drops VM `id`: its parent has one live child less.
    fn vm_gone(&mut self, id: u32) {
        let parent = self.vms[&id].parent;
        if let Some(p) = self.vms.get_mut(&parent) {
            if !p.destroyed {
                p.children = p.children.saturating_sub(1);
            }
        }
    }

    /// Descriptor `fd` of VM `id` no longer refers to it (closed, or
    /// replaced by `dup2`).
    fn fd_dropped(&mut self, id: u32, fd: i32) {
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

    fn close_vm_fd(&mut self, id: u32, fd: i32) {
        close(fd);
        self.fd_dropped(id, fd);
    }

    fn owner_of(&self, fd: i32) -> Option<u32> {
        self.vms.values().find(|v| v.fds.contains(&fd)).map(|v| v.id)
    }

    /// Takes in VM descriptors the driver installed but whose number never
    /// reached us (a copy-out to a read-only argument failed).
    fn adopt(&mut self) -> usize {
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

    fn list(&mut self) -> Option<Vec<VmInfo>> {
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

    fn stats(&mut self) -> Option<Box<abi::HvStats>> {
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
    fn check(&mut self, why: &str) {
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

    fn load_ok(&mut self, fd: i32, gpa: u64, data: &[u8]) -> bool {
        self.arena.write(DATA_OFF, data);
        let l = IocLoad { gpa, data: self.arena.addr(DATA_OFF), len: data.len() as u64 };
        self.arena.write(0, &bytes_of(&l));
        let r = self.ioctl(fd, ioctl::VM_LOAD, self.arena.addr(0));
        self.want("VM_LOAD of a program", &r, &[0])
    }

    fn set_regs_ok(&mut self, fd: i32, vcpu: u32, regs: Regs) -> bool {
        let v = VmRegs { vm: self.rng.next() as u32, vcpu, regs };
        self.arena.write(0, &bytes_of(&v));
        let r = self.ioctl(fd, ioctl::VM_SET_REGS, self.arena.addr(0));
        self.want("VM_SET_REGS of a program", &r, &[0])
    }

    /// Loads `prog` into a VM that has not run.
    fn program(&mut self, id: u32, prog: Prog) {
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

    fn random_prog(&mut self, mem: u64, vcpus: u32) -> Prog {
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
    fn create_valid(&mut self, prog: Option<Prog>) -> Option<u32> {
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
    fn create(&mut self, c: VmCreate, p: Ptr) -> Option<u32> {
        // The driver fills in the TSC rate itself and refuses a caller's.
        let valid = validate::vm_create(&c).is_ok() && c.tsc_khz == 0;
        let (addr, off) = self.arena.place(p, &bytes_of(&c), &mut self.rng);
        let fd = self.ctl_fd();
        let r = self.ioctl(fd, ioctl::CREATE_VM, addr);
        self.log(format!("CREATE_VM mem={:#x} vcpus={} flags={:#x} {p:?} -> {r:?}", c.mem_bytes, c.vcpus, c.flags));
        let want = if p.bad() {
            EFAULT
        } else if !valid {
            EINVAL
        } else if p == Ptr::ReadOnly {
            EFAULT
        } else {
            0
        };
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

// --- The operations ------------------------------------------------------------

impl Fuzz {
    fn op_create(&mut self) {
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

    fn op_version(&mut self) {
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
    fn out_buf(&mut self, len: usize) -> (u64, bool) {
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

    fn op_stats(&mut self) {
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

    fn op_list(&mut self) {
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

    fn op_destroy(&mut self) {
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

    fn op_merge(&mut self) {
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
        let want = if p.bad() {
            EFAULT
        } else if flags != 0 {
            EINVAL
        } else if vm != 0 && !live.contains(&vm) {
            ENOENT
        } else if p == Ptr::ReadOnly {
            EFAULT
        } else {
            0
        };
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
    fn op_pool(&mut self) {
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
        let want = if !self.debug {
            libc::EPERM
        } else if p.bad() {
            EFAULT
        } else if !valid {
            EINVAL
        } else if p == Ptr::ReadOnly {
            EFAULT
        } else {
            0
        };
        self.want("DEBUG_POOL", &r, &[want]);
    }

    fn op_translate(&mut self) {
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

    fn op_load(&mut self) {
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

    fn pick_vcpu(&mut self, id: u32) -> u32 {
        let n = self.vms[&id].vcpus.len() as u32;
        match self.rng.below(20) {
            0 => n,
            1 => self.rng.pick(&[u32::MAX, abi::VM_MAX_VCPUS, 1 << 31]),
            _ => self.rng.below(n as u64) as u32,
        }
    }

    fn op_get_regs(&mut self) {
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
        let want = if p.bad() {
            EFAULT
        } else if vm.destroyed || !valid {
            ENOENT
        } else if p == Ptr::ReadOnly {
            EFAULT
        } else {
            0
        };
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

    fn op_set_regs(&mut self) {
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

fn vm_boot_regs(mem: u64) -> Regs {
    Regs { rsp: mem, rdi: mem, rflags: 2, cr3: guest::PML4_GPA, ..Default::default() }
}

impl Fuzz {
    fn op_run(&mut self) {
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
    fn check_record(&mut self, id: u32, vi: usize, x: ExitRecord, no_wait: bool, expect: Expect) {
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
    fn child_vcpu(pv: &VcpuM) -> VcpuM {
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

    fn op_fork(&mut self) {
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
        let vm = &self.vms[&id];
        let mut c = VmM::new(out.child, cfd as i32, vm.mem, vm.vcpus.len() as u32, id, vm.name);
        c.prog = vm.prog;
        c.vcpus = vm.vcpus.iter().map(Self::child_vcpu).collect();
        self.vms.get_mut(&id).unwrap().children += 1;
        self.vms.insert(out.child, c);
        self.bump(if f.flags == abi::FORK_COPY { "host forks (full copy)" } else { "host forks" });
        self.max_live = self.max_live.max(self.live());
    }

    fn op_vm_id(&mut self) {
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
    fn op_wrong_cmd(&mut self) {
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
    fn op_bad_fd(&mut self) {
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
    fn op_ctl(&mut self) {
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

    fn op_close(&mut self) {
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

    fn op_dup(&mut self) {
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
    fn op_syscalls(&mut self) {
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
    fn op_reprogram(&mut self) {
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

/// What the RUN thread of a race saw.
enum RaceEnd {
    /// Interrupted by our signal.
    Interrupted,
    /// The VM was destroyed under it.
    Destroyed,
    Error(i32),
    Unexpected(ExitRecord),
}

impl RaceEnd {
    fn describe(&self) -> String {
        match self {
            RaceEnd::Interrupted => "interrupted".into(),
            RaceEnd::Destroyed => "destroyed".into(),
            RaceEnd::Error(e) => format!("error {}", errno_name(*e)),
            RaceEnd::Unexpected(x) => format!("exit kind {} reason {} port {:#x} data {:#x}", x.kind, x.reason, x.port, x.data),
        }
    }
}

fn pthread_self() -> libc::pthread_t {
    // SAFETY: no preconditions.
    unsafe { libc::pthread_self() }
}

impl Fuzz {
    /// A vCPU runs on another thread while this one works on its VM: RUN
    /// again, LOAD, the registers, FORK, MERGE, and DESTROY or close.
    fn op_race(&mut self) {
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

    fn race_op(&mut self, id: u32, fd: i32) {
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
    fn op_child_process(&mut self) {
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
    fn op_kill_runner(&mut self) {
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
    fn op_exec(&mut self) {
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

    // --- The loop ---------------------------------------------------------------

    fn step(&mut self) {
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
    fn finish(&mut self) -> u64 {
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

type Op = fn(&mut Fuzz);

/// The operations, with their names (for `--only` and `--skip`) and
/// weights.
const OPS: &[(&str, u64, Op)] = &[
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

// ---------------------------------------------------------------------------
// The limits, and create/fork/destroy churn.
// ---------------------------------------------------------------------------

impl Fuzz {
    /// RUN of vCPU 0 with a good argument, completing the previous exit
    /// with 0xab; checks and returns the record.
    fn run_good(&mut self, id: u32) -> Option<ExitRecord> {
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
    fn fork_good(&mut self, id: u32, flags: u32) -> (Res, Option<u32>) {
        let fd = self.vms[&id].fds[0];
        self.arena.write(0, &bytes_of(&VmFork { flags, ..Default::default() }));
        let r = self.ioctl(fd, ioctl::VM_FORK, self.arena.addr(0));
        let Ok(cfd) = r else { return (r, None) };
        let out: VmFork = from_bytes(&self.arena.read(0, std::mem::size_of::<VmFork>()));
        let vm = &self.vms[&id];
        let mut c = VmM::new(out.child, cfd as i32, vm.mem, vm.vcpus.len() as u32, id, vm.name);
        c.prog = vm.prog;
        c.vcpus = vm.vcpus.iter().map(Self::child_vcpu).collect();
        self.vms.get_mut(&id).unwrap().children += 1;
        self.vms.insert(out.child, c);
        self.max_live = self.max_live.max(self.live());
        (r, Some(out.child))
    }

    /// CREATE_VM of a small VM without a program, or its errno.
    fn create_small(&mut self) -> std::result::Result<u32, i32> {
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

    fn close_all(&mut self, id: u32) {
        for f in self.vms[&id].fds.clone() {
            self.close_vm_fd(id, f);
        }
    }

    fn pool_used(&mut self) -> u64 {
        self.stats().map(|s| s.pool_frames_total - s.pool_frames_free).unwrap_or(0)
    }
}

fn check(f: &mut Fuzz, what: &str, ok: bool) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_repeat() {
        let (mut a, mut b) = (Rng::new(9), Rng::new(9));
        assert!((0..100).all(|_| a.next() == b.next()));
        assert_ne!(Rng::new(1).next(), Rng::new(2).next());
    }

    #[test]
    fn random_commands_avoid_the_vfs() {
        // FIOCLEX, FIONBIO, FIFREEZE, FS_IOC_GETFLAGS, FICLONE, FIGETBSZ.
        for c in [0x5451u32, 0x5421, 0xc004_5877, 0x8008_6601, 0x4004_9409, 2] {
            assert!(vfs_owned(c), "{c:#x}");
        }
        assert!(!vfs_owned(ioctl::VM_RUN) && !vfs_owned(ioctl::CREATE_VM));
    }

    #[test]
    fn programs_jump_back_to_their_start() {
        // The last two bytes of the looping programs are `jmp rel8` back to 0
        // (Twins: the jmp at 48 goes to 0 as well).
        for p in [Prog::Io, Prog::VmmCall, Prog::Fork, Prog::Count] {
            let c = code(p);
            let n = c.len() as i64;
            assert_eq!(c[c.len() - 2], 0xeb);
            assert_eq!(n + c[c.len() - 1] as i8 as i64, 0, "{p:?}");
        }
        let t = code(Prog::Twins);
        assert_eq!(50 + t[49] as i8 as i64, 0);
        assert_eq!(41 + t[40] as i8 as i64, 52);
        assert_eq!(46 + t[45] as i8 as i64, 7);
        assert_eq!(code(Prog::Halt), [0xfb, 0xf4, 0xeb, 0xfd]);
    }

    #[test]
    fn boot_blob_maps_memory_and_the_mmio_page() {
        let b = boot_blob(4 * MIB, true);
        let at = |gpa: u64| u64::from_le_bytes(b[(gpa - guest::GDT_GPA) as usize..][..8].try_into().unwrap());
        assert_eq!(at(guest::PML4_GPA), guest::PDPT_GPA | 3);
        assert_eq!(at(guest::PD_GPA + 8), 2 * MIB | 0x83);
        assert_eq!(at(guest::PD_GPA + 16), 4 * MIB | 0x83);
        assert_eq!(at(guest::PD_GPA + 24), 0);
    }
}
