//! Managed rooms on top of a [`Node`](crate::Node): the reference's `DirectRoom` and
//! `GroupRoom`, with relay fallback and presence.
//!
//! A room is a signaling-server room (its membership, owner, size limit and metadata live on
//! the server) whose members connect to each other directly (a full mesh: whoever joins
//! calls everyone already there). Room messages travel on each connection's
//! [`INTERNAL_CHANNEL`](crate::peer::INTERNAL_CHANNEL) while it is up and through the
//! server's `relay` otherwise, transparently.
//!
//! # Delivery
//!
//! Every (room, sender, receiver) triple is a stream with sequence numbers: the receiver
//! delivers in order, drops duplicates, and acknowledges cumulatively; the sender keeps what
//! is not yet acknowledged and sends it again when the path changes (direct up or down, the
//! signaling connection back) or when no acknowledgement came for an RTO. So switching
//! between relay and direct in either direction neither loses, duplicates nor reorders a
//! message (what a reliable ordered channel promises), as long as both stay in the room.
//!
//! # Bounds and overflow
//!
//! - At most [`RoomsConfig::max_unacked`] unacknowledged messages per member: a send that
//!   would exceed it for any recipient is refused whole with [`RoomError::WouldBlock`]
//!   (nothing is queued), and [`RoomEvent::Writable`] follows when there is room.
//! - Relay frames are paced by a token bucket ([`RoomsConfig::relay_rate`],
//!   [`RoomsConfig::relay_burst`]) below the server's per-connection rate limit; up to 24 KiB
//!   of messages to one member share a frame. When the bucket is empty, messages wait in the
//!   unacknowledged queue, which is what a sender then sees fill up (`WouldBlock`). Should the
//!   server still refuse a frame (`rate_limited`), nothing is acknowledged and the RTO sends it
//!   again.
//! - At most [`MAX_REORDER`] out-of-order messages are held per stream; beyond that they are
//!   dropped and sent again by their sender.
//! - Presence: local updates go out at most once per [`RoomsConfig::presence_interval`] (the
//!   latest wins); a member's updates beyond 20 per second are dropped.
//!
//! Relay batches are signed with the sender's identity key for their recipient (see
//! `docs/PROTOCOL.md`): the server can delay or drop them, not forge, alter or redirect them.
//!
//! # Encrypted rooms
//!
//! A room created with [`RoomOptions::encrypted`] (and joined with
//! [`JoinOptions::encrypted`]) is end-to-end encrypted: every batch with its messages,
//! acknowledgements or presence is sealed under a session with the member (see [`keys`]),
//! on the direct path and through the relay alike, so the server relays ciphertext only;
//! transfers with its members are sealed too. Its messages to a member wait until that
//! member's session is ready ([`EncryptionEvent::Ready`]); plaintext from a member is
//! refused ([`RoomError::Unencrypted`]). Both sides must ask for encryption: the server
//! could strip a flag in the room's metadata, so a member decides for itself.

#[doc(hidden)] pub mod wire;
pub mod call;
pub mod keys;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, trace, warn};

use crate::client::{RequestError, RequestId, RoomDetails};
use crate::identity::Fingerprint;
use crate::peer::{Payload, SendError};
use crate::protocol::{PeerInfo, RawJson};
pub use call::{CallConfig, CallEvent, Source};
pub use keys::EncryptionEvent;
pub use wire::{RoomData, WireError};
use wire::Item;

/// A sync frame a member sent in a room (see [`crate::sync`]).
pub(crate) struct SyncFrame {
    pub(crate) room: String,
    pub(crate) from: Fingerprint,
    pub(crate) bytes: Vec<u8>,
}

/// Most out-of-order messages held per stream.
pub const MAX_REORDER: usize = 1024;
/// Most members a room is tracked with (the server's largest room size).
pub const MAX_MEMBERS: usize = 256;
/// Bytes of items per relay frame. The body travels as a JSON string inside the relay
/// payload, where quotes and backslashes double: 24 KiB of items stay under the server's
/// 64 KiB frame limit whatever they hold.
const RELAY_BATCH_BYTES: usize = 24 * 1024;
/// The largest room message whatever [`RoomsConfig::max_message_size`] says: one that
/// goes alone in a relay frame must fit it too.
pub const MAX_ROOM_MESSAGE: usize = 28 * 1024;
/// Bytes of items per direct message.
const DIRECT_BATCH_BYTES: usize = 16 * 1024;
/// Bytes of messages one flush hands to a direct connection at most (about its send
/// window; more would only be refused).
const DIRECT_FLUSH_BYTES: usize = 64 * 1024;
/// Bytes of messages per stream sent by relay and not yet acknowledged: flow control, so
/// that many senders cannot pile more onto one receiver's server connection than it drains.
const RELAY_WINDOW_BYTES: usize = 64 * 1024;
/// Incoming presence updates accepted per member per second (and burst).
const PRESENCE_RX_RATE: f64 = 20.0;

/// How rooms behave. Every field has a default; see each.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RoomsConfig {
    /// Largest room message (its encoded size: binary counts as base64, text its JSON
    /// escaping). Default 16 KiB; at most [`MAX_ROOM_MESSAGE`] (a larger value acts as that).
    pub max_message_size: usize,
    /// Most unacknowledged messages per member. Default 512.
    pub max_unacked: usize,
    /// Relay frames per second the rooms may send in all (the server allows 200 frames per
    /// second per connection, for everything). Default 100.
    pub relay_rate: u32,
    /// Relay frames that may go at once after a quiet time. Default 100.
    pub relay_burst: u32,
    /// How long a sent message may wait for its acknowledgement before it is sent again
    /// (doubling after each miss, up to `max_rto`). Default 1 s.
    pub rto: Duration,
    /// The longest RTO. Default 8 s.
    pub max_rto: Duration,
    /// Least time between two presence updates sent. Default 100 ms.
    pub presence_interval: Duration,
    /// How long a member's presence holds without a refresh; refreshed every third of it.
    /// Default 30 s.
    pub presence_ttl: Duration,
    /// Largest presence state (JSON). Default 1 KiB.
    pub max_presence_size: usize,
    /// First wait before calling a member again whose connection failed (doubling, up to
    /// a minute). Default 2 s.
    pub redial_backoff: Duration,
    /// When the end-to-end sessions of encrypted rooms move to a new key. Default
    /// [`Limits::default`](crate::e2e::Limits) (2^24 messages or 64 GiB per key).
    pub e2e_limits: crate::e2e::Limits,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        RoomsConfig {
            max_message_size: 16 * 1024,
            max_unacked: 512,
            relay_rate: 100,
            relay_burst: 100,
            rto: Duration::from_secs(1),
            max_rto: Duration::from_secs(8),
            presence_interval: Duration::from_millis(100),
            presence_ttl: Duration::from_secs(30),
            max_presence_size: 1024,
            redial_backoff: Duration::from_secs(2),
            e2e_limits: crate::e2e::Limits::default(),
        }
    }
}

/// How a room is created.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RoomOptions {
    /// Most members (the server's default, 16, when `None`). A direct room is 2.
    pub max_size: Option<u32>,
    /// Metadata anyone can read (`room_info`, `list_rooms`).
    pub metadata: Option<serde_json::Value>,
    /// End-to-end encrypt the room (see [Encrypted rooms](self#encrypted-rooms)).
    pub encrypted: bool,
}

