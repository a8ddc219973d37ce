//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the same harness the
//! cargo-fuzz targets run, without the fuzzer, so every seed and every past crash stays a test.

#[path = "../../fuzz/harness.rs"]
mod harness;

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {} is missing: {e}", dir.display()));
    let mut files: Vec<(PathBuf, Vec<u8>)> = entries
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, data)
        })
        .collect();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    files.sort();
    files
}

fn replay(target: &str, run: fn(&[u8])) {
    let files = corpus(target);
    let mut failed = Vec::new();
    for (path, data) in &files {
        if std::panic::catch_unwind(|| run(data)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{} of {} {target} inputs failed: {failed:#?}", failed.len(), files.len());
}

#[test]
fn decode_frames_corpus() {
    replay("decode_frames", harness::decode_frames);
}

#[test]
fn server_core_corpus() {
    replay("server_core", |data| {
        let _ = harness::server_core(data);
    });
}

/// The hand-written scenarios must get past registration and into the interesting states,
/// or the fuzzer would be stuck at the door.
#[test]
fn server_core_seeds_reach_registered_states() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/server_core");
    let run = |name: &str| {
        let data = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        harness::server_core(&data)
    };
    let s = run("seed-namespaces");
    assert!(s.registered >= 2 && s.max_namespaces >= 2, "{s:?}");
    let s = run("seed-match");
    assert!(s.registered >= 3 && s.matched >= 2, "{s:?}");
    let s = run("seed-rooms");
    assert!(s.registered >= 2 && s.max_rooms >= 2, "{s:?}");
    let s = run("seed-resume");
    assert!(s.registered >= 3 && s.max_sessions >= 2, "{s:?}");
}
