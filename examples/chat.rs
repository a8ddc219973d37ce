//! A terminal group chat in a named room, with presence: who is here, who is typing, and
//! whether each member is reached directly or through the server.
//!
//! ```text
//! cargo run --release --example chat -- --serve                   # a server on 127.0.0.1, prints its URL
//! cargo run --release --example chat -- --server ws://127.0.0.1:PORT --name alice
//! cargo run --release --example chat -- --server ws://127.0.0.1:PORT --name bob --json
//! ```
//!
//! Lines you type go to everyone in the room. Commands: `/who` (members, their path and
//! presence), `/typing` (tell the others you are typing; cleared when you send), `/status TEXT`,
//! `/to ALIAS TEXT` (to one member), `/quit`. With `--json`, every event is printed as one JSON
//! object per line (NDJSON) for other programs, and lines on standard input are sent as they are.
//! Without `--server`, the chat starts its own server on 127.0.0.1 and prints its URL, so others
//! can join with `--server`.

use std::collections::BTreeMap;
use std::io::BufRead;

use anyhow::{Context, Result, bail};
use futures_lite::FutureExt;
use peerlink::{ClientConfig, ErrorCode, Fingerprint, NodeConfig, NodeEvent, Payload, RoomError, RoomEvent, RoomOptions, RoomPath};
use peerlink_smol::{Error, Node, Room};
use serde_json::json;

struct Args {
    server: Option<String>,
    serve_only: bool,
    room: String,
    name: String,
    json: bool,
}

