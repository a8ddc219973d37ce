mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find(|l| l.starts_with("VmRSS")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
#[ignore]
fn rss() {
    let bin = std::env::var("SERVER_BIN").unwrap();
    let n: usize = std::env::var("N").map(|v| v.parse().unwrap()).unwrap_or(2000);
    let mut child = Command::new(bin).args(["--listen", "127.0.0.1:0", "--idle-timeout-secs", "600"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("listening on ").unwrap().to_owned();
    // Warm up with a few connections so allocator arenas etc. exist.
    let warm: Vec<Ws> = (0..20).map(|i| connect_registered(&url, 100000 + i)).collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let before = rss_kib(child.id());
    let clients: Vec<Ws> = (0..n as u64).map(|i| connect_registered(&url, i)).collect();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let after = rss_kib(child.id());
    eprintln!("RSS before {before} KiB, after {after} KiB, per connection {:.2} KiB ({n} conns)", (after - before) as f64 / n as f64);
    drop(clients);
    drop(warm);
    child.kill().unwrap();
}
