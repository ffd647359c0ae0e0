//! Keep-alive HTTP/1.1 connections to instances, reused across requests.
//!
//! A connection is leased for one request and comes back when its response body has been
//! read to the end (or dropped). No task runs per connection: the connection (hyper's
//! `Connection` future, which reads and writes the socket) is polled by whoever waits on it —
//! [`Pool::send`] until the response head, then the response body ([`Lease::poll_conn`]),
//! both in the task of the client's connection. So a proxied request wakes one task, as in an
//! event-loop proxy, instead of handing each request and response across tasks (and, on a
//! multi-threaded runtime, threads). Connections the instance closed are dropped when met,
//! idle ones older than [`IDLE_TIMEOUT`] by [`Pool::sweep`]. A request that never left on a
//! reused connection (the instance closed it meanwhile) is sent again on a fresh one. An
//! upgraded connection (101) gets a task of its own to hand its socket to the tunnel.

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::GatewayBody;

/// Idle connections older than this are closed rather than reused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per instance address.
const MAX_IDLE_PER_ADDR: usize = 256;

type Sender = SendRequest<GatewayBody>;
/// hyper's connection future (with upgrades), whose type hyper does not name.
type Conn = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// One connection: the handle requests are sent on, and the future that does its I/O
/// (`None` once it ended: the connection is closed).
struct Pooled {
    sender: Sender,
    conn: Option<Conn>,
}

/// Polls a connection's I/O; false once it has ended (and then it is `None`).
fn drive(conn: &mut Option<Conn>, addr: SocketAddr, cx: &mut Context<'_>) -> bool {
    let Some(c) = conn.as_mut() else {
        return false;
    };
    match c.as_mut().poll(cx) {
        Poll::Pending => true,
        Poll::Ready(r) => {
            if let Err(e) = r {
                tracing::debug!(%addr, error = %e, "instance connection ended with error");
            }
            *conn = None;
            false
        }
    }
}

impl Pooled {
    fn drive(&mut self, addr: SocketAddr, cx: &mut Context<'_>) -> bool {
        drive(&mut self.conn, addr, cx)
    }

    fn is_open(&self) -> bool {
        self.conn.is_some() && !self.sender.is_closed()
    }
}

/// Idle connections per instance address, each with the time it became idle.
struct Idle<C> {
    map: Mutex<HashMap<SocketAddr, Vec<(Instant, C)>>>,
}

impl<C> Default for Idle<C> {
    fn default() -> Self {
        Idle {
            map: Mutex::default(),
        }
    }
}

impl<C> Idle<C> {
    /// The most recently idled connection to `addr` that is still `usable` and not too old;
    /// the others met on the way are dropped (closed).
    fn take(&self, addr: SocketAddr, usable: impl Fn(&C) -> bool) -> Option<C> {
        let mut idle = self.map.lock().unwrap();
        let list = idle.get_mut(&addr)?;
        let now = Instant::now();
        let mut found = None;
        while let Some((since, c)) = list.pop() {
            if now.duration_since(since) < IDLE_TIMEOUT && usable(&c) {
                found = Some(c);
                break;
            }
        }
        if list.is_empty() {
            idle.remove(&addr);
        }
        found
    }

    /// Keeps `c` for reuse. Connections that died while idle are found when taken (or by
    /// [`Idle::sweep`]); only a full list is searched for them here, to make room.
    fn put(&self, addr: SocketAddr, c: C, usable: impl Fn(&C) -> bool) {
        let mut idle = self.map.lock().unwrap();
        let list = idle.entry(addr).or_default();
        if list.len() >= MAX_IDLE_PER_ADDR {
            list.retain(|(_, c)| usable(c));
        }
        if list.len() < MAX_IDLE_PER_ADDR {
            list.push((Instant::now(), c));
        }
    }

    fn sweep(&self, now: Instant) {
        let mut idle = self.map.lock().unwrap();
        idle.retain(|_, list| {
            list.retain(|(since, _)| now.duration_since(*since) < IDLE_TIMEOUT);
            !list.is_empty()
        });
    }
}

/// One gateway thread's connections to instances: hyper's (for requests hyper serves) and
/// plain sockets (for the gateway's own HTTP/1.1 path, [`crate::h1`]).
#[derive(Clone)]
pub struct Pool {
    idle: Arc<Idle<Pooled>>,
    raw: Arc<Idle<TcpStream>>,
    connect_timeout: Duration,
}

