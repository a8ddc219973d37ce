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
//!
//! ## HTTP on the signaling port
//!
//! The port also answers plain HTTP (HTTPS with TLS) requests that do not ask for a WebSocket
//! upgrade; each gets one response and the connection is closed:
//!
//! - `GET /healthz`: the core's [`Health`](peerlink::server::Health) as JSON,
//!   `{"status":"ok","reasons":[],"uptime_seconds":12.5,"connections":3,"sessions":2}`, with
//!   200, or 503 when the status is `degraded` (which a clustered server reports when its broker
//!   link fails; a single server is always `ok`).
//! - `GET /metrics`: the core's [`Metrics`](peerlink::server::Metrics) in the Prometheus text
//!   exposition format (`text/plain; version=0.0.4`). With [`ServerOptions::metrics_addr`]
//!   (the binary's `--metrics-listen ADDR`) `/metrics` is served only on that separate plain
//!   HTTP listener, which answers `/healthz` too and nothing else, so metrics can stay on a
//!   private address.
//! - `HEAD` of either: the headers alone. Other methods get 405, a malformed request 400, a
//!   request head above 8 KiB 431, other paths 404 (or a static file, below). None of this
//!   touches the WebSocket connections on the port.
//!
//! ## Static files
//!
//! With [`ServerOptions::serve_dir`] (the binary's `--serve-examples [DIR]`) the same port also
//! answers plain HTTP `GET` and `HEAD` requests with the files of that directory, so a browser
//! can load a web client from the server it signals through: a request that asks for a
//! WebSocket upgrade goes to signaling as before, any other request is answered with a file
//! (`/` is `/index.html`) and the connection is closed. Only regular files inside the directory
//! with a known type are served (`.html`, `.js`, `.mjs`, `.css`, `.json`, `.ivf`, `.webm`; at
//! most 32 MiB each); `..`, hidden names and symbolic links that lead outside are refused, and
//! directories are never listed. Files are read on the event loop's thread, so this is meant
//! for small demo and test pages, not as a general web server.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod cluster;
mod event_loop;
mod ops;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use peerlink::server::{ClusterConfig, NodeId, Server, ServerStats};
use tracing::{error, info};
use tungstenite::protocol::WebSocketConfig;

pub use cluster::ClusterBus;
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
    /// Also serve the static files of this directory over HTTP `GET` on the same port (see
    /// the [crate docs](crate#static-files)); `None` (the default) serves only WebSocket
    /// signaling. [`spawn`] fails if it is not a directory.
    pub serve_dir: Option<PathBuf>,
    /// Also listen on this address for plain HTTP `GET /metrics` and `GET /healthz` only (see
    /// the [crate docs](crate#http-on-the-signaling-port)); the signaling port then no longer
    /// answers `/metrics`. `None` (the default) serves both on the signaling port.
    pub metrics_addr: Option<SocketAddr>,
    /// Make this server a node of a cluster on the Redis at this URL (`redis://host:port/`;
    /// the binary's `--redis URL`): clients of every node see each other in namespaces and
    /// relay to each other (see `docs/CLUSTER.md`). Nodes of one cluster must share
    /// `config.server_id`, which also names their Redis channels. `None` (the default) runs
    /// a single server.
    pub redis: Option<String>,
    /// Make this server a node of a cluster whose nodes run in this process, on an in-process
    /// [`ClusterBus`] instead of Redis (tests, examples). Ignored when `redis` is set.
    pub cluster_bus: Option<ClusterBus>,
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
            serve_dir: None,
            metrics_addr: None,
            redis: None,
            cluster_bus: None,
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
    metrics_addr: Option<SocketAddr>,
    tls: bool,
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("addr", &self.addr)
            .field("metrics_addr", &self.metrics_addr)
            .field("tls", &self.tls)
            .finish()
    }
}

impl ServerHandle {
    /// Returns the address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Returns the address of the separate metrics listener
    /// ([`ServerOptions::metrics_addr`]), if there is one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
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

