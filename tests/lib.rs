//! Shared harness for peerlink's workspace-level integration tests: the real signaling server on
//! 127.0.0.1, a raw protocol client for frame-level tests, a TCP proxy that can cut connections,
//! and small helpers for both adapters.
#![warn(missing_docs)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use peerlink::identity::Identity;
use peerlink::protocol::{self, ClientMessage, ServerMessage};
use peerlink::{ClientConfig, Fingerprint};
use rand::SeedableRng;
use tungstenite::Message;

pub use peerlink_server::{ServerHandle, ServerOptions};
pub mod chromium;
pub mod coturn;
pub mod relay_nodes;

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// Starts the real server on 127.0.0.1:0 with `config`.
pub fn start_server(config: peerlink::ServerConfig) -> ServerHandle {
    let mut options = ServerOptions::local();
    options.config = config;
    options.seed = Some(7);
    peerlink_server::spawn(options).expect("server starts")
}

/// Returns a deterministic identity for `seed`.
pub fn identity(seed: u64) -> Identity {
    Identity::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(seed))
}

/// A client config for `url` with fast reconnects, for tests.
pub fn client_config(url: &str, alias: &str) -> ClientConfig {
    let mut c = ClientConfig::new(url).alias(alias);
    c.reconnect_delay = Duration::from_millis(50);
    c.reconnect_max_delay = Duration::from_millis(400);
    c.request_timeout = Duration::from_secs(5);
    c
}

/// Runs an async test body on smol, failing it after `WAIT * 3`.
pub fn run_async<T, F: std::future::Future<Output = T>>(body: F) -> T {
    smol::block_on(futures_lite::future::or(body, async {
        smol::Timer::after(WAIT * 3).await;
        panic!("test timed out");
    }))
}

/// A frame-level client over blocking tungstenite, for tests that speak the wire protocol.
pub struct RawClient {
    ws: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    /// The challenge nonce of this connection.
    pub nonce: String,
    /// The server id from the challenge.
    pub server_id: String,
}

impl RawClient {
    /// Connects and reads the challenge.
    pub fn connect(url: &str) -> RawClient {
        let (mut ws, _) = tungstenite::connect(url).expect("websocket connects");
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
            s.set_read_timeout(Some(WAIT)).unwrap();
        }
        let text = match ws.read().expect("challenge") {
            Message::Text(t) => t.to_string(),
            other => panic!("expected the challenge, got {other:?}"),
        };
        match protocol::decode_server(&text).unwrap() {
            ServerMessage::Challenge { nonce, server_id, .. } => RawClient { ws, nonce, server_id },
            other => panic!("expected the challenge, got {other:?}"),
        }
    }

    /// Returns a `register` frame for `identity` signed over `nonce` (pass another
    /// connection's nonce to forge a replay).
    pub fn register_frame(&self, identity: &Identity, nonce: &str, id: u64) -> String {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(id);
        ClientMessage::register(id, identity, &mut rng, &self.server_id, nonce, "raw", None, None).encode()
    }

    /// Registers `identity` and returns the `registered` reply.
    pub fn register(&mut self, identity: &Identity) -> ServerMessage {
        let frame = self.register_frame(identity, &self.nonce.clone(), 1);
        self.send(&frame);
        self.recv()
    }

    /// Sends a text frame.
    pub fn send(&mut self, text: &str) {
        self.ws.send(Message::text(text)).expect("send");
    }

    /// Sends a text frame, returning false if the connection is already closed.
    pub fn try_send(&mut self, text: &str) -> bool {
        self.ws.send(Message::text(text)).is_ok()
    }

    /// Sends a binary frame.
    pub fn send_binary(&mut self, data: &[u8]) {
        self.ws.send(Message::binary(data.to_vec())).expect("send");
    }

    /// Reads the next text frame, decoded.
    pub fn recv(&mut self) -> ServerMessage {
        loop {
            match self.ws.read().expect("frame") {
                Message::Text(t) => return protocol::decode_server(&t).expect("server frames decode"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Reads until the server closes, returning the close code.
    pub fn expect_close(&mut self) -> u16 {
        loop {
            match self.ws.read() {
                Ok(Message::Close(Some(frame))) => return frame.code.into(),
                Ok(Message::Close(None)) => panic!("closed without a code"),
                Ok(_) => continue,
                Err(e) => panic!("connection failed before a close frame: {e}"),
            }
        }
    }

    /// Sends `ping` and reads frames until its `pong`, returning the frames before it.
    pub fn sync(&mut self, id: u64) -> Vec<ServerMessage> {
        self.send(&ClientMessage::Ping { id }.encode());
        let mut before = Vec::new();
        loop {
            match self.recv() {
                ServerMessage::Pong { id: got } if got == id => return before,
                other => before.push(other),
            }
        }
    }
}

/// A TCP proxy on 127.0.0.1 that can cut every connection through it, as a network drop would.
pub struct CutProxy {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    refuse: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl CutProxy {
    /// Starts a proxy to `target`.
    pub fn start(target: SocketAddr) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let refuse = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, r, s) = (conns.clone(), refuse.clone(), stop.clone());
        thread::spawn(move || {
            for inbound in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(inbound) = inbound else { continue };
                if r.load(Ordering::SeqCst) {
                    let _ = inbound.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(outbound) = TcpStream::connect(target) else { continue };
                let mut list = c.lock().unwrap();
                list.push(inbound.try_clone().unwrap());
                list.push(outbound.try_clone().unwrap());
                pipe(inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
                pipe(outbound, inbound);
            }
        });
        CutProxy { addr, conns, refuse, stop }
    }

    /// Returns the proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Returns the proxy's `ws://` URL.
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Cuts every connection through the proxy (both directions, no close frames).
    pub fn cut(&self) {
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// While set, new connections are accepted and dropped at once.
    pub fn refuse(&self, on: bool) {
        self.refuse.store(on, Ordering::SeqCst);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        self.cut();
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}

/// Polls `f` until it returns `Some`, failing after [`WAIT`].
pub fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Returns the fingerprints in a peer list.
pub fn fingerprints(peers: &[peerlink::PeerInfo]) -> Vec<Fingerprint> {
    peers.iter().map(|p| p.fingerprint).collect()
}

impl RawClient {
    /// Reads the next text frame, or the close code if the server closed the connection.
    pub fn recv_or_close(&mut self) -> Result<ServerMessage, u16> {
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => return Ok(protocol::decode_server(&t).expect("server frames decode")),
                Ok(Message::Close(frame)) => return Err(frame.map(|f| f.code.into()).unwrap_or(1005)),
                Ok(_) => continue,
                Err(e) => panic!("connection failed before a close frame: {e}"),
            }
        }
    }
}

/// Generated transfer content, any size, nothing stored: 8-byte words from a multiplicative
/// hash of their position. `offset` must be a multiple of 8 (chunk offsets are).
pub fn generate(offset: u64, buf: &mut [u8]) {
    for (i, word) in buf.chunks_mut(8).enumerate() {
        let v = (offset / 8 + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes();
        word.copy_from_slice(&v[..word.len()]);
    }
}

/// The SHA-256 of `size` bytes of [`generate`]d content.
pub fn generated_sha256(size: u64) -> [u8; 32] {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0; 1 << 20];
    let mut offset = 0;
    while offset < size {
        let n = (size - offset).min(buf.len() as u64) as usize;
        generate(offset, &mut buf[..n]);
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    hasher.finalize().into()
}
