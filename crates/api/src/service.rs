//! The public API's service types: what `ferry deploy` sends (`ServiceSpec`) and what
//! `GET /v1/services/{name}` answers (`ServiceView`).

use crate::{Cpu, ImageRef, Memory};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The spec of a service, as a user writes it. Every change makes a new revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Image reference; a tag is resolved to a digest at deploy time.
    pub image: String,
    /// vCPU: `500m`, `0.5`, `2` (a JSON number is taken as its text: `0.5`, `2`).
    #[serde(default = "default_cpu", deserialize_with = "string_or_number")]
    pub cpu: String,
    /// Memory: `256Mi`, `1Gi`, `512M` (a JSON number is bytes).
    #[serde(default = "default_memory", deserialize_with = "string_or_number")]
    pub memory: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub args: Option<Vec<String>>,
    /// Hard limit of requests one instance takes at once; 0 = unlimited.
    #[serde(default)]
    pub concurrency: u32,
    /// Concurrent requests per instance the scaler aims for.
    #[serde(default = "default_target")]
    pub target_concurrency: u32,
    #[serde(default)]
    pub min_instances: u32,
    #[serde(default = "default_max")]
    pub max_instances: u32,
    /// Idle time after which a service scales to zero.
    #[serde(default = "default_idle")]
    pub idle_grace_secs: u64,
    /// Time to the first byte of a response.
    #[serde(default = "default_timeout")]
    pub request_timeout_secs: u64,
    #[serde(default = "default_body")]
    pub max_body_bytes: u64,
    /// Requests held while no instance is free.
    #[serde(default = "default_queue")]
    pub queue_limit: u32,
    /// Speak HTTP/2 without TLS to instances.
    #[serde(default)]
    pub h2c: bool,
    /// HTTP readiness probe path; default a TCP connect to the port.
    #[serde(default)]
    pub readiness_path: Option<String>,
    #[serde(default = "default_grace")]
    pub termination_grace_secs: u64,
    /// On scale-down or a revision switch, open WebSockets (upgraded connections) of a
    /// draining instance are kept up to this long before it gets SIGTERM.
    #[serde(default = "default_ws_drain")]
    pub websocket_drain_secs: u64,
    #[serde(default = "default_true")]
    pub outbound_network: bool,
    /// How the autoscaler decides (docs/autoscaling.md). Absent in older specs: the defaults,
    /// scaling on concurrency with `target_concurrency`.
    #[serde(default)]
    pub autoscaling: Autoscaling,
}

/// The autoscaler's settings for a service (a KPA-style decision; docs/autoscaling.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Autoscaling {
    /// Window the stable (scale-down) average is taken over.
    pub stable_window_secs: u64,
    /// The panic window as a percentage of the stable window (at least one 1-second bucket).
    pub panic_window_pct: u32,
    /// Panic when the panic-window demand reaches this percentage of the ready instances.
    pub panic_threshold_pct: u32,
    /// Per decision, at most this many times the ready count (up).
    pub max_scale_up_rate: f64,
    /// Per decision, down to no fewer than ready / this.
    pub max_scale_down_rate: f64,
    /// The count only falls to the largest count wanted within this delay.
    pub scale_down_delay_secs: u64,
    /// What to scale on, each with a per-instance target; the largest count asked for wins.
    /// Empty: concurrency with `target_concurrency`.
    pub metrics: Vec<MetricTarget>,
    pub anti_thrash: AntiThrash,
}

impl Default for Autoscaling {
    fn default() -> Autoscaling {
        Autoscaling {
            stable_window_secs: 60,
            panic_window_pct: 10,
            panic_threshold_pct: 200,
            max_scale_up_rate: 1000.0,
            max_scale_down_rate: 2.0,
            scale_down_delay_secs: 0,
            metrics: Vec::new(),
            anti_thrash: AntiThrash::default(),
        }
    }
}

/// Damping against thrash: more than `max_flips` reversals of the scaling direction within
/// `window_secs` hold the peak count of that window warm for `cooldown_secs` (doubling each
/// time it engages again, relaxing when the load settles).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AntiThrash {
    pub enabled: bool,
    pub max_flips: u32,
    pub window_secs: u64,
    pub cooldown_secs: u64,
}

impl Default for AntiThrash {
    fn default() -> AntiThrash {
        AntiThrash {
            enabled: true,
            max_flips: 4,
            window_secs: 120,
            cooldown_secs: 120,
        }
    }
}

