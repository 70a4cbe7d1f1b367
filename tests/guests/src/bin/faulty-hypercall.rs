//! A hypercall number outside every defined range.
#![no_std]
#![no_main]

use uxen_test_guests::{hypercall, println};

#[no_mangle]
fn guest_main(_mem: u64) -> u8 {
    println!("faulty: bad hypercall");
    let r = hypercall(0xdead_beef, 1, 2, 3);
    println!("faulty: still running after a bad hypercall ({r})");
    0
}
