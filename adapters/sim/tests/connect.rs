//! Two nodes connect through the simulated server and exchange messages.

use std::time::Duration;

use peerlink::{NodeConfig, NodeEvent, Payload, PeerState};
use peerlink_sim::{LinkConfig, Sim};

#[test]
fn two_nodes_connect_and_exchange() {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
    let mut sim = Sim::new(1);
    sim.set_default_link(LinkConfig::new(Duration::from_millis(20)));
    let a = sim.add_node("a", NodeConfig::new("sim://server"));
    let b = sim.add_node("b", NodeConfig::new("sim://server"));
    sim.run_for(Duration::from_millis(200));
    let b_fp = sim.fingerprint(b);
    let a_fp = sim.fingerprint(a);
    sim.with_node(a, |n, now| n.connect_to_peer(now, b_fp)).unwrap();
    let open = |sim: &Sim, node| sim.events(node).iter().any(|(_, e)| matches!(e, NodeEvent::ChannelOpen { .. }));
    assert!(sim.run_until(Duration::from_secs(10), |sim| open(sim, a) && open(sim, b)), "{:#?}\n{:#?}", sim.events(a), sim.events(b));
    let t = sim.elapsed();
    println!("connected at {t:?}");
    sim.with_node(a, |n, now| n.send_text(now, b_fp, None, "hi")).unwrap();
    sim.with_node(b, |n, now| n.send_binary(now, a_fp, None, &[1, 2, 3])).unwrap();
    sim.run_for(Duration::from_millis(500));
    assert!(sim.events(b).iter().any(|(_, e)| matches!(e, NodeEvent::Data { data: Payload::Text(t), .. } if t == "hi")));
    assert!(sim.events(a).iter().any(|(_, e)| matches!(e, NodeEvent::Data { data: Payload::Binary(d), .. } if d == &[1, 2, 3])));
    assert_eq!(sim.node(a).get_peer(&b_fp).unwrap().state, PeerState::Connected);
    for (t, e) in sim.events(a) {
        println!("a {t:?} {e:?}");
    }
    for (t, e) in sim.events(b) {
        println!("b {t:?} {e:?}");
    }
}
