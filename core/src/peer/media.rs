//! Audio and video tracks on a connection: str0m's media, negotiated through the same
//! identity-bound offers and answers as the connection itself.
//!
//! A Rust host has no camera: the application hands in **encoded** frames (Opus, VP8, VP9,
//! H.264) with their RTP timestamps and receives encoded frames; str0m packetizes,
//! depacketizes, paces, retransmits (NACK) and answers keyframe requests (PLI) on the wire.
//!
//! # Tracks and negotiation
//!
//! [`Node::add_track`](crate::Node::add_track) adds a send-only m-line (one per track; the
//! track id becomes its `msid` track id, grouped into `stream`); a change of the connection's
//! tracks (added, muted, unmuted, removed) is a renegotiation: an offer for the same session,
//! signed like the first. Changes made while an offer is in flight wait for its answer and go
//! in the next offer together. When both sides renegotiate at once, the polite side's offer is
//! rolled back (perfect negotiation, as for the connection) and offered again after it
//! answered.
//!
//! **Answers** send only where one of this side's tracks sends: a remote's `sendrecv` m-line
//! (a WebRTC client's plain `addTrack`) is answered `recvonly`, so that client is shown no
//! track nobody sends. A remote may also send on an m-line this side's track made (`addTrack`
//! reuses that transceiver): it is reported as the remote's track (named by the `msid` of its
//! offer) and the m-line goes both ways. Only [`Codec`]'s codecs are offered or accepted.
//!
//! **Muting** sets the track's direction to `inactive` (a renegotiation): the remote learns of
//! it ([`MediaEvent::Muted`]; a browser fires `mute` on its track), and frames written while
//! muted are dropped. Unmuting restores `sendonly`. **Removing** stops the m-line (port 0).
//!
//! # Bounds
//!
//! At most [`MAX_TRACKS`] local tracks per connection ([`MediaError::TooManyTracks`]) and
//! [`MAX_REMOTE_TRACKS`] remote ones reported (more are ignored, with a warning). Frames
//! are not queued here: str0m paces what it is given, and received frames are events, drained
//! like every other.

pub mod ivf;

use std::fmt;
use std::sync::Arc;

use str0m::format::Codec as StrCodec;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, MediaTime, Mid};
use tracing::{debug, trace};

use crate::identity::Fingerprint;

/// Most local tracks on one connection.
pub const MAX_TRACKS: usize = 32;
/// Most remote tracks reported on one connection (the description's 32 KiB limit allows a
/// few hundred m-lines); the rest are negotiated by str0m but not reported, their frames
/// dropped.
pub const MAX_REMOTE_TRACKS: usize = 64;

/// Audio or video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrackKind {
    /// Audio.
    Audio,
    /// Video.
    Video,
}

impl TrackKind {
    fn to_str0m(self) -> MediaKind {
        match self {
            TrackKind::Audio => MediaKind::Audio,
            TrackKind::Video => MediaKind::Video,
        }
    }

    fn from_str0m(kind: MediaKind) -> Self {
        match kind {
            MediaKind::Audio => TrackKind::Audio,
            MediaKind::Video => TrackKind::Video,
        }
    }
}

/// A codec frames are encoded with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Codec {
    /// Opus audio (48 kHz RTP clock).
    Opus,
    /// VP8 video (90 kHz RTP clock).
    Vp8,
    /// VP9 video (90 kHz).
    Vp9,
    /// H.264 video (90 kHz).
    H264,
}

impl Codec {
    /// Audio or video.
    pub fn kind(self) -> TrackKind {
        match self {
            Codec::Opus => TrackKind::Audio,
            _ => TrackKind::Video,
        }
    }

    /// The RTP clock rate timestamps count in: 48,000 for Opus, 90,000 for video.
    pub fn clock_rate(self) -> u32 {
        match self {
            Codec::Opus => 48_000,
            _ => 90_000,
        }
    }

    fn to_str0m(self) -> StrCodec {
        match self {
            Codec::Opus => StrCodec::Opus,
            Codec::Vp8 => StrCodec::Vp8,
            Codec::Vp9 => StrCodec::Vp9,
            Codec::H264 => StrCodec::H264,
        }
    }

