//! The conformance scenarios on `peerlink-tokio` (drivers on a multi-thread tokio runtime;
//! each member's events collected by a task).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use peerlink::{Fingerprint, NodeConfig, NodeError, NodeEvent, RoomData, RoomEvent, RoomOptions, RoomView};
use peerlink_tokio::{ConnectOptions, Error, Node, UdpBind};
use peerlink_tests::{WAIT, client_config, start_server};

use crate::scenarios;
use crate::world::{RoomResult, World};

struct Tokio {
    rt: ::tokio::runtime::Runtime,
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

impl Tokio {
    fn new(n: usize) -> Self {
        let server = start_server(peerlink::ServerConfig::default());
        let url = server.url();
        let rt = ::tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let mut nodes = Vec::new();
        let mut shared = Vec::new();
        for i in 0..n {
            let (node, mut events) = rt.block_on(Node::connect_with(
                NodeConfig::with_client(client_config(&url, &format!("t{i}"))),
                ConnectOptions { udp: UdpBind::Loopback, ..Default::default() },
            ))
            .unwrap();
            let log = Arc::new(Mutex::new(Vec::new()));
            let sink = log.clone();
            rt.spawn(async move {
                while let Some(e) = events.next().await {
                    if let NodeEvent::Room(e) = e {
                        sink.lock().unwrap().push(e);
                    }
                }
            });
            nodes.push(node);
            shared.push(log);
        }
        Tokio { rt, _server: server, nodes, shared, events: vec![Vec::new(); n] }
    }

    fn sync(&mut self) {
        for (log, shared) in self.events.iter_mut().zip(&self.shared) {
            *log = shared.lock().unwrap().clone();
        }
    }

    fn call(&mut self, f: impl std::future::Future<Output = Result<(), Error>>) -> RoomResult {
        let r = self.rt.block_on(f).map_err(room_err);
        self.sync();
        r
    }
}

impl World for Tokio {
    fn backend(&self) -> &'static str {
        "tokio"
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
    fn join_room(&mut self, i: usize, room: &str) -> RoomResult {
        let node = self.nodes[i].clone();
        self.call(async move { node.join_room(room).await.map(drop) })
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
        self.rt.block_on(self.nodes[i].room(room).info())
    }
    fn run_until(&mut self, what: &str, done: &mut dyn FnMut(&[Vec<RoomEvent>]) -> bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            self.sync();
            if done(&self.events) {
                return;
            }
            assert!(Instant::now() < deadline, "tokio: {what}: timed out\n{:#?}", self.events);
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    fn events(&self, i: usize) -> &[RoomEvent] {
        &self.events[i]
    }
}

#[test]
fn delivery() {
    scenarios::delivery(&mut Tokio::new(4));
}

#[test]
fn presence() {
    scenarios::presence(&mut Tokio::new(3));
}

#[test]
fn refusals() {
    scenarios::refusals(&mut Tokio::new(3));
}

#[test]
fn leave_and_close() {
    scenarios::leave_and_close(&mut Tokio::new(3));
}
