//! Interactive exec through `ferry server`: the exec WebSocket of the API (with and without a
//! TTY, resizes, stdin EOF, exit codes, errors) and `ferry exec -i/-t` from the CLI.

use anyhow::{Context, Result, bail};
use ferry_api::exec::{self, ExecStatus};
use ferry_tests::{TestCluster, ferry_bin};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What a session printed, by channel, and how it ended.
#[derive(Default, Debug)]
struct Seen {
    stdout: String,
    stderr: String,
    status: Option<ExecStatus>,
}

async fn open(c: &TestCluster, service: &str, query: &str) -> Result<Ws> {
    let url = format!(
        "{}/v1/services/{service}/exec?{query}",
        c.api.replace("http://", "ws://")
    );
    let (ws, _) = tokio_tungstenite::connect_async(url).await?;
    Ok(ws)
}

async fn send(ws: &mut Ws, channel: u8, data: &[u8]) -> Result<()> {
    ws.send(Message::Binary(exec::frame(channel, data).into()))
        .await?;
    Ok(())
}

/// Reads frames until stdout contains `want` (or the session ends, which fails).
async fn read_until(ws: &mut Ws, seen: &mut Seen, want: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen.stdout.contains(want) {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .with_context(|| format!("waiting for {want:?}; so far {seen:?}"))?;
        match m {
            Some(Ok(Message::Binary(b))) => take(seen, &b)?,
            Some(Ok(Message::Close(_))) | None => bail!("closed before {want:?}: {seen:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("stream: {e}"),
        }
    }
    Ok(())
}

fn take(seen: &mut Seen, b: &[u8]) -> Result<()> {
    match b.first().copied() {
        Some(exec::STDOUT) => seen.stdout.push_str(&String::from_utf8_lossy(&b[1..])),
        Some(exec::STDERR) => seen.stderr.push_str(&String::from_utf8_lossy(&b[1..])),
        Some(exec::STATUS) => seen.status = Some(serde_json::from_slice(&b[1..])?),
        other => bail!("unexpected channel {other:?}"),
    }
    Ok(())
}

/// Reads to the end of the session: the status frame, then the close.
async fn read_to_end(ws: &mut Ws, seen: &mut Seen) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, ws.next())
            .await
            .with_context(|| format!("waiting for the end; so far {seen:?}"))?
        {
            Some(Ok(Message::Binary(b))) => take(seen, &b)?,
            Some(Ok(Message::Close(_))) | None => return Ok(()),
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("stream: {e}"),
        }
    }
}

/// Host processes running `testapp tty-probe` in the cgroup of `instance` (tests run as root
/// on the host, which sees into every sandbox).
fn probes_in(instance: &str) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c.ends_with(b"tty-probe\0"))
                && std::fs::read_to_string(e.path().join("cgroup"))
                    .is_ok_and(|g| g.contains(instance))
        })
        .count()
}

async fn cluster() -> Result<TestCluster> {
    let c = TestCluster::start().await?;
    let image = c.push_testapp("testapp", "v1").await?;
    c.deploy(
        "sh",
        &json!({ "image": image, "cpu": "0.5", "memory": "128Mi", "min_instances": 1 }),
    )
    .await?;
    c.wait_for("a ready instance", Duration::from_secs(30), || async {
        Ok(c.instances("sh")
            .await?
            .iter()
            .any(|i| i.state == ferry_api::agent::InstanceState::Ready))
    })
    .await?;
    Ok(c)
}

