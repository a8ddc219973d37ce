//! The tokio Node over real UDP on 127.0.0.1 through the real signaling server: connect,
//! exchange on the default and a named channel, restart ICE, close.

use std::time::Duration;

use peerlink::{ChannelOptions, NodeConfig, NodeEvent, Payload, PeerState};
use peerlink_tokio::{ConnectOptions, Node, NodeEvents, UdpBind};

async fn node(url: &str, alias: &str) -> (Node, NodeEvents) {
    let config = NodeConfig::with_client(peerlink::ClientConfig::new(url).alias(alias));
    Node::connect_with(config, ConnectOptions { udp: UdpBind::Loopback, ..Default::default() }).await.expect("node")
}

/// Waits for the first event matching `pick`.
async fn wait<T>(events: &mut NodeEvents, mut pick: impl FnMut(&NodeEvent) -> Option<T>) -> T {
    let found = async {
        while let Some(e) = events.next().await {
            if let Some(v) = pick(&e) {
                return v;
            }
        }
        panic!("event stream ended");
    };
    tokio::time::timeout(Duration::from_secs(10), found).await.expect("timed out")
}

/// The whole exchange, on whichever runtime the test gives it.
async fn connect_and_talk(url: &str) {
    let (a, mut a_events) = node(url, "a").await;
    let (b, mut b_events) = node(url, "b").await;
    let (fa, fb) = (a.fingerprint(), b.fingerprint());
    a.connect_to_peer(fb).await.unwrap();
    wait(&mut a_events, |e| matches!(e, NodeEvent::ChannelOpen { channel, .. } if channel == "default").then_some(())).await;
    wait(&mut b_events, |e| matches!(e, NodeEvent::ChannelOpen { channel, .. } if channel == "default").then_some(())).await;
    assert_eq!(a.get_peer(fb).await.unwrap().state, PeerState::Connected);

    a.send(fb, None, &serde_json::json!({"hi": true})).await.unwrap();
    let got = wait(&mut b_events, |e| match e {
        NodeEvent::Data { data, .. } => Some(data.clone()),
        _ => None,
    })
    .await;
    assert_eq!(got, Payload::Text(r#"{"hi":true}"#.into()));

    b.create_data_channel(fa, ChannelOptions::new("files")).await.unwrap();
    wait(&mut a_events, |e| matches!(e, NodeEvent::ChannelOpen { channel, .. } if channel == "files").then_some(())).await;
    // Before the creator's side is open too, sending is refused (typed), never queued.
    wait(&mut b_events, |e| matches!(e, NodeEvent::ChannelOpen { channel, .. } if channel == "files").then_some(())).await;
    b.send_binary(fa, Some("files"), &[7; 50_000]).await.unwrap();
    let got = wait(&mut a_events, |e| match e {
        NodeEvent::Data { channel, data: Payload::Binary(d), .. } if channel == "files" => Some(d.len()),
        _ => None,
    })
    .await;
    assert_eq!(got, 50_000);
    assert!(b.buffered_amount(fa, Some("files")).await.is_some());

    // Typed refusals come back from the driver.
    let err = a.send_text(fb, Some("nope"), "x").await.unwrap_err();
    assert!(
        matches!(err, peerlink_tokio::Error::Node(peerlink::NodeError::Send(peerlink::SendError::UnknownChannel(_)))),
        "{err}"
    );

    a.restart_ice(fb).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.send_text(fb, None, "after restart").await.unwrap();
    let got = wait(&mut b_events, |e| match e {
        NodeEvent::Data { data: Payload::Text(t), .. } => Some(t.clone()),
        _ => None,
    })
    .await;
    assert_eq!(got, "after restart");

    // The signaling client shares the connection.
    let peers = a.client().join("room").await.unwrap();
    assert!(peers.is_empty());

    a.close_peer(fb).await.unwrap();
    wait(&mut b_events, |e| matches!(e, NodeEvent::PeerState { state: PeerState::Closed, .. }).then_some(())).await;
    a.close().await;
    b.close().await;
    // Closed nodes refuse commands; their streams end.
    assert!(matches!(a.connect_to_peer(fb).await, Err(peerlink_tokio::Error::Closed)));
    assert!(a.get_peer(fb).await.is_none());
    while tokio::time::timeout(Duration::from_secs(10), a_events.next()).await.expect("stream ends").is_some() {}
}

#[tokio::test]
async fn tokio_nodes_connect_and_talk() {
    let server = peerlink_server::spawn(peerlink_server::ServerOptions::local()).unwrap();
    connect_and_talk(&server.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_nodes_connect_and_talk_on_a_multi_thread_runtime() {
    let server = peerlink_server::spawn(peerlink_server::ServerOptions::local()).unwrap();
    connect_and_talk(&server.url()).await;
}
