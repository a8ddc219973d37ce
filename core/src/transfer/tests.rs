//! Two [`Transfers`] joined by an in-memory channel with a send window, in the shape of
//! quinn-proto's `Pair`.

use super::*;

const A: Fingerprint = Fingerprint::from_bytes([1; 32]);
const B: Fingerprint = Fingerprint::from_bytes([2; 32]);

/// One direction of a reliable ordered channel with a window of `window` bytes in flight.
#[derive(Default)]
struct Pipe {
    frames: VecDeque<Frame>,
    in_flight: usize,
    window: usize,
    /// Chunk payload bytes that entered the pipe.
    chunk_bytes: u64,
    /// Corrupt the payload of the n-th chunk frame.
    corrupt: Option<u64>,
    chunks_seen: u64,
}

#[derive(Clone)]
enum Frame {
    Text(String),
    Binary(Vec<u8>),
}

impl TransferTransport for Pipe {
    fn send_text(&mut self, _: Fingerprint, text: &str) -> Result<(), SendError> {
        self.frames.push_back(Frame::Text(text.to_owned()));
        Ok(())
    }
    fn send_binary(&mut self, _: Fingerprint, frame: &[u8]) -> Result<(), SendError> {
        if self.in_flight > 0 && self.in_flight + frame.len() > self.window {
            return Err(SendError::WouldBlock { buffered: self.in_flight });
        }
        self.in_flight += frame.len();
        self.chunk_bytes += (frame.len() - wire::CHUNK_HEADER) as u64;
        let mut frame = frame.to_vec();
        if self.corrupt == Some(self.chunks_seen) {
            *frame.last_mut().unwrap() ^= 0xff;
        }
        self.chunks_seen += 1;
        self.frames.push_back(Frame::Binary(frame));
        Ok(())
    }
}

struct Side {
    t: Transfers,
    /// What this side sends, by transfer id.
    sources: BTreeMap<u64, Vec<u8>>,
    /// What it received, by transfer id.
    sinks: BTreeMap<u64, Vec<u8>>,
    events: Vec<TransferEvent>,
    auto_accept: bool,
    /// Most reads outstanding at once, per transfer (the memory bound).
    max_outstanding: usize,
    /// Reads asked for and not answered yet: answered on the next step, as an application
    /// reading a disk would.
    reads: Vec<(u64, u64, usize)>,
    /// How offers are accepted when `auto_accept`.
    accept: AcceptInto,
}

/// Where an auto-accepted transfer goes.
enum AcceptInto {
    /// Write events.
    Events,
    /// Memory (a `Received` event).
    Memory,
    /// A sink made by the function.
    Sink(Box<dyn FnMut() -> Box<dyn ChunkSink>>),
}

impl Side {
    fn new() -> Self {
        let config = TransferConfig { chunk_size: 4096, ..TransferConfig::default() };
        Side { t: Transfers::new(config), sources: BTreeMap::new(), sinks: BTreeMap::new(), events: Vec::new(), auto_accept: true, max_outstanding: 0, reads: Vec::new(), accept: AcceptInto::Events }
    }
}

struct Pair {
    now: Instant,
    a: Side,
    b: Side,
    ab: Pipe,
    ba: Pipe,
    /// The receiver's sink, when it has one.
    recorder: Option<Recorder>,
}

