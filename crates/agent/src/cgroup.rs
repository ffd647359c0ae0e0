//! Per-instance cgroups (`ferry/<instance>`), v1 (one dir per controller) or v2 (unified).
//! CPU quota from millicores (period 100 ms), memory limit without swap, pids limit; usage and
//! OOM kills read back.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("cgroup {path:?}: {source}")]
pub struct CgroupError {
    pub path: PathBuf,
    pub source: io::Error,
}

fn err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError {
        path: path.to_path_buf(),
        source,
    }
}

/// Which hierarchy the machine has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// Controller name → mount dir (e.g. `memory` → `/sys/fs/cgroup/memory`).
    V1(Vec<(String, PathBuf)>),
    V2(PathBuf),
}

/// The CPU quota's period for allocations of 10m and more.
pub const PERIOD_US: u64 = 100_000;
/// The kernel refuses a quota under 1 ms (EINVAL) and a period over 1 s.
const MIN_QUOTA_US: u64 = 1_000;
const MAX_PERIOD_US: u64 = 1_000_000;

/// (period, quota) in µs for `millis` of CPU: 100 ms periods, or longer ones for allocations
/// under 10m, whose quota would otherwise be under the kernel's 1 ms minimum (5m gets 1 ms
/// every 200 ms, 1m 1 ms every second). `millis` is at least 1 (the API's minimum).
pub fn cpu_period_quota(millis: u32) -> (u64, u64) {
    let m = u64::from(millis.max(1));
    let period = (MIN_QUOTA_US * 1000)
        .div_ceil(m)
        .clamp(PERIOD_US, MAX_PERIOD_US);
    (period, m * period / 1000)
}
const V1_CONTROLLERS: &[&str] = &["cpu", "cpuacct", "memory", "pids"];

impl Hierarchy {
    /// Detects the hierarchy under `root` (normally `/sys/fs/cgroup`).
    pub fn detect(root: &Path) -> Hierarchy {
        if root.join("cgroup.controllers").exists() {
            return Hierarchy::V2(root.to_path_buf());
        }
        let mut ctrls = Vec::new();
        for c in V1_CONTROLLERS {
            // A controller may be co-mounted (`cpu,cpuacct`) and linked under both names.
            let p = root.join(c);
            if p.join("tasks").exists() || p.join("cgroup.procs").exists() {
                ctrls.push((c.to_string(), p));
            }
        }
        Hierarchy::V1(ctrls)
    }
}

/// Limits of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub cpu_millis: u32,
    pub memory_bytes: u64,
    pub pids: u32,
}

/// What to write where, for a given hierarchy: pure, so it can be tested without a kernel.
pub fn limit_writes(h: &Hierarchy, l: &Limits) -> Vec<(String, String, String)> {
    let (period, quota) = cpu_period_quota(l.cpu_millis);
    let mut w = Vec::new();
    match h {
        Hierarchy::V1(_) => {
            let shares = (u64::from(l.cpu_millis) * 1024 / 1000).max(2);
            w.push(("cpu".into(), "cpu.cfs_period_us".into(), period.to_string()));
            if l.cpu_millis > 0 {
                w.push(("cpu".into(), "cpu.cfs_quota_us".into(), quota.to_string()));
            }
            w.push(("cpu".into(), "cpu.shares".into(), shares.to_string()));
            w.push((
                "memory".into(),
                "memory.limit_in_bytes".into(),
                l.memory_bytes.to_string(),
            ));
            w.push((
                "memory".into(),
                "memory.memsw.limit_in_bytes".into(),
                l.memory_bytes.to_string(),
            ));
            w.push(("memory".into(), "memory.swappiness".into(), "0".into()));
            w.push(("pids".into(), "pids.max".into(), l.pids.to_string()));
        }
        Hierarchy::V2(_) => {
            let max = if l.cpu_millis > 0 {
                format!("{quota} {period}")
            } else {
                format!("max {period}")
            };
            let weight = (u64::from(l.cpu_millis) * 100 / 1000).clamp(1, 10_000);
            w.push(("".into(), "cpu.max".into(), max));
            w.push(("".into(), "cpu.weight".into(), weight.to_string()));
            w.push(("".into(), "memory.max".into(), l.memory_bytes.to_string()));
            w.push(("".into(), "memory.swap.max".into(), "0".into()));
            w.push(("".into(), "pids.max".into(), l.pids.to_string()));
        }
    }
    w
}

