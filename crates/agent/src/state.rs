//! What each instance holds, recorded under the data dir, and the clean-up at start of whatever
//! an earlier run of the agent on the same data dir left behind (after a crash or kill -9:
//! processes, cgroups, veths, overlay mounts, iptables rules, IPAM leases, instance dirs).
//!
//! Every instance dir `instances/<id>/` gets a `state.json` before any other resource of the
//! instance exists, and it is updated before each further resource is taken, so a later run
//! finds everything by reading the data dir alone — never by scanning the host's cgroups or
//! links, which other agents (other data dirs) share.

use crate::cgroup::{self, Cgroup, Hierarchy};
use crate::net::{self, InstanceNet, Ipam, NetConfig};
use crate::rootfs;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

pub(crate) const STATE_FILE: &str = "state.json";

/// The record of one instance's resources (`instances/<id>/state.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct InstanceRecord {
    pub id: String,
    /// The cgroup, relative to every hierarchy root (`ferry/<id>`).
    pub cgroup: PathBuf,
    /// The host end of the veth pair.
    pub veth: String,
    /// The leased address, once leased.
    pub ip: Option<Ipv4Addr>,
    /// Without outbound network the instance has a FORWARD DROP rule for its address.
    pub outbound: bool,
    /// The sandbox init (informational: processes are found through the cgroup).
    pub pid: Option<i32>,
}

impl InstanceRecord {
    pub fn new(id: &str, outbound: bool) -> InstanceRecord {
        InstanceRecord {
            id: id.to_string(),
            cgroup: cgroup::instance_rel(id),
            veth: net::host_veth_name(id),
            ip: None,
            outbound,
            pid: None,
        }
    }

    /// Writes the record atomically (temp file + rename) into the instance dir.
    pub fn write(&self, instance_dir: &Path) -> io::Result<()> {
        let tmp = instance_dir.join(format!("{STATE_FILE}.tmp"));
        let data = serde_json::to_vec(self).map_err(io::Error::other)?;
        fs::write(&tmp, data)?;
        fs::rename(&tmp, instance_dir.join(STATE_FILE))
    }

    pub fn read(instance_dir: &Path) -> Option<InstanceRecord> {
        let data = fs::read(instance_dir.join(STATE_FILE)).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// Refuses records that would make us touch something that is not this instance's (a
    /// corrupted or hand-edited file must not rmdir another cgroup or delete `eth0`).
    fn sane(&self, dir_name: &str) -> bool {
        let parts: Vec<Component> = self.cgroup.components().collect();
        self.id == dir_name
            && self.cgroup == cgroup::instance_rel(&self.id)
            && parts.len() == 2
            && parts.iter().all(|c| matches!(c, Component::Normal(_)))
            && self.veth == net::host_veth_name(&self.id)
    }
}

/// What [`recover`] found and removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Instance dirs found (and removed, unless listed in `errors`).
    pub instances: Vec<String>,
    /// Processes SIGKILLed.
    pub killed: usize,
    /// Cgroups removed (one per instance, over all hierarchies).
    pub cgroups: usize,
    /// Host veths deleted.
    pub veths: usize,
    /// Mounts unmounted.
    pub mounts: usize,
    /// IPAM leases released.
    pub leases: usize,
    /// What could not be removed.
    pub errors: Vec<String>,
}

impl Recovery {
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty() && self.leases == 0 && self.mounts == 0
    }
}

/// Mount points at or below `dir`, deepest first (from /proc/self/mountinfo).
pub(crate) fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(rootfs::unescape(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// Unmounts everything at or below `dir` (lazily when busy); returns how many mounts went.
fn unmount_under(dir: &Path, errors: &mut Vec<String>) -> usize {
    let mut n = 0;
    // Stacked mounts show up once per layer: go round until nothing is left.
    for _ in 0..8 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            break;
        }
        for m in mounts {
            let Ok(c) = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            match crate::sys::umount2(&c, 0) {
                Ok(()) => n += 1,
                Err(libc::EINVAL | libc::ENOENT) => {}
                Err(_) => match crate::sys::umount2(&c, libc::MNT_DETACH) {
                    Ok(()) => n += 1,
                    Err(libc::EINVAL | libc::ENOENT) => {}
                    Err(e) => errors.push(format!(
                        "unmount {m:?}: {}",
                        io::Error::from_raw_os_error(e)
                    )),
                },
            }
        }
    }
    n
}

