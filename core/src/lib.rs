//! # peerlink
//!
//! A sans-IO toolkit for peer-to-peer applications: the signaling [`client`] and [`server`]
//! state machines, verified [`identity`]s, the wire [`protocol`], and direct WebRTC
//! connections between peers ([`peer`], on str0m's ICE, DTLS and SCTP) gathered in a [`node`]:
//! one [`Node`] per local participant owns the signaling client and every connection, and runs
//! managed [`room`]s over them (full-mesh direct paths with relay fallback, presence), file /
//! JSON / image [`transfer`]s, and shared state over rooms ([`sync`]: a key-value map ordered by
//! hybrid logical clocks, and yrs documents), and end-to-end encryption ([`e2e`]: an
//! authenticated key exchange, sessions with counter nonces and replay windows, an encrypted
//! reconnecting stream). Connections reach peers through TURN relays when nothing more direct
//! works ([`turn`]: a sans-IO TURN client, RFC 8656 over UDP; [`stun`] for reflexive
//! addresses). Runtime
//! adapters (`peerlink-smol`, `peerlink-tokio`, `peerlink-blocking`, `peerlink-server`, and the
//! deterministic simulator `peerlink-sim`) own the sockets and timers.
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
//!
//! ## A node on real sockets
//!
//! A [`Node`] is driven the same way, with one more input (datagrams) and one more output
//! (datagrams to send). This loop runs one on a std `UdpSocket` and a blocking WebSocket, with
//! no threads and no async runtime (the `peerlink-blocking` adapter is this, done properly:
//! non-blocking WebSocket, TLS, several sockets, reconnects).
//!
//! ```no_run
//! use std::net::UdpSocket;
//! use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
//! use peerlink::{Identity, Node, NodeConfig, NodeEvent, NodeTransmit};
//! use peerlink::client::ClientTransmit;
//! use rand::SeedableRng;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let identity = Identity::generate(&mut rand_chacha::ChaCha20Rng::from_os_rng());
//! let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
//! let mut node = Node::new(NodeConfig::new("ws://127.0.0.1:8080"), identity, 42, Instant::now(), unix_ms)?;
//! let udp = UdpSocket::bind("127.0.0.1:0")?;
//! udp.set_read_timeout(Some(Duration::from_millis(5)))?;
//! node.add_local_address(Instant::now(), udp.local_addr()?)?;
//! node.connect(Instant::now())?;
//! let mut ws = None;
//! let mut buf = [0u8; 2048];
//! loop {
//!     // 1. Drain every output: frames and datagrams to send, then events.
//!     while let Some(t) = node.poll_transmit() {
//!         match t {
//!             NodeTransmit::Signaling(ClientTransmit::Connect { url }) => {
//!                 let (socket, _) = tungstenite::connect(url.as_str())?;
//!                 ws = Some(socket);
//!                 node.handle_connected(Instant::now())?;
//!             }
//!             NodeTransmit::Signaling(ClientTransmit::Text(text)) => {
//!                 ws.as_mut().expect("connected").send(tungstenite::Message::text(text))?;
//!             }
//!             NodeTransmit::Signaling(ClientTransmit::Close { .. }) => ws = None,
//!             NodeTransmit::Datagram(d) => {
//!                 udp.send_to(&d.contents, d.destination)?;
//!             }
//!         }
//!     }
//!     while let Some(event) = node.poll_event() {
//!         if let NodeEvent::Data { peer, data, .. } = event {
//!             println!("{} sent {data:?}", peer.short());
//!         }
//!     }
//!     // 2. Feed inputs: a datagram (with its source and our local address), a WebSocket
//!     //    frame, or the time once `poll_timeout` has passed. A real adapter waits on all
//!     //    of them at once; a spurious `handle_timeout` is harmless.
//!     if let Ok((n, source)) = udp.recv_from(&mut buf) {
//!         node.handle_datagram(Instant::now(), source, udp.local_addr()?, &buf[..n])?;
//!     }
//!     if let Some(socket) = ws.as_mut() {
//!         # let _ = socket;
//!         // (read a frame without blocking, then:) node.handle_text(Instant::now(), &text)?;
//!     }
//!     if node.poll_timeout().is_some_and(|t| t <= Instant::now()) {
//!         node.handle_timeout(Instant::now())?;
//!     }
//! }
//! # }
//! ```
#![warn(missing_docs)]
// No `unsafe` but one audited place: wiping ring's AES key schedule (`e2e::aead`).
#![deny(unsafe_code)]

pub mod client;
pub mod identity;
pub mod node;
pub mod peer;
pub mod protocol;
pub mod room;
pub mod server;
pub mod stun;
pub mod e2e;
pub mod sync;
pub mod transfer;
pub mod turn;

pub use client::{Client, ClientConfig, ClientError, ClientEvent, ClientTransmit, IssuedTurnCredentials, RequestId, Response, RoomDetails, RoomSummary};
pub use identity::{Fingerprint, Identity, IdentityError, IdentityKeys};
pub use node::{IceServer, IceTransportPolicy, Node, NodeConfig, NodeError, NodeEvent, NodeTransmit, PeerView, TURN_RETRY_MAX, TURN_RETRY_MIN, TurnServerUrl, UdpBind};
pub use peer::media::{self, Codec, MediaError, MediaEvent, MediaFrame, ReceivedFrame, TrackId, TrackInfo, TrackKind, TrackOptions};
pub use peer::{ChannelOptions, Datagram, Payload, PeerConfig, PeerError, PeerState, Reliability, SendError};
pub use protocol::{CloseCode, ErrorCode, PeerInfo, RawJson};
pub use room::{CallConfig, CallEvent, EncryptionEvent, JoinOptions, Source, RoomData, RoomError, RoomEvent, RoomOptions, RoomPath, RoomView, RoomsConfig};
pub use server::{ConnId, Server, ServerConfig, ServerError, ServerTransmit};
pub use sync::{StateConfig, StateEvent, StateSync, SyncError, SyncEvent};
/// The yrs crate our documents are made of (its `Doc`, `Text`, `Map`, `Array`, `Transact`).
pub use yrs;

/// The one instant the unit tests of the sync and e2e machines count virtual time from (read
/// once; the machines under test never see the clock, only offsets from it).
#[cfg(test)]
pub(crate) fn test_epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

