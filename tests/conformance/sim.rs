//! The conformance scenarios in the simulator (virtual time, one thread).

use std::time::Duration;

use peerlink::{Fingerprint, NodeConfig, NodeError, NodeEvent, RoomData, RoomEvent, RoomOptions, RoomView};
use peerlink_sim::{NodeId, Sim};

use crate::scenarios;
use crate::world::{RoomResult, World};

struct Simulated {
    sim: Sim,
    nodes: Vec<NodeId>,
    events: Vec<Vec<RoomEvent>>,
}

fn room_err(e: NodeError) -> Option<peerlink::RoomError> {
    match e {
        NodeError::Room(e) => Some(e),
        _ => None,
    }
}

impl Simulated {
    fn new(n: usize) -> Self {
        let mut sim = Sim::new(42);
        let nodes: Vec<NodeId> = (0..n).map(|i| sim.add_node(format!("s{i}"), NodeConfig::new("sim://server"))).collect();
        assert!(sim.run_until(Duration::from_secs(5), |sim| nodes.iter().all(|n| sim.node(*n).client().is_registered())));
        let mut w = Simulated { sim, nodes, events: vec![Vec::new(); n] };
        w.collect();
        w
    }

    fn collect(&mut self) {
        for (i, n) in self.nodes.iter().enumerate() {
            for (_, e) in self.sim.take_events(*n) {
                if let NodeEvent::Room(e) = e {
                    self.events[i].push(e);
                }
            }
        }
    }

    fn with(&mut self, i: usize, f: impl FnOnce(&mut peerlink::Node, std::time::Instant) -> Result<(), NodeError>) -> RoomResult {
        let r = self.sim.with_node(self.nodes[i], f).map_err(room_err);
        self.collect();
        r
    }

    fn entered(&mut self, i: usize, room: &str, since: usize) -> RoomResult {
        let room_id = room.to_owned();
        self.run_until("entering", &mut |ev| {
            ev[i][since..].iter().any(|e| matches!(e, RoomEvent::Joined { room: r, .. } | RoomEvent::Error { room: r, .. } if *r == room_id))
        });
        match self.events[i][since..].iter().find(|e| matches!(e, RoomEvent::Joined { room: r, .. } | RoomEvent::Error { room: r, .. } if r == room)) {
            Some(RoomEvent::Error { error, .. }) => Err(Some(error.clone())),
            _ => Ok(()),
        }
    }
}

impl World for Simulated {
    fn backend(&self) -> &'static str {
        "sim"
    }
    fn len(&self) -> usize {
        self.nodes.len()
    }
    fn fingerprint(&self, i: usize) -> Fingerprint {
        self.sim.fingerprint(self.nodes[i])
    }
    fn create_room(&mut self, i: usize, room: &str, options: RoomOptions) -> RoomResult {
        let since = self.events[i].len();
        self.with(i, |n, now| n.create_room(now, room, options))?;
        self.entered(i, room, since)
    }
    fn join_room(&mut self, i: usize, room: &str, options: peerlink::JoinOptions) -> RoomResult {
        let since = self.events[i].len();
        self.with(i, |n, now| n.join_room_with(now, room, options))?;
        self.entered(i, room, since)
    }
    fn send(&mut self, i: usize, room: &str, to: Option<Fingerprint>, data: RoomData) -> RoomResult {
        self.with(i, |n, now| n.room_send(now, room, to, data))
    }
    fn broadcast_via_server(&mut self, i: usize, room: &str, value: &serde_json::Value) -> RoomResult {
        let data = RoomData::json(value).unwrap();
        self.with(i, |n, now| n.room_broadcast_via_server(now, room, data))
    }
    fn kick(&mut self, i: usize, room: &str, peer: Fingerprint) -> RoomResult {
        self.with(i, |n, now| n.kick(now, room, peer))
    }
    fn set_presence(&mut self, i: usize, room: &str, state: Option<&serde_json::Value>) -> RoomResult {
        self.with(i, |n, now| n.set_presence(now, room, state))
    }
    fn leave(&mut self, i: usize, room: &str) -> RoomResult {
        self.with(i, |n, now| n.leave_room(now, room))
    }
    fn info(&mut self, i: usize, room: &str) -> Option<RoomView> {
        self.sim.node(self.nodes[i]).room(room)
    }
    fn run_until(&mut self, what: &str, done: &mut dyn FnMut(&[Vec<RoomEvent>]) -> bool) {
        let start = self.sim.elapsed();
        while !done(&self.events) {
            assert!(self.sim.elapsed() - start < Duration::from_secs(30), "sim: {what}: timed out\n{:#?}", self.events);
            self.sim.run_for(Duration::from_millis(10));
            self.collect();
        }
    }
    fn events(&self, i: usize) -> &[RoomEvent] {
        &self.events[i]
    }
}

#[test]
fn delivery() {
    scenarios::delivery(&mut Simulated::new(4));
}

#[test]
fn encrypted_delivery() {
    scenarios::encrypted_delivery(&mut Simulated::new(3));
}

#[test]
fn presence() {
    scenarios::presence(&mut Simulated::new(3));
}

#[test]
fn refusals() {
    scenarios::refusals(&mut Simulated::new(3));
}

#[test]
fn leave_and_close() {
    scenarios::leave_and_close(&mut Simulated::new(3));
}
