//! The sans-IO TURN client against a real coturn on 127.0.0.1: two clients allocate, permit each
//! other's relayed address and exchange data through the relay, first in Send/Data indications
//! and then over bound channels; a wrong password is a typed `Unauthorized`; an allocation
//! shorter than the test is refreshed and keeps relaying after its first lifetime has passed.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use peerlink::turn::codec::{self, is_channel_data};
use peerlink::turn::{TurnClient, TurnConfig, TurnCredentials, TurnError, TurnEvent};
use peerlink_tests::WAIT;
use peerlink_tests::coturn::Coturn;

/// coturn with long-term credentials u:p in realm r, relaying on loopback.
fn coturn(extra: &[&str]) -> Coturn {
    let mut args = vec!["--relay-ip=127.0.0.1", "--lt-cred-mech", "--user=u:p", "--realm=r", "--allow-loopback-peers", "--fingerprint"];
    args.extend_from_slice(extra);
    Coturn::start(&args)
}

/// A TURN client on its own UDP socket, and what came out of it.
struct Side {
    client: TurnClient,
    socket: UdpSocket,
    events: Vec<TurnEvent>,
    received: Vec<(SocketAddr, Vec<u8>)>,
    sent_channel_data: usize,
    received_channel_data: usize,
    /// 438 Stale Nonce answers seen.
    stale_nonces: usize,
}

impl Side {
    fn new(server: SocketAddr, password: &str, config: TurnConfig, seed: u64) -> Side {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(2))).unwrap();
        let credentials = TurnCredentials { username: "u".into(), password: password.into() };
        let client = TurnClient::new(server, socket.local_addr().unwrap(), credentials, config, seed, Instant::now());
        Side { client, socket, events: Vec::new(), received: Vec::new(), sent_channel_data: 0, received_channel_data: 0, stale_nonces: 0 }
    }

    /// One round of the drain contract: send, read what arrived, run due timers, collect events.
    fn step(&mut self) {
        while let Some(d) = self.client.poll_transmit() {
            assert_eq!(d.source, self.socket.local_addr().unwrap());
            self.sent_channel_data += usize::from(is_channel_data(&d.contents));
            self.socket.send_to(&d.contents, d.destination).unwrap();
        }
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = self.socket.recv_from(&mut buf) {
            assert!(self.client.is_from_server(from), "only the server talks to us");
            if let Ok(m) = codec::decode(&buf[..n]) {
                self.stale_nonces += usize::from(m.error.is_some_and(|(code, _)| code == 438));
            }
            if let Some((peer, data)) = self.client.handle_datagram(Instant::now(), from, &buf[..n]) {
                self.received_channel_data += usize::from(is_channel_data(&buf[..n]));
                self.received.push((peer, data.to_vec()));
            }
        }
        if self.client.poll_timeout().is_some_and(|t| t <= Instant::now()) {
            self.client.handle_timeout(Instant::now());
        }
        self.events.extend(std::iter::from_fn(|| self.client.poll_event()));
    }
}

/// Steps every side until `done` holds, failing after `limit`.
fn run_until(sides: &mut [&mut Side], limit: Duration, what: &str, mut done: impl FnMut(&[&mut Side]) -> bool) {
    let deadline = Instant::now() + limit;
    while !done(sides) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        for side in sides.iter_mut() {
            side.step();
        }
    }
}

fn allocated(side: &Side) -> Option<(SocketAddr, Duration)> {
    side.events.iter().find_map(|e| match e {
        TurnEvent::Allocated { relayed, lifetime, .. } => Some((*relayed, *lifetime)),
        _ => None,
    })
}

fn has(side: &Side, event: &TurnEvent) -> bool {
    side.events.contains(event)
}

/// Both allocate, then each permits the other's relayed address; returns the relayed addresses.
fn allocate_and_permit(a: &mut Side, b: &mut Side) -> (SocketAddr, SocketAddr) {
    run_until(&mut [a, b], WAIT, "both allocations", |s| s.iter().all(|s| allocated(s).is_some()));
    let (ra, rb) = (allocated(a).unwrap().0, allocated(b).unwrap().0);
    assert_ne!(ra, rb);
    assert_eq!(a.client.relayed(), Some(ra));
    let now = Instant::now();
    a.client.create_permission(now, rb.ip()).unwrap();
    b.client.create_permission(now, ra.ip()).unwrap();
    run_until(&mut [a, b], WAIT, "both permissions", |s| {
        has(s[0], &TurnEvent::PermissionCreated { peer: rb.ip() }) && has(s[1], &TurnEvent::PermissionCreated { peer: ra.ip() })
    });
    (ra, rb)
}

/// Sends one message each way and waits for both to arrive from the right relayed address.
fn exchange(a: &mut Side, b: &mut Side, ra: SocketAddr, rb: SocketAddr, tag: &str) {
    let (to_b, to_a) = (format!("{tag}: a to b").into_bytes(), format!("{tag}: b to a").into_bytes());
    a.client.send_to(Instant::now(), rb, &to_b).unwrap();
    b.client.send_to(Instant::now(), ra, &to_a).unwrap();
    run_until(&mut [a, b], WAIT, tag, |s| s[1].received.contains(&(ra, to_b.clone())) && s[0].received.contains(&(rb, to_a.clone())));
}

