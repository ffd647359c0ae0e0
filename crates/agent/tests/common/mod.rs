//! Helpers shared by the agent's integration tests: an agent on a data dir of the caller's
//! choice with its own bridge and /24, holding the static testapp image (env `IMAGE_ENV=1`,
//! `SPEC_ENV=image`; specs set `SPEC_ENV=yes`), and probes for what an instance leaves behind.
#![allow(dead_code)]

use anyhow::{Context, Result, bail};
use ferry_agent::{Agent, Config, LayoutImageSource, RuntimeConfig, image::write_layout, net};
use ferry_api::agent::{
    AgentCommand, AgentEvent, InstanceSpec, InstanceState, InstanceStatus, Probe,
};
use ferry_api::{Cpu, Memory};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub fn testapp() -> Option<PathBuf> {
    match std::env::var_os("TESTAPP_STATIC_BIN") {
        Some(p) if Path::new(&p).exists() => Some(p.into()),
        _ => {
            eprintln!(
                "skipped: TESTAPP_STATIC_BIN is not set (scripts/test builds and exports it)"
            );
            None
        }
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped: needs root");
    }
    root
}

pub fn gz_tar(entries: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, mode) in entries {
        let mut h = tar::Header::new_gnu();
        let name = path.as_bytes();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

pub struct Node {
    pub _tmp: Option<tempfile::TempDir>,
    /// The dir holding `agent/` (the data dir) and `layout/`.
    pub root: PathBuf,
    pub data: PathBuf,
    pub bridge: String,
    pub agent: Agent,
    pub commands: mpsc::Sender<AgentCommand>,
    pub events: mpsc::Receiver<AgentEvent>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    pub image_digest: String,
}

impl Node {
    /// An agent in a fresh temp dir.
    pub async fn start(n: u8) -> Result<Node> {
        Node::start_with_layers(n, None).await
    }

    /// An agent in a fresh temp dir whose image has `layers` instead of the testapp's.
    pub async fn start_with_layers(n: u8, layers: Option<Vec<Vec<u8>>>) -> Result<Node> {
        let tmp = tempfile::tempdir()?;
        let mut node = Node::start_at_with(tmp.path(), n, layers).await?;
        node._tmp = Some(tmp);
        Ok(node)
    }

    /// An agent on `root/agent` (kept when it exists: a restart) with bridge `fyt<n>` and
    /// subnet 10.89.<n>.0/24.
    pub async fn start_at(root: &Path, n: u8) -> Result<Node> {
        Node::start_at_with(root, n, None).await
    }

    async fn start_at_with(root: &Path, n: u8, layers: Option<Vec<Vec<u8>>>) -> Result<Node> {
        let data = root.join("agent");
        let layout = root.join("layout");
        let layers = match layers {
            Some(l) => l,
            None => {
                let bin = std::fs::read(testapp().context("testapp")?)?;
                vec![gz_tar(&[("testapp", &bin, 0o755)])]
            }
        };
        let cfg = RuntimeConfig {
            env: vec!["IMAGE_ENV=1".into(), "SPEC_ENV=image".into()],
            entrypoint: vec!["/testapp".into()],
            ..Default::default()
        };
        let digest = write_layout(&layout, &layers, &cfg, "latest")?;
        let mut config = Config::new(&data, format!("node-{n}"));
        let bridge = format!("fyt{n}");
        config.net = net::NetConfig {
            bridge: bridge.clone(),
            gateway: Ipv4Addr::new(10, 89, n, 1),
            prefix: 24,
        };
        config.start_timeout = Duration::from_secs(20);
        let agent = Agent::new(config, Arc::new(LayoutImageSource::new(&layout)))?;
        let (ctx, crx) = mpsc::channel(16);
        let (etx, erx) = mpsc::channel(1024);
        let shutdown = CancellationToken::new();
        let a = agent.clone();
        let sd = shutdown.clone();
        let task = tokio::spawn(async move {
            a.run(crx, etx, sd).await.expect("agent run");
        });
        Ok(Node {
            _tmp: None,
            root: root.to_path_buf(),
            data,
            bridge,
            agent,
            commands: ctx,
            events: erx,
            shutdown,
            task,
            image_digest: digest.to_string(),
        })
    }

    pub fn spec(&self, id: &str) -> InstanceSpec {
        InstanceSpec {
            instance_id: id.into(),
            service: "svc".into(),
            revision: "svc-00001".into(),
            configuration: "svc".into(),
            image: format!("localhost/testapp@{}", self.image_digest)
                .parse()
                .unwrap(),
            registry_auth: None,
            command: None,
            args: None,
            env: [("SPEC_ENV".to_string(), "yes".to_string())]
                .into_iter()
                .collect(),
            port: 8080,
            cpu: Cpu(1000),
            memory: Memory(256 << 20),
            pids_limit: None,
            outbound_network: true,
            readiness: Probe::default(),
            liveness: None,
            termination_grace_ms: 5000,
            isolation: Default::default(),
        }
    }

    /// Waits for the agent's first node report (sent once the clean-up of an earlier run is
    /// done, before any command is taken).
    pub async fn wait_node(&mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let e = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .context("waiting for the node report")?
                .context("events closed")?;
            if let AgentEvent::Node(_) = e {
                return Ok(());
            }
        }
    }

    /// Waits for a status of `id` in one of `states`.
    pub async fn wait_state(
        &mut self,
        id: &str,
        states: &[InstanceState],
    ) -> Result<InstanceStatus> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let e = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .with_context(|| format!("waiting for {id} to be {states:?}"))?
                .context("events closed")?;
            if let AgentEvent::Status(s) = e
                && s.instance_id == id
            {
                if states.contains(&s.state) {
                    return Ok(s);
                }
                if s.state.is_terminal() {
                    bail!("{id} ended early: {s:?}");
                }
            }
        }
    }

    pub async fn start_ready(&mut self, spec: InstanceSpec) -> Result<SocketAddr> {
        let id = spec.instance_id.clone();
        self.commands
            .send(AgentCommand::Start {
                spec: Box::new(spec),
            })
            .await?;
        let s = self.wait_state(&id, &[InstanceState::Ready]).await?;
        s.address.context("ready without address")
    }

    pub async fn stop(&mut self, id: &str) -> Result<InstanceStatus> {
        self.commands
            .send(AgentCommand::Stop {
                instance_id: id.into(),
                grace_ms: 5000,
            })
            .await?;
        self.wait_state(id, &[InstanceState::Stopped, InstanceState::Failed])
            .await
    }

    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// A minimal HTTP/1.0 GET: (status, body).
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await??;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("no header end")?;
    let code = head
        .split(' ')
        .nth(1)
        .context("status")?
        .parse()
        .context("status code")?;
    Ok((code, body.to_string()))
}

