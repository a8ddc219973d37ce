//! Calls on rooms: the reference's `DirectMedia` (a 1:1 room) and `GroupMedia` (a
//! conference): every member's connection carries this node's audio, video and screen tracks,
//! and what the members send arrives as their streams.
//!
//! [`Node::start_call`](crate::Node::start_call) in a room adds the configured tracks
//! (`"audio"`, `"video"`, in the stream `"call"`) to the connection with every member as soon
//! as it is up, and to every member that joins later; one
//! [`Node::send_call_frame`](crate::Node::send_call_frame) goes to all of them (encode once,
//! send to each). Mute and unmute per source reach every member; a screen share is one more
//! video track (`"screen"`, stream `"screen"`). A member's first track in the call is its
//! [`CallEvent::RemoteStream`]; when its tracks are gone (it stopped, left, or its connection
//! closed) [`CallEvent::RemoteStreamRemoved`] follows. Frames, mutes and keyframe requests
//! arrive as [`MediaEvent`](crate::MediaEvent)s with the member's fingerprint.
//!
//! A connection's tracks serve every call with that peer: two rooms in a call with the same
//! member share them.

use std::collections::{BTreeMap, BTreeSet};

use crate::identity::Fingerprint;
use crate::peer::media::{TrackId, TrackInfo, TrackKind, TrackOptions};

/// What a call sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CallConfig {
    /// Send audio (`"audio"`).
    pub audio: bool,
    /// Send video (`"video"`).
    pub video: bool,
}

impl CallConfig {
    /// Audio and video (the reference's `{ audio: true, video: true }`).
    pub fn audio_video() -> Self {
        CallConfig { audio: true, video: true }
    }

    /// Audio only (a voice chat).
    pub fn audio_only() -> Self {
        CallConfig { audio: true, video: false }
    }

    /// Video only.
    pub fn video_only() -> Self {
        CallConfig { audio: false, video: true }
    }
}

/// One of this node's media sources in a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// The microphone.
    Audio,
    /// The camera.
    Video,
    /// A screen share.
    Screen,
}

impl Source {
    /// The track id this source has on every connection.
    pub fn track_id(self) -> TrackId {
        TrackId(match self {
            Source::Audio => "audio",
            Source::Video => "video",
            Source::Screen => "screen",
        }
        .to_owned())
    }

    pub(crate) fn options(self, muted: bool) -> TrackOptions {
        let (kind, stream) = match self {
            Source::Audio => (TrackKind::Audio, "call"),
            Source::Video => (TrackKind::Video, "call"),
            Source::Screen => (TrackKind::Video, "screen"),
        };
        TrackOptions { kind, id: Some(self.track_id().0), stream: Some(stream.to_owned()), muted }
    }
}

/// Something that happened in a call; arrives as [`NodeEvent::Call`](crate::NodeEvent::Call).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallEvent {
    /// The call started here: these sources go to every member.
    LocalStream {
        /// The room.
        room: String,
        /// What this node sends.
        sources: Vec<Source>,
    },
    /// A member's media arrived (its first track in the call); more tracks of it may follow
    /// as [`MediaEvent::TrackAdded`](crate::MediaEvent::TrackAdded).
    RemoteStream {
        /// The room.
        room: String,
        /// The member.
        peer: Fingerprint,
        /// Its tracks so far.
        tracks: Vec<TrackInfo>,
    },
    /// A member's media is gone (it stopped, left, or its connection closed).
    RemoteStreamRemoved {
        /// The room.
        room: String,
        /// The member.
        peer: Fingerprint,
    },
}

pub(crate) struct Call {
    pub(crate) config: CallConfig,
    pub(crate) screen: bool,
    pub(crate) muted: BTreeSet<Source>,
    /// Members whose media arrived, with their tracks.
    pub(crate) remote: BTreeMap<Fingerprint, Vec<TrackInfo>>,
}

impl Call {
    pub(crate) fn new(config: CallConfig) -> Self {
        Call { config, screen: false, muted: BTreeSet::new(), remote: BTreeMap::new() }
    }

    /// The sources this call sends.
    pub(crate) fn sources(&self) -> Vec<Source> {
        let mut s = Vec::new();
        if self.config.audio {
            s.push(Source::Audio);
        }
        if self.config.video {
            s.push(Source::Video);
        }
        if self.screen {
            s.push(Source::Screen);
        }
        s
    }
}
