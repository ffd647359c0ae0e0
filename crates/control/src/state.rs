//! The control plane's live view (nodes, instances, traffic signals) and the reconcile step
//! that turns desired state plus signals into agent commands and a route table.

use crate::scheduler::{self, NodeCapacity};
use crate::store::{RevisionRecord, ServiceRecord};
use ferry_api::agent::{
    AgentCommand, ExitReason, InstanceSpec, InstanceState, InstanceStatus, NodeInfo, Probe,
    ProbeKind,
};
use ferry_api::gateway::{Endpoint, RevisionRoute, RouteTable, ServiceRoute, TrafficTarget};
use ferry_api::service::{InstanceView, ServiceSpec};
use ferry_api::{Cpu, ImageRef, Memory};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;

/// How long a stopped instance stays out of the load balancer before it gets SIGTERM, so the
/// gateway has the new table and in-flight requests finish.
pub const DRAIN_MS: u64 = 1_500;
/// Signals older than this are stale.
const SIGNAL_TTL_MS: u64 = 3_000;

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

/// Traffic signals of one revision.
#[derive(Debug, Default, Clone)]
pub struct RevisionSignals {
    pub waiting: u32,
    pub demand_at_ms: u64,
    pub avg_concurrency: f64,
    pub stats_at_ms: u64,
    /// Last time the revision had any request in flight or waiting.
    pub last_active_ms: u64,
    /// (time, desired) samples inside the scale-down window.
    pub history: VecDeque<(u64, u32)>,
    pub failures: u32,
    pub backoff_until_ms: u64,
    pub last_failure: Option<String>,
}

#[derive(Default)]
pub struct Live {
    pub nodes: BTreeMap<String, NodeInfo>,
    pub instances: BTreeMap<String, Instance>,
    pub signals: HashMap<String, RevisionSignals>,
    pub route_version: u64,
    pub last_routes: Option<Vec<ServiceRoute>>,
}

/// What a reconcile step wants done.
#[derive(Default, Debug)]
pub struct Actions {
    pub commands: Vec<(String, AgentCommand)>,
    pub routes: Option<RouteTable>,
    /// Services whose rollout completed: move all traffic to this revision.
    pub rollouts: Vec<(String, String)>,
}

/// The instance count the load asks for, before the scale-down window.
pub fn wanted(spec: &ServiceSpec, sig: &RevisionSignals, now_ms: u64, in_traffic: bool) -> u32 {
    if !in_traffic {
        return 0;
    }
    let target = f64::from(spec.target_concurrency.max(1));
    let mut n = spec.min_instances;
    if now_ms.saturating_sub(sig.stats_at_ms) < SIGNAL_TTL_MS && sig.avg_concurrency > 0.0 {
        n = n.max((sig.avg_concurrency / target).ceil() as u32);
    }
    if sig.waiting > 0 && now_ms.saturating_sub(sig.demand_at_ms) < SIGNAL_TTL_MS {
        n = n.max(sig.waiting.div_ceil(spec.target_concurrency.max(1)));
    }
    n.min(spec.max_instances)
}

