//! The node's sync layer: a [`StateSync`] and a [`CrdtSync`] per room, carried as room
//! messages (so on the direct path when it is up and through the relay otherwise), with
//! messages larger than a room message cut into fragments.
//!
//! # Frames
//!
//! Every room message of kind `sync` (`"y"` in `room/1`) holds one frame: a kind byte
//! ([`KIND_STATE`] or [`KIND_CRDT`]), then `0` and a whole message, or `1`, a message id,
//! the message's total length and this fragment's offset (varints) and a piece of it. The
//! room stream from one member is reliable and ordered while both stay in the room, so a
//! message's fragments arrive one after the other; a fragment that does not continue the
//! message under way (a member came back, or a queue overflowed) drops that message.
//!
//! # Bounds and overflow
//!
//! - A message being put together is at most the machine's limit
//!   ([`CrdtConfig::max_update_size`], or the state message size plus one value); beyond,
//!   it is dropped with [`SyncEvent::BadFrame`] (`TooLarge`).
//! - Frames the room refuses for now ([`RoomError::WouldBlock`]) wait in a queue per
//!   member of at most [`MAX_QUEUED_BYTES`]. On overflow the queue is emptied, the rest of
//!   the message under way is not queued for that member, and the digest / state-vector
//!   exchange runs again with it (its few small messages queue like any other), which sends
//!   whatever the dropped frames carried.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Instant;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tracing::{debug, warn};

use super::wire::{Reader, put_varint};
use super::{CrdtConfig, CrdtEvent, CrdtSync, StateConfig, StateEvent, StateSync, SyncMessage, SyncWireError};
use crate::identity::Fingerprint;
use crate::room::{RoomData, RoomError, RoomEvent, SyncFrame};

/// Frame kind: a [`StateSync`] message.
pub const KIND_STATE: u8 = 1;
/// Frame kind: a [`CrdtSync`] message.
pub const KIND_CRDT: u8 = 2;
/// Most bytes of frames waiting for one member of one room.
pub const MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;

/// Something the sync layer of a room reports; arrives as
/// [`NodeEvent::Sync`](crate::NodeEvent::Sync).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum SyncEvent {
    /// From the room's key-value state.
    State {
        /// The room.
        room: String,
        /// What happened.
        event: StateEvent,
    },
    /// From the room's documents.
    Crdt {
        /// The room.
        room: String,
        /// What happened.
        event: CrdtEvent,
    },
    /// A member sent a sync frame that could not be used (bad framing, too large); it was
    /// dropped.
    BadFrame {
        /// The room.
        room: String,
        /// The sender.
        from: Fingerprint,
        /// What was wrong.
        error: SyncWireError,
    },
}

struct Partial {
    kind: u8,
    id: u64,
    total: usize,
    buf: Vec<u8>,
}

#[derive(Default)]
struct Queue {
    frames: VecDeque<RoomData>,
    bytes: usize,
    overflowed: bool,
}

struct RoomSync {
    state: Option<StateSync>,
    crdt: Option<CrdtSync>,
    members: BTreeSet<Fingerprint>,
    next_id: u64,
    partial: HashMap<Fingerprint, Partial>,
    queues: BTreeMap<Fingerprint, Queue>,
}

impl RoomSync {
    fn new() -> Self {
        RoomSync { state: None, crdt: None, members: BTreeSet::new(), next_id: 0, partial: HashMap::new(), queues: BTreeMap::new() }
    }
}

/// Where frames go: the node's rooms (a trait so the layer can be tested alone).
pub(crate) trait FrameSink {
    /// Queues `data` in room `room` for `to` (or every member).
    fn send_frame(&mut self, room: &str, to: Option<Fingerprint>, data: RoomData) -> Result<(), RoomError>;
}

impl FrameSink for crate::room::Rooms {
    fn send_frame(&mut self, room: &str, to: Option<Fingerprint>, data: RoomData) -> Result<(), RoomError> {
        self.send(room, to, data, false)
    }
}

