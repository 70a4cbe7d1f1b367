//! ioctls through the model of the driver's ioctl handler.
//! The harness and its invariants: `hypervisor/tests/support/control_fuzz.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hypervisor::control::fuzz::ioctls(data);
});
