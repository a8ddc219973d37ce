use super::*;
use crate::identity::Identity;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

#[test]
fn hkdf_sha256_matches_rfc5869_case_1() {
    let ikm = [0x0b; 22];
    let salt = unhex("000102030405060708090a0b0c");
    let info = unhex("f0f1f2f3f4f5f6f7f8f9");
    let (prk, hk) = Hkdf::<Sha256>::extract(Some(&salt), &ikm);
    assert_eq!(prk.to_vec(), unhex("077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5"));
    let mut okm = [0u8; 42];
    hk.expand(&info, &mut okm).unwrap();
    assert_eq!(okm.to_vec(), unhex("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"));
}

fn pair(limits: Limits) -> (E2e, E2e, Fingerprint, Fingerprint) {
    let (a_fp, b_fp) = (Fingerprint::from_bytes([1; 32]), Fingerprint::from_bytes([2; 32]));
    let mut a = E2e::new(a_fp, &mut rng(1)).with_limits(limits);
    let mut b = E2e::new(b_fp, &mut rng(2)).with_limits(limits);
    let (pa, pb) = (*a.public_key(), *b.public_key());
    a.derive_key(b_fp, &pb).unwrap();
    b.derive_key(a_fp, &pa).unwrap();
    (a, b, a_fp, b_fp)
}

#[test]
fn both_sides_derive_the_same_keys_one_per_direction() {
    let (mut a, mut b, a_fp, b_fp) = pair(Limits::default());
    assert!(a.has_key(&b_fp) && b.has_key(&a_fp));
    let m = a.encrypt(&b_fp, b"secret", b"room").unwrap();
    assert_eq!(b.decrypt(&a_fp, &m, b"room").unwrap(), b"secret");
    let r = b.encrypt(&a_fp, b"reply", b"").unwrap();
    assert_eq!(a.decrypt(&b_fp, &r, b"").unwrap(), b"reply");
    // Directions have separate keys: a message sent back to its sender does not open.
    let m2 = a.encrypt(&b_fp, b"x", b"").unwrap();
    assert_eq!(a.decrypt(&b_fp, &m2, b""), Err(E2eError::Decrypt));
    // Counter nonces: the first messages of each direction have counter 0, 1, ...
    assert_eq!(&m[13..21], &0u64.to_be_bytes());
    assert_eq!(&m2[13..21], &1u64.to_be_bytes());
    assert!(a.remove_key(&b_fp));
    assert_eq!(a.encrypt(&b_fp, b"x", b""), Err(E2eError::NoKey(b_fp)));
    b.destroy();
    assert!(!b.has_key(&a_fp));
}

#[test]
fn bad_messages_get_typed_errors() {
    let (mut a, mut b, a_fp, b_fp) = pair(Limits::default());
    let m = a.encrypt(&b_fp, b"secret", b"aad").unwrap();
    // Tampered ciphertext, header or tag; other associated data.
    for i in [0usize, 5, 12, 20, HEADER_LEN, m.len() - 1] {
        let mut t = m.clone();
        t[i] ^= 1;
        let e = b.decrypt(&a_fp, &t, b"aad").unwrap_err();
        assert!(matches!(e, E2eError::Decrypt | E2eError::Version(_) | E2eError::WrongSession | E2eError::OldKey { .. }), "byte {i}: {e:?}");
    }
    assert_eq!(b.decrypt(&a_fp, &m, b"other"), Err(E2eError::Decrypt));
    assert_eq!(b.decrypt(&a_fp, &m[..10], b"aad"), Err(E2eError::Malformed("shorter than a header and a tag")));
    // Still opens once; then it is a replay.
    assert_eq!(b.decrypt(&a_fp, &m, b"aad").unwrap(), b"secret");
    assert_eq!(b.decrypt(&a_fp, &m, b"aad"), Err(E2eError::Replay { counter: 0 }));
    // From the wrong peer: a third party's session.
    let c_fp = Fingerprint::from_bytes([3; 32]);
    let mut c = E2e::new(c_fp, &mut rng(3));
    let pc = *c.public_key();
    c.derive_key(b_fp, b.public_key()).unwrap();
    b.derive_key(c_fp, &pc).unwrap();
    let from_c = c.encrypt(&b_fp, b"hi", b"").unwrap();
    assert_eq!(b.decrypt(&a_fp, &from_c, b""), Err(E2eError::WrongSession));
    assert_eq!(b.decrypt(&c_fp, &from_c, b"").unwrap(), b"hi");
    // Invalid points.
    assert_eq!(b.derive_key(a_fp, &[4; 65]), Err(E2eError::InvalidPoint));
    assert_eq!(b.derive_key(a_fp, &[0]), Err(E2eError::InvalidPoint));
}

