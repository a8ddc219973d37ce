//! A sans-IO TURN client (RFC 8656) over UDP: one allocation on one server, its permissions and
//! channel bindings, and the data relayed through it.
//!
//! [`TurnClient`] follows the crate's drain contract: feed datagrams from the server with
//! [`TurnClient::handle_datagram`] and timers with [`TurnClient::handle_timeout`], then drain
//! [`TurnClient::poll_transmit`] and [`TurnClient::poll_event`] until `None` and sleep until
//! [`TurnClient::poll_timeout`]. It never reads the clock or the OS random source: transaction
//! ids come from a seeded ChaCha RNG.
//!
//! The flow: an unauthenticated Allocate learns the server's REALM and NONCE from its 401, the
//! second Allocate carries the long-term credentials, and the success is
//! [`TurnEvent::Allocated`]. The allocation is refreshed 60 s before it expires (at half its
//! lifetime if that is 120 s or less); [`TurnClient::create_permission`] and
//! [`TurnClient::bind_channel`] install what the server needs to relay to and from a peer, and
//! both are refreshed while used (traffic either way since the last refresh). Then
//! [`TurnClient::send_to`] relays through a channel if one is bound, else in a Send
//! indication, and data from peers comes out of [`TurnClient::handle_datagram`].
//!
//! Wiring it under ICE: announce [`TurnClient::relayed`] as a relayed candidate, route
//! transmits whose source is the relayed address through `send_to`, feed datagrams for which
//! [`TurnClient::is_from_server`] holds here, and hand what comes out to ICE as received on the
//! relayed address from the returned peer.
//!
//! Requests are retransmitted as RFC 8489 section 6.2.1 says (RTO 500 ms doubling, 7 sends, a
//! last wait of 16 RTO: 39.5 s in all), configurable in [`TurnConfig`].

pub mod codec;

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::peer::Datagram;
use crate::stun::TransactionId;
use codec::{CHANNEL_MAX, CHANNEL_MIN, Class, Encoder, LongTermKey, MAX_DATA, Message, Method};

/// How long a permission lives on the server (RFC 8656 section 9).
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// How long a channel binding lives on the server (RFC 8656 section 12).
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// How many 438 Stale Nonce answers in a row one request may get before it fails.
const MAX_STALE_NONCE: u8 = 3;

/// A TURN user name and password (long-term credentials).
#[derive(Clone, PartialEq, Eq)]
pub struct TurnCredentials {
    /// The user name.
    pub username: String,
    /// The password, used as given (apply OpaqueString yourself if it is not ASCII).
    pub password: String,
}

impl std::fmt::Debug for TurnCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnCredentials").field("username", &self.username).finish_non_exhaustive()
    }
}

/// Tuning for a [`TurnClient`]. Start from [`TurnConfig::default`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TurnConfig {
    /// The allocation lifetime to ask for (LIFETIME in Allocate and Refresh); `None` leaves it
    /// to the server (RFC 8656's default is 10 minutes). The server may grant less.
    pub lifetime: Option<Duration>,
    /// The first retransmission timeout of a request (RFC 8489's RTO, 500 ms); it doubles after
    /// each send.
    pub rto: Duration,
    /// How many times a request is sent in all (Rc, 7).
    pub max_transmits: u32,
    /// How long to wait after the last send, in multiples of `rto` (Rm, 16).
    pub last_wait: u32,
    /// How long after a permission is installed it is refreshed if used (240 s; clamped below
    /// [`PERMISSION_LIFETIME`]).
    pub permission_refresh: Duration,
    /// How long after a channel is bound it is rebound if used (540 s; clamped below
    /// [`CHANNEL_LIFETIME`]).
    pub channel_refresh: Duration,
    /// The most peer addresses with a permission (installed or being installed), 64.
    /// [`TurnClient::create_permission`] past it is [`TurnError::TooManyPermissions`].
    pub max_permissions: usize,
    /// The most channel bindings, 64. [`TurnClient::bind_channel`] past it is
    /// [`TurnError::TooManyChannels`].
    pub max_channels: usize,
    /// How many datagrams may wait in [`TurnClient::poll_transmit`], 256. Commands past it
    /// return [`TurnError::NotDrained`]; retransmissions and refreshes past it are dropped as a
    /// full socket buffer would drop them (the next retransmission covers them).
    pub transmit_queue: usize,
    /// How many events may wait in [`TurnClient::poll_event`] before commands return
    /// [`TurnError::NotDrained`], 256. Timers and answers to earlier commands may add at most
    /// `2 × (max_permissions + max_channels) + 2` more; [`TurnEvent::Refreshed`] is skipped
    /// when the queue is full.
    pub event_queue: usize,
    /// SOFTWARE to put in requests, if any.
    pub software: Option<String>,
}