/// The desired count after the scale-down window: the largest wanted count seen within the
/// idle grace, so a revision scales down (and to zero) only after `idle_grace_secs` without
/// the load that needed those instances.
pub fn desired(
    spec: &ServiceSpec,
    sig: &mut RevisionSignals,
    now_ms: u64,
    in_traffic: bool,
) -> u32 {
    let w = wanted(spec, sig, now_ms, in_traffic);
    if !in_traffic {
        sig.history.clear();
        return 0;
    }
    let window = spec.idle_grace_secs.saturating_mul(1000);
    sig.history.push_back((now_ms, w));
    while sig
        .history
        .front()
        .is_some_and(|(t, _)| now_ms.saturating_sub(*t) > window)
    {
        sig.history.pop_front();
    }
    // Keep the history small: collapse runs of equal samples.
    while sig.history.len() > 2 {
        let n = sig.history.len();
        if sig.history[n - 1].1 == sig.history[n - 2].1
            && sig.history[n - 2].1 == sig.history[n - 3].1
        {
            sig.history.remove(n - 2);
        } else {
            break;
        }
    }
    sig.history
        .iter()
        .map(|(_, d)| *d)
        .max()
        .unwrap_or(w)
        .clamp(spec.min_instances, spec.max_instances)
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn instance_spec(rev: &RevisionRecord, id: &str) -> Result<InstanceSpec, String> {
    let spec = &rev.spec;
    let v = spec.validate().map_err(|e| e.to_string())?;
    let image: ImageRef = rev.image.parse().map_err(|e| format!("{e}"))?;
    Ok(InstanceSpec {
        instance_id: id.to_string(),
        service: rev.service.clone(),
        revision: rev.name.clone(),
        configuration: rev.service.clone(),
        image,
        registry_auth: None,
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

impl Live {
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
            }
            InstanceState::Failed if inst.draining_since.is_none() => {
                sig.failures += 1;
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
            // Rollout: move traffic to the latest revision once it has a ready instance, or at
            // once when nothing of the current traffic is up (nothing to protect).
            let mut traffic = svc.traffic.clone();
            if svc.rollout_pending {
                let current_ready: usize = traffic.iter().map(|t| ready_of(&t.revision)).sum();
                if ready_of(&svc.latest_revision) > 0 || current_ready == 0 {
                    traffic = vec![TrafficTarget {
                        revision: svc.latest_revision.clone(),
                        percent: 100,
                    }];
                    actions
                        .rollouts
                        .push((svc.name.clone(), svc.latest_revision.clone()));
                }
            }
            let mut rev_routes = Vec::new();
            for rev in revs {
                let in_traffic = traffic
                    .iter()
                    .any(|t| t.revision == rev.name && t.percent > 0)
                    || (svc.rollout_pending && rev.name == svc.latest_revision);
                let sig = self.signals.entry(rev.name.clone()).or_default();
                // Scaling bounds come from the service (scale changes them without a revision).
                let mut spec = rev.spec.clone();
                spec.min_instances = svc.spec.min_instances;
                spec.max_instances = svc.spec.max_instances;
                let want = desired(&spec, sig, now, in_traffic);
                let backoff = sig.backoff_until_ms > now;
                let last_failure = sig.last_failure.clone();
                let live: Vec<&Instance> = self
                    .instances
                    .values()
                    .filter(|i| i.revision == rev.name && i.live())
                    .collect();
                let n_live = live.len() as u32;
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
                                match instance_spec(rev, &id) {
                                    Ok(spec) => {
                                        tracing::info!(service = %svc.name, revision = %rev.name, instance = %id, node = %node.name, "starting instance");
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
                                            },
                                        );
                                    }
                                    Err(e) => {
                                        self.signals
                                            .entry(rev.name.clone())
                                            .or_default()
                                            .last_failure = Some(e);
                                        break;
                                    }
                                }
                            }
                            Err(refusal) => {
                                let sig = self.signals.entry(rev.name.clone()).or_default();
                                if sig.last_failure.is_none() {
                                    tracing::warn!(revision = %rev.name, reason = %refusal, "cannot place an instance");
                                }
                                sig.last_failure =
                                    Some(format!("cannot place an instance: {refusal}"));
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
                let start_failure = if instances.is_empty() {
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
        // Instances of deleted services or revisions drain too.
        for i in self.instances.values_mut() {
            if i.live() && !known.contains_key(i.revision.as_str()) {
                i.draining_since = Some(now);
            }
        }
        // Draining instances get their stop once the gateway has had time to let go.
        for i in self.instances.values_mut() {
            if let Some(since) = i.draining_since
                && !i.stop_sent
                && (now.saturating_sub(since) >= DRAIN_MS || i.state != InstanceState::Ready)
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
    use proptest::prelude::*;

    fn spec(min: u32, max: u32) -> ServiceSpec {
        let mut s = ServiceSpec::new("r/x:v1");
        s.min_instances = min;
        s.max_instances = max;
        s.target_concurrency = 10;
        s.idle_grace_secs = 30;
        s
    }

    #[test]
    fn scales_from_zero_on_demand_and_to_zero_after_grace() {
        let s = spec(0, 10);
        let mut sig = RevisionSignals {
            waiting: 25,
            demand_at_ms: 1_000,
            ..Default::default()
        };
        assert_eq!(desired(&s, &mut sig, 1_000, true), 3, "ceil(25/10)");
        sig.waiting = 0;
        sig.avg_concurrency = 5.0;
        sig.stats_at_ms = 2_000;
        assert_eq!(
            desired(&s, &mut sig, 2_000, true),
            3,
            "no scale-down inside the window"
        );
        sig.avg_concurrency = 0.0;
        assert_eq!(
            desired(&s, &mut sig, 20_000, true),
            3,
            "still inside the idle grace"
        );
        assert_eq!(
            desired(&s, &mut sig, 31_999, true),
            1,
            "the burst of 3 left the window; the load of 1 not yet"
        );
        assert_eq!(
            desired(&s, &mut sig, 32_001, true),
            0,
            "idle for the grace: zero"
        );
        assert_eq!(desired(&s, &mut sig, 32_002, false), 0);
        let mut floor = RevisionSignals::default();
        assert_eq!(
            desired(&spec(2, 10), &mut floor, 40_000, true),
            2,
            "min instances kept"
        );
    }

    proptest! {
        #[test]
        fn desired_stays_within_bounds(
            min in 0u32..5, extra in 1u32..20, waiting in 0u32..1000, conc in 0.0f64..500.0,
            times in proptest::collection::vec(0u64..100_000, 1..30),
        ) {
            let s = spec(min, min + extra);
            let mut sig = RevisionSignals::default();
            let mut sorted = times.clone();
            sorted.sort();
            for t in sorted {
                sig.waiting = waiting;
                sig.demand_at_ms = t;
                sig.avg_concurrency = conc;
                sig.stats_at_ms = t;
                let d = desired(&s, &mut sig, t, true);
                prop_assert!(d >= min && d <= min + extra);
                prop_assert!(sig.history.len() <= 64);
            }
        }
    }
}
