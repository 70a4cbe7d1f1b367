//! Forks itself through the FORK hypercall and checks that every copy keeps
//! its own memory.
//!
//! It fills its free memory with a pattern and forks `n` times (command
//! line `n=N`, default 4): the parent gets each child's id, each child 0
//! and stops forking. Every copy then prints its identity, checks that it
//! sees the memory as it was at the fork, and in rounds writes its own
//! stamp to the first word of every page (the same addresses in every
//! copy), waits while the others write theirs, and checks that it reads
//! back its own stamps and the untouched pattern. A copy that ever sees
//! another's write exits with 1.
#![no_std]
#![no_main]

use uxen_test_guests::{arg, fill, fork, free_memory, println, verify, vm_id};

const SEED: u64 = 0xf0_4c3e;
const ROUNDS: u64 = 3;

fn stamp(id: u64, round: u64, page: u64) -> u64 {
    (id << 48) | (round << 40) | page
}

#[no_mangle]
fn guest_main(mem: u64) -> u8 {
    let n = arg("n", 4);
    let (start, end) = free_memory(mem);
    fill(start, end, SEED);
    let Ok(sum) = verify(start, end, SEED, 0) else {
        println!("forker: FAIL: the pattern did not stick");
        return 1;
    };
    let parent = vm_id();
    println!("forker: vm{} filled {} KiB sum={:016x}, forking {}", parent, (end - start) >> 10, sum, n);
    let mut copy = 0;
    let mut last_child = 0;
    for k in 1..=n {
        match fork() {
            r if r < 0 => {
                println!("forker: FAIL: fork {} returned {}", k, r);
                return 1;
            }
            0 => {
                copy = k;
                break;
            }
            child => {
                println!("forker: vm{} fork {} returned child vm{}", parent, k, child);
                last_child = child;
            }
        }
    }
    let id = vm_id() as u64;
    if copy == 0 {
        println!("forker: copy 0 is vm{} (the parent; last child vm{})", id, last_child);
    } else {
        println!("forker: copy {} is vm{}, fork returned 0, parent vm{}", copy, id, parent);
    }
    match verify(start, end, SEED, 0) {
        Ok(s) if s == sum => println!("forker: copy {} vm{} sees the memory as at the fork sum={:016x}", copy, id, s),
        Ok(s) => {
            println!("forker: FAIL: copy {} vm{} checksum {:016x} != {:016x}", copy, id, s, sum);
            return 1;
        }
        Err(a) => {
            println!("forker: FAIL: copy {} vm{} differs at {:#x} right after the fork", copy, id, a);
            return 1;
        }
    }
    let pages = (end - start) / 4096;
    for round in 0..ROUNDS {
        for p in 0..pages {
            // SAFETY: the first word of one of this guest's free pages.
            unsafe { ((start + p * 4096) as *mut u64).write_volatile(stamp(id, round, p)) };
        }
        // Give the other copies time to write the same addresses.
        for _ in 0..200_000 {
            core::hint::spin_loop();
        }
        for p in 0..pages {
            // SAFETY: as above.
            let v = unsafe { ((start + p * 4096) as *const u64).read_volatile() };
            if v != stamp(id, round, p) {
                println!("forker: FAIL: copy {} vm{} page {:#x} reads {:#x}: another copy's write", copy, id, start + p * 4096, v);
                return 1;
            }
        }
        if let Err(a) = verify(start, end, SEED, 8) {
            println!("forker: FAIL: copy {} vm{} pattern changed at {:#x}", copy, id, a);
            return 1;
        }
    }
    let mut own = 0u64;
    for p in 0..pages {
        own = own.rotate_left(5) ^ stamp(id, ROUNDS - 1, p);
    }
    println!("forker: copy {} vm{} isolated ok: {} rounds over {} pages, stamps={:016x}", copy, id, ROUNDS, pages, own);
    0
}