#[test]
fn reordering_inside_the_window_is_accepted_and_older_is_refused() {
    let (mut a, mut b, a_fp, b_fp) = pair(Limits::default());
    let msgs: Vec<Vec<u8>> = (0..(REPLAY_WINDOW + 10)).map(|i| a.encrypt(&b_fp, &i.to_be_bytes(), b"").unwrap()).collect();
    // Newest first, then the rest backwards: all inside the window open, once.
    let last = msgs.len() - 1;
    assert!(b.decrypt(&a_fp, &msgs[last], b"").is_ok());
    for i in (last - REPLAY_WINDOW as usize + 1..last).rev() {
        assert_eq!(b.decrypt(&a_fp, &msgs[i], b"").unwrap(), (i as u64).to_be_bytes(), "message {i}");
    }
    assert_eq!(b.decrypt(&a_fp, &msgs[3], b""), Err(E2eError::TooOld { counter: 3 }));
    assert_eq!(b.decrypt(&a_fp, &msgs[last - 5], b""), Err(E2eError::Replay { counter: (last - 5) as u64 }));
}

#[test]
fn rekeying_across_the_limit_loses_nothing() {
    let (mut a, mut b, a_fp, b_fp) = pair(Limits::new(3, 1 << 30));
    let msgs: Vec<Vec<u8>> = (0..20u8).map(|i| a.encrypt(&b_fp, &[i], b"").unwrap()).collect();
    let epochs: Vec<u32> = msgs.iter().map(|m| u32::from_be_bytes(m[9..13].try_into().unwrap())).collect();
    assert_eq!(epochs, (0..20u32).map(|i| i / 3).collect::<Vec<_>>());
    // Counters restart with each key; nonces never repeat under one key.
    assert_eq!(&msgs[3][13..21], &0u64.to_be_bytes());
    // Delivered with a straggler from the previous epoch after the switch.
    let order = [0usize, 1, 3, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19];
    for &i in &order {
        assert_eq!(b.decrypt(&a_fp, &msgs[i], b"").unwrap(), [i as u8], "message {i}");
    }
    // A message two epochs back is from an old key.
    let e = b.decrypt(&a_fp, &msgs[1], b"").unwrap_err();
    assert!(matches!(e, E2eError::OldKey { epoch: 0, .. }), "{e:?}");
    // Bytes count too.
    let (mut c, mut d, c_fp, d_fp) = pair(Limits::new(1 << 40, 100));
    let big = [7u8; 60];
    let m1 = c.encrypt(&d_fp, &big, b"").unwrap();
    let m2 = c.encrypt(&d_fp, &big, b"").unwrap();
    assert_eq!((&m1[9..13], &m2[9..13]), (&[0, 0, 0, 0][..], &[0, 0, 0, 1][..]));
    assert!(d.decrypt(&c_fp, &m2, b"").is_ok() && d.decrypt(&c_fp, &m1, b"").is_ok());
}

// ---- the authenticated exchange ---------------------------------------------------------

fn manager(seed: u64) -> GroupKeyManager {
    GroupKeyManager::new(Identity::generate(&mut rng(seed)), seed + 100)
}

