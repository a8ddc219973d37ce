//! The signaling wire protocol: JSON text frames between clients and the server.
//!
//! `docs/PROTOCOL.md` describes every message, field, error code, close code and limit; this
//! module is its executable form. Client frames are decoded by [`decode_client`] with precise,
//! typed errors (the request id is recovered whenever the frame has one, so the error reply can
//! name it); server frames by [`decode_server`]. Both decoders take untrusted text and never panic.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::identity::Fingerprint;

/// The protocol version this crate speaks; sent in `challenge` and `register`.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest namespace or room id, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Longest alias, in bytes.
pub const MAX_ALIAS_LEN: usize = 64;
/// Longest `meta`, room `metadata` or match `criteria`, in bytes of JSON.
pub const MAX_META_LEN: usize = 4096;
/// Longest `app_type` or `app_version`, in bytes.
pub const MAX_APP_FIELD_LEN: usize = 64;
/// Longest registration token, in bytes.
pub const MAX_TOKEN_LEN: usize = 4096;
/// Largest matchmaking group.
pub const MAX_GROUP_SIZE: u32 = 64;

/// Error codes carried by `error` frames. Serialized as `snake_case` strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame is not a JSON object.
    BadJson,
    /// The `type` is not one this server knows.
    UnknownType,
    /// A required field is missing.
    MissingField,
    /// A field has the wrong type, is out of range, or is not allowed.
    InvalidField,
    /// The client sent more than its rate allows; the frame was dropped.
    RateLimited,
    /// The request needs a registered connection.
    NotRegistered,
    /// `register` on a connection that is already registered.
    AlreadyRegistered,
    /// The client speaks a protocol version the server does not.
    UnsupportedVersion,
    /// The registration signature does not verify for this connection's challenge.
    BadSignature,
    /// The server requires a token and none was given.
    AuthRequired,
    /// The token is malformed, has a bad signature, or fails a claim check.
    AuthInvalid,
    /// The token has expired (or is not yet valid).
    AuthExpired,
    /// The client is already in as many namespaces as allowed.
    TooManyNamespaces,
    /// The client already owns or belongs to as many rooms as allowed.
    TooManyRooms,
    /// The client is not a member of that namespace.
    NotInNamespace,
    /// No registered peer has that fingerprint.
    PeerNotFound,
    /// The recipient is reconnecting and its bounded queue is full; the message was not queued.
    QueueFull,
    /// A room with that id already exists.
    RoomExists,
    /// No room has that id.
    RoomNotFound,
    /// The room is at its maximum size.
    RoomFull,
    /// Only the room's owner may do that.
    NotRoomOwner,
    /// The client (or the kick target) is not a member of that room.
    NotInRoom,
    /// No match formed before the server's match timeout.
    MatchTimeout,
    /// The match request was cancelled (by `cancel_match` or a new `match` in its place).
    MatchCancelled,
    /// The server is shutting down or otherwise cannot serve the request.
    Unavailable,
    /// `turn_credentials` on a server that has no TURN shared secret configured.
    TurnUnavailable,
}

impl ErrorCode {
    /// Every error code, in declaration order (`code as usize` indexes it).
    pub const ALL: [ErrorCode; 26] = {
        use ErrorCode::*;
        [
            BadJson,
            UnknownType,
            MissingField,
            InvalidField,
            RateLimited,
            NotRegistered,
            AlreadyRegistered,
            UnsupportedVersion,
            BadSignature,
            AuthRequired,
            AuthInvalid,
            AuthExpired,
            TooManyNamespaces,
            TooManyRooms,
            NotInNamespace,
            PeerNotFound,
            QueueFull,
            RoomExists,
            RoomNotFound,
            RoomFull,
            NotRoomOwner,
            NotInRoom,
            MatchTimeout,
            MatchCancelled,
            Unavailable,
            TurnUnavailable,
        ]
    };

    /// Returns the wire string.
    pub fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            BadJson => "bad_json",
            UnknownType => "unknown_type",
            MissingField => "missing_field",
            InvalidField => "invalid_field",
            RateLimited => "rate_limited",
            NotRegistered => "not_registered",
            AlreadyRegistered => "already_registered",
            UnsupportedVersion => "unsupported_version",
            BadSignature => "bad_signature",
            AuthRequired => "auth_required",
            AuthInvalid => "auth_invalid",
            AuthExpired => "auth_expired",
            TooManyNamespaces => "too_many_namespaces",
            TooManyRooms => "too_many_rooms",
            NotInNamespace => "not_in_namespace",
            PeerNotFound => "peer_not_found",
            QueueFull => "queue_full",
            RoomExists => "room_exists",
            RoomNotFound => "room_not_found",
            RoomFull => "room_full",
            NotRoomOwner => "not_room_owner",
            NotInRoom => "not_in_room",
            MatchTimeout => "match_timeout",
            MatchCancelled => "match_cancelled",
            Unavailable => "unavailable",
            TurnUnavailable => "turn_unavailable",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// WebSocket close codes the server uses when it ends a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseCode {
    /// 1000: normal closure (after `bye`, or server shutdown).
    Normal,
    /// 1001: the server is going away (shutdown).
    GoingAway,
    /// 1003: a binary frame; the protocol is text only.
    UnsupportedData,
    /// 1008: policy violation (repeated flooding, or a registration failure that is final).
    PolicyViolation,
    /// 1009: a frame above the maximum frame size.
    MessageTooBig,
    /// 1013: the server is at its connection limit; try again later.
    TryAgainLater,
    /// 4000: no frame arrived within the idle timeout.
    IdleTimeout,
    /// 4001: the client did not read fast enough and its outbound queue overflowed.
    SlowConsumer,
    /// 4002: the same identity registered on a newer connection.
    Replaced,
    /// 4003: the client did not register within the registration timeout.
    RegisterTimeout,
}

