//! The request path: host → service → revision (weighted) → instance (least outstanding, with
//! room) or the hold queue → upstream over HTTP/1.1 or h2c, streaming both ways.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferry_api::gateway::{Endpoint, GatewayEvent, RevisionRoute, RouteTable, ServiceRoute};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use crate::Config;
use crate::body::{GatewayBody, LimitedBody, ResponseBody, empty};
use crate::error::ProxyError;
use crate::headers;
pub(crate) use crate::pool::Pool;
use crate::pool::SendError;
use crate::routing;
use crate::state::{Admission, InflightGuard, RevState, Revisions, WaitGuard};

/// Requests without a timeout of their own still end: this is the ceiling.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// How often a held request reminds control that it is still waiting.
const DEMAND_EVERY: Duration = Duration::from_millis(500);

/// Route table indexed by service name; requests share it, nothing is copied per request.
pub type Index = HashMap<String, Arc<ServiceRoute>>;

pub fn index(table: &RouteTable) -> Arc<Index> {
    Arc::new(
        table
            .services
            .iter()
            .map(|s| (s.service.to_ascii_lowercase(), Arc::new(s.clone())))
            .collect(),
    )
}

fn revision<'a>(svc: &'a ServiceRoute, name: &str) -> Option<&'a RevisionRoute> {
    svc.revisions.iter().find(|r| r.revision == name)
}

pub struct Shared {
    pub config: Config,
    pub index: watch::Sender<Arc<Index>>,
    pub events: mpsc::Sender<GatewayEvent>,
    pub revs: Revisions,
    /// Upgraded connections (WebSocket and the like), drained on shutdown with the rest.
    pub tunnels: TaskTracker,
    /// Cancelled when the drain deadline passes: open tunnels are cut.
    pub hard_stop: CancellationToken,
    /// HTTP/1.1 (and upgrades) to instances: one pool per gateway thread, so that a pooled
    /// connection is only ever polled on the thread whose event loop watches its socket.
    pub(crate) pools: Vec<Pool>,
    /// h2c to instances whose route asks for it.
    h2c: crate::h2c::H2cPool,
}

impl Shared {
    pub fn new(
        config: Config,
        table: &RouteTable,
        events: mpsc::Sender<GatewayEvent>,
        threads: usize,
    ) -> Self {
        let pools = (0..threads.max(1))
            .map(|_| Pool::new(Duration::from_secs(5)))
            .collect();
        let h2c = crate::h2c::H2cPool::new(Duration::from_secs(5));
        let (index, _) = watch::channel(index(table));
        Shared {
            config,
            index,
            events,
            revs: Revisions::default(),
            tunnels: TaskTracker::new(),
            hard_stop: CancellationToken::new(),
            pools,
            h2c,
        }
    }

    fn demand(&self, service: &str, revision: &str, waiting: u32) {
        let ev = GatewayEvent::Demand {
            service: service.to_string(),
            revision: revision.to_string(),
            waiting,
        };
        match self.events.try_send(ev) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(ev)) => {
                let tx = self.events.clone();
                tokio::spawn(async move {
                    let _ = tx.send(ev).await;
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                debug!("gateway event receiver closed; demand dropped");
            }
        }
    }
}

/// hyper service entry point: never fails, every error becomes a JSON response.
pub async fn handle(
    shared: Arc<Shared>,
    pool: Pool,
    client: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<GatewayBody>, Infallible> {
    let request_id = headers::ensure_request_id(req.headers_mut());
    let id = request_id.to_str().unwrap_or_default();
    let span =
        info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path());
    let resp = match proxy(&shared, &pool, client, req, &request_id)
        .instrument(span.clone())
        .await
    {
        Ok(r) => r,
        Err(e) => {
            span.in_scope(|| debug!(status = e.status.as_u16(), code = e.code, source = e.origin.as_str(), message = %e.message, "answered by gateway"));
            e.into_response(id)
        }
    };
    Ok(resp)
}

/// The `Host` header (or the authority of an absolute or HTTP/2 target) as a header value:
/// a cheap clone of the received bytes, valid as `Host` and `X-Forwarded-Host` upstream.
fn request_host(req: &Request<Incoming>) -> Option<HeaderValue> {
    if let Some(h) = req.headers().get(header::HOST)
        && h.to_str().is_ok()
    {
        return Some(h.clone());
    }
    req.uri()
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
}

