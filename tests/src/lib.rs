//! ferry-tests: an in-process [`TestCluster`] (the whole of `ferry server` on ephemeral ports,
//! a temp data dir and its own instance network link) and helpers the end-to-end scenarios share.
//! The scenarios drive it only through the real API, the real registry and the real gateway.

use anyhow::{Context, Result, bail};
use ferry::config::DaemonArgs;
use ferry::server::Platform;
use ferry_api::service::{InstanceView, ServiceView};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(1);

/// The static test workload, built by scripts/test.
pub fn testapp_bin() -> PathBuf {
    let p = std::env::var_os("TESTAPP_STATIC_BIN")
        .expect("TESTAPP_STATIC_BIN is not set: run the tests with scripts/test, which builds the static testapp");
    PathBuf::from(p)
}

pub struct TestCluster {
    pub api: String,
    pub gateway: SocketAddr,
    pub registry: SocketAddr,
    pub http: reqwest::Client,
    platform: Option<Platform>,
    args: DaemonArgs,
    _dir: tempfile::TempDir,
}

/// A test that fails before [`TestCluster::stop`] would otherwise leave its instances running
/// (processes, cgroups and veths outlive the test process: found 8 testapp processes of failed
/// runs still up on the dev machine). Needs the multi-thread runtime, as every test here uses.
impl Drop for TestCluster {
    fn drop(&mut self) {
        if self.platform.is_none() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
            return;
        }
        let r = tokio::task::block_in_place(|| handle.block_on(self.shut_down()));
        if let Err(e) = r {
            eprintln!("stopping a test cluster that was not stopped: {e:#}");
        }
    }
}

impl TestCluster {
    pub async fn start() -> Result<TestCluster> {
        TestCluster::start_configured(|_| {}).await
    }

    /// [`TestCluster::start`] with daemon settings changed by `configure` first.
    pub async fn start_configured(configure: impl FnOnce(&mut DaemonArgs)) -> Result<TestCluster> {
        // Bridge and subnet unique per cluster, and per process: test binaries of different
        // checkouts may run side by side on one machine. 16 clusters a process before the
        // names come round again (the e2e binary starts 7, up to 4 at a time; with 6 a
        // process, its 7th cluster took the bridge of a 1st still running, and whichever
        // stopped first deleted the other's bridge: "network bridge fe2e50: entity not found").
        let n = (std::process::id() % 512) * 16 + NEXT.fetch_add(1, Ordering::SeqCst) % 16;
        let dir = tempfile::tempdir()?;
        let zero: SocketAddr = "127.0.0.1:0".parse()?;
        let mut args = DaemonArgs {
            data_dir: Some(dir.path().join("data")),
            api_addr: Some(zero),
            gateway_addr: Some(zero),
            registry_addr: Some(zero),
            node_name: Some(format!("test-node-{n}")),
            bridge: Some(format!("fe2e{n}")),
            subnet: Some(format!("10.{}.{}.1/24", 200 + n / 256, n % 256)),
            ..Default::default()
        };
        configure(&mut args);
        TestCluster::start_with(dir, args).await
    }

    /// Stops the whole server and starts it again on the same data dir (new ports), as after
    /// a restart of `ferry server`.
    pub async fn restart(mut self) -> Result<TestCluster> {
        if let Some(p) = self.platform.take() {
            p.stop().await?;
        }
        let args = self.args.clone();
        let dir = std::mem::replace(&mut self._dir, tempfile::tempdir()?);
        TestCluster::start_with(dir, args).await
    }

    async fn start_with(dir: tempfile::TempDir, args: DaemonArgs) -> Result<TestCluster> {
        let platform = Platform::start(args.clone().resolve()?).await?;
        let a = platform.addresses.clone();
        let cluster = TestCluster {
            api: format!("http://{}", a.api.context("api address")?),
            gateway: a.gateway.context("gateway address")?,
            registry: a.registry.context("registry address")?,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()?,
            platform: Some(platform),
            args,
            _dir: dir,
        };
        // The agent reports its node once it runs.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if !cluster.nodes().await?.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                bail!("the agent never reported its node");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(cluster)
    }

    /// `GET /v1/nodes`.
    pub async fn nodes(&self) -> Result<Vec<serde_json::Value>> {
        Ok(self
            .http
            .get(format!("{}/v1/nodes", self.api))
            .send()
            .await?
            .json()
            .await?)
    }

