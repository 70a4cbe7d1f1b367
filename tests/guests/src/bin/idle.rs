//! Prints a line, then halts with interrupts enabled, forever: the VMM's
//! RUN sleeps instead of spinning.
#![no_std]
#![no_main]

use uxen_test_guests::{println, vm_id};

#[no_mangle]
fn guest_main(_mem: u64) -> u8 {
    println!("idle: vm{} halting", vm_id());
    loop {
        // SAFETY: halting with interrupts on; nothing ever arrives.
        unsafe { core::arch::asm!("sti", "hlt") };
    }
}
