//! A shared text that two or three people edit from their terminals, with everyone's cursor,
//! and a shared key-value board beside it: the room's document sync (yrs, with awareness)
//! and its key-value sync (StateSync), on the smol adapter.
//!
//! ```text
//! cargo run --release --example collab -- --demo                    # three editors in one process
//! cargo run --release --example collab -- --serve                   # a server on 127.0.0.1, prints its URL
//! cargo run --release --example collab -- --server ws://127.0.0.1:PORT --name alice
//! cargo run --release --example collab -- --server ws://127.0.0.1:PORT --name bob [--room NAME]
//! ```
//!
//! Line-oriented: every command is one line, and what the others change is printed as it
//! arrives (`~` the text, `=` the board, `!` conflicts and errors, `*` the room).
//!
//! - a line that is not a command appends itself (and a newline) to the text;
//! - `/append TEXT`, `/insert POS TEXT`, `/delete POS LEN`: edit the text (positions count
//!   characters from 0; `\n` in TEXT is a newline); your cursor moves to the edit;
//! - `/show`: the text, with the members' cursors marked `[@NAME]` (yours `[@you]`);
//! - `/cursor POS`: moves your cursor (what the others see of you: `{name, cursor}`);
//! - `/set KEY JSON` (a value that is not JSON is taken as a string), `/del KEY`, `/board`:
//!   the key-value board;
//! - `/who`: the members, how they are reached, and their cursors; `/quit` (or Ctrl-C).
//!
//! Without `--server`, collab starts its own server on 127.0.0.1 and prints its URL, so others
//! can join with `--server`. The first member creates the room and owns it: when it quits, the
//! room closes for everyone (and takes the shared state with it). Board writes that cross are
//! merged, not dropped: objects field by field, arrays as a union, a write beats a delete, and
//! otherwise the greater value wins (`! conflict` shows what was merged). `--demo` runs three
//! members against an embedded server: they edit the text and the board at the same time,
//! wait until all three hold the same text and board, print them (`final text [NAME]: ...`,
//! `final board [NAME]: ...`) and exit 0 (1 if a step does not converge within 30 s).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::BufRead;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures_lite::FutureExt;
use peerlink::sync::crdt::{DEFAULT_DOC, DEFAULT_TEXT};
use peerlink::sync::{CrdtConfig, CrdtEvent, StateConfig, StateEvent, SyncError, SyncEvent};
use peerlink::yrs::{Assoc, Doc, GetString, IndexedSequence, Observable, StickyIndex, Text, Transact};
use peerlink::{ClientConfig, ErrorCode, Fingerprint, NodeConfig, NodeError, NodeEvent, RoomError, RoomEvent, RoomOptions, RoomPath};
use peerlink_smol::{ConnectOptions, Error, Node, NodeEvents, Room, UdpBind};
use serde_json::{Value, json};

/// The document and its root text.
const DOC: &str = DEFAULT_DOC;
const TEXT: &str = DEFAULT_TEXT;
/// Most remote changes kept for their events (as many as the document sync keeps events).
const MAX_CHANGES: usize = peerlink::sync::crdt::MAX_PENDING;

struct Args {
    server: Option<String>,
    serve_only: bool,
    room: String,
    name: String,
    demo: bool,
}

