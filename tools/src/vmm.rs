//! The VMM: runs a VM's vCPUs, emulates its console UART, feeds it console
//! input (Linux guests), answers fork and input requests, and reports how
//! the VM ended.

use crate::console::{self, Input, Wake};
use crate::daemon;
use crate::dev::{self, Vm};
use shared_abi::{self as abi, exit, ghc, guest, linux, stop};
use std::io::{BufRead, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

/// The UART of a test guest raises no interrupts: test guests poll.
pub struct NoIrq;

impl Trigger for NoIrq {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The UART of a Linux guest: an edge on its IOAPIC input
/// (`linux::UART_GSI`) through the `VM_IRQ` ioctl, which also wakes a
/// halted vCPU.
pub struct IrqLine<'a> {
    vm: &'a Vm,
    gsi: u32,
    /// Set once a failure has been reported: a guest without its UART
    /// interrupt still boots, and one line about it is enough.
    reported: AtomicBool,
}

impl Trigger for IrqLine<'_> {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        loop {
            match self.vm.irq(self.gsi, abi::IRQ_PULSE) {
                Ok(()) => return Ok(()),
                // A SIGUSR1 meant for RUN can land here instead.
                Err(e) if e.errno == libc::EINTR => continue,
                Err(e) => {
                    if !self.reported.swap(true, Ordering::Relaxed) {
                        eprintln!("uxenctl: vm {}: the console's interrupt (GSI {}) failed: {e}", self.vm.id, self.gsi);
                    }
                    return Err(std::io::Error::from_raw_os_error(e.errno));
                }
            }
        }
    }
}

type Uart<T> = Serial<T, NoEvents, Lines>;

/// How often the console thread retries input the guest cannot take yet.
const INPUT_RETRY: Duration = Duration::from_millis(100);

/// How long a Linux guest's console may hold a partial line (a shell
/// prompt, say) before it is written anyway.
const PARTIAL_LINE_IDLE: Duration = Duration::from_millis(30);

/// The console sink: whole lines, each in one write, so that the consoles
/// of VMs sharing a terminal (a guest and the children it forks) do not
/// interleave mid-line. The UART flushes after every byte; only a newline,
/// a long line or the end of the VM writes — and, for a Linux guest, a
/// partial line the guest has left alone for [`PARTIAL_LINE_IDLE`] (the
/// VMM's console thread looks), so that a prompt shows.
pub struct Lines {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    /// When the last byte came.
    last: Instant,
    /// Told when a partial line starts.
    wake: Option<Arc<Wake>>,
}

impl Lines {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Lines { out, line: Vec::new(), last: Instant::now(), wake: None }
    }

    /// Writes what is pending, newline or not (the VM ended, or the guest
    /// went quiet).
    pub fn finish(&mut self) -> std::io::Result<()> {
        if !self.line.is_empty() {
            self.out.write_all(&self.line)?;
            self.line.clear();
        }
        self.out.flush()
    }

    /// Whether a partial line is held.
    pub fn has_partial(&self) -> bool {
        !self.line.is_empty()
    }

    /// Writes a partial line that has not grown for `idle`.
    pub fn flush_if_idle(&mut self, idle: Duration) -> std::io::Result<()> {
        if self.has_partial() && self.last.elapsed() >= idle {
            self.finish()?;
        }
        Ok(())
    }
}

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let was_empty = self.line.is_empty();
        self.line.extend_from_slice(buf);
        self.last = Instant::now();
        if self.line.contains(&b'\n') || self.line.len() >= 4096 {
            let cut = self.line.iter().rposition(|&b| b == b'\n').map(|i| i + 1).unwrap_or(self.line.len());
            self.out.write_all(&self.line[..cut])?;
            self.out.flush()?;
            self.line.drain(..cut);
        }
        if was_empty && !self.line.is_empty() {
            if let Some(w) = &self.wake {
                w.notify();
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `uxenctl run` exit status for a VM the hypervisor or the VMM stopped.
pub const STATUS_STOPPED: u8 = 70;
/// ... for a Linux guest that rebooted.
pub const STATUS_REBOOTED: u8 = 71;
/// ... for a Linux guest whose kernel panicked.
pub const STATUS_PANICKED: u8 = 72;

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The guest ended itself with this code (a Linux guest's power-off is
    /// code 0).
    Exited(u8),
    /// The hypervisor stopped it (a `stop` reason).
    Stopped(u32),
    /// The VMM stopped it.
    Killed(String),
}

impl End {
    pub fn describe(&self) -> String {
        match self {
            End::Exited(c) => format!("exited with code {c}"),
            End::Stopped(stop::REBOOT) => "rebooted".into(),
            End::Stopped(stop::PANIC) => "kernel panic".into(),
            End::Stopped(r) => format!("stopped: {}", stop::name(*r)),
            End::Killed(why) => format!("stopped by the VMM: {why}"),
        }
    }

    /// The process exit status `uxenctl run` reports.
    pub fn status(&self) -> u8 {
        match self {
            End::Exited(c) => *c,
            End::Stopped(stop::REBOOT) => STATUS_REBOOTED,
            End::Stopped(stop::PANIC) => STATUS_PANICKED,
            End::Stopped(_) | End::Killed(_) => STATUS_STOPPED,
        }
    }
}

/// Where the console goes and whether the VM takes fork requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `uxenctl run`: the console is stdout; forked children share it.
    Foreground,
    /// `uxenctl create`: console, status and control socket in the run
    /// directory.
    Detached,
}

/// What kind of guest a VMM runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A test guest (docs/guest-abi.md, part 1): a polled UART, no input.
    Test,
    /// A Linux guest (part 2): UART interrupts and console input; `stdin`
    /// says whether this VMM reads its standard input.
    Linux { stdin: Stdin },
}

