//! Headless Chromium for the browser tests, driven over the Chrome DevTools Protocol (CDP) on a
//! blocking [`tungstenite`] WebSocket.
//!
//! [`Chromium::launch`] starts `/usr/bin/chromium` headless with a fresh profile in a temporary
//! directory and `--remote-debugging-port=0`, and reads the DevTools URL it prints on stderr.
//! [`Chromium::open`] makes a page target, attaches to it (a flat session), enables the
//! `Runtime` and `Log` domains so that the page's console output, uncaught exceptions and
//! failed loads are kept, and navigates to the URL. [`Chromium::eval`] runs an expression in the
//! page with `Runtime.evaluate` (by value, promises awaited) and [`Chromium::wait_for`] polls
//! one until it holds. Every wait has a deadline. Dropping the [`Chromium`] closes the browser
//! (`Browser.close`, then a kill of the process it started, by its id) and removes the profile.
//!
//! Failure messages carry [`Chromium::report`]: the page's console lines and the tail of the
//! browser's stderr. `PEERLINK_CHROMIUM_FLAGS` adds flags, e.g. WebRTC logging:
//! `--enable-logging=stderr --vmodule=*/webrtc/*=1`.

use std::fs::File;
use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// Where CI installs Chromium (Debian's `chromium` package).
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// How long the browser may take to start and print its DevTools URL.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one DevTools command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the browser may take to close before it is killed.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The flags every browser gets (plus the profile directory and the debugging port).
pub const FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--allow-loopback-in-peer-connection",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
];

/// A page opened with [`Chromium::open`]: its CDP session.
#[derive(Debug, Clone)]
pub struct Page {
    session: String,
    target: String,
}

/// A headless Chromium started by this process. See the [module docs](self).
pub struct Chromium {
    child: Child,
    profile: PathBuf,
    stderr_path: PathBuf,
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// Console lines, exceptions and log entries of every page, in order.
    console: Vec<String>,
}

impl std::fmt::Debug for Chromium {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chromium").field("pid", &self.child.id()).field("profile", &self.profile).finish()
    }
}

/// Reads what `path` holds now (lossy UTF-8; empty if unreadable).
fn read_lossy(path: &Path) -> String {
    let mut bytes = Vec::new();
    let _ = File::open(path).and_then(|mut f| f.read_to_end(&mut bytes));
    String::from_utf8_lossy(&bytes).into_owned()
}

