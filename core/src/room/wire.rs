//! The `room/1` wire format (see `docs/PROTOCOL.md`, "Room messages"): batches of items
//! between two members of rooms, as the text of a message on [`INTERNAL_CHANNEL`] (direct) or
//! as a signed `relay` payload (through the server).
//!
//! The codec is `pub` but `#[doc(hidden)]` (as is this module) only so that the fuzz harness
//! (`fuzz/harness.rs`, target `room_batch`, replayed by `core/tests/fuzz_corpus.rs`) can reach
//! it from outside the crate. It is not a stable API: applications use [`Node`]'s rooms.
//!
//! [`INTERNAL_CHANNEL`]: crate::peer::INTERNAL_CHANNEL
//! [`Node`]: crate::Node

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::identity::{Fingerprint, Identity, PublicKey, Signature};

/// Marks a relay payload as a room batch.
#[doc(hidden)]
pub const TAG: &str = "room/1";
/// Most items one batch may carry.
#[doc(hidden)]
pub const MAX_ITEMS: usize = 1024;
/// Longest room id in an item (the server's name limit).
#[doc(hidden)]
pub const MAX_ROOM_LEN: usize = 128;
/// Longest time to live a presence state may ask for.
#[doc(hidden)]
pub const MAX_PRESENCE_TTL_MS: u64 = 300_000;

/// Why a room batch was refused. Nothing in it is used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Not JSON, or not this shape.
    #[error("malformed room batch: {0}")]
    Malformed(String),
    /// More than [`MAX_ITEMS`] items.
    #[error("a batch carries at most {MAX_ITEMS} items")]
    TooManyItems,
    /// The key is not the sender's, or the signature does not cover the batch, or the batch
    /// is addressed to somebody else: the server (or someone) altered or redirected it.
    #[error("the batch is not signed by its sender for us: {0}")]
    BadSignature(&'static str),
}

/// A room message's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomData {
    /// JSON text (sent unescaped; delivered as [`crate::Payload::Text`]).
    Json(String),
    /// Text.
    Text(String),
    /// Bytes (base64 on the wire).
    Binary(Vec<u8>),
    /// A state or document sync frame ([`crate::sync`]; base64 on the wire). The node's
    /// sync layer sends these; [`Node::room_send`](crate::Node::room_send) refuses them.
    Sync(Vec<u8>),
}

impl RoomData {
    /// Serializes `value` as JSON.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, serde_json::Error> {
        serde_json::to_string(value).map(RoomData::Json)
    }

    /// The size it counts for against the message size limit (its encoded size: JSON as is,
    /// text as a JSON string, binary as base64).
    pub fn wire_len(&self) -> usize {
        match self {
            RoomData::Json(s) => s.len(),
            RoomData::Text(s) => json_str_len(s),
            RoomData::Binary(b) | RoomData::Sync(b) => b.len().div_ceil(3) * 4,
        }
    }
}

/// The length of `s` as a JSON string, quotes included, escaped as `serde_json` does.
fn json_str_len(s: &str) -> usize {
    let escaped: usize = s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | 0x08 | 0x09 | 0x0a | 0x0c | 0x0d => 2,
            0x00..=0x1f => 6,
            _ => 1,
        })
        .sum();
    escaped + 2
}

/// One item of a batch.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// A sequenced room message from the batch's sender.
    Data { room: String, epoch: u64, seq: u64, data: RoomData },
    /// "I have every message of your stream `epoch` up to `seq`."
    Ack { room: String, epoch: u64, seq: u64 },
    /// The sender's presence state (`None`: cleared), version `version`, valid `ttl_ms`.
    Presence { room: String, epoch: u64, version: u64, ttl_ms: u64, state: Option<String> },
}

impl Item {
    /// The room the item belongs to.
    pub fn room(&self) -> &str {
        match self {
            Item::Data { room, .. } | Item::Ack { room, .. } | Item::Presence { room, .. } => room,
        }
    }

