//! `ferry image build|push`: package test images offline and push them to any registry.

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry_oci::client::{Client, Credentials};
use ferry_oci::layout::{self, BuildSpec, LayerSource, Layout};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Package directories and/or a static binary into an OCI image layout or oci-archive.
    Build(BuildArgs),
    /// Push an image from an OCI image layout or oci-archive to a registry.
    Push(PushArgs),
}

#[derive(Args)]
pub struct BuildArgs {
    /// Output: a path ending in `.tar` gets an oci-archive, anything else an OCI layout directory.
    #[arg(short, long)]
    output: PathBuf,
    /// A directory whose contents become one layer (repeatable, bottom layer first).
    #[arg(long = "dir")]
    dirs: Vec<PathBuf>,
    /// A static binary added as the top layer at --binary-path; it becomes the entrypoint.
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Where the binary goes inside the image.
    #[arg(long, default_value = "/app")]
    binary_path: String,
    /// Entrypoint, one argument per flag (default: the binary).
    #[arg(long = "entrypoint")]
    entrypoint: Vec<String>,
    /// Cmd, one argument per flag.
    #[arg(long = "cmd")]
    cmd: Vec<String>,
    /// Environment `KEY=VALUE` (repeatable).
    #[arg(long = "env")]
    env: Vec<String>,
    /// The port the image listens on (recorded as ExposedPorts).
    #[arg(long)]
    port: Option<u16>,
    #[arg(long)]
    workdir: Option<String>,
    #[arg(long)]
    user: Option<String>,
    /// Tag recorded in the layout's index.json.
    #[arg(long, default_value = "latest")]
    tag: String,
}

#[derive(Args)]
pub struct PushArgs {
    /// An OCI layout directory or oci-archive, optionally `:tag` to pick an image in it.
    source: String,
    /// Destination, e.g. `127.0.0.1:5000/hello:v1`.
    destination: String,
    /// Registry user (with --password) for basic auth.
    #[arg(long, env = "FERRY_REGISTRY_USERNAME")]
    username: Option<String>,
    #[arg(long, env = "FERRY_REGISTRY_PASSWORD")]
    password: Option<String>,
    /// Bearer token.
    #[arg(long, env = "FERRY_REGISTRY_TOKEN")]
    token: Option<String>,
}

pub async fn run(cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Build(a) => tokio::task::spawn_blocking(move || build(a)).await?,
        ImageCommand::Push(a) => push(a).await,
    }
}

fn build(a: BuildArgs) -> anyhow::Result<()> {
    for e in &a.env {
        anyhow::ensure!(e.contains('='), "--env {e:?}: expected KEY=VALUE");
    }
    anyhow::ensure!(
        a.binary_path.starts_with('/'),
        "--binary-path {:?}: must be absolute",
        a.binary_path
    );
    let mut layers: Vec<LayerSource> = a
        .dirs
        .iter()
        .map(|d| {
            anyhow::ensure!(d.is_dir(), "--dir {}: not a directory", d.display());
            Ok(LayerSource::Dir(d.clone()))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut entrypoint = a.entrypoint.clone();
    if let Some(bin) = &a.binary {
        anyhow::ensure!(bin.is_file(), "--binary {}: not a file", bin.display());
        layers.push(LayerSource::File {
            src: bin.clone(),
            dest: a.binary_path.clone(),
        });
        if entrypoint.is_empty() {
            entrypoint = vec![a.binary_path.clone()];
        }
    }
    anyhow::ensure!(
        !layers.is_empty(),
        "nothing to package: give --dir or --binary"
    );
    let spec = BuildSpec {
        layers,
        entrypoint,
        cmd: a.cmd,
        env: a.env,
        working_dir: a.workdir,
        user: a.user,
        exposed_port: a.port,
        labels: Default::default(),
    };
    let archive = a.output.extension().is_some_and(|e| e == "tar");
    let desc = if archive {
        let scratch = tempfile::tempdir_in(
            a.output
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new(".")),
        )
        .context("creating a scratch directory next to the output")?;
        let l = Layout::create(scratch.path())?;
        let desc = layout::build(&l, &spec, &a.tag)?;
        layout::pack_archive(&l, &a.output)?;
        desc
    } else {
        let l = Layout::create(&a.output)?;
        layout::build(&l, &spec, &a.tag)?
    };
    println!("{}", desc.digest);
    Ok(())
}

async fn push(a: PushArgs) -> anyhow::Result<()> {
    let (path, tag) = split_source(&a.source);
    let target: ferry_api::ImageRef = a
        .destination
        .parse()
        .with_context(|| format!("destination {:?}", a.destination))?;
    anyhow::ensure!(
        target.registry.is_some(),
        "destination {:?}: name the registry, e.g. 127.0.0.1:5000/{}",
        a.destination,
        target.repository
    );
    let credentials = match (a.username, a.password, a.token) {
        (_, _, Some(t)) => Some(Credentials::Bearer(t)),
        (Some(username), Some(password), None) => Some(Credentials::Basic { username, password }),
        (Some(_), None, None) => anyhow::bail!("--username needs --password"),
        _ => None,
    };
    let scratch = tempfile::tempdir()?;
    let p = PathBuf::from(path);
    let l = tokio::task::spawn_blocking({
        let s = scratch.path().to_path_buf();
        move || layout::open_image(&p, &s)
    })
    .await?
    .with_context(|| format!("opening {path}"))?;
    let desc = l.find(tag)?;
    let client = Client::new(credentials);
    let digest = client.push(&l, &desc, &target).await?;
    println!("{digest}");
    Ok(())
}

/// `path[:tag]`, where a `:` inside the path's directories does not count.
fn split_source(s: &str) -> (&str, Option<&str>) {
    match s.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') && !t.is_empty() => (p, Some(t)),
        _ => (s, None),
    }
}
