//! The library half of `examples/transfer.rs`: a receiver and a sender of files over a direct
//! connection on the blocking adapter ([`PollNode`]), the check of offered file names that
//! keeps a peer's files inside the output directory, and the one-process demo (which
//! `tests/transfer_demo.rs` runs too).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Display;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use indicatif::{HumanBytes, HumanDuration, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use peerlink::transfer::{Direction, Offer, Progress, TransferError, TransferEvent};
use peerlink::{ClientConfig, ClientEvent, Fingerprint, IceServer, NodeConfig, NodeEvent, PeerInfo, PeerState};
use peerlink_blocking::{PollNode, PollOptions, UdpBind};

// ---- file names -------------------------------------------------------------------------

/// Longest offered name accepted, in bytes: room for a `-N` that makes it unique and the
/// `.part` suffix within the 255 bytes most file systems allow.
pub const MAX_NAME_BYTES: usize = 240;

/// Returns `name` if it is safe to create inside an output directory: one plain path
/// component, no separators of any platform, no control characters, not `.` or `..`, not
/// empty, at most [`MAX_NAME_BYTES`].
///
/// The name comes from the peer, which may be hostile: joined to the directory as it is,
/// `../../.bashrc`, `/etc/passwd` or `C:\x` would write outside it. Such a name is not
/// repaired (that would guess what was meant); the offer is refused.
pub fn safe_file_name(name: &str) -> Option<&str> {
    // Both separators on every platform: a sender on Windows means `\` as one.
    let forbidden = |c: char| c == '/' || c == '\\' || c.is_control();
    if name.is_empty() || name.len() > MAX_NAME_BYTES || name == "." || name == ".." || name.contains(forbidden) {
        return None;
    }
    // Whatever else the platform reads into a path (a drive prefix such as `C:` on Windows),
    // the name must stay one normal component.
    let mut parts = Path::new(name).components();
    match (parts.next(), parts.next()) {
        (Some(Component::Normal(part)), None) if part == name => Some(name),
        _ => None,
    }
}

/// The part file the blocking adapter writes a transfer into before it verified.
pub fn part_path(path: &Path) -> PathBuf {
    let mut part = path.as_os_str().to_owned();
    part.push(".part");
    PathBuf::from(part)
}

/// Returns where to store `name` in `dir` without replacing anything: `dir/name`, else
/// `dir/STEM-1.EXT`, `dir/STEM-2.EXT`, ... The first whose file and part file do not exist
/// (a dangling symbolic link counts as existing) and that no transfer under way (`busy`)
/// uses.
pub fn free_path(dir: &Path, name: &str, busy: &HashSet<PathBuf>) -> PathBuf {
    let taken = |p: &Path| p.symlink_metadata().is_ok();
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => name.split_at(i),
        _ => (name, ""),
    };
    (0u64..)
        .map(|n| if n == 0 { dir.join(name) } else { dir.join(format!("{stem}-{n}{ext}")) })
        .find(|p| !busy.contains(p) && !taken(p) && !taken(&part_path(p)))
        .expect("some number is free")
}

// ---- output -----------------------------------------------------------------------------

/// Where lines and progress bars go. Bars are drawn on standard error, and not at all when
/// it is not a terminal (indicatif's own check); lines go to standard output either way.
#[derive(Clone)]
pub struct Ui {
    bars: MultiProgress,
    tag: Option<&'static str>,
}

impl Ui {
    /// Bars on standard error when it is a terminal.
    pub fn terminal() -> Ui {
        Ui { bars: MultiProgress::new(), tag: None }
    }

    /// Lines only, never bars (tests).
    pub fn no_bars() -> Ui {
        Ui { bars: MultiProgress::with_draw_target(ProgressDrawTarget::hidden()), tag: None }
    }

    /// The same output, with `tag` before every line (the demo's two sides).
    pub fn tagged(&self, tag: &'static str) -> Ui {
        Ui { bars: self.bars.clone(), tag: Some(tag) }
    }

    /// Prints a line above the bars.
    pub fn say(&self, line: impl Display) {
        self.bars.suspend(|| match self.tag {
            Some(tag) => println!("{tag:<5} {line}"),
            None => println!("{line}"),
        });
    }

