//! Starts the real testapp binary on an ephemeral port and drives every endpoint over real
//! HTTP/1.1, h2c (prior knowledge) and WebSocket.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running testapp; killed on drop.
struct App {
    child: Child,
    port: u16,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

fn drain(r: impl std::io::Read + Send + 'static, into: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            into.lock().unwrap().push(line);
        }
    });
}

impl App {
    fn start(env: &[(&str, &str)]) -> Result<App> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_testapp"));
        cmd.env("PORT", "0")
            .env("TESTAPP_MARK", "mark-42")
            .arg("extra-arg");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("spawning testapp")?;
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let stderr = Arc::new(Mutex::new(Vec::new()));
        drain(child.stderr.take().unwrap(), stderr.clone());
        let mut first = String::new();
        out.read_line(&mut first)
            .context("reading the first stdout line")?;
        let port = first
            .trim()
            .strip_prefix("listening on 0.0.0.0:")
            .with_context(|| format!("first stdout line {first:?}"))?
            .parse()?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        drain(out.into_inner(), stdout.clone());
        Ok(App {
            child,
            port,
            stdout,
            stderr,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Waits (bounded, as a hang guard only) for the process to exit.
    fn wait_exit(&mut self) -> Result<ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("testapp did not exit");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (bounded) until stderr has a line containing `needle`.
    async fn wait_stderr(&self, needle: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self
                .stderr
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(needle))
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!(
            "stderr never said {needle:?}: {:?}",
            self.stderr.lock().unwrap()
        )
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Http = Client<HttpConnector, Full<Bytes>>;

fn http1() -> Http {
    Client::builder(TokioExecutor::new()).build_http()
}

fn h2c() -> Http {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

struct Resp {
    status: StatusCode,
    headers: hyper::HeaderMap,
    version: hyper::Version,
    body: Bytes,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body {:?} is not JSON: {e}", self.text()))
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn send(client: &Http, method: Method, url: &str, body: Bytes) -> Result<Resp> {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("x-test", "yes")
        .body(Full::new(body))?;
    let resp = client
        .request(req)
        .await
        .with_context(|| format!("request to {url}"))?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Resp {
        status: parts.status,
        headers: parts.headers,
        version: parts.version,
        body,
    })
}

async fn get(client: &Http, url: &str) -> Result<Resp> {
    send(client, Method::GET, url, Bytes::new()).await
}

#[tokio::test]
async fn introspection_endpoints_report_the_process() -> Result<()> {
    let app = App::start(&[])?;
    let c = http1();

    let r = get(&c, &app.url("/")).await?;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "hello from testapp\n");
    let instance = r.headers["x-testapp-instance"].to_str()?;
    assert!(instance.contains(&app.child.id().to_string()), "{instance}");
    assert!(r.headers.contains_key("x-testapp-hostname"));

    let env = get(&c, &app.url("/env")).await?.json();
    assert_eq!(env["TESTAPP_MARK"], "mark-42");
    assert_eq!(env["PORT"], "0");

    let h = get(&c, &app.url("/headers?q=1")).await?.json();
    assert_eq!(h["method"], "GET");
    assert_eq!(h["version"], "HTTP/1.1");
    assert_eq!(h["headers"]["x-test"], "yes");
    assert!(h["uri"].as_str().unwrap().ends_with("/headers?q=1"));

    let args = get(&c, &app.url("/args")).await?.json();
    assert_eq!(args[1], "extra-arg");

    let uid = get(&c, &app.url("/uid")).await?.json();
    assert_eq!(uid["uid"], nix::unistd::getuid().as_raw());
    assert_eq!(uid["egid"], nix::unistd::getegid().as_raw());
    assert!(uid["groups"].is_array());

    let cwd = get(&c, &app.url("/cwd")).await?.json();
    assert_eq!(cwd["cwd"], std::env::current_dir()?.display().to_string());

    let stdin = get(&c, &app.url("/stdin")).await?.json();
    assert_eq!(stdin["at_eof"], true);
    assert_eq!(stdin["state"], "eof");

    let mounts = get(&c, &app.url("/mounts")).await?.json();
    assert!(
        mounts
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["mount_point"] == "/"),
        "{mounts}"
    );
    let raw = get(&c, &app.url("/mounts?raw=1")).await?.text();
    assert!(raw.contains(" - "));

    let cg = get(&c, &app.url("/cgroup")).await?.json();
    assert!(
        ["v1", "v2", "hybrid", "none"].contains(&cg["version"].as_str().unwrap()),
        "{cg}"
    );
    assert!(cg.get("memory_limit_bytes").is_some());
    assert_eq!(
        cg["proc_self_cgroup"].as_str().unwrap(),
        std::fs::read_to_string("/proc/self/cgroup")?
    );

    let dev = get(&c, &app.url("/dev")).await?.json();
    let null = dev
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "null")
        .expect("/dev/null listed");
    assert_eq!(null["type"], "char");
    assert_eq!(
        (null["major"].as_u64(), null["minor"].as_u64()),
        (Some(1), Some(3))
    );

    let tmp = get(&c, &app.url("/tmp")).await?.json();
    assert_eq!(tmp["writable"], true);
    assert!(tmp["mode"].is_string());

    let caps = get(&c, &app.url("/caps")).await?.json();
    let status = std::fs::read_to_string("/proc/self/status")?;
    let own_bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .unwrap()
        .trim();
    assert_eq!(caps["CapBnd"], own_bnd, "a child inherits the bounding set");
    assert!(caps["CapEff_names"].is_array());

    let sc = get(&c, &app.url("/seccomp")).await?.json();
    assert!(sc["mode"].is_string());

    let host = get(&c, &app.url("/hostname")).await?.text();
    assert_eq!(host.trim(), nix::unistd::gethostname()?.to_string_lossy());
    Ok(())
}

#[tokio::test]
async fn behaviour_endpoints_and_bad_input() -> Result<()> {
    let app = App::start(&[])?;
    let c = http1();

    assert_eq!(
        get(&c, &app.url("/sleep?ms=5")).await?.status,
        StatusCode::OK
    );
    let bad = get(&c, &app.url("/sleep?ms=abc")).await?;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.text().contains("ms=\"abc\""), "{}", bad.text());
    assert_eq!(
        get(&c, &app.url("/sleep?ms=99999999999")).await?.status,
        StatusCode::BAD_REQUEST
    );

