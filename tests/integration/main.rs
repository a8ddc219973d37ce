//! Integration scenarios: the real server on 127.0.0.1, real WebSockets, both client adapters.
//! One scenario per file.

mod async_transfer;
mod bad_input;
mod encrypted_room;
mod encrypted_stream;
mod encrypted_stream_async;
mod file_transfer;
mod group_room;
mod impersonation;
mod matchmaking;
mod media;
mod namespace_exchange;
mod peer_mesh;
mod register;
mod relay_and_broadcast;
mod resume;
mod rooms;
mod stun_server;
mod sync;
mod tls;
mod turn;
mod turn_credentials;
mod turn_relay;