impl RoomOptions {
    /// A 1:1 room (the reference's `DirectRoom`).
    pub fn direct() -> Self {
        RoomOptions { max_size: Some(2), ..RoomOptions::default() }
    }

    /// A group room of at most `max_size` members (the reference's `GroupRoom`).
    pub fn group(max_size: u32) -> Self {
        RoomOptions { max_size: Some(max_size), ..RoomOptions::default() }
    }

    /// With this metadata.
    pub fn metadata(mut self, metadata: serde_json::Value) -> Self {
        self.metadata = Some(metadata);
        self
    }

    /// End-to-end encrypted (see [Encrypted rooms](self#encrypted-rooms)).
    pub fn encrypted(mut self) -> Self {
        self.encrypted = true;
        self
    }
}

/// How a room is joined.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct JoinOptions {
    /// End-to-end encrypt this node's side of the room (see
    /// [Encrypted rooms](self#encrypted-rooms)); every member must.
    pub encrypted: bool,
}

impl JoinOptions {
    /// Join an end-to-end encrypted room.
    pub fn encrypted() -> Self {
        JoinOptions { encrypted: true }
    }
}

/// The path a member's messages take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RoomPath {
    /// The direct connection.
    Direct,
    /// The signaling server's relay.
    Relay,
}

/// Errors of room commands, and of room input (as [`RoomEvent::Error`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RoomError {
    /// This node is not in that room (or has not finished joining it).
    #[error("not in room `{0}`")]
    NotJoined(String),
    /// This node is already in (or joining) that room.
    #[error("already in room `{0}`")]
    AlreadyJoined(String),
    /// The peer is not a member of the room.
    #[error("{0} is not a member of the room")]
    NotMember(Fingerprint),
    /// Only the owner may do that.
    #[error("only the room's owner may do that")]
    NotOwner,
    /// The message is over [`RoomsConfig::max_message_size`] (encoded).
    #[error("message of {size} bytes is over the room limit of {max}")]
    MessageTooLarge {
        /// Its encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A recipient has [`RoomsConfig::max_unacked`] messages unacknowledged; nothing was
    /// sent. Wait for [`RoomEvent::Writable`].
    #[error("{peer} has too many unacknowledged messages")]
    WouldBlock {
        /// The recipient that is behind.
        peer: Fingerprint,
    },
    /// The presence state is over [`RoomsConfig::max_presence_size`].
    #[error("presence state of {size} bytes is over the limit of {max}")]
    PresenceTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The value could not be serialized, is not JSON, or is JSON `null` (no room message).
    #[error("serialize: {0}")]
    Serialize(String),
    /// The server refused a room request (`room_full`, `room_not_found`, `not_room_owner`, ...).
    #[error("server refused: {0}")]
    Request(RequestError),
    /// A member sent plaintext in an encrypted room (it did not join it encrypted): refused,
    /// not acknowledged. Said once per member.
    #[error("{from} sent plaintext in an encrypted room: refused")]
    Unencrypted {
        /// The member.
        from: Fingerprint,
    },
    /// A member sent something unusable; it was dropped and nobody else is affected.
    #[error("bad room message from {from}: {error}")]
    BadMessage {
        /// The sender.
        from: Fingerprint,
        /// What was wrong.
        error: WireError,
    },
}

/// Something that happened in a room; arrives as [`NodeEvent::Room`](crate::NodeEvent::Room).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RoomEvent {
    /// This node is in the room (it created or joined it); connections to the members are
    /// under way.
    Joined {
        /// The room.
        room: String,
        /// Its owner.
        owner: Fingerprint,
        /// Its size limit.
        max_size: u32,
        /// Its metadata.
        metadata: Option<RawJson>,
        /// The other members.
        members: Vec<PeerInfo>,
    },
    /// Someone joined.
    PeerJoined {
        /// The room.
        room: String,
        /// The newcomer (alias and metadata as it registered them).
        peer: PeerInfo,
    },
    /// Someone left, or was kicked.
    PeerLeft {
        /// The room.
        room: String,
        /// Who.
        peer: Fingerprint,
        /// Whether the owner kicked it.
        kicked: bool,
    },
    /// A room message.
    Data {
        /// The room.
        room: String,
        /// The sender (proven: by DTLS on the direct path, by its signature on the relay).
        from: Fingerprint,
        /// The message (JSON arrives as text).
        data: Payload,
        /// How it came.
        path: RoomPath,
    },
    /// Messages to (and from) a member now take another path.
    PathChanged {
        /// The room.
        room: String,
        /// The member.
        peer: Fingerprint,
        /// The new path.
        path: RoomPath,
    },
    /// Sends refused with [`RoomError::WouldBlock`] may be tried again.
    Writable {
        /// The room.
        room: String,
    },
    /// A member's presence state changed (`None`: cleared).
    Presence {
        /// The room.
        room: String,
        /// The member.
        peer: Fingerprint,
        /// Its state.
        state: Option<serde_json::Value>,
    },
    /// A member's presence was not refreshed in time (it vanished, or its path is down).
    PresenceExpired {
        /// The room.
        room: String,
        /// The member.
        peer: Fingerprint,
    },
    /// This node is no longer in the room: the owner closed it, or this node left it.
    Closed {
        /// The room.
        room: String,
    },
    /// The owner kicked this node.
    Kicked {
        /// The room.
        room: String,
    },
    /// A room request failed, or a member sent something unusable.
    Error {
        /// The room.
        room: String,
        /// What went wrong.
        error: RoomError,
    },
}

/// A member, as [`RoomView`] shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberView {
    /// Its fingerprint, alias and metadata.
    pub info: PeerInfo,
    /// The path messages to it take now.
    pub path: RoomPath,
    /// Its presence state.
    pub presence: Option<serde_json::Value>,
    /// Messages to it not yet acknowledged.
    pub unacked: usize,
}

/// A read-only view of a room ([`Node::room`](crate::Node::room)).
#[derive(Debug, Clone, PartialEq)]
pub struct RoomView {
    /// The room id.
    pub id: String,
    /// Its owner.
    pub owner: Fingerprint,
    /// Its size limit.
    pub max_size: u32,
    /// Its metadata.
    pub metadata: Option<RawJson>,
    /// The other members.
    pub members: Vec<MemberView>,
    /// This node's own presence state.
    pub presence: Option<serde_json::Value>,
    /// Whether the room is end-to-end encrypted here.
    pub encrypted: bool,
}

/// What the rooms need from the node around them.
pub(crate) trait Transport {
    /// Whether the connection to `peer` is up with its internal channel open.
    fn direct_open(&self, peer: &Fingerprint) -> bool;
    /// Whether a batch sealed for `peer` now opens there (its end-to-end session is
    /// confirmed).
    fn sealed_ready(&self, peer: &Fingerprint) -> bool;
    /// Sends `text` on the internal channel to `peer`; `control` (small acknowledgements and
    /// presence) goes even when the connection's send window is full, so that one direction's
    /// data never holds back the other's acknowledgements. `seal`: end-to-end encrypt it.
    fn send_direct(&mut self, peer: Fingerprint, text: &str, control: bool, seal: bool) -> Result<(), SendError>;
    /// Whether the signaling client is registered (relays can go).
    fn relay_ready(&self) -> bool;
    /// Signs `body` (sealed first if `seal`) for `to` and relays it; false when the client
    /// refused it.
    fn send_relay(&mut self, to: Fingerprint, body: &str, seal: bool) -> bool;
    /// Whether a connection to `peer` exists that is not failed or closed.
    fn has_connection(&self, peer: &Fingerprint) -> bool;
    /// Starts a connection to `peer`.
    fn connect(&mut self, peer: Fingerprint);
    /// Closes the connection to `peer`.
    fn close_peer(&mut self, peer: Fingerprint);
}

