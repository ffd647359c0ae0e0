//! The gateway's own HTTP/1.1 path, for the requests that make up nearly all traffic: an
//! HTTP/1.1 request with no body or a small one (`Content-Length` up to 64 KiB), to a revision
//! served over HTTP/1.1. Each is read and parsed once (httparse), its head rewritten for the
//! instance straight into the bytes that go out (no header map), sent with its body in one
//! write on a pooled plain connection, and the response head rewritten the same way; the
//! response body is forwarded as it arrives, its framing (length, chunked, until close)
//! tracked but not re-encoded. Routing, admission, the hold queue, limits, timeouts and error
//! answers are the same as on hyper's path ([`crate::proxy`]).
//!
//! Everything else goes to hyper: at the first request this path does not serve (HTTP/1.0,
//! HTTP/2, upgrades, `Expect`, chunked or larger bodies, h2c routes, bad or huge heads), the
//! connection is handed to hyper's server with the bytes already read, and hyper serves it
//! from there to its end.
//!
//! Why: per request, hyper's server and client (header maps, the client's dispatch channel,
//! body channels, tasks) took ~8 µs of user CPU on this machine where nginx takes ~3 µs for
//! the same proxying (docs/benchmarks.md, gateway).

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BytesMut};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::ProxyError;
use crate::headers::{self, HOP_BY_HOP};
use crate::pool::{Pool, SendError};
use crate::proxy::{self, Shared};

/// Headers a request or response may have on this path (hyper's limit too).
const MAX_HEADERS: usize = 100;
/// The largest head read here: a request's longer head goes to hyper (which answers 431), a
/// response's is a 502.
const MAX_HEAD: usize = 64 * 1024;
/// Request bodies up to this size are read whole and sent with the head; larger ones stream
/// through hyper, which moves both directions at once.
const MAX_BODY: usize = 64 * 1024;
/// Initial read buffer of a client connection.
const CLIENT_BUF: usize = 8 * 1024;
/// Read buffer for one response.
const UPSTREAM_BUF: usize = 32 * 1024;

/// How a client connection left this path.
pub(crate) enum Served {
    /// Closed (by either side, or for shutdown).
    Closed,
    /// Its next request is one this path does not serve: hyper serves the connection from
    /// there, starting with the bytes already read.
    Handoff(Prefixed),
}

/// The client, as the forwarding headers name it (formatted once per connection).
struct Client {
    /// For `X-Forwarded-For`.
    addr: String,
    /// For `Forwarded`.
    node: String,
}

/// Serves requests on a client connection until it closes, `shutdown` finds it idle, or a
/// request needs hyper.
pub(crate) async fn serve(
    shared: &Shared,
    pool: &Pool,
    mut stream: TcpStream,
    peer: SocketAddr,
    shutdown: &CancellationToken,
) -> Served {
    let ip = peer.ip().to_canonical();
    let client = Client {
        addr: ip.to_string(),
        node: headers::forwarded_node(ip),
    };
    let mut buf = BytesMut::with_capacity(CLIENT_BUF);
    let mut timer = std::pin::pin!(tokio::time::sleep(shared.config.client_timeout));
    loop {
        // Ready for a request: it has the client timeout to arrive whole.
        restart(&mut timer, shared);
        let req = loop {
            match parse_request(&buf, &client) {
                Parse::Request(r) => break r,
                Parse::Handoff => return Served::Handoff(Prefixed::new(buf, stream)),
                Parse::Partial if buf.len() >= MAX_HEAD => {
                    return Served::Handoff(Prefixed::new(buf, stream));
                }
                Parse::Partial => {}
            }
            let idle = buf.is_empty();
            if idle && shutdown.is_cancelled() {
                return Served::Closed;
            }
            if !read_more(
                &mut stream,
                &mut buf,
                CLIENT_BUF,
                &mut timer,
                shutdown,
                peer,
            )
            .await
            {
                return Served::Closed;
            }
        };
        // The body, whole.
        while buf.len() < req.head_len + req.body_len {
            let missing = req.head_len + req.body_len - buf.len();
            if !read_more(&mut stream, &mut buf, missing, &mut timer, shutdown, peer).await {
                return Served::Closed;
            }
        }
        let client = Conn {
            stream: &mut stream,
            timer: timer.as_mut(),
            shared,
        };
        match exchange(client, pool, &mut buf, &req, shutdown).await {
            Next::KeepAlive => {}
            Next::Close => return Served::Closed,
            Next::Handoff => return Served::Handoff(Prefixed::new(buf, stream)),
        }
    }
}

/// Reads more of a request (room for `want` bytes) into `buf`; false when the connection is
/// to close: the client closed it, the client timeout passed, or shutdown came while nothing
/// of a request had been read.
async fn read_more(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    want: usize,
    timer: &mut Pin<&mut tokio::time::Sleep>,
    shutdown: &CancellationToken,
    peer: SocketAddr,
) -> bool {
    let idle = buf.is_empty();
    reserve(buf, want);
    let read = tokio::select! {
        biased;
        r = stream.read_buf(buf) => r,
        _ = shutdown.cancelled(), if idle => return false,
        _ = timer.as_mut() => {
            let what = if idle { "idle" } else { "sent part of a request" };
            debug!(%peer, "client connection closed: {what} for the client timeout");
            return false;
        }
    };
    matches!(read, Ok(n) if n > 0)
}

