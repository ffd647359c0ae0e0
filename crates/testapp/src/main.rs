//! testapp: the workload of every Ferry end-to-end test. A small static HTTP server whose
//! behaviour the test chooses by path (and, where startup itself must change, by environment).
//! It reports what it sees of its sandbox (env, uid, mounts, cgroup limits, caps, seccomp, ...)
//! and can misbehave on request (sleep, stream, allocate, spin, crash, fork, try privileged ops).
//!
//! It must run in an empty rootfs: no /etc, no libc files, no DNS. Build it static with
//!
//! ```text
//! RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR=target-testapp-static \
//!   cargo build --release -p testapp --target x86_64-unknown-linux-gnu
//! ```
//!
//! → `target-testapp-static/x86_64-unknown-linux-gnu/release/testapp` (`file` says "static-pie
//! linked, stripped"; about 4 MB, `[profile.release.package.testapp]` strips it). Listens on `0.0.0.0:$PORT` (default 8080; `PORT=0` picks a free port). The first
//! line on stdout is `listening on 0.0.0.0:NNNN`; then one line per request on stdout; startup
//! and lifecycle messages go to stderr. HTTP/1.1, h2c with prior knowledge, and WebSocket on the
//! same port.
//!
//! Endpoints: `/` `/env` `/headers` `/args` `/uid` `/cwd` `/mounts[?raw=1]` `/cgroup` `/stdin`
//! `/dev` `/tmp` `/caps` `/seccomp` `/hostname` `/sleep?ms=N` `/stream?chunks=N&bytes=M&delay_ms=D`
//! `/echo` (POST) `/status/{code}` `/alloc?mib=N` `/free` `/cpu?ms=N` `/crash?code=N` `/ws`
//! `/probe/ready` `/probe/live` `/probe/fail[?probe=ready|live]` `/try?op=...[&pid=P]`
//! `/forkbomb?n=N` `/metrics` `/metrics/set?value=X`.
//!
//! `testapp tty-probe` is not a server but a line tool for exec tests: it prints whether its
//! stdin and stdout are terminals and the window size, then answers each input line (`size`,
//! `exit N`, anything else echoed as `got: ...`) and prints `eof` at the end of its input.
//!
//! `/try?op=mount|ptrace|raw_socket|module|cgroup_write|chroot|sethostname` answers
//! `{op, ok, errno, error, detail}`; each attempt undoes itself when it succeeds (see `ops`).
//! `module` calls init_module with an empty image, which never loads: EPERM means refused,
//! ENOSYS means the kernel has no module support (as on the Ferry dev machines).
//!
//! Environment at startup: `PORT`, `TESTAPP_START_DELAY_MS` (sleep before listening),
//! `TESTAPP_CRASH_ON_START=code` (exit at once), `TESTAPP_IGNORE_SIGTERM=1` (log and keep
//! serving: tests SIGKILL after the grace period). By default SIGTERM (or SIGINT) logs
//! "got SIGTERM", stops accepting, finishes in-flight requests and exits 0.

mod ops;
mod sysinfo;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{any, get, post};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Params = Query<HashMap<String, String>>;

/// What stdin looked like at startup (the runtime contract says: at EOF).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StdinState {
    Eof,
    Data,
    Open,
    Closed,
    Error,
}

impl StdinState {
    fn as_str(self) -> &'static str {
        match self {
            StdinState::Eof => "eof",
            StdinState::Data => "data",
            StdinState::Open => "open",
            StdinState::Closed => "closed",
            StdinState::Error => "error",
        }
    }
}

struct App {
    instance_id: String,
    hostname: String,
    args: Vec<String>,
    stdin: StdinState,
    ready_fail: AtomicBool,
    live_fail: AtomicBool,
    gauge_bits: AtomicU64,
    requests: AtomicU64,
    inflight: AtomicU64,
    held: Mutex<Vec<Vec<u8>>>,
}

