//! # peerlink-server
//!
//! The peerlink signaling server on the network: a thin WebSocket (and optionally TLS) adapter
//! around the sans-IO [`peerlink::Server`], running on [smol](https://docs.rs/smol).
//! Every protocol decision lives in the core; this crate only moves frames.
//!
//! ```no_run
//! use peerlink_server::{spawn, ServerOptions};
//!
//! let mut options = ServerOptions::local();
//! options.config.server_id = "example".into();
//! let server = spawn(options)?;
//! println!("clients connect to {}", server.url());
//! println!("{:?}", server.stats());
//! server.shutdown(); // every client gets close 1001
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! ## Architecture
//!
//! * One **core task**, on its own thread, owns the [`peerlink::Server`]. Connection tasks send
//!   it their inputs over one bounded channel (a full channel back-pressures the readers); it
//!   handles them in batches, routes every [`ServerTransmit`] to the connection's outbound
//!   queue, and sleeps until the next input or [`Server::poll_timeout`].
//! * One **task per connection** (on a smol executor) alternates between reading the next
//!   WebSocket frame and writing whatever its outbound queue holds (all queued frames fed, then
//!   one flush, then one `Sent` report so the core can account its `outbound_queue_bytes`).
//!
//! Connection tasks run on the thread that drives [`run`] plus `PEERLINK_IO_THREADS` extra
//! threads (default: the number of CPUs minus one, at least one: on 2 cores the relay benchmark
//! delivered 121k msg/s with one extra thread against 97k with none).
#![warn(missing_docs)]
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_channel::{Receiver, Sender, TryRecvError};
use async_tungstenite::WebSocketStream;
use futures_lite::future;
use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use futures_util::{SinkExt, StreamExt};
use peerlink::protocol::CloseCode;
use peerlink::server::{ConnId, Server, ServerStats, ServerTransmit};
use futures_rustls::server::TlsStream;
use smol::net::{TcpListener, TcpStream};
use smol::{Executor, Timer};
use tracing::{debug, error, info, warn};
use tungstenite::error::Error as WsError;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::{Message, WebSocketConfig};
use tungstenite::{Bytes, Utf8Bytes};

pub use peerlink::ServerConfig;

/// Capacity of the channel carrying every connection's inputs to the core task.
const INPUT_CAPACITY: usize = 8192;
/// Most inputs the core task handles before it re-checks its timers.
const BATCH: usize = 256;
/// Most bytes one connection writes per burst before it reads again.
const WRITE_BURST_BYTES: usize = 256 * 1024;
/// Time allowed for the TLS and WebSocket handshakes.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a close handshake (or a stuck final write).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed for connections to close on shutdown.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// How to run a server: where to listen, the core configuration, TLS and the random seed.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Address to bind (`spawn` only; [`run`] takes a bound listener).
    pub addr: SocketAddr,
    /// The signaling server's limits and behaviour.
    pub config: ServerConfig,
    /// Serve `wss://` with this certificate; `None` serves plain `ws://`.
    pub tls: Option<TlsConfig>,
    /// Seed for the core's nonces and ids; `None` draws one from the OS.
    pub seed: Option<u64>,
}

impl ServerOptions {
    /// Listens on `127.0.0.1:0` (a free port) with the default configuration, no TLS and an OS
    /// seed.
    pub fn local() -> Self {
        ServerOptions {
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            config: ServerConfig::default(),
            tls: None,
            seed: None,
        }
    }
}

/// A TLS server certificate chain and key, ready to serve `wss://`.
#[derive(Clone)]
pub struct TlsConfig {
    acceptor: futures_rustls::TlsAcceptor,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConfig(..)")
    }
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

