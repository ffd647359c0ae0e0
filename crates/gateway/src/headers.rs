//! Header rewriting between client and instance: hop-by-hop removal, forwarding headers,
//! trace context and request ids.

use std::net::IpAddr;

use std::fmt::Write as _;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, never forwarded (RFC 9110 7.6.1).
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers and those named in `Connection`. With `upgrade`, keeps
/// `Upgrade` and sets `Connection: upgrade` so the next hop sees the upgrade.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let upgrade_value = headers.get(header::UPGRADE).cloned();
    // `te: trailers` is end-to-end in practice (gRPC needs it); other TE values are not.
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade && let Some(v) = upgrade_value {
        headers.insert(header::UPGRADE, v);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// True when the request asks for a protocol upgrade (WebSocket and others).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A header value from a string built for it, without copying it again.
fn owned_value(s: String) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(Bytes::from(s)).ok()
}

/// Appends the client to `X-Forwarded-For` and `Forwarded`, sets `X-Forwarded-Proto` and
/// `X-Forwarded-Host`.
pub fn add_forwarding(headers: &mut HeaderMap, client: IpAddr, host: &str) {
    let prev = headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok());
    if let Some(v) = owned_value(forwarded_for(prev, &client.to_string())) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Ok(v) = HeaderValue::from_str(host) {
        headers.insert(X_FORWARDED_HOST, v);
    }
    let prev = headers.get(header::FORWARDED).and_then(|v| v.to_str().ok());
    if let Some(v) = owned_value(forwarded(prev, &forwarded_node(client), host)) {
        headers.insert(header::FORWARDED, v);
    }
}

/// `X-Forwarded-For` with `client` (an address as text) appended to the value received.
pub fn forwarded_for(prev: Option<&str>, client: &str) -> String {
    let mut xff = String::with_capacity(48);
    if let Some(prev) = prev
        && !prev.trim().is_empty()
    {
        xff.push_str(prev);
        xff.push_str(", ");
    }
    xff.push_str(client);
    xff
}

/// The client as a `Forwarded` node (`for=`), IPv6 quoted and bracketed (RFC 7239).
pub fn forwarded_node(client: IpAddr) -> String {
    match client {
        IpAddr::V4(ip) => format!("for={ip}"),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    }
}

/// `Forwarded` with this hop (`node` from [`forwarded_node`]) appended to the value received.
pub fn forwarded(prev: Option<&str>, node: &str, host: &str) -> String {
    let mut fwd = String::with_capacity(64 + host.len());
    if let Some(prev) = prev
        && !prev.trim().is_empty()
    {
        fwd.push_str(prev);
        fwd.push_str(", ");
    }
    fwd.push_str(node);
    if host.contains(':') || host.is_empty() {
        let _ = write!(fwd, ";host=\"{host}\";proto=http");
    } else {
        let _ = write!(fwd, ";host={host};proto=http");
    }
    fwd
}

/// A valid W3C `traceparent`: version 00, 32 hex trace id, 16 hex parent id, 2 hex flags,
/// ids not all zero.
pub fn valid_traceparent(v: &str) -> bool {
    let parts: Vec<&str> = v.trim().split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() >= 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && (parts[0] != "00" || parts.len() == 4)
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2)
}

/// Keeps a valid `traceparent`, or starts a new sampled trace.
pub fn ensure_traceparent(headers: &mut HeaderMap) {
    let ok = headers
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(valid_traceparent);
    if !ok {
        headers.remove(&TRACESTATE);
        headers.insert(
            TRACEPARENT,
            owned_value(new_traceparent()).expect("hex is a valid header value"),
        );
    }
}

/// A new sampled W3C trace context, to start a trace.
pub fn new_traceparent() -> String {
    format!(
        "00-{:032x}-{:016x}-01",
        rand::random::<u128>() | 1,
        rand::random::<u64>() | 1
    )
}

/// The client's `x-request-id` when sane, else a new one; stored back into `headers`.
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID)
        && usable_request_id(v.as_bytes())
    {
        return v.clone();
    }
    let v = owned_value(new_request_id()).expect("hex is a valid header value");
    headers.insert(X_REQUEST_ID, v.clone());
    v
}

/// A client's request id is kept when it is 1–128 visible ASCII characters.
pub fn usable_request_id(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= 128 && id.iter().all(|b| b.is_ascii_graphic())
}

pub fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("gzip"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("trailers, deflate"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn keeps_upgrade_when_upgrading() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn forwarding_appends() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        add_forwarding(&mut h, "127.0.0.1".parse().unwrap(), "a.localhost:8080");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-host"], "a.localhost:8080");
        assert_eq!(
            h["forwarded"],
            "for=127.0.0.1;host=\"a.localhost:8080\";proto=http"
        );
        let mut h = HeaderMap::new();
        add_forwarding(&mut h, "::1".parse().unwrap(), "a.localhost");
        assert_eq!(h["forwarded"], "for=\"[::1]\";host=a.localhost;proto=http");
    }

    #[test]
    fn traceparent_kept_or_made() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(valid_traceparent(good));
        assert!(!valid_traceparent("00-0000-00f067aa0ba902b7-01"));
        assert!(!valid_traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_static(good));
        ensure_traceparent(&mut h);
        assert_eq!(h["traceparent"], good);
        let mut h = HeaderMap::new();
        ensure_traceparent(&mut h);
        assert!(valid_traceparent(h["traceparent"].to_str().unwrap()));
    }
}