type Shared = Arc<App>;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(ops::SLEEP_CHILD_ARG) {
        std::thread::sleep(Duration::from_secs(3600));
        return std::process::ExitCode::SUCCESS;
    }
    if args.get(1).map(String::as_str) == Some(ops::TTY_PROBE_ARG) {
        return ops::tty_probe();
    }
    let stdin = probe_stdin();
    if let Ok(code) = std::env::var("TESTAPP_CRASH_ON_START") {
        let code: i32 = code.trim().parse().unwrap_or(1);
        eprintln!("testapp: crashing on start with exit code {code} (TESTAPP_CRASH_ON_START)");
        std::process::exit(code);
    }
    let port: u16 = match std::env::var("PORT") {
        Err(_) => 8080,
        Ok(p) => match p.trim().parse() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("testapp: invalid PORT {p:?}: {e}");
                return std::process::ExitCode::from(2);
            }
        },
    };
    let delay_ms: u64 = match std::env::var("TESTAPP_START_DELAY_MS") {
        Err(_) => 0,
        Ok(v) => match v.trim().parse() {
            Ok(v) => v,
            Err(e) => {
                eprintln!("testapp: invalid TESTAPP_START_DELAY_MS {v:?}: {e}");
                return std::process::ExitCode::from(2);
            }
        },
    };
    let ignore_sigterm =
        std::env::var("TESTAPP_IGNORE_SIGTERM").is_ok_and(|v| v == "1" || v == "true");
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let started_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let app = Arc::new(App {
        instance_id: format!("{hostname}-{}-{:x}", std::process::id(), started_ns),
        hostname,
        args,
        stdin,
        ready_fail: AtomicBool::new(false),
        live_fail: AtomicBool::new(false),
        gauge_bits: AtomicU64::new(0f64.to_bits()),
        requests: AtomicU64::new(0),
        inflight: AtomicU64::new(0),
        held: Mutex::new(Vec::new()),
    });
    eprintln!(
        "testapp: starting pid={} port={port} start_delay_ms={delay_ms} ignore_sigterm={ignore_sigterm} stdin={}",
        std::process::id(),
        stdin.as_str()
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("testapp: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(app, port, delay_ms, ignore_sigterm)) {
        Ok(()) => {
            eprintln!("testapp: exiting");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("testapp: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Reads at most one byte of stdin, waiting up to 100 ms, without consuming more.
fn probe_stdin() -> StdinState {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::io::Read;
    use std::os::fd::AsFd;
    let stdin = std::io::stdin();
    let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(100u8)) {
        Ok(0) => StdinState::Open,
        Ok(_) => {
            let revents = fds[0].revents().unwrap_or(PollFlags::empty());
            if revents.contains(PollFlags::POLLNVAL) {
                return StdinState::Closed;
            }
            let mut b = [0u8; 1];
            match stdin.lock().read(&mut b) {
                Ok(0) => StdinState::Eof,
                Ok(_) => StdinState::Data,
                Err(_) => StdinState::Error,
            }
        }
        Err(nix::errno::Errno::EBADF) => StdinState::Closed,
        Err(_) => StdinState::Error,
    }
}

async fn serve(app: Shared, port: u16, delay_ms: u64, ignore_sigterm: bool) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Install the handlers before the delay so a SIGTERM during a slow start is seen too.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    if delay_ms > 0 {
        eprintln!("testapp: delaying start by {delay_ms} ms");
        let delay = tokio::time::sleep(Duration::from_millis(delay_ms));
        tokio::pin!(delay);
        loop {
            tokio::select! {
                _ = &mut delay => break,
                _ = term.recv() => {
                    if ignore_sigterm {
                        eprintln!("testapp: got SIGTERM (ignored: TESTAPP_IGNORE_SIGTERM=1)");
                        continue;
                    }
                    eprintln!("testapp: got SIGTERM before listening, exiting");
                    return Ok(());
                }
                _ = int.recv() => {
                    eprintln!("testapp: got SIGINT before listening, exiting");
                    return Ok(());
                }
            }
        }
    }
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    let addr = listener.local_addr()?;
    println!("listening on {addr}");
    eprintln!("testapp: listening on {addr}");
    let shutdown = async move {
        loop {
            tokio::select! {
                _ = term.recv() => {
                    if ignore_sigterm {
                        eprintln!("testapp: got SIGTERM (ignored: TESTAPP_IGNORE_SIGTERM=1)");
                        continue;
                    }
                    eprintln!("testapp: got SIGTERM, draining");
                    break;
                }
                _ = int.recv() => {
                    eprintln!("testapp: got SIGINT, draining");
                    break;
                }
            }
        }
    };
    axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown)
        .await
}

fn router(app: Shared) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/env", get(env))
        .route("/headers", any(headers))
        .route("/args", get(args))
        .route("/uid", get(uid))
        .route("/cwd", get(cwd))
        .route("/mounts", get(mounts))
        .route("/cgroup", get(cgroup))
        .route("/stdin", get(stdin))
        .route("/dev", get(dev))
        .route("/tmp", get(tmp))
        .route("/caps", get(caps))
        .route("/seccomp", get(seccomp))
        .route("/hostname", get(hostname))
        .route("/sleep", get(sleep))
        .route("/stream", get(stream))
        .route("/echo", post(echo).put(echo))
        .route("/status/{code}", any(status))
        .route("/alloc", get(alloc).post(alloc))
        .route("/free", get(free).post(free))
        .route("/cpu", get(cpu).post(cpu))
        .route("/crash", get(crash).post(crash))
        .route("/ws", get(ws))
        .route("/probe/ready", get(probe_ready))
        .route("/probe/live", get(probe_live))
        .route("/probe/fail", get(probe_fail).post(probe_fail))
        .route("/try", get(try_op).post(try_op))
        .route("/forkbomb", get(forkbomb).post(forkbomb))
        .route("/metrics", get(metrics))
        .route("/metrics/set", get(metrics_set).post(metrics_set))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), log_request))
        .with_state(app)
}

