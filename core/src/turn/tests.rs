//! The TURN client against a scripted server, in virtual time.

use super::*;

const SERVER: &str = "192.0.2.10:3478";
const LOCAL: &str = "10.0.0.2:5000";
const RELAYED: &str = "192.0.2.10:49152";
const MAPPED: &str = "198.51.100.2:6000";
const PEER: &str = "203.0.113.5:7000";
const REALM: &str = "example.org";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn key() -> LongTermKey {
    LongTermKey::new("user", REALM, "pass")
}

fn new_client(config: TurnConfig, password: &str) -> (TurnClient, Instant) {
    let now = crate::test_epoch();
    let credentials = TurnCredentials { username: "user".into(), password: password.into() };
    (TurnClient::new(addr(SERVER), addr(LOCAL), credentials, config, 1, now), now)
}

/// Every datagram the client wants to send, checked to go from LOCAL to SERVER.
fn sent(c: &mut TurnClient) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| c.poll_transmit())
        .map(|d| {
            assert_eq!((d.source, d.destination), (addr(LOCAL), addr(SERVER)));
            d.contents
        })
        .collect()
}

fn events(c: &mut TurnClient) -> Vec<TurnEvent> {
    std::iter::from_fn(|| c.poll_event()).collect()
}

/// The one message of `class` the client sent, decoded (owned bytes kept by the caller).
fn one(sent: &[Vec<u8>], class: Class) -> Message<'_> {
    assert_eq!(sent.len(), 1, "{sent:?}");
    let m = codec::decode(&sent[0]).unwrap();
    assert_eq!(m.class, class);
    m
}

/// The one request the client sent.
fn only(requests: &[Vec<u8>]) -> Message<'_> {
    one(requests, Class::Request)
}

fn error(request: &Message<'_>, code: u16, nonce: &str) -> Vec<u8> {
    let mut e = Encoder::new(request.method, Class::Error, request.transaction);
    e.error_code(code, "Error").realm(REALM).nonce(nonce);
    e.finish(None, true)
}

fn success(request: &Message<'_>, add: impl FnOnce(&mut Encoder)) -> Vec<u8> {
    let mut e = Encoder::new(request.method, Class::Success, request.transaction);
    add(&mut e);
    e.finish(Some(&key()), true)
}

/// Runs the two-step Allocate (401, then credentials) to success with `lifetime` seconds.
fn allocated(config: TurnConfig, lifetime: u32) -> (TurnClient, Instant) {
    let (mut c, now) = new_client(config, "pass");
    let first = sent(&mut c);
    let request = only(&first);
    assert_eq!((request.method, request.username, request.has_integrity()), (Method::Allocate, None, false));
    assert_eq!(c.handle_datagram(now, addr(SERVER), &error(&request, 401, "n1")), None);
    let second = sent(&mut c);
    let request = only(&second);
    assert_eq!((request.method, request.username, request.realm, request.nonce), (Method::Allocate, Some("user"), Some(REALM), Some("n1")));
    assert!(request.verify(&key()));
    let answer = success(&request, |e| {
        e.xor_relayed_address(addr(RELAYED)).xor_mapped_address(addr(MAPPED)).lifetime(lifetime);
    });
    c.handle_datagram(now, addr(SERVER), &answer);
    assert_eq!(events(&mut c), [TurnEvent::Allocated { relayed: addr(RELAYED), mapped: addr(MAPPED), lifetime: Duration::from_secs(lifetime.into()) }]);
    assert_eq!(c.relayed(), Some(addr(RELAYED)));
    (c, now)
}

/// Creates and confirms a permission for PEER's address.
fn permitted(c: &mut TurnClient, now: Instant) {
    c.create_permission(now, addr(PEER).ip()).unwrap();
    let requests = sent(c);
    let request = only(&requests);
    assert_eq!((request.method, request.xor_peer.map(|p| p.ip())), (Method::CreatePermission, Some(addr(PEER).ip())));
    c.handle_datagram(now, addr(SERVER), &success(&request, |_| {}));
    assert_eq!(events(c), [TurnEvent::PermissionCreated { peer: addr(PEER).ip() }]);
}

#[test]
fn allocates_with_long_term_credentials() {
    let (c, now) = allocated(TurnConfig::default(), 600);
    assert_eq!(c.mapped(), Some(addr(MAPPED)));
    assert_eq!(c.expires(), Some(now + Duration::from_secs(600)));
    assert!(c.is_from_server(addr(SERVER)) && !c.is_from_server(addr(PEER)));
}

