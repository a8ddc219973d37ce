//! Direct connections between two peers: one str0m [`Rtc`] per remote peer, negotiated
//! through the signaling server's relay, bound to both identities.
//!
//! A connection is owned and driven by a [`Node`](crate::node::Node); applications reach it
//! through the node's commands and events. This module holds its state machine and the types
//! the node's API uses.
//!
//! # Negotiation
//!
//! The side that calls [`Node::connect_to_peer`](crate::node::Node::connect_to_peer) makes an
//! offer for a fresh [`SessionId`]; the other answers. Both sign the DTLS fingerprint of their
//! description together with the session id and both identities ([`signal::sign_dtls`]); each
//! verifies the other's signature against the key behind the fingerprint it meant to reach, so
//! a signaling server that swaps descriptions or fingerprints gets
//! [`PeerError::IdentityMismatch`] and no connection, before any application data.
//!
//! **Perfect negotiation.** When both sides offer at once ("glare"), the side with the lower
//! identity fingerprint is *polite*: it drops its own offer and answers the other's; the
//! impolite side ignores the polite side's offer. Both decide from the same two fingerprints,
//! so exactly one connection results.
//!
//! **Liveness.** A connected peer that receives nothing for
//! [`PeerConfig::disconnect_timeout`] (str0m's ICE keep-alives flow every
//! [`PeerConfig::keepalive_interval`]) is [`PeerState::Disconnected`]; the impolite side then
//! restarts ICE with backoff until the path works again or
//! [`PeerConfig::failed_timeout`] passes ([`PeerState::Failed`]).

pub(crate) mod crypto;
pub mod media;
pub mod signal;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::{ChannelConfig, ChannelId, Reliability as StrReliability};
pub use str0m::config::DtlsVersion;
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, IceCreds, Input, Output, Rtc, RtcConfig};
use tracing::{debug, info, trace, warn};

use crate::identity::{Fingerprint, Identity};
use media::{Media, MediaError, MediaEvent, MediaFrame, TrackId, TrackInfo, TrackOptions};
use signal::{BindingError, RejectReason, SdpKind, SessionId, Signal};

/// The label of the channel every connection opens first (pre-negotiated as SCTP stream 0, so
/// it is open as soon as the connection is, with no extra round trip).
pub const DEFAULT_CHANNEL: &str = "default";
/// SCTP stream id of [`DEFAULT_CHANNEL`].
const DEFAULT_STREAM: u16 = 0;
/// The label of peerlink's own channel (pre-negotiated as SCTP stream 2, reliable and
/// ordered), which carries room messages ([`crate::room`]). Applications never see it: its
/// events go to the rooms, and [`ChannelError::Invalid`] refuses the label.
pub const INTERNAL_CHANNEL: &str = "peerlink";
/// SCTP stream id of [`INTERNAL_CHANNEL`].
const INTERNAL_STREAM: u16 = 2;
/// The label of peerlink's transfer channel (pre-negotiated as SCTP stream 4, reliable and
/// ordered), which carries file, JSON and image transfers ([`crate::transfer`]); like
/// [`INTERNAL_CHANNEL`], hidden from applications.
pub const TRANSFER_CHANNEL: &str = "peerlink-transfer";
/// SCTP stream id of [`TRANSFER_CHANNEL`].
const TRANSFER_STREAM: u16 = 4;

/// Whether `label` is one of peerlink's own channels.
pub(crate) fn is_internal(label: &str) -> bool {
    label == INTERNAL_CHANNEL || label == TRANSFER_CHANNEL
}
/// Most channels one connection may have open.
pub const MAX_CHANNELS: usize = 1024;
/// Longest channel label.
pub const MAX_LABEL_LEN: usize = 256;

/// How a direct connection behaves. Every field has a default; see each.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PeerConfig {
    /// A connection not up this long after its first offer fails. Default 30 s.
    pub connect_timeout: Duration,
    /// A connected peer silent this long is [`PeerState::Disconnected`]. Default 5 s.
    pub disconnect_timeout: Duration,
    /// A peer disconnected this long is [`PeerState::Failed`]. Default 60 s.
    pub failed_timeout: Duration,
    /// Restart ICE on its own while disconnected (with backoff from 1 s to 16 s). Default
    /// `true`.
    pub auto_ice_restart: bool,
    /// How often a working path is checked (str0m's maximum STUN retransmission timeout).
    /// Default 1 s.
    pub keepalive_interval: Duration,
    /// DTLS version. Default `Dtls12`: every WebRTC stack speaks it. `Auto` (1.3 when both
    /// sides speak it, one round trip less to connect) is not the default because dimpl 0.7's
    /// DTLS 1.3 loses connections: when the ACK of the client's last handshake flight is lost,
    /// the client resends the flight under new record numbers, the server repeats its old ACK,
    /// and the client retries with backoff until it gives up and fails the connection, about
    /// 34 minutes later (found by the simulator's lossy transfer scenarios).
    pub dtls_version: DtlsVersion,
    /// Carry the SCTP INIT in the SDP (SNAP) and skip SCTP's own 2-round-trip handshake when
    /// the remote agrees. Default `true`.
    pub snap: bool,
    /// The most bytes a connection may have written and not yet acknowledged, over all its
    /// channels (str0m's SCTP max buffered amount): the upper bound of the send window.
    /// Default 4 MiB.
    pub max_buffered_amount: usize,
    /// The send window's lower bound, and where it starts. The window is the data a
    /// connection keeps in flight: writes beyond it are refused with [`SendError::WouldBlock`]
    /// until [`crate::node::NodeEvent::BufferedAmountLow`] (when half of it is acknowledged).
    /// It follows the path's bandwidth-delay product (twice the measured delivery rate times
    /// the smallest round trip seen), between this and `max_buffered_amount`: small on a fast
    /// short path, where str0m's SCTP costs more CPU per packet the more is in flight, and
    /// large on a long one, where a small window would cap the rate at window / RTT. Default
    /// 64 KiB.
    pub min_send_window: usize,
    /// Target datagram size (str0m's MTU target, 576 to 1500). `None` (the default) picks
    /// 1500 when every local address is a loopback address (nothing is fragmented there) and
    /// 1150, which passes any Internet path, otherwise.
    pub mtu: Option<usize>,
}

impl Default for PeerConfig {
    fn default() -> Self {
        PeerConfig {
            connect_timeout: Duration::from_secs(30),
            disconnect_timeout: Duration::from_secs(5),
            failed_timeout: Duration::from_secs(60),
            auto_ice_restart: true,
            keepalive_interval: Duration::from_secs(1),
            dtls_version: DtlsVersion::Dtls12,
            snap: true,
            max_buffered_amount: 4 * 1024 * 1024,
            min_send_window: 64 * 1024,
            mtu: None,
        }
    }
}