    fn from_str0m(codec: StrCodec) -> Option<Self> {
        Some(match codec {
            StrCodec::Opus => Codec::Opus,
            StrCodec::Vp8 => Codec::Vp8,
            StrCodec::Vp9 => Codec::Vp9,
            StrCodec::H264 => Codec::H264,
            _ => return None,
        })
    }
}

/// A track's id: its `msid` track id, unique among one side's tracks on a connection (both
/// sides may have a track `"audio"`: events say which side's it is).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrackId(pub String);

impl fmt::Display for TrackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for TrackId {
    fn from(s: &str) -> Self {
        TrackId(s.to_owned())
    }
}

impl From<String> for TrackId {
    fn from(s: String) -> Self {
        TrackId(s)
    }
}

impl TrackId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How a track is added ([`Node::add_track`](crate::Node::add_track)).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TrackOptions {
    /// Audio or video.
    pub kind: TrackKind,
    /// Its id (`msid` track id: 1 to 64 of `A-Za-z0-9!#$%&'*+-.^_`|~`); a random one when
    /// `None`.
    pub id: Option<String>,
    /// The stream it belongs to (`msid` stream id; tracks of one stream play in sync: a
    /// camera's audio and video). `"peerlink"` when `None`.
    pub stream: Option<String>,
    /// Start muted.
    pub muted: bool,
}

impl TrackOptions {
    /// An audio track.
    pub fn audio() -> Self {
        TrackOptions { kind: TrackKind::Audio, id: None, stream: None, muted: false }
    }

    /// A video track.
    pub fn video() -> Self {
        TrackOptions { kind: TrackKind::Video, id: None, stream: None, muted: false }
    }

    /// With this id.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// In this stream.
    pub fn stream(mut self, stream: impl Into<String>) -> Self {
        self.stream = Some(stream.into());
        self
    }

    /// Muted from the start (`true`) or not.
    pub fn muted(mut self, muted: bool) -> Self {
        self.muted = muted;
        self
    }
}

/// A track as events describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackInfo {
    /// Its id.
    pub id: TrackId,
    /// The stream it belongs to.
    pub stream: String,
    /// Audio or video.
    pub kind: TrackKind,
    /// This side sends it (`false`: the remote does).
    pub local: bool,
}

/// An encoded frame to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaFrame {
    /// Its codec (one the remote accepted for the track: see
    /// [`MediaError::CodecNotNegotiated`]).
    pub codec: Codec,
    /// Its RTP timestamp, in the codec's [clock](Codec::clock_rate) (it wraps at 2^32 on
    /// the wire).
    pub rtp_time: u64,
    /// The encoded frame (a whole VP8/VP9 frame, H.264 access unit in Annex B, or Opus
    /// packet); shared, so that sending it to many peers copies nothing (`vec.into()`).
    pub data: Arc<[u8]>,
}

/// An encoded frame received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedFrame {
    /// Its codec.
    pub codec: Codec,
    /// Its RTP timestamp, in the codec's clock.
    pub rtp_time: u64,
    /// The frame, depacketized.
    pub data: Arc<[u8]>,
    /// A keyframe (video).
    pub keyframe: bool,
    /// It follows the previous frame without a gap (`false`: packets were lost in between;
    /// a decoder may need a keyframe: [`Node::request_keyframe`](crate::Node::request_keyframe)).
    pub contiguous: bool,
}

/// Something that happened to a connection's media; arrives as
/// [`NodeEvent::Media`](crate::NodeEvent::Media).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MediaEvent {
    /// A track was negotiated: the remote's (frames will arrive), or this side's (frames may
    /// be written now).
    TrackAdded {
        /// The peer.
        peer: Fingerprint,
        /// The track.
        track: TrackInfo,
    },
    /// A track is gone (removed by either side, or its connection closed).
    TrackRemoved {
        /// The peer.
        peer: Fingerprint,
        /// The track.
        track: TrackId,
    },
    /// One of this side's tracks starts (`true`) or stops sending, as the remote agreed:
    /// after [`MediaEvent::TrackAdded`], and after each mute or unmute is negotiated (from
    /// then on [`Node::write_frame`](crate::Node::write_frame) sends, or drops).
    Sending {
        /// The peer.
        peer: Fingerprint,
        /// This side's track.
        track: TrackId,
        /// Frames go now.
        sending: bool,
    },
    /// The remote muted (`true`) or unmuted one of its tracks.
    Muted {
        /// The peer.
        peer: Fingerprint,
        /// Its track.
        track: TrackId,
        /// Muted now.
        muted: bool,
    },
    /// A frame of a remote track.
    Frame {
        /// The peer.
        peer: Fingerprint,
        /// Its track.
        track: TrackId,
        /// The frame.
        frame: ReceivedFrame,
    },
    /// The remote asks for a keyframe on one of this side's tracks (its decoder lost the
    /// picture): encode the next frame as a keyframe.
    KeyframeRequested {
        /// The peer.
        peer: Fingerprint,
        /// This side's track.
        track: TrackId,
    },
}