/// Standard input of a Linux guest's VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stdin {
    /// Not read (a detached VMM, a forked child's, a background job's).
    No,
    /// Read as it comes (a pipe, a file).
    Plain,
    /// A terminal in raw mode, with the Ctrl-A escapes.
    Terminal,
}

/// Set by SIGINT/SIGTERM: the VM is torn down.
pub static TERMINATE: AtomicBool = AtomicBool::new(false);
/// A fork request from the control socket: how many, full copies or not.
struct ForkRequest {
    count: u32,
    copy: bool,
    conn: std::os::unix::net::UnixStream,
}

/// Set by the control thread: vCPU 0 has fork requests to serve.
static REQUESTS: Mutex<Vec<ForkRequest>> = Mutex::new(Vec::new());
/// Set while `REQUESTS` holds a request vCPU 0's thread has not taken.
static PENDING: AtomicBool = AtomicBool::new(false);

/// The other vCPUs' threads held out of RUN while vCPU 0's thread forks
/// the VM: a fork copies every vCPU, and none may be in the guest.
struct Hold {
    /// vCPU 0 wants the others out of RUN.
    want: bool,
    /// How many of them are out and waiting.
    parked: usize,
    /// Bumped when vCPU 0 lets them go.
    gen: u64,
}

static HOLD: Mutex<Hold> = Mutex::new(Hold { want: false, parked: 0, gen: 0 });
static HOLD_CV: std::sync::Condvar = std::sync::Condvar::new();

/// The threads of the vCPUs other than 0 (the control thread kicks these
/// too, vCPU 0 kicks them while it waits).
static VCPU_THREADS: Mutex<Vec<libc::pthread_t>> = Mutex::new(Vec::new());

/// On a vCPU other than 0, out of RUN: if vCPU 0 is gathering the vCPUs
/// for a fork, waits until it is done.
fn park_for_fork() {
    let mut h = HOLD.lock().unwrap();
    if !h.want {
        return;
    }
    h.parked += 1;
    HOLD_CV.notify_all();
    let g = h.gen;
    while h.gen == g {
        h = HOLD_CV.wait(h).unwrap();
    }
    h.parked -= 1;
}

/// On vCPU 0, out of RUN: gathers the `others` other vCPUs out of RUN, runs
/// `f`, and lets them go. Gives up (without running `f`) if the VM ends
/// meanwhile.
fn with_vcpus_held(others: impl Fn() -> usize, ended: impl Fn() -> bool, f: impl FnOnce()) -> bool {
    let mut h = HOLD.lock().unwrap();
    h.want = true;
    let done = loop {
        if h.parked >= others() {
            break true;
        }
        if ended() {
            break false;
        }
        for t in VCPU_THREADS.lock().unwrap().iter() {
            // SAFETY: registered threads have not left their vCPU loop
            // (they deregister under this lock).
            unsafe { libc::pthread_kill(*t, libc::SIGUSR1) };
        }
        h = HOLD_CV.wait_timeout(h, Duration::from_millis(20)).unwrap().0;
    };
    drop(h);
    if done {
        f();
    }
    let mut h = HOLD.lock().unwrap();
    h.want = false;
    h.gen += 1;
    HOLD_CV.notify_all();
    done
}

extern "C" fn on_signal(_: libc::c_int) {
    TERMINATE.store(true, Ordering::Release);
}

extern "C" fn noop(_: libc::c_int) {}

/// Makes SIGINT/SIGTERM end the VM and SIGUSR1 interrupt RUN (no
/// SA_RESTART), to serve requests.
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1] {
        // SAFETY: plain handlers that only store to an atomic.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = if sig == libc::SIGUSR1 { noop as *const () as usize } else { on_signal as *const () as usize };
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// How the VM ended, once it has; and who to tell.
struct Ends {
    end: Mutex<Option<End>>,
    wake: Arc<Wake>,
}

impl Ends {
    /// Records `e` unless an end is already recorded.
    fn finish(&self, e: End) {
        let mut g = self.end.lock().unwrap();
        if g.is_none() {
            *g = Some(e);
        }
        drop(g);
        self.wake.notify();
    }

    fn is_set(&self) -> bool {
        self.end.lock().unwrap().is_some()
    }
}

/// The threads running vCPUs, so that they can be made to leave RUN once
/// the VM has ended.
#[derive(Default)]
struct VcpuThreads {
    ids: Mutex<Vec<libc::pthread_t>>,
}

/// Removes its thread from [`VcpuThreads`] when the vCPU loop returns.
struct Registered<'a>(&'a VcpuThreads, libc::pthread_t);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.0.ids.lock().unwrap().retain(|t| *t != self.1);
        VCPU_THREADS.lock().unwrap().retain(|t| *t != self.1);
        // vCPU 0 may be waiting for this one to park.
        HOLD_CV.notify_all();
    }
}

