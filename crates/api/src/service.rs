//! The public API's service types: what `ferry deploy` sends (`ServiceSpec`) and what
//! `GET /v1/services/{name}` answers (`ServiceView`).

use crate::{Cpu, ImageRef, Memory};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The spec of a service, as a user writes it. Every change makes a new revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Image reference; a tag is resolved to a digest at deploy time.
    pub image: String,
    /// vCPU: `500m`, `0.5`, `2`.
    #[serde(default = "default_cpu")]
    pub cpu: String,
    /// Memory: `256Mi`, `1Gi`, `512M`.
    #[serde(default = "default_memory")]
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
    #[serde(default = "default_true")]
    pub outbound_network: bool,
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
        let cpu: Cpu = self.cpu.parse().map_err(|e| err("cpu", format!("{e}")))?;
        if cpu.millis() < 10 || cpu.millis() > 64_000 {
            return Err(err(
                "cpu",
                format!("{:?} must be between 10m and 64", self.cpu),
            ));
        }
        let memory: Memory = self
            .memory
            .parse()
            .map_err(|e| err("memory", format!("{e}")))?;
        if memory.bytes() < 16 << 20 || memory.bytes() > 256 << 30 {
            return Err(err(
                "memory",
                format!("{:?} must be between 16Mi and 256Gi", self.memory),
            ));
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
        if let Some(p) = &self.readiness_path
            && !p.starts_with('/')
        {
            return Err(err("readiness_path", format!("{p:?} must start with '/'")));
        }
        Ok(ValidSpec { image, cpu, memory })
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
}
