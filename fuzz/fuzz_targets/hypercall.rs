//! Raw host hypercalls into the model hypervisor (`hypervisor::control::model`).
//! The harness and its invariants: `hypervisor/tests/support/control_fuzz.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hypervisor::control::fuzz::hypercalls(data);
});
