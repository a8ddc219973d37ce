//! Operational counters of the [`Server`](super::Server), their snapshot ([`Metrics`]) in the
//! Prometheus text exposition format (version 0.0.4), and the server's health ([`Health`]).
//!
//! The server counts as it handles inputs: plain integers, and arrays indexed by
//! [`MessageType`], [`ErrorCode`] and [`CloseCode`], so the hot path adds one increment per
//! frame and never hashes a string. Gauges (connections, sessions, namespaces, rooms, queued
//! bytes) are read from the server's state when a snapshot is taken. Nothing here reads a
//! clock: the adapter passes `now` to [`Server::metrics`](super::Server::metrics) and
//! [`Server::health`](super::Server::health).
//!
//! ```
//! use std::time::Instant;
//! use peerlink::server::{ConnId, Server, ServerConfig};
//!
//! let now = Instant::now();
//! let mut server = Server::new(ServerConfig::default(), 1, now, 1_700_000_000_000);
//! server.handle_connect(ConnId(1), now).unwrap();
//! let metrics = server.metrics(now);
//! assert_eq!(metrics.connections_accepted, 1);
//! let text = metrics.to_prometheus();
//! assert!(text.contains("# TYPE peerlink_connections_accepted_total counter\n"));
//! assert!(text.contains("\npeerlink_connections_accepted_total 1\n"));
//! ```

use std::fmt::Write as _;
use std::time::Duration;

use super::ServerStats;
use crate::protocol::{ClientMessage, CloseCode, ErrorCode, PROTOCOL_VERSION};

/// The `type` of a frame the server received, as counted by
/// [`Metrics::messages_received`]: one per protocol message type, plus one label for every
/// unknown type and one for frames that are not a valid message at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MessageType {
    /// `register`.
    Register,
    /// `join`.
    Join,
    /// `leave`.
    Leave,
    /// `discover`.
    Discover,
    /// `match`.
    Match,
    /// `cancel_match`.
    CancelMatch,
    /// `relay`.
    Relay,
    /// `broadcast`.
    Broadcast,
    /// `create_room`.
    CreateRoom,
    /// `join_room`.
    JoinRoom,
    /// `leave_room`.
    LeaveRoom,
    /// `room_info`.
    RoomInfo,
    /// `list_rooms`.
    ListRooms,
    /// `kick`.
    Kick,
    /// `close_room`.
    CloseRoom,
    /// `ping`.
    Ping,
    /// `turn_credentials`.
    TurnCredentials,
    /// `bye`.
    Bye,
    /// A `type` the protocol does not have (answered with `unknown_type`), whatever its text.
    Unknown,
    /// A frame that is not a valid message (bad JSON, a missing or invalid field).
    Invalid,
}

impl MessageType {
    /// Every message type, in declaration order.
    pub const ALL: [MessageType; 20] = [
        MessageType::Register,
        MessageType::Join,
        MessageType::Leave,
        MessageType::Discover,
        MessageType::Match,
        MessageType::CancelMatch,
        MessageType::Relay,
        MessageType::Broadcast,
        MessageType::CreateRoom,
        MessageType::JoinRoom,
        MessageType::LeaveRoom,
        MessageType::RoomInfo,
        MessageType::ListRooms,
        MessageType::Kick,
        MessageType::CloseRoom,
        MessageType::Ping,
        MessageType::TurnCredentials,
        MessageType::Bye,
        MessageType::Unknown,
        MessageType::Invalid,
    ];

