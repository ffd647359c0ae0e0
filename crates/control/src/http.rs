//! The public `/v1` API. Errors are `{code, message, request_id}` with the right status.

mod exec;

use crate::Control;
use crate::state::now_ms;
use crate::store::{RevisionRecord, ServiceRecord};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use ferry_api::gateway::TrafficTarget;
use ferry_api::service::{
    ApiError as ErrorBody, RevisionView, ScaleRequest, ServiceSpec, ServiceView,
};
use serde::Deserialize;
use std::sync::Arc;

pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

fn err(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        code,
        message: message.into(),
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> ApiError {
        tracing::error!(error = %e, "store failure");
        err(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code.to_string(),
            message: self.message,
            request_id: uuid::Uuid::new_v4().simple().to_string(),
        };
        (self.status, Json(body)).into_response()
    }
}

type Result<T> = std::result::Result<T, ApiError>;

pub(crate) fn router(c: Arc<Control>) -> axum::Router {
    axum::Router::new()
        .route(
            "/v1/healthz",
            get(|| async { Json(serde_json::json!({ "status": "ok" })) }),
        )
        .route("/v1/services", get(list_services))
        .route(
            "/v1/services/{name}",
            get(get_service)
                .put(deploy)
                .post(deploy)
                .delete(delete_service),
        )
        .route("/v1/services/{name}/revisions", get(revisions))
        .route("/v1/services/{name}/traffic", put(set_traffic))
        .route("/v1/services/{name}/scale", put(scale))
        .route("/v1/services/{name}/autoscaler", get(autoscaler))
        .route("/v1/services/{name}/logs", get(logs))
        .route(
            "/v1/services/{name}/exec",
            axum::routing::post(exec).get(exec::exec_stream),
        )
        .route("/v1/instances", get(instances))
        .route("/v1/nodes", get(nodes))
        .route("/v1/usage", get(usage))
        .route("/v1/usage/events", get(usage_events))
        .route("/v1/invoices/{month}", get(invoice))
        .route("/v1/price", get(price))
        .fallback(|| async { err(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        // The same JSON error for a method a path does not take (axum still adds `Allow`).
        .method_not_allowed_fallback(
            |method: axum::http::Method, uri: axum::http::Uri| async move {
                err(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!("{method} is not allowed on {}", uri.path()),
                )
            },
        )
        .with_state(c)
}

fn check_name(name: &str) -> Result<()> {
    ferry_api::name::validate_service_name(name)
        .map_err(|e| err(StatusCode::BAD_REQUEST, "invalid_name", e.to_string()))
}

fn not_found(name: &str) -> ApiError {
    err(
        StatusCode::NOT_FOUND,
        "service_not_found",
        format!("service {name:?} does not exist"),
    )
}

fn url(c: &Control, name: &str) -> String {
    match c.config.gateway_addr {
        Some(a) if a.port() != 80 => format!("http://{name}.{}:{}", c.config.domain, a.port()),
        _ => format!("http://{name}.{}", c.config.domain),
    }
}

fn view(c: &Control, svc: &ServiceRecord, revs: &[RevisionRecord]) -> ServiceView {
    let live = c.live.lock().expect("live state lock");
    let instances: Vec<_> = live
        .instances
        .values()
        .filter(|i| i.service == svc.name)
        .map(|i| i.view())
        .collect();
    let revisions = revs
        .iter()
        .map(|r| {
            let of_rev = || {
                live.instances
                    .values()
                    .filter(|i| i.revision == r.name && i.live())
            };
            RevisionView {
                name: r.name.clone(),
                service: r.service.clone(),
                image: r.image.clone(),
                spec: r.spec.clone(),
                created_ms: r.created_ms,
                ready_instances: of_rev()
                    .filter(|i| i.state == ferry_api::agent::InstanceState::Ready)
                    .count() as u32,
                instances: of_rev().count() as u32,
                desired_instances: live.scalers.get(&r.name).map_or(0, |s| s.desired),
                last_failure: live
                    .signals
                    .get(&r.name)
                    .and_then(|s| s.last_failure.clone()),
            }
        })
        .collect();
    let last_failure = revs.iter().rev().find_map(|r| {
        live.signals
            .get(&r.name)
            .and_then(|s| s.last_failure.clone())
    });
    let autoscaler = autoscaler_views(&live, revs);
    ServiceView {
        autoscaler,
        name: svc.name.clone(),
        url: url(c, &svc.name),
        spec: svc.spec.clone(),
        latest_revision: svc.latest_revision.clone(),
        traffic: svc.traffic.clone(),
        revisions,
        instances,
        created_ms: svc.created_ms,
        updated_ms: svc.updated_ms,
        last_failure,
    }
}

/// The autoscaler's view of every revision it has state for (in traffic now or lately).
fn autoscaler_views(
    live: &crate::state::Live,
    revs: &[RevisionRecord],
) -> Vec<ferry_api::service::AutoscalerView> {
    revs.iter()
        .filter_map(|r| live.scalers.get(&r.name).map(|s| s.view(&r.name)))
        .filter(|v| v.desired > 0 || v.instances > 0 || !v.decisions.is_empty())
        .collect()
}

/// `GET /v1/services/{name}/autoscaler`: metrics, targets, desired vs ready, panic and
/// anti-thrash state, and the last decisions, per revision.
async fn autoscaler(
    State(c): State<Arc<Control>>,
    Path(name): Path<String>,
) -> Result<Json<Vec<ferry_api::service::AutoscalerView>>> {
    check_name(&name)?;
    c.store.service(&name)?.ok_or_else(|| not_found(&name))?;
    let revs = c.store.revisions(&name)?;
    let live = c.live.lock().expect("live state lock");
    Ok(Json(autoscaler_views(&live, &revs)))
}

async fn list_services(State(c): State<Arc<Control>>) -> Result<Json<Vec<ServiceView>>> {
    let mut out = Vec::new();
    for s in c.store.services()? {
        let revs = c.store.revisions(&s.name)?;
        out.push(view(&c, &s, &revs));
    }
    Ok(Json(out))
}

async fn get_service(
    State(c): State<Arc<Control>>,
    Path(name): Path<String>,
) -> Result<Json<ServiceView>> {
    check_name(&name)?;
    let svc = c.store.service(&name)?.ok_or_else(|| not_found(&name))?;
    let revs = c.store.revisions(&name)?;
    Ok(Json(view(&c, &svc, &revs)))
}

/// Parses a JSON body, naming the field that is wrong.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| {
        err(
            StatusCode::BAD_REQUEST,
            "invalid_spec",
            format!("request body: {e}"),
        )
    })
}

