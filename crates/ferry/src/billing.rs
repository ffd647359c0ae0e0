//! Billing verbs: price, usage, invoice.

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BillingCommand {
    /// Estimate the monthly cost of a workload.
    Price,
}

pub async fn run(cmd: BillingCommand) -> anyhow::Result<()> {
    match cmd {
        BillingCommand::Price => anyhow::bail!("not implemented yet"),
    }
}