/// What a pending server request was for.
#[derive(Debug, Clone)]
pub(crate) enum Pending {
    Enter(String),
    Kick(String),
}

struct OutMsg {
    seq: u64,
    /// Its encoded contents ([`wire::data_fragment`]), shared by the copies for every member.
    fragment: Arc<str>,
    sent: bool,
    force_relay: bool,
    /// Its encoded size, counted in `Out::relay_inflight` while sent by relay.
    relay_bytes: usize,
}

struct Out {
    next_seq: u64,
    unacked: VecDeque<OutMsg>,
    rto: Duration,
    deadline: Option<Instant>,
    blocked: bool,
    /// Bytes of messages sent by relay and not yet acknowledged.
    relay_inflight: usize,
}

impl Out {
    /// Everything unacknowledged goes again (on whatever path applies then).
    fn unsend_all(&mut self) {
        for msg in &mut self.unacked {
            msg.sent = false;
            msg.relay_bytes = 0;
        }
        self.relay_inflight = 0;
        self.deadline = None;
    }

    /// Drops what `seq` acknowledges; returns whether anything was.
    fn acknowledge(&mut self, seq: u64) -> bool {
        let before = self.unacked.len();
        while self.unacked.front().is_some_and(|x| x.seq <= seq) {
            let msg = self.unacked.pop_front().expect("checked");
            self.relay_inflight = self.relay_inflight.saturating_sub(msg.relay_bytes);
        }
        self.unacked.len() < before
    }
}

#[derive(Default)]
struct In {
    epoch: Option<u64>,
    next: u64,
    buffer: BTreeMap<u64, RoomData>,
    ack_due: bool,
}

struct RemotePresence {
    epoch: u64,
    version: u64,
    state: Option<serde_json::Value>,
    expires: Instant,
}

struct Member {
    info: PeerInfo,
    out: Out,
    inn: In,
    presence: Option<RemotePresence>,
    presence_tokens: (f64, Instant),
    /// Presence to send to this member (set when it joins, or on a change).
    presence_due: bool,
    path: Option<RoomPath>,
    /// Plaintext from it in an encrypted room was reported.
    warned_plain: bool,
}

impl Member {
    fn new(info: PeerInfo, rto: Duration, now: Instant) -> Self {
        Member {
            info,
            out: Out { next_seq: 1, unacked: VecDeque::new(), rto, deadline: None, blocked: false, relay_inflight: 0 },
            inn: In { next: 1, ..In::default() },
            presence: None,
            presence_tokens: (PRESENCE_RX_RATE, now),
            presence_due: true,
            path: None,
            warned_plain: false,
        }
    }
}

struct LocalPresence {
    state: Option<String>,
    version: u64,
    dirty: bool,
    last_sent: Option<Instant>,
}

struct Room {
    owner: Fingerprint,
    max_size: u32,
    metadata: Option<RawJson>,
    /// False while the create or join request is in flight.
    joined: bool,
    epoch: u64,
    members: BTreeMap<Fingerprint, Member>,
    presence: LocalPresence,
    /// The room id as a JSON string, for every data item.
    id_json: Arc<str>,
    /// End-to-end encrypted.
    encrypted: bool,
}

/// Every managed room of a node.
pub(crate) struct Rooms {
    config: RoomsConfig,
    /// Sync frames received, in order, for the node's sync layer.
    pub(crate) sync_inbox: VecDeque<SyncFrame>,
    /// Members of encrypted rooms that started over (a new session of theirs, or of ours):
    /// their keys start over too.
    pub(crate) restarted: Vec<Fingerprint>,
    me: Fingerprint,
    rooms: BTreeMap<String, Room>,
    pub(crate) pending: HashMap<RequestId, Pending>,
    direct: BTreeSet<Fingerprint>,
    /// Direct paths whose send window is full, until the connection says it has room.
    direct_blocked: BTreeSet<Fingerprint>,
    relay_tokens: f64,
    relay_at: Option<Instant>,
    /// Relay items wait for a token (a wake-up is due when one is there).
    relay_starved: bool,
    redial: BTreeMap<Fingerprint, (Instant, Duration)>,
    events: VecDeque<RoomEvent>,
    /// The last epoch given out.
    last_epoch: u64,
    /// An instant and the wall clock (ms) then, to date epochs.
    clock: Option<(Instant, u64)>,
}

/// Where an item in a batch came from, to mark it sent (or put it back) after the send.
#[derive(Clone)]
enum Origin {
    Data { room: String, seq: u64 },
    Ack { room: String },
    Presence { room: String },
}

impl Origin {
    fn room(&self) -> &str {
        match self {
            Origin::Data { room, .. } | Origin::Ack { room } | Origin::Presence { room } => room,
        }
    }
}

/// An item ready to encode: a control item, or a message whose contents were encoded once
/// at send time.
enum Piece {
    Control(Item),
    Data { room_json: Arc<str>, epoch: u64, seq: u64, fragment: Arc<str> },
}

impl Piece {
    fn len(&self) -> usize {
        match self {
            Piece::Control(item) => item.encoded_len(),
            Piece::Data { room_json, fragment, .. } => wire::data_item_len(room_json.len(), fragment.len()),
        }
    }

    fn is_data(&self) -> bool {
        matches!(self, Piece::Data { .. })
    }
}

/// A batch body: `{"m":[...]}`.
fn encode_pieces(pieces: &[Piece]) -> String {
    let mut out = String::with_capacity(8 + pieces.iter().map(Piece::len).sum::<usize>());
    out.push_str(r#"{"m":["#);
    for (i, piece) in pieces.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match piece {
            Piece::Control(item) => item.encode_into(&mut out),
            Piece::Data { room_json, epoch, seq, fragment } => wire::encode_data_item(&mut out, room_json, *epoch, *seq, fragment),
        }
    }
    out.push_str("]}");
    out
}

impl Default for Rooms {
    /// An empty set (a placeholder while the real one is in use).
    fn default() -> Self {
        Rooms::with_clock(RoomsConfig::default(), Fingerprint::from_bytes([0; 32]), None)
    }
}

impl Rooms {
    /// `now` and `unix_ms` (the wall clock then) date the streams' epochs.
    pub(crate) fn new(config: RoomsConfig, me: Fingerprint, now: Instant, unix_ms: u64) -> Self {
        Rooms::with_clock(config, me, Some((now, unix_ms)))
    }

    fn with_clock(config: RoomsConfig, me: Fingerprint, clock: Option<(Instant, u64)>) -> Self {
        Rooms {
            sync_inbox: VecDeque::new(),
            restarted: Vec::new(),
            relay_tokens: f64::from(config.relay_burst),
            config,
            me,
            rooms: BTreeMap::new(),
            pending: HashMap::new(),
            direct: BTreeSet::new(),
            direct_blocked: BTreeSet::new(),
            relay_at: None,
            relay_starved: false,
            redial: BTreeMap::new(),
            events: VecDeque::new(),
            last_epoch: 0,
            clock,
        }
    }

