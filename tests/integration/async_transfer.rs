//! File and JSON transfer through the async adapters (`peerlink-smol`, `peerlink-tokio`): the
//! real server, real UDP on 127.0.0.1; a file into a part file renamed once verified, a JSON
//! value taken without asking, a rejected offer. Written once as a macro, run on each runtime.

use std::path::PathBuf;

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("peerlink-async-transfer-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("in")).unwrap();
    std::fs::create_dir_all(dir.join("out")).unwrap();
    dir
}

fn content(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect()
}

macro_rules! async_transfer {
    ($adapter:ident, $block_on:path, $timeout:expr) => {
        use peerlink::NodeEvent;
        use peerlink::transfer::{Direction, TransferError, TransferEvent};
        use peerlink_tests::{client_config, start_server};
        use $adapter::{ConnectOptions, Node, UdpBind};

        use super::{content, temp_dir};

        #[test]
        fn a_file_and_a_json_value_arrive_and_a_rejected_offer_leaves_nothing() {
            let server = start_server(peerlink::ServerConfig::default());
            let url = server.url();
            let dir = temp_dir(stringify!($adapter));
            let data = content(3 * 1024 * 1024 + 17);
            std::fs::write(dir.join("in/report.bin"), &data).unwrap();
            std::fs::write(dir.join("in/unwanted.bin"), b"no thanks").unwrap();
            let out = dir.join("out");
            $block_on($timeout(async move {
                let options = || ConnectOptions { udp: UdpBind::Loopback, ..Default::default() };
                let (a, mut ea) = Node::connect_with(peerlink::NodeConfig::with_client(client_config(&url, "a")), options()).await.unwrap();
                let (b, mut eb) = Node::connect_with(peerlink::NodeConfig::with_client(client_config(&url, "b")), options()).await.unwrap();
                let (fa, fb) = (a.fingerprint(), b.fingerprint());
                a.connect_to_peer(fb).await.unwrap();
                // Offered before the connection is up: they go once it is.
                let file = a.send_file(fb, dir.join("in/report.bin")).await.unwrap();
                let value = serde_json::json!({"rows": (0..40_000).collect::<Vec<u32>>()});
                let json = a.send_json(fb, &value).await.unwrap();
                let unwanted = a.send_file(fb, dir.join("in/unwanted.bin")).await.unwrap();
                let missing = a.send_file(fb, dir.join("in/missing.bin")).await;
                assert!(matches!(missing, Err($adapter::Error::Io(_))), "a missing file is an I/O error: {missing:?}");

                let (mut got_file, mut got_json) = (false, None);
                while !(got_file && got_json.is_some()) {
                    let Some(NodeEvent::Transfer(e)) = eb.next().await else { continue };
                    match e {
                        TransferEvent::Offered { peer, offer } if offer.id == unwanted => b.reject_transfer(peer, offer.id, "too small").await.unwrap(),
                        TransferEvent::Offered { peer, offer } => {
                            assert_eq!((offer.id, offer.name.as_str(), offer.size), (file, "report.bin", data.len() as u64));
                            b.accept_to_file(peer, offer.id, out.join(&offer.name)).await.unwrap();
                        }
                        TransferEvent::Json { peer, id, value } => {
                            assert_eq!((peer, id), (fa, json));
                            got_json = Some(value);
                        }
                        TransferEvent::Completed { id, direction: Direction::Receive, .. } if id == file => got_file = true,
                        TransferEvent::Failed { id, error, .. } => panic!("transfer {id} failed: {error}"),
                        _ => {}
                    }
                }
                assert_eq!(got_json, Some(value));
                assert!(std::fs::read(out.join("report.bin")).unwrap() == data, "the file differs");
                assert!(!out.join("report.bin.part").exists() && !out.join("unwanted.bin").exists());

                // The sender hears each outcome.
                let mut outcomes = std::collections::BTreeMap::new();
                while outcomes.len() < 3 {
                    if let Some(NodeEvent::Transfer(e)) = ea.next().await {
                        match e {
                            TransferEvent::Completed { id, .. } => outcomes.insert(id, Ok(())),
                            TransferEvent::Failed { id, error, .. } => outcomes.insert(id, Err(error)),
                            _ => None,
                        };
                    }
                }
                assert_eq!(outcomes[&file], Ok(()));
                assert_eq!(outcomes[&json], Ok(()));
                assert_eq!(outcomes[&unwanted], Err(TransferError::Rejected("too small".into())));
                // Commands on unknown transfers are refused, typed.
                let e = b.accept_to_memory(fa, 999).await.unwrap_err();
                assert!(matches!(e, $adapter::Error::Node(peerlink::NodeError::Transfer(TransferError::Unknown(999)))), "{e:?}");
                a.close().await;
                b.close().await;
                let _ = std::fs::remove_dir_all(&dir);
            }));
            drop(server);
        }
    };
}

mod smol {
    async fn timeout<T>(f: impl std::future::Future<Output = T>) -> T {
        use futures_lite::FutureExt;
        f.or(async {
            smol::Timer::after(std::time::Duration::from_secs(60)).await;
            panic!("timed out")
        })
        .await
    }
    async_transfer!(peerlink_smol, smol::block_on, timeout);
}

mod tokio {
    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        ::tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(f)
    }
    async fn timeout<T>(f: impl std::future::Future<Output = T>) -> T {
        ::tokio::time::timeout(std::time::Duration::from_secs(60), f).await.expect("timed out")
    }
    async_transfer!(peerlink_tokio, block_on, timeout);
}