    /// Returns the URL of the static files served with [`ServerOptions::serve_dir`]:
    /// `http://IP:PORT`, or `https://localhost:PORT` with TLS (no trailing slash).
    pub fn http_url(&self) -> String {
        match self.url().split_once("://") {
            Some(("wss", rest)) => format!("https://{rest}"),
            Some((_, rest)) => format!("http://{rest}"),
            None => self.url(),
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
    let mut metrics_listener = match options.metrics_addr {
        Some(metrics_addr) => {
            let std_listener = std::net::TcpListener::bind(metrics_addr)
                .map_err(|e| io::Error::new(e.kind(), format!("binding the metrics listener {metrics_addr}: {e}")))?;
            std_listener.set_nonblocking(true)?;
            Some(mio::net::TcpListener::from_std(std_listener))
        }
        None => None,
    };
    let metrics_addr = match &mut metrics_listener {
        Some(l) => {
            poll.registry().register(l, event_loop::METRICS_LISTENER, mio::Interest::READABLE)?;
            Some(l.local_addr()?)
        }
        None => None,
    };
    let waker = mio::Waker::new(poll.registry(), event_loop::WAKER)?;
    let (stats_tx, stats_rx) = mpsc::channel();
    let control = Arc::new(Control { stop: AtomicBool::new(false), waker, stats: Mutex::new(Some(stats_tx)) });
    let ServerOptions { config, tls, seed, serve_dir, redis, cluster_bus, .. } = options;
    let serve_dir = match serve_dir {
        Some(dir) => {
            let canonical = std::fs::canonicalize(&dir).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
            if !canonical.is_dir() {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a directory", dir.display())));
            }
            Some(canonical)
        }
        None => None,
    };
    let ws_config = ws_config(config.max_frame_size);
    let seed = seed.unwrap_or_else(os_seed);
    let cluster_name = config.server_id.clone();
    let mut server = Server::new(config, seed, Instant::now(), unix_ms());
    let cluster = match (redis, cluster_bus) {
        (Some(url), _) => {
            let node = NodeId(os_seed());
            server.enable_cluster(ClusterConfig::new(node));
            let link = cluster::RedisLink::start(&url, &cluster_name, node, control.clone())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("--redis {url}: {e}")))?;
            info!(%node, redis = %url, "clustered: this server is a node");
            Some(cluster::Link::Redis(link))
        }
        (None, Some(bus)) => {
            let node = NodeId(os_seed());
            server.enable_cluster(ClusterConfig::new(node));
            info!(%node, "clustered on an in-process bus: this server is a node");
            Some(cluster::Link::Bus(bus.attach(node, control.clone())))
        }
        (None, None) => None,
    };
    let tls_config = tls.map(|t| t.config);
    let is_tls = tls_config.is_some();
    let loop_control = control.clone();
    let thread = thread::Builder::new().name("peerlink-server".into()).spawn(move || {
        let scheme = if is_tls { "wss" } else { "ws" };
        info!(url = %format!("{scheme}://{addr}"), "listening");
        let http = if is_tls { "https" } else { "http" };
        if let Some(dir) = &serve_dir {
            info!(dir = %dir.display(), url = %format!("{http}://{addr}/"), "serving static files");
        }
        match metrics_addr {
            Some(m) => info!(health = %format!("http://{m}/healthz"), metrics = %format!("http://{m}/metrics"), "operations endpoints on a separate listener"),
            None => info!(health = %format!("{http}://{addr}/healthz"), metrics = %format!("{http}://{addr}/metrics"), "operations endpoints"),
        }
        let control = loop_control.clone();
        let listeners = event_loop::Listeners { main: listener, metrics: metrics_listener };
        let result = event_loop::EventLoop::new(poll, listeners, tls_config, ws_config, server, loop_control, stats_rx, serve_dir, cluster).run();
        // Refuse later stats requests (the loop, and with it the receiver, is gone).
        if let Ok(mut guard) = control.stats.lock() {
            guard.take();
        }
        match result {
            Ok(()) => info!(%addr, "stopped"),
            Err(e) => error!(%addr, error = %e, "server failed"),
        }
    })?;
    Ok(ServerHandle { addr, metrics_addr, tls: is_tls, control, thread: Some(thread) })
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

/// Plain HTTP for [`ServerOptions::serve_dir`]: telling a WebSocket upgrade from a file request,
/// and answering the latter. Pure functions over bytes and the file system; the event loop
/// moves the bytes.
pub(crate) mod static_files {
    use std::path::{Component, Path, PathBuf};

    /// Longest request head read before refusing it (431).
    pub(crate) const MAX_HEAD: usize = 8 * 1024;
    /// Largest file served.
    pub(crate) const MAX_FILE: u64 = 32 * 1024 * 1024;

    /// What a complete request head asks for.
    #[derive(Debug, PartialEq, Eq)]
    pub(crate) enum Request<'a> {
        /// A WebSocket upgrade: hand the connection to signaling.
        Upgrade,
        /// Anything else.
        Http {
            /// The request method.
            method: &'a str,
            /// The request target (path and query).
            target: &'a str,
        },
        /// Not an HTTP/1.x request head.
        Malformed,
    }

