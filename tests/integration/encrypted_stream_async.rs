//! The encrypted NDJSON stream on the async adapters (smol, tokio, and a tokio dialer with a
//! smol acceptor) over real TCP on 127.0.0.1, through a proxy that cuts the connection twice
//! mid-stream: the dialer reconnects on its backoff schedule, both sides resume the session,
//! and every message arrives once, in order, both ways.
//!
//! Every wait for an event is cut off after 100 ms and started again, so these scenarios also
//! check that `next_event` is cancel-safe.

use std::future::Future;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures_lite::FutureExt;
use peerlink::e2e::stream::{StreamConfig, StreamError, StreamEvent};
use peerlink::{Fingerprint, Identity};
use peerlink_tests::{CutProxy, identity};
use serde_json::{Value, json};

const N: u64 = 200;
/// Most messages the dialer lets wait for acknowledgement.
const WINDOW: usize = 64;
const DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

fn config() -> StreamConfig {
    let mut c = StreamConfig::default();
    c.initial_backoff = Duration::from_millis(50);
    c.max_backoff = Duration::from_millis(200);
    c
}

/// What the scenario needs from either adapter's stream.
trait Endpoint: Send {
    fn send(&mut self, value: &Value) -> Result<u64, StreamError>;
    fn unacked(&self) -> usize;
    /// Returns the next event, or `None` when `max` passes first (dropping `next_event`).
    fn next_within(&mut self, max: Duration) -> impl Future<Output = Option<StreamEvent>> + Send;
}

impl Endpoint for peerlink_smol::stream::EncryptedTcp {
    fn send(&mut self, value: &Value) -> Result<u64, StreamError> {
        peerlink_smol::stream::EncryptedTcp::send(self, value)
    }
    fn unacked(&self) -> usize {
        self.core().unacked().0
    }
    async fn next_within(&mut self, max: Duration) -> Option<StreamEvent> {
        let timeout = async {
            smol::Timer::after(max).await;
            None
        };
        async { Some(self.next_event().await.expect("next_event")) }.or(timeout).await
    }
}

impl Endpoint for peerlink_tokio::stream::EncryptedTcp {
    fn send(&mut self, value: &Value) -> Result<u64, StreamError> {
        peerlink_tokio::stream::EncryptedTcp::send(self, value)
    }
    fn unacked(&self) -> usize {
        self.core().unacked().0
    }
    async fn next_within(&mut self, max: Duration) -> Option<StreamEvent> {
        let event = tokio::time::timeout(max, self.next_event()).await.ok()?;
        Some(event.expect("next_event"))
    }
}

/// What one side saw.
#[derive(Default)]
struct Seen {
    /// The numbers in the messages it received, in order.
    numbers: Vec<u64>,
    established: usize,
    resumed: usize,
}

impl Seen {
    /// Counts `event`; returns the number in a message.
    fn note(&mut self, side: &str, event: Option<StreamEvent>, key: &str) -> Option<u64> {
        match event? {
            StreamEvent::Message(v) => {
                let n = v[key].as_u64().expect("a numbered message");
                self.numbers.push(n);
                Some(n)
            }
            StreamEvent::Established { .. } => {
                self.established += 1;
                None
            }
            StreamEvent::Resumed { .. } => {
                self.resumed += 1;
                None
            }
            StreamEvent::Error(e) => panic!("{side}: stream error: {e}"),
            _ => None,
        }
    }
}

/// Sends `N` numbered messages (at most [`WINDOW`] unacknowledged), cutting the proxy after
/// a third and two thirds of them, until every echo is back.
async fn dialer(mut a: impl Endpoint, proxy: &CutProxy) -> Seen {
    let deadline = Instant::now() + DEADLINE;
    let mut seen = Seen::default();
    let mut sent = 0u64;
    while (seen.numbers.len() as u64) < N {
        assert!(Instant::now() < deadline, "a got {} echoes of {N}", seen.numbers.len());
        while sent < N && a.unacked() < WINDOW {
            sent += 1;
            a.send(&json!({ "n": sent })).unwrap();
            if sent == N / 3 || sent == 2 * N / 3 {
                proxy.cut();
            }
        }
        let event = a.next_within(POLL).await;
        seen.note("a", event, "echo");
    }
    // b acknowledged each message before echoing it, on the same connection.
    assert_eq!(a.unacked(), 0, "a: every message acknowledged");
    seen
}

/// Echoes every message until `N` came, then waits (briefly) for the echoes' acknowledgements.
async fn acceptor(mut b: impl Endpoint) -> Seen {
    let deadline = Instant::now() + DEADLINE;
    let mut seen = Seen::default();
    while (seen.numbers.len() as u64) < N {
        assert!(Instant::now() < deadline, "b got {} of {N}", seen.numbers.len());
        let event = b.next_within(POLL).await;
        if let Some(n) = seen.note("b", event, "n") {
            b.send(&json!({ "echo": n })).unwrap();
        }
    }
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until && b.unacked() > 0 {
        let _ = b.next_within(Duration::from_millis(50)).await;
    }
    seen
}