fn args() -> Result<Args> {
    let mut a = Args { server: None, serve_only: false, room: "lobby".into(), name: format!("guest-{}", std::process::id()), json: false };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--server" => a.server = Some(it.next().context("--server URL")?),
            "--serve" => a.serve_only = true,
            "--room" => a.room = it.next().context("--room NAME")?,
            "--name" => a.name = it.next().context("--name ALIAS")?,
            "--json" => a.json = true,
            "-h" | "--help" => {
                println!("chat [--server URL | --serve] [--room NAME] [--name ALIAS] [--json]");
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}` (see --help)"),
        }
    }
    Ok(a)
}

/// Prints events as text or NDJSON.
struct Out {
    json: bool,
    aliases: BTreeMap<Fingerprint, String>,
    /// Until the room says `Joined`, a refused join (the room did not exist yet, so we
    /// created it) is not news.
    joined: bool,
}

impl Out {
    fn alias(&self, fp: &Fingerprint) -> String {
        self.aliases.get(fp).cloned().unwrap_or_else(|| fp.short())
    }

    fn say(&self, event: serde_json::Value, text: String) {
        if self.json {
            println!("{event}");
        } else {
            println!("{text}");
        }
    }

    fn room_event(&mut self, e: &RoomEvent) {
        match e {
            RoomEvent::Error { .. } if !self.joined => {}
            RoomEvent::Joined { room, members, .. } => {
                self.joined = true;
                for m in members {
                    self.aliases.insert(m.fingerprint, m.alias.clone());
                }
                let names: Vec<&str> = members.iter().map(|m| m.alias.as_str()).collect();
                self.say(json!({ "event": "joined", "room": room, "members": names }), format!("* in #{room} with {}", if names.is_empty() { "nobody yet".into() } else { names.join(", ") }));
            }
            RoomEvent::PeerJoined { peer, .. } => {
                self.aliases.insert(peer.fingerprint, peer.alias.clone());
                self.say(json!({ "event": "peer_joined", "alias": peer.alias, "fingerprint": peer.fingerprint }), format!("* {} joined", peer.alias));
            }
            RoomEvent::PeerLeft { peer, kicked, .. } => {
                let who = self.alias(peer);
                self.say(json!({ "event": "peer_left", "alias": who, "fingerprint": peer, "kicked": kicked }), format!("* {who} {}", if *kicked { "was kicked" } else { "left" }));
            }
            RoomEvent::Data { from, data, path, .. } => {
                let who = self.alias(from);
                let text = match data {
                    Payload::Text(t) => serde_json::from_str::<serde_json::Value>(t).ok().and_then(|v| v.get("text").and_then(|t| t.as_str()).map(str::to_owned)).unwrap_or_else(|| t.clone()),
                    Payload::Binary(b) => format!("<{} bytes>", b.len()),
                };
                let via = if *path == RoomPath::Direct { "direct" } else { "relay" };
                self.say(json!({ "event": "message", "alias": who, "fingerprint": from, "text": text, "path": via }), format!("<{who}> {text}"));
            }
            RoomEvent::PathChanged { peer, path, .. } => {
                let who = self.alias(peer);
                let via = if *path == RoomPath::Direct { "direct" } else { "relay" };
                self.say(json!({ "event": "path", "alias": who, "path": via }), format!("* {who} is reached {}", if via == "direct" { "directly" } else { "through the server" }));
            }
            RoomEvent::Presence { peer, state, .. } => {
                let who = self.alias(peer);
                let typing = state.as_ref().and_then(|s| s.get("typing")).and_then(|t| t.as_bool()).unwrap_or(false);
                let status = state.as_ref().and_then(|s| s.get("status")).and_then(|t| t.as_str()).map(str::to_owned);
                let text = match (typing, &status) {
                    (true, _) => format!("* {who} is typing..."),
                    (false, Some(s)) => format!("* {who} is {s}"),
                    // Stopped typing: their message follows.
                    (false, None) if !self.json => return,
                    (false, None) => String::new(),
                };
                self.say(json!({ "event": "presence", "alias": who, "state": state }), text);
            }
            RoomEvent::PresenceExpired { peer, .. } => {
                let who = self.alias(peer);
                self.say(json!({ "event": "presence_expired", "alias": who }), format!("* {who} went quiet"));
            }
            RoomEvent::Closed { room } => self.say(json!({ "event": "closed", "room": room }), format!("* #{room} was closed")),
            RoomEvent::Kicked { room } => self.say(json!({ "event": "kicked", "room": room }), format!("* you were kicked from #{room}")),
            RoomEvent::Error { error, .. } => self.say(json!({ "event": "error", "error": error.to_string() }), format!("! {error}")),
            RoomEvent::Writable { .. } => {}
            other => self.say(json!({ "event": "other", "debug": format!("{other:?}") }), format!("* {other:?}")),
        }
    }
}

/// Joins `room`, creating it if nobody has yet.
async fn enter(node: &Node, room: &str) -> Result<Room> {
    match node.join_room(room).await {
        Ok(r) => Ok(r),
        Err(Error::Node(peerlink::NodeError::Room(RoomError::Request(e)))) if e.code() == Some(ErrorCode::RoomNotFound) => {
            Ok(node.create_room(room, RoomOptions::group(16)).await?)
        }
        Err(e) => Err(e.into()),
    }
}

fn main() -> Result<()> {
    let args = args()?;
    // Without a server URL, run one here (and, with --serve, only that).
    let server = match &args.server {
        Some(_) => None,
        None => Some(peerlink_server::spawn(peerlink_server::ServerOptions::local())?),
    };
    let url = args.server.clone().unwrap_or_else(|| server.as_ref().expect("started").url());
    if server.is_some() {
        eprintln!("server: {url}  (others join with: cargo run --release --example chat -- --server {url})");
    }
    if args.serve_only {
        eprintln!("serving; Ctrl-C to stop");
        loop {
            std::thread::park();
        }
    }

    // Standard input on a thread of its own; lines arrive on a channel.
    let (line_tx, line_rx) = async_channel::bounded::<String>(64);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if line_tx.send_blocking(line).is_err() {
                break;
            }
        }
    });

    smol::block_on(async {
        let config = NodeConfig::with_client(ClientConfig::new(&url).alias(&args.name));
        let (node, mut events) = Node::connect(config).await.context("connecting to the server")?;
        let room = enter(&node, &args.room).await?;
        let mut out = Out { json: args.json, aliases: BTreeMap::new(), joined: false };
        let mut typing = false;
        enum Next {
            Event(Option<NodeEvent>),
            Line(Option<String>),
        }
        loop {
            let next = async { Next::Event(events.next().await) }.or(async { Next::Line(line_rx.recv().await.ok()) }).await;
            match next {
                Next::Event(Some(NodeEvent::Room(e))) => out.room_event(&e),
                Next::Event(Some(_)) => {}
                Next::Event(None) | Next::Line(None) => break,
                Next::Line(Some(line)) => {
                    let line = line.trim();
                    if line.is_empty() {
                        continue;
                    }
                    let result = if out.json || !line.starts_with('/') {
                        if typing {
                            typing = false;
                            room.set_presence(None).await?;
                        }
                        room.send(&json!({ "text": line })).await
                    } else if line == "/quit" {
                        break;
                    } else if line == "/who" {
                        if let Some(info) = room.info().await {
                            println!("* #{} ({} of {}):", info.id, info.members.len() + 1, info.max_size);
                            for m in info.members {
                                println!("*   {} [{:?}] {}", m.info.alias, m.path, m.presence.map(|p| p.to_string()).unwrap_or_default());
                            }
                        }
                        Ok(())
                    } else if line == "/typing" {
                        typing = true;
                        room.set_presence(Some(&json!({ "typing": true }))).await
                    } else if let Some(status) = line.strip_prefix("/status ") {
                        room.set_presence(Some(&json!({ "status": status }))).await
                    } else if let Some(rest) = line.strip_prefix("/to ") {
                        let (alias, text) = rest.split_once(' ').unwrap_or((rest, ""));
                        match out.aliases.iter().find(|(_, a)| a.as_str() == alias) {
                            Some((fp, _)) => room.send_to(*fp, &json!({ "text": text })).await,
                            None => {
                                println!("! nobody called {alias}");
                                Ok(())
                            }
                        }
                    } else {
                        println!("! commands: /who /typing /status TEXT /to ALIAS TEXT /quit");
                        Ok(())
                    };
                    if let Err(e) = result {
                        out.say(json!({ "event": "error", "error": e.to_string() }), format!("! {e}"));
                    }
                }
            }
        }
        let _ = room.leave().await;
        node.close().await;
        Ok(())
    })
}
