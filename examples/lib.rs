//! Runnable examples for peerlink; see the `[[example]]` targets: `cargo run --example demo`,
//! `cargo run --example game_loop`.

/// The repository README, compiled here so its Rust examples are checked by `cargo test`.
#[doc = include_str!("../README.md")]
#[allow(unused)]
mod readme {}