async fn proxy(
    shared: &Shared,
    pool: &Pool,
    client: SocketAddr,
    mut req: Request<Incoming>,
    request_id: &HeaderValue,
) -> Result<Response<GatewayBody>, ProxyError> {
    let start = Instant::now();
    let host_value = request_host(&req).unwrap_or_else(|| HeaderValue::from_static(""));
    let host = host_value.to_str().unwrap_or_default();
    let (svc, rev) = target(shared, host)?;
    let revision = rev.revision.clone();
    let route = revision_of(&svc, &revision)?;
    rev.record_request();

    if route.max_body_bytes > 0
        && let Some(len) = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        && len > route.max_body_bytes
    {
        return Err(ProxyError::body_too_large(route.max_body_bytes));
    }

    let timeout = request_timeout(route);
    let deadline = tokio::time::Instant::from_std(start) + timeout;

    let (guard, endpoint, mut svc) = hold(shared, &rev, svc, deadline, None).await?;
    let route = revision_of(&svc, &revision)?;

    // Rewrite headers for the instance.
    let upgrade = headers::is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    headers::add_forwarding(&mut parts.headers, client.ip().to_canonical(), host);
    headers::ensure_traceparent(&mut parts.headers);
    let h2c = route.h2c && !upgrade;
    let no_body = body.is_end_stream();
    let max_body_bytes = route.max_body_bytes;
    let limited = LimitedBody::new(body, max_body_bytes);
    let exceeded = limited.exceeded.clone();
    let mut body = Some(if no_body {
        empty()
    } else {
        limited.boxed_unsync()
    });

    // A refused connection sends a request without a body back to the hold queue, for another
    // instance (nothing was sent, so nothing runs twice): keep the headers for that.
    let retry_possible = no_body;
    let mut guard = guard;
    let mut endpoint = endpoint;
    let mut retried = 0;
    let resp = loop {
        let headers = if retry_possible && retried < MAX_REHOLDS {
            parts.headers.clone()
        } else {
            std::mem::take(&mut parts.headers)
        };
        let upstream = build_upstream(
            &parts,
            headers,
            &endpoint,
            h2c,
            &host_value,
            body.take().unwrap_or_else(empty),
        )?;
        let sent = if h2c {
            match tokio::time::timeout_at(deadline, shared.h2c.send(endpoint.address, upstream))
                .await
            {
                Ok(r) => Ok(r.map(|resp| (resp, None)).map_err(Upstream::H2c)),
                Err(e) => Err(e),
            }
        } else {
            match tokio::time::timeout_at(deadline, pool.send(endpoint.address, upstream)).await {
                Ok(r) => Ok(r.map(|(resp, l)| (resp, Some(l))).map_err(Upstream::H1)),
                Err(e) => Err(e),
            }
        };
        match sent {
            Ok(Ok(resp)) => break resp,
            Ok(Err(e)) => {
                if exceeded.load(Ordering::SeqCst) {
                    return Err(ProxyError::body_too_large(max_body_bytes));
                }
                if e.is_connect() && retry_possible && retried < MAX_REHOLDS {
                    retried += 1;
                    let (g, ep, s) = hold_again(
                        shared,
                        &rev,
                        svc.clone(),
                        deadline,
                        &endpoint,
                        e.error(),
                        request_id.to_str().unwrap_or_default(),
                    )
                    .await?;
                    // The failed slot is freed only now, after taking the new one.
                    (guard, endpoint, svc) = (g, ep, s);
                    continue;
                }
                warn!(instance = %endpoint.instance_id, error = %crate::error::chain(e.error()), "upstream request failed");
                return Err(ProxyError::upstream_unreachable(
                    &endpoint.instance_id,
                    e.error(),
                ));
            }
            Err(_) => {
                return Err(ProxyError::upstream_timeout(
                    &endpoint.instance_id,
                    timeout.as_millis() as u64,
                ));
            }
        }
    };
    let (resp, lease) = resp;
    rev.record_latency(start.elapsed().as_secs_f64() * 1000.0);

    let (mut rparts, rbody) = resp.into_parts();
    let switching = rparts.status == StatusCode::SWITCHING_PROTOCOLS;
    headers::strip_hop_by_hop(&mut rparts.headers, switching);
    rparts
        .headers
        .entry("x-request-id")
        .or_insert_with(|| request_id.clone());

    if switching {
        let Some(client_upgrade) = client_upgrade else {
            return Err(ProxyError::bad_upgrade(&endpoint.instance_id));
        };
        let mut upstream_resp = Response::from_parts(rparts.clone(), rbody);
        let upstream_upgrade = hyper::upgrade::on(&mut upstream_resp);
        // The connection now belongs to the tunnel.
        if let Some(l) = lease {
            l.discard();
        }
        let stop = shared.hard_stop.clone();
        shared.tunnels.spawn(async move {
            tokio::select! {
                _ = tunnel(client_upgrade, upstream_upgrade, guard, rev) => {}
                _ = stop.cancelled() => {}
            }
        });
        return Ok(Response::from_parts(rparts, empty()));
    }

    let body = ResponseBody::new(rbody, rev.clone(), guard, lease).boxed_unsync();
    Ok(Response::from_parts(rparts, body))
}