impl Default for TurnConfig {
    fn default() -> TurnConfig {
        TurnConfig {
            lifetime: None,
            rto: Duration::from_millis(500),
            max_transmits: 7,
            last_wait: 16,
            permission_refresh: Duration::from_secs(240),
            channel_refresh: Duration::from_secs(540),
            max_permissions: 64,
            max_channels: 64,
            transmit_queue: 256,
            event_queue: 256,
            software: None,
        }
    }
}

/// Why a TURN operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TurnError {
    /// The server refused the credentials (401 to a request that carried them).
    #[error("the TURN server refused the credentials")]
    Unauthorized,
    /// A request got no answer after every retransmission.
    #[error("no answer from the TURN server to {request}")]
    Timeout {
        /// Which request ("Allocate", "Refresh", "CreatePermission", "ChannelBind").
        request: &'static str,
    },
    /// The server answered with an error (e.g. 437 Allocation Mismatch, 486 Allocation Quota
    /// Reached, 508 Insufficient Capacity, 403 Forbidden).
    #[error("the TURN server answered {code} {reason}")]
    Rejected {
        /// The ERROR-CODE.
        code: u16,
        /// Its reason phrase.
        reason: String,
    },
    /// The server kept answering 438 Stale Nonce.
    #[error("the TURN server kept answering 438 Stale Nonce")]
    StaleNonce,
    /// A success response missing what it must carry (an Allocate success without
    /// XOR-RELAYED-ADDRESS, XOR-MAPPED-ADDRESS or LIFETIME), or a 401 without REALM and NONCE.
    #[error("malformed TURN response to {request}")]
    BadResponse {
        /// Which request.
        request: &'static str,
    },
    /// The allocation expired before a refresh succeeded.
    #[error("the TURN allocation expired")]
    Expired,
    /// There is no allocation (yet, or any more).
    #[error("no TURN allocation")]
    NoAllocation,
    /// No installed permission for this peer address: call
    /// [`TurnClient::create_permission`] and wait for [`TurnEvent::PermissionCreated`].
    #[error("no TURN permission for {0}")]
    NoPermission(IpAddr),
    /// [`TurnConfig::max_permissions`] reached.
    #[error("too many TURN permissions")]
    TooManyPermissions,
    /// [`TurnConfig::max_channels`] reached.
    #[error("too many TURN channels")]
    TooManyChannels,
    /// Every channel number (0x4000..=0x4FFF) was used once in this allocation; numbers are
    /// not reused, so that a number never points at two peers.
    #[error("TURN channel numbers exhausted")]
    ChannelsExhausted,
    /// More than [`codec::MAX_DATA`] bytes to send.
    #[error("{0} bytes is too large to relay")]
    TooLarge(usize),
    /// The transmit or event queue is full: drain it first.
    #[error("TURN client outputs not drained")]
    NotDrained,
    /// [`TurnClient::close`] was called, or the allocation failed.
    #[error("TURN client closed")]
    Closed,
}

