//! The control plane's live view (nodes, instances, traffic signals) and the reconcile step
//! that turns desired state plus signals into agent commands and a route table.

use crate::scaling::{self, RevScaler};
use crate::scheduler::{self, NodeCapacity};
use crate::store::{RevisionRecord, ServiceRecord};
use ferry_api::agent::{
    AgentCommand, ExitReason, InstanceSpec, InstanceState, InstanceStatus, NodeInfo, Probe,
    ProbeKind, RegistryAuth,
};
use ferry_api::gateway::{Endpoint, RevisionRoute, RouteTable, ServiceRoute, TrafficTarget};
use ferry_api::service::InstanceView;
use ferry_api::{Cpu, ImageRef, Memory};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

/// How long a stopped instance stays out of the load balancer at least before it gets SIGTERM,
/// so the gateway has the new table and has reported what is still in flight on it (its stats
/// come every second). After that it waits while requests are in flight, up to the request
/// timeout, and while WebSockets are open, up to the revision's WebSocket drain bound.
pub const DRAIN_MS: u64 = 1_500;

/// Whether a draining instance may get its stop now (SIGTERM, grace, SIGKILL).
pub fn drained(
    waited_ms: u64,
    in_flight: (u32, u32),
    request_timeout_ms: u64,
    websocket_bound_ms: u64,
) -> bool {
    let (all, upgraded) = in_flight;
    let requests = all.saturating_sub(upgraded);
    waited_ms >= DRAIN_MS
        && (requests == 0 || waited_ms >= request_timeout_ms)
        && (upgraded == 0 || waited_ms >= websocket_bound_ms)
}

#[derive(Debug, Clone)]
pub struct Instance {
    pub id: String,
    pub service: String,
    pub revision: String,
    pub node: String,
    pub state: InstanceState,
    pub address: Option<SocketAddr>,
    pub started_ms: u64,
    pub cpu: Cpu,
    pub memory: Memory,
    pub reason: Option<ExitReason>,
    /// Set when control decided to stop it: out of routing from then on.
    pub draining_since: Option<u64>,
    pub stop_sent: bool,
    /// Requests (upgraded connections included) and upgraded connections in flight on it,
    /// from the gateway's latest stats.
    pub in_flight: (u32, u32),
}

impl Instance {
    pub fn live(&self) -> bool {
        !self.state.is_terminal() && self.draining_since.is_none()
    }

    pub fn view(&self) -> InstanceView {
        InstanceView {
            id: self.id.clone(),
            service: self.service.clone(),
            revision: self.revision.clone(),
            node: self.node.clone(),
            state: if self.draining_since.is_some() && !self.state.is_terminal() {
                InstanceState::Draining
            } else {
                self.state
            },
            address: self.address,
            started_ms: self.started_ms,
            reason: self.reason.clone(),
        }
    }
}

/// Start failures of one revision, for backoff and the API.
#[derive(Debug, Default, Clone)]
pub struct RevisionSignals {
    pub failures: u32,
    pub backoff_until_ms: u64,
    pub last_failure: Option<String>,
    /// The last failure is the first crash of an instance that was serving: its replacement
    /// starts after a short backoff, so requests wait for it (as on a cold start) instead of
    /// failing at once with `last_failure`, as they do for failures to start or to place.
    pub replacing_crashed: bool,
}

impl RevisionSignals {
    /// An instance could not be made or placed: requests fail at once with `why`.
    fn cannot_start(&mut self, why: String) {
        self.replacing_crashed = false;
        self.last_failure = Some(why);
    }
}

#[derive(Default)]
pub struct Live {
    pub nodes: BTreeMap<String, NodeInfo>,
    pub instances: BTreeMap<String, Instance>,
    pub signals: HashMap<String, RevisionSignals>,
    /// Metric history and autoscaler state per revision.
    pub scalers: HashMap<String, RevScaler>,
    pub route_version: u64,
    pub last_routes: Option<Vec<ServiceRoute>>,
    /// The built-in registry's address and the credentials instances pull from it with.
    pub builtin_registry: Option<(String, RegistryAuth)>,
}