fn parse(args: impl IntoIterator<Item = String>) -> Result<Args> {
    let mut a = Args { server: None, serve_only: false, room: "collab".into(), name: format!("guest-{}", std::process::id()), demo: false };
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--server" => a.server = Some(it.next().context("--server URL")?),
            "--serve" => a.serve_only = true,
            "--room" => a.room = it.next().context("--room NAME")?,
            "--name" => a.name = it.next().context("--name ALIAS")?,
            "--demo" => a.demo = true,
            "-h" | "--help" => {
                println!("collab [--server URL | --serve] [--room NAME] [--name ALIAS] | collab --demo");
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}` (see --help)"),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    cli(std::env::args().skip(1))
}

/// The whole program: `args` as on the command line (without the program name).
pub fn cli(args: impl IntoIterator<Item = String>) -> ExitCode {
    match parse(args).and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    if args.demo {
        return demo();
    }
    // Without a server URL, run one here (and, with --serve, only that).
    let server = match &args.server {
        Some(_) => None,
        None => Some(peerlink_server::spawn(peerlink_server::ServerOptions::local())?),
    };
    let url = args.server.clone().unwrap_or_else(|| server.as_ref().expect("started").url());
    if server.is_some() {
        eprintln!("server: {url}  (others join with: cargo run --release --example collab -- --server {url})");
    }
    if args.serve_only {
        eprintln!("serving; Ctrl-C to stop");
        loop {
            std::thread::park();
        }
    }

    // Standard input on a thread of its own; lines arrive on a channel. Ctrl-C becomes
    // `/quit` (a second one ends the process at once).
    let (line_tx, line_rx) = async_channel::bounded::<String>(64);
    let stdin_tx = line_tx.clone();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if stdin_tx.send_blocking(line).is_err() {
                return;
            }
        }
        let _ = stdin_tx.send_blocking("/quit".into());
    });
    quit_on_signal(line_tx)?;

    smol::block_on(async {
        let (member, events) = Member::start(&url, &args.name, &args.room, UdpBind::AllInterfaces, Enter::JoinOrCreate).await?;
        println!("* editing #{} as {} (/show, /board, /who, /quit; a plain line appends to the text)", args.room, args.name);
        session(member, events, line_rx, |line| println!("{line}")).await
    })?;
    if let Some(server) = server {
        server.shutdown();
    }
    Ok(())
}

fn quit_on_signal(lines: async_channel::Sender<String>) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&stop)).context("installing signal handlers")?;
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("installing signal handlers")?;
    }
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).context("installing signal handlers")?;
    std::thread::spawn(move || {
        for _ in signals.forever() {
            let _ = lines.send_blocking("/quit".into());
        }
    });
    Ok(())
}

// ---- the board's merge -------------------------------------------------------------------

/// Merges board writes that crossed (the state sync's operational mode). A join: the same
/// on every replica whatever the order. A write beats a delete (`None`); objects merge field
/// by field, arrays as a sorted union; values of different types rank null < bool < number <
/// string < array < object; otherwise the greater JSON text wins.
fn board_merge(_key: &str, a: Option<&Value>, b: Option<&Value>) -> Option<Value> {
    match (a, b) {
        (None, None) => None,
        (Some(v), None) | (None, Some(v)) => Some(v.clone()),
        (Some(a), Some(b)) => Some(join(a, b)),
    }
}

fn rank(v: &Value) -> u8 {
    match v {
        Value::Null => 0,
        Value::Bool(_) => 1,
        Value::Number(_) => 2,
        Value::String(_) => 3,
        Value::Array(_) => 4,
        Value::Object(_) => 5,
    }
}

fn join(a: &Value, b: &Value) -> Value {
    if rank(a) != rank(b) {
        return if rank(a) > rank(b) { a.clone() } else { b.clone() };
    }
    match (a, b) {
        (Value::Array(x), Value::Array(y)) => {
            let mut all: Vec<(String, Value)> = x.iter().chain(y).map(|v| (v.to_string(), v.clone())).collect();
            all.sort_by(|p, q| p.0.cmp(&q.0));
            all.dedup_by(|p, q| p.0 == q.0);
            Value::Array(all.into_iter().map(|(_, v)| v).collect())
        }
        (Value::Object(x), Value::Object(y)) => {
            let mut out = x.clone();
            for (k, v) in y {
                let merged = match out.get(k) {
                    Some(w) => join(w, v),
                    None => v.clone(),
                };
                out.insert(k.clone(), merged);
            }
            Value::Object(out)
        }
        _ => {
            if a.to_string().cmp(&b.to_string()).is_ge() {
                a.clone()
            } else {
                b.clone()
            }
        }
    }
}

// ---- text positions ----------------------------------------------------------------------

/// The byte offset of character `pos` of `s` (yrs counts bytes), if `pos` is at most its
/// length.
fn byte_of(s: &str, pos: usize) -> Option<usize> {
    s.char_indices().map(|(b, _)| b).chain(std::iter::once(s.len())).nth(pos)
}

/// The character position of byte offset `byte` of `s`.
fn char_of(s: &str, byte: usize) -> usize {
    s.char_indices().take_while(|(b, _)| *b < byte).count()
}

/// What changed between two versions of the text, as "inserted ... at N" (the span between
/// their common prefix and suffix).
fn describe_change(old: &str, new: &str) -> Option<String> {
    let (o, n): (Vec<char>, Vec<char>) = (old.chars().collect(), new.chars().collect());
    let prefix = o.iter().zip(&n).take_while(|(a, b)| a == b).count();
    let suffix = o[prefix..].iter().rev().zip(n[prefix..].iter().rev()).take_while(|(a, b)| a == b).count();
    let removed: String = o[prefix..o.len() - suffix].iter().collect();
    let added: String = n[prefix..n.len() - suffix].iter().collect();
    let q = |s: &str| serde_json::to_string(s).expect("a string");
    Some(match (removed.is_empty(), added.is_empty()) {
        (true, true) => return None,
        (true, false) => format!("inserted {} at {prefix}", q(&added)),
        (false, true) => format!("deleted {} at {prefix}", q(&removed)),
        (false, false) => format!("replaced {} with {} at {prefix}", q(&removed), q(&added)),
    })
}

/// Where a cursor (an awareness state or our own) is now: its anchor (a yrs sticky index,
/// which follows the text around it) resolved, or else its plain position. Anchors stick to
/// the character before the cursor (`Assoc::Before`), so that a cursor stays after what its
/// owner typed, and so that a cursor at the end of the text has one (`Assoc::After` has
/// none there).
fn resolve_cursor(state: &Value, text: &str, txn: &impl peerlink::yrs::ReadTxn) -> Option<usize> {
    let anchored = state
        .get("anchor")
        .and_then(|a| serde_json::from_value::<StickyIndex>(a.clone()).ok())
        .and_then(|i| i.get_offset(txn))
        .map(|o| char_of(text, o.index as usize));
    anchored.or_else(|| state.get("cursor").and_then(Value::as_u64).map(|c| (c as usize).min(text.chars().count())))
}

// ---- one member --------------------------------------------------------------------------

enum Enter {
    Create,
    Join,
    JoinOrCreate,
}

enum Edit {
    Append(String),
    Insert(usize, String),
    Delete(usize, usize),
}

struct Edited {
    before: String,
    after: String,
    /// Our cursor after the edit: its character position and anchor.
    cursor: usize,
    anchor: Option<Value>,
}

/// One member of the room: its node, who is who, and the text as it last showed it.
struct Member {
    node: Node,
    room: Room,
    room_id: String,
    name: String,
    me: Fingerprint,
    aliases: BTreeMap<Fingerprint, String>,
    /// The text before and after each remote change, in the order they were applied (one
    /// per `CrdtEvent::Updated`), recorded by an observer on the text.
    changes: Arc<Mutex<VecDeque<(String, String)>>>,
    /// The key of the last conflict reported (its `Changed` follows).
    merged: Option<String>,
    /// Members with an awareness state.
    present: BTreeSet<Fingerprint>,
    /// Our own awareness state.
    awareness: Value,
    /// Until the room says `Joined`, a refused join (we then created the room) is not news.
    joined: bool,
}

impl Member {
    /// Connects, starts both syncs of `room`, opens the document, publishes `{name}` and
    /// enters the room.
    async fn start(url: &str, name: &str, room: &str, udp: UdpBind, enter: Enter) -> Result<(Member, NodeEvents)> {
        let config = NodeConfig::with_client(ClientConfig::new(url).alias(name));
        let options = ConnectOptions { udp, ..Default::default() };
        let (node, events) = Node::connect_with(config, options).await.context("connecting to the server")?;
        // Sync first and open the document before joining, so that the first exchange with
        // every member already covers it.
        node.sync_state(room, StateConfig::operational(board_merge)).await?;
        node.sync_crdt(room, CrdtConfig::default()).await?;
        // The event says who sent a change, not what it was: an observer on the text
        // records each remote change as it is applied, for the event to describe.
        let changes = Arc::new(Mutex::new(VecDeque::new()));
        let sink = Arc::clone(&changes);
        node.crdt_edit(room, DOC, move |doc| {
            let text = doc.get_or_insert_text(TEXT);
            let mut last = String::new();
            text.observe("collab-changes", move |txn, event| {
                let now = event.target().get_string(txn);
                if peerlink::sync::crdt::is_remote(txn) {
                    let mut changes = sink.lock().unwrap_or_else(|p| p.into_inner());
                    if changes.len() == MAX_CHANGES {
                        changes.pop_front();
                    }
                    changes.push_back((std::mem::take(&mut last), now.clone()));
                }
                last = now;
            });
        })
        .await?;
        let awareness = json!({ "name": name });
        node.set_awareness(room, DOC, Some(awareness.clone())).await?;
        let handle = match enter {
            Enter::Create => node.create_room(room, RoomOptions::group(16)).await?,
            Enter::Join => node.join_room(room).await?,
            Enter::JoinOrCreate => join_or_create(&node, room).await?,
        };
        let me = node.fingerprint();
        let member = Member {
            node,
            room: handle,
            room_id: room.to_owned(),
            name: name.to_owned(),
            me,
            aliases: BTreeMap::new(),
            changes,
            merged: None,
            present: BTreeSet::new(),
            awareness,
            joined: false,
        };
        Ok((member, events))
    }

    fn alias(&self, fp: &Fingerprint) -> String {
        if *fp == self.me {
            return "you".into();
        }
        self.aliases.get(fp).cloned().unwrap_or_else(|| fp.short())
    }

    async fn edit(&mut self, edit: Edit) -> Result<String> {
        let edited = self
            .node
            .crdt_edit(&self.room_id, DOC, move |doc: &Doc| -> Result<Edited, String> {
                let text = doc.get_or_insert_text(TEXT);
                let mut txn = doc.transact_mut();
                let before = text.get_string(&txn);
                let chars = before.chars().count();
                let beyond = |pos: usize| format!("position {pos} is past the end (the text has {chars} characters)");
                let at = match &edit {
                    Edit::Append(s) => {
                        text.insert(&mut txn, before.len() as u32, s);
                        before.len() + s.len()
                    }
                    Edit::Insert(pos, s) => {
                        let b = byte_of(&before, *pos).ok_or_else(|| beyond(*pos))?;
                        text.insert(&mut txn, b as u32, s);
                        b + s.len()
                    }
                    Edit::Delete(pos, len) => {
                        let b = byte_of(&before, *pos).ok_or_else(|| beyond(*pos))?;
                        let e = byte_of(&before, pos + len).ok_or_else(|| beyond(pos + len))?;
                        text.remove_range(&mut txn, b as u32, (e - b) as u32);
                        b
                    }
                };
                let after = text.get_string(&txn);
                let anchor = text.sticky_index(&txn, at as u32, Assoc::Before).and_then(|i| serde_json::to_value(i).ok());
                Ok(Edited { cursor: char_of(&after, at), before, after, anchor })
            })
            .await?
            .map_err(anyhow::Error::msg)?;
        let what = describe_change(&edited.before, &edited.after).unwrap_or_else(|| "changed nothing".into());
        self.set_cursor_state(edited.cursor, edited.anchor).await?;
        Ok(format!("~ you {what}; cursor at {}", edited.cursor))
    }

    async fn set_cursor_state(&mut self, cursor: usize, anchor: Option<Value>) -> Result<()> {
        self.awareness = json!({ "name": self.name, "cursor": cursor });
        if let Some(anchor) = anchor {
            self.awareness["anchor"] = anchor;
        }
        self.node.set_awareness(&self.room_id, DOC, Some(self.awareness.clone())).await?;
        Ok(())
    }

    async fn move_cursor(&mut self, pos: usize) -> Result<String> {
        let room = self.room_id.clone();
        let (cursor, anchor) = self
            .node
            .with_core(move |n, _| {
                let doc = n.crdt(&room).and_then(|c| c.doc(DOC)).ok_or_else(|| NodeError::from(SyncError::NotSynced(room.clone())))?;
                let text = doc.get_or_insert_text(TEXT);
                let txn = doc.transact();
                let s = text.get_string(&txn);
                let pos = pos.min(s.chars().count());
                let b = byte_of(&s, pos).expect("within the text");
                Ok((pos, text.sticky_index(&txn, b as u32, Assoc::Before).and_then(|i| serde_json::to_value(i).ok())))
            })
            .await?;
        self.set_cursor_state(cursor, anchor).await?;
        Ok(format!("* your cursor is at {cursor}"))
    }

    /// The text with every cursor marked.
    async fn show(&self) -> Result<Vec<String>> {
        let room = self.room_id.clone();
        let own = self.awareness.clone();
        let (text, cursors) = self
            .node
            .with_core(move |n, _| {
                let crdt = n.crdt(&room).ok_or_else(|| NodeError::from(SyncError::NotSynced(room.clone())))?;
                let Some(doc) = crdt.doc(DOC) else { return Ok((String::new(), Vec::new())) };
                let text = doc.get_or_insert_text(TEXT);
                let txn = doc.transact();
                let s = text.get_string(&txn);
                let mut cursors: Vec<(usize, Option<Fingerprint>, Option<String>)> = Vec::new();
                if let Some(at) = resolve_cursor(&own, &s, &txn) {
                    cursors.push((at, None, None));
                }
                for (peer, state) in crdt.awareness(DOC) {
                    if let Some(at) = resolve_cursor(&state, &s, &txn) {
                        cursors.push((at, Some(peer), state.get("name").and_then(Value::as_str).map(str::to_owned)));
                    }
                }
                Ok((s, cursors))
            })
            .await?;
        let mut marked = text.clone();
        let mut cursors: Vec<(usize, String)> = cursors
            .into_iter()
            .map(|(at, peer, name)| (at, peer.map_or_else(|| "you".to_owned(), |p| name.unwrap_or_else(|| self.alias(&p)))))
            .collect();
        // From the end, so that earlier positions stay put.
        cursors.sort();
        for (at, name) in cursors.iter().rev() {
            let b = byte_of(&marked, *at).unwrap_or(marked.len());
            marked.insert_str(b, &format!("[@{name}]"));
        }
        let mut out = vec![format!("--- #{} ({} characters) ---", self.room_id, text.chars().count())];
        out.extend(marked.lines().map(|l| format!("| {l}")));
        out.push("---".into());
        Ok(out)
    }

    async fn board(&self) -> Result<Vec<String>> {
        let all = self.node.state_all(&self.room_id).await?;
        if all.is_empty() {
            return Ok(vec!["= the board is empty".into()]);
        }
        Ok(all.into_iter().map(|(k, v)| format!("= {k} = {v}")).collect())
    }

    async fn who(&self) -> Result<Vec<String>> {
        let Some(info) = self.room.info().await else { return Ok(vec!["* not in the room".into()]) };
        let (room, own) = (self.room_id.clone(), self.awareness.clone());
        let (mine, cursors): (Option<usize>, BTreeMap<Fingerprint, Option<usize>>) = self
            .node
            .with_core(move |n, _| {
                let Some((crdt, doc)) = n.crdt(&room).and_then(|c| Some((c, c.doc(DOC)?))) else { return Ok((None, BTreeMap::new())) };
                let text = doc.get_or_insert_text(TEXT);
                let txn = doc.transact();
                let s = text.get_string(&txn);
                Ok((resolve_cursor(&own, &s, &txn), crdt.awareness(DOC).into_iter().map(|(p, state)| (p, resolve_cursor(&state, &s, &txn))).collect()))
            })
            .await?;
        let mut out = vec![format!("* #{} ({} of {}): {} (you), cursor {}", info.id, info.members.len() + 1, info.max_size, self.name, mine.map_or("-".into(), |c| c.to_string()))];
        for m in info.members {
            let path = if m.path == RoomPath::Direct { "direct" } else { "relayed" };
            let cursor = cursors.get(&m.info.fingerprint).copied().flatten().map_or("-".into(), |c| c.to_string());
            out.push(format!("*   {} [{path}] cursor {cursor}", m.info.alias));
        }
        Ok(out)
    }

    /// Runs one line typed by the user; `None` for `/quit`.
    async fn command(&mut self, line: &str) -> Result<Option<Vec<String>>> {
        let unescape = |s: &str| s.replace("\\n", "\n");
        let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
        let number = |s: &str, what: &str| s.trim().parse::<usize>().with_context(|| format!("{what}: not a number: {s:?}"));
        let out = match cmd {
            _ if !line.starts_with('/') => vec![self.edit(Edit::Append(format!("{line}\n"))).await?],
            "/quit" => return Ok(None),
            "/append" => vec![self.edit(Edit::Append(unescape(rest))).await?],
            "/insert" => {
                let (pos, text) = rest.split_once(' ').context("/insert POS TEXT")?;
                vec![self.edit(Edit::Insert(number(pos, "POS")?, unescape(text))).await?]
            }
            "/delete" => {
                let (pos, len) = rest.split_once(' ').context("/delete POS LEN")?;
                vec![self.edit(Edit::Delete(number(pos, "POS")?, number(len, "LEN")?)).await?]
            }
            "/show" => self.show().await?,
            "/cursor" => vec![self.move_cursor(number(rest, "POS")?).await?],
            "/set" => {
                let (key, value) = rest.split_once(' ').context("/set KEY JSON")?;
                let value = serde_json::from_str::<Value>(value).unwrap_or_else(|_| Value::String(value.to_owned()));
                self.node.state_set(&self.room_id, key, &value).await?;
                vec![format!("= you set {key} = {value}")]
            }
            "/del" => {
                ensure!(!rest.is_empty(), "/del KEY");
                let was = self.node.state_delete(&self.room_id, rest).await?;
                vec![if was { format!("= you deleted {rest}") } else { format!("= {rest} is not on the board") }]
            }
            "/board" => self.board().await?,
            "/who" => self.who().await?,
            _ => vec!["! commands: /append TEXT, /insert POS TEXT, /delete POS LEN, /show, /cursor POS, /set KEY JSON, /del KEY, /board, /who, /quit".into()],
        };
        Ok(Some(out))
    }

    /// Turns an event into lines to print.
    async fn on_event(&mut self, event: NodeEvent) -> Result<Vec<String>> {
        let mut out = Vec::new();
        match event {
            NodeEvent::Room(e) => match e {
                RoomEvent::Error { .. } if !self.joined => {}
                RoomEvent::Joined { room, members, .. } if room == self.room_id => {
                    self.joined = true;
                    for m in &members {
                        self.aliases.insert(m.fingerprint, m.alias.clone());
                    }
                    let names: Vec<&str> = members.iter().map(|m| m.alias.as_str()).collect();
                    out.push(format!("* in #{room} with {}", if names.is_empty() { "nobody yet".into() } else { names.join(", ") }));
                }
                RoomEvent::PeerJoined { peer, .. } => {
                    self.aliases.insert(peer.fingerprint, peer.alias.clone());
                    out.push(format!("* {} joined", peer.alias));
                }
                RoomEvent::PeerLeft { peer, kicked, .. } => out.push(format!("* {} {}", self.alias(&peer), if kicked { "was kicked" } else { "left" })),
                RoomEvent::PathChanged { peer, path, .. } => {
                    out.push(format!("* {} is reached {}", self.alias(&peer), if path == RoomPath::Direct { "directly" } else { "through the server" }))
                }
                RoomEvent::Closed { room } => out.push(format!("* #{room} was closed (its owner left): the shared text and board are gone here; /quit")),
                RoomEvent::Kicked { room } => out.push(format!("* you were kicked from #{room}")),
                RoomEvent::Error { error, .. } => out.push(format!("! {error}")),
                _ => {}
            },
            NodeEvent::Sync(SyncEvent::Crdt { event, .. }) => match event {
                CrdtEvent::Updated { from, .. } => {
                    let change = self.changes.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                    let who = self.alias(&from);
                    match change.and_then(|(before, after)| describe_change(&before, &after)) {
                        Some(what) => out.push(format!("~ {who} {what}")),
                        None => out.push(format!("~ text updated by {who}")),
                    }
                }
                CrdtEvent::Awareness { peer, state, .. } => {
                    let name = state.as_ref().and_then(|s| s.get("name")).and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| self.alias(&peer));
                    match state {
                        Some(_) if self.present.insert(peer) => out.push(format!("* {name} is editing")),
                        None if self.present.remove(&peer) => out.push(format!("* {name}'s cursor is gone")),
                        _ => {}
                    }
                }
                CrdtEvent::BadMessage { from, error } => out.push(format!("! bad document message from {}: {error}", self.alias(&from))),
                _ => {}
            },
            NodeEvent::Sync(SyncEvent::State { event, .. }) => match event {
                StateEvent::Changed { origin, .. } if origin == self.me => {}
                // The value a conflict was merged into: nobody wrote it as such.
                StateEvent::Changed { key, value: Some(v), .. } if self.merged.as_ref() == Some(&key) => {
                    self.merged = None;
                    out.push(format!("= {key} is now {v} (merged)"));
                }
                StateEvent::Changed { key, value: Some(v), origin } => out.push(format!("= {} set {key} = {v}", self.alias(&origin))),
                StateEvent::Changed { key, value: None, origin } => out.push(format!("= {} deleted {key}", self.alias(&origin))),
                // `remote` is what the member holds (its own siblings merged), which may be
                // what we hold already: no news then.
                StateEvent::Conflict { local, remote, .. } if local == remote => {}
                StateEvent::Conflict { key, local, remote, merged, from } => {
                    let show = |v: &Option<Value>| v.as_ref().map_or("(deleted)".into(), Value::to_string);
                    out.push(format!("! conflict on {key}: ours {}, {}'s {} -> merged {}", show(&local), self.alias(&from), show(&remote), show(&merged)));
                    // A `Changed` follows when the merge changed our value.
                    if merged != local {
                        self.merged = Some(key);
                    }
                }
                StateEvent::ClockSkew { from, key, error } => out.push(format!("! {}'s write of {key} is ahead of our clock ({error}); taken later", self.alias(&from))),
                StateEvent::BadMessage { from, error } => out.push(format!("! bad board message from {}: {error}", self.alias(&from))),
                _ => {}
            },
            NodeEvent::Sync(SyncEvent::BadFrame { from, error, .. }) => out.push(format!("! bad sync frame from {}: {error}", self.alias(&from))),
            _ => {}
        }
        Ok(out)
    }

    async fn leave(self) {
        let _ = self.room.leave().await;
        self.node.close().await;
    }
}

/// Joins `room`, creating it if nobody has yet (and joining after all if someone else
/// created it meanwhile).
async fn join_or_create(node: &Node, room: &str) -> Result<Room> {
    let refused = |e: &Error, code: ErrorCode| matches!(e, Error::Node(NodeError::Room(RoomError::Request(r))) if r.code() == Some(code));
    match node.join_room(room).await {
        Ok(r) => Ok(r),
        Err(e) if refused(&e, ErrorCode::RoomNotFound) => match node.create_room(room, RoomOptions::group(16)).await {
            Ok(r) => Ok(r),
            Err(e) if refused(&e, ErrorCode::RoomExists) => Ok(node.join_room(room).await?),
            Err(e) => Err(e.into()),
        },
        Err(e) => Err(e.into()),
    }
}

async fn read_text(node: &Node, room: &str) -> Result<String> {
    let room = room.to_owned();
    Ok(node
        .with_core(move |n, _| {
            let doc = n.crdt(&room).and_then(|c| c.doc(DOC)).ok_or_else(|| NodeError::from(SyncError::NotSynced(room.clone())))?;
            let text = doc.get_or_insert_text(TEXT);
            let s = text.get_string(&doc.transact());
            Ok(s)
        })
        .await?)
}

/// A member at work: prints what happens in the room and runs the lines it is given, until
/// `/quit` or the end of `lines`.
async fn session(mut m: Member, mut events: NodeEvents, lines: async_channel::Receiver<String>, say: impl Fn(&str)) -> Result<()> {
    enum Next {
        Event(Option<NodeEvent>),
        Line(Option<String>),
    }
    // The commands below wait for the node's driver, and the driver waits while the event
    // stream is full: keep the stream drained meanwhile, into a queue of our own.
    let (queue, queued) = async_channel::unbounded();
    let forward = smol::spawn(async move {
        while let Some(e) = events.next().await {
            if queue.send(e).await.is_err() {
                break;
            }
        }
    });
    loop {
        let next = async { Next::Event(queued.recv().await.ok()) }.or(async { Next::Line(lines.recv().await.ok()) }).await;
        let out = match next {
            Next::Event(Some(e)) => m.on_event(e).await,
            Next::Event(None) => {
                say("* the connection ended");
                break;
            }
            Next::Line(None) => break,
            Next::Line(Some(line)) => {
                // Trailing spaces count (`/insert 0 # `); the line ending does not.
                let line = line.trim_start().trim_end_matches(['\r', '\n']);
                if line.trim().is_empty() {
                    continue;
                }
                match m.command(line).await {
                    Ok(None) => break,
                    Ok(Some(out)) => Ok(out),
                    Err(e) => Ok(vec![format!("! {e:#}")]),
                }
            }
        };
        for line in out? {
            say(&line);
        }
    }
    m.leave().await;
    forward.cancel().await;
    Ok(())
}