/// Runs a full exchange between two managers; returns the first three messages (the
/// confirm is delivered).
fn handshake(a: &mut GroupKeyManager, b: &mut GroupKeyManager) -> [Vec<u8>; 3] {
    let offer = a.exchange_with(b.fingerprint()).unwrap();
    let answer = b.handle_incoming_key_exchange(a.fingerprint(), &offer).unwrap().unwrap();
    let finish = a.handle_incoming_key_exchange(b.fingerprint(), &answer).unwrap().unwrap();
    assert!(!a.is_confirmed(&b.fingerprint()), "the initiator waits for the confirm");
    let confirm = b.handle_incoming_key_exchange(a.fingerprint(), &finish).unwrap().unwrap();
    assert_eq!(confirm.len(), exchange::CONFIRM_LEN);
    assert_eq!(a.handle_incoming_key_exchange(b.fingerprint(), &confirm).unwrap(), None);
    assert!(a.is_confirmed(&b.fingerprint()) && b.is_confirmed(&a.fingerprint()));
    [offer, answer, finish]
}

#[test]
fn lost_and_repeated_exchange_messages_leave_both_sides_with_the_same_keys() {
    let (mut a, mut b) = (manager(11), manager(12));
    let (af, bf) = (a.fingerprint(), b.fingerprint());
    let offer = a.exchange_with(bf).unwrap();
    assert_eq!(a.retransmission(&bf).as_deref(), Some(&offer[..]), "the offer goes again until answered");
    // The answer is lost; the offer comes again: the same answer, not a new exchange.
    let answer = b.handle_incoming_key_exchange(af, &offer).unwrap().unwrap();
    assert_eq!(b.retransmission(&af), None, "a responder waits");
    assert_eq!(b.handle_incoming_key_exchange(af, &offer).unwrap().unwrap(), answer);
    let finish = a.handle_incoming_key_exchange(bf, &answer).unwrap().unwrap();
    assert!(a.has_session(&bf) && !a.is_confirmed(&bf));
    assert_eq!(a.retransmission(&bf).as_deref(), Some(&finish[..]), "the finish goes again until confirmed");
    // A late duplicate answer changes nothing.
    assert!(matches!(a.handle_incoming_key_exchange(bf, &answer), Err(E2eError::Unexpected(_))));
    // The confirm is lost; the finish comes again: a fresh confirm for the same session.
    let lost = b.handle_incoming_key_exchange(af, &finish).unwrap().unwrap();
    let confirm = b.handle_incoming_key_exchange(af, &finish).unwrap().unwrap();
    assert_ne!(lost, confirm, "sealed under a new counter");
    let events: Vec<_> = std::iter::from_fn(|| b.poll_event()).collect();
    let id = b.session(&af).unwrap().id();
    assert_eq!(events, [KeyExchangeEvent::Established { peer: af, session: id }, KeyExchangeEvent::Confirmed { peer: af, session: id }]);
    a.handle_incoming_key_exchange(bf, &confirm).unwrap();
    assert!(a.is_confirmed(&bf) && a.retransmission(&bf).is_none());
    let events: Vec<_> = std::iter::from_fn(|| a.poll_event()).collect();
    assert_eq!(events, [KeyExchangeEvent::Established { peer: bf, session: id }, KeyExchangeEvent::Confirmed { peer: bf, session: id }]);
    // The other confirm, late: opens, changes nothing.
    assert_eq!(a.handle_incoming_key_exchange(bf, &lost).unwrap(), None);
    assert!(a.poll_event().is_none());
    // The completed offer replayed (by a server) is refused, and the session stays.
    assert_eq!(b.handle_incoming_key_exchange(af, &offer), Err(E2eError::Unexpected("a replayed offer")));
    assert!(!b.is_exchanging(&af));
    let m = a.encrypt_for_peer(&bf, b"still", b"").unwrap();
    assert_eq!(b.decrypt_from_peer(&af, &m, b"").unwrap(), b"still");
    // A forged confirm is refused; a confirm with no session too.
    let mut forged = confirm.clone();
    forged[30] ^= 1;
    assert!(a.handle_incoming_key_exchange(bf, &forged).is_err());
    let mut c = manager(13);
    assert_eq!(c.handle_incoming_key_exchange(af, &confirm), Err(E2eError::Unexpected("a confirm to no session")));
}

