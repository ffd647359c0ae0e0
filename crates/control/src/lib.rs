//! ferry-control: the control plane. Owns the public `/v1` API, desired state (SQLite),
//! revisions and their image pinning, placement (scheduler), scaling decisions, and the
//! reconcile loop that turns them into agent commands and the gateway's route table. Records
//! usage events (instance lifetimes, requests, egress) and serves them rated (`/v1/usage`,
//! `/v1/invoices/{month}`; docs/billing.md).
//!
//! Must not: proxy user traffic (the gateway does) or touch the OS (the agent does). It talks
//! to both only through `ferry-api` messages ([`Links`]).
//!
//! Entry points: [`Config`], [`Links`], [`serve`].

pub mod autoscale;
mod http;
mod prom;
pub mod scaling;
pub mod scheduler;
pub mod state;
pub mod store;
pub mod usage;

use ferry_api::agent::{AgentCommand, AgentEvent};
use ferry_api::gateway::{GatewayEvent, RouteTable};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct Config {
    /// Holds `ferry.db`.
    pub data_dir: PathBuf,
    /// Services answer at `<service>.<domain>`.
    pub domain: String,
    /// The gateway's address, for the URLs the API shows.
    pub gateway_addr: Option<SocketAddr>,
    /// Registry used for image references that name none (the built-in one).
    pub default_registry: Option<String>,
    /// Credentials for `default_registry` when it asks for them: control resolves tags with
    /// them and hands them to agents for images there. Never sent to any other registry.
    pub registry_auth: Option<ferry_api::agent::RegistryAuth>,
    /// Reconcile period (also runs at once on every signal).
    pub tick: Duration,
    /// A price-plan TOML file (docs/billing.md); `None` is the default plan.
    pub price_plan: Option<PathBuf>,
}

/// The channels to the other parts.
pub struct Links {
    /// One command channel per node agent, by node name.
    pub agents: HashMap<String, mpsc::Sender<AgentCommand>>,
    pub agent_events: mpsc::Receiver<AgentEvent>,
    pub gateway_events: mpsc::Receiver<GatewayEvent>,
    pub routes: watch::Sender<RouteTable>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("control API server: {0}")]
    Io(#[from] std::io::Error),
    #[error("price plan {path}: {message}")]
    Plan { path: PathBuf, message: String },
}

/// Reads the price plan named by `path`, or the default plan.
pub fn load_plan(path: Option<&std::path::Path>) -> Result<ferry_metering::PricePlan, Error> {
    let Some(path) = path else {
        return Ok(ferry_metering::PricePlan::default());
    };
    let fail = |message: String| Error::Plan {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    ferry_metering::PricePlan::from_toml(&text).map_err(|e| fail(e.to_string()))
}

pub(crate) struct Control {
    pub config: Config,
    pub store: store::Store,
    pub live: Mutex<state::Live>,
    pub wake: Notify,
    pub agents: HashMap<String, mpsc::Sender<AgentCommand>>,
    /// Anonymous, for registries other than the built-in one.
    pub registry: ferry_oci::client::Client,
    /// For the built-in registry, with `Config::registry_auth`.
    pub builtin_registry: ferry_oci::client::Client,
    /// Talks to the nodes' own APIs (logs, exec).
    pub http: reqwest::Client,
    /// Counts finished reconcile passes, so a write can wait until its effect is published.
    pub reconciled: watch::Sender<u64>,
    /// Rates usage for `/v1/usage` and `/v1/invoices`.
    pub plan: ferry_metering::PricePlan,
}

impl Control {
    /// Wakes the reconcile loop and waits (bounded) until a pass that started after this call
    /// has published its routes and commands.
    pub async fn converge(&self) {
        let mut rx = self.reconciled.subscribe();
        let start = *rx.borrow_and_update();
        self.wake.notify_one();
        let _ =
            tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|g| *g >= start + 2)).await;
    }
}