impl CloseCode {
    /// Every close code, in declaration order (`code as usize` indexes it).
    pub const ALL: [CloseCode; 10] = {
        use CloseCode::*;
        [
            Normal,
            GoingAway,
            UnsupportedData,
            PolicyViolation,
            MessageTooBig,
            TryAgainLater,
            IdleTimeout,
            SlowConsumer,
            Replaced,
            RegisterTimeout,
        ]
    };

    /// Returns the numeric code.
    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::UnsupportedData => 1003,
            CloseCode::PolicyViolation => 1008,
            CloseCode::MessageTooBig => 1009,
            CloseCode::TryAgainLater => 1013,
            CloseCode::IdleTimeout => 4000,
            CloseCode::SlowConsumer => 4001,
            CloseCode::Replaced => 4002,
            CloseCode::RegisterTimeout => 4003,
        }
    }

    /// Returns the code for a number, if it is one of ours.
    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// Returns the reason text sent with the close frame.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "bye",
            CloseCode::GoingAway => "server shutting down",
            CloseCode::UnsupportedData => "binary frames are not supported",
            CloseCode::PolicyViolation => "policy violation",
            CloseCode::MessageTooBig => "frame too large",
            CloseCode::TryAgainLater => "server full",
            CloseCode::IdleTimeout => "idle timeout",
            CloseCode::SlowConsumer => "slow consumer",
            CloseCode::Replaced => "replaced by a newer connection",
            CloseCode::RegisterTimeout => "registration timeout",
        }
    }
}

/// A frame that could not be decoded, with the error code to answer it with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct FrameError {
    /// The error code for the reply.
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub message: String,
    /// The request id, when the frame had a readable one.
    pub id: Option<u64>,
}

impl FrameError {
    fn new(code: ErrorCode, message: impl Into<String>, id: Option<u64>) -> Self {
        FrameError {
            code,
            message: message.into(),
            id,
        }
    }
}

/// A room's configuration as sent in `create_room`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoomConfig<'a> {
    /// The most members the room admits (owner included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_size: Option<u32>,
    /// Application metadata (a JSON object), returned by `room_info`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<&'a RawValue>,
}

