//! End-to-end encryption throughput in core, no sockets (harness = false, plain std timing).
//!
//! - **seal / open**: 16 KiB messages through a `Session` pair derived with `E2e::derive_key`
//!   on both sides (header, counter nonce, replay window, associated data): `E2e::encrypt`
//!   alone, `E2e::decrypt` alone (of messages sealed untimed, in batches of `BATCH`, by a
//!   fresh pair each run so the replay window starts empty), and both in turn. Baseline in the
//!   same run: raw AES-256-GCM (ring's `LessSafeKey`, the implementation the sessions use)
//!   seal and open of copies of the same buffers with a counter nonce (no header, no replay
//!   window, no associated data).
//! - **handshakes**: full offer / answer / finish between two `GroupKeyManager`s (two
//!   ephemeral key pairs, two ECDH, two signatures and two verifications, the key schedule and
//!   key confirmation on both sides).
//!
//! Best of `RUNS` runs of at least `MIN_RUN` each. Run: `cargo bench -p peerlink --bench e2e`.
//! Env: `E2E_RUNS` (default 5), `E2E_MIN_MS` (default 1000).

use std::hint::black_box;
use std::time::{Duration, Instant};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use peerlink::Fingerprint;
use peerlink::e2e::{E2e, GroupKeyManager};
use peerlink::identity::Identity;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

const MSG: usize = 16 * 1024;
const BATCH: usize = 256;
const AAD: &[u8] = b"room/bench";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn fp(b: u8) -> Fingerprint {
    Fingerprint::from_bytes([b; 32])
}

/// Two `E2e`s with a session with each other: `(a, b, a's fingerprint, b's)`.
fn pair(seed: u64) -> (E2e, E2e, Fingerprint, Fingerprint) {
    let (af, bf) = (fp(1), fp(2));
    let mut a = E2e::new(af, &mut ChaCha20Rng::seed_from_u64(seed));
    let mut b = E2e::new(bf, &mut ChaCha20Rng::seed_from_u64(seed + 1));
    let (pa, pb) = (*a.public_key(), *b.public_key());
    a.derive_key(bf, &pb).expect("derive");
    b.derive_key(af, &pa).expect("derive");
    (a, b, af, bf)
}

/// A run: calls `step` (which does some work and returns the time and the messages it
/// counts) until `min` of counted time; returns messages per second.
fn run(min: Duration, mut step: impl FnMut() -> (Duration, u64)) -> f64 {
    let (mut spent, mut n) = (Duration::ZERO, 0u64);
    while spent < min {
        let (d, k) = step();
        spent += d;
        n += k;
    }
    n as f64 / spent.as_secs_f64()
}

