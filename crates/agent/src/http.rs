//! The node's own HTTP API, which control proxies to: instance logs (whole or followed) and
//! exec, buffered (`POST .../exec`, JSON) or interactive (`GET .../exec`, a WebSocket speaking
//! [`ferry_api::exec`], with or without a TTY). It binds to loopback in `ferry server`.

use crate::Agent;
use crate::sandbox;
use axum::Json;
use axum::body::Body;
use axum::extract::RawQuery;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ferry_api::exec::{self, ExecParams, ExecStatus, WinSize};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub fn router(agent: Agent) -> axum::Router {
    axum::Router::new()
        .route("/v1/instances/{id}/logs", get(logs))
        .route("/v1/instances/{id}/exec", post(exec).get(exec_stream))
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

fn no_instance(id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "instance_not_found",
        format!("instance {id:?} is not running on this node"),
    )
}

/// The 400 for a malformed instance id, if `id` is one.
fn bad_id(id: &str) -> Option<Response> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-');
    (!ok).then(|| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_instance",
            format!("instance id {id:?} is malformed"),
        )
    })
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
    if let Some(r) = bad_id(&id) {
        return r;
    }
    let no_log = || {
        error(
            StatusCode::NOT_FOUND,
            "instance_not_found",
            format!("no log for instance {id:?} on this node"),
        )
    };
    if !agent.log_path(&id).exists() {
        return no_log();
    }
    if !q.follow {
        return match agent.log_reader(&id).await {
            Ok(r) => (
                [("content-type", "text/plain; charset=utf-8")],
                Body::from_stream(tokio_util::io::ReaderStream::new(r)),
            )
                .into_response(),
            // Removed by the retention sweep since the check above.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => no_log(),
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
    let rx = agent.follow_log(&id, stop.clone());
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
    if let Some(r) = bad_id(&id) {
        return r;
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
        Err(crate::AgentError::NoInstance(i)) => no_instance(&i),
        Err(e) => error(StatusCode::BAD_GATEWAY, "exec_failed", e.to_string()),
    }
}

/// The agent's side of an exec that has not been waited for yet: dropped early (the client
/// left before or during the upgrade), it kills the command and reaps the helper.
struct Running {
    child: Option<sandbox::ExecChild>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            child.kill();
            let pid = child.pid;
            drop(child);
            std::thread::spawn(move || sandbox::wait_exec(pid));
        }
    }
}

/// `GET /v1/instances/{id}/exec?command=..&tty=..&stdin=..&rows=..&cols=..`: upgrades to a
/// WebSocket carrying the command's stdio (see [`ferry_api::exec`]). The command starts
/// before the upgrade, so an unknown instance or a command that cannot start is an HTTP error.
async fn exec_stream(
    State(agent): State<Agent>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if let Some(r) = bad_id(&id) {
        return r;
    }
    let pairs: Vec<(String, String)> =
        match serde_urlencoded::from_str(query.as_deref().unwrap_or("")) {
            Ok(p) => p,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    format!("exec query: {e}"),
                );
            }
        };
    let params = match ExecParams::from_pairs(pairs) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_command", e.to_string()),
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return error(
                StatusCode::UPGRADE_REQUIRED,
                "upgrade_required",
                format!("an interactive exec is a WebSocket ({e}); POST runs a buffered one"),
            );
        }
    };
    let stdio = if params.tty {
        let size = params.size.unwrap_or(WinSize { rows: 24, cols: 80 });
        sandbox::ExecStdio::Tty(sandbox::WinSize {
            rows: size.rows,
            cols: size.cols,
        })
    } else {
        sandbox::ExecStdio::Pipes {
            stdin: params.stdin,
        }
    };
    let child = match agent.spawn_exec(&id, params.command, stdio).await {
        Ok(c) => c,
        Err(crate::AgentError::NoInstance(i)) => return no_instance(&i),
        Err(e) => return error(StatusCode::BAD_GATEWAY, "exec_failed", e.to_string()),
    };
    let running = Running { child: Some(child) };
    ws.on_upgrade(move |socket| pump(socket, running, params.tty))
}

/// Sets `O_NONBLOCK` on `fd`, as tokio's pipe types require.
fn nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    crate::sys::set_nonblocking(fd.as_raw_fd()).map_err(std::io::Error::from_raw_os_error)
}

/// Copies what the command writes on `fd` into frames of `channel` until EOF (a pty says EIO
/// once every terminal side is closed).
fn forward(
    fd: OwnedFd,
    channel: u8,
    tx: mpsc::Sender<Message>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    nonblocking(&fd)?;
    let mut r = pipe::Receiver::from_owned_fd_unchecked(fd)?;
    Ok(tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        while let Ok(n @ 1..) = r.read(&mut buf).await {
            let m = Message::Binary(exec::frame(channel, &buf[..n]).into());
            if tx.send(m).await.is_err() {
                break;
            }
        }
    }))
}

/// After the command ends, output still in flight is sent for at most this long (a process
/// the command left in the background may hold its stdout open).
const DRAIN: Duration = Duration::from_secs(1);