    /// Prints a question and leaves the cursor after it.
    fn ask(&self, question: impl Display) {
        self.bars.suspend(|| {
            print!("{question}");
            let _ = io::stdout().flush();
        });
    }

    fn bar(&self, total: u64, name: &str) -> ProgressBar {
        let bar = self.bars.add(ProgressBar::new(total));
        let style = ProgressStyle::with_template("{prefix:.bold} [{bar:30}] {bytes}/{total_bytes} {msg}").expect("a valid template");
        bar.set_style(style.progress_chars("=> "));
        let prefix = match self.tag {
            Some(tag) => format!("{tag:<5} {name}"),
            None => name.to_owned(),
        };
        bar.set_prefix(prefix);
        bar
    }
}

/// Shows the core's progress report (its rate and time left) on `bar`.
fn show(bar: &ProgressBar, p: &Progress) {
    bar.set_position(p.bytes);
    let eta = p.eta.map(|eta| format!(", {} left", HumanDuration(eta))).unwrap_or_default();
    bar.set_message(format!("{}/s{eta}", HumanBytes(p.bytes_per_sec as u64)));
}

fn rate(bytes: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-6);
    format!("{}/s", HumanBytes((bytes as f64 / secs) as u64))
}

// ---- the network ------------------------------------------------------------------------

/// How both sides reach the signaling server and each other.
#[derive(Debug, Clone)]
pub struct Net {
    /// The signaling server's URL (`ws://` or `wss://`).
    pub server: String,
    /// The namespace the receiver waits in and the sender looks in.
    pub namespace: String,
    /// Where the UDP sockets are bound.
    pub udp: UdpBind,
    /// STUN server URLs (`stun:HOST:PORT`), for peers behind NAT.
    pub stun: Vec<String>,
}

fn start_node(net: &Net, alias: &str) -> Result<PollNode> {
    let mut config = NodeConfig::with_client(ClientConfig::new(&net.server).alias(alias));
    if !net.stun.is_empty() {
        config.ice_servers.push(IceServer::new(net.stun.clone()));
    }
    PollNode::new(config, PollOptions { udp: net.udp.clone(), ..Default::default() }).with_context(|| format!("starting a node for {}", net.server))
}

/// The signaling events both sides act on alike: join the namespace once registered, say
/// when the server is away. Errors when the client gave up or the join was refused.
fn on_signaling(node: &mut PollNode, net: &Net, ui: &Ui, joined: &mut bool, event: &ClientEvent) -> Result<()> {
    match event {
        ClientEvent::Registered { .. } if !*joined => {
            // Joined once; the client joins again by itself after a reconnect.
            node.client().join(Instant::now(), &net.namespace, None, None)?;
            *joined = true;
        }
        // Said less and less often while it goes on (attempts 2, 4, 8, ...).
        ClientEvent::Reconnecting { attempt, delay } if attempt.is_power_of_two() => {
            let why = node.last_error().map(|e| format!(" ({e})")).unwrap_or_default();
            ui.say(format!("cannot reach {}{why}; trying again in {delay:.1?} (attempt {attempt})", net.server));
        }
        ClientEvent::Reconnected { .. } => ui.say(format!("back on {}", net.server)),
        ClientEvent::Disconnected { will_reconnect: false, .. } => bail!("the signaling server at {} closed the connection for good", net.server),
        ClientEvent::Response { result: Err(e), .. } => bail!("joining namespace `{}` failed: {e}", net.namespace),
        ClientEvent::Error(e) => ui.say(format!("signaling: {e}")),
        _ => {}
    }
    Ok(())
}

/// Keeps the node going for `time` (so that what was just queued, a cancel or a close,
/// leaves), dropping its events.
fn settle(node: &mut PollNode, time: Duration) {
    let until = Instant::now() + time;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if node.next_event(left).is_err() {
            return;
        }
    }
}

fn past(deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|d| Instant::now() >= d)
}

/// How long one wait for events may last before the loops look at their stop flag.
const TICK: Duration = Duration::from_millis(50);

// ---- receiving --------------------------------------------------------------------------

/// What the receiver does with an offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Ask on standard input.
    Ask,
    /// Accept every offer.
    Yes,
    /// Decline every offer.
    No,
}

