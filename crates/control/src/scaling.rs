//! Per-revision metric history in 1-second buckets, fed by the gateway's stats and demand, the
//! agents' resource samples and the custom-metric scrapes, and the autoscaler's carried state.
//! [`RevScaler::tick`] turns them into the desired count with [`crate::autoscale::decide`] and
//! keeps the last decisions with their reasons for the API.

use crate::autoscale::{self, Config, Decision, Sample, ScalerState, Series, ThrashConfig};
use ferry_api::agent::ResourceSample;
use ferry_api::gateway::RevisionStats;
use ferry_api::service::{
    AntiThrashView, AutoscalerView, MetricKind, MetricTarget, MetricView, ScalingDecision,
    ServiceSpec,
};
use std::collections::{BTreeMap, HashMap, VecDeque};

/// Per-instance readings older than this are not counted.
const FRESH_MS: u64 = 3_000;
/// Decisions kept for the API.
const DECISIONS: usize = 20;

/// The decision's config for a revision: bounds from the service, the rest from the revision.
pub fn config(min: u32, max: u32, spec: &ServiceSpec) -> Config {
    let a = &spec.autoscaling;
    Config {
        min,
        max,
        stable_window_ms: a.stable_window_secs * 1000,
        panic_window_pct: u64::from(a.panic_window_pct),
        panic_threshold: f64::from(a.panic_threshold_pct) / 100.0,
        max_scale_up_rate: a.max_scale_up_rate,
        max_scale_down_rate: a.max_scale_down_rate,
        scale_down_delay_ms: a.scale_down_delay_secs * 1000,
        scale_to_zero_grace_ms: spec.idle_grace_secs * 1000,
        thrash: ThrashConfig {
            enabled: a.anti_thrash.enabled,
            max_flips: a.anti_thrash.max_flips,
            window_ms: a.anti_thrash.window_secs * 1000,
            cooldown_ms: a.anti_thrash.cooldown_secs * 1000,
        },
    }
}

#[derive(Debug, Default, Clone)]
struct InstanceReadings {
    /// The previous CPU counter: (time, ns).
    cpu_counter: Option<(u64, u64)>,
    /// (time, value) of the newest readings.
    cpu_pct: Option<(u64, f64)>,
    memory_pct: Option<(u64, f64)>,
    custom: BTreeMap<String, (u64, f64)>,
}

/// One revision's metrics and scaler state.
#[derive(Debug, Default)]
pub struct RevScaler {
    /// Buckets per metric label (`concurrency`, `rps`, ..., `custom:NAME`).
    series: BTreeMap<String, Vec<Sample>>,
    /// Request load (in flight, queued, requests): its last non-zero bucket starts the grace.
    activity: Vec<Sample>,
    instances: HashMap<String, InstanceReadings>,
    state: ScalerState,
    /// The metrics in force (from the last tick's spec), for the scraper.
    pub metrics: Vec<MetricTarget>,
    cfg: Config,
    last: Option<Decision>,
    pub desired: u32,
    pub ready: u32,
    pub live: u32,
    pub at_ms: u64,
    pub decisions: VecDeque<ScalingDecision>,
    pub starts: u64,
    pub stops: u64,
}

fn bucket(at_ms: u64) -> u64 {
    at_ms / 1000 * 1000
}

/// Puts `value` into the bucket of `at_ms`: the larger of the two when the bucket has one.
fn put(samples: &mut Vec<Sample>, at_ms: u64, value: f64, replace: bool) {
    let at = bucket(at_ms);
    if let Some(s) = samples.iter_mut().rev().take(4).find(|s| s.at_ms == at) {
        s.value = if replace { value } else { s.value.max(value) };
        return;
    }
    if samples.last().is_some_and(|s| s.at_ms > at) {
        return; // older than what we have: dropped
    }
    samples.push(Sample { at_ms: at, value });
}

impl RevScaler {
    fn record(&mut self, label: &str, at_ms: u64, value: f64) {
        let v = if value.is_finite() {
            value.max(0.0)
        } else {
            0.0
        };
        put(
            self.series.entry(label.to_string()).or_default(),
            at_ms,
            v,
            false,
        );
    }

    fn active(&mut self, at_ms: u64) {
        put(&mut self.activity, at_ms, 1.0, false);
    }

