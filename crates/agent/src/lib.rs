//! ferry-agent: the node agent. Owns what runs on one node: images (the OCI layout and the
//! unpacked layer cache), sandboxes (our own clone/pivot_root/exec runtime with namespaces,
//! an overlay rootfs, cut capabilities, no_new_privs and seccomp), cgroups, instance networking
//! (bridge, veth, IPAM, NAT) and logs.
//!
//! Must not: talk to control except through `ferry-api` messages — [`AgentCommand`]s in,
//! [`AgentEvent`]s out — nor need anything installed on the node beyond the kernel (iptables is
//! used for outbound NAT only when present).
//!
//! Entry points: [`Agent::new`] + [`Agent::run`] (or the [`run`] shortcut); [`ImageSource`] is
//! the seam for pulling images ([`LayoutImageSource`] reads an OCI layout on disk);
//! [`Agent::log_path`] / [`Agent::read_log`] / [`Agent::follow_log`] for logs.

pub mod cgroup;
pub mod http;
pub mod image;
mod instance;
mod logs;
pub mod net;
pub mod rootfs;
pub mod sandbox;
pub mod seccomp;
pub mod state;
mod sys;
pub use sys::PID_MAX;
pub mod unpack;

pub use image::{
    ImageError, ImageSource, ImageStore, LayoutImageSource, RegistryImageSource, RuntimeConfig,
};
pub use instance::ExecOutput;

use ferry_api::agent::{AgentCommand, AgentEvent, NodeInfo, ResourceSample};
use ferry_api::{Cpu, Memory};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("config {key}: {message}")]
    Config { key: &'static str, message: String },
    #[error("data dir {path:?}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("instance {0:?}: not running")]
    NoInstance(String),
    #[error("exec in {instance:?}: {message}")]
    Exec { instance: String, message: String },
}

/// The agent's configuration (validated by [`Agent::new`]).
#[derive(Debug, Clone)]
pub struct Config {
    /// Everything the agent keeps: `oci/` (layout), `cache/layers/`, `instances/` (one dir
    /// per instance, with its `state.json`), `logs/`, `ipam/`, and `agent.lock` (one running
    /// agent per data dir).
    pub data_dir: PathBuf,
    pub node_name: String,
    pub cpu_allocatable: Cpu,
    pub memory_allocatable: Memory,
    /// The agent's own HTTP API, reported to control.
    pub api_address: Option<SocketAddr>,
    pub net: net::NetConfig,
    /// Where cgroup hierarchies are mounted.
    pub cgroup_root: PathBuf,
    /// How often usage is sampled.
    pub sample_interval: Duration,
    /// How long an instance may take to become ready.
    pub start_timeout: Duration,
    /// Default pids limit when the spec sets none.
    pub default_pids_limit: u32,
    /// Turn the kernel's `favordynmods` cgroup option on at start ([`cgroup::favor_dynmods`]):
    /// task migrations then skip an RCU grace period of 5–24 ms, most of an isolated cold
    /// start on this kind of host, for slightly dearer forks and exits host-wide.
    pub cgroup_favor_dynmods: bool,
    /// An instance's log file is rotated at this size; one rotated file is kept, so an
    /// instance holds at most twice this on disk.
    pub log_max_bytes: u64,
    /// Logs of instances that no longer run are removed once unwritten for this long.
    pub log_retention: Duration,
}

