//! Where the CPUs meet during the launch: barriers that count arrivals,
//! and the results CPU 0 publishes for the others to wait on.

use crate::arch::x86::instr;
use core::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use shared_abi::errno::ETIMEDOUT;

/// Results published by CPU 0: 1 while pending, then 0 or `-errno`.
pub(super) static TABLES: AtomicI64 = AtomicI64::new(1);
pub(super) static GLOBAL: AtomicI64 = AtomicI64::new(1);
/// The hypervisor's page tables, once built.
pub(super) static FINAL_CR3: AtomicU64 = AtomicU64::new(0);
/// Every CPU has entered and set up its own area.
pub(super) static ARRIVED: AtomicU32 = AtomicU32::new(0);
/// Every CPU has finished its own set-up, well or not.
pub(super) static READY: AtomicU32 = AtomicU32::new(0);
/// How many CPUs failed their own set-up.
pub(super) static FAILED: AtomicU32 = AtomicU32::new(0);

/// Long enough for any emulator; short enough to report a lost CPU.
const BARRIER_TSC: u64 = 1 << 36;

/// Waits until `counter` reaches `n`; false after a long timeout.
pub(super) fn barrier(counter: &AtomicU32, n: u32) -> bool {
    counter.fetch_add(1, Ordering::AcqRel);
    let t0 = instr::rdtsc();
    while counter.load(Ordering::Acquire) < n {
        if instr::rdtsc().wrapping_sub(t0) > BARRIER_TSC {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// Waits for CPU 0 to publish a result.
pub(super) fn wait_for(flag: &AtomicI64) -> i64 {
    let t0 = instr::rdtsc();
    loop {
        let v = flag.load(Ordering::Acquire);
        if v != 1 {
            return v;
        }
        if instr::rdtsc().wrapping_sub(t0) > BARRIER_TSC {
            return -ETIMEDOUT;
        }
        core::hint::spin_loop();
    }
}

/// What a CPU whose launch failed reports: its own error, else a timeout
/// if the others did not all arrive, else EAGAIN (another CPU failed).
pub(super) fn failure(own: Result<(), i64>, synced: bool) -> i64 {
    match own {
        Err(e) => e,
        Ok(()) if !synced => -ETIMEDOUT,
        Ok(()) => -shared_abi::errno::EAGAIN,
    }
}