/// Why a request did not get a response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made: nothing reached the instance.
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// A new connection ended before it could take the request.
    #[error("HTTP/1.1 to {addr}: the connection closed before the request was sent")]
    Closed { addr: SocketAddr },
    #[error("HTTP/1.1 to {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: hyper::Error,
    },
    /// Reading or writing a plain connection failed.
    #[error("HTTP/1.1 to {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The connection ended (or was reset) before any byte of an answer came back: on a
    /// reused connection, most likely one the instance had closed while it was idle.
    #[error("HTTP/1.1 to {addr}: the instance closed or reset the connection without answering")]
    Unanswered { addr: SocketAddr },
    /// The instance's answer is not HTTP/1.1 the gateway can forward.
    #[error("HTTP/1.1 to {addr}: {message}")]
    Protocol { addr: SocketAddr, message: String },
}

impl SendError {
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect { .. })
    }
}

/// A connection taken for one request; returns to the pool when dropped. Its I/O makes
/// progress only while [`Lease::poll_conn`] is called (by the response body).
pub struct Lease {
    pool: Pool,
    addr: SocketAddr,
    conn: Option<Pooled>,
}

impl Lease {
    /// Drives the connection: reads the rest of the response (and writes the rest of the
    /// request body) off the socket, waking `cx` when there is more.
    pub fn poll_conn(&mut self, cx: &mut Context<'_>) {
        if let Some(p) = self.conn.as_mut()
            && !p.drive(self.addr, cx)
        {
            self.conn = None;
        }
    }

    /// The connection will not serve another request (it was upgraded): its future runs on
    /// a task of its own, which hands the socket to the upgrade.
    pub fn discard(mut self) {
        if let Some(Pooled {
            conn: Some(conn), ..
        }) = self.conn.take()
        {
            let addr = self.addr;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%addr, error = %e, "upgraded instance connection ended with error");
                }
            });
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(p) = self.conn.take() {
            self.pool.put(self.addr, p);
        }
    }
}

impl Pool {
    pub fn new(connect_timeout: Duration) -> Pool {
        Pool {
            idle: Arc::default(),
            raw: Arc::default(),
            connect_timeout,
        }
    }

    /// Sends `req` (whose URI is origin-form) to `addr` on an idle connection, or a new one.
    pub async fn send(
        &self,
        addr: SocketAddr,
        mut req: Request<GatewayBody>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        loop {
            let (mut p, reused) = match self.take(addr) {
                Some(p) => (p, true),
                None => (self.connect(addr).await?, false),
            };
            // Ready for a request (the previous response fully read), driving the I/O.
            let ready = poll_fn(|cx| {
                if !p.drive(addr, cx) {
                    return Poll::Ready(None);
                }
                p.sender.poll_ready(cx).map(Some)
            })
            .await;
            match ready {
                Some(Ok(())) => {}
                // Closed while idle: a reused connection is replaced.
                None | Some(Err(_)) if reused => continue,
                None => return Err(SendError::Closed { addr }),
                Some(Err(source)) => return Err(SendError::Http { addr, source }),
            }
            let Pooled { sender, conn } = &mut p;
            let mut response = std::pin::pin!(sender.try_send_request(req));
            let sent = poll_fn(|cx| {
                if let Poll::Ready(r) = response.as_mut().poll(cx) {
                    return Poll::Ready(r);
                }
                // The connection's end fails the response future: poll that once more.
                if conn.is_some() && !drive(conn, addr, cx) {
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            })
            .await;
            match sent {
                Ok(resp) => {
                    let lease = Lease {
                        pool: self.clone(),
                        addr,
                        conn: Some(p),
                    };
                    return Ok((resp, lease));
                }
                Err(mut e) => match e.take_message() {
                    // Not sent: the reused connection was closed under us. Once more, fresh.
                    Some(r) if reused => req = r,
                    _ => {
                        return Err(SendError::Http {
                            addr,
                            source: e.into_error(),
                        });
                    }
                },
            }
        }
    }

    fn take(&self, addr: SocketAddr) -> Option<Pooled> {
        self.idle.take(addr, Pooled::is_open)
    }

    fn put(&self, addr: SocketAddr, p: Pooled) {
        if p.is_open() {
            self.idle.put(addr, p, Pooled::is_open);
        }
    }

    /// An idle plain connection to `addr` the instance has not closed, if there is one.
    pub fn take_raw(&self, addr: SocketAddr) -> Option<TcpStream> {
        self.raw.take(addr, idle_socket_open)
    }

    /// A plain connection whose last response was read to its end, for the next request.
    pub fn put_raw(&self, addr: SocketAddr, s: TcpStream) {
        self.raw.put(addr, s, idle_socket_open);
    }

    /// Closes idle connections older than [`IDLE_TIMEOUT`]. Nothing polls an idle
    /// connection, so one the instance closed (or whose instance is gone) stays open on our
    /// side until this or its next lease; the gateway calls it every stats interval.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.idle.sweep(now);
        self.raw.sweep(now);
    }

