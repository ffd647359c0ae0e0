//! The launch-rate suite, and the in-process agent it shares with the density suite: a
//! `ferry_agent::Agent` on its own bridge and /16, holding the static testapp image, driven
//! through its command channel exactly as control drives it in `ferry server`.

use crate::platform::SmallService;
use crate::{Row, percentile, run, sorted};
use anyhow::{Context, Result, bail};
use ferry_agent::{Agent, Config, LayoutImageSource, net};
use ferry_api::agent::{AgentCommand, AgentEvent, InstanceSpec, InstanceState, Probe};
use ferry_api::{Cpu, Memory};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Bridge and subnet no other suite or test uses.
pub(crate) const BRIDGE: &str = "fblaunch0";
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 1);
const PREFIX: u8 = 16;
/// Starts kept in flight at once.
const PARALLEL: usize = 16;
/// No instance may take longer than this to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// An agent in a temp dir with the testapp image in its layout.
pub(crate) struct Node {
    pub commands: mpsc::Sender<AgentCommand>,
    pub events: mpsc::Receiver<AgentEvent>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    image: ferry_api::ImageRef,
}

impl Node {
    /// Builds the testapp image with `ferry image build`, unpacks the archive as an OCI
    /// layout, and starts an agent on `dir` with [`BRIDGE`]; waits for its node report.
    pub(crate) async fn start(ferry: &Path, testapp: &Path, dir: &Path) -> Result<Node> {
        let archive = dir.join("app.tar");
        run(Command::new(ferry)
            .args(["image", "build", "--binary"])
            .arg(testapp)
            .args(["--binary-path", "/testapp", "--port", "8080"])
            .args(["--tag", "v1", "-o"])
            .arg(&archive))?;
        let layout = dir.join("layout");
        std::fs::create_dir_all(&layout)?;
        run(Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&layout))?;
        let mut config = Config::new(dir.join("agent"), "bench-node");
        config.net = net::NetConfig {
            bridge: BRIDGE.into(),
            gateway: GATEWAY,
            prefix: PREFIX,
        };
        config.start_timeout = READY_TIMEOUT;
        let agent = Agent::new(config, Arc::new(LayoutImageSource::new(&layout)))?;
        let (ctx, crx) = mpsc::channel(1024);
        let (etx, erx) = mpsc::channel(65536);
        let shutdown = CancellationToken::new();
        let sd = shutdown.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = agent.run(crx, etx, sd).await {
                eprintln!("agent stopped: {e}");
            }
        });
        let mut node = Node {
            commands: ctx,
            events: erx,
            shutdown,
            task,
            image: "localhost/testapp:v1".parse().context("image reference")?,
        };
        loop {
            match tokio::time::timeout(Duration::from_secs(60), node.events.recv()).await {
                Ok(Some(AgentEvent::Node(_))) => break,
                Ok(Some(_)) => {}
                Ok(None) => bail!("the agent stopped before its node report"),
                Err(_) => bail!("no node report from the agent within 60 s"),
            }
        }
        Ok(node)
    }

    /// What control would send for one instance of a small service: 0.1 vCPU, 64 MiB, TCP
    /// readiness probe on the testapp's port.
    pub(crate) fn spec(&self, id: &str) -> InstanceSpec {
        InstanceSpec {
            instance_id: id.into(),
            service: "bench".into(),
            revision: "bench-00001".into(),
            configuration: "bench".into(),
            image: self.image.clone(),
            registry_auth: None,
            command: None,
            args: None,
            env: Default::default(),
            port: 8080,
            cpu: Cpu(100),
            memory: Memory(64 << 20),
            pids_limit: None,
            outbound_network: true,
            readiness: Probe::default(),
            liveness: None,
            termination_grace_ms: 2000,
            isolation: Default::default(),
        }
    }

    /// Starts `ids` with at most [`PARALLEL`] starts in flight, until all are ready, one
    /// fails, or `keep_going` says stop (checked before each start). Returns the outcome.
    pub(crate) async fn launch(
        &mut self,
        ids: impl IntoIterator<Item = String>,
        mut keep_going: impl FnMut(usize) -> Option<String>,
    ) -> Result<Launch> {
        let mut ids = ids.into_iter();
        let mut sent: HashMap<String, Instant> = HashMap::new();
        let mut out = Launch {
            busy_ms_start: machine_busy_ms(),
            ..Launch::default()
        };
        let start = Instant::now();
        let mut exhausted = false;
        loop {
            while out.stopped.is_none() && !exhausted && sent.len() < PARALLEL {
                if let Some(reason) = keep_going(out.ready) {
                    out.stopped = Some(reason);
                    break;
                }
                let Some(id) = ids.next() else {
                    exhausted = true;
                    break;
                };
                let spec = Box::new(self.spec(&id));
                sent.insert(id, Instant::now());
                self.commands
                    .send(AgentCommand::Start { spec })
                    .await
                    .context("agent command channel closed")?;
            }
            if sent.is_empty() {
                break;
            }
            let ev = tokio::time::timeout(READY_TIMEOUT, self.events.recv())
                .await
                .map_err(|_| anyhow::anyhow!("no instance became ready within {READY_TIMEOUT:?}"))?
                .context("agent events closed")?;
            let AgentEvent::Status(s) = ev else { continue };
            let Some(t) = sent.get(&s.instance_id).copied() else {
                continue;
            };
            match s.state {
                InstanceState::Ready => {
                    sent.remove(&s.instance_id);
                    out.ready += 1;
                    out.start_to_ready_ms.push(crate::suites::ms(t.elapsed()));
                    out.elapsed = start.elapsed();
                    out.ready_at.push(out.elapsed);
                    out.busy_ms_at.push(machine_busy_ms());
                }
                InstanceState::Failed | InstanceState::Stopped => {
                    sent.remove(&s.instance_id);
                    out.failed += 1;
                    if out.stopped.is_none() {
                        out.stopped =
                            Some(format!("instance {} failed: {:?}", s.instance_id, s.reason));
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Stops every instance (the agent's own shutdown: SIGTERM, grace, clean-up) and removes
    /// the bridge and its NAT rule.
    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(300), self.task).await;
        drop(self.events);
        cleanup_host();
    }
}

pub(crate) fn cleanup_host() {
    let _ = net::teardown_host(&net::NetConfig {
        bridge: BRIDGE.into(),
        gateway: GATEWAY,
        prefix: PREFIX,
    });
}

#[derive(Debug, Default)]
pub(crate) struct Launch {
    pub ready: usize,
    pub failed: usize,
    /// From the first start to the last ready.
    pub elapsed: Duration,
    pub start_to_ready_ms: Vec<f64>,
    /// When each instance became ready, from the first start, in order.
    pub ready_at: Vec<Duration>,
    /// The machine's busy CPU time (ms, /proc/stat) when each became ready, and at the start.
    pub busy_ms_at: Vec<f64>,
    pub busy_ms_start: f64,
    /// Why launching stopped before the list ran out.
    pub stopped: Option<String>,
}

/// `MemAvailable` and `MemTotal` in MiB.
pub(crate) fn meminfo() -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map_or(f64::NAN, |kib| kib / 1024.0)
    };
    (get("MemAvailable:"), get("MemTotal:"))
}

/// `some avg10` of /proc/pressure/memory (percent of time stalled on memory), when present.
fn memory_pressure() -> Option<f64> {
    std::fs::read_to_string("/proc/pressure/memory")
        .ok()?
        .lines()
        .find(|l| l.starts_with("some"))?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("avg10=")?.parse().ok())
}

