//! Keep-alive HTTP/1.1 connections to instances, reused across requests.
//!
//! A connection is leased for one request and comes back when its response body has been
//! read to the end (or dropped), with no task spawned per request; the next lease waits until
//! hyper says it is idle. Connections the instance closed, and connections idle longer than
//! [`IDLE_TIMEOUT`], are dropped when met. A request that never left on a reused connection
//! (the instance closed it meanwhile) is sent again on a fresh one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::body::GatewayBody;

/// Idle connections older than this are closed rather than reused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per instance address.
const MAX_IDLE_PER_ADDR: usize = 256;

type Sender = SendRequest<GatewayBody>;
/// Idle connections per instance address, each with the time it became idle.
type Idle = HashMap<SocketAddr, Vec<(Instant, Sender)>>;

#[derive(Clone)]
pub struct Pool {
    idle: Arc<Mutex<Idle>>,
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
    #[error("HTTP/1.1 to {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

impl SendError {
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect { .. })
    }
}

/// A connection taken for one request; returns to the pool when dropped.
pub struct Lease {
    pool: Pool,
    addr: SocketAddr,
    sender: Option<Sender>,
}

impl Lease {
    /// The connection will not serve another request (it was upgraded).
    pub fn discard(mut self) {
        self.sender = None;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(s) = self.sender.take() {
            self.pool.put(self.addr, s);
        }
    }
}

impl Pool {
    pub fn new(connect_timeout: Duration) -> Pool {
        Pool {
            idle: Arc::default(),
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
            let (mut sender, reused) = match self.take(addr) {
                Some(s) => (s, true),
                None => (self.connect(addr).await?, false),
            };
            if let Err(source) = sender.ready().await {
                if reused {
                    continue;
                }
                return Err(SendError::Http { addr, source });
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let lease = Lease {
                        pool: self.clone(),
                        addr,
                        sender: Some(sender),
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

    fn take(&self, addr: SocketAddr) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap();
        let list = idle.get_mut(&addr)?;
        let now = Instant::now();
        let mut found = None;
        while let Some((since, s)) = list.pop() {
            if !s.is_closed() && now.duration_since(since) < IDLE_TIMEOUT {
                found = Some(s);
                break;
            }
        }
        if list.is_empty() {
            idle.remove(&addr);
        }
        found
    }

    fn put(&self, addr: SocketAddr, s: Sender) {
        if s.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap();
        let list = idle.entry(addr).or_default();
        list.retain(|(_, s)| !s.is_closed());
        if list.len() < MAX_IDLE_PER_ADDR {
            list.push((Instant::now(), s));
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Sender, SendError> {
        let connect = tokio::net::TcpStream::connect(addr);
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
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| SendError::Http { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "instance connection ended with error");
            }
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::empty;
    use http_body_util::BodyExt;
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
                    let mut r = Response::new(crate::body::full("ok".into()));
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

    async fn get(pool: &Pool, addr: SocketAddr, path: &str) -> String {
        let req = Request::get(path).body(empty()).unwrap();
        let (resp, lease) = pool.send(addr, req).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        drop(lease);
        String::from_utf8(body.to_vec()).unwrap()
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
