//! Shared test helpers: a real signaling server (`peerlink-server`) and client configs.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use peerlink::{ClientConfig, ClientEvent};
use peerlink_blocking::Client;
use peerlink_server::{ServerHandle, ServerOptions};

/// Starts a signaling server on a free local port.
pub fn server() -> ServerHandle {
    peerlink_server::spawn(ServerOptions::local()).expect("spawn server")
}

/// A client config with short timeouts, so failures fail fast.
pub fn config(url: &str, alias: &str) -> ClientConfig {
    let mut config = ClientConfig::new(url).alias(alias);
    config.connect_timeout = Duration::from_secs(5);
    config.request_timeout = Duration::from_secs(5);
    config
}

/// Waits for the first event matching `pred` (others are skipped), up to `timeout`.
pub fn wait_for(
    client: &mut Client,
    timeout: Duration,
    mut pred: impl FnMut(&ClientEvent) -> bool,
) -> ClientEvent {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_event(left).expect("next_event") {
            Some(e) if pred(&e) => return e,
            Some(e) => seen.push(e),
            None => panic!("no matching event within {timeout:?}; saw {seen:#?}"),
        }
    }
}
