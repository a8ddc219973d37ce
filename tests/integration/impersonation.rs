//! Nobody can act as another identity: a wrong-key signature and a challenge response replayed
//! from another connection are refused, and a forged `from` is refused.

use peerlink::ErrorCode;
use peerlink::protocol::ServerMessage;
use peerlink_tests::*;

fn error_code(m: ServerMessage) -> ErrorCode {
    match m {
        ServerMessage::Error { code, .. } => code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn wrong_key_signature_is_refused() {
    let server = start_server(Default::default());
    let victim = identity(1);
    let attacker = identity(2);
    let mut raw = RawClient::connect(&server.url());
    // Claim the victim's public key, sign with the attacker's key.
    let forged = raw.register_frame(&attacker, &raw.nonce.clone(), 1).replace(
        &attacker.public_key().to_base64(),
        &victim.public_key().to_base64(),
    );
    raw.send(&forged);
    assert_eq!(error_code(raw.recv()), ErrorCode::BadSignature);
    server.shutdown();
}

#[test]
fn a_register_replayed_from_another_connection_is_refused() {
    let server = start_server(Default::default());
    let victim = identity(3);
    let mut honest = RawClient::connect(&server.url());
    let captured = honest.register_frame(&victim, &honest.nonce.clone(), 1);
    // The attacker connects and replays the victim's signed frame verbatim.
    let mut attacker = RawClient::connect(&server.url());
    attacker.send(&captured);
    assert_eq!(error_code(attacker.recv()), ErrorCode::BadSignature);
    // The honest connection still registers with it.
    honest.send(&captured);
    assert!(matches!(honest.recv(), ServerMessage::Registered { fingerprint, .. } if fingerprint == victim.fingerprint()));
    server.shutdown();
}

#[test]
fn a_forged_from_is_refused_and_never_delivered() {
    let server = start_server(Default::default());
    let (alice, bob, mallory) = (identity(4), identity(5), identity(6));
    let mut a = RawClient::connect(&server.url());
    a.register(&alice);
    let mut b = RawClient::connect(&server.url());
    b.register(&bob);
    let mut m = RawClient::connect(&server.url());
    m.register(&mallory);
    let forged = format!(
        r#"{{"type":"relay","id":9,"to":"{}","from":"{}","payload":"trust me"}}"#,
        b_fp(&bob),
        alice.fingerprint()
    );
    m.send(&forged);
    match m.recv() {
        ServerMessage::Error { id, code, .. } => assert_eq!((id, code), (Some(9), ErrorCode::InvalidField)),
        other => panic!("{other:?}"),
    }
    // Without `from`, the server stamps Mallory's own fingerprint.
    m.send(&format!(r#"{{"type":"relay","to":"{}","payload":"hi"}}"#, b_fp(&bob)));
    match b.recv() {
        ServerMessage::Relay { from, payload } => {
            assert_eq!(from, mallory.fingerprint());
            assert_eq!(payload.get(), "\"hi\"");
        }
        other => panic!("{other:?}"),
    }
    assert!(b.sync(1).is_empty(), "the forged relay was never delivered");
    server.shutdown();
}

fn b_fp(id: &peerlink::Identity) -> String {
    id.fingerprint().to_string()
}