/// Logs one line per request on stdout and stamps the instance headers on every response.
async fn log_request(State(app): State<Shared>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let version = req.version();
    app.requests.fetch_add(1, Ordering::Relaxed);
    app.inflight.fetch_add(1, Ordering::Relaxed);
    let mut resp = next.run(req).await;
    app.inflight.fetch_sub(1, Ordering::Relaxed);
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&app.instance_id) {
        h.insert("x-testapp-instance", v);
    }
    if let Ok(v) = HeaderValue::from_str(&app.hostname) {
        h.insert("x-testapp-hostname", v);
    }
    println!(
        "{method} {uri} {version:?} {} {}ms",
        resp.status().as_u16(),
        start.elapsed().as_millis()
    );
    resp
}

fn bad_request(msg: String) -> Response {
    (StatusCode::BAD_REQUEST, format!("{msg}\n")).into_response()
}

/// Reads an integer query parameter in `0..=max`, `default` when absent.
fn param_u64(
    q: &HashMap<String, String>,
    key: &str,
    default: u64,
    max: u64,
) -> Result<u64, String> {
    match q.get(key) {
        None => Ok(default),
        Some(v) => match v.parse::<u64>() {
            Ok(n) if n <= max => Ok(n),
            Ok(n) => Err(format!("query parameter {key}={n}: must be at most {max}")),
            Err(e) => Err(format!("query parameter {key}={v:?}: {e}")),
        },
    }
}

async fn root() -> &'static str {
    "hello from testapp\n"
}

async fn not_found(req: Request) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!(
            "testapp: no route for {} {}\n",
            req.method(),
            req.uri().path()
        ),
    )
        .into_response()
}

async fn env() -> Json<Value> {
    let map: Map<String, Value> = std::env::vars_os()
        .map(|(k, v)| (k.to_string_lossy().into_owned(), json!(v.to_string_lossy())))
        .collect();
    Json(Value::Object(map))
}

async fn headers(req: Request) -> Json<Value> {
    Json(json!({
        "method": req.method().as_str(),
        "uri": req.uri().to_string(),
        "version": format!("{:?}", req.version()),
        "headers": headers_json(req.headers()),
    }))
}

/// Header names to their values (a list when a header repeats).
fn headers_json(h: &HeaderMap) -> Value {
    let mut out = Map::new();
    for name in h.keys() {
        let values: Vec<Value> = h
            .get_all(name)
            .iter()
            .map(|v| json!(String::from_utf8_lossy(v.as_bytes())))
            .collect();
        let v = if values.len() == 1 {
            values.into_iter().next().unwrap_or(Value::Null)
        } else {
            Value::Array(values)
        };
        out.insert(name.as_str().to_string(), v);
    }
    Value::Object(out)
}

async fn args(State(app): State<Shared>) -> Json<Value> {
    Json(json!(app.args))
}

async fn uid() -> Json<Value> {
    use nix::unistd::{getegid, geteuid, getgid, getgroups, getuid};
    let groups: Vec<u32> = getgroups()
        .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_default();
    Json(json!({
        "uid": getuid().as_raw(), "gid": getgid().as_raw(),
        "euid": geteuid().as_raw(), "egid": getegid().as_raw(),
        "groups": groups,
    }))
}

async fn cwd() -> Json<Value> {
    match std::env::current_dir() {
        Ok(p) => Json(json!({ "cwd": p.display().to_string() })),
        Err(e) => Json(json!({ "cwd": null, "error": e.to_string() })),
    }
}