/// How [`receive`] runs.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// Server and namespace.
    pub net: Net,
    /// Where accepted files are stored (created if missing).
    pub out: PathBuf,
    /// What to do with offers.
    pub answer: Answer,
    /// Stop once this many accepted transfers ended (completed or failed); `None` runs until
    /// the stop flag is set.
    pub limit: Option<usize>,
    /// Give up (an error) at this time; `None`: never.
    pub deadline: Option<Instant>,
}

/// A file received and verified.
#[derive(Debug, Clone)]
pub struct Received {
    /// Where it was stored.
    pub path: PathBuf,
    /// The sender.
    pub from: Fingerprint,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256 (hex), as offered and as checked over what arrived.
    pub sha256: String,
    /// From accepting it to its verification.
    pub elapsed: Duration,
}

struct Incoming {
    offer: Offer,
    path: PathBuf,
    bar: ProgressBar,
    started: Instant,
}

/// Lines of standard input, read on a thread of their own so that the node keeps running
/// while a question waits for its answer.
fn stdin_lines() -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn describe(peer: &Fingerprint, offer: &Offer) -> String {
    format!("offer: {:?}, {} ({} bytes), {}, from {peer}", offer.name, HumanBytes(offer.size), offer.size, offer.mime)
}

/// Joins the namespace and receives files into `options.out` until `stop` is set (or
/// `options.limit` transfers ended). Returns the files that arrived verified. An interrupted
/// transfer is cancelled and its part file removed.
pub fn receive(options: &ReceiveOptions, ui: &Ui, stop: &AtomicBool) -> Result<Vec<Received>> {
    let out = &options.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut node = start_node(&options.net, "transfer-recv")?;
    let me = node.fingerprint();
    let mut answers = (options.answer == Answer::Ask).then(stdin_lines);
    let mut waiting: VecDeque<(Fingerprint, Offer)> = VecDeque::new();
    let mut asked = false;
    let mut active: HashMap<(Fingerprint, u64), Incoming> = HashMap::new();
    let mut received = Vec::new();
    let mut ended = 0;
    let mut joined = false;
    // Senders whose connection is up: once the limit is reached, the receiver stays until they
    // closed, so that its `verified` reaches them.
    let mut senders: HashSet<Fingerprint> = HashSet::new();
    let mut linger_until: Option<Instant> = None;
    // Peers that left the namespace (their signaling session ended).
    let mut left: HashSet<Fingerprint> = HashSet::new();

    loop {
        if stop.load(Ordering::Relaxed) || past(options.deadline) {
            for (peer, id) in active.keys().copied().collect::<Vec<_>>() {
                let _ = node.cancel_transfer(peer, id, "the receiver stopped");
            }
            if !active.is_empty() {
                ui.say(format!("cancelled {} transfer(s) under way; their part files are removed", active.len()));
                settle(&mut node, Duration::from_millis(300));
            }
            ensure!(!past(options.deadline), "the receiver timed out");
            return Ok(received);
        }
        let done = options.limit.is_some_and(|limit| ended >= limit);
        if done {
            let until = *linger_until.get_or_insert_with(|| Instant::now() + Duration::from_secs(3));
            if senders.is_empty() || Instant::now() >= until {
                return Ok(received);
            }
        }

        // An answer to the question on screen.
        if let Some(lines) = &answers {
            if let (false, Some((peer, offer))) = (asked, waiting.front()) {
                ui.say(describe(peer, offer));
                ui.ask("accept? [y/N] ");
                asked = true;
            }
            if asked {
                match lines.try_recv() {
                    Ok(line) => {
                        asked = false;
                        let (peer, offer) = waiting.pop_front().expect("asked about it");
                        if matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
                            accept(&mut node, ui, out, peer, offer, &mut active)?;
                        } else {
                            decline(&mut node, peer, offer.id, "declined");
                            ui.say(format!("declined {:?}", offer.name));
                        }
                    }
                    Err(mpsc::TryRecvError::Empty) => {}
                    Err(mpsc::TryRecvError::Disconnected) => {
                        ui.say("standard input is closed: declining offers (--yes or --no answer without asking)");
                        for (peer, offer) in waiting.drain(..) {
                            decline(&mut node, peer, offer.id, "declined");
                        }
                        answers = None;
                        asked = false;
                    }
                }
            }
        }

        let Some(event) = node.next_event(TICK)? else { continue };
        match event {
            NodeEvent::Signaling(e) => {
                let was_joined = joined;
                on_signaling(&mut node, &options.net, ui, &mut joined, &e)?;
                if joined && !was_joined {
                    ui.say(format!("waiting for files in namespace `{}`, storing into {}", options.net.namespace, out.display()));
                    ui.say(format!("this receiver is {me}"));
                }
                match e {
                    ClientEvent::PeerLeft { fingerprint, .. } => {
                        left.insert(fingerprint);
                        if node.get_peer(&fingerprint).is_some_and(|p| p.state == PeerState::Disconnected) {
                            drop_transfers(&mut node, &active, fingerprint, "the sender is gone");
                        }
                    }
                    ClientEvent::PeerJoined { peer, .. } => {
                        left.remove(&peer.fingerprint);
                    }
                    _ => {}
                }
            }
            NodeEvent::PeerState { peer, state: PeerState::Connected } => {
                senders.insert(peer);
                for (_, t) in active.iter().filter(|((p, _), _)| *p == peer) {
                    t.bar.set_message("");
                }
            }
            NodeEvent::PeerState { peer, state: PeerState::Disconnected } => {
                // Silent for a while. The connection may come back, and the transfer with it;
                // but a sender that also left the server is gone (a killed process, say), and
                // waiting for the connection to fail would keep its part file for a minute.
                if left.contains(&peer) {
                    drop_transfers(&mut node, &active, peer, "the sender is gone");
                } else {
                    for (_, t) in active.iter().filter(|((p, _), _)| *p == peer) {
                        t.bar.set_message("the sender is silent; waiting");
                    }
                }
            }
            NodeEvent::PeerState { peer, state: PeerState::Failed | PeerState::Closed } => {
                senders.remove(&peer);
                // The sender is gone: what it was sending will not complete, and an offer
                // from it cannot be taken up any more.
                drop_transfers(&mut node, &active, peer, "the connection was lost");
                withdraw(ui, &mut waiting, &mut asked, |p, _| p == peer);
            }
            NodeEvent::Transfer(TransferEvent::Offered { peer, offer }) => {
                if safe_file_name(&offer.name).is_none() {
                    ui.say(format!("refused an offer from {peer}: unsafe file name {:?}", offer.name));
                    decline(&mut node, peer, offer.id, "unsafe file name");
                    continue;
                }
                if done {
                    decline(&mut node, peer, offer.id, "the receiver is closing");
                    continue;
                }
                match (options.answer, &answers) {
                    (Answer::Yes, _) => {
                        ui.say(describe(&peer, &offer));
                        accept(&mut node, ui, out, peer, offer, &mut active)?;
                    }
                    (Answer::Ask, Some(_)) => waiting.push_back((peer, offer)),
                    (Answer::No, _) | (Answer::Ask, None) => {
                        ui.say(describe(&peer, &offer));
                        decline(&mut node, peer, offer.id, "declined");
                        ui.say(format!("declined {:?}", offer.name));
                    }
                }
            }
            NodeEvent::Transfer(TransferEvent::Progress { peer, id, direction: Direction::Receive, progress }) => {
                if let Some(t) = active.get(&(peer, id)) {
                    show(&t.bar, &progress);
                }
            }
            NodeEvent::Transfer(TransferEvent::Completed { peer, id, direction: Direction::Receive }) => {
                let Some(t) = active.remove(&(peer, id)) else { continue };
                t.bar.finish_and_clear();
                let elapsed = t.started.elapsed();
                ui.say(format!("saved {} ({}) in {elapsed:.2?}, {}", t.path.display(), HumanBytes(t.offer.size), rate(t.offer.size, elapsed)));
                ui.say(format!("sha256 {} (verified)", t.offer.sha256));
                received.push(Received { path: t.path, from: peer, size: t.offer.size, sha256: t.offer.sha256, elapsed });
                ended += 1;
            }
            NodeEvent::Transfer(TransferEvent::Failed { peer, id, direction: Direction::Receive, error }) => {
                let Some(t) = active.remove(&(peer, id)) else {
                    // An offer withdrawn before it was answered.
                    withdraw(ui, &mut waiting, &mut asked, |p, i| (p, i) == (peer, id));
                    continue;
                };
                t.bar.abandon();
                ui.say(format!("failed: {:?} from {}: {error} (nothing kept)", t.offer.name, peer.short()));
                ended += 1;
            }
            NodeEvent::Transfer(TransferEvent::Json { peer, value, .. }) => {
                // JSON transfers are small messages, taken without asking; not files.
                let text = value.to_string();
                let cut = text.char_indices().nth(200).map_or(text.len(), |(i, _)| i);
                ui.say(format!("JSON from {}: {}{}", peer.short(), &text[..cut], if cut < text.len() { "..." } else { "" }));
            }
            NodeEvent::Transfer(TransferEvent::BadMessage { peer, error }) => {
                tracing::debug!(peer = %peer.short(), %error, "unusable transfer message");
            }
            _ => {}
        }
    }
}

