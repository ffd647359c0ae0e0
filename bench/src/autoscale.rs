//! The autoscaler suite: a step load against a CPU-bound service (trace printed and drawn to
//! a PNG), a soak of up-and-down cycles under continuous load (failed requests counted), and
//! an oscillating load with anti-thrash off and on (direction flips and instance starts/stops
//! counted). One `ferry server` process on loopback; load from blocking keep-alive clients.

use crate::{Row, root, run};
use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The `ferry` binary of this build profile (built now), and the static testapp.
fn binaries() -> Result<(PathBuf, PathBuf)> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .context("bench binary directory")?
        .to_path_buf();
    let mut cargo = Command::new("cargo");
    cargo
        .current_dir(root())
        .args(["build", "-q", "-p", "ferry"]);
    if !cfg!(debug_assertions) {
        cargo.arg("--release");
    }
    run(&mut cargo)?;
    let ferry = dir.join("ferry");
    let testapp = match std::env::var_os("TESTAPP_STATIC_BIN") {
        Some(p) => PathBuf::from(p),
        None => crate::build()?.1,
    };
    Ok((ferry, testapp))
}

/// One blocking HTTP/1.1 exchange on a keep-alive connection; returns the status.
fn exchange(s: &mut BufReader<TcpStream>, host: &str, path: &str) -> std::io::Result<u16> {
    write!(s.get_mut(), "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n")?;
    let mut line = String::new();
    if s.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut len = 0usize;
    loop {
        line.clear();
        if s.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok(status)
}

fn connect(addr: SocketAddr) -> std::io::Result<BufReader<TcpStream>> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    Ok(BufReader::new(s))
}

/// `GET path` on a fresh connection; the JSON body.
pub(crate) fn get_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut all = Vec::new();
    s.read_to_end(&mut all)?;
    let text = String::from_utf8_lossy(&all);
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP body")?;
    anyhow::ensure!(head.contains(" 200 "), "{path}: {head}");
    Ok(serde_json::from_str(body)?)
}

/// Closed-loop load: `target` of the `workers` threads each send `GET path` back to back
/// (after `think` when given) on a keep-alive connection. A request that finds its reused
/// connection closed before any answer is sent again on a fresh one (what HTTP clients do
/// for idempotent requests); anything else that is not a 200 is a failure.
struct Load {
    target: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(gateway: SocketAddr, host: &str, path: &str, workers: usize, think: Duration) -> Load {
        let target = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let threads = (0..workers)
            .map(|i| {
                let (target, stop, ok, failed, errors) = (
                    target.clone(),
                    stop.clone(),
                    ok.clone(),
                    failed.clone(),
                    errors.clone(),
                );
                let (host, path) = (host.to_string(), path.to_string());
                std::thread::spawn(move || {
                    let mut conn: Option<BufReader<TcpStream>> = None;
                    while !stop.load(Ordering::Relaxed) {
                        if i >= target.load(Ordering::Relaxed) {
                            conn = None;
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                        let reused = conn.is_some();
                        let mut res = match conn.take() {
                            Some(mut c) => exchange(&mut c, &host, &path).map(|s| (s, c)),
                            None => connect(gateway)
                                .and_then(|mut c| exchange(&mut c, &host, &path).map(|s| (s, c))),
                        };
                        if reused
                            && matches!(&res, Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof)
                        {
                            res = connect(gateway)
                                .and_then(|mut c| exchange(&mut c, &host, &path).map(|s| (s, c)));
                        }
                        match res {
                            Ok((200, c)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                conn = Some(c);
                            }
                            Ok((s, c)) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                errors.lock().unwrap().push(format!("status {s}"));
                                conn = Some(c);
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                errors.lock().unwrap().push(e.to_string());
                            }
                        }
                        if !think.is_zero() {
                            std::thread::sleep(think);
                        }
                    }
                })
            })
            .collect();
        Load {
            target,
            stop,
            ok,
            failed,
            errors,
            threads,
        }
    }

    fn set(&self, n: usize) {
        self.target.store(n, Ordering::Relaxed);
    }

    fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let errors = self.errors.lock().unwrap().clone();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}

/// The autoscaler's view of a service's (only) revision.
#[derive(Debug, Clone, Default)]
struct Status {
    desired: u64,
    ready: u64,
    live: u64,
    panicking: bool,
    flips: u64,
    engaged: bool,
    starts: u64,
    stops: u64,
}

