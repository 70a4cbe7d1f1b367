//! Errno names, raw system calls, signals and the command-line flags.

use super::*;

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
pub(super) fn raw_ioctl(fd: i32, cmd: u32, arg: u64) -> std::result::Result<i64, i32> {
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

pub(super) fn close(fd: i32) {
    // SAFETY: closing a descriptor this process owns (or a stale number, which
    // only gives EBADF).
    unsafe { libc::close(fd) };
}

/// The bytes of a wire structure.
pub(super) fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: ABI structures are plain data without padding (shared-abi).
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }.to_vec()
}

pub(super) fn from_bytes<T: Copy>(b: &[u8]) -> T {
    assert!(b.len() >= std::mem::size_of::<T>());
    // SAFETY: ABI structures are valid for any bytes; the read is unaligned.
    unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) }
}

extern "C" fn on_signal(_: libc::c_int) {}

/// SIGALRM and SIGUSR1 interrupt system calls (no SA_RESTART): that is how
/// a RUN that would wait or spin forever comes back with EINTR.
pub(super) fn install_handlers() {
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
pub(super) fn alarm_every(ms: u64) {
    let t = libc::timeval { tv_sec: (ms / 1000) as libc::time_t, tv_usec: ((ms % 1000) * 1000) as libc::suseconds_t };
    let it = libc::itimerval { it_interval: t, it_value: t };
    // SAFETY: setting this process's real-time interval timer.
    unsafe { libc::setitimer(libc::ITIMER_REAL, &it, std::ptr::null_mut()) };
}

pub(super) fn usleep(us: u32) {
    // SAFETY: sleeping has no memory-safety preconditions.
    unsafe { libc::usleep(us) };
}

/// Raises the descriptor limit: the limit tests hold a descriptor per VM.
pub(super) fn raise_nofile(n: u64) {
    let r = libc::rlimit { rlim_cur: n, rlim_max: n };
    // SAFETY: setting our own resource limit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) };
}

pub(super) fn open_dev(flags: i32) -> std::result::Result<i32, i32> {
    // SAFETY: opening a path given as a NUL-terminated string.
    let fd = unsafe { libc::open(c"/dev/uxen".as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        Err(E())
    } else {
        Ok(fd)
    }
}

pub(super) fn flag_u64(args: &[String], name: &str, default: u64) -> std::result::Result<u64, String> {
    match args.iter().position(|a| a == name) {
        Some(i) => parse_u64(args.get(i + 1).ok_or(format!("{name} needs a value"))?),
        None => Ok(default),
    }
}
