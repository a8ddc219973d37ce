//! The conformance world for the async adapters, written once: `peerlink-smol` and
//! `peerlink-tokio` have the same API, so one macro builds the world for each, over an
//! [`Exec`] (how to block on and spawn futures in that runtime).

/// How a runtime runs the world's futures.
pub trait Exec {
    /// The backend's name.
    const NAME: &'static str;
    /// Runs `f` to completion.
    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output;
    /// Runs `f` in the background.
    fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static);
}

/// Builds `AsyncWorld<X: Exec>` in the calling module for the adapter crate `$adapter`.
macro_rules! async_world {
    ($adapter:ident) => {
        use std::sync::{Arc, Mutex};
        use std::time::{Duration, Instant};

        use peerlink::{Fingerprint, NodeConfig, NodeError, NodeEvent, RoomData, RoomEvent, RoomOptions, RoomView};
        use peerlink_tests::{WAIT, client_config, start_server};
        use $adapter::{ConnectOptions, Error, Node, UdpBind};

        use crate::async_world::Exec;
        use crate::world::{RoomResult, World};

        /// N members on this adapter, each with a driver in `exec` and a task collecting its
        /// room events.
        pub struct AsyncWorld<X: Exec> {
            exec: X,
            _server: peerlink_tests::ServerHandle,
            nodes: Vec<Node>,
            shared: Vec<Arc<Mutex<Vec<RoomEvent>>>>,
            events: Vec<Vec<RoomEvent>>,
        }

        fn room_err(e: Error) -> Option<peerlink::RoomError> {
            match e {
                Error::Node(NodeError::Room(e)) => Some(e),
                _ => None,
            }
        }

        impl<X: Exec> AsyncWorld<X> {
            pub fn new(exec: X, n: usize) -> Self {
                let server = start_server(peerlink::ServerConfig::default());
                let url = server.url();
                let mut nodes = Vec::new();
                let mut shared = Vec::new();
                for i in 0..n {
                    let (node, mut events) = exec.block_on(Node::connect_with(
                        NodeConfig::with_client(client_config(&url, &format!("{}{i}", X::NAME))),
                        ConnectOptions { udp: UdpBind::Loopback, ..Default::default() },
                    ))
                    .unwrap();
                    let log = Arc::new(Mutex::new(Vec::new()));
                    let sink = log.clone();
                    exec.spawn(async move {
                        while let Some(e) = events.next().await {
                            if let NodeEvent::Room(e) = e {
                                sink.lock().unwrap().push(e);
                            }
                        }
                    });
                    nodes.push(node);
                    shared.push(log);
                }
                AsyncWorld { exec, _server: server, nodes, shared, events: vec![Vec::new(); n] }
            }

            fn sync(&mut self) {
                for (log, shared) in self.events.iter_mut().zip(&self.shared) {
                    *log = shared.lock().unwrap().clone();
                }
            }

            fn call(&mut self, f: impl std::future::Future<Output = Result<(), Error>>) -> RoomResult {
                let r = self.exec.block_on(f).map_err(room_err);
                self.sync();
                r
            }
        }

        impl<X: Exec> World for AsyncWorld<X> {
            fn backend(&self) -> &'static str {
                X::NAME
            }
            fn len(&self) -> usize {
                self.nodes.len()
            }
            fn fingerprint(&self, i: usize) -> Fingerprint {
                self.nodes[i].fingerprint()
            }
            fn create_room(&mut self, i: usize, room: &str, options: RoomOptions) -> RoomResult {
                let node = self.nodes[i].clone();
                self.call(async move { node.create_room(room, options).await.map(drop) })
            }
            fn join_room(&mut self, i: usize, room: &str, options: peerlink::JoinOptions) -> RoomResult {
                let node = self.nodes[i].clone();
                self.call(async move { node.join_room_with(room, options).await.map(drop) })
            }
            fn send(&mut self, i: usize, room: &str, to: Option<Fingerprint>, data: RoomData) -> RoomResult {
                let r = self.nodes[i].room(room);
                self.call(async move { r.send_data(to, data).await })
            }
            fn broadcast_via_server(&mut self, i: usize, room: &str, value: &serde_json::Value) -> RoomResult {
                let r = self.nodes[i].room(room);
                self.call(async move { r.broadcast_via_server(value).await })
            }
            fn kick(&mut self, i: usize, room: &str, peer: Fingerprint) -> RoomResult {
                let r = self.nodes[i].room(room);
                self.call(async move { r.kick(peer).await })
            }
            fn set_presence(&mut self, i: usize, room: &str, state: Option<&serde_json::Value>) -> RoomResult {
                let r = self.nodes[i].room(room);
                self.call(async move { r.set_presence(state).await })
            }
            fn leave(&mut self, i: usize, room: &str) -> RoomResult {
                let r = self.nodes[i].room(room);
                self.call(async move { r.leave().await })
            }
            fn info(&mut self, i: usize, room: &str) -> Option<RoomView> {
                self.exec.block_on(self.nodes[i].room(room).info())
            }
            fn run_until(&mut self, what: &str, done: &mut dyn FnMut(&[Vec<RoomEvent>]) -> bool) {
                let deadline = Instant::now() + WAIT;
                loop {
                    self.sync();
                    if done(&self.events) {
                        return;
                    }
                    assert!(Instant::now() < deadline, "{}: {what}: timed out\n{:#?}", X::NAME, self.events);
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            fn events(&self, i: usize) -> &[RoomEvent] {
                &self.events[i]
            }
        }

    };
}

pub(crate) use async_world;