async fn mounts(Query(q): Params) -> Response {
    let text = match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(t) => t,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading /proc/self/mountinfo: {e}\n"),
            )
                .into_response();
        }
    };
    if q.contains_key("raw") {
        return text.into_response();
    }
    let list: Vec<Value> = sysinfo::parse_mountinfo(&text)
        .iter()
        .map(sysinfo::MountInfo::to_json)
        .collect();
    Json(json!(list)).into_response()
}

async fn cgroup() -> Json<Value> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    Json(sysinfo::cgroup_report(
        std::path::Path::new("/sys/fs/cgroup"),
        &own,
    ))
}

async fn stdin(State(app): State<Shared>) -> Json<Value> {
    Json(json!({ "at_eof": app.stdin == StdinState::Eof, "state": app.stdin.as_str() }))
}

async fn dev() -> Response {
    let entries = match std::fs::read_dir("/dev") {
        Ok(e) => e,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("listing /dev: {e}\n"),
            )
                .into_response();
        }
    };
    let mut list: Vec<Value> = entries
        .filter_map(Result::ok)
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            match e.path().symlink_metadata() {
                Err(err) => json!({ "name": name, "error": err.to_string() }),
                Ok(m) => {
                    let ft = m.file_type();
                    let kind = if ft.is_char_device() {
                        "char"
                    } else if ft.is_block_device() {
                        "block"
                    } else if ft.is_dir() {
                        "dir"
                    } else if ft.is_symlink() {
                        "symlink"
                    } else if ft.is_fifo() {
                        "fifo"
                    } else if ft.is_socket() {
                        "socket"
                    } else {
                        "file"
                    };
                    let rdev = m.rdev();
                    json!({
                        "name": name,
                        "type": kind,
                        "mode": format!("{:o}", m.permissions().mode() & 0o7777),
                        "major": if ft.is_char_device() || ft.is_block_device() { Some(nix::sys::stat::major(rdev)) } else { None },
                        "minor": if ft.is_char_device() || ft.is_block_device() { Some(nix::sys::stat::minor(rdev)) } else { None },
                        "target": if ft.is_symlink() { std::fs::read_link(e.path()).ok().map(|p| p.display().to_string()) } else { None },
                    })
                }
            }
        })
        .collect();
    list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Json(json!(list)).into_response()
}

async fn tmp() -> Json<Value> {
    let dir = std::env::temp_dir();
    let mode = std::fs::metadata(&dir)
        .ok()
        .map(|m| format!("{:o}", m.permissions().mode() & 0o7777));
    let probe = dir.join(format!(".testapp-write-{}", std::process::id()));
    let write = std::fs::write(&probe, b"ok");
    let _ = std::fs::remove_file(&probe);
    Json(json!({
        "path": dir.display().to_string(),
        "mode": mode,
        "writable": write.is_ok(),
        "error": write.err().map(|e| e.to_string()),
    }))
}

fn proc_status() -> String {
    std::fs::read_to_string("/proc/self/status").unwrap_or_default()
}

async fn caps() -> Json<Value> {
    Json(sysinfo::caps_report(&proc_status()))
}

async fn seccomp() -> Json<Value> {
    Json(sysinfo::seccomp_report(&proc_status()))
}

async fn hostname(State(app): State<Shared>) -> String {
    let now = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| app.hostname.clone());
    format!("{now}\n")
}

async fn sleep(Query(q): Params) -> Response {
    let ms = match param_u64(&q, "ms", 0, 3_600_000) {
        Ok(v) => v,
        Err(m) => return bad_request(m),
    };
    tokio::time::sleep(Duration::from_millis(ms)).await;
    format!("slept {ms} ms\n").into_response()
}

async fn stream(Query(q): Params) -> Response {
    let parsed = (|| {
        Ok::<_, String>((
            param_u64(&q, "chunks", 10, 1_000_000)?,
            param_u64(&q, "bytes", 16, 16 << 20)?,
            param_u64(&q, "delay_ms", 0, 600_000)?,
        ))
    })();
    let (chunks, bytes, delay_ms) = match parsed {
        Ok(v) => v,
        Err(m) => return bad_request(m),
    };
    let body = futures_util::stream::unfold(0u64, move |i| async move {
        if i >= chunks {
            return None;
        }
        if i > 0 && delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        }
        let chunk = Bytes::from(vec![b'a' + (i % 26) as u8; bytes as usize]);
        Some((Ok::<_, std::convert::Infallible>(chunk), i + 1))
    });
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(body),
    )
        .into_response()
}