/// Why a media command was refused (nothing changed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MediaError {
    /// No such track on that connection.
    #[error("no track `{0}`")]
    UnknownTrack(TrackId),
    /// A track with that id exists on that connection.
    #[error("track `{0}` exists")]
    DuplicateTrack(TrackId),
    /// The id is not a valid `msid` token (1 to 64 token characters).
    #[error("invalid track or stream id `{0}`")]
    InvalidId(String),
    /// [`MAX_TRACKS`] local tracks on that connection already.
    #[error("at most {MAX_TRACKS} tracks per connection")]
    TooManyTracks,
    /// The frame's codec does not fit the track (audio on video, or a codec the remote did
    /// not accept for it).
    #[error("codec {0:?} is not negotiated for this track")]
    CodecNotNegotiated(Codec),
    /// Only the remote's tracks can be asked for keyframes (and only after they arrived).
    #[error("no keyframe can be requested on `{0}`")]
    NoKeyframeRequest(TrackId),
    /// No call in that room ([`Node::start_call`](crate::Node::start_call) first).
    #[error("no call in room `{0}`")]
    NoCall(String),
    /// str0m refused the frame.
    #[error("media: {0}")]
    Rtc(String),
}

/// What this side wants for one of its tracks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Send,
    Muted,
    Stopped,
}

impl Want {
    /// The direction of the track's m-line: sending as wanted, and receiving too when the
    /// remote sends on the same m-line (`recv`: a WebRTC client's `addTrack` reuses the
    /// transceiver this side's track made).
    fn direction(self, recv: bool) -> Direction {
        match (self == Want::Send, recv) {
            (true, false) => Direction::SendOnly,
            (true, true) => Direction::SendRecv,
            (false, true) => Direction::RecvOnly,
            (false, false) => Direction::Inactive,
        }
    }
}

struct LocalTrack {
    info: TrackInfo,
    mid: Option<Mid>,
    want: Want,
    /// What the offer in flight says of it.
    offered: Option<Want>,
    /// What the last completed negotiation agreed.
    agreed: Option<Want>,
}

struct RemoteTrack {
    info: TrackInfo,
    mid: Mid,
    muted: bool,
}

/// One connection's tracks, both ways.
#[derive(Default)]
pub(crate) struct Media {
    local: Vec<LocalTrack>,
    remote: Vec<RemoteTrack>,
    /// A random id counter for tracks added without one.
    next_id: u64,
    /// What the remote's last offer named each of its m-lines (`msid` stream and track ids;
    /// at most [`MAX_OFFER_LINES`]): the name of what it sends there, also on an m-line that
    /// one of this side's tracks made.
    remote_msids: Vec<(Mid, String, String)>,
}

/// Most m-lines of a remote offer whose names are kept.
const MAX_OFFER_LINES: usize = 256;

fn valid_token(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| matches!(b, b'!' | b'#'..=b'\'' | b'*' | b'+' | b'-' | b'.' | b'0'..=b'9' | b'A'..=b'Z' | b'^'..=b'~'))
}

impl Media {
    pub(crate) fn add(&mut self, options: TrackOptions, random: u64) -> Result<TrackId, MediaError> {
        if self.local.iter().filter(|t| t.want != Want::Stopped).count() >= MAX_TRACKS {
            return Err(MediaError::TooManyTracks);
        }
        let id = match options.id {
            Some(id) => id,
            None => {
                self.next_id += 1;
                format!("t{:x}{:x}", random & 0xffff_ffff, self.next_id)
            }
        };
        let stream = options.stream.unwrap_or_else(|| "peerlink".to_owned());
        for s in [&id, &stream] {
            if !valid_token(s) {
                return Err(MediaError::InvalidId(s.clone()));
            }
        }
        let id = TrackId(id);
        if self.local.iter().any(|t| t.info.id == id) {
            return Err(MediaError::DuplicateTrack(id));
        }
        let want = if options.muted { Want::Muted } else { Want::Send };
        self.local.push(LocalTrack { info: TrackInfo { id: id.clone(), stream, kind: options.kind, local: true }, mid: None, want, offered: None, agreed: None });
        Ok(id)
    }

