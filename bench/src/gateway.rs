//! The gateway suite: warm latency and throughput through Ferry's gateway, straight to the
//! instance, and through nginx as a reverse proxy to the same instance, with wrk at fixed
//! connection counts.

use crate::suites::{
    Proc, addresses, context_switches, cpu_ns, ferry_cli, free_port, user_cpu_ns, wait_http,
};
use crate::{Row, ensure_packages, percentile, run, sorted};
use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Connection counts wrk runs at; the first one is the latency row.
const CONNECTIONS: [u32; 3] = [1, 16, 64];
/// Seconds per wrk run.
const SECONDS: u32 = 4;

/// What one wrk run measured.
#[derive(Debug, Clone, Copy)]
struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: f64,
    /// CPU time the platform's processes spent during the run, per request (µs).
    cpu_us_per_request: f64,
    /// Of it, in user space (µs; the rest is the kernel's).
    user_us_per_request: f64,
}

/// `parent` and its child processes (nginx's master and workers).
fn with_children(parent: u32) -> Vec<u32> {
    let mut pids = vec![parent];
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ')'.
        let ppid = std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .nth(1)?
                    .parse::<u32>()
                    .ok()
            });
        if ppid == Some(parent) {
            pids.push(pid);
        }
    }
    pids
}

const WRK_LUA: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("FERRYBENCH %d %d %.1f %.1f %d %d\n", summary.requests,
    summary.duration, latency:percentile(50), latency:percentile(99), e.status,
    e.connect + e.read + e.write + e.timeout))
end
"#;

fn wrk(script: &Path, target: SocketAddr, host: &str, conns: u32, secs: u32) -> Result<Wrk> {
    let out = run(Command::new("wrk")
        .args(["-t1", &format!("-c{conns}"), &format!("-d{secs}s")])
        .arg("-s")
        .arg(script)
        .args(["-H", &format!("Host: {host}")])
        .arg(format!("http://{target}/")))?;
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("FERRYBENCH "))
        .with_context(|| format!("wrk printed no summary:\n{out}"))?;
    let f: Vec<f64> = line
        .split_whitespace()
        .map(|x| x.parse::<f64>().unwrap_or(f64::NAN))
        .collect();
    anyhow::ensure!(f.len() == 6, "wrk summary {line:?}");
    anyhow::ensure!(
        f[4] == 0.0 && f[5] == 0.0,
        "wrk against {target} ({conns} connections): {} non-2xx answers, {} socket errors",
        f[4],
        f[5]
    );
    Ok(Wrk {
        rps: f[0] / (f[1] / 1e6),
        p50_ms: f[2] / 1000.0,
        p99_ms: f[3] / 1000.0,
        requests: f[0],
        cpu_us_per_request: f64::NAN,
        user_us_per_request: f64::NAN,
    })
}

/// `ferry server` on loopback with the static testapp pushed to its registry. With `log`, the
/// server's output goes there at `FERRY_LOG` (default info); without, only warnings, to stderr.
pub(crate) struct Server {
    pub proc: Proc,
    pub api: String,
    pub gateway: SocketAddr,
    pub image: String,
}

/// Starts `ferry server` on free loopback ports with `bridge` and `subnet` (and `extra`
/// flags), builds the testapp image and pushes it to the server's registry.
pub(crate) fn start_server(
    ferry: &Path,
    testapp: &Path,
    work: &Path,
    bridge: &str,
    subnet: &str,
    log: Option<std::fs::File>,
    extra: &[&str],
) -> Result<Server> {
    std::fs::create_dir_all(work)?;
    let data = work.join("data");
    let mut cmd = Command::new(ferry);
    match log {
        Some(f) => {
            let level = std::env::var("FERRY_LOG").unwrap_or_else(|_| "info".into());
            cmd.env("FERRY_LOG", level).stdout(f.try_clone()?).stderr(f);
        }
        None => {
            cmd.env("FERRY_LOG", "warn").stdout(Stdio::null());
        }
    }
    let proc = Proc(
        cmd.args([
            "server",
            "--api-addr",
            "127.0.0.1:0",
            "--gateway-addr",
            "127.0.0.1:0",
            "--registry-addr",
            "127.0.0.1:0",
            "--bridge",
            bridge,
            "--subnet",
            subnet,
            "--data-dir",
        ])
        .arg(&data)
        .args(extra)
        .spawn()?,
    );
    let a = addresses(&data, Duration::from_secs(30))?;
    let api = a["api"].as_str().context("api")?.to_string();
    let gateway: SocketAddr = a["gateway"].as_str().context("gateway")?.parse()?;
    let registry = a["registry"].as_str().context("registry")?.to_string();
    let archive = work.join("app.tar");
    run(Command::new(ferry)
        .args(["image", "build", "--binary"])
        .arg(testapp)
        .args(["--binary-path", "/testapp", "--port", "8080"])
        .args(["--tag", "v1", "-o"])
        .arg(&archive))?;
    let image = format!("{registry}/testapp:v1");
    run(Command::new(ferry)
        .args(["image", "push"])
        .arg(format!("{}:v1", archive.display()))
        .arg(&image))?;
    Ok(Server {
        proc,
        api,
        gateway,
        image,
    })
}