async fn pump(socket: WebSocket, mut running: Running, tty: bool) {
    let Some(child) = running.child.take() else {
        return;
    };
    let (mut sink, mut stream) = socket.split();
    let pid = child.pid;
    let sandbox::ExecChild {
        stdin,
        stdout,
        stderr,
        mut pty,
        ..
    } = child;
    // Until the wait below is running, a drop kills and reaps.
    let (tx, mut rx) = mpsc::channel::<Message>(16);
    let mut readers = Vec::new();
    let mut setup_error = None;
    for (fd, ch) in [(Some(stdout), exec::STDOUT), (stderr, exec::STDERR)] {
        if let Some(fd) = fd {
            match forward(fd, ch, tx.clone()) {
                Ok(h) => readers.push(h),
                Err(e) => setup_error = Some(e),
            }
        }
    }
    drop(tx);
    let mut stdin = match stdin.map(|fd| {
        nonblocking(&fd)?;
        pipe::Sender::from_owned_fd_unchecked(fd)
    }) {
        Some(Ok(w)) => Some(w),
        Some(Err(e)) => {
            setup_error = Some(e);
            None
        }
        None => None,
    };
    if setup_error.is_some() {
        sandbox::kill_exec(pid);
    }
    let wait = tokio::task::spawn_blocking(move || sandbox::wait_exec(pid));
    tokio::pin!(wait);
    // Input runs on its own task: a command that does not read its stdin stalls only the
    // client's frames (TCP pushes back), never the output going the other way.
    let (gone_tx, mut gone) = tokio::sync::oneshot::channel::<()>();
    let exited = tokio_util::sync::CancellationToken::new();
    let exited_in = exited.clone();
    let input = tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                m = stream.next() => m,
                // The command is gone: its stdin and terminal go too. Frames are still read
                // (and dropped) until the client's Close, so the socket never closes with
                // unread data, which would reset the connection before the status arrives.
                () = exited_in.cancelled(), if stdin.is_some() || pty.is_some() => {
                    stdin = None;
                    pty = None;
                    continue;
                }
            };
            let Some(Ok(msg)) = msg else { break };
            let b = match msg {
                Message::Binary(b) => b,
                Message::Close(_) => break,
                _ => continue,
            };
            if exited_in.is_cancelled() {
                continue;
            }
            match b.first().copied() {
                Some(exec::STDIN) => {
                    if let Some(w) = &mut stdin
                        && w.write_all(&b[1..]).await.is_err()
                    {
                        stdin = None;
                    }
                }
                Some(exec::RESIZE) => {
                    if let (Some(pty), Ok(size)) =
                        (&pty, serde_json::from_slice::<WinSize>(&b[1..]))
                    {
                        let size = sandbox::WinSize {
                            rows: size.rows,
                            cols: size.cols,
                        };
                        let _ = sandbox::set_winsize(pty, size);
                    }
                }
                Some(exec::CLOSE) if tty => {
                    // A terminal has no EOF of its own: ^D at the start of a line is one.
                    if let Some(w) = &mut stdin {
                        let _ = w.write_all(&[4]).await;
                    }
                }
                Some(exec::CLOSE) => stdin = None,
                _ => {}
            }
        }
        let _ = gone_tx.send(());
    });
    let status = loop {
        tokio::select! {
            _ = &mut gone => {
                // The client went away: so does the command.
                sandbox::kill_exec(pid);
                let _ = (&mut wait).await;
                return;
            }
            Some(m) = rx.recv() => {
                if sink.send(m).await.is_err() {
                    sandbox::kill_exec(pid);
                    input.abort();
                    let _ = (&mut wait).await;
                    return;
                }
            }
            status = &mut wait => break status,
        }
    };
    // The command is gone: no more input (this drops our stdin and pty ends); send what it
    // wrote last, then how it ended.
    exited.cancel();
    let _ = tokio::time::timeout(DRAIN, async {
        while let Some(m) = rx.recv().await {
            if sink.send(m).await.is_err() {
                break;
            }
        }
    })
    .await;
    for r in readers {
        r.abort();
    }
    let st = match status {
        _ if setup_error.is_some() => ExecStatus {
            error: setup_error.map(|e| format!("connecting the command's stdio: {e}")),
            ..Default::default()
        },
        Ok(Ok((code, signal))) => ExecStatus {
            code,
            signal,
            error: None,
        },
        Ok(Err(e)) => ExecStatus {
            error: Some(format!("waiting for the command: {e}")),
            ..Default::default()
        },
        Err(e) => ExecStatus {
            error: Some(format!("waiting for the command: {e}")),
            ..Default::default()
        },
    };
    let body = serde_json::to_vec(&st).unwrap_or_default();
    let _ = sink
        .send(Message::Binary(exec::frame(exec::STATUS, &body).into()))
        .await;
    let _ = sink.send(Message::Close(None)).await;
    // The closing handshake: the input task ends at the client's Close.
    if tokio::time::timeout(DRAIN, &mut Box::pin(input))
        .await
        .is_err()
    {
        tracing::debug!("exec client did not answer the close");
    }
}