/// Why to stop now, if memory is getting short: less than a quarter of the host's memory
/// available (the machine is shared), or tasks stalled on memory more than 5 % of the time.
pub(crate) fn memory_stop() -> Option<String> {
    let (avail, total) = meminfo();
    if avail < total / 4.0 {
        return Some(format!(
            "memory pressure: MemAvailable {avail:.0} MiB < a quarter of {total:.0} MiB"
        ));
    }
    match memory_pressure() {
        Some(p) if p > 5.0 => Some(format!("memory pressure: PSI some avg10 = {p}%")),
        _ => None,
    }
}

/// CPU time all processes of the machine spent busy (user, nice, system, irq, softirq, steal),
/// in ms, from /proc/stat.
pub(crate) fn machine_busy_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let v: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let busy: f64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum();
    // Clock ticks of 10 ms (USER_HZ is 100 on Linux x86).
    busy * 10.0
}

/// The last tenth of the launches (0 with fewer than 20): (launches per minute, machine CPU
/// ms per launch).
fn last_tenth(out: &Launch) -> (f64, f64) {
    let n = out.ready_at.len();
    if n < 20 {
        return (0.0, 0.0);
    }
    let from = n - n / 10;
    let span = out.ready_at[n - 1].saturating_sub(out.ready_at[from - 1]);
    let cpu = out.busy_ms_at[n - 1] - out.busy_ms_at[from - 1];
    (
        (n - from) as f64 / span.as_secs_f64().max(1e-9) * 60.0,
        cpu / (n - from) as f64,
    )
}

/// Instances one `ferry server` runs at most in the through-the-platform part (16Mi each:
/// three quarters of this machine's 24 GiB hold ~1,130).
const SERVER_MAX: usize = 1000;

/// Through the whole platform ([`SmallService`], one instance ready): `ferry scale --min n`,
/// and the time until all `n` are ready. Returns (n − 1 launches, that time).
fn through_server(ferry_bin: &Path, testapp: &Path, n: usize) -> Result<(usize, Duration)> {
    let svc = SmallService::start(ferry_bin, testapp, "flrserv0", "10.119.0.1/16", n)?;
    Ok((n - 1, svc.scale(n)?))
}

