//! Replays the committed fuzz corpora of the hand-decoded targets (`fuzz/corpus/node_inputs/`,
//! `fuzz/corpus/xfer/`) through the same harnesses the cargo-fuzz targets run
//! (`fuzz/fuzz_targets/{node_inputs,xfer}.rs`, included as modules), without the fuzzer, so
//! every seed and every past crash stays a test. They live here rather than in
//! `core/tests/fuzz_corpus.rs` because `node_inputs` needs `peerlink-sim` and neither decodes
//! with `arbitrary`.
//!
//! The hand-written seeds are [`seeds`] and [`xfer_seeds`], encoded with each target's encoder;
//! after changing one, or an encoding, rewrite the files with `PEERLINK_WRITE_SEEDS=1 cargo
//! test -p peerlink-tests --test sim fuzz_replay`.

#[path = "../../fuzz/fuzz_targets/node_inputs.rs"]
mod node_inputs;
#[path = "../../fuzz/fuzz_targets/xfer.rs"]
mod xfer;

use std::path::PathBuf;

use node_inputs::{Edit, Payload, SignalSpec, Step, Summary};
use peerlink::transfer::{Control, Offer, TransferKind};

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target)
}

/// Runs every file of `target`'s corpus through `run`; reports all that panic.
fn replay(target: &str, run: impl Fn(&[u8]) + std::panic::RefUnwindSafe) {
    let dir = corpus_dir(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {} is missing: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries.map(|e| e.expect("corpus entry").path()).filter(|p| p.is_file()).collect();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    files.sort();
    let mut failed = Vec::new();
    for path in &files {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if std::panic::catch_unwind(|| run(&data)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{} of {} {target} inputs failed: {failed:#?}", failed.len(), files.len());
}

/// The seed files `seed-<name>` of `target` hold these encodings (rewritten with
/// `PEERLINK_WRITE_SEEDS=1`).
fn check_seed_files(target: &str, seeds: impl IntoIterator<Item = (&'static str, Vec<u8>)>) {
    let dir = corpus_dir(target);
    let write = std::env::var_os("PEERLINK_WRITE_SEEDS").is_some();
    for (name, bytes) in seeds {
        let path = dir.join(format!("seed-{name}"));
        if write {
            std::fs::create_dir_all(&dir).expect("corpus dir");
            std::fs::write(&path, &bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
        let file = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(file == bytes, "{target} seed-{name} is stale: rewrite it with PEERLINK_WRITE_SEEDS=1");
    }
}

#[test]
fn node_inputs_corpus() {
    replay("node_inputs", |data| {
        let _ = node_inputs::node_inputs(data);
    });
}

fn signal(kind: u8, session: u8, signer: u8) -> Step {
    Step::Relay {
        from: 0,
        payload: Payload::Signal(SignalSpec {
            kind,
            session,
            template: 0,
            sdp_edits: Vec::new(),
            signer,
            candidate_edits: Vec::new(),
            reason: 2,
        }),
    }
}

fn advance(ms: u16) -> Step {
    Step::Advance { ms }
}

/// The hand-written scenarios, by seed file name (`seed-<name>`).
fn seeds() -> Vec<(&'static str, Vec<Step>)> {
    let connect = || vec![Step::Connect { from: 0, to: 1 }, advance(1500)];
    let send = |from, channel, binary, len| Step::Send { from, channel, binary, len };
    vec![
        (
            "connect",
            [
                connect(),
                vec![
                    send(0, 0, false, 3),
                    send(1, 0, true, 50),
                    advance(300),
                    Step::CreateChannel { node: 0, label: 0, ordered: true, reliability: 0, param: 0 },
                    advance(300),
                    send(0, 1, false, 8),
                    send(1, 1, true, 40_000),
                    advance(500),
                    Step::ClosePeer { node: 0, target: 1 },
                    advance(500),
                ],
            ]
            .concat(),
        ),
        ("glare", vec![Step::Connect { from: 0, to: 1 }, Step::Connect { from: 1, to: 0 }, advance(3000), send(1, 0, false, 4), advance(200)]),
        (
            "strangers",
            vec![
                Step::Connect { from: 0, to: 2 },
                Step::Connect { from: 0, to: 3 },
                Step::Connect { from: 0, to: 1 },
                Step::Connect { from: 1, to: 0 },
                Step::Connect { from: 1, to: 1 },
                advance(31_000),
                Step::Connect { from: 0, to: 1 },
                advance(2000),
            ],
        ),
        (
            "junk",
            [
                connect(),
                vec![
                    Step::Datagram { to: 0, source: 0, framing: 1, body: b"\x00\x01junk-stun-tid-and-attrs".to_vec() },
                    Step::Datagram { to: 0, source: 0, framing: 2, body: vec![3, 0, 0, 0, 0, 0, 0, 9, 0xaa, 0xbb] },
                    Step::Datagram { to: 1, source: 1, framing: 0, body: b"GET / HTTP/1.1\r\n".to_vec() },
                    Step::Datagram { to: 1, source: 2, framing: 3, body: vec![96; 24] },
                    signal(2, 0, 0),
                    signal(1, 0, 0),
                    Step::Relay {
                        from: 1,
                        payload: Payload::Object { version: 0, kind: 2, sid: 0, fields: 0b1000, text: b"candidate:garbage".to_vec() },
                    },
                    Step::Relay { from: 0, payload: Payload::Raw(br#"{"peerlink":"rtc/1","t":"bye","sid":"xyz"}"#.to_vec()) },
                    Step::Relay { from: 0, payload: Payload::Raw(br#"{"app":[1,2,3]}"#.to_vec()) },
                    advance(500),
                    send(0, 0, false, 2),
                    advance(300),
                ],
            ]
            .concat(),
        ),
        (
            "forged",
            [
                connect(),
                vec![
                    // A re-offer in the live session, signed by the sender: renegotiation.
                    signal(0, 0, 0),
                    advance(500),
                    // Signed by a stranger, unsigned, and a new session (replaces the connection).
                    signal(0, 0, 1),
                    signal(1, 1, 2),
                    advance(500),
                    signal(0, 2, 0),
                    advance(1500),
                    signal(3, 1, 0),
                    advance(300),
                    Step::Connect { from: 1, to: 0 },
                    advance(1500),
                    signal(4, 0, 0),
                    advance(300),
                ],
            ]
            .concat(),
        ),
        (
            "outage",
            [
                connect(),
                vec![
                    Step::Partition { cut: true },
                    advance(9000),
                    Step::Partition { cut: false },
                    advance(6000),
                    Step::RestartIce { node: 1 },
                    advance(1000),
                    Step::Partition { cut: true },
                    advance(65_000),
                    Step::Partition { cut: false },
                    advance(1000),
                ],
            ]
            .concat(),
        ),
        (
            "signaling",
            vec![
                Step::SignalingDown { node: 0, down: true },
                Step::Connect { from: 0, to: 1 },
                advance(2000),
                Step::SignalingDown { node: 0, down: false },
                advance(6000),
                Step::Tamper { node: 1, drop: true, edits: Vec::new() },
                Step::Connect { from: 1, to: 0 },
                advance(2000),
                Step::Tamper { node: 0, drop: false, edits: vec![Edit { pos: 30, op: 0, byte: b'x' }, Edit { pos: 0, op: 2, byte: 0 }] },
                Step::Connect { from: 0, to: 1 },
                advance(3000),
                Step::SignalingDown { node: 1, down: true },
                advance(3000),
            ],
        ),
    ]
}

/// The seed files are the encodings of [`seeds`] (rewritten with `PEERLINK_WRITE_SEEDS=1`).
#[test]
fn node_inputs_seed_files_match_their_scenarios() {
    let encoded = seeds().into_iter().map(|(name, steps)| {
        let bytes = node_inputs::encode_steps(&steps);
        assert_eq!(node_inputs::decode_steps(&bytes), steps, "seed-{name} does not decode to its steps");
        (name, bytes)
    });
    check_seed_files("node_inputs", encoded);
}

/// The scenarios reach the states they are about, or the fuzzer would start from nowhere.
#[test]
fn node_inputs_seeds_reach_their_states() {
    let run = |name: &str| -> Summary {
        let steps = seeds().into_iter().find(|(n, _)| *n == name).expect("seed").1;
        let summary = node_inputs::node_inputs(&node_inputs::encode_steps(&steps));
        eprintln!("seed-{name}: {summary:?}");
        summary
    };
    let s = run("connect");
    assert!(s.connected >= 2 && s.channels_opened >= 4 && s.data >= 4, "{s:?}");
    let s = run("glare");
    assert!(s.connected >= 2 && s.data >= 1, "{s:?}");
    let s = run("strangers");
    assert!(s.max_live_peers == node_inputs::MAX_PEERS && s.refused >= 2 && s.peer_errors >= 2, "{s:?}");
    let s = run("junk");
    assert!(s.connected >= 2 && s.bad_signals >= 1 && s.data >= 1, "{s:?}");
    let s = run("forged");
    assert!(s.connected >= 2 && s.peer_errors >= 1 && s.incoming >= 1, "{s:?}");
    let s = run("outage");
    assert!(s.connected >= 2 && s.disconnected >= 1, "{s:?}");
    let s = run("signaling");
    assert!(s.connected >= 2, "{s:?}");
}

// ---- xfer -----------------------------------------------------------------------------------

#[test]
fn xfer_corpus() {
    replay("xfer", |data| {
        let _ = xfer::xfer(data);
    });
}

/// Read-ahead 16, at most 8 transfers per peer, 1 KiB chunks, default limits.
const SETUP: xfer::Setup = xfer::Setup { read_ahead: 15, max_transfers: 7, chunk: 0, flags: 0 };

/// Hand-written `xfer` scenarios, by seed file name (`seed-<name>`): each gets its transfers
/// to the state it is named after, so the fuzzer starts past the handshakes.
fn xfer_seeds() -> Vec<(&'static str, xfer::Input)> {
    use xfer::Step as X;
    let flush = || X::Flush { texts: 255, chunks: 255, error: false };
    let serve = || X::Serve { count: 0, skip: 0 };
    let advance = |ms| X::Advance { ms };
    let control = |peer, control| X::Control { peer, control };
    let accepted = |id, from| control(0, Control::Accept { id, from });
    let offer = |id, size, kind, seed, hash| X::Offer { peer: 0, id, size, chunk: 0, kind, seed, hash };
    let chunks = |id, count| X::Chunks { peer: 0, id, at: 0, count, flip: false };
    let input = |setup, steps| xfer::Input { setup, steps };
    vec![
        (
            "receive",
            input(
                SETUP,
                vec![
                    offer(1, 5000, 0, 1, 0),
                    X::Accept { peer: 0, id: 1, memory: false },
                    flush(),
                    chunks(1, 2),
                    advance(300),
                    chunks(1, 1),
                    X::Reconnected { peer: 0 },
                    flush(),
                    chunks(1, 9),
                    flush(),
                ],
            ),
        ),
        (
            "send",
            input(
                SETUP,
                vec![
                    X::Send { peer: 0, size: 10_000, name: 0, source: 0 },
                    flush(),
                    accepted(1, 0),
                    flush(),
                    serve(),
                    advance(300),
                    flush(),
                    control(0, Control::Verified { id: 1 }),
                ],
            ),
        ),
        (
            // Sent ahead, the connection is lost, the receiver had less: the sender goes back.
            "resume",
            input(
                xfer::Setup { read_ahead: 3, ..SETUP },
                vec![
                    X::Send { peer: 0, size: 20_000, name: 0, source: 0 },
                    flush(),
                    accepted(1, 0),
                    flush(),
                    serve(),
                    advance(300),
                    flush(),
                    serve(),
                    advance(300),
                    flush(),
                    serve(),
                    X::Reconnected { peer: 0 },
                    accepted(1, 2),
                    flush(),
                    serve(),
                    advance(300),
                    flush(),
                    serve(),
                    flush(),
                ],
            ),
        ),
        (
            "backpressure",
            input(
                xfer::Setup { read_ahead: 1, ..SETUP },
                vec![
                    X::Send { peer: 0, size: 4000, name: 0, source: 0 },
                    X::Send { peer: 0, size: 3000, name: 0, source: 1 },
                    X::Send { peer: 1, size: 2500, name: 0, source: 3 },
                    flush(),
                    accepted(1, 0),
                    accepted(2, 0),
                    control(1, Control::Accept { id: 3, from: 0 }),
                    X::Flush { texts: 0, chunks: 2, error: false },
                    serve(),
                    flush(),
                    X::Writable { peer: 0 },
                    X::Flush { texts: 1, chunks: 3, error: true },
                    serve(),
                    X::Writable { peer: 0 },
                    X::Writable { peer: 1 },
                    flush(),
                    serve(),
                    flush(),
                ],
            ),
        ),
        (
            "hashes",
            input(
                SETUP,
                vec![
                    // Wrong hash; upper-case hash; a changed byte under a good CRC; out of
                    // order; a chunk of the wrong length.
                    offer(1, 3000, 0, 1, 2),
                    offer(2, 3000, 0, 3, 1),
                    offer(3, 3000, 0, 5, 0),
                    offer(4, 3000, 0, 7, 0),
                    offer(5, 3000, 0, 9, 0),
                    X::Accept { peer: 0, id: 1, memory: false },
                    X::Accept { peer: 0, id: 2, memory: false },
                    X::Accept { peer: 0, id: 3, memory: false },
                    X::Accept { peer: 0, id: 4, memory: false },
                    X::Accept { peer: 0, id: 5, memory: false },
                    chunks(1, 3),
                    chunks(2, 3),
                    X::Chunks { peer: 0, id: 3, at: 0, count: 3, flip: true },
                    X::Chunks { peer: 0, id: 4, at: 2, count: 1, flip: false },
                    X::Chunk { peer: 0, id: 5, index: 0, payload: vec![7; 10] },
                    flush(),
                ],
            ),
        ),
        (
            "memory",
            input(
                xfer::Setup { flags: 4, ..SETUP },
                vec![
                    // JSON taken without asking, JSON that is not, bytes into memory, an empty
                    // file, a file over the in-memory limit.
                    offer(1, 3000, 1, 2, 0),
                    offer(2, 100, 1, 3, 0),
                    offer(3, 5000, 0, 5, 0),
                    offer(4, 0, 0, 1, 0),
                    offer(5, 9000, 2, 1, 0),
                    X::Accept { peer: 0, id: 3, memory: true },
                    X::Accept { peer: 0, id: 4, memory: true },
                    X::Accept { peer: 0, id: 5, memory: true },
                    chunks(1, 3),
                    chunks(2, 1),
                    chunks(3, 5),
                    flush(),
                ],
            ),
        ),
        (
            "ends",
            input(
                xfer::Setup { max_transfers: 1, ..SETUP },
                vec![
                    // Two transfers per peer at most: rejected and cancelled both ways, one
                    // too many each way, and one left to time out.
                    X::Send { peer: 0, size: 2048, name: 0, source: 0 },
                    X::Send { peer: 0, size: 2048, name: 0, source: 0 },
                    X::Send { peer: 0, size: 2048, name: 0, source: 0 },
                    control(0, Control::Reject { id: 1, reason: "no".into() }),
                    X::Cancel { peer: 0, id: 2 },
                    offer(7, 2048, 0, 1, 0),
                    offer(8, 2048, 0, 1, 0),
                    offer(9, 2048, 0, 1, 0),
                    X::Reject { peer: 0, id: 7 },
                    control(0, Control::Cancel { id: 8, reason: "bye".into() }),
                    X::Send { peer: 1, size: 2048, name: 0, source: 1 },
                    control(1, Control::Accept { id: 3, from: 0 }),
                    advance(121_000),
                    X::Timeout,
                    flush(),
                ],
            ),
        ),
        (
            "junk",
            input(
                SETUP,
                vec![
                    X::Text { peer: 0, text: b"not json".to_vec() },
                    X::Text { peer: 0, text: br#"{"t":"accept","id":1}"#.to_vec() },
                    X::Text { peer: 1, text: br#"{"t":"offer","id":1,"name":"a","size":1,"mime":"","kind":"file","chunk":1024,"chunks":1,"sha256":"00"}"#.to_vec() },
                    control(
                        0,
                        Control::Offer(Offer {
                            id: u64::MAX,
                            name: "x".into(),
                            size: 1 << 41,
                            mime: "a/b".into(),
                            kind: TransferKind::Image,
                            chunk: 4096,
                            chunks: 1 << 29,
                            sha256: "ab".repeat(32),
                        }),
                    ),
                    X::Frame { peer: 0, bytes: vec![0xc7, 1, 2, 3] },
                    X::Chunk { peer: 1, id: 9, index: 0, payload: b"hello".to_vec() },
                    accepted(9, 0),
                    control(0, Control::Verified { id: 9 }),
                    X::Provide { peer: 0, id: 9, offset: 0, len: 10, fill: 1 },
                    X::Accept { peer: 1, id: 3, memory: false },
                    X::Send { peer: 0, size: 100, name: 2, source: 0 },
                    X::Send { peer: 0, size: u64::MAX, name: 0, source: 0 },
                    X::Timeout,
                ],
            ),
        ),
    ]
}

/// The `xfer` seed files are the encodings of [`xfer_seeds`].
#[test]
fn xfer_seed_files_match_their_scenarios() {
    let encoded = xfer_seeds().into_iter().map(|(name, input)| {
        let bytes = xfer::encode_input(&input);
        assert_eq!(xfer::decode_input(&bytes), input, "seed-{name} does not decode to its steps");
        (name, bytes)
    });
    check_seed_files("xfer", encoded);
}

/// The `xfer` scenarios get where they are named after.
#[test]
fn xfer_seeds_reach_their_states() {
    let run = |name: &str| -> xfer::Summary {
        let input = xfer_seeds().into_iter().find(|(n, _)| *n == name).expect("seed").1;
        let summary = xfer::xfer(&xfer::encode_input(&input));
        eprintln!("xfer seed-{name}: {summary:?}");
        summary
    };
    let s = run("receive");
    assert!(s.writes == 5 && s.completed_receive == 1, "{s:?}");
    let s = run("send");
    assert!(s.reads == 10 && s.chunks_sent == 10 && s.completed_send == 1, "{s:?}");
    let s = run("resume");
    assert!(s.resumes == 1 && s.chunks_sent >= 20, "{s:?}");
    let s = run("backpressure");
    assert!(s.refusals >= 2 && s.chunks_sent >= 6 && s.failed >= 1, "{s:?}");
    let s = run("hashes");
    assert!(s.completed_receive == 1 && s.failed == 4, "{s:?}");
    let s = run("memory");
    assert!(s.handed_over == 3 && s.completed_receive == 3 && s.failed >= 1, "{s:?}");
    let s = run("ends");
    assert!(s.failed >= 4 && s.timed_out >= 1, "{s:?}");
    let s = run("junk");
    assert!(s.bad_messages >= 6, "{s:?}");
}
