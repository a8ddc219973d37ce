//! The `media` example's demo, as `cargo run --example media -- --demo` runs it: an embedded
//! server, a sender streaming the committed VP8 test pattern through a call over UDP on
//! 127.0.0.1, and a receiver that must record every frame byte for byte (the demo checks and
//! fails otherwise). The recording must also be a valid IVF file of as many frames.

use clap::Parser;

#[path = "../media/main.rs"]
#[allow(dead_code)]
mod media;

#[test]
fn the_pattern_arrives_byte_for_byte_and_is_recorded() {
    let dir = std::env::temp_dir().join(format!("peerlink-media-demo-{}", std::process::id()));
    let args = media::Args::parse_from(["media", "--demo", "--record", dir.to_str().unwrap()]);
    media::demo(&args).expect("the demo");
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "one member recorded: {files:?}");
    let bytes = std::fs::read(&files[0]).unwrap();
    let reader = peerlink::media::ivf::IvfReader::new(&bytes).unwrap();
    assert_eq!(reader.header().codec, peerlink::Codec::Vp8);
    let frames = reader.collect::<Result<Vec<_>, _>>().unwrap();
    assert!(frames.len() >= 90, "{} frames recorded", frames.len());
    std::fs::remove_dir_all(&dir).unwrap();
}