/// Every room's sync machines.
pub(crate) struct Syncs {
    me: Fingerprint,
    rooms: BTreeMap<String, RoomSync>,
    /// The node's start, on both clocks: wall-clock milliseconds are derived from `now`.
    clock: (Instant, u64),
    /// Payload bytes per frame.
    fragment: usize,
    rng: ChaCha20Rng,
    events: VecDeque<SyncEvent>,
    /// Bytes of frames per member queue ([`MAX_QUEUED_BYTES`]; tests lower it).
    max_queued: usize,
}

impl Syncs {
    pub(crate) fn new(me: Fingerprint, seed: u64, now: Instant, unix_ms: u64, room_message_size: usize) -> Self {
        // A sync frame travels as base64 inside a room message; leave room for its header.
        let fragment = (room_message_size / 4 * 3).saturating_sub(32).max(256);
        Syncs { me, rooms: BTreeMap::new(), clock: (now, unix_ms), fragment, rng: ChaCha20Rng::seed_from_u64(seed), events: VecDeque::new(), max_queued: MAX_QUEUED_BYTES }
    }

    /// Wall-clock milliseconds at `now` (the node's start plus the time since).
    pub(crate) fn unix_ms(&self, now: Instant) -> u64 {
        self.clock.1 + u64::try_from(now.saturating_duration_since(self.clock.0).as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn poll_event(&mut self) -> Option<SyncEvent> {
        self.events.pop_front()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }

    // ---- starting and stopping ---------------------------------------------------------

    /// Starts key-value sync in `room` with its current `members` (empty if not joined yet).
    pub(crate) fn start_state(&mut self, now: Instant, room: &str, config: StateConfig, members: &[Fingerprint]) -> bool {
        let me = self.me;
        let r = self.rooms.entry(room.to_owned()).or_insert_with(RoomSync::new);
        if r.state.is_some() {
            return false;
        }
        let mut s = StateSync::new(config, me);
        for m in members {
            r.members.insert(*m);
            s.handle_member_present(now, *m);
        }
        r.state = Some(s);
        true
    }

    /// Starts document sync in `room`.
    pub(crate) fn start_crdt(&mut self, now: Instant, room: &str, config: CrdtConfig, members: &[Fingerprint]) -> bool {
        let me = self.me;
        let seed = self.rng.next_u64();
        let r = self.rooms.entry(room.to_owned()).or_insert_with(RoomSync::new);
        if r.crdt.is_some() {
            return false;
        }
        let mut c = CrdtSync::new(config, me, seed);
        for m in members {
            r.members.insert(*m);
            c.handle_member_up(now, *m);
        }
        r.crdt = Some(c);
        true
    }

    /// Stops both machines of `room` (their state is dropped).
    pub(crate) fn stop(&mut self, room: &str) -> bool {
        self.rooms.remove(room).is_some()
    }

    pub(crate) fn state(&self, room: &str) -> Option<&StateSync> {
        self.rooms.get(room)?.state.as_ref()
    }

    pub(crate) fn state_mut(&mut self, room: &str) -> Option<&mut StateSync> {
        self.rooms.get_mut(room)?.state.as_mut()
    }

    pub(crate) fn crdt(&self, room: &str) -> Option<&CrdtSync> {
        self.rooms.get(room)?.crdt.as_ref()
    }

    pub(crate) fn crdt_mut(&mut self, room: &str) -> Option<&mut CrdtSync> {
        self.rooms.get_mut(room)?.crdt.as_mut()
    }

    // ---- input -------------------------------------------------------------------------

    /// Follows the room's membership.
    pub(crate) fn on_room_event(&mut self, now: Instant, event: &RoomEvent) {
        match event {
            RoomEvent::Joined { room, members, .. } => {
                for m in members {
                    self.member_up(now, room, m.fingerprint);
                }
            }
            RoomEvent::PeerJoined { room, peer } => self.member_up(now, room, peer.fingerprint),
            RoomEvent::PeerLeft { room, peer, .. } => {
                if let Some(r) = self.rooms.get_mut(room) {
                    r.members.remove(peer);
                    r.partial.remove(peer);
                    r.queues.remove(peer);
                    if let Some(s) = &mut r.state {
                        s.handle_member_down(*peer);
                    }
                    if let Some(c) = &mut r.crdt {
                        c.handle_member_down(*peer);
                    }
                }
            }
            RoomEvent::Closed { room } | RoomEvent::Kicked { room } if self.rooms.remove(room).is_some() => {
                debug!(%room, "left the room: its sync state is dropped");
            }
            _ => {}
        }
    }

    fn member_up(&mut self, now: Instant, room: &str, peer: Fingerprint) {
        let Some(r) = self.rooms.get_mut(room) else { return };
        if peer == self.me {
            return;
        }
        r.members.insert(peer);
        r.partial.remove(&peer);
        if let Some(s) = &mut r.state {
            s.handle_member_up(now, peer);
        }
        if let Some(c) = &mut r.crdt {
            c.handle_member_up(now, peer);
        }
    }

    /// Takes in a frame a member sent.
    pub(crate) fn handle_frame(&mut self, now: Instant, frame: SyncFrame) {
        let unix_ms = self.unix_ms(now);
        let SyncFrame { room, from, bytes } = frame;
        let Some(r) = self.rooms.get_mut(&room) else {
            debug!(%room, from = %from.short(), "sync frame for a room not synced here: dropped");
            return;
        };
        let limit = |kind: u8, r: &RoomSync| match kind {
            // An operational entry carries a value per sibling (a concurrent writer, at most
            // one per member).
            KIND_STATE => r.state.as_ref().map(|s| s.config().max_message_size.saturating_mul(2).saturating_add(s.config().max_value_size.saturating_mul(crate::room::MAX_MEMBERS + 1))),
            KIND_CRDT => r.crdt.as_ref().map(|c| c.config().max_update_size.saturating_add(64 * 1024)),
            _ => None,
        };
        let mut rd = Reader::new(&bytes);
        let parsed = (|| -> Result<Option<(u8, Vec<u8>)>, SyncWireError> {
            let kind = rd.u8()?;
            match rd.u8()? {
                0 => Ok(Some((kind, bytes[2..].to_vec()))),
                1 => {
                    let id = rd.varint()?;
                    let total = usize::try_from(rd.varint()?).unwrap_or(usize::MAX);
                    let offset = usize::try_from(rd.varint()?).unwrap_or(usize::MAX);
                    let header = bytes.len() - rd.remaining();
                    let piece = &bytes[header..];
                    let Some(max) = limit(kind, r) else { return Ok(None) };
                    if total > max {
                        r.partial.remove(&from);
                        return Err(SyncWireError::TooLarge { size: total, max });
                    }
                    if offset == 0 {
                        if r.partial.remove(&from).is_some() {
                            debug!(%room, from = %from.short(), "unfinished sync message dropped");
                        }
                        r.partial.insert(from, Partial { kind, id, total, buf: Vec::with_capacity(total.min(1 << 20)) });
                    }
                    let Some(p) = r.partial.get_mut(&from) else {
                        return Err(SyncWireError::Malformed("fragment of a message never started".into()));
                    };
                    if p.id != id || p.kind != kind || p.total != total || p.buf.len() != offset || offset + piece.len() > total {
                        r.partial.remove(&from);
                        return Err(SyncWireError::Malformed("fragment out of sequence".into()));
                    }
                    p.buf.extend_from_slice(piece);
                    if p.buf.len() < p.total {
                        return Ok(None);
                    }
                    let p = r.partial.remove(&from).expect("present");
                    Ok(Some((p.kind, p.buf)))
                }
                _ => Err(SyncWireError::Malformed("unknown frame flag".into())),
            }
        })();
        let (kind, msg) = match parsed {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(error) => {
                debug!(%room, from = %from.short(), %error, "bad sync frame");
                self.events.push_back(SyncEvent::BadFrame { room, from, error });
                return;
            }
        };
        match kind {
            KIND_STATE => match &mut r.state {
                Some(s) => s.handle_message(now, unix_ms, from, &msg),
                None => debug!(%room, "state sync message, but state sync is not started here: dropped"),
            },
            KIND_CRDT => match &mut r.crdt {
                Some(c) => c.handle_message(now, from, &msg),
                None => debug!(%room, "document sync message, but document sync is not started here: dropped"),
            },
            _ => self.events.push_back(SyncEvent::BadFrame { room, from, error: SyncWireError::Malformed(format!("unknown sync kind {kind}")) }),
        }
    }

    // ---- time --------------------------------------------------------------------------

    pub(crate) fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for r in self.rooms.values() {
            if let Some(t) = r.state.as_ref().and_then(StateSync::poll_timeout) {
                at(t.max(now));
            }
            if let Some(c) = &r.crdt {
                if c.wants_flush() {
                    at(now);
                }
                if let Some(t) = c.poll_timeout() {
                    at(t.max(now));
                }
            }
        }
        next
    }

    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        let unix_ms = self.unix_ms(now);
        for r in self.rooms.values_mut() {
            if let Some(s) = &mut r.state {
                if s.poll_timeout().is_some_and(|t| t <= now) {
                    s.handle_timeout(now, unix_ms);
                }
            }
            if let Some(c) = &mut r.crdt {
                if c.wants_flush() {
                    c.flush(now);
                }
                if c.poll_timeout().is_some_and(|t| t <= now) {
                    c.handle_timeout(now);
                }
            }
        }
    }