/// A direct connection's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerState {
    /// Negotiating, checking paths, or in the DTLS handshake.
    Connecting,
    /// ICE and DTLS are up; channels can carry data.
    Connected,
    /// Was connected, and nothing has arrived for a while; it may recover.
    Disconnected,
    /// Gave up (timeout, identity mismatch, refused). Terminal.
    Failed,
    /// Closed by either side. Terminal.
    Closed,
}

/// What a data channel gives up for timeliness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reliability {
    /// Every message arrives (retransmitted as long as it takes).
    #[default]
    Reliable,
    /// A message is retransmitted at most this many times.
    MaxRetransmits(u16),
    /// A message is retransmitted for at most this long (milliseconds precision).
    MaxLifetime(Duration),
}

/// A data channel's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelOptions {
    /// Its label: unique among the channels this side creates on a connection, at most
    /// [`MAX_LABEL_LEN`] bytes. If both sides create the same label at the same moment, the
    /// connection has two channels of that name and sends by label use the first one opened;
    /// let one side (say the caller) create shared channels.
    pub label: String,
    /// Whether messages arrive in order. Default `true`.
    pub ordered: bool,
    /// Retransmission policy. Default reliable.
    pub reliability: Reliability,
    /// Sub-protocol name. Default empty.
    pub protocol: String,
}

impl ChannelOptions {
    /// A reliable, ordered channel called `label`.
    pub fn new(label: impl Into<String>) -> Self {
        ChannelOptions { label: label.into(), ordered: true, reliability: Reliability::Reliable, protocol: String::new() }
    }

    /// Makes it unordered.
    pub fn unordered(mut self) -> Self {
        self.ordered = false;
        self
    }

    /// Sets the retransmission policy.
    pub fn reliability(mut self, reliability: Reliability) -> Self {
        self.reliability = reliability;
        self
    }

    fn to_str0m(&self, negotiated: Option<u16>) -> ChannelConfig {
        ChannelConfig {
            label: self.label.clone(),
            ordered: self.ordered,
            reliability: match self.reliability {
                Reliability::Reliable => StrReliability::Reliable,
                Reliability::MaxRetransmits(n) => StrReliability::MaxRetransmits { retransmits: n },
                Reliability::MaxLifetime(d) => {
                    StrReliability::MaxPacketLifetime { lifetime: d.as_millis().min(u16::MAX as u128) as u16 }
                }
            },
            negotiated,
            protocol: self.protocol.clone(),
        }
    }
}

/// A message on a data channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// A text message (JSON is sent as text).
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
}

/// Why a connection failed or was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The remote description was not signed by the peer we meant to reach: someone on the
    /// signaling path altered it. No connection is made.
    #[error("identity mismatch: {0}")]
    IdentityMismatch(BindingError),
    /// The remote side refused the connection.
    #[error("the peer refused the connection: {0:?}")]
    Rejected(RejectReason),
    /// A remote description could not be used.
    #[error("bad remote description: {0}")]
    BadDescription(String),
    /// Not connected within [`PeerConfig::connect_timeout`].
    #[error("not connected within the connect timeout")]
    ConnectTimeout,
    /// Disconnected for longer than [`PeerConfig::failed_timeout`].
    #[error("disconnected for longer than the failed timeout")]
    Lost,
    /// The WebRTC stack failed (DTLS handshake or certificate check, SCTP).
    #[error("connection failed: {0}")]
    Transport(String),
}

/// Why a send was refused. Nothing is queued on refusal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// No connection to that peer.
    #[error("no connection to {0}")]
    UnknownPeer(Fingerprint),
    /// The connection has no channel with that label.
    #[error("no channel `{0}`")]
    UnknownChannel(String),
    /// The channel exists but is not open (yet, or any more).
    #[error("channel `{0}` is not open")]
    ChannelNotOpen(String),
    /// The message is larger than the connection carries.
    #[error("message of {size} bytes is over the {max}-byte limit")]
    MessageTooLarge {
        /// Its size.
        size: usize,
        /// The limit: the smaller of the remote's `max-message-size` and
        /// [`PeerConfig::max_buffered_amount`].
        max: usize,
    },
    /// The connection's send buffer is full: wait for
    /// [`crate::node::NodeEvent::BufferedAmountLow`] and try again.
    #[error("send buffer full ({buffered} bytes buffered)")]
    WouldBlock {
        /// Bytes buffered on the channel.
        buffered: usize,
    },
    /// The payload did not serialize to JSON.
    #[error("payload does not serialize: {0}")]
    Serialize(String),
}

/// Why a channel could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// No connection to that peer.
    #[error("no connection to {0}")]
    UnknownPeer(Fingerprint),
    /// A channel with that label exists.
    #[error("channel `{0}` exists")]
    Exists(String),
    /// Empty, too long, or too many channels.
    #[error("invalid channel: {0}")]
    Invalid(String),
}

/// A datagram to send from a local address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// The local address (socket) to send from.
    pub source: std::net::SocketAddr,
    /// Where to.
    pub destination: std::net::SocketAddr,
    /// The bytes.
    pub contents: Vec<u8>,
}

/// What a peer reports to its node.
#[derive(Debug)]
pub(crate) enum PeerOutput {
    State(PeerState),
    ChannelOpen(String),
    ChannelClosed(String),
    Data { channel: String, data: Payload },
    BufferedAmountLow(String),
    Error(PeerError),
    Media(MediaEvent),
}

/// Everything a peer needs from its node while handling an input.
pub(crate) struct Ctx<'a, R> {
    pub identity: &'a Identity,
    pub rng: &'a mut R,
    pub config: &'a PeerConfig,
    pub cert: &'a str0m::config::DtlsCert,
    pub candidates: &'a [Candidate],
    pub now: Instant,
    /// Datagrams to send.
    pub datagrams: &'a mut VecDeque<Datagram>,
    /// Negotiation messages to relay to the remote.
    pub signals: &'a mut VecDeque<Signal>,
    /// What happened.
    pub outputs: &'a mut VecDeque<PeerOutput>,
}

struct Chan {
    label: String,
    /// str0m opened it.
    ready: bool,
    /// Announced to the application (ready, and the connection is up).
    open: bool,
}