fn status(api: SocketAddr, name: &str) -> Result<Status> {
    let v = get_json(api, &format!("/v1/services/{name}/autoscaler"))?;
    let Some(r) = v.as_array().and_then(|a| a.first()) else {
        return Ok(Status::default());
    };
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    Ok(Status {
        desired: n("desired"),
        ready: n("ready"),
        live: n("instances"),
        panicking: r["panicking"].as_bool().unwrap_or(false),
        flips: r["anti_thrash"]["flips_total"].as_u64().unwrap_or(0),
        engaged: r["anti_thrash"]["engaged"].as_bool().unwrap_or(false),
        starts: n("starts"),
        stops: n("stops"),
    })
}

fn wait_until(
    api: SocketAddr,
    name: &str,
    what: &str,
    limit: Duration,
    f: impl Fn(&Status) -> bool,
) -> Result<Status> {
    let t = Instant::now();
    loop {
        let s = status(api, name)?;
        if f(&s) {
            return Ok(s);
        }
        if t.elapsed() > limit {
            let instances = get_json(api, &format!("/v1/instances?service={name}"))
                .map(|v| v.to_string())
                .unwrap_or_default();
            bail!("{name}: {what} not reached in {limit:?}: {s:?}; instances: {instances}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Deploys `name` as the soak and oscillation parts do (0.1 vCPU, 1–6 instances at a target
/// concurrency of 2, quick stable window, 60 s idle grace), plus `extra` flags.
fn deploy_churn(
    bin: &Path,
    api: SocketAddr,
    name: &str,
    image: &str,
    extra: &[&str],
) -> Result<()> {
    let mut args = vec![
        "deploy",
        name,
        "--image",
        image,
        "--cpu",
        "0.1",
        "--memory",
        "64Mi",
        "--min",
        "1",
        "--max",
        "6",
        "--target-concurrency",
        "2",
        "--idle-grace",
        "60",
        "--stable-window",
        "2s",
        "--panic-window-pct",
        "50",
    ];
    args.extend_from_slice(extra);
    ferry(bin, api, &args).map(drop)
}

pub(crate) fn ferry(bin: &Path, api: SocketAddr, args: &[&str]) -> Result<String> {
    run(Command::new(bin)
        .args(args)
        .env("FERRY_API", format!("http://{api}")))
}

/// One point of the step trace.
struct Point {
    t: f64,
    load_rps: f64,
    desired: u64,
    ready: u64,
    panicking: bool,
}

pub fn autoscale(cycles: usize) -> Result<(String, Vec<Row>)> {
    let (bin, testapp) = binaries()?;
    let work = tempfile::tempdir()?;
    // The server's log outlives the run, for a look after a failure.
    let log_path = std::env::temp_dir().join("ferry-bench-autoscale-server.log");
    let log = std::fs::File::create(&log_path)?;
    eprintln!("ferry server log: {}", log_path.display());
    let server = crate::gateway::start_server(
        &bin,
        &testapp,
        work.path(),
        "fauto0",
        "10.117.0.1/24",
        Some(log),
        &[],
    )?;
    let api: SocketAddr = server.api.parse()?;
    let (gateway, image) = (server.gateway, server.image.clone());

    // FERRY_BENCH_AUTOSCALE=step,soak,oscillation (the default) runs a subset.
    let parts =
        std::env::var("FERRY_BENCH_AUTOSCALE").unwrap_or_else(|_| "step,soak,oscillation".into());
    let part = |p: &str| parts.split(',').any(|x| x.trim() == p);
    let mut rows = Vec::new();
    if part("step") {
        rows.extend(step_load(&bin, api, gateway, &image)?);
    }
    if part("soak") {
        rows.extend(soak(&bin, api, gateway, &image, cycles)?);
    }
    if part("oscillation") {
        rows.extend(oscillation(&bin, api, gateway, &image)?);
    }
    Ok((
        format!(
            "One `ferry server` ({} build) on loopback, testapp instances of 0.1 vCPU / 64 MiB; load from blocking keep-alive HTTP/1.1 clients through the gateway. \
             Step: `--scale-metric cpu=50 --scale-metric concurrency=4`, stable window 12 s (panic 10 % = 1.2 s), idle grace 8 s, max 8; 5 s idle, 30 s of 24 clients each sending `GET /cpu?ms=10` (10 ms of CPU) and pausing 100 ms after each answer, 25 s of 1 such client, then nothing; trace sampled every 0.5 s from `GET /v1/services/as-step/autoscaler`, drawn to bench/results/autoscale-step.png. \
             Soak: `GET /sleep?ms=50`, target concurrency 2, min 1, stable window 2 s (panic 50 %), anti-thrash off; 2 clients always on, 6 more switched on until 3 instances are ready and off until the count is back to 1, {cycles} times; every request must answer 200. \
             Oscillation: the same service shape with 8 s of 6 clients and 8 s of 1 client for 96 s, once with anti-thrash off and once on (more than 3 flips in 40 s hold the window's peak for 20 s, doubling); a flip is a reversal of the decided count's direction.",
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
        ),
        rows,
    ))
}

fn step_load(bin: &Path, api: SocketAddr, gateway: SocketAddr, image: &str) -> Result<Vec<Row>> {
    ferry(
        bin,
        api,
        &[
            "deploy",
            "as-step",
            "--image",
            image,
            "--cpu",
            "0.1",
            "--memory",
            "64Mi",
            "--max",
            "8",
            "--idle-grace",
            "8",
            "--stable-window",
            "12s",
            "--panic-window-pct",
            "10",
            "--scale-metric",
            "cpu=50",
            "--scale-metric",
            "concurrency=4",
            "--anti-thrash",
            "off",
        ],
    )?;
    // Paced clients (100 ms between requests), so the demand is finite: 24 of them ask for
    // more than 8 instances give, 1 for about two.
    let load = Load::start(
        gateway,
        "as-step.localhost",
        "/cpu?ms=10",
        24,
        Duration::from_millis(100),
    );
    let t0 = Instant::now();
    // 5 s idle, 30 s high, 25 s low, then nothing.
    let (on, down, off) = (5.0, 35.0, 60.0);
    let mut trace: Vec<Point> = Vec::new();
    let mut last_ok = (0.0, 0u64);
    let mut zero_at = None;
    while t0.elapsed().as_secs_f64() < 120.0 {
        let t = t0.elapsed().as_secs_f64();
        load.set(if (on..down).contains(&t) {
            24
        } else if (down..off).contains(&t) {
            1
        } else {
            0
        });
        let s = status(api, "as-step")?;
        let done = load.ok.load(Ordering::Relaxed);
        let rps = if t > last_ok.0 {
            (done - last_ok.1) as f64 / (t - last_ok.0)
        } else {
            0.0
        };
        last_ok = (t, done);
        trace.push(Point {
            t,
            load_rps: rps,
            desired: s.desired,
            ready: s.ready,
            panicking: s.panicking,
        });
        if t > off && s.live == 0 && s.desired == 0 {
            zero_at.get_or_insert(t);
            if t > zero_at.unwrap_or(t) + 3.0 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let (ok, failed, errors) = load.finish();
    println!(
        "\nstep trace (as-step; 24 clients from {on} s, 1 from {down} s, none from {off} s):\n"
    );
    println!("| t (s) | load (req/s) | desired | ready | panic |");
    println!("| --- | --- | --- | --- | --- |");
    for p in trace.iter().step_by(2) {
        println!(
            "| {:.1} | {:.0} | {} | {} | {} |",
            p.t,
            p.load_rps,
            p.desired,
            p.ready,
            if p.panicking { "yes" } else { "" }
        );
    }
    let png = root().join("bench/results/autoscale-step.png");
    draw(&trace, (on, down, off), &png)?;
    eprintln!("wrote {}", png.display());
    let first = |f: &dyn Fn(&Point) -> bool, after: f64| {
        trace.iter().find(|p| p.t >= after && f(p)).map(|p| p.t)
    };
    let peak = trace.iter().map(|p| p.ready).max().unwrap_or(0);
    let up2 = first(&|p| p.ready >= 2, on).map_or(f64::NAN, |t| t - on);
    let at_peak = first(&|p| p.ready >= peak && peak > 0, on).map_or(f64::NAN, |t| t - on);
    let falls = first(&|p| p.desired < peak, down).map_or(f64::NAN, |t| t - down);
    let low = trace
        .iter()
        .filter(|p| p.t > off - 5.0 && p.t < off)
        .map(|p| p.ready)
        .max()
        .unwrap_or(0);
    let zero = first(&|p| p.desired == 0 && p.ready == 0, off).map_or(f64::NAN, |t| t - off);
    if failed > 0 {
        eprintln!(
            "step: {failed} failed, e.g. {:?}",
            &errors[..errors.len().min(3)]
        );
    }
    let row = |metric: &str, unit: &str, v: f64, goal: Option<&str>| Row {
        metric: metric.into(),
        unit: unit.into(),
        ferry: v,
        peer_name: None,
        peer: None,
        goal: goal.map(str::to_string),
    };
    Ok(vec![
        row("step: peak ready instances", "instances", peak as f64, None),
        row(
            "step: load on → 2 ready",
            "s",
            up2,
            Some("within the panic window (1.2 s) + start"),
        ),
        row("step: load on → peak ready", "s", at_peak, None),
        row(
            "step: high → low load, → first scale-down",
            "s",
            falls,
            Some("after the panic ends, a stable window (12 s) after its last signal"),
        ),
        row(
            "step: ready at the end of the low load",
            "instances",
            low as f64,
            None,
        ),
        row(
            "step: load off → zero",
            "s",
            zero,
            Some("after the 8 s grace"),
        ),
        row("step: requests answered 200", "requests", ok as f64, None),
        row(
            "step: failed requests",
            "requests",
            failed as f64,
            Some("0"),
        ),
    ])
}

fn soak(
    bin: &Path,
    api: SocketAddr,
    gateway: SocketAddr,
    image: &str,
    cycles: usize,
) -> Result<Vec<Row>> {
    deploy_churn(bin, api, "as-soak", image, &["--anti-thrash", "off"])?;
    wait_until(api, "as-soak", "1 ready", Duration::from_secs(30), |s| {
        s.ready >= 1
    })?;
    let load = Load::start(
        gateway,
        "as-soak.localhost",
        "/sleep?ms=50",
        8,
        Duration::ZERO,
    );
    load.set(2);
    std::thread::sleep(Duration::from_secs(3));
    let start = status(api, "as-soak")?;
    let t0 = Instant::now();
    let mut done = 0;
    for i in 0..cycles {
        load.set(8);
        wait_until(api, "as-soak", "3 ready", Duration::from_secs(30), |s| {
            s.ready >= 3
        })?;
        load.set(2);
        wait_until(api, "as-soak", "back to 1", Duration::from_secs(30), |s| {
            s.desired <= 1 && s.live <= 1
        })?;
        done = i + 1;
        if done.is_multiple_of(10) {
            eprintln!("soak: {done} cycles, {:.0} s", t0.elapsed().as_secs_f64());
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    // Let the last drains finish under the base load.
    std::thread::sleep(Duration::from_secs(3));
    let end = status(api, "as-soak")?;
    let (ok, failed, errors) = load.finish();
    println!(
        "\nsoak: {done} up/down cycles in {secs:.0} s, {} instances started and {} stopped (drained) under load; {ok} requests answered 200, {failed} failed",
        end.starts - start.starts,
        end.stops - start.stops
    );
    if failed > 0 {
        println!(
            "soak failures, first ones: {:?}",
            &errors[..errors.len().min(5)]
        );
    }
    let row = |metric: &str, unit: &str, v: f64, goal: Option<&str>| Row {
        metric: metric.into(),
        unit: unit.into(),
        ferry: v,
        peer_name: None,
        peer: None,
        goal: goal.map(str::to_string),
    };
    Ok(vec![
        row("soak: up/down cycles", "cycles", done as f64, Some("100")),
        row(
            "soak: instances stopped (drained)",
            "instances",
            (end.stops - start.stops) as f64,
            None,
        ),
        row("soak: duration", "s", secs, None),
        row("soak: requests answered 200", "requests", ok as f64, None),
        row(
            "soak: failed requests",
            "requests",
            failed as f64,
            Some("0"),
        ),
    ])
}

fn oscillation(bin: &Path, api: SocketAddr, gateway: SocketAddr, image: &str) -> Result<Vec<Row>> {
    let mut out = Vec::new();
    let mut flips = Vec::new();
    for (name, thrash) in [("as-osc-off", "off"), ("as-osc-on", "on")] {
        deploy_churn(
            bin,
            api,
            name,
            image,
            &[
                "--anti-thrash",
                thrash,
                "--anti-thrash-flips",
                "3",
                "--anti-thrash-window",
                "40s",
                "--anti-thrash-cooldown",
                "20s",
            ],
        )?;
        wait_until(api, name, "1 ready", Duration::from_secs(30), |s| {
            s.ready >= 1
        })?;
        let load = Load::start(
            gateway,
            &format!("{name}.localhost"),
            "/sleep?ms=50",
            6,
            Duration::ZERO,
        );
        let start = status(api, name)?;
        let t0 = Instant::now();
        let mut engaged_s = 0.0;
        while t0.elapsed() < Duration::from_secs(96) {
            let t = t0.elapsed().as_secs_f64();
            load.set(if (t as u64 / 8).is_multiple_of(2) {
                6
            } else {
                1
            });
            if status(api, name)?.engaged {
                engaged_s += 0.25;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let end = status(api, name)?;
        let (ok, failed, _) = load.finish();
        let f = end.flips - start.flips;
        let starts = end.starts - start.starts;
        let stops = end.stops - start.stops;
        println!(
            "\noscillation, anti-thrash {thrash}: {f} flips of the decided count, {starts} instance starts and {stops} stops in 96 s; anti-thrash engaged {engaged_s:.0} s; {ok} requests answered 200, {failed} failed"
        );
        flips.push(f);
        let row = |metric: String, unit: &str, v: f64| Row {
            metric,
            unit: unit.into(),
            ferry: v,
            peer_name: None,
            peer: None,
            goal: None,
        };
        out.push(row(
            format!("oscillation, anti-thrash {thrash}: flips"),
            "flips",
            f as f64,
        ));
        out.push(row(
            format!("oscillation, anti-thrash {thrash}: starts + stops"),
            "instances",
            (starts + stops) as f64,
        ));
        out.push(row(
            format!("oscillation, anti-thrash {thrash}: failed requests"),
            "requests",
            failed as f64,
        ));
        ferry(bin, api, &["delete", name])?;
    }
    println!(
        "\noscillation: flips with anti-thrash off {} vs on {}",
        flips[0], flips[1]
    );
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The PNG: plotters' bitmap backend into a buffer, labels in font8x8's bitmap font (no system
// fonts needed), encoded with `png`.

fn draw(trace: &[Point], phases: (f64, f64, f64), path: &Path) -> Result<()> {
    let (on, down, off) = phases;
    use plotters::prelude::*;
    const W: u32 = 960;
    const H: u32 = 540;
    let mut buf = vec![255u8; (W * H * 3) as usize];
    let t_max = trace.last().map_or(60.0, |p| p.t).max(10.0);
    let n_max = trace
        .iter()
        .map(|p| p.desired.max(p.ready))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        + 1.0;
    let rps_max = trace.iter().map(|p| p.load_rps).fold(1.0, f64::max) * 1.1;
    let (l, r, t, b) = (70i32, 70i32, 40i32, 50i32);
    {
        let root = BitMapBackend::with_buffer(&mut buf, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let plot = root.margin(t as u32, b as u32, l as u32, r as u32);
        let (pw, ph) = plot.dim_in_pixel();
        let x = |s: f64| (s / t_max * f64::from(pw)) as i32;
        let yn = |n: f64| ph as i32 - (n / n_max * f64::from(ph)) as i32;
        let yr = |v: f64| ph as i32 - (v / rps_max * f64::from(ph)) as i32;
        let err = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("{e:?}");
        // Load bands: high, then low.
        plot.draw(&Rectangle::new(
            [(x(on), 0), (x(down), ph as i32)],
            RGBColor(225, 235, 250).filled(),
        ))
        .map_err(err)?;
        plot.draw(&Rectangle::new(
            [(x(down), 0), (x(off), ph as i32)],
            RGBColor(240, 245, 252).filled(),
        ))
        .map_err(err)?;
        // Grid: every 10 s, every instance.
        for s in (0..=t_max as u32).step_by(10) {
            plot.draw(&PathElement::new(
                vec![(x(f64::from(s)), 0), (x(f64::from(s)), ph as i32)],
                RGBColor(225, 225, 225),
            ))
            .map_err(err)?;
        }
        for n in 0..=n_max as u32 {
            plot.draw(&PathElement::new(
                vec![(0, yn(f64::from(n))), (pw as i32, yn(f64::from(n)))],
                RGBColor(225, 225, 225),
            ))
            .map_err(err)?;
        }
        plot.draw(&PathElement::new(
            vec![
                (0, 0),
                (0, ph as i32),
                (pw as i32, ph as i32),
                (pw as i32, 0),
            ],
            BLACK,
        ))
        .map_err(err)?;
        let line = |pts: Vec<(i32, i32)>, c: RGBColor| {
            plot.draw(&PathElement::new(pts, c.stroke_width(3)))
        };
        line(
            trace.iter().map(|p| (x(p.t), yr(p.load_rps))).collect(),
            RGBColor(150, 150, 150),
        )
        .map_err(err)?;
        let steps = |f: &dyn Fn(&Point) -> f64| {
            let mut v = Vec::new();
            for w in trace.windows(2) {
                v.push((x(w[0].t), yn(f(&w[0]))));
                v.push((x(w[1].t), yn(f(&w[0]))));
            }
            v
        };
        // Ready first and wide, desired on top and narrow: both show where they agree.
        plot.draw(&PathElement::new(
            steps(&|p| p.ready as f64),
            RGBColor(240, 140, 60).stroke_width(6),
        ))
        .map_err(err)?;
        line(steps(&|p| p.desired as f64), RGBColor(30, 90, 200)).map_err(err)?;
        for p in trace.iter().filter(|p| p.panicking) {
            plot.draw(&Rectangle::new(
                [(x(p.t), ph as i32 - 6), (x(p.t) + 4, ph as i32)],
                RGBColor(200, 30, 30).filled(),
            ))
            .map_err(err)?;
        }
        // Labels.
        let text = |s: &str, px: i32, py: i32, c: RGBColor| -> Result<()> {
            label(&root, s, px, py, c).map_err(|e| anyhow::anyhow!("{e:?}"))
        };
        text(
            "ferry autoscale: step load on a CPU-bound service",
            l,
            12,
            BLACK,
        )?;
        text("desired", l + 10, t + 8, RGBColor(30, 90, 200))?;
        text("ready", l + 90, t + 8, RGBColor(240, 140, 60))?;
        text(
            "load req/s (right axis)",
            l + 160,
            t + 8,
            RGBColor(120, 120, 120),
        )?;
        text("panic", l + 360, t + 8, RGBColor(200, 30, 30))?;
        for s in (0..=t_max as u32).step_by(10) {
            text(
                &format!("{s}s"),
                l + x(f64::from(s)) - 8,
                t + ph as i32 + 10,
                BLACK,
            )?;
        }
        for n in 0..n_max as u32 {
            text(&n.to_string(), l - 20, t + yn(f64::from(n)) - 4, BLACK)?;
        }
        for k in 0..=4 {
            let v = rps_max * f64::from(k) / 4.0;
            text(
                &format!("{v:.0}"),
                l + pw as i32 + 8,
                t + yr(v) - 4,
                RGBColor(120, 120, 120),
            )?;
        }
        text("instances", 4, t - 16, BLACK)?;
        root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    std::fs::create_dir_all(path.parent().context("png directory")?)?;
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut enc = png::Encoder::new(file, W, H);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()?.write_image_data(&buf)?;
    Ok(())
}

/// Draws `s` in the 8x8 bitmap font with its top left at (x, y).
fn label<DB: plotters::prelude::DrawingBackend>(
    area: &plotters::prelude::DrawingArea<DB, plotters::coord::Shift>,
    s: &str,
    x: i32,
    y: i32,
    color: plotters::prelude::RGBColor,
) -> Result<(), plotters::drawing::DrawingAreaErrorKind<DB::ErrorType>> {
    use font8x8::UnicodeFonts;
    for (i, ch) in s.chars().enumerate() {
        let Some(glyph) = font8x8::BASIC_FONTS.get(ch) else {
            continue;
        };
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    area.draw_pixel((x + i as i32 * 8 + col, y + row as i32), &color)?;
                }
            }
        }
    }
    Ok(())
}