/// A frame from a client to the server.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ClientMessage<'a> {
    /// Answers the server's `challenge`: proves the key and registers.
    Register {
        /// Request id.
        id: u64,
        /// The client's protocol version.
        version: u32,
        /// Base64 SEC1 public key.
        public_key: Cow<'a, str>,
        /// Display name.
        alias: Cow<'a, str>,
        /// Arbitrary metadata (a JSON object).
        #[serde(skip_serializing_if = "Option::is_none")]
        meta: Option<&'a RawValue>,
        /// Base64 signature over [`register_context`].
        signature: Cow<'a, str>,
        /// An access token (JWT), when the server requires one.
        #[serde(skip_serializing_if = "Option::is_none")]
        token: Option<Cow<'a, str>>,
    },
    /// Joins a namespace; answered by `joined` with the peer list.
    Join {
        /// Request id.
        id: u64,
        /// The namespace.
        namespace: Cow<'a, str>,
        /// The application type, shown to other peers.
        #[serde(skip_serializing_if = "Option::is_none")]
        app_type: Option<Cow<'a, str>>,
        /// The application version, shown to other peers.
        #[serde(skip_serializing_if = "Option::is_none")]
        app_version: Option<Cow<'a, str>>,
    },
    /// Leaves a namespace; answered by `ok`.
    Leave {
        /// Request id.
        id: u64,
        /// The namespace.
        namespace: Cow<'a, str>,
    },
    /// Lists a namespace's peers without joining; answered by `discovered`.
    Discover {
        /// Request id.
        id: u64,
        /// The namespace.
        namespace: Cow<'a, str>,
        /// The most peers to return.
        #[serde(skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Asks to be matched into a group; answered by `matched` once the group is full.
    Match {
        /// Request id.
        id: u64,
        /// The namespace to match in.
        namespace: Cow<'a, str>,
        /// Criteria (a JSON object); only requests with equal criteria match.
        #[serde(skip_serializing_if = "Option::is_none")]
        criteria: Option<&'a RawValue>,
        /// Group size, 2 to [`MAX_GROUP_SIZE`].
        group_size: u32,
    },
    /// Withdraws a pending `match` in a namespace; answered by `ok`.
    CancelMatch {
        /// Request id.
        id: u64,
        /// The namespace.
        namespace: Cow<'a, str>,
    },
    /// Sends a payload to one peer through the server.
    Relay {
        /// Request id; when present the server answers `ok` or `error`.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// The recipient.
        to: Fingerprint,
        /// Any JSON value.
        payload: &'a RawValue,
    },
    /// Sends a payload to every other member of a namespace.
    Broadcast {
        /// Request id; when present the server answers `ok` or `error`.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// The namespace (the sender must be a member).
        namespace: Cow<'a, str>,
        /// Any JSON value.
        payload: &'a RawValue,
    },
    /// Creates a room owned by the sender; answered by `room_created`.
    CreateRoom {
        /// Request id.
        id: u64,
        /// The room id.
        room_id: Cow<'a, str>,
        /// Size and metadata.
        config: RoomConfig<'a>,
    },
    /// Joins a room; answered by `room_joined`.
    JoinRoom {
        /// Request id.
        id: u64,
        /// The room id.
        room_id: Cow<'a, str>,
    },
    /// Leaves a room; answered by `ok`.
    LeaveRoom {
        /// Request id.
        id: u64,
        /// The room id.
        room_id: Cow<'a, str>,
    },
    /// Asks for a room's metadata; answered by `room_info`.
    RoomInfo {
        /// Request id.
        id: u64,
        /// The room id.
        room_id: Cow<'a, str>,
    },
    /// Lists rooms that are not full, by room id; answered by `rooms`.
    ListRooms {
        /// Request id.
        id: u64,
        /// Only rooms whose id starts with this (at most [`MAX_NAME_LEN`] bytes without control
        /// characters; may be empty).
        #[serde(skip_serializing_if = "Option::is_none")]
        prefix: Option<Cow<'a, str>>,
        /// The most rooms to return.
        #[serde(skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Removes a member from a room (owner only); answered by `ok`.
    Kick {
        /// Request id.
        id: u64,
        /// The room id.
        room_id: Cow<'a, str>,
        /// The member to remove.
        fingerprint: Fingerprint,
    },
    /// Closes a room (owner only); answered by `ok`.
    CloseRoom {
        /// Request id.
        id: u64,
        /// The room id.
        room_id: Cow<'a, str>,
    },
    /// Liveness check; answered by `pong`.
    Ping {
        /// Request id.
        id: u64,
    },
    /// Asks for short-lived TURN credentials; answered by `turn_credentials`, or
    /// `turn_unavailable` when the server has no TURN secret.
    TurnCredentials {
        /// Request id.
        id: u64,
    },
    /// Ends the session now: no resume grace, peers see it leave at once.
    Bye,
}

impl<'a> ClientMessage<'a> {
    /// Builds the `register` answer to a challenge: signs [`register_context`] for `server_id`
    /// and this connection's `nonce` with `identity`, mixing in the caller's randomness.
    #[allow(clippy::too_many_arguments)]
    pub fn register<R: rand::CryptoRng + ?Sized>(
        id: u64,
        identity: &crate::identity::Identity,
        rng: &mut R,
        server_id: &str,
        nonce: &str,
        alias: &'a str,
        meta: Option<&'a RawValue>,
        token: Option<&'a str>,
    ) -> Self {
        let signature = identity.sign(rng, &register_context(server_id, nonce));
        ClientMessage::Register {
            id,
            version: PROTOCOL_VERSION,
            public_key: identity.public_key().to_base64().into(),
            alias: alias.into(),
            meta,
            signature: signature.to_base64().into(),
            token: token.map(Into::into),
        }
    }
}

impl ClientMessage<'_> {
    /// Encodes the frame as JSON text.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("client messages always serialize")
    }

    /// Returns the request id, if the frame has one.
    pub fn id(&self) -> Option<u64> {
        use ClientMessage::*;
        match self {
            Register { id, .. }
            | Join { id, .. }
            | Leave { id, .. }
            | Discover { id, .. }
            | Match { id, .. }
            | CancelMatch { id, .. }
            | CreateRoom { id, .. }
            | JoinRoom { id, .. }
            | LeaveRoom { id, .. }
            | RoomInfo { id, .. }
            | ListRooms { id, .. }
            | Kick { id, .. }
            | CloseRoom { id, .. }
            | Ping { id }
            | TurnCredentials { id } => Some(*id),
            Relay { id, .. } | Broadcast { id, .. } => *id,
            Bye => None,
        }
    }
}

/// Returns the bytes a client signs to register: binds the signature to this protocol, this
/// server and this connection's challenge nonce, so it cannot be replayed anywhere else.
pub fn register_context(server_id: &str, nonce: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + server_id.len() + nonce.len());
    out.extend_from_slice(b"peerlink-register-v1\n");
    out.extend_from_slice(server_id.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(nonce.as_bytes());
    out
}

#[derive(Deserialize)]
struct RawRoomConfig<'a> {
    max_size: Option<u32>,
    #[serde(borrow)]
    metadata: Option<&'a RawValue>,
}

