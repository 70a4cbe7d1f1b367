//! A guest to fork from outside (`uxenctl fork`) and to merge.
//!
//! It touches `touch=MiB` of memory (default: all free memory) with a
//! pattern, prints its identity and halts. Whenever it wakes it asks its VM
//! id: a child of a fork finds a new one, checks the inherited memory and
//! prints its new identity, then halts again, touching nothing but its
//! stack. With `same=MiB` a child then writes that much of new memory,
//! above the touched part, with data that is the same in every child; with
//! `zero=MiB` it touches that much more and leaves it all zeros. Both are
//! what re-merging folds back. The checks cover all three parts.
#![no_std]
#![no_main]

use uxen_test_guests::{arg, fill, free_memory, halt, println, verify, vm_id};

const SEED: u64 = 0xf0_4cee;
const SAME_SEED: u64 = 0x5a_3e00;

/// Writes a zero word to every page of `[start, end)`: each gets a frame
/// that holds only zeros.
fn touch_zero(start: u64, end: u64) {
    let mut a = start;
    while a < end {
        // SAFETY: this guest's own free memory.
        unsafe { (a as *mut u64).write_volatile(0) };
        a += 4096;
    }
}

fn all_zero(start: u64, end: u64) -> bool {
    let mut a = start;
    while a < end {
        // SAFETY: as above.
        if unsafe { (a as *const u64).read_volatile() } != 0 {
            return false;
        }
        a += 8;
    }
    true
}

#[no_mangle]
fn guest_main(mem: u64) -> u8 {
    let (start, top) = free_memory(mem);
    let end = top.min(start + (arg("touch", (top - start) >> 20) << 20));
    let same_end = top.min(end + (arg("same", 0) << 20));
    let zero_end = top.min(same_end + (arg("zero", 0) << 20));
    fill(start, end, SEED);
    let sum = match verify(start, end, SEED, 0) {
        Ok(s) => s,
        Err(a) => {
            println!("forkee: FAIL at {:#x}", a);
            return 1;
        }
    };
    let mut me = vm_id();
    let mut wrote = false;
    println!("forkee: vm{} ready: touched {} KiB sum={:016x}", me, (end - start) >> 10, sum);
    loop {
        halt();
        let id = vm_id();
        if id == me {
            continue;
        }
        let inherited = verify(start, end, SEED, 0) == Ok(sum)
            && (!wrote || (verify(end, same_end, SAME_SEED, 0).is_ok() && all_zero(same_end, zero_end)));
        if !inherited {
            println!("forkee: FAIL: vm{} forked from vm{} sees changed memory", id, me);
            return 1;
        }
        println!("forkee: vm{} forked from vm{}: memory intact sum={:016x}", id, me, sum);
        if !wrote && zero_end > end {
            fill(end, same_end, SAME_SEED);
            touch_zero(same_end, zero_end);
            wrote = true;
            println!("forkee: vm{} wrote {} KiB of shared data and {} KiB of zeros", id, (same_end - end) >> 10, (zero_end - same_end) >> 10);
        }
        me = id;
    }
}