    /// Returns the label: the wire `type` (`"join_room"`), or `"unknown"` / `"invalid"`.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Register => "register",
            MessageType::Join => "join",
            MessageType::Leave => "leave",
            MessageType::Discover => "discover",
            MessageType::Match => "match",
            MessageType::CancelMatch => "cancel_match",
            MessageType::Relay => "relay",
            MessageType::Broadcast => "broadcast",
            MessageType::CreateRoom => "create_room",
            MessageType::JoinRoom => "join_room",
            MessageType::LeaveRoom => "leave_room",
            MessageType::RoomInfo => "room_info",
            MessageType::ListRooms => "list_rooms",
            MessageType::Kick => "kick",
            MessageType::CloseRoom => "close_room",
            MessageType::Ping => "ping",
            MessageType::TurnCredentials => "turn_credentials",
            MessageType::Bye => "bye",
            MessageType::Unknown => "unknown",
            MessageType::Invalid => "invalid",
        }
    }

    /// The type of a decoded message.
    pub(crate) fn of(msg: &ClientMessage<'_>) -> Self {
        match msg {
            ClientMessage::Register { .. } => MessageType::Register,
            ClientMessage::Join { .. } => MessageType::Join,
            ClientMessage::Leave { .. } => MessageType::Leave,
            ClientMessage::Discover { .. } => MessageType::Discover,
            ClientMessage::Match { .. } => MessageType::Match,
            ClientMessage::CancelMatch { .. } => MessageType::CancelMatch,
            ClientMessage::Relay { .. } => MessageType::Relay,
            ClientMessage::Broadcast { .. } => MessageType::Broadcast,
            ClientMessage::CreateRoom { .. } => MessageType::CreateRoom,
            ClientMessage::JoinRoom { .. } => MessageType::JoinRoom,
            ClientMessage::LeaveRoom { .. } => MessageType::LeaveRoom,
            ClientMessage::RoomInfo { .. } => MessageType::RoomInfo,
            ClientMessage::ListRooms { .. } => MessageType::ListRooms,
            ClientMessage::Kick { .. } => MessageType::Kick,
            ClientMessage::CloseRoom { .. } => MessageType::CloseRoom,
            ClientMessage::Ping { .. } => MessageType::Ping,
            ClientMessage::TurnCredentials { .. } => MessageType::TurnCredentials,
            ClientMessage::Bye => MessageType::Bye,
        }
    }
}

/// Every error code, indexed by `code as usize` (a unit test checks it).
pub(crate) const ERROR_CODES: [ErrorCode; 26] = ErrorCode::ALL;

/// Every close code, indexed by `code as usize` (a unit test checks it).
pub(crate) const CLOSE_CODES: [CloseCode; 10] = CloseCode::ALL;

/// Adds one to the counter of `index` (never panics: an index past the table, which the unit
/// tests rule out, is not counted).
#[inline]
pub(crate) fn bump<const N: usize>(table: &mut [u64; N], index: usize) {
    if let Some(n) = table.get_mut(index) {
        *n += 1;
    }
}

/// A snapshot of the server's counters and gauges, from [`Server::metrics`](super::Server::metrics).
///
/// Counters (`*_total` in the exposition) only grow while the server lives; gauges are read
/// from its state when the snapshot is taken. [`Metrics::to_prometheus`] renders it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metrics {
    /// The server's id ([`ServerConfig::server_id`](super::ServerConfig::server_id)).
    pub server_id: String,
    /// Time since the server was created (its `now` at creation to the snapshot's `now`).
    pub uptime: Duration,
    /// The gauges: connections, sessions, namespaces, rooms, queued bytes.
    pub stats: ServerStats,
    /// Connections admitted (a `challenge` was sent); refused ones are counted as closes 1013.
    pub connections_accepted: u64,
    /// Connections that ended from the client's side (closed, reset or failed) while the
    /// server still knew them; closes decided by the server are in [`Metrics::closes`].
    pub disconnects: u64,
    /// Successful registrations, resumed sessions included.
    pub registrations: u64,
    /// Registrations that resumed a kept session.
    pub sessions_resumed: u64,
    /// Frames dropped by the per-connection rate limit.
    pub rate_limited_frames: u64,
    /// Relays delivered: sent to the target's connection or queued for its parked session.
    pub relays: u64,
    /// Broadcasts accepted.
    pub broadcasts: u64,
    /// Copies of broadcasts handed on, one per other member of the namespace (a copy for a
    /// parked session whose queue is full is also in [`Metrics::resume_queue_drops`]).
    pub broadcast_deliveries: u64,
    /// Frames for a parked session dropped because its resume queue was full (reported to it
    /// as `missed` when it resumes; relays are refused with `queue_full` instead).
    pub resume_queue_drops: u64,
    /// The node's view of its cluster, when clustered.
    pub cluster: Option<super::ClusterStats>,
    messages: [u64; MessageType::ALL.len()],
    errors: [u64; ERROR_CODES.len()],
    closes: [u64; CLOSE_CODES.len()],
}