    /// Where the head (request line and headers, through the blank line) ends in `buf`.
    pub(crate) fn head_end(buf: &[u8]) -> Option<usize> {
        buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
    }

    /// Reads a request head.
    pub(crate) fn parse(head: &[u8]) -> Request<'_> {
        let Ok(text) = std::str::from_utf8(head) else { return Request::Malformed };
        let mut lines = text.split("\r\n");
        let mut parts = lines.next().unwrap_or_default().split(' ');
        let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Request::Malformed;
        };
        if method.is_empty() || target.is_empty() || !version.starts_with("HTTP/1.") {
            return Request::Malformed;
        }
        for line in lines {
            let Some((name, value)) = line.split_once(':') else { continue };
            if name.trim().eq_ignore_ascii_case("upgrade") && value.split(',').any(|v| v.trim().eq_ignore_ascii_case("websocket")) {
                return Request::Upgrade;
            }
        }
        Request::Http { method, target }
    }

    /// The content type of the files served, by extension; other files are not served.
    pub(crate) fn content_type(path: &Path) -> Option<&'static str> {
        Some(match path.extension()?.to_str()? {
            "html" => "text/html; charset=utf-8",
            "js" | "mjs" => "text/javascript; charset=utf-8",
            "css" => "text/css; charset=utf-8",
            "json" => "application/json",
            "ivf" => "video/x-ivf",
            "webm" => "video/webm",
            _ => return None,
        })
    }

    /// Why a request gets no file.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Refusal {
        /// 400: the target is not a usable path.
        BadRequest,
        /// 403: the path tries to leave the directory.
        Forbidden,
        /// 404: no such servable file.
        NotFound,
        /// 405: not `GET` or `HEAD`.
        MethodNotAllowed,
        /// 431: the request head is too long.
        HeadTooLarge,
    }

    impl Refusal {
        fn status(self) -> &'static str {
            match self {
                Refusal::BadRequest => "400 Bad Request",
                Refusal::Forbidden => "403 Forbidden",
                Refusal::NotFound => "404 Not Found",
                Refusal::MethodNotAllowed => "405 Method Not Allowed",
                Refusal::HeadTooLarge => "431 Request Header Fields Too Large",
            }
        }
    }

    fn percent_decode(s: &str) -> Option<String> {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).ok()
    }

    /// The file `target` names under `root` (canonical), or why none is served. The target's
    /// query and fragment are ignored; it is percent-decoded; `..`, `.` and hidden segments,
    /// backslashes and NULs are refused; the result, symbolic links resolved, must be a
    /// regular file inside `root` with a [`content_type`].
    pub(crate) fn resolve(root: &Path, target: &str) -> Result<PathBuf, Refusal> {
        let path = target.split(['?', '#']).next().unwrap_or_default();
        if !path.starts_with('/') {
            return Err(Refusal::BadRequest);
        }
        let decoded = percent_decode(path).ok_or(Refusal::BadRequest)?;
        if decoded.contains(['\\', '\0']) {
            return Err(Refusal::Forbidden);
        }
        let mut relative = PathBuf::new();
        for segment in decoded.split('/').filter(|s| !s.is_empty()) {
            if segment.starts_with('.') {
                // `..`, `.`, and hidden files alike.
                return Err(Refusal::Forbidden);
            }
            relative.push(segment);
        }
        if decoded.ends_with('/') {
            relative.push("index.html");
        }
        if relative.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(Refusal::Forbidden);
        }
        let full = std::fs::canonicalize(root.join(&relative)).map_err(|_| Refusal::NotFound)?;
        if !full.starts_with(root) {
            // A symbolic link that leads out of the directory.
            return Err(Refusal::Forbidden);
        }
        let meta = std::fs::metadata(&full).map_err(|_| Refusal::NotFound)?;
        if !meta.is_file() || meta.len() > MAX_FILE || content_type(&full).is_none() {
            return Err(Refusal::NotFound);
        }
        Ok(full)
    }

    /// A whole response: status line, headers, and `body` unless `send_body` is false (`HEAD`).
    pub(crate) fn response(status: &str, content_type: &str, body: &[u8], send_body: bool, extra: &str) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-cache\r\n\
             X-Content-Type-Options: nosniff\r\nConnection: close\r\n{extra}\r\n",
            body.len()
        )
        .into_bytes();
        if send_body {
            out.extend_from_slice(body);
        }
        out
    }

    /// The error response for `refusal`.
    pub(crate) fn refusal(refusal: Refusal) -> Vec<u8> {
        let extra = if refusal == Refusal::MethodNotAllowed { "Allow: GET, HEAD\r\n" } else { "" };
        let status = refusal.status();
        response(status, "text/plain; charset=utf-8", format!("{status}\n").as_bytes(), true, extra)
    }

    /// The whole response to a request for `target` (status line, headers and body).
    pub(crate) fn respond(root: &Path, method: &str, target: &str) -> Vec<u8> {
        let head_only = match method {
            "GET" => false,
            "HEAD" => true,
            _ => return refusal(Refusal::MethodNotAllowed),
        };
        let file = match resolve(root, target) {
            Ok(file) => file,
            Err(r) => return refusal(r),
        };
        match std::fs::read(&file) {
            // `resolve` checked the type.
            Ok(body) => response("200 OK", content_type(&file).unwrap_or("application/octet-stream"), &body, !head_only, ""),
            Err(_) => refusal(Refusal::NotFound),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn requests_are_told_apart() {
            let ws = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\nSec-WebSocket-Version: 13\r\n\r\n";
            assert_eq!(head_end(ws), Some(ws.len()));
            assert_eq!(parse(ws), Request::Upgrade);
            assert_eq!(parse(b"GET /a.js?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"), Request::Http { method: "GET", target: "/a.js?x=1" });
            assert_eq!(parse(b"GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\n"), Request::Http { method: "GET", target: "/" });
            assert_eq!(parse(b"GET /\r\n\r\n"), Request::Malformed);
            assert_eq!(parse(b"GET / SPDY/3\r\n\r\n"), Request::Malformed);
            assert_eq!(parse(b"GET / HTTP/1.1 extra\r\n\r\n"), Request::Malformed);
            assert_eq!(parse(b"\xff\xfe / HTTP/1.1\r\n\r\n"), Request::Malformed);
            assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        }

        #[test]
        fn paths_stay_inside_the_directory() {
            let root = std::env::temp_dir().join(format!("peerlink-static-unit-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(root.join("sub")).unwrap();
            std::fs::write(root.join("index.html"), "<p>hi</p>").unwrap();
            std::fs::write(root.join("sub/app.js"), "export {}").unwrap();
            std::fs::write(root.join("sub/notes.txt"), "no").unwrap();
            std::fs::write(root.join(".secret.json"), "{}").unwrap();
            let root = std::fs::canonicalize(&root).unwrap();
            assert_eq!(resolve(&root, "/"), Ok(root.join("index.html")));
            assert_eq!(resolve(&root, "/index.html?cache=1#top"), Ok(root.join("index.html")));
            assert_eq!(resolve(&root, "//sub//app.js"), Ok(root.join("sub/app.js")));
            assert_eq!(resolve(&root, "/sub/%61pp.js"), Ok(root.join("sub/app.js")));
            for bad in ["/../etc/passwd", "/sub/../index.html", "/%2e%2e/etc/passwd", "/sub%2F..%2F..%2Fetc%2Fpasswd", "/./index.html", "/.secret.json", "/a\\b.js", "/x%00.js"] {
                assert_eq!(resolve(&root, bad), Err(Refusal::Forbidden), "{bad}");
            }
            for bad in ["index.html", "http://example.com/index.html", "/%zz.js", "/%e2%28.js"] {
                assert_eq!(resolve(&root, bad), Err(Refusal::BadRequest), "{bad}");
            }
            for missing in ["/nope.html", "/sub", "/sub/", "/sub/notes.txt"] {
                assert_eq!(resolve(&root, missing), Err(Refusal::NotFound), "{missing}");
            }
            std::fs::remove_dir_all(&root).unwrap();
        }

        #[test]
        fn responses_carry_type_and_length() {
            let root = std::env::temp_dir().join(format!("peerlink-static-resp-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&root).unwrap();
            std::fs::write(root.join("a.css"), "p{}").unwrap();
            let root = std::fs::canonicalize(&root).unwrap();
            let ok = String::from_utf8(respond(&root, "GET", "/a.css")).unwrap();
            assert!(ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.contains("Content-Type: text/css; charset=utf-8\r\n"), "{ok}");
            assert!(ok.contains("Content-Length: 3\r\n") && ok.ends_with("\r\n\r\np{}"), "{ok}");
            let head = String::from_utf8(respond(&root, "HEAD", "/a.css")).unwrap();
            assert!(head.contains("Content-Length: 3\r\n") && head.ends_with("\r\n\r\n"), "{head}");
            let post = String::from_utf8(respond(&root, "POST", "/a.css")).unwrap();
            assert!(post.starts_with("HTTP/1.1 405") && post.contains("Allow: GET, HEAD\r\n"), "{post}");
            std::fs::remove_dir_all(&root).unwrap();
        }
    }
}
