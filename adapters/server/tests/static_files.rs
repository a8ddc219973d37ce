//! Static files on the signaling port (`ServerOptions::serve_dir`, `--serve-examples`): plain
//! HTTP gets files with the right type, nothing outside the directory is reachable, and
//! WebSocket upgrades on the same port still reach signaling.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use peerlink::protocol::{ClientMessage, ServerMessage};
use peerlink_server::{ServerOptions, TlsConfig, spawn};

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("peerlink-static-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The site: one file of each served type, files that must not be served, a subdirectory,
/// a symbolic link inside and one that leads out (to a file next to the site).
fn site(name: &str) -> (TempDir, PathBuf) {
    let tmp = TempDir::new(name);
    let root = tmp.0.join("site");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    for (file, body) in [
        ("index.html", "<!doctype html><p>index</p>"),
        ("app.js", "export const x = 1;"),
        ("style.css", "p { color: red }"),
        ("data.json", "{\"a\":1}"),
        ("clip.ivf", "DKIF"),
        ("clip.webm", "webm"),
        ("notes.txt", "not served"),
        (".hidden.js", "hidden"),
        ("sub/index.html", "<p>sub</p>"),
        ("sub/page.mjs", "export {}"),
    ] {
        std::fs::write(root.join(file), body).unwrap();
    }
    std::fs::write(tmp.0.join("secret.html"), "SECRET").unwrap();
    std::os::unix::fs::symlink(root.join("app.js"), root.join("alias.js")).unwrap();
    std::os::unix::fs::symlink(tmp.0.join("secret.html"), root.join("escape.html")).unwrap();
    std::os::unix::fs::symlink(&tmp.0, root.join("up")).unwrap();
    (tmp, root)
}

fn serve(root: &Path) -> peerlink_server::ServerHandle {
    let mut options = ServerOptions::local();
    options.serve_dir = Some(root.to_path_buf());
    spawn(options).unwrap()
}

#[test]
fn files_are_served_with_their_type() {
    let (_tmp, root) = site("types");
    let server = serve(&root);
    let addr = server.local_addr();
    assert_eq!(server.http_url(), format!("http://{addr}"));
    for (target, content_type, body) in [
        ("/", "text/html; charset=utf-8", "<!doctype html><p>index</p>"),
        ("/index.html", "text/html; charset=utf-8", "<!doctype html><p>index</p>"),
        ("/index.html?v=2#top", "text/html; charset=utf-8", "<!doctype html><p>index</p>"),
        ("/app.js", "text/javascript; charset=utf-8", "export const x = 1;"),
        ("/alias.js", "text/javascript; charset=utf-8", "export const x = 1;"),
        ("/style.css", "text/css; charset=utf-8", "p { color: red }"),
        ("/data.json", "application/json", "{\"a\":1}"),
        ("/clip.ivf", "video/x-ivf", "DKIF"),
        ("/clip.webm", "video/webm", "webm"),
        ("/sub/", "text/html; charset=utf-8", "<p>sub</p>"),
        ("/sub/page.mjs", "text/javascript; charset=utf-8", "export {}"),
        ("/sub/%70age.mjs", "text/javascript; charset=utf-8", "export {}"),
    ] {
        let r = get(addr, target);
        assert_eq!(r.status, 200, "{target}");
        assert_eq!(r.header("content-type"), Some(content_type), "{target}");
        assert_eq!(r.header("content-length"), Some(body.len().to_string().as_str()), "{target}");
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(r.body, body.as_bytes(), "{target}");
    }
    // HEAD: the headers alone.
    let r = raw_request(addr, b"HEAD /app.js HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!((r.status, r.header("content-length"), r.body.len()), (200, Some("19"), 0));
    // The request head may come in pieces.
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for part in ["GET /data", ".json HTTP/1.1\r\n", "Host: x\r\n", "\r\n"] {
        tcp.write_all(part.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).unwrap();
    assert_eq!(parse_response(&raw).body, b"{\"a\":1}");
}

#[test]
fn nothing_outside_the_directory_is_reachable() {
    let (_tmp, root) = site("traversal");
    let server = serve(&root);
    let addr = server.local_addr();
    for target in [
        "/../secret.html",
        "/sub/../../secret.html",
        "/%2e%2e/secret.html",
        "/%2E%2E%2Fsecret.html",
        "/sub%2F..%2F..%2Fsecret.html",
        "/..%5csecret.html",
        "/escape.html",
        "/up/secret.html",
        "/./index.html",
        "/.hidden.js",
        "/index.html%00.js",
    ] {
        let r = get(addr, target);
        assert!(r.status == 403 || r.status == 404, "{target}: {}", r.status);
        assert!(!String::from_utf8_lossy(&r.body).contains("SECRET"), "{target}");
    }
    for (target, status) in [
        ("/etc/passwd", 404),
        ("//etc/passwd", 404),
        ("/notes.txt", 404),
        ("/missing.html", 404),
        ("/sub", 404),
        ("/escape.html", 403),
        ("/../secret.html", 403),
        ("http://localhost/index.html", 400),
        ("/%zz.html", 400),
    ] {
        assert_eq!(get(addr, target).status, status, "{target}");
    }
    let r = raw_request(addr, b"POST /index.html HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    assert_eq!((r.status, r.header("allow")), (405, Some("GET, HEAD")));
    assert_eq!(raw_request(addr, b"GET /index.html\r\n\r\n").status, 400);
    let huge = format!("GET /index.html HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(10_000));
    assert_eq!(raw_request(addr, huge.as_bytes()).status, 431);
}

#[test]
fn websocket_signaling_shares_the_port() {
    let (_tmp, root) = site("shared");
    let server = serve(&root);
    let url = server.url();
    let mut a = connect_registered(&url, 1);
    assert_eq!(get(server.local_addr(), "/app.js").status, 200);
    let mut b = connect_registered(&url, 2);
    send(&mut a, &ClientMessage::Ping { id: 9 });
    assert_eq!(recv(&mut a), ServerMessage::Pong { id: 9 });
    send(&mut b, &ClientMessage::Ping { id: 10 });
    assert_eq!(recv(&mut b), ServerMessage::Pong { id: 10 });
    assert_eq!(server.stats().connections, 2);
}

#[test]
fn without_a_directory_plain_http_gets_nothing() {
    let server = spawn(ServerOptions::local()).unwrap();
    let mut tcp = TcpStream::connect(server.local_addr()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    let _ = tcp.read_to_end(&mut raw);
    assert!(!String::from_utf8_lossy(&raw).contains("200 OK"), "{}", String::from_utf8_lossy(&raw));
    let mut missing = ServerOptions::local();
    missing.serve_dir = Some("/nonexistent/peerlink".into());
    assert!(spawn(missing).is_err());
}

#[test]
fn files_are_served_over_tls_too() {
    let (_tmp, root) = site("tls");
    let rcgen::CertifiedKey { cert, signing_key } = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let mut options = ServerOptions::local();
    options.tls = Some(TlsConfig::from_pem(cert.pem().as_bytes(), signing_key.serialize_pem().as_bytes()).unwrap());
    options.serve_dir = Some(root.clone());
    let server = spawn(options).unwrap();
    assert_eq!(server.http_url(), format!("https://localhost:{}", server.local_addr().port()));
    let config = tls_client_config(cert.der());
    let tcp = TcpStream::connect(server.local_addr()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn = rustls::ClientConnection::new(config.clone(), "localhost".try_into().unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET /style.css HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    tls.read_to_end(&mut raw).expect("the response ends with close_notify");
    let r = parse_response(&raw);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"p { color: red }"[..]));
    // Signaling over wss:// on the same port.
    let stream = TcpStream::connect(server.local_addr()).unwrap();
    let (mut ws, _) = tungstenite::client_tls_with_config(server.url().as_str(), stream, None, Some(tungstenite::Connector::Rustls(config))).unwrap();
    set_timeout(&ws);
    register(&mut ws, &identity(3), "tls");
}

#[test]
fn the_binary_serves_the_browser_example() {
    let (mut child, url) = spawn_binary(&["--listen", "127.0.0.1:0", "--serve-examples"]);
    let addr: SocketAddr = url.strip_prefix("ws://").unwrap_or_else(|| panic!("bad url {url}")).parse().unwrap();
    let index = get(addr, "/index.html");
    let library = get(addr, "/peerlink.js");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!((index.status, index.header("content-type")), (200, Some("text/html; charset=utf-8")));
    assert_eq!((library.status, library.header("content-type")), (200, Some("text/javascript; charset=utf-8")));
    assert!(String::from_utf8_lossy(&library.body).contains("export class PeerClient"));
}