async fn echo(req: Request) -> Response {
    let ct = req.headers().get(header::CONTENT_TYPE).cloned();
    let mut resp = Response::new(req.into_body());
    if let Some(ct) = ct {
        resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    resp
}

async fn status(Path(code): Path<String>) -> Response {
    match code
        .parse::<u16>()
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
    {
        Some(s) if (200..=599).contains(&s.as_u16()) => {
            (s, format!("status {}\n", s.as_u16())).into_response()
        }
        _ => bad_request(format!(
            "status code {code:?}: must be an integer in 200..=599"
        )),
    }
}

async fn alloc(State(app): State<Shared>, Query(q): Params) -> Response {
    let mib = match param_u64(&q, "mib", 1, 1 << 20) {
        Ok(v) => v,
        Err(m) => return bad_request(m),
    };
    let len = (mib as usize) << 20;
    let app2 = app.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut v: Vec<u8> = Vec::new();
        v.try_reserve_exact(len).map_err(|e| e.to_string())?;
        v.resize(len, 1);
        let mut held = app2.held.lock().unwrap_or_else(|p| p.into_inner());
        held.push(v);
        Ok::<u64, String>(held.iter().map(|b| b.len() as u64).sum::<u64>() >> 20)
    })
    .await;
    match result {
        Ok(Ok(total)) => Json(json!({ "allocated_mib": mib, "held_mib": total })).into_response(),
        Ok(Err(e)) => (
            StatusCode::INSUFFICIENT_STORAGE,
            format!("allocating {mib} MiB: {e}\n"),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("allocating {mib} MiB: {e}\n"),
        )
            .into_response(),
    }
}

async fn free(State(app): State<Shared>) -> Json<Value> {
    let mut held = app.held.lock().unwrap_or_else(|p| p.into_inner());
    let total = held.iter().map(|b| b.len() as u64).sum::<u64>() >> 20;
    held.clear();
    Json(json!({ "freed_mib": total }))
}

async fn cpu(Query(q): Params) -> Response {
    let ms = match param_u64(&q, "ms", 100, 600_000) {
        Ok(v) => v,
        Err(m) => return bad_request(m),
    };
    let spun = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_millis(ms);
        let mut iterations: u64 = 0;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        while Instant::now() < deadline {
            for _ in 0..1000 {
                x = std::hint::black_box(x.rotate_left(5) ^ x.wrapping_mul(31));
            }
            iterations += 1000;
        }
        iterations
    })
    .await
    .unwrap_or(0);
    Json(json!({ "spun_ms": ms, "iterations": spun })).into_response()
}

async fn crash(Query(q): Params) -> Response {
    let code = match q.get("code").map(|c| c.parse::<i32>()) {
        None => 1,
        Some(Ok(c)) => c,
        Some(Err(e)) => return bad_request(format!("query parameter code={:?}: {e}", q["code"])),
    };
    eprintln!("testapp: crashing with exit code {code} (/crash)");
    std::process::exit(code)
}

async fn ws(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(ws_echo)
}

async fn ws_echo(mut socket: WebSocket) {
    while let Some(Ok(msg)) = socket.recv().await {
        let reply = match msg {
            Message::Text(t) => Message::Text(t),
            Message::Binary(b) => Message::Binary(b),
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
}

fn probe_response(name: &str, failing: bool) -> Response {
    if failing {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{name}: failing\n"),
        )
            .into_response()
    } else {
        format!("{name}: ok\n").into_response()
    }
}

async fn probe_ready(State(app): State<Shared>) -> Response {
    probe_response("ready", app.ready_fail.load(Ordering::SeqCst))
}

async fn probe_live(State(app): State<Shared>) -> Response {
    probe_response("live", app.live_fail.load(Ordering::SeqCst))
}

/// Toggles failure of both probes, or of one with `?probe=ready|live`.
async fn probe_fail(State(app): State<Shared>, Query(q): Params) -> Response {
    let which = q.get("probe").map(String::as_str).unwrap_or("both");
    let flags: Vec<&AtomicBool> = match which {
        "ready" => vec![&app.ready_fail],
        "live" => vec![&app.live_fail],
        "both" => vec![&app.ready_fail, &app.live_fail],
        other => {
            return bad_request(format!(
                "query parameter probe={other:?}: expected ready, live or both"
            ));
        }
    };
    for f in flags {
        f.fetch_xor(true, Ordering::SeqCst);
    }
    Json(json!({
        "ready_failing": app.ready_fail.load(Ordering::SeqCst),
        "live_failing": app.live_fail.load(Ordering::SeqCst),
    }))
    .into_response()
}

async fn try_op(Query(q): Params) -> Response {
    let Some(op) = q.get("op").cloned() else {
        return bad_request(format!(
            "missing query parameter op (one of {})",
            ops::OPS.join(", ")
        ));
    };
    if !ops::OPS.contains(&op.as_str()) {
        return bad_request(format!(
            "query parameter op={op:?}: expected one of {}",
            ops::OPS.join(", ")
        ));
    }
    let pid = match q.get("pid").map(|p| p.parse::<i32>()) {
        None => None,
        Some(Ok(p)) if p > 0 => Some(p),
        Some(_) => {
            return bad_request(format!(
                "query parameter pid={:?}: must be a positive integer",
                q["pid"]
            ));
        }
    };
    match tokio::task::spawn_blocking(move || ops::attempt(&op, pid).to_json()).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("attempt failed: {e}\n"),
        )
            .into_response(),
    }
}

