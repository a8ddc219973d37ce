//! coturn's `turnserver` (which `.ci/run` installs) on a free port of 127.0.0.1, killed on drop.

use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running coturn.
pub struct Coturn {
    child: Child,
    /// The UDP port it listens on.
    pub port: u16,
}

impl Coturn {
    /// Starts coturn on 127.0.0.1 with `args` added to the common ones (no config file, no
    /// TLS/DTLS, no CLI, logs to stdout, which is discarded), and waits until it answers a
    /// STUN Binding request.
    pub fn start(args: &[&str]) -> Coturn {
        // The free port is found by binding and releasing it, so another process (a parallel
        // test's coturn, or its relay ports) may take it first, and a loaded machine may start
        // coturn slowly: up to three tries, each on a new port, each given 10 s.
        for attempt in 1..=3 {
            if let Some(coturn) = Coturn::try_start(args) {
                return coturn;
            }
            eprintln!("coturn did not come up (try {attempt} of 3)");
        }
        panic!("coturn did not answer in three tries");
    }

    fn try_start(args: &[&str]) -> Option<Coturn> {
        // A free port: bind, read it, release it (coturn binds it next).
        let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("turnserver")
            .args(["-n", "--no-tls", "--no-dtls", "--no-cli", "--listening-ip=127.0.0.1", "--log-file=stdout"])
            .args(args)
            .arg(format!("--listening-port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("coturn's `turnserver` is installed (.ci/run installs the `coturn` package)");
        let mut coturn = Coturn { child, port };
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let request = peerlink::stun::binding_request(peerlink::stun::TransactionId([9; 12]));
        for _ in 0..100 {
            if coturn.child.try_wait().ok().flatten().is_some() {
                // It exited (its port was taken): dropping reaps it.
                return None;
            }
            probe.send_to(&request, ("127.0.0.1", port)).unwrap();
            let mut buf = [0u8; 512];
            if let Ok((n, _)) = probe.recv_from(&mut buf)
                && peerlink::stun::decode(&buf[..n]).is_ok()
            {
                return Some(coturn);
            }
        }
        None
    }

    /// Returns its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Returns its process id (for its CPU time in /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        // Our own child, by its handle (its PID).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
