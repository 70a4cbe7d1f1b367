// SPDX-License-Identifier: GPL-2.0
//! uxen-rs wire formats.
//!
//! Rules (see `docs/`): `#[repr(C)]`, fixed-width integers, explicit
//! `reserved` fields, no `bool`/`Option`/Rust enums on the wire, a const size
//! assert for every structure, and [`ABI_REVISION`] bumped on any change.
//!
//! One file per boundary, each re-exported here so that every item keeps
//! its path `abi::Name` (and `shared_abi::Name`):
//!
//! | file | boundary |
//! | --- | --- |
//! | `boot.rs` | the image header, boot info and entry handshakes, log ring, CPUID signature |
//! | `hypercalls.rs` | host hypercall numbers and argument blocks |
//! | `ioctls.rs` | ioctl numbers and the blocks only the driver reads |
//! | `guest_abi.rs` | the guest boot contract, the Linux PC, VM flags, guest hypercalls |
//! | `stats.rs` | the statistics counters |
//!
//! This directory is also compiled as a plain module inside the kernel
//! module (which takes `abi/mod.rs` in by `#[path]`), so it holds no
//! crate-level attributes and no dependencies.
#![allow(dead_code, unreachable_pub)]

mod boot;
mod guest_abi;
mod hypercalls;
mod ioctls;
mod stats;

pub use boot::*;
pub use guest_abi::*;
pub use hypercalls::*;
pub use ioctls::*;
pub use stats::*;

/// Bumped on every change to anything in this module (any file of `abi/`).
pub const ABI_REVISION: u32 = 5;

/// Version of the uxen-rs release, NUL-padded.
pub const VERSION: [u8; 16] = *b"0.1.0\0\0\0\0\0\0\0\0\0\0\0";

/// Most CPUs the hypervisor manages.
pub const MAX_CPUS: usize = 64;

const fn assert_size(actual: usize, expected: usize) {
    assert!(actual == expected, "shared-abi: structure size changed");
}

/// Turns a NUL-padded byte array into the text before the first NUL.
pub fn cstr_bytes(b: &[u8]) -> &[u8] {
    let mut n = 0;
    while n < b.len() && b[n] != 0 {
        n += 1;
    }
    &b[..n]
}

/// Copies `s` into a NUL-padded array, truncating (the last byte stays NUL).
pub const fn padded<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let mut i = 0;
    while i < s.len() && i + 1 < N {
        out[i] = s[i];
        i += 1;
    }
    out
}

// ---------------------------------------------------------------------------
// Linux errno values. Hypercalls and ioctls report failures as `-errno`.
// ---------------------------------------------------------------------------

/// Errno numbers used on every boundary (Linux x86-64 values).
pub mod errno {
    pub const EPERM: i64 = 1;
    pub const ENOENT: i64 = 2;
    pub const ESRCH: i64 = 3;
    pub const EINTR: i64 = 4;
    pub const EIO: i64 = 5;
    pub const E2BIG: i64 = 7;
    pub const ENOEXEC: i64 = 8;
    pub const EBADF: i64 = 9;
    pub const EAGAIN: i64 = 11;
    pub const ENOMEM: i64 = 12;
    pub const EACCES: i64 = 13;
    pub const EFAULT: i64 = 14;
    pub const EBUSY: i64 = 16;
    pub const EEXIST: i64 = 17;
    pub const ENODEV: i64 = 19;
    pub const EINVAL: i64 = 22;
    pub const ENOSPC: i64 = 28;
    pub const ENOTTY: i64 = 25;
    pub const ERANGE: i64 = 34;
    pub const ENOSYS: i64 = 38;
    pub const EOVERFLOW: i64 = 75;
    pub const EOPNOTSUPP: i64 = 95;
    pub const ENOTCONN: i64 = 107;
    pub const ESHUTDOWN: i64 = 108;
    pub const ETIMEDOUT: i64 = 110;
    pub const EALREADY: i64 = 114;
    pub const ECANCELED: i64 = 125;
}