/// One instance's cgroup.
#[derive(Debug, Clone)]
pub struct Cgroup {
    hierarchy: Hierarchy,
    rel: PathBuf,
}

/// Usage read from a cgroup: what the per-second sample carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu_ns: u64,
    pub memory_bytes: u64,
    pub memory_peak_bytes: u64,
}

fn read_u64(p: &Path) -> Option<u64> {
    fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn read_key(p: &Path, key: &str) -> Option<u64> {
    let s = fs::read_to_string(p).ok()?;
    s.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// The group of instance `name`, relative to each hierarchy's root.
pub fn instance_rel(name: &str) -> PathBuf {
    Path::new("ferry").join(name)
}

impl Cgroup {
    /// Creates `ferry/<name>` in every controller and applies `limits`; on failure nothing
    /// is left behind.
    pub fn create(h: &Hierarchy, name: &str, limits: &Limits) -> Result<Cgroup, CgroupError> {
        let cg = Cgroup::make(h, name)?;
        if let Err(e) = cg.apply(limits) {
            let _ = cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    /// Creates `ferry/<name>` in every controller (v2: enabling cpu, memory and pids for the
    /// subtree where the kernel offers them), without limits.
    pub fn make(h: &Hierarchy, name: &str) -> Result<Cgroup, CgroupError> {
        let cg = Cgroup {
            hierarchy: h.clone(),
            rel: instance_rel(name),
        };
        match h {
            Hierarchy::V1(ctrls) => {
                for (_, dir) in ctrls {
                    let d = dir.join(&cg.rel);
                    fs::create_dir_all(&d).map_err(err(&d))?;
                }
            }
            Hierarchy::V2(root) => {
                let parent = root.join("ferry");
                fs::create_dir_all(&parent).map_err(err(&parent))?;
                for dir in [root.clone(), parent] {
                    // One write per controller: a write naming one the kernel does not offer
                    // here fails as a whole. What stays missing, `apply` reports by name.
                    for c in ["+cpu", "+memory", "+pids"] {
                        let _ = fs::write(dir.join("cgroup.subtree_control"), c);
                    }
                }
                let d = root.join(&cg.rel);
                fs::create_dir_all(&d).map_err(err(&d))?;
            }
        }
        Ok(cg)
    }

    /// Writes `limits`. A controller that is not there (not mounted on v1, not enabled for
    /// the group on v2) is an error naming it: an instance never runs without its limits.
    /// Only swap limits are optional (they need swap accounting or swap).
    pub fn apply(&self, limits: &Limits) -> Result<(), CgroupError> {
        for (ctrl, file, value) in limit_writes(&self.hierarchy, limits) {
            let optional = file == "memory.memsw.limit_in_bytes" || file == "memory.swap.max";
            let controller = if ctrl.is_empty() {
                file.split('.').next().unwrap_or_default().to_string()
            } else {
                ctrl.clone()
            };
            let Some(dir) = self.dir(&ctrl) else {
                return Err(CgroupError {
                    path: self.rel.clone(),
                    source: io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("the {controller} controller is not mounted"),
                    ),
                });
            };
            let p = dir.join(&file);
            if !p.exists() {
                if optional {
                    continue;
                }
                return Err(CgroupError {
                    path: p,
                    source: io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("the {controller} controller is not enabled for this group"),
                    ),
                });
            }
            fs::write(&p, &value).map_err(err(&p))?;
        }
        Ok(())
    }

    /// An existing group (e.g. one left by an earlier run), by its path relative to the
    /// hierarchy roots. Nothing is created.
    pub fn open(h: &Hierarchy, rel: impl Into<PathBuf>) -> Cgroup {
        Cgroup {
            hierarchy: h.clone(),
            rel: rel.into(),
        }
    }

    /// The group's path relative to each hierarchy root (`ferry/<instance>`).
    pub fn rel(&self) -> &Path {
        &self.rel
    }

    /// Whether any of the group's dirs exists.
    pub fn exists(&self) -> bool {
        self.dirs().iter().any(|d| d.is_dir())
    }

    /// The pids in the group (all hierarchies, deduplicated).
    pub fn pids(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self
            .dirs()
            .iter()
            .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    fn dir(&self, ctrl: &str) -> Option<PathBuf> {
        match &self.hierarchy {
            Hierarchy::V1(ctrls) => ctrls
                .iter()
                .find(|(c, _)| c == ctrl)
                .map(|(_, d)| d.join(&self.rel)),
            Hierarchy::V2(root) => Some(root.join(&self.rel)),
        }
    }

    /// All dirs of this group.
    pub fn dirs(&self) -> Vec<PathBuf> {
        match &self.hierarchy {
            Hierarchy::V1(ctrls) => ctrls.iter().map(|(_, d)| d.join(&self.rel)).collect(),
            Hierarchy::V2(root) => vec![root.join(&self.rel)],
        }
    }

    /// Moves `pid` into the group.
    pub fn add(&self, pid: i32) -> Result<(), CgroupError> {
        for d in self.dirs() {
            let p = d.join("cgroup.procs");
            fs::write(&p, pid.to_string()).map_err(err(&p))?;
        }
        Ok(())
    }

    /// CPU time, memory and peak memory: three file reads (v1 and v2 alike), as the agent
    /// samples every running instance every second.
    pub fn usage(&self) -> Usage {
        let mut u = Usage::default();
        match &self.hierarchy {
            Hierarchy::V1(_) => {
                if let Some(d) = self.dir("cpuacct") {
                    u.cpu_ns = read_u64(&d.join("cpuacct.usage")).unwrap_or(0);
                }
                if let Some(d) = self.dir("memory") {
                    u.memory_bytes = read_u64(&d.join("memory.usage_in_bytes")).unwrap_or(0);
                    u.memory_peak_bytes =
                        read_u64(&d.join("memory.max_usage_in_bytes")).unwrap_or(0);
                }
            }
            Hierarchy::V2(_) => {
                let d = self.dir("").expect("v2 dir");
                u.cpu_ns = read_key(&d.join("cpu.stat"), "usage_usec").unwrap_or(0) * 1000;
                u.memory_bytes = read_u64(&d.join("memory.current")).unwrap_or(0);
                u.memory_peak_bytes = read_u64(&d.join("memory.peak")).unwrap_or(u.memory_bytes);
            }
        }
        u
    }

    /// How many times the kernel's OOM killer acted in the group.
    pub fn oom_kills(&self) -> u64 {
        match &self.hierarchy {
            Hierarchy::V1(_) => self
                .dir("memory")
                .and_then(|d| read_key(&d.join("memory.oom_control"), "oom_kill")),
            Hierarchy::V2(_) => self
                .dir("")
                .and_then(|d| read_key(&d.join("memory.events"), "oom_kill")),
        }
        .unwrap_or(0)
    }

    /// SIGKILLs every process left in the group (v1: from cgroup.procs; v2: cgroup.kill).
    pub fn kill_all(&self) {
        if let Hierarchy::V2(_) = self.hierarchy
            && let Some(d) = self.dir("")
            && fs::write(d.join("cgroup.kill"), "1").is_ok()
        {
            return;
        }
        for d in self.dirs() {
            if let Ok(s) = fs::read_to_string(d.join("cgroup.procs")) {
                for pid in s.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let _ = crate::sys::kill(pid, libc::SIGKILL);
                }
            }
        }
    }

    /// Removes the group's dirs, retrying briefly while the kernel lets go of exiting tasks.
    pub fn remove(&self) -> Result<(), CgroupError> {
        self.remove_within(std::time::Duration::from_secs(1))
    }

    /// [`Cgroup::remove`] with a bound on the retries (10 ms apart, SIGKILLing what is left
    /// every 100 ms).
    pub fn remove_within(&self, limit: std::time::Duration) -> Result<(), CgroupError> {
        let max_tries = (limit.as_millis() / 10).max(1);
        for d in self.dirs() {
            let mut tries = 0;
            loop {
                match fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if tries < max_tries => {
                        let _ = e;
                        tries += 1;
                        if tries % 10 == 0 {
                            self.kill_all();
                        }
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) => return Err(err(&d)(e)),
                }
            }
        }
        Ok(())
    }
}

/// The cgroup2 mount in `/proc/self/mountinfo` text: its mount point and its super options
/// (`rw,nsdelegate,...`). On a v1 host this is the hybrid `unified` mount, if any.
pub fn cgroup2_mount(mountinfo: &str) -> Option<(PathBuf, Vec<String>)> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut r = right.split(' ');
        if r.next()? != "cgroup2" {
            return None;
        }
        let _source = r.next()?;
        let opts = r.next()?.split(',').map(str::to_string).collect();
        let point = left.split(' ').nth(4)?;
        Some((PathBuf::from(crate::rootfs::unescape(point)), opts))
    })
}