async fn deploy(
    State(c): State<Arc<Control>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response> {
    check_name(&name)?;
    let spec: ServiceSpec = parse_body(&body)?;
    let valid = spec
        .validate()
        .map_err(|e| err(StatusCode::BAD_REQUEST, "invalid_spec", e.to_string()))?;
    let mut image = valid.image.clone();
    if image.registry.is_none() {
        image.registry = c.config.default_registry.clone();
    }
    if image.registry.is_none() {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "invalid_spec",
            format!("image: {:?} names no registry", spec.image),
        ));
    }
    // Pin the image by digest now: a tag that does not exist fails here, not at the first request.
    let client = if image.registry == c.config.default_registry {
        &c.builtin_registry
    } else {
        &c.registry
    };
    let digest = client.resolve(&image).await.map_err(|e| match e {
        ferry_oci::client::ClientError::NotFound(_) => err(
            StatusCode::UNPROCESSABLE_ENTITY,
            "image_not_found",
            format!(
                "image {image} not found in its registry ({} does not exist)",
                image.reference()
            ),
        ),
        other => err(
            StatusCode::BAD_GATEWAY,
            "registry_error",
            format!("resolving image {image}: {other}"),
        ),
    })?;
    let pinned = ferry_api::ImageRef {
        tag: None,
        digest: Some(digest.to_string()),
        ..image
    };
    let existing = c.store.service(&name)?;
    let rev = c.store.deploy(
        &name,
        &spec,
        &pinned.to_string(),
        now_ms(),
        existing.is_none(),
    )?;
    tracing::info!(service = %name, revision = %rev.name, image = %rev.image, "deployed");
    c.converge().await;
    let svc = c.store.service(&name)?.ok_or_else(|| not_found(&name))?;
    let revs = c.store.revisions(&name)?;
    let status = if existing.is_none() {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view(&c, &svc, &revs))).into_response())
}

