//! Two blocking nodes driven together, for the scenarios through a TURN server: poll both
//! until a condition on their events holds, and read what the events say.

use std::time::{Duration, Instant};

use peerlink::turn::TurnEvent;
use peerlink::{NodeEvent, Payload};
use peerlink_blocking::PollNode;

/// Polls both nodes, collecting their events, until `done` holds for the events seen so far;
/// fails after `limit` naming `what`.
pub fn run(a: &mut PollNode, b: &mut PollNode, ea: &mut Vec<NodeEvent>, eb: &mut Vec<NodeEvent>, limit: Duration, what: &str, done: impl Fn(&[NodeEvent], &[NodeEvent]) -> bool) {
    let deadline = Instant::now() + limit;
    while !done(ea, eb) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}\nA: {ea:#?}\nB: {eb:#?}");
        a.poll(Instant::now()).unwrap();
        b.poll(Instant::now()).unwrap();
        ea.extend(std::iter::from_fn(|| a.poll_event()));
        eb.extend(std::iter::from_fn(|| b.poll_event()));
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether a TURN allocation succeeded.
pub fn allocated(events: &[NodeEvent]) -> bool {
    events.iter().any(|e| matches!(e, NodeEvent::Turn { event: TurnEvent::Allocated { .. }, .. }))
}

/// Whether the default data channel opened.
pub fn channel_open(events: &[NodeEvent]) -> bool {
    events.iter().any(|e| matches!(e, NodeEvent::ChannelOpen { channel, .. } if channel == "default"))
}

/// The text messages received, in order.
pub fn texts(events: &[NodeEvent]) -> Vec<String> {
    events.iter().filter_map(|e| match e {
        NodeEvent::Data { data: Payload::Text(t), .. } => Some(t.clone()),
        _ => None,
    }).collect()
}