/// The client timeout counts from now.
fn restart(timer: &mut Pin<&mut tokio::time::Sleep>, shared: &Shared) {
    let at = tokio::time::Instant::now() + shared.config.client_timeout;
    timer.as_mut().reset(at);
}

/// The client's side of an exchange: its socket, and the timer its writes run under.
struct Conn<'a> {
    stream: &'a mut TcpStream,
    timer: Pin<&'a mut tokio::time::Sleep>,
    shared: &'a Shared,
}

impl Conn<'_> {
    /// Writes `a` then `b`; fails when the client takes none of it for the client timeout.
    async fn write(&mut self, a: &[u8], b: &[u8]) -> io::Result<()> {
        restart(&mut self.timer, self.shared);
        tokio::select! {
            biased;
            r = write_two(self.stream, a, b) => r,
            _ = self.timer.as_mut() => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing for the client timeout",
            )),
        }
    }
}

/// Room for at least `n` more bytes (at least a quarter of the initial buffer).
fn reserve(buf: &mut BytesMut, n: usize) {
    let n = n.max(CLIENT_BUF / 4);
    if buf.capacity() - buf.len() < n {
        buf.reserve(n);
    }
}

/// After a request.
enum Next {
    KeepAlive,
    Close,
    /// Not served (the request is still in the buffer): hyper takes the connection.
    Handoff,
}