impl VcpuThreads {
    fn enter(&self, cpu: u32) -> Registered<'_> {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.ids.lock().unwrap().push(me);
        if cpu != 0 {
            VCPU_THREADS.lock().unwrap().push(me);
        }
        Registered(self, me)
    }

    fn live(&self) -> usize {
        self.ids.lock().unwrap().len()
    }

    /// Interrupts every RUN in progress (SIGUSR1, no SA_RESTART).
    fn kick(&self) {
        for t in self.ids.lock().unwrap().iter() {
            // SAFETY: the thread is registered, so it has not returned from
            // its vCPU loop (it deregisters under this lock).
            unsafe { libc::pthread_kill(*t, libc::SIGUSR1) };
        }
    }
}

/// Runs `vm` until it ends. In detached mode this also writes the console,
/// status and pid files and serves the control socket.
/// `uart`: a forked child's UART registers, as its parent's were (a new VM
/// starts from the UART's reset state).
pub fn serve(vm: Vm, vcpus: u32, mode: Mode, kind: Kind, uart: Option<UartRegs>) -> End {
    let vm = &vm;
    match kind {
        Kind::Test => serve_with(vm, vcpus, mode, kind, NoIrq, uart),
        Kind::Linux { .. } => serve_with(vm, vcpus, mode, kind, IrqLine { vm, gsi: linux::UART_GSI, reported: AtomicBool::new(false) }, uart),
    }
}

/// A UART's registers, as a fork hands them to the child's VMM: divisor
/// latch low and high, IER, IIR, LCR, LSR, MCR, MSR, scratch.
pub type UartRegs = [u8; 9];

/// The registers of `s`.
pub fn uart_regs(s: &SerialState) -> UartRegs {
    [
        s.baud_divisor_low,
        s.baud_divisor_high,
        s.interrupt_enable,
        s.interrupt_identification,
        s.line_control,
        s.line_status,
        s.modem_control,
        s.modem_status,
        s.scratch,
    ]
}

/// A UART state with registers `r` and nothing received: input waiting in
/// the parent's UART was typed to the parent, so the child's starts empty,
/// and neither "data ready" nor its interrupt may say otherwise.
pub fn uart_state(r: &UartRegs) -> SerialState {
    const LSR_DATA_READY: u8 = 0x01;
    const IIR_RECEIVED_DATA: u8 = 0x04;
    const IIR_NONE: u8 = 0x01;
    let iir = if r[3] & 0x0f == IIR_RECEIVED_DATA { (r[3] & 0xf0) | IIR_NONE } else { r[3] };
    SerialState {
        baud_divisor_low: r[0],
        baud_divisor_high: r[1],
        interrupt_enable: r[2],
        interrupt_identification: iir,
        line_control: r[4],
        line_status: r[5] & !LSR_DATA_READY,
        modem_control: r[6],
        modem_status: r[7],
        scratch: r[8],
        in_buffer: Vec::new(),
    }
}

/// `--uart HEX` of `__vmm-child`: 9 bytes as 18 hex digits.
pub fn parse_uart_regs(s: &str) -> Result<UartRegs, String> {
    let bad = || format!("`{s}` is not 9 bytes of UART registers in hex");
    if s.len() != 18 {
        return Err(bad());
    }
    let mut r = [0u8; 9];
    for (i, b) in r.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
    }
    Ok(r)
}

fn serve_with<T: Trigger<E = std::io::Error> + Send>(vm: &Vm, vcpus: u32, mode: Mode, kind: Kind, irq: T, uart: Option<UartRegs>) -> End {
    let out: Box<dyn Write + Send> = match mode {
        Mode::Foreground => Box::new(std::io::stdout()),
        Mode::Detached => match std::fs::File::create(daemon::console_path(vm.id)) {
            Ok(f) => Box::new(f),
            Err(e) => return End::Killed(format!("cannot create the console file: {e}")),
        },
    };
    let wake = Arc::new(Wake::default());
    let is_linux = matches!(kind, Kind::Linux { .. });
    let input = is_linux.then(|| Input::new(wake.clone()));
    if mode == Mode::Detached {
        let _ = std::fs::write(daemon::pid_path(vm.id), std::process::id().to_string());
        let _ = std::fs::remove_file(daemon::status_path(vm.id));
        start_control(vm.id, input.clone());
    }
    if let (Kind::Linux { stdin: stdin @ (Stdin::Plain | Stdin::Terminal) }, Some(i)) = (kind, &input) {
        console::spawn_stdin_reader(i.clone(), stdin == Stdin::Terminal);
    }
    let mut lines = Lines::new(out);
    if is_linux {
        lines.wake = Some(wake.clone());
    }
    let serial = match uart {
        // The state comes from a UART of the same kind: it fits.
        Some(r) => Serial::from_state(&uart_state(&r), irq, NoEvents, lines).expect("an empty FIFO fits"),
        None => Serial::new(irq, lines),
    };
    let uart = Mutex::new(serial);
    let ends = Ends { end: Mutex::new(None), wake: wake.clone() };
    let threads = VcpuThreads::default();
    let cx = Cx { vm, vcpus, mode, kind, uart: &uart, ends: &ends, input: input.as_deref(), threads: &threads };
    std::thread::scope(|s| {
        for cpu in 1..vcpus {
            s.spawn(move || vcpu_loop(&cx, cpu));
        }
        if is_linux || vcpus > 1 {
            s.spawn(move || console_thread(&cx, &wake));
        }
        vcpu_loop(&cx, 0);
    });
    uart.lock().unwrap().writer_mut().finish().ok();
    let e = ends.end.lock().unwrap().clone().unwrap_or(End::Killed("no vCPU ended".into()));
    if mode == Mode::Detached {
        let _ = std::fs::write(daemon::status_path(vm.id), e.describe() + "\n");
        // A Linux guest that ended by itself stays, ended, for `uxenctl
        // list` and `console` to show, until it is destroyed.
        if is_linux && matches!(e, End::Exited(_) | End::Stopped(_)) && e != End::Stopped(stop::DESTROYED) {
            keep_until_destroyed(vm);
        }
        let _ = std::fs::remove_file(daemon::pid_path(vm.id));
        let _ = std::fs::remove_file(daemon::socket_path(vm.id));
    }
    e
}

