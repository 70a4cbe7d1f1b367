//! The ioctl boundary under attack, from user space (issue 7):
//!
//! - `ioctl-fuzz --seed S --calls N`: a seeded generator of valid, invalid
//!   and out-of-order calls on `/dev/uxen` and on VM descriptors. Every call
//!   is checked against a model of the driver (`docs/ioctl.md`): the errno
//!   where the contract defines one, the exit record of every RUN, and at
//!   intervals the VM list and the pool against the model's VMs.
//! - `vm-limit`: the live-children limit of one VM (guest and host forks)
//!   and the limit on VMs in total, with the errors they give.
//! - `vm-churn --ops N --seed S`: create, fork and destroy operations only,
//!   for the soak.
//!
//! The guests are a few bytes of code loaded with `VM_LOAD` at 1 MiB, with
//! the boot structures of `docs/guest-abi.md`: enough to get every kind of
//! exit (port and MMIO accesses with their completions, HLT, VMM and fork
//! hypercalls, exits and stops) with an outcome the model knows in advance.
//! Each ends with one summary line; the exit status is non-zero if any call
//! broke the contract or a frame stayed in the pool.
//!
//! One file per subject: `rng.rs` (the seeded generator), `sys.rs` (raw
//! system calls and signals), `guests.rs` (the tiny guests and the model of
//! a VM), `arena.rs` (where arguments live), `fuzzer.rs` (the state and the
//! checks), `ops.rs`, `run.rs` and `races.rs` (the operations),
//! `ioctl_fuzz.rs` (the loop and its entry) and `limits.rs` (`vm-limit`,
//! `vm-churn`).

use crate::probes::{parse_u64, Result};
use shared_abi::{self as abi, exit, guest, ioctl, stop, validate, ExitRecord, IocBuf, IocLoad, Regs, VmCreate, VmFork, VmId, VmInfo, VmRegs, VmRun};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const E: fn() -> i32 = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);

mod arena;
mod fuzzer;
mod guests;
mod ioctl_fuzz;
mod limits;
mod ops;
mod races;
mod rng;
mod run;
mod sys;

use arena::*;
use fuzzer::*;
use guests::*;
use rng::*;
use run::*;
use sys::*;

pub use ioctl_fuzz::ioctl_fuzz;
pub use limits::{vm_churn, vm_limit};
