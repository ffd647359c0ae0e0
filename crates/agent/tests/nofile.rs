//! Limits the agent raises. The open-file limit: the agent raises its own (a node holds a
//! few descriptors per instance) and its instances get back what the process started with.
//! `kernel.pid_max`: raised for the host (every instance thread takes a pid). Alone in its
//! test binary: it lowers both before any agent of the process runs, so the raise shows.

mod common;

use anyhow::Result;
use common::{Node, cgroup_pids, is_root, testapp};

const NET: u8 = 24;

fn nofile(pid: &str) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[3].parse().unwrap(), f[4].parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_raises_its_limits_and_instances_keep_the_started_open_file_limit() -> Result<()>
{
    if testapp().is_none() || !is_root() {
        return Ok(());
    }
    let (_, hard) = nofile("self");
    let low = 1024.min(hard);
    let l = libc::rlimit {
        rlim_cur: low,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct; lowering the soft limit is always allowed.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) }, 0);
    // The kernel's default on machines with up to 32 CPUs (an earlier agent may have raised it).
    let pid_max = "/proc/sys/kernel/pid_max";
    std::fs::write(pid_max, "32768")?;

    let mut node = Node::start(NET).await?;
    let id = "svc-00001-nofile";
    node.start_ready(node.spec(id)).await?;
    assert_eq!(ferry_agent::instance_open_files(), (low, hard));
    let raised: u64 = std::fs::read_to_string(pid_max)?.trim().parse()?;
    assert_eq!(raised, ferry_agent::PID_MAX, "kernel.pid_max");
    let agent = nofile("self");
    assert!(agent.0 == agent.1 && agent.1 >= hard, "agent {agent:?}");
    let pid = cgroup_pids(id)[0];
    assert_eq!(nofile(&pid.to_string()), (low, hard), "instance");
    node.stop(id).await?;
    node.shutdown().await;
    Ok(())
}
