//! Fuzz target: the `room/1` wire codec (`harness::room_batch`): batch bodies, relay payloads,
//! `arbitrary` items through an encode/decode round trip, and signed payloads with mutations.

#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    harness::room_batch(data);
});
