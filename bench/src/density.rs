//! The density suite: the platform's memory per idle instance, as the RSS growth of the
//! process that runs the agent (an in-process `ferry_agent::Agent`, as in `ferry server`) per
//! 100 idle instances.

use crate::Row;
use crate::autoscale::{ferry, get_json};
use crate::launch::{Node, cleanup_host, meminfo, memory_stop};
use anyhow::Result;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// Instances are added in steps of this many.
const STEP: usize = 100;
/// Idle time after each step before memory is read.
const SETTLE: Duration = Duration::from_secs(5);

/// VmRSS of this process, in MiB.
fn self_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// Least-squares slope of y over x.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let num: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let den: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    num / den
}

/// VmRSS of process `pid`, in MiB.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// (instances, RSS MiB) after each step, and why the steps stopped early, if they did.
type Steps = (Vec<(f64, f64)>, Option<String>);

/// Ready instances of `service`.
pub(crate) fn ready(api: SocketAddr, service: &str) -> Result<usize> {
    let v = get_json(api, &format!("/v1/instances?service={service}"))?;
    Ok(v.as_array()
        .map_or(0, |a| a.iter().filter(|i| i["state"] == "ready").count()))
}

/// Deletes `service` and waits (up to 120 s) until none of its instances is live.
pub(crate) fn delete_and_wait(ferry_bin: &Path, api: SocketAddr, service: &str) {
    eprintln!("deleting service {service}");
    let _ = ferry(ferry_bin, api, &["delete", service]);
    let live = || {
        get_json(api, &format!("/v1/instances?service={service}")).is_ok_and(|v| {
            v.as_array().is_some_and(|a| {
                a.iter().any(|i| {
                    ["pending", "starting", "ready", "draining"]
                        .contains(&i["state"].as_str().unwrap_or(""))
                })
            })
        })
    };
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(120) && live() {
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The whole platform: one `ferry server` (registry, control, gateway, agent in one process,
/// `--cpu-overcommit 100` so that CPU does not bound the count), a service of the smallest
/// instances a spec takes (10m, 16Mi), scaled with `ferry scale` in steps of [`STEP`]; VmRSS
/// of the server after each. Returns the points and why it stopped early, if it did.
fn server_points(ferry_bin: &Path, testapp: &Path, instances: usize) -> Result<Steps> {
    let work = tempfile::tempdir()?;
    let server = crate::gateway::start_server_with(
        ferry_bin,
        testapp,
        work.path(),
        "fdens0",
        "10.118.0.1/16",
        None,
        &["--cpu-overcommit", "100"],
    )?;
    let api: SocketAddr = server.api.parse()?;
    let pid = server.proc.0.id();
    let svc = "dens";
    let max = instances.max(1).to_string();
    ferry(
        ferry_bin,
        api,
        &[
            "deploy",
            svc,
            "--image",
            &server.image,
            "--cpu",
            "10m",
            "--memory",
            "16Mi",
            "--min",
            "1",
            "--max",
            &max,
        ],
    )?;
    let wait = |n: usize| -> Result<()> {
        let t = std::time::Instant::now();
        while ready(api, svc)? < n {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(180),
                "{n} ready instances not reached in 180 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    };
    let mut points = Vec::new();
    let mut stopped = None;
    let result = (|| -> Result<()> {
        wait(1)?;
        std::thread::sleep(SETTLE);
        points.push((1.0, rss_mib(pid)));
        let mut n = STEP;
        while n <= instances {
            if let Some(s) = memory_stop() {
                stopped = Some(s);
                break;
            }
            ferry(
                ferry_bin,
                api,
                &["scale", svc, "--min", &n.to_string(), "--max", &max],
            )?;
            wait(n)?;
            std::thread::sleep(SETTLE);
            points.push((n as f64, rss_mib(pid)));
            eprintln!(
                "density: ferry server with {n} idle instances, RSS {:.1} MiB",
                points.last().map_or(f64::NAN, |p| p.1)
            );
            n += STEP;
        }
        Ok(())
    })();
    if let Err(e) = result {
        stopped = Some(e.to_string());
    }
    // Stop the instances through the API before the server goes, so its shutdown is short.
    delete_and_wait(ferry_bin, api, svc);
    drop(server);
    Ok((points, stopped))
}

pub fn density(ferry: &Path, testapp: &Path, instances: usize) -> Result<(String, Vec<Row>)> {
    let work = tempfile::tempdir()?;
    let rt = tokio::runtime::Runtime::new()?;
    cleanup_host();
    let steps = instances.div_ceil(STEP).max(1);
    let (points, host, stopped) = rt.block_on(async {
        let mut node = Node::start(ferry, testapp, work.path()).await?;
        // Warm-up: unpack the image, grow the runtime's thread pool, then read the baseline.
        let warm = node.launch(["d-warm".to_string()], |_| None).await?;
        anyhow::ensure!(warm.ready == 1, "warm-up instance: {:?}", warm.stopped);
        tokio::time::sleep(SETTLE).await;
        let mut rss = vec![(1.0, self_rss_mib())];
        let mut host = vec![(1.0, meminfo().0)];
        let mut running = 1usize;
        let mut stopped = None;
        for k in 0..steps {
            let ids = (k * STEP..(k + 1) * STEP).map(|i| format!("d-{i}"));
            let out = node.launch(ids, |_| memory_stop()).await;
            let out = match out {
                Ok(o) => o,
                Err(e) => {
                    stopped = Some(e.to_string());
                    break;
                }
            };
            running += out.ready;
            tokio::time::sleep(SETTLE).await;
            rss.push((running as f64, self_rss_mib()));
            host.push((running as f64, meminfo().0));
            eprintln!(
                "density: {running} idle instances, agent process RSS {:.1} MiB, MemAvailable {:.0} MiB",
                rss.last().map_or(f64::NAN, |p| p.1),
                host.last().map_or(f64::NAN, |p| p.1)
            );
            if let Some(s) = out.stopped {
                stopped = Some(s);
                break;
            }
        }
        eprintln!("density: stopping every instance");
        node.stop().await;
        Ok::<_, anyhow::Error>((rss, host, stopped))
    })?;
    anyhow::ensure!(points.len() >= 2, "no step completed: {stopped:?}");
    let running = points.last().map_or(0.0, |p| p.0);
    let per_instance = slope(&points);
    let host_per_instance = -slope(&host);
    let (server, server_stopped) = server_points(ferry, testapp, instances)?;
    anyhow::ensure!(
        server.len() >= 2,
        "ferry server: no step completed: {server_stopped:?}"
    );
    let server_running = server.last().map_or(0.0, |p| p.0);
    let mut rows = vec![
        Row {
            metric: format!(
                "`ferry server` RSS growth per 100 idle instances (registry, control, gateway and agent; fit over {} points up to {server_running:.0})",
                server.len()
            ),
            unit: "MiB".into(),
            ferry: slope(&server) * 100.0,
            peer_name: None,
            peer: None,
            goal: Some("≤ 200 MiB (2 MiB each)".into()),
        },
        Row {
            metric: "`ferry server` RSS with one instance / with all".into(),
            unit: "MiB".into(),
            ferry: server[0].1,
            peer_name: Some(format!("with {server_running:.0}")),
            peer: server.last().map(|p| p.1),
            goal: None,
        },
    ];
    rows.extend(vec![
        Row {
            metric: format!(
                "agent process RSS growth per 100 idle instances (fit over {} points up to {running:.0})",
                points.len()
            ),
            unit: "MiB".into(),
            ferry: per_instance * 100.0,
            peer_name: None,
            peer: None,
            goal: Some("≤ 200 MiB (2 MiB each)".into()),
        },
        Row {
            metric: "agent process RSS with one instance / with all".into(),
            unit: "MiB".into(),
            ferry: points[0].1,
            peer_name: Some(format!("with {running:.0}")),
            peer: points.last().map(|p| p.1),
            goal: None,
        },
        Row {
            metric: "host MemAvailable drop per 100 idle instances (workload + kernel + agent)"
                .into(),
            unit: "MiB".into(),
            ferry: host_per_instance * 100.0,
            peer_name: None,
            peer: None,
            goal: None,
        },
    ]);
    let stopped = stopped.map_or(String::new(), |s| format!(" Stopped early: {s}."));
    let server_stopped = server_stopped.map_or(String::new(), |s| {
        format!(" `ferry server` stopped early: {s}.")
    });
    Ok((
        format!(
            "An in-process `ferry_agent::Agent` (release build, bridge {}, 10.97.0.0/16) starts idle instances of the static testapp (0.1 vCPU, 64 MiB, TCP readiness probe, image cached) in steps of {STEP} up to {instances}; {SETTLE:?} after each step, VmRSS of the process that runs the agent and the host's MemAvailable are read. Per-instance figures are least-squares slopes over the steps. The agent is the only platform code in that process (in `ferry server`, control and the gateway also hold a few records per instance; not counted here). The testapp's own memory is the workload's, not the platform's; it is in the host figure only.{stopped} \
             Then the whole platform: one `ferry server` (release build, `--cpu-overcommit 100` so that CPU does not bound the count) with a service of the smallest instances a spec takes (10m, 16Mi), `ferry scale --min N` in steps of {STEP} up to {instances}, each step waited for until every instance is ready, VmRSS of the server {SETTLE:?} after each; the slope over the steps.{server_stopped}",
            crate::launch::BRIDGE
        ),
        rows,
    ))
}