impl Metrics {
    /// Frames received of this type (after the size and rate checks; rate-limited frames are
    /// in [`Metrics::rate_limited_frames`] only).
    pub fn messages_received(&self, kind: MessageType) -> u64 {
        self.messages[kind as usize]
    }

    /// `error` frames sent with this code.
    pub fn errors_sent(&self, code: ErrorCode) -> u64 {
        self.errors.get(code as usize).copied().unwrap_or(0)
    }

    /// Connections the server closed with this code (1013 for connections refused when full,
    /// 4001 for slow consumers whose outbound queue overflowed).
    pub fn closes(&self, code: CloseCode) -> u64 {
        self.closes.get(code as usize).copied().unwrap_or(0)
    }

    pub(crate) fn count_message(&mut self, kind: MessageType) {
        bump(&mut self.messages, kind as usize);
    }

    pub(crate) fn count_error(&mut self, code: ErrorCode) {
        bump(&mut self.errors, code as usize);
    }

    pub(crate) fn count_close(&mut self, code: CloseCode) {
        bump(&mut self.closes, code as usize);
    }

    /// Renders the snapshot in the Prometheus text exposition format, version 0.0.4 (served
    /// with `Content-Type: text/plain; version=0.0.4`). Every metric is named `peerlink_*` and
    /// has its `# HELP` and `# TYPE` lines; every labelled family lists every label value, zeros
    /// included, so rates work from the first scrape.
    pub fn to_prometheus(&self) -> String {
        let mut out = Exposition(String::with_capacity(8 * 1024));
        let s = &self.stats;
        out.family("peerlink_info", "gauge", "Constant 1, labelled with the server's id, the crate version and the protocol version.");
        let protocol = PROTOCOL_VERSION.to_string();
        out.sample_labels(
            "peerlink_info",
            &[("server_id", &self.server_id), ("version", env!("CARGO_PKG_VERSION")), ("protocol", &protocol)],
            1,
        );
        out.family("peerlink_uptime_seconds", "gauge", "Seconds since the server started.");
        out.sample_f64("peerlink_uptime_seconds", self.uptime.as_secs_f64());
        out.gauge("peerlink_connections_open", "Open WebSocket connections the server core knows.", s.connections as u64);
        out.counter("peerlink_connections_accepted_total", "Connections admitted (challenge sent).", self.connections_accepted);
        out.counter(
            "peerlink_disconnects_total",
            "Connections ended by the client or the network (server-side closes are in peerlink_closes_total).",
            self.disconnects,
        );
        out.counter("peerlink_registrations_total", "Successful registrations, resumed sessions included.", self.registrations);
        out.counter("peerlink_sessions_resumed_total", "Registrations that resumed a kept session.", self.sessions_resumed);
        out.gauge("peerlink_sessions_registered", "Registered clients with a live connection.", s.active_sessions as u64);
        out.gauge("peerlink_sessions_parked", "Sessions waiting to be resumed.", s.parked_sessions as u64);
        out.family("peerlink_messages_received_total", "counter", "Frames received, by message type (unknown: a type the protocol lacks; invalid: not a valid message).");
        for kind in MessageType::ALL {
            out.sample_labels("peerlink_messages_received_total", &[("type", kind.as_str())], self.messages_received(kind));
        }
        out.family("peerlink_errors_sent_total", "counter", "Error frames sent, by error code.");
        for code in ERROR_CODES {
            out.sample_labels("peerlink_errors_sent_total", &[("code", code.as_str())], self.errors_sent(code));
        }
        out.counter("peerlink_rate_limited_frames_total", "Frames dropped by the per-connection rate limit.", self.rate_limited_frames);
        out.counter("peerlink_relays_total", "Relays delivered (sent, or queued for a parked session).", self.relays);
        out.counter("peerlink_broadcasts_total", "Broadcasts accepted.", self.broadcasts);
        out.counter("peerlink_broadcast_deliveries_total", "Broadcast copies delivered to other members.", self.broadcast_deliveries);
        out.counter(
            "peerlink_resume_queue_dropped_frames_total",
            "Frames for parked sessions dropped because their resume queue was full.",
            self.resume_queue_drops,
        );
        out.family(
            "peerlink_closes_total",
            "counter",
            "Connections closed by the server, by close code (1013: refused, server full; 4001: slow consumer, outbound queue full).",
        );
        for code in CLOSE_CODES {
            let number = code.code().to_string();
            out.sample_labels("peerlink_closes_total", &[("code", &number)], self.closes(code));
        }
        out.gauge("peerlink_outbound_queued_bytes", "Bytes sent to connections and not yet reported flushed.", s.outbound_bytes as u64);
        out.gauge("peerlink_parked_queued_bytes", "Bytes queued for parked sessions.", s.parked_bytes as u64);
        out.gauge("peerlink_namespaces", "Non-empty namespaces.", s.namespaces as u64);
        out.gauge("peerlink_rooms", "Rooms, empty ones awaiting their TTL included.", s.rooms as u64);
        out.gauge("peerlink_pending_matches", "Pending match requests.", s.pending_matches as u64);
        if let Some(c) = &self.cluster {
            let node = format!("{:016x}", c.node);
            out.family("peerlink_cluster_link_up", "gauge", "1 while the link to the other cluster nodes (Redis) is up, else 0; labelled with this node's id.");
            out.sample_labels("peerlink_cluster_link_up", &[("node", &node)], u64::from(c.link_up));
            out.gauge("peerlink_cluster_nodes", "Other cluster nodes heard from within the node timeout.", c.nodes as u64);
            out.gauge("peerlink_cluster_remote_sessions", "Sessions of other nodes in this node's replica.", c.remote_sessions as u64);
            out.gauge(
                "peerlink_cluster_waiting_sessions",
                "Sessions of gone nodes waiting for their clients to resume on another node.",
                c.waiting_sessions as u64,
            );
            out.gauge("peerlink_cluster_pending_relays", "Relays forwarded to other nodes and not yet answered.", c.pending_relays as u64);
            out.counter("peerlink_cluster_messages_published_total", "Cluster messages this node published.", c.messages_out);
            out.counter("peerlink_cluster_messages_received_total", "Cluster messages received from other nodes.", c.messages_in);
            out.counter("peerlink_cluster_nodes_gone_total", "Nodes found gone (silent past the timeout, or said bye).", c.nodes_gone);
            out.counter("peerlink_cluster_sessions_adopted_total", "Sessions of other nodes whose clients resumed here.", c.sessions_adopted);
            out.counter(
                "peerlink_cluster_sessions_handed_over_total",
                "Sessions of this node whose clients registered on another node.",
                c.sessions_handed_over,
            );
            out.counter(
                "peerlink_cluster_relays_timed_out_total",
                "Relays forwarded to another node that got no answer in time (answered unavailable).",
                c.relays_timed_out,
            );
            out.counter(
                "peerlink_cluster_dropped_total",
                "Cluster announcements not recorded because a bound was reached.",
                c.dropped,
            );
            out.counter(
                "peerlink_cluster_link_dropped_total",
                "Cluster messages dropped by the link to the other nodes (publish queue full).",
                c.link_dropped,
            );
        }
        out.0
    }
}

