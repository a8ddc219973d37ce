//! The `collab` example's demo, as `cargo run --example collab -- --demo` runs it: an embedded
//! server and three members who edit the shared text and board at the same time. It runs in
//! a process of its own (this test binary again, running only `demo_child`), so that its exit
//! status and what it prints can be checked: it must exit 0, and the final text and board it
//! prints must be the same for all three members.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[path = "../collab.rs"]
#[allow(dead_code)]
mod collab;

const CHILD: &str = "PEERLINK_COLLAB_DEMO_CHILD";

/// The demo itself, in the child process: the example's command line with `--demo`, and its
/// exit code as this process's.
#[test]
#[ignore = "run by demo_converges in a process of its own"]
fn demo_child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let code = collab::cli(["--demo".to_owned()]);
    std::process::exit(if code == ExitCode::SUCCESS { 0 } else { 1 });
}

#[test]
fn demo_converges() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["demo_child", "--exact", "--include-ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the demo");
    let read = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let stdout = read(Box::new(child.stdout.take().unwrap()));
    let stderr = read(Box::new(child.stderr.take().unwrap()));
    // The demo gives up by itself after 30 s per step; this is the backstop.
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the demo did not end within 180 s\nstdout:\n{}\nstderr:\n{}", stdout.join().unwrap(), stderr.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    assert!(status.success(), "the demo failed ({status})\nstdout:\n{stdout}\nstderr:\n{stderr}");

    // `final text [NAME]: "..."` and `final board [NAME]: {...}`, per member.
    let mut finals: BTreeMap<&str, BTreeMap<&str, &str>> = BTreeMap::new();
    for line in stdout.lines() {
        for what in ["text", "board"] {
            let Some(rest) = line.strip_prefix(&format!("final {what} [")) else { continue };
            let (name, value) = rest.split_once("]: ").expect("final lines are `final WHAT [NAME]: VALUE`");
            assert!(finals.entry(what).or_default().insert(name, value).is_none(), "{name}'s final {what} printed twice");
        }
    }
    for what in ["text", "board"] {
        let by_member = finals.get(what).unwrap_or_else(|| panic!("no final {what} printed\nstdout:\n{stdout}"));
        assert_eq!(by_member.keys().copied().collect::<Vec<_>>(), ["alice", "bob", "carol"], "final {what} lines");
        let values: Vec<&str> = by_member.values().copied().collect();
        assert!(values.iter().all(|v| *v == values[0]), "the members' final {what} differ: {by_member:#?}");
    }

    // What the demo's edits make of the text and the board, whatever their order.
    let text: String = serde_json::from_str(finals["text"]["alice"]).expect("the text is printed as a JSON string");
    for part in ["# Shared ideas\n", "alice: hello\n", "bob: hi all\n", "carol: hey\n", "(edited by three)\n"] {
        assert!(text.contains(part), "{part:?} is missing from the final text {text:?}");
    }
    let board: serde_json::Value = serde_json::from_str(finals["board"]["alice"]).expect("the board is printed as JSON");
    assert!(board.get("tmp").is_none(), "tmp was deleted: {board}");
    // Both writes of votes, merged when they crossed (as good as always); the later one
    // alone should one have reached its member before that member wrote.
    let votes = &board["votes"];
    assert!(votes == &serde_json::json!({ "alice": 1, "bob": 1 }) || votes == &serde_json::json!({ "alice": 1 }) || votes == &serde_json::json!({ "bob": 1 }), "votes: {board}");
    assert!(board["topic"] == "planning" || board["topic"] == "design", "topic is one of the two written: {board}");
}