    pub(crate) fn poll_event(&mut self) -> Option<RoomEvent> {
        self.events.pop_front()
    }

    /// Whether `room` is managed here (joined or joining).
    pub(crate) fn manages(&self, room: &str) -> bool {
        self.rooms.contains_key(room)
    }

    /// Whether `peer` is a member of any room here.
    pub(crate) fn is_member(&self, peer: &Fingerprint) -> bool {
        self.rooms.values().any(|r| r.members.contains_key(peer))
    }

    /// Whether this node is in (or entering) an encrypted room.
    pub(crate) fn any_encrypted(&self) -> bool {
        self.rooms.values().any(|r| r.encrypted)
    }

    /// The members of the encrypted rooms this node is in.
    pub(crate) fn encrypted_peers(&self) -> BTreeSet<Fingerprint> {
        self.rooms.values().filter(|r| r.joined && r.encrypted).flat_map(|r| r.members.keys().copied()).collect()
    }

    pub(crate) fn ids(&self) -> impl Iterator<Item = &str> {
        self.rooms.iter().filter(|(_, r)| r.joined).map(|(id, _)| id.as_str())
    }

    pub(crate) fn view(&self, id: &str) -> Option<RoomView> {
        let room = self.rooms.get(id).filter(|r| r.joined)?;
        Some(RoomView {
            id: id.to_owned(),
            owner: room.owner,
            max_size: room.max_size,
            metadata: room.metadata.clone(),
            members: room
                .members
                .iter()
                .map(|(fp, m)| MemberView {
                    info: m.info.clone(),
                    path: if self.direct.contains(fp) { RoomPath::Direct } else { RoomPath::Relay },
                    presence: m.presence.as_ref().and_then(|p| p.state.clone()),
                    unacked: m.out.unacked.len(),
                })
                .collect(),
            presence: room.presence.state.as_deref().and_then(|s| serde_json::from_str(s).ok()),
            encrypted: room.encrypted,
        })
    }

    /// A new stream epoch: the wall clock in ms times 1024, and above every earlier one, so
    /// a member's epochs only grow (also across restarts, as far as its clock does) and an old
    /// stream replayed by the server is recognised as old. Below 2^53, so JavaScript reads it
    /// exactly, until the year 2248.
    fn new_epoch(&mut self, now: Instant) -> u64 {
        let ms = self.clock.map_or(0, |(at, unix_ms)| unix_ms + u64::try_from(now.saturating_duration_since(at).as_millis()).unwrap_or(0));
        self.last_epoch = (ms << 10).max(self.last_epoch + 1) & ((1 << 53) - 1);
        self.last_epoch
    }

    // ---- commands -----------------------------------------------------------------------

    /// Registers a room being created or joined (the request is `request`).
    pub(crate) fn entering(&mut self, now: Instant, id: &str, request: RequestId, encrypted: bool) -> Result<(), RoomError> {
        if self.rooms.contains_key(id) {
            return Err(RoomError::AlreadyJoined(id.to_owned()));
        }
        let epoch = self.new_epoch(now);
        self.rooms.insert(
            id.to_owned(),
            Room {
                owner: self.me,
                max_size: 0,
                metadata: None,
                joined: false,
                epoch,
                members: BTreeMap::new(),
                presence: LocalPresence { state: None, version: 0, dirty: false, last_sent: None },
                id_json: serde_json::to_string(id).expect("a string serializes").into(),
                encrypted,
            },
        );
        self.pending.insert(request, Pending::Enter(id.to_owned()));
        Ok(())
    }

    pub(crate) fn check_joined(&self, id: &str) -> Result<(), RoomError> {
        match self.rooms.get(id) {
            Some(r) if r.joined => Ok(()),
            _ => Err(RoomError::NotJoined(id.to_owned())),
        }
    }

    /// Whether this node owns `id`.
    pub(crate) fn is_owner(&self, id: &str) -> Result<bool, RoomError> {
        self.check_joined(id)?;
        Ok(self.rooms[id].owner == self.me)
    }

    pub(crate) fn check_kick(&self, id: &str, peer: &Fingerprint) -> Result<(), RoomError> {
        if !self.is_owner(id)? {
            return Err(RoomError::NotOwner);
        }
        if !self.rooms[id].members.contains_key(peer) {
            return Err(RoomError::NotMember(*peer));
        }
        Ok(())
    }

    /// Queues a message to every member (`to: None`) or one; all or nothing.
    pub(crate) fn send(&mut self, id: &str, to: Option<Fingerprint>, data: RoomData, force_relay: bool) -> Result<(), RoomError> {
        self.check_joined(id)?;
        let size = data.wire_len();
        let max = self.config.max_message_size.min(MAX_ROOM_MESSAGE);
        if size > max {
            return Err(RoomError::MessageTooLarge { size, max });
        }
        if let RoomData::Json(text) = &data {
            // Not JSON would make every batch it rides in unreadable, and its stream stuck.
            let raw = serde_json::from_str::<&serde_json::value::RawValue>(text).map_err(|e| RoomError::Serialize(format!("not JSON: {e}")))?;
            // `"j":null` reads as no contents on the wire (a malformed item), so would `null`.
            if raw.get().trim() == "null" {
                return Err(RoomError::Serialize("a JSON null is no room message (send `{}`, `[]` or text)".into()));
            }
        }
        let max_unacked = self.config.max_unacked;
        let room = self.rooms.get_mut(id).expect("checked");
        let targets: Vec<Fingerprint> = match to {
            Some(peer) if room.members.contains_key(&peer) => vec![peer],
            Some(peer) => return Err(RoomError::NotMember(peer)),
            None => room.members.keys().copied().collect(),
        };
        let full: Vec<Fingerprint> = targets.iter().filter(|p| room.members[*p].out.unacked.len() >= max_unacked).copied().collect();
        if let Some(&peer) = full.first() {
            for p in &full {
                room.members.get_mut(p).expect("member").out.blocked = true;
            }
            return Err(RoomError::WouldBlock { peer });
        }
        let fragment: Arc<str> = wire::data_fragment(&data).into();
        for peer in targets {
            let out = &mut room.members.get_mut(&peer).expect("member").out;
            let seq = out.next_seq;
            out.next_seq += 1;
            out.unacked.push_back(OutMsg { seq, fragment: fragment.clone(), sent: false, force_relay, relay_bytes: 0 });
        }
        Ok(())
    }

    pub(crate) fn set_presence(&mut self, id: &str, state: Option<&serde_json::Value>) -> Result<(), RoomError> {
        self.check_joined(id)?;
        let text = state.map(serde_json::to_string).transpose().map_err(|e| RoomError::Serialize(e.to_string()))?;
        if let Some(t) = &text {
            if t.len() > self.config.max_presence_size {
                return Err(RoomError::PresenceTooLarge { size: t.len(), max: self.config.max_presence_size });
            }
        }
        let room = self.rooms.get_mut(id).expect("checked");
        if room.presence.state == text {
            return Ok(());
        }
        room.presence.state = text;
        room.presence.version += 1;
        room.presence.dirty = true;
        Ok(())
    }

