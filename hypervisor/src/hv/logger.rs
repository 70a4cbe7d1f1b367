//! The `log` backend: lines go to the log ring, which the driver forwards to
//! dmesg with the `uxen:` prefix.

use crate::logring::RingWriter;
use core::fmt::Write;

static RING: spin::Mutex<Option<RingWriter>> = spin::Mutex::new(None);

/// Also write every line to port 0xe9 (the Bochs and QEMU debug console).
pub static E9: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

struct Logger;

static LOGGER: Logger = Logger;

/// A fixed-size line buffer; formatting never allocates.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - 1 - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl log::Log for Logger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let mut line = Line { buf: [0; 256], len: 0 };
        let level = match record.level() {
            log::Level::Error => "error: ",
            log::Level::Warn => "warning: ",
            _ => "",
        };
        let _ = write!(line, "hv: {level}{}", record.args());
        line.buf[line.len] = b'\n';
        line.len += 1;
        if E9.load(core::sync::atomic::Ordering::Relaxed) {
            for &b in &line.buf[..line.len] {
                // SAFETY: the emulator's debug port; enabled only on request.
                unsafe { crate::arch::x86::instr::outb(0xe9, b) };
            }
        }
        // A panic on a CPU that holds the lock must still get its line out.
        for _ in 0..1_000_000 {
            if let Some(mut g) = RING.try_lock() {
                if let Some(w) = g.as_mut() {
                    w.write(&line.buf[..line.len]);
                }
                return;
            }
            core::hint::spin_loop();
        }
    }

    fn flush(&self) {}
}

/// Starts logging into the ring at `base` (`len` bytes).
///
/// # Safety
/// As `RingWriter::init`.
pub unsafe fn init(base: *mut u8, len: usize) {
    // SAFETY: per the caller's contract.
    *RING.lock() = unsafe { RingWriter::init(base, len) };
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
}