impl TlsConfig {
    /// Builds from a PEM certificate chain (leaf first) and a PEM private key (PKCS#8, PKCS#1
    /// or SEC1).
    pub fn from_pem(cert_chain_pem: &[u8], key_pem: &[u8]) -> io::Result<Self> {
        let certs = rustls_pemfile::certs(&mut &cert_chain_pem[..]).collect::<Result<Vec<_>, _>>()?;
        if certs.is_empty() {
            return Err(invalid("no certificate in the PEM certificate chain"));
        }
        let key = rustls_pemfile::private_key(&mut &key_pem[..])?
            .ok_or_else(|| invalid("no private key in the PEM key"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| invalid(e.to_string()))?;
        Ok(TlsConfig { acceptor: futures_rustls::TlsAcceptor::from(Arc::new(config)) })
    }

    /// Reads the PEM certificate chain and key from files; see [`TlsConfig::from_pem`].
    pub fn from_files(cert: &Path, key: &Path) -> io::Result<Self> {
        let with_path = |path: &Path, e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let cert_pem = std::fs::read(cert).map_err(|e| with_path(cert, e))?;
        let key_pem = std::fs::read(key).map_err(|e| with_path(key, e))?;
        Self::from_pem(&cert_pem, &key_pem)
    }
}

/// A running server started by [`spawn`]. Dropping it shuts the server down.
pub struct ServerHandle {
    addr: SocketAddr,
    tls: bool,
    inputs: Sender<Input>,
    shutdown: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle").field("addr", &self.addr).field("tls", &self.tls).finish()
    }
}