    /// This node left, was kicked from, or lost `id`: forget it, close connections that no
    /// other room needs, and say so with `event`.
    pub(crate) fn remove(&mut self, id: &str, event: Option<RoomEvent>, t: &mut dyn Transport) {
        let Some(room) = self.rooms.remove(id) else { return };
        self.pending.retain(|_, p| !matches!(p, Pending::Enter(r) | Pending::Kick(r) if r == id));
        for peer in room.members.keys() {
            if !self.is_member(peer) {
                self.redial.remove(peer);
                t.close_peer(*peer);
            }
        }
        if room.joined {
            self.events.extend(event);
        }
    }

    // ---- membership from the server ------------------------------------------------------

    /// The create or join request succeeded.
    pub(crate) fn on_entered(&mut self, now: Instant, details: RoomDetails, peers: Vec<PeerInfo>, t: &mut dyn Transport) {
        let rto = self.config.rto;
        let Some(room) = self.rooms.get_mut(&details.room_id) else { return };
        room.owner = details.owner;
        room.max_size = details.max_size;
        room.metadata = details.metadata.clone();
        room.joined = true;
        let mut members = Vec::new();
        for info in peers.into_iter().filter(|p| p.fingerprint != self.me).take(MAX_MEMBERS) {
            members.push(info.clone());
            room.members.insert(info.fingerprint, Member::new(info, rto, now));
        }
        debug!(room = %details.room_id, members = members.len(), "in room");
        // Whoever joins calls everyone already there.
        for m in &members {
            if !t.has_connection(&m.fingerprint) {
                t.connect(m.fingerprint);
            }
        }
        self.events.push_back(RoomEvent::Joined {
            room: details.room_id,
            owner: details.owner,
            max_size: details.max_size,
            metadata: details.metadata,
            members,
        });
    }

    /// The create or join request failed.
    pub(crate) fn on_enter_failed(&mut self, id: &str, error: RequestError) {
        if self.rooms.get(id).is_some_and(|r| !r.joined) {
            self.rooms.remove(id);
            self.events.push_back(RoomEvent::Error { room: id.to_owned(), error: RoomError::Request(error) });
        }
    }

    /// After a reconnect that lost the session, the client joined `details` again: the
    /// members now are `peers`.
    pub(crate) fn on_rejoined(&mut self, now: Instant, details: RoomDetails, peers: Vec<PeerInfo>) {
        let id = details.room_id.clone();
        let epoch = self.new_epoch(now);
        let Some(room) = self.rooms.get_mut(&id) else { return };
        // The others saw this node leave (its session ended) and come back: to them it is a
        // new member, with new streams both ways. Start ours afresh (a new epoch) and send
        // what they have not acknowledged again under it.
        room.epoch = epoch;
        for m in room.members.values_mut() {
            m.inn = In { next: 1, ..In::default() };
            m.out.unsend_all();
            for (seq, msg) in (1..).zip(m.out.unacked.iter_mut()) {
                msg.seq = seq;
            }
            m.out.next_seq = m.out.unacked.len() as u64 + 1;
            m.presence = None;
            m.presence_due = true;
        }
        if room.encrypted {
            // They start over with us: so do the keys.
            self.restarted.extend(room.members.keys().copied());
        }
        let room = &self.rooms[&id];
        let now_in: BTreeSet<Fingerprint> = peers.iter().map(|p| p.fingerprint).filter(|f| *f != self.me).collect();
        let gone: Vec<Fingerprint> = room.members.keys().filter(|f| !now_in.contains(f)).copied().collect();
        for peer in gone {
            self.on_peer_left(&id, peer, false);
        }
        let me = self.me;
        for info in peers.into_iter().filter(|p| p.fingerprint != me) {
            if !self.rooms[&id].members.contains_key(&info.fingerprint) {
                self.on_peer_joined(now, &id, info);
            }
        }
    }

    pub(crate) fn on_peer_joined(&mut self, now: Instant, id: &str, info: PeerInfo) {
        let rto = self.config.rto;
        let Some(room) = self.rooms.get_mut(id).filter(|r| r.joined) else { return };
        if info.fingerprint == self.me {
            return;
        }
        if room.members.len() >= MAX_MEMBERS && !room.members.contains_key(&info.fingerprint) {
            warn!(room = %id, "more members than any room may have: ignored");
            return;
        }
        if let Some(m) = room.members.get_mut(&info.fingerprint) {
            // Joined again without our hearing it leave (we were away): it starts new
            // streams, and so do we towards it (what it missed is lost with its old session).
            *m = Member::new(info, rto, now);
            if room.encrypted {
                self.restarted.push(m.info.fingerprint);
            }
            return;
        }
        room.members.insert(info.fingerprint, Member::new(info.clone(), rto, now));
        // The newcomer calls; nothing to do but wait.
        self.events.push_back(RoomEvent::PeerJoined { room: id.to_owned(), peer: info });
    }

    pub(crate) fn on_peer_left(&mut self, id: &str, peer: Fingerprint, kicked: bool) {
        let Some(room) = self.rooms.get_mut(id).filter(|r| r.joined) else { return };
        if let Some(m) = room.members.remove(&peer) {
            self.events.push_back(RoomEvent::PeerLeft { room: id.to_owned(), peer, kicked });
            if m.out.blocked {
                // Whoever waits for room to send must not wait for a member that is gone.
                self.events.push_back(RoomEvent::Writable { room: id.to_owned() });
            }
        }
        if !self.is_member(&peer) {
            self.redial.remove(&peer);
        }
    }

    // ---- paths -----------------------------------------------------------------------------

    /// The direct path to `peer` came up or went down: what is unacknowledged goes again on
    /// the path that now applies.
    pub(crate) fn direct_changed(&mut self, peer: Fingerprint, open: bool) {
        let changed = if open { self.direct.insert(peer) } else { self.direct.remove(&peer) };
        if !changed {
            return;
        }
        if open {
            self.redial.remove(&peer);
        }
        self.direct_blocked.remove(&peer);
        for room in self.rooms.values_mut() {
            if let Some(m) = room.members.get_mut(&peer) {
                m.out.unsend_all();
                m.inn.ack_due = true;
                m.presence_due = true;
            }
        }
    }

    /// The connection to `peer` failed or closed: the member with the smaller fingerprint
    /// calls again after a backoff.
    pub(crate) fn connection_lost(&mut self, now: Instant, peer: Fingerprint) {
        self.direct_changed(peer, false);
        if self.is_member(&peer) && self.me < peer {
            let backoff = self.redial.get(&peer).map_or(self.config.redial_backoff, |(_, b)| (*b * 2).min(Duration::from_secs(60)));
            self.redial.insert(peer, (now + backoff, backoff));
        }
    }

    /// The signaling connection is back: what went (or was to go) by relay goes again.
    pub(crate) fn relay_restored(&mut self) {
        for room in self.rooms.values_mut() {
            for (fp, m) in &mut room.members {
                if !self.direct.contains(fp) || m.out.unacked.iter().any(|x| x.force_relay) {
                    m.out.unsend_all();
                    m.inn.ack_due = true;
                }
            }
        }
    }

    // ---- input from members ----------------------------------------------------------------

