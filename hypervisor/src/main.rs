//! The bare-metal hypervisor image. Everything lives in the library; this
//! binary only links it (entry point `uxen_entry`, see `layout.ld`).
#![no_std]
#![no_main]

use hypervisor as _;