const PROBE: &str = "command=/testapp&command=tty-probe";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exec_streams_with_and_without_a_tty() -> Result<()> {
    let c = cluster().await?;

    // A terminal of the asked size; input is echoed by the terminal and answered by the
    // command; a resize reaches it; the exit code comes back.
    let mut ws = open(
        &c,
        "sh",
        &format!("{PROBE}&tty=true&stdin=true&rows=40&cols=100"),
    )
    .await?;
    let mut seen = Seen::default();
    read_until(
        &mut ws,
        &mut seen,
        "isatty stdin=true stdout=true size=40x100",
    )
    .await?;
    // With a TTY, stderr goes to the terminal too.
    assert!(seen.stdout.contains("tty-probe: on stderr"), "{seen:?}");
    send(&mut ws, exec::STDIN, b"hello\r").await?;
    read_until(&mut ws, &mut seen, "got: hello").await?;
    send(&mut ws, exec::RESIZE, br#"{"rows":50,"cols":132}"#).await?;
    send(&mut ws, exec::STDIN, b"size\r").await?;
    read_until(&mut ws, &mut seen, "size=50x132").await?;
    send(&mut ws, exec::STDIN, b"exit 3\r").await?;
    read_to_end(&mut ws, &mut seen).await?;
    assert_eq!(
        seen.status.as_ref().and_then(|s| s.code),
        Some(3),
        "{seen:?}"
    );
    assert!(seen.stderr.is_empty(), "{seen:?}");

    // ^D on the terminal is the end of input.
    let mut ws = open(&c, "sh", &format!("{PROBE}&tty=true&stdin=true")).await?;
    let mut seen = Seen::default();
    read_until(&mut ws, &mut seen, "size=24x80").await?;
    send(&mut ws, exec::CLOSE, &[0]).await?;
    read_to_end(&mut ws, &mut seen).await?;
    assert!(seen.stdout.contains("eof"), "{seen:?}");
    assert_eq!(
        seen.status.as_ref().and_then(|s| s.code),
        Some(0),
        "{seen:?}"
    );

    // Pipes: no terminal, stderr on its own channel, stdin EOF by the close frame.
    let mut ws = open(&c, "sh", &format!("{PROBE}&stdin=true")).await?;
    let mut seen = Seen::default();
    read_until(
        &mut ws,
        &mut seen,
        "isatty stdin=false stdout=false size=none",
    )
    .await?;
    send(&mut ws, exec::STDIN, b"one\ntwo\n").await?;
    send(&mut ws, exec::CLOSE, &[0]).await?;
    read_to_end(&mut ws, &mut seen).await?;
    assert!(seen.stdout.contains("got: one\ngot: two\neof"), "{seen:?}");
    assert_eq!(seen.stderr, "tty-probe: on stderr\n");
    assert_eq!(
        seen.status.as_ref().and_then(|s| s.code),
        Some(0),
        "{seen:?}"
    );

    // Much more input than the pipes and queues hold, to a command that answers every line:
    // input and output flow at once, neither waits for the other.
    let ws = open(&c, "sh", &format!("{PROBE}&stdin=true")).await?;
    let (mut tx, mut rx) = ws.split();
    const LINES: usize = 4096;
    let sender = tokio::spawn(async move {
        let line = format!("{}\n", "x".repeat(999));
        for _ in 0..LINES / 64 {
            let chunk = line.repeat(64);
            tx.send(Message::Binary(
                exec::frame(exec::STDIN, chunk.as_bytes()).into(),
            ))
            .await?;
        }
        tx.send(Message::Binary(exec::frame(exec::CLOSE, &[0]).into()))
            .await?;
        anyhow::Ok(tx)
    });
    let mut seen = Seen::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.status.is_none() {
        match tokio::time::timeout_at(deadline, rx.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => take(&mut seen, &b)?,
            Ok(Some(Ok(_))) => {}
            other => bail!("stream ended early: {other:?}; {} bytes", seen.stdout.len()),
        }
    }
    let _tx = sender.await??;
    assert_eq!(seen.stdout.matches("got: x").count(), LINES);
    assert!(seen.stdout.ends_with("eof\n"));
    assert_eq!(seen.status.as_ref().and_then(|s| s.code), Some(0));

    // Without stdin the command reads /dev/null: at EOF at once.
    let mut ws = open(&c, "sh", PROBE).await?;
    let mut seen = Seen::default();
    read_to_end(&mut ws, &mut seen).await?;
    assert!(seen.stdout.ends_with("eof\n"), "{seen:?}");

    // A client that goes away mid-session takes its command along; the instance serves on.
    let instance = c.instances("sh").await?[0].id.clone();
    let mut ws = open(&c, "sh", &format!("{PROBE}&tty=true&stdin=true")).await?;
    read_until(&mut ws, &mut Seen::default(), "isatty").await?;
    assert_eq!(probes_in(&instance), 1);
    drop(ws);
    c.wait_for("the command to go", Duration::from_secs(5), || async {
        Ok(probes_in(&instance) == 0)
    })
    .await?;
    assert_eq!(c.get("sh", "/").await?.status(), 200);
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exec_errors_are_http_statuses() -> Result<()> {
    let c = cluster().await?;
    let status = |q: String, service: &'static str| {
        let url = format!(
            "{}/v1/services/{service}/exec?{q}",
            c.api.replace("http://", "ws://")
        );
        async move {
            match tokio_tungstenite::connect_async(url).await {
                Ok(_) => Ok::<_, anyhow::Error>((101, String::new())),
                Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Ok((
                    r.status().as_u16(),
                    String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).into_owned(),
                )),
                Err(e) => Err(e.into()),
            }
        }
    };
    let (s, body) = status("tty=true".into(), "sh").await?;
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("no command"), "{body}");
    let (s, body) = status(format!("{PROBE}&rows=10"), "sh").await?;
    assert_eq!(s, 400, "{body}");
    let (s, body) = status(PROBE.into(), "ghost").await?;
    assert_eq!(s, 404, "{body}");
    let (s, body) = status("command=/no/such/binary".into(), "sh").await?;
    assert_eq!(s, 502, "{body}");
    assert!(body.contains("exec_failed"), "{body}");
    // Not an upgrade: the answer says what to do.
    let r = c
        .http
        .get(format!("{}/v1/services/sh/exec?{PROBE}", c.api))
        .send()
        .await?;
    assert_eq!(r.status(), 426);
    assert!(r.text().await?.contains("WebSocket"));
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ferry_exec_cli_interactive_and_tty() -> Result<()> {
    let c = cluster().await?;
    let ferry = ferry_bin()?;
    // -i: stdin streamed, exit code passed on.
    let mut child = tokio::process::Command::new(&ferry)
        .args(["exec", "-i", "sh", "--", "/testapp", "tty-probe"])
        .env("FERRY_API", &c.api)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().context("stdin")?;
        stdin.write_all(b"ping\nexit 7\n").await?;
    }
    let out = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output()).await??;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(7), "{text} {out:?}");
    assert!(text.contains("isatty stdin=false"), "{text}");
    assert!(text.contains("got: ping"), "{text}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "tty-probe: on stderr\n"
    );

    // -it under `script`, which gives the CLI a terminal of its own: the remote command sees
    // a terminal, and the CLI's raw mode passes the keystrokes through.
    let cmd = format!("{} exec -it sh -- /testapp tty-probe", ferry.display());
    let mut child = tokio::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("FERRY_API", &c.api)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let mut text = String::new();
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut step = 0;
    loop {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        if step == 0 && text.contains("isatty stdin=true stdout=true") {
            stdin.write_all(b"hi there\r").await?;
            step = 1;
        }
        if step == 1 && text.contains("got: hi there") {
            stdin.write_all(b"exit 4\r").await?;
            step = 2;
        }
        let n = tokio::time::timeout_at(deadline, stdout.read(&mut buf))
            .await
            .with_context(|| format!("ferry exec -it; so far {text:?}"))??;
        if n == 0 {
            break;
        }
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await??;
    assert_eq!(step, 2, "{text}");
    assert_eq!(status.code(), Some(4), "{text}");
    c.stop().await
}
