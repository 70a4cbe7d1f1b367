//! Detached VMs: `uxenctl create` forks a VMM that owns the VM (a VM lives
//! as long as its descriptor), with its console and status in a run
//! directory.

use crate::boot::Guest;
use crate::{dev, vmm};
use anyhow::{anyhow, bail, Context, Result};
use std::io::{Read, Write};
use std::path::PathBuf;

/// Where detached VMs keep their console, status and pid files.
pub fn run_dir() -> PathBuf {
    std::env::var_os("UXEN_RUN_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/run/uxen"))
}

pub fn console_path(id: u32) -> PathBuf {
    run_dir().join(format!("vm-{id}.console"))
}

pub fn status_path(id: u32) -> PathBuf {
    run_dir().join(format!("vm-{id}.status"))
}

pub fn pid_path(id: u32) -> PathBuf {
    run_dir().join(format!("vm-{id}.pid"))
}

pub fn socket_path(id: u32) -> PathBuf {
    run_dir().join(format!("vm-{id}.sock"))
}

/// Creates a VM run by a detached VMM process; returns its id. The guest
/// was prepared (and so checked) before: the VMM process inherits it.
pub fn create(guest: &Guest, name: &str, mem_mib: u64, vcpus: u32) -> Result<u32> {
    std::fs::create_dir_all(run_dir()).with_context(|| format!("cannot create {}", run_dir().display()))?;
    let mut fds = [0i32; 2];
    // SAFETY: creating a pipe.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    let (rfd, wfd) = (fds[0], fds[1]);
    // SAFETY: single-threaded here; the children only run this function's
    // code and exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: in the child: a new session, then the VMM in a grandchild
        // that is not a session leader.
        unsafe {
            libc::close(rfd);
            libc::setsid();
            if libc::fork() == 0 {
                let code = vmm_process(guest, name, mem_mib, vcpus, wfd);
                libc::_exit(code);
            }
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copy of the write end and reaping the child.
    unsafe {
        libc::close(wfd);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    // SAFETY: `rfd` is ours.
    let mut r = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(rfd) };
    let mut msg = String::new();
    r.read_to_string(&mut msg).ok();
    match msg.split_once(' ') {
        Some(("ok", id)) => id.trim().parse().map_err(|_| anyhow!("bad reply from the VMM: {msg}")),
        Some(("err", why)) => Err(anyhow!("{}", why.trim())),
        _ => Err(anyhow!("the VMM process ended without creating the VM")),
    }
}

/// The detached VMM: creates and loads the VM, reports its id on `wfd`,
/// then runs it until it ends.
fn vmm_process(guest: &Guest, name: &str, mem_mib: u64, vcpus: u32, wfd: i32) -> i32 {
    // SAFETY: `wfd` is this process's write end of the pipe.
    let mut reply = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(wfd) };
    let setup = || -> Result<dev::Vm> {
        let d = dev::Device::open()?;
        let vm = d.create_vm(mem_mib << 20, vcpus, name, guest.vm_flags()).map_err(|e| anyhow!("{e}"))?;
        guest.install(&vm, mem_mib << 20, vcpus)?;
        Ok(vm)
    };
    let vm = match setup() {
        Ok(vm) => vm,
        Err(e) => {
            let _ = write!(reply, "err {e:#}");
            return 1;
        }
    };
    let _ = write!(reply, "ok {}", vm.id);
    drop(reply);
    // SAFETY: detach from the terminal: stdio to /dev/null.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        for fd in 0..3 {
            libc::dup2(null, fd);
        }
    }
    vmm::install_signal_handlers();
    let kind = match guest {
        Guest::Test(_) => vmm::Kind::Test,
        Guest::Linux(_) => vmm::Kind::Linux { stdin: vmm::Stdin::No },
    };
    vmm::serve(vm, vcpus, vmm::Mode::Detached, kind, None);
    0
}

/// `console VM [-f]`.
pub fn console(id: u32, follow: bool) -> Result<()> {
    let path = console_path(id);
    let mut f = std::fs::File::open(&path).map_err(|e| {
        anyhow!("no console for VM {id} ({}: {e}); only VMs started with `uxenctl create` have one", path.display())
    })?;
    let mut out = std::io::stdout();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = f.read(&mut buf)?;
        if n > 0 {
            out.write_all(&buf[..n])?;
            out.flush()?;
            continue;
        }
        if !follow || status_path(id).exists() {
            // One more read catches what came with the end.
            let n = f.read(&mut buf)?;
            out.write_all(&buf[..n])?;
            return Ok(());
        }
        if !pid_path(id).exists() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