/// A failed upstream call, from either client.
enum Upstream {
    H1(SendError),
    H2c(crate::h2c::H2cError),
}

impl Upstream {
    fn is_connect(&self) -> bool {
        match self {
            Upstream::H1(e) => e.is_connect(),
            Upstream::H2c(e) => e.is_connect(),
        }
    }

    fn error(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            Upstream::H1(e) => e,
            Upstream::H2c(e) => e,
        }
    }
}

/// The service `host` names and the revision this request goes to (a weighted pick).
pub(crate) fn target(
    shared: &Shared,
    host: &str,
) -> Result<(Arc<ServiceRoute>, Arc<RevState>), ProxyError> {
    let service = routing::service_from_host(host, &shared.config.domain)
        .ok_or_else(|| ProxyError::service_not_found(host))?;
    let svc = shared
        .index
        .borrow()
        .get(service.as_ref())
        .cloned()
        .ok_or_else(|| ProxyError::service_not_found(host))?;
    let total = routing::traffic_total(&svc.traffic);
    let revision = routing::pick_revision(&svc.traffic, rand::random_range(0..total.max(1)))
        .ok_or_else(|| ProxyError::no_revision(&service, "no revision receives traffic"))?;
    let rev = shared.revs.get(&service, revision);
    Ok((svc, rev))
}

/// How many times one request goes back to the hold queue after its connection to an
/// instance was refused (the instance died or is going): each time without that instance.
pub(crate) const MAX_REHOLDS: u32 = 3;

/// After a failed connect to `failed` (nothing was sent): an instance other than `failed`,
/// now or once the route table has one (a crashed single instance's replacement), within the
/// request's deadline.
pub(crate) fn hold_again<'a>(
    shared: &'a Shared,
    rev: &'a Arc<RevState>,
    svc: Arc<ServiceRoute>,
    deadline: tokio::time::Instant,
    failed: &'a Endpoint,
    error: &(dyn std::error::Error + 'static),
    request_id: &str,
) -> impl std::future::Future<Output = Result<(InflightGuard, Endpoint, Arc<ServiceRoute>), ProxyError>>
+ 'a {
    // Logged here, so that the error need not live across the wait.
    warn!(request_id, instance = %failed.instance_id, error = %crate::error::chain(error), "connect failed; holding the request for another instance");
    hold(shared, rev, svc, deadline, Some(&failed.instance_id))
}

/// How long a request may wait for an instance and its response headers.
pub(crate) fn request_timeout(route: &RevisionRoute) -> Duration {
    match route.request_timeout_ms {
        0 => DEFAULT_TIMEOUT,
        ms => Duration::from_millis(ms),
    }
}

pub(crate) fn revision_of<'a>(
    svc: &'a ServiceRoute,
    name: &str,
) -> Result<&'a RevisionRoute, ProxyError> {
    revision(svc, name).ok_or_else(|| {
        ProxyError::no_revision(&svc.service, format!("revision {name:?} is not routable"))
    })
}