    let s = get(&c, &app.url("/stream?chunks=3&bytes=5&delay_ms=1")).await?;
    assert_eq!(s.status, StatusCode::OK);
    assert_eq!(s.text(), "aaaaabbbbbccccc");
    assert!(
        s.headers.get("content-length").is_none(),
        "streamed, not sized"
    );
    assert_eq!(get(&c, &app.url("/stream?chunks=0")).await?.body.len(), 0);

    let big: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i % 251) as u8).collect();
    let e = send(
        &c,
        Method::POST,
        &app.url("/echo"),
        Bytes::from(big.clone()),
    )
    .await?;
    assert_eq!(e.status, StatusCode::OK);
    assert_eq!(e.body.as_ref(), big.as_slice());

    assert_eq!(
        get(&c, &app.url("/status/503")).await?.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        send(&c, Method::POST, &app.url("/status/201"), Bytes::new())
            .await?
            .status,
        StatusCode::CREATED
    );
    assert_eq!(
        get(&c, &app.url("/status/abc")).await?.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        get(&c, &app.url("/status/99")).await?.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        get(&c, &app.url("/no/such/path")).await?.status,
        StatusCode::NOT_FOUND
    );

    let a = get(&c, &app.url("/alloc?mib=4")).await?.json();
    assert_eq!(a["held_mib"], 4);
    let a = get(&c, &app.url("/alloc?mib=2")).await?.json();
    assert_eq!(a["held_mib"], 6);
    let m = get(&c, &app.url("/metrics")).await?.text();
    assert!(
        m.contains(&format!("testapp_held_bytes {}\n", 6 << 20)),
        "{m}"
    );
    assert_eq!(get(&c, &app.url("/free")).await?.json()["freed_mib"], 6);

    let cpu = get(&c, &app.url("/cpu?ms=20")).await?.json();
    assert!(cpu["iterations"].as_u64().unwrap() > 0);

    // Probes: both pass, then toggle readiness only, then toggle both back.
    assert_eq!(
        get(&c, &app.url("/probe/ready")).await?.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&c, &app.url("/probe/live")).await?.status,
        StatusCode::OK
    );
    let t = get(&c, &app.url("/probe/fail?probe=ready")).await?.json();
    assert_eq!(
        (t["ready_failing"].as_bool(), t["live_failing"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(
        get(&c, &app.url("/probe/ready")).await?.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        get(&c, &app.url("/probe/live")).await?.status,
        StatusCode::OK
    );
    get(&c, &app.url("/probe/fail")).await?;
    assert_eq!(
        get(&c, &app.url("/probe/ready")).await?.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&c, &app.url("/probe/live")).await?.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        get(&c, &app.url("/probe/fail?probe=nope")).await?.status,
        StatusCode::BAD_REQUEST
    );

    // Custom metric.
    assert_eq!(
        get(&c, &app.url("/metrics/set?value=42.5")).await?.status,
        StatusCode::OK
    );
    let m = get(&c, &app.url("/metrics")).await?;
    assert!(
        m.headers["content-type"]
            .to_str()?
            .starts_with("text/plain")
    );
    assert!(
        m.text().contains("\ntestapp_custom_gauge 42.5\n"),
        "{}",
        m.text()
    );
    assert_eq!(
        get(&c, &app.url("/metrics/set?value=NaN")).await?.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        get(&c, &app.url("/metrics/set")).await?.status,
        StatusCode::BAD_REQUEST
    );

    // Fork: children start, then are all reaped.
    let f = get(&c, &app.url("/forkbomb?n=3")).await?.json();
    assert_eq!(f["started"], 3);
    assert!(f["error"].is_null());
    assert_eq!(
        get(&c, &app.url("/forkbomb?n=x")).await?.status,
        StatusCode::BAD_REQUEST
    );

    // Privileged ops: every op answers the documented shape; bad ops are refused.
    for op in [
        "mount",
        "ptrace",
        "raw_socket",
        "module",
        "cgroup_write",
        "chroot",
        "sethostname",
    ] {
        let r = get(&c, &app.url(&format!("/try?op={op}"))).await?;
        assert_eq!(r.status, StatusCode::OK, "{op}: {}", r.text());
        let v = r.json();
        assert_eq!(v["op"], op);
        let ok = v["ok"].as_bool().expect("ok is a bool");
        assert_eq!(ok, v["error"].is_null(), "{op}: {v}");
    }
    let module = get(&c, &app.url("/try?op=module")).await?.json();
    assert_eq!(module["ok"], false, "an empty module image never loads");
    assert!(module["errno"].as_i64().unwrap() > 0);
    assert_eq!(
        get(&c, &app.url("/try?op=reboot")).await?.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        get(&c, &app.url("/try")).await?.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        get(&c, &app.url("/try?op=ptrace&pid=-4")).await?.status,
        StatusCode::BAD_REQUEST
    );

    // One log line per request on stdout.
    let lines = app.stdout.lock().unwrap().clone();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("GET /status/503 HTTP/1.1 503 ")),
        "{lines:?}"
    );
    Ok(())
}