/// One request whose head and body are at the start of `buf`: routed, admitted, sent to an
/// instance, and its response forwarded; the request is taken off `buf` unless handed off.
async fn exchange(
    mut client: Conn<'_>,
    pool: &Pool,
    buf: &mut BytesMut,
    req: &Req,
    shutdown: &CancellationToken,
) -> Next {
    let shared = client.shared;
    let start = Instant::now();
    let (svc, rev) = match proxy::target(shared, &req.host) {
        Ok(t) => t,
        Err(e) => {
            buf.advance(req.head_len + req.body_len);
            return Answer(e).send(&mut client, req).await;
        }
    };
    let route = match proxy::revision_of(&svc, &rev.revision) {
        Ok(r) => r,
        Err(e) => {
            buf.advance(req.head_len + req.body_len);
            return Answer(e).send(&mut client, req).await;
        }
    };
    if route.h2c {
        return Next::Handoff;
    }
    buf.advance(req.head_len);
    let body = buf.split_to(req.body_len);
    rev.record_request();
    if route.max_body_bytes > 0 && req.body_len as u64 > route.max_body_bytes {
        return Answer(ProxyError::body_too_large(route.max_body_bytes))
            .send(&mut client, req)
            .await;
    }
    let timeout = proxy::request_timeout(route);
    let deadline = tokio::time::Instant::from_std(start) + timeout;

    let held = tokio::select! {
        biased;
        r = proxy::hold(shared, &rev, svc, deadline, None) => r,
        _ = client_gone(client.stream, buf) => return Next::Close,
    };
    let (mut guard, mut endpoint, mut svc) = match held {
        Ok(h) => h,
        Err(e) => return Answer(e).send(&mut client, req).await,
    };
    // A refused connection sends the request back to the hold queue for another instance
    // (nothing was sent, and the body is in memory): a crashed single instance's requests
    // wait for its replacement instead of failing.
    let mut retried = 0;
    let mut ubuf = BytesMut::with_capacity(UPSTREAM_BUF);
    let (mut up, head) = loop {
        let sent = tokio::select! {
            biased;
            r = tokio::time::timeout_at(deadline, send(pool, endpoint.address, req, &body, &mut ubuf)) => r,
            _ = client_gone(client.stream, buf) => return Next::Close,
        };
        match sent {
            Ok(Ok(r)) => break r,
            Ok(Err(e)) => {
                if e.is_connect() && retried < proxy::MAX_REHOLDS {
                    retried += 1;
                    let held = tokio::select! {
                        biased;
                        r = proxy::hold_again(shared, &rev, svc.clone(), deadline, &endpoint, &e, &req.request_id) => r,
                        _ = client_gone(client.stream, buf) => return Next::Close,
                    };
                    match held {
                        // The failed slot is freed only now, after taking the new one.
                        Ok((g, ep, s)) => (guard, endpoint, svc) = (g, ep, s),
                        Err(e) => return Answer(e).send(&mut client, req).await,
                    }
                    continue;
                }
                warn!(request_id = %req.request_id, instance = %endpoint.instance_id, error = %crate::error::chain(&e), "upstream request failed");
                return Answer(ProxyError::upstream_unreachable(&endpoint.instance_id, &e))
                    .send(&mut client, req)
                    .await;
            }
            Err(_) => {
                return Answer(ProxyError::upstream_timeout(
                    &endpoint.instance_id,
                    timeout.as_millis() as u64,
                ))
                .send(&mut client, req)
                .await;
            }
        }
    };
    rev.record_latency(start.elapsed().as_secs_f64() * 1000.0);
    if head.status == 101 {
        return Answer(ProxyError::bad_upgrade(&endpoint.instance_id))
            .send(&mut client, req)
            .await;
    }

    let mut framing = head.framing;
    let close = req.close || matches!(framing, Framing::Close) || shutdown.is_cancelled();
    let mut out = head.out;
    if matches!(framing, Framing::Chunked(_)) {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    ubuf.advance(head.len);

    // The body, forwarded as it arrives; the instance slot stays taken until its end.
    let mut egress = 0u64;
    let mut first = Some(out);
    let complete = loop {
        let (take, data, done) = match framing.advance(&ubuf) {
            Ok(step) => step,
            Err(message) => {
                debug!(request_id = %req.request_id, instance = %endpoint.instance_id, message, "bad response body framing");
                break false;
            }
        };
        egress += data;
        let wrote = match first.take() {
            Some(h) => client.write(&h, &ubuf[..take]).await,
            None if take > 0 => client.write(&ubuf[..take], &[]).await,
            None => Ok(()),
        };
        ubuf.advance(take);
        if wrote.is_err() {
            break false;
        }
        if done {
            break true;
        }
        ubuf.clear();
        if ubuf.capacity() < UPSTREAM_BUF {
            ubuf.reserve(UPSTREAM_BUF);
        }
        match up.read_buf(&mut ubuf).await {
            Ok(0) if matches!(framing, Framing::Close) => break true,
            Ok(0) | Err(_) => break false,
            Ok(_) => {}
        }
    };
    rev.add_egress(egress);
    drop(guard);
    if complete && head.reusable && ubuf.is_empty() && !matches!(framing, Framing::Close) {
        pool.put_raw(endpoint.address, up);
    }
    if complete && !close {
        Next::KeepAlive
    } else {
        Next::Close
    }
}

/// Resolves when the client closed its connection (or it failed). Bytes it sends meanwhile
/// (a pipelined request) are kept in `buf`.
async fn client_gone(stream: &TcpStream, buf: &mut BytesMut) {
    loop {
        if buf.len() >= MAX_HEAD + MAX_BODY {
            // Enough buffered: stop reading (and so watching) until this request is done.
            std::future::pending::<()>().await;
        }
        if stream.readable().await.is_err() {
            return;
        }
        reserve(buf, CLIENT_BUF / 4);
        match stream.try_read_buf(buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// Sends the request on a pooled connection to `addr` (or a new one) and reads the response
/// head into `ubuf`. A reused connection the instance closed meanwhile is replaced: when the
/// write failed, or when no byte came back for a request that may be repeated.
async fn send(
    pool: &Pool,
    addr: SocketAddr,
    req: &Req,
    body: &[u8],
    ubuf: &mut BytesMut,
) -> Result<(TcpStream, Head), SendError> {
    loop {
        let (mut up, reused) = match pool.take_raw(addr) {
            Some(s) => (s, true),
            None => (pool.connect_raw(addr).await?, false),
        };
        if let Err(source) = write_two(&mut up, &req.upstream, body).await {
            if reused {
                continue;
            }
            return Err(SendError::Io { addr, source });
        }
        ubuf.clear();
        match read_head(&mut up, ubuf, req, addr).await {
            Ok(head) => return Ok((up, head)),
            Err(SendError::Unanswered { .. }) if reused && req.idempotent => {}
            Err(e) => return Err(e),
        }
    }
}

/// Reads until a final response head is in `ubuf` (informational ones are skipped). A
/// connection that ends (or is reset) before any byte came back is [`SendError::Unanswered`].
async fn read_head(
    up: &mut TcpStream,
    ubuf: &mut BytesMut,
    req: &Req,
    addr: SocketAddr,
) -> Result<Head, SendError> {
    let mut received = false;
    loop {
        match parse_response(ubuf, req) {
            Ok(Some(Response::Informational(n))) => {
                ubuf.advance(n);
                continue;
            }
            Ok(Some(Response::Final(head))) => return Ok(head),
            Ok(None) => {}
            Err(message) => return Err(SendError::Protocol { addr, message }),
        }
        if ubuf.len() >= MAX_HEAD {
            return Err(SendError::Protocol {
                addr,
                message: format!("response head longer than {MAX_HEAD} bytes"),
            });
        }
        if ubuf.capacity() - ubuf.len() < UPSTREAM_BUF / 4 {
            ubuf.reserve(UPSTREAM_BUF);
        }
        match up.read_buf(ubuf).await {
            Ok(0) if !received => return Err(SendError::Unanswered { addr }),
            Err(e) if !received && e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(SendError::Unanswered { addr });
            }
            Ok(0) => {
                return Err(SendError::Io {
                    addr,
                    source: io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the instance closed the connection inside the response head",
                    ),
                });
            }
            Ok(_) => received = true,
            Err(source) => return Err(SendError::Io { addr, source }),
        }
    }
}

/// Writes `a` then `b` (a head and a body) with as few writes as the socket takes.
async fn write_two(s: &mut TcpStream, a: &[u8], b: &[u8]) -> io::Result<()> {
    if b.is_empty() {
        return s.write_all(a).await;
    }
    let mut chain = Buf::chain(a, b);
    s.write_all_buf(&mut chain).await
}

/// A gateway answer (an error) for a request that got no response from an instance.
struct Answer(ProxyError);

impl Answer {
    async fn send(self, client: &mut Conn<'_>, req: &Req) -> Next {
        let e = self.0;
        debug!(request_id = %req.request_id, status = e.status.as_u16(), code = e.code, source = e.origin.as_str(), message = %e.message, "answered by gateway");
        let body = e.body(&req.request_id);
        let mut out = Vec::with_capacity(256 + body.len());
        status_line(
            &mut out,
            e.status.as_u16(),
            e.status.canonical_reason().unwrap_or("").as_bytes(),
        );
        out.extend_from_slice(b"content-type: application/json\r\nx-ferry-error-source: ");
        out.extend_from_slice(e.origin.as_str().as_bytes());
        out.extend_from_slice(b"\r\nx-request-id: ");
        out.extend_from_slice(req.request_id.as_bytes());
        if let Some(s) = e.retry_after {
            out.extend_from_slice(format!("\r\nretry-after: {s}").as_bytes());
        }
        out.extend_from_slice(format!("\r\ncontent-length: {}\r\n", body.len()).as_bytes());
        push_date(&mut out);
        if req.close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !req.is_head {
            out.extend_from_slice(body.as_bytes());
        }
        match client.write(&out, &[]).await {
            Ok(()) if !req.close => Next::KeepAlive,
            _ => Next::Close,
        }
    }
}

fn status_line(out: &mut Vec<u8>, code: u16, reason: &[u8]) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&[
        b'0' + (code / 100 % 10) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\n");
}

/// A `Date` line; the text is made once a second per thread.
fn push_date(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != secs || text.is_empty() {
            *at = secs;
            *text = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

/// A request this path serves, parsed and rewritten for the instance.
struct Req {
    /// Bytes of the head in the client's buffer; the body follows.
    head_len: usize,
    body_len: usize,
    host: String,
    request_id: String,
    /// The head as the instance gets it.
    upstream: Vec<u8>,
    is_head: bool,
    /// Safe to send again when a reused connection turned out closed (RFC 9110 9.2.2).
    idempotent: bool,
    /// The client asked to close the connection after this request.
    close: bool,
}

enum Parse {
    Partial,
    /// Not a request this path serves: hyper's.
    Handoff,
    Request(Req),
}

/// A header value as text, when it is visible ASCII (what `HeaderValue::to_str` accepts).
fn text(v: &[u8]) -> Option<&str> {
    if v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)) {
        std::str::from_utf8(v).ok()
    } else {
        None
    }
}

/// A `Content-Length` value.
fn length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

fn is(name: &str, other: &str) -> bool {
    name.eq_ignore_ascii_case(other)
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Headers the gateway sets on the way to the instance (the client's values are replaced or
/// appended to).
const SET_UPSTREAM: &[&str] = &[
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
    "x-request-id",
];

fn parse_request(buf: &[u8], client: &Client) -> Parse {
    if buf.is_empty() {
        return Parse::Partial;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut headers);
    let head_len = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(_) => return Parse::Handoff,
    };
    let (Some(method), Some(path), Some(1)) = (r.method, r.path, r.version) else {
        return Parse::Handoff;
    };
    if !path.starts_with('/') || method == "CONNECT" {
        return Parse::Handoff;
    }
    let mut host = None;
    let mut body_len = None;
    let mut close = false;
    let mut named: Vec<&str> = Vec::new();
    let (mut xff, mut fwd, mut traceparent, mut request_id) = (None, None, None, None);
    let mut te_trailers = false;
    for h in r.headers.iter() {
        let (n, v) = (h.name, h.value);
        if is(n, "host") {
            if host.is_none() {
                let Some(t) = text(v) else {
                    return Parse::Handoff;
                };
                host = Some(t);
            }
        } else if is(n, "content-length") {
            match length(v) {
                Some(l) if body_len.is_none_or(|b| b == l) => body_len = Some(l),
                _ => return Parse::Handoff,
            }
        } else if is(n, "transfer-encoding") || is(n, "expect") || is(n, "upgrade") {
            return Parse::Handoff;
        } else if is(n, "connection") {
            let Some(t) = text(v) else {
                return Parse::Handoff;
            };
            for token in t.split(',').map(str::trim) {
                if is(token, "close") {
                    close = true;
                } else if is(token, "upgrade") {
                    return Parse::Handoff;
                } else if !token.is_empty() && !is(token, "keep-alive") {
                    named.push(token);
                }
            }
        } else if is(n, "x-forwarded-for") {
            xff = xff.or(Some(text(v)));
        } else if is(n, "forwarded") {
            fwd = fwd.or(Some(text(v)));
        } else if is(n, "traceparent") {
            traceparent = traceparent.or(Some(text(v).is_some_and(headers::valid_traceparent)));
        } else if is(n, "x-request-id") {
            request_id = request_id.or(Some(v));
        } else if is(n, "te") {
            te_trailers |= text(v).is_some_and(|t| {
                t.split(',')
                    .any(|x| x.trim().eq_ignore_ascii_case("trailers"))
            });
        }
    }
    let Some(host) = host else {
        return Parse::Handoff;
    };
    let body_len = body_len.unwrap_or(0);
    if body_len > MAX_BODY as u64 {
        return Parse::Handoff;
    }
    let request_id = match request_id.and_then(text) {
        Some(id) if headers::usable_request_id(id.as_bytes()) => id.to_string(),
        _ => headers::new_request_id(),
    };
    let keep_trace = traceparent == Some(true);

    let mut up = Vec::with_capacity(head_len + 320);
    up.extend_from_slice(method.as_bytes());
    up.push(b' ');
    up.extend_from_slice(path.as_bytes());
    up.extend_from_slice(b" HTTP/1.1\r\n");
    push_header(&mut up, b"host", host.as_bytes());
    for h in r.headers.iter() {
        let n = h.name;
        let drop = HOP_BY_HOP.iter().any(|x| is(n, x))
            || SET_UPSTREAM.iter().any(|x| is(n, x))
            || named.iter().any(|x| is(n, x))
            || (!keep_trace && (is(n, "traceparent") || is(n, "tracestate")));
        if !drop {
            push_header(&mut up, n.as_bytes(), h.value);
        }
    }
    if te_trailers {
        up.extend_from_slice(b"te: trailers\r\n");
    }
    let xff = headers::forwarded_for(xff.flatten(), &client.addr);
    push_header(&mut up, b"x-forwarded-for", xff.as_bytes());
    up.extend_from_slice(b"x-forwarded-proto: http\r\n");
    push_header(&mut up, b"x-forwarded-host", host.as_bytes());
    let fwd = headers::forwarded(fwd.flatten(), &client.node, host);
    push_header(&mut up, b"forwarded", fwd.as_bytes());
    if !keep_trace {
        push_header(
            &mut up,
            b"traceparent",
            headers::new_traceparent().as_bytes(),
        );
    }
    push_header(&mut up, b"x-request-id", request_id.as_bytes());
    up.extend_from_slice(b"\r\n");

    Parse::Request(Req {
        head_len,
        body_len: body_len as usize,
        host: host.to_string(),
        request_id,
        upstream: up,
        is_head: method == "HEAD",
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE"
        ),
        close,
    })
}

/// A final response head, rewritten for the client but for its framing lines.
struct Head {
    /// Bytes of the head in the response buffer.
    len: usize,
    status: u16,
    /// The status line and headers for the client, without `Transfer-Encoding`,
    /// `Connection` and the blank line.
    out: Vec<u8>,
    framing: Framing,
    /// The instance keeps the connection open after this response.
    reusable: bool,
}

enum Response {
    /// A 1xx other than 101, this many bytes: dropped, the final response follows.
    Informational(usize),
    Final(Head),
}

fn parse_response(buf: &[u8], req: &Req) -> Result<Option<Response>, String> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut headers);
    let len = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("unreadable response head: {e}")),
    };
    let (Some(code), Some(version)) = (r.code, r.version) else {
        return Err("unreadable response head".into());
    };
    if (100..200).contains(&code) && code != 101 {
        return Ok(Some(Response::Informational(len)));
    }
    let mut named: Vec<&str> = Vec::new();
    let mut close = version == 0;
    let mut content_length = None;
    let mut chunked = None;
    let (mut has_date, mut has_request_id) = (false, false);
    for h in r.headers.iter() {
        let (n, v) = (h.name, h.value);
        if is(n, "connection") {
            for token in text(v).unwrap_or_default().split(',').map(str::trim) {
                if is(token, "close") {
                    close = true;
                } else if !token.is_empty() && !is(token, "keep-alive") {
                    named.push(token);
                }
            }
        } else if is(n, "content-length") {
            match length(v) {
                Some(l) if content_length.is_none_or(|c| c == l) => content_length = Some(l),
                _ => return Err("invalid or conflicting Content-Length".into()),
            }
        } else if is(n, "transfer-encoding") {
            let last = text(v).and_then(|t| t.rsplit(',').next()).map(str::trim);
            chunked = Some(last.is_some_and(|t| is(t, "chunked")));
        } else if is(n, "date") {
            has_date = true;
        } else if is(n, "x-request-id") {
            has_request_id = true;
        }
    }
    let no_body = req.is_head || code == 101 || code == 204 || code == 304;
    let framing = match (no_body, chunked, content_length) {
        (true, _, _) => Framing::Empty,
        (false, Some(true), _) => Framing::Chunked(Chunked::default()),
        (false, Some(false), _) => {
            return Err("a transfer coding other than chunked last".into());
        }
        (false, None, Some(0)) => Framing::Empty,
        (false, None, Some(n)) => Framing::Length(n),
        (false, None, None) => Framing::Close,
    };
    let mut out = Vec::with_capacity(len + 128);
    let reason = r.reason.filter(|s| !s.is_empty());
    let canonical = StatusCode::from_u16(code)
        .ok()
        .and_then(|s| s.canonical_reason());
    status_line(
        &mut out,
        code,
        reason.or(canonical).unwrap_or("").as_bytes(),
    );
    for h in r.headers.iter() {
        let n = h.name;
        let drop = HOP_BY_HOP.iter().any(|x| is(n, x))
            || named.iter().any(|x| is(n, x))
            || (chunked.is_some() && is(n, "content-length"));
        if !drop {
            push_header(&mut out, n.as_bytes(), h.value);
        }
    }
    if !has_request_id {
        push_header(&mut out, b"x-request-id", req.request_id.as_bytes());
    }
    if !has_date {
        push_date(&mut out);
    }
    Ok(Some(Response::Final(Head {
        len,
        status: code,
        out,
        framing,
        reusable: !close,
    })))
}

