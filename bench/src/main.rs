//! ferry-bench: every performance figure side by side with a peer, from the same run.
//!
//! `cargo run -p ferry-bench --release -- all` (or one suite: `registry`, `cold-start`,
//! `scheduler`, `gateway`, `launch-rate`, `density`, `agent-start`, `autoscale`). Builds what
//! it needs, starts Ferry and the peers on ephemeral loopback ports, prints a markdown table of
//! medians, p99s and ratios, and writes it as JSON under bench/results/. Peers come from Debian
//! packages (docker-registry, runc, podman, skopeo, wrk, nginx-light), installed when missing.

mod agent_start;
mod autoscale;
mod density;
mod gateway;
mod launch;
mod platform;
mod podman;
mod registry;
mod suites;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;
use std::path::PathBuf;
use std::process::Command;

#[derive(Parser)]
#[command(name = "ferry-bench", about = "Ferry benchmarks against peers")]
struct Cli {
    #[command(subcommand)]
    suite: Suite,
    /// Repetitions where a suite repeats (registry push/pull runs).
    #[arg(long, default_value_t = 3, global = true)]
    runs: usize,
    /// Cold starts to measure.
    #[arg(long, default_value_t = 50, global = true)]
    cold_starts: usize,
    /// launch-rate: stop after this many running instances (if nothing failed before).
    #[arg(long, default_value_t = 3000, global = true)]
    launch_max: usize,
    /// gateway: also measure the gateway of this `ferry` binary (an earlier build), in the
    /// same run, for before/after rows.
    #[arg(long, global = true)]
    baseline_ferry: Option<PathBuf>,
    /// density: idle instances to reach, in steps of 100.
    #[arg(long, default_value_t = 500, global = true)]
    density_instances: usize,
    /// Up/down cycles of the autoscale soak.
    #[arg(long, default_value_t = 100, global = true)]
    cycles: usize,
}

#[derive(Subcommand, Clone, Copy, PartialEq, Eq)]
enum Suite {
    /// Everything below.
    All,
    /// Push and pull of a ~200 MB 5-layer image with skopeo: Ferry vs docker-registry 2.8, beside
    /// the client-only floors (a null registry for pushes, nginx serving the files for pulls).
    Registry,
    /// Request → first byte for a scaled-to-zero service (image cached), vs `runc run` of the
    /// same rootfs and `podman run --rm` of the same image to their first HTTP response.
    ColdStart,
    /// Placement decision time at 100, 1,000 and 10,000 nodes.
    Scheduler,
    /// Warm latency and throughput (wrk) through the gateway, straight to the instance, and
    /// through nginx as a reverse proxy to the same instance.
    Gateway,
    /// Instances started per minute by one agent, until failure or memory pressure.
    LaunchRate,
    /// Platform memory per idle instance.
    Density,
    /// Agent "start instance" → ready, one at a time, vs `runc run` to first response.
    AgentStart,
    /// Autoscaler: step-load trace (+ PNG), up/down soak under load, anti-thrash off vs on.
    Autoscale,
}

/// One measured row: what, Ferry's figure, the peer's, and their ratio.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub metric: String,
    pub unit: String,
    pub ferry: f64,
    pub peer_name: Option<String>,
    pub peer: Option<f64>,
    pub goal: Option<String>,
}

#[derive(Serialize)]
struct Report {
    suite: String,
    date: String,
    command: String,
    how: String,
    rows: Vec<Row>,
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v
}