impl ServerHandle {
    /// Returns the address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Returns the URL clients connect to: `ws://IP:PORT`, or `wss://localhost:PORT` with TLS.
    /// An unspecified bind address (`0.0.0.0`, `::`) is given as the loopback address.
    pub fn url(&self) -> String {
        if self.tls {
            format!("wss://localhost:{}", self.addr.port())
        } else {
            let mut addr = self.addr;
            if addr.ip().is_unspecified() {
                addr.set_ip(if addr.is_ipv4() { Ipv4Addr::LOCALHOST.into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
            }
            format!("ws://{addr}")
        }
    }

    /// Asks the core task for its counts (a blocking round trip; do not call it from inside an
    /// async task). Returns the default (all zero) once the server has stopped.
    pub fn stats(&self) -> ServerStats {
        let (tx, rx) = async_channel::bounded(1);
        if self.inputs.send_blocking(Input::Stats(tx)).is_err() {
            return ServerStats::default();
        }
        rx.recv_blocking().unwrap_or_default()
    }

    /// Shuts down gracefully: stops accepting, closes every connection with 1001 (going away)
    /// and joins the server's threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        // Dropping the sender completes the shutdown future given to `run`.
        self.shutdown.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!("server thread panicked");
            }
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds `options.addr` and starts the server on a background thread; returns once it listens.
pub fn spawn(options: ServerOptions) -> io::Result<ServerHandle> {
    let std_listener = std::net::TcpListener::bind(options.addr)?;
    let addr = std_listener.local_addr()?;
    let listener = TcpListener::try_from(std_listener)?;
    let tls = options.tls.is_some();
    let (shutdown_tx, shutdown_rx) = async_channel::bounded::<()>(1);
    let (inputs_tx, inputs_rx) = async_channel::bounded(INPUT_CAPACITY);
    let inputs = inputs_tx.clone();
    let thread = thread::Builder::new().name("peerlink-server".into()).spawn(move || {
        let shutdown = async move {
            let _ = shutdown_rx.recv().await;
        };
        if let Err(e) = smol::block_on(run_with(listener, options, shutdown, inputs_tx, inputs_rx)) {
            error!(error = %e, "server failed");
        }
    })?;
    Ok(ServerHandle { addr, tls, inputs, shutdown: Some(shutdown_tx), thread: Some(thread) })
}

/// Serves on `listener` until `shutdown` completes, then closes every connection with 1001
/// (going away) and returns. `options.addr` is ignored (the listener is already bound).
///
/// The core task gets a thread of its own; connection tasks run on the caller's thread (and
/// `PEERLINK_IO_THREADS` extra threads). This is what [`spawn`] and the `peerlink-server`
/// binary use.
pub async fn run(listener: TcpListener, options: ServerOptions, shutdown: impl Future<Output = ()>) -> io::Result<()> {
    let (inputs_tx, inputs_rx) = async_channel::bounded(INPUT_CAPACITY);
    run_with(listener, options, shutdown, inputs_tx, inputs_rx).await
}

/// What connection tasks (and the handle) tell the core task.
enum Input {
    Connect { conn: ConnId, tx: Sender<Outbound> },
    Text { conn: ConnId, text: Utf8Bytes },
    Binary { conn: ConnId, data: Bytes },
    Disconnect { conn: ConnId },
    Sent { conn: ConnId, bytes: usize },
    Stats(Sender<ServerStats>),
    Shutdown,
}

/// What the core task tells a connection task.
enum Outbound {
    Text(Arc<str>),
    Close(CloseCode),
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn os_seed() -> u64 {
    use rand::TryRngCore;
    // Without an OS random source there is nothing safe to fall back to for nonces.
    rand::rngs::OsRng.try_next_u64().expect("the OS random source is available")
}

fn ws_config(max_frame_size: usize) -> WebSocketConfig {
    // Small buffers keep idle connections cheap; frames above 4x the core's limit are refused
    // by tungstenite itself (the core closes the ones in between with 1009).
    let hard_limit = max_frame_size.saturating_mul(4).max(1024);
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = 4 * 1024;
    config.write_buffer_size = 8 * 1024;
    config.max_message_size = Some(hard_limit);
    config.max_frame_size = Some(hard_limit);
    config
}

async fn run_with(
    listener: TcpListener,
    options: ServerOptions,
    shutdown: impl Future<Output = ()>,
    inputs_tx: Sender<Input>,
    inputs_rx: Receiver<Input>,
) -> io::Result<()> {
    let ServerOptions { config, tls, seed, .. } = options;
    let local = listener.local_addr()?;
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    let ws_config = ws_config(config.max_frame_size);
    let seed = seed.unwrap_or_else(os_seed);
    let server = Server::new(config, seed, Instant::now(), unix_ms());
    let core = thread::Builder::new().name("peerlink-core".into()).spawn(move || smol::block_on(core_task(server, inputs_rx)))?;

    let ex = Arc::new(Executor::new());
    let extra = std::env::var("PEERLINK_IO_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(|| thread::available_parallelism().map_or(1, |n| n.get()).saturating_sub(1).max(1));
    let (stop_tx, stop_rx) = async_channel::bounded::<()>(1);
    let mut workers = Vec::new();
    for i in 0..extra {
        let ex = ex.clone();
        let stop = stop_rx.clone();
        workers.push(
            thread::Builder::new()
                .name(format!("peerlink-io-{i}"))
                .spawn(move || smol::block_on(ex.run(async move { let _ = stop.recv().await; })))?,
        );
    }

    info!(addr = %local, "listening on {scheme}://{local}");
    let next_id = AtomicU64::new(1);
    // Every connection task holds a clone; when all are gone, `alive_rx` reports closed.
    let (alive_tx, alive_rx) = async_channel::bounded::<()>(1);
    ex.run(async {
        let accept = async {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let conn = ConnId(next_id.fetch_add(1, Ordering::Relaxed));
                        let inputs = inputs_tx.clone();
                        let tls = tls.clone();
                        let alive = alive_tx.clone();
                        let fut = async move {
                            connection(stream, peer, conn, tls, ws_config, inputs).await;
                            drop(alive);
                        };
                        ex.spawn(fut).detach();
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        Timer::after(Duration::from_millis(50)).await;
                    }
                }
            }
        };
        future::or(accept, shutdown).await;
        info!(addr = %local, "shutting down");
        drop(listener);
        let _ = inputs_tx.send(Input::Shutdown).await;
        drop(alive_tx);
        let drained = future::or(async { alive_rx.recv().await.is_err() }, async {
            Timer::after(SHUTDOWN_TIMEOUT).await;
            false
        })
        .await;
        if !drained {
            warn!("connections still open after the shutdown timeout; dropping them");
        }
    })
    .await;
    drop(stop_tx);
    drop(ex);
    let joined = smol::unblock(move || {
        for w in workers {
            let _ = w.join();
        }
        core.join().is_ok()
    })
    .await;
    if !joined {
        error!("core task panicked");
    }
    info!(addr = %local, "stopped");
    Ok(())
}

/// The core task: owns the [`Server`], handles every input, routes every transmit.
async fn core_task(mut server: Server, inputs: Receiver<Input>) {
    let mut conns: HashMap<ConnId, Sender<Outbound>> = HashMap::new();
    'outer: loop {
        // Wait for one input or the next deadline.
        let first = match inputs.try_recv() {
            Ok(input) => Some(input),
            Err(TryRecvError::Closed) => break,
            Err(TryRecvError::Empty) => match server.poll_timeout() {
                Some(at) => {
                    future::or(async { inputs.recv().await.ok() }, async {
                        Timer::at(at).await;
                        None
                    })
                    .await
                }
                None => match inputs.recv().await {
                    Ok(input) => Some(input),
                    Err(_) => break,
                },
            },
        };
        let now = Instant::now();
        let mut next = first;
        let mut handled = 0;
        while let Some(input) = next {
            if !handle_input(&mut server, &mut conns, input, now) {
                break 'outer;
            }
            handled += 1;
            next = if handled < BATCH { inputs.try_recv().ok() } else { None };
        }
        if server.poll_timeout().is_some_and(|at| at <= now) {
            if let Err(e) = server.handle_timeout(now) {
                error!(error = %e, "handle_timeout");
            }
            drain(&mut server, &mut conns);
        }
    }
    inputs.close();
    info!(connections = conns.len(), "closing every connection (1001)");
    for (_, tx) in conns.drain() {
        let _ = tx.try_send(Outbound::Close(CloseCode::GoingAway));
    }
}