    /// One second of the gateway's stats for this revision, received at `now`.
    pub fn on_stats(&mut self, r: &RevisionStats, now: u64) {
        let window = r.window_ms.max(1) as f64;
        // Queued requests count as load too.
        let conc =
            r.avg_concurrency.max(f64::from(r.max_concurrency.min(1))) + f64::from(r.queue_depth);
        self.record(MetricKind::Concurrency.as_str(), now, conc);
        self.record(
            MetricKind::Rps.as_str(),
            now,
            r.requests as f64 * 1000.0 / window,
        );
        self.record(MetricKind::Queue.as_str(), now, f64::from(r.queue_depth));
        if r.requests > 0 {
            // Latency scales like a utilisation: the total is p99 × the instances serving it.
            self.record(
                MetricKind::P99LatencyMs.as_str(),
                now,
                r.p99_latency_ms * f64::from(self.ready.max(1)),
            );
        }
        if r.requests > 0 || r.max_concurrency > 0 || r.queue_depth > 0 {
            self.active(now);
        }
    }

    /// Requests wait for a free instance (cold start or burst).
    pub fn on_demand(&mut self, waiting: u32, now: u64) {
        self.record(MetricKind::Concurrency.as_str(), now, f64::from(waiting));
        self.record(MetricKind::Queue.as_str(), now, f64::from(waiting));
        if waiting > 0 {
            self.active(now);
        }
    }

    /// An agent's cgroup sample of one instance with its allocation.
    pub fn on_usage(&mut self, s: &ResourceSample, cpu_millis: u32, memory_bytes: u64) {
        let r = self.instances.entry(s.instance_id.clone()).or_default();
        if let Some((t0, ns0)) = r.cpu_counter
            && s.at_ms > t0
            && s.cpu_usage_ns >= ns0
        {
            let used_ns = (s.cpu_usage_ns - ns0) as f64;
            let wall_ns = (s.at_ms - t0) as f64 * 1e6;
            let alloc = f64::from(cpu_millis.max(1)) / 1000.0;
            r.cpu_pct = Some((s.at_ms, used_ns / wall_ns / alloc * 100.0));
        }
        r.cpu_counter = Some((s.at_ms, s.cpu_usage_ns));
        if memory_bytes > 0 {
            let pct = s.memory_current_bytes as f64 / memory_bytes as f64 * 100.0;
            r.memory_pct = Some((s.at_ms, pct));
        }
    }

    /// A custom metric scraped from one instance.
    pub fn on_custom(&mut self, instance: &str, name: &str, value: f64, now: u64) {
        self.instances
            .entry(instance.to_string())
            .or_default()
            .custom
            .insert(name.to_string(), (now, value));
    }

    /// Fills the current bucket of the per-instance metrics with the sum over `ready`.
    fn fill_instance_metrics(&mut self, ready: &[&str], now: u64) {
        self.instances.retain(|id, _| ready.contains(&id.as_str()));
        let fresh = |r: Option<(u64, f64)>| {
            r.filter(|(t, _)| now.saturating_sub(*t) < FRESH_MS)
                .map(|(_, v)| v)
        };
        let mut cpu = (0.0, false);
        let mut mem = (0.0, false);
        let mut custom: BTreeMap<String, f64> = BTreeMap::new();
        for r in self.instances.values() {
            if let Some(v) = fresh(r.cpu_pct) {
                cpu = (cpu.0 + v, true);
            }
            if let Some(v) = fresh(r.memory_pct) {
                mem = (mem.0 + v, true);
            }
            for (name, v) in &r.custom {
                if let Some(v) = fresh(Some(*v)) {
                    *custom.entry(format!("custom:{name}")).or_default() += v;
                }
            }
        }
        let t = bucket(now);
        let mut set = |label: &str, v: f64| {
            put(
                self.series.entry(label.to_string()).or_default(),
                t,
                v,
                true,
            );
        };
        if cpu.1 {
            set(MetricKind::Cpu.as_str(), cpu.0);
        }
        if mem.1 {
            set(MetricKind::Memory.as_str(), mem.0);
        }
        for (label, v) in custom {
            set(&label, v);
        }
    }