/// Finds and removes everything an earlier run of an agent on `data_dir` left: for each
/// `instances/<id>/`, SIGKILLs the processes in its cgroup (the sandbox init and all it
/// spawned, reparented to the host's init when the agent died), removes the cgroup, the
/// FORWARD rule and the host veth, unmounts the overlay and removes the dir; then releases
/// every IPAM lease (at start no instance of this agent runs, so all are stale).
///
/// Only what the data dir names is touched: other agents on the same host (other data dirs)
/// share the cgroup parent and the host's links, and keep theirs.
pub fn recover(data_dir: &Path, hierarchy: &Hierarchy, net_cfg: &NetConfig) -> Recovery {
    let mut r = Recovery::default();
    // Canonical, as /proc/self/mountinfo lists mount points (the data dir may be reached
    // through a symlink).
    let instances = data_dir.join("instances");
    let instances = fs::canonicalize(&instances).unwrap_or(instances);
    let mut dirs: Vec<(String, PathBuf)> = match fs::read_dir(&instances) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
            .collect(),
        Err(_) => Vec::new(),
    };
    dirs.sort();
    for (name, dir) in dirs {
        r.instances.push(name.clone());
        let rec = match InstanceRecord::read(&dir) {
            Some(rec) if rec.sane(&name) => Some(rec),
            Some(_) => {
                r.errors.push(format!(
                    "{dir:?}: state record does not match the instance; only the dir is removed"
                ));
                None
            }
            // No record: either nothing was taken yet (the record comes first) or the dir is
            // from an agent that kept none; the names follow from the id alike.
            None if dir_has_more_than_state(&dir) => Some(InstanceRecord::new(&name, true)),
            None => None,
        };
        if let Some(rec) = &rec {
            let cg = Cgroup::open(hierarchy, &rec.cgroup);
            if cg.exists() {
                let pids = cg.pids();
                r.killed += pids.len();
                cg.kill_all();
                match cg.remove_within(Duration::from_secs(5)) {
                    Ok(()) => r.cgroups += 1,
                    Err(e) => r.errors.push(e.to_string()),
                }
            }
            let had_veth = Path::new("/sys/class/net").join(&rec.veth).exists();
            let n = InstanceNet {
                ip: rec.ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
                host_veth: rec.veth.clone(),
                // Teardown goes by name.
                host_index: 0,
                no_outbound: !rec.outbound && rec.ip.is_some(),
            };
            match net::teardown_instance(&n) {
                Ok(()) if had_veth => r.veths += 1,
                Ok(()) => {}
                Err(e) => r.errors.push(e.to_string()),
            }
        }
        r.mounts += unmount_under(&dir, &mut r.errors);
        if mounts_under(&dir).is_empty() {
            if let Err(e) = rootfs::remove(&dir) {
                r.errors.push(e.to_string());
            }
        } else {
            r.errors
                .push(format!("{dir:?}: still mounted, instance dir kept"));
        }
    }
    // Leases: every one is stale now (a crash may have come between leasing and recording).
    let ipam = Ipam::new(data_dir.join("ipam"), net_cfg.clone());
    if let Ok(rd) = fs::read_dir(data_dir.join("ipam")) {
        for e in rd.filter_map(Result::ok) {
            if let Some(ip) = e
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<Ipv4Addr>().ok())
            {
                ipam.release(ip);
                r.leases += 1;
            }
        }
    }
    r
}

fn dir_has_more_than_state(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|rd| {
        rd.filter_map(Result::ok)
            .any(|e| !e.file_name().to_string_lossy().starts_with(STATE_FILE))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_is_checked() {
        let t = tempfile::tempdir().unwrap();
        let mut rec = InstanceRecord::new("svc-1-abc", false);
        rec.ip = Some(Ipv4Addr::new(10, 88, 0, 7));
        rec.write(t.path()).unwrap();
        let back = InstanceRecord::read(t.path()).unwrap();
        assert_eq!(back, rec);
        assert!(back.sane("svc-1-abc"));
        assert!(!back.sane("other"));
        let mut bad = rec.clone();
        bad.cgroup = PathBuf::from("ferry/../system.slice");
        assert!(!bad.sane("svc-1-abc"));
        let mut bad = rec;
        bad.veth = "eth0".into();
        assert!(!bad.sane("svc-1-abc"));
    }

    #[test]
    fn recover_without_resources_removes_dirs_and_leases() {
        let t = tempfile::tempdir().unwrap();
        let data = t.path();
        let cfg = NetConfig {
            bridge: "fnone0".into(),
            gateway: Ipv4Addr::new(10, 77, 0, 1),
            prefix: 24,
        };
        let ipam = Ipam::new(data.join("ipam"), cfg.clone());
        let ip = ipam.allocate("gone-1").unwrap();
        let stray = ipam.allocate("never-recorded").unwrap();
        let d = data.join("instances").join("gone-1");
        fs::create_dir_all(&d).unwrap();
        let mut rec = InstanceRecord::new("gone-1", true);
        rec.ip = Some(ip);
        rec.write(&d).unwrap();
        // A dir without a record (crash right after mkdir).
        fs::create_dir_all(data.join("instances").join("gone-2")).unwrap();
        // A cgroup hierarchy that does not exist: nothing to kill.
        let h = Hierarchy::V1(vec![("pids".into(), data.join("no-cgroup"))]);
        let r = recover(data, &h, &cfg);
        assert_eq!(r.instances, ["gone-1", "gone-2"]);
        assert!(r.errors.is_empty(), "{r:?}");
        assert!(!d.exists());
        assert!(!data.join("ipam").join(ip.to_string()).exists());
        assert!(!data.join("ipam").join(stray.to_string()).exists());
        assert_eq!(fs::read_dir(data.join("instances")).unwrap().count(), 0);
    }
}
