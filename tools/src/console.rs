//! Console input for Linux guests: the queue of bytes waiting for the
//! guest's UART, standard input (with the terminal in raw mode and the
//! Ctrl-A escapes), and the text of `uxenctl console --send`.
//!
//! Bytes are never dropped. They wait in an [`Input`] queue until the
//! UART's 64-byte receive FIFO has room and the guest has enabled the
//! receive interrupt (so that nothing is lost to a driver that resets the
//! port while it starts); whoever touches the UART next moves them in: a
//! vCPU thread after each UART access, or the VMM's console thread.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

/// Most bytes waiting for the guest; a `console --send` beyond that is
/// refused rather than held without bound.
pub const QUEUE_MAX: usize = 1 << 20;
/// Standard input is not read ahead further than this: a script that
/// pipes in a large file waits for the guest instead of filling memory.
const STDIN_AHEAD: usize = 64 << 10;
/// IER bit 0: the guest wants "received data available" interrupts.
const IER_RDA: u8 = 1;

/// Ctrl-A: the first key of the terminal escapes (as in QEMU).
pub const ESCAPE: u8 = 0x01;
/// Printed for Ctrl-A h, in raw mode (hence the carriage returns).
const HELP: &str = "\r\nuxenctl console: Ctrl-A x ends the VM; Ctrl-A Ctrl-A sends Ctrl-A; Ctrl-A h prints this\r\n";

/// Parses the TEXT of `console --send`: `\n`, `\r`, `\t`, `\\` and `\xHH`
/// are escapes, every other character stands for itself (its UTF-8
/// bytes).
pub fn parse_escapes(text: &str) -> Result<Vec<u8>, String> {
    const KNOWN: &str = "the escapes are \\n, \\r, \\t, \\\\ and \\xHH";
    let mut out = Vec::with_capacity(text.len());
    let mut it = text.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            let mut b = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            continue;
        }
        match it.next() {
            Some('n') => out.push(b'\n'),
            Some('r') => out.push(b'\r'),
            Some('t') => out.push(b'\t'),
            Some('\\') => out.push(b'\\'),
            Some('x') => {
                let hi = it.next().and_then(|c| c.to_digit(16));
                let lo = it.next().and_then(|c| c.to_digit(16));
                match (hi, lo) {
                    (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
                    _ => return Err(format!("bad escape in --send TEXT: \\x takes two hex digits, as in \\x1b ({KNOWN})")),
                }
            }
            Some(o) => return Err(format!("bad escape `\\{o}` in --send TEXT: {KNOWN}")),
            None => return Err(format!("--send TEXT ends with a lone backslash: {KNOWN}")),
        }
    }
    Ok(out)
}

/// Bytes as lowercase hex (the `input` request of the control socket).
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The reverse of [`hex`]: `None` unless `s` is a non-empty, even number
/// of hex digits.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(2) || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

/// A sticky wake-up for the VMM's console thread: a notification made
/// while it is busy is kept until its next wait.
#[derive(Default)]
pub struct Wake {
    flag: Mutex<bool>,
    cv: Condvar,
}

impl Wake {
    pub fn notify(&self) {
        *self.flag.lock().unwrap() = true;
        self.cv.notify_all();
    }

    /// Waits for a notification, at most `t`.
    pub fn wait(&self, t: Duration) {
        let g = self.flag.lock().unwrap();
        let (mut g, _) = self.cv.wait_timeout_while(g, t, |f| !*f).unwrap();
        *g = false;
    }
}

/// Bytes on their way to the guest's UART.
pub struct Input {
    q: Mutex<VecDeque<u8>>,
    /// Signalled when the guest took bytes.
    room: Condvar,
    /// `q.len()`, readable without the lock (vCPU threads look at it after
    /// every UART access).
    len: AtomicUsize,
    /// Ctrl-A x was typed.
    quit: AtomicBool,
    wake: Arc<Wake>,
}

impl Input {
    pub fn new(wake: Arc<Wake>) -> Arc<Input> {
        Arc::new(Input { q: Mutex::new(VecDeque::new()), room: Condvar::new(), len: AtomicUsize::new(0), quit: AtomicBool::new(false), wake })
    }

