//! ferry-registry: an OCI Distribution API v1.1 server over the `ferry-oci` content store.
//!
//! Owns: the `/v2/` HTTP surface — blobs (monolithic, chunked and cross-repository-mount
//! uploads, Range reads), manifests and indexes, tags, referrers, deletes, catalog — plus auth
//! and garbage collection of the store. Must not: run anything or know about services.
//!
//! Entry points: [`Config`], [`router`], [`serve`].

mod error;
mod http;

pub use error::{Code, Error};

use ferry_oci::{Hasher, Store};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How clients authenticate.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    /// `user → password` pairs accepted with HTTP basic auth (and at `/token` for bearer).
    #[serde(default)]
    pub users: HashMap<String, String>,
    /// Static bearer tokens accepted as `Authorization: Bearer <token>`.
    #[serde(default)]
    pub tokens: Vec<String>,
}

impl Auth {
    /// Open registry: no credentials asked.
    pub fn is_open(&self) -> bool {
        self.users.is_empty() && self.tokens.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Root of the content store (`<data-dir>/registry`).
    pub root: PathBuf,
    pub auth: Auth,
    /// Largest manifest accepted (the spec suggests at least 4 MiB).
    pub max_manifest_bytes: usize,
    /// Largest blob accepted; `None` = unlimited.
    pub max_blob_bytes: Option<u64>,
    /// Open upload sessions beyond which new ones get 429 TOO_MANY_REQUESTS.
    pub max_uploads: usize,
}

impl Config {
    pub fn new(root: impl Into<PathBuf>) -> Config {
        Config {
            root: root.into(),
            auth: Auth::default(),
            max_manifest_bytes: 4 << 20,
            max_blob_bytes: None,
            max_uploads: 1024,
        }
    }
}

/// The in-memory side of an upload session: a running sha256 over the bytes appended so far,
/// valid only while appends arrive in order in this process (after a restart the file is
/// hashed again at commit).
pub(crate) struct Session {
    pub hasher: Option<Hasher>,
    pub size: u64,
}

pub(crate) struct State {
    pub store: Store,
    pub config: Config,
    pub sessions: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Session>>>>,
    /// Bearer tokens issued by `/token`.
    pub issued: Mutex<HashMap<String, std::time::Instant>>,
}

/// Opens the store and builds the router.
pub fn router(config: Config) -> Result<axum::Router, ferry_oci::StoreError> {
    let store = Store::open(&config.root)?;
    let state = Arc::new(State {
        store,
        config,
        sessions: Mutex::new(HashMap::new()),
        issued: Mutex::new(HashMap::new()),
    });
    Ok(http::router(state))
}

/// Serves the registry on `listener` until `shutdown` is cancelled, then drains.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let app = router(config)?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

/// Garbage-collects the store at `root` (see [`ferry_oci::Store::gc`]).
pub fn gc(
    root: &std::path::Path,
    grace: std::time::Duration,
) -> Result<ferry_oci::GcReport, ferry_oci::StoreError> {
    Store::open(root)?.gc(grace, std::time::Duration::from_secs(24 * 3600))
}

/// The registry's start-up and serve errors.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] ferry_oci::StoreError),
    #[error("registry server: {0}")]
    Io(#[from] std::io::Error),
}
