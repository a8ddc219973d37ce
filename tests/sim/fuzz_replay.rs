//! Replays the committed `node_inputs` fuzz corpus (`fuzz/corpus/node_inputs/`) through the
//! same harness the cargo-fuzz target runs (`fuzz/fuzz_targets/node_inputs.rs`, included as a
//! module), without the fuzzer, so every seed and every past crash stays a test. It lives here
//! rather than in `core/tests/fuzz_corpus.rs` because the harness needs `peerlink-sim`.
//!
//! The hand-written seeds are [`seeds`], encoded with `encode_steps`; after changing one, or
//! the step encoding, rewrite the files with `PEERLINK_WRITE_SEEDS=1 cargo test -p
//! peerlink-tests --test sim fuzz_replay`.

#[path = "../../fuzz/fuzz_targets/node_inputs.rs"]
mod node_inputs;

use std::path::PathBuf;

use node_inputs::{Edit, Payload, SignalSpec, Step, Summary};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/node_inputs")
}

#[test]
fn node_inputs_corpus() {
    let dir = corpus_dir();
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {} is missing: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries.map(|e| e.expect("corpus entry").path()).filter(|p| p.is_file()).collect();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    files.sort();
    let mut failed = Vec::new();
    for path in &files {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if std::panic::catch_unwind(|| node_inputs::node_inputs(&data)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{} of {} node_inputs inputs failed: {failed:#?}", failed.len(), files.len());
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
    let dir = corpus_dir();
    let write = std::env::var_os("PEERLINK_WRITE_SEEDS").is_some();
    for (name, steps) in seeds() {
        let bytes = node_inputs::encode_steps(&steps);
        assert_eq!(node_inputs::decode_steps(&bytes), steps, "seed-{name} does not decode to its steps");
        let path = dir.join(format!("seed-{name}"));
        if write {
            std::fs::create_dir_all(&dir).expect("corpus dir");
            std::fs::write(&path, &bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
        let file = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(file == bytes, "seed-{name} is stale: rewrite it with PEERLINK_WRITE_SEEDS=1");
    }
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