/// Holds an ended VM's descriptor (and so the VM, with its final state)
/// until `uxenctl destroy` or a signal: RUN of an ended VM returns its
/// final record at once, and `destroyed` once it is gone.
fn keep_until_destroyed(vm: &Vm) {
    while !TERMINATE.load(Ordering::Acquire) {
        std::thread::sleep(std::time::Duration::from_millis(250));
        let mut run = abi::VmRun::default();
        match dev::run_fd(vm.raw_fd(), &mut run) {
            Ok(()) if run.exit.kind == exit::SHUTDOWN && run.exit.reason == stop::DESTROYED => return,
            Ok(()) => {}
            Err(e) if e.errno == libc::EINTR => {}
            Err(_) => return,
        }
    }
}

/// What the threads of one VMM share.
struct Cx<'a, T: Trigger> {
    vm: &'a Vm,
    vcpus: u32,
    mode: Mode,
    kind: Kind,
    uart: &'a Mutex<Uart<T>>,
    ends: &'a Ends,
    input: Option<&'a Input>,
    threads: &'a VcpuThreads,
}

impl<T: Trigger> Clone for Cx<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: Trigger> Copy for Cx<'_, T> {}

/// The VMM's console thread (Linux guests, and VMs of several vCPUs):
/// moves console input into the UART while the vCPUs sleep, writes a
/// partial line the guest has left alone, and once the VM has ended —
/// by a vCPU, a signal or Ctrl-A x — interrupts the RUN of every vCPU
/// still in one until all have returned.
fn console_thread<T: Trigger>(cx: &Cx<'_, T>, wake: &Wake) {
    loop {
        if TERMINATE.load(Ordering::Acquire) {
            cx.ends.finish(End::Killed("terminated by a signal".into()));
        }
        if cx.input.is_some_and(|i| i.quit_requested()) {
            cx.ends.finish(End::Killed("ended from the console (Ctrl-A x)".into()));
        }
        if cx.ends.is_set() {
            if cx.threads.live() == 0 {
                return;
            }
            cx.threads.kick();
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let partial = {
            let mut s = cx.uart.lock().unwrap();
            if let Some(i) = cx.input {
                i.pump(&mut s);
            }
            if matches!(cx.kind, Kind::Linux { .. }) {
                let _ = s.writer_mut().flush_if_idle(PARTIAL_LINE_IDLE);
                s.writer().has_partial()
            } else {
                false
            }
        };
        if partial {
            // Not woken early: a guest printing a long line would wake this
            // thread for every line otherwise.
            std::thread::sleep(PARTIAL_LINE_IDLE);
        } else if cx.input.is_some_and(|i| i.pending() > 0) {
            // Input the guest cannot take yet (its FIFO is full, or its
            // receive interrupt is off): look again soon. A vCPU thread
            // also refills the FIFO as the guest reads it.
            wake.wait(INPUT_RETRY);
        } else {
            wake.wait(Duration::from_secs(1));
        }
    }
}

fn vcpu_loop<T: Trigger>(cx: &Cx<'_, T>, cpu: u32) {
    let _registered = cx.threads.enter(cpu);
    let (vm, end) = (cx.vm, cx.ends);
    let is_linux = matches!(cx.kind, Kind::Linux { .. });
    let mut run = abi::VmRun { vcpu: cpu, ..Default::default() };
    loop {
        if end.is_set() {
            return;
        }
        match dev::run_fd(vm.raw_fd(), &mut run) {
            Err(e) if e.errno == libc::EINTR => {
                if TERMINATE.load(Ordering::Acquire) {
                    return end.finish(End::Killed("terminated by a signal".into()));
                }
                // RUN returned with no exit left to complete: the vCPU can
                // be forked as it stands, once every other one is out of
                // RUN too.
                if cpu == 0 && PENDING.load(Ordering::Acquire) {
                    let others = || cx.threads.live().saturating_sub(1);
                    let served = with_vcpus_held(others, || end.is_set(), || {
                        serve_requests(vm, cx.mode, cx.kind, cx.vcpus, uart_regs(&cx.uart.lock().unwrap().state()));
                    });
                    if !served {
                        fail_requests("the VM ended before it could be forked");
                    }
                } else if cpu != 0 {
                    park_for_fork();
                }
                continue;
            }
            Err(e) => return end.finish(End::Killed(format!("{e}"))),
            Ok(()) => {}
        }
        let x = run.exit;
        run.exit = abi::ExitRecord::default();
        // Console output the hypervisor batched (a Linux guest's polled
        // writes) comes before anything this exit says.
        let n = (run.console_len as usize).min(abi::CONSOLE_BATCH);
        if n > 0 {
            let mut s = cx.uart.lock().unwrap();
            for b in &run.console[..n] {
                let _ = s.write(0, *b);
            }
            run.console_len = 0;
        }
        match x.kind {
            exit::IO => {
                let port = x.port;
                if (guest::UART_PORT..guest::UART_PORT + 8).contains(&port) {
                    let off = (port - guest::UART_PORT) as u8;
                    let mut s = cx.uart.lock().unwrap();
                    if x.is_write != 0 {
                        let _ = s.write(off, x.data as u8);
                    } else {
                        run.exit.data = s.read(off) as u64;
                    }
                    // The guest may have made room in the FIFO or enabled
                    // the receive interrupt: refill at once.
                    if let Some(i) = cx.input {
                        i.pump(&mut s);
                    }
                } else if x.is_write == 0 {
                    // No device: reads float high, writes go nowhere.
                    run.exit.data = u64::MAX;
                }
            }
            // A PC's unclaimed physical addresses read as all ones; Linux
            // probes some. Test guests have no such excuse.
            exit::MMIO if is_linux => {
                if x.is_write == 0 {
                    run.exit.data = u64::MAX;
                }
            }
            exit::MMIO => {
                return end.finish(End::Killed(format!(
                    "{} of {} bytes at guest-physical {:#x}, where there is neither memory nor a device",
                    if x.is_write != 0 { "write" } else { "read" },
                    x.size,
                    x.addr
                )));
            }
            exit::HYPERCALL if x.hc_nr == ghc::FORK => {
                cx.uart.lock().unwrap().writer_mut().finish().ok();
                let regs = uart_regs(&cx.uart.lock().unwrap().state());
                run.exit.hc_ret = take_child(x.hc_args[0] as u32, x.hc_args[1] as i64, cx.mode, cx.kind, cx.vcpus, regs) as u64;
            }
            exit::HYPERCALL => run.exit.hc_ret = vmm_hypercall(x.hc_nr, x.hc_args) as u64,
            exit::GUEST_EXIT => return end.finish(End::Exited(x.data as u8)),
            exit::SHUTDOWN => return end.finish(End::Stopped(x.reason)),
            exit::HLT | exit::INTR if is_linux => {
                // The guest is idle: show what it printed last.
                let _ = cx.uart.lock().unwrap().writer_mut().finish();
            }
            exit::HLT | exit::INTR | exit::NONE => {}
            k => return end.finish(End::Killed(format!("unknown exit kind {k}"))),
        }
    }
}

/// Gives a forked child VM (descriptor `fd`, or `-errno`) its own VMM
/// process. Returns the child's id, or `-errno`.
fn take_child(id: u32, fd: i64, mode: Mode, kind: Kind, vcpus: u32, uart: UartRegs) -> i64 {
    if fd < 0 {
        return fd;
    }
    // SAFETY: the driver installed `fd` in this process for the child.
    let child = Vm { fd: unsafe { OwnedFd::from_raw_fd(fd as i32) }, id };
    match spawn_vmm(child, mode, kind, vcpus, Some(uart)) {
        Ok(()) => id as i64,
        Err(e) => -(e.raw_os_error().unwrap_or(libc::EAGAIN) as i64),
    }
}

/// Starts a VMM process for `vm` (a `kind` guest, which reads no standard
/// input there): this process forks and the child at once executes
/// `uxenctl __vmm-child`, handing it the descriptor. A VMM
/// has other threads (its control thread, other vCPUs), so a forked copy
/// that went on running Rust code could inherit a lock one of them held at
/// the fork, and hang on it for good; a fresh program holds none.
pub fn spawn_vmm(vm: Vm, mode: Mode, kind: Kind, vcpus: u32, uart: Option<UartRegs>) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::fd::AsRawFd;
    let exe = std::env::current_exe()?;
    let fd = vm.fd.as_raw_fd();
    let mode_arg = if mode == Mode::Detached { "detached" } else { "foreground" };
    // Everything the child needs is built before the fork: after it, the
    // child only makes async-signal-safe calls.
    let bad = |_| std::io::Error::from(std::io::ErrorKind::InvalidInput);
    let path = CString::new(exe.as_os_str().as_encoded_bytes()).map_err(bad)?;
    let mut args = vec!["uxenctl".to_string(), "__vmm-child".into(), fd.to_string(), vm.id.to_string(), mode_arg.to_string()];
    if matches!(kind, Kind::Linux { .. }) {
        args.push("--linux".into());
    }
    if vcpus != 1 {
        args.push("--vcpus".into());
        args.push(vcpus.to_string());
    }
    if let Some(u) = uart {
        args.push("--uart".into());
        args.push(u.iter().map(|b| format!("{b:02x}")).collect());
    }
    let args: Vec<CString> = args
        .into_iter()
        .map(|a| CString::new(a).map_err(bad))
        .collect::<Result<_, _>>()?;
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    // SAFETY: the child runs only fcntl, execv and _exit before it is a
    // new program.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: in the child: the descriptor must survive the exec.
        unsafe {
            libc::fcntl(fd, libc::F_SETFD, 0);
            libc::execv(path.as_ptr(), argv.as_ptr());
            libc::_exit(127);
        }
    }
    // The parent keeps running its own VM; the child's descriptor closes
    // here with `vm`.
    drop(vm);
    Ok(())
}