impl Chromium {
    /// Starts the browser; panics with a clear message if [`CHROMIUM`] is missing (CI installs
    /// it: `apt-get install chromium chromium-driver`) or does not start.
    pub fn launch() -> Chromium {
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} not found: the browser tests need Chromium (Debian: `apt-get install -y chromium chromium-driver`; .ci/run installs it)"
        );
        let profile = std::env::temp_dir().join(format!(
            "peerlink-chromium-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
        ));
        std::fs::create_dir_all(&profile).expect("creating the browser profile directory");
        let stderr_path = profile.join("stderr.log");
        let stderr = File::create(&stderr_path).expect("creating the browser log");
        let child = Command::new(CHROMIUM)
            .args(FLAGS)
            .arg(format!("--user-data-dir={}", profile.join("data").display()))
            .arg("--remote-debugging-port=0")
            .args(std::env::var("PEERLINK_CHROMIUM_FLAGS").unwrap_or_default().split_whitespace())
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {CHROMIUM}: {e}"));
        // From here on, a failure must still stop the browser: build the value first.
        let mut launching = Launching { child: Some(child), profile: profile.clone() };
        let deadline = Instant::now() + LAUNCH_TIMEOUT;
        let url = loop {
            let log = read_lossy(&stderr_path);
            if let Some(url) = log.lines().find_map(|l| l.strip_prefix("DevTools listening on ")) {
                break url.trim().to_string();
            }
            if let Ok(Some(status)) = launching.child.as_mut().map_or(Ok(None), Child::try_wait) {
                panic!("{CHROMIUM} exited ({status}) before it listened:\n{}", tail(&log, 40));
            }
            assert!(Instant::now() < deadline, "{CHROMIUM} printed no DevTools URL within {LAUNCH_TIMEOUT:?}:\n{}", tail(&log, 40));
            std::thread::sleep(Duration::from_millis(25));
        };
        let (ws, _) = tungstenite::connect(url.as_str()).unwrap_or_else(|e| panic!("connecting to DevTools at {url}: {e}"));
        if let MaybeTlsStream::Plain(tcp) = ws.get_ref() {
            tcp.set_read_timeout(Some(Duration::from_millis(100))).expect("read timeout");
        }
        let child = launching.child.take().expect("the child is kept until here");
        Chromium { child, profile, stderr_path, ws, next_id: 1, console: Vec::new() }
    }

    /// The browser's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Opens a new page on `url` (a fresh target, attached, console captured).
    pub fn open(&mut self, url: &str) -> Page {
        let target = self.command(None, "Target.createTarget", json!({ "url": "about:blank" }));
        let target = target["targetId"].as_str().unwrap_or_else(|| self.fail(&format!("no targetId in {target}"))).to_string();
        let attached = self.command(None, "Target.attachToTarget", json!({ "targetId": target, "flatten": true }));
        let session = attached["sessionId"].as_str().unwrap_or_else(|| self.fail(&format!("no sessionId in {attached}"))).to_string();
        let page = Page { session, target };
        self.command(Some(&page), "Runtime.enable", json!({}));
        self.command(Some(&page), "Log.enable", json!({}));
        self.command(Some(&page), "Page.enable", json!({}));
        let nav = self.command(Some(&page), "Page.navigate", json!({ "url": url }));
        if let Some(error) = nav.get("errorText").and_then(Value::as_str) {
            self.fail(&format!("navigating to {url}: {error}"));
        }
        page
    }

    /// Closes a page.
    pub fn close_page(&mut self, page: &Page) {
        self.command(None, "Target.closeTarget", json!({ "targetId": page.target }));
    }

    /// Evaluates `expression` in the page (promises awaited) and returns its value as JSON;
    /// `None` when it threw or has no JSON value (e.g. before the page's script has run).
    pub fn eval(&mut self, page: &Page, expression: &str) -> Option<Value> {
        let result = self.command(
            Some(page),
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
        );
        if result.get("exceptionDetails").is_some() {
            return None;
        }
        result.get("result").and_then(|r| r.get("value")).cloned()
    }

    /// Polls `expression` every 50 ms (calling `between` in between, e.g. to drive a node) until
    /// it returns a value other than `null`/`false`; fails after `timeout` with the report.
    pub fn wait_for(&mut self, page: &Page, what: &str, expression: &str, timeout: Duration, mut between: impl FnMut()) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            match self.eval(page, expression) {
                Some(Value::Null | Value::Bool(false)) | None => {}
                Some(v) => return v,
            }
            if Instant::now() >= deadline {
                self.fail(&format!("timed out after {timeout:?} waiting for {what} ({expression})"));
            }
            let pause = Instant::now() + Duration::from_millis(50);
            while Instant::now() < pause {
                between();
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    /// The page console lines, exceptions and log entries seen so far.
    pub fn console(&self) -> &[String] {
        &self.console
    }

    /// Everything useful when a test fails: console output and the tail of the browser's stderr
    /// (without the D-Bus noise of a machine with no session bus).
    pub fn report(&self) -> String {
        let stderr = read_lossy(&self.stderr_path);
        let stderr: Vec<&str> = stderr.lines().filter(|l| !l.contains("dbus") && !l.contains("/usr/bin/chromium:")).collect();
        format!(
            "--- page console ({} lines) ---\n{}\n--- chromium stderr (last 30 lines) ---\n{}",
            self.console.len(),
            self.console.join("\n"),
            stderr[stderr.len().saturating_sub(30)..].join("\n")
        )
    }

    /// Panics with `message` and the [report](Chromium::report).
    pub fn fail(&self, message: &str) -> ! {
        panic!("{message}\n{}", self.report())
    }

    /// Sends a command (to a page's session, or to the browser) and waits for its result,
    /// keeping the events that arrive meanwhile.
    fn command(&mut self, page: Option<&Page>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(page) = page {
            msg["sessionId"] = Value::String(page.session.clone());
        }
        if let Err(e) = self.ws.send(Message::text(msg.to_string())) {
            self.fail(&format!("sending {method} to the browser: {e}"));
        }
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            match self.ws.read() {
                Ok(Message::Text(text)) => {
                    let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
                    if v.get("id").and_then(Value::as_u64) == Some(id) {
                        if let Some(error) = v.get("error") {
                            self.fail(&format!("{method} failed: {error}"));
                        }
                        return v.get("result").cloned().unwrap_or(Value::Null);
                    }
                    self.event(&v);
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => self.fail(&format!("reading from the browser during {method}: {e}")),
            }
            if Instant::now() >= deadline {
                self.fail(&format!("{method}: no answer from the browser within {COMMAND_TIMEOUT:?}"));
            }
        }
    }

    /// Keeps what an event says about the page.
    fn event(&mut self, v: &Value) {
        let params = &v["params"];
        match v.get("method").and_then(Value::as_str) {
            Some("Runtime.consoleAPICalled") => {
                let args: Vec<String> = params["args"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|arg| match arg.get("value") {
                                Some(Value::String(s)) => s.clone(),
                                Some(other) => other.to_string(),
                                None => arg.get("description").and_then(Value::as_str).unwrap_or("?").to_string(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                self.console.push(format!("console.{}: {}", params["type"].as_str().unwrap_or("log"), args.join(" ")));
            }
            Some("Runtime.exceptionThrown") => {
                let d = &params["exceptionDetails"];
                let text = d["exception"]["description"].as_str().or(d["text"].as_str()).unwrap_or("?");
                self.console.push(format!("exception: {text} ({}:{})", d["url"].as_str().unwrap_or(""), d["lineNumber"]));
            }
            Some("Log.entryAdded") => {
                let e = &params["entry"];
                self.console.push(format!(
                    "log.{}: {} {}",
                    e["level"].as_str().unwrap_or("?"),
                    e["text"].as_str().unwrap_or(""),
                    e["url"].as_str().unwrap_or("")
                ));
            }
            Some("Inspector.targetCrashed") => self.console.push("the page crashed".into()),
            _ => {}
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // Ask politely; the browser closes its pages and child processes itself.
        let close = json!({ "id": self.next_id, "method": "Browser.close", "params": {} });
        let _ = self.ws.send(Message::text(close.to_string()));
        let _ = self.ws.flush();
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        let exited = loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break true,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => break false,
            }
        };
        if !exited {
            // The process this harness started, by its id.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// A browser between its start and its DevTools connection: stopped and cleaned up if the
/// launch fails.
struct Launching {
    child: Option<Child>,
    profile: PathBuf,
}

impl Drop for Launching {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(&self.profile);
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().filter(|l| !l.contains("dbus")).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