    /// A batch from `from` arrived on `path`.
    /// `sealed`: it came end-to-end encrypted (only such items are taken for an encrypted
    /// room).
    pub(crate) fn handle_items(&mut self, now: Instant, from: Fingerprint, items: Vec<Item>, path: RoomPath, sealed: bool) {
        let max_unacked = self.config.max_unacked;
        let base_rto = self.config.rto;
        let max_presence = self.config.max_presence_size;
        for item in items {
            let id = item.room().to_owned();
            let Some(room) = self.rooms.get_mut(&id).filter(|r| r.joined) else {
                trace!(room = %id, from = %from.short(), "item for a room we are not in");
                continue;
            };
            let our_epoch = room.epoch;
            let Some(m) = room.members.get_mut(&from) else {
                // Not (yet) a member here: its join notice may still be on its way. Not
                // acknowledged, so it comes again.
                trace!(room = %id, from = %from.short(), "item from a non-member");
                continue;
            };
            if room.encrypted && !sealed {
                // Not acknowledged either: its sender cannot tell it was refused but by this.
                if !m.warned_plain {
                    m.warned_plain = true;
                    warn!(room = %id, from = %from.short(), "plaintext in an encrypted room refused");
                    self.events.push_back(RoomEvent::Error { room: id.clone(), error: RoomError::Unencrypted { from } });
                }
                continue;
            }
            match item {
                Item::Data { epoch, seq, data, .. } => {
                    if m.inn.epoch.is_some_and(|e| epoch < e) {
                        debug!(room = %id, from = %from.short(), "data of an older stream ignored");
                        continue;
                    }
                    if m.inn.epoch != Some(epoch) {
                        if m.inn.epoch.is_some() {
                            debug!(room = %id, from = %from.short(), "member started a new stream");
                        }
                        m.inn = In { epoch: Some(epoch), next: 1, ..In::default() };
                    }
                    m.inn.ack_due = true;
                    if seq < m.inn.next {
                        continue;
                    }
                    if seq > m.inn.next {
                        if m.inn.buffer.len() < MAX_REORDER && seq - m.inn.next <= MAX_REORDER as u64 {
                            m.inn.buffer.insert(seq, data);
                        }
                        continue;
                    }
                    deliver(&mut self.events, &mut self.sync_inbox, &id, from, data, path);
                    m.inn.next += 1;
                    while let Some(data) = m.inn.buffer.remove(&m.inn.next) {
                        deliver(&mut self.events, &mut self.sync_inbox, &id, from, data, path);
                        m.inn.next += 1;
                    }
                }
                Item::Ack { epoch, seq, .. } => {
                    if epoch != our_epoch {
                        continue;
                    }
                    if m.out.acknowledge(seq) {
                        m.out.rto = base_rto;
                        m.out.deadline = if m.out.unacked.iter().any(|x| x.sent) { Some(now + m.out.rto) } else { None };
                        if m.out.blocked && m.out.unacked.len() <= max_unacked / 2 {
                            m.out.blocked = false;
                            self.events.push_back(RoomEvent::Writable { room: id.clone() });
                        }
                    }
                }
                Item::Presence { epoch, version, ttl_ms, state, .. } => {
                    // The member's own rate, enforced here too.
                    let (tokens, at) = m.presence_tokens;
                    let tokens = (tokens + now.saturating_duration_since(at).as_secs_f64() * PRESENCE_RX_RATE).min(PRESENCE_RX_RATE);
                    if tokens < 1.0 {
                        m.presence_tokens = (tokens, now);
                        debug!(room = %id, from = %from.short(), "presence update over the rate dropped");
                        continue;
                    }
                    m.presence_tokens = (tokens - 1.0, now);
                    let expires = now + Duration::from_millis(ttl_ms);
                    if m.presence.as_ref().is_some_and(|p| epoch < p.epoch) {
                        continue;
                    }
                    let fresh = match &m.presence {
                        Some(p) => p.epoch != epoch || version > p.version,
                        None => true,
                    };
                    if let (false, Some(p)) = (fresh, m.presence.as_mut()) {
                        if version == p.version {
                            p.expires = expires;
                        }
                        continue;
                    }
                    if state.as_ref().is_some_and(|s| s.len() > max_presence) {
                        self.events.push_back(RoomEvent::Error {
                            room: id.clone(),
                            error: RoomError::BadMessage { from, error: WireError::Malformed("presence state over the size limit".into()) },
                        });
                        continue;
                    }
                    let value = match state.as_deref().map(serde_json::from_str::<serde_json::Value>).transpose() {
                        Ok(v) => v,
                        Err(e) => {
                            self.events.push_back(RoomEvent::Error {
                                room: id.clone(),
                                error: RoomError::BadMessage { from, error: WireError::Malformed(e.to_string()) },
                            });
                            continue;
                        }
                    };
                    let changed = m.presence.as_ref().is_none_or(|p| p.state != value);
                    m.presence = Some(RemotePresence { epoch, version, state: value.clone(), expires });
                    if changed {
                        self.events.push_back(RoomEvent::Presence { room: id.clone(), peer: from, state: value });
                    }
                }
            }
        }
    }

    /// A member sent something unusable.
    pub(crate) fn bad_input(&mut self, from: Fingerprint, error: WireError) {
        warn!(from = %from.short(), %error, "bad room message");
        let rooms: Vec<String> = self.rooms.iter().filter(|(_, r)| r.members.contains_key(&from)).map(|(id, _)| id.clone()).collect();
        for room in rooms {
            self.events.push_back(RoomEvent::Error { room, error: RoomError::BadMessage { from, error: error.clone() } });
        }
    }

    // ---- output --------------------------------------------------------------------------

    /// Sends whatever can go now. Call after every input.
    pub(crate) fn flush(&mut self, now: Instant, t: &mut dyn Transport) {
        if self.rooms.is_empty() {
            return;
        }
        self.refill(now);
        self.timers(now, t);
        let peers: BTreeSet<Fingerprint> = self.rooms.values().flat_map(|r| r.members.keys().copied()).collect();
        self.relay_starved = false;
        for peer in peers {
            let direct = self.direct.contains(&peer) && t.direct_open(&peer);
            let relay_ok = t.relay_ready() && self.relay_tokens >= 1.0;
            if t.relay_ready() && self.relay_tokens < 1.0 {
                self.relay_starved = true;
            }
            let (direct_items, relay_items) = self.collect(peer, direct, relay_ok, t.sealed_ready(&peer));
            if !direct_items.is_empty() {
                self.send_batches(now, peer, direct_items, RoomPath::Direct, t);
            }
            if !relay_items.is_empty() {
                self.send_batches(now, peer, relay_items, RoomPath::Relay, t);
            }
        }
    }

    /// The notice that the direct connection to `peer` has room in its send window again.
    pub(crate) fn direct_writable(&mut self, peer: Fingerprint) {
        self.direct_blocked.remove(&peer);
    }

    fn refill(&mut self, now: Instant) {
        let rate = f64::from(self.config.relay_rate.max(1));
        if let Some(at) = self.relay_at {
            let add = now.saturating_duration_since(at).as_secs_f64() * rate;
            self.relay_tokens = (self.relay_tokens + add).min(f64::from(self.config.relay_burst.max(1)));
        }
        self.relay_at = Some(now);
    }

