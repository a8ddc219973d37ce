//! Fuzz target: arbitrary bytes as a key-exchange message to a `GroupKeyManager` in each
//! state, or as a program of deliveries to a derived `E2e` session (`harness::e2e`).

#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    harness::e2e(data);
});