impl Chan {
    fn new(label: &str) -> Self {
        Chan { label: label.to_string(), ready: false, open: false }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Offerer,
    Answerer,
}

/// One direct connection. See the [module docs](self).
pub(crate) struct Peer {
    remote: Fingerprint,
    polite: bool,
    session: SessionId,
    role: Role,
    rtc: Rtc,
    config: PeerConfig,
    state: PeerState,
    state_since: Instant,
    started: Instant,
    last_rx: Instant,
    rtc_timeout: Option<Instant>,
    pending_offer: Option<SdpPendingOffer>,
    dtls_connected: bool,
    ice_connected: bool,
    /// In creation order (a handful per connection: a list beats a map).
    channels: Vec<(ChannelId, Chan)>,
    next_restart: Option<Instant>,
    restarts: u32,
    max_message: usize,
    window: SendWindow,
    /// Audio and video tracks, both ways.
    media: Media,
    /// Datagrams accepted before the remote's ICE credentials are known (an offerer before
    /// the first answer; `None` once known): STUN checks str0m's ICE agent holds until then
    /// (see [`Peer::release_early_checks`]).
    early_checks: Option<usize>,
}

/// Most STUN requests str0m's ICE agent holds before the remote's credentials are known.
const ICE_QUEUE: usize = 100;

/// The send window (see [`PeerConfig::min_send_window`]).
struct SendWindow {
    /// Bytes allowed in flight now.
    size: usize,
    /// Bytes ever written.
    written: u64,
    /// Acknowledged bytes and when, at the last adjustment.
    mark: Option<(Instant, u64)>,
    /// A write was refused for the window since the last adjustment.
    limited: bool,
    /// Channels whose writes were refused, to be told when the window has room.
    blocked: Vec<ChannelId>,
    /// The smallest round trip seen, and when.
    rtt_min: Option<(Duration, Instant)>,
    next_update: Option<Instant>,
}

fn ice_creds(rng: &mut impl RngCore) -> IceCreds {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut pick = |n: usize| -> String { (0..n).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect() };
    IceCreds { ufrag: pick(8), pass: pick(24) }
}

fn build_rtc<R: RngCore>(ctx: &mut Ctx<'_, R>) -> Rtc {
    let config = ctx.config;
    let mut builder: RtcConfig = Rtc::builder()
        .set_crypto_provider(crypto::provider())
        .set_dtls_cert(ctx.cert.clone())
        .set_local_ice_credentials(ice_creds(ctx.rng))
        .set_dtls_version(config.dtls_version)
        // The codecs peerlink speaks (`Codec`); str0m's defaults add H.265 and AV1, which
        // answers would otherwise accept from a browser and frames could not name.
        .clear_codecs()
        .enable_opus(true, false)
        .enable_vp8(true)
        .enable_vp9(true)
        .enable_h264(true)
        .set_snap_enabled(config.snap)
        .set_sctp_max_buffered_amount(config.max_buffered_amount)
        .set_mtu(mtu(config, ctx.candidates)..=usize::MAX)
        // The stats carry the round trip the send window follows.
        .set_stats_interval(Some(STATS_INTERVAL));
    builder.set_max_stun_rto(config.keepalive_interval.max(Duration::from_millis(100)));
    crypto::seed_next_dtls(ctx.rng.next_u64());
    let mut rtc = builder.build(ctx.now);
    for c in ctx.candidates {
        rtc.add_local_candidate(c.clone());
    }
    rtc
}

/// How often str0m reports the path's round trip.
const STATS_INTERVAL: Duration = Duration::from_millis(500);
/// How long a smallest round trip is trusted before newer samples replace it.
const RTT_MIN_AGE: Duration = Duration::from_secs(10);

/// The MTU target: configured, or 1500 on a loopback-only node, else str0m's safe default.
fn mtu(config: &PeerConfig, candidates: &[Candidate]) -> usize {
    let auto = if !candidates.is_empty() && candidates.iter().all(|c| c.addr().ip().is_loopback()) {
        str0m::DATAGRAM_MTU_TARGET_MAX
    } else {
        str0m::DATAGRAM_MTU_TARGET
    };
    config.mtu.unwrap_or(auto).clamp(str0m::DATAGRAM_MTU_TARGET_MIN, str0m::DATAGRAM_MTU_TARGET_MAX)
}

/// Verifies an offer or answer's identity binding.
fn verify(remote: Fingerprint, me: Fingerprint, kind: SdpKind, session: SessionId, sdp: &str, key: &str, sig: &str) -> Result<(), PeerError> {
    let dtls = signal::sdp_fingerprint(sdp).ok_or(PeerError::IdentityMismatch(BindingError::NoFingerprint))?;
    signal::verify_dtls(&remote, &me, kind, session, key, sig, &dtls).map_err(PeerError::IdentityMismatch)
}

/// The remote's message size limit until its description says otherwise (str0m's default).
const DEFAULT_REMOTE_MAX_MESSAGE: usize = 64 * 1024;

impl Peer {
    /// Starts a connection to `remote` by making an offer.
    pub(crate) fn offer<R: RngCore + rand::CryptoRng>(remote: Fingerprint, ctx: &mut Ctx<'_, R>) -> Result<Peer, PeerError> {
        let session = SessionId::random(ctx.rng);
        let rtc = build_rtc(ctx);
        let mut peer = Peer::new(remote, session, Role::Offerer, rtc, ctx);
        let mut api = peer.rtc.sdp_api();
        let id = api.add_channel_with_config(ChannelOptions::new(DEFAULT_CHANNEL).to_str0m(Some(DEFAULT_STREAM)));
        let internal = api.add_channel_with_config(ChannelOptions::new(INTERNAL_CHANNEL).to_str0m(Some(INTERNAL_STREAM)));
        let transfer = api.add_channel_with_config(ChannelOptions::new(TRANSFER_CHANNEL).to_str0m(Some(TRANSFER_STREAM)));
        let applied = api.apply();
        peer.channels.push((id, Chan::new(DEFAULT_CHANNEL)));
        peer.channels.push((internal, Chan::new(INTERNAL_CHANNEL)));
        peer.channels.push((transfer, Chan::new(TRANSFER_CHANNEL)));
        let Some((offer, pending)) = applied else {
            return Err(PeerError::Transport("str0m made no offer".into()));
        };
        peer.pending_offer = Some(pending);
        peer.send_description(SdpKind::Offer, offer.to_sdp_string(), ctx);
        peer.drain(ctx);
        info!(remote = %remote.short(), %session, "offering");
        Ok(peer)
    }

    /// Answers a first offer from `remote`.
    pub(crate) fn answer<R: RngCore + rand::CryptoRng>(
        remote: Fingerprint,
        session: SessionId,
        sdp: &str,
        key: &str,
        sig: &str,
        ctx: &mut Ctx<'_, R>,
    ) -> Result<Peer, PeerError> {
        verify(remote, ctx.identity.fingerprint(), SdpKind::Offer, session, sdp, key, sig)?;
        let rtc = build_rtc(ctx);
        let mut peer = Peer::new(remote, session, Role::Answerer, rtc, ctx);
        peer.accept_offer(sdp, ctx)?;
        // The pre-negotiated default channel: the offerer declared it in its offer.
        let id = peer.rtc.direct_api().create_data_channel(ChannelOptions::new(DEFAULT_CHANNEL).to_str0m(Some(DEFAULT_STREAM)));
        peer.channels.push((id, Chan::new(DEFAULT_CHANNEL)));
        let internal = peer.rtc.direct_api().create_data_channel(ChannelOptions::new(INTERNAL_CHANNEL).to_str0m(Some(INTERNAL_STREAM)));
        peer.channels.push((internal, Chan::new(INTERNAL_CHANNEL)));
        let transfer = peer.rtc.direct_api().create_data_channel(ChannelOptions::new(TRANSFER_CHANNEL).to_str0m(Some(TRANSFER_STREAM)));
        peer.channels.push((transfer, Chan::new(TRANSFER_CHANNEL)));
        peer.drain(ctx);
        info!(remote = %remote.short(), %session, "answering");
        Ok(peer)
    }

