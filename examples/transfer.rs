//! Files from peer to peer: a sender offers a file, the receiver accepts it, and it goes over a
//! direct WebRTC data channel in verified chunks (SHA-256 of the whole checked at the end), on
//! the blocking adapter.
//!
//! ```text
//! cargo run --release --example transfer -- demo                  # all of it in one process
//! cargo run --release --example transfer -- server --listen 127.0.0.1:8787
//! cargo run --release --example transfer -- recv --server ws://127.0.0.1:8787 --out received
//! cargo run --release --example transfer -- send --server ws://127.0.0.1:8787 FILE [--to FINGERPRINT]
//! ```
//!
//! The receiver asks before it accepts (`--yes` accepts everything, `--no` nothing), stores
//! into `--out` as `NAME.part` until the file verified, never replaces a file that is there,
//! and refuses names that would leave the directory. The sender sends to the first peer in
//! the namespace, or to the one whose fingerprint starts with `--to`. Ctrl-C stops cleanly
//! (a transfer under way is cancelled on both sides); a second Ctrl-C ends at once.
//! `RUST_LOG=debug` shows what the library does.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use clap::{Args, Parser, Subcommand};
use indicatif::HumanBytes;
use peerlink_blocking::UdpBind;
use peerlink_examples::file_transfer::{self, Answer, Net, ReceiveOptions, SendOptions, Ui};

#[derive(Parser)]
#[command(name = "transfer", about = "Send files peer to peer over peerlink")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a signaling server until Ctrl-C.
    Server {
        /// Address to listen on (port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Waits for offers and stores the files accepted.
    Recv {
        #[command(flatten)]
        net: NetArgs,
        /// Directory to store into (created if missing).
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Accept every offer without asking.
        #[arg(long, conflicts_with = "no")]
        yes: bool,
        /// Decline every offer without asking.
        #[arg(long)]
        no: bool,
    },
    /// Sends one file to a receiver in the namespace.
    Send {
        #[command(flatten)]
        net: NetArgs,
        /// The file to send.
        file: PathBuf,
        /// The receiver's fingerprint, or its first hex digits (default: the first peer in the
        /// namespace).
        #[arg(long, value_name = "FINGERPRINT")]
        to: Option<String>,
    },
    /// Server, receiver and sender in one process: sends a generated file over loopback and
    /// checks that it arrived byte-identical.
    Demo {
        /// Bytes to send.
        #[arg(long, default_value_t = 8 << 20)]
        size: u64,
    },
}

#[derive(Args)]
struct NetArgs {
    /// The signaling server (`ws://HOST:PORT` or `wss://...`).
    #[arg(long, value_name = "URL")]
    server: String,
    /// The namespace receivers wait in.
    #[arg(long, default_value = "transfer")]
    namespace: String,
    /// Bind UDP on 127.0.0.1 only (both peers on this machine).
    #[arg(long)]
    loopback: bool,
    /// A STUN server (`stun:HOST:PORT`) for peers behind NAT; may be repeated.
    #[arg(long, value_name = "URL")]
    stun: Vec<String>,
}

impl NetArgs {
    fn net(self) -> Net {
        let udp = if self.loopback { UdpBind::Loopback } else { UdpBind::AllInterfaces };
        Net { server: self.server, namespace: self.namespace, udp, stun: self.stun }
    }
}

/// A flag set by Ctrl-C (or SIGTERM); a second one ends the process at once, should the clean
/// stop hang.
fn stop_flag() -> Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        // Registered first, so it sees the flag as it was before this signal set it.
        signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&stop)).context("installing signal handlers")?;
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("installing signal handlers")?;
    }
    Ok(stop)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The message and its causes on one line, without anyhow's backtrace.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let ui = Ui::terminal();
    match cli.command {
        Command::Server { listen } => {
            let stop = stop_flag()?;
            let options = peerlink_server::ServerOptions { addr: listen, ..peerlink_server::ServerOptions::local() };
            let server = peerlink_server::spawn(options).with_context(|| format!("listening on {listen}"))?;
            let url = server.url();
            println!("listening on {url}; Ctrl-C stops");
            println!("  receive: cargo run --example transfer -- recv --server {url} --out DIR");
            println!("  send:    cargo run --example transfer -- send --server {url} FILE");
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let stats = server.stats();
            println!("stopping ({} connections open)", stats.connections);
            server.shutdown();
        }
        Command::Recv { net, out, yes, no } => {
            let stop = stop_flag()?;
            let answer = if yes {
                Answer::Yes
            } else if no {
                Answer::No
            } else {
                Answer::Ask
            };
            let options = ReceiveOptions { net: net.net(), out, answer, limit: None, deadline: None };
            let received = file_transfer::receive(&options, &ui, &stop)?;
            println!("stopped; {} file(s) received", received.len());
        }
        Command::Send { net, file, to } => {
            if let Some(to) = &to {
                ensure!(!to.is_empty() && to.chars().all(|c| c.is_ascii_hexdigit()), "--to takes a fingerprint (hex digits), not {to:?}");
            }
            let stop = stop_flag()?;
            file_transfer::send(&SendOptions { net: net.net(), file, to, deadline: None }, &ui, &stop)?;
        }
        Command::Demo { size } => {
            let report = file_transfer::demo(size, &ui)?;
            let build = if cfg!(debug_assertions) { " (a debug build; --release is faster)" } else { "" };
            println!(
                "demo: {} ({} bytes) sent, received and found byte-identical; transfer {:.2?}, {}/s{build}; {:.2?} in all",
                HumanBytes(report.size),
                report.size,
                report.transfer,
                HumanBytes(report.bytes_per_sec() as u64),
                report.total
            );
        }
    }
    Ok(())
}
