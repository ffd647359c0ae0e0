//! `ferry registry`: the OCI registry alone, and `ferry registry gc`.

use crate::config::DaemonArgs;
use anyhow::Context;
use clap::{Args, Subcommand};
use ferry::server::{Addresses, bind};

#[derive(Args)]
pub struct RegistryArgs {
    #[command(subcommand)]
    pub action: Option<RegistryAction>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

#[derive(Subcommand)]
pub enum RegistryAction {
    /// Delete blobs no manifest references (safe while the registry serves).
    Gc {
        /// Keep unreferenced blobs younger than this many seconds (pushes in progress).
        #[arg(long, default_value_t = 3600)]
        grace_secs: u64,
    },
}

pub async fn run(args: RegistryArgs) -> anyhow::Result<()> {
    let settings = args.daemon.resolve()?;
    match args.action {
        Some(RegistryAction::Gc { grace_secs }) => {
            let root = settings.registry.root.clone();
            let report = tokio::task::spawn_blocking(move || {
                ferry_registry::gc(&root, std::time::Duration::from_secs(grace_secs))
            })
            .await??;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        None => {
            std::fs::create_dir_all(&settings.data_dir)
                .with_context(|| format!("creating {}", settings.data_dir.display()))?;
            let listener = bind(settings.registry_addr, "registry").await?;
            let addresses = Addresses {
                registry: Some(listener.local_addr()?),
                ..Default::default()
            };
            addresses.announce(&settings.data_dir)?;
            let token = tokio_util::sync::CancellationToken::new();
            let t = token.clone();
            tokio::spawn(async move {
                ferry::shutdown_signal().await;
                t.cancel();
            });
            ferry_registry::serve(listener, settings.registry, token).await?;
            Ok(())
        }
    }
}