/// The smallest [`Config::log_max_bytes`].
pub const MIN_LOG_MAX_BYTES: u64 = 4096;

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>, node_name: impl Into<String>) -> Config {
        Config {
            data_dir: data_dir.into(),
            node_name: node_name.into(),
            cpu_allocatable: Cpu(2000),
            memory_allocatable: Memory(2 << 30),
            api_address: None,
            net: net::NetConfig::default(),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            sample_interval: Duration::from_secs(1),
            start_timeout: Duration::from_secs(60),
            default_pids_limit: 1024,
            cgroup_favor_dynmods: true,
            log_max_bytes: 10 << 20,
            log_retention: Duration::from_secs(24 * 3600),
        }
    }

    fn validate(&self) -> Result<(), AgentError> {
        if self.node_name.is_empty() {
            return Err(AgentError::Config {
                key: "node_name",
                message: "must not be empty".into(),
            });
        }
        if !self.data_dir.is_absolute() {
            return Err(AgentError::Config {
                key: "data_dir",
                message: format!("{:?} must be absolute", self.data_dir),
            });
        }
        if self.log_max_bytes < MIN_LOG_MAX_BYTES {
            return Err(AgentError::Config {
                key: "log_max_bytes",
                message: format!(
                    "{} bytes: a log file must be allowed at least {MIN_LOG_MAX_BYTES}",
                    self.log_max_bytes
                ),
            });
        }
        if self.log_retention < Duration::from_secs(1) {
            return Err(AgentError::Config {
                key: "log_retention",
                message: format!("{:?}: must be at least a second", self.log_retention),
            });
        }
        if self.net.prefix < 8 || self.net.prefix > 30 {
            return Err(AgentError::Config {
                key: "net.prefix",
                message: format!("{} must be within 8..=30", self.net.prefix),
            });
        }
        Ok(())
    }
}

/// Shared state of a running agent.
pub(crate) struct Shared {
    pub config: Config,
    pub images: Arc<dyn ImageSource>,
    pub store: ImageStore,
    pub ipam: net::Ipam,
    pub hierarchy: cgroup::Hierarchy,
    pub events: mpsc::Sender<AgentEvent>,
    pub instances: Mutex<HashMap<String, instance::Handle>>,
    pub cached: Mutex<BTreeSet<String>>,
}

impl Shared {
    pub(crate) fn log_path(&self, id: &str) -> PathBuf {
        logs::log_path(&self.config.data_dir, id)
    }

    pub(crate) fn node_info(&self) -> NodeInfo {
        NodeInfo {
            node: self.config.node_name.clone(),
            cpu_allocatable: self.config.cpu_allocatable,
            memory_allocatable: self.config.memory_allocatable,
            cached_images: self.cached.lock().unwrap().iter().cloned().collect(),
            api_address: self.config.api_address,
        }
    }

    pub(crate) async fn emit(&self, e: AgentEvent) {
        // A closed channel means control is gone; the agent keeps running until shutdown.
        let _ = self.events.send(e).await;
    }
}

/// The open-file limit (soft, hard) instances and exec'd commands get: what the process had
/// before its first agent raised its own (docs/agent.md); (0, 0) before an agent ran.
pub fn instance_open_files() -> (u64, u64) {
    sys::instance_nofile()
}

/// A node agent. Cheap to clone; logs and exec work while [`Agent::run`] runs.
#[derive(Clone)]
pub struct Agent {
    config: Config,
    images: Arc<dyn ImageSource>,
    shared: Arc<Mutex<Option<Arc<Shared>>>>,
}

