//! Messages between control and a node agent. In `ferry server` they travel over in-process
//! channels; between machines over HTTP as JSON. Control sends [`AgentCommand`]s; the agent
//! answers with [`AgentEvent`]s. Neither side calls into the other.

use crate::{Cpu, ImageRef, Memory};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// Everything a node needs to run one instance of a revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// Unique id, chosen by control (`<revision>-<random>`).
    pub instance_id: String,
    pub service: String,
    /// Revision name, also exported as `K_REVISION`.
    pub revision: String,
    /// Exported as `K_CONFIGURATION` (the service name in Ferry).
    pub configuration: String,
    /// Image pinned by digest; `registry` is always set.
    pub image: ImageRef,
    /// Credentials for the image's registry, when it needs them.
    #[serde(default)]
    pub registry_auth: Option<RegistryAuth>,
    /// Replaces the image's Entrypoint when set.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Replaces the image's Cmd when set.
    #[serde(default)]
    pub args: Option<Vec<String>>,
    /// The service's env, applied after the image's env and the platform's (`PORT`, `K_*`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The port the instance listens on; exported as `PORT`.
    pub port: u16,
    pub cpu: Cpu,
    pub memory: Memory,
    #[serde(default)]
    pub pids_limit: Option<u32>,
    /// Whether the instance may open outbound connections (NAT); default true.
    #[serde(default = "default_true")]
    pub outbound_network: bool,
    #[serde(default)]
    pub readiness: Probe,
    #[serde(default)]
    pub liveness: Option<Probe>,
    /// SIGTERM → this grace → SIGKILL.
    #[serde(default = "default_grace_ms")]
    pub termination_grace_ms: u64,
    #[serde(default)]
    pub isolation: Isolation,
}

fn default_true() -> bool {
    true
}

fn default_grace_ms() -> u64 {
    10_000
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegistryAuth {
    Basic { username: String, password: String },
    Bearer { token: String },
}

/// How the agent tells an instance is ready or alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub kind: ProbeKind,
    #[serde(default = "default_period_ms")]
    pub period_ms: u64,
    #[serde(default = "default_probe_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
}

fn default_period_ms() -> u64 {
    1_000
}
fn default_probe_timeout_ms() -> u64 {
    1_000
}
fn default_failure_threshold() -> u32 {
    3
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            kind: ProbeKind::Tcp,
            period_ms: default_period_ms(),
            timeout_ms: default_probe_timeout_ms(),
            failure_threshold: default_failure_threshold(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum ProbeKind {
    /// TCP connect to the instance's port.
    Tcp,
    /// HTTP GET of `path`; 2xx/3xx is success.
    Http { path: String },
}

/// The isolation class of a sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    #[default]
    Container,
    Microvm,
}

/// Lifecycle of an instance: pending → starting → ready → draining → stopped, or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Pending,
    Starting,
    Ready,
    Draining,
    Stopped,
    Failed,
}

impl InstanceState {
    pub fn is_terminal(self) -> bool {
        matches!(self, InstanceState::Stopped | InstanceState::Failed)
    }
}

/// Why an instance ended (or failed to start).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ExitReason {
    /// Asked to stop by control.
    Stopped,
    Exited {
        code: i32,
    },
    Signaled {
        signal: i32,
    },
    OomKilled,
    ProbeFailed {
        message: String,
    },
    ImageError {
        message: String,
    },
    StartError {
        message: String,
    },
}

/// The agent's report of an instance, sent on every state change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub instance_id: String,
    pub node: String,
    pub state: InstanceState,
    /// Where the gateway connects (`ip:port`), once starting.
    #[serde(default)]
    pub address: Option<SocketAddr>,
    #[serde(default)]
    pub reason: Option<ExitReason>,
    /// Unix milliseconds of this report.
    pub at_ms: u64,
}

/// Resource use of one instance, sampled from its cgroup and network namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceSample {
    pub instance_id: String,
    pub at_ms: u64,
    pub cpu_usage_ns: u64,
    pub memory_current_bytes: u64,
    pub memory_peak_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

/// What a node offers the scheduler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node: String,
    pub cpu_allocatable: Cpu,
    pub memory_allocatable: Memory,
    /// Image manifest digests unpacked in the node's layer cache.
    #[serde(default)]
    pub cached_images: Vec<String>,
    /// The node's own HTTP API (logs, exec), which control proxies to.
    #[serde(default)]
    pub api_address: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum AgentCommand {
    Start {
        spec: Box<InstanceSpec>,
    },
    /// SIGTERM, then SIGKILL after `grace_ms`; then everything of the instance is removed.
    Stop {
        instance_id: String,
        grace_ms: u64,
    },
    /// Pull and unpack an image ahead of use.
    Prepull {
        image: ImageRef,
        auth: Option<RegistryAuth>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum AgentEvent {
    Node(NodeInfo),
    Status(InstanceStatus),
    Usage(ResourceSample),
}
