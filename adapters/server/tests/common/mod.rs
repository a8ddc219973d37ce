//! Shared helpers: a blocking tungstenite client that registers for real, a TLS client
//! configuration trusting one certificate, the server binary on a free port, and plain HTTP
//! requests; in `cluster`, a real `redis-server` and the cluster tests' requests.
#![allow(dead_code)]

mod cluster;
#[allow(unused_imports)] // Only the cluster tests use them.
pub use cluster::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use peerlink::identity::Identity;
use peerlink::protocol::{self, ClientMessage, ServerMessage};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

pub type Ws = WebSocket<MaybeTlsStream<TcpStream>>;

pub fn set_timeout(ws: &Ws) {
    let t = Some(Duration::from_secs(10));
    match ws.get_ref() {
        MaybeTlsStream::Plain(s) => s.set_read_timeout(t).unwrap(),
        MaybeTlsStream::Rustls(s) => s.sock.set_read_timeout(t).unwrap(),
        _ => {}
    }
}

pub fn connect(url: &str) -> Ws {
    let (ws, _) = tungstenite::connect(url).expect("connect");
    set_timeout(&ws);
    ws
}

/// Reads the next text frame as a server message (skipping pings/pongs).
pub fn recv(ws: &mut Ws) -> ServerMessage {
    loop {
        match ws.read().expect("read") {
            Message::Text(t) => return protocol::decode_server(&t).expect("decode"),
            Message::Close(f) => panic!("closed: {f:?}"),
            _ => {}
        }
    }
}

pub fn send(ws: &mut Ws, msg: &ClientMessage<'_>) {
    ws.send(Message::text(msg.encode())).expect("send");
}

/// Reads until the server's close frame; returns its code.
pub fn close_code(ws: &mut Ws) -> u16 {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(f))) => {
                // Answer it so the server's close handshake completes.
                let _ = ws.flush();
                return u16::from(f.code);
            }
            Ok(Message::Close(None)) => panic!("close without code"),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    }
}

pub fn identity(seed: u64) -> Identity {
    Identity::generate(&mut ChaCha20Rng::seed_from_u64(seed))
}

/// Reads the challenge and registers `identity`; returns after `registered`.
pub fn register(ws: &mut Ws, identity: &Identity, alias: &str) {
    let ServerMessage::Challenge { server_id, nonce, .. } = recv(ws) else { panic!("no challenge") };
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    send(ws, &ClientMessage::register(1, identity, &mut rng, &server_id, &nonce, alias, None, None));
    match recv(ws) {
        ServerMessage::Registered { id: 1, fingerprint, .. } => assert_eq!(fingerprint, identity.fingerprint()),
        other => panic!("expected registered, got {other:?}"),
    }
}

pub fn connect_registered(url: &str, seed: u64) -> Ws {
    let mut ws = connect(url);
    register(&mut ws, &identity(seed), &format!("peer{seed}"));
    ws
}

/// A rustls client configuration that trusts exactly `cert`.
pub fn tls_client_config(cert: &rustls::pki_types::CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// Starts the `peerlink-server` binary with `args` (add `--listen 127.0.0.1:0`) and reads the
/// URL of its one stdout line (`listening on URL`).
pub fn spawn_binary(args: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_peerlink-server")).args(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("bad line {line:?}")).to_owned();
    (child, url)
}

/// A plain HTTP response.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Parses a whole HTTP/1.1 response.
pub fn parse_response(raw: &[u8]) -> Response {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(raw)));
    let head = std::str::from_utf8(&raw[..end]).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines.map(|l| l.split_once(':').unwrap()).map(|(n, v)| (n.trim().to_string(), v.trim().to_string())).collect();
    Response { status, headers, body: raw[end + 4..].to_vec() }
}

/// Sends `request` as is and reads the response until the server closes.
pub fn raw_request(addr: SocketAddr, request: &[u8]) -> Response {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(request).unwrap();
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).expect("the server closes after the response");
    parse_response(&raw)
}

/// `GET target` with a minimal valid head.
pub fn get(addr: SocketAddr, target: &str) -> Response {
    raw_request(addr, format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n").as_bytes())
}