async fn delete_service(
    State(c): State<Arc<Control>>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>> {
    check_name(&name)?;
    if !c.store.delete_service(&name)? {
        return Err(not_found(&name));
    }
    c.converge().await;
    Ok(Json(serde_json::json!({ "deleted": name })))
}

async fn revisions(
    State(c): State<Arc<Control>>,
    Path(name): Path<String>,
) -> Result<Json<Vec<RevisionView>>> {
    check_name(&name)?;
    let svc = c.store.service(&name)?.ok_or_else(|| not_found(&name))?;
    let revs = c.store.revisions(&name)?;
    Ok(Json(view(&c, &svc, &revs).revisions))
}

async fn set_traffic(
    State(c): State<Arc<Control>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<ServiceView>> {
    check_name(&name)?;
    let traffic: Vec<TrafficTarget> = parse_body(&body)?;
    let svc = c.store.service(&name)?.ok_or_else(|| not_found(&name))?;
    let revs = c.store.revisions(&name)?;
    let total: u32 = traffic.iter().map(|t| u32::from(t.percent)).sum();
    if total != 100 {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "invalid_traffic",
            format!("percentages add up to {total}, not 100"),
        ));
    }
    for t in &traffic {
        if !revs.iter().any(|r| r.name == t.revision) {
            return Err(err(
                StatusCode::BAD_REQUEST,
                "invalid_traffic",
                format!("revision {:?} is not a revision of {name}", t.revision),
            ));
        }
    }
    c.store.set_traffic(&name, &traffic, now_ms())?;
    c.converge().await;
    let svc = c
        .store
        .service(&svc.name)?
        .ok_or_else(|| not_found(&name))?;
    Ok(Json(view(&c, &svc, &revs)))
}