/// Declines an offer. Never fatal: the offer may be gone already (withdrawn, or its peer lost),
/// and there is nothing more to do about it then.
fn decline(node: &mut PollNode, peer: Fingerprint, id: u64, why: &str) {
    if let Err(e) = node.reject_transfer(peer, id, why) {
        tracing::debug!(peer = %peer.short(), id, error = %e, "decline not sent");
    }
}

/// Forgets the offers waiting for an answer that `gone(peer, id)` picks; if the one on
/// screen is among them, says so and takes back the question.
fn withdraw(ui: &Ui, waiting: &mut VecDeque<(Fingerprint, Offer)>, asked: &mut bool, gone: impl Fn(Fingerprint, u64) -> bool) {
    if *asked && waiting.front().is_some_and(|(p, o)| gone(*p, o.id)) {
        ui.say("(withdrawn: the offer is gone; never mind)");
        *asked = false;
    }
    waiting.retain(|(p, o)| !gone(*p, o.id));
}

/// Cancels every transfer from `peer` (their part files are removed); the `Failed` events
/// that follow report them.
fn drop_transfers(node: &mut PollNode, active: &HashMap<(Fingerprint, u64), Incoming>, peer: Fingerprint, why: &str) {
    for (p, id) in active.keys().copied().filter(|(p, _)| *p == peer) {
        let _ = node.cancel_transfer(p, id, why);
    }
}

