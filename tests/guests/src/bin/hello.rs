//! Prints a line and exits 0.
#![no_std]
#![no_main]

use uxen_test_guests::{println, vm_id};

#[no_mangle]
fn guest_main(mem: u64) -> u8 {
    println!("hello from uxen-rs guest vm{} ({} MiB)", vm_id(), mem >> 20);
    0
}
