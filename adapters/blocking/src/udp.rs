//! UDP with fewer system calls: `recvmmsg` (and GRO) to read, GSO to write runs of equal-sized
//! datagrams to one destination, through `quinn-udp`, which falls back to one datagram per call
//! where the kernel cannot.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};

use peerlink::Datagram;
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tracing::trace;

/// Receive buffers per `recvmmsg` call.
const RECV_BATCH: usize = 8;
/// Largest GSO/GRO batch in bytes (the kernel's limit for one UDP send).
const MAX_BATCH_BYTES: usize = 64_000;

/// One bound UDP socket.
pub(crate) struct Port {
    pub(crate) socket: UdpSocket,
    pub(crate) local: SocketAddr,
    state: UdpSocketState,
}

/// Receive buffers shared by every port of a node, allocated on first use.
#[derive(Default)]
pub(crate) struct RecvBuffers {
    bufs: Vec<Vec<u8>>,
}

/// What one [`Port::recv`] read: `n` filled buffers and their metadata.
pub(crate) struct Received {
    meta: [RecvMeta; RECV_BATCH],
    n: usize,
}

impl Received {
    /// Whether nothing was read.
    pub(crate) fn is_empty(&self) -> bool {
        self.n == 0
    }
}

impl RecvBuffers {
    /// The datagrams of `received` (GRO batches split at their stride), with their sources.
    pub(crate) fn datagrams<'a>(&'a self, received: &'a Received) -> impl Iterator<Item = (SocketAddr, &'a [u8])> + 'a {
        received.meta.iter().zip(self.bufs.iter()).take(received.n).flat_map(|(m, buf)| {
            let stride = m.stride.max(1);
            buf[..m.len].chunks(stride).map(move |d| (m.addr, d))
        })
    }
}

impl Port {
    pub(crate) fn new(socket: UdpSocket, local: SocketAddr) -> io::Result<Port> {
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        Ok(Port { socket, local, state })
    }

    /// How many datagrams one send may carry.
    pub(crate) fn max_segments(&self) -> usize {
        self.state.max_gso_segments().max(1)
    }

    /// Reads one batch into `buffers` (nothing when the socket is empty); the datagrams are
    /// then in [`RecvBuffers::datagrams`].
    pub(crate) fn recv(&self, buffers: &mut RecvBuffers) -> Received {
        if buffers.bufs.is_empty() {
            // With GRO, one buffer may hold many coalesced datagrams.
            let size = if self.state.gro_segments() > 1 { MAX_BATCH_BYTES.next_power_of_two() } else { 2048 };
            buffers.bufs = (0..RECV_BATCH).map(|_| vec![0; size]).collect();
        }
        let mut meta = [RecvMeta::default(); RECV_BATCH];
        let mut slices: Vec<IoSliceMut<'_>> = buffers.bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let n = match self.state.recv(UdpSockRef::from(&self.socket), &mut slices, &mut meta) {
            Ok(n) => n,
            Err(e) => {
                // WouldBlock: empty. Others (ICMP errors): nothing to read now either.
                if e.kind() != io::ErrorKind::WouldBlock {
                    trace!(local = %self.local, error = %e, "udp recv");
                }
                0
            }
        };
        Received { meta, n }
    }

    /// Sends `datagrams` (a run from [`run_length`]) in one call when there are several.
    /// `buffer` is scratch space for joining them.
    pub(crate) fn send(&self, datagrams: &[Datagram], buffer: &mut Vec<u8>) {
        let Some(first) = datagrams.first() else { return };
        let (contents, segment_size) = if datagrams.len() == 1 {
            (first.contents.as_slice(), None)
        } else {
            buffer.clear();
            for d in datagrams {
                buffer.extend_from_slice(&d.contents);
            }
            (buffer.as_slice(), Some(first.contents.len()))
        };
        let transmit = Transmit { destination: first.destination, ecn: None, contents, segment_size, src_ip: None };
        // A full socket buffer or a refused batch loses the datagrams, as UDP may; the
        // transport above recovers.
        if let Err(e) = self.state.try_send(UdpSockRef::from(&self.socket), &transmit) {
            trace!(destination = %first.destination, error = %e, "udp send");
        }
    }
}

/// How many datagrams from the start of `datagrams` one send can carry: same source, same
/// destination, all as long as the first except the last (which may be shorter), at most
/// `max_segments` and [`MAX_BATCH_BYTES`].
pub(crate) fn run_length(datagrams: &[Datagram], max_segments: usize) -> usize {
    let Some(first) = datagrams.first() else { return 0 };
    let size = first.contents.len();
    let mut n = 1;
    let mut bytes = size;
    while n < datagrams.len() && n < max_segments {
        let d = &datagrams[n];
        if d.source != first.source || d.destination != first.destination || d.contents.len() > size || bytes + d.contents.len() > MAX_BATCH_BYTES {
            break;
        }
        n += 1;
        bytes += d.contents.len();
        if d.contents.len() < size {
            // A shorter datagram ends a batch.
            break;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(src: u16, dst: u16, len: usize) -> Datagram {
        Datagram {
            source: SocketAddr::from(([127, 0, 0, 1], src)),
            destination: SocketAddr::from(([127, 0, 0, 1], dst)),
            contents: vec![0; len],
        }
    }

    #[test]
    fn runs_are_equal_sized_same_route_and_end_with_a_shorter_one() {
        let v = [d(1, 2, 100), d(1, 2, 100), d(1, 2, 60), d(1, 2, 100)];
        assert_eq!(run_length(&v, 64), 3);
        assert_eq!(run_length(&v[3..], 64), 1);
        let v = [d(1, 2, 100), d(1, 3, 100)];
        assert_eq!(run_length(&v, 64), 1, "another destination");
        let v = [d(1, 2, 100), d(1, 2, 200)];
        assert_eq!(run_length(&v, 64), 1, "a longer one");
        let v = [d(1, 2, 100), d(1, 2, 100), d(1, 2, 100)];
        assert_eq!(run_length(&v, 2), 2, "segment limit");
        let v = vec![d(1, 2, 1500); 60];
        assert_eq!(run_length(&v, 64), 42, "byte limit");
        assert_eq!(run_length(&[], 64), 0);
    }

    #[test]
    fn a_batch_arrives_as_separate_datagrams() {
        let a = Port::new(UdpSocket::bind("127.0.0.1:0").unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
        let b_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b_addr = b_sock.local_addr().unwrap();
        let b = Port::new(b_sock, b_addr).unwrap();
        let (mut bufs, mut scratch) = (RecvBuffers::default(), Vec::new());
        let batch: Vec<Datagram> = (0..10u8)
            .map(|i| Datagram { source: a.local, destination: b_addr, contents: vec![i; if i == 9 { 300 } else { 1200 }] })
            .collect();
        let n = run_length(&batch, a.max_segments());
        a.send(&batch[..n], &mut scratch);
        a.send(&batch[n..], &mut scratch);
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while got.len() < 10 && std::time::Instant::now() < deadline {
            let received = b.recv(&mut bufs);
            got.extend(bufs.datagrams(&received).map(|(_, d)| (d[0], d.len())));
        }
        let want: Vec<(u8, usize)> = (0..10u8).map(|i| (i, if i == 9 { 300 } else { 1200 })).collect();
        assert_eq!(got, want);
    }
}