/// Accepts `offer` into a free path in `out` (never replacing a file), or declines it if
/// that cannot be created.
fn accept(node: &mut PollNode, ui: &Ui, out: &Path, peer: Fingerprint, offer: Offer, active: &mut HashMap<(Fingerprint, u64), Incoming>) -> Result<()> {
    // Checked by the caller; checked again here because this is where the name meets the disk.
    let name = safe_file_name(&offer.name).ok_or_else(|| anyhow!("unsafe file name {:?}", offer.name))?;
    let busy: HashSet<PathBuf> = active.values().map(|t| t.path.clone()).collect();
    let path = free_path(out, name, &busy);
    if let Err(e) = node.accept_to_file(peer, offer.id, &path) {
        ui.say(format!("cannot store {}: {e}; declining", path.display()));
        decline(node, peer, offer.id, "the receiver cannot store it");
        return Ok(());
    }
    ui.say(format!("accepted, writing {}", path.display()));
    let bar = ui.bar(offer.size, name);
    active.insert((peer, offer.id), Incoming { offer, path, bar, started: Instant::now() });
    Ok(())
}

// ---- sending ----------------------------------------------------------------------------

/// How [`send`] runs.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// Server and namespace.
    pub net: Net,
    /// The file to send.
    pub file: PathBuf,
    /// The receiver's fingerprint, or the start of it; `None` takes the first peer in the
    /// namespace.
    pub to: Option<String>,
    /// Give up (an error) at this time; `None`: never.
    pub deadline: Option<Instant>,
}

/// A file sent and verified by the receiver.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The receiver.
    pub to: Fingerprint,
    /// Bytes sent.
    pub size: u64,
    /// From the offer to the receiver's `verified` (the wait for its answer included).
    pub elapsed: Duration,
}

struct Outgoing {
    peer: Fingerprint,
    id: u64,
    bar: ProgressBar,
    started: Instant,
}