/// Removes the node link `ferry server` made for the suite (gateway address `gateway`/24),
/// its routes and its outbound NAT rule.
fn remove_link(link: &str, gateway: std::net::Ipv4Addr) {
    let _ = ferry_agent::net::teardown_host(&ferry_agent::net::NetConfig {
        bridge: link.into(),
        gateway,
        prefix: 24,
    });
}

/// The address of a ready instance of `service`.
pub(crate) fn ready_instance(ferry: &Path, api: &str, service: &str) -> Result<SocketAddr> {
    let desc: serde_json::Value =
        serde_json::from_str(&ferry_cli(ferry, api, &["describe", service, "--json"])?)?;
    Ok(desc["instances"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["state"] == "ready"))
        .and_then(|i| i["address"].as_str())
        .with_context(|| format!("{service} has no ready instance"))?
        .parse()?)
}

/// nginx as a reverse proxy to `upstream`, with upstream keep-alive and the usual forwarding
/// headers, as its own master with `worker_processes auto` (one per core).
fn start_nginx(dir: &Path, port: u16, upstream: SocketAddr) -> Result<Proc> {
    run_nginx(
        dir,
        &format!(
            "  upstream app {{ server {upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Host $host;
      proxy_set_header X-Forwarded-Proto $scheme;
    }}
  }}
"
        ),
    )
}

/// nginx in the foreground as its own master (`worker_processes auto`, no access log), its
/// pid, error log, temporary files and config in `dir`, with `http` inside its `http` block.
pub(crate) fn run_nginx(dir: &Path, http: &str) -> Result<Proc> {
    std::fs::create_dir_all(dir)?;
    let d = dir.display();
    let conf = format!(
        "user root;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
{http}}}
"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    Ok(Proc(
        Command::new("nginx")
            .arg("-c")
            .arg(&path)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .spawn()?,
    ))
}

fn nginx_version() -> String {
    Command::new("nginx")
        .arg("-v")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .and_then(|s| s.strip_prefix("nginx version: ").map(str::to_string))
        .unwrap_or_else(|| "nginx".into())
}

/// One instance for the whole run, with a full core and no concurrency limit, so that every
/// path ends at the same process and the instance is not what limits throughput.
fn deploy_gw(ferry: &Path, server: &Server) -> Result<SocketAddr> {
    ferry_cli(
        ferry,
        &server.api,
        &[
            "deploy",
            "gw",
            "--image",
            &server.image,
            "--cpu",
            "1",
            "--memory",
            "256Mi",
            "--min",
            "1",
            "--max",
            "1",
            "--concurrency",
            "0",
            "--idle-grace",
            "3600",
        ],
    )?;
    wait_http(server.gateway, "gw.localhost", "/", Duration::from_secs(30))?;
    ready_instance(ferry, &server.api, "gw")
}