    fn new<R: RngCore>(remote: Fingerprint, session: SessionId, role: Role, rtc: Rtc, ctx: &Ctx<'_, R>) -> Peer {
        Peer {
            remote,
            polite: ctx.identity.fingerprint() < remote,
            session,
            role,
            rtc,
            config: ctx.config.clone(),
            state: PeerState::Connecting,
            state_since: ctx.now,
            started: ctx.now,
            last_rx: ctx.now,
            rtc_timeout: Some(ctx.now),
            pending_offer: None,
            dtls_connected: false,
            ice_connected: false,
            channels: Vec::new(),
            next_restart: None,
            restarts: 0,
            max_message: ctx.config.max_buffered_amount.min(DEFAULT_REMOTE_MAX_MESSAGE),
            window: SendWindow {
                size: ctx.config.min_send_window.min(ctx.config.max_buffered_amount),
                written: 0,
                mark: None,
                limited: false,
                blocked: Vec::new(),
                rtt_min: None,
                next_update: None,
            },
            media: Media::default(),
            early_checks: (role == Role::Offerer).then_some(0),
        }
    }

    /// The remote's ICE credentials just became known (the first answer): lets str0m's ICE
    /// agent answer the checks it held and start its own now.
    ///
    /// The agent (`is` 0.11) answers one held request per timeout and returns early without
    /// moving its clock, and its next timeout is its last clock plus the 50 ms pacing: the
    /// offerer's own checks (and the answerer's held ones) would wait up to 50 ms. One timeout
    /// per held request, then one that finds the queue empty and runs the checks, avoids that.
    fn release_early_checks<R: RngCore>(&mut self, ctx: &mut Ctx<'_, R>) {
        let Some(held) = self.early_checks.take() else { return };
        for _ in 0..=held.min(ICE_QUEUE) {
            if self.rtc.handle_input(Input::Timeout(ctx.now)).is_err() {
                break;
            }
        }
    }

    /// Bytes written on every channel and not yet acknowledged.
    fn buffered_total(&mut self) -> usize {
        let Peer { channels, rtc, .. } = self;
        channels.iter().filter(|(_, c)| c.open).filter_map(|(id, _)| rtc.channel(*id).map(|mut c| c.buffered_amount())).sum()
    }

    /// Re-sizes the send window to the path's bandwidth-delay product (see
    /// [`PeerConfig::min_send_window`]); tells blocked channels when there is room again.
    fn update_window<R: RngCore>(&mut self, ctx: &mut Ctx<'_, R>) {
        if self.window.blocked.is_empty() && !self.window.limited {
            return;
        }
        let now = ctx.now;
        let buffered = self.buffered_total();
        let acked = self.window.written.saturating_sub(buffered as u64);
        if self.window.next_update.is_none_or(|t| t <= now) {
            if let (Some((since, acked_then)), Some((rtt, _))) = (self.window.mark, self.window.rtt_min) {
                let elapsed = now.saturating_duration_since(since);
                if self.window.limited && !elapsed.is_zero() {
                    let rate = (acked - acked_then) as f64 / elapsed.as_secs_f64();
                    let bdp = (2.0 * rate * rtt.as_secs_f64()) as usize;
                    let (min, max) = (self.config.min_send_window, self.config.max_buffered_amount);
                    // Grow at most twofold per round, shrink gently.
                    let target = bdp.clamp(min, max);
                    let size = if target > self.window.size {
                        target.min(self.window.size * 2)
                    } else {
                        (self.window.size - (self.window.size - target) / 4).max(min)
                    };
                    if size != self.window.size {
                        trace!(remote = %self.remote.short(), from = self.window.size, to = size, rate, ?rtt, "send window");
                        self.window.size = size;
                    }
                }
            }
            self.window.mark = Some((now, acked));
            self.window.limited = false;
            let rtt = self.window.rtt_min.map_or(Duration::from_millis(100), |(r, _)| r);
            self.window.next_update = Some(now + (rtt * 2).clamp(Duration::from_millis(20), Duration::from_millis(500)));
        }
        if !self.window.blocked.is_empty() && buffered <= self.window.size / 2 {
            for id in std::mem::take(&mut self.window.blocked) {
                if let Some(chan) = self.chan(id).filter(|c| c.open) {
                    let label = chan.label.clone();
                    ctx.outputs.push_back(PeerOutput::BufferedAmountLow(label));
                }
            }
        }
    }

    fn note_rtt(&mut self, rtt: Duration, now: Instant) {
        let fresh = match self.window.rtt_min {
            None => true,
            Some((min, at)) => rtt <= min || now.saturating_duration_since(at) > RTT_MIN_AGE,
        };
        if fresh && !rtt.is_zero() {
            self.window.rtt_min = Some((rtt, now));
        }
    }

    pub(crate) fn session(&self) -> SessionId {
        self.session
    }

    pub(crate) fn state(&self) -> PeerState {
        self.state
    }

    pub(crate) fn is_polite(&self) -> bool {
        self.polite
    }

    pub(crate) fn has_pending_offer(&self) -> bool {
        self.pending_offer.is_some()
    }

    pub(crate) fn is_terminal(&self) -> bool {
        matches!(self.state, PeerState::Failed | PeerState::Closed)
    }

    /// Whether the connection has never been up (its `Rtc` can be thrown away).
    pub(crate) fn never_connected(&self) -> bool {
        !self.dtls_connected
    }

    /// The largest message a send accepts.
    pub(crate) fn max_message_size(&self) -> usize {
        self.max_message
    }

    /// Labels of the open channels, in creation order.
    pub(crate) fn open_channels(&self) -> impl Iterator<Item = &str> {
        self.channels.iter().filter(|(_, c)| c.open && !is_internal(&c.label)).map(|(_, c)| c.label.as_str())
    }

    /// Whether the channel called `label` is open.
    pub(crate) fn channel_open(&self, label: &str) -> bool {
        self.channels.iter().any(|(_, c)| c.open && c.label == label)
    }

    fn channel_id(&self, label: &str) -> Option<ChannelId> {
        self.channels.iter().find(|(_, c)| c.label == label).map(|(id, _)| *id)
    }

    fn chan(&mut self, id: ChannelId) -> Option<&mut Chan> {
        self.channels.iter_mut().find(|(i, _)| *i == id).map(|(_, c)| c)
    }

