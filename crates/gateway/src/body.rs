//! Body types: everything streams, nothing is buffered.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};

use crate::pool::Lease;
use crate::state::{InflightGuard, RevState};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response the gateway sends and every request it forwards.
pub type GatewayBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(b: Bytes) -> GatewayBody {
    Full::new(b).map_err(|e| match e {}).boxed_unsync()
}

pub fn empty() -> GatewayBody {
    full(Bytes::new())
}

/// The request body was cut because it grew past `max_body_bytes`.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit of {0} bytes")]
pub struct BodyTooLarge(pub u64);

/// Streams a request body, failing once more than `limit` bytes went through (0 = no limit).
/// `exceeded` tells the proxy afterwards that a failed upstream call was the client's fault.
pub struct LimitedBody<B> {
    inner: B,
    seen: u64,
    limit: u64,
    pub exceeded: Arc<AtomicBool>,
}

impl<B> LimitedBody<B> {
    pub fn new(inner: B, limit: u64) -> Self {
        LimitedBody {
            inner,
            seen: 0,
            limit,
            exceeded: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.seen += d.len() as u64;
                    if this.limit > 0 && this.seen > this.limit {
                        this.exceeded.store(true, Ordering::SeqCst);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge(this.limit)))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            other => other.map(|o| o.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Streams an instance's response to the client, counting egress bytes, and keeps the
/// instance's in-flight slot (and the pooled connection, when there is one) taken until the
/// last byte went out (or the client went away).
pub struct ResponseBody<B> {
    inner: B,
    rev: Arc<RevState>,
    guard: Option<InflightGuard>,
    lease: Option<Lease>,
}

impl<B> ResponseBody<B> {
    pub fn new(inner: B, rev: Arc<RevState>, guard: InflightGuard, lease: Option<Lease>) -> Self {
        ResponseBody {
            inner,
            rev,
            guard: Some(guard),
            lease,
        }
    }

    fn finish(&mut self) {
        self.lease.take();
        self.guard.take();
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        // The pooled connection's I/O runs here, in the client connection's task.
        if let Some(l) = this.lease.as_mut() {
            l.poll_conn(cx);
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.rev.add_egress(d.len() as u64);
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.finish(),
            Poll::Pending => {}
        }
        if this.inner.is_end_stream() {
            this.finish();
        }
        polled.map(|o| o.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
