//! A `redis-server` of the bench's own on a free loopback port (no persistence), killed by its
//! PID when dropped, also when the bench panics.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Child,
    pub port: u16,
}

impl RedisServer {
    /// Starts `redis-server` on 127.0.0.1 and a free port; waits (up to 10 s) until it answers
    /// `PING`.
    pub fn start() -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().unwrap().port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (Debian package redis-server)");
        let mut redis = RedisServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !redis.pong() {
            if let Ok(Some(status)) = redis.child.try_wait() {
                panic!("redis-server on port {port} exited at start: {status}");
            }
            assert!(Instant::now() < deadline, "redis-server on port {port} did not answer PING in 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    fn pong(&self) -> bool {
        let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 16];
        tcp.write_all(b"PING\r\n").is_ok() && tcp.read(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
    }

    /// `PUBLISH` so far, from `INFO commandstats`: (calls, total microseconds Redis spent in them).
    pub fn publish_stats(&self) -> Option<(u64, u64)> {
        let info = self.info("commandstats")?;
        let line = info.lines().find(|l| l.starts_with("cmdstat_publish:"))?;
        let field = |name: &str| -> Option<u64> {
            line.split([':', ',']).find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
        };
        Some((field("calls")?, field("usec")?))
    }

    /// The text of `INFO section` (a RESP bulk string).
    fn info(&self, section: &str) -> Option<String> {
        let mut tcp = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        tcp.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        tcp.write_all(format!("INFO {section}\r\n").as_bytes()).ok()?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = tcp.read(&mut chunk).ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = std::str::from_utf8(&buf).ok()?;
            let (head, body) = text.strip_prefix('$')?.split_once("\r\n")?;
            let len: usize = head.parse().ok()?;
            if body.len() >= len {
                return Some(body[..len].to_owned());
            }
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