#[test]
fn wrong_credentials_are_unauthorized() {
    let (mut c, now) = new_client(TurnConfig::default(), "wrong");
    let first = sent(&mut c);
    c.handle_datagram(now, addr(SERVER), &error(&only(&first), 401, "n1"));
    let second = sent(&mut c);
    let request = only(&second);
    assert!(!request.verify(&key()), "signed with the wrong password");
    c.handle_datagram(now, addr(SERVER), &error(&request, 401, "n2"));
    assert_eq!(events(&mut c), [TurnEvent::Failed { error: TurnError::Unauthorized }]);
    assert_eq!(c.poll_timeout(), None);
    assert!(sent(&mut c).is_empty());
}

#[test]
fn stale_nonce_is_retried_with_the_new_one() {
    let (mut c, now) = allocated(TurnConfig::default(), 600);
    c.create_permission(now, addr(PEER).ip()).unwrap();
    let requests = sent(&mut c);
    c.handle_datagram(now, addr(SERVER), &error(&only(&requests), 438, "n2"));
    let retry = sent(&mut c);
    let request = only(&retry);
    assert_eq!((request.method, request.nonce), (Method::CreatePermission, Some("n2")));
    assert!(request.verify(&key()));
    // Three stale nonces in a row and the request fails.
    let mut bytes = retry;
    for n in 3..=5 {
        c.handle_datagram(now, addr(SERVER), &error(&only(&bytes), 438, &format!("n{n}")));
        bytes = sent(&mut c);
    }
    assert!(bytes.is_empty());
    assert_eq!(events(&mut c), [TurnEvent::PermissionFailed { peer: addr(PEER).ip(), error: TurnError::StaleNonce }]);
}

#[test]
fn requests_retransmit_on_the_rfc_schedule_then_fail() {
    let (mut c, start) = new_client(TurnConfig::default(), "pass");
    let first = sent(&mut c);
    let mut sends = vec![Duration::ZERO];
    let mut now = start;
    while let Some(t) = c.poll_timeout() {
        assert!(t > now, "deadline moves forward");
        now = t;
        c.handle_timeout(now);
        for d in sent(&mut c) {
            assert_eq!(d, first[0], "the same request, byte for byte");
            sends.push(now - start);
        }
    }
    let ms: Vec<u128> = sends.iter().map(Duration::as_millis).collect();
    assert_eq!(ms, [0, 500, 1500, 3500, 7500, 15500, 31500]);
    assert_eq!(now - start, Duration::from_millis(39_500));
    assert_eq!(events(&mut c), [TurnEvent::Failed { error: TurnError::Timeout { request: "Allocate" } }]);
}

#[test]
fn a_spurious_timeout_does_nothing() {
    let (mut c, now) = allocated(TurnConfig::default(), 600);
    let deadline = c.poll_timeout().unwrap();
    c.handle_timeout(now + Duration::from_secs(1));
    assert!(sent(&mut c).is_empty() && events(&mut c).is_empty());
    assert_eq!(c.poll_timeout(), Some(deadline));
}

#[test]
fn forged_or_unsigned_responses_are_ignored() {
    let (mut c, now) = allocated(TurnConfig::default(), 600);
    c.create_permission(now, addr(PEER).ip()).unwrap();
    let requests = sent(&mut c);
    let request = only(&requests);
    // Unsigned success to a signed request; one signed with another key; one from elsewhere.
    let mut e = Encoder::new(Method::CreatePermission, Class::Success, request.transaction);
    c.handle_datagram(now, addr(SERVER), &e.finish(None, true));
    let mut e = Encoder::new(Method::CreatePermission, Class::Success, request.transaction);
    c.handle_datagram(now, addr(SERVER), &e.finish(Some(&LongTermKey::new("user", REALM, "other")), true));
    c.handle_datagram(now, addr(PEER), &success(&request, |_| {}));
    // Garbage of every kind.
    for junk in [&[][..], &[0x40, 0, 0, 9][..], &[0, 1, 0, 0][..], &requests[0][..30]] {
        assert_eq!(c.handle_datagram(now, addr(SERVER), junk), None);
    }
    assert!(events(&mut c).is_empty());
    assert!(!c.has_permission(now, addr(PEER).ip()));
    c.handle_datagram(now, addr(SERVER), &success(&request, |_| {}));
    assert_eq!(events(&mut c), [TurnEvent::PermissionCreated { peer: addr(PEER).ip() }]);
}

#[test]
fn the_allocation_is_refreshed_before_it_expires() {
    for (lifetime, at) in [(600, 540), (60, 30)] {
        let (mut c, start) = allocated(TurnConfig::default(), lifetime);
        assert_eq!(c.poll_timeout(), Some(start + Duration::from_secs(at)));
        let now = start + Duration::from_secs(at);
        c.handle_timeout(now);
        let requests = sent(&mut c);
        let request = only(&requests);
        assert_eq!(request.method, Method::Refresh);
        assert!(request.verify(&key()));
        c.handle_datagram(now, addr(SERVER), &success(&request, |e| {
            e.lifetime(lifetime);
        }));
        let granted = Duration::from_secs(lifetime.into());
        assert_eq!(events(&mut c), [TurnEvent::Refreshed { lifetime: granted }]);
        assert_eq!(c.expires(), Some(now + granted));
        assert_eq!(c.poll_timeout(), Some(now + Duration::from_secs(at)));
    }
}

