//! `uxen-fork`: forks the Linux guest it runs in, like `fork()` forks a
//! process. In the parent it prints `parent CHILD_ID`, in the child
//! `child`; both then exit 0 and the guest carries on in each VM. The child
//! VM has its own console (`uxenctl console CHILD_ID` on the host).
//!
//! It makes the guest FORK hypercall through `linux::HYPERCALL_PORT`
//! (VMCALL needs ring 0): it asks the guest kernel for that port (and the
//! three after it, which a 32-bit IN also reaches) with `ioperm`, which
//! needs root (CAP_SYS_RAWIO), and reads 32 bits from it
//! with the hypercall's number in EAX (`docs/guest-abi.md`, part 2).

use shared_abi::{ghc, linux};
use std::process::ExitCode;

/// The port hypercall `nr`: its result, or -errno.
fn port_hypercall(nr: u64) -> i32 {
    let eax: u32;
    // SAFETY: an IN from the hypercall port, which `ioperm` granted; it
    // only changes EAX.
    unsafe {
        core::arch::asm!("in eax, dx", inout("eax") nr as u32 => eax, in("dx") linux::HYPERCALL_PORT, options(nostack, preserves_flags));
    }
    eax as i32
}

fn main() -> ExitCode {
    if std::env::args().len() > 1 {
        eprintln!("usage: uxen-fork\n  forks this VM: prints `parent CHILD_ID` in the parent and `child` in the child");
        return ExitCode::from(2);
    }
    // A 32-bit IN reaches four ports: the CPU checks all four bits.
    // SAFETY: ioperm only changes this process's I/O permissions.
    if unsafe { libc::ioperm(linux::HYPERCALL_PORT as libc::c_ulong, 4, 1) } != 0 {
        eprintln!("uxen-fork: cannot use the hypercall port: {} (root is needed)", std::io::Error::last_os_error());
        return ExitCode::FAILURE;
    }
    // Not under uxen-rs the port reads all ones (-1), which no VM id is.
    let id = port_hypercall(ghc::VM_ID);
    if id <= 0 {
        eprintln!("uxen-fork: not a uxen-rs Linux guest (the hypercall port answered {id})");
        return ExitCode::FAILURE;
    }
    match port_hypercall(ghc::FORK) {
        0 => println!("child"),
        c if c > 0 => println!("parent {c}"),
        e => {
            eprintln!("uxen-fork: the fork failed: {}", std::io::Error::from_raw_os_error(-e));
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
