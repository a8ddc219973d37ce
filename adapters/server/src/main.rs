//! `peerlink-server`: the peerlink signaling server.
//!
//! Prints exactly one line, `listening on ws://ADDR` (or `wss://`), to stdout once it listens;
//! logs go to stderr (`RUST_LOG`, default `info`), as text or, with `--log-format json`, one
//! JSON object per line. SIGINT or SIGTERM shut it down gracefully (every client gets close
//! 1001) and it exits 0.
//!
//! The port also answers `GET /healthz` (JSON, 200 or 503) and `GET /metrics` (Prometheus
//! text format); `--metrics-listen ADDR` moves `/metrics` to a separate plain HTTP listener
//! (which answers `/healthz` too). `docs/DEPLOY.md` shows a deployment.
//!
//! `--serve-examples [DIR]` also serves the static files of DIR (default: the browser example,
//! `examples/browser` of the workspace this binary was built from) over plain HTTP on the same
//! port: `cargo run -p peerlink-server -- --serve-examples`, then open
//! `http://127.0.0.1:8080/index.html`.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use peerlink::ServerConfig;
use peerlink::server::{AuthConfig, AuthKey, RateLimit, TurnSecretConfig};
use peerlink_server::{ServerOptions, TlsConfig};
use signal_hook::consts::{SIGINT, SIGTERM};
use tracing::info;

/// The peerlink signaling server.
#[derive(Parser, Debug)]
#[command(name = "peerlink-server", version, about)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the line on stdout tells which).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The server's id, part of what clients sign.
    #[arg(long)]
    server_id: Option<String>,
    /// Most simultaneous connections.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Largest text frame accepted, in bytes.
    #[arg(long)]
    max_frame_size: Option<usize>,
    /// Frames per second allowed per connection, sustained.
    #[arg(long)]
    rate: Option<u32>,
    /// Frames allowed at once per connection.
    #[arg(long)]
    burst: Option<u32>,
    /// Close connections silent for this many seconds.
    #[arg(long)]
    idle_timeout_secs: Option<u64>,
    /// Keep a lost session this many seconds for its owner to resume (0 disables resume).
    #[arg(long)]
    resume_grace_secs: Option<u64>,
    /// Bytes queued for one connection before it is closed as a slow consumer.
    #[arg(long)]
    outbound_queue_bytes: Option<usize>,
    /// PEM certificate chain: serve wss:// (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require HS256 JWTs signed with this secret at registration.
    #[arg(long, env = "PEERLINK_JWT_SECRET", hide_env_values = true, conflicts_with = "jwt_es256_public_key")]
    jwt_hs256_secret: Option<String>,
    /// Require ES256 JWTs verified by this PEM (SPKI) public key at registration.
    #[arg(long)]
    jwt_es256_public_key: Option<PathBuf>,
    /// Required `iss` claim.
    #[arg(long)]
    jwt_issuer: Option<String>,
    /// Required `aud` claim.
    #[arg(long)]
    jwt_audience: Option<String>,
    /// Issue short-lived TURN credentials (TURN REST API) signed with this secret, the one
    /// coturn has as `--static-auth-secret` (with `--use-auth-secret`). Needs --turn-url.
    #[arg(long, env = "PEERLINK_TURN_SECRET", hide_env_values = true, requires = "turn_url")]
    turn_secret: Option<String>,
    /// A TURN URL handed out with the credentials, e.g.
    /// `turn:turn.example.org:3478?transport=udp`; repeat for several.
    #[arg(long, value_name = "URL", requires = "turn_secret")]
    turn_url: Vec<String>,
    /// Lifetime of issued TURN credentials, in seconds (default 86400, a day).
    #[arg(long, value_name = "SECONDS", requires = "turn_secret")]
    turn_ttl: Option<u64>,
    /// Raise the soft open-files limit to the hard limit (for many connections).
    #[arg(long)]
    raise_nofile: bool,
    /// Also serve the static files of DIR over HTTP GET on the same port (default: the
    /// workspace's examples/browser, the browser client and its demo page).
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = EXAMPLES_DIR)]
    serve_examples: Option<PathBuf>,
    /// Serve GET /metrics (and /healthz) on this separate plain HTTP address instead of the
    /// signaling port, e.g. 127.0.0.1:9090 to keep metrics private (port 0 picks a free one;
    /// the log tells which).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Run as one node of a cluster on the Redis at URL (e.g. redis://127.0.0.1:6379/): clients
    /// of every node with the same --server-id see each other in namespaces and relay to each
    /// other. Without it the server runs alone.
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// Log format on stderr: `text` for people, `json` (one object per line) for collectors.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (timestamp, level, target, fields).
    Json,
}

/// The browser example of the workspace this binary was built from.
const EXAMPLES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/browser");