#[test]
fn any_message_from_the_responder_confirms_and_forks_are_independent_lanes() {
    let (mut a, mut b) = (manager(21), manager(22));
    let (af, bf) = (a.fingerprint(), b.fingerprint());
    let offer = a.exchange_with(bf).unwrap();
    let answer = b.handle_incoming_key_exchange(af, &offer).unwrap().unwrap();
    let finish = a.handle_incoming_key_exchange(bf, &answer).unwrap().unwrap();
    let _confirm_lost = b.handle_incoming_key_exchange(af, &finish).unwrap().unwrap();
    let m = b.encrypt_for_peer(&af, b"hello", b"room").unwrap();
    assert_eq!(a.decrypt_from_peer(&bf, &m, b"room").unwrap(), b"hello");
    assert!(a.is_confirmed(&bf));
    // Forks made on both sides at the same point talk to each other, and only to each other.
    let mut fa = a.session(&bf).unwrap().fork(b"xfer/1");
    let mut fb = b.session(&af).unwrap().fork(b"xfer/1");
    let mut other = b.session(&af).unwrap().fork(b"other");
    let sealed = fa.encrypt(b"chunk", b"");
    assert_eq!(fa.encrypt(b"x", b"")[13..21], 1u64.to_be_bytes(), "its own counters");
    assert_eq!(other.decrypt(&sealed, b""), Err(E2eError::Decrypt));
    assert_eq!(b.decrypt_from_peer(&af, &sealed, b""), Err(E2eError::Decrypt), "not in the parent's lane");
    assert_eq!(fb.decrypt(&sealed, b"").unwrap(), b"chunk");
    let back = fb.encrypt(b"ack", b"");
    assert_eq!(fa.decrypt(&back, b"").unwrap(), b"ack");
    // encrypt_into appends after what is there, the same message encrypt makes.
    let mut s1 = a.session(&bf).unwrap().fork(b"same");
    let mut s2 = a.session(&bf).unwrap().fork(b"same");
    let mut framed = vec![0xE2, 7];
    s1.encrypt_into(&mut framed, b"payload", b"aad");
    assert_eq!(framed[..2], [0xE2, 7]);
    assert_eq!(framed[2..], s2.encrypt(b"payload", b"aad")[..]);
    let long_aad = [9u8; 100];
    let mut s3 = b.session(&af).unwrap().fork(b"same");
    let mut out = Vec::new();
    s1.encrypt_into(&mut out, b"p", &long_aad);
    assert_eq!(s3.decrypt(&framed[2..], b"aad").unwrap(), b"payload");
    assert_eq!(s3.decrypt(&out, &long_aad).unwrap(), b"p");
}

#[test]
fn the_exchange_authenticates_both_sides_and_confirms_keys() {
    let (mut a, mut b) = (manager(1), manager(2));
    handshake(&mut a, &mut b);
    let (af, bf) = (a.fingerprint(), b.fingerprint());
    assert!(a.has_session(&bf) && b.has_session(&af));
    assert_eq!(a.session(&bf).unwrap().id(), b.session(&af).unwrap().id());
    assert!(matches!(a.poll_event(), Some(KeyExchangeEvent::Established { peer, .. }) if peer == bf));
    let m = a.encrypt_for_peer(&bf, b"{\"secret\":true}", b"").unwrap();
    assert_eq!(b.decrypt_from_peer(&af, &m, b"").unwrap(), b"{\"secret\":true}");
    // A new exchange replaces the session; the old one's messages are from an old key.
    handshake(&mut b, &mut a);
    let e = b.decrypt_from_peer(&af, &m, b"").unwrap_err();
    assert!(matches!(e, E2eError::OldKey { .. }), "{e:?}");
    let m2 = a.encrypt_for_peer(&bf, b"again", b"").unwrap();
    assert_eq!(b.decrypt_from_peer(&af, &m2, b"").unwrap(), b"again");
    // Leaving members are forgotten.
    a.remove_peer(&bf);
    assert_eq!(a.encrypt_for_peer(&bf, b"x", b""), Err(E2eError::NoKey(bf)));
    b.destroy();
    assert!(!b.has_session(&af));
}