/// Handles one input; returns false on shutdown.
fn handle_input(server: &mut Server, conns: &mut HashMap<ConnId, Sender<Outbound>>, input: Input, now: Instant) -> bool {
    let result = match input {
        Input::Connect { conn, tx } => {
            conns.insert(conn, tx);
            server.handle_connect(conn, now)
        }
        Input::Text { conn, text } => server.handle_message(conn, now, &text),
        Input::Binary { conn, data } => server.handle_binary(conn, now, &data),
        Input::Disconnect { conn } => {
            conns.remove(&conn);
            server.handle_disconnect(conn, now)
        }
        Input::Sent { conn, bytes } => {
            server.handle_sent(conn, bytes);
            Ok(())
        }
        Input::Stats(reply) => {
            let _ = reply.try_send(server.stats());
            Ok(())
        }
        Input::Shutdown => return false,
    };
    if let Err(e) = result {
        error!(error = %e, "peerlink server refused an input");
    }
    drain(server, conns);
    true
}

fn drain(server: &mut Server, conns: &mut HashMap<ConnId, Sender<Outbound>>) {
    while let Some(t) = server.poll_transmit() {
        match t {
            ServerTransmit::Text { conn, text } => {
                if let Some(tx) = conns.get(&conn) {
                    let _ = tx.try_send(Outbound::Text(text));
                }
            }
            ServerTransmit::Close { conn, code } => {
                if let Some(tx) = conns.remove(&conn) {
                    let _ = tx.try_send(Outbound::Close(code));
                }
            }
        }
    }
}

/// Lets `Bytes` share an `Arc<str>` without copying it.
struct SharedText(Arc<str>);

