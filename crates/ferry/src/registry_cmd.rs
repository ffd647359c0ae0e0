//! `ferry registry`: the OCI registry alone, and `ferry registry gc`.

use crate::config::DaemonArgs;
use clap::{Args, Subcommand};

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
    Gc,
}

pub async fn run(_args: RegistryArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