/// `uxenctl __vmm-child FD ID MODE [--linux] [--vcpus N] [--uart HEX]`:
/// runs the forked child VM
/// whose descriptor the parent's VMM passed; returns the exit status.
pub fn child_main(fd: i32, id: u32, detached: bool, linux: bool, vcpus: u32, uart: Option<UartRegs>) -> u8 {
    // SAFETY: F_GETFD only asks whether the descriptor is open.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        eprintln!("uxenctl: __vmm-child: descriptor {fd} is not open (only a VMM starts this command)");
        return 2;
    }
    // SAFETY: the parent's VMM handed this descriptor over at exec; it is
    // this process's alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain fcntl on our descriptor: children of this VMM must not
    // inherit it.
    unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::F_SETFD, libc::FD_CLOEXEC) };
    install_signal_handlers();
    let mode = if detached { Mode::Detached } else { Mode::Foreground };
    let kind = if linux { Kind::Linux { stdin: Stdin::No } } else { Kind::Test };
    let e = serve(Vm { fd, id }, vcpus, mode, kind, uart);
    if mode == Mode::Foreground && !matches!(e, End::Exited(_)) {
        eprintln!("uxenctl: vm {id} {}", e.describe());
    }
    std::io::stdout().flush().ok();
    e.status()
}

