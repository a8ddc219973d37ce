//! # peerlink
//!
//! A sans-IO toolkit for peer-to-peer applications: the signaling [`client`] and [`server`]
//! state machines, verified [`identity`]s, and the wire [`protocol`]. Runtime adapters
//! (`peerlink-smol`, `peerlink-blocking`, `peerlink-server`) own the sockets and timers.
//!
//! ## The drain contract
//!
//! Every state machine here is driven the same way, and never reads the clock, the OS random
//! source, sockets, files or the environment:
//!
//! 1. **Inputs** go in through `handle_*` methods, each taking the current time `now`
//!    (frames received, connections opened and closed, timers expired) or through commands
//!    (`join`, `relay`, ...).
//! 2. **After every input**, drain every output until it returns `None`: `poll_transmit`
//!    (frames to send, sockets to open or close) and, on the client, `poll_event`.
//! 3. **Then** read `poll_timeout` and call `handle_timeout` at that instant (or earlier:
//!    a spurious `handle_timeout` does nothing). After `handle_timeout(t)` the next deadline
//!    is later than `t`.
//!
//! Outputs that are never drained are refused past a fixed bound with a typed `NotDrained`
//! error rather than growing without limit. Randomness comes from a seed the caller passes in,
//! so the same inputs always produce the same outputs.
//!
//! ## An event loop
//!
//! A server and a client wired together in memory: the "network" is the loop passing texts
//! between them. The adapters do exactly this with WebSockets.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use peerlink::client::{Client, ClientConfig, ClientEvent, ClientTransmit};
//! use peerlink::identity::Identity;
//! use peerlink::server::{ConnId, Server, ServerConfig, ServerTransmit};
//! use rand::SeedableRng;
//!
//! let start = Instant::now();
//! let mut now = start;
//! let mut server = Server::new(ServerConfig::default(), 1, now, 1_700_000_000_000);
//! let identity = Identity::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(2));
//! let mut client = Client::new(ClientConfig::new("ws://in-memory"), identity, 3, now).unwrap();
//! client.connect(now).unwrap();
//! client.join(now, "lobby", None, None).unwrap();
//!
//! let conn = ConnId(1);
//! let mut events = Vec::new();
//! while now < start + Duration::from_secs(1) {
//!     // Pass frames back and forth until neither side has anything left to send.
//!     let mut busy = true;
//!     while busy {
//!         busy = false;
//!         while let Some(t) = client.poll_transmit() {
//!             busy = true;
//!             match t {
//!                 ClientTransmit::Connect { .. } => {
//!                     server.handle_connect(conn, now).unwrap();
//!                     client.handle_connected(now).unwrap();
//!                 }
//!                 ClientTransmit::Text(text) => server.handle_message(conn, now, &text).unwrap(),
//!                 ClientTransmit::Close { .. } => server.handle_disconnect(conn, now).unwrap(),
//!             }
//!         }
//!         while let Some(t) = server.poll_transmit() {
//!             busy = true;
//!             if let ServerTransmit::Text { text, .. } = t {
//!                 client.handle_text(now, &text).unwrap();
//!             }
//!         }
//!         while let Some(e) = client.poll_event() {
//!             events.push(e);
//!         }
//!     }
//!     // Nothing to send: sleep until the next deadline (here, jump the clock to it).
//!     let next = [client.poll_timeout(), server.poll_timeout()].into_iter().flatten().min();
//!     now = next.unwrap_or(now + Duration::from_secs(1)).max(now);
//!     client.handle_timeout(now).unwrap();
//!     server.handle_timeout(now).unwrap();
//! }
//! assert!(events.iter().any(|e| matches!(e, ClientEvent::Registered { .. })));
//! assert!(events.iter().any(|e| matches!(e, ClientEvent::PeerList { namespace, .. } if namespace == "lobby")));
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod client;
pub mod identity;
pub mod node;
pub mod peer;
pub mod protocol;
pub mod server;
pub mod stun;

pub use client::{Client, ClientConfig, ClientError, ClientEvent, ClientTransmit, RequestId, Response};
pub use identity::{Fingerprint, Identity, IdentityError, IdentityKeys};
pub use node::{IceServer, Node, NodeConfig, NodeError, NodeEvent, NodeTransmit, PeerView};
pub use peer::{ChannelOptions, Datagram, Payload, PeerConfig, PeerError, PeerState, Reliability, SendError};
pub use protocol::{CloseCode, ErrorCode, PeerInfo, RawJson};
pub use server::{ConnId, Server, ServerConfig, ServerError, ServerTransmit};
