//! The cost of copy-on-write after a fork, as the guest sees it.
//!
//! It fills `touch=MiB` (default 18) of free memory, measures a plain
//! 4 KiB copy between two of its own pages (the baseline), forks itself
//! through the FORK hypercall and then, in the parent and in the child,
//! times the first write to a page it shares with the other: once for the
//! first page of each of 8 separate 2 MiB ranges (which also clones the
//! EPT tables above that page) and once for the page after each (the
//! tables are the VM's own by then). It prints the medians in TSC ticks:
//! `cowcost: parent|child first=N next=N copy4k=N` and exits 0 once it
//! has checked that the memory it did not write is still as filled.
#![no_std]
#![no_main]

use uxen_test_guests::{arg, fill, fork, free_memory, println, rdtsc, verify};

const SEED: u64 = 0xc0_3c05;
const SAMPLES: usize = 8;
const RANGE: u64 = 2 << 20;

fn median(mut v: [u64; SAMPLES]) -> u64 {
    v.sort_unstable();
    v[SAMPLES / 2]
}

/// TSC ticks around one word written to `addr`.
fn timed_write(addr: u64) -> u64 {
    let t0 = rdtsc();
    // SAFETY: a word of this guest's own free memory.
    unsafe { (addr as *mut u64).write_volatile(!0) };
    rdtsc() - t0
}

#[no_mangle]
fn guest_main(mem: u64) -> u8 {
    let (start, top) = free_memory(mem);
    // Whole 2 MiB ranges, so that each sample starts a range of its own.
    let base = (start + RANGE - 1) & !(RANGE - 1);
    let end = top.min(base + (arg("touch", 18) << 20));
    // The samples' ranges, and one more for the copy.
    if end < base + (SAMPLES as u64 + 1) * RANGE {
        println!("cowcost: FAIL: needs {} MiB of free memory from {:#x}", (SAMPLES as u64 + 1) * 2, base);
        return 1;
    }
    fill(start, end, SEED);
    // The baseline: 4 KiB copied between two private pages at the end,
    // past the samples' ranges.
    let (src, dst) = (end - 2 * 4096, end - 4096);
    let mut copy = [0u64; SAMPLES];
    for c in &mut copy {
        let t0 = rdtsc();
        // SAFETY: two distinct pages of this guest's free memory.
        unsafe { core::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, 4096) };
        *c = rdtsc() - t0;
    }
    let who = match fork() {
        r if r < 0 => {
            println!("cowcost: FAIL: fork returned {}", r);
            return 1;
        }
        0 => "child",
        _ => "parent",
    };
    let (mut first, mut next) = ([0u64; SAMPLES], [0u64; SAMPLES]);
    for i in 0..SAMPLES {
        first[i] = timed_write(base + i as u64 * RANGE);
    }
    for i in 0..SAMPLES {
        next[i] = timed_write(base + i as u64 * RANGE + 4096);
    }
    // Everything but the written words and the copy's page is as filled.
    let skip = 8;
    let ok = (0..SAMPLES as u64).all(|i| {
        let r = base + i * RANGE;
        verify(r, r + 2 * 4096, SEED, skip).is_ok() && verify(r + 2 * 4096, r + RANGE, SEED, 0).is_ok()
    }) && verify(start, base, SEED, 0).is_ok();
    if !ok {
        println!("cowcost: FAIL: {} sees memory it did not write changed", who);
        return 1;
    }
    println!("cowcost: {} first={} next={} copy4k={}", who, median(first), median(next), median(copy));
    0
}
