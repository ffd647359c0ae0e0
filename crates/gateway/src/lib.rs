//! ferry-gateway: the data plane. It owns the HTTP path from clients to instances: routing by
//! `Host: <service>.<domain>`, weighted revision choice, least-outstanding load balancing under
//! each revision's container concurrency, holding requests during cold starts (and telling
//! control with [`GatewayEvent::Demand`]), body/time limits, WebSocket and other upgrades, and
//! per-revision [`GatewayEvent::Stats`] for the autoscaler.
//!
//! It must not decide placement or scaling, talk to the store, or read the environment: it
//! learns routes from a `watch` channel of [`RouteTable`] and reports only through events.
//!
//! Entry point: [`serve`] with a [`Config`].

mod body;
mod error;
mod h1;
mod h2c;
mod headers;
mod pool;
mod proxy;
mod routing;
mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_api::gateway::{GatewayEvent, RouteTable};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// How long in-flight requests may take to finish after shutdown is asked.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Gateway settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Services are reached as `<service>.<domain>`; default `localhost`.
    pub domain: String,
    /// How often [`GatewayEvent::Stats`] is sent; default 1 s.
    pub stats_interval: Duration,
    /// A client connection is closed when it has not sent a whole request head (with its
    /// body, on the gateway's own HTTP/1.1 path) this long after it opened or after its last
    /// response, or when it has not taken any of a response for this long; default 60 s.
    pub client_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            domain: "localhost".to_string(),
            stats_interval: Duration::from_secs(1),
            client_timeout: Duration::from_secs(60),
        }
    }
}

impl Config {
    /// Fails naming the bad key.
    pub fn validate(&self) -> Result<(), Error> {
        let d = self.domain.trim();
        if d.is_empty() || d.starts_with('.') || d.contains(char::is_whitespace) {
            return Err(Error::Config {
                key: "domain",
                message: format!("{:?} is not a DNS domain", self.domain),
            });
        }
        for (key, d) in [
            ("stats_interval", self.stats_interval),
            ("client_timeout", self.client_timeout),
        ] {
            if d.is_zero() {
                return Err(Error::Config {
                    key,
                    message: "must be greater than zero".to_string(),
                });
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("gateway config {key}: {message}")]
    Config { key: &'static str, message: String },
    /// A gateway thread or its event loop could not be started.
    #[error("gateway threads: {0}")]
    Thread(std::io::Error),
}

/// Serves the gateway on `listener` until `shutdown` is cancelled, then stops accepting and
/// lets in-flight requests finish (for at most 10 s).
///
/// Connections are served by one thread per core, each with an event loop of its own (a
/// current-thread tokio runtime): a request is read, proxied and answered on one thread with
/// one wake-up per socket event, as in nginx's workers. The caller's runtime accepts and hands
/// each connection to the thread serving the fewest; route updates and stats run there too.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Config,
    routes: watch::Receiver<RouteTable>,
    events: mpsc::Sender<GatewayEvent>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    config.validate()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let stats_interval = config.stats_interval;
    let shared = Arc::new(proxy::Shared::new(
        config,
        &routes.borrow().clone(),
        events.clone(),
        threads,
    ));
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, domain = %shared.config.domain, threads, "gateway listening");
    }

    let background = CancellationToken::new();
    tokio::spawn(watch_routes(shared.clone(), routes, background.clone()));
    tokio::spawn(send_stats(
        shared.clone(),
        events,
        stats_interval,
        background.clone(),
    ));

