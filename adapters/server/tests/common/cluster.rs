//! Cluster helpers: a real `redis-server` that can be stopped and started again on the same
//! port, bounded polling, and the namespace and relay requests of the cluster tests.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use peerlink::protocol::{ClientMessage, PeerInfo, ServerMessage};
use serde_json::value::RawValue;

use super::{Ws, identity, recv, send};

/// How long [`wait_until`] polls before it fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// A `redis-server` on 127.0.0.1, killed by its [`Child`] handle on [`Redis::stop`] and when
/// dropped.
pub struct Redis {
    child: Option<Child>,
    port: u16,
}

impl Redis {
    /// Starts one on a free port; returns once it accepts connections.
    pub fn start() -> Redis {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut redis = Redis { child: None, port };
        redis.restart();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Kills the server and waits for it to exit (nothing listens on its port afterwards).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server (again) on the same port; returns once it accepts connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server is still running");
        let port = self.port;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (Debian package redis-server)");
        // Owned by the guard from here on, so a panic below still kills it.
        let child = self.child.insert(child);
        wait_until(&format!("redis-server listens on port {port}"), || {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("redis-server on port {port} exited at start ({status}): is the port taken?");
            }
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `done` every 20 ms; fails the test when it is still false after [`WAIT`].
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {WAIT:?} waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The socket address of a `ws://` URL.
pub fn addr_of(url: &str) -> SocketAddr {
    url.strip_prefix("ws://").unwrap().parse().unwrap()
}

/// Joins `namespace`; returns the other members listed in `joined`.
pub fn join(ws: &mut Ws, id: u64, namespace: &str) -> Vec<PeerInfo> {
    send(ws, &ClientMessage::Join { id, namespace: namespace.into(), app_type: None, app_version: None });
    match recv(ws) {
        ServerMessage::Joined { id: got, peers, .. } if got == id => peers,
        other => panic!("{other:?}"),
    }
}

/// How many members `discover` lists in `namespace`.
pub fn discover(ws: &mut Ws, id: u64, namespace: &str) -> usize {
    send(ws, &ClientMessage::Discover { id, namespace: namespace.into(), limit: None });
    match recv(ws) {
        ServerMessage::Discovered { peers, .. } => peers.len(),
        other => panic!("{other:?}"),
    }
}

/// Relays `payload` (JSON text) to the client of identity seed `to`.
pub fn relay(ws: &mut Ws, id: Option<u64>, to: u64, payload: &str) {
    let payload = RawValue::from_string(payload.into()).unwrap();
    send(ws, &ClientMessage::Relay { id, to: identity(to).fingerprint(), payload: &payload });
}
