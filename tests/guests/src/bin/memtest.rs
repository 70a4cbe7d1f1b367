//! Fills all its free memory with a pattern, then checks it in rounds and
//! prints a checksum. While it checks, the host may attack its frames: a
//! single changed word fails the test. `rounds=N` on the command line sets
//! the number of checking rounds (default 6), to keep it alive longer.
#![no_std]
#![no_main]

use uxen_test_guests::{arg, image_end, pattern, println};

const ROUNDS: u64 = 6;

#[no_mangle]
fn guest_main(mem: u64) -> u8 {
    let start = (image_end() + 4095) & !4095;
    // Leave the top 64 KiB for the stack.
    let end = mem - (64 << 10);
    let seed = 0x5eed_0000 ^ mem;
    let words = (end - start) / 8;
    let p = start as *mut u64;
    for i in 0..words {
        // SAFETY: `[start, end)` is this guest's own free memory.
        unsafe { p.add(i as usize).write_volatile(pattern(start + 8 * i, seed)) };
    }
    println!("memtest: filled {} KiB", (end - start) >> 10);
    let mut sum = 0u64;
    for round in 0..arg("rounds", ROUNDS) {
        sum = 0;
        for i in 0..words {
            // SAFETY: as above.
            let v = unsafe { p.add(i as usize).read_volatile() };
            let want = pattern(start + 8 * i, seed);
            if v != want {
                println!("memtest: FAIL at {:#x}: {:#x} != {:#x}", start + 8 * i, v, want);
                return 1;
            }
            sum = sum.rotate_left(5) ^ v;
        }
        println!("memtest: round {} ok", round + 1);
    }
    println!("memtest: ok {} MiB checksum={:016x}", mem >> 20, sum);
    0
}