/// What a [`TurnClient`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TurnEvent {
    /// The allocation exists.
    Allocated {
        /// The relayed transport address peers send to.
        relayed: SocketAddr,
        /// Our address as the server sees it (server-reflexive).
        mapped: SocketAddr,
        /// What the server granted.
        lifetime: Duration,
    },
    /// A Refresh succeeded (skipped if the event queue is full).
    Refreshed {
        /// The new lifetime, from now.
        lifetime: Duration,
    },
    /// A permission for this peer address is installed: data to and from it is relayed.
    PermissionCreated {
        /// The peer's IP address.
        peer: IpAddr,
    },
    /// Installing or refreshing a permission failed; it is gone.
    PermissionFailed {
        /// The peer's IP address.
        peer: IpAddr,
        /// Why.
        error: TurnError,
    },
    /// A permission went unused until it expired and is gone.
    PermissionExpired {
        /// The peer's IP address.
        peer: IpAddr,
    },
    /// A channel to this peer is bound: [`TurnClient::send_to`] uses it from now on.
    ChannelBound {
        /// The peer.
        peer: SocketAddr,
        /// The channel number.
        channel: u16,
    },
    /// Binding or rebinding a channel failed; it is gone (send_to falls back to Send
    /// indications while a permission is installed).
    ChannelBindFailed {
        /// The peer.
        peer: SocketAddr,
        /// Why.
        error: TurnError,
    },
    /// A channel went unused until it expired and is gone.
    ChannelExpired {
        /// The peer.
        peer: SocketAddr,
        /// Its number (not reused in this allocation).
        channel: u16,
    },
    /// The allocation could not be made, or was lost. Terminal: nothing more is sent.
    Failed {
        /// Why.
        error: TurnError,
    },
    /// The allocation was released after [`TurnClient::close`] (or the server did not answer
    /// the release). Terminal.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Allocate,
    Refresh { lifetime: u32 },
    Permission { peer: IpAddr },
    ChannelBind { channel: u16, peer: SocketAddr },
}

impl Request {
    fn method(self) -> Method {
        match self {
            Request::Allocate => Method::Allocate,
            Request::Refresh { .. } => Method::Refresh,
            Request::Permission { .. } => Method::CreatePermission,
            Request::ChannelBind { .. } => Method::ChannelBind,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Request::Allocate => "Allocate",
            Request::Refresh { .. } => "Refresh",
            Request::Permission { .. } => "CreatePermission",
            Request::ChannelBind { .. } => "ChannelBind",
        }
    }
}

#[derive(Debug)]
struct Transaction {
    id: TransactionId,
    request: Request,
    bytes: Vec<u8>,
    /// Whether it carried MESSAGE-INTEGRITY (then its success must too).
    authenticated: bool,
    sends: u32,
    interval: Duration,
    next: Instant,
    stale_nonces: u8,
}

#[derive(Debug, Clone, Copy)]
struct Allocation {
    relayed: SocketAddr,
    mapped: SocketAddr,
    expires: Instant,
    /// `None` while a Refresh is in flight.
    refresh_at: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Allocating,
    Allocated,
    Closing,
    Done,
}

/// A permission or a channel binding: installed until `expires`, refreshed at `refresh_at` if
/// `used` since the last install.
#[derive(Debug, Clone, Copy)]
struct Lease {
    expires: Option<Instant>,
    refresh_at: Option<Instant>,
    in_flight: bool,
    used: bool,
}

impl Lease {
    fn pending() -> Lease {
        Lease { expires: None, refresh_at: None, in_flight: true, used: false }
    }

    fn installed(&self, now: Instant) -> bool {
        self.expires.is_some_and(|e| now < e)
    }

    fn renew(&mut self, now: Instant, lifetime: Duration, refresh: Duration) {
        self.expires = Some(now + lifetime);
        self.refresh_at = Some(now + refresh);
        self.in_flight = false;
        self.used = false;
    }

    fn deadline(&self) -> Option<Instant> {
        if self.in_flight {
            return None;
        }
        [self.refresh_at, self.expires].into_iter().flatten().min()
    }
}

#[derive(Debug, Clone, Copy)]
struct Channel {
    number: u16,
    lease: Lease,
}

/// The server's realm and nonce and the key they give, once a 401 taught us them.
#[derive(Debug, Clone)]
struct Auth {
    realm: String,
    nonce: String,
    key: LongTermKey,
}

/// A TURN client for one allocation on one server. See the [module docs](self).
#[derive(Debug)]
pub struct TurnClient {
    server: SocketAddr,
    local: SocketAddr,
    credentials: TurnCredentials,
    config: TurnConfig,
    rng: ChaCha20Rng,
    state: State,
    auth: Option<Auth>,
    allocation: Option<Allocation>,
    transactions: Vec<Transaction>,
    permissions: BTreeMap<IpAddr, Lease>,
    channels: BTreeMap<SocketAddr, Channel>,
    channel_peers: BTreeMap<u16, SocketAddr>,
    next_channel: u16,
    transmits: VecDeque<Datagram>,
    events: VecDeque<TurnEvent>,
}