    fn local_mut(&mut self, id: &TrackId) -> Result<&mut LocalTrack, MediaError> {
        self.local.iter_mut().find(|t| &t.info.id == id && t.want != Want::Stopped).ok_or_else(|| MediaError::UnknownTrack(id.clone()))
    }

    pub(crate) fn set_muted(&mut self, id: &TrackId, muted: bool) -> Result<(), MediaError> {
        self.local_mut(id)?.want = if muted { Want::Muted } else { Want::Send };
        Ok(())
    }

    pub(crate) fn remove(&mut self, id: &TrackId) -> Result<(), MediaError> {
        self.local_mut(id)?.want = Want::Stopped;
        Ok(())
    }

    /// Whether an offer is needed to bring the negotiated state to what is wanted.
    pub(crate) fn needs_offer(&self) -> bool {
        self.local.iter().any(|t| t.offered.is_none() && Some(t.want) != t.agreed && !(t.want == Want::Stopped && t.agreed.is_none() && t.mid.is_none()))
    }

    /// Puts the wanted changes into an offer being made.
    pub(crate) fn stage(&mut self, api: &mut str0m::change::SdpApi<'_>) {
        // Stopped before ever negotiated: nothing to tell.
        self.local.retain(|t| !(t.want == Want::Stopped && t.agreed.is_none() && t.mid.is_none()));
        let remote = &self.remote;
        for t in &mut self.local {
            if t.offered.is_some() || Some(t.want) == t.agreed {
                continue;
            }
            // The remote sends on this m-line too: it stays, receiving.
            let recv = t.mid.is_some_and(|mid| remote.iter().any(|r| r.mid == mid));
            match (t.mid, t.want) {
                (None, want) => {
                    let mid = api.add_media(t.info.kind.to_str0m(), want.direction(false), Some(t.info.stream.clone()), Some(t.info.id.0.clone()), None);
                    t.mid = Some(mid);
                }
                (Some(mid), Want::Stopped) if !recv => api.stop_media(mid),
                (Some(mid), want) => api.set_direction(mid, want.direction(recv)),
            }
            t.offered = Some(t.want);
        }
    }

    /// The offer was answered: what it said holds; tracks agreed for the first time are
    /// reported.
    pub(crate) fn offer_answered(&mut self, peer: Fingerprint, out: &mut Vec<MediaEvent>) {
        for t in &mut self.local {
            if let Some(w) = t.offered.take() {
                if t.agreed.is_none() && w != Want::Stopped {
                    out.push(MediaEvent::TrackAdded { peer, track: t.info.clone() });
                }
                if w != Want::Stopped && t.agreed != Some(w) {
                    out.push(MediaEvent::Sending { peer, track: t.info.id.clone(), sending: w == Want::Send });
                }
                t.agreed = Some(w);
            }
        }
        self.local.retain(|t| t.agreed != Some(Want::Stopped));
    }

    /// The offer was rolled back (the remote's crossing offer won): offer it again later.
    pub(crate) fn offer_rolled_back(&mut self) {
        for t in &mut self.local {
            if t.offered.take().is_some() && t.agreed.is_none() {
                // Its m-line was never agreed: the next offer adds it afresh.
                t.mid = None;
            }
        }
    }

    /// The track behind `mid`, if it is ours and sending.
    fn local_by_mid(&self, mid: Mid) -> Option<&LocalTrack> {
        self.local.iter().find(|t| t.mid == Some(mid))
    }

    /// A frame for `id`: the mid to write it on, or `None` when the track does not send
    /// now (muted, or not negotiated yet).
    pub(crate) fn sending_mid(&self, id: &TrackId) -> Result<(TrackKind, Option<Mid>), MediaError> {
        let t = self.local.iter().find(|t| &t.info.id == id && t.want != Want::Stopped).ok_or_else(|| MediaError::UnknownTrack(id.clone()))?;
        Ok((t.info.kind, (t.want == Want::Send && t.agreed == Some(Want::Send)).then_some(t.mid).flatten()))
    }

