//! The peerlink tour: an embedded signaling server on loopback and three clients (two on the
//! blocking adapter, one on smol) that register with verified identities, find each other in a
//! namespace, relay and broadcast, match, and run a room; then two nodes that connect directly
//! over UDP (WebRTC data channels, DTLS bound to their identities); then a managed group room of
//! three in which one member has no UDP, so its messages fall back to the server's relay; then
//! a file sent from one node to another (streamed from disk, chunked, backpressured, verified by
//! SHA-256, written as a part file renamed once verified) and a JSON value. The group room also
//! shares a key-value board (hybrid logical clocks, last writer wins) and a yrs text document
//! that all three edit at once; last, an end-to-end encrypted room whose members exchange keys
//! through the server, talk over the relay and directly, and send a file, all sealed; and a
//! call in which one node streams a VP8 test pattern to another, then mutes and unmutes; and a
//! signaling cluster of two nodes, one of which shuts down while its client moves to the other.
//! Prints what happened.
//!
//! ```text
//! cargo run --release --example demo
//! ```

use std::time::Duration;

use anyhow::{Context, Result};
use peerlink::{ChannelOptions, ClientConfig, ClientEvent, NodeConfig, NodeEvent, Payload, PeerState};
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

/// Polls a PollNode until `pick` accepts an event (up to 10 s).
fn wait_node<T>(n: &mut peerlink_blocking::PollNode, pick: impl FnMut(NodeEvent) -> Option<T>) -> Result<T> {
    wait_node_for(n, Duration::from_secs(10), pick)
}

/// Polls a PollNode until `pick` accepts an event, for up to `max`.
fn wait_node_for<T>(n: &mut peerlink_blocking::PollNode, max: Duration, mut pick: impl FnMut(NodeEvent) -> Option<T>) -> Result<T> {
    let deadline = std::time::Instant::now() + max;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let event = n.next_event(left)?.context("no event in time")?;
        if let Some(v) = pick(event) {
            return Ok(v);
        }
    }
}

/// Waits (up to 10 s) for the first event of a smol node that `pick` accepts.
fn wait_smol<T>(events: &mut peerlink_smol::NodeEvents, mut pick: impl FnMut(NodeEvent) -> Option<T>) -> Result<T> {
    smol::block_on(futures_lite::future::or(
        async {
            while let Some(e) = events.next().await {
                if let Some(v) = pick(e) {
                    return Ok(v);
                }
            }
            anyhow::bail!("the node stopped")
        },
        async {
            smol::Timer::after(Duration::from_secs(10)).await;
            anyhow::bail!("no event in time")
        },
    ))
}

fn direct(url: &str) -> Result<()> {
    let started = std::time::Instant::now();
    let loopback = peerlink_blocking::PollOptions { udp: peerlink_blocking::UdpBind::Loopback, ..Default::default() };
    let mut dave = peerlink_blocking::PollNode::new(NodeConfig::with_client(config(url, "dave")), loopback)?;
    let options = peerlink_smol::ConnectOptions { udp: peerlink_smol::UdpBind::Loopback, ..Default::default() };
    let (erin, mut erin_events) = smol::block_on(peerlink_smol::Node::connect_with(NodeConfig::with_client(config(url, "erin")), options))?;
    wait_node(&mut dave, |e| matches!(e, NodeEvent::Signaling(ClientEvent::Registered { .. })).then_some(()))?;
    let t0 = std::time::Instant::now();
    dave.connect_to_peer(erin.fingerprint())?;
    wait_node(&mut dave, |e| matches!(e, NodeEvent::ChannelOpen { .. }).then_some(()))?;
    let view = dave.get_peer(&erin.fingerprint()).context("dave's connection")?;
    println!(
        "direct      dave called erin over UDP: {:?} in {:.1?}, session {}, DTLS fingerprints signed by both identities",
        view.state,
        t0.elapsed(),
        &view.session[..8]
    );
    dave.send(erin.fingerprint(), None, &json!({"move": "e4"}))?;
    let got = wait_smol(&mut erin_events, |e| match e {
        NodeEvent::Data { data: Payload::Text(t), .. } => Some(t),
        _ => None,
    })?;
    println!("direct      erin got {got} straight from dave (no server in the path)");
    smol::block_on(erin.create_data_channel(dave.fingerprint(), ChannelOptions::new("bulk")))?;
    wait_node(&mut dave, |e| matches!(e, NodeEvent::ChannelOpen { channel, .. } if channel == "bulk").then_some(()))?;
    wait_smol(&mut erin_events, |e| matches!(e, NodeEvent::ChannelOpen { ref channel, .. } if channel == "bulk").then_some(()))?;
    smol::block_on(erin.send_binary(dave.fingerprint(), Some("bulk"), &vec![42u8; 60_000]))?;
    let len = wait_node(&mut dave, |e| match e {
        NodeEvent::Data { channel, data: Payload::Binary(b), .. } if channel == "bulk" => Some(b.len()),
        _ => None,
    })?;
    println!("direct      erin opened channel `bulk` and sent {len} bytes of binary to dave");
    dave.close_peer(erin.fingerprint())?;
    wait_smol(&mut erin_events, |e| matches!(e, NodeEvent::PeerState { state: PeerState::Closed, .. }).then_some(()))?;
    println!("direct      dave closed the connection; erin saw it close ({:.1?} for all of it)", started.elapsed());
    smol::block_on(erin.close());
    Ok(())
}

