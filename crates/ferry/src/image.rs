//! `ferry image build|push`.

use clap::Subcommand;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Package a directory or a static binary into an OCI image layout or oci-archive.
    Build,
    /// Push an OCI image layout or oci-archive to a registry.
    Push,
}

pub async fn run(cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Build | ImageCommand::Push => anyhow::bail!("not implemented yet"),
    }
}