/// A metric the autoscaler scales on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    /// Requests in flight plus queued, per instance (gateway).
    Concurrency,
    /// Requests per second per instance (gateway).
    Rps,
    /// 99th-percentile latency in ms (gateway); scales proportionally, like a utilisation.
    P99LatencyMs,
    /// CPU use in percent of the instance's CPU allocation (agent cgroups).
    Cpu,
    /// Memory use in percent of the instance's memory limit (agent cgroups).
    Memory,
    /// Requests waiting in the gateway's hold queue, per instance.
    Queue,
    /// A gauge the instance exposes in Prometheus text at `path`, per instance.
    Custom,
}

impl MetricKind {
    pub const ALL: [MetricKind; 7] = [
        MetricKind::Concurrency,
        MetricKind::Rps,
        MetricKind::P99LatencyMs,
        MetricKind::Cpu,
        MetricKind::Memory,
        MetricKind::Queue,
        MetricKind::Custom,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Concurrency => "concurrency",
            MetricKind::Rps => "rps",
            MetricKind::P99LatencyMs => "p99_latency_ms",
            MetricKind::Cpu => "cpu",
            MetricKind::Memory => "memory",
            MetricKind::Queue => "queue",
            MetricKind::Custom => "custom",
        }
    }
}

impl std::str::FromStr for MetricKind {
    type Err = String;
    fn from_str(s: &str) -> Result<MetricKind, String> {
        MetricKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = MetricKind::ALL.iter().map(|k| k.as_str()).collect();
                format!("unknown metric {s:?} (one of {})", names.join(", "))
            })
    }
}

/// One metric and its per-instance target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricTarget {
    pub kind: MetricKind,
    /// Per instance: concurrent requests, requests/s, ms, percent, queued requests, or the
    /// custom gauge's value.
    pub target: f64,
    /// `custom` only: the HTTP path the instance serves its Prometheus text at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `custom` only: the metric's name in that text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl MetricTarget {
    /// The label the API and `ferry describe` show: `cpu`, or `custom:queue_length`.
    pub fn label(&self) -> String {
        match (&self.kind, &self.name) {
            (MetricKind::Custom, Some(n)) => format!("custom:{n}"),
            (k, _) => k.as_str().to_string(),
        }
    }
}

impl ServiceSpec {
    /// The metrics the autoscaler uses: the spec's, or concurrency at `target_concurrency`.
    pub fn scale_metrics(&self) -> Vec<MetricTarget> {
        if self.autoscaling.metrics.is_empty() {
            vec![MetricTarget {
                kind: MetricKind::Concurrency,
                target: f64::from(self.target_concurrency.max(1)),
                path: None,
                name: None,
            }]
        } else {
            self.autoscaling.metrics.clone()
        }
    }
}

/// A quantity written as a string (`"500m"`) or, as Kubernetes manifests often do, as a bare
/// number (`2`, `0.5`): kept as its text either way, and parsed where the spec is validated.
fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct Quantity;
    impl serde::de::Visitor<'_> for Quantity {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a quantity such as \"500m\" or \"256Mi\", or a number")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(Quantity)
}

fn default_cpu() -> String {
    "1".into()
}
fn default_memory() -> String {
    "512Mi".into()
}
fn default_port() -> u16 {
    8080
}
fn default_target() -> u32 {
    100
}
fn default_max() -> u32 {
    10
}
fn default_idle() -> u64 {
    30
}
fn default_timeout() -> u64 {
    300
}
fn default_body() -> u64 {
    32 << 20
}
fn default_queue() -> u32 {
    1000
}
fn default_grace() -> u64 {
    10
}
fn default_ws_drain() -> u64 {
    60
}
fn default_true() -> bool {
    true
}

impl ServiceSpec {
    /// A spec with every default and this image.
    pub fn new(image: &str) -> ServiceSpec {
        serde_json::from_value(serde_json::json!({ "image": image })).expect("defaults deserialise")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: &'static str,
    pub message: String,
}

fn err(field: &'static str, message: impl Into<String>) -> SpecError {
    SpecError {
        field,
        message: message.into(),
    }
}

/// A spec whose quantities and references are parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidSpec {
    pub image: ImageRef,
    pub cpu: Cpu,
    pub memory: Memory,
}