/// The workspace root (bench/..).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a command to completion, failing with its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs Debian packages that are missing.
pub fn ensure_packages(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg")
                .args(["-s", p])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {missing:?}");
    run(Command::new("apt-get")
        .args(["install", "-y", "-q"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

/// Builds the release `ferry` binary and the static testapp; returns their paths. Honours
/// `CARGO_TARGET_DIR`; `TESTAPP_STATIC_BIN` names an already built static testapp.
pub fn build() -> Result<(PathBuf, PathBuf)> {
    let root = root();
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    run(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "-q",
        "-p",
        "ferry",
    ]))?;
    let testapp = match std::env::var_os("TESTAPP_STATIC_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            run(Command::new("cargo")
                .current_dir(&root)
                .env("RUSTFLAGS", "-C target-feature=+crt-static")
                .env("CARGO_TARGET_DIR", root.join("target-testapp-static"))
                .args([
                    "build",
                    "--release",
                    "-q",
                    "-p",
                    "testapp",
                    "--target",
                    "x86_64-unknown-linux-gnu",
                ]))?;
            root.join("target-testapp-static/x86_64-unknown-linux-gnu/release/testapp")
        }
    };
    // A target directory shared with other work trees gets its `release/ferry` replaced by
    // their builds: run a private copy of the one just built.
    let copy = std::env::temp_dir().join(format!("ferry-bench-{}-ferry", std::process::id()));
    std::fs::copy(target.join("release/ferry"), &copy)
        .with_context(|| format!("copying the ferry binary to {}", copy.display()))?;
    Ok((copy, testapp))
}

/// Removes a file when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn print_and_save(suite: &str, how: &str, rows: Vec<Row>) -> Result<()> {
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    println!("\n## {suite} ({date})\n\n{how}\n");
    println!("| metric | Ferry | peer | peer value | Ferry / peer | goal |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        let peer = r
            .peer
            .map(|p| format!("{p:.3} {}", r.unit))
            .unwrap_or_else(|| "-".into());
        let ratio = r
            .peer
            .filter(|p| *p > 0.0)
            .map(|p| format!("{:.2}", r.ferry / p))
            .unwrap_or_else(|| "-".into());
        println!(
            "| {} | {:.3} {} | {} | {} | {} | {} |",
            r.metric,
            r.ferry,
            r.unit,
            r.peer_name.as_deref().unwrap_or("-"),
            peer,
            ratio,
            r.goal.as_deref().unwrap_or("-")
        );
    }
    let report = Report {
        suite: suite.into(),
        date: date.clone(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        how: how.into(),
        rows,
    };
    let dir = root().join("bench/results");
    std::fs::create_dir_all(&dir)?;
    // Date and minute (UTC): a later run the same day no longer overwrites an earlier one.
    let file = dir.join(format!(
        "{suite}-{}T{}{}Z.json",
        &date[..10],
        &date[11..13],
        &date[14..16]
    ));
    std::fs::write(&file, serde_json::to_string_pretty(&report)?)?;
    eprintln!("wrote {}", file.display());
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let want = |s: Suite| cli.suite == Suite::All || cli.suite == s;
    if want(Suite::Scheduler) {
        let (how, rows) = suites::scheduler()?;
        print_and_save("scheduler", &how, rows)?;
    }
    let needs_build = [
        Suite::Registry,
        Suite::ColdStart,
        Suite::Gateway,
        Suite::LaunchRate,
        Suite::Density,
        Suite::AgentStart,
    ];
    if needs_build.into_iter().any(want) {
        let (ferry, testapp) = build()?;
        let _remove = RemoveOnDrop(ferry.clone());
        if want(Suite::Registry) {
            let (how, rows) = registry::registry(&ferry, cli.runs)?;
            print_and_save("registry", &how, rows)?;
        }
        if want(Suite::ColdStart) {
            let (how, rows) = suites::cold_start(&ferry, &testapp, cli.cold_starts)?;
            print_and_save("cold-start", &how, rows)?;
        }
        if want(Suite::Gateway) {
            let (how, rows) =
                gateway::gateway(&ferry, &testapp, cli.runs, cli.baseline_ferry.as_deref())?;
            print_and_save("gateway", &how, rows)?;
        }
        if want(Suite::LaunchRate) {
            let (how, rows) = launch::launch_rate(&ferry, &testapp, cli.launch_max)?;
            print_and_save("launch-rate", &how, rows)?;
        }
        if want(Suite::AgentStart) {
            let (how, rows) = agent_start::agent_start(&ferry, &testapp, cli.cold_starts)?;
            print_and_save("agent-start", &how, rows)?;
        }
        if want(Suite::Density) {
            let (how, rows) = density::density(&ferry, &testapp, cli.density_instances)?;
            print_and_save("density", &how, rows)?;
        }
    }
    if want(Suite::Autoscale) {
        let (how, rows) = autoscale::autoscale(cli.cycles)?;
        print_and_save("autoscale", &how, rows)?;
    }
    Ok(())
}