    let conns = TaskTracker::new();
    // Cancelled once the drain is over (or when this future is dropped): the threads stop.
    let workers_stop = CancellationToken::new();
    let _stop_on_drop = workers_stop.clone().drop_guard();
    let mut workers = Vec::with_capacity(threads);
    let mut threads_joined = Vec::with_capacity(threads);
    for (i, pool) in shared.pools.iter().enumerate() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::Thread)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let load = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            shared: shared.clone(),
            pool: pool.clone(),
            conns: conns.clone(),
            load: load.clone(),
            shutdown: shutdown.clone(),
        };
        let stop = workers_stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("gateway-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    worker.run(rx).await;
                    // Its connections run here until the drain ends.
                    stop.cancelled().await;
                })
            })
            .map_err(Error::Thread)?;
        workers.push((tx, load));
        threads_joined.push(thread);
    }

    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // The socket leaves this runtime's event loop for the chosen thread's.
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        if let Some((tx, load)) = workers
            .iter()
            .min_by_key(|(_, load)| load.load(Ordering::Relaxed))
        {
            load.fetch_add(1, Ordering::Relaxed);
            if tx.send((stream, peer)).is_err() {
                load.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
    drop(listener);
    drop(workers);

    conns.close();
    shared.tunnels.close();
    info!(
        connections = conns.len(),
        tunnels = shared.tunnels.len(),
        "gateway draining"
    );
    let drained = async {
        conns.wait().await;
        shared.tunnels.wait().await;
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, drained).await.is_err() {
        warn!(
            connections = conns.len(),
            tunnels = shared.tunnels.len(),
            "drain deadline passed; closing connections"
        );
        shared.hard_stop.cancel();
        conns.wait().await;
        shared.tunnels.wait().await;
    }
    workers_stop.cancel();
    let _ = tokio::task::spawn_blocking(move || {
        for t in threads_joined {
            let _ = t.join();
        }
    })
    .await;
    background.cancel();
    info!("gateway stopped");
    Ok(())
}

/// One gateway thread: serves the connections handed to it, each as a task on this thread.
struct Worker {
    shared: Arc<proxy::Shared>,
    pool: proxy::Pool,
    conns: TaskTracker,
    /// Connections open on this thread; the acceptor picks the thread with the fewest.
    load: Arc<AtomicUsize>,
    shutdown: CancellationToken,
}

impl Worker {
    /// Until the acceptor stops handing over connections.
    async fn run(self, mut rx: mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr)>) {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.shared.config.client_timeout);
        while let Some((stream, peer)) = rx.recv().await {
            // The acceptor counted this connection; the count falls when it ends, however.
            let counted = Counted(self.load.clone());
            let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (shared, pool) = (self.shared.clone(), self.pool.clone());
            let shutdown = self.shutdown.clone();
            let builder = builder.clone();
            self.conns.spawn(async move {
                let _counted = counted;
                let hard_stop = shared.hard_stop.clone();
                // The gateway's own HTTP/1.1 path first; hyper takes over if a request needs it.
                let io = tokio::select! {
                    biased;
                    served = h1::serve(&shared, &pool, stream, peer, &shutdown) => match served {
                        h1::Served::Closed => return,
                        h1::Served::Handoff(io) => io,
                    },
                    _ = hard_stop.cancelled() => return,
                };
                let svc = service_fn(move |req| proxy::handle(shared.clone(), pool.clone(), peer, req));
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r { debug!(%peer, error = %e, "connection ended with error"); }
                        return;
                    }
                    _ = shutdown.cancelled() => {}
                }
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r { debug!(%peer, error = %e, "connection ended with error"); }
                    }
                    _ = hard_stop.cancelled() => {}
                }
            });
        }
    }
}

/// One connection in a gateway thread's count, taken off when dropped.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Mirrors the published route table into the gateway's index and wakes held requests.
async fn watch_routes(
    shared: Arc<proxy::Shared>,
    mut routes: watch::Receiver<RouteTable>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = routes.changed() => if r.is_err() {
                // Control went away: keep serving the last table.
                stop.cancelled().await;
                return;
            },
        }
        let table = routes.borrow_and_update().clone();
        let idx = proxy::index(&table);
        debug!(
            version = table.version,
            services = idx.len(),
            "route table updated"
        );
        shared.revs.retain(|s, r| {
            idx.get(s)
                .is_some_and(|svc| svc.revisions.iter().any(|x| x.revision == r))
        });
        shared.index.send_replace(idx);
        shared.revs.wake_all();
    }
}

/// Every `interval`, one [`GatewayEvent::Stats`] with the revisions that saw traffic.
async fn send_stats(
    shared: Arc<proxy::Shared>,
    events: mpsc::Sender<GatewayEvent>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for pool in &shared.pools {
            pool.sweep();
        }
        let now = Instant::now();
        let revisions: Vec<_> = shared
            .revs
            .all()
            .iter()
            .filter_map(|r| r.take_stats(now))
            .collect();
        if revisions.is_empty() {
            continue;
        }
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        tokio::select! {
            _ = stop.cancelled() => return,
            r = events.send(GatewayEvent::Stats { at_ms, revisions }) => if r.is_err() {
                debug!("gateway event receiver closed; stats stop");
                return;
            },
        }
    }
}