    /// Appends this item's JSON to `out`.
    pub fn encode_into(&self, out: &mut String) {
        use std::fmt::Write as _;
        let room = serde_json::to_string(self.room()).expect("a string serializes");
        match self {
            Item::Data { epoch, seq, data, .. } => encode_data_item(out, &room, *epoch, *seq, &data_fragment(data)),
            Item::Ack { epoch, seq, .. } => {
                let _ = write!(out, r#"{{"t":"a","r":{room},"e":{epoch},"s":{seq}}}"#);
            }
            Item::Presence { epoch, version, ttl_ms, state, .. } => {
                let st = state.as_deref().unwrap_or("null");
                let _ = write!(out, r#"{{"t":"p","r":{room},"e":{epoch},"v":{version},"ttl":{ttl_ms},"st":{st}}}"#);
            }
        }
    }

    /// An upper bound of [`Item::encode_into`]'s length: exact but for the numbers, counted
    /// at 20 digits each.
    pub fn encoded_len(&self) -> usize {
        // Member names and punctuation, plus 20 digits per number:
        // {"t":"d","r":R,"e":N,"s":N,"j":J}, {"t":"a","r":R,"e":N,"s":N},
        // {"t":"p","r":R,"e":N,"v":N,"ttl":N,"st":S}.
        let room = json_str_len(self.room());
        match self {
            Item::Data { data: data @ (RoomData::Binary(_) | RoomData::Sync(_)), .. } => 69 + room + data.wire_len() + 2,
            Item::Data { data, .. } => 69 + room + data.wire_len(),
            Item::Ack { .. } => 64 + room,
            Item::Presence { state, .. } => 97 + room + state.as_ref().map_or(4, String::len),
        }
    }
}

/// The contents part of a data item (`"j":…`, `"x":"…"` or `"b":"…"`): encoded once per
/// message and shared by the items for every recipient.
pub(crate) fn data_fragment(data: &RoomData) -> String {
    match data {
        RoomData::Json(j) => format!(r#""j":{j}"#),
        RoomData::Text(t) => format!(r#""x":{}"#, serde_json::to_string(t).expect("a string serializes")),
        RoomData::Binary(b) => format!(r#""b":"{}""#, B64.encode(b)),
        RoomData::Sync(b) => format!(r#""y":"{}""#, B64.encode(b)),
    }
}

/// Appends a data item to `out`: `room_json` is the room id already as a JSON string,
/// `fragment` from [`data_fragment`].
pub(crate) fn encode_data_item(out: &mut String, room_json: &str, epoch: u64, seq: u64, fragment: &str) {
    use std::fmt::Write as _;
    let _ = write!(out, r#"{{"t":"d","r":{room_json},"e":{epoch},"s":{seq},"#);
    out.push_str(fragment);
    out.push('}');
}

/// An upper bound of [`encode_data_item`]'s length (numbers counted at 20 digits).
pub(crate) fn data_item_len(room_json_len: usize, fragment_len: usize) -> usize {
    // {"t":"d","r":R,"e":N,"s":N,F}
    25 + room_json_len + 40 + fragment_len
}

#[derive(Deserialize)]
struct WireItem<'a> {
    t: &'a str,
    #[serde(borrow)]
    r: std::borrow::Cow<'a, str>,
    e: u64,
    #[serde(default)]
    s: Option<u64>,
    #[serde(default, borrow)]
    j: Option<&'a RawValue>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default, borrow)]
    b: Option<&'a str>,
    #[serde(default, borrow)]
    y: Option<&'a str>,
    #[serde(default)]
    v: Option<u64>,
    #[serde(default)]
    ttl: Option<u64>,
    #[serde(default, borrow)]
    st: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireBatch<'a> {
    #[serde(borrow)]
    m: Vec<&'a RawValue>,
}

fn malformed(e: impl std::fmt::Display) -> WireError {
    WireError::Malformed(e.to_string())
}

fn decode_item(raw: &RawValue) -> Result<Item, WireError> {
    let w: WireItem<'_> = serde_json::from_str(raw.get()).map_err(malformed)?;
    if w.r.is_empty() || w.r.len() > MAX_ROOM_LEN {
        return Err(WireError::Malformed("room id length".into()));
    }
    let room = w.r.into_owned();
    let epoch = w.e;
    Ok(match w.t {
        "d" => {
            let seq = w.s.filter(|s| *s > 0).ok_or_else(|| malformed("data without a sequence number"))?;
            let data = match (w.j, w.x, w.b, w.y) {
                (Some(j), None, None, None) => RoomData::Json(j.get().to_owned()),
                (None, Some(x), None, None) => RoomData::Text(x),
                (None, None, Some(b), None) => RoomData::Binary(B64.decode(b).map_err(malformed)?),
                (None, None, None, Some(y)) => RoomData::Sync(B64.decode(y).map_err(malformed)?),
                _ => return Err(malformed("data needs exactly one of j, x, b, y")),
            };
            Item::Data { room, epoch, seq, data }
        }
        "a" => Item::Ack { room, epoch, seq: w.s.ok_or_else(|| malformed("ack without a sequence number"))? },
        "p" => {
            let version = w.v.ok_or_else(|| malformed("presence without a version"))?;
            let ttl_ms = w.ttl.unwrap_or(30_000).min(MAX_PRESENCE_TTL_MS);
            let state = w.st.map(|s| s.get()).filter(|s| *s != "null").map(str::to_owned);
            Item::Presence { room, epoch, version, ttl_ms, state }
        }
        other => return Err(WireError::Malformed(format!("unknown item type `{other}`"))),
    })
}

/// Encodes `items` as a batch body: `{"m":[...]}`.
#[doc(hidden)]
pub fn encode_batch(items: &[Item]) -> String {
    let mut out = String::with_capacity(8 + items.iter().map(Item::encoded_len).sum::<usize>());
    out.push_str(r#"{"m":["#);
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        item.encode_into(&mut out);
    }
    out.push_str("]}");
    out
}

/// Decodes a batch body. One bad item refuses the whole batch (its sender is broken or
/// hostile; the sequence numbers make it resend what was good).
#[doc(hidden)]
pub fn decode_batch(body: &str) -> Result<Vec<Item>, WireError> {
    let batch: WireBatch<'_> = serde_json::from_str(body).map_err(malformed)?;
    if batch.m.len() > MAX_ITEMS {
        return Err(WireError::TooManyItems);
    }
    batch.m.into_iter().map(decode_item).collect()
}

/// A batch body as it arrived: items, or a sealed batch of an encrypted room
/// (`{"z":"<base64>"}`: the batch sealed under the end-to-end session).
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// A plaintext batch.
    Items(Vec<Item>),
    /// A sealed batch, to open with the sender's session.
    Sealed(Vec<u8>),
}

/// The body of a sealed batch.
pub(crate) fn encode_sealed(sealed: &[u8]) -> String {
    format!(r#"{{"z":"{}"}}"#, B64.encode(sealed))
}

/// Decodes a batch body, plaintext or sealed.
#[doc(hidden)]
pub fn decode_body(body: &str) -> Result<Body, WireError> {
    #[derive(Deserialize)]
    struct Sealed<'a> {
        #[serde(borrow)]
        z: &'a str,
    }
    // Only an object is a sealed body (serde would take a struct from an array too).
    if body.trim_start().starts_with('{') {
        if let Ok(sealed) = serde_json::from_str::<Sealed<'_>>(body) {
            return B64.decode(sealed.z).map(Body::Sealed).map_err(malformed);
        }
    }
    decode_batch(body).map(Body::Items)
}

fn signed_message(from: &Fingerprint, to: &Fingerprint, body: &str) -> Vec<u8> {
    format!("peerlink room/1\n{from}\n{to}\n{body}").into_bytes()
}

#[derive(Serialize, Deserialize)]
struct Relayed<'a> {
    peerlink: &'a str,
    key: &'a str,
    sig: &'a str,
    to: Fingerprint,
    body: std::borrow::Cow<'a, str>,
}

/// Builds the relay payload for a batch to `to`: the body, signed with our identity key for
/// `to`, so the server can neither forge nor redirect it.
#[doc(hidden)]
pub fn encode_relayed(identity: &Identity, rng: &mut impl rand::CryptoRng, to: &Fingerprint, body: &str) -> String {
    let sig = identity.sign(rng, &signed_message(&identity.fingerprint(), to, body)).to_base64();
    let key = identity.public_key().to_base64();
    serde_json::to_string(&Relayed { peerlink: TAG, key: &key, sig: &sig, to: *to, body: body.into() }).expect("serializes")
}

/// Whether a relay payload is a room batch (an object with `"peerlink":"room/1"`).
#[doc(hidden)]
pub fn is_relayed(payload: &str) -> bool {
    #[derive(Deserialize)]
    struct Probe<'a> {
        #[serde(default, borrow)]
        peerlink: Option<&'a str>,
    }
    // serde would also take a struct from an array (`["room/1"]`): only objects are batches,
    // anything else is the application's (as for `Signal::decode`).
    payload.trim_start().starts_with('{') && serde_json::from_str::<Probe<'_>>(payload).is_ok_and(|p| p.peerlink == Some(TAG))
}

/// Checks a relayed batch from `from` (as the server says) to `me` and returns its items and
/// the sender's key. Any change to the body, key, signature or recipient, or a sender the key
/// is not from, refuses it with [`WireError::BadSignature`].
#[doc(hidden)]
pub fn decode_relayed(payload: &str, from: &Fingerprint, me: &Fingerprint) -> Result<(Vec<Item>, PublicKey), WireError> {
    let (body, key) = open_relayed(payload, from, me)?;
    Ok((decode_batch(&body)?, key))
}

/// Checks a relayed batch as [`decode_relayed`] does and returns its body (plaintext or
/// sealed: [`decode_body`]) and the sender's key.
#[doc(hidden)]
pub fn open_relayed(payload: &str, from: &Fingerprint, me: &Fingerprint) -> Result<(String, PublicKey), WireError> {
    let r: Relayed<'_> = serde_json::from_str(payload).map_err(malformed)?;
    if r.to != *me {
        return Err(WireError::BadSignature("addressed to another peer"));
    }
    let key = PublicKey::from_base64(r.key).map_err(|_| WireError::BadSignature("malformed key"))?;
    if key.fingerprint() != *from {
        return Err(WireError::BadSignature("the key is not the sender's"));
    }
    let sig = Signature::from_base64(r.sig).map_err(|_| WireError::BadSignature("malformed signature"))?;
    key.verify(&signed_message(from, me, &r.body), &sig).map_err(|_| WireError::BadSignature("signature does not verify"))?;
    Ok((r.body.into_owned(), key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn items() -> Vec<Item> {
        vec![
            Item::Data { room: "r\"1".into(), epoch: 7, seq: 1, data: RoomData::Json(r#"{"a":[1,2]}"#.into()) },
            Item::Data { room: "r".into(), epoch: 7, seq: 2, data: RoomData::Text("hé \"q\"\n".into()) },
            Item::Data { room: "r".into(), epoch: 7, seq: 3, data: RoomData::Binary(vec![0, 255, 3]) },
            Item::Ack { room: "r".into(), epoch: 9, seq: 0 },
            Item::Presence { room: "r".into(), epoch: 7, version: 3, ttl_ms: 1000, state: Some(r#"{"typing":true}"#.into()) },
            Item::Presence { room: "r".into(), epoch: 7, version: 4, ttl_ms: 1000, state: None },
        ]
    }

    #[test]
    fn batches_round_trip() {
        let body = encode_batch(&items());
        assert_eq!(decode_batch(&body).unwrap(), items());
        // 20-digit numbers and escaped room ids and text count in full (found by fuzzing).
        let big = [
            Item::Data { room: "\u{1}".repeat(128), epoch: u64::MAX, seq: u64::MAX, data: RoomData::Text("\u{1}\"".repeat(64)) },
            Item::Ack { room: "r".into(), epoch: u64::MAX, seq: u64::MAX },
            Item::Presence { room: "r".into(), epoch: u64::MAX, version: u64::MAX, ttl_ms: u64::MAX, state: Some("1".into()) },
        ];
        for item in items().into_iter().chain(big) {
            let mut s = String::new();
            item.encode_into(&mut s);
            assert!(s.len() <= item.encoded_len(), "{s}");
            if let Item::Data { data: data @ RoomData::Text(t), .. } = &item {
                assert_eq!(data.wire_len(), serde_json::to_string(t).unwrap().len());
            }
        }
    }

    #[test]
    fn relayed_batches_verify_and_refuse_tampering() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let (a, b, c) = (Identity::generate(&mut rng), Identity::generate(&mut rng), Identity::generate(&mut rng));
        let body = encode_batch(&items());
        let payload = encode_relayed(&a, &mut rng, &b.fingerprint(), &body);
        assert!(is_relayed(&payload));
        assert!(!is_relayed(r#"{"peerlink":"rtc/1"}"#) && !is_relayed("[1]") && !is_relayed("nope"));
        // serde takes a struct from an array too; only objects are batches (found by fuzzing).
        assert!(!is_relayed(r#"["room/1"]"#) && is_relayed(r#" {"peerlink":"room/1"}"#));
        let (got, key) = decode_relayed(&payload, &a.fingerprint(), &b.fingerprint()).unwrap();
        assert_eq!(got, items());
        assert_eq!(key.fingerprint(), a.fingerprint());
        // The server claims another sender, or delivers it to someone else.
        assert_eq!(
            decode_relayed(&payload, &c.fingerprint(), &b.fingerprint()).unwrap_err(),
            WireError::BadSignature("the key is not the sender's")
        );
        assert_eq!(decode_relayed(&payload, &a.fingerprint(), &c.fingerprint()).unwrap_err(), WireError::BadSignature("addressed to another peer"));
        // The body is altered.
        let altered = payload.replace(r#"\"s\":1"#, r#"\"s\":5"#);
        assert_ne!(altered, payload);
        assert_eq!(decode_relayed(&altered, &a.fingerprint(), &b.fingerprint()).unwrap_err(), WireError::BadSignature("signature does not verify"));
    }

    #[test]
    fn sealed_bodies_decode_and_bad_ones_get_typed_errors() {
        let sealed = encode_sealed(&[1, 2, 3, 255]);
        assert_eq!(decode_body(&sealed), Ok(Body::Sealed(vec![1, 2, 3, 255])));
        assert_eq!(decode_body(&encode_batch(&items())), Ok(Body::Items(items())));
        assert!(matches!(decode_body(r#"{"z":"!!"}"#), Err(WireError::Malformed(_))), "not base64");
        // Only an object is a sealed body; an array goes to the batch decoder, which refuses it.
        assert!(matches!(decode_body(r#"["AAAA"]"#), Err(WireError::Malformed(_))));
        assert!(matches!(decode_body(r#"{"z":5}"#), Err(WireError::Malformed(_))));
        assert!(matches!(decode_body(""), Err(WireError::Malformed(_))));
    }

    #[test]
    fn bad_batches_get_typed_errors() {
        for bad in [
            "",
            "[]",
            r#"{"m":{}}"#,
            r#"{"m":[{"t":"d","r":"r","e":1,"s":1}]}"#,
            r#"{"m":[{"t":"d","r":"r","e":1,"s":0,"x":"a"}]}"#,
            r#"{"m":[{"t":"d","r":"r","e":1,"s":1,"x":"a","b":"AA=="}]}"#,
            r#"{"m":[{"t":"d","r":"r","e":1,"s":1,"b":"!!"}]}"#,
            r#"{"m":[{"t":"a","r":"r","e":1}]}"#,
            r#"{"m":[{"t":"p","r":"r","e":1}]}"#,
            r#"{"m":[{"t":"z","r":"r","e":1}]}"#,
            r#"{"m":[{"t":"a","r":"","e":1,"s":1}]}"#,
            r#"{"m":[{"t":"a","r":"r","e":-1,"s":1}]}"#,
        ] {
            assert!(matches!(decode_batch(bad), Err(WireError::Malformed(_))), "{bad}");
        }
        let many = format!(r#"{{"m":[{}]}}"#, vec![r#"{"t":"a","r":"r","e":1,"s":1}"#; MAX_ITEMS + 1].join(","));
        assert_eq!(decode_batch(&many), Err(WireError::TooManyItems));
        assert!(matches!(decode_relayed("{}", &Fingerprint::from_bytes([0; 32]), &Fingerprint::from_bytes([1; 32])), Err(WireError::Malformed(_))));
    }
}
