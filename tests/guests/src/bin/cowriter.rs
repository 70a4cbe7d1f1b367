//! Writes and checks its own pages in rounds while the host merges them.
//!
//! In every round each of `pages=N` pages (default 256) is written whole
//! with the same contents, so that a merge folds them all onto one frame;
//! the next round writes new contents over every page, which copies each
//! page again. After the writes of a round, and `checks=K` times more
//! (default 3), every word is read back: a word that does not hold what was
//! last written to it is a lost write. The guest ends with exit code 0 and
//! `cowriter: done R rounds, 0 lost` when every round checked out.
#![no_std]
#![no_main]

use uxen_test_guests::{arg, free_memory, pattern, println};

const SEED: u64 = 0xc0_d17e;

/// The word at `offset` of every page in round `round`: the same in every
/// page, different in every round.
fn word(round: u64, offset: u64) -> u64 {
    pattern(offset, SEED ^ (round << 20))
}

#[no_mangle]
fn guest_main(mem: u64) -> u8 {
    let (start, top) = free_memory(mem);
    let start = (start + 4095) & !4095;
    let pages = arg("pages", 256).min((top - start) / 4096);
    let rounds = arg("rounds", 30);
    let checks = arg("checks", 3);
    println!("cowriter: {} pages, {} rounds", pages, rounds);
    let mut lost = 0u64;
    for r in 0..rounds {
        for p in 0..pages {
            let base = (start + p * 4096) as *mut u64;
            for w in 0..512u64 {
                // SAFETY: this guest's own free memory.
                unsafe { base.add(w as usize).write_volatile(word(r, w * 8)) };
            }
        }
        let mut bad = 0u64;
        for _ in 0..=checks {
            for p in 0..pages {
                let base = (start + p * 4096) as *const u64;
                for w in 0..512u64 {
                    // SAFETY: as above.
                    let v = unsafe { base.add(w as usize).read_volatile() };
                    if v != word(r, w * 8) {
                        if bad == 0 {
                            println!("cowriter: LOST round {} page {} word {}: {:#x}", r, p, w, v);
                        }
                        bad += 1;
                    }
                }
            }
        }
        lost += bad;
        println!("cowriter: round {} checked, {} lost", r + 1, bad);
    }
    println!("cowriter: done {} rounds, {} lost", rounds, lost);
    (lost != 0) as u8
}
