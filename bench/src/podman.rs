//! The podman peer of the cold-start suite: `podman run --rm` (runtime runc) of the same image,
//! timed from spawn to the first byte of an HTTP response.

use crate::suites::{free_port, ms, poll_first_byte};
use crate::{ensure_packages, run};
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// podman's settings for this machine: runc (crun refuses the hybrid cgroups), cgroupfs and
/// file events (no systemd), no default ulimits (no CAP_SYS_RESOURCE).
const CONTAINERS_CONF: &str = "[containers]
default_ulimits = []
[engine]
runtime = \"runc\"
cgroup_manager = \"cgroupfs\"
events_logger = \"file\"
";

fn podman(conf: &Path) -> Command {
    let mut c = Command::new("podman");
    c.env("CONTAINERS_CONF", conf);
    c
}

/// `n` cold starts of the OCI archive's image (tag `v1`) with `podman run --rm --network
/// host`, each polled every 0.5 ms until `GET /` answers; milliseconds, and podman's version.
pub(crate) fn cold_starts(archive: &Path, work: &Path, n: usize) -> Result<(Vec<f64>, String)> {
    ensure_packages(&["podman", "runc"])?;
    let conf = work.join("containers.conf");
    std::fs::write(&conf, CONTAINERS_CONF)?;
    let version = run(podman(&conf).arg("--version"))?.trim().to_string();
    let id = run(podman(&conf)
        .args(["pull", "-q"])
        .arg(format!("oci-archive:{}:v1", archive.display())))?
    .trim()
    .lines()
    .last()
    .context("podman pull printed no image id")?
    .to_string();
    let mut times = Vec::with_capacity(n);
    let result = (|| {
        for i in 0..n {
            let port = free_port()?;
            let target: SocketAddr = format!("127.0.0.1:{port}").parse()?;
            let name = format!("ferry-bench-{}-{i}", std::process::id());
            let t = Instant::now();
            let mut child = podman(&conf)
                .args(["run", "--rm", "--network", "host", "--name", &name])
                .args(["-e", &format!("PORT={port}"), &id])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let answered = poll_first_byte(target, t, Duration::from_secs(20));
            let elapsed = t.elapsed();
            let _ = podman(&conf).args(["kill", &name]).output();
            let _ = child.wait();
            anyhow::ensure!(answered == 200, "podman run {name} never answered");
            times.push(ms(elapsed));
        }
        Ok(())
    })();
    let _ = podman(&conf).args(["rmi", "-f", &id]).output();
    result?;
    Ok((times, version))
}
