//! Service verbs: deploy, ls, describe, logs, exec, scale, delete, revisions, traffic.

use clap::Subcommand;

#[derive(Subcommand)]
pub enum ServiceCommand {
    /// Create or update a service (a new revision).
    Deploy,
}

pub async fn run(cmd: ServiceCommand) -> anyhow::Result<()> {
    match cmd {
        ServiceCommand::Deploy => anyhow::bail!("not implemented yet"),
    }
}