    // ---- output ------------------------------------------------------------------------

    /// Moves the machines' messages into the rooms and their events out. Returns whether
    /// anything was handed to the rooms.
    pub(crate) fn pump(&mut self, now: Instant, sink: &mut dyn FrameSink) -> bool {
        let mut sent = false;
        let fragment = self.fragment;
        let max_queued = self.max_queued;
        for (id, r) in &mut self.rooms {
            loop {
                let mut any = false;
                if let Some(s) = &mut r.state {
                    while let Some(m) = s.poll_message() {
                        any = true;
                        sent |= dispatch(id, r_parts(max_queued, &mut r.members, &mut r.queues, &mut r.next_id), KIND_STATE, m, fragment, sink);
                    }
                    while let Some(e) = s.poll_event() {
                        self.events.push_back(SyncEvent::State { room: id.clone(), event: e });
                    }
                }
                if let Some(c) = &mut r.crdt {
                    while let Some(m) = c.poll_message() {
                        any = true;
                        sent |= dispatch(id, r_parts(max_queued, &mut r.members, &mut r.queues, &mut r.next_id), KIND_CRDT, m, fragment, sink);
                    }
                    while let Some(e) = c.poll_event() {
                        self.events.push_back(SyncEvent::Crdt { room: id.clone(), event: e });
                    }
                }
                // Queues that drained after an overflow: run the exchange again.
                let resync: Vec<Fingerprint> = r.queues.iter().filter(|(_, q)| q.overflowed && q.frames.is_empty()).map(|(p, _)| *p).collect();
                for peer in &resync {
                    r.queues.get_mut(peer).expect("queue").overflowed = false;
                    if let Some(s) = &mut r.state {
                        s.handle_resync(now, *peer);
                    }
                    if let Some(c) = &mut r.crdt {
                        c.handle_member_up(now, *peer);
                    }
                }
                if !any && resync.is_empty() {
                    break;
                }
            }
            sent |= drain(id, &mut r.queues, sink);
        }
        sent
    }

