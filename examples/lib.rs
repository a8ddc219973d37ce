//! Runnable examples for peerlink; see the `[[example]]` targets: `cargo run --example demo`,
//! `cargo run --example game_loop`, `cargo run --example transfer -- demo`.
//!
//! The examples' shared, testable parts live here: [`file_transfer`] is the library half of
//! the `transfer` example.

pub mod file_transfer;

/// The repository README, compiled here so its Rust examples are checked by `cargo test`.
#[doc = include_str!("../README.md")]
#[allow(unused)]
mod readme {}
