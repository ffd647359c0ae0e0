//! `ferry server`: every part in one process, and the same composition for in-process tests.

use crate::config::{DaemonArgs, Settings, write_json_atomic};
use anyhow::Context;
use clap::Args;
use serde::Serialize;
use std::net::SocketAddr;
use std::path::Path;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// The addresses a daemon bound, printed on start and written to `<data-dir>/addresses.json`.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Addresses {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry: Option<SocketAddr>,
}

impl Addresses {
    /// Prints the addresses and writes them atomically to `<data_dir>/addresses.json`.
    pub fn announce(&self, data_dir: &Path) -> anyhow::Result<()> {
        for (what, a) in [
            ("api", self.api),
            ("gateway", self.gateway),
            ("registry", self.registry),
        ] {
            if let Some(a) = a {
                println!("{what:<8} http://{a}");
            }
        }
        write_json_atomic(
            &data_dir.join("addresses.json"),
            &serde_json::to_value(self)?,
        )
    }
}

/// Binds `addr` (port 0 picks a free port), naming `what` in the error.
pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} address {addr}"))
}

/// A running all-in-one platform.
pub struct Platform {
    pub addresses: Addresses,
    shutdown: CancellationToken,
    tasks: JoinSet<anyhow::Result<()>>,
}

impl Platform {
    /// Binds every listener, then starts every part.
    pub async fn start(settings: Settings) -> anyhow::Result<Platform> {
        std::fs::create_dir_all(&settings.data_dir)
            .with_context(|| format!("creating {}", settings.data_dir.display()))?;
        let registry = bind(settings.registry_addr, "registry").await?;
        let addresses = Addresses {
            api: None,
            gateway: None,
            registry: Some(registry.local_addr()?),
        };
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let token = shutdown.clone();
        let config = settings.registry.clone();
        tasks.spawn(async move {
            ferry_registry::serve(registry, config, token)
                .await
                .context("registry")
        });
        addresses.announce(&settings.data_dir)?;
        Ok(Platform {
            addresses,
            shutdown,
            tasks,
        })
    }

    /// Runs until `stop` resolves or a part fails, then shuts every part down.
    pub async fn run_until(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let first = tokio::select! {
            _ = stop => None,
            r = self.tasks.join_next() => r,
        };
        self.shutdown.cancel();
        let mut result = match first {
            Some(Ok(Err(e))) => Err(e),
            Some(Err(e)) => Err(anyhow::anyhow!("a part of the server panicked: {e}")),
            _ => Ok(()),
        };
        while let Some(r) = self.tasks.join_next().await {
            if let (Ok(()), Ok(Err(e))) = (&result, r) {
                result = Err(e);
            }
        }
        result
    }

    /// Stops every part and waits for them.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.run_until(std::future::ready(())).await
    }
}

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let settings = args.daemon.resolve()?;
    let platform = Platform::start(settings).await?;
    platform.run_until(crate::shutdown_signal()).await
}