    /// The rooms said `room` takes messages again.
    pub(crate) fn writable(&mut self, room: &str, sink: &mut dyn FrameSink) -> bool {
        match self.rooms.get_mut(room) {
            Some(r) => drain(room, &mut r.queues, sink),
            None => false,
        }
    }
}

struct Parts<'a> {
    max_queued: usize,
    members: &'a BTreeSet<Fingerprint>,
    queues: &'a mut BTreeMap<Fingerprint, Queue>,
    next_id: &'a mut u64,
}

fn r_parts<'a>(max_queued: usize, members: &'a mut BTreeSet<Fingerprint>, queues: &'a mut BTreeMap<Fingerprint, Queue>, next_id: &'a mut u64) -> Parts<'a> {
    Parts { max_queued, members, queues, next_id }
}

/// Cuts `m` into frames and hands them to the room, or to the members' queues.
fn dispatch(room: &str, p: Parts<'_>, kind: u8, m: SyncMessage, fragment: usize, sink: &mut dyn FrameSink) -> bool {
    let frames: Vec<Vec<u8>> = if m.bytes.len() <= fragment {
        let mut f = Vec::with_capacity(m.bytes.len() + 2);
        f.push(kind);
        f.push(0);
        f.extend_from_slice(&m.bytes);
        vec![f]
    } else {
        let id = *p.next_id;
        *p.next_id += 1;
        m.bytes
            .chunks(fragment)
            .enumerate()
            .map(|(i, piece)| {
                let mut f = Vec::with_capacity(piece.len() + 24);
                f.push(kind);
                f.push(1);
                put_varint(&mut f, id);
                put_varint(&mut f, m.bytes.len() as u64);
                put_varint(&mut f, (i * fragment) as u64);
                f.extend_from_slice(piece);
                f
            })
            .collect()
    };
    let targets: Vec<Fingerprint> = match m.to {
        Some(peer) if p.members.contains(&peer) => vec![peer],
        Some(peer) => {
            debug!(%room, peer = %peer.short(), "sync message for a member gone: dropped");
            return false;
        }
        None => p.members.iter().copied().collect(),
    };
    if targets.is_empty() {
        return false;
    }
    let mut sent = false;
    // Members whose queue overflowed during this message get none of the rest of it (a
    // message's fragments must arrive whole and in a row; the exchange repairs the loss).
    let mut cut: BTreeSet<Fingerprint> = BTreeSet::new();
    for frame in frames {
        let queued = !cut.is_empty() || targets.iter().any(|t| p.queues.get(t).is_some_and(|q| !q.frames.is_empty()));
        if !queued {
            match sink.send_frame(room, m.to, RoomData::Sync(frame.clone())) {
                Ok(()) => {
                    sent = true;
                    continue;
                }
                Err(RoomError::WouldBlock { .. }) => {}
                Err(e) => {
                    debug!(%room, error = %e, "sync frame refused by the room: dropped");
                    return sent;
                }
            }
        }
        for t in &targets {
            if cut.contains(t) {
                continue;
            }
            let q = p.queues.entry(*t).or_default();
            if q.bytes + frame.len() > p.max_queued {
                warn!(%room, peer = %t.short(), "sync queue overflow: dropped, the exchange runs again");
                q.frames.clear();
                q.bytes = 0;
                q.overflowed = true;
                cut.insert(*t);
                continue;
            }
            q.bytes += frame.len();
            q.frames.push_back(RoomData::Sync(frame.clone()));
        }
    }
    sent
}

