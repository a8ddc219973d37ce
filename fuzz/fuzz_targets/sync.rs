//! Fuzz target: arbitrary bytes as a sync message (`harness::sync`): the `sync/1` state
//! decoder, `StateSync` in both modes and `CrdtSync`.

#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    harness::sync_in_fuzzer(data);
});
