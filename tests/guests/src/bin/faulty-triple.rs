//! A triple fault: an exception with no IDT.
#![no_std]
#![no_main]

use uxen_test_guests::println;

#[no_mangle]
fn guest_main(_mem: u64) -> u8 {
    println!("faulty: triple fault");
    // SAFETY: deliberately raises #UD with no IDT: #UD -> #GP -> #DF -> shutdown.
    unsafe { core::arch::asm!("ud2") };
    0
}