    /// RTOs, presence refreshes and expiries, and redials that are due.
    fn timers(&mut self, now: Instant, t: &mut dyn Transport) {
        let (max_rto, interval) = (self.config.max_rto, self.config.presence_interval);
        let refresh = self.config.presence_ttl / 3;
        for (id, room) in &mut self.rooms {
            for (fp, m) in &mut room.members {
                if m.out.deadline.is_some_and(|d| d <= now) {
                    debug!(room = %id, peer = %fp.short(), unacked = m.out.unacked.len(), rto = ?m.out.rto, "no acknowledgement: sending again");
                    m.out.unsend_all();
                    m.out.rto = (m.out.rto * 2).min(max_rto);
                }
                if m.presence.as_ref().is_some_and(|p| p.expires <= now) {
                    m.presence = None;
                    self.events.push_back(RoomEvent::PresenceExpired { room: id.clone(), peer: *fp });
                }
            }
            let p = &mut room.presence;
            let may_send = p.last_sent.is_none_or(|at| now >= at + interval);
            let stale = p.state.is_some() && p.last_sent.is_some_and(|at| now >= at + refresh);
            if (p.dirty && may_send) || stale {
                p.dirty = false;
                p.last_sent = Some(now);
                for m in room.members.values_mut() {
                    m.presence_due = true;
                }
            }
        }
        let due: Vec<Fingerprint> = self.redial.iter().filter(|(_, (at, _))| *at <= now).map(|(fp, _)| *fp).collect();
        for peer in due {
            let backoff = self.redial[&peer].1;
            if !t.has_connection(&peer) {
                debug!(peer = %peer.short(), "calling a room member again");
                t.connect(peer);
            }
            // Checked again then; cleared when the direct path opens.
            let next = (backoff * 2).min(Duration::from_secs(60));
            self.redial.insert(peer, (now + backoff, next));
        }
    }

    /// What is due to `peer` and can go now, in order, for the direct path and for the relay:
    /// per room an acknowledgement and presence (control items, first), then unsent messages,
    /// as much as the path takes now (a direct connection's window, the relay's tokens and the
    /// stream's relay window). What is left stays due.
    #[allow(clippy::type_complexity)]
    fn collect(&mut self, peer: Fingerprint, direct: bool, relay_ok: bool, sealed_ok: bool) -> (Vec<(Piece, Origin)>, Vec<(Piece, Origin)>) {
        let ttl_ms = u64::try_from(self.config.presence_ttl.as_millis()).unwrap_or(u64::MAX).min(wire::MAX_PRESENCE_TTL_MS);
        let (mut direct_items, mut relay_items) = (Vec::new(), Vec::new());
        let mut direct_budget = if direct && !self.direct_blocked.contains(&peer) { DIRECT_FLUSH_BYTES } else { 0 };
        let mut relay_budget = if relay_ok { (self.relay_tokens.floor() as usize).min(8) * RELAY_BATCH_BYTES } else { 0 };
        for (id, room) in &mut self.rooms {
            let Some(m) = room.members.get_mut(&peer) else { continue };
            let path = if direct { RoomPath::Direct } else { RoomPath::Relay };
            if m.path != Some(path) {
                if m.path.is_some() || path == RoomPath::Direct {
                    self.events.push_back(RoomEvent::PathChanged { room: id.clone(), peer, path });
                }
                m.path = Some(path);
            }
            if room.encrypted && !sealed_ok {
                // Nothing of an encrypted room goes before the member can open it.
                continue;
            }
            // Control items take the path's way when it can take anything now.
            let control = if direct { Some(&mut direct_items) } else if relay_ok { Some(&mut relay_items) } else { None };
            if let Some(control) = control {
                if m.inn.ack_due {
                    if let Some(epoch) = m.inn.epoch {
                        m.inn.ack_due = false;
                        control.push((Piece::Control(Item::Ack { room: id.clone(), epoch, seq: m.inn.next - 1 }), Origin::Ack { room: id.clone() }));
                    }
                }
                if m.presence_due && room.presence.last_sent.is_some() {
                    m.presence_due = false;
                    let p = &room.presence;
                    let item = Item::Presence { room: id.clone(), epoch: room.epoch, version: p.version, ttl_ms, state: p.state.clone() };
                    control.push((Piece::Control(item), Origin::Presence { room: id.clone() }));
                }
            }
            let mut relay_window = RELAY_WINDOW_BYTES.saturating_sub(m.out.relay_inflight);
            let (direct_budget, relay_budget) = (&mut direct_budget, &mut relay_budget);
            let room_json = &room.id_json;
            for msg in m.out.unacked.iter().filter(|x| !x.sent) {
                let by_relay = !direct || msg.force_relay;
                let len = wire::data_item_len(room_json.len(), msg.fragment.len());
                let (budget, items) = if by_relay { (&mut *relay_budget, &mut relay_items) } else { (&mut *direct_budget, &mut direct_items) };
                // In order per stream: once one message has to wait, the rest wait too. A
                // stream with nothing in flight by relay may always send one.
                let fits = *budget >= len && (!by_relay || len <= relay_window || relay_window == RELAY_WINDOW_BYTES);
                if !fits {
                    break;
                }
                *budget = budget.saturating_sub(len);
                if by_relay {
                    relay_window = relay_window.saturating_sub(len);
                }
                let piece = Piece::Data { room_json: room_json.clone(), epoch: room.epoch, seq: msg.seq, fragment: msg.fragment.clone() };
                items.push((piece, Origin::Data { room: id.clone(), seq: msg.seq }));
            }
        }
        (direct_items, relay_items)
    }

    fn send_batches(&mut self, now: Instant, peer: Fingerprint, items: Vec<(Piece, Origin)>, path: RoomPath, t: &mut dyn Transport) {
        let limit = if path == RoomPath::Direct { DIRECT_BATCH_BYTES } else { RELAY_BATCH_BYTES };
        // On the direct path, control items go first in a batch of their own that the send
        // window does not hold back.
        let control_first = path == RoomPath::Direct && items.first().is_some_and(|(p, _)| !p.is_data());
        let mut rest = items.into_iter().peekable();
        let mut first = true;
        loop {
            let control = first && control_first;
            first = false;
            let mut batch: Vec<Piece> = Vec::new();
            let mut origins: Vec<Origin> = Vec::new();
            let mut bytes = 0;
            while let Some((item, origin)) = rest.peek() {
                let len = item.len();
                if control && matches!(origin, Origin::Data { .. }) {
                    break;
                }
                if !batch.is_empty() && (bytes + len > limit || batch.len() >= wire::MAX_ITEMS) {
                    break;
                }
                bytes += len;
                let (item, origin) = rest.next().expect("peeked");
                batch.push(item);
                origins.push(origin);
            }
            if batch.is_empty() {
                return;
            }
            let seal = origins.iter().any(|o| self.rooms.get(o.room()).is_some_and(|r| r.encrypted));
            let sent = match path {
                RoomPath::Direct => match t.send_direct(peer, &encode_pieces(&batch), control, seal) {
                    Ok(()) => true,
                    Err(SendError::WouldBlock { .. }) => {
                        self.direct_blocked.insert(peer);
                        false
                    }
                    Err(e) => {
                        debug!(peer = %peer.short(), error = %e, "direct room send failed");
                        false
                    }
                },
                RoomPath::Relay => {
                    if !t.relay_ready() {
                        false
                    } else if self.relay_tokens < 1.0 {
                        self.relay_starved = true;
                        false
                    } else if t.send_relay(peer, &encode_pieces(&batch), seal) {
                        self.relay_tokens -= 1.0;
                        true
                    } else {
                        false
                    }
                }
            };
            if !sent {
                // Put the unsent control items back; unsent messages stay unsent.
                let rest_origins = origins.into_iter().chain(rest.map(|(_, o)| o));
                for origin in rest_origins {
                    self.requeue(peer, origin);
                }
                return;
            }
            // The direct path is reliable while it lasts (a path change sends everything
            // again): its RTO is only a safety net.
            let max_rto = self.config.max_rto;
            for (item, origin) in batch.iter().zip(origins) {
                if let Origin::Data { room, seq } = origin {
                    if let Some(m) = self.rooms.get_mut(&room).and_then(|r| r.members.get_mut(&peer)) {
                        if let Some(msg) = m.out.unacked.iter_mut().find(|x| x.seq == seq) {
                            msg.sent = true;
                            if path == RoomPath::Relay {
                                msg.relay_bytes = item.len();
                                m.out.relay_inflight += msg.relay_bytes;
                            }
                        }
                        if m.out.deadline.is_none() {
                            let rto = if path == RoomPath::Direct { max_rto } else { m.out.rto };
                            m.out.deadline = Some(now + rto);
                        }
                    }
                }
            }
        }
    }