    /// Bytes waiting.
    pub fn pending(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn quit_requested(&self) -> bool {
        self.quit.load(Ordering::Acquire)
    }

    fn request_quit(&self) {
        self.quit.store(true, Ordering::Release);
        self.wake.notify();
    }

    /// Queues `b`, first waiting while [`STDIN_AHEAD`] bytes or more are
    /// queued (standard input).
    pub fn push_wait(&self, b: &[u8]) {
        let mut q = self.q.lock().unwrap();
        while q.len() >= STDIN_AHEAD {
            q = self.room.wait(q).unwrap();
        }
        q.extend(b);
        self.len.store(q.len(), Ordering::Release);
        drop(q);
        self.wake.notify();
    }

    /// Queues all of `b`, or nothing if that would exceed [`QUEUE_MAX`]
    /// (the control socket, which must not block).
    pub fn try_push(&self, b: &[u8]) -> Result<(), String> {
        let mut q = self.q.lock().unwrap();
        if q.len() + b.len() > QUEUE_MAX {
            return Err(format!("the console input queue is full ({} bytes wait for the guest to read them)", q.len()));
        }
        q.extend(b);
        self.len.store(q.len(), Ordering::Release);
        drop(q);
        self.wake.notify();
        Ok(())
    }

    /// Moves what fits into the UART's receive FIFO, if the guest listens;
    /// the UART raises its interrupt.
    pub fn pump<T: Trigger, W: Write>(&self, s: &mut Serial<T, NoEvents, W>) {
        if self.pending() == 0 || s.fifo_capacity() == 0 || s.state().interrupt_enable & IER_RDA == 0 {
            return;
        }
        let chunk: Vec<u8> = {
            let mut q = self.q.lock().unwrap();
            let n = s.fifo_capacity().min(q.len());
            let c = q.drain(..n).collect();
            self.len.store(q.len(), Ordering::Release);
            c
        };
        self.room.notify_all();
        // It fits (the capacity was checked); a failed interrupt leaves the
        // bytes in the FIFO for the guest's next look.
        let _ = s.enqueue_raw_bytes(&chunk);
    }
}

/// What the terminal escapes ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Quit,
    Help,
}

/// The Ctrl-A escapes of a terminal: Ctrl-A x ends the VM, Ctrl-A Ctrl-A
/// sends one Ctrl-A, Ctrl-A h prints the escapes; Ctrl-A and any other key
/// sends both.
#[derive(Default)]
pub struct Escapes {
    armed: bool,
}

impl Escapes {
    /// Takes one key: what goes to the guest is appended to `out`.
    pub fn key(&mut self, b: u8, out: &mut Vec<u8>) -> Option<Command> {
        if !self.armed {
            if b == ESCAPE {
                self.armed = true;
            } else {
                out.push(b);
            }
            return None;
        }
        self.armed = false;
        match b {
            b'x' | b'X' => Some(Command::Quit),
            b'h' | b'H' | b'?' => Some(Command::Help),
            ESCAPE => {
                out.push(ESCAPE);
                None
            }
            other => {
                out.extend_from_slice(&[ESCAPE, other]);
                None
            }
        }
    }
}

/// Reads standard input into `input` on a thread of its own, until end of
/// file (the VM runs on) or Ctrl-A x (with `escapes`, for a terminal). The
/// thread is not joined: it may sit in `read` after the VM has ended.
pub fn spawn_stdin_reader(input: Arc<Input>, escapes: bool) {
    let body = move || {
        let mut esc = Escapes::default();
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reading into our own buffer, at most its length.
            let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return;
            }
            if n == 0 {
                return;
            }
            let chunk = &buf[..n as usize];
            if !escapes {
                input.push_wait(chunk);
                continue;
            }
            let mut out = Vec::with_capacity(chunk.len());
            for &b in chunk {
                match esc.key(b, &mut out) {
                    Some(Command::Quit) => {
                        if !out.is_empty() {
                            input.push_wait(&out);
                        }
                        input.request_quit();
                        return;
                    }
                    Some(Command::Help) => {
                        let _ = std::io::stderr().write_all(HELP.as_bytes());
                    }
                    None => {}
                }
            }
            if !out.is_empty() {
                input.push_wait(&out);
            }
        }
    };
    let _ = std::thread::Builder::new().name("stdin".into()).spawn(body);
}

/// What standard input is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StdinKind {
    /// A terminal, and this process is in its foreground: raw mode and the
    /// escapes.
    Terminal,
    /// A terminal whose foreground is another process group (`uxenctl run
    /// ... &`): reading it would stop this process, so it is left alone.
    Background,
    /// A pipe, a file, /dev/null: read as it is.
    Other,
}

pub fn stdin_kind() -> StdinKind {
    // SAFETY: isatty, tcgetpgrp and getpgrp only ask.
    unsafe {
        if libc::isatty(0) == 0 {
            StdinKind::Other
        } else if libc::tcgetpgrp(0) != libc::getpgrp() {
            StdinKind::Background
        } else {
            StdinKind::Terminal
        }
    }
}

/// The terminal settings to restore, while raw mode is on.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