/// Longest request line the control socket reads: an `input` of
/// [`console::QUEUE_MAX`] bytes.
const REQUEST_MAX: u64 = 2 * console::QUEUE_MAX as u64 + 64;

/// The control socket of a detached VM: one request per connection,
/// `fork N`, `fork N copy` or `input HEX`; the answer is one line, `ok
/// ID:TSC ...` (forks), `ok` (input) or `err WHY`.
fn start_control(id: u32, input: Option<Arc<Input>>) {
    let path = daemon::socket_path(id);
    let _ = std::fs::remove_file(&path);
    let Ok(listener) = std::os::unix::net::UnixListener::bind(&path) else { return };
    // SAFETY: pthread_self of the vCPU 0 thread, signalled by the control
    // thread to interrupt RUN.
    let main = unsafe { libc::pthread_self() } as usize;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut line = String::new();
            let Ok(c) = conn.try_clone() else { continue };
            if std::io::BufReader::new(c.take(REQUEST_MAX)).read_line(&mut line).is_err() {
                continue;
            }
            match parse_request(&line) {
                Some(Request::Input(bytes)) => {
                    let _ = match &input {
                        Some(i) => match i.try_push(&bytes) {
                            Ok(()) => writeln!(&conn, "ok"),
                            Err(why) => writeln!(&conn, "err {why}"),
                        },
                        None => writeln!(&conn, "err vm {id} is a test guest: its console takes no input"),
                    };
                }
                // vCPU 0's thread serves forks while it is out of RUN,
                // once it has the other vCPUs out of RUN too.
                Some(Request::Fork { count, copy }) => {
                    REQUESTS.lock().unwrap().push(ForkRequest { count, copy, conn });
                    PENDING.store(true, Ordering::Release);
                    // The signal makes a RUN in progress return. One that
                    // lands while the thread is between two RUNs interrupts
                    // nothing, so it is sent again until the request is
                    // taken.
                    while PENDING.load(Ordering::Acquire) {
                        // SAFETY: interrupting vCPU 0's RUN.
                        unsafe { libc::pthread_kill(main as libc::pthread_t, libc::SIGUSR1) };
                        std::thread::sleep(std::time::Duration::from_millis(250));
                    }
                }
                None => {
                    let shown: String = line.trim().chars().take(80).collect();
                    let _ = writeln!(&conn, "err bad request: {shown}");
                }
            }
        }
    });
}

/// A request on the control socket.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// `fork N [copy]`, with N in 1..=VM_MAX_CHILDREN.
    Fork { count: u32, copy: bool },
    /// `input HEX`: bytes for the console's UART (a Linux guest), as an
    /// even number of hex digits.
    Input(Vec<u8>),
}

fn parse_request(line: &str) -> Option<Request> {
    let mut w = line.split_whitespace();
    let r = match w.next()? {
        "fork" => {
            let count: u32 = w.next()?.parse().ok()?;
            let copy = match w.next() {
                None => false,
                Some("copy") => true,
                Some(_) => return None,
            };
            (1..=abi::VM_MAX_CHILDREN).contains(&count).then_some(Request::Fork { count, copy })?
        }
        "input" => Request::Input(console::unhex(w.next()?)?),
        _ => return None,
    };
    w.next().is_none().then_some(r)
}

