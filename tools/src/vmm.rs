//! The VMM: runs a VM's vCPUs, emulates its console UART, answers fork
//! requests, and reports how the VM ended.

use crate::daemon;
use crate::dev::{self, Vm};
use shared_abi::{self as abi, exit, ghc, guest, stop};
use std::io::{BufRead, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

/// The UART raises no interrupts: guests poll.
pub struct NoIrq;

impl Trigger for NoIrq {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

type Uart = Serial<NoIrq, NoEvents, Lines>;

/// The console sink: whole lines, each in one write, so that the consoles
/// of VMs sharing a terminal (a guest and the children it forks) do not
/// interleave mid-line. The UART flushes after every byte; only a newline,
/// a long line or the end of the VM writes.
pub struct Lines {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
}

impl Lines {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Lines { out, line: Vec::new() }
    }

    /// Writes what is pending, newline or not (the VM ended).
    pub fn finish(&mut self) -> std::io::Result<()> {
        if !self.line.is_empty() {
            self.out.write_all(&self.line)?;
            self.line.clear();
        }
        self.out.flush()
    }
}

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        if self.line.contains(&b'\n') || self.line.len() >= 4096 {
            let cut = self.line.iter().rposition(|&b| b == b'\n').map(|i| i + 1).unwrap_or(self.line.len());
            self.out.write_all(&self.line[..cut])?;
            self.out.flush()?;
            self.line.drain(..cut);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The guest ended itself with this code.
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
            End::Stopped(r) => format!("stopped: {}", stop::name(*r)),
            End::Killed(why) => format!("stopped by the VMM: {why}"),
        }
    }

    /// The process exit status `uxenctl run` reports.
    pub fn status(&self) -> u8 {
        match self {
            End::Exited(c) => *c,
            End::Stopped(_) | End::Killed(_) => 70,
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

/// Set by SIGINT/SIGTERM: the VM is torn down.
pub static TERMINATE: AtomicBool = AtomicBool::new(false);
/// A fork request from the control socket: how many, full copies or not.
struct Request {
    count: u32,
    copy: bool,
    conn: std::os::unix::net::UnixStream,
}

/// Set by the control thread: vCPU 0 has fork requests to serve.
static REQUESTS: Mutex<Vec<Request>> = Mutex::new(Vec::new());
/// Set while `REQUESTS` holds a request vCPU 0's thread has not taken.
static PENDING: AtomicBool = AtomicBool::new(false);

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

/// Runs `vm` until it ends. In detached mode this also writes the console,
/// status and pid files and serves the control socket.
pub fn serve(vm: Vm, vcpus: u32, mode: Mode) -> End {
    let out: Box<dyn Write + Send> = match mode {
        Mode::Foreground => Box::new(std::io::stdout()),
        Mode::Detached => match std::fs::File::create(daemon::console_path(vm.id)) {
            Ok(f) => Box::new(f),
            Err(e) => return End::Killed(format!("cannot create the console file: {e}")),
        },
    };
    if mode == Mode::Detached {
        let _ = std::fs::write(daemon::pid_path(vm.id), std::process::id().to_string());
        let _ = std::fs::remove_file(daemon::status_path(vm.id));
        start_control(vm.id, vcpus);
    }
    let uart = Arc::new(Mutex::new(Serial::new(NoIrq, Lines::new(out))));
    let end: Arc<Mutex<Option<End>>> = Arc::new(Mutex::new(None));
    let vm = &vm;
    std::thread::scope(|s| {
        for cpu in 1..vcpus {
            let (uart, end) = (uart.clone(), end.clone());
            s.spawn(move || vcpu_loop(vm, cpu, vcpus, mode, &uart, &end));
        }
        vcpu_loop(vm, 0, vcpus, mode, &uart, &end);
    });
    uart.lock().unwrap().writer_mut().finish().ok();
    let e = end.lock().unwrap().clone().unwrap_or(End::Killed("no vCPU ended".into()));
    if mode == Mode::Detached {
        let _ = std::fs::write(daemon::status_path(vm.id), e.describe() + "\n");
        let _ = std::fs::remove_file(daemon::pid_path(vm.id));
        let _ = std::fs::remove_file(daemon::socket_path(vm.id));
    }
    e
}

fn finish(end: &Mutex<Option<End>>, e: End) {
    let mut g = end.lock().unwrap();
    if g.is_none() {
        *g = Some(e);
    }
}

fn vcpu_loop(vm: &Vm, cpu: u32, vcpus: u32, mode: Mode, uart: &Mutex<Uart>, end: &Mutex<Option<End>>) {
    let mut run = abi::VmRun { vcpu: cpu, ..Default::default() };
    loop {
        if end.lock().unwrap().is_some() {
            return;
        }
        match dev::run_fd(vm.raw_fd(), &mut run) {
            Err(e) if e.errno == libc::EINTR => {
                if TERMINATE.load(Ordering::Acquire) {
                    return finish(end, End::Killed("terminated by a signal".into()));
                }
                // RUN returned with no exit left to complete: the vCPU can
                // be forked as it stands.
                if cpu == 0 && vcpus == 1 && PENDING.load(Ordering::Acquire) {
                    serve_requests(vm, mode);
                }
                continue;
            }
            Err(e) => return finish(end, End::Killed(format!("{e}"))),
            Ok(()) => {}
        }
        let x = run.exit;
        run.exit = abi::ExitRecord::default();
        match x.kind {
            exit::IO => {
                let port = x.port;
                if (guest::UART_PORT..guest::UART_PORT + 8).contains(&port) {
                    let off = (port - guest::UART_PORT) as u8;
                    let mut s = uart.lock().unwrap();
                    if x.is_write != 0 {
                        let _ = s.write(off, x.data as u8);
                    } else {
                        run.exit.data = s.read(off) as u64;
                    }
                } else if x.is_write == 0 {
                    // No device: reads float high, writes go nowhere.
                    run.exit.data = u64::MAX;
                }
            }
            exit::MMIO => {
                return finish(
                    end,
                    End::Killed(format!(
                        "{} of {} bytes at guest-physical {:#x}, where there is neither memory nor a device",
                        if x.is_write != 0 { "write" } else { "read" },
                        x.size,
                        x.addr
                    )),
                );
            }
            exit::HYPERCALL if x.hc_nr == ghc::FORK => {
                uart.lock().unwrap().writer_mut().finish().ok();
                run.exit.hc_ret = take_child(x.hc_args[0] as u32, x.hc_args[1] as i64, mode) as u64;
            }
            exit::HYPERCALL => run.exit.hc_ret = vmm_hypercall(x.hc_nr, x.hc_args) as u64,
            exit::GUEST_EXIT => return finish(end, End::Exited(x.data as u8)),
            exit::SHUTDOWN => return finish(end, End::Stopped(x.reason)),
            exit::HLT | exit::INTR | exit::NONE => {}
            k => return finish(end, End::Killed(format!("unknown exit kind {k}"))),
        }
    }
}

/// Gives a forked child VM (descriptor `fd`, or `-errno`) its own VMM
/// process. Returns the child's id, or `-errno`.
fn take_child(id: u32, fd: i64, mode: Mode) -> i64 {
    if fd < 0 {
        return fd;
    }
    // SAFETY: the driver installed `fd` in this process for the child.
    let child = Vm { fd: unsafe { OwnedFd::from_raw_fd(fd as i32) }, id };
    match spawn_vmm(child, mode) {
        Ok(()) => id as i64,
        Err(e) => -(e.raw_os_error().unwrap_or(libc::EAGAIN) as i64),
    }
}

/// Starts a VMM process for `vm`: this process forks and the child at
/// once executes `uxenctl __vmm-child`, handing it the descriptor. A VMM
/// has other threads (its control thread, other vCPUs), so a forked copy
/// that went on running Rust code could inherit a lock one of them held at
/// the fork, and hang on it for good; a fresh program holds none.
pub fn spawn_vmm(vm: Vm, mode: Mode) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::fd::AsRawFd;
    let exe = std::env::current_exe()?;
    let fd = vm.fd.as_raw_fd();
    let mode_arg = if mode == Mode::Detached { "detached" } else { "foreground" };
    // Everything the child needs is built before the fork: after it, the
    // child only makes async-signal-safe calls.
    let bad = |_| std::io::Error::from(std::io::ErrorKind::InvalidInput);
    let path = CString::new(exe.as_os_str().as_encoded_bytes()).map_err(bad)?;
    let args: Vec<CString> = ["uxenctl".to_string(), "__vmm-child".into(), fd.to_string(), vm.id.to_string(), mode_arg.to_string()]
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

/// `uxenctl __vmm-child FD ID MODE`: runs the forked child VM whose
/// descriptor the parent's VMM passed; returns the exit status.
pub fn child_main(fd: i32, id: u32, detached: bool) -> u8 {
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
    let e = serve(Vm { fd, id }, 1, mode);
    if mode == Mode::Foreground && !matches!(e, End::Exited(_)) {
        eprintln!("uxenctl: vm {id} {}", e.describe());
    }
    std::io::stdout().flush().ok();
    e.status()
}

/// The control socket of a detached VM: one request per connection,
/// `fork N` or `fork N copy`; the answer is one line, `ok ID:TSC ...` or
/// `err WHY`.
fn start_control(id: u32, vcpus: u32) {
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
            if std::io::BufReader::new(c).read_line(&mut line).is_err() {
                continue;
            }
            match parse_request(&line) {
                // vCPU 0's thread serves forks while it is out of RUN; the
                // other vCPUs would have to leave RUN too.
                Some(_) if vcpus != 1 => {
                    let _ = writeln!(&conn, "err vm {id} has {vcpus} vCPUs; only single-vCPU VMs can be forked from outside");
                }
                Some((count, copy)) => {
                    REQUESTS.lock().unwrap().push(Request { count, copy, conn });
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
                    let _ = writeln!(&conn, "err bad request: {}", line.trim());
                }
            }
        }
    });
}

