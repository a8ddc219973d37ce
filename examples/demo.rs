//! The peerlink tour: an embedded signaling server on loopback and three clients (two on the
//! blocking adapter, one on smol) that register with verified identities, find each other in a
//! namespace, relay and broadcast, match, and run a room. Prints what happened.
//!
//! ```text
//! cargo run --release --example demo
//! ```

use std::time::Duration;

use anyhow::{Context, Result};
use peerlink::{ClientConfig, ClientEvent};
use serde_json::json;

fn config(url: &str, alias: &str) -> ClientConfig {
    ClientConfig::new(url).alias(alias)
}

/// Waits for the first event that `pick` accepts.
fn wait<T>(c: &mut peerlink_blocking::Client, mut pick: impl FnMut(ClientEvent) -> Option<T>) -> Result<T> {
    loop {
        let event = c.next_event(Duration::from_secs(5))?.context("no event in time")?;
        if let Some(v) = pick(event) {
            return Ok(v);
        }
    }
}

fn main() -> Result<()> {
    let server = peerlink_server::spawn(peerlink_server::ServerOptions::local())?;
    let url = server.url();
    println!("server      listening on {url}");

    // Identities are ECDSA P-256 keys; the fingerprint is the hash of the key.
    let mut alice = peerlink_blocking::Client::connect(config(&url, "alice"))?;
    let (bob, mut bob_events) = smol::block_on(peerlink_smol::Client::connect(config(&url, "bob")))?;
    let mut carol = peerlink_blocking::Client::connect(config(&url, "carol"))?;
    for (name, fp) in [("alice", alice.fingerprint()), ("bob", bob.fingerprint()), ("carol", carol.fingerprint())] {
        println!("register    {name:<5} -> fingerprint {}", fp.short());
    }
    let short = |peers: &[peerlink::PeerInfo]| peers.iter().map(|p| p.alias.clone()).collect::<Vec<_>>();

    // Namespaces: the joiner gets the peer list, the others a peer_joined notice.
    println!("join        alice sees {:?}", short(&alice.join("demo")?));
    println!("join        bob   sees {:?}", short(&smol::block_on(bob.join("demo"))?));
    println!("join        carol sees {:?}", short(&carol.join("demo")?));
    let joined = wait(&mut alice, |e| match e {
        ClientEvent::PeerJoined { peer, .. } if peer.alias == "carol" => Some(peer.alias),
        _ => None,
    })?;
    println!("notice      alice: {joined} joined");

    // Relay: the server stamps `from` with the sender's verified fingerprint.
    alice.relay(bob.fingerprint(), &json!({"text": "hi bob"}))?;
    let (from, payload) = smol::block_on(async {
        loop {
            match bob_events.next().await {
                Some(ClientEvent::Relay { from, payload }) => return Some((from, payload)),
                Some(_) => continue,
                None => return None,
            }
        }
    })
    .context("bob's relay")?;
    println!("relay       bob got {} from {} (verified: {})", payload.get(), from.short(), from == alice.fingerprint());

    // Broadcast: every other member of the namespace.
    carol.broadcast("demo", &json!("hello, demo"))?;
    let got = wait(&mut alice, |e| match e {
        ClientEvent::Broadcast { payload, .. } => Some(payload.to_value()),
        _ => None,
    })?;
    println!("broadcast   alice got {got} from carol");

    // Matchmaking: groups form among equal criteria, and everyone hears at once.
    let bob2 = bob.clone();
    let matcher = std::thread::spawn(move || smol::block_on(bob2.match_peers("arena", Some(json!({"mode": "duel"})), 2)));
    let m = carol.match_peers("arena", Some(json!({"mode": "duel"})), 2)?;
    let m2 = matcher.join().expect("match thread")?;
    println!(
        "match       carol and bob matched: session {} (same for both: {}), group {:?}",
        &m.session_id[..8],
        m.session_id == m2.session_id,
        short(&m.peers)
    );

    // Rooms: the owner may kick and close; a full room refuses.
    let room = smol::block_on(bob.create_room("den", Some(2), Some(json!({"topic": "rust"}))))?;
    println!("room        bob created `{}` (max {})", room.room_id, room.max_size);
    let (_, members) = alice.join_room("den")?;
    println!("room        alice joined, members before her: {:?}", short(&members));
    match carol.join_room("den") {
        Err(e) => println!("room        carol refused: {e}"),
        Ok(_) => anyhow::bail!("a full room admitted carol"),
    }
    match alice.kick("den", bob.fingerprint()) {
        Err(e) => println!("room        alice may not kick: {e}"),
        Ok(()) => anyhow::bail!("a non-owner kicked"),
    }
    smol::block_on(bob.kick("den", alice.fingerprint()))?;
    wait(&mut alice, |e| matches!(e, ClientEvent::Kicked { .. }).then_some(()))?;
    println!("room        bob kicked alice; alice was told");
    smol::block_on(bob.close_room("den"))?;
    println!("room        bob closed `den`");

    // A clean disconnect: the others see the peer leave at once.
    carol.disconnect();
    wait(&mut alice, |e| matches!(e, ClientEvent::PeerLeft { .. }).then_some(()))?;
    println!("leave       carol disconnected; alice saw peer_left");

    let rtt = alice.ping()?;
    println!("ping        alice round trip {rtt:?}");
    smol::block_on(bob.disconnect());
    alice.disconnect();
    std::thread::sleep(Duration::from_millis(50));
    let stats = server.stats();
    println!("server      {} connections, {} sessions left; shutting down", stats.connections, stats.active_sessions);
    server.shutdown();
    Ok(())
}
