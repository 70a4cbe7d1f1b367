//! Exits with code 7 through the exit port.
#![no_std]
#![no_main]

use uxen_test_guests::println;

#[no_mangle]
fn guest_main(_mem: u64) -> u8 {
    println!("exiting with code 7");
    7
}
