//! ferry-control: the control plane. Owns the public `/v1` API, desired state (SQLite),
//! revisions and their image pinning, placement (scheduler), scaling decisions, and the
//! reconcile loop that turns them into agent commands and the gateway's route table.
//!
//! Must not: proxy user traffic (the gateway does) or touch the OS (the agent does). It talks
//! to both only through `ferry-api` messages ([`Links`]).
//!
//! Entry points: [`Config`], [`Links`], [`serve`].

mod http;
pub mod scheduler;
pub mod state;
pub mod store;

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
    /// Reconcile period (also runs at once on every signal).
    pub tick: Duration,
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
}

pub(crate) struct Control {
    pub config: Config,
    pub store: store::Store,
    pub live: Mutex<state::Live>,
    pub wake: Notify,
    pub agents: HashMap<String, mpsc::Sender<AgentCommand>>,
    pub registry: ferry_oci::client::Client,
    /// Talks to the nodes' own APIs (logs, exec).
    pub http: reqwest::Client,
    /// Counts finished reconcile passes, so a write can wait until its effect is published.
    pub reconciled: watch::Sender<u64>,
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
    std::fs::create_dir_all(&config.data_dir)?;
    let store = store::Store::open(&config.data_dir.join("ferry.db"))?;
    let control = Arc::new(Control {
        config,
        store,
        live: Mutex::new(state::Live::default()),
        wake: Notify::new(),
        agents: links.agents,
        registry: ferry_oci::client::Client::new(None),
        reconciled: watch::channel(0).0,
        http: reqwest::Client::new(),
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
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = rx.recv() => match ev { Some(ev) => ev, None => return },
        };
        let now = state::now_ms();
        let reply = {
            let mut live = c.live.lock().expect("live state lock");
            match ev {
                AgentEvent::Node(info) => {
                    live.nodes.insert(info.node.clone(), info);
                    None
                }
                AgentEvent::Status(st) => live.on_status(st, now),
                AgentEvent::Usage(_) => None,
            }
        };
        if let Some((node, cmd)) = reply {
            send(&c, &node, cmd).await;
        }
        c.wake.notify_one();
    }
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
        let now = state::now_ms();
        let mut live = c.live.lock().expect("live state lock");
        match ev {
            GatewayEvent::Demand {
                revision, waiting, ..
            } => {
                let sig = live.signals.entry(revision).or_default();
                sig.waiting = waiting;
                sig.demand_at_ms = now;
                sig.last_active_ms = now;
                drop(live);
                c.wake.notify_one();
            }
            GatewayEvent::Stats { revisions, .. } => {
                for r in revisions {
                    let sig = live.signals.entry(r.revision).or_default();
                    // Queued requests count as load too.
                    sig.avg_concurrency =
                        r.avg_concurrency.max(f64::from(r.max_concurrency.min(1)))
                            + f64::from(r.queue_depth);
                    sig.stats_at_ms = now;
                    sig.waiting = r.queue_depth;
                    if r.requests > 0 || r.max_concurrency > 0 || r.queue_depth > 0 {
                        sig.last_active_ms = now;
                    }
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
    loop {
        let services = match load_services(&c) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "reading desired state");
                Vec::new()
            }
        };
        let actions = {
            let mut live = c.live.lock().expect("live state lock");
            live.reconcile(&services, &c.config.domain, state::now_ms())
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

fn load_services(
    c: &Control,
) -> Result<Vec<(store::ServiceRecord, Vec<store::RevisionRecord>)>, store::StoreError> {
    let mut out = Vec::new();
    for s in c.store.services()? {
        let revs = c.store.revisions(&s.name)?;
        out.push((s, revs));
    }
    Ok(out)
}
