//! # peerlink-server
//!
//! The peerlink signaling server on the network: a thin WebSocket (and optionally TLS) adapter
//! around the sans-IO [`peerlink::Server`], running one `mio` event loop on a thread of its own.
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
//! One thread runs one event loop: a [`mio`] poll (epoll, edge-triggered) over the listener and
//! every connection, the [`peerlink::Server`] itself, and the route from its transmits to the
//! sockets. A frame that arrives is handed to the core at once; every frame the core sends is
//! encoded straight into its target's write buffer; at the end of the loop's turn each
//! connection written to is flushed with one `write` call and [`Server::handle_sent`] is told,
//! so the core's `outbound_queue_bytes` bounds what waits for a slow consumer (which is closed
//! with 4001). A connection is read at most 64 frames per turn so a busy client cannot starve
//! the rest. Nothing crosses a thread and nothing is allocated per relayed frame beyond the
//! core's shared text.
//!
//! Why one thread: on the 2-core machine this was measured on, a relay costs about as much in
//! the kernel (two TCP syscalls on loopback) as in the core, and every hand-off between threads
//! (a channel to a core thread, or a lock and a wake-up for the target's task) cost more than
//! the work it moved. The benchmark figures are in the repository README.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod event_loop;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use peerlink::server::{Server, ServerStats};
use tracing::{error, info};
use tungstenite::protocol::WebSocketConfig;

pub use peerlink::ServerConfig;

/// Time allowed for the TLS and WebSocket handshakes.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a close handshake (or a stuck final write).
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed for connections to close on shutdown.
pub(crate) const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// How to run a server: where to listen, the core configuration, TLS and the random seed.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Address to bind ([`spawn`] only; [`spawn_on`] takes a bound listener).
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
    config: Arc<rustls::ServerConfig>,
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
        Ok(TlsConfig { config: Arc::new(config) })
    }

    /// Reads the PEM certificate chain and key from files; see [`TlsConfig::from_pem`].
    pub fn from_files(cert: &Path, key: &Path) -> io::Result<Self> {
        let with_path = |path: &Path, e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let cert_pem = std::fs::read(cert).map_err(|e| with_path(cert, e))?;
        let key_pem = std::fs::read(key).map_err(|e| with_path(key, e))?;
        Self::from_pem(&cert_pem, &key_pem)
    }
}

/// What the handle shares with the event loop.
pub(crate) struct Control {
    /// Set to ask the loop to shut down.
    pub(crate) stop: AtomicBool,
    waker: mio::Waker,
    /// Stats requests; `None` once the loop has ended.
    stats: Mutex<Option<mpsc::Sender<mpsc::SyncSender<ServerStats>>>>,
}

/// A running server started by [`spawn`]. Dropping it shuts the server down.
pub struct ServerHandle {
    addr: SocketAddr,
    tls: bool,
    control: Arc<Control>,
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

    /// Asks the event loop for the core's counts and waits for the answer (one loop turn).
    /// Returns the default (all zero) once the server has stopped.
    pub fn stats(&self) -> ServerStats {
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let Ok(guard) = self.control.stats.lock() else { return ServerStats::default() };
            let Some(requests) = guard.as_ref() else { return ServerStats::default() };
            if requests.send(tx).is_err() {
                return ServerStats::default();
            }
        }
        let _ = self.control.waker.wake();
        // The loop answers every request it takes, and dropping its receiver drops the ones it
        // did not take, so this never waits forever.
        rx.recv().unwrap_or_default()
    }

    /// Returns true once the server's thread has finished (after a shutdown, or if it failed).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Shuts down gracefully: stops accepting, closes every connection with 1001 (going away),
    /// waits up to 5 s for the close handshakes and joins the server's thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.control.stop.store(true, Ordering::Release);
        let _ = self.control.waker.wake();
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

/// Binds `options.addr` and starts the server on a thread of its own; returns once it listens.
pub fn spawn(options: ServerOptions) -> io::Result<ServerHandle> {
    let listener = std::net::TcpListener::bind(options.addr)?;
    spawn_on(listener, options)
}

/// Starts the server on an already bound listener (`options.addr` is ignored), on a thread of
/// its own. This is what the `peerlink-server` binary uses.
pub fn spawn_on(listener: std::net::TcpListener, options: ServerOptions) -> io::Result<ServerHandle> {
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let mut listener = mio::net::TcpListener::from_std(listener);
    let poll = mio::Poll::new()?;
    poll.registry().register(&mut listener, event_loop::LISTENER, mio::Interest::READABLE)?;
    let waker = mio::Waker::new(poll.registry(), event_loop::WAKER)?;
    let (stats_tx, stats_rx) = mpsc::channel();
    let control = Arc::new(Control { stop: AtomicBool::new(false), waker, stats: Mutex::new(Some(stats_tx)) });
    let ServerOptions { config, tls, seed, .. } = options;
    let ws_config = ws_config(config.max_frame_size);
    let seed = seed.unwrap_or_else(os_seed);
    let server = Server::new(config, seed, Instant::now(), unix_ms());
    let tls_config = tls.map(|t| t.config);
    let is_tls = tls_config.is_some();
    let loop_control = control.clone();
    let thread = thread::Builder::new().name("peerlink-server".into()).spawn(move || {
        let scheme = if is_tls { "wss" } else { "ws" };
        info!(url = %format!("{scheme}://{addr}"), "listening");
        let control = loop_control.clone();
        let result = event_loop::EventLoop::new(poll, listener, tls_config, ws_config, server, loop_control, stats_rx).run();
        // Refuse later stats requests (the loop, and with it the receiver, is gone).
        if let Ok(mut guard) = control.stats.lock() {
            guard.take();
        }
        match result {
            Ok(()) => info!(%addr, "stopped"),
            Err(e) => error!(%addr, error = %e, "server failed"),
        }
    })?;
    Ok(ServerHandle { addr, tls: is_tls, control, thread: Some(thread) })
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
    // by tungstenite itself (the core closes the ones in between with 1009). Writes are
    // flushed once per loop turn; the write buffer size only makes tungstenite write early
    // when one turn's output for a connection exceeds it.
    let hard_limit = max_frame_size.saturating_mul(4).max(1024);
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = 4 * 1024;
    config.write_buffer_size = 64 * 1024;
    config.max_message_size = Some(hard_limit);
    config.max_frame_size = Some(hard_limit);
    config
}