    fn requeue(&mut self, peer: Fingerprint, origin: Origin) {
        let (room, ack) = match origin {
            Origin::Data { .. } => return,
            Origin::Ack { room } => (room, true),
            Origin::Presence { room } => (room, false),
        };
        if let Some(m) = self.rooms.get_mut(&room).and_then(|r| r.members.get_mut(&peer)) {
            if ack {
                m.inn.ack_due = true;
            } else {
                m.presence_due = true;
            }
        }
    }

    /// When [`Rooms::flush`] next has something to do without new input.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for room in self.rooms.values() {
            for m in room.members.values() {
                if let Some(d) = m.out.deadline {
                    at(d);
                }
                if let Some(p) = &m.presence {
                    at(p.expires);
                }
            }
            let p = &room.presence;
            if let Some(last) = p.last_sent {
                if p.dirty {
                    at(last + self.config.presence_interval);
                } else if p.state.is_some() {
                    at(last + self.config.presence_ttl / 3);
                }
            } else if p.dirty {
                // Never sent: the next flush sends it; it runs after this input anyway.
            }
        }
        for (t, _) in self.redial.values() {
            at(*t);
        }
        if self.relay_starved {
            if let Some(last) = self.relay_at {
                let need = (1.0 - self.relay_tokens).max(0.0) / f64::from(self.config.relay_rate.max(1));
                at(last + Duration::from_secs_f64(need) + Duration::from_millis(1));
            }
        }
        next
    }
}

fn deliver(events: &mut VecDeque<RoomEvent>, sync: &mut VecDeque<SyncFrame>, room: &str, from: Fingerprint, data: RoomData, path: RoomPath) {
    let data = match data {
        RoomData::Json(s) | RoomData::Text(s) => Payload::Text(s),
        RoomData::Binary(b) => Payload::Binary(b),
        RoomData::Sync(bytes) => return sync.push_back(SyncFrame { room: room.to_owned(), from, bytes }),
    };
    events.push_back(RoomEvent::Data { room: room.to_owned(), from, data, path });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::PeerInfo;

    /// A transport with no connections and a relay that takes everything.
    #[derive(Default)]
    struct Relay {
        sent: Vec<(Fingerprint, String)>,
    }

    impl Transport for Relay {
        fn direct_open(&self, _: &Fingerprint) -> bool {
            false
        }
        fn sealed_ready(&self, _: &Fingerprint) -> bool {
            false
        }
        fn send_direct(&mut self, peer: Fingerprint, _: &str, _: bool, _: bool) -> Result<(), SendError> {
            Err(SendError::UnknownPeer(peer))
        }
        fn relay_ready(&self) -> bool {
            true
        }
        fn send_relay(&mut self, to: Fingerprint, body: &str, _: bool) -> bool {
            self.sent.push((to, body.to_owned()));
            true
        }
        fn has_connection(&self, _: &Fingerprint) -> bool {
            true
        }
        fn connect(&mut self, _: Fingerprint) {}
        fn close_peer(&mut self, _: Fingerprint) {}
    }

    fn peer(b: u8) -> PeerInfo {
        PeerInfo { fingerprint: Fingerprint::from_bytes([b; 32]), alias: format!("p{b}"), meta: None, app_type: None, app_version: None }
    }

    fn data(epoch: u64, seq: u64, text: &str) -> Item {
        Item::Data { room: "r".into(), epoch, seq, data: RoomData::Text(text.into()) }
    }

    fn delivered(rooms: &mut Rooms) -> Vec<String> {
        std::iter::from_fn(|| rooms.poll_event())
            .filter_map(|e| match e {
                RoomEvent::Data { data: Payload::Text(t), .. } => Some(t),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn streams_deliver_once_in_order_and_ignore_older_epochs() {
        let now = Instant::now();
        let me = Fingerprint::from_bytes([1; 32]);
        let other = peer(2);
        let mut rooms = Rooms::new(RoomsConfig::default(), me, now, 1_700_000_000_000);
        let mut t = Relay::default();
        rooms.entering(now, "r", RequestId(1), false).unwrap();
        let details = RoomDetails { room_id: "r".into(), owner: other.fingerprint, max_size: 4, metadata: None };
        rooms.on_entered(now, details, vec![other.clone()], &mut t);
        let from = other.fingerprint;
        // Out of order, duplicated: delivered once, in order.
        rooms.handle_items(now, from, vec![data(100, 2, "b"), data(100, 1, "a"), data(100, 2, "b"), data(100, 3, "c")], RoomPath::Relay, false);
        assert_eq!(delivered(&mut rooms), ["a", "b", "c"]);
        // A newer stream (the member came back) starts over; the old one replayed is ignored.
        rooms.handle_items(now, from, vec![data(200, 1, "new")], RoomPath::Relay, false);
        rooms.handle_items(now, from, vec![data(100, 4, "replayed"), data(100, 1, "replayed")], RoomPath::Relay, false);
        rooms.handle_items(now, from, vec![data(200, 2, "next")], RoomPath::Relay, false);
        assert_eq!(delivered(&mut rooms), ["new", "next"]);
        // What we acknowledge is the newer stream's.
        rooms.flush(now, &mut t);
        let (to, body) = t.sent.last().expect("an acknowledgement went out");
        assert_eq!(*to, from);
        assert!(body.contains(r#"{"t":"a","r":"r","e":200,"s":2}"#), "{body}");
    }

    #[test]
    fn epochs_only_grow() {
        let now = Instant::now();
        let mut rooms = Rooms::new(RoomsConfig::default(), Fingerprint::from_bytes([1; 32]), now, 1_700_000_000_000);
        let a = rooms.new_epoch(now);
        let b = rooms.new_epoch(now);
        let c = rooms.new_epoch(now + Duration::from_secs(1));
        assert!(a < b && b < c, "{a} {b} {c}");
        assert!(c < 1 << 53);
        // A later start (a restart) is above them all.
        let mut later = Rooms::new(RoomsConfig::default(), Fingerprint::from_bytes([1; 32]), now, 1_700_000_002_000);
        assert!(later.new_epoch(now) > c);
    }
}
