//! The public `/v1` API. Errors are `{code, message, request_id}` with the right status.

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
        .route("/v1/services/{name}/logs", get(logs))
        .route("/v1/services/{name}/exec", axum::routing::post(exec))
        .route("/v1/instances", get(instances))
        .route("/v1/nodes", get(nodes))
        .fallback(|| async { err(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
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
                desired_instances: live
                    .signals
                    .get(&r.name)
                    .and_then(|s| s.history.iter().map(|h| h.1).max())
                    .unwrap_or(0),
            }
        })
        .collect();
    let last_failure = revs.iter().rev().find_map(|r| {
        live.signals
            .get(&r.name)
            .and_then(|s| s.last_failure.clone())
    });
    ServiceView {
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
    let digest = c.registry.resolve(&image).await.map_err(|e| match e {
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
    c.store.service(&name)?.ok_or_else(|| not_found(&name))?;
    let (id, addr) = pick_instance(&c, &name, q.instance.as_deref(), false)?;
    let url = format!("http://{addr}/v1/instances/{id}/logs?follow={}", q.follow);
    let resp = c.http.get(url).send().await.map_err(node_error)?;
    Ok(relay(resp))
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
