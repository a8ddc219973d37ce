//! The conformance scenarios on `peerlink-blocking` (`PollNode`s polled in this thread).

use std::time::{Duration, Instant};

use peerlink::{Fingerprint, NodeConfig, NodeError, NodeEvent, RoomData, RoomEvent, RoomOptions, RoomView};
use peerlink_blocking::{Error, PollNode, PollOptions, UdpBind};
use peerlink_tests::{WAIT, client_config, start_server};

use crate::scenarios;
use crate::world::{RoomResult, World};

struct Blocking {
    _server: peerlink_tests::ServerHandle,
    nodes: Vec<PollNode>,
    events: Vec<Vec<RoomEvent>>,
}

fn room_err(e: Error) -> Option<peerlink::RoomError> {
    match e {
        Error::Node(NodeError::Room(e)) => Some(e),
        _ => None,
    }
}

impl Blocking {
    fn new(n: usize) -> Self {
        let server = start_server(peerlink::ServerConfig::default());
        let url = server.url();
        let nodes = (0..n)
            .map(|i| PollNode::new(NodeConfig::with_client(client_config(&url, &format!("b{i}"))), PollOptions { udp: UdpBind::Loopback, ..Default::default() }).unwrap())
            .collect();
        let mut w = Blocking { _server: server, nodes, events: vec![Vec::new(); n] };
        w.pump_until("registered", |w| w.nodes.iter().all(PollNode::is_registered));
        w
    }

    fn pump(&mut self) {
        for (n, log) in self.nodes.iter_mut().zip(self.events.iter_mut()) {
            n.poll(Instant::now()).unwrap();
            while let Some(e) = n.poll_event() {
                if let NodeEvent::Room(e) = e {
                    log.push(e);
                }
            }
        }
    }

    fn pump_until(&mut self, what: &str, done: impl Fn(&Blocking) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            assert!(Instant::now() < deadline, "blocking: {what}: timed out");
            self.pump();
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits for `Joined` (or an error) for `room` at member `i` after `since` events.
    fn entered(&mut self, i: usize, room: &str, since: usize) -> RoomResult {
        self.pump_until("entering", |w| {
            w.events[i][since..].iter().any(|e| matches!(e, RoomEvent::Joined { room: r, .. } | RoomEvent::Error { room: r, .. } if r == room))
        });
        match self.events[i][since..].iter().find(|e| matches!(e, RoomEvent::Joined { room: r, .. } | RoomEvent::Error { room: r, .. } if r == room)) {
            Some(RoomEvent::Error { error, .. }) => Err(Some(error.clone())),
            _ => Ok(()),
        }
    }
}

impl World for Blocking {
    fn backend(&self) -> &'static str {
        "blocking"
    }
    fn len(&self) -> usize {
        self.nodes.len()
    }
    fn fingerprint(&self, i: usize) -> Fingerprint {
        self.nodes[i].fingerprint()
    }
    fn create_room(&mut self, i: usize, room: &str, options: RoomOptions) -> RoomResult {
        let since = self.events[i].len();
        self.nodes[i].create_room(room, options).map_err(room_err)?;
        self.entered(i, room, since)
    }
    fn join_room(&mut self, i: usize, room: &str, options: peerlink::JoinOptions) -> RoomResult {
        let since = self.events[i].len();
        self.nodes[i].join_room_with(room, options).map_err(room_err)?;
        self.entered(i, room, since)
    }
    fn send(&mut self, i: usize, room: &str, to: Option<Fingerprint>, data: RoomData) -> RoomResult {
        self.nodes[i].room(room).send_data(to, data).map_err(room_err)
    }
    fn broadcast_via_server(&mut self, i: usize, room: &str, value: &serde_json::Value) -> RoomResult {
        self.nodes[i].room(room).broadcast_via_server(value).map_err(room_err)
    }
    fn kick(&mut self, i: usize, room: &str, peer: Fingerprint) -> RoomResult {
        self.nodes[i].room(room).kick(peer).map_err(room_err)
    }
    fn set_presence(&mut self, i: usize, room: &str, state: Option<&serde_json::Value>) -> RoomResult {
        self.nodes[i].room(room).set_presence(state).map_err(room_err)
    }
    fn leave(&mut self, i: usize, room: &str) -> RoomResult {
        self.nodes[i].room(room).leave().map_err(room_err)
    }
    fn info(&mut self, i: usize, room: &str) -> Option<RoomView> {
        self.nodes[i].room(room).info()
    }
    fn run_until(&mut self, what: &str, done: &mut dyn FnMut(&[Vec<RoomEvent>]) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(&self.events) {
            assert!(Instant::now() < deadline, "blocking: {what}: timed out\n{:#?}", self.events);
            self.pump();
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    fn events(&self, i: usize) -> &[RoomEvent] {
        &self.events[i]
    }
}

#[test]
fn delivery() {
    scenarios::delivery(&mut Blocking::new(4));
}

#[test]
fn encrypted_delivery() {
    scenarios::encrypted_delivery(&mut Blocking::new(3));
}

#[test]
fn presence() {
    scenarios::presence(&mut Blocking::new(3));
}

#[test]
fn refusals() {
    scenarios::refusals(&mut Blocking::new(3));
}

#[test]
fn leave_and_close() {
    scenarios::leave_and_close(&mut Blocking::new(3));
}