/// Every field any client frame may carry; the decoder checks which ones each type requires.
#[derive(Deserialize)]
struct RawClientFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    id: Option<u64>,
    version: Option<u32>,
    #[serde(borrow)]
    public_key: Option<Cow<'a, str>>,
    #[serde(borrow)]
    alias: Option<Cow<'a, str>>,
    #[serde(borrow)]
    meta: Option<&'a RawValue>,
    #[serde(borrow)]
    signature: Option<Cow<'a, str>>,
    #[serde(borrow)]
    token: Option<Cow<'a, str>>,
    #[serde(borrow)]
    namespace: Option<Cow<'a, str>>,
    #[serde(borrow)]
    app_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    app_version: Option<Cow<'a, str>>,
    limit: Option<u32>,
    #[serde(borrow)]
    criteria: Option<&'a RawValue>,
    group_size: Option<u32>,
    #[serde(borrow)]
    to: Option<Cow<'a, str>>,
    #[serde(borrow)]
    from: Option<&'a RawValue>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    #[serde(borrow)]
    room_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    prefix: Option<Cow<'a, str>>,
    #[serde(borrow)]
    config: Option<RawRoomConfig<'a>>,
    #[serde(borrow)]
    fingerprint: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct IdOnly {
    id: Option<u64>,
}

fn classify(err: &serde_json::Error, text: &str) -> FrameError {
    use serde_json::error::Category;
    let id = match err.classify() {
        Category::Data => serde_json::from_str::<IdOnly>(text).ok().and_then(|f| f.id),
        _ => None,
    };
    match err.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            FrameError::new(ErrorCode::BadJson, format!("not valid JSON: {err}"), None)
        }
        Category::Data => {
            let msg = err.to_string();
            if msg.starts_with("invalid type") && msg.contains("expected struct") {
                FrameError::new(ErrorCode::BadJson, "frame must be a JSON object", None)
            } else {
                FrameError::new(ErrorCode::InvalidField, msg, id)
            }
        }
    }
}

fn require_object(text: &str) -> Result<(), FrameError> {
    if text.trim_start().starts_with('{') {
        Ok(())
    } else {
        Err(FrameError::new(ErrorCode::BadJson, "frame must be a JSON object", None))
    }
}

fn need<T>(field: Option<T>, name: &str, id: Option<u64>) -> Result<T, FrameError> {
    field.ok_or_else(|| FrameError::new(ErrorCode::MissingField, format!("missing field `{name}`"), id))
}

/// Returns whether `name` is a valid namespace or room id: 1 to [`MAX_NAME_LEN`] bytes without
/// control characters.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && is_valid_prefix(name)
}

/// Returns whether `prefix` is a valid `list_rooms` prefix: a room id that may be empty, so at
/// most [`MAX_NAME_LEN`] bytes without control characters.
pub fn is_valid_prefix(prefix: &str) -> bool {
    prefix.len() <= MAX_NAME_LEN && !prefix.chars().any(char::is_control)
}

fn check_name<'a>(value: Cow<'a, str>, field: &str, id: Option<u64>) -> Result<Cow<'a, str>, FrameError> {
    if !is_valid_name(&value) {
        return Err(FrameError::new(
            ErrorCode::InvalidField,
            format!("`{field}` must be 1 to {MAX_NAME_LEN} bytes without control characters"),
            id,
        ));
    }
    Ok(value)
}

fn check_len<'a>(value: Option<Cow<'a, str>>, field: &str, max: usize, id: Option<u64>) -> Result<Option<Cow<'a, str>>, FrameError> {
    match value {
        Some(v) if v.len() > max => Err(FrameError::new(
            ErrorCode::InvalidField,
            format!("`{field}` is longer than {max} bytes"),
            id,
        )),
        other => Ok(other),
    }
}

fn check_object<'a>(value: Option<&'a RawValue>, field: &str, id: Option<u64>) -> Result<Option<&'a RawValue>, FrameError> {
    match value {
        Some(v) if v.get().len() > MAX_META_LEN => Err(FrameError::new(
            ErrorCode::InvalidField,
            format!("`{field}` is larger than {MAX_META_LEN} bytes"),
            id,
        )),
        Some(v) if !v.get().starts_with('{') => Err(FrameError::new(
            ErrorCode::InvalidField,
            format!("`{field}` must be a JSON object"),
            id,
        )),
        other => Ok(other),
    }
}

fn fingerprint(value: Option<Cow<'_, str>>, field: &str, id: Option<u64>) -> Result<Fingerprint, FrameError> {
    need(value, field, id)?.parse().map_err(|_| {
        FrameError::new(ErrorCode::InvalidField, format!("`{field}` must be a 64-hex-digit fingerprint"), id)
    })
}

