//! Daemon settings: defaults < TOML config file < `FERRY_*` env < flags.

use anyhow::Context;
use clap::Args;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const DEFAULT_DATA_DIR: &str = "/var/lib/ferry";
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:7070";
pub const DEFAULT_GATEWAY_ADDR: &str = "127.0.0.1:8080";
pub const DEFAULT_REGISTRY_ADDR: &str = "127.0.0.1:5000";
pub const DEFAULT_DOMAIN: &str = "localhost";
/// The largest `--cpu-overcommit`.
pub const MAX_CPU_OVERCOMMIT: f64 = 100.0;

/// Flags shared by the daemon modes. Each is also read from `FERRY_*` and from the config file.
#[derive(Args, Debug, Clone, Default)]
pub struct DaemonArgs {
    /// TOML config file (keys: data_dir, api_addr, gateway_addr, registry_addr, domain).
    #[arg(long, env = "FERRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory [default: /var/lib/ferry]
    #[arg(long, env = "FERRY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Control-plane API address; port 0 picks a free port [default: 127.0.0.1:7070]
    #[arg(long, env = "FERRY_API_ADDR")]
    pub api_addr: Option<SocketAddr>,
    /// Gateway (user traffic) address; port 0 picks a free port [default: 127.0.0.1:8080]
    #[arg(long, env = "FERRY_GATEWAY_ADDR")]
    pub gateway_addr: Option<SocketAddr>,
    /// Registry address; port 0 picks a free port [default: 127.0.0.1:5000]
    #[arg(long, env = "FERRY_REGISTRY_ADDR")]
    pub registry_addr: Option<SocketAddr>,
    /// Domain under which services are reached as `<service>.<domain>` [default: localhost]
    #[arg(long, env = "FERRY_DOMAIN")]
    pub domain: Option<String>,
    /// This node's name [default: the host name]
    #[arg(long, env = "FERRY_NODE_NAME")]
    pub node_name: Option<String>,
    /// The node link instances are routed behind (a bridge without ports holding the gateway
    /// address; instances are routed, not bridged) [default: ferry0]
    #[arg(long, env = "FERRY_BRIDGE")]
    pub bridge: Option<String>,
    /// Gateway address and prefix of the instance network [default: 10.88.0.1/16]
    #[arg(long, env = "FERRY_SUBNET")]
    pub subnet: Option<String>,
    /// Price plan TOML for usage and invoices [default: the built-in plan, docs/billing.md]
    #[arg(long, env = "FERRY_PRICE_PLAN")]
    pub price_plan: Option<PathBuf>,
    /// Turn the kernel's cgroup `favordynmods` option on at start, so that an instance joining
    /// its cgroup does not wait for an RCU grace period (docs/agent.md) [default: true]
    #[arg(long, env = "FERRY_CGROUP_FAVORDYNMODS", value_name = "BOOL")]
    pub cgroup_favordynmods: Option<bool>,
    /// How many times its cores a node hands out as instances' CPU: with 4, a 2-core node
    /// places up to 8 vCPU of instances (each still limited to its own allocation). Memory is
    /// never overcommitted [default: 1]
    #[arg(long, env = "FERRY_CPU_OVERCOMMIT", value_name = "FACTOR")]
    pub cpu_overcommit: Option<f64>,
    /// An instance's log file is rotated at this size (`10Mi`, `512Ki`); one rotated file is
    /// kept, so an instance holds at most twice this on disk [default: 10Mi]
    #[arg(long, env = "FERRY_LOG_MAX_SIZE", value_name = "SIZE")]
    pub log_max_size: Option<String>,
    /// How long the logs of an instance that no longer runs are kept after their last line
    /// (`24h`, `30m`, `90s`) [default: 24h]
    #[arg(long, env = "FERRY_LOG_RETENTION", value_name = "DURATION")]
    pub log_retention: Option<String>,
    /// Registry basic-auth user as `name:password` (repeatable); turns registry auth on
    #[arg(
        long = "registry-user",
        env = "FERRY_REGISTRY_USERS",
        value_delimiter = ','
    )]
    pub registry_users: Vec<String>,
    /// Registry bearer token accepted as `Authorization: Bearer <token>` (repeatable); turns registry auth on
    #[arg(
        long = "registry-token",
        env = "FERRY_REGISTRY_TOKENS",
        value_delimiter = ','
    )]
    pub registry_tokens: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    api_addr: Option<SocketAddr>,
    gateway_addr: Option<SocketAddr>,
    registry_addr: Option<SocketAddr>,
    domain: Option<String>,
    #[serde(default)]
    registry: RegistryFileConfig,
    node_name: Option<String>,
    bridge: Option<String>,
    subnet: Option<String>,
    price_plan: Option<PathBuf>,
    cgroup_favordynmods: Option<bool>,
    cpu_overcommit: Option<f64>,
    log_max_size: Option<String>,
    log_retention: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFileConfig {
    /// `name = "password"` pairs for basic auth.
    #[serde(default)]
    users: std::collections::HashMap<String, String>,
    #[serde(default)]
    tokens: Vec<String>,
    max_manifest_bytes: Option<usize>,
    max_blob_bytes: Option<u64>,
}