    /// The next instant this peer needs `handle_timeout`.
    pub(crate) fn timeout(&self) -> Option<Instant> {
        if self.is_terminal() {
            return None;
        }
        let own = match self.state {
            PeerState::Connecting => Some(self.started + self.config.connect_timeout),
            PeerState::Connected => Some(self.last_rx + self.config.disconnect_timeout),
            PeerState::Disconnected => Some(self.state_since + self.config.failed_timeout),
            _ => None,
        };
        let window = self.window.next_update.filter(|_| !self.window.blocked.is_empty() || self.window.limited);
        [self.rtc_timeout, self.next_restart, own, window].into_iter().flatten().min()
    }

    /// Whether a received datagram belongs to this connection.
    pub(crate) fn accepts(&self, input: &Input<'_>) -> bool {
        !self.is_terminal() && self.rtc.accepts(input)
    }

    /// Handles a datagram that [`Peer::accepts`].
    pub(crate) fn handle_input<R: RngCore>(&mut self, input: Input<'_>, ctx: &mut Ctx<'_, R>) {
        self.last_rx = ctx.now;
        if let Some(n) = &mut self.early_checks {
            *n += 1;
        }
        if self.state == PeerState::Disconnected {
            // The path works again (a blip shorter than ICE's own timeout).
            self.maybe_connected(ctx);
        }
        if let Err(e) = self.rtc.handle_input(input) {
            // Bad packets from the network are not our caller's error; a broken connection is
            // an event.
            debug!(remote = %self.remote.short(), error = %e, "str0m refused a datagram");
            if !self.rtc.is_alive() {
                self.fail(PeerError::Transport(e.to_string()), ctx);
                return;
            }
        }
        self.drain(ctx);
        self.update_window(ctx);
    }

    /// Advances timers.
    pub(crate) fn handle_timeout<R: RngCore + rand::CryptoRng>(&mut self, ctx: &mut Ctx<'_, R>) {
        if self.is_terminal() {
            return;
        }
        let now = ctx.now;
        if self.rtc_timeout.is_some_and(|t| t <= now) {
            if let Err(e) = self.rtc.handle_input(Input::Timeout(now)) {
                warn!(remote = %self.remote.short(), error = %e, "str0m timeout failed");
                if !self.rtc.is_alive() {
                    self.fail(PeerError::Transport(e.to_string()), ctx);
                    return;
                }
            }
            self.drain(ctx);
        }
        match self.state {
            PeerState::Connecting if now >= self.started + self.config.connect_timeout => {
                self.fail(PeerError::ConnectTimeout, ctx);
                return;
            }
            PeerState::Connected if now >= self.last_rx + self.config.disconnect_timeout => {
                info!(remote = %self.remote.short(), "nothing received for {:?}: disconnected", self.config.disconnect_timeout);
                self.set_state(PeerState::Disconnected, ctx);
            }
            PeerState::Disconnected if now >= self.state_since + self.config.failed_timeout => {
                self.fail(PeerError::Lost, ctx);
                return;
            }
            _ => {}
        }
        self.update_window(ctx);
        if self.next_restart.is_some_and(|t| t <= now) {
            self.next_restart = None;
            if self.state == PeerState::Disconnected {
                self.restart_ice(ctx);
                let backoff = Duration::from_secs(1 << self.restarts.min(4));
                self.restarts += 1;
                self.next_restart = Some(now + backoff);
            }
        }
    }

    /// Handles a negotiation message for this peer's session (or a new offer from it).
    pub(crate) fn handle_signal<R: RngCore + rand::CryptoRng>(&mut self, signal: Signal, ctx: &mut Ctx<'_, R>) {
        if self.is_terminal() {
            return;
        }
        match signal {
            Signal::Offer { session, sdp, key, sig } => {
                if session != self.session {
                    return;
                }
                if self.pending_offer.is_some() && !self.polite {
                    // Glare on a renegotiation: ours wins, the polite side answers it.
                    debug!(remote = %self.remote.short(), "ignoring a crossing offer (impolite side)");
                    return;
                }
                match verify(self.remote, ctx.identity.fingerprint(), SdpKind::Offer, session, &sdp, &key, &sig) {
                    Ok(()) => {
                        // A polite side's own pending offer is rolled back by accepting; its
                        // media changes go again after.
                        if self.pending_offer.take().is_some() {
                            self.media.offer_rolled_back();
                        }
                        if let Err(e) = self.accept_offer(&sdp, ctx) {
                            self.reject(e, ctx);
                            return;
                        }
                        self.negotiate(ctx);
                    }
                    Err(e) => self.reject(e, ctx),
                }
            }
            Signal::Answer { session, sdp, key, sig } => {
                if session != self.session {
                    return;
                }
                let Some(pending) = self.pending_offer.take() else {
                    debug!(remote = %self.remote.short(), "answer without an offer: ignored");
                    return;
                };
                let result = verify(self.remote, ctx.identity.fingerprint(), SdpKind::Answer, session, &sdp, &key, &sig)
                    .and_then(|()| SdpAnswer::from_sdp_string(&sdp).map_err(|e| PeerError::BadDescription(e.to_string())));
                match result {
                    Ok(answer) => {
                        self.note_max_message(&sdp);
                        if let Err(e) = self.rtc.sdp_api().accept_answer(pending, answer) {
                            self.reject(PeerError::BadDescription(e.to_string()), ctx);
                            return;
                        }
                        self.release_early_checks(ctx);
                        let mut events = Vec::new();
                        self.media.offer_answered(self.remote, &mut events);
                        ctx.outputs.extend(events.into_iter().map(PeerOutput::Media));
                        self.drain(ctx);
                        // Changes made while the offer was out go now.
                        self.negotiate(ctx);
                    }
                    Err(e) => self.reject(e, ctx),
                }
            }
            Signal::Candidate { session, candidate } => {
                if session != self.session {
                    return;
                }
                match Candidate::from_sdp_string(&candidate) {
                    Ok(c) => {
                        self.rtc.add_remote_candidate(c);
                        self.drain(ctx);
                    }
                    Err(e) => debug!(remote = %self.remote.short(), error = %e, "bad remote candidate: ignored"),
                }
            }
            Signal::Bye { session } => {
                if session == self.session {
                    info!(remote = %self.remote.short(), "closed by the peer");
                    self.rtc.disconnect();
                    self.set_state(PeerState::Closed, ctx);
                }
            }
            Signal::Reject { session, reason } => {
                if session == self.session {
                    let error = match reason {
                        RejectReason::IdentityMismatch => PeerError::IdentityMismatch(BindingError::BadSignature),
                        other => PeerError::Rejected(other),
                    };
                    self.rtc.disconnect();
                    self.fail(error, ctx);
                }
            }
        }
    }

    fn note_max_message(&mut self, sdp: &str) {
        // `a=max-message-size:N` (0 means "no limit" per RFC 8841).
        let remote = sdp
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix("a=max-message-size:"))
            .filter_map(|v| v.trim().parse::<usize>().ok())
            .next()
            .map(|n| if n == 0 { usize::MAX } else { n })
            .unwrap_or(DEFAULT_REMOTE_MAX_MESSAGE);
        self.max_message = self.config.max_buffered_amount.min(remote);
    }