impl ServiceSpec {
    pub fn validate(&self) -> Result<ValidSpec, SpecError> {
        let image: ImageRef = self
            .image
            .parse()
            .map_err(|e| err("image", format!("{e}")))?;
        // One range per quantity in what the user reads: the service's, also where the value
        // is outside what a quantity can hold at all (that said "1m and 64 cores" for `0`
        // but "10m and 64" for `5m`).
        let cpu_range = || err("cpu", format!("{:?} must be between 10m and 64", self.cpu));
        let cpu: Cpu = self.cpu.parse().map_err(|e| match e {
            crate::quantity::QuantityError::CpuRange(_) => cpu_range(),
            e => err("cpu", format!("{e}")),
        })?;
        if cpu.millis() < 10 || cpu.millis() > 64_000 {
            return Err(cpu_range());
        }
        let memory_range = || {
            err(
                "memory",
                format!("{:?} must be between 16Mi and 256Gi", self.memory),
            )
        };
        let memory: Memory = self.memory.parse().map_err(|e| match e {
            crate::quantity::QuantityError::MemoryRange(_) => memory_range(),
            e => err("memory", format!("{e}")),
        })?;
        if memory.bytes() < 16 << 20 || memory.bytes() > 256 << 30 {
            return Err(memory_range());
        }
        if self.port == 0 {
            return Err(err("port", "must be between 1 and 65535"));
        }
        for k in self.env.keys() {
            let ok = !k.is_empty()
                && !k.as_bytes()[0].is_ascii_digit()
                && k.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_');
            if !ok {
                return Err(err(
                    "env",
                    format!(
                        "variable name {k:?} must be letters, digits and '_', not starting with a digit"
                    ),
                ));
            }
            if ["PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION"].contains(&k.as_str()) {
                return Err(err("env", format!("{k} is set by the platform")));
            }
        }
        for (field, v) in [("command", &self.command), ("args", &self.args)] {
            if let Some(v) = v {
                if field == "command" && v.is_empty() {
                    return Err(err("command", "must not be empty when given"));
                }
                if v.iter().any(|a| a.contains('\0')) {
                    return Err(err(field, "arguments must not contain NUL"));
                }
            }
        }
        if self.max_instances == 0 {
            return Err(err("max_instances", "must be at least 1"));
        }
        if self.min_instances > self.max_instances {
            return Err(err(
                "min_instances",
                format!(
                    "{} is above max_instances {}",
                    self.min_instances, self.max_instances
                ),
            ));
        }
        if self.target_concurrency == 0 {
            return Err(err("target_concurrency", "must be at least 1"));
        }
        if self.request_timeout_secs == 0 || self.request_timeout_secs > 3600 {
            return Err(err("request_timeout_secs", "must be between 1 and 3600"));
        }
        if self.termination_grace_secs > 3600 {
            return Err(err("termination_grace_secs", "must be at most 3600"));
        }
        if self.websocket_drain_secs > 3600 {
            return Err(err("websocket_drain_secs", "must be at most 3600"));
        }
        if let Some(p) = &self.readiness_path
            && !p.starts_with('/')
        {
            return Err(err("readiness_path", format!("{p:?} must start with '/'")));
        }
        self.autoscaling.validate()?;
        Ok(ValidSpec { image, cpu, memory })
    }
}