/// Joins the namespace, waits for the receiver, connects to it and sends `options.file`.
/// Returns once the receiver verified it; errors if it declined, the transfer failed, the
/// connection was lost, or `stop` was set (the transfer is then cancelled).
pub fn send(options: &SendOptions, ui: &Ui, stop: &AtomicBool) -> Result<Sent> {
    let file = &options.file;
    let meta = std::fs::metadata(file).with_context(|| format!("cannot read {}", file.display()))?;
    ensure!(meta.is_file(), "{} is not a file", file.display());
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
    let to = options.to.as_ref().map(|t| t.to_ascii_lowercase());
    let wanted = |fp: &Fingerprint| to.as_ref().is_none_or(|to| fp.to_string().starts_with(to.as_str()));
    let mut node = start_node(&options.net, "transfer-send")?;
    let mut joined = false;
    let mut transfer: Option<Outgoing> = None;
    let mut peer_error: Option<String> = None;

    loop {
        if stop.load(Ordering::Relaxed) || past(options.deadline) {
            if let Some(t) = &transfer {
                let _ = node.cancel_transfer(t.peer, t.id, "the sender stopped");
                t.bar.abandon();
                settle(&mut node, Duration::from_millis(300));
            }
            let what = if past(options.deadline) { "timed out" } else { "interrupted" };
            bail!("{what}{}", if transfer.is_some() { "; the transfer was cancelled" } else { "" });
        }
        let Some(event) = node.next_event(TICK)? else { continue };
        match event {
            NodeEvent::Signaling(e) => {
                on_signaling(&mut node, &options.net, ui, &mut joined, &e)?;
                if transfer.is_some() {
                    continue;
                }
                let peers: Vec<PeerInfo> = match e {
                    ClientEvent::PeerList { namespace, peers } if namespace == options.net.namespace => {
                        if !peers.iter().any(|p| wanted(&p.fingerprint)) {
                            let who = to.as_ref().map_or("a receiver".to_owned(), |to| format!("receiver {to}"));
                            ui.say(format!("waiting for {who} in namespace `{namespace}`"));
                        }
                        peers
                    }
                    ClientEvent::PeerJoined { namespace, peer } if namespace == options.net.namespace => vec![peer],
                    _ => continue,
                };
                let Some(peer) = peers.into_iter().find(|p| wanted(&p.fingerprint)) else { continue };
                ui.say(format!("sending {name} ({}) to {} ({})", HumanBytes(meta.len()), peer.fingerprint, peer.alias));
                // The offer first (it hashes the file, which takes a while for a big one), then
                // the connection: the offer goes once the connection is up.
                let id = node.send_file(peer.fingerprint, file).with_context(|| format!("offering {}", file.display()))?;
                node.connect_to_peer(peer.fingerprint)?;
                let bar = ui.bar(meta.len(), &name);
                bar.set_message("connecting");
                transfer = Some(Outgoing { peer: peer.fingerprint, id, bar, started: Instant::now() });
            }
            NodeEvent::PeerState { peer, state } if transfer.as_ref().is_some_and(|t| t.peer == peer) => {
                let t = transfer.as_ref().expect("checked");
                match state {
                    PeerState::Connected => t.bar.set_message("connected; waiting for the receiver to accept"),
                    PeerState::Failed | PeerState::Closed => {
                        t.bar.abandon();
                        let why = peer_error.take().map(|e| format!(": {e}")).unwrap_or_default();
                        bail!("the connection to the receiver {}{why}", if state == PeerState::Failed { "failed" } else { "closed" });
                    }
                    _ => {}
                }
            }
            NodeEvent::PeerError { peer, error } if transfer.as_ref().is_some_and(|t| t.peer == peer) => {
                peer_error = Some(error.to_string());
            }
            NodeEvent::Transfer(TransferEvent::Progress { id, direction: Direction::Send, progress, .. }) => {
                if let Some(t) = transfer.as_ref().filter(|t| t.id == id) {
                    show(&t.bar, &progress);
                }
            }
            NodeEvent::Transfer(TransferEvent::Completed { id, direction: Direction::Send, .. }) if transfer.as_ref().is_some_and(|t| t.id == id) => {
                let t = transfer.take().expect("checked");
                t.bar.finish_and_clear();
                let elapsed = t.started.elapsed();
                ui.say(format!("sent {name} ({}) in {elapsed:.2?}, {}; the receiver verified it", HumanBytes(meta.len()), rate(meta.len(), elapsed)));
                // A clean close, so the receiver hears it at once rather than after a timeout.
                let _ = node.close_peer(t.peer);
                settle(&mut node, Duration::from_millis(100));
                return Ok(Sent { to: t.peer, size: meta.len(), elapsed });
            }
            NodeEvent::Transfer(TransferEvent::Failed { id, direction: Direction::Send, error, .. }) if transfer.as_ref().is_some_and(|t| t.id == id) => {
                let t = transfer.take().expect("checked");
                t.bar.abandon();
                let _ = node.close_peer(t.peer);
                settle(&mut node, Duration::from_millis(100));
                match error {
                    TransferError::Rejected(why) => bail!("the receiver declined {name}: {why}"),
                    TransferError::Cancelled(why) => bail!("the transfer of {name} was cancelled: {why}"),
                    TransferError::HashMismatch => bail!("the receiver found {name} corrupt (SHA-256 mismatch); did it change while it was sent?"),
                    other => bail!("the transfer of {name} failed: {other}"),
                }
            }
            _ => {}
        }
    }
}

