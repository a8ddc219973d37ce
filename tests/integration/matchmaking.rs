//! `match` forms groups of N among equal criteria and tells every member at once.

use peerlink_tests::*;
use serde_json::json;

#[test]
fn match_forms_groups_of_n_with_equal_criteria() {
    let server = start_server(Default::default());
    let url = server.url();
    let results = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut threads = Vec::new();
    // Six players: three want {"mode":"duel","map":"a"} (keys in either order), three want
    // {"mode":"ffa"}. Groups of three form only among equal criteria.
    for i in 0..6 {
        let url = url.clone();
        let results = results.clone();
        threads.push(std::thread::spawn(move || {
            let mut c = peerlink_blocking::Client::connect(client_config(&url, &format!("p{i}"))).unwrap();
            let criteria = match i % 2 {
                0 if i == 0 => json!({"map": "a", "mode": "duel"}),
                0 => json!({"mode": "duel", "map": "a"}),
                _ => json!({"mode": "ffa"}),
            };
            let m = c.match_peers("arena", Some(criteria.clone()), 3).unwrap();
            results.lock().unwrap().push((c.fingerprint(), criteria["mode"].clone(), m));
            // Stay connected until everyone has matched.
            std::thread::sleep(std::time::Duration::from_millis(300));
            c.disconnect();
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let results = results.lock().unwrap();
    assert_eq!(results.len(), 6);
    for (fp, mode, m) in results.iter() {
        assert_eq!(m.namespace, "arena");
        assert_eq!(m.peers.len(), 3, "group of 3");
        assert!(m.peers.iter().any(|p| p.fingerprint == *fp), "the group includes the member itself");
        for (other_fp, other_mode, other) in results.iter() {
            let same_group = m.peers.iter().any(|p| p.fingerprint == *other_fp);
            assert_eq!(same_group, mode == other_mode, "grouped exactly by criteria");
            if same_group {
                assert_eq!(other.session_id, m.session_id, "one session id per group");
                assert_eq!(fingerprints(&other.peers), fingerprints(&m.peers), "same order for all");
            }
        }
    }
    server.shutdown();
}
