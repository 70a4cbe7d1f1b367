//! The uxen-rs hypervisor.
//!
//! Everything here except `arch`, `hv` and `launch` (the late launch; these
//! two are built only into the image) is portable: it holds no assembly and
//! touches physical memory only through [`mem::PhysMem`], so `cargo test`
//! runs it on the host against mock memory. `arch::x86` holds VMX, the VMCS,
//! the EPT and VT-d formats and the privileged instruction wrappers.
#![cfg_attr(not(any(test, feature = "fuzzing")), no_std)]

extern crate alloc;

pub mod layout;
pub mod addr;
pub mod arch;
pub mod control;
pub mod devices;
pub mod emulate;
pub mod logring;
pub mod ept;
pub mod guestmem;
pub mod mem;
pub mod merge;
pub mod paging;
pub mod policy;
pub mod pool;
pub mod radix;
pub mod vtd;

#[cfg(target_os = "none")]
pub mod hv;
#[cfg(target_os = "none")]
pub mod launch;
