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
/// The console's length now: where the output of what is sent next starts.
pub fn console_len(id: u32) -> Result<u64> {
    let path = console_path(id);
    let m = std::fs::metadata(&path).map_err(|e| {
        anyhow!("no console for VM {id} ({}: {e}); only VMs started with `uxenctl create` have one", path.display())
    })?;
    Ok(m.len())
}

/// Waits until a line of VM `id`'s console written at or after byte `from`
/// matches `re`, and returns it (without its line end). Fails when
/// `timeout` passes first, or when the VM ends without such a line. Polls
/// every millisecond: one process that waits, instead of a shell loop that
/// starts a `grep` per look, keeps the host's share small while a guest is
/// asked something.
pub fn expect(id: u32, from: u64, re: &regex::Regex, timeout: std::time::Duration) -> Result<String> {
    expect_in(&console_path(id), &status_path(id), id, from, re, timeout)
}

/// [`expect`] on the console file `path`, the VM having ended once
/// `status` exists.
fn expect_in(path: &std::path::Path, status: &std::path::Path, id: u32, from: u64, re: &regex::Regex, timeout: std::time::Duration) -> Result<String> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| anyhow!("no console for VM {id} ({}: {e})", path.display()))?;
    f.seek(SeekFrom::Start(from))?;
    let deadline = std::time::Instant::now() + timeout;
    let (mut pending, mut buf) = (Vec::new(), vec![0u8; 16 << 10]);
    loop {
        let ended = status.exists();
        let n = f.read(&mut buf)?;
        pending.extend_from_slice(&buf[..n]);
        // Whole lines only, but a last line the VM ended on counts too.
        let mut start = 0;
        while let Some(end) = pending[start..].iter().position(|&b| b == b'\n').map(|i| start + i) {
            let line = String::from_utf8_lossy(&pending[start..end]);
            let line = line.trim_end_matches('\r');
            if re.is_match(line) {
                return Ok(line.to_string());
            }
            start = end + 1;
        }
        pending.drain(..start);
        if n > 0 {
            continue;
        }
        if ended {
            let line = String::from_utf8_lossy(&pending);
            if !pending.is_empty() && re.is_match(line.trim_end_matches('\r')) {
                return Ok(line.trim_end_matches('\r').to_string());
            }
            bail!("VM {id} ended before its console printed a line matching '{re}'");
        }
        if std::time::Instant::now() >= deadline {
            bail!("no line matching '{re}' on VM {id}'s console within {} ms", timeout.as_millis());
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn scratch(name: &str) -> (PathBuf, PathBuf) {
        let d = std::env::temp_dir().join(format!("uxenctl-expect-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let (c, s) = (d.join("vm.console"), d.join("vm.status"));
        let _ = std::fs::remove_file(&s);
        (c, s)
    }

    #[test]
    fn expect_takes_only_new_whole_lines() {
        let (c, s) = scratch("new");
        std::fs::write(&c, "answer-1\r\n").unwrap();
        let from = std::fs::metadata(&c).unwrap().len();
        let re = regex::Regex::new("^answer-[0-9]+$").unwrap();
        let writer = {
            let c = c.clone();
            std::thread::spawn(move || {
                let mut f = std::fs::OpenOptions::new().append(true).open(&c).unwrap();
                f.write_all(b"~ # echo answer-$((6*7))\r\nansw").unwrap();
                std::thread::sleep(Duration::from_millis(20));
                f.write_all(b"er-42\r\n").unwrap();
            })
        };
        // The old answer before `from` and the echoed command do not count.
        assert_eq!(expect_in(&c, &s, 1, from, &re, Duration::from_secs(10)).unwrap(), "answer-42");
        writer.join().unwrap();
    }

    #[test]
    fn expect_fails_on_timeout_and_on_the_end() {
        let (c, s) = scratch("fail");
        std::fs::write(&c, "nothing\n").unwrap();
        let re = regex::Regex::new("^yes").unwrap();
        let e = expect_in(&c, &s, 3, 0, &re, Duration::from_millis(30)).unwrap_err();
        assert!(e.to_string().contains("within 30 ms"), "{e}");
        std::fs::write(&s, "0").unwrap();
        let e = expect_in(&c, &s, 3, 0, &re, Duration::from_secs(10)).unwrap_err();
        assert!(e.to_string().contains("VM 3 ended"), "{e}");
        // A last line without its end counts once the VM has ended.
        std::fs::write(&c, "yes, at the end").unwrap();
        assert_eq!(expect_in(&c, &s, 3, 0, &re, Duration::from_secs(10)).unwrap(), "yes, at the end");
    }
}