/// What a reconcile step wants done.
#[derive(Default, Debug)]
pub struct Actions {
    pub commands: Vec<(String, AgentCommand)>,
    pub routes: Option<RouteTable>,
    /// Services whose rollout completed: move all traffic to this revision.
    pub rollouts: Vec<(String, String)>,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What an agent gets to start instance `id` of `rev`; `builtin` is the built-in registry and
/// its credentials, passed on only for an image that lives there.
fn instance_spec(
    rev: &RevisionRecord,
    id: &str,
    builtin: Option<&(String, RegistryAuth)>,
) -> Result<InstanceSpec, String> {
    let spec = &rev.spec;
    let v = spec.validate().map_err(|e| e.to_string())?;
    let image: ImageRef = rev.image.parse().map_err(|e| format!("{e}"))?;
    let registry_auth = builtin
        .filter(|(registry, _)| image.registry.as_deref() == Some(registry.as_str()))
        .map(|(_, auth)| auth.clone());
    Ok(InstanceSpec {
        instance_id: id.to_string(),
        service: rev.service.clone(),
        revision: rev.name.clone(),
        configuration: rev.service.clone(),
        image,
        registry_auth,
        command: spec.command.clone(),
        args: spec.args.clone(),
        env: spec.env.clone(),
        port: spec.port,
        cpu: v.cpu,
        memory: v.memory,
        pids_limit: None,
        outbound_network: spec.outbound_network,
        readiness: Probe {
            kind: match &spec.readiness_path {
                Some(p) => ProbeKind::Http { path: p.clone() },
                None => ProbeKind::Tcp,
            },
            ..Probe::default()
        },
        liveness: None,
        termination_grace_ms: spec.termination_grace_secs * 1000,
        isolation: Default::default(),
    })
}

/// One instance to scrape custom metrics from.
#[derive(Debug, Clone)]
pub struct ScrapeTarget {
    pub revision: String,
    pub instance: String,
    pub address: SocketAddr,
    pub path: String,
    pub names: Vec<String>,
}

impl Live {
    /// An agent's resource sample: CPU and memory use against the instance's allocation.
    pub fn on_usage(&mut self, s: &ferry_api::agent::ResourceSample) {
        if let Some(i) = self.instances.get(&s.instance_id)
            && i.live()
            && i.state == InstanceState::Ready
        {
            let (cpu, mem) = (i.cpu.millis(), i.memory.bytes());
            self.scalers
                .entry(i.revision.clone())
                .or_default()
                .on_usage(s, cpu, mem);
        }
    }

    /// The gateway's per-instance load: instances it does not list have nothing in flight.
    pub fn on_gateway_load(&mut self, revisions: &[ferry_api::gateway::RevisionStats]) {
        for i in self.instances.values_mut() {
            i.in_flight = (0, 0);
        }
        for l in revisions.iter().flat_map(|r| r.instances.iter()) {
            if let Some(i) = self.instances.get_mut(&l.instance_id) {
                i.in_flight = (l.in_flight, l.upgraded);
            }
        }
    }

    pub fn on_custom(&mut self, revision: &str, instance: &str, name: &str, v: f64, now: u64) {
        if let Some(sc) = self.scalers.get_mut(revision) {
            sc.on_custom(instance, name, v, now);
        }
    }

    /// Ready instances of revisions that scale on a custom metric, one entry per path.
    pub fn scrape_targets(&self) -> Vec<ScrapeTarget> {
        let mut out = Vec::new();
        for i in self.instances.values() {
            let Some(address) = i.address else { continue };
            if !i.live() || i.state != InstanceState::Ready {
                continue;
            }
            let Some(sc) = self.scalers.get(&i.revision) else {
                continue;
            };
            let mut by_path: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for m in &sc.metrics {
                if let (Some(p), Some(n)) = (&m.path, &m.name) {
                    by_path.entry(p).or_default().push(n.clone());
                }
            }
            for (path, names) in by_path {
                out.push(ScrapeTarget {
                    revision: i.revision.clone(),
                    instance: i.id.clone(),
                    address,
                    path: path.to_string(),
                    names,
                });
            }
        }
        out
    }

