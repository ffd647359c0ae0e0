//! `ferry server` killed with SIGKILL and started again on the same data dir converges: the
//! desired state survives, what should run runs again, and what the killed run left is gone;
//! metering across the kill loses and duplicates nothing. Also the CLI's `deploy --wait`
//! against such a server (the same helpers).

use anyhow::{Context, Result, bail, ensure};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `ferry server` on `data` with its instances on `bridge`/`subnet` (one pair per
/// test: the tests of this file run side by side).
fn start(data: &Path, bridge: &str, subnet: &str) -> Result<(Server, serde_json::Value)> {
    let _ = std::fs::remove_file(data.join("addresses.json"));
    let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "server",
            "--api-addr",
            "127.0.0.1:0",
            "--gateway-addr",
            "127.0.0.1:0",
            "--registry-addr",
            "127.0.0.1:0",
        ])
        .args(["--bridge", bridge, "--subnet", subnet, "--data-dir"])
        .arg(data)
        .env("FERRY_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(b) = std::fs::read(data.join("addresses.json")) {
            return Ok((server, serde_json::from_slice(&b)?));
        }
        ensure!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ferry(api: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env("FERRY_API", format!("http://{api}"))
        .output()?;
    ensure!(
        out.status.success(),
        "ferry {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn describe(api: &str, name: &str) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&ferry(
        api,
        &["describe", name, "--json"],
    )?)?)
}

