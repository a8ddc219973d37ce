//! Browser to Rust (harness = false): how long from a browser starting to join a call to a
//! Rust node's first video frame from it.
//!
//! Goal (from the issue): "time from join to the first remote video frame, Rust to Rust and
//! browser to Rust (median of 10)". Rust to Rust is `--bench media`; this is the browser side.
//!
//! Everything on 127.0.0.1: the real signaling server in this process (serving
//! `examples/browser/`), one Rust node (`peerlink_blocking::PollNode`, UDP on loopback) polled
//! by this thread, and headless Chromium (`peerlink_tests::chromium`: Debian's
//! `/usr/bin/chromium` with the fake camera and microphone). Nothing is pinned: Chromium's
//! processes, the node and the server share the machine's cores.
//!
//! Each run: the node creates a fresh group room and starts a call in it
//! (`CallConfig::video_only`; it sends no frames, so the browser's decoder plays no part). A
//! fresh page of the demo (`index.html`, as a user opens it) registers with the server
//! (`demo.connect()`, awaited, untimed). Then the clock starts on this side, right before the
//! page is told over CDP to join the call (`demo.joinCall(room)`, not awaited): getUserMedia
//! (camera and microphone), `join_room`, a call to the node (the joiner calls), the connection,
//! then a renegotiation that adds the camera (and the node's renegotiation adding its own
//! track; perfect negotiation settles a cross). Measured: until the node's first
//! `MediaEvent::Frame` on the browser's remote video track. Steps printed: the node's
//! `Incoming` (the browser's offer arrived), `ChannelOpen` of `default` and the remote video
//! track (`MediaEvent::TrackAdded`).
//!
//! **Baseline, same runs:** from the same instant to the connection's open (`ChannelOpen` of
//! the `default` channel at the node: the first moment the browser's data could arrive; the
//! demo page sends nothing by itself). frame − open is what media adds on top of joining: a
//! renegotiation and the camera's first encoded frame. Median, min and max of
//! `BENCH_BROWSER_MEDIA_RUNS` (10) runs after `BENCH_BROWSER_MEDIA_WARMUP_RUNS` (1) unreported
//! ones (the browser's first page starts its GPU, network and camera processes).
//!
//! Run: `cargo bench -p peerlink-tests --bench browser_media` (about 30 s plus the build).
//! Env: BENCH_BROWSER_MEDIA_RUNS (10), BENCH_BROWSER_MEDIA_WARMUP_RUNS (1),
//! BENCH_BROWSER_MEDIA_TIMEOUT_S (30, per run), RUST_LOG (tracing to stderr).

mod common;

use std::cell::Cell;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use common::BenchError as Error;
use common::measure::{env_u64, loadavg};
use common::nodes::{IDLE_SLEEP, failure, tracing_from_env};
use peerlink::{CallConfig, ClientConfig, Fingerprint, MediaEvent, NodeConfig, NodeEvent, RoomEvent, RoomOptions, TrackId, TrackKind};
use peerlink_blocking::{PollNode, PollOptions, UdpBind};
use peerlink_tests::chromium::{Chromium, Page};
use serde_json::Value;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One run's times from the join, at the node.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    incoming: Option<Duration>,
    open: Option<Duration>,
    track: Option<Duration>,
    frame: Option<Duration>,
    /// The first frame was a keyframe.
    keyframe: bool,
}

/// Polls the node until `done`; the handler sees every event with the time it was polled.
fn pump_until(node: &mut PollNode, what: &str, deadline: Instant, mut on: impl FnMut(Instant, &NodeEvent), mut done: impl FnMut() -> bool) -> Result<(), Error> {
    loop {
        if done() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("{what}: timed out").into());
        }
        node.poll(Instant::now())?;
        let mut any = false;
        while let Some(e) = node.poll_event() {
            any = true;
            let at = Instant::now();
            failure(0, &e)?;
            on(at, &e);
        }
        if !any {
            std::thread::sleep(IDLE_SLEEP);
        }
    }
}

