//! Service verbs: deploy, ls, describe, scale, delete, revisions, traffic. Everything goes
//! through the public `/v1` API at `FERRY_API` (default http://127.0.0.1:7070).

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ferry_api::gateway::TrafficTarget;
use ferry_api::service::{
    ApiError, MetricKind, MetricTarget, RevisionView, ScaleRequest, ServiceSpec, ServiceView,
};
use serde::de::DeserializeOwned;

#[derive(Args, Clone)]
pub struct Api {
    /// Control-plane API address.
    #[arg(
        long,
        env = "FERRY_API",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    api: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
pub enum ServiceCommand {
    /// Create a service, or give it a new revision (flags not given keep their current value).
    Deploy(Box<DeployArgs>),
    /// List services.
    Ls(#[command(flatten)] Api),
    /// Show a service: spec, revisions, traffic, instances.
    Describe {
        name: String,
        #[command(flatten)]
        api: Api,
    },
    /// Set min/max instances.
    Scale {
        name: String,
        #[arg(long)]
        min: Option<u32>,
        #[arg(long)]
        max: Option<u32>,
        #[command(flatten)]
        api: Api,
    },
    /// Delete a service and stop its instances.
    Delete {
        name: String,
        #[command(flatten)]
        api: Api,
    },
    /// List a service's revisions.
    Revisions {
        name: String,
        #[command(flatten)]
        api: Api,
    },
    /// Print an instance's stdout/stderr: the newest instance's, running or stopped, unless
    /// --instance (a stopped instance's log is kept for the node's --log-retention).
    Logs {
        name: String,
        /// Keep printing as lines arrive (until a stopped instance's log ends).
        #[arg(short, long)]
        follow: bool,
        /// An instance id, as `ferry describe` lists them.
        #[arg(long)]
        instance: Option<String>,
        #[command(flatten)]
        api: Api,
    },
    /// Run a command inside a running instance: `ferry exec hello -- ls /`, or a shell with
    /// `ferry exec -it hello -- sh`.
    Exec {
        name: String,
        #[arg(long)]
        instance: Option<String>,
        /// Keep stdin open and stream it to the command (and its output as it comes).
        #[arg(short, long)]
        interactive: bool,
        /// Give the command a terminal (raw mode locally when stdin is one).
        #[arg(short, long)]
        tty: bool,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
        #[command(flatten)]
        api: Api,
    },
    /// Split traffic between revisions: `ferry traffic hello hello-00001=90 hello-00002=10`.
    Traffic {
        name: String,
        /// `REVISION=PERCENT`, adding up to 100.
        #[arg(required = true)]
        split: Vec<String>,
        #[command(flatten)]
        api: Api,
    },
}

#[derive(Args)]
pub struct DeployArgs {
    name: String,
    /// Image, e.g. 127.0.0.1:5000/hello:v1 (a tag is pinned to its digest now).
    #[arg(long)]
    image: Option<String>,
    /// vCPU: 500m, 0.5, 2.
    #[arg(long)]
    cpu: Option<String>,
    /// Memory: 256Mi, 1Gi.
    #[arg(long)]
    memory: Option<String>,
    /// KEY=VALUE (repeatable).
    #[arg(long = "env")]
    env: Vec<String>,
    #[arg(long)]
    port: Option<u16>,
    /// Replaces the image's entrypoint (repeat for each argument).
    #[arg(long = "command")]
    command: Vec<String>,
    /// Replaces the image's cmd (repeat for each argument).
    #[arg(long = "arg")]
    args: Vec<String>,
    /// Hard limit of concurrent requests per instance (0 = unlimited).
    #[arg(long)]
    concurrency: Option<u32>,
    /// Concurrent requests per instance the scaler aims for.
    #[arg(long)]
    target_concurrency: Option<u32>,
    #[arg(long)]
    min: Option<u32>,
    #[arg(long)]
    max: Option<u32>,
    /// Time without traffic before scaling to zero: `30s`, `5m` (a bare number is seconds).
    #[arg(long, value_parser = ferry::config::parse_secs)]
    idle_grace: Option<u64>,
    /// Request timeout (to the first byte): `300s`, `2m` (a bare number is seconds).
    #[arg(long, value_parser = ferry::config::parse_secs)]
    timeout: Option<u64>,
    /// HTTP readiness probe path (default: TCP connect).
    #[arg(long)]
    readiness_path: Option<String>,
    /// Speak h2c to instances.
    #[arg(long)]
    h2c: bool,
    /// What the autoscaler scales on, with its per-instance target (repeatable; replaces the
    /// list): `concurrency=10`, `rps=100`, `p99_latency_ms=250`, `cpu=70` (percent),
    /// `memory=80`, `queue=5`, `custom:NAME@/PATH=TARGET`.
    #[arg(long = "scale-metric")]
    scale_metrics: Vec<String>,
    /// Autoscaler stable window: `60s`, `2m`.
    #[arg(long, value_parser = ferry::config::parse_secs)]
    stable_window: Option<u64>,
    /// Panic window as a percentage of the stable window.
    #[arg(long)]
    panic_window_pct: Option<u32>,
    /// Panic when the panic-window demand reaches this percentage of what is ready.
    #[arg(long)]
    panic_threshold_pct: Option<u32>,
    /// The count falls only to the largest wanted within this delay: `0s`, `30s`.
    #[arg(long, value_parser = ferry::config::parse_secs)]
    scale_down_delay: Option<u64>,
    /// At most this many times the ready count per decision.
    #[arg(long)]
    max_scale_up_rate: Option<f64>,
    /// Down to no fewer than ready / this per decision.
    #[arg(long)]
    max_scale_down_rate: Option<f64>,
    /// Damping against thrash: `on` or `off`.
    #[arg(long, value_parser = parse_on_off)]
    anti_thrash: Option<bool>,
    /// Direction flips within the anti-thrash window that engage it.
    #[arg(long)]
    anti_thrash_flips: Option<u32>,
    /// The window flips are counted in: `120s`.
    #[arg(long, value_parser = ferry::config::parse_secs)]
    anti_thrash_window: Option<u64>,
    /// How long the warm count is held once engaged: `120s`.
    #[arg(long, value_parser = ferry::config::parse_secs)]
    anti_thrash_cooldown: Option<u64>,
    /// On scale-down or a revision switch, keep a draining instance's WebSockets up to this
    /// long before SIGTERM: `60s`.
    #[arg(long, value_parser = ferry::config::parse_secs)]
    websocket_drain: Option<u64>,
    /// Wait until the new revision serves the traffic.
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    api: Api,
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    fn new(api: &Api) -> Client {
        Client {
            http: reqwest::Client::new(),
            base: api.api.trim_end_matches('/').to_string(),
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let mut rb = self.http.request(method, &url);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb.send().await.with_context(|| {
            format!(
                "cannot reach the Ferry API at {} (is `ferry server` running? set FERRY_API)",
                self.base
            )
        })?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        if !status.is_success() {
            if let Ok(e) = serde_json::from_slice::<ApiError>(&bytes) {
                bail!("{} ({}, request {})", e.message, e.code, e.request_id);
            }
            bail!("{url}: {status}: {}", String::from_utf8_lossy(&bytes));
        }
        serde_json::from_slice(&bytes).with_context(|| format!("{url}: unexpected answer"))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(reqwest::Method::GET, path, None).await
    }
}

pub async fn run(cmd: ServiceCommand) -> anyhow::Result<()> {
    match cmd {
        ServiceCommand::Deploy(a) => deploy(*a).await,
        ServiceCommand::Ls(api) => {
            let c = Client::new(&api);
            let list: Vec<ServiceView> = c.get("/v1/services").await?;
            if api.json {
                return print_json(&list);
            }
            let mut rows = vec![vec![
                "NAME".into(),
                "URL".into(),
                "REVISION".into(),
                "TRAFFIC".into(),
                "READY".into(),
            ]];
            for s in &list {
                let ready: u32 = s.revisions.iter().map(|r| r.ready_instances).sum();
                let total: u32 = s.revisions.iter().map(|r| r.instances).sum();
                rows.push(vec![
                    s.name.clone(),
                    s.url.clone(),
                    s.latest_revision.clone(),
                    traffic_str(&s.traffic),
                    format!("{ready}/{total}"),
                ]);
            }
            print_table(&rows);
            Ok(())
        }
        ServiceCommand::Describe { name, api } => {
            let c = Client::new(&api);
            let s: ServiceView = c.get(&format!("/v1/services/{name}")).await?;
            if api.json {
                return print_json(&s);
            }
            describe(&s);
            Ok(())
        }
        ServiceCommand::Scale {
            name,
            min,
            max,
            api,
        } => {
            let c = Client::new(&api);
            let body = serde_json::to_value(ScaleRequest {
                min_instances: min,
                max_instances: max,
            })?;
            let s: ServiceView = c
                .call(
                    reqwest::Method::PUT,
                    &format!("/v1/services/{name}/scale"),
                    Some(body),
                )
                .await?;
            if api.json {
                return print_json(&s);
            }
            println!(
                "{name}: min {} max {}",
                s.spec.min_instances, s.spec.max_instances
            );
            Ok(())
        }
        ServiceCommand::Delete { name, api } => {
            let c = Client::new(&api);
            let v: serde_json::Value = c
                .call(
                    reqwest::Method::DELETE,
                    &format!("/v1/services/{name}"),
                    None,
                )
                .await?;
            if api.json {
                return print_json(&v);
            }
            println!("deleted {name}");
            Ok(())
        }
        ServiceCommand::Revisions { name, api } => {
            let c = Client::new(&api);
            let revs: Vec<RevisionView> = c.get(&format!("/v1/services/{name}/revisions")).await?;
            if api.json {
                return print_json(&revs);
            }
            let mut rows = vec![vec![
                "REVISION".into(),
                "IMAGE".into(),
                "READY".into(),
                "CREATED".into(),
            ]];
            for r in &revs {
                rows.push(vec![
                    r.name.clone(),
                    r.image.clone(),
                    format!("{}/{}", r.ready_instances, r.instances),
                    format_ms(r.created_ms),
                ]);
            }
            print_table(&rows);
            Ok(())
        }
        ServiceCommand::Logs {
            name,
            follow,
            instance,
            api,
        } => {
            use futures_util::StreamExt;
            use std::io::Write;
            let c = Client::new(&api);
            let mut url = format!("{}/v1/services/{name}/logs?follow={follow}", c.base);
            if let Some(i) = instance {
                url.push_str(&format!("&instance={i}"));
            }
            let resp = c
                .http
                .get(&url)
                .send()
                .await
                .with_context(|| format!("cannot reach the Ferry API at {}", c.base))?;
            if !resp.status().is_success() {
                let status = resp.status();
                let body = resp.bytes().await?;
                if let Ok(e) = serde_json::from_slice::<ApiError>(&body) {
                    bail!("{} ({}, request {})", e.message, e.code, e.request_id);
                }
                bail!("{url}: {status}");
            }
            let mut stream = resp.bytes_stream();
            let mut out = std::io::stdout();
            while let Some(chunk) = stream.next().await {
                out.write_all(&chunk?)?;
                out.flush()?;
            }
            Ok(())
        }
        ServiceCommand::Exec {
            name,
            instance,
            interactive,
            tty,
            argv,
            api,
        } => {
            if interactive || tty {
                let code =
                    crate::exec::interactive(&api.api, &name, instance, argv, interactive, tty)
                        .await?;
                std::process::exit(code);
            }
            let c = Client::new(&api);
            let mut stdin = String::new();
            if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut stdin)?;
            }
            let body = serde_json::json!({ "argv": argv, "stdin": stdin, "instance": instance });
            let out: serde_json::Value = c
                .call(
                    reqwest::Method::POST,
                    &format!("/v1/services/{name}/exec"),
                    Some(body),
                )
                .await?;
            if api.json {
                return print_json(&out);
            }
            print!("{}", out["stdout"].as_str().unwrap_or(""));
            eprint!("{}", out["stderr"].as_str().unwrap_or(""));
            match out["code"].as_i64() {
                Some(0) => Ok(()),
                Some(code) => std::process::exit(code as i32),
                None => bail!("the command was killed by signal {}", out["signal"]),
            }
        }
        ServiceCommand::Traffic { name, split, api } => {
            let mut targets = Vec::new();
            for s in &split {
                let (rev, pct) = s
                    .split_once('=')
                    .with_context(|| format!("{s:?}: expected REVISION=PERCENT"))?;
                let percent: u8 = pct
                    .trim_end_matches('%')
                    .parse()
                    .with_context(|| format!("{s:?}: percent must be 0..100"))?;
                targets.push(TrafficTarget {
                    revision: rev.to_string(),
                    percent,
                });
            }
            let c = Client::new(&api);
            let s: ServiceView = c
                .call(
                    reqwest::Method::PUT,
                    &format!("/v1/services/{name}/traffic"),
                    Some(serde_json::to_value(&targets)?),
                )
                .await?;
            if api.json {
                return print_json(&s);
            }
            println!("{name}: {}", traffic_str(&s.traffic));
            Ok(())
        }
    }
}

async fn deploy(a: DeployArgs) -> anyhow::Result<()> {
    let c = Client::new(&a.api);
    let existing: Option<ServiceView> = c.get(&format!("/v1/services/{}", a.name)).await.ok();
    let mut spec = match (&existing, &a.image) {
        (Some(s), _) => s.spec.clone(),
        (None, Some(img)) => ServiceSpec::new(img),
        (None, None) => bail!("--image is required to create service {:?}", a.name),
    };
    if let Some(i) = a.image {
        spec.image = i;
    }
    if let Some(v) = a.cpu {
        spec.cpu = v;
    }
    if let Some(v) = a.memory {
        spec.memory = v;
    }
    for e in &a.env {
        let (k, v) = e
            .split_once('=')
            .with_context(|| format!("--env {e:?}: expected KEY=VALUE"))?;
        spec.env.insert(k.to_string(), v.to_string());
    }
    if let Some(v) = a.port {
        spec.port = v;
    }
    if !a.command.is_empty() {
        spec.command = Some(a.command);
    }
    if !a.args.is_empty() {
        spec.args = Some(a.args);
    }
    if let Some(v) = a.concurrency {
        spec.concurrency = v;
    }
    if let Some(v) = a.target_concurrency {
        spec.target_concurrency = v;
    }
    if let Some(v) = a.min {
        spec.min_instances = v;
    }
    if let Some(v) = a.max {
        spec.max_instances = v;
    }
    if let Some(v) = a.idle_grace {
        spec.idle_grace_secs = v;
    }
    if let Some(v) = a.timeout {
        spec.request_timeout_secs = v;
    }
    if a.readiness_path.is_some() {
        spec.readiness_path = a.readiness_path;
    }
    if a.h2c {
        spec.h2c = true;
    }
    if let Some(v) = a.websocket_drain {
        spec.websocket_drain_secs = v;
    }
    if !a.scale_metrics.is_empty() {
        spec.autoscaling.metrics = a
            .scale_metrics
            .iter()
            .map(|m| parse_scale_metric(m))
            .collect::<anyhow::Result<_>>()?;
    }
    let auto = &mut spec.autoscaling;
    if let Some(v) = a.stable_window {
        auto.stable_window_secs = v;
    }
    if let Some(v) = a.panic_window_pct {
        auto.panic_window_pct = v;
    }
    if let Some(v) = a.panic_threshold_pct {
        auto.panic_threshold_pct = v;
    }
    if let Some(v) = a.scale_down_delay {
        auto.scale_down_delay_secs = v;
    }
    if let Some(v) = a.max_scale_up_rate {
        auto.max_scale_up_rate = v;
    }
    if let Some(v) = a.max_scale_down_rate {
        auto.max_scale_down_rate = v;
    }
    if let Some(v) = a.anti_thrash {
        auto.anti_thrash.enabled = v;
    }
    if let Some(v) = a.anti_thrash_flips {
        auto.anti_thrash.max_flips = v;
    }
    if let Some(v) = a.anti_thrash_window {
        auto.anti_thrash.window_secs = v;
    }
    if let Some(v) = a.anti_thrash_cooldown {
        auto.anti_thrash.cooldown_secs = v;
    }
    if !a.api.json {
        eprintln!("resolving {} ...", spec.image);
    }
    let s: ServiceView = c
        .call(
            reqwest::Method::PUT,
            &format!("/v1/services/{}", a.name),
            Some(serde_json::to_value(&spec)?),
        )
        .await?;
    if a.wait {
        if !a.api.json {
            eprintln!("waiting for {} to take the traffic ...", s.latest_revision);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let now: ServiceView = c.get(&format!("/v1/services/{}", a.name)).await?;
            if now
                .traffic
                .iter()
                .any(|t| t.revision == now.latest_revision && t.percent == 100)
            {
                break;
            }
            // The new revision's own failure: an older revision's (the one this deploy fixes,
            // say) is no reason to give up.
            let failure = now
                .revisions
                .iter()
                .find(|r| r.name == now.latest_revision)
                .and_then(|r| r.last_failure.as_ref());
            if let Some(f) = failure {
                bail!("{}: {f}", now.latest_revision);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "rollout of {} did not finish in 120 s",
                now.latest_revision
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    if a.api.json {
        return print_json(&s);
    }
    let image = s
        .revisions
        .iter()
        .find(|r| r.name == s.latest_revision)
        .map(|r| r.image.clone())
        .unwrap_or_default();
    println!(
        "service {} revision {} ({image})",
        s.name, s.latest_revision
    );
    println!("{}", s.url);
    Ok(())
}

fn describe(s: &ServiceView) {
    println!("Name:        {}", s.name);
    println!("URL:         {}", s.url);
    println!("Image:       {}", s.spec.image);
    println!("Resources:   cpu {} memory {}", s.spec.cpu, s.spec.memory);
    println!(
        "Scaling:     min {} max {} target concurrency {} idle grace {}s",
        s.spec.min_instances,
        s.spec.max_instances,
        s.spec.target_concurrency,
        s.spec.idle_grace_secs
    );
    let a = &s.spec.autoscaling;
    let metrics: Vec<String> = s
        .spec
        .scale_metrics()
        .iter()
        .map(|m| format!("{}={}", m.label(), m.target))
        .collect();
    println!(
        "Autoscaler:  {} | stable {}s panic {}% at {}% | delay {}s | rates up {} down {} | anti-thrash {}",
        metrics.join(" "),
        a.stable_window_secs,
        a.panic_window_pct,
        a.panic_threshold_pct,
        a.scale_down_delay_secs,
        a.max_scale_up_rate,
        a.max_scale_down_rate,
        if a.anti_thrash.enabled {
            format!(
                "on (>{} flips in {}s holds {}s)",
                a.anti_thrash.max_flips, a.anti_thrash.window_secs, a.anti_thrash.cooldown_secs
            )
        } else {
            "off".to_string()
        }
    );
    println!("Traffic:     {}", traffic_str(&s.traffic));
    for v in &s.autoscaler {
        describe_autoscaler(v);
    }
    if let Some(f) = &s.last_failure {
        println!("Last failure: {f}");
    }
    println!("Revisions:");
    for r in &s.revisions {
        println!(
            "  {}  {}  ready {}/{}",
            r.name, r.image, r.ready_instances, r.instances
        );
        if let Some(f) = &r.last_failure {
            println!("    last failure: {f}");
        }
    }
    println!("Instances:");
    for i in &s.instances {
        let addr = i
            .address
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into());
        println!("  {}  {:?}  {}  node {}", i.id, i.state, addr, i.node);
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{s:?}: expected on or off")),
    }
}

/// `rps=100`, `cpu=70`, `custom:NAME@/PATH=5`.
fn parse_scale_metric(s: &str) -> anyhow::Result<MetricTarget> {
    let (what, target) = s
        .rsplit_once('=')
        .with_context(|| format!("--scale-metric {s:?}: expected KIND=TARGET"))?;
    let target: f64 = target
        .parse()
        .ok()
        .filter(|t: &f64| t.is_finite() && *t > 0.0)
        .with_context(|| format!("--scale-metric {s:?}: target must be a number above 0"))?;
    let (kind, path, name) = match what.strip_prefix("custom:") {
        Some(rest) => {
            let (name, path) = rest.split_once('@').with_context(|| {
                format!("--scale-metric {s:?}: a custom metric is custom:NAME@/PATH=TARGET")
            })?;
            (
                MetricKind::Custom,
                Some(path.to_string()),
                Some(name.to_string()),
            )
        }
        None => (
            what.parse::<MetricKind>()
                .map_err(|e| anyhow::anyhow!("--scale-metric {s:?}: {e}"))?,
            None,
            None,
        ),
    };
    Ok(MetricTarget {
        kind,
        target,
        path,
        name,
    })
}

fn describe_autoscaler(v: &ferry_api::service::AutoscalerView) {
    let t = &v.anti_thrash;
    let thrash = match (t.enabled, t.warm_floor) {
        (false, _) => format!("off ({} flips seen)", t.flips_total),
        (true, Some(f)) => format!(
            "ENGAGED, holding {f} warm until {} (level {}, {} flips in total)",
            t.engaged_until_ms.map(format_ms).unwrap_or_default(),
            t.level,
            t.flips_total
        ),
        (true, None) => format!(
            "calm (level {}, {} flips in window, {} in total)",
            t.level, t.flips_in_window, t.flips_total
        ),
    };
    println!(
        "  {}: desired {} ready {} live {}{} | started {} stopped {}",
        v.revision,
        v.desired,
        v.ready,
        v.instances,
        if v.panicking { " | PANIC" } else { "" },
        v.starts,
        v.stops
    );
    println!("    anti-thrash: {thrash}");
    let mut rows = vec![vec![
        "    METRIC".to_string(),
        "TARGET".into(),
        "NOW".into(),
        format!("STABLE {}s", v.stable_window_secs),
        // Whole seconds as seconds (6s), like the stable window; else milliseconds (1500ms).
        if v.panic_window_ms.is_multiple_of(1000) {
            format!("PANIC {}s", v.panic_window_ms / 1000)
        } else {
            format!("PANIC {}ms", v.panic_window_ms)
        },
        "WANTS".into(),
    ]];
    for m in &v.metrics {
        rows.push(vec![
            format!("    {}", m.metric),
            format!("{}", m.target),
            format!("{:.2}", m.current),
            format!("{:.2}", m.stable),
            format!("{:.2}", m.panic),
            m.wanted.to_string(),
        ]);
    }
    print_table(&rows);
    if !v.decisions.is_empty() {
        println!("    last decisions:");
        for d in v.decisions.iter().rev().take(10) {
            println!(
                "      {}  {} -> {}  {}",
                format_ms(d.at_ms),
                d.from,
                d.to,
                d.reason
            );
        }
    }
}

fn traffic_str(t: &[TrafficTarget]) -> String {
    t.iter()
        .map(|t| format!("{}={}%", t.revision, t.percent))
        .collect::<Vec<_>>()
        .join(" ")
}

fn format_ms(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_table(rows: &[Vec<String>]) {
    let n = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.len()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry::config::parse_secs;

    #[test]
    fn durations_are_taken_with_units_or_as_seconds() {
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            deploy: DeployArgs,
        }
        use clap::Parser;
        let t = T::try_parse_from(["t", "x", "--idle-grace", "2m", "--timeout", "90"]).unwrap();
        assert_eq!(
            (t.deploy.idle_grace, t.deploy.timeout),
            (Some(120), Some(90))
        );
        let e = T::try_parse_from(["t", "x", "--idle-grace", "soon"])
            .err()
            .unwrap();
        assert!(e.to_string().contains("expected a duration"), "{e}");
    }

    #[test]
    fn flags_parse() {
        assert_eq!(parse_secs("60s"), Ok(60));
        assert_eq!(parse_secs("2m"), Ok(120));
        assert_eq!(parse_secs("7"), Ok(7));
        assert!(parse_secs("soon").is_err());
        let m = parse_scale_metric("rps=100").unwrap();
        assert_eq!((m.kind, m.target), (MetricKind::Rps, 100.0));
        let m = parse_scale_metric("custom:jobs_waiting@/metrics=5").unwrap();
        assert_eq!(m.kind, MetricKind::Custom);
        assert_eq!(m.name.as_deref(), Some("jobs_waiting"));
        assert_eq!(m.path.as_deref(), Some("/metrics"));
        for bad in ["rps", "rps=0", "gpu=1", "custom:x=1", "cpu=lots"] {
            assert!(parse_scale_metric(bad).is_err(), "{bad}");
        }
    }
}
