//! `ferry`: the CLI and the daemon modes. Thin: parses flags and config, sets up logging and
//! signals, and composes the service crates; all logic lives in those crates.

mod billing;
mod exec;
mod image;
mod registry_cmd;
mod services;

use ferry::{config, server};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Ferry: a self-hosted serverless container platform"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole platform in one process: registry, control plane, gateway and agent.
    Server(server::ServerArgs),
    /// Run the OCI registry alone, or maintain its store.
    Registry(registry_cmd::RegistryArgs),
    /// Build OCI images from a directory or a static binary, and push them.
    #[command(subcommand)]
    Image(image::ImageCommand),
    #[command(flatten)]
    Services(services::ServiceCommand),
    #[command(flatten)]
    Billing(billing::BillingCommand),
}

/// mimalloc instead of glibc's malloc: the gateway allocates per request (hyper's buffers
/// and header maps), and with glibc about an eighth of its CPU under load went to malloc and
/// free (perf, wrk at 64 connections); see docs/benchmarks.md. Built without its transparent
/// huge pages (the `no_thp` feature, Cargo.toml).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Server(args) => server::run(args).await,
            Command::Registry(args) => registry_cmd::run(args).await,
            Command::Image(cmd) => image::run(cmd).await,
            Command::Services(cmd) => services::run(cmd).await,
            Command::Billing(cmd) => billing::run(cmd).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `FERRY_LOG` sets the filter (default `info`); `FERRY_LOG_FORMAT=json` switches to JSON lines.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("FERRY_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