#[test]
fn a_server_swapping_ephemeral_keys_is_caught_and_nothing_is_delivered() {
    let (mut a, mut b) = (manager(1), manager(2));
    let (af, bf) = (a.fingerprint(), b.fingerprint());
    // The server replaces the ephemeral key in the offer with its own.
    let mut mallory_rng = rng(66);
    let mallory = EphemeralKey::generate(&mut mallory_rng);
    let mut offer = a.exchange_with(bf).unwrap();
    offer[34..99].copy_from_slice(mallory.public());
    let answer = b.handle_incoming_key_exchange(af, &offer).unwrap().unwrap();
    // a sees the responder's signature over another key: refused, no session.
    let e = a.handle_incoming_key_exchange(bf, &answer).unwrap_err();
    assert!(matches!(e, E2eError::BadSignature(_)), "{e:?}");
    assert!(!a.has_session(&bf) && !b.has_session(&af));
    // The same the other way: the answer's key swapped.
    let (mut a, mut b) = (manager(3), manager(4));
    let (af, bf) = (a.fingerprint(), b.fingerprint());
    let offer = a.exchange_with(bf).unwrap();
    let mut answer = b.handle_incoming_key_exchange(af, &offer).unwrap().unwrap();
    answer[34..99].copy_from_slice(mallory.public());
    assert!(matches!(a.handle_incoming_key_exchange(bf, &answer), Err(E2eError::BadSignature(_))));
    assert_eq!(a.encrypt_for_peer(&bf, b"plaintext", b""), Err(E2eError::NoKey(bf)));
    // And a swapped finish cannot complete b's side.
    let (mut a, mut b) = (manager(5), manager(6));
    let (af, bf) = (a.fingerprint(), b.fingerprint());
    let offer = a.exchange_with(bf).unwrap();
    let answer = b.handle_incoming_key_exchange(af, &offer).unwrap().unwrap();
    let mut finish = a.handle_incoming_key_exchange(bf, &answer).unwrap().unwrap();
    let last = finish.len() - 1;
    finish[last] ^= 1;
    assert_eq!(b.handle_incoming_key_exchange(af, &finish), Err(E2eError::Confirmation));
    assert!(!b.has_session(&af));
}

#[test]
fn old_signatures_someone_elses_and_invalid_points_are_refused() {
    let (mut a, mut b, mut c) = (manager(1), manager(2), manager(3));
    let (af, bf, cf) = (a.fingerprint(), b.fingerprint(), c.fingerprint());
    // An answer from an earlier exchange, replayed to a new one: the nonce is not ours.
    let [_, old_answer, _] = handshake(&mut a, &mut b);
    let _fresh_offer = a.exchange_with(bf).unwrap();
    let e = a.handle_incoming_key_exchange(bf, &old_answer).unwrap_err();
    assert!(matches!(e, E2eError::BadSignature(_) | E2eError::Confirmation), "{e:?}");
    // c answers a's offer to b, as b: its identity key is not b's.
    let offer = a.exchange_with(bf).unwrap();
    let c_answer = c.handle_incoming_key_exchange(af, &offer).unwrap().unwrap();
    assert_eq!(a.handle_incoming_key_exchange(bf, &c_answer), Err(E2eError::WrongPeer { expected: bf }));
    // c's honest exchange with a cannot be passed off as b's.
    let c_offer = c.exchange_with(af).unwrap();
    let a_answer = a.handle_incoming_key_exchange(cf, &c_offer).unwrap().unwrap();
    let c_finish = c.handle_incoming_key_exchange(af, &a_answer).unwrap().unwrap();
    let b_offer = b.exchange_with(af).unwrap();
    let _ = a.handle_incoming_key_exchange(bf, &b_offer).unwrap();
    assert_eq!(a.handle_incoming_key_exchange(bf, &c_finish), Err(E2eError::WrongPeer { expected: bf }));
    // An invalid point in an offer; garbage; a wrong version; an answer to nothing.
    let mut bad = a.exchange_with(cf).unwrap();
    bad[34..99].copy_from_slice(&[4; 65]);
    assert_eq!(c.handle_incoming_key_exchange(af, &bad), Err(E2eError::InvalidPoint));
    assert_eq!(c.handle_incoming_key_exchange(af, &[1]), Err(E2eError::Malformed("not a key exchange message")));
    assert_eq!(c.handle_incoming_key_exchange(af, &[9, 1]), Err(E2eError::Version(9)));
    assert_eq!(c.handle_incoming_key_exchange(af, &bad[..50]), Err(E2eError::Malformed("wrong length")));
    let mut d = manager(4);
    assert_eq!(d.handle_incoming_key_exchange(af, &c_answer), Err(E2eError::Unexpected("an answer to no offer")));
}