pub fn launch_rate(ferry: &Path, testapp: &Path, max: usize) -> Result<(String, Vec<Row>)> {
    let work = tempfile::tempdir()?;
    let rt = tokio::runtime::Runtime::new()?;
    cleanup_host();
    let (outcome, mem_before, mem_after) = rt.block_on(async {
        let mut node = Node::start(ferry, testapp, work.path()).await?;
        // Warm-up: the first start unpacks the image; every measured start finds it cached.
        let warm = node.launch(["lr-warm".to_string()], |_| None).await?;
        anyhow::ensure!(warm.ready == 1, "warm-up instance: {:?}", warm.stopped);
        let mem_before = meminfo().0;
        let outcome = node
            .launch((0..max).map(|i| format!("lr-{i}")), |ready| {
                if ready % 25 == 0 { memory_stop() } else { None }
            })
            .await;
        let mem_after = meminfo().0;
        eprintln!("launch-rate: stopping every instance");
        node.stop().await;
        Ok::<_, anyhow::Error>((outcome?, mem_before, mem_after))
    })?;
    let per_min = outcome.ready as f64 / outcome.elapsed.as_secs_f64().max(1e-9) * 60.0;
    let server_n = max.clamp(2, SERVER_MAX);
    eprintln!("launch-rate: through ferry server, 1 → {server_n} instances");
    let (server_launched, server_took) = through_server(ferry, testapp, server_n)?;
    let s = sorted(outcome.start_to_ready_ms.clone());
    let stopped = outcome
        .stopped
        .clone()
        .unwrap_or_else(|| format!("the run's cap of {max} instances was reached"));
    eprintln!(
        "launch-rate: {} ready, {} failed; stopped: {stopped}",
        outcome.ready, outcome.failed
    );
    let (tenth_per_min, tenth_cpu_ms) = last_tenth(&outcome);
    let rows = vec![
        Row {
            metric:
                "launches per minute (all ready instances / time from first start to last ready)"
                    .into(),
            unit: "/min".into(),
            ferry: per_min,
            peer_name: None,
            peer: None,
            goal: Some("≥ 3000 /min".into()),
        },
        Row {
            metric: format!(
                "launches per minute through `ferry server` (`ferry scale` 1 → {server_n}, until every instance is ready)"
            ),
            unit: "/min".into(),
            ferry: server_launched as f64 / server_took.as_secs_f64().max(1e-9) * 60.0,
            peer_name: None,
            peer: None,
            goal: Some("≥ 3000 /min".into()),
        },
        Row {
            metric: "launches per minute over the last tenth of the run (with the most running)"
                .into(),
            unit: "/min".into(),
            ferry: tenth_per_min,
            peer_name: None,
            peer: None,
            goal: None,
        },
        Row {
            metric: "machine CPU time per launch (all processes, /proc/stat)".into(),
            unit: "ms".into(),
            ferry: (outcome.busy_ms_at.last().copied().unwrap_or(0.0) - outcome.busy_ms_start)
                / outcome.ready.max(1) as f64,
            peer_name: None,
            peer: None,
            goal: None,
        },
        Row {
            metric: "machine CPU time per launch over the last tenth".into(),
            unit: "ms".into(),
            ferry: tenth_cpu_ms,
            peer_name: None,
            peer: None,
            goal: None,
        },
        Row {
            metric: "instances running when launching stopped".into(),
            unit: "instances".into(),
            ferry: outcome.ready as f64,
            peer_name: None,
            peer: None,
            goal: None,
        },
        Row {
            metric: "start → ready p50 under this load".into(),
            unit: "ms".into(),
            ferry: percentile(&s, 0.5),
            peer_name: None,
            peer: None,
            goal: None,
        },
        Row {
            metric: "start → ready p99 under this load".into(),
            unit: "ms".into(),
            ferry: percentile(&s, 0.99),
            peer_name: None,
            peer: None,
            goal: None,
        },
        Row {
            metric: "host MemAvailable drop per instance (everything: workload, kernel, agent)"
                .into(),
            unit: "MiB".into(),
            ferry: (mem_before - mem_after) / outcome.ready.max(1) as f64,
            peer_name: None,
            peer: None,
            goal: None,
        },
    ];
    Ok((
        format!(
            "An in-process `ferry_agent::Agent` (release build) on its own bridge ({BRIDGE}, 10.97.0.0/16), driven through its command channel as control drives it: `Start` of instances of the static testapp (0.1 vCPU, 64 MiB, TCP readiness probe, image cached after one warm-up start), {PARALLEL} starts in flight at a time, none stopped, until one fails, memory runs short (MemAvailable < ¼ of MemTotal or PSI some avg10 > 5 %) or {max} are running. Stopped because: {stopped}. {} starts failed. Then through the whole platform: one `ferry server` (`--cpu-overcommit 100`), a service of 10m / 16Mi instances (the smallest a spec takes; ¾ of this machine's memory holds ~1,130) with one ready, `ferry scale --min {server_n}`, and the time until all are ready (`GET /v1/instances` polled every 100 ms). No peer.",
            outcome.failed
        ),
        rows,
    ))
}