fn config(args: &Args) -> anyhow::Result<ServerConfig> {
    let mut config = ServerConfig::default();
    if let Some(id) = &args.server_id {
        config.server_id = id.clone();
    }
    if let Some(n) = args.max_connections {
        config.max_connections = n;
    }
    if let Some(n) = args.max_frame_size {
        config.max_frame_size = n;
    }
    if args.rate.is_some() || args.burst.is_some() {
        let per_second = args.rate.unwrap_or(config.rate_limit.per_second);
        let burst = args.burst.unwrap_or(config.rate_limit.burst.max(per_second));
        config.rate_limit = RateLimit { per_second, burst };
    }
    if let Some(s) = args.idle_timeout_secs {
        config.idle_timeout = Duration::from_secs(s);
    }
    if let Some(s) = args.resume_grace_secs {
        config.resume_grace = Duration::from_secs(s);
    }
    if let Some(n) = args.outbound_queue_bytes {
        config.outbound_queue_bytes = n;
    }
    let key = match (&args.jwt_hs256_secret, &args.jwt_es256_public_key) {
        (Some(secret), None) => {
            if secret.is_empty() {
                bail!("the JWT secret is empty");
            }
            Some(AuthKey::Hs256(secret.clone().into_bytes()))
        }
        (None, Some(path)) => {
            let pem = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Some(AuthKey::es256_from_pem(&pem).with_context(|| format!("parsing {}", path.display()))?)
        }
        (None, None) => None,
        (Some(_), Some(_)) => bail!("give either --jwt-hs256-secret or --jwt-es256-public-key, not both"),
    };
    match key {
        Some(key) => {
            let mut auth = AuthConfig::new(key);
            auth.issuer = args.jwt_issuer.clone();
            auth.audience = args.jwt_audience.clone();
            config.auth = Some(auth);
        }
        None if args.jwt_issuer.is_some() || args.jwt_audience.is_some() => {
            bail!("--jwt-issuer and --jwt-audience need a JWT key")
        }
        None => {}
    }
    if let Some(secret) = &args.turn_secret {
        if secret.is_empty() {
            bail!("the TURN secret is empty");
        }
        if let Some(url) = args.turn_url.iter().find(|u| !(u.starts_with("turn:") || u.starts_with("turns:"))) {
            bail!("--turn-url {url}: a TURN URL starts with turn: or turns:");
        }
        let mut turn = TurnSecretConfig::new(secret.clone().into_bytes(), args.turn_url.iter().cloned());
        if let Some(ttl) = args.turn_ttl {
            turn = turn.ttl(Duration::from_secs(ttl));
        }
        config.turn = Some(turn);
    }
    Ok(config)
}

#[allow(unsafe_code, clippy::unnecessary_cast)]
fn raise_nofile() -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let before = limit.rlim_cur;
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((before as u64, limit.rlim_cur as u64))
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match args.log_format {
        LogFormat::Text => logs.init(),
        // Event fields at the top level of each object, beside `timestamp`, `level`, `target`.
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    if args.raise_nofile {
        let (before, after) = raise_nofile().context("raising RLIMIT_NOFILE")?;
        info!(before, after, "raised the open-files limit");
    }
    let config = config(&args)?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsConfig::from_files(cert, key).context("loading the TLS certificate")?),
        _ => None,
    };
    let scheme = if tls.is_some() { "wss" } else { "ws" };

    let std_listener = std::net::TcpListener::bind(args.listen).with_context(|| format!("binding {}", args.listen))?;
    let addr = std_listener.local_addr()?;
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).context("installing signal handlers")?;
    let options = ServerOptions {
        addr,
        config,
        tls,
        seed: None,
        serve_dir: args.serve_examples.clone(),
        metrics_addr: args.metrics_listen,
        redis: args.redis.clone(),
        cluster_bus: None,
    };
    let server = peerlink_server::spawn_on(std_listener, options).context("starting the server")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {scheme}://{addr}")?;
        out.flush()?;
    }
    if let Some(signal) = signals.forever().next() {
        info!(signal, "signal received");
    }
    server.shutdown();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<ServerConfig> {
        let args = Args::try_parse_from(std::iter::once("peerlink-server").chain(args.iter().copied()))?;
        config(&args)
    }

    #[test]
    fn turn_flags_configure_the_turn_secret() {
        let config = parse(&["--turn-secret", "s3cret", "--turn-url", "turn:a.example:3478", "--turn-url", "turn:10.0.0.1:3478?transport=udp", "--turn-ttl", "600"]).unwrap();
        let turn = config.turn.expect("configured");
        assert_eq!(turn.secret, b"s3cret");
        assert_eq!(turn.urls, ["turn:a.example:3478", "turn:10.0.0.1:3478?transport=udp"]);
        assert_eq!(turn.ttl, Duration::from_secs(600));
        let turn = parse(&["--turn-secret", "s3cret", "--turn-url", "turn:a.example"]).unwrap().turn.unwrap();
        assert_eq!(turn.ttl, peerlink::server::DEFAULT_TURN_TTL);
        assert!(parse(&[]).unwrap().turn.is_none());
    }

    #[test]
    fn incomplete_or_bad_turn_flags_are_refused() {
        assert!(parse(&["--turn-secret", "s3cret"]).is_err(), "a secret without URLs");
        assert!(parse(&["--turn-url", "turn:a.example"]).is_err(), "URLs without a secret");
        assert!(parse(&["--turn-secret", "", "--turn-url", "turn:a.example"]).is_err(), "an empty secret");
        assert!(parse(&["--turn-secret", "s", "--turn-url", "stun:a.example"]).is_err(), "not a TURN URL");
    }
}