/// Runs the API server and the reconcile loop until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    links: Links,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let plan = load_plan(config.price_plan.as_deref())?;
    std::fs::create_dir_all(&config.data_dir)?;
    let store = store::Store::open(&config.data_dir.join("ferry.db"))?;
    // Instances of an earlier control process are gone: bill them up to when they were last
    // seen alive.
    let closed = store.close_open_instances()?;
    if closed > 0 {
        tracing::warn!(
            closed,
            "closed the usage of instances left open by the previous run"
        );
    }
    let control = Arc::new(Control {
        store,
        live: Mutex::new(state::Live {
            builtin_registry: config
                .default_registry
                .clone()
                .zip(config.registry_auth.clone()),
            ..Default::default()
        }),
        wake: Notify::new(),
        agents: links.agents,
        registry: ferry_oci::client::Client::new(None),
        builtin_registry: ferry_oci::client::Client::new(
            config
                .registry_auth
                .as_ref()
                .map(ferry_oci::client::Credentials::from),
        ),
        reconciled: watch::channel(0).0,
        http: reqwest::Client::new(),
        plan,
        config,
    });
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(agent_events(
        control.clone(),
        links.agent_events,
        shutdown.clone(),
    ));
    tasks.spawn(gateway_events(
        control.clone(),
        links.gateway_events,
        shutdown.clone(),
    ));
    tasks.spawn(scrape_loop(control.clone(), shutdown.clone()));
    tasks.spawn(reconcile_loop(
        control.clone(),
        links.routes,
        shutdown.clone(),
    ));
    let app = http::router(control.clone());
    let s = shutdown.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { s.cancelled().await })
        .await?;
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn agent_events(
    c: Arc<Control>,
    mut rx: mpsc::Receiver<AgentEvent>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::new();
    // Resource samples come in bursts (one per instance per second): their `last_seen_ms`
    // updates are written together, before the next status report, in one transaction.
    let mut seen: Vec<(String, u64)> = Vec::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            n = rx.recv_many(&mut batch, 256) => if n == 0 { return },
        };
        {
            // Resource samples feed the autoscaler's CPU and memory metrics.
            let mut live = c.live.lock().expect("live state lock");
            for ev in &batch {
                if let AgentEvent::Usage(sample) = ev {
                    live.on_usage(sample);
                }
            }
        }
        for ev in batch.drain(..) {
            if let AgentEvent::Usage(sample) = ev {
                seen.push((usage::instance_event_id(&sample.instance_id), sample.at_ms));
                continue;
            }
            flush_seen(&c, &mut seen);
            let now = state::now_ms();
            let (reply, metered) = {
                let mut live = c.live.lock().expect("live state lock");
                match ev {
                    AgentEvent::Node(info) => {
                        live.nodes.insert(info.node.clone(), info);
                        (None, None)
                    }
                    AgentEvent::Status(st) => {
                        let m = usage::from_status(live.instances.get(&st.instance_id), &st);
                        (live.on_status(st, now), m)
                    }
                    AgentEvent::Usage(_) => (None, None),
                }
            };
            if let Some(m) = metered {
                usage::apply(&c.store, &m);
            }
            if let Some((node, cmd)) = reply {
                send(&c, &node, cmd).await;
            }
            c.wake.notify_one();
        }
        flush_seen(&c, &mut seen);
    }
}

fn flush_seen(c: &Control, seen: &mut Vec<(String, u64)>) {
    if seen.is_empty() {
        return;
    }
    if let Err(e) = c.store.touch_instances(seen) {
        tracing::error!(error = %e, "recording that instances are alive");
    }
    seen.clear();
}

async fn gateway_events(
    c: Arc<Control>,
    mut rx: mpsc::Receiver<GatewayEvent>,
    shutdown: CancellationToken,
) {
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = rx.recv() => match ev { Some(ev) => ev, None => return },
        };
        if let GatewayEvent::Stats { at_ms, revisions } = &ev {
            let events = usage::from_stats(*at_ms, revisions);
            if !events.is_empty()
                && let Err(e) = c.store.record_usage(&events)
            {
                tracing::error!(error = %e, at_ms, "recording request and egress usage");
            }
        }
        let now = state::now_ms();
        let mut live = c.live.lock().expect("live state lock");
        match ev {
            GatewayEvent::Demand {
                revision, waiting, ..
            } => {
                live.scalers
                    .entry(revision)
                    .or_default()
                    .on_demand(waiting, now);
                drop(live);
                c.wake.notify_one();
            }
            GatewayEvent::Stats { revisions, .. } => {
                live.on_gateway_load(&revisions);
                for r in &revisions {
                    live.scalers
                        .entry(r.revision.clone())
                        .or_default()
                        .on_stats(r, now);
                }
            }
        }
    }
}