    pub(crate) fn remote_mid(&self, id: &TrackId) -> Result<Mid, MediaError> {
        self.remote.iter().find(|t| &t.info.id == id).map(|t| t.mid).ok_or_else(|| MediaError::UnknownTrack(id.clone()))
    }

    /// Negotiated tracks of both sides (for a view).
    pub(crate) fn tracks(&self) -> Vec<TrackInfo> {
        let local = self.local.iter().filter(|t| t.want != Want::Stopped && t.agreed.is_some());
        local.map(|t| t.info.clone()).chain(self.remote.iter().map(|t| t.info.clone())).collect()
    }

    /// Whether this side has a track `id` (negotiated or not).
    pub(crate) fn has_local(&self, id: &TrackId) -> bool {
        self.local.iter().any(|t| &t.info.id == id && t.want != Want::Stopped)
    }

    /// Fits a remote offer to what this side sends, before str0m answers it, and notes
    /// each m-line's `msid`.
    ///
    /// str0m answers an m-line with the inverse of the offer's direction: a browser's
    /// `sendrecv` transceiver (plain `addTrack`) would be answered `sendrecv` and the browser
    /// would show a track this side never sends (with its own `msid` echoed back). So an
    /// m-line the remote offers to receive on is answered sending only when one of this
    /// side's tracks made it and sends: elsewhere `sendrecv` is read as `sendonly` and
    /// `recvonly` as `inactive`. Data (`m=application`) and stopped (port 0) m-lines are
    /// left as they are.
    pub(crate) fn fit_offer(&mut self, sdp: &str) -> String {
        let lines: Vec<&str> = sdp.lines().map(|l| l.trim_end_matches('\r')).collect();
        let mut out: Vec<String> = Vec::with_capacity(lines.len() + 4);
        self.remote_msids.clear();
        let mut start = 0;
        while start < lines.len() {
            let end = lines[start + 1..].iter().position(|l| l.starts_with("m=")).map_or(lines.len(), |p| start + 1 + p);
            let section = &lines[start..end];
            if section[0].starts_with("m=audio ") || section[0].starts_with("m=video ") {
                self.fit_section(section, &mut out);
            } else {
                out.extend(section.iter().map(|l| l.to_string()));
            }
            start = end;
        }
        let mut text = out.join("\r\n");
        text.push_str("\r\n");
        text
    }

