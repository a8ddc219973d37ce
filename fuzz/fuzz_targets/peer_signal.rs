//! Fuzz target: arbitrary relay payloads through the peer negotiation codec and arbitrary SDP
//! through `sdp_fingerprint` (`harness::peer_signal`).

#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    harness::peer_signal(data);
});
