//! `ferry server`: every part in one process.

use crate::config::DaemonArgs;
use clap::Args;

#[derive(Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let _settings = args.daemon.resolve()?;
    anyhow::bail!("not implemented yet")
}