async fn scale(
    State(c): State<Arc<Control>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<ServiceView>> {
    check_name(&name)?;
    let req: ScaleRequest = parse_body(&body)?;
    let svc = c.store.service(&name)?.ok_or_else(|| not_found(&name))?;
    let mut spec = svc.spec.clone();
    if let Some(m) = req.min_instances {
        spec.min_instances = m;
    }
    if let Some(m) = req.max_instances {
        spec.max_instances = m;
    }
    spec.validate()
        .map_err(|e| err(StatusCode::BAD_REQUEST, "invalid_scale", e.to_string()))?;
    c.store.set_service_spec(&name, &spec, now_ms())?;
    c.converge().await;
    let svc = c.store.service(&name)?.ok_or_else(|| not_found(&name))?;
    let revs = c.store.revisions(&name)?;
    Ok(Json(view(&c, &svc, &revs)))
}

#[derive(Deserialize)]
struct InstanceQuery {
    service: Option<String>,
}

async fn instances(
    State(c): State<Arc<Control>>,
    Query(q): Query<InstanceQuery>,
) -> Json<Vec<ferry_api::service::InstanceView>> {
    let live = c.live.lock().expect("live state lock");
    Json(
        live.instances
            .values()
            .filter(|i| q.service.as_ref().is_none_or(|s| &i.service == s))
            .map(|i| i.view())
            .collect(),
    )
}

async fn nodes(State(c): State<Arc<Control>>) -> Json<Vec<ferry_api::agent::NodeInfo>> {
    let live = c.live.lock().expect("live state lock");
    Json(live.nodes.values().cloned().collect())
}

#[derive(Deserialize)]
struct LogQuery {
    #[serde(default)]
    follow: bool,
    instance: Option<String>,
}

/// Picks the instance of `service` named `wanted`, or the newest one (ready ones first when
/// `ready_only`), and the node API address that serves it.
fn pick_instance(
    c: &Control,
    service: &str,
    wanted: Option<&str>,
    ready_only: bool,
) -> Result<(String, std::net::SocketAddr)> {
    let live = c.live.lock().expect("live state lock");
    let mut candidates: Vec<&crate::state::Instance> = live
        .instances
        .values()
        .filter(|i| i.service == service)
        .filter(|i| wanted.is_none_or(|w| i.id == w))
        .filter(|i| !ready_only || (i.live() && i.state == ferry_api::agent::InstanceState::Ready))
        .collect();
    candidates.sort_by_key(|i| std::cmp::Reverse(i.started_ms));
    let Some(inst) = candidates.first() else {
        return Err(match wanted {
            Some(w) => err(
                StatusCode::NOT_FOUND,
                "instance_not_found",
                format!("service {service:?} has no instance {w:?}"),
            ),
            None if ready_only => err(
                StatusCode::CONFLICT,
                "no_running_instance",
                format!(
                    "service {service:?} has no running instance: send it a request or set --min 1"
                ),
            ),
            None => err(
                StatusCode::NOT_FOUND,
                "instance_not_found",
                format!("service {service:?} has had no instance yet"),
            ),
        });
    };
    let addr = live
        .nodes
        .get(&inst.node)
        .and_then(|n| n.api_address)
        .ok_or_else(|| {
            err(
                StatusCode::BAD_GATEWAY,
                "node_unreachable",
                format!("node {:?} has no API address", inst.node),
            )
        })?;
    Ok((inst.id.clone(), addr))
}

fn node_error(e: reqwest::Error) -> ApiError {
    err(
        StatusCode::BAD_GATEWAY,
        "node_unreachable",
        format!("node API: {e}"),
    )
}

/// Passes a node's answer through: status, content type and a streamed body.
fn relay(resp: reqwest::Response) -> Response {
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_string();
    let body = axum::body::Body::from_stream(resp.bytes_stream());
    (status, [("content-type", ct)], body).into_response()
}

async fn logs(
    State(c): State<Arc<Control>>,
    Path(name): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response> {
    check_name(&name)?;
    let svc = c.store.service(&name)?.ok_or_else(|| not_found(&name))?;
    let path = |id: &str| format!("/v1/instances/{id}/logs?follow={}", q.follow);
    match pick_instance(&c, &name, q.instance.as_deref(), false) {
        Ok((id, addr)) => {
            let url = format!("http://{addr}{}", path(&id));
            let resp = c.http.get(url).send().await.map_err(node_error)?;
            Ok(relay(resp))
        }
        Err(e) if e.code == "instance_not_found" => {
            // Control forgets a stopped instance a minute after it stops; the usage record
            // still names it, and the node that ran it keeps its log for the log retention.
            match c
                .store
                .past_instance(&name, svc.created_ms, q.instance.as_deref())?
            {
                Some(id) => past_log(&c, &name, &id, &path(&id)).await,
                None => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// The log of instance `id` of `service`, no longer tracked: from whichever node still has it.
async fn past_log(c: &Control, service: &str, id: &str, path: &str) -> Result<Response> {
    let nodes: Vec<(String, std::net::SocketAddr)> = {
        let live = c.live.lock().expect("live state lock");
        live.nodes
            .iter()
            .filter_map(|(n, s)| Some((n.clone(), s.api_address?)))
            .collect()
    };
    let mut unreachable = Vec::new();
    for (node, addr) in nodes {
        match c.http.get(format!("http://{addr}{path}")).send().await {
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => {}
            Ok(r) => return Ok(relay(r)),
            Err(e) => unreachable.push(format!("{node}: {e}")),
        }
    }
    if !unreachable.is_empty() {
        return Err(err(
            StatusCode::BAD_GATEWAY,
            "node_unreachable",
            format!(
                "no reachable node has the log of instance {id:?}; unreachable: {}",
                unreachable.join("; ")
            ),
        ));
    }
    Err(err(
        StatusCode::NOT_FOUND,
        "log_not_kept",
        format!(
            "instance {id:?} of service {service:?} stopped and its log is no longer kept \
             (nodes remove the logs of stopped instances after their log retention, 24h \
             unless `ferry server --log-retention` says otherwise)"
        ),
    ))
}

#[derive(Deserialize, serde::Serialize)]
struct ExecBody {
    argv: Vec<String>,
    #[serde(default)]
    stdin: String,
    #[serde(default)]
    instance: Option<String>,
}

async fn exec(
    State(c): State<Arc<Control>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response> {
    check_name(&name)?;
    let req: ExecBody = parse_body(&body)?;
    if req.argv.is_empty() {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "invalid_command",
            "argv must not be empty",
        ));
    }
    c.store.service(&name)?.ok_or_else(|| not_found(&name))?;
    let (id, addr) = pick_instance(&c, &name, req.instance.as_deref(), true)?;
    let url = format!("http://{addr}/v1/instances/{id}/exec");
    let resp = c
        .http
        .post(url)
        .json(&serde_json::json!({ "argv": req.argv, "stdin": req.stdin }))
        .send()
        .await
        .map_err(node_error)?;
    Ok(relay(resp))
}

fn usage_query(
    q: std::result::Result<
        Query<ferry_metering::UsageQuery>,
        axum::extract::rejection::QueryRejection,
    >,
) -> Result<(ferry_metering::UsageQuery, u64, u64)> {
    let Query(q) = q.map_err(|e| {
        err(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            e.body_text()
                .replace("Failed to deserialize query string: ", "query: "),
        )
    })?;
    if let Some(s) = &q.service {
        check_name(s)?;
    }
    let (from, to) = q.range(now_ms()).map_err(rating_error)?;
    Ok((q, from, to))
}

fn rating_error(e: ferry_metering::RatingError) -> ApiError {
    use ferry_metering::RatingError as R;
    match e {
        R::Query(_) | R::EmptyRange { .. } => {
            err(StatusCode::BAD_REQUEST, "invalid_query", e.to_string())
        }
        other => {
            tracing::error!(error = %other, "rating usage");
            err(
                StatusCode::INTERNAL_SERVER_ERROR,
                "rating_failed",
                other.to_string(),
            )
        }
    }
}

/// `GET /v1/usage?service=S&month=YYYY-MM` or `?from_ms=A&to_ms=B`: metered quantities and
/// cost per service (docs/billing.md).
async fn usage(
    State(c): State<Arc<Control>>,
    q: std::result::Result<
        Query<ferry_metering::UsageQuery>,
        axum::extract::rejection::QueryRejection,
    >,
) -> Result<Json<ferry_metering::UsageReport>> {
    let (q, from, to) = usage_query(q)?;
    let events = c
        .store
        .usage_events(crate::store::UsageWindow::new(from, to))?;
    let report = ferry_metering::usage(&events, &c.plan, from, to, q.service.as_deref(), now_ms())
        .map_err(rating_error)?;
    Ok(Json(report))
}

/// `GET /v1/usage/events` (same query): the raw usage events that touch the range, for
/// audits and tests.
async fn usage_events(
    State(c): State<Arc<Control>>,
    q: std::result::Result<
        Query<ferry_metering::UsageQuery>,
        axum::extract::rejection::QueryRejection,
    >,
) -> Result<Json<Vec<ferry_metering::UsageEvent>>> {
    let (q, from, to) = usage_query(q)?;
    let mut events = c
        .store
        .usage_events(crate::store::UsageWindow::new(from, to))?;
    events.retain(|e| q.service.as_ref().is_none_or(|s| e.service() == s));
    Ok(Json(events))
}

/// `GET /v1/invoices/{month}`: the month's line items, subtotals and total.
async fn invoice(
    State(c): State<Arc<Control>>,
    Path(month): Path<String>,
) -> Result<Json<ferry_metering::Invoice>> {
    let month: ferry_metering::Month = month.parse().map_err(|e: ferry_metering::MonthError| {
        err(StatusCode::BAD_REQUEST, "invalid_month", e.to_string())
    })?;
    let events = c.store.usage_events(crate::store::UsageWindow::new(
        month.start_ms(),
        month.end_ms(),
    ))?;
    let inv = ferry_metering::invoice(&events, &c.plan, month, now_ms()).map_err(rating_error)?;
    Ok(Json(inv))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceQuery {
    cpu: Option<String>,
    memory: Option<String>,
    hours: Option<String>,
    requests: Option<String>,
    egress: Option<String>,
}

/// `GET /v1/price?cpu=1&memory=2Gi&hours=100&requests=10M&egress=150GB`: what one instance of
/// that size running for `hours` with that traffic costs under this server's price plan (the
/// estimate of `ferry price`). Defaults: 1 vCPU, 512Mi, 730 hours (a month), no traffic.
async fn price(
    State(c): State<Arc<Control>>,
    q: std::result::Result<Query<PriceQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ferry_metering::Quote>> {
    let bad = |m: String| err(StatusCode::BAD_REQUEST, "invalid_query", m);
    let Query(q) = q.map_err(|e| {
        bad(e
            .body_text()
            .replace("Failed to deserialize query string: ", "query: "))
    })?;
    let cpu: ferry_api::Cpu = q
        .cpu
        .as_deref()
        .unwrap_or("1")
        .parse()
        .map_err(|e| bad(format!("cpu: {e}")))?;
    let memory: ferry_api::Memory = q
        .memory
        .as_deref()
        .unwrap_or("512Mi")
        .parse()
        .map_err(|e| bad(format!("memory: {e}")))?;
    use ferry_metering::input;
    let workload = ferry_metering::Workload {
        cpu_millis: cpu.millis(),
        memory_bytes: memory.bytes(),
        duration_ms: input::parse_hours_ms(q.hours.as_deref().unwrap_or("730"))
            .map_err(|e| bad(e.0))?,
        requests: input::parse_count(q.requests.as_deref().unwrap_or("0")).map_err(|e| bad(e.0))?,
        egress_bytes: input::parse_bytes(q.egress.as_deref().unwrap_or("0"))
            .map_err(|e| bad(e.0))?,
    };
    let quote = ferry_metering::quote(&c.plan, &workload).map_err(rating_error)?;
    Ok(Json(quote))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::usage::{InstanceUsage, apply, from_stats};
    use ferry_api::gateway::RevisionStats;
    use serde_json::Value;
    use tower::ServiceExt;

    fn control(dir: &std::path::Path) -> Arc<Control> {
        Arc::new(Control {
            config: crate::Config {
                data_dir: dir.to_path_buf(),
                domain: "localhost".into(),
                gateway_addr: None,
                default_registry: None,
                registry_auth: None,
                tick: std::time::Duration::from_millis(100),
                price_plan: None,
            },
            store: Store::open(&dir.join("ferry.db")).unwrap(),
            live: Default::default(),
            wake: tokio::sync::Notify::new(),
            agents: Default::default(),
            registry: ferry_oci::client::Client::new(None),
            builtin_registry: ferry_oci::client::Client::new(None),
            http: reqwest::Client::new(),
            reconciled: tokio::sync::watch::channel(0).0,
            plan: ferry_metering::PricePlan::default(),
        })
    }

    async fn get(c: &Arc<Control>, uri: &str) -> (StatusCode, Value) {
        let resp = router(c.clone())
            .oneshot(
                axum::http::Request::get(uri)
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    /// docs/openapi.json lists every path with exactly the methods the router serves.
    #[tokio::test]
    async fn openapi_matches_the_router() {
        let dir = tempfile::tempdir().unwrap();
        let c = control(dir.path());
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/openapi.json"
        ))
        .unwrap();
        let doc: Value = serde_json::from_str(&text).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.len() >= 13, "{}", paths.len());
        for (path, item) in paths {
            let uri = path.replace("{name}", "svc").replace("{month}", "2026-11");
            for method in ["get", "put", "post", "delete", "patch"] {
                let documented = item.get(method).is_some();
                let req = axum::http::Request::builder()
                    .method(method.to_uppercase().as_str())
                    .uri(&uri)
                    .header("content-type", "application/json")
                    .body(axum::body::Body::from("{}"))
                    .unwrap();
                let resp = router(c.clone()).oneshot(req).await.unwrap();
                let status = resp.status();
                let allow = resp.headers().get("allow").cloned();
                let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
                    .await
                    .unwrap();
                let code = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v["code"].as_str().map(str::to_string));
                let served = status != StatusCode::METHOD_NOT_ALLOWED
                    && code.as_deref() != Some("not_found");
                assert_eq!(
                    served, documented,
                    "{method} {path}: status {status}, code {code:?}"
                );
                if status == StatusCode::METHOD_NOT_ALLOWED {
                    // A JSON error like every other, and the methods the path does take.
                    assert_eq!(
                        code.as_deref(),
                        Some("method_not_allowed"),
                        "{method} {path}"
                    );
                    assert!(
                        allow.is_some_and(|a| !a.is_empty()),
                        "{method} {path}: no Allow"
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn price_estimates_under_the_server_plan() {
        let dir = tempfile::tempdir().unwrap();
        let c = control(dir.path());
        let (st, q) = get(&c, "/v1/price?cpu=1&memory=2Gi&hours=100&requests=10M").await;
        assert_eq!(st, StatusCode::OK, "{q}");
        assert_eq!(q["total"], "$21.50", "the seed's worked example: {q}");
        assert_eq!(q["billable_ms"], 360_000_000u64);
        let (st, q) = get(&c, "/v1/price").await;
        assert_eq!(st, StatusCode::OK, "defaults: {q}");
        for (uri, names) in [
            ("/v1/price?hours=forever", "hours"),
            ("/v1/price?requests=10Q", "requests"),
            ("/v1/price?egress=5PB", "egress"),
            ("/v1/price?cpu=lots", "cpu"),
            ("/v1/price?memory=2Qi", "memory"),
            ("/v1/price?gpus=1", "gpus"),
        ] {
            let (st, e) = get(&c, uri).await;
            assert_eq!(st, StatusCode::BAD_REQUEST, "{uri}: {e}");
            assert_eq!(e["code"], "invalid_query");
            assert!(e["message"].as_str().unwrap().contains(names), "{uri}: {e}");
        }
    }

    fn seed(c: &Control, start: u64) {
        // One hour of 1 vCPU + 2 GiB, 10 M requests: the $21.50 example over 100 hours.
        for (n, t0) in [(1u64, start), (2, start + 3_600_000)] {
            for u in [
                InstanceUsage::Open {
                    id: format!("inst-hello-{n}"),
                    service: "hello".into(),
                    instance: format!("hello-{n}"),
                    start_ms: t0,
                    cpu_millis: 1000,
                    memory_bytes: 2 << 30,
                },
                InstanceUsage::Close {
                    id: format!("inst-hello-{n}"),
                    stop_ms: t0 + 180_000_000,
                },
            ] {
                apply(&c.store, &u);
                apply(&c.store, &u);
            }
        }
        let stats = RevisionStats {
            service: "hello".into(),
            revision: "hello-00001".into(),
            avg_concurrency: 1.0,
            max_concurrency: 1,
            requests: 10_000_000,
            queue_depth: 0,
            p99_latency_ms: 1.0,
            egress_bytes: 0,
            window_ms: 1000,
            instances: vec![],
        };
        let ev = from_stats(start + 1_000, &[stats]);
        c.store.record_usage(&ev).unwrap();
        c.store.record_usage(&ev).unwrap();
    }

    #[tokio::test]
    async fn usage_and_invoice_are_rated_from_stored_events() {
        let dir = tempfile::tempdir().unwrap();
        let c = control(dir.path());
        let m: ferry_metering::Month = "2026-11".parse().unwrap();
        seed(&c, m.start_ms());
        let (s, u) = get(&c, "/v1/usage?month=2026-11&service=hello").await;
        assert_eq!(s, StatusCode::OK, "{u}");
        assert_eq!(u["from_ms"], m.start_ms());
        assert_eq!(u["to_ms"], m.end_ms());
        assert_eq!(u["plan"], "default");
        assert_eq!(u["services"][0]["service"], "hello");
        assert_eq!(u["services"][0]["vcpu_seconds"], "360000");
        assert_eq!(u["services"][0]["gb_seconds"], "720000");
        assert_eq!(u["services"][0]["requests"], 10_000_000);
        assert_eq!(u["total"], "$21.50");
        let (_, other) = get(&c, "/v1/usage?month=2026-11&service=other").await;
        assert_eq!(other["services"], serde_json::json!([]));
        let (_, range) = get(
            &c,
            &format!(
                "/v1/usage?from_ms={}&to_ms={}",
                m.start_ms(),
                m.start_ms() + 3_600_000
            ),
        )
        .await;
        assert_eq!(range["services"][0]["vcpu_seconds"], "3600");

        let (s, inv) = get(&c, "/v1/invoices/2026-11").await;
        assert_eq!(s, StatusCode::OK, "{inv}");
        assert_eq!(inv["month"], "2026-11");
        assert_eq!(inv["currency"], "USD");
        let kinds: Vec<&str> = inv["lines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["cpu", "memory", "requests"]);
        assert_eq!(inv["lines"][0]["amount"], "$7.50");
        assert_eq!(inv["total_micros"], 21_500_000);
        let (_, empty) = get(&c, "/v1/invoices/2026-10").await;
        assert_eq!(empty["total_micros"], 0);

        let (_, events) = get(&c, "/v1/usage/events?month=2026-11").await;
        assert_eq!(events.as_array().unwrap().len(), 3, "{events}");
    }

    #[tokio::test]
    async fn bad_queries_are_json_errors() {
        let dir = tempfile::tempdir().unwrap();
        let c = control(dir.path());
        for uri in [
            "/v1/invoices/2026-13",
            "/v1/invoices/nov",
            "/v1/usage?month=2026-1x",
            "/v1/usage?month=2026-11&from_ms=1&to_ms=2",
            "/v1/usage?from_ms=5&to_ms=5",
            "/v1/usage?from_ms=5",
            "/v1/usage?from_ms=abc&to_ms=9",
            "/v1/usage?service=Bad_Name",
        ] {
            let (s, body) = get(&c, uri).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}: {body}");
            assert!(body["code"].is_string(), "{uri}: {body}");
            assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
            assert!(body["request_id"].is_string());
        }
        let (s, body) = get(&c, "/v1/usage").await;
        assert_eq!(s, StatusCode::OK, "no range: the current month");
        let now = now_ms();
        assert!(body["from_ms"].as_u64().unwrap() <= now && now < body["to_ms"].as_u64().unwrap());
    }
}