    fn trim(&mut self, now: u64) {
        let keep = self
            .cfg
            .stable_window_ms
            .max(self.cfg.scale_to_zero_grace_ms)
            .max(60_000)
            + 5_000;
        let from = now.saturating_sub(keep);
        for s in self.series.values_mut() {
            let n = s.partition_point(|x| x.at_ms < from);
            s.drain(..n);
        }
        // The newest activity bucket is kept however old: it dates the last request.
        let n = self.activity.partition_point(|x| x.at_ms < from);
        let n = n.min(self.activity.len().saturating_sub(1));
        self.activity.drain(..n);
    }

    /// The desired count for a revision in traffic; `ready` are its ready instances, `live`
    /// how many are up or coming up.
    pub fn tick(
        &mut self,
        now: u64,
        ready: &[&str],
        live: u32,
        metrics: Vec<MetricTarget>,
        cfg: Config,
    ) -> u32 {
        self.cfg = cfg;
        self.metrics = metrics;
        self.ready = ready.len() as u32;
        self.live = live;
        self.at_ms = now;
        self.fill_instance_metrics(ready, now);
        self.trim(now);
        let labels: Vec<(String, f64, bool)> = self
            .metrics
            .iter()
            .map(|m| (m.label(), m.target, m.kind == MetricKind::Custom))
            .collect();
        let series: Vec<Series<'_>> = labels
            .iter()
            .map(|(label, target, custom)| Series {
                label,
                target: *target,
                samples: self.series.get(label).map_or(&[], |v| v.as_slice()),
                holds_when_idle: *custom,
            })
            .collect();
        let d = autoscale::decide(
            &series,
            &self.activity,
            self.ready,
            now,
            &self.cfg,
            &mut self.state,
        );
        self.note(now, d.desired, &d.reason);
        self.last = Some(d);
        self.desired
    }

    /// The revision is out of traffic: nothing runs, and the carried state starts over.
    pub fn out_of_traffic(&mut self, now: u64) {
        self.state = ScalerState::default();
        self.last = None;
        self.at_ms = now;
        self.note(now, 0, "out of traffic");
    }

    fn note(&mut self, now: u64, to: u32, reason: &str) {
        if to != self.desired {
            tracing::info!(from = self.desired, to, reason, "autoscaler");
            self.decisions.push_back(ScalingDecision {
                at_ms: now,
                from: self.desired,
                to,
                reason: reason.to_string(),
            });
            while self.decisions.len() > DECISIONS {
                self.decisions.pop_front();
            }
        }
        self.desired = to;
    }

