//! h2c (HTTP/2 without TLS) to instances whose route asks for it: one connection per instance
//! address, opened on first use and shared by every request to it (HTTP/2 multiplexes).
//!
//! Own connections rather than hyper-util's pooled client, because that client takes the
//! `:authority` it sends from the address it connects to: the instance saw `10.88.0.5:8080`
//! where an HTTP/1.1 instance sees the client's `Host` (the runtime contract). Here the
//! connection goes to the instance and the request keeps the client's authority.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::body::GatewayBody;

/// Why a request did not get an answer over h2c.
#[derive(Debug, thiserror::Error)]
pub(crate) enum H2cError {
    /// Nothing was sent: the connection could not be opened.
    #[error("h2c connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Nothing was sent: the instance did not speak HTTP/2 on the new connection.
    #[error("h2c handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    /// The request went out (perhaps in part) and no answer came.
    #[error("h2c to {addr}: {source}")]
    Request {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

impl H2cError {
    /// True when nothing reached the instance, so the request may go elsewhere.
    pub(crate) fn is_connect(&self) -> bool {
        matches!(self, H2cError::Connect { .. })
    }
}

pub(crate) struct H2cPool {
    conns: Mutex<HashMap<SocketAddr, SendRequest<GatewayBody>>>,
    connect_timeout: Duration,
}

impl H2cPool {
    pub(crate) fn new(connect_timeout: Duration) -> H2cPool {
        H2cPool {
            conns: Mutex::default(),
            connect_timeout,
        }
    }

    /// Sends `req` (absolute URI: its authority is what the instance sees) to `addr`.
    pub(crate) async fn send(
        &self,
        addr: SocketAddr,
        req: Request<GatewayBody>,
    ) -> Result<Response<Incoming>, H2cError> {
        let open = self
            .conns
            .lock()
            .unwrap()
            .get(&addr)
            .filter(|s| !s.is_closed())
            .cloned();
        let mut sender = match open {
            Some(s) => s,
            None => self.connect(addr).await?,
        };
        if let Err(source) = sender.ready().await {
            // The connection ended between uses (the instance went, or closed it): nothing was
            // sent on it, so a new one is as good.
            self.forget_closed(addr);
            if source.is_closed() {
                sender = self.connect(addr).await?;
            } else {
                return Err(H2cError::Request { addr, source });
            }
        }
        sender
            .send_request(req)
            .await
            .map_err(|source| H2cError::Request { addr, source })
    }

    async fn connect(&self, addr: SocketAddr) -> Result<SendRequest<GatewayBody>, H2cError> {
        let connect = |source| H2cError::Connect { addr, source };
        let tcp = tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| connect(std::io::ErrorKind::TimedOut.into()))?
            .map_err(connect)?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|source| H2cError::Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "h2c connection to an instance ended");
            }
        });
        let mut conns = self.conns.lock().unwrap();
        // Connections to instances that went are dropped here, when a new one is made.
        conns.retain(|_, s| !s.is_closed());
        conns.insert(addr, sender.clone());
        Ok(sender)
    }

    /// Drops the pooled connection to `addr` if it has ended (and not one another request
    /// opened since: clones of a sender share their connection's state).
    fn forget_closed(&self, addr: SocketAddr) {
        let mut conns = self.conns.lock().unwrap();
        if conns.get(&addr).is_some_and(|s| s.is_closed()) {
            conns.remove(&addr);
        }
    }
}