impl TurnClient {
    /// Starts allocating on `server` from our socket `local`: the first Allocate is ready in
    /// [`TurnClient::poll_transmit`]. `seed` seeds the transaction ids.
    pub fn new(server: SocketAddr, local: SocketAddr, credentials: TurnCredentials, mut config: TurnConfig, seed: u64, now: Instant) -> TurnClient {
        config.permission_refresh = config.permission_refresh.min(PERMISSION_LIFETIME - Duration::from_secs(1));
        config.channel_refresh = config.channel_refresh.min(CHANNEL_LIFETIME - Duration::from_secs(1));
        config.max_transmits = config.max_transmits.max(1);
        config.last_wait = config.last_wait.max(1);
        // A zero timeout would make every deadline "now" and busy-loop the caller.
        config.rto = config.rto.max(Duration::from_millis(1));
        let mut client = TurnClient {
            server,
            local,
            credentials,
            config,
            rng: ChaCha20Rng::seed_from_u64(seed),
            state: State::Allocating,
            auth: None,
            allocation: None,
            transactions: Vec::new(),
            permissions: BTreeMap::new(),
            channels: BTreeMap::new(),
            channel_peers: BTreeMap::new(),
            next_channel: CHANNEL_MIN,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        };
        client.start(now, Request::Allocate, 0);
        client
    }

    /// Returns the TURN server's address.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// Returns the local socket address the client sends from.
    pub fn local(&self) -> SocketAddr {
        self.local
    }

    /// Returns true if a datagram from `from` is the server's and belongs in
    /// [`TurnClient::handle_datagram`].
    pub fn is_from_server(&self, from: SocketAddr) -> bool {
        from == self.server
    }

    /// Returns the relayed address while the allocation exists.
    pub fn relayed(&self) -> Option<SocketAddr> {
        self.allocation.filter(|_| self.state == State::Allocated).map(|a| a.relayed)
    }

    /// Returns our server-reflexive address while the allocation exists.
    pub fn mapped(&self) -> Option<SocketAddr> {
        self.allocation.filter(|_| self.state == State::Allocated).map(|a| a.mapped)
    }

    /// Returns when the allocation expires unless refreshed.
    pub fn expires(&self) -> Option<Instant> {
        self.allocation.filter(|_| self.state == State::Allocated).map(|a| a.expires)
    }

    /// Returns true if data to and from `peer` is relayed now (a permission or a channel).
    pub fn has_permission(&self, now: Instant, peer: IpAddr) -> bool {
        self.permissions.get(&peer).is_some_and(|l| l.installed(now)) || self.channels.iter().any(|(p, c)| p.ip() == peer && c.lease.installed(now))
    }

    /// Returns the channel bound to `peer`, if any.
    pub fn channel(&self, now: Instant, peer: SocketAddr) -> Option<u16> {
        self.channels.get(&peer).filter(|c| c.lease.installed(now)).map(|c| c.number)
    }

    fn check_commands(&self) -> Result<(), TurnError> {
        match self.state {
            State::Allocated => {}
            State::Allocating => return Err(TurnError::NoAllocation),
            State::Closing | State::Done => return Err(TurnError::Closed),
        }
        if self.transmits.len() >= self.config.transmit_queue || self.events.len() >= self.config.event_queue {
            return Err(TurnError::NotDrained);
        }
        Ok(())
    }

    /// Asks the server to relay data to and from `peer` (any port).
    /// [`TurnEvent::PermissionCreated`] follows; the permission is then refreshed while used.
    /// Asking again for an existing one does nothing.
    pub fn create_permission(&mut self, now: Instant, peer: IpAddr) -> Result<(), TurnError> {
        self.check_commands()?;
        if let Some(lease) = self.permissions.get_mut(&peer) {
            lease.used = true;
            return Ok(());
        }
        if self.permissions.len() >= self.config.max_permissions {
            return Err(TurnError::TooManyPermissions);
        }
        self.permissions.insert(peer, Lease::pending());
        self.start(now, Request::Permission { peer }, 0);
        Ok(())
    }

