//! The operations endpoints, `GET /healthz` and `GET /metrics`: which request targets name
//! them and their responses. Pure functions over the core's [`Health`] and
//! [`Metrics`](peerlink::server::Metrics); the event loop moves the bytes.

use peerlink::server::{Health, Metrics};

use crate::static_files::{self, Refusal};

/// The content type of `/metrics`: the Prometheus text exposition format 0.0.4.
pub(crate) const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// An operations endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `/healthz`: the server's health as JSON; 200, or 503 when degraded.
    Health,
    /// `/metrics`: counters and gauges in the Prometheus text format.
    Metrics,
}

/// The endpoint a request target names (its query ignored), if any. `metrics` is false on the
/// signaling port when a separate metrics listener keeps `/metrics` private.
pub(crate) fn endpoint(target: &str, metrics: bool) -> Option<Endpoint> {
    match target.split(['?', '#']).next().unwrap_or_default() {
        "/healthz" => Some(Endpoint::Health),
        "/metrics" if metrics => Some(Endpoint::Metrics),
        _ => None,
    }
}

/// Whether `method` may read an endpoint: `GET`, or `HEAD` for the headers alone.
fn head_only(method: &str) -> Option<bool> {
    match method {
        "GET" => Some(false),
        "HEAD" => Some(true),
        _ => None,
    }
}

/// The whole `/healthz` response for `method`.
pub(crate) fn health(method: &str, health: &Health) -> Vec<u8> {
    let Some(head_only) = head_only(method) else { return static_files::refusal(Refusal::MethodNotAllowed) };
    let status = match health.status.http_status() {
        200 => "200 OK",
        _ => "503 Service Unavailable",
    };
    let mut body = health.to_json();
    body.push('\n');
    static_files::response(status, "application/json", body.as_bytes(), !head_only, "")
}

/// The whole `/metrics` response for `method`.
pub(crate) fn metrics(method: &str, metrics: &Metrics) -> Vec<u8> {
    let Some(head_only) = head_only(method) else { return static_files::refusal(Refusal::MethodNotAllowed) };
    static_files::response("200 OK", METRICS_CONTENT_TYPE, metrics.to_prometheus().as_bytes(), !head_only, "")
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use peerlink::server::{ConnId, Server, ServerConfig};

    use super::*;

    #[test]
    fn targets_name_endpoints() {
        assert_eq!(endpoint("/healthz", true), Some(Endpoint::Health));
        assert_eq!(endpoint("/healthz?verbose=1", false), Some(Endpoint::Health));
        assert_eq!(endpoint("/metrics", true), Some(Endpoint::Metrics));
        assert_eq!(endpoint("/metrics#x", true), Some(Endpoint::Metrics));
        assert_eq!(endpoint("/metrics", false), None);
        for other in ["/", "/healthz/", "/metricsx", "/index.html", "healthz", "/HEALTHZ"] {
            assert_eq!(endpoint(other, true), None, "{other}");
        }
    }

    #[test]
    fn responses_carry_status_type_and_body() {
        let now = Instant::now();
        let mut server = Server::new(ServerConfig::default(), 1, now, 1_700_000_000_000);
        server.handle_connect(ConnId(1), now).unwrap();
        let later = now + Duration::from_secs(2);
        let ok = String::from_utf8(health("GET", &server.health(later))).unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.contains("Content-Type: application/json\r\n"), "{ok}");
        let body = ok.split_once("\r\n\r\n").unwrap().1;
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!((json["status"].as_str(), json["connections"].as_u64(), json["uptime_seconds"].as_f64()), (Some("ok"), Some(1), Some(2.0)));
        let degraded = Health::new(vec!["broker down".into()], Duration::ZERO, 0, 0);
        assert!(String::from_utf8(health("GET", &degraded)).unwrap().starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        let text = String::from_utf8(metrics("GET", &server.metrics(later))).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"), "{text}");
        assert!(text.contains("\r\n\r\n# HELP peerlink_info ") && text.contains("\npeerlink_connections_accepted_total 1\n"), "{text}");
        let head = String::from_utf8(metrics("HEAD", &server.metrics(later))).unwrap();
        assert!(head.ends_with("\r\n\r\n") && !head.contains("# HELP"), "{head}");
        for method in ["POST", "PUT", "DELETE"] {
            let refused = String::from_utf8(health(method, &server.health(later))).unwrap();
            assert!(refused.starts_with("HTTP/1.1 405") && refused.contains("Allow: GET, HEAD\r\n"), "{refused}");
            assert!(String::from_utf8(metrics(method, &server.metrics(later))).unwrap().starts_with("HTTP/1.1 405"));
        }
    }
}
