//! Messages between control and the gateway. Control publishes a [`RouteTable`] (the whole
//! table, versioned) whenever routing changes; the gateway sends [`GatewayEvent`]s: demand for
//! a revision that has no free ready instance (cold start), and per-revision stats every second.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteTable {
    /// Increases with every change.
    pub version: u64,
    pub services: Vec<ServiceRoute>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceRoute {
    pub service: String,
    /// Percent of traffic per revision; sums to 100.
    pub traffic: Vec<TrafficTarget>,
    pub revisions: Vec<RevisionRoute>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficTarget {
    pub revision: String,
    pub percent: u8,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevisionRoute {
    pub revision: String,
    /// Requests one instance takes at once; 0 = unlimited.
    pub container_concurrency: u32,
    /// Time to the first byte of the response.
    pub request_timeout_ms: u64,
    pub max_body_bytes: u64,
    /// Speak h2c (HTTP/2 without TLS) to instances.
    pub h2c: bool,
    /// Requests held while no instance is free; beyond this, 503.
    pub queue_limit: u32,
    /// Ready instances, and only those.
    pub instances: Vec<Endpoint>,
    /// Set when the last start of an instance failed; held requests get a 503 naming it.
    #[serde(default)]
    pub start_failure: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub instance_id: String,
    pub address: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum GatewayEvent {
    /// Requests are waiting for `revision` and no ready instance has room.
    Demand {
        service: String,
        revision: String,
        waiting: u32,
    },
    /// One second of traffic, per revision.
    Stats {
        at_ms: u64,
        revisions: Vec<RevisionStats>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevisionStats {
    pub service: String,
    pub revision: String,
    /// Mean in-flight requests over the window.
    pub avg_concurrency: f64,
    pub max_concurrency: u32,
    pub requests: u64,
    /// Requests waiting in the hold queue at the end of the window.
    pub queue_depth: u32,
    pub p99_latency_ms: f64,
    pub egress_bytes: u64,
    pub window_ms: u64,
    /// Instances with requests in flight at the end of the window (the others have none):
    /// control stops a draining instance once it has none, bounded by the request timeout.
    #[serde(default)]
    pub instances: Vec<InstanceLoad>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceLoad {
    pub instance_id: String,
    /// Requests in flight, upgraded connections (WebSockets) included.
    pub in_flight: u32,
    /// Of those, upgraded connections: kept up to the revision's WebSocket drain bound.
    pub upgraded: u32,
}