    /// One media section of a remote offer (see [`Media::fit_offer`]).
    fn fit_section(&mut self, section: &[&str], out: &mut Vec<String>) {
        let stopped = section[0].split(' ').nth(1) == Some("0");
        let mid = section.iter().find_map(|l| l.strip_prefix("a=mid:")).map(str::trim);
        let msid = section.iter().find_map(|l| l.strip_prefix("a=msid:")).and_then(|v| {
            let mut parts = v.split_whitespace();
            Some((parts.next()?.to_owned(), parts.next().unwrap_or("").to_owned()))
        });
        if let (Some(mid), Some((stream, track))) = (mid, msid) {
            if !mid.is_empty() && mid.len() <= 16 && self.remote_msids.len() < MAX_OFFER_LINES {
                self.remote_msids.push((Mid::from(mid), stream, track));
            }
        }
        let sends = mid.is_some_and(|mid| self.local.iter().any(|t| t.want == Want::Send && t.mid.is_some_and(|m| &*m == mid)));
        let fit = |dir: &str| -> Option<&'static str> {
            match dir {
                "sendrecv" => Some("sendonly"),
                "recvonly" => Some("inactive"),
                _ => None,
            }
        };
        let mut has_direction = false;
        for line in section {
            let dir = line.strip_prefix("a=").filter(|d| matches!(*d, "sendrecv" | "sendonly" | "recvonly" | "inactive"));
            match dir {
                Some(dir) => {
                    has_direction = true;
                    match fit(dir).filter(|_| !stopped && !sends) {
                        Some(fitted) => {
                            trace!(?mid, from = dir, to = fitted, "remote offer fitted to what this side sends");
                            out.push(format!("a={fitted}"));
                        }
                        None => out.push(line.to_string()),
                    }
                }
                None => out.push(line.to_string()),
            }
        }
        // No direction attribute means `sendrecv`.
        if !has_direction && !stopped && !sends {
            out.push("a=sendonly".to_owned());
        }
    }

    /// str0m reports media on `mid` negotiated (either side's offer), or a renegotiation
    /// made it receiving.
    pub(crate) fn on_added(&mut self, peer: Fingerprint, mid: Mid, rtc: &str0m::Rtc, out: &mut Vec<MediaEvent>) {
        let Some(media) = rtc.media(mid) else { return };
        if !media.direction().is_receiving() || self.remote.iter().any(|t| t.mid == mid) {
            // This side's own sending track (reported when the answer agreed to it), or
            // media this side does not receive.
            trace!(?mid, "media this side does not receive: no remote track");
            return;
        }
        if self.remote.len() >= MAX_REMOTE_TRACKS {
            tracing::warn!(?mid, "more remote tracks than {MAX_REMOTE_TRACKS}: ignored");
            return;
        }
        // The remote's name for it; on an m-line this side made, str0m knows only ours.
        let (stream, mut id) = match self.remote_msids.iter().find(|(m, _, _)| *m == mid) {
            Some((_, stream, track)) => (stream.clone(), track.clone()),
            None if self.local_by_mid(mid).is_none() => (media.stream_id().to_owned(), media.track_id().to_owned()),
            None => (String::new(), String::new()),
        };
        if !valid_token(&id) || self.remote.iter().any(|t| t.info.id.0 == id) {
            // Without an msid, or one of its tracks already has it: named by its mid.
            id = format!("mid-{mid}");
        }
        let info = TrackInfo { id: TrackId(id), stream, kind: TrackKind::from_str0m(media.kind()), local: false };
        debug!(?mid, track = %info.id, "remote track");
        out.push(MediaEvent::TrackAdded { peer, track: info.clone() });
        self.remote.push(RemoteTrack { info, mid, muted: false });
    }

    /// A renegotiation changed media on `mid`.
    pub(crate) fn on_changed(&mut self, peer: Fingerprint, mid: Mid, direction: Direction, rtc: &str0m::Rtc, out: &mut Vec<MediaEvent>) {
        let Some(pos) = self.remote.iter().position(|t| t.mid == mid) else {
            if direction.is_receiving() {
                // A remote m-line that starts sending to us now, or the remote sends on one of
                // this side's m-lines.
                self.on_added(peer, mid, rtc, out);
            }
            return;
        };
        let stopped = rtc.media(mid).is_none_or(|m| m.stopped() || m.disabled());
        // On an m-line this side made, the remote not sending is its track gone (a WebRTC
        // client's `removeTrack`); on its own, muted.
        if stopped || (!direction.is_receiving() && self.local_by_mid(mid).is_some()) {
            let t = self.remote.remove(pos);
            out.push(MediaEvent::TrackRemoved { peer, track: t.info.id });
            return;
        }
        let muted = !direction.is_receiving();
        let t = &mut self.remote[pos];
        if t.muted != muted {
            t.muted = muted;
            out.push(MediaEvent::Muted { peer, track: t.info.id.clone(), muted });
        }
    }

    /// A frame arrived on `mid`.
    pub(crate) fn on_data(&self, peer: Fingerprint, data: str0m::media::MediaData, out: &mut Vec<MediaEvent>) {
        let Some(t) = self.remote.iter().find(|t| t.mid == data.mid) else {
            trace!(mid = ?data.mid, "media for no remote track dropped");
            return;
        };
        let Some(codec) = Codec::from_str0m(data.params.spec().codec) else { return };
        let keyframe = data.is_keyframe();
        let frame = ReceivedFrame { codec, rtp_time: data.time.numer(), data: data.data, keyframe, contiguous: data.contiguous };
        out.push(MediaEvent::Frame { peer, track: t.info.id.clone(), frame });
    }

    /// The remote asks for a keyframe on `mid`.
    pub(crate) fn on_keyframe_request(&self, peer: Fingerprint, mid: Mid, out: &mut Vec<MediaEvent>) {
        if let Some(t) = self.local_by_mid(mid) {
            out.push(MediaEvent::KeyframeRequested { peer, track: t.info.id.clone() });
        }
    }

    /// The connection ended: every remote track is gone.
    pub(crate) fn close(&mut self, peer: Fingerprint, out: &mut Vec<MediaEvent>) {
        for t in self.remote.drain(..) {
            out.push(MediaEvent::TrackRemoved { peer, track: t.info.id });
        }
    }
}

