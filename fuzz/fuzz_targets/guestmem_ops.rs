//! Guest memory operations on a small frame pool.
//! The harness and its invariants: `hypervisor/tests/support/control_fuzz.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hypervisor::control::fuzz::guestmem_ops(data);
});