/// Settings after merging every layer.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub api_addr: SocketAddr,
    pub gateway_addr: SocketAddr,
    pub registry_addr: SocketAddr,
    pub domain: String,
    pub registry: ferry_registry::Config,
    pub node_name: String,
    pub bridge: String,
    pub bridge_address: std::net::Ipv4Addr,
    pub subnet_prefix: u8,
    pub price_plan: Option<PathBuf>,
    pub cgroup_favordynmods: bool,
    /// Node CPU handed out per core (1 to 100).
    pub cpu_overcommit: f64,
    /// Instance log rotation size, bytes.
    pub log_max_bytes: u64,
    /// How long logs of instances that no longer run are kept.
    pub log_retention: std::time::Duration,
}

impl DaemonArgs {
    pub fn resolve(&self) -> anyhow::Result<Settings> {
        let file = match &self.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        let addr = |flag: Option<SocketAddr>, file: Option<SocketAddr>, default: &str| {
            flag.or(file)
                .unwrap_or_else(|| default.parse().expect("default address parses"))
        };
        let data_dir: PathBuf = self
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| DEFAULT_DATA_DIR.into());
        let mut registry = ferry_registry::Config::new(data_dir.join("registry"));
        registry.auth.users = file.registry.users;
        for u in &self.registry_users {
            let (name, password) = u
                .split_once(':')
                .with_context(|| format!("--registry-user {u:?}: expected name:password"))?;
            registry
                .auth
                .users
                .insert(name.to_string(), password.to_string());
        }
        registry.auth.tokens = file.registry.tokens;
        registry
            .auth
            .tokens
            .extend(self.registry_tokens.iter().cloned());
        if let Some(n) = file.registry.max_manifest_bytes {
            registry.max_manifest_bytes = n;
        }
        registry.max_blob_bytes = file.registry.max_blob_bytes;
        let subnet = self
            .subnet
            .clone()
            .or(file.subnet)
            .unwrap_or_else(|| "10.88.0.1/16".into());
        let (ip, prefix) = subnet
            .split_once('/')
            .and_then(|(a, p)| Some((a.parse().ok()?, p.parse::<u8>().ok()?)))
            .filter(|(_, p)| (8..=30).contains(p))
            .with_context(|| {
                format!("subnet {subnet:?}: expected an address and prefix like 10.88.0.1/16")
            })?;
        let cpu_overcommit = self.cpu_overcommit.or(file.cpu_overcommit).unwrap_or(1.0);
        if !(1.0..=MAX_CPU_OVERCOMMIT).contains(&cpu_overcommit) {
            anyhow::bail!(
                "cpu overcommit {cpu_overcommit}: must be between 1 and {MAX_CPU_OVERCOMMIT} \
                 (how many times its cores a node hands out)"
            );
        }
        let log_max_size = self
            .log_max_size
            .clone()
            .or(file.log_max_size)
            .unwrap_or_else(|| "10Mi".into());
        let log_max_bytes = ferry_api::quantity::parse_bytes(&log_max_size)
            .filter(|b| *b >= ferry_agent::MIN_LOG_MAX_BYTES)
            .with_context(|| {
                format!(
                    "log max size {log_max_size:?}: expected a size of at least {}, like 10Mi \
                     or 512Ki",
                    ferry_api::Memory(ferry_agent::MIN_LOG_MAX_BYTES)
                )
            })?;
        let log_retention = self
            .log_retention
            .clone()
            .or(file.log_retention)
            .unwrap_or_else(|| "24h".into());
        let log_retention = parse_secs(&log_retention)
            .ok()
            .filter(|s| *s >= 1)
            .map(std::time::Duration::from_secs)
            .with_context(|| {
                format!(
                    "log retention {log_retention:?}: expected a duration of at least 1s, like \
                     24h, 30m or 90s"
                )
            })?;
        let node_name = match self.node_name.clone().or(file.node_name) {
            Some(n) => n,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "node".into()),
        };
        Ok(Settings {
            data_dir,
            registry,
            node_name,
            bridge: self
                .bridge
                .clone()
                .or(file.bridge)
                .unwrap_or_else(|| "ferry0".into()),
            bridge_address: ip,
            subnet_prefix: prefix,
            price_plan: self.price_plan.clone().or(file.price_plan),
            cgroup_favordynmods: self
                .cgroup_favordynmods
                .or(file.cgroup_favordynmods)
                .unwrap_or(true),
            cpu_overcommit,
            log_max_bytes,
            log_retention,
            api_addr: addr(self.api_addr, file.api_addr, DEFAULT_API_ADDR),
            gateway_addr: addr(self.gateway_addr, file.gateway_addr, DEFAULT_GATEWAY_ADDR),
            registry_addr: addr(
                self.registry_addr,
                file.registry_addr,
                DEFAULT_REGISTRY_ADDR,
            ),
            domain: self
                .domain
                .clone()
                .or(file.domain)
                .unwrap_or_else(|| DEFAULT_DOMAIN.into()),
        })
    }
}