fn check(a: Seen, b: Seen) {
    let all: Vec<u64> = (1..=N).collect();
    assert_eq!(b.numbers, all, "b: exactly once, in order");
    assert_eq!(a.numbers, all, "a: exactly once, in order");
    assert_eq!((a.established, b.established), (1, 1), "one key exchange");
    assert!(a.resumed >= 1 && b.resumed >= 1, "the session resumed after the cuts ({} {})", a.resumed, b.resumed);
}

/// Starts a smol acceptor, on a thread of its own, behind a proxy.
fn smol_acceptor(id: Identity, peer: Fingerprint) -> (CutProxy, JoinHandle<Seen>) {
    let listener = smol::block_on(smol::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let proxy = CutProxy::start(listener.local_addr().unwrap());
    let b = peerlink_smol::stream::EncryptedTcp::accept(listener, id, peer, config()).unwrap();
    (proxy, std::thread::spawn(move || smol::block_on(acceptor(b))))
}

fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn smol_messages_survive_two_cuts_exactly_once_in_order_both_ways() {
    let (a_id, b_id) = (identity(81), identity(82));
    let b_fp = b_id.fingerprint();
    let (proxy, b) = smol_acceptor(b_id, a_id.fingerprint());
    let a = peerlink_smol::stream::EncryptedTcp::connect(proxy.addr(), a_id, b_fp, config());
    check(smol::block_on(dialer(a, &proxy)), b.join().unwrap());
}

#[test]
fn tokio_messages_survive_two_cuts_exactly_once_in_order_both_ways() {
    use peerlink_tokio::stream::EncryptedTcp;
    let (a_id, b_id) = (identity(83), identity(84));
    let (a_fp, b_fp) = (a_id.fingerprint(), b_id.fingerprint());
    tokio_runtime().block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = CutProxy::start(listener.local_addr().unwrap());
        let b = tokio::spawn(acceptor(EncryptedTcp::accept(listener, b_id, a_fp, config()).unwrap()));
        let a = dialer(EncryptedTcp::connect(proxy.addr(), a_id, b_fp, config()), &proxy).await;
        check(a, b.await.unwrap());
    });
}

#[test]
fn tokio_dialer_and_smol_acceptor_interoperate_across_cuts() {
    let (a_id, b_id) = (identity(85), identity(86));
    let b_fp = b_id.fingerprint();
    let (proxy, b) = smol_acceptor(b_id, a_id.fingerprint());
    let a = peerlink_tokio::stream::EncryptedTcp::connect(proxy.addr(), a_id, b_fp, config());
    check(tokio_runtime().block_on(dialer(a, &proxy)), b.join().unwrap());
}

#[test]
fn a_dialer_started_before_the_listener_connects_once_it_is_up() {
    use peerlink_tokio::stream::EncryptedTcp;
    let (a_id, b_id) = (identity(87), identity(88));
    let (a_fp, b_fp) = (a_id.fingerprint(), b_id.fingerprint());
    tokio_runtime().block_on(async {
        // A free port, with nobody listening on it yet: the first dials are refused.
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let mut a = EncryptedTcp::connect(addr, a_id, b_fp, config());
        let refused = async {
            let mut reconnects = 0;
            while reconnects < 2 {
                if let Some(StreamEvent::Reconnect { .. }) = a.next_within(POLL).await {
                    reconnects += 1;
                }
            }
        };
        tokio::time::timeout(DEADLINE, refused).await.expect("the dialer keeps dialing after a refused first dial");
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let mut b = EncryptedTcp::accept(listener, b_id, a_fp, config()).unwrap();
        a.send(&json!({ "n": 1 })).unwrap();
        let got = async {
            loop {
                tokio::select! {
                    Some(StreamEvent::Message(v)) = b.next_within(POLL) => return v,
                    _ = a.next_within(POLL) => {}
                }
            }
        };
        assert_eq!(tokio::time::timeout(DEADLINE, got).await.unwrap(), json!({ "n": 1 }));
        // The dialer goes away: the acceptor sees the drop and waits, with no schedule.
        drop(a);
        let mut events = vec![];
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            events.extend(b.next_within(Duration::from_millis(50)).await);
        }
        assert!(events.contains(&StreamEvent::Disconnected), "{events:?}");
        assert!(!events.iter().any(|e| matches!(e, StreamEvent::Reconnect { .. } | StreamEvent::GaveUp)), "an acceptor has no schedule: {events:?}");
    });
}

#[test]
fn a_dialer_that_gives_up_says_so_and_then_fails_with_not_connected() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut c = config();
    c.max_attempts = Some(2);
    let mut a = peerlink_smol::stream::EncryptedTcp::connect(addr, identity(89), identity(90).fingerprint(), c);
    let events = smol::block_on(async {
        let mut events = vec![];
        let deadline = Instant::now() + DEADLINE;
        loop {
            assert!(Instant::now() < deadline, "{events:?}");
            match a.next_event().await {
                Ok(event) => events.push(event),
                Err(e) => return (events, e.kind()),
            }
        }
    });
    // Nothing was ever connected: no Disconnected, the failed first dial starts the schedule.
    let expected = vec![StreamEvent::Reconnect { attempt: 1 }, StreamEvent::Reconnect { attempt: 2 }, StreamEvent::GaveUp];
    assert_eq!(events, (expected, std::io::ErrorKind::NotConnected));
    assert_eq!(a.send(&json!(1)), Err(StreamError::Closed));
}