    /// Binds a channel to `peer` and returns its number; [`TurnEvent::ChannelBound`] follows,
    /// after which [`TurnClient::send_to`] uses 4-byte ChannelData headers instead of Send
    /// indications. The binding also installs a permission for the peer's address, and is
    /// rebound while used. Binding a bound peer again returns its number.
    pub fn bind_channel(&mut self, now: Instant, peer: SocketAddr) -> Result<u16, TurnError> {
        self.check_commands()?;
        if let Some(channel) = self.channels.get_mut(&peer) {
            channel.lease.used = true;
            return Ok(channel.number);
        }
        if self.channels.len() >= self.config.max_channels {
            return Err(TurnError::TooManyChannels);
        }
        if self.next_channel > CHANNEL_MAX {
            return Err(TurnError::ChannelsExhausted);
        }
        let number = self.next_channel;
        self.next_channel += 1;
        self.channels.insert(peer, Channel { number, lease: Lease::pending() });
        self.channel_peers.insert(number, peer);
        self.start(now, Request::ChannelBind { channel: number, peer }, 0);
        Ok(number)
    }

    /// Relays `data` to `peer`: in ChannelData if a channel is bound, else in a Send indication
    /// if a permission is installed, else [`TurnError::NoPermission`].
    pub fn send_to(&mut self, now: Instant, peer: SocketAddr, data: &[u8]) -> Result<(), TurnError> {
        self.check_commands()?;
        if data.len() > MAX_DATA {
            return Err(TurnError::TooLarge(data.len()));
        }
        if let Some(channel) = self.channels.get_mut(&peer).filter(|c| c.lease.installed(now)) {
            channel.lease.used = true;
            let contents = codec::encode_channel_data(channel.number, data, false);
            self.push_transmit(contents);
            return Ok(());
        }
        match self.permissions.get_mut(&peer.ip()) {
            Some(lease) if lease.installed(now) => lease.used = true,
            _ => return Err(TurnError::NoPermission(peer.ip())),
        }
        let id = self.transaction_id();
        let mut message = Encoder::new(Method::Send, Class::Indication, id);
        message.xor_peer_address(peer).data(data);
        let contents = message.finish(None, false);
        self.push_transmit(contents);
        Ok(())
    }

    /// Releases the allocation (a Refresh with LIFETIME 0); [`TurnEvent::Closed`] follows when
    /// the server answers or the request times out. Permissions and channels are dropped at
    /// once.
    pub fn close(&mut self, now: Instant) {
        match self.state {
            State::Allocated => {
                self.transactions.clear();
                self.permissions.clear();
                self.channels.clear();
                self.channel_peers.clear();
                self.state = State::Closing;
                self.start(now, Request::Refresh { lifetime: 0 }, 0);
            }
            State::Allocating => self.finish(TurnEvent::Closed),
            State::Closing | State::Done => {}
        }
    }