/// `60`, `60s`, `2m`, `1h` → seconds.
pub fn parse_secs(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.trim() {
        t if t.ends_with('h') => (&t[..t.len() - 1], 3600),
        t if t.ends_with('m') => (&t[..t.len() - 1], 60),
        t if t.ends_with('s') => (&t[..t.len() - 1], 1),
        t => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?}: expected a duration like 60s, 2m or 1h"))
}

fn load_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
}

/// Writes `value` as JSON to `path` atomically: temp file, fsync, rename, fsync of the directory.
pub fn write_json_atomic(path: &Path, value: &serde_json::Value) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = path.parent().context("path has no parent directory")?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(serde_json::to_string_pretty(value)?.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_merge_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("ferry.toml");
        std::fs::write(
            &cfg,
            "data_dir = \"/from/file\"\napi_addr = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        let args = DaemonArgs {
            config: Some(cfg.clone()),
            api_addr: Some("127.0.0.1:2".parse().unwrap()),
            ..Default::default()
        };
        let s = args.resolve().unwrap();
        assert_eq!(s.data_dir, PathBuf::from("/from/file"));
        assert_eq!(s.api_addr.port(), 2);
        assert_eq!(s.gateway_addr.to_string(), DEFAULT_GATEWAY_ADDR);

        std::fs::write(&cfg, "datadir = \"x\"\n").unwrap();
        let err = format!("{:#}", args.resolve().unwrap_err());
        assert!(err.contains("datadir"), "{err}");
    }

    #[test]
    fn cpu_overcommit_defaults_to_one_and_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("ferry.toml");
        std::fs::write(&cfg, "cpu_overcommit = 4.0\n").unwrap();
        assert_eq!(DaemonArgs::default().resolve().unwrap().cpu_overcommit, 1.0);
        let mut args = DaemonArgs {
            config: Some(cfg),
            ..Default::default()
        };
        assert_eq!(args.resolve().unwrap().cpu_overcommit, 4.0);
        args.cpu_overcommit = Some(2.5);
        assert_eq!(args.resolve().unwrap().cpu_overcommit, 2.5);
        for bad in [0.5, 0.0, -1.0, 101.0, f64::NAN, f64::INFINITY] {
            args.cpu_overcommit = Some(bad);
            let err = format!("{:#}", args.resolve().unwrap_err());
            assert!(err.contains("cpu overcommit"), "{bad}: {err}");
        }
    }

    #[test]
    fn log_size_and_retention_default_parse_and_refuse_nonsense() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("ferry.toml");
        std::fs::write(&cfg, "log_max_size = \"1Mi\"\nlog_retention = \"30m\"\n").unwrap();
        let s = DaemonArgs::default().resolve().unwrap();
        assert_eq!(s.log_max_bytes, 10 << 20);
        assert_eq!(s.log_retention, std::time::Duration::from_secs(24 * 3600));
        let mut args = DaemonArgs {
            config: Some(cfg),
            ..Default::default()
        };
        let s = args.resolve().unwrap();
        assert_eq!(s.log_max_bytes, 1 << 20);
        assert_eq!(s.log_retention, std::time::Duration::from_secs(1800));
        args.log_max_size = Some("512Ki".into());
        args.log_retention = Some("90s".into());
        let s = args.resolve().unwrap();
        assert_eq!(s.log_max_bytes, 512 << 10);
        assert_eq!(s.log_retention, std::time::Duration::from_secs(90));
        for bad in ["1Ki", "0", "ten", "-5Mi"] {
            args.log_max_size = Some(bad.into());
            let err = format!("{:#}", args.resolve().unwrap_err());
            assert!(
                err.contains("log max size") && err.contains(bad),
                "{bad}: {err}"
            );
        }
        args.log_max_size = None;
        for bad in ["0s", "a day", "-1h"] {
            args.log_retention = Some(bad.into());
            let err = format!("{:#}", args.resolve().unwrap_err());
            assert!(
                err.contains("log retention") && err.contains(bad),
                "{bad}: {err}"
            );
        }
    }
}