fn best(runs: u64, mut f: impl FnMut() -> f64) -> f64 {
    (0..runs).map(|_| f()).fold(0.0, f64::max)
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Raw seal into a new buffer (as `encrypt` returns one).
fn seal_raw(key: &LessSafeKey, counter: u64, plain: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(plain.len() + 16);
    m.extend_from_slice(plain);
    key.seal_in_place_append_tag(nonce(counter), Aad::empty(), &mut m).expect("seal");
    m
}

/// Raw open into a new buffer (as `decrypt` returns one).
fn open_raw(key: &LessSafeKey, counter: u64, m: &[u8]) -> Vec<u8> {
    let mut buf = m.to_vec();
    let len = key.open_in_place(nonce(counter), Aad::empty(), &mut buf).expect("open").len();
    buf.truncate(len);
    buf
}

fn main() {
    let runs = env_or("E2E_RUNS", 5).max(1);
    let min = Duration::from_millis(env_or("E2E_MIN_MS", 1000));
    let plain: Vec<u8> = (0..MSG).map(|i| (i * 31 % 251) as u8).collect();

    // Correctness first: what is measured really round-trips.
    let (mut a, mut b, af, bf) = pair(1);
    let m = a.encrypt(&bf, &plain, AAD).expect("seal");
    assert_eq!(m.len(), MSG + peerlink::e2e::HEADER_LEN + peerlink::e2e::TAG_LEN);
    assert_eq!(b.decrypt(&af, &m, AAD).expect("open"), plain);

    // Seal alone: one pair, sealing on (counters go up; no rekey below 2^24 messages).
    let (mut a, _, _, bf) = pair(10);
    let seal = best(runs, || {
        run(min, || {
            let t = Instant::now();
            for _ in 0..BATCH {
                black_box(a.encrypt(&bf, black_box(&plain), AAD).expect("seal"));
            }
            (t.elapsed(), BATCH as u64)
        })
    });

    // Open alone: a fresh pair per run; each batch is sealed untimed, then opened.
    let mut seed = 100;
    let open = best(runs, || {
        seed += 2;
        let (mut a, mut b, af, bf) = pair(seed);
        run(min, || {
            let batch: Vec<Vec<u8>> = (0..BATCH).map(|_| a.encrypt(&bf, &plain, AAD).expect("seal")).collect();
            let t = Instant::now();
            for m in &batch {
                black_box(b.decrypt(&af, black_box(m), AAD).expect("open"));
            }
            (t.elapsed(), BATCH as u64)
        })
    });

    // Both in turn: seal, open, seal, open...
    let both = best(runs, || {
        seed += 2;
        let (mut a, mut b, af, bf) = pair(seed);
        run(min, || {
            let t = Instant::now();
            for _ in 0..BATCH {
                let m = a.encrypt(&bf, black_box(&plain), AAD).expect("seal");
                black_box(b.decrypt(&af, &m, AAD).expect("open"));
            }
            (t.elapsed(), BATCH as u64)
        })
    });

    // Baseline: raw AES-256-GCM, counter nonce, no header, no window, no associated data.
    let cipher = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).expect("a key"));
    let mut counter = 0u64;
    let raw_seal = best(runs, || {
        run(min, || {
            let t = Instant::now();
            for _ in 0..BATCH {
                counter += 1;
                black_box(seal_raw(&cipher, counter, black_box(&plain)));
            }
            (t.elapsed(), BATCH as u64)
        })
    });
    let raw_open = best(runs, || {
        run(min, || {
            let first = counter;
            let batch: Vec<Vec<u8>> = (0..BATCH)
                .map(|_| {
                    counter += 1;
                    seal_raw(&cipher, counter, &plain)
                })
                .collect();
            let t = Instant::now();
            for (i, m) in batch.iter().enumerate() {
                black_box(open_raw(&cipher, first + 1 + i as u64, black_box(m)));
            }
            (t.elapsed(), BATCH as u64)
        })
    });
    let raw_both = best(runs, || {
        run(min, || {
            let t = Instant::now();
            for _ in 0..BATCH {
                counter += 1;
                let m = seal_raw(&cipher, counter, black_box(&plain));
                black_box(open_raw(&cipher, counter, &m));
            }
            (t.elapsed(), BATCH as u64)
        })
    });

    // Handshakes: the same two managers, exchange after exchange (each replaces the session).
    let mut x = GroupKeyManager::new(Identity::generate(&mut ChaCha20Rng::seed_from_u64(1)), 11);
    let mut y = GroupKeyManager::new(Identity::generate(&mut ChaCha20Rng::seed_from_u64(2)), 12);
    let (xf, yf) = (x.fingerprint(), y.fingerprint());
    let handshakes = best(runs, || {
        run(min, || {
            let t = Instant::now();
            for _ in 0..16 {
                let offer = x.exchange_with(yf).expect("offer");
                let answer = y.handle_incoming_key_exchange(xf, &offer).expect("answer").expect("an answer");
                let finish = x.handle_incoming_key_exchange(yf, &answer).expect("finish").expect("a finish");
                let confirm = y.handle_incoming_key_exchange(xf, &finish).expect("finished").expect("a confirm");
                assert_eq!(x.handle_incoming_key_exchange(yf, &confirm).expect("confirmed"), None);
                while x.poll_event().is_some() {}
                while y.poll_event().is_some() {}
            }
            (t.elapsed(), 16)
        })
    });
    assert!(x.has_session(&yf) && y.has_session(&xf));

    let mbs = |per_sec: f64| per_sec * MSG as f64 / 1e6;
    println!("e2e: {} KiB messages, best of {runs} runs of >= {} ms", MSG / 1024, min.as_millis());
    println!(
        "  seal:        {:>8.1} MB/s   baseline raw AES-256-GCM {:>8.1} MB/s   ratio {:.2}",
        mbs(seal),
        mbs(raw_seal),
        seal / raw_seal
    );
    println!(
        "  open:        {:>8.1} MB/s   baseline raw AES-256-GCM {:>8.1} MB/s   ratio {:.2}",
        mbs(open),
        mbs(raw_open),
        open / raw_open
    );
    println!(
        "  seal + open: {:>8.1} MB/s   baseline raw AES-256-GCM {:>8.1} MB/s   ratio {:.2}",
        mbs(both),
        mbs(raw_both),
        both / raw_both
    );
    println!("  handshakes:  {handshakes:>8.0}/s (offer, answer, finish, confirm between two GroupKeyManagers)");
}
