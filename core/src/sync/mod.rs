//! Shared state over a room: [`StateSync`] (a key-value map ordered by hybrid logical
//! clocks, last-writer-wins or operational with a merge function) and [`CrdtSync`] (yrs /
//! Yjs documents).
//!
//! Both are sans-IO machines that know nothing of rooms: members come and go through
//! `handle_member_up` / `handle_member_down`, messages from them go in through
//! `handle_message`, and what they want sent comes out of `poll_message` as
//! [`SyncMessage`]s (to one member or to all). A [`Node`](crate::Node) runs one of each per
//! room it was asked to sync ([`Node::sync_state`](crate::Node::sync_state),
//! [`Node::sync_crdt`](crate::Node::sync_crdt)) and carries their messages as room messages,
//! so they take the direct path when it is up and the relay otherwise; it also cuts messages
//! larger than a room message into fragments (see `docs/PROTOCOL.md`, "Sync").
//!
//! Neither machine assumes anything of delivery: messages may arrive in any order, twice, or
//! never; replicas converge once the members have met again (every `handle_member_up`
//! starts a digest exchange that repairs whatever was lost).

pub mod crdt;
pub mod hlc;
pub(crate) mod host;
pub mod state;
#[doc(hidden)]
pub mod wire;

pub use crdt::{CrdtConfig, CrdtEvent, CrdtSync};
pub use hlc::{Hlc, HlcError, Timestamp};
pub use host::{KIND_CRDT, KIND_STATE, MAX_QUEUED_BYTES, SyncEvent};
pub use state::{MergeFn, StateConfig, StateEvent, StateMode, StateStats, StateSync};

use crate::identity::Fingerprint;

/// A message a sync machine wants sent to the room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncMessage {
    /// The member it is for, or `None` for every member.
    pub to: Option<Fingerprint>,
    /// Its bytes (see `docs/PROTOCOL.md`, "Sync").
    pub bytes: Vec<u8>,
}

/// Why a sync command was refused (nothing changed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// A key is empty or longer than [`state::MAX_KEY_LEN`] bytes.
    #[error("keys are 1 to {max} bytes, this one is {len}")]
    BadKey {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A value's JSON is longer than [`StateConfig::max_value_size`].
    #[error("a value is at most {max} bytes of JSON, this one is {size}")]
    ValueTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// [`StateConfig::max_keys`] keys (tombstones included) exist.
    #[error("at most {0} keys")]
    TooManyKeys(usize),
    /// The local clock could not advance (the logical counter is exhausted and the wall
    /// clock has not moved past the last timestamp).
    #[error(transparent)]
    Clock(#[from] HlcError),
    /// A document name is empty or longer than [`crdt::MAX_DOC_NAME`] bytes.
    #[error("document names are 1 to {max} bytes, this one is {len}")]
    BadDocName {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// [`CrdtConfig::max_docs`] documents are open.
    #[error("at most {0} documents")]
    TooManyDocs(usize),
    /// The room is not synced (call `Node::sync_state` / `Node::sync_crdt` first).
    #[error("room {0} is not synced")]
    NotSynced(String),
    /// A value could not be turned into JSON.
    #[error("serialize: {0}")]
    Serialize(String),
}

/// Why a sync message from a member was refused. Nothing in it was applied: the replica is
/// as it was before the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SyncWireError {
    /// Not a sync message of a known kind and version, or cut short, or with trailing bytes.
    #[error("malformed sync message: {0}")]
    Malformed(String),
    /// A timestamp further ahead of our clock than [`StateConfig::max_clock_offset`].
    #[error(transparent)]
    Clock(#[from] HlcError),
    /// An update or handshake for a document this replica has not opened.
    #[error("unknown document {0:?}")]
    UnknownDocument(String),
    /// yrs refused the update (it does not decode, or does not apply). The one exception
    /// to "nothing was applied": yrs does not roll back an update it refuses half-way
    /// through integrating it, so the part before the refusal stays (the same on every
    /// replica given the same update).
    #[error("bad document update for {doc:?}: {error}")]
    BadUpdate {
        /// The document.
        doc: String,
        /// What yrs said.
        error: String,
    },
    /// A message (or its fragments together) is larger than the configured limit.
    #[error("a sync message of {size} bytes is over the limit of {max}")]
    TooLarge {
        /// Its size, as announced or as received so far.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A key or value breaks the same rules local writes obey.
    #[error("bad entry: {0}")]
    BadEntry(#[from] SyncError),
}