    /// Answers a remote offer (verified): fitted to what this side sends (see
    /// [`Media::fit_offer`]), then str0m's.
    fn accept_offer<R: RngCore + rand::CryptoRng>(&mut self, sdp: &str, ctx: &mut Ctx<'_, R>) -> Result<(), PeerError> {
        let fitted = self.media.fit_offer(sdp);
        let offer = SdpOffer::from_sdp_string(&fitted).map_err(|e| PeerError::BadDescription(e.to_string()))?;
        let answer = self.rtc.sdp_api().accept_offer(offer).map_err(|e| PeerError::BadDescription(e.to_string()))?;
        self.note_max_message(sdp);
        self.send_description(SdpKind::Answer, answer.to_sdp_string(), ctx);
        self.drain(ctx);
        Ok(())
    }

    /// Refuses a remote description: tells the remote why, and fails.
    fn reject<R: RngCore>(&mut self, error: PeerError, ctx: &mut Ctx<'_, R>) {
        let reason = match &error {
            PeerError::IdentityMismatch(_) => RejectReason::IdentityMismatch,
            _ => RejectReason::BadDescription,
        };
        warn!(remote = %self.remote.short(), %error, "refusing the remote description");
        ctx.signals.push_back(Signal::Reject { session: self.session, reason });
        self.rtc.disconnect();
        self.fail(error, ctx);
    }

    fn send_description<R: RngCore + rand::CryptoRng>(&mut self, kind: SdpKind, sdp: String, ctx: &mut Ctx<'_, R>) {
        let dtls = self.rtc.direct_api().local_dtls_fingerprint().to_string();
        let (key, sig) = signal::sign_dtls(ctx.identity, ctx.rng, kind, self.session, &self.remote, &dtls);
        let session = self.session;
        ctx.signals.push_back(match kind {
            SdpKind::Offer => Signal::Offer { session, sdp, key, sig },
            SdpKind::Answer => Signal::Answer { session, sdp, key, sig },
        });
    }

    /// Adds a local candidate found after the connection started, and trickles it.
    pub(crate) fn add_local_candidate<R: RngCore>(&mut self, candidate: Candidate, ctx: &mut Ctx<'_, R>) {
        if self.is_terminal() {
            return;
        }
        if let Some(c) = self.rtc.add_local_candidate(candidate) {
            let line = c.to_sdp_string();
            let line = line.strip_prefix("a=").unwrap_or(&line).to_string();
            ctx.signals.push_back(Signal::Candidate { session: self.session, candidate: line });
        }
        self.drain(ctx);
    }

    /// Restarts ICE: new credentials, a new offer, the same DTLS and SCTP.
    pub(crate) fn restart_ice<R: RngCore + rand::CryptoRng>(&mut self, ctx: &mut Ctx<'_, R>) {
        if self.is_terminal() || self.pending_offer.is_some() {
            return;
        }
        let mut api = self.rtc.sdp_api();
        api.ice_restart(true);
        let Some((offer, pending)) = api.apply() else { return };
        info!(remote = %self.remote.short(), "restarting ICE");
        self.pending_offer = Some(pending);
        self.send_description(SdpKind::Offer, offer.to_sdp_string(), ctx);
        self.drain(ctx);
    }

    // ---- media -------------------------------------------------------------------------

    /// Adds a local track; the renegotiation starts now (or after the offer in flight).
    pub(crate) fn add_track<R: RngCore + rand::CryptoRng>(&mut self, options: TrackOptions, ctx: &mut Ctx<'_, R>) -> Result<TrackId, MediaError> {
        let id = self.media.add(options, ctx.rng.next_u64())?;
        self.negotiate(ctx);
        Ok(id)
    }

    /// Mutes or unmutes a local track (a renegotiation).
    pub(crate) fn set_track_muted<R: RngCore + rand::CryptoRng>(&mut self, id: &TrackId, muted: bool, ctx: &mut Ctx<'_, R>) -> Result<(), MediaError> {
        self.media.set_muted(id, muted)?;
        self.negotiate(ctx);
        Ok(())
    }

    /// Removes a local track (a renegotiation).
    pub(crate) fn remove_track<R: RngCore + rand::CryptoRng>(&mut self, id: &TrackId, ctx: &mut Ctx<'_, R>) -> Result<(), MediaError> {
        self.media.remove(id)?;
        self.negotiate(ctx);
        Ok(())
    }

    /// Writes a frame on a local track. `Ok(false)`: not sent (muted, or not negotiated
    /// yet, or the connection is not up).
    pub(crate) fn write_frame<R: RngCore>(&mut self, id: &TrackId, frame: MediaFrame, ctx: &mut Ctx<'_, R>) -> Result<bool, MediaError> {
        let (kind, mid) = self.media.sending_mid(id)?;
        if frame.codec.kind() != kind {
            return Err(MediaError::CodecNotNegotiated(frame.codec));
        }
        let Some(mid) = mid.filter(|_| self.state == PeerState::Connected) else { return Ok(false) };
        media::write(&mut self.rtc, mid, ctx.now, frame)?;
        self.drain(ctx);
        Ok(true)
    }

    /// Asks the remote for a keyframe on one of its tracks.
    pub(crate) fn request_keyframe<R: RngCore>(&mut self, id: &TrackId, ctx: &mut Ctx<'_, R>) -> Result<(), MediaError> {
        let mid = self.media.remote_mid(id)?;
        media::request_keyframe(&mut self.rtc, mid, id)?;
        self.drain(ctx);
        Ok(())
    }

    /// The negotiated tracks of both sides.
    pub(crate) fn tracks(&self) -> Vec<TrackInfo> {
        self.media.tracks()
    }

    /// Changes several tracks at once (`f` gets the tracks and a random number for ids);
    /// one renegotiation carries them all.
    pub(crate) fn change_tracks<R: RngCore + rand::CryptoRng, T>(&mut self, ctx: &mut Ctx<'_, R>, f: impl FnOnce(&mut Media, u64) -> T) -> T {
        let out = f(&mut self.media, ctx.rng.next_u64());
        self.negotiate(ctx);
        out
    }

    /// Offers the media changes waiting, unless an offer is in flight (its answer brings
    /// them here again).
    fn negotiate<R: RngCore + rand::CryptoRng>(&mut self, ctx: &mut Ctx<'_, R>) {
        if self.is_terminal() || self.pending_offer.is_some() || !self.media.needs_offer() {
            return;
        }
        let mut api = self.rtc.sdp_api();
        self.media.stage(&mut api);
        let Some((offer, pending)) = api.apply() else {
            // Nothing str0m needs to tell (e.g. a direction already so): it holds.
            let mut events = Vec::new();
            self.media.offer_answered(self.remote, &mut events);
            ctx.outputs.extend(events.into_iter().map(PeerOutput::Media));
            return;
        };
        debug!(remote = %self.remote.short(), "renegotiating media");
        self.pending_offer = Some(pending);
        self.send_description(SdpKind::Offer, offer.to_sdp_string(), ctx);
        self.drain(ctx);
    }