impl Agent {
    /// Validates the config and prepares the data dir.
    pub fn new(config: Config, images: Arc<dyn ImageSource>) -> Result<Agent, AgentError> {
        config.validate()?;
        for d in ["oci", "cache", "instances", "logs", "ipam"] {
            let p = config.data_dir.join(d);
            std::fs::create_dir_all(&p).map_err(|source| AgentError::DataDir {
                path: p.clone(),
                source,
            })?;
        }
        Ok(Agent {
            config,
            images,
            shared: Arc::new(Mutex::new(None)),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The log file of an instance: lines `<RFC3339> stdout|stderr <line>` (and `ferry <note>`
    /// where output was lost); the part before the last rotation is in `<path>.1`.
    pub fn log_path(&self, instance_id: &str) -> PathBuf {
        logs::log_path(&self.config.data_dir, instance_id)
    }

    /// An instance's whole log as kept: the rotated part, then the current file.
    pub async fn log_reader(
        &self,
        instance_id: &str,
    ) -> std::io::Result<impl tokio::io::AsyncRead + Send + Unpin + use<>> {
        use tokio::io::AsyncReadExt;
        let path = self.log_path(instance_id);
        let (older, current) = tokio::task::spawn_blocking(move || logs::open_log(&path))
            .await
            .map_err(std::io::Error::other)??;
        let older: Box<dyn tokio::io::AsyncRead + Send + Unpin> = match older {
            Some(f) => Box::new(tokio::fs::File::from_std(f)),
            None => Box::new(tokio::io::empty()),
        };
        Ok(older.chain(tokio::fs::File::from_std(current)))
    }

    /// An instance's whole log as kept, as text.
    pub async fn read_log(&self, instance_id: &str) -> std::io::Result<String> {
        use tokio::io::AsyncReadExt;
        let mut text = String::new();
        self.log_reader(instance_id)
            .await?
            .read_to_string(&mut text)
            .await?;
        Ok(text)
    }

    /// Sends an instance's log lines, those kept and then those written, until the instance
    /// no longer runs on this agent (and its last lines are sent), `stop` is cancelled or the
    /// receiver is dropped. Follows the log across rotations.
    pub fn follow_log(&self, instance_id: &str, stop: CancellationToken) -> mpsc::Receiver<String> {
        let shared = self.shared.clone();
        let id = instance_id.to_string();
        let running = move || {
            shared
                .lock()
                .unwrap()
                .as_ref()
                .is_some_and(|s| s.instances.lock().unwrap().contains_key(&id))
        };
        instance::follow_log(self.log_path(instance_id), running, stop)
    }

    /// The running agent's state, for a call about `instance_id` (none before `run`).
    fn running(&self, instance_id: &str) -> Result<Arc<Shared>, AgentError> {
        self.shared
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| AgentError::NoInstance(instance_id.into()))
    }

    /// Runs `argv` inside a running instance (its namespaces, cgroup and root), with the
    /// instance's env and user; collects stdout/stderr and the exit code.
    pub async fn exec(
        &self,
        instance_id: &str,
        argv: Vec<String>,
        stdin: Vec<u8>,
    ) -> Result<ExecOutput, AgentError> {
        instance::exec(&self.running(instance_id)?, instance_id, argv, stdin).await
    }

    /// Starts `argv` in a running instance for an interactive session (see [`http`]).
    pub async fn spawn_exec(
        &self,
        instance_id: &str,
        argv: Vec<String>,
        stdio: sandbox::ExecStdio,
    ) -> Result<sandbox::ExecChild, AgentError> {
        instance::spawn_exec(&self.running(instance_id)?, instance_id, argv, stdio).await
    }

    /// Runs the agent until `shutdown`: executes commands, reports status changes and usage.
    /// First, before the [`AgentEvent::Node`] event and any command, it removes everything an
    /// earlier run on the same data dir left (see [`state::recover`]): after a crash the old
    /// instances' processes are SIGKILLed and their cgroups, veths, mounts, leases and dirs go.
    /// On shutdown every instance is stopped (SIGTERM, its grace capped at 5 s, SIGKILL) and
    /// cleaned up before this returns.
    pub async fn run(
        &self,
        mut commands: mpsc::Receiver<AgentCommand>,
        events: mpsc::Sender<AgentEvent>,
        shutdown: CancellationToken,
    ) -> Result<(), AgentError> {
        let cfg = self.config.clone();
        // One agent per data dir: the clean-up below would otherwise kill a running agent's
        // instances. The kernel drops the lock when the holder dies, even by SIGKILL.
        let _lock = lock_data_dir(&cfg.data_dir)?;
        match sys::raise_nofile() {
            Ok(n) => tracing::debug!(limit = n, "open-file limit of the agent"),
            Err(e) => tracing::warn!(error = %e, "raising the open-file limit"),
        }
        match sys::raise_pid_max() {
            Ok((before, after)) if before != after => {
                tracing::info!(before, after, "kernel.pid_max raised")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(
                error = %e,
                "kernel.pid_max could not be raised: instances' threads share its pids"
            ),
        }
        let netcfg = cfg.net.clone();
        tokio::task::spawn_blocking(move || net::setup_host(&netcfg))
            .await
            .map_err(|e| AgentError::Config {
                key: "net",
                message: e.to_string(),
            })??;
        let store = ImageStore::new(
            cfg.data_dir.join("oci"),
            Arc::new(unpack::LayerCache::new(cfg.data_dir.join("cache"))),
        );
        store.init()?;
        if cfg.cgroup_favor_dynmods {
            match cgroup::favor_dynmods(true) {
                Ok(cgroup::DynMods::Changed(p)) => tracing::info!(
                    mount = %p.display(),
                    "cgroup favordynmods turned on: task migrations no longer wait for an RCU \
                     grace period"
                ),
                Ok(cgroup::DynMods::Unchanged(_)) => {}
                Ok(cgroup::DynMods::NoCgroup2) => tracing::info!(
                    "no cgroup2 mount: favordynmods not set (each start waits for an RCU grace \
                     period when it joins its cgroup)"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    "cgroup favordynmods could not be turned on (kernel before 6.0?); starts \
                     wait for an RCU grace period when they join their cgroup"
                ),
            }
        }
        // Before taking commands: remove whatever an earlier run on this data dir left.
        let hierarchy = cgroup::Hierarchy::detect(&cfg.cgroup_root);
        {
            let (data, h, n) = (cfg.data_dir.clone(), hierarchy.clone(), cfg.net.clone());
            let r = tokio::task::spawn_blocking(move || state::recover(&data, &h, &n))
                .await
                .map_err(|e| AgentError::Config {
                    key: "data_dir",
                    message: format!("clean-up of an earlier run: {e}"),
                })?;
            if !r.is_empty() {
                tracing::warn!(
                    instances = ?r.instances,
                    killed = r.killed,
                    cgroups = r.cgroups,
                    veths = r.veths,
                    mounts = r.mounts,
                    leases = r.leases,
                    "removed what an earlier run of this agent left"
                );
            }
            for e in &r.errors {
                tracing::error!(error = %e, "clean-up of an earlier run incomplete");
            }
        }
        let shared = Arc::new(Shared {
            ipam: net::Ipam::new(cfg.data_dir.join("ipam"), cfg.net.clone()),
            hierarchy,
            store,
            images: self.images.clone(),
            events,
            instances: Mutex::new(HashMap::new()),
            cached: Mutex::new(BTreeSet::new()),
            config: cfg,
        });
        *self.shared.lock().unwrap() = Some(shared.clone());
        shared.emit(AgentEvent::Node(shared.node_info())).await;
        let tasks = tokio_util::task::TaskTracker::new();
        let stop_background = shutdown.child_token();
        tasks.spawn(sample_loop(shared.clone(), stop_background.clone()));
        tasks.spawn(log_sweep_loop(shared.clone(), stop_background.clone()));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                cmd = commands.recv() => {
                    let Some(cmd) = cmd else { break };
                    handle_command(&shared, &tasks, cmd).await;
                }
            }
        }
        stop_background.cancel();
        // Stop everything still running.
        let handles: Vec<_> = shared
            .instances
            .lock()
            .unwrap()
            .values()
            .map(|h| h.stop.clone())
            .collect();
        for stop in handles {
            let _ = stop.send(Duration::from_secs(5));
        }
        tasks.close();
        tasks.wait().await;
        *self.shared.lock().unwrap() = None;
        Ok(())
    }
}

/// Takes `<data_dir>/agent.lock` (flock, exclusive, close-on-exec; sandbox children close it
/// before anything else), held until the returned file is dropped.
fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File, AgentError> {
    let path = data_dir.join("agent.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| AgentError::DataDir {
            path: path.clone(),
            source,
        })?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(AgentError::Config {
            key: "data_dir",
            message: format!("{data_dir:?} is in use by another running agent"),
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(AgentError::DataDir { path, source }),
    }
}

/// Runs an agent: [`Agent::new`] then [`Agent::run`].
pub async fn run(
    config: Config,
    commands: mpsc::Receiver<AgentCommand>,
    events: mpsc::Sender<AgentEvent>,
    images: Arc<dyn ImageSource>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    Agent::new(config, images)?
        .run(commands, events, shutdown)
        .await
}

async fn handle_command(
    shared: &Arc<Shared>,
    tasks: &tokio_util::task::TaskTracker,
    cmd: AgentCommand,
) {
    match cmd {
        AgentCommand::Start { spec } => {
            let id = spec.instance_id.clone();
            if shared.instances.lock().unwrap().contains_key(&id) {
                tracing::warn!(instance = %id, "start of a running instance ignored");
                return;
            }
            let (handle, stop_rx) = instance::Handle::new();
            shared.instances.lock().unwrap().insert(id, handle);
            tasks.spawn(instance::run(shared.clone(), *spec, stop_rx));
        }
        AgentCommand::Stop {
            instance_id,
            grace_ms,
        } => {
            let h = shared
                .instances
                .lock()
                .unwrap()
                .get(&instance_id)
                .map(|h| h.stop.clone());
            match h {
                Some(stop) => {
                    let _ = stop.send(Duration::from_millis(grace_ms));
                }
                None => {
                    // Unknown: report it stopped so control can converge.
                    shared
                        .emit(instance::status(
                            shared,
                            &instance_id,
                            ferry_api::agent::InstanceState::Stopped,
                            None,
                            Some(ferry_api::agent::ExitReason::Stopped),
                        ))
                        .await;
                }
            }
        }
        AgentCommand::Prepull { image, auth } => {
            let shared = shared.clone();
            tasks.spawn(async move {
                match instance::prepare_image(&shared, &image, auth.as_ref()).await {
                    Ok(_) => shared.emit(AgentEvent::Node(shared.node_info())).await,
                    Err(e) => tracing::warn!(image = ?image, error = %e, "prepull failed"),
                }
            });
        }
    }
}

/// Removes the logs of instances that no longer run once they are older than `log_retention`:
/// at start (what earlier runs left) and then every quarter of it (at most a minute apart).
async fn log_sweep_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let retention = shared.config.log_retention;
    let mut tick = tokio::time::interval(
        (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60)),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let s = shared.clone();
        let swept = tokio::task::spawn_blocking(move || {
            logs::sweep(&s.config.data_dir.join("logs"), retention, |id| {
                s.instances.lock().unwrap().contains_key(id)
            })
        })
        .await;
        match swept {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::debug!(files = n, "logs past their retention removed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "removing old instance logs"),
            Err(e) => tracing::warn!(error = %e, "log sweep task"),
        }
    }
}

/// Every `sample_interval`, one [`ResourceSample`] per running instance. Its own task, so
/// commands are never queued behind it, and the file reads (three cgroup files per instance
/// and one netlink dump for every veth) run on a blocking thread, not a runtime worker.
async fn sample_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(shared.config.sample_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let running: Vec<(String, cgroup::Cgroup, Option<i32>)> = shared
            .instances
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(id, h)| {
                let s = h.sampling.lock().unwrap();
                s.0.clone().map(|cg| (id.clone(), cg, s.1))
            })
            .collect();
        if running.is_empty() {
            continue;
        }
        let Ok(samples) = tokio::task::spawn_blocking(move || read_samples(running)).await else {
            continue;
        };
        for s in samples {
            // A full event channel must not hold up the agent's shutdown, which waits for
            // this task.
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = shared.emit(AgentEvent::Usage(s)) => {}
            }
        }
    }
}

fn read_samples(running: Vec<(String, cgroup::Cgroup, Option<i32>)>) -> Vec<ResourceSample> {
    let links = net::link_counters().unwrap_or_else(|e| {
        tracing::debug!(error = %e, "no network counters in this sample");
        Default::default()
    });
    running
        .into_iter()
        .map(|(id, cg, veth)| {
            let u = cg.usage();
            // The host end's rx is what the instance sent.
            let link = veth
                .and_then(|i| links.get(&i).copied())
                .unwrap_or_default();
            ResourceSample {
                instance_id: id,
                at_ms: instance::now_ms(),
                cpu_usage_ns: u.cpu_ns,
                memory_current_bytes: u.memory_bytes,
                memory_peak_bytes: u.memory_peak_bytes,
                net_rx_bytes: link.tx,
                net_tx_bytes: link.rx,
            }
        })
        .collect()
}

/// Whether `path` is on the agent's data dir (helper for tests checking cleanup).
pub fn instance_dir(data_dir: &Path, instance_id: &str) -> PathBuf {
    data_dir.join("instances").join(instance_id)
}