#[tokio::test]
async fn unprivileged_attempts_are_refused_with_eperm() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to drop privileges");
        return Ok(());
    }
    // As an ordinary user every privileged op must fail with EPERM (or EACCES for files).
    let app = App::start_as(65534)?;
    let c = http1();
    for op in ["mount", "raw_socket", "module", "chroot", "sethostname"] {
        let v = get(&c, &app.url(&format!("/try?op={op}"))).await?.json();
        assert_eq!(v["ok"], false, "{op}: {v}");
        let errno = v["errno"].as_i64().unwrap();
        assert!(
            errno == libc_eperm() || (op == "module" && errno == 38),
            "{op}: {v}"
        );
    }
    let uid = get(&c, &app.url("/uid")).await?.json();
    assert_eq!(uid["uid"], 65534);
    Ok(())
}

fn libc_eperm() -> i64 {
    nix::errno::Errno::EPERM as i64
}

impl App {
    /// Starts the binary as `uid` (and gid); std drops the supplementary groups when root
    /// changes uid.
    fn start_as(uid: u32) -> Result<App> {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_testapp"));
        cmd.env("PORT", "0").uid(uid).gid(uid).current_dir("/");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning testapp as nobody")?;
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let stderr = Arc::new(Mutex::new(Vec::new()));
        drain(child.stderr.take().unwrap(), stderr.clone());
        let mut first = String::new();
        out.read_line(&mut first)?;
        let port = first
            .trim()
            .rsplit(':')
            .next()
            .unwrap_or("")
            .parse()
            .with_context(|| format!("first line {first:?}"))?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        drain(out.into_inner(), stdout.clone());
        Ok(App {
            child,
            port,
            stdout,
            stderr,
        })
    }
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served_on_the_same_port() -> Result<()> {
    let app = App::start(&[])?;
    let c = h2c();
    let r = get(&c, &app.url("/headers")).await?;
    assert_eq!(r.version, hyper::Version::HTTP_2);
    assert_eq!(r.json()["version"], "HTTP/2.0");
    // Concurrent streams on one connection, including a streamed echo.
    let (u1, u2, u3) = (
        app.url("/sleep?ms=20"),
        app.url("/stream?chunks=4&bytes=3"),
        app.url("/echo"),
    );
    let (a, b, e) = tokio::join!(
        get(&c, &u1),
        get(&c, &u2),
        send(&c, Method::POST, &u3, Bytes::from_static(b"over h2"))
    );
    assert_eq!(a?.status, StatusCode::OK);
    assert_eq!(b?.text(), "aaabbbcccddd");
    assert_eq!(e?.text(), "over h2");
    Ok(())
}

#[tokio::test]
async fn websocket_echoes_text_and_binary() -> Result<()> {
    use tokio_tungstenite::tungstenite::Message;
    let app = App::start(&[])?;
    let (mut ws, resp) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws", app.port)).await?;
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws.send(Message::text("hello ws")).await?;
    assert_eq!(
        ws.next().await.context("closed")??,
        Message::text("hello ws")
    );
    ws.send(Message::binary(vec![0u8, 1, 2, 255])).await?;
    assert_eq!(
        ws.next().await.context("closed")??,
        Message::binary(vec![0u8, 1, 2, 255])
    );
    ws.close(None).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_zero() -> Result<()> {
    let mut app = App::start(&[])?;
    let c = http1();
    let url = app.url("/sleep?ms=1000");
    let c2 = c.clone();
    let slow = tokio::spawn(async move { get(&c2, &url).await });
    // Wait until the slow request is in flight (the /metrics request itself is the other one).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = get(&c, &app.url("/metrics")).await?.text();
        if m.contains("\ntestapp_inflight_requests 2\n") {
            break;
        }
        assert!(Instant::now() < deadline, "slow request never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    app.signal(nix::sys::signal::Signal::SIGTERM);
    let r = slow.await??;
    assert_eq!(r.status, StatusCode::OK, "in-flight request finished");
    assert_eq!(r.text(), "slept 1000 ms\n");
    let status = tokio::task::block_in_place(|| app.wait_exit())?;
    assert_eq!(status.code(), Some(0));
    app.wait_stderr("got SIGTERM").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_sigterm_keeps_serving_until_sigkill() -> Result<()> {
    let mut app = App::start(&[("TESTAPP_IGNORE_SIGTERM", "1")])?;
    let c = http1();
    app.signal(nix::sys::signal::Signal::SIGTERM);
    app.wait_stderr("got SIGTERM (ignored").await?;
    assert_eq!(get(&c, &app.url("/")).await?.status, StatusCode::OK);
    app.signal(nix::sys::signal::Signal::SIGKILL);
    let status = tokio::task::block_in_place(|| app.wait_exit())?;
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_endpoint_exits_with_the_code() -> Result<()> {
    let mut app = App::start(&[])?;
    let c = http1();
    assert!(
        get(&c, &app.url("/crash?code=3")).await.is_err(),
        "no response: the process exits"
    );
    let status = tokio::task::block_in_place(|| app.wait_exit())?;
    assert_eq!(status.code(), Some(3));
    Ok(())
}

#[test]
fn startup_environment_controls() -> Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_testapp"))
        .env("TESTAPP_CRASH_ON_START", "7")
        .env("PORT", "0")
        .stdin(Stdio::null())
        .output()?;
    assert_eq!(out.status.code(), Some(7));
    assert!(out.stdout.is_empty(), "never listened");
    assert!(String::from_utf8_lossy(&out.stderr).contains("TESTAPP_CRASH_ON_START"));

    let out = Command::new(env!("CARGO_BIN_EXE_testapp"))
        .env("PORT", "http")
        .stdin(Stdio::null())
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid PORT \"http\""));

    let out = Command::new(env!("CARGO_BIN_EXE_testapp"))
        .env("TESTAPP_START_DELAY_MS", "soon")
        .stdin(Stdio::null())
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TESTAPP_START_DELAY_MS"));

    let app = App::start(&[("TESTAPP_START_DELAY_MS", "50")])?;
    assert!(app.port > 0);
    assert!(
        app.stderr
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("delaying start by 50 ms"))
    );
    Ok(())
}

fn static_bin() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let bin = root.join("target-testapp-static/x86_64-unknown-linux-gnu/release/testapp");
    std::env::var_os("TESTAPP_STATIC_BIN")
        .map(Into::into)
        .unwrap_or(bin)
}

