//! Simulation scenarios: the real server core and real Nodes (str0m ICE, DTLS, SCTP) on the
//! deterministic network of `peerlink-sim`. One scenario per file; `harness` has the helpers.

mod harness;

mod bad_input;
mod call;
mod channels;
mod crdt_convergence;
mod determinism;
mod early_checks;
mod encrypted_room;
mod full_mesh;
mod fuzz_replay;
mod glare;
mod ice_restart;
mod lossy_link;
mod media;
mod mitm;
mod ordering;
mod outage_recovery;
mod partition;
mod reflexive;
mod rooms;
mod state_convergence;
mod sync_rooms;
mod transfer;