#[test]
fn an_unrefreshed_allocation_expires() {
    let config = TurnConfig { rto: Duration::from_secs(10), ..TurnConfig::default() };
    let (mut c, start) = allocated(config, 30);
    let mut now = start;
    while let Some(t) = c.poll_timeout() {
        now = t;
        c.handle_timeout(now);
        let _ = sent(&mut c);
    }
    assert_eq!(now - start, Duration::from_secs(30));
    assert_eq!(events(&mut c), [TurnEvent::Failed { error: TurnError::Expired }]);
    assert_eq!(c.send_to(now, addr(PEER), b"x"), Err(TurnError::Closed));
}

#[test]
fn sends_need_an_allocation_and_a_permission() {
    let (mut c, now) = new_client(TurnConfig::default(), "pass");
    assert_eq!(c.send_to(now, addr(PEER), b"x"), Err(TurnError::NoAllocation));
    assert_eq!(c.create_permission(now, addr(PEER).ip()), Err(TurnError::NoAllocation));
    let (mut c, now) = allocated(TurnConfig::default(), 600);
    assert_eq!(c.send_to(now, addr(PEER), b"x"), Err(TurnError::NoPermission(addr(PEER).ip())));
    // Pending is not installed.
    c.create_permission(now, addr(PEER).ip()).unwrap();
    assert_eq!(c.send_to(now, addr(PEER), b"x"), Err(TurnError::NoPermission(addr(PEER).ip())));
    assert_eq!(c.send_to(now, addr(PEER), &vec![0; MAX_DATA + 1]), Err(TurnError::TooLarge(MAX_DATA + 1)));
}

#[test]
fn data_goes_in_send_indications_then_channels() {
    let (mut c, now) = allocated(TurnConfig::default(), 600);
    permitted(&mut c, now);
    c.send_to(now, addr(PEER), b"hello").unwrap();
    let out = sent(&mut c);
    let m = one(&out, Class::Indication);
    assert_eq!((m.method, m.xor_peer, m.data), (Method::Send, Some(addr(PEER)), Some(&b"hello"[..])));

    let channel = c.bind_channel(now, addr(PEER)).unwrap();
    assert_eq!(channel, CHANNEL_MIN);
    assert_eq!(c.bind_channel(now, addr(PEER)), Ok(channel), "binding again returns the same number");
    let requests = sent(&mut c);
    let request = only(&requests);
    assert_eq!((request.method, request.channel, request.xor_peer), (Method::ChannelBind, Some(channel), Some(addr(PEER))));
    // Until the bind is confirmed, still indications.
    c.send_to(now, addr(PEER), b"a").unwrap();
    assert_eq!(codec::decode(&sent(&mut c)[0]).unwrap().method, Method::Send);
    c.handle_datagram(now, addr(SERVER), &success(&request, |_| {}));
    assert_eq!(events(&mut c), [TurnEvent::ChannelBound { peer: addr(PEER), channel }]);
    c.send_to(now, addr(PEER), b"hello").unwrap();
    assert_eq!(sent(&mut c), [codec::encode_channel_data(channel, b"hello", false)]);

    // Incoming: a Data indication and ChannelData (padded) both come out as (peer, bytes).
    let mut e = Encoder::new(Method::Data, Class::Indication, TransactionId([3; 12]));
    e.xor_peer_address(addr(PEER)).data(b"via indication");
    let indication = e.finish(None, false);
    assert_eq!(c.handle_datagram(now, addr(SERVER), &indication), Some((addr(PEER), &b"via indication"[..])));
    let framed = codec::encode_channel_data(channel, b"via channel", true);
    assert_eq!(c.handle_datagram(now, addr(SERVER), &framed), Some((addr(PEER), &b"via channel"[..])));
    // Not from the server: not ours. An unknown channel: dropped.
    assert_eq!(c.handle_datagram(now, addr(PEER), &framed), None);
    assert_eq!(c.handle_datagram(now, addr(SERVER), &codec::encode_channel_data(channel + 1, b"x", false)), None);
}

