//! A fixed 60 Hz game loop on `peerlink_blocking::PollNode`: no async runtime and no threads
//! in the loop. Each player joins the `arena` namespace; the newer one calls the other; once
//! the direct connection is up, every tick each player sends its position to the other over
//! an unordered, unreliable channel (stale positions are worthless) and reads what arrived.
//!
//! ```text
//! cargo run --release --example game_loop                       # two players + embedded server
//! cargo run --release --example game_loop -- ws://HOST:PORT     # one player on your server
//! ```
//!
//! With no URL it starts an embedded signaling server (on its own thread, like any server
//! would be) and runs two players in the same loop for five seconds.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use peerlink::{ChannelOptions, ClientEvent, NodeConfig, NodeEvent, Payload, PeerState, Reliability};
use peerlink_blocking::{PollNode, PollOptions, UdpBind};
use serde::{Deserialize, Serialize};

const TICK: Duration = Duration::from_micros(16_667);
const POSITIONS: &str = "positions";

#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
struct Position {
    tick: u64,
    x: f32,
    y: f32,
}

struct Player {
    name: &'static str,
    net: PollNode,
    joined: bool,
    opponent: Option<peerlink::Fingerprint>,
    /// The positions channel is open both ways.
    ready: bool,
    sent: u64,
    received: u64,
    last_seen: Option<Position>,
}

impl Player {
    fn new(url: &str, name: &'static str, bind: UdpBind) -> Result<Player> {
        let config = NodeConfig::with_client(peerlink::ClientConfig::new(url).alias(name));
        let net = PollNode::new(config, PollOptions { udp: bind, ..Default::default() })?;
        Ok(Player { name, net, joined: false, opponent: None, ready: false, sent: 0, received: 0, last_seen: None })
    }

    /// One tick of networking: poll, react to events, send our position.
    fn tick(&mut self, now: Instant, tick: u64) -> Result<()> {
        self.net.poll(now)?;
        while let Some(event) = self.net.poll_event() {
            match event {
                NodeEvent::Signaling(ClientEvent::Registered { fingerprint, .. }) => {
                    println!("[{}] registered as {}", self.name, fingerprint.short());
                }
                NodeEvent::Signaling(ClientEvent::PeerList { peers, .. }) => {
                    // The newcomer calls whoever is already in the arena.
                    if let Some(peer) = peers.first() {
                        println!("[{}] calling {} ({})", self.name, peer.alias, peer.fingerprint.short());
                        self.opponent = Some(peer.fingerprint);
                        self.net.node().connect_to_peer(now, peer.fingerprint)?;
                    }
                }
                NodeEvent::Incoming { peer } => {
                    println!("[{}] {} is calling", self.name, peer.short());
                    self.opponent = Some(peer);
                }
                NodeEvent::PeerState { peer, state } => {
                    println!("[{}] connection to {}: {state:?}", self.name, peer.short());
                    if state == PeerState::Connected && self.net.get_peer(&peer).is_some_and(|p| p.offerer) {
                        // The caller opens the positions channel; the other side sees it open.
                        let options = ChannelOptions::new(POSITIONS).unordered().reliability(Reliability::MaxRetransmits(0));
                        self.net.node().create_data_channel(now, peer, options)?;
                    }
                }
                NodeEvent::ChannelOpen { channel, .. } if channel == POSITIONS => self.ready = true,
                NodeEvent::Data { channel, data: Payload::Text(text), .. } if channel == POSITIONS => {
                    self.received += 1;
                    self.last_seen = Some(serde_json::from_str(&text)?);
                }
                NodeEvent::PeerError { error, .. } => bail!("[{}] connection failed: {error}", self.name),
                _ => {}
            }
        }
        if self.net.is_registered() && !self.joined {
            self.net.client().join(now, "arena", Some("game_loop"), None)?;
            self.joined = true;
        }
        if let (true, Some(peer)) = (self.ready, self.opponent) {
            let t = tick as f32 / 60.0;
            let me = Position { tick, x: t.cos() * 10.0, y: t.sin() * 10.0 };
            match self.net.node().send(now, peer, Some(POSITIONS), &me) {
                Ok(()) => self.sent += 1,
                // A full send buffer only means this position is dropped: the next tick has a
                // newer one.
                Err(peerlink::NodeError::Send(peerlink::SendError::WouldBlock { .. })) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

fn main() -> Result<()> {
    let url = std::env::args().nth(1);
    let (_server, url, mut players) = match url {
        Some(url) => {
            let player = Player::new(&url, "player", UdpBind::AllInterfaces)?;
            (None, url, vec![player])
        }
        None => {
            let server = peerlink_server::spawn(peerlink_server::ServerOptions::local())?;
            let url = server.url();
            println!("embedded server on {url}");
            let host = Player::new(&url, "host", UdpBind::Loopback)?;
            (Some(server), url, vec![host])
        }
    };
    let two_players = players.len() == 1 && _server.is_some();
    let run_for = if two_players { Duration::from_secs(5) } else { Duration::from_secs(3600) };
    let start = Instant::now();
    let mut next = start;
    let mut tick = 0u64;
    let mut slowest = Duration::ZERO;
    while start.elapsed() < run_for {
        let now = Instant::now();
        // The guest joins a moment after the host, so it finds the host in the arena.
        if two_players && players.len() == 1 && tick == 30 {
            players.push(Player::new(&url, "guest", UdpBind::Loopback)?);
        }
        for p in &mut players {
            p.tick(now, tick)?;
        }
        slowest = slowest.max(now.elapsed());
        if tick.is_multiple_of(60) {
            for p in &players {
                println!(
                    "[{}] tick {tick:>4}: sent {:>4}, received {:>4}, opponent at {:?}",
                    p.name, p.sent, p.received, p.last_seen.map(|q| (q.tick, q.x.round(), q.y.round()))
                );
            }
        }
        tick += 1;
        next += TICK;
        if let Some(sleep) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(sleep);
        }
    }
    println!("{tick} ticks in {:.1?}; the slowest tick spent {slowest:.1?} in networking", start.elapsed());
    if two_players {
        let got = players.iter().map(|p| p.received).min().unwrap_or(0);
        if got < 60 {
            bail!("players exchanged too few positions ({got})");
        }
        println!("both players received at least {got} positions directly from each other");
    }
    Ok(())
}
