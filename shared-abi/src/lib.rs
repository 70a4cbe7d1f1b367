//! The one definition of everything that crosses a uxen-rs boundary.
//!
//! The kernel module takes `abi.rs` in with `#[path]`, because a Kbuild
//! module has no Cargo dependencies; every other crate depends on this one.
#![no_std]

mod abi;
pub use abi::*;
