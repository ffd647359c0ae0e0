//! The agent-start suite (issue 7): "start instance" → ready for the cached testapp image,
//! one instance at a time, through the agent's own command channel as control drives it;
//! beside it in the same run, `runc run` of the same rootfs to its first HTTP response.

use crate::launch::{Node, cleanup_host};
use crate::{Row, percentile, sorted};
use anyhow::{Context, Result, ensure};
use ferry_api::agent::{AgentCommand, AgentEvent, InstanceState};
use std::path::Path;
use std::time::Duration;

/// Pause between starts, so each one starts from a quiet machine as a real cold start does
/// (back-to-back starts share kernel work: see the cgroup note in docs/agent.md).
const GAP: Duration = Duration::from_millis(300);

/// Stops `id` and waits for its stopped report.
async fn stop(node: &mut Node, id: &str) -> Result<()> {
    node.commands
        .send(AgentCommand::Stop {
            instance_id: id.into(),
            grace_ms: 1000,
        })
        .await
        .context("agent command channel closed")?;
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), node.events.recv())
            .await
            .context("no stop report within 30 s")?
            .context("agent events closed")?;
        if let AgentEvent::Status(s) = ev
            && s.instance_id == id
            && matches!(s.state, InstanceState::Stopped | InstanceState::Failed)
        {
            return Ok(());
        }
    }
}

pub fn agent_start(ferry: &Path, testapp: &Path, n: usize) -> Result<(String, Vec<Row>)> {
    let dir = tempfile::tempdir()?;
    let rt = tokio::runtime::Runtime::new()?;
    cleanup_host();
    let ferry_ms = rt.block_on(async {
        let mut node = Node::start(ferry, testapp, dir.path()).await?;
        let mut times = Vec::with_capacity(n);
        // Run 0 unpacks the image into the layer cache and is not counted.
        for i in 0..=n {
            let id = format!("as-{}-{i}", std::process::id());
            let out = node.launch([id.clone()], |_| None).await?;
            ensure!(out.ready == 1, "start {i}: {:?}", out.stopped);
            if i > 0 {
                times.extend(out.start_to_ready_ms);
            }
            stop(&mut node, &id).await?;
            tokio::time::sleep(GAP).await;
        }
        node.stop().await;
        anyhow::Ok(times)
    })?;
    let runc_ms = crate::suites::runc_first_byte(testapp, dir.path(), n)?;
    let (f, r) = (sorted(ferry_ms), sorted(runc_ms));
    let peer = Some("runc run".to_string());
    let row = |metric: &str, p: f64, goal: Option<&str>| Row {
        metric: metric.into(),
        unit: "ms".into(),
        ferry: percentile(&f, p),
        peer_name: peer.clone(),
        peer: Some(percentile(&r, p)),
        goal: goal.map(str::to_string),
    };
    let rows = vec![
        row("start→ready p50", 0.5, None),
        row("start→ready p99", 0.99, None),
    ];
    let how = format!(
        "Ferry: an in-process agent (as in `ferry server`) with the static testapp image cached \
         (one unmeasured start first), {n} starts one at a time with {} ms between them, each \
         timed from sending `AgentCommand::Start` (0.1 vCPU, 64 MiB, TCP readiness probe) to \
         its `ready` report, and stopped before the next: overlay rootfs, cgroups, namespaces, \
         veth and IPAM, seccomp, exec, readiness probe. Peer: `runc run` (Debian runc 1.1) of a \
         bundle with the same binary as rootfs, host network (no veth), timed from spawn to the \
         first byte of `GET /`, polled every 0.5 ms.",
        GAP.as_millis()
    );
    Ok((how, rows))
}