/// What [`favor_dynmods`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DynMods {
    /// The cgroup2 mount at this path was reconfigured.
    Changed(PathBuf),
    /// Already as asked.
    Unchanged(PathBuf),
    /// No cgroup2 mount on this host: nothing to reconfigure.
    NoCgroup2,
}

/// Turns the kernel's `favordynmods` cgroup option on (or off), by reconfiguring the host's
/// cgroup2 mount with its other options kept.
///
/// Every task migration into a cgroup (v1 or v2) takes the global threadgroup rwsem for
/// writing; without this option that waits for an RCU grace period whenever no migration
/// happened in the last grace period: 5–24 ms here, the largest part of an isolated cold
/// start (docs/agent.md). With it, a migration takes ~0.4 ms and forks and exits on the host
/// become a little dearer (the read side is no longer per-CPU). The flag is global to the
/// kernel, whichever hierarchy carries it. Kernels before 6.0 do not know it (an error).
pub fn favor_dynmods(on: bool) -> io::Result<DynMods> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    let Some((point, opts)) = cgroup2_mount(&info) else {
        return Ok(DynMods::NoCgroup2);
    };
    if opts.iter().any(|o| o == "favordynmods") == on {
        return Ok(DynMods::Unchanged(point));
    }
    let nul = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cgroup2 mount {point:?}: {what} contains a NUL byte"),
        )
    };
    let c = |s: &str| std::ffi::CString::new(s).map_err(|_| nul(&format!("option {s:?}")));
    let path = std::ffi::CString::new(point.as_os_str().as_encoded_bytes())
        .map_err(|_| nul("the mount point"))?;
    // fspick + fsconfig reconfigure the superblock only: the mount's own flags (nosuid, …)
    // stay, which a mount(2) remount would reset. cgroup2 resets every option not given, so
    // the current ones are given again.
    // SAFETY: fspick takes a NUL-terminated path; the returned fd is owned below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_fspick,
            libc::AT_FDCWD,
            path.as_ptr(),
            FSPICK_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("fspick {point:?}: {e}")));
    }
    // SAFETY: fd was just returned to us and is not owned elsewhere.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let config = |cmd: u32, key: Option<&std::ffi::CStr>, value: Option<&std::ffi::CStr>| {
        // SAFETY: NUL-terminated key/value or null, as fsconfig documents for each command.
        let r = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fd.as_raw_fd(),
                cmd,
                key.map_or(std::ptr::null(), |k| k.as_ptr()),
                value.map_or(std::ptr::null(), |v| v.as_ptr()),
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            let what = key.map_or("reconfigure".into(), |k| k.to_string_lossy().into_owned());
            return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
        }
        Ok(())
    };
    for o in &opts {
        if o == "rw" || o == "ro" || o == "favordynmods" {
            continue;
        }
        match o.split_once('=') {
            Some((k, v)) => config(FSCONFIG_SET_STRING, Some(&c(k)?), Some(&c(v)?))?,
            None => config(FSCONFIG_SET_FLAG, Some(&c(o)?), None)?,
        }
    }
    if on {
        config(FSCONFIG_SET_FLAG, Some(c"favordynmods"), None)?;
    }
    config(FSCONFIG_CMD_RECONFIGURE, None, None)?;
    Ok(DynMods::Changed(point))
}