/// Decodes a client frame. Never panics; every failure names its [`ErrorCode`].
pub fn decode_client(text: &str) -> Result<ClientMessage<'_>, FrameError> {
    require_object(text)?;
    let raw: RawClientFrame<'_> = serde_json::from_str(text).map_err(|e| classify(&e, text))?;
    let id = raw.id;
    let kind = need(raw.kind, "type", id)?;
    let req = || need(id, "id", None);
    let msg = match kind.as_ref() {
        "register" => ClientMessage::Register {
            id: req()?,
            version: need(raw.version, "version", id)?,
            public_key: need(raw.public_key, "public_key", id)?,
            alias: check_len(raw.alias, "alias", MAX_ALIAS_LEN, id)?.unwrap_or_default(),
            meta: check_object(raw.meta, "meta", id)?,
            signature: need(raw.signature, "signature", id)?,
            token: check_len(raw.token, "token", MAX_TOKEN_LEN, id)?,
        },
        "join" => ClientMessage::Join {
            id: req()?,
            namespace: check_name(need(raw.namespace, "namespace", id)?, "namespace", id)?,
            app_type: check_len(raw.app_type, "app_type", MAX_APP_FIELD_LEN, id)?,
            app_version: check_len(raw.app_version, "app_version", MAX_APP_FIELD_LEN, id)?,
        },
        "leave" => ClientMessage::Leave {
            id: req()?,
            namespace: check_name(need(raw.namespace, "namespace", id)?, "namespace", id)?,
        },
        "discover" => ClientMessage::Discover {
            id: req()?,
            namespace: check_name(need(raw.namespace, "namespace", id)?, "namespace", id)?,
            limit: raw.limit,
        },
        "match" => {
            let group_size = need(raw.group_size, "group_size", id)?;
            if !(2..=MAX_GROUP_SIZE).contains(&group_size) {
                return Err(FrameError::new(
                    ErrorCode::InvalidField,
                    format!("`group_size` must be 2 to {MAX_GROUP_SIZE}"),
                    id,
                ));
            }
            ClientMessage::Match {
                id: req()?,
                namespace: check_name(need(raw.namespace, "namespace", id)?, "namespace", id)?,
                criteria: check_object(raw.criteria, "criteria", id)?,
                group_size,
            }
        }
        "cancel_match" => ClientMessage::CancelMatch {
            id: req()?,
            namespace: check_name(need(raw.namespace, "namespace", id)?, "namespace", id)?,
        },
        "relay" | "broadcast" => {
            if raw.from.is_some() {
                return Err(FrameError::new(
                    ErrorCode::InvalidField,
                    "`from` is set by the server from the registered identity",
                    id,
                ));
            }
            let payload = need(raw.payload, "payload", id)?;
            if kind == "relay" {
                ClientMessage::Relay { id, to: fingerprint(raw.to, "to", id)?, payload }
            } else {
                ClientMessage::Broadcast {
                    id,
                    namespace: check_name(need(raw.namespace, "namespace", id)?, "namespace", id)?,
                    payload,
                }
            }
        }
        "create_room" => {
            let config = raw.config.unwrap_or(RawRoomConfig { max_size: None, metadata: None });
            ClientMessage::CreateRoom {
                id: req()?,
                room_id: check_name(need(raw.room_id, "room_id", id)?, "room_id", id)?,
                config: RoomConfig {
                    max_size: config.max_size,
                    metadata: check_object(config.metadata, "config.metadata", id)?,
                },
            }
        }
        "join_room" | "leave_room" | "room_info" | "close_room" => {
            let id = req()?;
            let room_id = check_name(need(raw.room_id, "room_id", Some(id))?, "room_id", Some(id))?;
            match kind.as_ref() {
                "join_room" => ClientMessage::JoinRoom { id, room_id },
                "leave_room" => ClientMessage::LeaveRoom { id, room_id },
                "room_info" => ClientMessage::RoomInfo { id, room_id },
                _ => ClientMessage::CloseRoom { id, room_id },
            }
        }
        "list_rooms" => {
            let id = req()?;
            if raw.prefix.as_deref().is_some_and(|p| !is_valid_prefix(p)) {
                return Err(FrameError::new(
                    ErrorCode::InvalidField,
                    format!("`prefix` must be at most {MAX_NAME_LEN} bytes without control characters"),
                    Some(id),
                ));
            }
            ClientMessage::ListRooms { id, prefix: raw.prefix, limit: raw.limit }
        }
        "kick" => ClientMessage::Kick {
            id: req()?,
            room_id: check_name(need(raw.room_id, "room_id", id)?, "room_id", id)?,
            fingerprint: fingerprint(raw.fingerprint, "fingerprint", id)?,
        },
        "ping" => ClientMessage::Ping { id: req()? },
        "turn_credentials" => ClientMessage::TurnCredentials { id: req()? },
        "bye" => ClientMessage::Bye,
        other => {
            let mut shown: String = other.chars().take(32).collect();
            if shown.len() < other.len() {
                shown.push('…');
            }
            return Err(FrameError::new(ErrorCode::UnknownType, format!("unknown type `{shown}`"), id));
        }
    };
    Ok(msg)
}

/// A JSON value carried verbatim (payloads, metadata, criteria); compared by its text.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct RawJson(pub Box<RawValue>);

impl<'de> Deserialize<'de> for RawJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Inside internally tagged enums (every `ServerMessage`) serde buffers the content,
        // which `RawValue` cannot pass through; go through `Value` so `meta` and `metadata`
        // decode. Relay and broadcast payloads are decoded as `RawValue`, verbatim.
        let value = serde_json::Value::deserialize(d)?;
        serde_json::value::to_raw_value(&value).map(RawJson).map_err(serde::de::Error::custom)
    }
}

impl RawJson {
    /// Wraps JSON text after checking that it is valid JSON.
    pub fn from_string(json: String) -> Result<Self, serde_json::Error> {
        RawValue::from_string(json).map(RawJson)
    }