/// Serves queued fork requests while the vCPU is out of RUN.
fn serve_requests(vm: &Vm, mode: Mode, kind: Kind, vcpus: u32, uart: UartRegs) {
    let reqs: Vec<_> = {
        let mut q = REQUESTS.lock().unwrap();
        PENDING.store(false, Ordering::Release);
        std::mem::take(&mut *q)
    };
    for r in reqs {
        let mut done = Vec::new();
        let mut err = None;
        for _ in 0..r.count {
            match vm.fork_with(if r.copy { abi::FORK_COPY } else { 0 }) {
                Ok((child, tsc)) => {
                    let id = child.id;
                    if let Err(e) = spawn_vmm(child, mode, kind, vcpus, Some(uart)) {
                        err = Some(format!("cannot start a VMM for vm {id}: {e}"));
                        break;
                    }
                    done.push(format!("{id}:{tsc}"));
                }
                Err(e) => {
                    err = Some(format!("{e}"));
                    break;
                }
            }
        }
        let _ = match err {
            None => writeln!(&r.conn, "ok {}", done.join(" ")),
            Some(e) => writeln!(&r.conn, "err {e} (forked: {})", done.join(" ")),
        };
    }
}

/// Answers every queued fork request with `why`.
fn fail_requests(why: &str) {
    let reqs: Vec<_> = {
        let mut q = REQUESTS.lock().unwrap();
        PENDING.store(false, Ordering::Release);
        std::mem::take(&mut *q)
    };
    for r in reqs {
        let _ = writeln!(&r.conn, "err {why}");
    }
}

/// Hypercalls addressed to the VMM (docs/guest-abi.md).
fn vmm_hypercall(nr: u64, _args: [u64; 3]) -> i64 {
    match nr {
        // The VMM's ABI revision.
        ghc::VMM_FIRST => abi::ABI_REVISION as i64,
        _ => -abi::errno::ENOSYS,
    }
}

/// A child made by [`request_fork`], and the hypervisor's cost of making it.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Forked {
    pub id: u32,
    pub tsc: u64,
}

/// Asks the VMM of detached VM `id` for `n` forks (full copies with
/// `copy`); returns the children.
pub fn request_fork(id: u32, n: u32, copy: bool) -> anyhow::Result<Vec<Forked>> {
    let path = daemon::socket_path(id);
    let conn = std::os::unix::net::UnixStream::connect(&path)
        .map_err(|e| anyhow::anyhow!("cannot reach the VMM of vm {id} ({}: {e}); only VMs started with `uxenctl create` can be forked from outside", path.display()))?;
    writeln!(&conn, "fork {n}{}", if copy { " copy" } else { "" })?;
    let mut line = String::new();
    std::io::BufReader::new(&conn).read_line(&mut line)?;
    let parse = |w: &str| -> Option<Forked> {
        let (i, t) = w.split_once(':')?;
        Some(Forked { id: i.parse().ok()?, tsc: t.parse().ok()? })
    };
    match line.trim().split_once(' ') {
        Some(("ok", list)) => list.split_whitespace().map(|w| parse(w).ok_or_else(|| anyhow::anyhow!("bad reply from the VMM: {}", line.trim()))).collect(),
        _ if line.is_empty() => Err(anyhow::anyhow!("fork of vm {id} failed: the VMM closed the connection")),
        _ => Err(anyhow::anyhow!("fork of vm {id} failed: {}", line.trim().trim_start_matches("err "))),
    }
}

