//! The VMM: runs a VM's vCPUs, emulates its console UART, and reports how
//! the VM ended.

use crate::dev::{self, Vm};
use anyhow::Result;
use shared_abi::{self as abi, exit, ghc, guest, stop};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vm_superio::{Serial, Trigger};

/// The UART raises no interrupts: guests poll.
pub struct NoIrq;

impl Trigger for NoIrq {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
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

/// Set by SIGINT/SIGTERM: the VM is torn down.
pub static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    TERMINATE.store(true, Ordering::Release);
}

/// Makes SIGINT/SIGTERM interrupt RUN (no SA_RESTART) and request the end.
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1] {
        // SAFETY: a plain handler that only stores to an atomic.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = if sig == libc::SIGUSR1 { noop as *const () as usize } else { on_signal as *const () as usize };
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

extern "C" fn noop(_: libc::c_int) {}

/// Runs every vCPU of `vm` until the VM ends; console output goes to `out`.
pub fn run(vm: &Vm, vcpus: u32, out: Box<dyn Write + Send>) -> Result<End> {
    let serial = Arc::new(Mutex::new(Serial::new(NoIrq, out)));
    let end: Arc<Mutex<Option<End>>> = Arc::new(Mutex::new(None));
    let fd = vm.raw_fd();
    std::thread::scope(|s| {
        for cpu in 1..vcpus {
            let serial = serial.clone();
            let end = end.clone();
            s.spawn(move || vcpu_loop(fd, cpu, &serial, &end));
        }
        vcpu_loop(fd, 0, &serial, &end);
    });
    serial.lock().unwrap().writer_mut().flush().ok();
    let e = end.lock().unwrap().clone();
    Ok(e.unwrap_or(End::Killed("no vCPU ended".into())))
}

fn finish(end: &Mutex<Option<End>>, e: End) {
    let mut g = end.lock().unwrap();
    if g.is_none() {
        *g = Some(e);
    }
}

fn vcpu_loop(fd: i32, cpu: u32, serial: &Mutex<Serial<NoIrq, vm_superio::serial::NoEvents, Box<dyn Write + Send>>>, end: &Mutex<Option<End>>) {
    let mut run = abi::VmRun { vcpu: cpu, ..Default::default() };
    loop {
        if end.lock().unwrap().is_some() {
            return;
        }
        match dev::run_fd(fd, &mut run) {
            Err(e) if e.errno == libc::EINTR => {
                if TERMINATE.load(Ordering::Acquire) {
                    return finish(end, End::Killed("terminated by a signal".into()));
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
                    let mut s = serial.lock().unwrap();
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
            exit::HYPERCALL => {
                run.exit.hc_ret = vmm_hypercall(x.hc_nr, x.hc_args) as u64;
            }
            exit::GUEST_EXIT => return finish(end, End::Exited(x.data as u8)),
            exit::SHUTDOWN => return finish(end, End::Stopped(x.reason)),
            exit::HLT | exit::INTR | exit::NONE => {}
            k => return finish(end, End::Killed(format!("unknown exit kind {k}"))),
        }
    }
}

/// Hypercalls addressed to the VMM (docs/guest-abi.md).
fn vmm_hypercall(nr: u64, _args: [u64; 3]) -> i64 {
    match nr {
        // VMM version: the uxenctl ABI revision.
        ghc::VMM_FIRST => abi::ABI_REVISION as i64,
        _ => -abi::errno::ENOSYS,
    }
}
