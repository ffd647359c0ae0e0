//! The through-the-platform parts of the launch-rate and density suites: one `ferry server`
//! (`--cpu-overcommit 100`, so that CPU does not bound the count) with a service of the
//! smallest instances a spec takes (10m, 16Mi; three quarters of this machine's memory hold
//! ~1,130), scaled with `ferry scale`.

use crate::autoscale::{ferry, get_json};
use crate::gateway::{Server, start_server};
use anyhow::Result;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SERVICE: &str = "small";
/// The longest a scale step may take until every instance is ready.
const STEP_LIMIT: Duration = Duration::from_secs(180);

/// The server and its service, deleted (every instance stopped) when dropped.
pub(crate) struct SmallService {
    // Dropped in this order after `drop`: the server, then its directory.
    server: Server,
    _work: tempfile::TempDir,
    api: SocketAddr,
    ferry: PathBuf,
    max: String,
}

impl SmallService {
    /// Starts the server on `bridge` / `subnet` and deploys the service (at most `max`
    /// instances) with one instance ready: its image pulled and unpacked.
    pub(crate) fn start(
        ferry_bin: &Path,
        testapp: &Path,
        bridge: &str,
        subnet: &str,
        max: usize,
    ) -> Result<SmallService> {
        let work = tempfile::tempdir()?;
        let server = start_server(
            ferry_bin,
            testapp,
            work.path(),
            bridge,
            subnet,
            None,
            &["--cpu-overcommit", "100"],
        )?;
        let s = SmallService {
            api: server.api.parse()?,
            server,
            _work: work,
            ferry: ferry_bin.to_path_buf(),
            max: max.max(1).to_string(),
        };
        let image = s.server.image.clone();
        s.ferry(&[
            "deploy", SERVICE, "--image", &image, "--cpu", "10m", "--memory", "16Mi", "--min", "1",
            "--max", &s.max,
        ])?;
        s.wait_ready(1)?;
        Ok(s)
    }

    /// The server's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.server.proc.0.id()
    }

    /// `ferry scale --min n`, then waits until `n` instances are ready; the time from the
    /// command (`GET /v1/instances` polled every 100 ms).
    pub(crate) fn scale(&self, n: usize) -> Result<Duration> {
        let t = Instant::now();
        self.ferry(&[
            "scale",
            SERVICE,
            "--min",
            &n.to_string(),
            "--max",
            &self.max,
        ])?;
        self.wait_ready(n)?;
        Ok(t.elapsed())
    }

    fn wait_ready(&self, n: usize) -> Result<()> {
        let t = Instant::now();
        while self.count(&["ready"])? < n {
            anyhow::ensure!(
                t.elapsed() < STEP_LIMIT,
                "ferry server: {n} ready instances not reached in {STEP_LIMIT:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// The service's instances in one of `states`.
    fn count(&self, states: &[&str]) -> Result<usize> {
        let v = get_json(self.api, &format!("/v1/instances?service={SERVICE}"))?;
        Ok(v.as_array().map_or(0, |a| {
            a.iter()
                .filter(|i| states.contains(&i["state"].as_str().unwrap_or("")))
                .count()
        }))
    }

    fn ferry(&self, args: &[&str]) -> Result<String> {
        ferry(&self.ferry, self.api, args)
    }
}

impl Drop for SmallService {
    /// Deletes the service and waits (up to 120 s) until none of its instances is live, so
    /// that the server's own shutdown, which follows, is short.
    fn drop(&mut self) {
        eprintln!("deleting service {SERVICE}");
        let _ = self.ferry(&["delete", SERVICE]);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(120)
            && self
                .count(&["pending", "starting", "ready", "draining"])
                .is_ok_and(|n| n > 0)
        {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}