    /// A new TCP connection to `addr` (no delay), within the connect timeout.
    pub async fn connect_raw(&self, addr: SocketAddr) -> Result<TcpStream, SendError> {
        let connect = TcpStream::connect(addr);
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(SendError::Connect { addr, source }),
            Err(_) => {
                return Err(SendError::Connect {
                    addr,
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no connection within {:?}", self.connect_timeout),
                    ),
                });
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Pooled, SendError> {
        let stream = self.connect_raw(addr).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| SendError::Http { addr, source })?;
        Ok(Pooled {
            sender,
            conn: Some(Box::pin(conn.with_upgrades())),
        })
    }
}

/// Whether an idle connection is still open: an idle connection has nothing to read, so a
/// socket the event loop saw become readable was closed by the instance (or sent garbage).
/// Readiness is only a hint (it may be left over from the last response), so a ready
/// socket is asked once without blocking.
fn idle_socket_open(s: &TcpStream) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    if s.poll_read_ready(&mut cx).is_pending() {
        return true;
    }
    let mut probe = [0u8; 1];
    matches!(s.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::empty;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An HTTP/1.1 server counting its connections; `/close` answers with `Connection: close`.
    async fn server() -> (SocketAddr, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let c = conns.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                c.fetch_add(1, Ordering::SeqCst);
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let body = if req.uri().path() == "/big" {
                        // Far more than one socket read: only a driven connection delivers it.
                        bytes::Bytes::from(vec![b'x'; 4 << 20])
                    } else {
                        "ok".into()
                    };
                    let mut r = Response::new(crate::body::full(body));
                    if req.uri().path() == "/close" {
                        r.headers_mut()
                            .insert("connection", http::HeaderValue::from_static("close"));
                    }
                    Ok::<_, std::convert::Infallible>(r)
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc),
                );
            }
        });
        (addr, conns)
    }

    /// Reads a body as the gateway's ResponseBody does: the lease's connection is driven
    /// from the same task (nothing else polls it).
    async fn read_body(mut body: Incoming, mut lease: Lease) -> Vec<u8> {
        use http_body::Body;
        let mut out = Vec::new();
        loop {
            let frame = std::future::poll_fn(|cx| {
                lease.poll_conn(cx);
                Pin::new(&mut body).poll_frame(cx)
            })
            .await;
            match frame {
                Some(f) => {
                    if let Ok(d) = f.unwrap().into_data() {
                        out.extend_from_slice(&d);
                    }
                }
                None => break,
            }
        }
        drop(lease);
        out
    }

    async fn get(pool: &Pool, addr: SocketAddr, path: &str) -> String {
        let req = Request::get(path).body(empty()).unwrap();
        let (resp, lease) = pool.send(addr, req).await.unwrap();
        let body = read_body(resp.into_body(), lease).await;
        String::from_utf8(body).unwrap()
    }

    #[tokio::test]
    async fn reuses_one_connection_and_replaces_a_closed_one() {
        let (addr, conns) = server().await;
        let pool = Pool::new(Duration::from_secs(1));
        for _ in 0..3 {
            assert_eq!(get(&pool, addr, "/").await, "ok");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
        assert_eq!(get(&pool, addr, "/close").await, "ok");
        // The instance closed it: the next request goes out on a new connection.
        assert_eq!(get(&pool, addr, "/").await, "ok");
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    /// Big bodies, one after another on one connection, on a single-threaded runtime: each is
    /// read by the task that reads the body, with no connection task.
    #[tokio::test(flavor = "current_thread")]
    async fn big_bodies_stream_through_the_lease_and_reuse_the_connection() {
        let (addr, conns) = server().await;
        let pool = Pool::new(Duration::from_secs(1));
        for _ in 0..3 {
            let req = Request::get("/big").body(empty()).unwrap();
            let (resp, lease) = pool.send(addr, req).await.unwrap();
            let body = read_body(resp.into_body(), lease).await;
            assert_eq!(body.len(), 4 << 20);
        }
        assert_eq!(get(&pool, addr, "/").await, "ok");
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn refused_connection_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let pool = Pool::new(Duration::from_secs(1));
        let req = Request::get("/").body(empty()).unwrap();
        let err = pool.send(addr, req).await.err().unwrap();
        assert!(err.is_connect(), "{err}");
    }
}