/// Where a response body ends.
enum Framing {
    Empty,
    /// Bytes still to come.
    Length(u64),
    Chunked(Chunked),
    /// Until the instance closes the connection.
    Close,
}

impl Framing {
    /// Takes what of `b` belongs to the body: (bytes, of them body data, body complete).
    fn advance(&mut self, b: &[u8]) -> Result<(usize, u64, bool), &'static str> {
        Ok(match self {
            Framing::Empty => (0, 0, true),
            Framing::Length(left) => {
                let n = (*left).min(b.len() as u64);
                *left -= n;
                (n as usize, n, *left == 0)
            }
            Framing::Chunked(c) => {
                let (n, data) = c.advance(b)?;
                (n, data, c.is_done())
            }
            Framing::Close => (b.len(), b.len() as u64, false),
        })
    }
}

/// Follows a chunked body (RFC 9112 7.1) through bytes that are forwarded as they are, to
/// find its end and count its data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Chunked {
    /// Hex digits of a chunk size: the value so far and how many.
    #[default]
    Start,
    Size(u64, u8),
    /// Extensions (or whitespace) after the size, up to CR.
    Ext(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final blank line).
    Trailer,
    TrailerLine,
    EndLf,
    Done,
}

impl Chunked {
    fn is_done(&self) -> bool {
        *self == Chunked::Done
    }