/// Sends `bytes` to the console of detached VM `id` (a Linux guest)
/// through its VMM.
pub fn request_input(id: u32, bytes: &[u8]) -> anyhow::Result<()> {
    if bytes.is_empty() {
        anyhow::bail!("nothing to send");
    }
    if bytes.len() > console::QUEUE_MAX {
        anyhow::bail!("{} bytes to send; at most {} at a time", bytes.len(), console::QUEUE_MAX);
    }
    let path = daemon::socket_path(id);
    let conn = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        anyhow::anyhow!("cannot reach the VMM of vm {id} ({}: {e}); only VMs started with `uxenctl create` take input this way", path.display())
    })?;
    writeln!(&conn, "input {}", console::hex(bytes))?;
    // A VMM answers at once; one that does not is stuck, and the caller
    // (often a script) must hear so rather than wait for good.
    conn.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    let mut line = String::new();
    std::io::BufReader::new(&conn).read_line(&mut line).map_err(|e| anyhow::anyhow!("the VMM of vm {id} did not answer the input request: {e}"))?;
    match line.trim() {
        "ok" => Ok(()),
        "" => Err(anyhow::anyhow!("cannot send to vm {id}: the VMM closed the connection")),
        l => Err(anyhow::anyhow!("cannot send to vm {id}: {}", l.trim_start_matches("err "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that records each write it gets.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn console_writes_whole_lines() {
        let w = Writes::default();
        let mut l = Lines::new(Box::new(w.clone()));
        for b in b"hello\nwor" {
            l.write_all(&[*b]).unwrap();
            l.flush().unwrap();
        }
        assert_eq!(*w.0.lock().unwrap(), vec![b"hello\n".to_vec()]);
        l.write_all(b"ld\nand more").unwrap();
        l.finish().unwrap();
        assert_eq!(*w.0.lock().unwrap(), vec![b"hello\n".to_vec(), b"world\n".to_vec(), b"and more".to_vec()]);
        // A line that never ends is written in pieces, not held forever.
        let w2 = Writes::default();
        let mut l2 = Lines::new(Box::new(w2.clone()));
        l2.write_all(&[b'x'; 5000]).unwrap();
        assert_eq!(w2.0.lock().unwrap()[0].len(), 5000);
    }

    #[test]
    fn a_forked_uart_keeps_its_registers_but_not_the_parents_input() {
        let mut parent = SerialState::default();
        parent.interrupt_enable = 0x05;
        parent.line_control = 0x03;
        parent.modem_control = 0x0b;
        parent.scratch = 0x5a;
        parent.line_status = 0x61;
        parent.interrupt_identification = 0xc4;
        parent.in_buffer = b"typed to the parent".to_vec();
        let child = uart_state(&uart_regs(&parent));
        assert_eq!((child.interrupt_enable, child.line_control, child.modem_control, child.scratch), (0x05, 0x03, 0x0b, 0x5a));
        assert!(child.in_buffer.is_empty());
        assert_eq!(child.line_status, 0x60, "no data ready");
        assert_eq!(child.interrupt_identification, 0xc1, "no received-data interrupt pending; FIFO bits kept");
        parent.interrupt_identification = 0xc2;
        assert_eq!(uart_state(&uart_regs(&parent)).interrupt_identification, 0xc2, "a transmit interrupt stays");
        let hex: String = uart_regs(&parent).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(parse_uart_regs(&hex), Ok(uart_regs(&parent)));
    }

    #[test]
    fn control_requests() {
        assert_eq!(parse_request("fork 3\n"), Some(Request::Fork { count: 3, copy: false }));
        assert_eq!(parse_request("fork 64 copy"), Some(Request::Fork { count: 64, copy: true }));
        assert_eq!(parse_request("input 6c730a\n"), Some(Request::Input(b"ls\n".to_vec())));
        assert_eq!(parse_request("input 00FF"), Some(Request::Input(vec![0, 0xff])));
        let bad = [
            "fork 0", "fork 65", "fork", "fork x", "fork 2 copy now", "fork 2 share", "destroy 1", "", "input", "input 6",
            "input 6g", "input 6c 73", "input ls", "inputs 6c",
        ];
        for b in bad {
            assert_eq!(parse_request(b), None, "{b:?}");
        }
    }

    #[test]
    fn console_input_through_the_control_socket() {
        let dir = std::env::temp_dir().join(format!("uxenctl-test-{}-run", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // SAFETY: no other test reads or writes the environment.
        unsafe { std::env::set_var("UXEN_RUN_DIR", &dir) };
        let input = Input::new(Arc::new(Wake::default()));
        start_control(901, Some(input.clone()));
        request_input(901, b"echo hi\n").unwrap();
        request_input(901, &[0, 0xff]).unwrap();
        assert_eq!(input.pending(), 10);
        assert_eq!(request_input(901, b"").unwrap_err().to_string(), "nothing to send");
        start_control(902, None);
        let e = request_input(902, b"x").unwrap_err().to_string();
        assert_eq!(e, "cannot send to vm 902: vm 902 is a test guest: its console takes no input");
        assert!(request_input(903, b"x").unwrap_err().to_string().starts_with("cannot reach the VMM of vm 903"));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn exit_status() {
        assert_eq!(End::Exited(7).status(), 7);
        assert_eq!(End::Exited(0).status(), 0, "a Linux guest's power-off");
        assert_eq!(End::Stopped(stop::TRIPLE_FAULT).status(), 70);
        assert_eq!(End::Stopped(stop::REBOOT).status(), 71);
        assert_eq!(End::Stopped(stop::PANIC).status(), 72);
        assert_eq!(End::Killed("x".into()).status(), 70);
        assert_eq!(End::Stopped(stop::TRIPLE_FAULT).describe(), "stopped: triple-fault");
        assert_eq!(End::Stopped(stop::REBOOT).describe(), "rebooted");
        assert_eq!(End::Stopped(stop::PANIC).describe(), "kernel panic");
        assert_eq!(End::Killed("ended from the console (Ctrl-A x)".into()).describe(), "stopped by the VMM: ended from the console (Ctrl-A x)");
    }

    #[test]
    fn partial_lines_are_written_once_the_guest_is_quiet() {
        let w = Writes::default();
        let mut l = Lines::new(Box::new(w.clone()));
        let wake = Arc::new(Wake::default());
        l.wake = Some(wake.clone());
        l.write_all(b"boot\n/ # ").unwrap();
        assert!(l.has_partial());
        // Not yet: the guest may still be writing the line.
        l.flush_if_idle(Duration::from_secs(3600)).unwrap();
        assert_eq!(*w.0.lock().unwrap(), vec![b"boot\n".to_vec()]);
        std::thread::sleep(Duration::from_millis(5));
        l.flush_if_idle(Duration::from_millis(1)).unwrap();
        assert_eq!(*w.0.lock().unwrap(), vec![b"boot\n".to_vec(), b"/ # ".to_vec()]);
        assert!(!l.has_partial());
        // The start of a partial line wakes the console thread at once.
        let t = Instant::now();
        l.write_all(b"x").unwrap();
        wake.wait(Duration::from_secs(10));
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