    /// Applies an agent's status report. Returns a command when control does not know the
    /// instance (it must not run).
    pub fn on_status(&mut self, st: InstanceStatus, now: u64) -> Option<(String, AgentCommand)> {
        let Some(inst) = self.instances.get_mut(&st.instance_id) else {
            if st.state.is_terminal() {
                return None;
            }
            return Some((
                st.node,
                AgentCommand::Stop {
                    instance_id: st.instance_id,
                    grace_ms: 0,
                },
            ));
        };
        let was_ready = inst.state == InstanceState::Ready;
        inst.state = st.state;
        if st.address.is_some() {
            inst.address = st.address;
        }
        if st.reason.is_some() {
            inst.reason = st.reason.clone();
        }
        let sig = self.signals.entry(inst.revision.clone()).or_default();
        match st.state {
            InstanceState::Ready => {
                sig.failures = 0;
                sig.last_failure = None;
                sig.replacing_crashed = false;
            }
            InstanceState::Failed if inst.draining_since.is_none() => {
                sig.failures += 1;
                sig.replacing_crashed = was_ready && sig.failures == 1;
                let backoff = 500u64 << sig.failures.min(7);
                sig.backoff_until_ms = now + backoff.min(60_000);
                let why = match &st.reason {
                    Some(r) => describe_reason(r),
                    None => "instance failed".to_string(),
                };
                sig.last_failure = Some(why);
            }
            _ => {}
        }
        None
    }

    fn capacity(&self) -> Vec<NodeCapacity> {
        self.nodes
            .values()
            .map(|n| {
                let (mut cpu, mut mem) = (0u32, 0u64);
                for i in self
                    .instances
                    .values()
                    .filter(|i| i.node == n.node && !i.state.is_terminal())
                {
                    cpu += i.cpu.millis();
                    mem += i.memory.bytes();
                }
                NodeCapacity {
                    name: n.node.clone(),
                    cpu_allocatable: n.cpu_allocatable,
                    memory_allocatable: n.memory_allocatable,
                    cpu_used: Cpu(cpu),
                    memory_used: Memory(mem),
                    cached_images: n.cached_images.clone(),
                    schedulable: true,
                }
            })
            .collect()
    }