/// Once a second, reads the custom metrics of every ready instance whose revision scales on
/// one: `GET http://<instance><path>`, Prometheus text, the named gauges summed over series.
async fn scrape_loop(c: Arc<Control>, shutdown: CancellationToken) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(800))
        .build()
        .unwrap_or_default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let targets = c.live.lock().expect("live state lock").scrape_targets();
        if targets.is_empty() {
            continue;
        }
        let scrapes = targets.into_iter().map(|t| {
            let client = client.clone();
            async move {
                let url = format!("http://{}{}", t.address, t.path);
                let text = async {
                    client
                        .get(&url)
                        .send()
                        .await?
                        .error_for_status()?
                        .text()
                        .await
                };
                (t, text.await)
            }
        });
        let results = futures_util::future::join_all(scrapes).await;
        let now = state::now_ms();
        let mut live = c.live.lock().expect("live state lock");
        for (t, res) in results {
            match res {
                Ok(text) => {
                    for name in &t.names {
                        if let Some(v) = prom::value(&text, name) {
                            live.on_custom(&t.revision, &t.instance, name, v, now);
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(instance = %t.instance, path = %t.path, error = %e, "scraping custom metrics");
                }
            }
        }
    }
}

async fn send(c: &Control, node: &str, cmd: AgentCommand) {
    match c.agents.get(node) {
        Some(tx) => {
            if tx.send(cmd).await.is_err() {
                tracing::warn!(node, "agent channel closed");
            }
        }
        None => tracing::warn!(node, "no channel to node"),
    }
}

async fn reconcile_loop(
    c: Arc<Control>,
    routes: watch::Sender<RouteTable>,
    shutdown: CancellationToken,
) {
    // Desired state is read from the database only when a write changed it; every pass (100 ms,
    // and at once on each cold-start demand) otherwise reuses it.
    let mut cache: Option<(u64, Vec<Desired>)> = None;
    loop {
        let generation = c.store.desired_generation();
        if cache.as_ref().is_none_or(|(g, _)| *g != generation) {
            match load_services(&c) {
                Ok(s) => cache = Some((generation, s)),
                Err(e) => tracing::error!(error = %e, "reading desired state"),
            }
        }
        let services: &[_] = cache.as_ref().map_or(&[], |(_, s)| s.as_slice());
        let actions = {
            let mut live = c.live.lock().expect("live state lock");
            live.reconcile(services, state::now_ms())
        };
        for (svc, rev) in &actions.rollouts {
            let t = vec![ferry_api::gateway::TrafficTarget {
                revision: rev.clone(),
                percent: 100,
            }];
            if let Err(e) = c.store.set_traffic(svc, &t, state::now_ms()) {
                tracing::error!(error = %e, service = %svc, "moving traffic");
            } else {
                tracing::info!(service = %svc, revision = %rev, "rollout complete: traffic moved");
            }
        }
        if let Some(table) = actions.routes {
            routes.send_replace(table);
        }
        for (node, cmd) in actions.commands {
            send(&c, &node, cmd).await;
        }
        c.reconciled.send_modify(|g| *g += 1);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = c.wake.notified() => {}
            _ = tokio::time::sleep(c.config.tick) => {}
        }
    }
}

/// A service with its revisions, as the reconcile pass reads them.
type Desired = (store::ServiceRecord, Vec<store::RevisionRecord>);

fn load_services(c: &Control) -> Result<Vec<Desired>, store::StoreError> {
    let mut out = Vec::new();
    for s in c.store.services()? {
        let revs = c.store.revisions(&s.name)?;
        out.push((s, revs));
    }
    Ok(out)
}