/// `fork N [copy]`, with N in 1..=VM_MAX_CHILDREN.
fn parse_request(line: &str) -> Option<(u32, bool)> {
    let mut w = line.split_whitespace();
    if w.next()? != "fork" {
        return None;
    }
    let n: u32 = w.next()?.parse().ok()?;
    let copy = match w.next() {
        None => false,
        Some("copy") => true,
        Some(_) => return None,
    };
    (w.next().is_none() && (1..=abi::VM_MAX_CHILDREN).contains(&n)).then_some((n, copy))
}

/// Serves queued fork requests while the vCPU is out of RUN.
fn serve_requests(vm: &Vm, mode: Mode) {
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
                    if let Err(e) = spawn_vmm(child, mode) {
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
    fn control_requests() {
        assert_eq!(parse_request("fork 3\n"), Some((3, false)));
        assert_eq!(parse_request("fork 64 copy"), Some((64, true)));
        for bad in ["fork 0", "fork 65", "fork", "fork x", "fork 2 copy now", "fork 2 share", "destroy 1", ""] {
            assert_eq!(parse_request(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn exit_status() {
        assert_eq!(End::Exited(7).status(), 7);
        assert_eq!(End::Stopped(stop::TRIPLE_FAULT).status(), 70);
        assert_eq!(End::Killed("x".into()).status(), 70);
        assert_eq!(End::Stopped(stop::TRIPLE_FAULT).describe(), "stopped: triple-fault");
    }
}