fn build_upstream(
    parts: &http::request::Parts,
    headers: http::HeaderMap,
    endpoint: &Endpoint,
    h2c: bool,
    host: &HeaderValue,
    body: GatewayBody,
) -> Result<Request<GatewayBody>, ProxyError> {
    let bad = |e: &dyn std::fmt::Display| {
        ProxyError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            crate::error::ErrorSource::Client,
            format!("request target {:?}: {e}", parts.uri),
        )
    };
    // h2c carries the client's host as `:authority` (what `Host` is to HTTP/1.1, which goes
    // out in origin form); the connection itself goes to the instance (crate::h2c).
    let mut uri = http::uri::Parts::default();
    if h2c {
        uri.scheme = Some(http::uri::Scheme::HTTP);
        let authority =
            http::uri::Authority::from_maybe_shared(bytes::Bytes::copy_from_slice(host.as_bytes()))
                .or_else(|_| {
                    http::uri::Authority::from_maybe_shared(bytes::Bytes::from(
                        endpoint.address.to_string(),
                    ))
                })
                .map_err(|e| bad(&e))?;
        uri.authority = Some(authority);
    }
    uri.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    let uri = Uri::from_parts(uri).map_err(|e| bad(&e))?;
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    if h2c {
        *req.version_mut() = Version::HTTP_2;
        req.headers_mut().remove(header::HOST);
    } else {
        *req.version_mut() = Version::HTTP_11;
        req.headers_mut().insert(header::HOST, host.clone());
    }
    Ok(req)
}

/// Waits for a slot on an instance of the revision: at once when one has room (and nobody is
/// held before it), else in the hold queue until the route table or a finished request frees
/// one, or the deadline. Returns the service route the slot was taken under.
pub(crate) async fn hold(
    shared: &Shared,
    rev: &Arc<RevState>,
    mut svc: Arc<ServiceRoute>,
    deadline: tokio::time::Instant,
    exclude: Option<&str>,
) -> Result<(InflightGuard, Endpoint, Arc<ServiceRoute>), ProxyError> {
    // Fast path: room now and nobody held before us (a request sent back here by a refused
    // connection was admitted once already and goes first).
    let first = if exclude.is_some() {
        Admission::Retry
    } else {
        Admission::Arrival
    };
    if let Some((g, ep)) = rev.acquire(revision_of(&svc, &rev.revision)?, first, exclude) {
        return Ok((g, ep, svc));
    }
    let mut index_rx = shared.index.subscribe();
    let mut waiting: Option<WaitGuard> = None;
    let mut remind = tokio::time::interval(DEMAND_EVERY);
    remind.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    remind.reset();
    loop {
        let notified = rev.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let latest = index_rx.borrow_and_update().get(&rev.service).cloned();
        match latest {
            Some(s) if revision(&s, &rev.revision).is_some() => svc = s,
            _ if waiting.is_some() => {
                return Err(ProxyError::no_revision(
                    &rev.service,
                    format!("revision {:?} was removed", rev.revision),
                ));
            }
            _ => {}
        }
        let route = revision_of(&svc, &rev.revision)?;
        let admission = waiting
            .as_ref()
            .map_or(Admission::Arrival, WaitGuard::admission);
        if let Some((g, ep)) = rev.acquire(route, admission, exclude) {
            return Ok((g, ep, svc));
        }
        if let Some(reason) = &route.start_failure {
            return Err(ProxyError::start_failure(
                &rev.service,
                &rev.revision,
                reason,
            ));
        }
        if waiting.is_none() {
            let Some((w, n)) = rev.enqueue(route.queue_limit) else {
                return Err(ProxyError::queue_full(
                    &rev.service,
                    &rev.revision,
                    route.queue_limit,
                ));
            };
            waiting = Some(w);
            debug!(service = %rev.service, revision = %rev.revision, waiting = n, "request held");
            shared.demand(&rev.service, &rev.revision, n);
            // Room may have appeared between the try above and joining the queue.
            continue;
        }
        let timeout_ms = route.request_timeout_ms;
        tokio::select! {
            _ = &mut notified => {}
            _ = index_rx.changed() => {}
            _ = remind.tick() => {
                if let Some(n) = rev.demand_due(DEMAND_EVERY - Duration::from_millis(50)) {
                    shared.demand(&rev.service, &rev.revision, n);
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Err(ProxyError::no_instance_timeout(
                    &rev.service,
                    &rev.revision,
                    timeout_ms,
                ));
            }
        }
    }
}

/// Copies bytes both ways between an upgraded client connection and an upgraded instance
/// connection; the instance slot stays taken while the tunnel is open.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    mut guard: InflightGuard,
    rev: Arc<RevState>,
) {
    let (c, u) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            debug!(error = %e, "upgrade failed");
            return;
        }
    };
    guard.mark_upgraded();
    let mut c = TokioIo::new(c);
    let mut u = TokioIo::new(u);
    match tokio::io::copy_bidirectional(&mut c, &mut u).await {
        Ok((_, to_client)) => rev.add_egress(to_client),
        Err(e) => debug!(instance = %guard.instance_id(), error = %e, "tunnel closed"),
    }
    drop(guard);
}
