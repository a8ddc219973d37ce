//! `wss://` with a self-signed certificate: both adapters connect when they trust it.

use peerlink_tests::*;

#[test]
fn both_adapters_connect_over_wss_with_a_self_signed_certificate() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_der = cert.cert.der().clone();
    let tls = peerlink_server::TlsConfig::from_pem(cert.cert.pem().as_bytes(), cert.signing_key.serialize_pem().as_bytes())
        .unwrap();
    let mut options = ServerOptions::local();
    options.tls = Some(tls);
    let server = peerlink_server::spawn(options).unwrap();
    let url = server.url();
    assert!(url.starts_with("wss://localhost:"), "{url}");

    let roots = vec![cert_der.clone()];
    let mut b = peerlink_blocking::Client::connect_with(
        client_config(&url, "b"),
        peerlink_blocking::PollOptions { extra_root_certs: roots.clone(), ..Default::default() },
    )
    .unwrap();
    b.join("secure").unwrap();

    let url_s = url.clone();
    let fb = b.fingerprint();
    run_async(async move {
        let options = peerlink_smol::ConnectOptions { extra_root_certs: roots, ..Default::default() };
        let (s, _events) = peerlink_smol::Client::connect_with(client_config(&url_s, "s"), options).await.unwrap();
        let peers = s.join("secure").await.unwrap();
        assert_eq!(fingerprints(&peers), vec![fb]);
        s.disconnect().await;
    });

    // Without trusting the certificate, the connection is refused.
    let mut cfg = client_config(&url, "untrusting");
    cfg.auto_reconnect = false;
    assert!(peerlink_blocking::Client::connect(cfg).is_err());
    b.disconnect();
    server.shutdown();
}
