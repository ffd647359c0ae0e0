//! The suites. Each returns (how it measured, rows).

use crate::{Row, ensure_packages, percentile, run, sorted};
use anyhow::{Context, Result, bail};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed on drop.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first so `ferry server` stops its instances; then make sure.
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(15);
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

/// The sum over every thread of `pids` of what `read` makes of the thread's
/// /proc/<pid>/task/<tid> directory. Threads that end between two reads drop out, so the
/// suites read it only around runs of long-lived processes.
fn sum_over_threads(pids: &[u32], read: impl Fn(&Path) -> Option<u64>) -> u64 {
    pids.iter()
        .flat_map(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
        })
        .flatten()
        .filter_map(|t| read(&t.path()))
        .sum()
}

/// On-CPU time of every thread of `pids`, in nanoseconds (the first field of `schedstat`).
pub(crate) fn cpu_ns(pids: &[u32]) -> u64 {
    sum_over_threads(pids, |t| {
        std::fs::read_to_string(t.join("schedstat"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// User-space CPU time of every thread of `pids`, in nanoseconds (`utime` of each thread's
/// `stat`, in clock ticks of 10 ms: USER_HZ is 100 on Linux x86).
pub(crate) fn user_cpu_ns(pids: &[u32]) -> u64 {
    sum_over_threads(pids, |t| {
        let stat = std::fs::read_to_string(t.join("stat")).ok()?;
        // Fields after the command name (which may hold spaces) in parentheses; utime is
        // the 14th field of the line, the 12th after it.
        let after = &stat[stat.rfind(')')? + 1..];
        let ticks: u64 = after.split_whitespace().nth(11)?.parse().ok()?;
        Some(ticks * 10_000_000)
    })
}

/// Context switches, voluntary and not, of every thread of `pids` so far (`status`).
pub(crate) fn context_switches(pids: &[u32]) -> u64 {
    sum_over_threads(pids, |t| {
        let status = std::fs::read_to_string(t.join("status")).ok()?;
        Some(
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum(),
        )
    })
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Polls `GET /` on `target` every 0.5 ms from `since` until it answers (its status) or
/// `limit` has passed (0): a peer's spawn → first byte.
pub(crate) fn poll_first_byte(target: SocketAddr, since: Instant, limit: Duration) -> u16 {
    loop {
        if let Ok((s, _)) = first_byte(target, "localhost", "/") {
            return s;
        }
        if since.elapsed() > limit {
            return 0;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Sends `GET path` with `host` and returns (status, time to the first response byte).
pub(crate) fn first_byte(addr: SocketAddr, host: &str, path: &str) -> Result<(u16, Duration)> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut first = [0u8; 1];
    s.read_exact(&mut first)?;
    let elapsed = start.elapsed();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let head = String::from_utf8_lossy(&rest);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, elapsed))
}

pub(crate) fn wait_http(addr: SocketAddr, host: &str, path: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok((s, _)) = first_byte(addr, host, path)
            && (200..500).contains(&s)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{addr} did not answer {path}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn addresses(data: &Path, timeout: Duration) -> Result<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(b) = std::fs::read(data.join("addresses.json")) {
            return Ok(serde_json::from_slice(&b)?);
        }
        if Instant::now() > deadline {
            bail!("no addresses.json in {}", data.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A memory figure of /proc/<pid>/status (`VmRSS`, `VmHWM`, ...), in MiB.
pub(crate) fn status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

pub(crate) fn peak_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM")
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------------

pub fn scheduler() -> Result<(String, Vec<Row>)> {
    use ferry_api::{Cpu, Memory};
    use ferry_control::scheduler::{NodeCapacity, Request, place};
    let mut rows = Vec::new();
    for n in [100usize, 1_000, 10_000] {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let nodes: Vec<NodeCapacity> = (0..n)
            .map(|i| {
                let cpu = 2_000 + (rnd() % 62_000) as u32;
                let mem = (4u64 << 30) + rnd() % (252u64 << 30);
                NodeCapacity {
                    name: format!("node-{i}"),
                    cpu_allocatable: Cpu(cpu),
                    memory_allocatable: Memory(mem),
                    cpu_used: Cpu((rnd() % u64::from(cpu)) as u32),
                    memory_used: Memory(rnd() % mem),
                    cached_images: if i % 7 == 0 {
                        vec!["sha256:a".into()]
                    } else {
                        vec![]
                    },
                    schedulable: i % 50 != 0,
                }
            })
            .collect();
        let req = Request {
            cpu: Cpu(500),
            memory: Memory(256 << 20),
            image_digest: "sha256:a",
        };
        let mut times = Vec::new();
        for _ in 0..(2_000_000 / n).clamp(200, 20_000) {
            let t = Instant::now();
            let chosen = place(&nodes, &req);
            times.push(t.elapsed().as_secs_f64() * 1e6);
            std::hint::black_box(chosen.ok());
        }
        let s = sorted(times);
        rows.push(Row {
            metric: format!("placement p50, {n} nodes"),
            unit: "µs".into(),
            ferry: percentile(&s, 0.5),
            peer_name: None,
            peer: None,
            goal: None,
        });
        rows.push(Row {
            metric: format!("placement p99, {n} nodes"),
            unit: "µs".into(),
            ferry: percentile(&s, 0.99),
            peer_name: None,
            peer: None,
            goal: (n == 10_000).then(|| "≤ 1000 µs".into()),
        });
    }
    Ok(("`ferry_control::scheduler::place` over a synthetic node table (random capacity and use, 1 in 7 nodes with the image cached, 1 in 50 unschedulable), timed per call in-process; no peer.".into(), rows))
}

// ---------------------------------------------------------------------------------------------

pub(crate) fn write_random(path: &Path, mib: usize, mut seed: u64) -> Result<()> {
    let mut data = vec![0u8; mib << 20];
    for chunk in data.chunks_mut(8) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        chunk.copy_from_slice(&seed.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(path, data)?;
    Ok(())
}

pub(crate) fn skopeo(args: &[&str]) -> Result<Duration> {
    // The blob-info cache lets skopeo skip blobs it saw elsewhere; every run starts cold.
    let _ = std::fs::remove_file("/var/lib/containers/cache/blob-info-cache-v1.boltdb");
    let t = Instant::now();
    run(Command::new("skopeo").arg("--insecure-policy").args(args))?;
    Ok(t.elapsed())
}

// ---------------------------------------------------------------------------------------------

pub(crate) fn ferry_cli(ferry: &Path, api: &str, args: &[&str]) -> Result<String> {
    run(Command::new(ferry)
        .args(args)
        .env("FERRY_API", format!("http://{api}")))
}

pub fn cold_start(ferry: &Path, testapp: &Path, n: usize) -> Result<(String, Vec<Row>)> {
    ensure_packages(&["runc"])?;
    let work = tempfile::tempdir()?;
    let w = work.path();
    let server =
        crate::gateway::start_server(ferry, testapp, w, "fbench0", "10.93.0.1/24", None, &[])?;
    let (api, gateway, image) = (server.api.clone(), server.gateway, server.image.clone());
    let archive = w.join("app.tar");
    // Warm-up: the first start pulls and unpacks the image; every measured start finds it cached.
    ferry_cli(
        ferry,
        &api,
        &[
            "deploy",
            "cs-warm",
            "--image",
            &image,
            "--cpu",
            "0.1",
            "--memory",
            "64Mi",
            "--idle-grace",
            "3600",
        ],
    )?;
    let (status, _) = first_byte(gateway, "cs-warm.localhost", "/")?;
    anyhow::ensure!(status == 200, "warm-up request answered {status}");
    let mut ferry_ms = Vec::new();
    for i in 0..n {
        let name = format!("cs-{i}");
        ferry_cli(
            ferry,
            &api,
            &[
                "deploy",
                &name,
                "--image",
                &image,
                "--cpu",
                "0.1",
                "--memory",
                "64Mi",
                "--idle-grace",
                "3600",
            ],
        )?;
        let (status, t) = first_byte(gateway, &format!("{name}.localhost"), "/")?;
        anyhow::ensure!(status == 200, "{name}: cold request answered {status}");
        ferry_ms.push(ms(t));
        // Free the node's capacity for the next one (the instance drains and stops).
        ferry_cli(ferry, &api, &["delete", &name])?;
    }
    // Warm latency: keep-alive GETs through the gateway vs straight to the same instance.
    let desc: serde_json::Value =
        serde_json::from_str(&ferry_cli(ferry, &api, &["describe", "cs-warm", "--json"])?)?;
    let instance: SocketAddr = desc["instances"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["state"] == "ready"))
        .and_then(|i| i["address"].as_str())
        .context("cs-warm has no ready instance")?
        .parse()?;
    let via_gateway = sorted(keepalive_latencies(gateway, "cs-warm.localhost", 2000)?);
    let direct = sorted(keepalive_latencies(instance, "cs-warm.localhost", 2000)?);
    drop(server);

    let runc_ms = runc_first_byte(testapp, w, n)?;
    let (podman_ms, podman_version) = crate::podman::cold_starts(&archive, w, n)?;
    let (f, r, pm) = (sorted(ferry_ms), sorted(runc_ms), sorted(podman_ms));
    let peer = Some("runc run".to_string());
    let rows = vec![
        Row {
            metric: format!("cold start p50 ({n} starts)"),
            unit: "ms".into(),
            ferry: percentile(&f, 0.5),
            peer_name: peer.clone(),
            peer: Some(percentile(&r, 0.5)),
            goal: Some("≤ 15 ms".into()),
        },
        Row {
            metric: format!("cold start p99 ({n} starts)"),
            unit: "ms".into(),
            ferry: percentile(&f, 0.99),
            peer_name: peer,
            peer: Some(percentile(&r, 0.99)),
            goal: Some("≤ 40 ms".into()),
        },
    ];
    let mut rows = rows;
    for (what, p) in [("p50", 0.5), ("p99", 0.99)] {
        rows.push(Row {
            metric: format!("cold start {what} ({n} starts)"),
            unit: "ms".into(),
            ferry: percentile(&f, p),
            peer_name: Some(format!("podman run --rm ({podman_version}, runc)")),
            peer: Some(percentile(&pm, p)),
            goal: None,
        });
    }
    let peer = Some("straight to the instance".to_string());
    rows.push(Row {
        metric: "warm GET p50, keep-alive, 2000 sequential".into(),
        unit: "ms".into(),
        ferry: percentile(&via_gateway, 0.5),
        peer_name: peer.clone(),
        peer: Some(percentile(&direct, 0.5)),
        goal: Some("overhead ≤ 0.15 ms".into()),
    });
    rows.push(Row {
        metric: "warm GET p99, keep-alive, 2000 sequential".into(),
        unit: "ms".into(),
        ferry: percentile(&via_gateway, 0.99),
        peer_name: peer,
        peer: Some(percentile(&direct, 0.99)),
        goal: None,
    });
    Ok((
        format!(
            "Warm rows: 2000 sequential `GET /` on one keep-alive connection (after 50 unmeasured), through the gateway vs to the instance's own address. Cold rows: `ferry server` (release build) on loopback; {n} services deployed one by one with 0.1 vCPU and 64 MiB (image cached on the node after a warm-up service), and for each the first request `GET /` through the gateway, timed from connect to the first response byte (the gateway holds it while an instance starts: placement, sandbox, readiness); each service is deleted after its request. Peer: `runc run` (Debian runc 1.1) of a bundle with the same static testapp as its rootfs, host network, timed from spawn to the first byte of `GET /`, polled every 0.5 ms. Peer 2: `podman run --rm --network host` (runtime runc, cgroupfs) of the same image loaded from the same OCI archive, timed the same way."
        ),
        rows,
    ))
}

/// The peer of the start suites: `runc run` of a bundle whose rootfs is the static testapp at
/// /testapp, host network, `n` times; each timed from spawn to the first byte of `GET /`
/// (polled every 0.5 ms). Milliseconds, in run order. The bundle goes under `w`.
pub(crate) fn runc_first_byte(testapp: &Path, w: &Path, n: usize) -> Result<Vec<f64>> {
    ensure_packages(&["runc"])?;
    let bundle = w.join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs/tmp"))?;
    std::fs::copy(testapp, bundle.join("rootfs/testapp"))?;
    run(Command::new("runc").current_dir(&bundle).args(["spec"]))?;
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json"))?)?;
    let port = free_port()?;
    spec["process"]["args"] = serde_json::json!(["/testapp"]);
    spec["process"]["terminal"] = serde_json::json!(false);
    spec["process"]["env"]
        .as_array_mut()
        .context("env")?
        .push(serde_json::json!(format!("PORT={port}")));
    spec["root"]["readonly"] = serde_json::json!(false);
    if let Some(ns) = spec["linux"]["namespaces"].as_array_mut() {
        ns.retain(|n| n["type"] != "network");
    }
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&spec)?,
    )?;
    let target: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let mut runc_ms = Vec::new();
    for i in 0..n {
        let id = format!("ferry-bench-{}-{i}", std::process::id());
        let t = Instant::now();
        let mut child = Command::new("runc")
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let answered = poll_first_byte(target, t, Duration::from_secs(10));
        let elapsed = t.elapsed();
        let _ = Command::new("runc").args(["kill", &id, "KILL"]).status();
        let _ = child.wait();
        let _ = Command::new("runc").args(["delete", "-f", &id]).status();
        anyhow::ensure!(answered == 200, "runc run never answered");
        runc_ms.push(ms(elapsed));
    }
    Ok(runc_ms)
}

/// Sequential GETs on one keep-alive connection; per-request latency in ms.
pub(crate) fn keepalive_latencies(addr: SocketAddr, host: &str, n: usize) -> Result<Vec<f64>> {
    use std::io::BufRead;
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = s.try_clone()?;
    let mut r = std::io::BufReader::new(s);
    let mut out = Vec::with_capacity(n);
    for i in 0..n + 50 {
        let t = Instant::now();
        write!(w, "GET / HTTP/1.1\r\nHost: {host}\r\n\r\n")?;
        let mut len = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            r.read_line(&mut line)?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        if i >= 50 {
            out.push(ms(t.elapsed()));
        }
    }
    Ok(out)
}