async fn forkbomb(Query(q): Params) -> Response {
    let n = match param_u64(&q, "n", 10, 10_000) {
        Ok(v) => v,
        Err(m) => return bad_request(m),
    };
    match tokio::task::spawn_blocking(move || ops::forkbomb(n)).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("forkbomb failed: {e}\n"),
        )
            .into_response(),
    }
}

fn render_metrics(requests: u64, inflight: u64, gauge: f64, held_bytes: u64) -> String {
    format!(
        "# HELP testapp_requests_total Requests received.\n# TYPE testapp_requests_total counter\n\
         testapp_requests_total {requests}\n\
         # HELP testapp_inflight_requests Requests in flight.\n# TYPE testapp_inflight_requests gauge\n\
         testapp_inflight_requests {inflight}\n\
         # HELP testapp_custom_gauge A gauge set by /metrics/set?value=X.\n# TYPE testapp_custom_gauge gauge\n\
         testapp_custom_gauge {gauge}\n\
         # HELP testapp_held_bytes Memory held by /alloc.\n# TYPE testapp_held_bytes gauge\n\
         testapp_held_bytes {held_bytes}\n"
    )
}

async fn metrics(State(app): State<Shared>) -> Response {
    let held = app
        .held
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|b| b.len() as u64)
        .sum();
    let text = render_metrics(
        app.requests.load(Ordering::Relaxed),
        app.inflight.load(Ordering::Relaxed),
        f64::from_bits(app.gauge_bits.load(Ordering::Relaxed)),
        held,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn metrics_set(State(app): State<Shared>, Query(q): Params) -> Response {
    let Some(raw) = q.get("value") else {
        return bad_request("missing query parameter value".into());
    };
    match raw.parse::<f64>() {
        Ok(v) if v.is_finite() => {
            app.gauge_bits.store(v.to_bits(), Ordering::Relaxed);
            format!("testapp_custom_gauge {v}\n").into_response()
        }
        _ => bad_request(format!(
            "query parameter value={raw:?}: must be a finite number"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn params_validate_and_name_the_key() {
        assert_eq!(param_u64(&q(&[]), "ms", 7, 10).unwrap(), 7);
        assert_eq!(param_u64(&q(&[("ms", "10")]), "ms", 7, 10).unwrap(), 10);
        let too_big = param_u64(&q(&[("ms", "11")]), "ms", 7, 10).unwrap_err();
        assert_eq!(too_big, "query parameter ms=11: must be at most 10");
        let negative = param_u64(&q(&[("ms", "-1")]), "ms", 7, 10).unwrap_err();
        assert!(
            negative.starts_with("query parameter ms=\"-1\": "),
            "{negative}"
        );
    }

    #[test]
    fn metrics_text_has_every_series() {
        let t = render_metrics(3, 1, 2.5, 1024);
        assert!(t.contains("\ntestapp_requests_total 3\n"));
        assert!(t.contains("\ntestapp_custom_gauge 2.5\n"));
        assert!(t.contains("\ntestapp_held_bytes 1024\n"));
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let mut parts = line.split(' ');
            assert!(parts.next().unwrap().starts_with("testapp_"));
            assert!(parts.next().unwrap().parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn headers_json_groups_repeats() {
        let mut h = HeaderMap::new();
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        h.append("host", HeaderValue::from_static("h"));
        let v = headers_json(&h);
        assert_eq!(v["x-a"], json!(["1", "2"]));
        assert_eq!(v["host"], "h");
    }
}