/// Builds an exposition text.
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "counter", help);
        let _ = writeln!(self.0, "{name} {value}");
    }

    fn gauge(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "gauge", help);
        let _ = writeln!(self.0, "{name} {value}");
    }

    fn sample_f64(&mut self, name: &str, value: f64) {
        let _ = writeln!(self.0, "{name} {value:.3}");
    }

    fn sample_labels(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.0.push_str(name);
        self.0.push('{');
        for (i, (label, v)) in labels.iter().enumerate() {
            if i > 0 {
                self.0.push(',');
            }
            let _ = write!(self.0, "{label}=\"{}\"", escape_label(v));
        }
        let _ = writeln!(self.0, "}} {value}");
    }
}

/// Escapes a label value: backslash, double quote and line feed.
pub(crate) fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes `# HELP` text: backslash and line feed.
fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Whether the server can serve, as reported by [`Health`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HealthStatus {
    /// Serving normally (HTTP 200).
    Ok,
    /// Serving, but a dependency is failing (HTTP 503, so load balancers steer new clients
    /// away). The single-node server has no dependency that can fail and never reports it; a
    /// clustered server reports its broker link here, with the reason in [`Health::reasons`].
    Degraded,
}

impl HealthStatus {
    /// Returns the `status` string: `"ok"` or `"degraded"`.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Ok => "ok",
            HealthStatus::Degraded => "degraded",
        }
    }

    /// Returns the HTTP status a health endpoint answers with: 200, or 503 when degraded.
    pub fn http_status(self) -> u16 {
        match self {
            HealthStatus::Ok => 200,
            HealthStatus::Degraded => 503,
        }
    }
}

