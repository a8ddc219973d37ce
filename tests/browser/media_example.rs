//! The `media` example (examples/media) against a real browser, end to end, as the README says
//! to run it: the real server serving the examples, the example's binary as a child process in
//! server mode (`--url ws://… --room … --record DIR`), and the demo page
//! (`index.html?room=…&call=1`) in headless Chromium with its fake camera.
//!
//! Checked: Chromium decodes the example's VP8 pattern (320×240) steadily (the page's
//! `window.call` has each member's inbound video stats, from getStats); the example, stopped
//! by SIGINT (by its process id), exits with success and has written the browser's video to
//! `DIR/<fingerprint>.ivf`: a valid VP8 or VP9 IVF file that starts with a keyframe, of the
//! camera's size, with at least 60% of the frames 20 fps (Chromium's fake camera) gives over
//! the time the browser was sending, and (when `/usr/bin/ffprobe` is there; CI has no ffmpeg)
//! that ffprobe decodes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use peerlink::Codec;
use peerlink::media::ivf::IvfReader;
use peerlink_server::ServerOptions;
use peerlink_tests::chromium::{Chromium, Page};
use serde_json::Value;

use crate::{ONE_BROWSER, STEP, examples_dir};

/// How long the browser's decoding is watched, in steps of a second.
const WATCH_SECS: usize = 5;
/// How long the browser sends before the example is stopped (from its first encoded frame).
const SEND_FOR: Duration = Duration::from_secs(10);
/// Chromium's fake camera: 20 fps (as measured by `browser_camera_reaches_the_rust_node`).
const CAMERA_FPS: f64 = 20.0;
/// A safety bound passed as `--seconds`: the example stops by itself if this test dies.
const CHILD_SECONDS: u64 = 180;

/// The `media` example's binary, built now (`cargo build --example media`, a no-op when up to
/// date) in this test's profile: examples are another package's, so there is no
/// `CARGO_BIN_EXE_media`.
fn media_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/browser-<hash> -> target/<profile>/examples/media
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir").to_path_buf();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "--example", "media", "-p", "peerlink-examples", "--manifest-path"]).arg(&manifest);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let status = build.status().expect("running cargo build --example media");
    assert!(status.success(), "cargo build --example media failed: {status}");
    let bin = profile_dir.join("examples").join("media");
    assert!(bin.exists(), "{} missing after the build", bin.display());
    bin
}

/// The example running as a child: its stdout lines are collected; dropping it kills the
/// process (by its id) if it is still running.
struct Example {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Example {
    fn start(bin: &Path, args: &[&str]) -> Example {
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                eprintln!("  [media] {line}");
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Example { child, lines }
    }