#[test]
fn two_clients_relay_through_coturn_in_indications_then_channels() {
    let server = coturn(&[]);
    let mut a = Side::new(server.addr(), "p", TurnConfig::default(), 1);
    let mut b = Side::new(server.addr(), "p", TurnConfig::default(), 2);
    let (ra, rb) = allocate_and_permit(&mut a, &mut b);

    exchange(&mut a, &mut b, ra, rb, "indications");
    assert_eq!((a.sent_channel_data, b.received_channel_data), (0, 0), "no channel yet: Send and Data indications");

    let now = Instant::now();
    let ca = a.client.bind_channel(now, rb).unwrap();
    let cb = b.client.bind_channel(now, ra).unwrap();
    run_until(&mut [&mut a, &mut b], WAIT, "both channels", |s| {
        has(s[0], &TurnEvent::ChannelBound { peer: rb, channel: ca }) && has(s[1], &TurnEvent::ChannelBound { peer: ra, channel: cb })
    });
    exchange(&mut a, &mut b, ra, rb, "channels");
    assert_eq!((a.sent_channel_data, b.sent_channel_data), (1, 1), "each sent its message as ChannelData");
    assert_eq!((a.received_channel_data, b.received_channel_data), (1, 1), "coturn relays to a peer with a channel in ChannelData");

    // Releasing: both get Closed, and coturn no longer relays to the released address.
    a.client.close(Instant::now());
    b.client.close(Instant::now());
    run_until(&mut [&mut a, &mut b], WAIT, "both closed", |s| s.iter().all(|s| has(s, &TurnEvent::Closed)));
    assert_eq!(a.client.send_to(Instant::now(), rb, b"late"), Err(TurnError::Closed));
    assert!(a.events.iter().chain(&b.events).all(|e| !matches!(e, TurnEvent::Failed { .. })), "{:?} {:?}", a.events, b.events);
}

#[test]
fn a_wrong_password_is_unauthorized() {
    let server = coturn(&[]);
    let mut side = Side::new(server.addr(), "not-p", TurnConfig::default(), 3);
    run_until(&mut [&mut side], WAIT, "a failure", |s| s[0].events.iter().any(|e| matches!(e, TurnEvent::Failed { .. })));
    assert_eq!(side.events, [TurnEvent::Failed { error: TurnError::Unauthorized }]);
    assert_eq!(side.client.poll_timeout(), None);
}

#[test]
fn a_short_allocation_is_refreshed_and_keeps_relaying() {
    // coturn grants at most 10 s and keeps permissions 6 s, and its nonces go stale after 4 s,
    // so refreshes meet 438 Stale Nonce and retry with the new nonce. (coturn applies
    // --max-allocate-lifetime to Allocate only: the refresh comes back with its default.)
    let server = coturn(&["--max-allocate-lifetime=10", "--permission-lifetime=6", "--stale-nonce=4"]);
    let mut config = TurnConfig::default();
    config.lifetime = Some(Duration::from_secs(10));
    config.permission_refresh = Duration::from_secs(3);
    let mut a = Side::new(server.addr(), "p", config.clone(), 4);
    let mut b = Side::new(server.addr(), "p", config, 5);
    let (ra, rb) = allocate_and_permit(&mut a, &mut b);
    let (_, lifetime) = allocated(&a).unwrap();
    assert_eq!(lifetime, Duration::from_secs(10), "what coturn granted");
    let first_expiry = Instant::now() + lifetime;

    // The first lifetime and two more permission lifetimes pass with a message each way every
    // second (which keeps the permissions in use); every one arrives.
    let mut sent = 0;
    while Instant::now() < first_expiry + Duration::from_secs(2) {
        let tick = Instant::now() + Duration::from_secs(1);
        run_until(&mut [&mut a, &mut b], WAIT, "a second", |_| Instant::now() >= tick);
        a.client.send_to(Instant::now(), rb, format!("ping {sent}").as_bytes()).unwrap();
        b.client.send_to(Instant::now(), ra, format!("ping {sent}").as_bytes()).unwrap();
        sent += 1;
    }
    run_until(&mut [&mut a, &mut b], WAIT, "every ping", |s| s.iter().all(|s| s.received.len() == sent));
    for side in [&a, &b] {
        assert!(side.events.iter().any(|e| matches!(e, TurnEvent::Refreshed { .. })), "{:?}", side.events);
        assert!(side.client.expires().unwrap() > first_expiry, "the allocation outlives its first lifetime");
        assert!(side.stale_nonces > 0, "coturn's nonces went stale and the client moved on");
        assert!(
            side.events.iter().all(|e| !matches!(e, TurnEvent::Failed { .. } | TurnEvent::PermissionFailed { .. } | TurnEvent::PermissionExpired { .. })),
            "{:?}",
            side.events
        );
    }
    exchange(&mut a, &mut b, ra, rb, "after the first lifetime");
}