fn sha(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

impl Pair {
    fn new() -> Self {
        Pair { now: Instant::now(), a: Side::new(), b: Side::new(), ab: Pipe { window: 64 * 1024, ..Pipe::default() }, ba: Pipe { window: 64 * 1024, ..Pipe::default() }, recorder: None }
    }

    fn send(&mut self, data: Vec<u8>) -> u64 {
        let id = self.a.t.offer(B, FileInfo::new("f.bin", data.len() as u64, sha(&data))).unwrap();
        self.a.sources.insert(id, data);
        id
    }

    /// Runs until nothing moves; `lose` drops every frame in flight from a to b once, when
    /// `b` holds at least that many bytes (a connection loss).
    fn run(&mut self, lose_at: Option<usize>) {
        self.run_until(lose_at, usize::MAX);
    }

    /// Like [`Pair::run`], but returns once `b` holds `pause_at` bytes.
    fn run_until(&mut self, mut lose_at: Option<usize>, pause_at: usize) {
        for _ in 0..1_000_000 {
            if self.held() >= pause_at {
                return;
            }
            self.now += Duration::from_millis(1);
            let mut moved = false;
            for (side, peer, out) in [(&mut self.a, B, &mut self.ab), (&mut self.b, A, &mut self.ba)] {
                for (id, offset, len) in std::mem::take(&mut side.reads) {
                    moved = true;
                    let data = side.sources[&id][offset as usize..offset as usize + len].to_vec();
                    // A read answered after its transfer ended is refused, and only that.
                    match side.t.provide(peer, id, offset, data) {
                        Ok(()) | Err(TransferError::Unknown(_)) => {}
                        Err(e) => panic!("provide: {e}"),
                    }
                }
                side.t.flush(self.now, out);
                while let Some(e) = side.t.poll_event() {
                    moved = true;
                    match &e {
                        TransferEvent::Offered { offer, .. } if side.auto_accept => match &mut side.accept {
                            AcceptInto::Events => side.t.accept(peer, offer.id).unwrap(),
                            AcceptInto::Memory => side.t.accept_to_memory(peer, offer.id).unwrap(),
                            AcceptInto::Sink(make) => side.t.accept_into(peer, offer.id, make()).unwrap(),
                        },
                        TransferEvent::Read { id, offset, len, .. } => {
                            side.reads.push((*id, *offset, *len));
                            let n = side.reads.iter().filter(|(i, _, _)| i == id).count();
                            side.max_outstanding = side.max_outstanding.max(n);
                        }
                        TransferEvent::Write { id, offset, data, .. } => {
                            let sink = side.sinks.entry(*id).or_default();
                            assert_eq!(sink.len() as u64, *offset, "writes are in order");
                            sink.extend_from_slice(data);
                        }
                        _ => {}
                    }
                    side.events.push(e);
                }
            }
            if let Some(at) = lose_at {
                if self.held() >= at {
                    self.ab.frames.clear();
                    self.ab.in_flight = 0;
                    self.ba.frames.clear();
                    self.ba.in_flight = 0;
                    self.a.t.handle_reconnected(B);
                    self.b.t.handle_reconnected(A);
                    lose_at = None;
                    moved = true;
                }
            }
            // Deliver one frame each way (the channel is slow relative to the app).
            moved |= deliver(self.now, &mut self.ab, &mut self.b, A, &mut self.a, B);
            moved |= deliver(self.now, &mut self.ba, &mut self.a, B, &mut self.b, A);
            if !moved {
                return;
            }
        }
        panic!("did not settle");
    }

    /// Bytes the receiver holds.
    fn held(&self) -> usize {
        self.b.sinks.values().map(Vec::len).sum::<usize>() + self.recorder.as_ref().map_or(0, |r| r.0.lock().unwrap().data.len())
    }

    fn completed(side: &Side, id: u64, direction: Direction) -> bool {
        side.events.contains(&TransferEvent::Completed { peer: if direction == Direction::Send { B } else { A }, id, direction })
    }

    fn failure(side: &Side, id: u64) -> Option<TransferError> {
        side.events.iter().find_map(|e| match e {
            TransferEvent::Failed { id: i, error, .. } if *i == id => Some(error.clone()),
            _ => None,
        })
    }
}

/// Hands the next frame in `pipe` (from `from` to `to`) over; the sender hears the window
/// has room. Returns whether there was one.
fn deliver(now: Instant, pipe: &mut Pipe, to: &mut Side, from: Fingerprint, sender: &mut Side, to_fp: Fingerprint) -> bool {
    let Some(frame) = pipe.frames.pop_front() else { return false };
    match frame {
        Frame::Text(t) => to.t.handle_text(now, from, &t),
        Frame::Binary(b) => {
            pipe.in_flight -= b.len();
            to.t.handle_binary(now, from, &b);
            sender.t.handle_writable(to_fp);
        }
    }
    true
}

fn content(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

#[test]
fn a_file_arrives_identical_and_verified_with_bounded_read_ahead() {
    let mut p = Pair::new();
    let data = content(1_000_000 + 123);
    let id = p.send(data.clone());
    p.run(None);
    assert_eq!(p.b.sinks[&id], data);
    assert!(Pair::completed(&p.a, id, Direction::Send) && Pair::completed(&p.b, id, Direction::Receive));
    assert_eq!(p.ab.chunk_bytes, data.len() as u64, "nothing sent twice");
    let read_ahead = TransferConfig::default().read_ahead;
    assert!((2..=read_ahead).contains(&p.a.max_outstanding), "{} reads outstanding at most", p.a.max_outstanding);
    let progress: Vec<&Progress> = p.b.events.iter().filter_map(|e| match e {
        TransferEvent::Progress { progress, .. } => Some(progress),
        _ => None,
    }).collect();
    assert!(!progress.is_empty() && progress.len() < 250, "{} progress events for 245 chunks", progress.len());
    assert_eq!(progress.last().unwrap().percent, 100.0);
}

#[test]
fn an_empty_file_completes() {
    let mut p = Pair::new();
    let id = p.send(Vec::new());
    p.run(None);
    assert!(Pair::completed(&p.a, id, Direction::Send) && Pair::completed(&p.b, id, Direction::Receive));
    assert!(p.b.sinks.get(&id).is_none_or(Vec::is_empty));
}

#[test]
fn reject_and_cancel_end_both_sides_without_completion() {
    let mut p = Pair::new();
    p.b.auto_accept = false;
    let id = p.send(content(10_000));
    p.run(None);
    p.b.t.reject(A, id, "no thanks").unwrap();
    p.run(None);
    assert_eq!(Pair::failure(&p.a, id), Some(TransferError::Rejected("no thanks".into())));

    // Cancelled midway by the sender, then by the receiver: the other side hears it and
    // nothing is reported complete.
    for by_sender in [true, false] {
        let mut p = Pair::new();
        let id = p.send(content(2_000_000));
        p.run_until(None, 1_000_000);
        if by_sender {
            p.a.t.cancel(B, id, "changed my mind").unwrap();
        } else {
            p.b.t.cancel(A, id, "changed my mind").unwrap();
        }
        p.run(None);
        for side in [&p.a, &p.b] {
            assert_eq!(Pair::failure(side, id), Some(TransferError::Cancelled("changed my mind".into())));
            assert!(!side.events.iter().any(|e| matches!(e, TransferEvent::Completed { .. })));
        }
        assert!(p.b.sinks[&id].len() < 2_000_000);
        assert!(p.ab.chunk_bytes < 2_000_000, "the sender stopped");
        assert_eq!(p.a.t.cancel(B, id, "again"), Err(TransferError::Unknown(id)));
    }
}

#[test]
fn a_corrupt_chunk_and_a_wrong_hash_are_detected() {
    let mut p = Pair::new();
    p.ab.corrupt = Some(3);
    let id = p.send(content(100_000));
    p.run(None);
    assert_eq!(Pair::failure(&p.b, id), Some(TransferError::CorruptChunk(3)));
    assert_eq!(Pair::failure(&p.a, id), Some(TransferError::HashMismatch));
    assert!(!Pair::completed(&p.b, id, Direction::Receive));

    let mut p = Pair::new();
    let data = content(50_000);
    let id = p.a.t.offer(B, FileInfo::new("f", data.len() as u64, sha(b"something else")).typed("x/y", TransferKind::File)).unwrap();
    p.a.sources.insert(id, data);
    p.run(None);
    assert_eq!(Pair::failure(&p.b, id), Some(TransferError::HashMismatch));
    assert_eq!(Pair::failure(&p.a, id), Some(TransferError::HashMismatch));
}

#[test]
fn after_a_loss_it_resumes_without_resending_what_arrived() {
    let mut p = Pair::new();
    let data = content(2_000_000);
    let id = p.send(data.clone());
    p.run(Some(1_000_000));
    assert!(p.b.sinks[&id] == data, "complete and identical after the resume ({} of {} bytes)", p.b.sinks[&id].len(), data.len());
    assert!(Pair::completed(&p.a, id, Direction::Send) && Pair::completed(&p.b, id, Direction::Receive));
    // Only what was in flight when the connection died went twice: at most a window.
    let resent = p.ab.chunk_bytes - data.len() as u64;
    assert!(resent <= 64 * 1024, "{resent} bytes sent twice");
}

#[test]
fn transfers_take_turns() {
    let mut p = Pair::new();
    let ids: Vec<u64> = (0..3).map(|_| p.send(content(2_000_000))).collect();
    p.run(None);
    // When the first one completes, each of the others is within 20% of it.
    let mut bytes: BTreeMap<u64, u64> = BTreeMap::new();
    for e in &p.b.events {
        match e {
            TransferEvent::Write { id, data, .. } => *bytes.entry(*id).or_default() += data.len() as u64,
            TransferEvent::Completed { .. } => break,
            _ => {}
        }
    }
    let most = *bytes.values().max().unwrap();
    assert!(bytes.len() == 3 && bytes.values().all(|b| *b * 10 >= most * 8), "unfair: {bytes:?}");
    for id in ids {
        assert!(Pair::completed(&p.b, id, Direction::Receive));
    }
}

#[test]
fn bad_input_gets_typed_errors_and_others_continue() {
    let mut p = Pair::new();
    let data = content(40_000);
    let id = p.send(data.clone());
    // A chunk for an unknown transfer, an absurd offer, garbage: reported, dropped.
    p.b.t.handle_binary(p.now, A, &wire::encode_chunk(999, 0, b"x"));
    let absurd = Control::Offer(Offer { id: 50, name: "x".into(), size: u64::MAX, mime: "a/b".into(), kind: TransferKind::File, chunk: 4096, chunks: 1, sha256: "00".repeat(32) });
    p.b.t.handle_text(p.now, A, &absurd.encode());
    p.b.t.handle_text(p.now, A, "{not json");
    p.b.t.handle_binary(p.now, A, b"\x01short");
    p.run(None);
    // A duplicate offer id while the first is under way.
    let dup = Control::Offer(Offer { id, name: "y".into(), size: 10, mime: "a/b".into(), kind: TransferKind::File, chunk: 4096, chunks: 1, sha256: "00".repeat(32) });
    p.b.t.handle_text(p.now, A, &dup.encode());
    let errors: Vec<TransferError> = std::iter::from_fn(|| p.b.t.poll_event())
        .chain(p.b.events.drain(..))
        .filter_map(|e| match e {
            TransferEvent::BadMessage { error, .. } => Some(error),
            _ => None,
        })
        .collect();
    assert!(errors.contains(&TransferError::Unknown(999)), "{errors:?}");
    assert!(errors.iter().any(|e| matches!(e, TransferError::Wire(TransferWireError::BadOffer(_)))), "{errors:?}");
    assert!(errors.iter().filter(|e| matches!(e, TransferError::Wire(TransferWireError::Malformed(_)))).count() == 2, "{errors:?}");
    assert_eq!(p.b.sinks[&id], data, "the real transfer was not disturbed");
    // A chunk past the end of a live transfer fails that transfer only.
    let mut q = Pair::new();
    q.b.auto_accept = true;
    let a = q.send(content(100_000));
    let b = q.send(content(100_000));
    q.run_until(None, 50_000);
    q.b.t.handle_binary(q.now, A, &wire::encode_chunk(a, 10_000, &[0; 4096]));
    q.run(None);
    assert_eq!(Pair::failure(&q.b, a), Some(TransferError::BadChunk(10_000)));
    assert!(Pair::completed(&q.b, b, Direction::Receive), "the other transfer went on");
    // Commands on unknown transfers.
    assert_eq!(q.a.t.provide(B, 12345, 0, vec![]), Err(TransferError::Unknown(12345)));
    assert_eq!(q.b.t.accept(A, 12345), Err(TransferError::Unknown(12345)));
}

/// A sink that records what happens to it.
#[derive(Clone, Default)]
struct Recorder(std::sync::Arc<std::sync::Mutex<Recorded>>);

#[derive(Default)]
struct Recorded {
    data: Vec<u8>,
    committed: bool,
    aborted: bool,
    /// Fail the write at this offset.
    fail_at: Option<u64>,
}

impl ChunkSink for Recorder {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut r = self.0.lock().unwrap();
        if r.fail_at.is_some_and(|at| offset >= at) {
            return Err(std::io::Error::other("disk full"));
        }
        assert_eq!(r.data.len() as u64, offset, "in order");
        r.data.extend_from_slice(data);
        Ok(())
    }
    fn commit(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap().committed = true;
        Ok(())
    }
    fn abort(&mut self) {
        self.0.lock().unwrap().aborted = true;
    }
}

fn recording(p: &mut Pair) -> Recorder {
    let rec = Recorder::default();
    let r = rec.clone();
    p.b.accept = AcceptInto::Sink(Box::new(move || Box::new(r.clone())));
    p.recorder = Some(rec.clone());
    rec
}

#[test]
fn sources_and_sinks_move_the_bytes_without_events_per_chunk() {
    let mut p = Pair::new();
    let rec = recording(&mut p);
    let data = content(300_000 + 7);
    let id = p.a.t.offer_from(B, FileInfo::new("f.bin", data.len() as u64, sha(&data)), Box::new(data.clone())).unwrap();
    p.run(None);
    let r = rec.0.lock().unwrap();
    assert!(r.data == data && r.committed && !r.aborted);
    assert!(Pair::completed(&p.a, id, Direction::Send) && Pair::completed(&p.b, id, Direction::Receive));
    let per_chunk = |s: &Side| s.events.iter().filter(|e| matches!(e, TransferEvent::Read { .. } | TransferEvent::Write { .. })).count();
    assert_eq!((per_chunk(&p.a), per_chunk(&p.b)), (0, 0));
    assert_eq!(p.ab.chunk_bytes, data.len() as u64, "nothing sent twice");
}

#[test]
fn a_resumed_transfer_reads_its_source_again_from_where_the_receiver_stands() {
    let mut p = Pair::new();
    let rec = recording(&mut p);
    let data = content(500_000);
    let id = p.a.t.offer_from(B, FileInfo::new("f.bin", data.len() as u64, sha(&data)), Box::new(data.clone())).unwrap();
    p.run_until(None, data.len() / 2);
    let sent_before = p.ab.chunk_bytes;
    let held = rec.0.lock().unwrap().data.len() as u64;
    // The connection drops what was in flight; both sides learn it came back.
    p.ab.frames.clear();
    p.ab.in_flight = 0;
    p.ba.frames.clear();
    p.a.t.handle_reconnected(B);
    p.b.t.handle_reconnected(A);
    p.run(None);
    let r = rec.0.lock().unwrap();
    assert!(r.data == data && r.committed, "{} of {} bytes", r.data.len(), data.len());
    assert!(Pair::completed(&p.a, id, Direction::Send));
    assert_eq!(p.ab.chunk_bytes - sent_before, data.len() as u64 - held, "only what the receiver lacked was sent again");
}

#[test]
fn memory_and_json_transfers_arrive_whole() {
    let mut p = Pair::new();
    p.b.accept = AcceptInto::Memory;
    let data = content(50_000);
    let id = p.a.t.offer_from(B, FileInfo::new("f.bin", data.len() as u64, sha(&data)), Box::new(data.clone())).unwrap();
    // JSON is taken without asking, even by a side that asks for everything else.
    p.b.auto_accept = false;
    let value = serde_json::json!({"big": "x".repeat(40_000), "n": [1, 2, 3]});
    let text = serde_json::to_vec(&value).unwrap();
    let json_info = FileInfo::new("v.json", text.len() as u64, sha(&text)).typed("application/json", TransferKind::Json);
    let json_id = p.a.t.offer_from(B, json_info, Box::new(text)).unwrap();
    p.run(None);
    assert!(p.b.events.contains(&TransferEvent::Json { peer: A, id: json_id, value }));
    assert!(Pair::completed(&p.a, json_id, Direction::Send));
    // The file waits for an answer; into memory it arrives as one event.
    assert!(p.b.events.iter().any(|e| matches!(e, TransferEvent::Offered { offer, .. } if offer.id == id)));
    p.b.t.accept_to_memory(A, id).unwrap();
    p.run(None);
    assert!(p.b.events.contains(&TransferEvent::Received { peer: A, id, data }));
    assert!(Pair::completed(&p.b, id, Direction::Receive));
}

#[test]
fn bad_json_too_much_for_memory_and_storage_failures_get_typed_errors() {
    // Not JSON: every chunk verifies, the parse fails, both sides hear it.
    let mut p = Pair::new();
    let junk = b"{not json".to_vec();
    let info = FileInfo::new("v.json", junk.len() as u64, sha(&junk)).typed("application/json", TransferKind::Json);
    let id = p.a.t.offer_from(B, info, Box::new(junk)).unwrap();
    p.run(None);
    assert!(matches!(Pair::failure(&p.b, id), Some(TransferError::BadJson(_))));
    assert!(matches!(Pair::failure(&p.a, id), Some(TransferError::Cancelled(_))));

    // Over the in-memory limit: refused, and the offer still stands.
    let mut p = Pair::new();
    p.b.auto_accept = false;
    p.b.t.config.max_memory = 10_000;
    let data = content(10_001);
    let id = p.a.t.offer_from(B, FileInfo::new("f.bin", data.len() as u64, sha(&data)), Box::new(data.clone())).unwrap();
    p.run(None);
    assert_eq!(p.b.t.accept_to_memory(A, id), Err(TransferError::TooLarge { size: 10_001, limit: 10_000 }));
    p.b.t.accept(A, id).unwrap();
    p.run(None);
    assert_eq!(p.b.sinks[&id], data);

    // The sink fails midway: the receiver reports Storage and aborts it, the sender hears a
    // cancel; nothing is committed.
    let mut p = Pair::new();
    let rec = recording(&mut p);
    rec.0.lock().unwrap().fail_at = Some(100_000);
    let data = content(300_000);
    let id = p.a.t.offer_from(B, FileInfo::new("f.bin", data.len() as u64, sha(&data)), Box::new(data)).unwrap();
    p.run(None);
    assert_eq!(Pair::failure(&p.b, id), Some(TransferError::Storage("disk full".into())));
    assert!(matches!(Pair::failure(&p.a, id), Some(TransferError::Cancelled(_))));
    let r = rec.0.lock().unwrap();
    assert!(r.aborted && !r.committed);

    // The source fails midway: the sender reports Storage, the receiver hears a cancel.
    let mut p = Pair::new();
    let size = 300_000u64;
    let source = SourceFn(move |offset: u64, buf: &mut [u8]| if offset >= 100_000 { Err(std::io::Error::other("bad sector")) } else { buf.fill(1); Ok(()) });
    let id = p.a.t.offer_from(B, FileInfo::new("f.bin", size, [0; 32]), Box::new(source)).unwrap();
    p.run(None);
    assert_eq!(Pair::failure(&p.a, id), Some(TransferError::Storage("bad sector".into())));
    assert!(matches!(Pair::failure(&p.b, id), Some(TransferError::Cancelled(_))));
    assert!(!Pair::completed(&p.b, id, Direction::Receive));
}

#[test]
fn a_transfer_whose_peer_never_returns_times_out() {
    let mut p = Pair::new();
    let data = content(200_000);
    let id = p.send(data);
    // Until about half arrived, then nothing moves any more.
    p.run_until(None, 100_000);
    // A stalled but connected peer is not timed out.
    assert_eq!(p.a.t.poll_timeout(), None);
    let wait = p.a.t.config.reconnect_timeout;
    let lost = p.now;
    p.a.t.handle_disconnected(lost, B);
    let deadline = p.a.t.poll_timeout().expect("a lost peer with a transfer under way has a deadline");
    assert_eq!(deadline, lost + wait);
    // A second loss report does not move it; a spurious or early timeout does nothing.
    p.a.t.handle_disconnected(lost + Duration::from_secs(5), B);
    p.a.t.handle_timeout(deadline - Duration::from_millis(1));
    assert!(p.a.t.poll_event().is_none());
    assert_eq!(p.a.t.poll_timeout(), Some(deadline));
    // Back in time: the clock stops.
    p.a.t.handle_reconnected(B);
    assert_eq!(p.a.t.poll_timeout(), None);
    p.a.t.handle_timeout(deadline);
    assert!(p.a.t.poll_event().is_none());
    // Lost again, for good.
    let lost = deadline;
    p.a.t.handle_disconnected(lost, B);
    p.a.t.handle_timeout(lost + wait);
    assert_eq!(p.a.t.poll_event(), Some(TransferEvent::Failed { peer: B, id, direction: Direction::Send, error: TransferError::TimedOut(wait) }));
    assert_eq!(p.a.t.poll_timeout(), None);
    // An offer nobody answered yet does not time out: a person may be deciding.
    let mut q = Pair::new();
    q.b.auto_accept = false;
    q.send(content(10));
    q.run(None);
    q.a.t.handle_disconnected(q.now, B);
    q.b.t.handle_disconnected(q.now, A);
    assert_eq!((q.a.t.poll_timeout(), q.b.t.poll_timeout()), (None, None));
}

#[test]
fn transfer_ids_name_one_transfer_with_a_peer() {
    let mut p = Pair::new();
    // Both sides count from 1 here (a Node starts at random, so this is rare): offers made at
    // the same moment meet under one id, and each side refuses the other's.
    let a_id = p.send(content(5_000));
    let b_data = content(7_000);
    let b_id = p.b.t.offer(A, FileInfo::new("g.bin", b_data.len() as u64, sha(&b_data))).unwrap();
    assert_eq!((a_id, b_id), (1, 1));
    p.run(None);
    for (side, peer) in [(&p.a, B), (&p.b, A)] {
        assert!(side.events.contains(&TransferEvent::BadMessage { peer, error: TransferError::DuplicateId(1) }));
        assert_eq!(Pair::failure(side, 1), Some(TransferError::Rejected("transfer id in use".into())));
    }
    // An offer made while the other side's transfer is under way takes a free id; both go
    // through.
    let a_id = p.send(content(50_000));
    p.run_until(None, 4096);
    let b_id = p.b.t.offer_from(A, FileInfo::new("g.bin", b_data.len() as u64, sha(&b_data)), Box::new(b_data.clone())).unwrap();
    assert_ne!(a_id, b_id);
    p.b.auto_accept = true;
    p.run(None);
    assert!(Pair::completed(&p.b, a_id, Direction::Receive) && Pair::completed(&p.a, a_id, Direction::Send));
    assert!(p.a.events.contains(&TransferEvent::Completed { peer: B, id: b_id, direction: Direction::Receive }));
    assert!(p.b.events.contains(&TransferEvent::Completed { peer: A, id: b_id, direction: Direction::Send }));
    assert_eq!(p.a.sinks[&b_id], b_data);
}

/// A receiver that resumes from a chunk before the sender's last progress report moves the
/// sender's byte count back; the next rate must not underflow. Found by the `xfer` fuzz
/// target: it panicked in debug builds and reported an absurd rate in release builds.
#[test]
fn a_resume_from_before_the_last_progress_report_keeps_the_rate_sane() {
    let mut now = Instant::now();
    let mut t = Transfers::new(TransferConfig { chunk_size: 1024, read_ahead: 4, ..TransferConfig::default() });
    let data = content(8 * 1024);
    let id = t.offer(B, FileInfo::new("f.bin", data.len() as u64, sha(&data))).unwrap();
    t.handle_text(now, B, &Control::Accept { id, from: 0 }.encode());
    let mut pipe = Pipe { window: usize::MAX, ..Pipe::default() };
    let mut progress = Vec::new();
    let mut step = |t: &mut Transfers, now: Instant| {
        t.flush(now, &mut pipe);
        while let Some(e) = t.poll_event() {
            match e {
                TransferEvent::Read { offset, len, .. } => t.provide(B, id, offset, data[offset as usize..][..len].to_vec()).unwrap(),
                TransferEvent::Progress { progress: p, .. } => progress.push(p),
                _ => {}
            }
        }
    };
    // All eight chunks go out over a second, with a progress report after the fifth.
    for _ in 0..4 {
        step(&mut t, now);
        now += Duration::from_millis(300);
    }
    // The connection is replaced; the receiver holds the first two chunks only.
    t.handle_reconnected(B);
    t.handle_text(now, B, &Control::Accept { id, from: 2 }.encode());
    for _ in 0..4 {
        now += Duration::from_millis(300);
        step(&mut t, now);
    }
    t.handle_text(now, B, &Control::Verified { id }.encode());
    assert!(std::iter::from_fn(|| t.poll_event()).any(|e| matches!(e, TransferEvent::Completed { .. })));
    assert!(progress.len() >= 2, "{progress:?}");
    assert!(progress.iter().all(|p| p.bytes <= p.total && p.bytes_per_sec < 1e9), "{progress:?}");
}

/// An offer's SHA-256 in upper-case hex passes `validate`, so it must also match: the
/// receiver compared it with its own lower-case hex and failed every such transfer at the
/// end. Found by the `xfer` fuzz target.
#[test]
fn an_upper_case_hash_verifies() {
    let data = content(3000);
    let sha256 = hex(&sha(&data)).to_uppercase();
    let offer = Offer { id: 1, name: "f.bin".into(), size: 3000, mime: "x/y".into(), kind: TransferKind::File, chunk: 1024, chunks: 3, sha256 };
    assert_eq!(offer.validate(u64::MAX), Ok(()));
    let now = Instant::now();
    let mut t = Transfers::new(TransferConfig::default());
    t.handle_text(now, A, &Control::Offer(offer).encode());
    t.accept(A, 1).unwrap();
    for (index, chunk) in data.chunks(1024).enumerate() {
        t.handle_binary(now, A, &wire::encode_chunk(1, index as u64, chunk));
    }
    let events: Vec<TransferEvent> = std::iter::from_fn(|| t.poll_event()).collect();
    assert!(events.contains(&TransferEvent::Completed { peer: A, id: 1, direction: Direction::Receive }), "{events:?}");
}

/// An offer from a peer that reuses the id of this side's own transfer to it is refused
/// (the fuzz target found that with both directions under one id, a failure of one ended the
/// other): the peer hears `reject`, this side reports `DuplicateId`, its own transfer goes on.
#[test]
fn an_offer_reusing_this_sides_id_is_refused_and_this_sides_transfer_goes_on() {
    let t0 = Instant::now();
    let mut t = Transfers::new(TransferConfig { chunk_size: 1024, ..TransferConfig::default() });
    let incoming = |id, sha256| Offer { id, name: "in.bin".into(), size: 2048, mime: "x/y".into(), kind: TransferKind::File, chunk: 1024, chunks: 2, sha256 };
    let drain = |t: &mut Transfers| std::iter::from_fn(|| t.poll_event()).collect::<Vec<_>>();
    let data = content(2048);
    let out = t.offer(B, FileInfo::new("out.bin", 2048, sha(&data))).unwrap();
    t.handle_text(t0, B, &Control::Offer(incoming(out, hex(&sha(&data)))).encode());
    assert_eq!(drain(&mut t), [TransferEvent::BadMessage { peer: B, error: TransferError::DuplicateId(out) }]);
    assert_eq!(t.accept(B, out), Err(TransferError::Unknown(out)));
    let mut pipe = Pipe { window: usize::MAX, ..Pipe::default() };
    t.flush(t0, &mut pipe);
    let said: Vec<Control> = pipe.frames.iter().filter_map(|f| match f {
        Frame::Text(text) => Control::decode(text).ok(),
        Frame::Binary(_) => None,
    }).collect();
    assert!(said.contains(&Control::Reject { id: out, reason: "transfer id in use".into() }), "{said:?}");
    // This side's transfer is untouched.
    t.handle_text(t0, B, &Control::Accept { id: out, from: 2 }.encode());
    t.handle_text(t0, B, &Control::Verified { id: out }.encode());
    assert!(drain(&mut t).contains(&TransferEvent::Completed { peer: B, id: out, direction: Direction::Send }));
}

/// Accepts from here and there (a receiver resuming, or a misbehaving one) must not pile up
/// reads: at most `read_ahead` are outstanding, and nothing answered outside the window is
/// held. Found by the `xfer` fuzz target.
#[test]
fn accepts_from_elsewhere_keep_reads_within_the_read_ahead() {
    let now = Instant::now();
    let mut t = Transfers::new(TransferConfig { chunk_size: 1024, read_ahead: 4, ..TransferConfig::default() });
    let data = content(100 * 1024);
    let id = t.offer(B, FileInfo::new("f.bin", data.len() as u64, sha(&data))).unwrap();
    let mut pipe = Pipe { window: usize::MAX, ..Pipe::default() };
    for from in [0, 50, 20, 90, 2] {
        t.handle_text(now, B, &Control::Accept { id, from }.encode());
        t.flush(now, &mut pipe);
        let reads: Vec<u64> = std::iter::from_fn(|| t.poll_event())
            .filter_map(|e| match e {
                TransferEvent::Read { offset, .. } => Some(offset / 1024),
                _ => None,
            })
            .collect();
        // Nothing outstanding from earlier windows is kept: the whole window is asked for.
        assert_eq!(reads, (from..from + 4).collect::<Vec<_>>(), "after an accept from {from}");
    }
    // Answers to reads of earlier windows are refused; the window's are taken and sent.
    assert!(t.provide(B, id, 90 * 1024, data[90 * 1024..91 * 1024].to_vec()).is_err());
    for i in 2..6 {
        t.provide(B, id, i * 1024, data[i as usize * 1024..][..1024].to_vec()).unwrap();
    }
    pipe.frames.clear();
    // A flush sends a bounded number of chunks; it says when it has more.
    t.flush(now, &mut pipe);
    while t.wants_flush() {
        t.flush(now, &mut pipe);
    }
    assert_eq!(pipe.frames.len(), 4);
}

/// Reads kept over a repeated accept may be answered and their chunks sent before the next
/// flush asks for more: those chunks must not be asked for again. Found by the `xfer` fuzz
/// target.
#[test]
fn chunks_sent_after_an_accept_are_not_read_again() {
    let now = Instant::now();
    let mut t = Transfers::new(TransferConfig { chunk_size: 1024, read_ahead: 2, ..TransferConfig::default() });
    let data = content(4000);
    let id = t.offer(B, FileInfo::new("f.bin", data.len() as u64, sha(&data))).unwrap();
    let mut pipe = Pipe { window: usize::MAX, ..Pipe::default() };
    let reads = |t: &mut Transfers| -> Vec<u64> {
        std::iter::from_fn(|| t.poll_event())
            .filter_map(|e| match e {
                TransferEvent::Read { offset, .. } => Some(offset / 1024),
                _ => None,
            })
            .collect()
    };
    t.handle_text(now, B, &Control::Accept { id, from: 1 }.encode());
    t.flush(now, &mut pipe);
    assert_eq!(reads(&mut t), [1, 2]);
    // The same accept again (a resume from where it stood), then both answers.
    t.handle_text(now, B, &Control::Accept { id, from: 1 }.encode());
    for i in [1, 2] {
        t.provide(B, id, i * 1024, data[i as usize * 1024..][..1024].to_vec()).unwrap();
    }
    t.flush(now, &mut pipe);
    assert_eq!(pipe.chunks_seen, 2, "chunks 1 and 2 went");
    assert_eq!(reads(&mut t), [3], "only the last chunk is left to read");
}

/// Bytes of the wrong length are refused without using up the read: the right ones are
/// still taken and sent (the transfer stalled). Found by the `xfer` fuzz target.
#[test]
fn a_refused_answer_leaves_the_read_outstanding() {
    let now = Instant::now();
    let mut t = Transfers::new(TransferConfig { chunk_size: 1024, ..TransferConfig::default() });
    let data = content(3);
    let id = t.offer(B, FileInfo::new("f.bin", 3, sha(&data))).unwrap();
    t.handle_text(now, B, &Control::Accept { id, from: 0 }.encode());
    let mut pipe = Pipe { window: usize::MAX, ..Pipe::default() };
    t.flush(now, &mut pipe);
    assert!(matches!(t.poll_event(), Some(TransferEvent::Read { offset: 0, len: 3, .. })));
    assert_eq!(t.provide(B, id, 0, Vec::new()), Err(TransferError::BadChunk(0)));
    assert_eq!(t.provide(B, id, 0, data.clone()), Ok(()));
    t.flush(now, &mut pipe);
    assert_eq!(pipe.chunks_seen, 1);
}