    /// Consumes from `b` up to the end of the body: (bytes taken, data bytes among them).
    fn advance(&mut self, b: &[u8]) -> Result<(usize, u64), &'static str> {
        let mut i = 0;
        let mut data = 0u64;
        while i < b.len() {
            let c = b[i];
            *self = match *self {
                Chunked::Start => match hex(c) {
                    Some(d) => Chunked::Size(d, 1),
                    None => return Err("chunk size is not hexadecimal"),
                },
                Chunked::Size(n, digits) => match (hex(c), c) {
                    (Some(d), _) if digits < 15 => Chunked::Size(n * 16 + d, digits + 1),
                    (Some(_), _) => return Err("chunk size too large"),
                    (None, b'\r') => Chunked::SizeLf(n),
                    (None, b';' | b' ' | b'\t') => Chunked::Ext(n),
                    _ => return Err("bad chunk size line"),
                },
                Chunked::Ext(n) => match c {
                    b'\r' => Chunked::SizeLf(n),
                    b'\n' => return Err("bare LF in chunk extension"),
                    _ => Chunked::Ext(n),
                },
                Chunked::SizeLf(n) => match (c, n) {
                    (b'\n', 0) => Chunked::Trailer,
                    (b'\n', n) => Chunked::Data(n),
                    _ => return Err("chunk size line not ended by CRLF"),
                },
                Chunked::Data(left) => {
                    let n = left.min((b.len() - i) as u64);
                    data += n;
                    i += n as usize;
                    *self = if n == left {
                        Chunked::DataCr
                    } else {
                        Chunked::Data(left - n)
                    };
                    continue;
                }
                Chunked::DataCr if c == b'\r' => Chunked::DataLf,
                Chunked::DataLf if c == b'\n' => Chunked::Start,
                Chunked::DataCr | Chunked::DataLf => return Err("chunk data not ended by CRLF"),
                Chunked::Trailer => match c {
                    b'\r' => Chunked::EndLf,
                    b'\n' => return Err("bare LF in trailers"),
                    _ => Chunked::TrailerLine,
                },
                Chunked::TrailerLine => match c {
                    b'\n' => Chunked::Trailer,
                    _ => Chunked::TrailerLine,
                },
                Chunked::EndLf if c == b'\n' => Chunked::Done,
                Chunked::EndLf => return Err("chunked body not ended by CRLF"),
                Chunked::Done => return Ok((i, data)),
            };
            i += 1;
            if *self == Chunked::Done {
                return Ok((i, data));
            }
        }
        Ok((i, data))
    }
}