    /// One reconcile step over every service.
    pub fn reconcile(
        &mut self,
        services: &[(ServiceRecord, Vec<RevisionRecord>)],
        now: u64,
    ) -> Actions {
        let mut actions = Actions::default();
        // Forget terminal instances after a minute (they stay visible for describe until then).
        self.instances.retain(|_, i| {
            !(i.state.is_terminal() && now.saturating_sub(i.started_ms) > 60_000 && i.stop_sent)
        });
        let known: HashMap<&str, &RevisionRecord> = services
            .iter()
            .flat_map(|(_, revs)| revs.iter().map(|r| (r.name.as_str(), r)))
            .collect();

        let mut routes = Vec::new();
        for (svc, revs) in services {
            let ready_of = |rev: &str| {
                self.instances
                    .values()
                    .filter(|i| i.revision == rev && i.live() && i.state == InstanceState::Ready)
                    .count()
            };
            // Rollout: move traffic to the latest revision once it has a ready instance (it
            // gets one below whatever its minimum). Not sooner, even when nothing of the current
            // traffic is up: that revision is the one known to work, and it may be down only for
            // now (at zero, or just after a restart); moving at once sent a restarted server's
            // traffic to a new revision that could not start.
            let mut traffic = svc.traffic.clone();
            if svc.rollout_pending && ready_of(&svc.latest_revision) > 0 {
                traffic = vec![TrafficTarget {
                    revision: svc.latest_revision.clone(),
                    percent: 100,
                }];
                actions
                    .rollouts
                    .push((svc.name.clone(), svc.latest_revision.clone()));
            }
            let mut rev_routes = Vec::new();
            for rev in revs {
                let in_traffic = traffic
                    .iter()
                    .any(|t| t.revision == rev.name && t.percent > 0)
                    || (svc.rollout_pending && rev.name == svc.latest_revision);
                let sig = self.signals.entry(rev.name.clone()).or_default();
                let backoff = sig.backoff_until_ms > now;
                let last_failure = sig.last_failure.clone();
                let fail_fast = !sig.replacing_crashed;
                let live: Vec<&Instance> = self
                    .instances
                    .values()
                    .filter(|i| i.revision == rev.name && i.live())
                    .collect();
                let n_live = live.len() as u32;
                let ready: Vec<&str> = live
                    .iter()
                    .filter(|i| i.state == InstanceState::Ready)
                    .map(|i| i.id.as_str())
                    .collect();
                let scaler = self.scalers.entry(rev.name.clone()).or_default();
                let want = if in_traffic {
                    // Scaling bounds come from the service (scale changes them without a
                    // revision); the rest of the autoscaler's settings from the revision.
                    // A revision waiting to take the traffic gets one instance whatever its
                    // minimum (Knative's initial scale of 1): the traffic, and so the demand,
                    // stays on the old revision until it has a ready instance, so with min 0
                    // nothing asked for one and a busy service never rolled out.
                    let min = if svc.rollout_pending && rev.name == svc.latest_revision {
                        svc.spec.min_instances.max(1)
                    } else {
                        svc.spec.min_instances
                    };
                    let cfg = scaling::config(min, svc.spec.max_instances, &rev.spec);
                    scaler.tick(now, &ready, n_live, rev.spec.scale_metrics(), cfg)
                } else {
                    scaler.out_of_traffic(now);
                    0
                };
                if n_live < want && !backoff {
                    for _ in n_live..want {
                        let caps = self.capacity();
                        let Ok(v) = rev.spec.validate() else { break };
                        let digest = rev.image.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
                        let req = scheduler::Request {
                            cpu: v.cpu,
                            memory: v.memory,
                            image_digest: digest,
                        };
                        match scheduler::place(&caps, &req) {
                            Ok(node) => {
                                let id = format!(
                                    "{}-{}",
                                    rev.name,
                                    &uuid::Uuid::new_v4().simple().to_string()[..8]
                                );
                                match instance_spec(rev, &id, self.builtin_registry.as_ref()) {
                                    Ok(spec) => {
                                        tracing::info!(service = %svc.name, revision = %rev.name, instance = %id, node = %node.name, "starting instance");
                                        if let Some(sc) = self.scalers.get_mut(&rev.name) {
                                            sc.starts += 1;
                                        }
                                        actions.commands.push((
                                            node.name.clone(),
                                            AgentCommand::Start {
                                                spec: Box::new(spec),
                                            },
                                        ));
                                        self.instances.insert(
                                            id.clone(),
                                            Instance {
                                                id,
                                                service: svc.name.clone(),
                                                revision: rev.name.clone(),
                                                node: node.name.clone(),
                                                state: InstanceState::Pending,
                                                address: None,
                                                started_ms: now,
                                                cpu: v.cpu,
                                                memory: v.memory,
                                                reason: None,
                                                draining_since: None,
                                                stop_sent: false,
                                                in_flight: (0, 0),
                                            },
                                        );
                                    }
                                    Err(e) => {
                                        self.signals
                                            .entry(rev.name.clone())
                                            .or_default()
                                            .cannot_start(e);
                                        break;
                                    }
                                }
                            }
                            Err(refusal) => {
                                let sig = self.signals.entry(rev.name.clone()).or_default();
                                if sig.last_failure.is_none() {
                                    tracing::warn!(revision = %rev.name, reason = %refusal, "cannot place an instance");
                                }
                                sig.cannot_start(format!("cannot place an instance: {refusal}"));
                                break;
                            }
                        }
                    }
                } else if n_live > want {
                    // Stop the surplus: not-ready ones first, then the newest.
                    let mut victims: Vec<(bool, u64, String)> = live
                        .iter()
                        .map(|i| {
                            (
                                i.state == InstanceState::Ready,
                                u64::MAX - i.started_ms,
                                i.id.clone(),
                            )
                        })
                        .collect();
                    victims.sort();
                    for (_, _, id) in victims.into_iter().take((n_live - want) as usize) {
                        if let Some(i) = self.instances.get_mut(&id) {
                            tracing::info!(revision = %rev.name, instance = %id, "scaling down");
                            i.draining_since = Some(now);
                            if let Some(sc) = self.scalers.get_mut(&rev.name) {
                                sc.stops += 1;
                            }
                        }
                    }
                }
                let instances: Vec<Endpoint> = self
                    .instances
                    .values()
                    .filter(|i| {
                        i.revision == rev.name && i.live() && i.state == InstanceState::Ready
                    })
                    .filter_map(|i| {
                        i.address.map(|a| Endpoint {
                            instance_id: i.id.clone(),
                            address: a,
                        })
                    })
                    .collect();
                let start_failure = if instances.is_empty() && fail_fast {
                    last_failure
                } else {
                    None
                };
                rev_routes.push(RevisionRoute {
                    revision: rev.name.clone(),
                    container_concurrency: rev.spec.concurrency,
                    request_timeout_ms: rev.spec.request_timeout_secs * 1000,
                    max_body_bytes: rev.spec.max_body_bytes,
                    h2c: rev.spec.h2c,
                    queue_limit: rev.spec.queue_limit,
                    instances,
                    start_failure,
                });
            }
            routes.push(ServiceRoute {
                service: svc.name.clone(),
                traffic,
                revisions: rev_routes,
            });
        }
        self.scalers.retain(|r, _| known.contains_key(r.as_str()));
        // Instances of deleted services or revisions drain too.
        for i in self.instances.values_mut() {
            if i.live() && !known.contains_key(i.revision.as_str()) {
                i.draining_since = Some(now);
            }
        }
        // Draining instances get their stop once the gateway has let go and what was in flight
        // on them has finished (bounded).
        for i in self.instances.values_mut() {
            let bounds = known.get(i.revision.as_str()).map_or((0, 0), |r| {
                (
                    r.spec.request_timeout_secs * 1000,
                    r.spec.websocket_drain_secs * 1000,
                )
            });
            if let Some(since) = i.draining_since
                && !i.stop_sent
                && (i.state != InstanceState::Ready
                    || drained(now.saturating_sub(since), i.in_flight, bounds.0, bounds.1))
            {
                i.stop_sent = true;
                let grace_ms = known
                    .get(i.revision.as_str())
                    .map_or(10_000, |r| r.spec.termination_grace_secs * 1000);
                actions.commands.push((
                    i.node.clone(),
                    AgentCommand::Stop {
                        instance_id: i.id.clone(),
                        grace_ms,
                    },
                ));
            }
        }
        if self.last_routes.as_ref() != Some(&routes) {
            self.route_version += 1;
            self.last_routes = Some(routes.clone());
            actions.routes = Some(RouteTable {
                version: self.route_version,
                services: routes,
            });
        }
        actions
    }
}

pub fn describe_reason(r: &ExitReason) -> String {
    match r {
        ExitReason::Stopped => "stopped".into(),
        ExitReason::Exited { code } => format!("the instance exited with code {code}"),
        ExitReason::Signaled { signal } => format!("the instance was killed by signal {signal}"),
        ExitReason::OomKilled => "the instance ran out of memory (OOM-killed)".into(),
        ExitReason::ProbeFailed { message } => format!("readiness probe failed: {message}"),
        ExitReason::ImageError { message } => format!("image error: {message}"),
        ExitReason::StartError { message } => format!("start failed: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::service::ServiceSpec;

    fn service() -> Vec<(ServiceRecord, Vec<RevisionRecord>)> {
        let spec: ServiceSpec = serde_json::from_value(serde_json::json!({
            "image": "r/x:v1", "cpu": "100m", "memory": "64Mi", "target_concurrency": 2,
            "idle_grace_secs": 3, "autoscaling": { "stable_window_secs": 4 }
        }))
        .unwrap();
        let rev = RevisionRecord {
            name: "s-00001".into(),
            service: "s".into(),
            image: "r/x@sha256:0000000000000000000000000000000000000000000000000000000000000000"
                .into(),
            spec: spec.clone(),
            created_ms: 0,
        };
        let svc = ServiceRecord {
            name: "s".into(),
            spec,
            latest_revision: rev.name.clone(),
            traffic: vec![TrafficTarget {
                revision: rev.name.clone(),
                percent: 100,
            }],
            created_ms: 0,
            updated_ms: 0,
            rollout_pending: false,
        };
        vec![(svc, vec![rev])]
    }

    fn ready_all(live: &mut Live, now: u64) {
        let ids: Vec<String> = live.instances.keys().cloned().collect();
        for (n, id) in ids.into_iter().enumerate() {
            live.on_status(
                InstanceStatus {
                    instance_id: id,
                    node: "n".into(),
                    state: InstanceState::Ready,
                    address: Some(format!("10.0.0.{}:8080", n + 2).parse().unwrap()),
                    reason: None,
                    at_ms: now,
                },
                now,
            );
        }
    }

    /// Live state with one node, "n", of 4 CPUs and 4 GiB.
    fn live_with_a_node() -> Live {
        let mut live = Live::default();
        live.nodes.insert(
            "n".into(),
            NodeInfo {
                node: "n".into(),
                cpu_allocatable: Cpu(4000),
                memory_allocatable: Memory(4 << 30),
                cached_images: vec![],
                api_address: None,
            },
        );
        live
    }

    /// Adds s-00002 to [`service`] as the revision being rolled out.
    fn roll_out_second_revision(svcs: &mut [(ServiceRecord, Vec<RevisionRecord>)]) {
        let (svc, revs) = &mut svcs[0];
        let mut rev2 = revs[0].clone();
        rev2.name = "s-00002".into();
        revs.push(rev2);
        svc.latest_revision = "s-00002".into();
        svc.rollout_pending = true;
    }

    /// An instance's status report from node "n" at `now`.
    fn report(
        live: &mut Live,
        id: &str,
        state: InstanceState,
        reason: Option<ExitReason>,
        now: u64,
    ) {
        let address = (state == InstanceState::Ready).then(|| "10.0.0.9:8080".parse().unwrap());
        live.on_status(
            InstanceStatus {
                instance_id: id.to_string(),
                node: "n".into(),
                state,
                address,
                reason,
                at_ms: now,
            },
            now,
        );
    }

    #[test]
    fn drain_waits_for_in_flight_requests_and_websockets_within_bounds() {
        assert!(
            !drained(1_000, (0, 0), 300_000, 60_000),
            "the gateway lets go first"
        );
        assert!(drained(DRAIN_MS, (0, 0), 300_000, 60_000));
        assert!(
            !drained(5_000, (2, 0), 300_000, 60_000),
            "requests in flight"
        );
        assert!(
            drained(300_000, (2, 0), 300_000, 60_000),
            "bounded by the request timeout"
        );
        assert!(
            !drained(30_000, (1, 1), 300_000, 60_000),
            "a WebSocket is open"
        );
        assert!(
            drained(60_000, (1, 1), 300_000, 60_000),
            "bounded by the WebSocket bound"
        );
        assert!(
            !drained(60_000, (2, 1), 300_000, 60_000),
            "and a request still runs"
        );
    }

    /// Demand starts instances; when the load is gone they leave the route table first and
    /// get their stop (SIGTERM, grace, SIGKILL) only after the drain delay.
    #[test]
    fn autoscaled_up_then_drained_down() {
        let mut live = live_with_a_node();
        let svcs = service();
        let t0 = 1_000_000;
        live.scalers
            .entry("s-00001".into())
            .or_default()
            .on_demand(6, t0);
        let a = live.reconcile(&svcs, t0);
        let starts = a
            .commands
            .iter()
            .filter(|(_, c)| matches!(c, AgentCommand::Start { .. }))
            .count();
        assert_eq!(starts, 3, "6 waiting / target 2");
        ready_all(&mut live, t0 + 100);
        let a = live.reconcile(&svcs, t0 + 200);
        let routed = |a: &Actions| {
            a.routes
                .as_ref()
                .map(|r| r.services[0].revisions[0].instances.len())
        };
        assert_eq!(routed(&a), Some(3));
        // No load for longer than the stable window and the grace: out of routing, no stop yet.
        let t1 = t0 + 10_000;
        let a = live.reconcile(&svcs, t1);
        assert_eq!(routed(&a), Some(0));
        assert!(
            !a.commands
                .iter()
                .any(|(_, c)| matches!(c, AgentCommand::Stop { .. })),
            "{:?}",
            a.commands
        );
        let a = live.reconcile(&svcs, t1 + DRAIN_MS);
        let stops = a
            .commands
            .iter()
            .filter(|(_, c)| {
                matches!(
                    c,
                    AgentCommand::Stop {
                        grace_ms: 10_000,
                        ..
                    }
                )
            })
            .count();
        assert_eq!(stops, 3);
        let v = live.scalers["s-00001"].view("s-00001");
        assert_eq!((v.starts, v.stops, v.desired), (3, 3, 0));
        assert!(v.decisions.len() >= 2, "{v:?}");
    }

    #[test]
    fn a_new_revision_gets_an_instance_and_the_traffic_while_the_old_one_is_busy() {
        let mut live = live_with_a_node();
        let mut svcs = service();
        let t0 = 1_000_000;
        let starts_of = |a: &Actions, rev: &str| {
            a.commands
                .iter()
                .filter(|(_, c)| matches!(c, AgentCommand::Start { spec } if spec.revision == rev))
                .count()
        };
        live.scalers
            .entry("s-00001".into())
            .or_default()
            .on_demand(1, t0);
        assert_eq!(starts_of(&live.reconcile(&svcs, t0), "s-00001"), 1);
        ready_all(&mut live, t0 + 100);
        // A second revision (min 0) while requests keep coming to the first.
        roll_out_second_revision(&mut svcs);
        let busy = |live: &mut Live, now: u64| {
            live.scalers
                .entry("s-00001".into())
                .or_default()
                .on_demand(1, now)
        };
        busy(&mut live, t0 + 200);
        let a = live.reconcile(&svcs, t0 + 200);
        assert_eq!(starts_of(&a, "s-00002"), 1, "{:?}", a.commands);
        assert!(a.rollouts.is_empty(), "not before it is ready");
        ready_all(&mut live, t0 + 300);
        busy(&mut live, t0 + 400);
        let a = live.reconcile(&svcs, t0 + 400);
        assert_eq!(a.rollouts, [("s".to_string(), "s-00002".to_string())]);
    }

    #[test]
    fn requests_wait_for_the_replacement_of_a_crashed_instance_but_fail_fast_on_start_failures() {
        let mut live = live_with_a_node();
        let svcs = service();
        let t0 = 1_000_000;
        let fail = |live: &mut Live, now: u64| {
            let ids: Vec<String> = live.instances.keys().cloned().collect();
            for id in ids {
                if live.instances[&id].live() {
                    let crash = Some(ExitReason::Exited { code: 3 });
                    report(live, &id, InstanceState::Failed, crash, now);
                }
            }
        };
        let start_failure = |live: &Live| {
            live.last_routes.as_ref().unwrap()[0].revisions[0]
                .start_failure
                .clone()
        };
        let starts = |a: &Actions| {
            a.commands
                .iter()
                .filter(|(_, c)| matches!(c, AgentCommand::Start { .. }))
                .count()
        };
        live.scalers
            .entry("s-00001".into())
            .or_default()
            .on_demand(1, t0);
        assert_eq!(starts(&live.reconcile(&svcs, t0)), 1);
        ready_all(&mut live, t0 + 100);
        live.reconcile(&svcs, t0 + 200);
        // The serving instance crashes: requests are held for its replacement, which starts
        // after the backoff.
        fail(&mut live, t0 + 300);
        let a = live.reconcile(&svcs, t0 + 400);
        assert_eq!(start_failure(&live), None);
        assert_eq!(starts(&a), 0, "backoff");
        let a = live.reconcile(&svcs, t0 + 1_400);
        assert_eq!(starts(&a), 1);
        assert_eq!(start_failure(&live), None);
        // The replacement fails before it is ready: a failure to start; requests fail at once.
        fail(&mut live, t0 + 1_500);
        live.reconcile(&svcs, t0 + 1_600);
        assert_eq!(
            start_failure(&live).as_deref(),
            Some("the instance exited with code 3")
        );
        let v = &live.signals["s-00001"];
        assert_eq!(v.failures, 2);
    }

    #[test]
    fn a_rollout_with_nothing_up_keeps_the_traffic_until_the_new_revision_is_ready() {
        let mut live = live_with_a_node();
        // Nothing of s-00001 runs (at zero, or just after a restart) when s-00002 comes.
        let mut svcs = service();
        roll_out_second_revision(&mut svcs);
        let t0 = 1_000_000;
        let a = live.reconcile(&svcs, t0);
        assert!(a.rollouts.is_empty(), "not before s-00002 is ready");
        let id = live
            .instances
            .keys()
            .next()
            .cloned()
            .expect("s-00002 started");
        assert!(id.starts_with("s-00002-"));
        // It cannot start: the traffic stays where it was.
        let failed = Some(ExitReason::Exited { code: 1 });
        report(&mut live, &id, InstanceState::Failed, failed, t0 + 100);
        let a = live.reconcile(&svcs, t0 + 200);
        assert!(a.rollouts.is_empty());
        let routes = live.last_routes.as_ref().unwrap();
        assert_eq!(routes[0].traffic[0].revision, "s-00001");
        // The next start after the backoff works: now it takes the traffic.
        live.reconcile(&svcs, t0 + 1_300);
        let second = live
            .instances
            .values()
            .find(|i| i.live())
            .map(|i| i.id.clone())
            .expect("a second start");
        report(&mut live, &second, InstanceState::Ready, None, t0 + 1_400);
        let a = live.reconcile(&svcs, t0 + 1_500);
        assert_eq!(a.rollouts, [("s".to_string(), "s-00002".to_string())]);
    }

    #[test]
    fn builtin_registry_credentials_go_only_with_its_images() {
        let builtin = (
            "127.0.0.1:5000".to_string(),
            RegistryAuth::Bearer { token: "t".into() },
        );
        let mut rev = service()[0].1[0].clone();
        let digest = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
        rev.image = format!("127.0.0.1:5000/app@{digest}");
        let spec = instance_spec(&rev, "i", Some(&builtin)).unwrap();
        assert_eq!(spec.registry_auth, Some(builtin.1.clone()));
        rev.image = format!("ghcr.io/someone/app@{digest}");
        let spec = instance_spec(&rev, "i", Some(&builtin)).unwrap();
        assert_eq!(spec.registry_auth, None, "never sent to another registry");
        assert_eq!(instance_spec(&rev, "i", None).unwrap().registry_auth, None);
    }
}
