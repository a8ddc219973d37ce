//! A malicious signaling server rewrites descriptions in flight. Each side refuses the other's
//! description with an identity-mismatch error, and no connection (and no data) results.

use std::time::Duration;

use peerlink::identity::Identity;
use peerlink::peer::signal::{BindingError, SdpKind, SessionId};
use peerlink::{NodeEvent, PeerError};
use peerlink_sim::Sim;
use rand::SeedableRng;
use serde_json::Value;

use crate::harness::*;

/// Rewrites the `sdp` (and optionally `key`/`sig`) of every offer and answer the server relays.
fn tamper(text: &str, rewrite: &mut dyn FnMut(&mut serde_json::Map<String, Value>)) -> Option<String> {
    let mut frame: Value = serde_json::from_str(text).ok()?;
    let is_negotiation = frame["type"] == "relay"
        && frame["payload"]["peerlink"] == "rtc/1"
        && matches!(frame["payload"]["t"].as_str(), Some("offer" | "answer"));
    if is_negotiation && let Some(payload) = frame["payload"].as_object_mut() {
        rewrite(payload);
    }
    Some(frame.to_string())
}

fn swap_fingerprint(sdp: &str) -> String {
    let fake = format!("a=fingerprint:sha-256 {}", vec!["AB"; 32].join(":"));
    sdp.lines().map(|l| if l.starts_with("a=fingerprint:") { fake.as_str() } else { l }).collect::<Vec<_>>().join("\r\n") + "\r\n"
}

fn assert_no_connection(sim: &Sim, a: peerlink_sim::NodeId, b: peerlink_sim::NodeId, expect: impl Fn(&PeerError) -> bool) {
    for (x, y) in [(a, b), (b, a)] {
        let fy = sim.fingerprint(y);
        let errors: Vec<_> = sim
            .events(x)
            .iter()
            .filter_map(|(_, e)| match e {
                NodeEvent::PeerError { peer, error } if *peer == fy => Some(error.clone()),
                _ => None,
            })
            .collect();
        assert!(errors.iter().any(&expect), "{}: {errors:?}", sim.name(x));
        assert!(!states(sim, x, y).iter().any(|(_, s)| *s == peerlink::PeerState::Connected), "{}: {:?}", sim.name(x), states(sim, x, y));
        assert!(!sim.events(x).iter().any(|(_, e)| matches!(e, NodeEvent::ChannelOpen { .. } | NodeEvent::Data { .. })));
        assert!(sim.node(x).get_peer(&fy).is_none(), "a failed connection is gone");
    }
}

#[test]
fn swapped_sdp_fingerprint_is_an_identity_mismatch_on_both_sides() {
    let (mut sim, n) = world(41, 2);
    let (a, b) = (n[0], n[1]);
    sim.set_signaling_filter(|_, text| tamper(text, &mut |p| {
        let sdp = p["sdp"].as_str().unwrap_or_default().to_string();
        p.insert("sdp".into(), Value::String(swap_fingerprint(&sdp)));
    }));
    let b_fp = sim.fingerprint(b);
    sim.with_node(a, |n, now| n.connect_to_peer(now, b_fp)).unwrap();
    sim.run_for(Duration::from_secs(5));
    assert_no_connection(&sim, a, b, |e| matches!(e, PeerError::IdentityMismatch(_)));
    // B saw the forgery itself: the signature does not cover the swapped fingerprint.
    assert!(sim.events(b).iter().any(|(_, e)| matches!(e, NodeEvent::PeerError { error: PeerError::IdentityMismatch(BindingError::BadSignature), .. })));
}

#[test]
fn a_server_signing_with_its_own_key_is_not_the_peer() {
    let (mut sim, n) = world(42, 2);
    let (a, b) = (n[0], n[1]);
    // The attacker re-signs the swapped fingerprint with its own identity.
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(99);
    let mallory = Identity::generate(&mut rng);
    let (fa, fb) = (sim.fingerprint(a), sim.fingerprint(b));
    sim.set_signaling_filter(move |to, text| {
        let recipient = if to == a { fa } else { fb };
        tamper(text, &mut |p| {
            let sdp = swap_fingerprint(p["sdp"].as_str().unwrap_or_default());
            let kind = if p["t"] == "offer" { SdpKind::Offer } else { SdpKind::Answer };
            let sid = p["sid"].as_str().unwrap_or_default();
            let mut bytes = [0u8; 16];
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = u8::from_str_radix(&sid[2 * i..2 * i + 2], 16).unwrap_or(0);
            }
            let dtls = peerlink::peer::signal::sdp_fingerprint(&sdp).unwrap();
            let (key, sig) = peerlink::peer::signal::sign_dtls(&mallory, &mut rng, kind, SessionId(bytes), &recipient, &dtls);
            p.insert("sdp".into(), Value::String(sdp));
            p.insert("key".into(), Value::String(key));
            p.insert("sig".into(), Value::String(sig));
        })
    });
    sim.with_node(a, |n, now| n.connect_to_peer(now, fb)).unwrap();
    sim.run_for(Duration::from_secs(5));
    assert_no_connection(&sim, a, b, |e| matches!(e, PeerError::IdentityMismatch(_)));
    assert!(sim.events(b).iter().any(|(_, e)| matches!(e, NodeEvent::PeerError { error: PeerError::IdentityMismatch(BindingError::WrongKey { .. }), .. })));
}
