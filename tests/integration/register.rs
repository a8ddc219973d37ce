//! Both adapters register with the real server and get the fingerprint of their own key.

use peerlink_tests::*;

#[test]
fn smol_and_blocking_clients_register_with_their_own_fingerprint() {
    let server = start_server(Default::default());
    let url = server.url();
    let id_a = identity(1);
    let id_b = identity(2);
    let expect_a = id_a.fingerprint();
    let expect_b = id_b.fingerprint();

    run_async(async move {
        let options = peerlink_smol::ConnectOptions { identity: Some(id_a), ..Default::default() };
        let (a, _events) = peerlink_smol::Client::connect_with(client_config(&url, "a"), options).await.unwrap();
        assert_eq!(a.fingerprint(), expect_a);
        assert!(a.ping().await.unwrap() < WAIT);
        a.disconnect().await;
    });

    let options = peerlink_blocking::PollOptions { identity: Some(id_b), ..Default::default() };
    let mut b = peerlink_blocking::Client::connect_with(client_config(&server.url(), "b"), options).unwrap();
    assert_eq!(b.fingerprint(), expect_b);
    b.ping().unwrap();
    b.disconnect();
    server.shutdown();
}