const FSPICK_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_FLAG: u32 = 0;
const FSCONFIG_SET_STRING: u32 = 1;
const FSCONFIG_CMD_RECONFIGURE: u32 = 7;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_and_its_super_options() {
        let info = "\
25 30 0:22 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
        let (p, o) = cgroup2_mount(info).expect("found");
        assert_eq!(p, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(o, ["rw", "nsdelegate", "memory_recursiveprot"]);
        // Optional fields (none, or several) before the separator; an escaped space.
        let info = "7 1 0:5 / /mnt/cg\\040two rw - cgroup2 none rw,favordynmods\n";
        let (p, o) = cgroup2_mount(info).expect("found");
        assert_eq!(p, Path::new("/mnt/cg two"));
        assert_eq!(o, ["rw", "favordynmods"]);
        assert_eq!(
            cgroup2_mount("25 30 0:22 / /sys/fs/cgroup/cpu rw shared:9 - cgroup cgroup rw,cpu\n"),
            None
        );
    }

    #[test]
    fn v1_writes() {
        let h = Hierarchy::V1(vec![]);
        let w = limit_writes(
            &h,
            &Limits {
                cpu_millis: 500,
                memory_bytes: 64 << 20,
                pids: 100,
            },
        );
        assert!(w.contains(&("cpu".into(), "cpu.cfs_quota_us".into(), "50000".into())));
        assert!(w.contains(&("memory".into(), "memory.swappiness".into(), "0".into())));
        assert!(w.contains(&("pids".into(), "pids.max".into(), "100".into())));
    }

    #[test]
    fn v2_writes() {
        let h = Hierarchy::V2(PathBuf::from("/x"));
        let w = limit_writes(
            &h,
            &Limits {
                cpu_millis: 2000,
                memory_bytes: 1 << 30,
                pids: 1024,
            },
        );
        assert!(w.contains(&("".into(), "cpu.max".into(), "200000 100000".into())));
        assert!(w.contains(&("".into(), "memory.swap.max".into(), "0".into())));
    }

    proptest::proptest! {
        #[test]
        fn quota_matches_millicores(m in 1u32..64_000) {
            let w = limit_writes(&Hierarchy::V1(vec![]), &Limits { cpu_millis: m, memory_bytes: 1, pids: 1 });
            let get = |f: &str| -> u64 { w.iter().find(|x| x.1 == f).unwrap().2.parse().unwrap() };
            let (q, p) = (get("cpu.cfs_quota_us"), get("cpu.cfs_period_us"));
            // What the kernel accepts: a quota of 1 ms or more, a period of 1 ms to 1 s.
            proptest::prop_assert!(q >= 1_000, "quota {} for {}m", q, m);
            proptest::prop_assert!((1_000..=1_000_000).contains(&p), "period {} for {}m", p, m);
            // The share of a CPU, to the nearest millicore.
            proptest::prop_assert_eq!((q * 1000 + p / 2) / p, u64::from(m));
            if m >= 10 {
                proptest::prop_assert_eq!(p, PERIOD_US);
            }
        }
    }
}
