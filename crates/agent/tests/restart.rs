//! Restart clean-up: an agent killed with SIGKILL leaves its instances running (pid-namespace
//! inits reparented to the host's init) with their cgroups, veths, overlay mounts, leases and
//! dirs; the next agent on the same data dir must remove all of it before taking commands,
//! and must leave another agent's (other data dir) instances alone.

mod common;

use anyhow::{Context, Result, bail};
use common::{Node, alive, cgroup_pids, get, is_root, leases, leftovers, proc_state, testapp};
use ferry_api::agent::InstanceState;
use std::path::Path;
use std::time::{Duration, Instant};

/// The data dir the crash helper runs its agent on; unset in a normal test run.
const HELPER_ENV: &str = "FERRY_CRASH_HELPER_DIR";
const CRASH_NET: u8 = 21;
const BYSTANDER_NET: u8 = 22;

fn ids(dir: &Path) -> [String; 2] {
    // Unique per run: the host's cgroup parent and links are shared with other agents.
    let tag = dir
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .replace(|c: char| !c.is_ascii_alphanumeric(), "")
        })
        .unwrap_or_default()
        .to_lowercase();
    [format!("crash-{tag}-a"), format!("crash-{tag}-noout")]
}

/// Not a test by itself: the agent process that `killed_agent_leftovers_are_removed_on_restart`
/// starts (this same binary, with `HELPER_ENV` set) and SIGKILLs once its instances are ready.
#[test]
fn crash_helper() {
    let Some(dir) = std::env::var_os(HELPER_ENV) else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut node = Node::start_at(&dir, CRASH_NET).await.unwrap();
        let [a, noout] = ids(&dir);
        node.start_ready(node.spec(&a)).await.unwrap();
        let mut spec = node.spec(&noout);
        spec.outbound_network = false;
        node.start_ready(spec).await.unwrap();
        std::fs::write(dir.join("ready"), "ready").unwrap();
        // Wait to be killed.
        loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    });
}

/// SIGKILLs the listed processes (pid, start time) still alive when dropped: a failing run
/// must not leave the old instances running.
struct KillOnDrop(Vec<(i32, u64)>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for (pid, start) in &self.0 {
            if alive(*pid, *start) {
                // SAFETY: plain kill(2) of a process this test started.
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
        }
    }
}

fn node_images(dir: &Path) -> std::sync::Arc<ferry_agent::LayoutImageSource> {
    std::sync::Arc::new(ferry_agent::LayoutImageSource::new(dir.join("layout")))
}

fn forward_drop_rule_exists(ip: &str) -> bool {
    ["/usr/sbin/iptables", "/sbin/iptables"]
        .iter()
        .find(|p| Path::new(p).exists())
        .is_some_and(|ipt| {
            std::process::Command::new(ipt)
                .args(["-w", "-C", "FORWARD", "-s", ip, "-j", "DROP"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_leftovers_are_removed_on_restart() -> Result<()> {
    if testapp().is_none() || !is_root() {
        return Ok(());
    }
    // Another agent (another data dir) with a running instance, which must survive.
    let mut other = Node::start(BYSTANDER_NET).await?;
    let other_id = format!("bystander-{}", std::process::id());
    let other_addr = other.start_ready(other.spec(&other_id)).await?;
    let other_pids = cgroup_pids(&other_id);

    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().to_path_buf();
    let [a, noout] = ids(&dir);
    let log = std::fs::File::create(dir.join("helper.log"))?;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["crash_helper", "--exact", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, &dir)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dir.join("ready").exists() {
        if let Some(st) = child.try_wait()? {
            let out = std::fs::read_to_string(dir.join("helper.log")).unwrap_or_default();
            bail!("crash helper ended early ({st}):\n{out}");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("crash helper not ready in 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut procs = Vec::new();
    for id in [&a, &noout] {
        let pids = cgroup_pids(id);
        assert!(!pids.is_empty(), "{id}: no processes in its cgroup");
        for pid in pids {
            procs.push((pid, proc_state(pid).context("process state")?.1));
        }
    }
    let procs = KillOnDrop(procs);
    let data = dir.join("agent");
    let noout_ip = std::fs::read_dir(data.join("ipam"))?
        .filter_map(Result::ok)
        .find(|e| std::fs::read_to_string(e.path()).is_ok_and(|o| o == noout))
        .and_then(|e| e.file_name().into_string().ok())
        .context("lease of the no-outbound instance")?;

    // The crash.
    child.kill()?; // SIGKILL
    child.wait()?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (pid, start) in &procs.0 {
        assert!(alive(*pid, *start), "pid {pid} died with the agent");
    }
    for id in [&a, &noout] {
        let left = leftovers(&data, id);
        assert!(
            left.len() >= 4,
            "{id}: expected a full set of leftovers, got {left:?}"
        );
    }
    assert_eq!(leases(&data).len(), 2);
    let had_rule = forward_drop_rule_exists(&noout_ip);

    // The next run on the same data dir.
    let t = Instant::now();
    let mut node = Node::start_at(&dir, CRASH_NET).await?;
    node.wait_node().await?;
    eprintln!(
        "clean-up of {} processes took {:?}",
        procs.0.len(),
        t.elapsed()
    );
    for (pid, start) in &procs.0 {
        assert!(!alive(*pid, *start), "pid {pid} of the old run still runs");
    }
    for id in [&a, &noout] {
        let left = leftovers(&data, id);
        assert!(left.is_empty(), "{id}: left behind: {left:?}");
    }
    assert!(leases(&data).is_empty(), "leases: {:?}", leases(&data));
    assert_eq!(std::fs::read_dir(data.join("instances"))?.count(), 0);
    if had_rule {
        assert!(
            !forward_drop_rule_exists(&noout_ip),
            "FORWARD DROP rule for {noout_ip} left"
        );
    }

    // While it runs, no second agent may take the data dir (its clean-up would kill ours).
    let second = ferry_agent::Agent::new(node.agent.config().clone(), node_images(&dir))?;
    let (_ctx, crx) = tokio::sync::mpsc::channel(1);
    let (etx, _erx) = tokio::sync::mpsc::channel(16);
    let err = second
        .run(crx, etx, tokio_util::sync::CancellationToken::new())
        .await
        .expect_err("a second agent on the same data dir must be refused");
    assert!(err.to_string().contains("in use"), "{err}");

    // The new run works, with the same ids.
    let addr = node.start_ready(node.spec(&a)).await?;
    assert_eq!(get(addr, "/env").await?.0, 200);
    assert_eq!(node.stop(&a).await?.state, InstanceState::Stopped);
    assert!(leftovers(&data, &a).is_empty());
    node.shutdown().await;

    // The other agent's instance was not touched.
    for pid in &other_pids {
        assert!(
            proc_state(*pid).is_some_and(|s| s.0 != 'Z'),
            "bystander pid {pid} gone"
        );
    }
    assert_eq!(get(other_addr, "/env").await?.0, 200);
    other.stop(&other_id).await?;
    assert!(leftovers(&other.data, &other_id).is_empty());
    other.shutdown().await;
    Ok(())
}