    /// Opens a named channel (in-band: the remote learns its label and options).
    pub(crate) fn create_channel<R: RngCore>(&mut self, options: &ChannelOptions, ctx: &mut Ctx<'_, R>) -> Result<(), ChannelError> {
        if options.label.is_empty() || options.label.len() > MAX_LABEL_LEN {
            return Err(ChannelError::Invalid(format!("a label is 1 to {MAX_LABEL_LEN} bytes")));
        }
        if is_internal(&options.label) {
            return Err(ChannelError::Invalid(format!("`{}` is peerlink's own channel", options.label)));
        }
        if self.channel_id(&options.label).is_some() {
            return Err(ChannelError::Exists(options.label.clone()));
        }
        if self.channels.len() >= MAX_CHANNELS {
            return Err(ChannelError::Invalid(format!("at most {MAX_CHANNELS} channels per connection")));
        }
        let id = self.rtc.direct_api().create_data_channel(options.to_str0m(None));
        self.channels.push((id, Chan::new(&options.label)));
        self.drain(ctx);
        Ok(())
    }

    /// Sends one message on the channel called `label`.
    pub(crate) fn send<R: RngCore>(&mut self, label: &str, binary: bool, data: &[u8], ctx: &mut Ctx<'_, R>) -> Result<(), SendError> {
        self.send_with(label, binary, data, true, ctx)
    }

    /// Whether a windowed message of `len` bytes on `label` would be refused now for want
    /// of room in the send window: `Err(WouldBlock)` then, and the channel is noted as
    /// waiting (its [`PeerOutput::BufferedAmountLow`] follows), as a refused send would. Lets
    /// a caller that must do costly work per message (sealing it) skip that work.
    pub(crate) fn check_window(&mut self, label: &str, len: usize) -> Result<(), SendError> {
        let Some(id) = self.channel_id(label) else {
            return Err(SendError::UnknownChannel(label.to_string()));
        };
        let buffered = self.buffered_total();
        if buffered > 0 && buffered + len > self.window.size {
            self.window.limited = true;
            if !self.window.blocked.contains(&id) {
                self.window.blocked.push(id);
            }
            return Err(SendError::WouldBlock { buffered });
        }
        Ok(())
    }

    /// [`Peer::send`], optionally past the send window (small control messages that must not
    /// wait behind data; str0m's own buffer limit still applies).
    pub(crate) fn send_with<R: RngCore>(
        &mut self,
        label: &str,
        binary: bool,
        data: &[u8],
        windowed: bool,
        ctx: &mut Ctx<'_, R>,
    ) -> Result<(), SendError> {
        let Some(id) = self.channel_id(label) else {
            return Err(SendError::UnknownChannel(label.to_string()));
        };
        if !self.chan(id).is_some_and(|c| c.open) || self.is_terminal() {
            return Err(SendError::ChannelNotOpen(label.to_string()));
        }
        if data.len() > self.max_message {
            return Err(SendError::MessageTooLarge { size: data.len(), max: self.max_message });
        }
        // A message bigger than the window still goes when nothing else is in flight.
        if windowed {
            self.check_window(label, data.len())?;
        }
        let Some(mut channel) = self.rtc.channel(id) else {
            return Err(SendError::ChannelNotOpen(label.to_string()));
        };
        let accepted = match channel.write(binary, data) {
            Ok(accepted) => accepted,
            Err(e) => {
                debug!(remote = %self.remote.short(), error = %e, "channel write failed");
                return Err(SendError::ChannelNotOpen(label.to_string()));
            }
        };
        if !accepted {
            let buffered = channel.buffered_amount();
            self.window.limited = true;
            if !self.window.blocked.contains(&id) {
                self.window.blocked.push(id);
            }
            return Err(SendError::WouldBlock { buffered });
        }
        self.window.written += data.len() as u64;
        if self.window.mark.is_none() {
            self.window.mark = Some((ctx.now, self.window.written - data.len() as u64));
        }
        self.drain(ctx);
        Ok(())
    }

    /// Bytes written on `label` and not yet acknowledged.
    pub(crate) fn buffered_amount(&mut self, label: &str) -> Option<usize> {
        let id = self.channel_id(label)?;
        self.rtc.channel(id).map(|mut c| c.buffered_amount())
    }

    /// Closes the connection: tells the remote, sends DTLS close_notify.
    pub(crate) fn close<R: RngCore>(&mut self, ctx: &mut Ctx<'_, R>) {
        if self.is_terminal() {
            return;
        }
        ctx.signals.push_back(Signal::Bye { session: self.session });
        if let Err(e) = self.rtc.close() {
            debug!(error = %e, "str0m close");
        }
        self.drain(ctx);
        self.rtc.disconnect();
        self.set_state(PeerState::Closed, ctx);
    }

    /// Ends this connection because the remote started a new session in its place: no
    /// messages to the remote; the application hears its channels close and the connection
    /// close, if it ever was up.
    pub(crate) fn abandon<R: RngCore>(&mut self, ctx: &mut Ctx<'_, R>) {
        if self.is_terminal() {
            return;
        }
        self.rtc.disconnect();
        if self.never_connected() {
            // Never announced as up (a dropped glare offer): nothing to retract but the state.
            self.state = PeerState::Closed;
            self.rtc_timeout = None;
        } else {
            self.set_state(PeerState::Closed, ctx);
        }
    }

    fn fail<R: RngCore>(&mut self, error: PeerError, ctx: &mut Ctx<'_, R>) {
        if self.is_terminal() {
            return;
        }
        warn!(remote = %self.remote.short(), %error, "connection failed");
        self.rtc.disconnect();
        ctx.outputs.push_back(PeerOutput::Error(error));
        self.set_state(PeerState::Failed, ctx);
    }

    fn set_state<R: RngCore>(&mut self, state: PeerState, ctx: &mut Ctx<'_, R>) {
        if self.state == state {
            return;
        }
        trace!(remote = %self.remote.short(), from = ?self.state, to = ?state, "state");
        self.state = state;
        self.state_since = ctx.now;
        match state {
            PeerState::Disconnected if self.config.auto_ice_restart && !self.polite => {
                self.restarts = 0;
                self.next_restart = Some(ctx.now + Duration::from_millis(500));
            }
            _ => self.next_restart = None,
        }
        if matches!(state, PeerState::Failed | PeerState::Closed) {
            for (_, chan) in self.channels.iter_mut().filter(|(_, c)| c.open) {
                chan.open = false;
                ctx.outputs.push_back(PeerOutput::ChannelClosed(chan.label.clone()));
            }
            let mut events = Vec::new();
            self.media.close(self.remote, &mut events);
            ctx.outputs.extend(events.into_iter().map(PeerOutput::Media));
            self.rtc_timeout = None;
        }
        ctx.outputs.push_back(PeerOutput::State(state));
    }