/// With `baseline`, a second `ferry server` of that binary (an earlier build) runs beside,
/// with an instance of its own, and its gateway is measured in the same rotation: the
/// before/after rows compare the two gateways.
pub fn gateway(
    ferry: &Path,
    testapp: &Path,
    runs: usize,
    baseline: Option<&Path>,
) -> Result<(String, Vec<Row>)> {
    ensure_packages(&["wrk", "nginx-light"])?;
    let work = tempfile::tempdir()?;
    let w = work.path();
    let server = start_server(
        ferry,
        testapp,
        &w.join("current"),
        "fbgw0",
        "10.98.0.1/24",
        None,
        &[],
    )?;
    let instance = deploy_gw(ferry, &server)?;
    let before = match baseline {
        Some(b) => {
            let s = start_server(
                b,
                testapp,
                &w.join("baseline"),
                "fbgw1",
                "10.98.1.1/24",
                None,
                &[],
            )?;
            deploy_gw(b, &s)?;
            Some(s)
        }
        None => None,
    };
    let nginx_port = free_port()?;
    let nginx_addr: SocketAddr = format!("127.0.0.1:{nginx_port}").parse()?;
    let nginx = start_nginx(&w.join("nginx"), nginx_port, instance)?;
    wait_http(nginx_addr, "gw.localhost", "/", Duration::from_secs(10))?;
    let script = w.join("summary.lua");
    std::fs::write(&script, WRK_LUA)?;

    // The processes whose CPU time counts against each path: the proxy's, and the Ferry
    // server's on every path (it pumps the instance's per-request log lines whichever path the
    // request took).
    let ferry_pid = server.proc.0.id();
    let mut nginx_pids = with_children(nginx.0.id());
    nginx_pids.push(ferry_pid);
    let mut targets = vec![
        ("gateway", server.gateway, vec![ferry_pid]),
        ("direct", instance, vec![ferry_pid]),
        ("nginx", nginx_addr, nginx_pids),
    ];
    if let Some(b) = &before {
        targets.push(("gateway (baseline build)", b.gateway, vec![b.proc.0.id()]));
    }
    let nt = targets.len();
    // results[target][connections index] = one Wrk per run
    let mut results: Vec<Vec<Vec<Wrk>>> = vec![vec![Vec::new(); CONNECTIONS.len()]; nt];
    // Warm every path (connection pools, nginx workers, page cache) before measuring.
    for (name, addr, _) in &targets {
        wrk(&script, *addr, "gw.localhost", 16, 1).with_context(|| format!("warming {name}"))?;
    }
    for r in 0..runs {
        for (ci, &c) in CONNECTIONS.iter().enumerate() {
            // Rotate which target goes first, so none always follows the same one.
            for k in 0..nt {
                let t = (k + r + ci) % nt;
                let pids = &targets[t].2;
                let (cpu_before, user_before, cs_before) =
                    (cpu_ns(pids), user_cpu_ns(pids), context_switches(pids));
                let mut m = wrk(&script, targets[t].1, "gw.localhost", c, SECONDS)
                    .with_context(|| format!("{} at {c} connections", targets[t].0))?;
                let pids = &targets[t].2;
                let cpu = cpu_ns(pids).saturating_sub(cpu_before);
                let user = user_cpu_ns(pids).saturating_sub(user_before);
                let cs = context_switches(pids).saturating_sub(cs_before);
                m.cpu_us_per_request = cpu as f64 / 1e3 / m.requests.max(1.0);
                m.user_us_per_request = user as f64 / 1e3 / m.requests.max(1.0);
                eprintln!(
                    "gateway run {r}: {} c={c}: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, {:.1} µs CPU ({:.1} in user space) and {:.2} context switches a request",
                    targets[t].0,
                    m.rps,
                    m.p50_ms,
                    m.p99_ms,
                    m.cpu_us_per_request,
                    m.user_us_per_request,
                    cs as f64 / m.requests.max(1.0)
                );
                results[t][ci].push(m);
            }
        }
    }
    drop(nginx);
    drop(server);
    drop(before);
    remove_link("fbgw0", std::net::Ipv4Addr::new(10, 98, 0, 1));
    remove_link("fbgw1", std::net::Ipv4Addr::new(10, 98, 1, 1));

    let med = |t: usize, ci: usize, f: fn(&Wrk) -> f64| {
        percentile(&sorted(results[t][ci].iter().map(f).collect()), 0.5)
    };
    let (gw, direct, ngx) = (0, 1, 2);
    let nginx_name = Some(nginx_version());
    let direct_name = Some("straight to the instance".to_string());
    let mut rows = Vec::new();
    let p50 = |w: &Wrk| w.p50_ms;
    let p99 = |w: &Wrk| w.p99_ms;
    let rps = |w: &Wrk| w.rps;
    rows.push(Row {
        metric: "p50 overhead over direct, 1 connection (proxy p50 − direct p50)".into(),
        unit: "ms".into(),
        ferry: med(gw, 0, p50) - med(direct, 0, p50),
        peer_name: nginx_name.clone(),
        peer: Some(med(ngx, 0, p50) - med(direct, 0, p50)),
        goal: Some("≤ 0.15 ms".into()),
    });
    // Target `a` against target `b` (indices into `targets`) at connection count `ci`.
    let vs =
        |metric: String, unit: &str, (a, b): (usize, usize), ci, f, name: &Option<String>| Row {
            metric,
            unit: unit.into(),
            ferry: med(a, ci, f),
            peer_name: name.clone(),
            peer: Some(med(b, ci, f)),
            goal: None,
        };
    for (ci, &c) in CONNECTIONS.iter().enumerate() {
        for (peer, name) in [(ngx, &nginx_name), (direct, &direct_name)] {
            for (what, f, unit) in [
                ("latency p50", p50 as fn(&Wrk) -> f64, "ms"),
                ("latency p99", p99, "ms"),
                ("throughput", rps, "req/s"),
            ] {
                let last = c == *CONNECTIONS.last().unwrap_or(&1);
                let mut row = vs(
                    format!("{what}, {c} connections"),
                    unit,
                    (gw, peer),
                    ci,
                    f,
                    name,
                );
                row.goal = (peer == ngx && what == "throughput" && last).then(|| "≥ peer".into());
                rows.push(row);
            }
        }
    }
    let cpu = |w: &Wrk| w.cpu_us_per_request;
    let user = |w: &Wrk| w.user_us_per_request;
    for (ci, &c) in CONNECTIONS.iter().enumerate().skip(1) {
        let n = &nginx_name;
        rows.push(vs(
            format!("platform CPU per request, {c} connections"),
            "µs",
            (gw, ngx),
            ci,
            cpu,
            n,
        ));
        rows.push(vs(
            format!("of it in user space, {c} connections"),
            "µs",
            (gw, ngx),
            ci,
            user,
            n,
        ));
        rows.push(vs(
            format!(
                "platform CPU per request, {c} connections (no proxy: the Ferry server's own share)"
            ),
            "µs",
            (gw, direct),
            ci,
            cpu,
            &direct_name,
        ));
    }
    if baseline.is_some() {
        let (bl, name) = (3, Some("baseline build's gateway".to_string()));
        rows.push(Row {
            metric: "p50 overhead over direct, 1 connection: this build vs the baseline build"
                .into(),
            unit: "ms".into(),
            ferry: med(gw, 0, p50) - med(direct, 0, p50),
            peer_name: name.clone(),
            peer: Some(med(bl, 0, p50) - med(direct, 0, p50)),
            goal: None,
        });
        for (ci, &c) in CONNECTIONS.iter().enumerate() {
            let mut compared = vec![
                ("latency p50", p50 as fn(&Wrk) -> f64, "ms"),
                ("throughput", rps, "req/s"),
            ];
            if ci > 0 {
                compared.extend([
                    ("platform CPU per request", cpu as fn(&Wrk) -> f64, "µs"),
                    ("of it in user space", user, "µs"),
                ]);
            }
            for (what, f, unit) in compared {
                let metric = format!("{what}, {c} connections: this build vs the baseline build");
                rows.push(vs(metric, unit, (gw, bl), ci, f, &name));
            }
            let metric = format!("baseline build: throughput, {c} connections");
            rows.push(vs(metric, "req/s", (bl, ngx), ci, rps, &nginx_name));
        }
    }
    if rows.iter().any(|r| r.ferry.is_nan()) {
        bail!("a measurement is missing");
    }
    Ok((
        format!(
            "`ferry server` (release build) on loopback runs one instance of the static testapp (1 vCPU, 256 MiB, no concurrency limit, min = max = 1). wrk (1 thread, keep-alive, `GET /`, {SECONDS} s per run) at {CONNECTIONS:?} connections against three paths to one instance: Ferry's gateway (`Host: gw.localhost`), the instance's own address, and {} as a reverse proxy (`worker_processes auto`, upstream keep-alive 64, X-Forwarded-* headers, no access log). {runs} runs; in each, the order of the three paths rotates; medians over runs of wrk's p50, p99 and requests per second. Everything shares the 2 cores: the client, the proxy and the instance. Platform CPU per request is the on-CPU time (/proc/<pid>/task/*/schedstat) of the proxy's processes during a run over the requests it served; the `ferry server` process counts on every path, because it pumps the instance's log line of each request whichever path the request took (the direct row is that share alone); its user-space part is the threads' `utime` (/proc/<pid>/task/*/stat, 10 ms ticks).{}",
            nginx_name.as_deref().unwrap_or("nginx"),
            baseline.map_or(String::new(), |b| format!(" A second `ferry server` built from an earlier tree ({}) runs beside it with its own identical instance; its gateway is a fourth path in the same rotation (the baseline rows).", b.display()))
        ),
        rows,
    ))
}
