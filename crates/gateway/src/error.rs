//! The one error type of the proxy path: every failure the gateway answers itself is rendered
//! as `{ "code", "message", "request_id" }` with `x-ferry-error-source` saying who failed.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use crate::body::{GatewayBody, full};

/// Who caused a failure: decides 4xx vs 5xx and whether a retry elsewhere can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The gateway or the control plane (no route, no capacity, cold start failed).
    Platform,
    /// The upstream instance (refused the connection, reset, timed out).
    Instance,
    /// The client (bad host, body too large).
    Client,
}

impl ErrorSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorSource::Platform => "platform",
            ErrorSource::Instance => "instance",
            ErrorSource::Client => "client",
        }
    }
}

/// A failure answered by the gateway itself.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ProxyError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub origin: ErrorSource,
    /// Seconds for `Retry-After`, when the client may simply try again.
    pub retry_after: Option<u32>,
}

impl ProxyError {
    pub fn new(
        status: StatusCode,
        code: &'static str,
        source: ErrorSource,
        message: impl Into<String>,
    ) -> Self {
        ProxyError {
            status,
            code,
            message: message.into(),
            origin: source,
            retry_after: None,
        }
    }

    pub fn service_not_found(host: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "service_not_found",
            ErrorSource::Client,
            format!("no service serves host {host:?}"),
        )
    }

    pub fn queue_full(service: &str, revision: &str, limit: u32) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "queue_full",
            ErrorSource::Platform,
            format!(
                "service {service:?} revision {revision:?}: no instance free and {limit} requests already waiting"
            ),
        );
        e.retry_after = Some(1);
        e
    }

    pub fn start_failure(service: &str, revision: &str, reason: &str) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "start_failure",
            ErrorSource::Platform,
            format!(
                "service {service:?} revision {revision:?}: instance failed to start: {reason}"
            ),
        )
    }

    pub fn no_instance_timeout(service: &str, revision: &str, ms: u64) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "no_instance",
            ErrorSource::Platform,
            format!(
                "service {service:?} revision {revision:?}: no instance became ready within {ms} ms"
            ),
        )
    }

    pub fn upstream_timeout(instance: &str, ms: u64) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            ErrorSource::Instance,
            format!("instance {instance:?} sent no response headers within {ms} ms"),
        )
    }

    pub fn upstream_unreachable(instance: &str, err: &dyn std::error::Error) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_unreachable",
            ErrorSource::Instance,
            format!("instance {instance:?}: {}", chain(err)),
        )
    }

    /// The instance answered 101 to a request that asked for no upgrade.
    pub fn bad_upgrade(instance: &str) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "bad_upgrade",
            ErrorSource::Instance,
            format!("instance {instance:?} switched protocols unasked"),
        )
    }

    pub fn body_too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            ErrorSource::Client,
            format!("request body exceeds the limit of {limit} bytes"),
        )
    }

    pub fn no_revision(service: &str, detail: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_revision",
            ErrorSource::Platform,
            format!("service {service:?}: {detail}"),
        )
    }

    /// The JSON envelope.
    pub fn body(&self, request_id: &str) -> String {
        serde_json::json!({
            "code": self.code,
            "message": self.message,
            "request_id": request_id,
        })
        .to_string()
    }

    /// Renders the JSON envelope.
    pub fn into_response(self, request_id: &str) -> Response<GatewayBody> {
        let mut resp = Response::new(full(Bytes::from(self.body(request_id))));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            "x-ferry-error-source",
            HeaderValue::from_static(self.origin.as_str()),
        );
        if let Ok(v) = HeaderValue::from_str(request_id) {
            h.insert("x-request-id", v);
        }
        if let Some(s) = self.retry_after {
            h.insert(http::header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

/// "a: b: c" from an error and its sources.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let m = e.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = e.source();
    }
    s
}