/// Evaluates `expression` in the page and returns its value (an error when it threw).
fn eval(browser: &mut Chromium, page: &Page, expression: &str) -> Result<Value, Error> {
    browser.eval(page, expression).ok_or_else(|| format!("`{expression}` threw in the page").into())
}

fn one_run(browser: &mut Chromium, node: &mut PollNode, http: &str, room: &str, timeout: Duration) -> Result<Run, Error> {
    let deadline = Instant::now() + timeout;
    node.create_room(room, RoomOptions::group(4))?;
    let joined = Cell::new(false);
    pump_until(node, "the node's room", deadline, |_, e| joined.set(joined.get() | matches!(e, NodeEvent::Room(RoomEvent::Joined { room: r, .. }) if r == room)), || joined.get())?;
    node.room(room).start_call(CallConfig::video_only())?;
    let page = browser.open(&format!("{http}/index.html"));
    let result = (|| {
        // The page's script has run once `demo` is there; then it registers (untimed).
        let loaded = Instant::now() + timeout;
        while eval(browser, &page, "typeof window.demo === 'object'").ok() != Some(Value::Bool(true)) {
            if Instant::now() >= loaded {
                return Err(Error::from("the page did not load"));
            }
            node.poll(Instant::now())?;
            std::thread::sleep(Duration::from_millis(20));
        }
        if eval(browser, &page, "demo.connect()")? != Value::Bool(true) {
            return Err("the page did not register".into());
        }
        let fp: Fingerprint = eval(browser, &page, "document.getElementById('fp').textContent")?
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or("no fingerprint on the page")?;
        let expression = format!("(demo.joinCall({}), true)", Value::String(room.to_owned()));
        let start = Instant::now();
        eval(browser, &page, &expression)?;
        let run = Cell::new(Run::default());
        let mut videos: BTreeSet<TrackId> = BTreeSet::new();
        let since = |at: Instant| Some(at.duration_since(start));
        pump_until(
            node,
            "the browser's first video frame",
            deadline,
            |at, e| {
                let mut r = run.get();
                match e {
                    NodeEvent::Incoming { peer } if *peer == fp && r.incoming.is_none() => r.incoming = since(at),
                    NodeEvent::ChannelOpen { peer, channel } if *peer == fp && channel == "default" && r.open.is_none() => r.open = since(at),
                    NodeEvent::Media(MediaEvent::TrackAdded { peer, track }) if *peer == fp && !track.local && track.kind == TrackKind::Video => {
                        if r.track.is_none() {
                            r.track = since(at);
                        }
                        videos.insert(track.id.clone());
                    }
                    NodeEvent::Media(MediaEvent::Frame { peer, track, frame }) if *peer == fp && videos.contains(track) && r.frame.is_none() => {
                        r.frame = since(at);
                        r.keyframe = frame.keyframe;
                    }
                    _ => {}
                }
                run.set(r);
            },
            || run.get().frame.is_some(),
        )?;
        let run = run.get();
        if run.open.is_none() {
            return Err("a video frame before the connection's open".into());
        }
        // The page leaves; the node drops the connection and leaves the room.
        let _ = eval(browser, &page, "demo.leaveCall().then(() => true)");
        node.close_peer(fp)?;
        Ok(run)
    })();
    browser.close_page(&page);
    node.node().leave_room(Instant::now(), room)?;
    let settle = Instant::now() + Duration::from_millis(200);
    pump_until(node, "settling", settle + Duration::from_secs(1), |_, _| {}, || Instant::now() >= settle)?;
    result
}

/// Median (the mean of the middle two for an even count), min and max, in ms.
fn summary(v: &[Duration]) -> (f64, f64, f64) {
    let mut v: Vec<f64> = v.iter().map(|d| ms(*d)).collect();
    v.sort_by(f64::total_cmp);
    let median = common::median(v.clone()).unwrap_or(f64::NAN);
    (median, v[0], v[v.len() - 1])
}