fn restore_terminal() {
    // try_lock: this also runs in the panic hook, which may have
    // interrupted a holder of the lock.
    if let Ok(mut g) = SAVED.try_lock() {
        if let Some(t) = g.take() {
            // SAFETY: restoring settings tcgetattr gave us.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        }
    }
}

/// Standard input in raw mode (every key goes to the guest, Ctrl-C
/// included) for as long as this lives. Output processing stays on, as in
/// QEMU, so that the VMM's own messages still start at the left margin.
/// The settings come back when it is dropped, and on a panic.
pub struct RawTerminal(());

impl RawTerminal {
    /// `None` if standard input is not a terminal or refuses raw mode.
    pub fn enter() -> Option<RawTerminal> {
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 and a termios of ours.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return None;
        }
        let saved = t;
        // SAFETY: cfmakeraw edits the structure it is given.
        unsafe { libc::cfmakeraw(&mut t) };
        t.c_oflag |= libc::OPOST;
        t.c_cc[libc::VMIN] = 1;
        t.c_cc[libc::VTIME] = 0;
        // SAFETY: fd 0 and a termios of ours.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) } != 0 {
            return None;
        }
        *SAVED.lock().unwrap() = Some(saved);
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore_terminal();
                previous(info);
            }));
        });
        Some(RawTerminal(()))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore_terminal();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_escape() {
        assert_eq!(parse_escapes("ls -l\\n").unwrap(), b"ls -l\n");
        assert_eq!(parse_escapes("a\\rb\\tc\\\\d").unwrap(), b"a\rb\tc\\d");
        assert_eq!(parse_escapes("\\x03\\x1b[A\\xfF\\x00").unwrap(), b"\x03\x1b[A\xff\x00");
        assert_eq!(parse_escapes("plain").unwrap(), b"plain");
        assert_eq!(parse_escapes("").unwrap(), b"");
        assert_eq!(parse_escapes("caf\u{e9}").unwrap(), "caf\u{e9}".as_bytes());
    }

    #[test]
    fn bad_escapes() {
        let e = parse_escapes("echo \\q").unwrap_err();
        assert_eq!(e, "bad escape `\\q` in --send TEXT: the escapes are \\n, \\r, \\t, \\\\ and \\xHH");
        for bad in ["\\x", "\\x1", "\\xg0", "\\x0g", "\\x-1"] {
            assert!(parse_escapes(bad).unwrap_err().contains("\\x takes two hex digits"), "{bad}");
        }
        assert!(parse_escapes("tail\\").unwrap_err().contains("lone backslash"));
        assert!(parse_escapes("\\0").unwrap_err().contains("`\\0`"));
        assert!(parse_escapes("\\\u{e9}").unwrap_err().contains("`\\\u{e9}`"));
    }

    #[test]
    fn hex_round_trip() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(unhex(&hex(&all)).unwrap(), all);
        assert_eq!(hex(b"hi\n"), "68690a");
        assert_eq!(unhex("68690A").unwrap(), b"hi\n");
        for bad in ["", "6", "6g", "68 69", "+1"] {
            assert_eq!(unhex(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn terminal_escapes() {
        let run = |keys: &[u8]| {
            let mut e = Escapes::default();
            let mut out = Vec::new();
            let cmds: Vec<_> = keys.iter().filter_map(|&k| e.key(k, &mut out)).collect();
            (out, cmds)
        };
        assert_eq!(run(b"ls\r"), (b"ls\r".to_vec(), vec![]));
        assert_eq!(run(b"a\x01xb"), (b"ab".to_vec(), vec![Command::Quit]));
        assert_eq!(run(b"\x01\x01"), (vec![ESCAPE], vec![]));
        assert_eq!(run(b"\x01c"), (vec![ESCAPE, b'c'], vec![]));
        assert_eq!(run(b"\x01h"), (vec![], vec![Command::Help]));
        assert_eq!(run(b"\x01X"), (vec![], vec![Command::Quit]));
        // A Ctrl-A at the end of one read is still armed at the next.
        let mut e = Escapes::default();
        let mut out = Vec::new();
        assert_eq!(e.key(ESCAPE, &mut out), None);
        assert_eq!(e.key(b'x', &mut out), Some(Command::Quit));
        assert!(out.is_empty());
    }

    /// A UART output sink that drops everything.
    struct Sink;
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Counts the interrupts the UART raises.
    #[derive(Default)]
    struct Count(AtomicUsize);
    impl Trigger for &Count {
        type E = ();
        fn trigger(&self) -> Result<(), ()> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    #[test]
    fn input_waits_for_the_guest_and_is_never_dropped() {
        let irqs = Count::default();
        let mut s = Serial::new(&irqs, Sink);
        let input = Input::new(Arc::new(Wake::default()));
        let data: Vec<u8> = (0..200u8).collect();
        input.push_wait(&data);
        // The receive interrupt is off: nothing moves.
        input.pump(&mut s);
        assert_eq!((input.pending(), s.fifo_capacity()), (200, 64));
        s.write(1, IER_RDA).unwrap();
        let mut got = Vec::new();
        while got.len() < 200 {
            input.pump(&mut s);
            // The guest drains the FIFO while the data-ready bit is set.
            while s.read(5) & 1 != 0 {
                got.push(s.read(0));
            }
        }
        assert_eq!(got, data);
        assert_eq!(input.pending(), 0);
        assert!(irqs.0.load(Ordering::Relaxed) >= 4, "one interrupt per refill");
        assert!(input.try_push(&vec![0; QUEUE_MAX]).is_ok());
        assert!(input.try_push(&[1]).unwrap_err().contains("queue is full"));
        assert_eq!(input.pending(), QUEUE_MAX);
    }
}