    /// Serializes a value.
    pub fn from_value<T: Serialize + ?Sized>(value: &T) -> Result<Self, serde_json::Error> {
        serde_json::value::to_raw_value(value).map(RawJson)
    }

    /// Returns the JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// Parses the JSON into a typed value.
    pub fn parse<'a, T: Deserialize<'a>>(&'a self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.0.get())
    }

    /// Parses the JSON into a [`serde_json::Value`].
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_str(self.0.get()).unwrap_or(serde_json::Value::Null)
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl From<&RawValue> for RawJson {
    fn from(v: &RawValue) -> Self {
        RawJson(v.to_owned())
    }
}

/// A peer as the server describes it in lists and notices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The peer's verified fingerprint.
    pub fingerprint: Fingerprint,
    /// The peer's display name.
    #[serde(default)]
    pub alias: String,
    /// The peer's metadata, as it registered it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<RawJson>,
    /// The application type given when joining the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_type: Option<String>,
    /// The application version given when joining the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_version: Option<String>,
}

/// A room as `rooms` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomListing {
    /// The room id.
    pub room_id: String,
    /// The owner.
    pub owner: Fingerprint,
    /// The room's size limit.
    pub max_size: u32,
    /// The room's metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<RawJson>,
    /// How many members it has now (fewer than `max_size`).
    pub members: usize,
}

/// A frame from the server to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ServerMessage {
    /// Sent first on every connection: sign `nonce` to register.
    Challenge {
        /// The server's protocol version.
        version: u32,
        /// The server's identity, part of the signed context.
        server_id: String,
        /// A fresh random nonce for this connection (base64).
        nonce: String,
        /// Whether `register` must carry a token.
        #[serde(default)]
        auth_required: bool,
    },
    /// Registration succeeded.
    Registered {
        /// The `register` request id.
        id: u64,
        /// The fingerprint the server derived from the key.
        fingerprint: Fingerprint,
        /// The alias as registered.
        alias: String,
        /// Whether a parked session (namespaces, rooms, queued messages) was resumed.
        #[serde(default)]
        resumed: bool,
        /// Namespaces the resumed session is in.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        namespaces: Vec<String>,
        /// Rooms the resumed session is in.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        rooms: Vec<String>,
        /// Frames for this session that were dropped while it was away (queue overflow).
        #[serde(default, skip_serializing_if = "is_zero")]
        missed: u64,
    },
    /// Reply to `join`.
    Joined {
        /// The request id.
        id: u64,
        /// The namespace.
        namespace: String,
        /// The other members (at most the server's peer-list limit).
        peers: Vec<PeerInfo>,
        /// How many other members there are in all.
        total: usize,
    },
    /// Reply to `discover`.
    Discovered {
        /// The request id.
        id: u64,
        /// The namespace.
        namespace: String,
        /// Members, at most `limit`.
        peers: Vec<PeerInfo>,
    },
    /// A match formed; sent to every member of the group at once.
    Matched {
        /// The member's own `match` request id.
        id: u64,
        /// The namespace.
        namespace: String,
        /// A fresh id shared by the whole group.
        session_id: String,
        /// Every member of the group, the recipient included, in the same order for all.
        peers: Vec<PeerInfo>,
    },
    /// A peer joined a namespace the recipient is in.
    PeerJoined {
        /// The namespace.
        namespace: String,
        /// The peer.
        peer: PeerInfo,
    },
    /// A peer left a namespace the recipient is in.
    PeerLeft {
        /// The namespace.
        namespace: String,
        /// The peer.
        fingerprint: Fingerprint,
    },
    /// A relayed payload.
    Relay {
        /// The sender, as verified at registration.
        from: Fingerprint,
        /// The payload, verbatim.
        payload: RawJson,
    },
    /// A namespace broadcast.
    Broadcast {
        /// The sender, as verified at registration.
        from: Fingerprint,
        /// The namespace.
        namespace: String,
        /// The payload, verbatim.
        payload: RawJson,
    },
    /// Success reply to requests without a richer result.
    Ok {
        /// The request id.
        id: u64,
    },
    /// Reply to `create_room`.
    RoomCreated {
        /// The request id.
        id: u64,
        /// The room.
        room_id: String,
        /// The owner (the creator).
        owner: Fingerprint,
        /// The room's size limit.
        max_size: u32,
        /// The room's metadata.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        metadata: Option<RawJson>,
    },
    /// Reply to `join_room`.
    RoomJoined {
        /// The request id.
        id: u64,
        /// The room.
        room_id: String,
        /// The owner.
        owner: Fingerprint,
        /// The room's size limit.
        max_size: u32,
        /// The room's metadata.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        metadata: Option<RawJson>,
        /// The other members.
        peers: Vec<PeerInfo>,
    },
    /// Reply to `room_info`.
    RoomInfo {
        /// The request id.
        id: u64,
        /// The room.
        room_id: String,
        /// The owner.
        owner: Fingerprint,
        /// The room's size limit.
        max_size: u32,
        /// The room's metadata.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        metadata: Option<RawJson>,
        /// How many members it has now.
        members: usize,
    },
    /// Reply to `list_rooms`.
    Rooms {
        /// The request id.
        id: u64,
        /// Rooms that are not full, sorted by room id, at most `limit`.
        rooms: Vec<RoomListing>,
    },
    /// A peer joined a room the recipient is in.
    RoomPeerJoined {
        /// The room.
        room_id: String,
        /// The peer.
        peer: PeerInfo,
    },
    /// A peer left a room the recipient is in (or was kicked).
    RoomPeerLeft {
        /// The room.
        room_id: String,
        /// The peer.
        fingerprint: Fingerprint,
        /// Whether the owner kicked it.
        #[serde(default)]
        kicked: bool,
    },
    /// The room was closed by its owner.
    RoomClosed {
        /// The room.
        room_id: String,
    },
    /// The recipient was kicked from a room.
    Kicked {
        /// The room.
        room_id: String,
    },
    /// Reply to `ping`.
    Pong {
        /// The request id.
        id: u64,
    },
    /// Reply to `turn_credentials`: TURN REST API credentials (username
    /// `<expiry unix seconds>:<fingerprint>`, credential base64(HMAC-SHA1(secret, username))).
    TurnCredentials {
        /// The request id.
        id: u64,
        /// The TURN user name, `<expiry unix seconds>:<fingerprint>`.
        username: String,
        /// The TURN password: base64 of HMAC-SHA1 of `username` keyed with the shared secret.
        credential: String,
        /// Seconds from issue to expiry.
        ttl: u64,
        /// The TURN servers that accept them (`turn:host:port?transport=udp`, ...).
        urls: Vec<String>,
    },
    /// A request failed, or a frame could not be processed.
    Error {
        /// The request id, when the failed frame had one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// What went wrong.
        code: ErrorCode,
        /// A human-readable explanation.
        message: String,
    },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ServerMessage {
    /// Encodes the frame as JSON text.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("server messages always serialize")
    }
}