#[test]
fn simultaneous_offers_resolve_to_one_session() {
    let (mut a, mut b) = (manager(1), manager(2));
    let (af, bf) = (a.fingerprint(), b.fingerprint());
    let oa = a.exchange_with(bf).unwrap();
    let ob = b.exchange_with(af).unwrap();
    let ra = a.handle_incoming_key_exchange(bf, &ob);
    let rb = b.handle_incoming_key_exchange(af, &oa);
    // Exactly one side answers; the other's offer is dropped.
    let (answerer_reply, initiator, responder, init_fp, resp_fp) = match (ra, rb) {
        (Ok(Some(ans)), Err(E2eError::Unexpected(_))) => (ans, &mut b, &mut a, bf, af),
        (Err(E2eError::Unexpected(_)), Ok(Some(ans))) => (ans, &mut a, &mut b, af, bf),
        other => panic!("{other:?}"),
    };
    let finish = initiator.handle_incoming_key_exchange(resp_fp, &answerer_reply).unwrap().unwrap();
    responder.handle_incoming_key_exchange(init_fp, &finish).unwrap();
    assert!(initiator.has_session(&resp_fp) && responder.has_session(&init_fp));
}

#[test]
fn after_an_epoch_jump_the_epoch_just_before_still_opens() {
    // Found by the fuzzer: two messages per key, epoch 3 arrives before anything of epoch 2.
    let (mut a, mut b, a_fp, b_fp) = pair(Limits::new(2, 1 << 30));
    let msgs: Vec<Vec<u8>> = (0..8u8).map(|i| a.encrypt(&b_fp, &[i], b"").unwrap()).collect();
    for i in [1usize, 0, 3, 2, 6, 4, 5, 7] {
        assert_eq!(b.decrypt(&a_fp, &msgs[i], b"").unwrap(), [i as u8], "message {i}");
    }
    assert_eq!(b.decrypt(&a_fp, &msgs[4], b""), Err(E2eError::Replay { counter: 0 }));
}

#[test]
fn deriving_again_never_repeats_keys_and_nonces() {
    let (mut a, mut b, a_fp, b_fp) = pair(Limits::default());
    let first = a.encrypt(&b_fp, b"one", b"").unwrap();
    // A replayed announcement of the same key: nothing changes, the counter goes on.
    let pb = *b.public_key();
    a.derive_key(b_fp, &pb).unwrap();
    let second = a.encrypt(&b_fp, b"two", b"").unwrap();
    assert_eq!(&second[13..21], &1u64.to_be_bytes());
    assert_eq!(b.decrypt(&a_fp, &first, b"").unwrap(), b"one");
    assert_eq!(b.decrypt(&a_fp, &second, b"").unwrap(), b"two");
    // After removing the session, the same key would give the same keys: refused.
    a.remove_key(&b_fp);
    assert_eq!(a.derive_key(b_fp, &pb), Err(E2eError::KeyReused));
}

