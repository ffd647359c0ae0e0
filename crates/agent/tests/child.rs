//! The sandbox child between clone and exec must never hang on another sandbox: each child
//! keeps only its own pipe ends, so a sibling cloned meanwhile holds none of them.

mod common;

use anyhow::{Context, Result};
use common::{is_root, testapp};
use ferry_agent::{rootfs, sandbox};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

fn rootfs_with_testapp(dir: &Path, layer: &Path) -> Result<PathBuf> {
    Ok(rootfs::mount_overlay(dir, &[layer.to_path_buf()])?)
}

fn spec(root: PathBuf, name: &str) -> sandbox::SandboxSpec {
    sandbox::SandboxSpec {
        rootfs: root,
        hostname: name.into(),
        argv: vec!["/testapp".into()],
        env: vec!["PATH=/bin".into(), "PORT=8080".into()],
        workdir: None,
        user: None,
    }
}

/// Waits for `pid` in a thread, with a timeout: Some((code, signal)) or None when it hangs.
fn wait_timeout(pid: i32, limit: Duration) -> Option<(Option<i32>, Option<i32>)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(sandbox::wait(pid).ok());
    });
    rx.recv_timeout(limit).ok().flatten()
}

#[test]
fn sandbox_children_do_not_hold_each_others_pipes() -> Result<()> {
    siblings(sandbox::FdTable::Private)
}

/// The same with the clone copying the whole table (kernels before 5.9).
#[test]
fn sandbox_children_do_not_hold_each_others_pipes_with_a_copied_table() -> Result<()> {
    siblings(sandbox::FdTable::Copied)
}

fn siblings(table: sandbox::FdTable) -> Result<()> {
    let spawn = |plan: &std::sync::Arc<sandbox::Plan>| sandbox::spawn_with(plan.clone(), table);
    let Some(bin) = testapp() else { return Ok(()) };
    if !is_root() {
        return Ok(());
    }
    let t = tempfile::tempdir()?;
    let layer = t.path().join("layer");
    std::fs::create_dir_all(&layer)?;
    std::fs::copy(&bin, layer.join("testapp"))?;
    let (da, db, dc) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
    let result = (|| -> Result<()> {
        let plan_a = std::sync::Arc::new(sandbox::plan(&spec(
            rootfs_with_testapp(&da, &layer)?,
            "a",
        ))?);
        let plan_b = std::sync::Arc::new(sandbox::plan(&spec(
            rootfs_with_testapp(&db, &layer)?,
            "b",
        ))?);
        let plan_c = std::sync::Arc::new(sandbox::plan(&spec(
            rootfs_with_testapp(&dc, &layer)?,
            "c",
        ))?);
        let a = spawn(&plan_a)?;
        let b = spawn(&plan_b)?;
        // `a`'s agent side goes away before releasing it: `a` must see EOF and exit, although
        // `b` (cloned later, still waiting for its own release) exists.
        let pid_a = a.pid;
        drop(a);
        let st = wait_timeout(pid_a, Duration::from_secs(10));
        // Releasing `c` must not wait for `b` to exec either (it would if `b` held `c`'s
        // report pipe).
        let c = spawn(&plan_c)?;
        let b2 = spawn(&plan_b)?; // another sibling cloned after `c`
        let pid_c = c.pid;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(c.release().map_err(|e| e.to_string()));
        });
        let released = rx.recv_timeout(Duration::from_secs(10));
        let _ = kill(pid_c);
        let _ = wait_timeout(pid_c, Duration::from_secs(10));
        let pid_b = b.pid;
        drop(b);
        let stb = wait_timeout(pid_b, Duration::from_secs(10));
        let pid_b2 = b2.pid;
        drop(b2);
        let stb2 = wait_timeout(pid_b2, Duration::from_secs(10));
        // Errors, not panics: the overlays below must be unmounted either way.
        anyhow::ensure!(
            st == Some((Some(125), None)),
            "unreleased child did not exit on EOF: {st:?}"
        );
        released
            .context("release of c hung while a sibling waited")?
            .map_err(anyhow::Error::msg)?;
        anyhow::ensure!(stb == Some((Some(125), None)), "b: {stb:?}");
        anyhow::ensure!(stb2 == Some((Some(125), None)), "b2: {stb2:?}");
        Ok(())
    })();
    for d in [&da, &db, &dc] {
        rootfs::remove(d)?;
    }
    result
}

fn kill(pid: i32) -> std::io::Result<()> {
    // SAFETY: plain kill(2).
    if unsafe { libc::kill(pid, libc::SIGKILL) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