    pub fn view(&self, revision: &str) -> AutoscalerView {
        let per = f64::from(self.ready.max(1));
        let panicking = self.last.as_ref().is_some_and(|d| d.panicking);
        let metrics = self
            .metrics
            .iter()
            .map(|m| {
                let label = m.label();
                let d = self
                    .last
                    .as_ref()
                    .and_then(|d| d.metrics.iter().find(|x| x.label == label));
                let current = self
                    .series
                    .get(&label)
                    .and_then(|s| s.last())
                    .filter(|s| self.at_ms.saturating_sub(s.at_ms) < 2_000)
                    .map_or(0.0, |s| s.value);
                MetricView {
                    metric: label,
                    target: m.target,
                    current: current / per,
                    stable: d.map_or(0.0, |d| d.stable / per),
                    panic: d.map_or(0.0, |d| d.panic / per),
                    wanted: d.map_or(0, |d| {
                        if panicking {
                            d.want_panic
                        } else {
                            d.want_stable
                        }
                    }),
                }
            })
            .collect();
        let t = &self.state.thrash;
        let floor = t.floor(self.at_ms);
        AutoscalerView {
            revision: revision.to_string(),
            at_ms: self.at_ms,
            desired: self.desired,
            ready: self.ready,
            instances: self.live,
            panicking,
            stable_window_secs: self.cfg.stable_window_ms / 1000,
            panic_window_ms: self.cfg.panic_window_ms(),
            metrics,
            anti_thrash: AntiThrashView {
                enabled: self.cfg.thrash.enabled,
                engaged: floor.is_some(),
                warm_floor: floor,
                engaged_until_ms: floor.and(t.engaged_until),
                level: t.level,
                flips_in_window: t.flips_in_window() as u32,
                flips_total: t.flips_total,
            },
            starts: self.starts,
            stops: self.stops,
            decisions: self.decisions.iter().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(conc: f64, requests: u64, queue: u32) -> RevisionStats {
        RevisionStats {
            service: "s".into(),
            revision: "s-00001".into(),
            avg_concurrency: conc,
            max_concurrency: conc.ceil() as u32,
            requests,
            queue_depth: queue,
            p99_latency_ms: 40.0,
            egress_bytes: 0,
            window_ms: 1000,
            instances: vec![],
        }
    }

    fn spec(metrics: serde_json::Value) -> ServiceSpec {
        serde_json::from_value(serde_json::json!({
            "image": "r/x:v1", "target_concurrency": 10, "idle_grace_secs": 5,
            "autoscaling": { "stable_window_secs": 6, "metrics": metrics }
        }))
        .unwrap()
    }

    #[test]
    fn gateway_stats_drive_concurrency_and_rps() {
        let s = spec(
            serde_json::json!([{"kind": "rps", "target": 50}, {"kind": "concurrency", "target": 10}]),
        );
        let mut r = RevScaler::default();
        let t0 = 100_000;
        // From zero: demand alone starts instances at once.
        r.on_demand(25, t0);
        let d = r.tick(t0, &[], 0, s.scale_metrics(), config(0, 10, &s));
        assert_eq!(d, 3, "25 waiting / 10 per instance");
        // 400 requests/s with 5 in flight: rps asks for 8.
        for i in 1..=6 {
            r.on_stats(&stats(5.0, 400, 0), t0 + i * 1000);
        }
        let d = r.tick(
            t0 + 6_000,
            &["a", "b", "c"],
            3,
            s.scale_metrics(),
            config(0, 10, &s),
        );
        assert_eq!(d, 8);
        let v = r.view("s-00001");
        assert_eq!(v.metrics[0].metric, "rps");
        assert!((v.metrics[0].current - 400.0 / 3.0).abs() < 1e-6, "{v:?}");
        assert!(
            v.decisions
                .iter()
                .any(|d| d.to == 8 && !d.reason.is_empty())
        );
        // Quiet: back to zero after the stable window and the 5 s grace.
        let mut d = 8;
        for i in 7..30 {
            d = r.tick(
                t0 + i * 1000,
                &["a"],
                d,
                s.scale_metrics(),
                config(0, 10, &s),
            );
        }
        assert_eq!(d, 0, "{:?}", r.view("s-00001"));
    }

    #[test]
    fn cpu_from_cgroup_counters() {
        let s = spec(serde_json::json!([{"kind": "cpu", "target": 50}]));
        let mut r = RevScaler::default();
        let t0 = 50_000;
        for i in 0..8u64 {
            let at = t0 + i * 1000;
            for id in ["a", "b"] {
                // 0.5 vCPU allocated, using all of it: 100 % each.
                let sample = ResourceSample {
                    instance_id: id.into(),
                    at_ms: at,
                    cpu_usage_ns: i * 500_000_000,
                    memory_current_bytes: 64 << 20,
                    memory_peak_bytes: 64 << 20,
                    net_rx_bytes: 0,
                    net_tx_bytes: 0,
                };
                r.on_usage(&sample, 500, 256 << 20);
            }
            r.on_stats(&stats(1.0, 10, 0), at);
            r.tick(at, &["a", "b"], 2, s.scale_metrics(), config(0, 10, &s));
        }
        let v = r.view("x");
        assert!((v.metrics[0].current - 100.0).abs() < 1.0, "{v:?}");
        assert_eq!(r.desired, 4, "200 % over 50 % per instance: {v:?}");
    }

    #[test]
    fn custom_metrics_sum_over_ready_instances() {
        let s = spec(
            serde_json::json!([{"kind": "custom", "target": 5, "path": "/metrics", "name": "jobs"}]),
        );
        let mut r = RevScaler::default();
        let t0 = 10_000;
        for i in 0..3 {
            let now = t0 + i * 1000;
            r.on_custom("a", "jobs", 12.0, now);
            r.on_custom("gone", "jobs", 100.0, now);
            r.on_stats(&stats(1.0, 1, 0), now);
            r.tick(now, &["a"], 1, s.scale_metrics(), config(0, 10, &s));
        }
        assert_eq!(
            r.desired, 3,
            "12 / 5 per instance; not-ready instances do not count"
        );
    }
}