// ---- the demo ----------------------------------------------------------------------------

/// Waits until `check` holds, polling every 50 ms, for at most `max`.
async fn until<F, Fut>(what: &str, max: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + max;
    loop {
        if check().await? {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "timed out after {max:?} waiting until {what}");
        smol::Timer::after(Duration::from_millis(50)).await;
    }
}

/// What the demo reads of one member.
async fn snapshot(node: &Node, room: &str) -> Result<(String, BTreeMap<String, Value>)> {
    Ok((read_text(node, room).await?, node.state_all(room).await?))
}

async fn all_converged(nodes: &[Node], room: &str, done: impl Fn(&str, &BTreeMap<String, Value>) -> bool) -> Result<bool> {
    let first = snapshot(&nodes[0], room).await?;
    if !done(&first.0, &first.1) {
        return Ok(false);
    }
    for n in &nodes[1..] {
        if snapshot(n, room).await? != first {
            return Ok(false);
        }
    }
    Ok(true)
}

fn demo() -> Result<()> {
    let started = Instant::now();
    let server = peerlink_server::spawn(peerlink_server::ServerOptions::local())?;
    let url = server.url();
    println!("demo: server on {url}; alice, bob and carol edit #collab");
    let room = "collab";
    let names = ["alice", "bob", "carol"];
    let limit = Duration::from_secs(30);
    let result = smol::block_on(async {
        let mut all_nodes = Vec::new();
        let mut inputs = Vec::new();
        let mut sessions = Vec::new();
        for (i, name) in names.into_iter().enumerate() {
            let enter = if i == 0 { Enter::Create } else { Enter::Join };
            let (member, events) = Member::start(&url, name, room, UdpBind::Loopback, enter).await.with_context(|| format!("starting {name}"))?;
            all_nodes.push(member.node.clone());
            let (tx, rx) = async_channel::unbounded::<String>();
            inputs.push(tx);
            sessions.push(smol::spawn(session(member, events, rx, move |line| println!("[{name}] {line}"))));
            if i == 0 {
                // Alice writes before the others come: they receive it when they join.
                inputs[0].send("/append Shared notes\\n".into()).await?;
                let alice = all_nodes[0].clone();
                until("alice wrote", limit, move || {
                    let alice = alice.clone();
                    async move { Ok(read_text(&alice, room).await? == "Shared notes\n") }
                })
                .await?;
            }
        }
        let nodes = &all_nodes;
        let say = |i: usize, line: &str| inputs[i].send(line.to_owned());
        until("everyone is in the room", limit, move || async move {
            for n in nodes {
                if n.room(room).info().await.is_none_or(|v| v.members.len() < 2) {
                    return Ok(false);
                }
            }
            Ok(true)
        })
        .await?;
        until("everyone has the seed text", limit, move || all_converged(nodes, room, |t, _| t == "Shared notes\n")).await?;

        // Round 1, all at once: three appends at the same spot, a replacement in the middle,
        // and two writes of `topic` that cross.
        let (a, b, c) = (0, 1, 2);
        for (who, line) in [
            (a, "alice: hello"),
            (b, "/delete 7 5"),
            (c, "carol: hey"),
            (b, "/insert 7 ideas"),
            (a, "/set topic \"planning\""),
            (b, "/set topic \"design\""),
            (c, "/set votes {\"carol\": 1}"),
            (b, "bob: hi all"),
            (b, "/set tmp 1"),
        ] {
            say(who, line).await?;
        }
        until("round 1 converged", limit, move || {
            all_converged(nodes, room, |t, board| {
                ["Shared ideas\n", "alice: hello\n", "bob: hi all\n", "carol: hey\n"].iter().all(|s| t.contains(s)) && ["topic", "votes", "tmp"].iter().all(|k| board.contains_key(*k))
            })
        })
        .await?;

        // Round 2, all at once: an insert at the start, an append, a delete of a key the
        // others set, and two writes of `votes` that cross (merged field by field; should
        // one arrive before the other is made, the later one replaces it instead).
        for (who, line) in [
            (a, "/insert 0 # "),
            (b, "/append (edited by three)\\n"),
            (c, "/del tmp"),
            (a, "/set votes {\"alice\": 1}"),
            (b, "/set votes {\"bob\": 1}"),
        ] {
            say(who, line).await?;
        }
        until("round 2 converged", limit, move || {
            all_converged(nodes, room, |t, board| t.starts_with("# ") && t.contains("(edited by three)\n") && !board.contains_key("tmp") && board.get("votes").is_some_and(|v| v.get("alice").is_some() || v.get("bob").is_some()))
        })
        .await?;

        // Cursors: bob and carol place theirs; alice shows the text with them.
        say(b, "/cursor 2").await?;
        say(c, "/cursor 14").await?;
        let alice = nodes[0].clone();
        until("alice sees both cursors", limit, move || {
            let alice = alice.clone();
            async move {
                let seen = alice
                    .with_core(move |n, _| Ok(n.crdt(room).map(|c| c.awareness(DOC)).unwrap_or_default()))
                    .await?;
                let at = |name: &str, pos: u64| seen.iter().any(|(_, s)| s["name"] == name && s["cursor"] == pos);
                Ok(at("bob", 2) && at("carol", 14))
            }
        })
        .await?;
        say(a, "/show").await?;
        say(a, "/board").await?;
        smol::Timer::after(Duration::from_millis(200)).await;

        for (i, name) in names.iter().enumerate() {
            let (text, board) = snapshot(&nodes[i], room).await?;
            println!("final text [{name}]: {}", serde_json::to_string(&text)?);
            println!("final board [{name}]: {}", serde_json::to_string(&board)?);
        }
        // The owner (alice) last: when it leaves, the room closes.
        for i in [c, b, a] {
            say(i, "/quit").await?;
            sessions.pop().expect("a session").await?;
        }
        anyhow::Ok(())
    });
    server.shutdown();
    result?;
    println!("demo: the three members converged in {:.2?}", started.elapsed());
    Ok(())
}