/// Sends what waits in the queues until the room refuses again.
fn drain(room: &str, queues: &mut BTreeMap<Fingerprint, Queue>, sink: &mut dyn FrameSink) -> bool {
    let mut sent = false;
    for (peer, q) in queues.iter_mut() {
        while let Some(frame) = q.frames.front() {
            let len = match frame {
                RoomData::Sync(b) => b.len(),
                _ => 0,
            };
            match sink.send_frame(room, Some(*peer), frame.clone()) {
                Ok(()) => {
                    q.frames.pop_front();
                    q.bytes -= len;
                    sent = true;
                }
                Err(RoomError::WouldBlock { .. }) => break,
                Err(_) => {
                    q.frames.clear();
                    q.bytes = 0;
                    break;
                }
            }
        }
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::state::StateEvent;
    use serde_json::json;

    fn fp(b: u8) -> Fingerprint {
        Fingerprint::from_bytes([b; 32])
    }

    /// A room that takes `room` frames until `capacity` is used up, then says `WouldBlock`.
    #[derive(Default)]
    struct Sink {
        frames: Vec<(Option<Fingerprint>, Vec<u8>)>,
        capacity: Option<usize>,
    }

    impl FrameSink for Sink {
        fn send_frame(&mut self, _room: &str, to: Option<Fingerprint>, data: RoomData) -> Result<(), RoomError> {
            if let Some(c) = &mut self.capacity {
                if *c == 0 {
                    return Err(RoomError::WouldBlock { peer: to.unwrap_or(fp(0)) });
                }
                *c -= 1;
            }
            let RoomData::Sync(bytes) = data else { panic!("not a sync frame") };
            self.frames.push((to, bytes));
            Ok(())
        }
    }

    fn pair(fragment: usize) -> (Syncs, Syncs, Instant) {
        let now = crate::test_epoch();
        let mut a = Syncs::new(fp(1), 1, now, 1_700_000_000_000, fragment * 4 / 3 + 64);
        let mut b = Syncs::new(fp(2), 2, now, 1_700_000_000_000, fragment * 4 / 3 + 64);
        a.start_state(now, "r", StateConfig::lww(), &[fp(2)]);
        b.start_state(now, "r", StateConfig::lww(), &[fp(1)]);
        (a, b, now)
    }

    fn deliver(sink: &mut Sink, from: Fingerprint, to: &mut Syncs, now: Instant) {
        for (_, bytes) in sink.frames.drain(..) {
            to.handle_frame(now, SyncFrame { room: "r".into(), from, bytes });
        }
    }

    fn bad_frames(s: &mut Syncs) -> Vec<SyncWireError> {
        std::iter::from_fn(|| s.poll_event())
            .filter_map(|e| match e {
                SyncEvent::BadFrame { error, .. } => Some(error),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn large_messages_travel_in_fragments_and_arrive_whole() {
        let (mut a, mut b, now) = pair(1024);
        let mut sink = Sink::default();
        a.pump(now, &mut sink);
        b.pump(now, &mut Sink::default());
        sink.frames.clear();
        let big = "x".repeat(20_000);
        a.state_mut("r").unwrap().set(now, 1_700_000_000_000, "big", json!(big)).unwrap();
        a.state_mut("r").unwrap().flush();
        a.pump(now, &mut sink);
        assert!(sink.frames.len() >= 20, "{} frames", sink.frames.len());
        assert!(sink.frames.iter().all(|(_, f)| f.len() <= 1024 + 32));
        deliver(&mut sink, fp(1), &mut b, now);
        assert_eq!(b.state("r").unwrap().get("big"), Some(&json!(big)));
        assert!(bad_frames(&mut b).is_empty());
    }

    #[test]
    fn bad_frames_are_reported_and_change_nothing() {
        let (mut a, mut b, now) = pair(1024);
        let mut sink = Sink::default();
        a.state_mut("r").unwrap().set(now, 1_700_000_000_000, "big", json!("y".repeat(5000))).unwrap();
        a.state_mut("r").unwrap().flush();
        a.pump(now, &mut sink);
        let frames: Vec<Vec<u8>> = sink.frames.drain(..).map(|(_, f)| f).filter(|f| f[1] == 1).collect();
        assert!(frames.len() >= 4);
        let digest = b.state("r").unwrap().digest();
        let frame = |bytes: Vec<u8>| SyncFrame { room: "r".into(), from: fp(1), bytes };
        // A fragment out of sequence (the second one first), then a gap.
        b.handle_frame(now, frame(frames[1].clone()));
        b.handle_frame(now, frame(frames[0].clone()));
        b.handle_frame(now, frame(frames[2].clone()));
        // An unknown kind, an unknown flag, an empty frame.
        b.handle_frame(now, frame(vec![9, 0, 1, 2]));
        b.handle_frame(now, frame(vec![KIND_STATE, 7]));
        b.handle_frame(now, frame(vec![]));
        // A message announced larger than the limit.
        let mut huge = vec![KIND_STATE, 1];
        put_varint(&mut huge, 99);
        put_varint(&mut huge, 1 << 40);
        put_varint(&mut huge, 0);
        b.handle_frame(now, frame(huge));
        let errors = bad_frames(&mut b);
        assert_eq!(errors.len(), 6, "{errors:?}");
        assert!(matches!(errors[0], SyncWireError::Malformed(_)), "never started: {:?}", errors[0]);
        assert!(matches!(errors[1], SyncWireError::Malformed(_)), "gap: {:?}", errors[1]);
        assert!(matches!(errors[5], SyncWireError::TooLarge { size, .. } if size == 1 << 40));
        assert_eq!(b.state("r").unwrap().digest(), digest, "state unchanged");
        // The whole sequence still goes through afterwards.
        for f in frames {
            b.handle_frame(now, frame(f));
        }
        assert_eq!(b.state("r").unwrap().get("big"), Some(&json!("y".repeat(5000))));
    }

    #[test]
    fn a_full_room_queues_and_an_overflow_resyncs() {
        let (mut a, mut b, now) = pair(1024);
        a.pump(now, &mut Sink::default());
        b.pump(now, &mut Sink::default());
        // The room takes two frames, then refuses: the rest waits in the member's queue.
        let mut sink = Sink { capacity: Some(2), ..Default::default() };
        for i in 0..50 {
            a.state_mut("r").unwrap().set(now, 1_700_000_000_000, &format!("k{i}"), json!("z".repeat(900))).unwrap();
        }
        a.state_mut("r").unwrap().flush();
        a.pump(now, &mut sink);
        assert_eq!(sink.frames.len(), 2);
        let queued = a.rooms["r"].queues[&fp(2)].frames.len();
        assert!(queued > 10, "{queued} queued");
        // Room again: the queue drains in order, and b gets everything.
        sink.capacity = None;
        assert!(a.writable("r", &mut sink));
        assert!(a.rooms["r"].queues[&fp(2)].frames.is_empty());
        deliver(&mut sink, fp(1), &mut b, now);
        assert_eq!(b.state("r").unwrap().len(), 50);
        // An overflow empties the queue and runs the exchange again once it drains.
        let q = a.rooms.get_mut("r").unwrap().queues.entry(fp(2)).or_default();
        q.overflowed = true;
        a.pump(now, &mut sink);
        // (Exchanges with members are at least a second apart.)
        let later = now + std::time::Duration::from_secs(2);
        a.handle_timeout(later);
        a.pump(later, &mut sink);
        let digest_sent = sink.frames.iter().any(|(to, f)| *to == Some(fp(2)) && f[0] == KIND_STATE && f.get(3) == Some(&2));
        assert!(digest_sent, "the exchange runs again: {:?}", sink.frames.iter().map(|(_, f)| &f[..4.min(f.len())]).collect::<Vec<_>>());
        assert!(std::iter::from_fn(|| b.poll_event()).all(|e| !matches!(e, SyncEvent::BadFrame { .. } | SyncEvent::State { event: StateEvent::BadMessage { .. }, .. })));
    }

    #[test]
    fn derived_wall_clock_follows_now() {
        let now = crate::test_epoch();
        let s = Syncs::new(fp(1), 1, now, 1_000, 16 * 1024);
        assert_eq!(s.unix_ms(now), 1_000);
        assert_eq!(s.unix_ms(now + std::time::Duration::from_millis(2500)), 3_500);
    }

    #[test]
    fn an_overflow_mid_message_cuts_the_rest_of_it_for_that_member_only() {
        let (mut a, mut b, now) = pair(1024);
        a.max_queued = 8 * 1024;
        a.pump(now, &mut Sink::default());
        b.pump(now, &mut Sink::default());
        // The room refuses everything: a 20 KiB message fills the queue and overflows.
        let mut sink = Sink { capacity: Some(0), ..Default::default() };
        a.state_mut("r").unwrap().set(now, 1_700_000_000_000, "big", json!("q".repeat(20_000))).unwrap();
        a.state_mut("r").unwrap().flush();
        a.pump(now, &mut sink);
        let q = &a.rooms["r"].queues[&fp(2)];
        // What is queued after the overflow is not the tail of the cut message.
        assert!(q.frames.iter().all(|f| matches!(f, RoomData::Sync(b) if b[1] == 0)), "no fragments of the cut message wait");
        sink.capacity = None;
        a.writable("r", &mut sink);
        deliver(&mut sink, fp(1), &mut b, now);
        assert!(bad_frames(&mut b).is_empty(), "no fragment out of sequence reached b");
        // The exchange repairs the loss.
        for s in 1..5 {
            let t = now + std::time::Duration::from_secs(2 * s);
            a.handle_timeout(t);
            b.handle_timeout(t);
            a.pump(t, &mut sink);
            deliver(&mut sink, fp(1), &mut b, t);
            let mut back = Sink::default();
            b.pump(t, &mut back);
            deliver(&mut back, fp(2), &mut a, t);
            a.pump(t, &mut sink);
            deliver(&mut sink, fp(1), &mut b, t);
        }
        assert_eq!(b.state("r").unwrap().get("big"), Some(&json!("q".repeat(20_000))));
    }
}

