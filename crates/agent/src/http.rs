//! The node's own HTTP API, which control proxies to: instance logs (whole or followed) and
//! exec. It binds to loopback in `ferry server`.

use crate::Agent;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub fn router(agent: Agent) -> axum::Router {
    axum::Router::new()
        .route("/v1/instances/{id}/logs", get(logs))
        .route("/v1/instances/{id}/exec", post(exec))
        .with_state(agent)
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    let body = serde_json::json!({
        "code": code,
        "message": message,
        "request_id": uuid::Uuid::new_v4().simple().to_string(),
    });
    (status, Json(body)).into_response()
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
}

#[derive(Deserialize)]
struct LogQuery {
    #[serde(default)]
    follow: bool,
}

async fn logs(
    State(agent): State<Agent>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Response {
    if !valid_id(&id) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_instance",
            format!("instance id {id:?} is malformed"),
        );
    }
    if !agent.log_path(&id).exists() {
        return error(
            StatusCode::NOT_FOUND,
            "instance_not_found",
            format!("no log for instance {id:?} on this node"),
        );
    }
    if !q.follow {
        return match agent.read_log(&id).await {
            Ok(text) => ([("content-type", "text/plain; charset=utf-8")], text).into_response(),
            Err(e) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("reading the log: {e}"),
            ),
        };
    }
    // Followed until the client goes away: dropping the body drops the receiver, which stops
    // the follower, and the guard cancels it for good measure.
    let stop = CancellationToken::new();
    let rx = agent.follow_log(&id, 0, stop.clone());
    let guard = stop.drop_guard();
    let stream = futures_util::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        let line = rx.recv().await?;
        let mut line = line;
        if !line.ends_with('\n') {
            line.push('\n');
        }
        Some((
            Ok::<_, std::io::Error>(bytes::Bytes::from(line)),
            (rx, guard),
        ))
    });
    (
        [("content-type", "text/plain; charset=utf-8")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// `POST /v1/instances/{id}/exec`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    #[serde(default)]
    pub stdin: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecResponse {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

async fn exec(
    State(agent): State<Agent>,
    Path(id): Path<String>,
    Json(req): Json<ExecRequest>,
) -> Response {
    if !valid_id(&id) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_instance",
            format!("instance id {id:?} is malformed"),
        );
    }
    if req.argv.is_empty() || req.argv.iter().any(|a| a.contains('\0')) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_command",
            "argv must be non-empty, without NUL".into(),
        );
    }
    match agent.exec(&id, req.argv, req.stdin.into_bytes()).await {
        Ok(out) => Json(ExecResponse {
            code: out.code,
            signal: out.signal,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
        .into_response(),
        Err(crate::AgentError::NoInstance(i)) => error(
            StatusCode::NOT_FOUND,
            "instance_not_found",
            format!("instance {i:?} is not running on this node"),
        ),
        Err(e) => error(StatusCode::BAD_GATEWAY, "exec_failed", e.to_string()),
    }
}
