//! The one definition of everything that crosses a uxen-rs boundary.
//!
//! The kernel module takes `abi/mod.rs` (with the files beside it) and
//! `validate.rs` in with `#[path]`, because a Kbuild module has no Cargo
//! dependencies; every other crate depends on this one.
#![cfg_attr(not(test), no_std)]

mod abi;
pub use abi::*;

pub mod exit_reason;
pub mod validate;