/// Decodes a server frame. Never panics.
pub fn decode_server(text: &str) -> Result<ServerMessage, FrameError> {
    // Internally tagged enums buffer their content, which `RawValue` cannot pass through; the
    // payload-carrying frames are decoded by hand.
    #[derive(Deserialize)]
    struct Head<'a> {
        #[serde(rename = "type", borrow)]
        kind: Cow<'a, str>,
    }
    #[derive(Deserialize)]
    struct PayloadFrame {
        from: Fingerprint,
        namespace: Option<String>,
        payload: Box<RawValue>,
    }
    require_object(text)?;
    let head: Head<'_> = serde_json::from_str(text).map_err(|e| classify(&e, text))?;
    match head.kind.as_ref() {
        "relay" | "broadcast" => {
            let f: PayloadFrame = serde_json::from_str(text).map_err(|e| classify(&e, text))?;
            if head.kind == "relay" {
                Ok(ServerMessage::Relay { from: f.from, payload: RawJson(f.payload) })
            } else {
                Ok(ServerMessage::Broadcast {
                    from: f.from,
                    namespace: need(f.namespace, "namespace", None)?,
                    payload: RawJson(f.payload),
                })
            }
        }
        _ => serde_json::from_str(text).map_err(|e| {
            let mut fe = classify(&e, text);
            if fe.message.starts_with("unknown variant") {
                fe.code = ErrorCode::UnknownType;
            }
            fe
        }),
    }
}

/// Encodes a `relay` delivery without copying the payload; the hot path of the server.
pub fn encode_relay(from: &Fingerprint, payload: &RawValue) -> String {
    // Built by hand: this is the server's hottest output. The fingerprint is hex and the
    // payload is already valid JSON, so nothing needs escaping.
    const HEAD: &str = r#"{"type":"relay","from":""#;
    const MID: &str = r#"","payload":"#;
    let payload = payload.get();
    let mut out = String::with_capacity(HEAD.len() + 64 + MID.len() + payload.len() + 1);
    out.push_str(HEAD);
    from.write_hex(&mut out);
    out.push_str(MID);
    out.push_str(payload);
    out.push('}');
    out
}