#[test]
fn permissions_are_refreshed_while_used_and_lapse_when_not() {
    let (mut c, start) = allocated(TurnConfig::default(), 3600);
    permitted(&mut c, start);
    // Used: refreshed at 240 s.
    c.send_to(start, addr(PEER), b"x").unwrap();
    let _ = sent(&mut c);
    assert_eq!(c.poll_timeout(), Some(start + Duration::from_secs(240)));
    let now = start + Duration::from_secs(240);
    c.handle_timeout(now);
    let requests = sent(&mut c);
    let request = only(&requests);
    assert_eq!(request.method, Method::CreatePermission);
    c.handle_datagram(now, addr(SERVER), &success(&request, |_| {}));
    assert!(events(&mut c).is_empty(), "a refresh is not a new permission");
    // Not used since: nothing sent at the next refresh point, gone at 300 s after the refresh.
    let refresh = now + Duration::from_secs(240);
    assert_eq!(c.poll_timeout(), Some(refresh));
    c.handle_timeout(refresh);
    assert!(sent(&mut c).is_empty());
    assert_eq!(c.poll_timeout(), Some(now + PERMISSION_LIFETIME));
    c.handle_timeout(now + PERMISSION_LIFETIME);
    assert_eq!(events(&mut c), [TurnEvent::PermissionExpired { peer: addr(PEER).ip() }]);
    assert!(!c.has_permission(now + PERMISSION_LIFETIME, addr(PEER).ip()));
}

#[test]
fn channels_are_rebound_while_used() {
    let (mut c, start) = allocated(TurnConfig::default(), 3600);
    let channel = c.bind_channel(start, addr(PEER)).unwrap();
    let requests = sent(&mut c);
    c.handle_datagram(start, addr(SERVER), &success(&only(&requests), |_| {}));
    assert_eq!(events(&mut c), [TurnEvent::ChannelBound { peer: addr(PEER), channel }]);
    assert!(c.has_permission(start, addr(PEER).ip()), "a channel implies a permission");
    // Incoming traffic counts as use.
    c.handle_datagram(start, addr(SERVER), &codec::encode_channel_data(channel, b"in", false));
    let refresh = start + Duration::from_secs(540);
    assert_eq!(c.poll_timeout(), Some(refresh));
    c.handle_timeout(refresh);
    let requests = sent(&mut c);
    let request = only(&requests);
    assert_eq!((request.method, request.channel, request.xor_peer), (Method::ChannelBind, Some(channel), Some(addr(PEER))));
    c.handle_datagram(refresh, addr(SERVER), &success(&request, |_| {}));
    assert_eq!(c.channel(refresh + Duration::from_secs(599), addr(PEER)), Some(channel));
    // Unused: expires, and the next binding gets a new number.
    c.handle_timeout(refresh + Duration::from_secs(540));
    assert!(sent(&mut c).is_empty());
    c.handle_timeout(refresh + CHANNEL_LIFETIME);
    assert_eq!(events(&mut c), [TurnEvent::ChannelExpired { peer: addr(PEER), channel }]);
    assert_eq!(c.bind_channel(refresh + CHANNEL_LIFETIME, addr(PEER)), Ok(channel + 1));
}

#[test]
fn limits_are_typed_errors() {
    let config = TurnConfig { max_permissions: 2, max_channels: 1, transmit_queue: 4, ..TurnConfig::default() };
    let (mut c, now) = allocated(config, 600);
    permitted(&mut c, now);
    c.create_permission(now, "1.1.1.1".parse().unwrap()).unwrap();
    assert_eq!(c.create_permission(now, "1.1.1.3".parse().unwrap()), Err(TurnError::TooManyPermissions));
    c.bind_channel(now, addr(PEER)).unwrap();
    assert_eq!(c.bind_channel(now, addr(RELAYED)), Err(TurnError::TooManyChannels));
    // Asking again for what exists sends nothing.
    c.create_permission(now, "1.1.1.1".parse().unwrap()).unwrap();
    c.bind_channel(now, addr(PEER)).unwrap();
    assert_eq!(sent(&mut c).len(), 2);
    // Undrained sends fill the queue: the next command is refused, nothing dropped.
    for _ in 0..4 {
        c.send_to(now, addr(PEER), b"x").unwrap();
    }
    assert_eq!(c.send_to(now, addr(PEER), b"x"), Err(TurnError::NotDrained));
    assert_eq!(c.create_permission(now, "1.1.1.1".parse().unwrap()), Err(TurnError::NotDrained));
    assert_eq!(sent(&mut c).len(), 4);
}

#[test]
fn close_releases_the_allocation() {
    let (mut c, now) = allocated(TurnConfig::default(), 600);
    permitted(&mut c, now);
    c.close(now);
    let requests = sent(&mut c);
    let request = only(&requests);
    assert_eq!((request.method, request.lifetime), (Method::Refresh, Some(0)));
    assert_eq!(c.send_to(now, addr(PEER), b"x"), Err(TurnError::Closed));
    c.handle_datagram(now, addr(SERVER), &success(&request, |e| {
        e.lifetime(0);
    }));
    assert_eq!(events(&mut c), [TurnEvent::Closed]);
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn same_seed_same_bytes() {
    let run = || {
        let (mut c, _) = new_client(TurnConfig::default(), "pass");
        sent(&mut c)
    };
    assert_eq!(run(), run());
}
