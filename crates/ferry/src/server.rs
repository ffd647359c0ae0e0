//! `ferry server`: every part in one process, and the same composition for in-process tests.

use crate::config::{DaemonArgs, Settings, write_json_atomic};
use anyhow::Context;
use clap::Args;
use ferry_api::gateway::RouteTable;
use ferry_api::{Cpu, Memory};
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// The addresses a daemon bound, printed on start and written to `<data-dir>/addresses.json`.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Addresses {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry: Option<SocketAddr>,
}

impl Addresses {
    /// Prints the addresses and writes them atomically to `<data_dir>/addresses.json`.
    pub fn announce(&self, data_dir: &Path) -> anyhow::Result<()> {
        for (what, a) in [
            ("api", self.api),
            ("gateway", self.gateway),
            ("registry", self.registry),
        ] {
            if let Some(a) = a {
                println!("{what:<8} http://{a}");
            }
        }
        write_json_atomic(
            &data_dir.join("addresses.json"),
            &serde_json::to_value(self)?,
        )
    }
}

/// Binds `addr` (port 0 picks a free port), naming `what` in the error.
pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} address {addr}"))
}

/// A running all-in-one platform.
pub struct Platform {
    pub addresses: Addresses,
    shutdown: CancellationToken,
    tasks: JoinSet<anyhow::Result<()>>,
}

impl Platform {
    /// Binds every listener, then starts every part.
    pub async fn start(settings: Settings) -> anyhow::Result<Platform> {
        std::fs::create_dir_all(&settings.data_dir)
            .with_context(|| format!("creating {}", settings.data_dir.display()))?;
        let data_dir = std::fs::canonicalize(&settings.data_dir)?;
        let registry = bind(settings.registry_addr, "registry").await?;
        let api = bind(settings.api_addr, "API").await?;
        let gateway = bind(settings.gateway_addr, "gateway").await?;
        let addresses = Addresses {
            api: Some(api.local_addr()?),
            gateway: Some(gateway.local_addr()?),
            registry: Some(registry.local_addr()?),
        };
        let registry_addr = addresses.registry.expect("bound");
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();

        let (agent_tx, agent_rx) = mpsc::channel(1024);
        let (agent_ev_tx, agent_ev_rx) = mpsc::channel(4096);
        let (gw_ev_tx, gw_ev_rx) = mpsc::channel(4096);
        let (routes_tx, routes_rx) = watch::channel(RouteTable::default());

        let token = shutdown.clone();
        let mut reg_config = settings.registry.clone();
        reg_config.root = data_dir.join("registry");
        // With registry auth on, the platform's own pulls (control resolving tags, agents
        // fetching images) carry a token of this run's own, accepted beside the configured ones.
        let internal_registry_auth = if reg_config.auth.is_open() {
            None
        } else {
            let token = random_token().context("a token for the platform's own registry pulls")?;
            reg_config.auth.tokens.push(token.clone());
            Some(ferry_api::agent::RegistryAuth::Bearer { token })
        };
        tasks.spawn(async move {
            ferry_registry::serve(registry, reg_config, token)
                .await
                .context("registry")
        });

        let mut agent =
            ferry_agent::Config::new(data_dir.join("agent"), settings.node_name.clone());
        let (cpu, memory) = host_allocatable(settings.cpu_overcommit);
        agent.cpu_allocatable = cpu;
        agent.cgroup_favor_dynmods = settings.cgroup_favordynmods;
        agent.memory_allocatable = memory;
        agent.log_max_bytes = settings.log_max_bytes;
        agent.log_retention = settings.log_retention;
        agent.net = ferry_agent::net::NetConfig {
            bridge: settings.bridge.clone(),
            gateway: settings.bridge_address,
            prefix: settings.subnet_prefix,
        };
        // The node's own API (logs, exec), which control proxies to; loopback only.
        let node_api = bind(SocketAddr::from(([127, 0, 0, 1], 0)), "node API").await?;
        agent.api_address = Some(node_api.local_addr()?);
        let agent =
            ferry_agent::Agent::new(agent, std::sync::Arc::new(ferry_agent::RegistryImageSource))?;
        let token = shutdown.clone();
        let node_router = ferry_agent::http::router(agent.clone());
        tasks.spawn(async move {
            axum::serve(node_api, node_router)
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await
                .context("node API")
        });
        let token = shutdown.clone();
        tasks.spawn(async move {
            agent
                .run(agent_rx, agent_ev_tx, token)
                .await
                .context("agent")
        });

        let control = ferry_control::Config {
            data_dir: data_dir.clone(),
            domain: settings.domain.clone(),
            gateway_addr: addresses.gateway,
            default_registry: Some(registry_addr.to_string()),
            registry_auth: internal_registry_auth,
            tick: Duration::from_millis(100),
            price_plan: settings.price_plan.clone(),
        };
        let links = ferry_control::Links {
            agents: HashMap::from([(settings.node_name.clone(), agent_tx)]),
            agent_events: agent_ev_rx,
            gateway_events: gw_ev_rx,
            routes: routes_tx,
        };
        let token = shutdown.clone();
        tasks.spawn(async move {
            ferry_control::serve(api, control, links, token)
                .await
                .context("control")
        });

        let gw = ferry_gateway::Config {
            domain: settings.domain.clone(),
            ..Default::default()
        };
        let token = shutdown.clone();
        tasks.spawn(async move {
            ferry_gateway::serve(gateway, gw, routes_rx, gw_ev_tx, token)
                .await
                .context("gateway")
        });

        addresses.announce(&settings.data_dir)?;
        Ok(Platform {
            addresses,
            shutdown,
            tasks,
        })
    }

    /// Runs until `stop` resolves or a part fails, then shuts every part down.
    pub async fn run_until(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let first = tokio::select! {
            _ = stop => None,
            r = self.tasks.join_next() => r,
        };
        self.shutdown.cancel();
        let mut result = match first {
            Some(Ok(Err(e))) => Err(e),
            Some(Err(e)) => Err(anyhow::anyhow!("a part of the server panicked: {e}")),
            _ => Ok(()),
        };
        while let Some(r) = self.tasks.join_next().await {
            if let (Ok(()), Ok(Err(e))) = (&result, r) {
                result = Err(e);
            }
        }
        result
    }

    /// Stops every part and waits for them.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.run_until(std::future::ready(())).await
    }
}

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let settings = args.daemon.resolve()?;
    let platform = Platform::start(settings).await?;
    platform.run_until(crate::shutdown_signal()).await
}

/// What this host offers instances: every CPU, and its memory less a quarter kept for the host.
/// 32 random bytes from the kernel, as hex.
fn random_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What this node offers instances: its cores times `cpu_overcommit`, and three quarters of
/// its memory.
fn host_allocatable(cpu_overcommit: f64) -> (Cpu, Memory) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let cpu = (cpus * 1000.0 * cpu_overcommit).min(f64::from(u32::MAX)) as u32;
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(2 << 30, |kib| kib * 1024);
    (Cpu(cpu), Memory(total / 4 * 3))
}