fn hex(c: u8) -> Option<u64> {
    (c as char).to_digit(16).map(u64::from)
}

/// A client connection handed to hyper: the bytes this path read but did not serve come
/// first.
pub(crate) struct Prefixed {
    read: BytesMut,
    io: TcpStream,
}

impl Prefixed {
    fn new(read: BytesMut, io: TcpStream) -> Self {
        Prefixed { read, io }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read[..n]);
            this.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::IpAddr;

    fn client() -> Client {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        Client {
            addr: ip.to_string(),
            node: headers::forwarded_node(ip),
        }
    }

    fn request(raw: &str) -> Req {
        match parse_request(raw.as_bytes(), &client()) {
            Parse::Request(r) => r,
            Parse::Partial => panic!("partial: {raw:?}"),
            Parse::Handoff => panic!("handed off: {raw:?}"),
        }
    }

    fn upstream_headers(r: &Req) -> Vec<(String, String)> {
        let text = String::from_utf8(r.upstream.clone()).unwrap();
        let mut lines = text.split("\r\n");
        lines.next();
        lines
            .take_while(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(": ").unwrap();
                (n.to_string(), v.to_string())
            })
            .collect()
    }

    fn get<'a>(h: &'a [(String, String)], name: &str) -> Vec<&'a str> {
        h.iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    #[test]
    fn rewrites_the_request_head_for_the_instance() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let r = request(&format!(
            "POST /a?b=1 HTTP/1.1\r\nHost: svc.localhost\r\nConnection: keep-alive, x-secret\r\n\
             X-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers, deflate\r\n\
             X-Forwarded-For: 10.0.0.1\r\nX-Request-Id: abc-1\r\ntraceparent: {good}\r\n\
             tracestate: k=v\r\nContent-Length: 3\r\nX-Keep: yes\r\n\r\nabc"
        ));
        assert_eq!(r.body_len, 3);
        assert_eq!(r.host, "svc.localhost");
        assert_eq!(r.request_id, "abc-1");
        assert!(!r.close && !r.idempotent && !r.is_head);
        assert!(r.upstream.starts_with(b"POST /a?b=1 HTTP/1.1\r\n"));
        assert!(r.upstream.ends_with(b"\r\n\r\n"));
        let h = upstream_headers(&r);
        for gone in ["connection", "x-secret", "keep-alive"] {
            assert!(get(&h, gone).is_empty(), "{gone} forwarded: {h:?}");
        }
        assert_eq!(get(&h, "host"), ["svc.localhost"]);
        assert_eq!(get(&h, "te"), ["trailers"]);
        assert_eq!(get(&h, "x-forwarded-for"), ["10.0.0.1, 127.0.0.1"]);
        assert_eq!(get(&h, "x-forwarded-proto"), ["http"]);
        assert_eq!(get(&h, "x-forwarded-host"), ["svc.localhost"]);
        assert_eq!(
            get(&h, "forwarded"),
            ["for=127.0.0.1;host=svc.localhost;proto=http"]
        );
        assert_eq!(get(&h, "x-request-id"), ["abc-1"]);
        assert_eq!(get(&h, "traceparent"), [good]);
        assert_eq!(get(&h, "tracestate"), ["k=v"]);
        assert_eq!(get(&h, "content-length"), ["3"]);
        assert_eq!(get(&h, "x-keep"), ["yes"]);
    }

    #[test]
    fn makes_a_trace_and_a_request_id_when_missing_or_bad() {
        let r = request(
            "GET / HTTP/1.1\r\nHost: a.localhost\r\nConnection: close\r\n\
             traceparent: 00-0000-00f067aa0ba902b7-01\r\ntracestate: k=v\r\nX-Request-Id: a b\r\n\r\n",
        );
        assert!(r.close && r.idempotent);
        let h = upstream_headers(&r);
        let tp = get(&h, "traceparent");
        assert_eq!(tp.len(), 1);
        assert!(headers::valid_traceparent(tp[0]), "{tp:?}");
        assert!(get(&h, "tracestate").is_empty());
        assert_eq!(get(&h, "x-request-id"), [r.request_id.as_str()]);
        assert_eq!(r.request_id.len(), 32);
    }

    #[test]
    fn hands_off_what_it_does_not_serve() {
        for raw in [
            "GET / HTTP/1.0\r\nHost: a\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 65537\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nbad header\r\n\r\n",
        ] {
            assert!(
                matches!(parse_request(raw.as_bytes(), &client()), Parse::Handoff),
                "{raw:?}"
            );
        }
        assert!(matches!(
            parse_request(b"GET / HTTP/1.1\r\nHost: a\r\n", &client()),
            Parse::Partial
        ));
    }

    fn final_head(raw: &str, req: &Req) -> Head {
        match parse_response(raw.as_bytes(), req) {
            Ok(Some(Response::Final(h))) => h,
            Ok(Some(Response::Informational(_))) => panic!("informational"),
            Ok(None) => panic!("partial"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn rewrites_the_response_head_for_the_client() {
        let req = request("GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: r1\r\n\r\n");
        let h = final_head(
            "HTTP/1.1 200 OK\r\nConnection: x-hop\r\nX-Hop: 1\r\nTransfer-Encoding: chunked\r\n\
             Content-Length: 9\r\nX-App: 1\r\n\r\n5\r\nhello\r\n",
            &req,
        );
        assert!(matches!(h.framing, Framing::Chunked(_)));
        assert!(h.reusable);
        let out = String::from_utf8(h.out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("X-App: 1\r\n"), "{out}");
        assert!(out.contains("x-request-id: r1\r\n"), "{out}");
        assert!(out.contains("date: "), "{out}");
        for gone in ["X-Hop", "Connection", "Transfer-Encoding", "Content-Length"] {
            assert!(!out.contains(gone), "{gone} in {out}");
        }
        let h = final_head(
            "HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno",
            &req,
        );
        assert!(matches!(h.framing, Framing::Length(2)) && !h.reusable);
        let h = final_head("HTTP/1.0 200 OK\r\n\r\nuntil close", &req);
        assert!(matches!(h.framing, Framing::Close) && !h.reusable);
        let head = request("HEAD / HTTP/1.1\r\nHost: a\r\n\r\n");
        let h = final_head("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", &head);
        assert!(matches!(h.framing, Framing::Empty));
        let hints = "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n";
        assert!(matches!(
            parse_response(format!("{hints}HTTP/1.1 200 OK\r\n").as_bytes(), &req),
            Ok(Some(Response::Informational(n))) if n == hints.len()
        ));
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        ] {
            assert!(parse_response(bad.as_bytes(), &req).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn chunked_errors_are_caught() {
        for bad in [
            "x\r\n",
            "5\n",
            "5\r\nhelloXX",
            "0\r\n\r\r",
            "12345678901234567\r\n",
        ] {
            let mut c = Chunked::default();
            assert!(c.advance(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    /// A chunked body made of `sizes`, with extensions and trailers when asked.
    fn encode(sizes: &[usize], ext: bool, trailers: bool) -> (Vec<u8>, u64) {
        let mut out = Vec::new();
        let mut data = 0;
        for (k, &n) in sizes.iter().enumerate() {
            out.extend_from_slice(format!("{n:X}").as_bytes());
            if ext {
                out.extend_from_slice(b";name=\"v\"");
            }
            out.extend_from_slice(b"\r\n");
            out.extend(std::iter::repeat_n(b'a' + (k % 26) as u8, n));
            out.extend_from_slice(b"\r\n");
            data += n as u64;
        }
        out.extend_from_slice(b"0\r\n");
        if trailers {
            out.extend_from_slice(b"X-Sum: 1\r\nX-More: 2\r\n");
        }
        out.extend_from_slice(b"\r\n");
        (out, data)
    }

    proptest! {
        /// Whatever arrives from a client or an instance, parsing answers (no panic), and a
        /// request it takes has a head that ends where the parser said.
        #[test]
        fn arbitrary_bytes_never_panic(
            prefix in prop::sample::select(vec![
                "", "GET / HTTP/1.1\r\nHost: a\r\n", "HTTP/1.1 200 OK\r\n",
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: ",
            ]),
            tail in prop::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut b = prefix.as_bytes().to_vec();
            b.extend_from_slice(&tail);
            if let Parse::Request(r) = parse_request(&b, &client()) {
                prop_assert!(r.head_len <= b.len());
                prop_assert!(r.body_len <= MAX_BODY);
                prop_assert!(r.upstream.ends_with(b"\r\n\r\n"));
            }
            let req = request("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
            let _ = parse_response(&b, &req);
            let _ = Chunked::default().advance(&b);
        }

        /// However the bytes arrive, the end is found exactly and the data counted, and bytes
        /// after the end (a next response) are left alone.
        #[test]
        fn chunked_end_is_found_in_any_split(
            sizes in prop::collection::vec(1usize..3000, 0..8),
            ext: bool,
            trailers: bool,
            cuts in prop::collection::vec(1usize..500, 1..40),
        ) {
            let (mut body, data) = encode(&sizes, ext, trailers);
            let end = body.len();
            body.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
            let mut c = Chunked::default();
            let (mut at, mut seen) = (0, 0);
            let mut cuts = cuts.into_iter().cycle();
            while !c.is_done() {
                let to = (at + cuts.next().unwrap()).min(body.len());
                let (n, d) = c.advance(&body[at..to]).unwrap();
                prop_assert!(c.is_done() || n == to - at);
                at += n;
                seen += d;
                prop_assert!(at <= end);
            }
            prop_assert_eq!(at, end);
            prop_assert_eq!(seen, data);
        }
    }
}
