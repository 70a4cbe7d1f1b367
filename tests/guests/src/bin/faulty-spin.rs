//! Spins forever with interrupts off.
#![no_std]
#![no_main]

use uxen_test_guests::println;

#[no_mangle]
fn guest_main(_mem: u64) -> u8 {
    println!("faulty: spinning with interrupts off");
    // SAFETY: an endless loop is the point.
    unsafe { core::arch::asm!("cli", "2: jmp 2b", options(noreturn)) }
}