impl AsRef<[u8]> for SharedText {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

fn text_message(text: Arc<str>) -> Message {
    let bytes = Bytes::from_owner(SharedText(text));
    // Cannot fail: the bytes come from a `str`. (Checking costs a scan, not a copy.)
    Message::Text(Utf8Bytes::try_from(bytes).expect("str is UTF-8"))
}

fn close_frame(code: CloseCode) -> CloseFrame {
    CloseFrame { code: code.code().into(), reason: Utf8Bytes::from_static(code.reason()) }
}

async fn with_timeout<T>(limit: Duration, f: impl Future<Output = T>) -> Option<T> {
    future::or(async { Some(f.await) }, async {
        Timer::after(limit).await;
        None
    })
    .await
}

/// Accepts TLS (when configured) and the WebSocket handshake, then serves the connection.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    conn: ConnId,
    tls: Option<TlsConfig>,
    config: WebSocketConfig,
    inputs: Sender<Input>,
) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!(?conn, error = %e, "set_nodelay failed");
    }
    // The handshake and the serving futures are boxed one after the other (and built outside
    // this future), so a connection task only holds the state it needs now: an idle
    // connection holds no handshake state.
    // (The handshake result is consumed inside the `let`, so it is not kept across the
    // serving await.)
    let serving = match tls {
        None => match plain_handshake(stream, config).await {
            Some(Ok(ws)) => serve_boxed(ws, peer, conn, inputs),
            Some(Err(e)) => return debug!(?conn, %peer, error = %e, "websocket handshake failed"),
            None => return debug!(?conn, %peer, "websocket handshake timed out"),
        },
        Some(tls) => match tls_handshake(stream, tls, config).await {
            Some(Ok(ws)) => serve_boxed(ws, peer, conn, inputs),
            Some(Err(e)) => return debug!(?conn, %peer, error = %e, "tls/websocket handshake failed"),
            None => return debug!(?conn, %peer, "tls/websocket handshake timed out"),
        },
    };
    serving.await;
}

type Handshake<S> = Pin<Box<dyn Future<Output = Option<Result<WebSocketStream<S>, WsError>>> + Send>>;

fn plain_handshake(stream: TcpStream, config: WebSocketConfig) -> Handshake<TcpStream> {
    Box::pin(with_timeout(HANDSHAKE_TIMEOUT, async_tungstenite::accept_async_with_config(stream, Some(config))))
}

fn tls_handshake(stream: TcpStream, tls: TlsConfig, config: WebSocketConfig) -> Handshake<TlsStream<TcpStream>> {
    Box::pin(with_timeout(HANDSHAKE_TIMEOUT, async move {
        let stream = tls.acceptor.accept(stream).await.map_err(WsError::Io)?;
        async_tungstenite::accept_async_with_config(stream, Some(config)).await
    }))
}

fn serve_boxed<S>(ws: WebSocketStream<S>, peer: SocketAddr, conn: ConnId, inputs: Sender<Input>) -> Pin<Box<dyn Future<Output = ()> + Send>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    Box::pin(serve(ws, peer, conn, inputs))
}

enum Event {
    Read(Option<Result<Message, WsError>>),
    Out(Result<Outbound, async_channel::RecvError>),
}

/// Why a connection task ends.
enum End {
    /// The peer went away (close, EOF, reset, error): report a disconnect.
    Peer,
    /// The core closed it (or the server is shutting down): send this close code.
    Close(CloseCode),
    /// The peer sent a frame above the hard limit: send 1009 and report a disconnect.
    TooBig,
}

