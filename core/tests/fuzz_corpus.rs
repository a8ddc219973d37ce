//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the same harness the
//! cargo-fuzz targets run, without the fuzzer, so every seed and every past crash stays a test.

#[path = "../../fuzz/harness.rs"]
mod harness;

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {} is missing: {e}", dir.display()));
    let mut files: Vec<(PathBuf, Vec<u8>)> = entries
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, data)
        })
        .collect();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    files.sort();
    files
}

fn replay(target: &str, run: fn(&[u8])) {
    let files = corpus(target);
    let mut failed = Vec::new();
    for (path, data) in &files {
        if std::panic::catch_unwind(|| run(data)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{} of {} {target} inputs failed: {failed:#?}", failed.len(), files.len());
}

#[test]
fn decode_frames_corpus() {
    replay("decode_frames", harness::decode_frames);
}

#[test]
fn server_core_corpus() {
    replay("server_core", |data| {
        let _ = harness::server_core(data);
    });
}

/// The hand-written scenarios must get past registration and into the interesting states,
/// or the fuzzer would be stuck at the door.
#[test]
fn server_core_seeds_reach_registered_states() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/server_core");
    let run = |name: &str| {
        let data = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        harness::server_core(&data)
    };
    let s = run("seed-namespaces");
    assert!(s.registered >= 2 && s.max_namespaces >= 2, "{s:?}");
    let s = run("seed-match");
    assert!(s.registered >= 3 && s.matched >= 2, "{s:?}");
    let s = run("seed-rooms");
    assert!(s.registered >= 2 && s.max_rooms >= 2, "{s:?}");
    let s = run("seed-resume");
    assert!(s.registered >= 3 && s.max_sessions >= 2, "{s:?}");
}

#[test]
fn turn_decode_corpus() {
    replay("turn_decode", harness::turn_decode);
}

#[test]
fn stun_decode_corpus() {
    replay("stun_decode", harness::stun_decode);
}

#[test]
fn peer_signal_corpus() {
    replay("peer_signal", harness::peer_signal);
}

fn seed(target: &str, name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target).join(format!("seed-{name}"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The STUN seeds are what they claim to be (the RFC 5769 vectors included), so the fuzzer
/// starts from every kind of message.
#[test]
fn stun_decode_seeds_decode_as_expected() {
    use peerlink::stun::{StunError, StunMessage, decode};
    let mapped = |name: &str| match decode(&seed("stun_decode", name)) {
        Ok(StunMessage::BindingSuccess { mapped, .. }) => mapped.to_string(),
        other => panic!("seed-{name}: {other:?}"),
    };
    assert_eq!(mapped("rfc5769-response-v4"), "192.0.2.1:32853");
    assert_eq!(mapped("rfc5769-response-v6"), "[2001:db8:1234:5678:11:2233:4455:6677]:32853");
    assert_eq!(mapped("success-v4"), "203.0.113.9:40000");
    assert_eq!(mapped("success-plain"), "192.0.2.7:3478");
    assert_eq!(mapped("success-both"), "10.0.0.1:5000", "XOR-MAPPED-ADDRESS wins");
    for name in ["rfc5769-request", "request"] {
        assert!(matches!(decode(&seed("stun_decode", name)), Ok(StunMessage::BindingRequest { .. })), "seed-{name}");
    }
    assert!(matches!(decode(&seed("stun_decode", "error-420")), Ok(StunMessage::BindingError { code: 420, .. })));
    assert_eq!(decode(&seed("stun_decode", "success-empty")), Err(StunError::NoMappedAddress));
    assert_eq!(decode(&seed("stun_decode", "success-truncated")), Err(StunError::Truncated));
    assert_eq!(decode(&seed("stun_decode", "allocate")), Err(StunError::Unsupported(0x0003)));
    for name in ["bad-length", "dtls"] {
        assert_eq!(decode(&seed("stun_decode", name)), Err(StunError::NotStun), "seed-{name}");
    }
}

/// The negotiation seeds cover every message kind and the typed refusals.
#[test]
fn peer_signal_seeds_decode_as_expected() {
    use peerlink::peer::signal::{Signal, SignalError};
    let decode = |name: &str| {
        let text = String::from_utf8(seed("peer_signal", name)).expect("UTF-8");
        let raw = serde_json::value::RawValue::from_string(text).unwrap_or_else(|e| panic!("seed-{name}: {e}"));
        Signal::decode(&raw)
    };
    assert!(matches!(decode("offer"), Ok(Some(Signal::Offer { .. }))));
    assert!(matches!(decode("answer"), Ok(Some(Signal::Answer { .. }))));
    assert!(matches!(decode("candidate"), Ok(Some(Signal::Candidate { .. }))));
    assert!(matches!(decode("bye"), Ok(Some(Signal::Bye { .. }))));
    assert!(matches!(decode("reject"), Ok(Some(Signal::Reject { .. }))));
    assert_eq!(decode("version"), Err(SignalError::Version("rtc/9".into())));
    assert!(matches!(decode("missing-sdp"), Err(SignalError::Malformed(_))));
    assert_eq!(decode("long-candidate"), Err(SignalError::TooLong("candidate")));
    assert_eq!(decode("app-object"), Ok(None));
    let sdp = String::from_utf8(seed("peer_signal", "sdp")).expect("UTF-8");
    assert!(peerlink::peer::signal::sdp_fingerprint(&sdp).is_some_and(|f| f.starts_with("sha-256 AB:AB")));
}

#[test]
fn room_batch_corpus() {
    replay("room_batch", harness::room_batch);
}

/// The room seeds are what their names say: every item kind decodes, the typed refusals are
/// refused, the relayed payloads are signed (or forged) as named, so the fuzzer starts past
/// the parser and the signature check.
#[test]
fn room_batch_seeds_decode_as_expected() {
    use peerlink::room::wire::{self, Item, WireError};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/room_batch");
    let mut kinds = [0usize; 5];
    let (mut batches, mut bad, mut relayed, mut signed) = (0, 0, 0, 0);
    for entry in std::fs::read_dir(&dir).expect("corpus") {
        let name = entry.expect("entry").file_name().into_string().expect("UTF-8 name");
        let Some(name) = name.strip_prefix("seed-") else { continue };
        let data = seed("room_batch", name);
        let text = || std::str::from_utf8(&data[1..]).unwrap_or_else(|e| panic!("seed-{name}: {e}"));
        if name.starts_with("batch-") {
            let items = wire::decode_batch(text()).unwrap_or_else(|e| panic!("seed-{name}: {e}"));
            for item in &items {
                kinds[match item {
                    Item::Data { data: peerlink::RoomData::Json(_), .. } => 0,
                    Item::Data { data: peerlink::RoomData::Text(_), .. } => 1,
                    Item::Data { .. } => 2,
                    Item::Ack { .. } => 3,
                    Item::Presence { .. } => 4,
                }] += 1;
            }
            batches += 1;
        } else if name.starts_with("bad-") {
            assert!(matches!(wire::decode_batch(text()), Err(WireError::Malformed(_))), "seed-{name}");
            bad += 1;
        } else if let Some(short) = name.strip_prefix("relayed-") {
            let (_, accepted, _) = harness::room_relayed_seeds().into_iter().find(|(n, _, _)| *n == short).unwrap_or_else(|| panic!("seed-{name} is not in room_relayed_seeds"));
            assert_eq!(harness::room_relayed_accepted(text()), accepted, "seed-{name}");
            relayed += 1;
        } else if name.starts_with("signed-") {
            assert_eq!(data[0], harness::ROOM_MODE_SIGNED, "seed-{name}");
            signed += 1;
        }
    }
    assert!(kinds.iter().all(|n| *n >= 5), "item kinds (json, text, binary, ack, presence): {kinds:?}");
    assert!(batches >= 30 && bad >= 15 && signed >= 8, "{batches} batches, {bad} bad, {signed} signed");
    assert_eq!(relayed, harness::room_relayed_seeds().len(), "run `cargo test -p peerlink --test fuzz_corpus -- --ignored write_room_batch_relayed_seeds`");
}

/// Every byte of a signed payload's body, signature, key and recipient, and of its text,
/// flipped (two ways) through the same checks as the fuzzer's signed mode: all refused.
#[test]
fn room_batch_every_flip_is_refused() {
    let body = r#"{"m":[{"t":"d","r":"r","e":7,"s":1,"x":"h\u00e9\n"},{"t":"a","r":"r","e":9,"s":0}]}"#;
    // (kind, length of what it flips): body, signature, key, recipient, signature text, key
    // text, payload text.
    let payload_len = 400 + 2 * body.len();
    let fields = [(0, body.len()), (1, 64), (2, 65), (3, 32), (4, 88), (5, 88), (6, payload_len)];
    let mut mutations = Vec::new();
    for (kind, len) in fields {
        for pos in 0..len as u16 {
            for xor in [0x01, 0x80] {
                mutations.push([kind, pos.to_le_bytes()[0], pos.to_le_bytes()[1], xor]);
            }
        }
    }
    mutations.extend([[7, 0, 0, 1], [7, 1, 0, 1]]);
    for chunk in mutations.chunks(harness::ROOM_MAX_MUTATIONS) {
        let mut input = vec![harness::ROOM_MODE_SIGNED, 3, chunk.len() as u8];
        input.extend(chunk.iter().flatten());
        input.extend(body.as_bytes());
        harness::room_batch(&input);
    }
}

/// Writes the genuinely signed relay payloads into the `room_batch` corpus (they need the
/// harness's keys, so `fuzz/seeds/gen_seeds.py` cannot).
#[test]
#[ignore = "writes fuzz/corpus/room_batch/seed-relayed-*"]
fn write_room_batch_relayed_seeds() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/room_batch");
    for (name, _, payload) in harness::room_relayed_seeds() {
        let mut data = b"R".to_vec();
        data.extend(payload.as_bytes());
        std::fs::write(dir.join(format!("seed-relayed-{name}")), data).expect("write");
    }
}

#[test]
fn sync_corpus() {
    replay("sync", harness::sync);
}

/// The sync seeds (`harness::sync_seeds`, from real replicas meeting the fixtures) are
/// accepted: every state seed by the fixture of its mode, every CRDT seed by the CRDT
/// fixture, so the fuzzer starts past the decoders. (They are not compared byte for byte
/// with a fresh run: a replica's answers list keys in hash-map order.)
#[test]
fn sync_seeds_are_accepted() {
    use peerlink::sync::{CrdtEvent, StateEvent};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/sync");
    let (mut state, mut crdt) = (0, 0);
    for entry in std::fs::read_dir(&dir).expect("corpus") {
        let name = entry.expect("entry").file_name().into_string().expect("UTF-8 name");
        let Some(name) = name.strip_prefix("seed-") else { continue };
        let bytes = seed("sync", name);
        let now = harness::sync_now();
        let mode = [("lww-", false), ("op-", true)].into_iter().find(|(p, _)| name.starts_with(p));
        if let Some((_, operational)) = mode {
            let mut s = harness::sync_state_fixture(operational);
            s.handle_message(now, harness::SYNC_UNIX_MS, harness::sync_peer(), &bytes);
            let bad: Vec<_> = std::iter::from_fn(|| s.poll_event()).filter(|e| matches!(e, StateEvent::BadMessage { .. } | StateEvent::ClockSkew { .. })).collect();
            assert!(bad.is_empty(), "seed-{name}: {bad:?}");
            state += 1;
        } else {
            assert!(name.starts_with("crdt-"), "seed-{name}: neither lww-, op- nor crdt-");
            let mut c = harness::sync_crdt_fixture();
            c.handle_message(now, harness::sync_peer(), &bytes);
            let bad: Vec<_> = std::iter::from_fn(|| c.poll_event()).filter(|e| matches!(e, CrdtEvent::BadMessage { .. })).collect();
            assert!(bad.is_empty(), "seed-{name}: {bad:?}");
            crdt += 1;
        }
    }
    assert!(state >= 14 && crdt >= 6, "{state} state seeds, {crdt} CRDT seeds");
}

/// Writes the sync seeds (`harness::sync_seeds`) into `fuzz/corpus/sync`.
#[test]
#[ignore = "writes fuzz/corpus/sync/seed-*"]
fn write_sync_seeds() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/sync");
    std::fs::create_dir_all(&dir).expect("corpus dir");
    for (name, bytes) in harness::sync_seeds() {
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write");
    }
}

/// Found by the fuzzer: an update that decodes but that yrs refuses while integrating it
/// (`block parent ... must be deleted or shared ref type`). yrs does not roll back, so the
/// part integrated before the refusal stays (documented: `SyncWireError::BadUpdate`). What is
/// guaranteed: it is reported, nothing panics, two replicas given the same update hold the
/// same document afterwards, and the document goes on syncing.
#[test]
fn crdt_update_refused_while_integrating_is_reported_and_replicas_stay_alike() {
    use peerlink::sync::{CrdtEvent, SyncWireError};
    use peerlink::yrs::{ReadTxn, Transact};
    let data = base64_decode("A2RvYwABOwEDmpDvgtWL2AEABAEEdH4AAAE7AQOakO+C1YvYAQAEAQR0fgAAAAEBAQEBAQEBAPoBAXcFaGVsbG8A");
    let vector = |c: &peerlink::sync::CrdtSync| c.doc(harness::SYNC_DOC).expect("open").transact().state_vector();
    let update = |c: &peerlink::sync::CrdtSync| c.doc(harness::SYNC_DOC).expect("open").transact().encode_state_as_update_v1(&Default::default());
    let (mut a, mut b) = (harness::sync_crdt_fixture(), harness::sync_crdt_fixture());
    for c in [&mut a, &mut b] {
        c.handle_message(harness::sync_now(), harness::sync_peer(), &data);
        let bad: Vec<_> = std::iter::from_fn(|| c.poll_event()).filter(|e| matches!(e, CrdtEvent::BadMessage { .. })).collect();
        assert!(matches!(bad.as_slice(), [CrdtEvent::BadMessage { error: SyncWireError::BadUpdate { .. }, .. }]), "{bad:?}");
    }
    assert_eq!(vector(&a), vector(&b), "the same refused update leaves the same document");
    assert_eq!(update(&a), update(&b));
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(text).expect("base64")
}

#[test]
fn e2e_corpus() {
    replay("e2e", harness::e2e);
}

/// The e2e seeds (`harness::e2e_seeds`) are what their names say, so the fuzzer starts from
/// genuine messages: the fixtures' genuine answers and finishes complete the exchanges they
/// expect (and nothing else does), offers are answered, the stale exchange is refused, and
/// the genuine sealed message opens. Every seed also runs through the harness.
#[test]
fn e2e_seeds_are_what_they_say() {
    use peerlink::e2e::E2eError;
    let f = harness::e2e_fixtures();
    let fps = f.peers.each_ref().map(|p| p.fingerprint());
    assert!(fps[0] < f.me.fingerprint() && f.me.fingerprint() < fps[1]);
    let (mut exchange, mut decrypt) = (0, 0);
    for (name, bytes) in harness::e2e_seeds() {
        assert_eq!(seed("e2e", &name), bytes, "seed-{name} is stale: run `cargo test -p peerlink --test fuzz_corpus -- --ignored write_e2e_seeds`");
        harness::e2e(&bytes);
        if bytes[0] % 4 == harness::E2E_MODE_DECRYPT {
            decrypt += 1;
            continue;
        }
        exchange += 1;
        let msg = &bytes[1..];
        for k in [0, 1] {
            let (mut offered, mut answered) = (harness::e2e_offered(), harness::e2e_answered());
            let a = offered.handle_incoming_key_exchange(fps[k], msg);
            let b = answered.handle_incoming_key_exchange(fps[k], msg);
            assert_eq!(offered.has_session(&fps[k]), *msg == f.answers[k], "seed-{name} from peer {k}: {a:?}");
            assert_eq!(answered.has_session(&fps[k]), *msg == f.finishes[k], "seed-{name} from peer {k}: {b:?}");
            if name.contains("-offer-") {
                assert!(matches!(harness::e2e_idle().handle_incoming_key_exchange(fps[k], msg), Ok(Some(_))), "seed-{name}");
            }
            if name.contains("-stale-") {
                assert!(a.is_err() && b.is_err(), "seed-{name} from peer {k}: {a:?} {b:?}");
            }
        }
    }
    assert!(exchange >= 10 && decrypt >= 7, "{exchange} exchange seeds, {decrypt} decrypt seeds");
    // The glare rule: an offer from the greater peer to the offered manager is dropped.
    let offer = &seed("e2e", "x-offered-offer-1")[1..];
    assert!(matches!(harness::e2e_offered().handle_incoming_key_exchange(fps[1], offer), Err(E2eError::Unexpected(_))));
}

/// Writes the e2e seeds (`harness::e2e_seeds`) into `fuzz/corpus/e2e`.
#[test]
#[ignore = "writes fuzz/corpus/e2e/seed-*"]
fn write_e2e_seeds() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/e2e");
    std::fs::create_dir_all(&dir).expect("corpus dir");
    for (name, bytes) in harness::e2e_seeds() {
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write");
    }
}