/// GET expecting 200 with a JSON body.
pub async fn get_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value> {
    let (code, body) = get(addr, path).await?;
    if code != 200 {
        bail!("GET {path}: {code} {body}");
    }
    Ok(serde_json::from_str(&body)?)
}

/// The cgroup dirs of instance `id` that exist (v1: one per controller; v2: one).
pub fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut v: Vec<PathBuf> = ["cpu", "cpuacct", "memory", "pids"]
        .iter()
        .map(|c| root.join(c).join("ferry").join(id))
        .chain(std::iter::once(root.join("ferry").join(id)))
        .filter(|p| p.is_dir())
        .collect();
    v.dedup();
    v
}

/// The processes in instance `id`'s cgroup.
pub fn cgroup_pids(id: &str) -> Vec<i32> {
    let mut v: Vec<i32> = cgroup_dirs(id)
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|s| {
            s.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Mount points at or below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let want = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| *m == want || m.starts_with(&format!("{want}/")))
        .map(str::to_string)
        .collect()
}

/// Everything instance `id` of the agent on `data` may leave behind.
pub fn leftovers(data: &Path, id: &str) -> Vec<String> {
    let mut v = Vec::new();
    let dir = data.join("instances").join(id);
    for m in mounts_under(&dir) {
        v.push(format!("mount {m}"));
    }
    for c in cgroup_dirs(id) {
        v.push(format!("cgroup {}", c.display()));
    }
    let veth = net::host_veth_name(id);
    if Path::new("/sys/class/net").join(&veth).exists() {
        v.push(format!("veth {veth}"));
    }
    if dir.exists() {
        v.push(format!("instance dir {}", dir.display()));
    }
    v
}

/// IPAM leases held under the data dir.
pub fn leases(data: &Path) -> Vec<String> {
    std::fs::read_dir(data.join("ipam"))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.parse::<Ipv4Addr>().is_ok())
                .collect()
        })
        .unwrap_or_default()
}

/// (state, start time) of a process from /proc/<pid>/stat; None when it is gone.
pub fn proc_state(pid: i32) -> Option<(char, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // After "pid (comm) ": state is field 3 (index 0 here), starttime field 22 (index 19).
    Some((f.first()?.chars().next()?, f.get(19)?.parse().ok()?))
}

/// Whether the process that had `start` as start time is still running (not gone, not a
/// zombie, not a new process reusing the pid).
pub fn alive(pid: i32, start: u64) -> bool {
    matches!(proc_state(pid), Some((st, t)) if t == start && st != 'Z' && st != 'X')
}
