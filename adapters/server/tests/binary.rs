//! The `peerlink-server` binary: prints its address, serves, exits 0 on SIGTERM.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use peerlink::protocol::{ClientMessage, ServerMessage};

#[test]
fn binary_serves_and_exits_cleanly_on_sigterm() {
    let (mut child, url) = spawn_binary(&["--listen", "127.0.0.1:0", "--server-id", "bin-test", "--rate", "1000", "--burst", "2000"]);
    assert!(url.starts_with("ws://127.0.0.1:"), "{url}");

    let mut ws = connect(&url);
    match recv(&mut ws) {
        ServerMessage::Challenge { server_id, .. } => assert_eq!(server_id, "bin-test"),
        other => panic!("{other:?}"),
    }
    drop(ws);
    let mut ws = connect_registered(&url, 1);
    send(&mut ws, &ClientMessage::Ping { id: 5 });
    assert_eq!(recv(&mut ws), ServerMessage::Pong { id: 5 });

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    assert_eq!(close_code(&mut ws), 1001);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn binary_rejects_bad_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_peerlink-server"))
        .args(["--listen", "127.0.0.1:0", "--tls-cert", "/nonexistent.pem"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = Command::new(env!("CARGO_BIN_EXE_peerlink-server"))
        .args(["--listen", "127.0.0.1:0", "--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
}
