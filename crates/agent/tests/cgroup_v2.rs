//! The cgroup v2 path on the machine's unified mount. On a hybrid host (cgroup v1 with a
//! cgroup2 mount beside it, like the Ferry CI machines) the v2 tree offers no cpu, memory or
//! pids controller: creating a group, moving a process in, reading its CPU time, killing it
//! with `cgroup.kill` and removing the group all work there, and applying limits fails naming
//! the missing controller. On a pure v2 host the limits land too.

use ferry_agent::cgroup::{Cgroup, DynMods, Hierarchy, Limits, favor_dynmods};
use std::path::PathBuf;
use std::time::Duration;

/// The first cgroup2 mount of this process's mount namespace.
fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    ferry_agent::cgroup::cgroup2_mount(&info).map(|(p, _)| p)
}

/// The cgroup2 line of mountinfo: (per-mount options, super options).
fn cgroup2_options() -> (String, Vec<String>) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| {
            l.split_once(" - ")
                .is_some_and(|(_, r)| r.starts_with("cgroup2 "))
        })
        .expect("a cgroup2 mount");
    let per_mount = line.split(' ').nth(5).unwrap().to_string();
    let (_, sup) = ferry_agent::cgroup::cgroup2_mount(line).unwrap();
    (per_mount, sup)
}

/// What the agent does at start (Config::cgroup_favor_dynmods): the option goes on and off
/// through fspick/fsconfig, and the mount's own flags and its other options stay as they were.
/// It is left on, as the agent leaves it.
#[test]
fn favordynmods_toggles_and_keeps_the_other_options() {
    let mount = cgroup2_mount().expect("a cgroup2 mount on this host");
    let without = |v: &[String]| -> Vec<String> {
        v.iter().filter(|o| *o != "favordynmods").cloned().collect()
    };
    let (flags0, opts0) = cgroup2_options();
    let r = favor_dynmods(false).expect("turning favordynmods off");
    assert!(matches!(r, DynMods::Changed(ref p) | DynMods::Unchanged(ref p) if *p == mount));
    let (flags1, opts1) = cgroup2_options();
    assert!(!opts1.iter().any(|o| o == "favordynmods"), "{opts1:?}");
    assert_eq!(
        favor_dynmods(false).unwrap(),
        DynMods::Unchanged(mount.clone())
    );
    assert_eq!(
        favor_dynmods(true).unwrap(),
        DynMods::Changed(mount.clone())
    );
    let (flags2, opts2) = cgroup2_options();
    assert!(opts2.iter().any(|o| o == "favordynmods"), "{opts2:?}");
    assert_eq!(favor_dynmods(true).unwrap(), DynMods::Unchanged(mount));
    assert_eq!(
        (&flags1, &flags2),
        (&flags0, &flags0),
        "per-mount flags changed"
    );
    assert_eq!(without(&opts1), without(&opts0));
    assert_eq!(without(&opts2), without(&opts0));
}

#[test]
fn v2_group_lifecycle_and_limits() {
    let Some(mount) = cgroup2_mount() else {
        panic!("no cgroup2 mount: the v2 path cannot be checked on this host");
    };
    // A subtree of our own: every v2 group has cgroup.controllers, so it detects as v2.
    let base = mount.join(format!("ferry-v2-test-{}", std::process::id()));
    std::fs::create_dir(&base).expect("creating the test's cgroup (needs root)");
    let h = Hierarchy::detect(&base);
    assert_eq!(h, Hierarchy::V2(base.clone()));
    let offered = std::fs::read_to_string(base.join("cgroup.controllers")).unwrap();
    let full = ["cpu", "memory", "pids"]
        .iter()
        .all(|c| offered.split_whitespace().any(|o| o == *c));

    let limits = Limits {
        cpu_millis: 500,
        memory_bytes: 64 << 20,
        pids: 64,
    };
    match Cgroup::create(&h, "inst-v2", &limits) {
        Ok(cg) => {
            assert!(full, "limits applied without the controllers: {offered:?}");
            let d = base.join("ferry/inst-v2");
            let read = |f: &str| std::fs::read_to_string(d.join(f)).unwrap();
            assert_eq!(read("cpu.max").trim(), "50000 100000");
            assert_eq!(read("memory.max").trim(), (64u64 << 20).to_string());
            assert_eq!(read("pids.max").trim(), "64");
            cg.remove().unwrap();
        }
        Err(e) => {
            assert!(!full, "limits failed although offered: {e}");
            let msg = e.to_string();
            assert!(msg.contains("controller is not enabled"), "{msg}");
            // Nothing is left of the failed group.
            assert!(!base.join("ferry/inst-v2").exists());
        }
    }

    // The mechanics every v2 host has.
    let cg = Cgroup::make(&h, "inst-v2").unwrap();
    let mut child = std::process::Command::new("/bin/sh")
        .args(["-c", "while :; do :; done"])
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    cg.add(pid).unwrap();
    assert_eq!(cg.pids(), vec![pid]);
    std::thread::sleep(Duration::from_millis(300));
    let used = cg.usage().cpu_ns;
    assert!(
        used > 10_000_000,
        "cpu.stat usage of a busy loop: {used} ns"
    );
    cg.kill_all();
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    cg.remove().unwrap();
    assert!(!cg.exists());
    std::fs::remove_dir(base.join("ferry")).unwrap();
    std::fs::remove_dir(&base).unwrap();
}