    fn output(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn has_line(&self, needle: &str) -> bool {
        self.output().iter().any(|l| l.contains(needle))
    }

    /// SIGINT by its process id (the example saves its recordings and exits), then waits;
    /// killed after `timeout`.
    fn interrupt(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our own child by its process id.
        unsafe {
            libc::kill(pid, libc::SIGINT);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => return None,
            }
        }
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The page's `window.call` (null until its script ran).
fn call_state(browser: &mut Chromium, page: &Page) -> Value {
    browser.eval(page, "window.call ? JSON.stringify(window.call) : null").and_then(|v| v.as_str().and_then(|s| serde_json::from_str(s).ok())).unwrap_or(Value::Null)
}

/// Polls the page's call state until `done` holds; fails with `what`, the state, the page's
/// console and the example's output after [`STEP`].
fn until(browser: &mut Chromium, page: &Page, example: &Example, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + STEP;
    loop {
        let state = call_state(browser, page);
        if done(&state) {
            return state;
        }
        if Instant::now() >= deadline || state["state"] == "failed" {
            browser.fail(&format!("waiting for {what}: window.call = {state:#}\n--- the example's output ---\n{}", example.output().join("\n")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The example's member entry in the page's call (it registers as `media`).
fn example_member(state: &Value) -> Option<&Value> {
    state["members"].as_object()?.values().find(|m| m["alias"] == "media")
}

fn decoded(state: &Value) -> u64 {
    example_member(state).and_then(|m| m["stats"]["framesDecoded"].as_u64()).unwrap_or(0)
}

/// Frames the browser encoded for the example (its camera sent on the connection).
fn encoded(state: &Value) -> u64 {
    example_member(state).and_then(|m| m["stats"]["framesEncoded"].as_u64()).unwrap_or(0)
}

#[test]
fn the_media_example_streams_to_a_browser_and_records_its_camera() {
    let _turn = ONE_BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    let bin = media_binary();
    let started = Instant::now();
    let mut options = ServerOptions::local();
    options.serve_dir = Some(examples_dir());
    let server = peerlink_server::spawn(options).expect("the server starts");
    let record = std::env::temp_dir().join(format!("peerlink-media-example-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&record);
    let room = "studio-test";
    let url = server.url();
    let seconds = CHILD_SECONDS.to_string();
    // UDP on every interface, as a user runs it (the browser is on this machine).
    let mut example = Example::start(&bin, &["--url", &url, "--room", room, "--record", record.to_str().expect("utf-8 path"), "--seconds", &seconds]);
    let deadline = Instant::now() + STEP;
    while !example.has_line("streaming the clip") {
        if let Ok(Some(status)) = example.child.try_wait() {
            panic!("the example exited ({status}) before streaming:\n{}", example.output().join("\n"));
        }
        assert!(Instant::now() < deadline, "the example did not start streaming:\n{}", example.output().join("\n"));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(example.has_line(&format!("index.html?room={room}&call=1")), "the example prints the page to open: {:?}", example.output());

    let mut browser = Chromium::launch();
    let page = browser.open(&format!("{}/index.html?room={room}&call=1", server.http_url()));
    let state = until(&mut browser, &page, &example, "the page to join the call", |s| s["state"] == "joined");
    assert_eq!(state["local"], serde_json::json!(["audio", "video"]), "the fake camera and microphone: {state}");
    let fingerprint = state["fingerprint"].as_str().expect("the page's fingerprint").to_owned();
    // Every 100 ms: when the browser first decoded the pattern and first sent its camera (the
    // page's stats, every 500 ms), and framesDecoded each second after the first.
    let mut first_decoded: Option<(Instant, Value)> = None;
    let mut sending: Option<Instant> = None;
    let mut samples: Vec<u64> = Vec::new();
    let mut next_sample = Instant::now();
    let deadline = Instant::now() + STEP + SEND_FOR;
    let state_before_stop = loop {
        let state = call_state(&mut browser, &page);
        let now = Instant::now();
        if first_decoded.is_none() && decoded(&state) > 0 {
            eprintln!("  first frame of the pattern decoded {:?} after the start", started.elapsed());
            first_decoded = Some((now, state.clone()));
            next_sample = now;
        }
        if sending.is_none() && encoded(&state) > 0 {
            sending = Some(now);
        }
        if first_decoded.is_some() && samples.len() <= WATCH_SECS && now >= next_sample {
            samples.push(decoded(&state));
            next_sample += Duration::from_secs(1);
        }
        if samples.len() > WATCH_SECS && sending.is_some_and(|t| t.elapsed() >= SEND_FOR) {
            break state;
        }
        if now >= deadline {
            browser.fail(&format!(
                "the call: decoded from {first_decoded:?}, samples {samples:?}, sending since {sending:?}; window.call = {state:#}\n--- the example's output ---\n{}",
                example.output().join("\n")
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (_, first) = first_decoded.expect("checked");
    let stats = &example_member(&first).expect("checked")["stats"];
    assert_eq!((stats["width"].as_u64(), stats["height"].as_u64()), (Some(320), Some(240)), "the pattern's size: {stats}");
    // The browser decodes steadily: the pattern is 30 fps; at least 10 a second.
    eprintln!("  framesDecoded each second: {samples:?}");
    for pair in samples.windows(2) {
        assert!(pair[1] >= pair[0] + 10, "the browser's decoding stalled: {samples:?}");
    }
    let sent_for = sending.expect("checked").elapsed();
    let status = example.interrupt(Duration::from_secs(10));
    let output = example.output().join("\n");
    let Some(status) = status else { panic!("the example did not exit within 10 s of SIGINT (killed):\n{output}") };
    assert!(status.success(), "the example exited with {status}:\n{output}");
    let encoded_before_stop = encoded(&state_before_stop);
    eprintln!("  the browser sent its camera for {sent_for:?} ({encoded_before_stop} frames encoded by the last stats); the example exited: {status}");

    // The recording: DIR/<browser fingerprint>.ivf, the only file.
    let files: Vec<PathBuf> = std::fs::read_dir(&record).unwrap_or_else(|e| panic!("{}: {e}\n{output}", record.display())).map(|e| e.expect("dir entry").path()).collect();
    let path = record.join(format!("{fingerprint}.ivf"));
    assert_eq!(files, std::slice::from_ref(&path), "one recording, of the browser's video:\n{output}");
    let bytes = std::fs::read(&path).expect("the recording");
    let reader = IvfReader::new(&bytes).expect("a valid IVF header");
    let header = reader.header();
    let frames = reader.collect::<Result<Vec<_>, _>>().expect("valid IVF frames");
    let codec = example_member(&state_before_stop).and_then(|m| m["stats"]["sendCodec"].as_str()).unwrap_or("?").to_owned();
    eprintln!("  recorded {} frames, {:?} {}×{} (the browser sends {codec})", frames.len(), header.codec, header.width, header.height);
    assert!(matches!(header.codec, Codec::Vp8 | Codec::Vp9), "recorded {:?}", header.codec);
    assert!(output.contains(&format!("recorded {} frames", frames.len())), "the example reports what it wrote:\n{output}");
    let want = (CAMERA_FPS * sent_for.as_secs_f64() * 0.6) as usize;
    assert!(frames.len() >= want, "{} frames recorded over {sent_for:?} of sending (at least {want})", frames.len());
    // Every frame the browser encoded reached the recording (the first ones may precede its
    // first keyframe, and the stats are up to 500 ms old).
    assert!(frames.len() * 10 >= encoded_before_stop as usize * 9, "{} frames recorded of {encoded_before_stop} the browser encoded", frames.len());
    // No more than the camera could have given since the page joined, either.
    assert!(frames.len() as f64 <= CAMERA_FPS * 1.2 * started.elapsed().as_secs_f64(), "{} frames in {:?}", frames.len(), started.elapsed());
    if header.codec == Codec::Vp8 {
        // A keyframe first (P bit clear), with the camera's size in it.
        let first = frames[0].data;
        assert_eq!(first[0] & 1, 0, "the first recorded frame is not a keyframe");
        assert_eq!(&first[3..6], [0x9d, 0x01, 0x2a], "a VP8 keyframe's start code");
        let size = (u16::from_le_bytes([first[6], first[7]]) & 0x3fff, u16::from_le_bytes([first[8], first[9]]) & 0x3fff);
        assert_eq!((header.width, header.height), size, "the IVF header has the keyframe's size");
    }
    // Timestamps (90 kHz) rise and span about as long as the frames at the camera's rate.
    let stamps: Vec<u64> = frames.iter().map(|f| f.timestamp).collect();
    assert!(stamps.windows(2).all(|w| w[1] > w[0]), "timestamps do not rise");
    let span = (stamps[stamps.len() - 1] - stamps[0]) as f64 / 90_000.0;
    let fps = (frames.len() - 1) as f64 / span;
    eprintln!("  timestamps span {span:.2} s: {fps:.1} fps");
    assert!((10.0..=35.0).contains(&fps), "{fps:.1} fps by the recording's timestamps");
    let ffprobe = Path::new("/usr/bin/ffprobe");
    if ffprobe.exists() {
        let out = Command::new(ffprobe)
            .args(["-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries", "stream=codec_name,nb_read_frames", "-of", "csv=p=0"])
            .arg(&path)
            .output()
            .expect("running ffprobe");
        let text = String::from_utf8_lossy(&out.stdout);
        eprintln!("  ffprobe: {} {}", text.trim(), String::from_utf8_lossy(&out.stderr).trim());
        assert!(out.status.success(), "ffprobe failed: {}", String::from_utf8_lossy(&out.stderr));
        let decoded: usize = text.trim().rsplit(',').next().and_then(|n| n.parse().ok()).unwrap_or(0);
        assert!(decoded * 10 >= frames.len() * 9, "ffprobe decoded {decoded} of {} frames", frames.len());
    } else {
        eprintln!("  (no /usr/bin/ffprobe: the recording is not decoded here)");
    }
    // Crossed renegotiations (the page's perfect negotiation) show in its console.
    let glare: Vec<&String> = browser.console().iter().filter(|l| l.contains("glare")).collect();
    eprintln!("  the page's glare lines: {glare:?}");
    browser.close_page(&page);
    drop(browser);
    std::fs::remove_dir_all(&record).expect("removing the recordings");
    eprintln!("the_media_example_streams_to_a_browser_and_records_its_camera: {:?}", started.elapsed());
}
