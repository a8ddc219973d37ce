//! Fuzz target: arbitrary datagrams through the STUN codec (`harness::stun_decode`).

#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    harness::stun_decode(data);
});