/// The server's health, from [`Server::health`](super::Server::health); [`Health::to_json`]
/// is the body of the `/healthz` endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// Ok or degraded.
    pub status: HealthStatus,
    /// Why the status is not ok (empty when it is).
    pub reasons: Vec<String>,
    /// Time since the server was created.
    pub uptime: Duration,
    /// Open connections.
    pub connections: usize,
    /// Registered clients with a live connection.
    pub sessions: usize,
}

impl Health {
    /// A health report; `status` is [`HealthStatus::Degraded`] exactly when `reasons` is not
    /// empty.
    pub fn new(reasons: Vec<String>, uptime: Duration, connections: usize, sessions: usize) -> Self {
        let status = if reasons.is_empty() { HealthStatus::Ok } else { HealthStatus::Degraded };
        Health { status, reasons, uptime, connections, sessions }
    }

    /// Renders the report as one JSON object:
    /// `{"status":"ok","reasons":[],"uptime_seconds":12.5,"connections":3,"sessions":2}`.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "status": self.status.as_str(),
            "reasons": self.reasons,
            "uptime_seconds": (self.uptime.as_millis() as f64) / 1000.0,
            "connections": self.connections,
            "sessions": self.sessions,
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_tables_are_indexed_by_discriminant() {
        for (i, code) in ERROR_CODES.iter().enumerate() {
            assert_eq!(*code as usize, i, "{code}");
        }
        for (i, code) in CLOSE_CODES.iter().enumerate() {
            assert_eq!(*code as usize, i, "{code:?}");
        }
        for (i, kind) in MessageType::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, i, "{kind:?}");
        }
        // Complete: the last declared variant is the last entry (a variant added after it
        // would have a discriminant past the table).
        assert_eq!(ErrorCode::TurnUnavailable as usize + 1, ERROR_CODES.len());
        assert_eq!(CloseCode::RegisterTimeout as usize + 1, CLOSE_CODES.len());
        assert_eq!(MessageType::Invalid as usize + 1, MessageType::ALL.len());
        // Every wire error code parses back to one in the table.
        for code in ERROR_CODES {
            let back: ErrorCode = serde_json::from_str(&format!("\"{}\"", code.as_str())).unwrap();
            assert_eq!(back, code);
        }
        for code in CLOSE_CODES {
            assert_eq!(CloseCode::from_code(code.code()), Some(code));
        }
    }

    /// A family's name, type and help text.
    type Family = (String, String, String);
    /// A sample's series (`name{labels}`) and value.
    type Sample = (String, String);

    /// Parses exposition text into (HELP/TYPE per family, samples), checking its grammar.
    fn parse(text: &str) -> (Vec<Family>, Vec<Sample>) {
        assert!(text.ends_with('\n'), "the exposition ends with a line feed");
        let mut families = Vec::new();
        let mut samples = Vec::new();
        let mut help: Option<(String, String)> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, text) = rest.split_once(' ').unwrap();
                help = Some((name.to_owned(), text.to_owned()));
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                let (help_name, help_text) = help.take().expect("HELP before TYPE");
                assert_eq!(help_name, name);
                assert!(kind == "counter" || kind == "gauge", "{line}");
                assert_eq!(kind == "counter", name.ends_with("_total"), "counters and only counters end in _total: {name}");
                families.push((name.to_owned(), kind.to_owned(), help_text));
            } else {
                let (series, value) = line.rsplit_once(' ').unwrap();
                let name = series.split('{').next().unwrap();
                assert!(name.starts_with("peerlink_"), "{line}");
                assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line}");
                assert_eq!(families.last().map(|f: &Family| f.0.as_str()), Some(name), "sample under its family: {line}");
                value.parse::<f64>().unwrap_or_else(|_| panic!("bad value in {line}"));
                samples.push((series.to_owned(), value.to_owned()));
            }
        }
        (families, samples)
    }

    fn value<'a>(samples: &'a [Sample], series: &str) -> &'a str {
        samples.iter().find(|(s, _)| s == series).map(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("no {series}"))
    }

    #[test]
    fn exposition_has_every_metric_with_help_type_and_values() {
        let mut m = Metrics { server_id: "node-1".into(), uptime: Duration::from_millis(12_345), ..Metrics::default() };
        m.stats = ServerStats {
            connections: 3,
            active_sessions: 2,
            parked_sessions: 1,
            namespaces: 4,
            rooms: 5,
            pending_matches: 6,
            outbound_bytes: 7,
            parked_bytes: 8,
            timers: 9,
        };
        m.connections_accepted = 10;
        m.disconnects = 11;
        m.registrations = 12;
        m.sessions_resumed = 13;
        m.rate_limited_frames = 14;
        m.relays = 15;
        m.broadcasts = 16;
        m.broadcast_deliveries = 17;
        m.resume_queue_drops = 18;
        m.count_message(MessageType::Relay);
        m.count_message(MessageType::Relay);
        m.count_message(MessageType::Unknown);
        m.count_error(ErrorCode::PeerNotFound);
        m.count_close(CloseCode::SlowConsumer);
        m.count_close(CloseCode::SlowConsumer);
        m.count_close(CloseCode::SlowConsumer);
        let text = m.to_prometheus();
        let (families, samples) = parse(&text);
        let names: Vec<&str> = families.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "peerlink_info",
                "peerlink_uptime_seconds",
                "peerlink_connections_open",
                "peerlink_connections_accepted_total",
                "peerlink_disconnects_total",
                "peerlink_registrations_total",
                "peerlink_sessions_resumed_total",
                "peerlink_sessions_registered",
                "peerlink_sessions_parked",
                "peerlink_messages_received_total",
                "peerlink_errors_sent_total",
                "peerlink_rate_limited_frames_total",
                "peerlink_relays_total",
                "peerlink_broadcasts_total",
                "peerlink_broadcast_deliveries_total",
                "peerlink_resume_queue_dropped_frames_total",
                "peerlink_closes_total",
                "peerlink_outbound_queued_bytes",
                "peerlink_parked_queued_bytes",
                "peerlink_namespaces",
                "peerlink_rooms",
                "peerlink_pending_matches",
            ]
        );
        assert!(families.iter().all(|f| !f.2.is_empty()), "every family has help text");
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(value(&samples, &format!("peerlink_info{{server_id=\"node-1\",version=\"{version}\",protocol=\"1\"}}")), "1");
        assert_eq!(value(&samples, "peerlink_uptime_seconds"), "12.345");
        for (series, expected) in [
            ("peerlink_connections_open", "3"),
            ("peerlink_connections_accepted_total", "10"),
            ("peerlink_disconnects_total", "11"),
            ("peerlink_registrations_total", "12"),
            ("peerlink_sessions_resumed_total", "13"),
            ("peerlink_sessions_registered", "2"),
            ("peerlink_sessions_parked", "1"),
            ("peerlink_rate_limited_frames_total", "14"),
            ("peerlink_relays_total", "15"),
            ("peerlink_broadcasts_total", "16"),
            ("peerlink_broadcast_deliveries_total", "17"),
            ("peerlink_resume_queue_dropped_frames_total", "18"),
            ("peerlink_outbound_queued_bytes", "7"),
            ("peerlink_parked_queued_bytes", "8"),
            ("peerlink_namespaces", "4"),
            ("peerlink_rooms", "5"),
            ("peerlink_pending_matches", "6"),
            ("peerlink_messages_received_total{type=\"relay\"}", "2"),
            ("peerlink_messages_received_total{type=\"unknown\"}", "1"),
            ("peerlink_messages_received_total{type=\"join_room\"}", "0"),
            ("peerlink_errors_sent_total{code=\"peer_not_found\"}", "1"),
            ("peerlink_errors_sent_total{code=\"bad_json\"}", "0"),
            ("peerlink_closes_total{code=\"4001\"}", "3"),
            ("peerlink_closes_total{code=\"1013\"}", "0"),
        ] {
            assert_eq!(value(&samples, series), expected, "{series}");
        }
        // Every label value of every labelled family is listed, zeros included.
        for kind in MessageType::ALL {
            value(&samples, &format!("peerlink_messages_received_total{{type=\"{}\"}}", kind.as_str()));
        }
        for code in ERROR_CODES {
            value(&samples, &format!("peerlink_errors_sent_total{{code=\"{}\"}}", code.as_str()));
        }
        for code in CLOSE_CODES {
            value(&samples, &format!("peerlink_closes_total{{code=\"{}\"}}", code.code()));
        }
        assert_eq!(samples.len(), 1 + 1 + 17 + MessageType::ALL.len() + ERROR_CODES.len() + CLOSE_CODES.len());
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        assert_eq!(escape_label(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(escape_label("line\nbreak"), "line\\nbreak");
        assert_eq!(escape_label("plain é"), "plain é");
        assert_eq!(escape_help("a\\b\nc \"q\""), "a\\\\b\\nc \"q\"");
        let m = Metrics { server_id: "evil\"} 9\n# x\\".into(), ..Metrics::default() };
        let text = m.to_prometheus();
        let info = text.lines().find(|l| l.starts_with("peerlink_info{")).unwrap();
        assert!(info.starts_with(r#"peerlink_info{server_id="evil\"} 9\n# x\\",version=""#), "{info}");
        assert!(info.ends_with("} 1"), "{info}");
        // The injected text did not become lines of its own.
        assert!(!text.lines().any(|l| l == "# x\\" || l.starts_with("# x")), "{text}");
        parse(&text);
    }

    #[test]
    fn health_is_ok_without_reasons_and_degraded_with_503_otherwise() {
        let ok = Health::new(Vec::new(), Duration::from_millis(1_500), 3, 2);
        assert_eq!((ok.status, ok.status.http_status()), (HealthStatus::Ok, 200));
        let json: serde_json::Value = serde_json::from_str(&ok.to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"status": "ok", "reasons": [], "uptime_seconds": 1.5, "connections": 3, "sessions": 2})
        );
        let bad = Health::new(vec!["broker link down".into()], Duration::ZERO, 0, 0);
        assert_eq!((bad.status, bad.status.http_status()), (HealthStatus::Degraded, 503));
        let json: serde_json::Value = serde_json::from_str(&bad.to_json()).unwrap();
        assert_eq!(json["status"], "degraded");
        assert_eq!(json["reasons"], serde_json::json!(["broker link down"]));
    }
}
