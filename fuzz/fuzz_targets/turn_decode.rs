//! Fuzz target: arbitrary datagrams through the TURN codec and client (`harness::turn_decode`).

#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    harness::turn_decode(data);
});
