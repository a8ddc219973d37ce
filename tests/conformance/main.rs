//! One conformance suite for managed rooms, run on every backend: `peerlink-smol`,
//! `peerlink-tokio`, `peerlink-blocking` (real server, real WebSockets and UDP on 127.0.0.1)
//! and the simulator. The scenarios (`scenarios.rs`) are written once against [`world::World`];
//! each backend file implements it and runs every scenario.

mod async_world;
mod scenarios;
mod world;

mod blocking;
mod sim;
mod smol;
mod tokio;