fn wait_ready(api: &str, name: &str) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = describe(api, name)?;
        if let Some(i) = s["instances"]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["state"] == "ready"))
        {
            return Ok(i.clone());
        }
        if Instant::now() > deadline {
            bail!("no ready instance of {name}: {s}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn get(gateway: &str, host: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(gateway)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    ensure!(out.starts_with("HTTP/1.1 200"), "{out}");
    Ok(out)
}

/// Builds the testapp image with the CLI, pushes it to the server's registry and deploys it
/// as `name` with one instance kept running.
fn push_and_deploy(api: &str, reg: &str, dir: &Path, testapp: &str, name: &str) -> Result<()> {
    let archive = dir.join("app.tar");
    let archive_s = archive.display().to_string();
    ferry(
        api,
        &[
            "image",
            "build",
            "-o",
            &archive_s,
            "--binary",
            testapp,
            "--binary-path",
            "/testapp",
            "--tag",
            "v1",
        ],
    )?;
    ferry(
        api,
        &[
            "image",
            "push",
            &format!("{archive_s}:v1"),
            &format!("{reg}/app:v1"),
        ],
    )?;
    ferry(
        api,
        &[
            "deploy",
            name,
            "--image",
            &format!("{reg}/app:v1"),
            "--cpu",
            "0.2",
            "--memory",
            "64Mi",
            "--min",
            "1",
        ],
    )?;
    Ok(())
}

#[test]
fn sigkill_then_restart_converges() -> Result<()> {
    let testapp =
        std::env::var("TESTAPP_STATIC_BIN").context("TESTAPP_STATIC_BIN: run scripts/test")?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let (server, a) = start(&data, "frst0", "10.95.0.1/24")?;
    let (api, gw, reg) = (
        a["api"].as_str().unwrap().to_string(),
        a["gateway"].as_str().unwrap().to_string(),
        a["registry"].as_str().unwrap().to_string(),
    );
    push_and_deploy(&api, &reg, dir.path(), &testapp, "keep")?;
    let before = wait_ready(&api, "keep")?;
    let body = get(&gw, "keep.localhost", "/env")?;
    assert!(body.contains("\"K_SERVICE\":\"keep\""), "{body}");

    // SIGKILL: nothing of the server runs its shutdown path.
    let mut server = server;
    server.0.kill()?;
    server.0.wait()?;
    let old_dir = data
        .join("agent/instances")
        .join(before["id"].as_str().unwrap());
    assert!(
        old_dir.exists(),
        "the killed run left its instance behind, as a crash would"
    );

    let (_server, a) = start(&data, "frst0", "10.95.0.1/24")?;
    let (api, gw) = (
        a["api"].as_str().unwrap().to_string(),
        a["gateway"].as_str().unwrap().to_string(),
    );
    let after = wait_ready(&api, "keep")?;
    assert_ne!(
        after["id"], before["id"],
        "a new instance replaces the one of the killed run"
    );
    assert!(
        !old_dir.exists(),
        "the killed run's instance was cleaned up"
    );
    let body = get(&gw, "keep.localhost", "/env")?;
    assert!(body.contains("\"K_SERVICE\":\"keep\""), "{body}");
    // The revision history survived too.
    let s = describe(&api, "keep")?;
    assert_eq!(s["latest_revision"], "keep-00001");
    Ok(())
}

/// The usage events of `service`, as `GET /v1/usage/events` returns them.
fn events(api: &str, service: &str) -> Result<Vec<serde_json::Value>> {
    let body = get(api, "", &format!("/v1/usage/events?service={service}"))?;
    let json = body.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    // Connection: close with a chunked body: take the JSON array between its brackets.
    let (start, end) = (
        json.find('[').context("events array")?,
        json.rfind(']').context("events array")?,
    );
    Ok(serde_json::from_str(&json[start..=end])?)
}

fn requests(ev: &[serde_json::Value]) -> u64 {
    ev.iter()
        .filter(|e| e["kind"] == "requests")
        .map(|e| e["count"].as_u64().unwrap_or(0))
        .sum()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Polls `f` every 100 ms until it holds or `secs` pass.
fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f()? {
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[test]
fn sigkill_mid_metering_loses_and_duplicates_nothing() -> Result<()> {
    const BEFORE: u64 = 20;
    const AFTER: u64 = 15;
    let testapp =
        std::env::var("TESTAPP_STATIC_BIN").context("TESTAPP_STATIC_BIN: run scripts/test")?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let (mut server, a) = start(&data, "frst1", "10.95.1.1/24")?;
    let s = |k: &str| a[k].as_str().unwrap_or_default().to_string();
    let (api, gw, reg) = (s("api"), s("gateway"), s("registry"));
    push_and_deploy(&api, &reg, dir.path(), &testapp, "metered")?;
    let first = wait_ready(&api, "metered")?;
    for _ in 0..BEFORE {
        get(&gw, "metered.localhost", "/")?;
    }
    // The gateway reports every second: once its counts are in the database, the kill comes
    // with the instance running and its usage event open.
    eventually(10, "the first requests to be metered", || {
        Ok(requests(&events(&api, "metered")?) == BEFORE)
    })?;
    let open = events(&api, "metered")?;
    let inst = |ev: &[serde_json::Value], id: &str| {
        ev.iter()
            .find(|e| e["kind"] == "instance" && e["instance"] == id)
            .cloned()
    };
    let first_id = first["id"].as_str().context("instance id")?.to_string();
    let e = inst(&open, &first_id).context("the running instance has a usage event")?;
    assert!(e["stop_ms"].is_null(), "open while it runs: {e}");
    let started = e["start_ms"].as_u64().context("start_ms")?;
    std::thread::sleep(Duration::from_millis(1500));
    let killed_at = now_ms();
    server.0.kill()?;
    server.0.wait()?;

    let (_server, a) = start(&data, "frst1", "10.95.1.1/24")?;
    let s = |k: &str| a[k].as_str().unwrap_or_default().to_string();
    let (api, gw) = (s("api"), s("gateway"));
    let second = wait_ready(&api, "metered")?;
    for _ in 0..AFTER {
        get(&gw, "metered.localhost", "/")?;
    }
    eventually(10, "the later requests to be metered", || {
        Ok(requests(&events(&api, "metered")?) >= BEFORE + AFTER)
    })?;
    ferry(&api, &["delete", "metered"])?;
    let second_id = second["id"].as_str().context("instance id")?.to_string();
    eventually(15, "the second instance's event to close", || {
        Ok(inst(&events(&api, "metered")?, &second_id).is_some_and(|e| !e["stop_ms"].is_null()))
    })?;

    let ev = events(&api, "metered")?;
    // Nothing counted twice, nothing lost: every request that was answered is there once.
    assert_eq!(requests(&ev), BEFORE + AFTER, "{ev:?}");
    let mut ids: Vec<&str> = ev.iter().filter_map(|e| e["id"].as_str()).collect();
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "event ids are unique: {ev:?}");
    // One event per instance, both closed. The killed run's instance is billed up to when it
    // was last seen alive: at most one sample interval (1 s) before the kill, and not after.
    let instances: Vec<_> = ev.iter().filter(|e| e["kind"] == "instance").collect();
    assert_eq!(instances.len(), 2, "{instances:?}");
    let e = inst(&ev, &first_id).context("first instance event")?;
    assert_eq!(e["start_ms"].as_u64(), Some(started), "{e}");
    let stop = e["stop_ms"]
        .as_u64()
        .context("the killed run's event was closed")?;
    assert!(
        stop <= killed_at && killed_at - stop <= 2_000,
        "stop {stop}, killed at {killed_at}: {e}"
    );
    Ok(())
}

/// `ferry deploy --wait` fails with the new revision's own failure, and a deploy that fixes a
/// broken revision waits for itself rather than failing with the broken one's reason.
#[test]
fn deploy_wait_judges_the_new_revision_by_its_own_failure() -> Result<()> {
    let testapp =
        std::env::var("TESTAPP_STATIC_BIN").context("TESTAPP_STATIC_BIN: run scripts/test")?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let (_server, a) = start(&data, "frst2", "10.95.2.1/24")?;
    let (api, reg) = (a["api"].as_str().unwrap(), a["registry"].as_str().unwrap());
    push_and_deploy(api, reg, dir.path(), &testapp, "w")?;
    wait_ready(api, "w")?;
    let deploy = |extra: &[&str]| {
        let mut args = vec!["deploy", "w", "--wait"];
        args.extend_from_slice(extra);
        ferry(api, &args)
    };
    let err = format!("{:#}", deploy(&["--command", "/nope"]).unwrap_err());
    assert!(
        err.contains("w-00002") && err.contains("\"/nope\": not found"),
        "{err}"
    );
    // `describe` shows it under the revision it belongs to.
    let text = ferry(api, &["describe", "w"])?;
    let after = text.split("  w-00002  ").nth(1).unwrap_or_default();
    assert!(
        after.contains("    last failure: start failed: executable \"/nope\""),
        "{text}"
    );
    // The fix: w-00002's failure stays on record, but w-00003 is waited for and takes over.
    deploy(&["--command", "/testapp"])?;
    let s = describe(api, "w")?;
    assert_eq!(s["traffic"][0]["revision"], "w-00003", "{s}");
    assert_eq!(s["traffic"][0]["percent"], 100, "{s}");
    Ok(())
}