/// The static build serves from a root holding nothing but itself (no /etc, /proc, /dev, libc).
#[tokio::test]
async fn static_build_serves_from_an_empty_root() -> Result<()> {
    let bin = static_bin();
    if !bin.exists() || !nix::unistd::geteuid().is_root() {
        eprintln!(
            "skipped: needs root and the static build at {}",
            bin.display()
        );
        return Ok(());
    }
    let root = std::env::temp_dir().join(format!("testapp-empty-root-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    std::fs::copy(&bin, root.join("testapp"))?;
    let mut child = Command::new("/usr/sbin/chroot")
        .arg(&root)
        .arg("/testapp")
        .env_clear()
        .env("PORT", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running chroot")?;
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first)?;
    let stderr = Arc::new(Mutex::new(Vec::new()));
    drain(child.stderr.take().unwrap(), stderr.clone());
    let stdout = Arc::new(Mutex::new(Vec::new()));
    drain(out.into_inner(), stdout.clone());
    let port = first
        .trim()
        .rsplit(':')
        .next()
        .unwrap_or("")
        .parse()
        .with_context(|| format!("first line {first:?}"))?;
    let app = App {
        child,
        port,
        stdout,
        stderr,
    };
    let c = http1();
    assert_eq!(get(&c, &app.url("/")).await?.text(), "hello from testapp\n");
    assert_eq!(
        get(&c, &app.url("/env")).await?.json(),
        serde_json::json!({"PORT": "0"})
    );
    assert_eq!(get(&c, &app.url("/stdin")).await?.json()["at_eof"], true);
    // What needs /proc or /dev degrades to a clear answer, never a crash.
    assert_eq!(
        get(&c, &app.url("/cgroup")).await?.json()["version"],
        "none"
    );
    let m = get(&c, &app.url("/mounts")).await?;
    assert_eq!(m.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(m.text().contains("/proc/self/mountinfo"), "{}", m.text());
    let t = get(&c, &app.url("/tmp")).await?.json();
    assert_eq!(t["writable"], false);
    assert_eq!(
        get(&c, &app.url("/dev")).await?.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    // Without /proc/self/exe the children are started from argv[0].
    assert_eq!(
        get(&c, &app.url("/forkbomb?n=2")).await?.json()["started"],
        2
    );
    drop(app);
    std::fs::remove_dir_all(&root)?;
    Ok(())
}

#[test]
fn sigterm_during_a_slow_start_exits_zero_without_listening() -> Result<()> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_testapp"))
        .env("PORT", "0")
        .env("TESTAPP_START_DELAY_MS", "600000")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut err = BufReader::new(child.stderr.take().unwrap());
    // Wait for the delay to begin (the handlers are installed before it).
    let mut line = String::new();
    while !line.contains("delaying start") {
        line.clear();
        if err.read_line(&mut line)? == 0 {
            bail!("testapp exited before delaying");
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let out = child.wait_with_output()?;
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stdout.is_empty(),
        "never listened: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest)?;
    assert!(rest.contains("got SIGTERM before listening"), "{rest}");
    Ok(())
}

/// The static build (see the crate docs) must not need a dynamic loader: no PT_INTERP.
#[test]
fn static_build_has_no_interpreter_when_present() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let bin = root.join("target-testapp-static/x86_64-unknown-linux-gnu/release/testapp");
    let bin = std::env::var_os("TESTAPP_STATIC_BIN")
        .map(Into::into)
        .unwrap_or(bin);
    let Ok(elf) = std::fs::read(&bin) else {
        eprintln!("skipped: no static build at {}", bin.display());
        return Ok(());
    };
    assert_eq!(&elf[..4], b"\x7fELF");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into()?) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    let types: Vec<u32> = (0..phnum)
        .map(|i| u32::from_le_bytes(elf[phoff + i * phentsize..][..4].try_into().unwrap()))
        .collect();
    assert!(!types.is_empty());
    assert!(
        !types.contains(&3),
        "{} has a PT_INTERP: dynamically linked",
        bin.display()
    );
    Ok(())
}