fn run() -> Result<(), Error> {
    tracing_from_env();
    let runs = env_u64("BENCH_BROWSER_MEDIA_RUNS", 10)? as usize;
    let warmup = env_u64("BENCH_BROWSER_MEDIA_WARMUP_RUNS", 1)? as usize;
    let timeout = Duration::from_secs(env_u64("BENCH_BROWSER_MEDIA_TIMEOUT_S", 30)?);
    if runs == 0 {
        return Err("BENCH_BROWSER_MEDIA_RUNS must be at least 1".into());
    }
    let mut options = peerlink_server::ServerOptions::local();
    options.serve_dir = Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/browser"));
    let server = peerlink_server::spawn(options)?;
    let mut browser = Chromium::launch();
    let config = NodeConfig::with_client(ClientConfig::new(server.url()).alias("rust"));
    let mut node = PollNode::new(config, PollOptions { udp: UdpBind::Loopback, ..Default::default() })?;
    let registering = Instant::now() + timeout;
    while !node.is_registered() {
        if Instant::now() >= registering {
            return Err("the node did not register".into());
        }
        node.poll(Instant::now())?;
        while let Some(e) = node.poll_event() {
            failure(0, &e)?;
        }
        std::thread::sleep(IDLE_SLEEP);
    }
    println!("browser to Rust: join to the first remote video frame; {runs} runs after {warmup} warm-up (load average {})", loadavg());
    let mut results: Vec<Run> = Vec::new();
    for i in 0..warmup + runs {
        let room = format!("browser-media-{i}");
        let r = one_run(&mut browser, &mut node, &server.http_url(), &room, timeout)?;
        let label = if i < warmup { "warm-up".to_owned() } else { format!("run {}", i - warmup + 1) };
        let show = |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.1}", ms(d)));
        println!(
            "  {label:>8}: incoming {} ms, open {} ms, video track {} ms, first frame {} ms ({})",
            show(r.incoming),
            show(r.open),
            show(r.track),
            show(r.frame),
            if r.keyframe { "a keyframe" } else { "not a keyframe" }
        );
        if i >= warmup {
            results.push(r);
        }
    }
    let col = |f: fn(&Run) -> Option<Duration>| results.iter().filter_map(f).collect::<Vec<_>>();
    let frames = col(|r| r.frame);
    let opens = col(|r| r.open);
    let added: Vec<Duration> = results.iter().filter_map(|r| Some(r.frame? - r.open?)).collect();
    let ratios: Vec<f64> = results.iter().filter_map(|r| Some(r.frame?.as_secs_f64() / r.open?.as_secs_f64())).collect();
    println!();
    println!("  {:<52} {:>9} {:>9} {:>9}", format!("from demo.joinCall, {} runs (ms)", results.len()), "median", "min", "max");
    for (name, v) in [
        ("the browser's offer at the node (Incoming)", col(|r| r.incoming)),
        ("baseline: connection open (default channel)", opens.clone()),
        ("the browser's video track at the node", col(|r| r.track)),
        ("first video frame from the browser", frames.clone()),
        ("frame - open (what media adds)", added),
    ] {
        let (median, min, max) = summary(&v);
        println!("  {name:<52} {median:>9.1} {min:>9.1} {max:>9.1}");
    }
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    let median = common::median(ratios).unwrap_or(f64::NAN);
    println!("  {:<52} {median:>9.2} {:>9.2} {:>9.2}", "ratio frame / open (per run)", sorted[0], sorted[sorted.len() - 1]);
    println!("  first frames that were keyframes: {} of {}", results.iter().filter(|r| r.keyframe).count(), results.len());
    drop(browser);
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("browser_media: {e}");
            ExitCode::FAILURE
        }
    }
}