// ---- the demo ---------------------------------------------------------------------------

/// What [`demo`] measured.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// Bytes sent.
    pub size: u64,
    /// From the receiver's accept to its verification.
    pub transfer: Duration,
    /// Everything: the file written, the server started, both sides registered and
    /// connected, the transfer, the check.
    pub total: Duration,
    /// The file's SHA-256 (hex).
    pub sha256: String,
}

impl DemoReport {
    /// The transfer's rate in bytes per second.
    pub fn bytes_per_sec(&self) -> f64 {
        self.size as f64 / self.transfer.as_secs_f64().max(1e-6)
    }
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> io::Result<TempDir> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `size` bytes that do not compress (xorshift), so nothing along the way can make
/// the transfer look faster than it is.
fn write_noise(path: &Path, size: u64) -> io::Result<()> {
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut left = size;
    while left > 0 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let n = left.min(8) as usize;
        out.write_all(&state.to_le_bytes()[..n])?;
        left -= n as u64;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// Returns whether two files hold the same bytes.
pub fn same_contents(a: &Path, b: &Path) -> io::Result<bool> {
    let (fa, fb) = (File::open(a)?, File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ra, mut rb) = (BufReader::with_capacity(1 << 20, fa), BufReader::with_capacity(1 << 20, fb));
    loop {
        let (xa, xb) = (ra.fill_buf()?, rb.fill_buf()?);
        if xa.is_empty() || xb.is_empty() {
            return Ok(xa.is_empty() && xb.is_empty());
        }
        let n = xa.len().min(xb.len());
        if xa[..n] != xb[..n] {
            return Ok(false);
        }
        ra.consume(n);
        rb.consume(n);
    }
}

/// Everything in one process: a server on 127.0.0.1, a receiver that accepts (on a thread)
/// and a sender, both over UDP on loopback; sends a generated file of `size` bytes from a
/// temporary directory and checks that what arrived is byte-identical. Errors if anything
/// is off, or after a minute plus a second per 4 MiB.
pub fn demo(size: u64, ui: &Ui) -> Result<DemoReport> {
    let started = Instant::now();
    let dir = TempDir::new("peerlink-transfer-demo").context("creating a temporary directory")?;
    let (src, out) = (dir.0.join("send"), dir.0.join("received"));
    std::fs::create_dir_all(&src)?;
    let file = src.join("demo.bin");
    write_noise(&file, size).context("writing the demo file")?;

    let server = peerlink_server::spawn(peerlink_server::ServerOptions::local()).context("starting the server")?;
    ui.say(format!("server listening on {}", server.url()));
    let net = Net { server: server.url(), namespace: "transfer-demo".into(), udp: UdpBind::Loopback, stun: Vec::new() };
    let deadline = Some(Instant::now() + Duration::from_secs(60 + size / (4 << 20)));
    let stop = Arc::new(AtomicBool::new(false));

    let receiver = {
        let options = ReceiveOptions { net: net.clone(), out: out.clone(), answer: Answer::Yes, limit: Some(1), deadline };
        let (ui, stop) = (ui.tagged("recv"), Arc::clone(&stop));
        std::thread::Builder::new().name("receiver".into()).spawn(move || {
            let result = receive(&options, &ui, &stop);
            // A receiver that failed stops the sender rather than leave it waiting.
            if result.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            result
        })?
    };
    let sent = send(&SendOptions { net, file: file.clone(), to: None, deadline }, &ui.tagged("send"), &stop);
    if sent.is_err() {
        stop.store(true, Ordering::Relaxed);
    }
    let received = receiver.join().map_err(|_| anyhow!("the receiver panicked"))?;
    // The receiver's error is the cause when both failed (the sender was stopped for it).
    let received = received.context("receiver")?;
    let sent = sent.context("sender")?;
    server.shutdown();

    let [got] = received.as_slice() else { bail!("the receiver stored {} files, not one", received.len()) };
    ensure!(got.path == out.join("demo.bin"), "stored as {}, not as demo.bin", got.path.display());
    ensure!(got.size == size && sent.size == size, "sizes: sent {}, received {}, generated {size}", sent.size, got.size);
    ensure!(!part_path(&got.path).exists(), "the part file is still there");
    ensure!(same_contents(&file, &got.path).context("comparing the files")?, "the received file differs from the one sent");
    Ok(DemoReport { size, transfer: got.elapsed, total: started.elapsed(), sha256: got.sha256.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_names_are_refused() {
        for name in ["../x", "/etc/passwd", "a/b", "", ".", "..", "a\\b", "..\\x", "C:\\x", "x\0y", "x\ny", "../../.bashrc", "a/../b"] {
            assert_eq!(safe_file_name(name), None, "{name:?} passed");
        }
        assert_eq!(safe_file_name(&"x".repeat(MAX_NAME_BYTES + 1)), None);
    }

    #[test]
    fn plain_names_pass_as_they_are() {
        for name in ["report.pdf", "..x", "a..b", ".hidden", "photo 2024.jpg", "ünïcödé.txt", "no-extension"] {
            assert_eq!(safe_file_name(name), Some(name));
        }
        assert!(safe_file_name(&"x".repeat(MAX_NAME_BYTES)).is_some());
    }

    #[test]
    fn free_path_never_takes_an_existing_or_busy_name() {
        let dir = TempDir::new("peerlink-free-path").unwrap();
        let d = &dir.0;
        let none = HashSet::new();
        assert_eq!(free_path(d, "a.txt", &none), d.join("a.txt"));
        std::fs::write(d.join("a.txt"), b"").unwrap();
        assert_eq!(free_path(d, "a.txt", &none), d.join("a-1.txt"));
        // A part file left behind counts, and so does a transfer under way.
        std::fs::write(d.join("a-1.txt.part"), b"").unwrap();
        let busy = HashSet::from([d.join("a-2.txt")]);
        assert_eq!(free_path(d, "a.txt", &busy), d.join("a-3.txt"));
        // A leading dot is not an extension.
        std::fs::write(d.join(".rc"), b"").unwrap();
        assert_eq!(free_path(d, ".rc", &none), d.join(".rc-1"));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(d.join("nowhere"), d.join("link")).unwrap();
            assert_eq!(free_path(d, "link", &none), d.join("link-1"), "a dangling link is taken");
        }
    }

    #[test]
    fn same_contents_compares_bytes() {
        let dir = TempDir::new("peerlink-same-contents").unwrap();
        let (a, b, c) = (dir.0.join("a"), dir.0.join("b"), dir.0.join("c"));
        write_noise(&a, 3 << 20).unwrap();
        write_noise(&b, 3 << 20).unwrap();
        std::fs::write(&c, b"short").unwrap();
        assert!(same_contents(&a, &b).unwrap());
        assert!(!same_contents(&a, &c).unwrap());
        let mut bytes = std::fs::read(&b).unwrap();
        bytes[(2 << 20) + 5] ^= 1;
        std::fs::write(&b, bytes).unwrap();
        assert!(!same_contents(&a, &b).unwrap());
    }
}
