//! A guest to fork from outside (`uxenctl fork`). It touches `touch=MiB`
//! of memory (default: all free memory) with a pattern, prints its
//! identity and halts. Whenever it wakes it asks its VM id: a child of a
//! fork finds a new one, checks the inherited memory and prints its new
//! identity, then halts again, touching nothing but its stack.
#![no_std]
#![no_main]

use uxen_test_guests::{arg, fill, free_memory, halt, println, verify, vm_id};

const SEED: u64 = 0xf0_4cee;

#[no_mangle]
fn guest_main(mem: u64) -> u8 {
    let (start, top) = free_memory(mem);
    let end = top.min(start + (arg("touch", (top - start) >> 20) << 20));
    fill(start, end, SEED);
    let sum = match verify(start, end, SEED, 0) {
        Ok(s) => s,
        Err(a) => {
            println!("forkee: FAIL at {:#x}", a);
            return 1;
        }
    };
    let mut me = vm_id();
    println!("forkee: vm{} ready: touched {} KiB sum={:016x}", me, (end - start) >> 10, sum);
    loop {
        halt();
        let id = vm_id();
        if id == me {
            continue;
        }
        match verify(start, end, SEED, 0) {
            Ok(s) if s == sum => println!("forkee: vm{} forked from vm{}: memory intact sum={:016x}", id, me, s),
            _ => {
                println!("forkee: FAIL: vm{} forked from vm{} sees changed memory", id, me);
                return 1;
            }
        }
        me = id;
    }
}