    /// Moves to `Connected` if DTLS is up and ICE has a working path.
    fn maybe_connected<R: RngCore>(&mut self, ctx: &mut Ctx<'_, R>) {
        if !(self.dtls_connected && self.ice_connected && matches!(self.state, PeerState::Connecting | PeerState::Disconnected)) {
            return;
        }
        self.restarts = 0;
        self.last_rx = ctx.now;
        self.set_state(PeerState::Connected, ctx);
        for (_, chan) in self.channels.iter_mut().filter(|(_, c)| c.ready && !c.open) {
            chan.open = true;
            ctx.outputs.push_back(PeerOutput::ChannelOpen(chan.label.clone()));
        }
    }

    /// Drains str0m after a mutation (its single-mutation invariant), turning its outputs into
    /// datagrams, node outputs and the next timeout.
    pub(crate) fn drain<R: RngCore>(&mut self, ctx: &mut Ctx<'_, R>) {
        loop {
            if !self.rtc.is_alive() {
                self.rtc_timeout = None;
                return;
            }
            let output = match self.rtc.poll_output() {
                Ok(o) => o,
                Err(e) => {
                    self.fail(PeerError::Transport(e.to_string()), ctx);
                    return;
                }
            };
            match output {
                Output::Timeout(t) => {
                    // str0m may name an instant already past; never ask to be woken before now.
                    self.rtc_timeout = Some(t.max(ctx.now));
                    return;
                }
                Output::Transmit(t) => {
                    ctx.datagrams.push_back(Datagram { source: t.source, destination: t.destination, contents: t.contents.into() });
                }
                Output::Event(e) => self.on_event(e, ctx),
            }
        }
    }

    fn on_event<R: RngCore>(&mut self, event: Event, ctx: &mut Ctx<'_, R>) {
        match event {
            Event::Connected => {
                self.dtls_connected = true;
                self.maybe_connected(ctx);
            }
            Event::IceConnectionStateChange(s) => {
                trace!(remote = %self.remote.short(), ice = ?s, "ICE state");
                match s {
                    IceConnectionState::Connected | IceConnectionState::Completed => {
                        self.ice_connected = true;
                        self.maybe_connected(ctx);
                    }
                    IceConnectionState::Disconnected => {
                        self.ice_connected = false;
                        if self.state == PeerState::Connected {
                            self.set_state(PeerState::Disconnected, ctx);
                        }
                    }
                    // Checking again (an ICE restart) says nothing about the current path.
                    _ => {}
                }
            }
            Event::ChannelOpen(id, label) => {
                if self.chan(id).is_none() && self.channels.len() >= MAX_CHANNELS {
                    // A remote opening channels without end: refuse the rest.
                    warn!(remote = %self.remote.short(), "too many channels: closing `{label}`");
                    self.rtc.direct_api().close_data_channel(id);
                    return;
                }
                if self.chan(id).is_none() && is_internal(&label) {
                    // Only the pre-negotiated stream carries that label.
                    warn!(remote = %self.remote.short(), "remote opened a channel with the internal label: closing it");
                    self.rtc.direct_api().close_data_channel(id);
                    return;
                }
                if self.chan(id).is_none() {
                    self.channels.push((id, Chan::new(&label)));
                }
                // A pre-negotiated channel is "open" in str0m before the connection is up;
                // the application hears of it once data can flow.
                let up = self.dtls_connected;
                if let Some(chan) = self.chan(id) {
                    chan.label = label.clone();
                    chan.ready = true;
                    if up && !chan.open {
                        chan.open = true;
                        ctx.outputs.push_back(PeerOutput::ChannelOpen(label));
                    }
                }
            }
            Event::ChannelData(d) => {
                let Some(label) = self.chan(d.id).map(|c| c.label.clone()) else {
                    warn!(remote = %self.remote.short(), id = ?d.id, len = d.data.len(), "data for an unknown channel dropped");
                    return;
                };
                let data = if d.binary {
                    Payload::Binary(d.data)
                } else {
                    match String::from_utf8(d.data) {
                        Ok(s) => Payload::Text(s),
                        Err(e) => {
                            // A text message that is not UTF-8 is the remote's fault: deliver
                            // it as binary rather than lose it.
                            debug!(remote = %self.remote.short(), "non-UTF-8 text message delivered as binary");
                            Payload::Binary(e.into_bytes())
                        }
                    }
                };
                ctx.outputs.push_back(PeerOutput::Data { channel: label, data });
            }
            Event::ChannelClose(id) => {
                if let Some(pos) = self.channels.iter().position(|(i, _)| *i == id) {
                    let (_, chan) = self.channels.remove(pos);
                    if chan.open {
                        ctx.outputs.push_back(PeerOutput::ChannelClosed(chan.label));
                    }
                }
            }
            // The send window decides when a blocked channel hears it has room (see
            // `update_window`); str0m's per-channel threshold is not used.
            Event::ChannelBufferedAmountLow(_) => {}
            Event::MediaAdded(m) => {
                let mut events = Vec::new();
                self.media.on_added(self.remote, m.mid, &self.rtc, &mut events);
                ctx.outputs.extend(events.into_iter().map(PeerOutput::Media));
            }
            Event::MediaChanged(m) => {
                let mut events = Vec::new();
                self.media.on_changed(self.remote, m.mid, m.direction, &self.rtc, &mut events);
                ctx.outputs.extend(events.into_iter().map(PeerOutput::Media));
            }
            Event::MediaData(data) => {
                let mut events = Vec::new();
                self.media.on_data(self.remote, data, &mut events);
                ctx.outputs.extend(events.into_iter().map(PeerOutput::Media));
            }
            Event::KeyframeRequest(req) => {
                let mut events = Vec::new();
                self.media.on_keyframe_request(self.remote, req.mid, &mut events);
                ctx.outputs.extend(events.into_iter().map(PeerOutput::Media));
            }
            Event::PeerStats(stats) => {
                // The ICE round trip of the selected path (STUN checks and keep-alives).
                let rtt = stats.selected_candidate_pair.and_then(|p| p.current_round_trip_time);
                if let Some(rtt) = rtt {
                    self.note_rtt(rtt, ctx.now);
                }
            }
            _ => {}
        }
    }

    /// Builds the `Input` for a received datagram (parse once, offer to every peer).
    pub(crate) fn parse_datagram(now: Instant, source: std::net::SocketAddr, destination: std::net::SocketAddr, contents: &[u8]) -> Option<Input<'_>> {
        Receive::new(Protocol::Udp, source, destination, contents).ok().map(|r| Input::Receive(now, r))
    }

    /// Whether this side made the session's first offer.
    pub(crate) fn is_offerer(&self) -> bool {
        self.role == Role::Offerer
    }
}