/// Encodes a `broadcast` delivery without copying the payload.
pub fn encode_broadcast(from: &Fingerprint, namespace: &str, payload: &RawValue) -> String {
    #[derive(Serialize)]
    struct Out<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        from: &'a Fingerprint,
        namespace: &'a str,
        payload: &'a RawValue,
    }
    serde_json::to_string(&Out { kind: "broadcast", from, namespace, payload })
        .expect("broadcast always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp() -> Fingerprint {
        Fingerprint::from_bytes([7; 32])
    }

    #[test]
    fn bad_input_gets_the_documented_code() {
        let cases: &[(&str, ErrorCode, Option<u64>)] = &[
            ("not json", ErrorCode::BadJson, None),
            ("[1,2]", ErrorCode::BadJson, None),
            ("\"str\"", ErrorCode::BadJson, None),
            (r#"{"id":1}"#, ErrorCode::MissingField, Some(1)),
            (r#"{"type":"teleport","id":4}"#, ErrorCode::UnknownType, Some(4)),
            (r#"{"type":"join","id":5}"#, ErrorCode::MissingField, Some(5)),
            (r#"{"type":"join","id":6,"namespace":7}"#, ErrorCode::InvalidField, Some(6)),
            (r#"{"type":"join","id":"x","namespace":"a"}"#, ErrorCode::InvalidField, None),
            (r#"{"type":"join","id":8,"namespace":""}"#, ErrorCode::InvalidField, Some(8)),
            (r#"{"type":"ping"}"#, ErrorCode::MissingField, None),
            (r#"{"type":"relay","id":9,"to":"abc","payload":1}"#, ErrorCode::InvalidField, Some(9)),
            (r#"{"type":"match","id":10,"namespace":"a","group_size":1}"#, ErrorCode::InvalidField, Some(10)),
            (r#"{"type":"register","id":11,"version":1,"public_key":"k","signature":"s","meta":[1]}"#, ErrorCode::InvalidField, Some(11)),
            (r#"{"type":"join","id":12,"id":13,"namespace":"a"}"#, ErrorCode::InvalidField, None),
            (r#"{"type":"list_rooms"}"#, ErrorCode::MissingField, None),
            (r#"{"type":"list_rooms","id":14,"prefix":"a\u0007"}"#, ErrorCode::InvalidField, Some(14)),
            (r#"{"type":"list_rooms","id":15,"prefix":7}"#, ErrorCode::InvalidField, Some(15)),
            (r#"{"type":"list_rooms","id":16,"limit":-1}"#, ErrorCode::InvalidField, Some(16)),
            (r#"{"type":"turn_credentials"}"#, ErrorCode::MissingField, None),
        ];
        for (text, code, id) in cases {
            let err = decode_client(text).unwrap_err();
            assert_eq!((err.code, err.id), (*code, *id), "{text}: {err}");
        }
    }

    #[test]
    fn a_forged_from_is_refused() {
        let text = format!(r#"{{"type":"relay","id":3,"to":"{}","from":"{}","payload":{{}}}}"#, fp(), fp());
        let err = decode_client(&text).unwrap_err();
        assert_eq!((err.code, err.id), (ErrorCode::InvalidField, Some(3)));
    }

    #[test]
    fn client_frames_roundtrip() {
        let payload = RawValue::from_string(r#"{"a":[1,"b\"c"]}"#.into()).unwrap();
        let msgs = vec![
            ClientMessage::Relay { id: None, to: fp(), payload: &payload },
            ClientMessage::Broadcast { id: Some(3), namespace: "ns".into(), payload: &payload },
            ClientMessage::Join { id: 1, namespace: "lobby \"x\"".into(), app_type: Some("game".into()), app_version: None },
            ClientMessage::CreateRoom { id: 2, room_id: "r".into(), config: RoomConfig { max_size: Some(4), metadata: Some(&payload) } },
            ClientMessage::Kick { id: 5, room_id: "r".into(), fingerprint: fp() },
            ClientMessage::ListRooms { id: 6, prefix: None, limit: None },
            ClientMessage::ListRooms { id: 7, prefix: Some("".into()), limit: Some(3) },
            ClientMessage::ListRooms { id: 8, prefix: Some("game-\"x\"".into()), limit: Some(0) },
            ClientMessage::TurnCredentials { id: 9 },
            ClientMessage::Bye,
        ];
        for m in msgs {
            let text = m.encode();
            let back = decode_client(&text).unwrap();
            assert_eq!(back.encode(), text);
            assert_eq!(back.id(), m.id());
        }
    }

    #[test]
    fn server_frames_roundtrip() {
        let payload = RawValue::from_string(r#"[1,{"x":null}]"#.into()).unwrap();
        let msgs = vec![
            ServerMessage::Relay { from: fp(), payload: RawJson(payload.clone()) },
            ServerMessage::Broadcast { from: fp(), namespace: "n".into(), payload: RawJson(payload.clone()) },
            ServerMessage::Error { id: Some(2), code: ErrorCode::RoomFull, message: "full".into() },
            ServerMessage::Pong { id: 9 },
            ServerMessage::TurnCredentials {
                id: 10,
                username: format!("1700000000:{}", fp()),
                credential: "c2VjcmV0".into(),
                ttl: 3600,
                urls: vec!["turn:127.0.0.1:3478?transport=udp".into()],
            },
            ServerMessage::Rooms { id: 4, rooms: vec![] },
            ServerMessage::Rooms {
                id: 5,
                rooms: vec![
                    RoomListing { room_id: "a".into(), owner: fp(), max_size: 4, metadata: None, members: 0 },
                    RoomListing {
                        room_id: "b".into(),
                        owner: fp(),
                        max_size: 2,
                        metadata: Some(RawJson::from_string(r#"{"t":1.5}"#.into()).unwrap()),
                        members: 1,
                    },
                ],
            },
        ];
        for m in msgs {
            assert_eq!(decode_server(&m.encode()).unwrap(), m);
        }
        assert_eq!(
            encode_relay(&fp(), &payload),
            ServerMessage::Relay { from: fp(), payload: RawJson(payload.clone()) }.encode()
        );
        assert_eq!(
            encode_broadcast(&fp(), "n", &payload),
            ServerMessage::Broadcast { from: fp(), namespace: "n".into(), payload: RawJson(payload) }.encode()
        );
        assert_eq!(decode_server(r#"{"type":"warp"}"#).unwrap_err().code, ErrorCode::UnknownType);
        assert_eq!(decode_server("{").unwrap_err().code, ErrorCode::BadJson);
    }
}
