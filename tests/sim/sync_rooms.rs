//! State and document sync through real nodes in the simulator: changes travel on the direct
//! path and on the relay fallback alike, a member cut off from everything catches up in both
//! directions when it comes back, and a late joiner receives the whole state.

use std::time::Duration;

use peerlink::sync::{CrdtConfig, StateConfig};
use peerlink::yrs::{GetString, Text, Transact};
use peerlink::{NodeConfig, RoomPath};
use peerlink_sim::{NodeId, Sim};
use serde_json::json;

use crate::harness::*;

const ROOM: &str = "board";

fn sync_config() -> NodeConfig {
    let mut c = config();
    c.peer.connect_timeout = Duration::from_secs(5);
    c.peer.disconnect_timeout = Duration::from_secs(2);
    c
}

/// `n` nodes in [`ROOM`], each syncing state and documents.
fn synced_room(seed: u64, n: usize) -> (Sim, Vec<NodeId>) {
    let (mut sim, nodes) = room_world(ROOM, seed, n, sync_config());
    for &n in &nodes {
        sim.with_node(n, |node, now| {
            node.sync_state(now, ROOM, StateConfig::lww())?;
            node.sync_crdt(now, ROOM, CrdtConfig::default())
        })
        .unwrap();
    }
    (sim, nodes)
}

fn states_equal(sim: &Sim, nodes: &[NodeId]) -> bool {
    let digests: Vec<u64> = nodes.iter().map(|n| sim.node(*n).state(ROOM).map_or(0, |s| s.digest())).collect();
    digests.windows(2).all(|w| w[0] == w[1])
}

fn text(sim: &Sim, n: NodeId) -> String {
    let doc = sim.node(n).crdt(ROOM).and_then(|c| c.doc("notes")).expect("doc open");
    let t = doc.get_or_insert_text("text");
    t.get_string(&doc.transact())
}

fn edit(sim: &mut Sim, n: NodeId, s: &str) {
    sim.with_node(n, |node, now| {
        node.crdt_edit(now, ROOM, "notes", |doc| {
            let t = doc.get_or_insert_text("text");
            let mut txn = doc.transact_mut();
            let len = t.len(&txn);
            t.insert(&mut txn, len, s);
        })
    })
    .unwrap();
}

fn path(sim: &Sim, a: NodeId, b: NodeId) -> Option<RoomPath> {
    sim.node(a).room(ROOM)?.members.iter().find(|m| m.info.fingerprint == sim.fingerprint(b)).map(|m| m.path)
}

#[test]
fn state_and_documents_sync_over_direct_and_relay_paths_and_after_an_outage() {
    for seed in 0..10 {
        let (mut sim, nodes) = synced_room(seed, 3);
        let (a, b, c) = (nodes[0], nodes[1], nodes[2]);
        // UDP between a and b is cut: their sync messages take the relay.
        sim.partition(a, b);
        sim.run_for(Duration::from_secs(3));
        assert_eq!(path(&sim, a, b), Some(RoomPath::Relay), "seed {seed}");
        for i in 0..20 {
            let n = nodes[i % 3];
            sim.with_node(n, |node, now| node.state_set(now, ROOM, &format!("k{i}"), &json!(i))).unwrap();
            edit(&mut sim, n, &format!("{i};"));
            sim.run_for(Duration::from_millis(50));
        }
        assert!(sim.run_until(Duration::from_secs(20), |sim| states_equal(sim, &nodes)), "seed {seed}: state did not converge over the relay");
        assert!(sim.run_until(Duration::from_secs(20), |sim| text(sim, a) == text(sim, b) && text(sim, b) == text(sim, c)), "seed {seed}: text");
        assert_eq!(sim.node(b).state(ROOM).unwrap().get("k0"), Some(&json!(0)));
        assert_eq!(text(&sim, b).split(';').filter(|s| !s.is_empty()).count(), 20, "seed {seed}");

        // c loses the signaling server and every UDP link for 10 s; both sides keep writing.
        sim.heal(a, b);
        sim.set_signaling_down(c, true);
        sim.partition(a, c);
        sim.partition(b, c);
        for i in 0..10 {
            sim.with_node(a, |node, now| node.state_set(now, ROOM, &format!("during-{i}"), &json!("from a"))).unwrap();
            sim.with_node(c, |node, now| node.state_set(now, ROOM, &format!("offline-{i}"), &json!("from c"))).unwrap();
            sim.with_node(c, |node, now| node.state_delete(now, ROOM, "k1")).unwrap();
            edit(&mut sim, c, "c-offline;");
            edit(&mut sim, b, "b-online;");
            sim.run_for(Duration::from_secs(1));
        }
        sim.set_signaling_down(c, false);
        sim.heal(a, c);
        sim.heal(b, c);
        assert!(sim.run_until(Duration::from_secs(60), |sim| states_equal(sim, &nodes)), "seed {seed}: state did not converge after the outage");
        assert!(sim.run_until(Duration::from_secs(60), |sim| text(sim, a) == text(sim, c) && text(sim, b) == text(sim, c)), "seed {seed}: text after the outage");
        let s = sim.node(a).state(ROOM).unwrap();
        assert_eq!(s.get("offline-9"), Some(&json!("from c")));
        assert_eq!(s.get("k1"), None, "c's delete arrived");
        assert_eq!(sim.node(c).state(ROOM).unwrap().get("during-9"), Some(&json!("from a")));
        assert!(text(&sim, a).contains("c-offline;") && text(&sim, c).contains("b-online;"));
    }
}

#[test]
fn a_late_joiner_receives_the_whole_state_once() {
    let (mut sim, nodes) = synced_room(3, 2);
    let a = nodes[0];
    let keys = 2_000;
    for chunk in 0..20 {
        sim.with_node(a, |node, now| {
            for i in 0..keys / 20 {
                let k = chunk * (keys / 20) + i;
                node.state_set(now, ROOM, &format!("key-{k}"), &json!({ "n": k }))?;
            }
            Ok::<_, peerlink::NodeError>(())
        })
        .unwrap();
        sim.run_for(Duration::from_millis(20));
    }
    edit(&mut sim, a, "hello late joiner");
    sim.run_for(Duration::from_secs(2));
    let late = sim.add_node("late", sync_config());
    assert!(sim.run_until(Duration::from_secs(5), |sim| sim.node(late).client().is_registered()));
    sim.with_node(late, |node, now| {
        node.join_room(now, ROOM)?;
        node.sync_state(now, ROOM, StateConfig::lww())?;
        node.sync_crdt(now, ROOM, CrdtConfig::default())?;
        node.crdt_edit(now, ROOM, "notes", |_| ())
    })
    .unwrap();
    let all = [nodes[0], nodes[1], late];
    assert!(sim.run_until(Duration::from_secs(30), |sim| states_equal(sim, &all)), "late joiner did not catch up");
    assert!(sim.run_until(Duration::from_secs(30), |sim| text(sim, late) == "hello late joiner"));
    let s = sim.node(late).state(ROOM).unwrap();
    assert_eq!(s.len(), keys);
    // Each key came once (from one member: the exchange runs with each, but the first one
    // to answer leaves nothing for the other's to send, give or take a few in flight).
    let received = s.stats().entries_received;
    assert!(received >= keys as u64 && received < 2 * keys as u64, "{received} entries for {keys} keys");
}