/// A file and a JSON value from ivan (blocking) to judy (smol): judy is asked about the file
/// and takes it into a directory; the JSON value she takes without asking.
fn transfer(url: &str) -> Result<()> {
    use peerlink::transfer::{Direction, TransferEvent};
    let dir = std::env::temp_dir().join(format!("peerlink-demo-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("received"))?;
    let file = dir.join("holiday.bin");
    let data: Vec<u8> = (0..16u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&file, &data)?;

    let loopback = peerlink_blocking::PollOptions { udp: peerlink_blocking::UdpBind::Loopback, ..Default::default() };
    let mut ivan = peerlink_blocking::PollNode::new(NodeConfig::with_client(config(url, "ivan")), loopback)?;
    let options = peerlink_smol::ConnectOptions { udp: peerlink_smol::UdpBind::Loopback, ..Default::default() };
    let (judy, mut judy_events) = smol::block_on(peerlink_smol::Node::connect_with(NodeConfig::with_client(config(url, "judy")), options))?;
    let (ivan_fp, judy_fp) = (ivan.fingerprint(), judy.fingerprint());
    let value = json!({"album": "holiday", "photos": 412, "tags": ["beach", "sunset"]});
    // Ivan's side on a thread of its own (a PollNode runs when it is polled): connect, offer
    // the file at once (it goes when the connection is up), then the JSON value.
    let started = std::time::Instant::now();
    let sender = {
        let (file, value) = (file.clone(), value.clone());
        std::thread::spawn(move || -> Result<()> {
            wait_node(&mut ivan, |e| matches!(e, NodeEvent::Signaling(ClientEvent::Registered { .. })).then_some(()))?;
            ivan.connect_to_peer(judy_fp)?;
            let mut pending = vec![ivan.send_file(judy_fp, &file)?, ivan.send_json(judy_fp, &value)?];
            while !pending.is_empty() {
                wait_node_for(&mut ivan, Duration::from_secs(60), |e| match e {
                    NodeEvent::Transfer(TransferEvent::Completed { id, .. }) => {
                        pending.retain(|p| *p != id);
                        Some(Ok(()))
                    }
                    NodeEvent::Transfer(TransferEvent::Failed { error, .. }) => Some(Err(error)),
                    _ => None,
                })??;
            }
            Ok(())
        })
    };
    let offer = wait_smol(&mut judy_events, |e| match e {
        NodeEvent::Transfer(TransferEvent::Offered { offer, .. }) => Some(offer),
        _ => None,
    })?;
    println!("transfer    judy is offered `{}` ({} bytes, {}) by ivan: she accepts", offer.name, offer.size, offer.mime);
    let target = dir.join("received").join(&offer.name);
    smol::block_on(judy.accept_to_file(ivan_fp, offer.id, &target))?;
    let mut got_json = None;
    let mut done = false;
    while !(done && got_json.is_some()) {
        match wait_smol(&mut judy_events, |e| match e {
            NodeEvent::Transfer(e @ (TransferEvent::Completed { direction: Direction::Receive, .. } | TransferEvent::Json { .. } | TransferEvent::Failed { .. })) => Some(e),
            _ => None,
        })? {
            TransferEvent::Completed { id, .. } if id == offer.id => {
                done = true;
                anyhow::ensure!(std::fs::read(&target)? == data, "the received file differs");
                println!(
                    "transfer    judy has it: SHA-256 verified, byte-identical, {:.1} MB/s including the connection setup",
                    data.len() as f64 / started.elapsed().as_secs_f64() / 1e6
                );
            }
            TransferEvent::Json { value, .. } => got_json = Some(value),
            TransferEvent::Failed { error, .. } => anyhow::bail!("judy: {error}"),
            _ => {}
        }
    }
    sender.join().map_err(|_| anyhow::anyhow!("ivan's side panicked"))??;
    let got = got_json.unwrap_or_default();
    anyhow::ensure!(got == value, "the JSON value differs");
    println!("transfer    judy got a JSON value without being asked: {got}");
    smol::block_on(judy.close());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A group room of three `PollNode`s: frank and grace have UDP on loopback and talk directly;
/// heidi has no UDP at all (as behind a firewall that blocks it), so whatever goes to or from
/// her falls back to the server's relay, transparently and in order.
fn group_room(url: &str) -> Result<()> {
    use peerlink::{RoomData, RoomEvent, RoomOptions, RoomPath};
    use peerlink_blocking::{PollNode, PollOptions, UdpBind};
    let node = |alias: &str, udp: UdpBind| -> Result<PollNode> {
        let mut c = NodeConfig::with_client(config(url, alias));
        c.peer.connect_timeout = Duration::from_secs(2);
        Ok(PollNode::new(c, PollOptions { udp, ..Default::default() })?)
    };
    let mut nodes = [node("frank", UdpBind::Loopback)?, node("grace", UdpBind::Loopback)?, node("heidi", UdpBind::Addrs(Vec::new()))?];
    let names = ["frank", "grace", "heidi"];
    let mut logs: [Vec<RoomEvent>; 3] = Default::default();
    let pump = |nodes: &mut [PollNode; 3], logs: &mut [Vec<RoomEvent>; 3], done: &dyn Fn(&[Vec<RoomEvent>; 3]) -> bool| -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            for (n, log) in nodes.iter_mut().zip(logs.iter_mut()) {
                n.poll(std::time::Instant::now())?;
                while let Some(e) = n.poll_event() {
                    if let NodeEvent::Room(e) = e {
                        log.push(e);
                    }
                }
            }
            if done(logs) {
                return Ok(());
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "room: timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    while !nodes.iter().all(|n| n.is_registered()) {
        pump(&mut nodes, &mut logs, &|_| true)?;
        std::thread::sleep(Duration::from_millis(2));
    }
    let joined = |i: usize| move |l: &[Vec<RoomEvent>; 3]| l[i].iter().any(|e| matches!(e, RoomEvent::Joined { .. }));
    nodes[0].create_room("studio", RoomOptions::group(8))?;
    pump(&mut nodes, &mut logs, &joined(0))?;
    for i in 1..3 {
        nodes[i].join_room("studio")?;
        pump(&mut nodes, &mut logs, &joined(i))?;
    }
    println!("group room  frank created `studio`; grace and heidi joined (heidi has no UDP)");
    // Wait until frank and grace are connected directly (heidi never will be).
    let t0 = std::time::Instant::now();
    let fg = [nodes[0].fingerprint(), nodes[1].fingerprint()];
    while ![(0, 1), (1, 0)].iter().all(|&(a, b)| {
        nodes[a].room_info("studio").is_some_and(|r| r.members.iter().any(|m| m.info.fingerprint == fg[b] && m.path == RoomPath::Direct))
    }) {
        pump(&mut nodes, &mut logs, &|_| true)?;
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(10), "frank and grace did not connect");
        std::thread::sleep(Duration::from_millis(1));
    }
    println!("group room  frank and grace connected directly in {:.1?}", t0.elapsed());
    for i in 0..3 {
        nodes[i].room("studio").send(&json!({ "from": names[i], "n": 1 }))?;
        nodes[i].room("studio").send_data(None, RoomData::Text(format!("{} says bye", names[i])))?;
    }
    let count = |l: &Vec<RoomEvent>| l.iter().filter(|e| matches!(e, RoomEvent::Data { .. })).count();
    pump(&mut nodes, &mut logs, &|l| l.iter().all(|l| count(l) == 4))?;
    for (i, log) in logs.iter().enumerate() {
        let got: Vec<String> = log
            .iter()
            .filter_map(|e| match e {
                RoomEvent::Data { data: Payload::Text(t), path, .. } => Some(format!("{t} ({})", if *path == RoomPath::Direct { "direct" } else { "relay" })),
                _ => None,
            })
            .collect();
        println!("group room  {} got {}", names[i], got.join(", "));
    }
    let info = nodes[0].room_info("studio").context("frank's view")?;
    let paths: Vec<String> = info.members.iter().map(|m| format!("{} via {:?}", m.info.alias, m.path)).collect();
    println!("group room  frank reaches {}", paths.join(", "));

    // Shared state over the same paths (heidi's through the relay): a key-value board ordered
    // by hybrid logical clocks, and a yrs text document all three write into at once.
    use peerlink::yrs::{GetString, Text, Transact};
    for n in nodes.iter_mut() {
        n.sync_state("studio", peerlink::sync::StateConfig::lww())?;
        n.sync_crdt("studio", peerlink::sync::CrdtConfig::default())?;
    }
    nodes[0].state_set("studio", "tempo", &json!(120))?;
    nodes[1].state_set("studio", "key", &json!("D minor"))?;
    nodes[2].state_set("studio", "tempo", &json!(96))?;
    for (i, line) in ["frank: intro. ", "grace: verse. ", "heidi: chorus. "].into_iter().enumerate() {
        nodes[i].crdt_edit("studio", "lyrics", |doc| {
            let text = doc.get_or_insert_text("text");
            let mut txn = doc.transact_mut();
            let end = text.len(&txn);
            text.insert(&mut txn, end, line);
        })?;
    }
    let lyrics = |n: &PollNode| -> String {
        let doc = n.crdt("studio").and_then(|c| c.doc("lyrics")).cloned();
        doc.map(|d| d.get_or_insert_text("text").get_string(&d.transact())).unwrap_or_default()
    };
    let t0 = std::time::Instant::now();
    loop {
        let digests: Vec<u64> = nodes.iter().map(|n| n.state("studio").map_or(0, |s| s.digest())).collect();
        let texts: Vec<String> = nodes.iter().map(lyrics).collect();
        if digests.iter().all(|d| *d == digests[0]) && texts.iter().all(|t| t == &texts[0] && t.len() == 43) {
            break;
        }
        pump(&mut nodes, &mut logs, &|_| true)?;
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(10), "shared state did not converge");
        std::thread::sleep(Duration::from_millis(1));
    }
    let board = serde_json::to_string(&nodes[2].state("studio").context("heidi's board")?.get_all())?;
    println!("sync        all three hold the board {board} (concurrent tempos: the greater timestamp won) in {:.1?}", t0.elapsed());
    println!("sync        all three hold the lyrics {:?} (yrs, merged, no edit lost)", lyrics(&nodes[1]));

    nodes[0].room("studio").leave()?;
    pump(&mut nodes, &mut logs, &|l| l[1..].iter().all(|l| l.contains(&RoomEvent::Closed { room: "studio".into() })))?;
    println!("group room  frank closed `studio`; grace and heidi were told");
    Ok(())
}

/// An end-to-end encrypted room: kim creates it, leo (no UDP at first: the relay only) and
/// mia join it encrypted. Keys are exchanged through the server; every batch is sealed, over
/// the relay and directly; a file between kim and mia is sealed in its own lane.
fn encrypted_room(url: &str) -> Result<()> {
    use peerlink::transfer::TransferEvent;
    use peerlink::{EncryptionEvent, JoinOptions, RoomEvent, RoomOptions, RoomPath};
    use peerlink_blocking::{PollNode, PollOptions, UdpBind};
    let node = |alias: &str, udp: UdpBind| -> Result<PollNode> { Ok(PollNode::new(NodeConfig::with_client(config(url, alias)), PollOptions { udp, ..Default::default() })?) };
    let mut nodes = [node("kim", UdpBind::Loopback)?, node("leo", UdpBind::Addrs(Vec::new()))?, node("mia", UdpBind::Loopback)?];
    let names = ["kim", "leo", "mia"];
    #[derive(Default)]
    struct Log {
        ready: usize,
        texts: Vec<(String, RoomPath)>,
        file: Option<Vec<u8>>,
    }
    let mut logs: [Log; 3] = Default::default();
    let pump = |nodes: &mut [PollNode; 3], logs: &mut [Log; 3], what: &str, done: &dyn Fn(&[PollNode; 3], &[Log; 3]) -> bool| -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while !done(nodes, logs) {
            anyhow::ensure!(std::time::Instant::now() < deadline, "encrypted room: {what}: timed out");
            for (n, log) in nodes.iter_mut().zip(logs.iter_mut()) {
                n.poll(std::time::Instant::now())?;
                while let Some(e) = n.poll_event() {
                    match e {
                        NodeEvent::Encryption(EncryptionEvent::Ready { .. }) => log.ready += 1,
                        NodeEvent::Encryption(EncryptionEvent::Refused { error, .. }) => anyhow::bail!("refused: {error}"),
                        NodeEvent::Room(RoomEvent::Data { data: Payload::Text(t), path, .. }) => log.texts.push((t, path)),
                        NodeEvent::Transfer(TransferEvent::Offered { peer, offer, .. }) => n.accept_to_memory(peer, offer.id)?,
                        NodeEvent::Transfer(TransferEvent::Received { data, .. }) => log.file = Some(data),
                        _ => {}
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    };
    pump(&mut nodes, &mut logs, "registering", &|n, _| n.iter().all(PollNode::is_registered))?;
    let t0 = std::time::Instant::now();
    nodes[0].create_room("vault", RoomOptions::group(4).encrypted())?;
    pump(&mut nodes, &mut logs, "creating", &|n, _| n[0].room_info("vault").is_some())?;
    for i in 1..3 {
        nodes[i].join_room_with("vault", JoinOptions::encrypted())?;
        pump(&mut nodes, &mut logs, "joining", &|n, _| n[i].room_info("vault").is_some())?;
    }
    pump(&mut nodes, &mut logs, "key exchange", &|_, l| l.iter().all(|l| l.ready >= 2))?;
    println!("encrypted   kim, leo and mia joined `vault` encrypted; every pair exchanged keys through the server in {:.1?}", t0.elapsed());
    let (kim, mia) = (nodes[0].fingerprint(), nodes[2].fingerprint());
    let direct = |n: &PollNode, peer| n.room_info("vault").is_some_and(|r| r.members.iter().any(|m| m.info.fingerprint == peer && m.path == RoomPath::Direct));
    pump(&mut nodes, &mut logs, "direct path", &|n, _| direct(&n[0], mia) && direct(&n[2], kim))?;
    for i in 0..3 {
        nodes[i].room("vault").send(&json!({ "from": names[i], "secret": "the code is 7421" }))?;
    }
    pump(&mut nodes, &mut logs, "messages", &|_, l| l.iter().all(|l| l.texts.len() >= 2))?;
    for (i, log) in logs.iter().enumerate() {
        let paths: Vec<String> = log.texts.iter().map(|(t, p)| format!("{t} ({})", if *p == RoomPath::Direct { "direct" } else { "relay" })).collect();
        println!("encrypted   {} opened {}", names[i], paths.join(", "));
    }
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 9) as u8).collect();
    nodes[0].send_bytes(mia, "plans.bin", data.clone())?;
    pump(&mut nodes, &mut logs, "file", &|_, l| l[2].file.is_some())?;
    anyhow::ensure!(logs[2].file.as_deref() == Some(&data[..]), "the sealed file differs");
    println!("encrypted   kim sent mia a 1 MiB file, sealed chunk by chunk (AES-256-GCM, its own lane); it arrived intact");
    println!("encrypted   leo (no UDP) talked through the server's relay in sealed batches the server cannot open");
    nodes[0].room("vault").leave()?;
    Ok(())
}

/// nia and otto in a call (see [`call`]): what otto's node reported, with when.
struct CallPair {
    nia: peerlink_blocking::PollNode,
    otto: peerlink_blocking::PollNode,
    got: Vec<(std::time::Instant, peerlink::MediaEvent)>,
}

impl CallPair {
    fn pump(&mut self) -> Result<()> {
        self.nia.poll(std::time::Instant::now())?;
        while self.nia.poll_event().is_some() {}
        self.otto.poll(std::time::Instant::now())?;
        while let Some(e) = self.otto.poll_event() {
            if let NodeEvent::Media(m) = e {
                self.got.push((std::time::Instant::now(), m));
            }
        }
        std::thread::sleep(Duration::from_millis(1));
        Ok(())
    }

    fn until(&mut self, what: &str, done: impl Fn(&CallPair) -> bool) -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done(self) {
            anyhow::ensure!(std::time::Instant::now() < deadline, "call: {what}: timed out");
            self.pump()?;
        }
        Ok(())
    }

    /// The video frames otto received.
    fn video(&self) -> Vec<Vec<u8>> {
        self.got
            .iter()
            .filter_map(|(_, e)| match e {
                peerlink::MediaEvent::Frame { track, frame, .. } if track.0 == "video" => Some(frame.data.to_vec()),
                _ => None,
            })
            .collect()
    }
}

/// A call between nia and otto: nia streams one second of the committed VP8 test pattern
/// (encoded frames: a Rust host brings its own encoder or file), mutes and unmutes.
fn call(url: &str) -> Result<()> {
    use peerlink::media::ivf::IvfReader;
    use peerlink::{CallConfig, Codec, MediaEvent, MediaFrame, RoomOptions, Source};
    use peerlink_blocking::{PollNode, PollOptions, UdpBind};
    let node = |alias: &str| -> Result<PollNode> { Ok(PollNode::new(NodeConfig::with_client(config(url, alias)), PollOptions { udp: UdpBind::Loopback, ..Default::default() })?) };
    let mut p = CallPair { nia: node("nia")?, otto: node("otto")?, got: Vec::new() };
    p.until("registering", |p| p.nia.is_registered() && p.otto.is_registered())?;
    let t0 = std::time::Instant::now();
    p.nia.create_room("call", RoomOptions::direct())?;
    p.until("creating", |p| p.nia.room_info("call").is_some())?;
    p.otto.join_room("call")?;
    p.until("joining", |p| p.otto.room_info("call").is_some())?;
    for n in [&mut p.nia, &mut p.otto] {
        n.room("call").start_call(CallConfig::audio_video())?;
    }
    let fo = p.otto.fingerprint();
    p.until("tracks", |p| p.nia.get_peer(&fo).is_some_and(|v| v.tracks.iter().filter(|t| t.local).count() == 2))?;
    println!("call        nia and otto are in a call: her audio and video tracks negotiated {:.1?} after the room was created", t0.elapsed());
    let clip = IvfReader::new(include_bytes!("media/pattern.ivf"))?;
    let header = clip.header();
    let frames: Vec<(u64, Vec<u8>)> = clip.take(30).map(|f| f.map(|f| (header.rtp_time(f.timestamp), f.data.to_vec()))).collect::<Result<_, _>>()?;
    let started = std::time::Instant::now();
    for (i, (rtp_time, data)) in frames.iter().enumerate() {
        while started.elapsed() < Duration::from_millis(33 * i as u64) {
            p.pump()?;
        }
        let frame = MediaFrame { codec: Codec::Vp8, rtp_time: *rtp_time, data: data.clone().into() };
        p.nia.room("call").send_call_frame(Source::Video, frame)?;
    }
    p.until("frames", |p| p.video().len() >= 30)?;
    let first = p.got.iter().find(|(_, e)| matches!(e, MediaEvent::Frame { .. })).map(|(t, _)| t.duration_since(started)).unwrap_or_default();
    anyhow::ensure!(p.video().iter().zip(&frames).all(|(a, (_, b))| a == b), "frames differ");
    println!("call        otto received {} VP8 frames of {}×{} from nia, the first {first:.1?} after it went, byte-identical", p.video().len(), header.width, header.height);
    let fnia = p.nia.fingerprint();
    let muted = move |p: &CallPair, on: bool| p.got.iter().any(|(_, e)| matches!(e, MediaEvent::Muted { peer, muted, .. } if *peer == fnia && *muted == on));
    p.nia.room("call").set_call_muted(Source::Video, true)?;
    p.until("mute", |p| muted(p, true))?;
    p.nia.room("call").set_call_muted(Source::Video, false)?;
    p.until("unmute", |p| muted(p, false))?;
    println!("call        nia muted her video and unmuted it; otto saw both (a renegotiation each, signed like the first)");
    p.nia.room("call").leave()?;
    Ok(())
}

/// A signaling cluster: two server nodes (on an in-process bus here; on Redis with
/// `--redis`), a client on each; one node shuts down and its client resumes on the other.
fn cluster() -> Result<()> {
    let bus = peerlink_server::ClusterBus::new();
    let node = || peerlink_server::spawn(peerlink_server::ServerOptions { cluster_bus: Some(bus.clone()), ..peerlink_server::ServerOptions::local() });
    let (n1, n2) = (node()?, node()?);
    let (url1, url2) = (n1.url(), n2.url());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while bus.nodes() < 2 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "the nodes never joined the bus");
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("cluster     two server nodes on one bus: {url1} and {url2}");
    let mut dana_config = config(&url1, "dana").fallback_url(&url2);
    dana_config.reconnect_delay = Duration::from_millis(100);
    let mut dana = peerlink_blocking::Client::connect(dana_config)?;
    let mut erik = peerlink_blocking::Client::connect(config(&url2, "erik"))?;
    // Membership travels between the nodes: erik (node 2) is told when dana (node 1) joins.
    erik.join("cluster")?;
    dana.join("cluster")?;
    let joined = wait(&mut erik, |e| match e {
        ClientEvent::PeerJoined { peer, .. } => Some(peer.alias),
        _ => None,
    })?;
    println!("cluster     erik, on node 2, was told {joined} joined on node 1");
    erik.relay(dana.fingerprint(), &json!({"n": 1}))?;
    let got = wait(&mut dana, |e| match e {
        ClientEvent::Relay { payload, .. } => Some(payload.to_value()),
        _ => None,
    })?;
    println!("cluster     erik -> dana across the nodes: {got}");
    // Node 1 goes away; dana's client fails over to node 2 and resumes its session there.
    let started = std::time::Instant::now();
    let stopping = std::thread::spawn(move || n1.shutdown());
    erik.relay(dana.fingerprint(), &json!({"n": 2, "sent": "while dana moves"}))?;
    let (mut resumed, mut relay) = (None, None);
    while resumed.is_none() || relay.is_none() {
        match dana.next_event(Duration::from_secs(10))?.context("dana never came back")? {
            ClientEvent::Reconnected { resumed: r } => resumed = Some(r),
            ClientEvent::Relay { payload, .. } => relay = Some(payload.to_value()),
            _ => {}
        }
    }
    println!(
        "cluster     node 1 shut down; dana resumed on node 2 after {:?} (resumed: {}), still in `cluster` with {:?}",
        started.elapsed(),
        resumed == Some(true),
        dana.discover("cluster", None)?.iter().map(|p| p.alias.clone()).collect::<Vec<_>>()
    );
    println!("cluster     erik's relay sent meanwhile arrived: {}", relay.context("relay")?);
    let rtt = erik.ping()?;
    let left = erik.events().any(|e| matches!(e, ClientEvent::PeerLeft { .. }));
    println!("cluster     erik saw dana leave: {left} (ping {rtt:?})");
    stopping.join().expect("node 1 stops");
    dana.disconnect();
    erik.disconnect();
    n2.shutdown();
    Ok(())
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

    // Direct connections: two nodes (blocking and smol) connect over UDP with WebRTC (ICE,
    // DTLS bound to both identities, SCTP data channels), negotiated through the server's relay.
    direct(&url)?;

    // Managed rooms: a full mesh of direct connections, with the server's relay wherever a
    // direct path is missing.
    group_room(&url)?;

    // Transfers: a file streamed from disk to disk, verified; a JSON value.
    transfer(&url)?;

    // An end-to-end encrypted room: the server relays ciphertext only.
    encrypted_room(&url)?;

    // A call: VP8 video from a committed test pattern, mute and unmute.
    call(&url)?;

    // A cluster of two server nodes; a client moves when its node goes away.
    cluster()?;

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
