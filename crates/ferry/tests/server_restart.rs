//! `ferry server` killed with SIGKILL and started again on the same data dir converges: the
//! desired state survives, what should run runs again, and what the killed run left is gone.

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

fn start(data: &Path) -> Result<(Server, serde_json::Value)> {
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
        .args([
            "--bridge",
            "frst0",
            "--subnet",
            "10.95.0.1/24",
            "--data-dir",
        ])
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

#[test]
fn sigkill_then_restart_converges() -> Result<()> {
    let testapp =
        std::env::var("TESTAPP_STATIC_BIN").context("TESTAPP_STATIC_BIN: run scripts/test")?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let (server, a) = start(&data)?;
    let (api, gw, reg) = (
        a["api"].as_str().unwrap().to_string(),
        a["gateway"].as_str().unwrap().to_string(),
        a["registry"].as_str().unwrap().to_string(),
    );
    let archive = dir.path().join("app.tar");
    let archive_s = archive.display().to_string();
    ferry(
        &api,
        &[
            "image",
            "build",
            "-o",
            &archive_s,
            "--binary",
            &testapp,
            "--binary-path",
            "/testapp",
            "--tag",
            "v1",
        ],
    )?;
    ferry(
        &api,
        &[
            "image",
            "push",
            &format!("{archive_s}:v1"),
            &format!("{reg}/app:v1"),
        ],
    )?;
    ferry(
        &api,
        &[
            "deploy",
            "keep",
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

    let (_server, a) = start(&data)?;
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