    /// Takes in a datagram from the server (check [`TurnClient::is_from_server`]): answers to
    /// our requests are processed, and data a peer sent through the relay is returned with the
    /// peer's address. Anything else, malformed or not from the server, is ignored.
    pub fn handle_datagram<'a>(&mut self, now: Instant, from: SocketAddr, datagram: &'a [u8]) -> Option<(SocketAddr, &'a [u8])> {
        if !self.is_from_server(from) || matches!(self.state, State::Done) {
            return None;
        }
        if codec::is_channel_data(datagram) {
            let (number, data) = codec::decode_channel_data(datagram).ok()?;
            let peer = *self.channel_peers.get(&number)?;
            if let Some(channel) = self.channels.get_mut(&peer) {
                channel.lease.used = true;
            }
            return Some((peer, data));
        }
        let message = codec::decode(datagram).ok()?;
        match (message.method, message.class) {
            (Method::Data, Class::Indication) => {
                let (peer, data) = (message.xor_peer?, message.data?);
                if self.state != State::Allocated {
                    return None;
                }
                if let Some(lease) = self.permissions.get_mut(&peer.ip()) {
                    lease.used = true;
                }
                Some((peer, data))
            }
            (_, Class::Success | Class::Error) => {
                self.handle_response(now, &message);
                None
            }
            _ => None,
        }
    }

    /// Returns the next datagram to send (to the server, from [`TurnClient::local`]).
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Datagram> {
        self.transmits.pop_front()
    }

    /// Returns the next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<TurnEvent> {
        self.events.pop_front()
    }

    /// Returns when [`TurnClient::handle_timeout`] should next be called: a retransmission, a
    /// refresh, or an expiry. `None` once closed or failed.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state == State::Done {
            return None;
        }
        let transactions = self.transactions.iter().map(|t| t.next);
        let allocation = self.allocation.filter(|_| self.state == State::Allocated).into_iter().flat_map(|a| [a.refresh_at, Some(a.expires)]).flatten();
        let permissions = self.permissions.values().filter_map(Lease::deadline);
        let channels = self.channels.values().filter_map(|c| c.lease.deadline());
        transactions.chain(allocation).chain(permissions).chain(channels).min()
    }

    /// Runs the timers due at `now`: retransmissions and their timeouts, refreshes, expiries.
    /// Calling it early does nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::Done {
            return;
        }
        self.run_transactions(now);
        if self.state == State::Allocated {
            self.run_allocation(now);
        }
        if self.state == State::Allocated {
            self.run_permissions(now);
            self.run_channels(now);
        }
    }

    fn run_transactions(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.transactions.len() {
            let t = &mut self.transactions[i];
            if t.next > now {
                i += 1;
                continue;
            }
            if t.sends >= self.config.max_transmits {
                let t = self.transactions.remove(i);
                self.fail_request(now, t.request, TurnError::Timeout { request: t.request.name() });
                if self.state == State::Done {
                    return;
                }
                continue;
            }
            t.sends += 1;
            if t.sends == self.config.max_transmits {
                t.next = now + self.config.rto * self.config.last_wait;
            } else {
                t.interval *= 2;
                t.next = now + t.interval;
            }
            let bytes = t.bytes.clone();
            self.push_transmit(bytes);
            i += 1;
        }
    }

    fn run_allocation(&mut self, now: Instant) {
        let Some(allocation) = self.allocation.as_mut() else { return };
        if allocation.expires <= now {
            self.finish(TurnEvent::Failed { error: TurnError::Expired });
            return;
        }
        if allocation.refresh_at.is_some_and(|t| t <= now) {
            allocation.refresh_at = None;
            let lifetime = self.requested_lifetime();
            self.start(now, Request::Refresh { lifetime }, 0);
        }
    }

    fn run_permissions(&mut self, now: Instant) {
        let mut refresh = Vec::new();
        let mut expired = Vec::new();
        for (peer, lease) in &mut self.permissions {
            if lease.in_flight {
                continue;
            }
            if lease.expires.is_some_and(|e| e <= now) {
                expired.push(*peer);
            } else if lease.refresh_at.is_some_and(|t| t <= now) {
                lease.refresh_at = None;
                if lease.used {
                    lease.in_flight = true;
                    refresh.push(*peer);
                }
            }
        }
        for peer in expired {
            self.permissions.remove(&peer);
            self.events.push_back(TurnEvent::PermissionExpired { peer });
        }
        for peer in refresh {
            self.start(now, Request::Permission { peer }, 0);
        }
    }

    fn run_channels(&mut self, now: Instant) {
        let mut refresh = Vec::new();
        let mut expired = Vec::new();
        for (peer, channel) in &mut self.channels {
            let lease = &mut channel.lease;
            if lease.in_flight {
                continue;
            }
            if lease.expires.is_some_and(|e| e <= now) {
                expired.push((*peer, channel.number));
            } else if lease.refresh_at.is_some_and(|t| t <= now) {
                lease.refresh_at = None;
                if lease.used {
                    lease.in_flight = true;
                    refresh.push((*peer, channel.number));
                }
            }
        }
        for (peer, channel) in expired {
            self.channels.remove(&peer);
            self.channel_peers.remove(&channel);
            self.events.push_back(TurnEvent::ChannelExpired { peer, channel });
        }
        for (peer, channel) in refresh {
            self.start(now, Request::ChannelBind { channel, peer }, 0);
        }
    }

    fn requested_lifetime(&self) -> u32 {
        self.config.lifetime.map_or(0, |l| l.as_secs().min(u64::from(u32::MAX)) as u32)
    }

    fn transaction_id(&mut self) -> TransactionId {
        let mut id = [0u8; 12];
        self.rng.fill_bytes(&mut id);
        TransactionId(id)
    }

    fn push_transmit(&mut self, contents: Vec<u8>) {
        if self.transmits.len() < self.config.transmit_queue {
            self.transmits.push_back(Datagram { source: self.local, destination: self.server, contents });
        }
    }

    /// Sends `request` in a new transaction (with credentials once known).
    fn start(&mut self, now: Instant, request: Request, stale_nonces: u8) {
        let id = self.transaction_id();
        let mut message = Encoder::new(request.method(), Class::Request, id);
        match request {
            Request::Allocate => {
                message.requested_transport_udp();
                if let Some(l) = self.config.lifetime {
                    message.lifetime(l.as_secs().min(u64::from(u32::MAX)) as u32);
                }
            }
            Request::Refresh { lifetime } => {
                // Without LIFETIME the server applies its default; 0 releases.
                if lifetime > 0 || self.state == State::Closing {
                    message.lifetime(lifetime);
                }
            }
            Request::Permission { peer } => {
                message.xor_peer_address(SocketAddr::new(peer, 0));
            }
            Request::ChannelBind { channel, peer } => {
                message.channel_number(channel).xor_peer_address(peer);
            }
        }
        if let Some(software) = &self.config.software {
            message.software(software);
        }
        let key = self.auth.as_ref().map(|auth| {
            message.username(&self.credentials.username).realm(&auth.realm).nonce(&auth.nonce);
            &auth.key
        });
        let authenticated = key.is_some();
        let bytes = message.finish(key, true);
        self.push_transmit(bytes.clone());
        let wait = if self.config.max_transmits == 1 { self.config.rto * self.config.last_wait } else { self.config.rto };
        let interval = self.config.rto;
        self.transactions.push(Transaction { id, request, bytes, authenticated, sends: 1, interval, next: now + wait, stale_nonces });
    }

    fn handle_response(&mut self, now: Instant, message: &Message<'_>) {
        let Some(i) = self.transactions.iter().position(|t| t.id == message.transaction) else { return };
        let t = &self.transactions[i];
        if message.method != t.request.method() {
            return;
        }
        // A response that claims integrity must prove it; a success to an authenticated
        // request must claim it (RFC 8489 section 9.2.5). Otherwise it may be forged: ignore it
        // and let the retransmissions run.
        if let Some(auth) = &self.auth
            && (message.has_integrity() || (t.authenticated && message.class == Class::Success))
            && !message.verify(&auth.key)
        {
            return;
        }
        let t = self.transactions.remove(i);
        if message.class == Class::Success {
            self.succeed(now, t.request, message);
            return;
        }
        let (code, reason) = message.error.clone().unwrap_or((0, String::new()));
        match code {
            401 if !t.authenticated => match (message.realm, message.nonce) {
                (Some(realm), Some(nonce)) => {
                    let key = LongTermKey::new(&self.credentials.username, realm, &self.credentials.password);
                    self.auth = Some(Auth { realm: realm.to_string(), nonce: nonce.to_string(), key });
                    self.start(now, t.request, t.stale_nonces);
                }
                _ => self.fail_request(now, t.request, TurnError::BadResponse { request: t.request.name() }),
            },
            401 => self.fail_request(now, t.request, TurnError::Unauthorized),
            438 => match (message.nonce, self.auth.as_mut()) {
                (Some(nonce), Some(auth)) if t.stale_nonces < MAX_STALE_NONCE => {
                    auth.nonce = nonce.to_string();
                    if let Some(realm) = message.realm
                        && realm != auth.realm
                    {
                        auth.realm = realm.to_string();
                        auth.key = LongTermKey::new(&self.credentials.username, realm, &self.credentials.password);
                    }
                    self.start(now, t.request, t.stale_nonces + 1);
                }
                _ => self.fail_request(now, t.request, TurnError::StaleNonce),
            },
            // A release of an allocation the server no longer has is done all the same.
            437 if t.request == (Request::Refresh { lifetime: 0 }) && self.state == State::Closing => self.finish(TurnEvent::Closed),
            _ => self.fail_request(now, t.request, TurnError::Rejected { code, reason }),
        }
    }

    fn succeed(&mut self, now: Instant, request: Request, message: &Message<'_>) {
        match request {
            Request::Allocate => {
                let (Some(relayed), Some(mapped), Some(lifetime)) = (message.xor_relayed, message.xor_mapped, message.lifetime) else {
                    self.finish(TurnEvent::Failed { error: TurnError::BadResponse { request: "Allocate" } });
                    return;
                };
                let lifetime = Duration::from_secs(lifetime.into());
                self.allocation = Some(Allocation { relayed, mapped, expires: now + lifetime, refresh_at: Some(now + refresh_delay(lifetime)) });
                self.state = State::Allocated;
                self.events.push_back(TurnEvent::Allocated { relayed, mapped, lifetime });
            }
            Request::Refresh { .. } if self.state == State::Closing => self.finish(TurnEvent::Closed),
            Request::Refresh { lifetime: requested } => {
                let Some(allocation) = self.allocation.as_mut() else { return };
                // No LIFETIME in the answer: the server granted what was asked or its default.
                let granted = message.lifetime.unwrap_or(if requested > 0 { requested } else { 600 });
                let lifetime = Duration::from_secs(granted.into());
                allocation.expires = now + lifetime;
                allocation.refresh_at = Some(now + refresh_delay(lifetime));
                if self.events.len() < self.config.event_queue {
                    self.events.push_back(TurnEvent::Refreshed { lifetime });
                }
            }
            Request::Permission { peer } => {
                let Some(lease) = self.permissions.get_mut(&peer) else { return };
                let first = lease.expires.is_none();
                lease.renew(now, PERMISSION_LIFETIME, self.config.permission_refresh);
                if first {
                    self.events.push_back(TurnEvent::PermissionCreated { peer });
                }
            }
            Request::ChannelBind { channel, peer } => {
                let Some(entry) = self.channels.get_mut(&peer) else { return };
                let first = entry.lease.expires.is_none();
                entry.lease.renew(now, CHANNEL_LIFETIME, self.config.channel_refresh);
                // The binding installed or refreshed the peer's permission too (RFC 8656
                // section 12.2).
                if let Some(lease) = self.permissions.get_mut(&peer.ip())
                    && !lease.in_flight
                {
                    let used = lease.used;
                    lease.renew(now, PERMISSION_LIFETIME, self.config.permission_refresh);
                    lease.used = used;
                }
                if first {
                    self.events.push_back(TurnEvent::ChannelBound { peer, channel });
                }
            }
        }
    }

    /// A request failed for good (error answer or timeout): what that means depends on it.
    fn fail_request(&mut self, now: Instant, request: Request, error: TurnError) {
        match request {
            Request::Allocate => self.finish(TurnEvent::Failed { error }),
            Request::Refresh { .. } if self.state == State::Closing => self.finish(TurnEvent::Closed),
            Request::Refresh { .. } => {
                // A refresh that timed out may have been lost on the way: try again while the
                // allocation lasts (expiry ends it). A refusal ends it now.
                if matches!(error, TurnError::Timeout { .. }) && self.allocation.is_some_and(|a| now < a.expires) {
                    let lifetime = self.requested_lifetime();
                    self.start(now, Request::Refresh { lifetime }, 0);
                } else {
                    self.finish(TurnEvent::Failed { error });
                }
            }
            Request::Permission { peer } => {
                if self.permissions.remove(&peer).is_some() {
                    self.events.push_back(TurnEvent::PermissionFailed { peer, error });
                }
            }
            Request::ChannelBind { channel, peer } => {
                if self.channels.remove(&peer).is_some() {
                    self.channel_peers.remove(&channel);
                    self.events.push_back(TurnEvent::ChannelBindFailed { peer, error });
                }
            }
        }
    }

    /// Ends the client with a terminal event.
    fn finish(&mut self, event: TurnEvent) {
        self.state = State::Done;
        self.transactions.clear();
        self.permissions.clear();
        self.channels.clear();
        self.channel_peers.clear();
        self.events.push_back(event);
    }
}

/// When to refresh an allocation of `lifetime`: a minute before it expires, or at half its
/// lifetime if that is two minutes or less.
fn refresh_delay(lifetime: Duration) -> Duration {
    if lifetime > Duration::from_secs(120) { lifetime - Duration::from_secs(60) } else { lifetime / 2 }
}

#[cfg(test)]
mod tests;