    /// Builds the testapp image and pushes it to the built-in registry as `repo:tag`;
    /// returns the reference to deploy.
    pub async fn push_testapp(&self, repo: &str, tag: &str) -> Result<String> {
        let dir = tempfile::tempdir()?;
        let layout = ferry_oci::layout::Layout::create(dir.path())?;
        let spec = ferry_oci::layout::BuildSpec {
            layers: vec![ferry_oci::layout::LayerSource::File {
                src: testapp_bin(),
                dest: "/testapp".into(),
            }],
            entrypoint: vec!["/testapp".into()],
            cmd: vec![],
            env: vec![],
            working_dir: None,
            user: None,
            exposed_port: Some(8080),
            labels: Default::default(),
        };
        let desc = ferry_oci::layout::build(&layout, &spec, tag)?;
        let reference = format!("{}/{repo}:{tag}", self.registry);
        let target: ferry_api::ImageRef = reference.parse()?;
        // As the cluster's first registry user when its registry asks for credentials.
        let credentials = self.args.registry_users.first().and_then(|u| {
            let (username, password) = u.split_once(':')?;
            Some(ferry_oci::client::Credentials::Basic {
                username: username.into(),
                password: password.into(),
            })
        });
        ferry_oci::client::Client::new(credentials)
            .push(&layout, &desc, &target)
            .await?;
        Ok(reference)
    }

    /// `PUT /v1/services/{name}`; returns the status and body.
    pub async fn deploy_raw(
        &self,
        name: &str,
        spec: &serde_json::Value,
    ) -> Result<(u16, serde_json::Value)> {
        let r = self
            .http
            .put(format!("{}/v1/services/{name}", self.api))
            .json(spec)
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await?))
    }

    pub async fn deploy(&self, name: &str, spec: &serde_json::Value) -> Result<ServiceView> {
        let (status, body) = self.deploy_raw(name, spec).await?;
        anyhow::ensure!(
            status == 200 || status == 201,
            "deploy {name}: {status} {body}"
        );
        Ok(serde_json::from_value(body)?)
    }

    pub async fn service(&self, name: &str) -> Result<ServiceView> {
        Ok(self
            .http
            .get(format!("{}/v1/services/{name}", self.api))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// Every instance control knows of for `service` (live and recently stopped).
    pub async fn instances(&self, service: &str) -> Result<Vec<InstanceView>> {
        Ok(self
            .http
            .get(format!("{}/v1/instances?service={service}", self.api))
            .send()
            .await?
            .json()
            .await?)
    }

    /// Where this cluster's node keeps instance logs (`<id>.log`, `<id>.log.1`).
    pub fn log_dir(&self) -> PathBuf {
        self.args
            .data_dir
            .as_ref()
            .expect("test clusters set a data dir")
            .join("agent")
            .join("logs")
    }

    /// The text of `GET /v1/services/{service}/logs?{query}`.
    pub async fn logs(&self, service: &str, query: &str) -> Result<String> {
        Ok(self
            .http
            .get(format!("{}/v1/services/{service}/logs?{query}", self.api))
            .send()
            .await?
            .text()
            .await?)
    }

    /// Instances that are not stopped or failed.
    pub async fn live_instances(&self, service: &str) -> Result<usize> {
        use ferry_api::agent::InstanceState::*;
        Ok(self
            .instances(service)
            .await?
            .iter()
            .filter(|i| matches!(i.state, Pending | Starting | Ready))
            .count())
    }

    /// A request through the gateway to `<service>.localhost`.
    pub fn request(
        &self,
        method: reqwest::Method,
        service: &str,
        path: &str,
    ) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("http://{}{path}", self.gateway))
            .header("host", format!("{service}.localhost"))
    }

    pub async fn get(&self, service: &str, path: &str) -> Result<reqwest::Response> {
        Ok(self
            .request(reqwest::Method::GET, service, path)
            .send()
            .await?)
    }

    /// Polls `f` until it returns true or `timeout` passes.
    pub async fn wait_for<F, Fut>(&self, what: &str, timeout: Duration, mut f: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<bool>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if f().await? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the server, then removes the cluster's bridge and NAT rule (a `ferry server`
    /// keeps them across restarts; a test cluster goes for good).
    pub async fn stop(mut self) -> Result<()> {
        self.shut_down().await
    }

    /// Stops the platform (its instances with it) and removes the cluster's network.
    async fn shut_down(&mut self) -> Result<()> {
        if let Some(p) = self.platform.take() {
            p.stop().await?;
        }
        if let (Some(bridge), Some(subnet)) = (&self.args.bridge, &self.args.subnet) {
            let (gw, prefix) = subnet.split_once('/').context("subnet")?;
            let cfg = ferry_agent::net::NetConfig {
                bridge: bridge.clone(),
                gateway: gw.parse()?,
                prefix: prefix.parse()?,
            };
            ferry_agent::net::teardown_host(&cfg)?;
        }
        Ok(())
    }
}

/// The `ferry` binary of this build (cargo builds it beside the test binaries for the ferry
/// crate's own integration tests): tests drive the CLI through it.
pub fn ferry_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> → target/<profile>/ferry
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("ferry"))
        .context("locating the target dir")?;
    anyhow::ensure!(
        bin.exists(),
        "{bin:?} is missing: build it first (`cargo build -p ferry`, or run scripts/test)"
    );
    Ok(bin)
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