fn is_metric_name(n: &str) -> bool {
    let mut b = n.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

impl Autoscaling {
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.stable_window_secs < 2 || self.stable_window_secs > 3600 {
            return Err(err(
                "autoscaling.stable_window_secs",
                format!("{} must be between 2 and 3600", self.stable_window_secs),
            ));
        }
        if self.panic_window_pct == 0 || self.panic_window_pct > 100 {
            return Err(err(
                "autoscaling.panic_window_pct",
                format!("{} must be between 1 and 100", self.panic_window_pct),
            ));
        }
        if self.panic_threshold_pct < 110 || self.panic_threshold_pct > 10_000 {
            return Err(err(
                "autoscaling.panic_threshold_pct",
                format!("{} must be between 110 and 10000", self.panic_threshold_pct),
            ));
        }
        for (field, v) in [
            ("autoscaling.max_scale_up_rate", self.max_scale_up_rate),
            ("autoscaling.max_scale_down_rate", self.max_scale_down_rate),
        ] {
            if !v.is_finite() || v <= 1.0 {
                return Err(err(field, format!("{v} must be a number above 1")));
            }
        }
        if self.scale_down_delay_secs > 3600 {
            return Err(err(
                "autoscaling.scale_down_delay_secs",
                "must be at most 3600",
            ));
        }
        if self.metrics.len() > 8 {
            return Err(err("autoscaling.metrics", "at most 8 metrics"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for m in &self.metrics {
            if !m.target.is_finite() || m.target <= 0.0 {
                return Err(err(
                    "autoscaling.metrics.target",
                    format!(
                        "{}: target {} must be a number above 0",
                        m.kind.as_str(),
                        m.target
                    ),
                ));
            }
            if matches!(m.kind, MetricKind::Cpu | MetricKind::Memory) && m.target > 100.0 {
                return Err(err(
                    "autoscaling.metrics.target",
                    format!(
                        "{}: target {} is a percentage (at most 100)",
                        m.kind.as_str(),
                        m.target
                    ),
                ));
            }
            match m.kind {
                MetricKind::Custom => {
                    match &m.path {
                        Some(p) if p.starts_with('/') && !p.contains(char::is_whitespace) => {}
                        Some(p) => {
                            return Err(err(
                                "autoscaling.metrics.path",
                                format!("{p:?} must start with '/' and contain no spaces"),
                            ));
                        }
                        None => {
                            return Err(err(
                                "autoscaling.metrics.path",
                                "a custom metric needs the path its instances serve it at",
                            ));
                        }
                    }
                    match &m.name {
                        Some(n) if is_metric_name(n) => {}
                        Some(n) => {
                            return Err(err(
                                "autoscaling.metrics.name",
                                format!("{n:?} is not a Prometheus metric name"),
                            ));
                        }
                        None => {
                            return Err(err(
                                "autoscaling.metrics.name",
                                "a custom metric needs the name of the gauge",
                            ));
                        }
                    }
                }
                k => {
                    if m.path.is_some() || m.name.is_some() {
                        return Err(err(
                            "autoscaling.metrics",
                            format!("{}: path and name are for custom metrics only", k.as_str()),
                        ));
                    }
                }
            }
            if !seen.insert(m.label()) {
                return Err(err(
                    "autoscaling.metrics",
                    format!("{} is listed twice", m.label()),
                ));
            }
        }
        let t = &self.anti_thrash;
        if t.max_flips == 0 || t.max_flips > 1000 {
            return Err(err(
                "autoscaling.anti_thrash.max_flips",
                "must be between 1 and 1000",
            ));
        }
        for (field, v) in [
            ("autoscaling.anti_thrash.window_secs", t.window_secs),
            ("autoscaling.anti_thrash.cooldown_secs", t.cooldown_secs),
        ] {
            if v == 0 || v > 86_400 {
                return Err(err(field, format!("{v} must be between 1 and 86400")));
            }
        }
        Ok(())
    }
}

/// One revision as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevisionView {
    pub name: String,
    pub service: String,
    /// The image pinned by digest.
    pub image: String,
    pub spec: ServiceSpec,
    pub created_ms: u64,
    pub ready_instances: u32,
    pub instances: u32,
    pub desired_instances: u32,
    /// Why this revision's last instance failed to start, run or be placed (cleared by a
    /// ready instance).
    #[serde(default)]
    pub last_failure: Option<String>,
}

/// One instance as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceView {
    pub id: String,
    pub service: String,
    pub revision: String,
    pub node: String,
    pub state: crate::agent::InstanceState,
    pub address: Option<std::net::SocketAddr>,
    pub started_ms: u64,
    #[serde(default)]
    pub reason: Option<crate::agent::ExitReason>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    pub url: String,
    pub spec: ServiceSpec,
    pub latest_revision: String,
    pub traffic: Vec<crate::gateway::TrafficTarget>,
    pub revisions: Vec<RevisionView>,
    pub instances: Vec<InstanceView>,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// Why the last instance start failed, when it did.
    #[serde(default)]
    pub last_failure: Option<String>,
    /// The autoscaler's state per revision that it scales.
    #[serde(default)]
    pub autoscaler: Vec<AutoscalerView>,
}

/// The autoscaler's state for one revision (`GET /v1/services/{name}/autoscaler`, and in
/// [`ServiceView::autoscaler`]). Metric figures are per ready instance (at least one), in the
/// unit of the metric's target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoscalerView {
    pub revision: String,
    pub at_ms: u64,
    pub desired: u32,
    pub ready: u32,
    /// Live instances (pending, starting or ready; not draining).
    pub instances: u32,
    pub panicking: bool,
    pub stable_window_secs: u64,
    pub panic_window_ms: u64,
    pub metrics: Vec<MetricView>,
    pub anti_thrash: AntiThrashView,
    /// Instances the autoscaler started and stopped (drained) for this revision.
    pub starts: u64,
    pub stops: u64,
    /// The last decisions that changed the count, newest last.
    pub decisions: Vec<ScalingDecision>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricView {
    /// `concurrency`, `cpu`, `custom:NAME`, ...
    pub metric: String,
    pub target: f64,
    /// The newest 1-second bucket.
    pub current: f64,
    /// Averages over the stable and the panic window.
    pub stable: f64,
    pub panic: f64,
    /// Instances this metric asks for (stable window; panic window when panicking).
    pub wanted: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AntiThrashView {
    pub enabled: bool,
    pub engaged: bool,
    /// The warm count held while engaged.
    pub warm_floor: Option<u32>,
    pub engaged_until_ms: Option<u64>,
    /// 0 = relaxed; each engagement soon after the last doubles the hold.
    pub level: u32,
    pub flips_in_window: u32,
    pub flips_total: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalingDecision {
    pub at_ms: u64,
    pub from: u32,
    pub to: u32,
    pub reason: String,
}

/// `PUT /v1/services/{name}/scale`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    pub min_instances: Option<u32>,
    pub max_instances: Option<u32>,
}

/// The error body of every `/v1` endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: String,
    pub message: String,
    pub request_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let s = ServiceSpec::new("127.0.0.1:5000/hello:v1");
        let v = s.validate().unwrap();
        assert_eq!(v.cpu.millis(), 1000);
        assert_eq!(s.port, 8080);
        let bad = |f: &dyn Fn(&mut ServiceSpec)| {
            let mut s = ServiceSpec::new("hello:v1");
            f(&mut s);
            s.validate().unwrap_err().field
        };
        assert_eq!(bad(&|s| s.cpu = "lots".into()), "cpu");
        assert_eq!(bad(&|s| s.memory = "1Ki".into()), "memory");
        assert_eq!(bad(&|s| s.image = "Bad Image".into()), "image");
        assert_eq!(bad(&|s| s.port = 0), "port");
        assert_eq!(
            bad(&|s| {
                s.env.insert("1X".into(), "v".into());
            }),
            "env"
        );
        assert_eq!(
            bad(&|s| {
                s.env.insert("PORT".into(), "1".into());
            }),
            "env"
        );
        assert_eq!(bad(&|s| s.min_instances = 20), "min_instances");
        assert_eq!(bad(&|s| s.request_timeout_secs = 0), "request_timeout_secs");
        let e = serde_json::from_str::<ServiceSpec>(r#"{"image":"x","cpuu":"1"}"#).unwrap_err();
        assert!(e.to_string().contains("cpuu"), "{e}");
    }

    #[test]
    fn cpu_and_memory_may_be_json_numbers() {
        let s: ServiceSpec =
            serde_json::from_str(r#"{"image":"x:v1","cpu":2,"memory":134217728}"#).unwrap();
        let v = s.validate().unwrap();
        assert_eq!((v.cpu.millis(), v.memory.bytes()), (2000, 128 << 20));
        let s: ServiceSpec = serde_json::from_str(r#"{"image":"x:v1","cpu":0.25}"#).unwrap();
        assert_eq!(s.validate().unwrap().cpu.millis(), 250);
        // Stored and shown as text, as if it had been written so.
        assert_eq!(serde_json::to_value(&s).unwrap()["cpu"], "0.25");
        let e = serde_json::from_str::<ServiceSpec>(r#"{"image":"x:v1","cpu":true}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a quantity such as"), "{e}");
        let negative: ServiceSpec = serde_json::from_str(r#"{"image":"x:v1","cpu":-1}"#).unwrap();
        assert_eq!(negative.cpu, "-1");
        assert!(negative.validate().is_err());
    }

    #[test]
    fn cpu_and_memory_out_of_range_name_the_service_limits_whatever_the_value() {
        let check = |cpu: &str, memory: &str| {
            let mut s = ServiceSpec::new("hello:v1");
            s.cpu = cpu.into();
            s.memory = memory.into();
            let e = s.validate().unwrap_err();
            (e.field, e.message)
        };
        for cpu in ["0", "5m", "65", "1000"] {
            let (field, message) = check(cpu, "64Mi");
            assert_eq!(field, "cpu");
            assert_eq!(message, format!("{cpu:?} must be between 10m and 64"));
        }
        for memory in ["1Ki", "8Mi", "300Gi", "2Ti"] {
            let (field, message) = check("1", memory);
            assert_eq!(field, "memory");
            assert_eq!(
                message,
                format!("{memory:?} must be between 16Mi and 256Gi")
            );
        }
        // Syntax errors keep their own explanation.
        assert!(check("lots", "64Mi").1.contains("expected millicores"));
        assert!(check("1", "64 MB").1.contains("expected bytes with a unit"));
    }

    #[test]
    fn autoscaling_defaults_and_old_specs_load() {
        // A spec stored before the autoscaler existed.
        let s: ServiceSpec =
            serde_json::from_str(r#"{"image":"x:v1","target_concurrency":7}"#).unwrap();
        assert_eq!(s.autoscaling, Autoscaling::default());
        assert_eq!(s.autoscaling.stable_window_secs, 60);
        let m = s.scale_metrics();
        assert_eq!(m.len(), 1);
        assert_eq!((m[0].kind, m[0].target), (MetricKind::Concurrency, 7.0));
        // A partial section keeps the other defaults.
        let s: ServiceSpec = serde_json::from_str(
            r#"{"image":"x:v1","autoscaling":{"stable_window_secs":6,
                "metrics":[{"kind":"rps","target":50},
                           {"kind":"custom","target":3,"path":"/metrics","name":"jobs"}]}}"#,
        )
        .unwrap();
        s.validate().unwrap();
        assert_eq!(s.autoscaling.panic_window_pct, 10);
        assert_eq!(s.scale_metrics()[1].label(), "custom:jobs");
        let e = serde_json::from_str::<ServiceSpec>(
            r#"{"image":"x:v1","autoscaling":{"metrics":[{"kind":"gpu","target":1}]}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("gpu"), "{e}");
    }

    #[test]
    fn autoscaling_validation_names_the_field() {
        let bad = |f: &dyn Fn(&mut Autoscaling)| {
            let mut s = ServiceSpec::new("hello:v1");
            f(&mut s.autoscaling);
            s.validate().unwrap_err().field
        };
        let metric = |kind, target| MetricTarget {
            kind,
            target,
            path: None,
            name: None,
        };
        assert_eq!(
            bad(&|a| a.stable_window_secs = 1),
            "autoscaling.stable_window_secs"
        );
        assert_eq!(
            bad(&|a| a.panic_window_pct = 0),
            "autoscaling.panic_window_pct"
        );
        assert_eq!(
            bad(&|a| a.panic_threshold_pct = 100),
            "autoscaling.panic_threshold_pct"
        );
        assert_eq!(
            bad(&|a| a.max_scale_up_rate = 1.0),
            "autoscaling.max_scale_up_rate"
        );
        assert_eq!(
            bad(&|a| a.max_scale_down_rate = f64::NAN),
            "autoscaling.max_scale_down_rate"
        );
        assert_eq!(
            bad(&|a| a.metrics = vec![metric(MetricKind::Rps, 0.0)]),
            "autoscaling.metrics.target"
        );
        assert_eq!(
            bad(&|a| a.metrics = vec![metric(MetricKind::Cpu, 150.0)]),
            "autoscaling.metrics.target"
        );
        assert_eq!(
            bad(&|a| a.metrics = vec![metric(MetricKind::Custom, 5.0)]),
            "autoscaling.metrics.path"
        );
        assert_eq!(
            bad(&|a| {
                let mut m = metric(MetricKind::Custom, 5.0);
                m.path = Some("/metrics".into());
                m.name = Some("1bad".into());
                a.metrics = vec![m];
            }),
            "autoscaling.metrics.name"
        );
        assert_eq!(
            bad(&|a| a.metrics = vec![metric(MetricKind::Rps, 1.0), metric(MetricKind::Rps, 2.0)]),
            "autoscaling.metrics"
        );
        assert_eq!(
            bad(&|a| a.anti_thrash.max_flips = 0),
            "autoscaling.anti_thrash.max_flips"
        );
    }
}
