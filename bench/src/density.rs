//! The density suite: the platform's memory per idle instance, as the RSS growth of the
//! process that runs the agent (an in-process `ferry_agent::Agent`, as in `ferry server`) per
//! 100 idle instances.

use crate::Row;
use crate::launch::{Node, cleanup_host, meminfo, memory_stop};
use crate::platform::SmallService;
use anyhow::Result;
use std::path::Path;
use std::time::Duration;

/// Instances are added in steps of this many.
const STEP: usize = 100;
/// Idle time after each step before memory is read.
const SETTLE: Duration = Duration::from_secs(5);

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
    crate::suites::status_mib(pid, "VmRSS")
}

/// (instances, RSS MiB) after each step, and why the steps stopped early, if they did.
type Steps = (Vec<(f64, f64)>, Option<String>);

/// The whole platform ([`SmallService`]) scaled in steps of [`STEP`] up to `instances`; VmRSS
/// of the server [`SETTLE`] after each step.
fn server_points(ferry_bin: &Path, testapp: &Path, instances: usize) -> Result<Steps> {
    let svc = SmallService::start(ferry_bin, testapp, "fdens0", "10.118.0.1/16", instances)?;
    std::thread::sleep(SETTLE);
    let mut points = vec![(1.0, rss_mib(svc.pid()))];
    let mut stopped = None;
    for n in (STEP..=instances).step_by(STEP) {
        if let Some(s) = memory_stop() {
            stopped = Some(s);
            break;
        }
        if let Err(e) = svc.scale(n) {
            stopped = Some(e.to_string());
            break;
        }
        std::thread::sleep(SETTLE);
        points.push((n as f64, rss_mib(svc.pid())));
        eprintln!(
            "density: ferry server with {n} idle instances, RSS {:.1} MiB",
            points[points.len() - 1].1
        );
    }
    Ok((points, stopped))
}

/// The growth per 100 instances of `points` (fit) and the first and last values, as rows.
fn rss_rows(what: &str, points: &[(f64, f64)]) -> [Row; 2] {
    let last = points.last().copied().unwrap_or((0.0, f64::NAN));
    [
        Row {
            metric: format!(
                "{what} RSS growth per 100 idle instances (fit over {} points up to {:.0})",
                points.len(),
                last.0
            ),
            unit: "MiB".into(),
            ferry: slope(points) * 100.0,
            peer_name: None,
            peer: None,
            goal: Some("≤ 200 MiB (2 MiB each)".into()),
        },
        Row {
            metric: format!("{what} RSS with one instance / with all"),
            unit: "MiB".into(),
            ferry: points[0].1,
            peer_name: Some(format!("with {:.0}", last.0)),
            peer: Some(last.1),
            goal: None,
        },
    ]
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
        let mut rss = vec![(1.0, rss_mib(std::process::id()))];
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
            rss.push((running as f64, rss_mib(std::process::id())));
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
    let host_per_instance = -slope(&host);
    let (server, server_stopped) = server_points(ferry, testapp, instances)?;
    anyhow::ensure!(
        server.len() >= 2,
        "ferry server: no step completed: {server_stopped:?}"
    );
    let mut rows = Vec::from(rss_rows(
        "`ferry server` (registry, control, gateway and agent)",
        &server,
    ));
    rows.extend(rss_rows("agent process", &points));
    rows.extend([Row {
        metric: "host MemAvailable drop per 100 idle instances (workload + kernel + agent)".into(),
        unit: "MiB".into(),
        ferry: host_per_instance * 100.0,
        peer_name: None,
        peer: None,
        goal: None,
    }]);
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