/// Writes `frame` on `mid`.
pub(crate) fn write(rtc: &mut str0m::Rtc, mid: Mid, now: std::time::Instant, frame: MediaFrame) -> Result<(), MediaError> {
    let Some(writer) = rtc.writer(mid) else { return Err(MediaError::Rtc("the track's media is gone".into())) };
    let want = frame.codec.to_str0m();
    let Some(pt) = writer.payload_params().find(|p| p.spec().codec == want).map(|p| p.pt()) else {
        return Err(MediaError::CodecNotNegotiated(frame.codec));
    };
    let time = MediaTime::new(frame.rtp_time, str0m::media::Frequency::new(frame.codec.clock_rate()).expect("a non-zero rate"));
    writer.write(pt, now, time, frame.data).map_err(|e| MediaError::Rtc(e.to_string()))
}

/// Asks the remote for a keyframe on its track `mid` (PLI, or FIR where only that was
/// negotiated).
pub(crate) fn request_keyframe(rtc: &mut str0m::Rtc, mid: Mid, id: &TrackId) -> Result<(), MediaError> {
    let mut writer = rtc.writer(mid).ok_or_else(|| MediaError::NoKeyframeRequest(id.clone()))?;
    let kind = if writer.is_request_keyframe_possible(KeyframeRequestKind::Pli) { KeyframeRequestKind::Pli } else { KeyframeRequestKind::Fir };
    writer.request_keyframe(None, kind).map_err(|_| MediaError::NoKeyframeRequest(id.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The media part of an offer as Chromium makes it after a plain `addTrack` of a camera
    /// (a `sendrecv` m-line), with a microphone transceiver that only receives and data.
    const OFFER: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1 2\r\n\
        m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:0\r\na=sctp-port:5000\r\n\
        m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=sendrecv\r\na=msid:cam video-track\r\na=rtpmap:96 VP8/90000\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:2\r\na=recvonly\r\na=rtpmap:111 opus/48000/2\r\n";

    fn directions(sdp: &str) -> Vec<String> {
        sdp.lines().filter_map(|l| l.strip_prefix("a=")).filter(|d| matches!(*d, "sendrecv" | "sendonly" | "recvonly" | "inactive")).map(str::to_owned).collect()
    }

    #[test]
    fn an_offer_is_answered_sending_only_where_this_side_sends() {
        let mut media = Media::default();
        let fitted = media.fit_offer(OFFER);
        // Answered (inverted by str0m): recvonly on the camera, inactive on the microphone.
        assert_eq!(directions(&fitted), ["sendonly", "inactive"]);
        // Everything else is as it was.
        let strip = |s: &str| s.lines().filter(|l| directions(l).is_empty()).map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(strip(&fitted), strip(OFFER));
        assert_eq!(media.remote_msids, [(Mid::from("1"), "cam".to_owned(), "video-track".to_owned())]);
        assert!(fitted.ends_with("\r\n"));
    }

    #[test]
    fn an_m_line_this_side_sends_on_keeps_its_direction() {
        let mut media = Media::default();
        media.add(TrackOptions::video().id("v"), 1).unwrap();
        media.local[0].mid = Some(Mid::from("1"));
        // The remote sends and receives on the m-line the track made: both ways.
        assert_eq!(directions(&media.fit_offer(OFFER)), ["sendrecv", "inactive"]);
        // Muted: this side no longer sends there, the remote still may.
        media.set_muted(&TrackId::from("v".to_owned()), true).unwrap();
        assert_eq!(directions(&media.fit_offer(OFFER)), ["sendonly", "inactive"]);
    }

    #[test]
    fn stopped_and_directionless_m_lines() {
        let mut media = Media::default();
        let offer = "v=0\r\nm=video 0 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=recvonly\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:2\r\n";
        let fitted = media.fit_offer(offer);
        // Port 0: left alone; no direction is sendrecv, read as sendonly.
        assert_eq!(directions(&fitted), ["recvonly", "sendonly"]);
        assert!(media.remote_msids.is_empty());
    }

    #[test]
    fn directions_follow_want_and_receiving() {
        assert_eq!(Want::Send.direction(false), Direction::SendOnly);
        assert_eq!(Want::Send.direction(true), Direction::SendRecv);
        assert_eq!(Want::Muted.direction(true), Direction::RecvOnly);
        assert_eq!(Want::Stopped.direction(false), Direction::Inactive);
    }
}