/// Serves one WebSocket connection: one task reading frames and writing the outbound queue.
async fn serve<S>(mut ws: WebSocketStream<S>, peer: SocketAddr, conn: ConnId, inputs: Sender<Input>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (tx, rx) = async_channel::unbounded();
    debug!(?conn, %peer, "connected");
    if inputs.send(Input::Connect { conn, tx }).await.is_err() {
        // Shutting down already.
        finish(&mut ws, conn, CloseCode::GoingAway, false).await;
        return;
    }
    // Frames received while a write was blocked, to be written before anything newer.
    let mut stash: VecDeque<Outbound> = VecDeque::new();
    let end = loop {
        let event = match stash.pop_front() {
            Some(out) => Event::Out(Ok(out)),
            None => {
                future::race(async { Event::Read(ws.next().await) }, async { Event::Out(rx.recv().await) }).await
            }
        };
        match event {
            Event::Read(Some(Ok(msg))) => {
                let input = match msg {
                    Message::Text(text) => Input::Text { conn, text },
                    Message::Binary(data) => Input::Binary { conn, data },
                    Message::Close(_) => break End::Peer,
                    // Pings are answered by tungstenite on the next read or write.
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                };
                if inputs.send(input).await.is_err() {
                    break End::Close(CloseCode::GoingAway);
                }
            }
            Event::Read(Some(Err(WsError::Capacity(e)))) => {
                debug!(?conn, error = %e, "frame above the hard limit");
                break End::TooBig;
            }
            Event::Read(Some(Err(e))) => {
                debug!(?conn, error = %e, "read failed");
                break End::Peer;
            }
            Event::Read(None) => break End::Peer,
            Event::Out(Err(_)) => break End::Close(CloseCode::GoingAway),
            Event::Out(Ok(Outbound::Close(code))) => break End::Close(code),
            Event::Out(Ok(Outbound::Text(first))) => {
                // Gather the burst: everything already queued, up to a byte budget.
                let mut bytes = first.len();
                let mut batch = vec![first];
                let mut close = None;
                while bytes < WRITE_BURST_BYTES {
                    let next = stash.pop_front().or_else(|| rx.try_recv().ok());
                    match next {
                        Some(Outbound::Text(t)) => {
                            bytes += t.len();
                            batch.push(t);
                        }
                        Some(Outbound::Close(code)) => {
                            close = Some(code);
                            break;
                        }
                        None => break,
                    }
                }
                let write = async {
                    for text in batch {
                        ws.feed(text_message(text)).await?;
                    }
                    ws.flush().await
                };
                if let Some(code) = close {
                    // Write what precedes the close (bounded: the peer may not be reading).
                    let _ = with_timeout(CLOSE_TIMEOUT, write).await;
                    break End::Close(code);
                }
                // A peer that stops reading blocks the write: keep listening for the core's
                // close (stashing newer frames) so a slow consumer can still be closed.
                let watch = async {
                    loop {
                        match rx.recv().await {
                            Ok(Outbound::Text(t)) => stash.push_back(Outbound::Text(t)),
                            Ok(Outbound::Close(code)) => return code,
                            Err(_) => return CloseCode::GoingAway,
                        }
                    }
                };
                match future::or(async { Ok(write.await) }, async { Err(watch.await) }).await {
                    Ok(Ok(())) => {
                        if inputs.send(Input::Sent { conn, bytes }).await.is_err() {
                            break End::Close(CloseCode::GoingAway);
                        }
                    }
                    Ok(Err(e)) => {
                        debug!(?conn, error = %e, "write failed");
                        break End::Peer;
                    }
                    Err(code) => break End::Close(code),
                }
            }
        }
    };
    match end {
        End::Peer => {
            let _ = inputs.send(Input::Disconnect { conn }).await;
            // Let tungstenite flush its reply to a peer's close frame.
            let _ = with_timeout(CLOSE_TIMEOUT, async { while let Some(Ok(_)) = ws.next().await {} }).await;
        }
        End::Close(code) => finish(&mut ws, conn, code, false).await,
        End::TooBig => {
            let _ = inputs.send(Input::Disconnect { conn }).await;
            finish(&mut ws, conn, CloseCode::MessageTooBig, true).await;
        }
    }
    debug!(?conn, %peer, "connection ended");
}

/// Sends a close frame and waits (briefly) for the peer's reply or EOF. `raw` drains the
/// socket directly, for when tungstenite refuses to read any further.
async fn finish<S>(ws: &mut WebSocketStream<S>, conn: ConnId, code: CloseCode, raw: bool)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    debug!(?conn, code = code.code(), "closing");
    let _ = with_timeout(CLOSE_TIMEOUT, async {
        if let Err(e) = ws.close(Some(close_frame(code))).await {
            debug!(?conn, error = %e, "close failed");
            return;
        }
        if raw {
            // Discard what the peer still sends so closing the socket does not reset the
            // connection before the peer has read our close frame.
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = ws.get_mut().read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        } else {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}
