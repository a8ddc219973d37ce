//! Runnable examples for peerlink; see the `[[example]]` targets: `cargo run --example demo`.
