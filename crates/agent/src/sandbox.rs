//! Our own minimal container runtime: clone into new mount, pid, net, uts and ipc namespaces,
//! build the mount tree (proc, read-only sys and cgroup, a minimal /dev, /tmp), pivot_root into
//! the overlay rootfs, wait for the agent to place the child in its cgroups and network, then
//! drop privileges (bounding set and caps cut to Docker's default minus NET_RAW and MKNOD,
//! no_new_privs, seccomp) and exec the workload.
//!
//! Everything the child needs is built here, in the parent, before the clone: the child of a
//! multi-threaded process may only make raw syscalls on ready data until it execs. It reports
//! a failure as `(step, errno)` on a close-on-exec pipe; EOF on that pipe means exec succeeded.

use crate::rootfs::{self, RootfsError};
use crate::sys;
use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error("user {0:?}: not found in the image's /etc/passwd")]
    UnknownUser(String),
    #[error("group {0:?}: not found in the image's /etc/group")]
    UnknownGroup(String),
    #[error("executable {0:?}: not found in the image")]
    NotFound(String),
    #[error("no command: the image has no Entrypoint or Cmd and the spec none")]
    NoCommand,
    #[error("argument or env {0:?}: contains NUL")]
    Nul(String),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("sandbox setup failed at {step}: {source}")]
    Child {
        step: String,
        source: std::io::Error,
    },
}

/// What to run and how.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// The mounted rootfs.
    pub rootfs: PathBuf,
    pub hostname: String,
    /// argv; argv[0] is looked up in `PATH` (from `env`) when it has no '/'.
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    /// `uid[:gid]` or `name[:group]`, resolved in the image.
    pub user: Option<String>,
}

/// Capabilities kept (Docker's default set without NET_RAW and MKNOD).
pub const KEPT_CAPS: &[u32] = &[
    0,  // CHOWN
    1,  // DAC_OVERRIDE
    3,  // FOWNER
    4,  // FSETID
    5,  // KILL
    6,  // SETGID
    7,  // SETUID
    8,  // SETPCAP
    10, // NET_BIND_SERVICE
    18, // SYS_CHROOT
    29, // AUDIT_WRITE
    31, // SETFCAP
];

enum Op {
    Mount {
        src: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    SetattrRecursive {
        target: CString,
        attrs: u64,
    },
    Mkdir {
        path: CString,
        mode: libc::mode_t,
    },
    Touch {
        path: CString,
    },
    Symlink {
        target: CString,
        link: CString,
    },
}

/// Everything the child does, prepared.
pub struct Plan {
    ops: Vec<(Op, String)>,
    rootfs: CString,
    hostname: CString,
    uid: libc::uid_t,
    gid: libc::gid_t,
    caps: u64,
    last_cap: u32,
    workdir: CString,
    exec_path: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _env: Vec<CString>,
    env_ptrs: Vec<*const libc::c_char>,
    seccomp: Vec<seccompiler::BpfProgram>,
    /// `cgroup.procs` files the child writes itself into first (see [`Plan::join_cgroup`]).
    cgroup_procs: Vec<CString>,
}

impl Plan {
    /// Has the child move itself into the group whose dirs are `dirs` (writing 0 to each
    /// `cgroup.procs`) right after the clone, before its mounts and before it waits for the
    /// agent. On v1 the first move after a quiet moment waits for an RCU grace period (8 ms
    /// at the median on the CI VM, docs/agent.md); made by the child, that wait overlaps the
    /// agent's network set-up instead of adding to it. The child is in the group before it
    /// execs either way, and a failed move fails the start at that step.
    pub fn join_cgroup(&mut self, dirs: &[PathBuf]) {
        self.cgroup_procs = dirs
            .iter()
            .map(|d| cpath(&d.join("cgroup.procs")))
            .collect();
    }
}

// SAFETY: the raw pointers point into the CStrings owned by the same Plan (never mutated).
unsafe impl Send for Plan {}
// SAFETY: as for Send; nothing in a Plan is mutated after it is built.
unsafe impl Sync for Plan {}

const STEP_PRIVATE: u32 = 1000;
const STEP_PIVOT: u32 = 1001;
const STEP_HOSTNAME: u32 = 1002;
const STEP_GO: u32 = 1003;
const STEP_STDIO: u32 = 1004;
const STEP_FDS: u32 = 1005;
const STEP_NNP: u32 = 1006;
const STEP_CAPBSET: u32 = 1007;
const STEP_GROUPS: u32 = 1008;
const STEP_GID: u32 = 1009;
const STEP_UID: u32 = 1010;
const STEP_CAPS: u32 = 1011;
const STEP_CHDIR: u32 = 1012;
const STEP_SECCOMP: u32 = 1013;
const STEP_EXEC: u32 = 1014;
const STEP_SIGNALS: u32 = 1015;
const STEP_CGROUP: u32 = 1016;
const STEP_RLIMIT: u32 = 1017;

fn cstr(s: impl AsRef<[u8]>) -> Result<CString, SandboxError> {
    CString::new(s.as_ref())
        .map_err(|_| SandboxError::Nul(String::from_utf8_lossy(s.as_ref()).into_owned()))
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("paths built by the agent have no NUL")
}

/// Parses `name:x:uid:gid:...` lines.
fn lookup_id(file: Option<PathBuf>, name: &str) -> Option<(u32, u32)> {
    let text = fs::read_to_string(file?).ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() >= 4 && f[0] == name {
            Some((f[2].parse().ok()?, f[3].parse().ok()?))
        } else {
            None
        }
    })
}

/// Resolves `user[:group]` against the rootfs's /etc/passwd and /etc/group.
pub fn resolve_user(root: &Path, user: Option<&str>) -> Result<(u32, u32), SandboxError> {
    let Some(user) = user.filter(|u| !u.is_empty()) else {
        return Ok((0, 0));
    };
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = || rootfs::resolve_in_root(root, "/etc/passwd");
    let (uid, default_gid) = match u.parse::<u32>() {
        Ok(n) => (n, lookup_by_id(passwd(), n).unwrap_or(n)),
        Err(_) => lookup_id(passwd(), u).ok_or_else(|| SandboxError::UnknownUser(u.into()))?,
    };
    let gid = match g {
        None => default_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => lookup_group(rootfs::resolve_in_root(root, "/etc/group"), g)
                .ok_or_else(|| SandboxError::UnknownGroup(g.into()))?,
        },
    };
    Ok((uid, gid))
}

fn lookup_group(file: Option<PathBuf>, name: &str) -> Option<u32> {
    let text = fs::read_to_string(file?).ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 3 && f[0] == name).then(|| f[2].parse().ok())?
    })
}

fn lookup_by_id(file: Option<PathBuf>, uid: u32) -> Option<u32> {
    let text = fs::read_to_string(file?).ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[2].parse::<u32>().ok()? == uid).then(|| f[3].parse().ok())?
    })
}

fn find_executable(root: &Path, argv0: &str, env: &[String]) -> Result<String, SandboxError> {
    let is_exec = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if argv0.contains('/') {
        return match rootfs::resolve_in_root(root, argv0) {
            Some(p) if is_exec(&p) => Ok(argv0.to_string()),
            _ => Err(SandboxError::NotFound(argv0.into())),
        };
    }
    let path = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for dir in path.split(':').filter(|d| d.starts_with('/')) {
        let cand = format!("{}/{}", dir.trim_end_matches('/'), argv0);
        if rootfs::resolve_in_root(root, &cand).is_some_and(|p| is_exec(&p)) {
            return Ok(cand);
        }
    }
    Err(SandboxError::NotFound(argv0.into()))
}

const PROC_MASKED_FILES: &[&str] = &[
    "kcore",
    "keys",
    "latency_stats",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "sysrq-trigger",
];
const PROC_MASKED_DIRS: &[&str] = &["acpi", "asound", "scsi"];
const PROC_READONLY: &[&str] = &["bus", "fs", "irq", "sys"];
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Prepares the rootfs (mount point dirs, workdir) and builds the child's plan.
pub fn plan(spec: &SandboxSpec) -> Result<Plan, SandboxError> {
    let root = &spec.rootfs;
    for (d, mode) in [
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("tmp", 0o1777),
    ] {
        rootfs::mkdir_in_root(root, Path::new(d), mode)?;
    }
    let workdir = spec.workdir.clone().unwrap_or_else(|| "/".into());
    let (uid, gid) = resolve_user(root, spec.user.as_deref())?;
    if workdir != "/" {
        let dir = rootfs::mkdir_in_root(root, Path::new(&workdir), 0o755)?;
        if uid != 0 {
            let _ = std::os::unix::fs::lchown(&dir, Some(uid), Some(gid));
        }
    }
    let argv0 = spec.argv.first().ok_or(SandboxError::NoCommand)?;
    let exec_path = find_executable(root, argv0, &spec.env)?;

    let r = |rel: &str| cpath(&root.join(rel));
    let mut ops: Vec<(Op, String)> = Vec::new();
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    ops.push((
        Op::Mount {
            src: Some(c"proc".into()),
            target: r("proc"),
            fstype: Some(c"proc".into()),
            flags: nosuid_nodev_noexec,
            data: None,
        },
        "mount /proc".into(),
    ));
    let host_proc = Path::new("/proc");
    for f in PROC_MASKED_FILES {
        if host_proc.join(f).exists() {
            ops.push((
                Op::Mount {
                    src: Some(c"/dev/null".into()),
                    target: r(&format!("proc/{f}")),
                    fstype: None,
                    flags: libc::MS_BIND,
                    data: None,
                },
                format!("mask /proc/{f}"),
            ));
        }
    }
    for d in PROC_MASKED_DIRS {
        if host_proc.join(d).is_dir() {
            ops.push((
                Op::Mount {
                    src: Some(c"tmpfs".into()),
                    target: r(&format!("proc/{d}")),
                    fstype: Some(c"tmpfs".into()),
                    flags: libc::MS_RDONLY | nosuid_nodev_noexec,
                    data: Some(c"size=0".into()),
                },
                format!("mask /proc/{d}"),
            ));
        }
    }
    for d in PROC_READONLY {
        if host_proc.join(d).exists() {
            let t = r(&format!("proc/{d}"));
            ops.push((
                Op::Mount {
                    src: Some(t.clone()),
                    target: t.clone(),
                    fstype: None,
                    flags: libc::MS_BIND | libc::MS_REC,
                    data: None,
                },
                format!("bind /proc/{d}"),
            ));
            ops.push((
                Op::SetattrRecursive {
                    target: t,
                    attrs: sys::MOUNT_ATTR_RDONLY | sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV,
                },
                format!("make /proc/{d} read-only"),
            ));
        }
    }
    ops.push((
        Op::Mount {
            src: Some(c"sysfs".into()),
            target: r("sys"),
            fstype: Some(c"sysfs".into()),
            flags: libc::MS_RDONLY | nosuid_nodev_noexec,
            data: None,
        },
        "mount /sys".into(),
    ));
    if Path::new("/sys/fs/cgroup").is_dir() {
        ops.push((
            Op::Mount {
                src: Some(c"/sys/fs/cgroup".into()),
                target: r("sys/fs/cgroup"),
                fstype: None,
                flags: libc::MS_BIND | libc::MS_REC,
                data: None,
            },
            "bind /sys/fs/cgroup".into(),
        ));
        ops.push((
            Op::SetattrRecursive {
                target: r("sys/fs/cgroup"),
                attrs: sys::MOUNT_ATTR_RDONLY
                    | sys::MOUNT_ATTR_NOSUID
                    | sys::MOUNT_ATTR_NODEV
                    | sys::MOUNT_ATTR_NOEXEC,
            },
            "make /sys/fs/cgroup read-only".into(),
        ));
    }
    ops.push((
        Op::Mount {
            src: Some(c"tmpfs".into()),
            target: r("dev"),
            fstype: Some(c"tmpfs".into()),
            flags: libc::MS_NOSUID | libc::MS_STRICTATIME,
            data: Some(c"mode=755,size=65536k".into()),
        },
        "mount /dev".into(),
    ));
    for d in DEVICES {
        let host = format!("/dev/{d}");
        if !Path::new(&host).exists() {
            continue;
        }
        ops.push((
            Op::Touch {
                path: r(&format!("dev/{d}")),
            },
            format!("create /dev/{d}"),
        ));
        ops.push((
            Op::Mount {
                src: Some(cstr(&host)?),
                target: r(&format!("dev/{d}")),
                fstype: None,
                flags: libc::MS_BIND,
                data: None,
            },
            format!("bind /dev/{d}"),
        ));
    }
    ops.push((
        Op::Mkdir {
            path: r("dev/pts"),
            mode: 0o755,
        },
        "mkdir /dev/pts".into(),
    ));
    ops.push((
        Op::Mount {
            src: Some(c"devpts".into()),
            target: r("dev/pts"),
            fstype: Some(c"devpts".into()),
            flags: libc::MS_NOSUID | libc::MS_NOEXEC,
            data: Some(c"newinstance,ptmxmode=0666,mode=0620".into()),
        },
        "mount /dev/pts".into(),
    ));
    ops.push((
        Op::Mkdir {
            path: r("dev/shm"),
            mode: 0o1777,
        },
        "mkdir /dev/shm".into(),
    ));
    ops.push((
        Op::Mount {
            src: Some(c"shm".into()),
            target: r("dev/shm"),
            fstype: Some(c"tmpfs".into()),
            flags: nosuid_nodev_noexec,
            data: Some(c"mode=1777,size=65536k".into()),
        },
        "mount /dev/shm".into(),
    ));
    for (target, link) in [
        ("pts/ptmx", "dev/ptmx"),
        ("/proc/self/fd", "dev/fd"),
        ("/proc/self/fd/0", "dev/stdin"),
        ("/proc/self/fd/1", "dev/stdout"),
        ("/proc/self/fd/2", "dev/stderr"),
    ] {
        ops.push((
            Op::Symlink {
                target: cstr(target)?,
                link: r(link),
            },
            format!("symlink /{link}"),
        ));
    }
    ops.push((
        Op::Mount {
            src: Some(c"tmpfs".into()),
            target: r("tmp"),
            fstype: Some(c"tmpfs".into()),
            flags: libc::MS_NOSUID | libc::MS_NODEV,
            data: Some(c"mode=1777".into()),
        },
        "mount /tmp".into(),
    ));

    process_plan(spec, ops, uid, gid, &workdir, &exec_path)
}

fn process_plan(
    spec: &SandboxSpec,
    ops: Vec<(Op, String)>,
    uid: u32,
    gid: u32,
    workdir: &str,
    exec_path: &str,
) -> Result<Plan, SandboxError> {
    let argv: Vec<CString> = spec.argv.iter().map(cstr).collect::<Result<_, _>>()?;
    let env: Vec<CString> = spec.env.iter().map(cstr).collect::<Result<_, _>>()?;
    let ptrs = |v: &[CString]| {
        v.iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect::<Vec<_>>()
    };
    let last_cap = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
        // Bounded so that `1u64 << cap` in the child can never overflow (a panic there would
        // take locks).
        .min(63);
    let caps = KEPT_CAPS.iter().fold(0u64, |acc, c| acc | (1u64 << c));
    let mut host = spec.hostname.clone();
    host.truncate(63);
    Ok(Plan {
        ops,
        rootfs: cpath(&spec.rootfs),
        hostname: cstr(&host)?,
        uid,
        gid,
        caps,
        last_cap,
        workdir: cstr(workdir)?,
        exec_path: cstr(exec_path)?,
        argv_ptrs: ptrs(&argv),
        _argv: argv,
        env_ptrs: ptrs(&env),
        _env: env,
        seccomp: crate::seccomp::programs()?,
        cgroup_procs: Vec::new(),
    })
}

/// Capacity of an instance's stdout and stderr pipes.
const LOG_PIPE_BYTES: libc::c_int = 256 << 10;

pub(crate) fn pipe() -> Result<(OwnedFd, OwnedFd), SandboxError> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a 2-int array for pipe2 to fill.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if r != 0 {
        return Err(SandboxError::Os {
            what: "pipe2",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: pipe2 succeeded: both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A sandbox child between clone and exec.
pub struct Spawned {
    pub pid: libc::pid_t,
    go: OwnedFd,
    report: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    steps: Vec<String>,
}

impl Spawned {
    /// Lets the child go on (after cgroup and network setup) and waits until it has exec'd
    /// or failed.
    pub fn release(self) -> Result<(), SandboxError> {
        sys::write_all(self.go.as_raw_fd(), b"g").map_err(|e| SandboxError::Os {
            what: "release sandbox child",
            source: std::io::Error::from_raw_os_error(e),
        })?;
        drop(self.go);
        let mut buf = [0u8; 8];
        let mut got = 0;
        while got < 8 {
            // SAFETY: reading into the unfilled tail of a stack buffer.
            let r = unsafe {
                libc::read(
                    self.report.as_raw_fd(),
                    buf[got..].as_mut_ptr().cast(),
                    8 - got,
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(SandboxError::Os {
                    what: "read sandbox report",
                    source: e,
                });
            }
            if r == 0 {
                break;
            }
            got += r as usize;
        }
        if got == 0 {
            return Ok(());
        }
        let step = u32::from_ne_bytes(buf[..4].try_into().expect("4 bytes"));
        let errno = i32::from_ne_bytes(buf[4..].try_into().expect("4 bytes"));
        Err(SandboxError::Child {
            step: step_name(step, &self.steps),
            source: std::io::Error::from_raw_os_error(errno),
        })
    }
}

fn step_name(step: u32, ops: &[String]) -> String {
    match step {
        STEP_PRIVATE => "make mounts private".into(),
        STEP_PIVOT => "pivot_root".into(),
        STEP_HOSTNAME => "sethostname".into(),
        STEP_GO => "wait for the agent".into(),
        STEP_STDIO => "set up stdio".into(),
        STEP_FDS => "close fds".into(),
        STEP_NNP => "no_new_privs".into(),
        STEP_CAPBSET => "drop bounding capabilities".into(),
        STEP_GROUPS => "setgroups".into(),
        STEP_GID => "setgid".into(),
        STEP_UID => "setuid".into(),
        STEP_CAPS => "capset".into(),
        STEP_CHDIR => "chdir to the working dir".into(),
        STEP_SECCOMP => "install seccomp filter".into(),
        STEP_EXEC => "exec".into(),
        STEP_SIGNALS => "reset signals".into(),
        STEP_RLIMIT => "restore the open-file limit".into(),
        STEP_CGROUP => "join the instance cgroup".into(),
        i => ops
            .get(i as usize)
            .cloned()
            .unwrap_or_else(|| format!("step {i}")),
    }
}

/// Namespaces of a sandbox.
pub const NS_FLAGS: libc::c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC;

/// Stack of a sandbox child (mapped lazily: only the pages it touches cost memory).
const CHILD_STACK: usize = 512 << 10;

/// What the sandbox child reads, in the agent's memory (the child shares it until exec).
/// Nothing in it (the plan included) may own a descriptor: with a private table the cloning
/// thread drops it where the process's descriptors are out of reach, and closing one there
/// would close whatever has that number in the thread's own table.
struct ChildArgs {
    plan: std::sync::Arc<Plan>,
    /// The child's pipe ends, by the numbers the child sees: report, go, out, err, alive.
    fds: [RawFd; 5],
}

/// An anonymous stack mapping with a guard page at its low end.
struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

impl ChildStack {
    fn new(len: usize) -> std::io::Result<ChildStack> {
        // SAFETY: a fresh private anonymous mapping; unmapped in Drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let stack = ChildStack { base, len };
        // SAFETY: the first page of our own mapping.
        if unsafe { libc::mprotect(base, 4096, libc::PROT_NONE) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stack)
    }

    fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of our mapping, which is page-aligned (so 16-byte aligned).
        unsafe { self.base.cast::<u8>().add(self.len).cast() }
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer used (the child has exec'd or exited).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

// SAFETY: the mapping is owned by whoever holds the struct; nothing else refers to it.
unsafe impl Send for ChildStack {}

/// Entry of the sandbox child, on its own stack in the agent's (shared) memory.
extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the ChildArgs the cloning thread keeps alive until we exec or exit.
    let a = unsafe { &*(arg as *const ChildArgs) };
    let [report, go, out, err, alive] = a.fds;
    // Keep only our ends: the agent's ends (so that the agent dying before `release` shows up
    // as EOF) and every other fd (other sandboxes' pipes) go.
    let mut keep = a.fds;
    keep.sort_unstable();
    if let Err(e) = sys::close_all_except(&keep) {
        fail(report, STEP_FDS, e);
    }
    let _ = sys::write_all(alive, b"a");
    child_main(&a.plan, report, go, out, err)
}

/// Clones the sandbox child. It sets up its mounts and then waits for [`Spawned::release`].
///
/// The child shares the agent's memory until it execs (`CLONE_VM | CLONE_VFORK`, as
/// posix_spawn does) instead of getting a copy: a fork-like clone copied the agent's page
/// tables and left every page the agent wrote afterwards to a copy-on-write fault with a
/// TLB-flush IPI, about a third of the CPU when launching hundreds of instances (perf, docs/
/// benchmarks.md). A short-lived thread makes the clone and is suspended until the child has
/// exec'd or exited: the child runs on a stack of its own, uses that thread's thread-local
/// state (errno) while the thread cannot, and starts with every signal blocked, so that no
/// handler of the agent runs on its side (it resets them and unblocks before exec). The
/// kernel writes the child's pid into `pid` before the child runs; the child then says it is
/// alive on a pipe, and this function returns while the child waits for `release`.
///
/// The cloning thread gives itself a private descriptor table first where the kernel allows
/// ([`FdTable::Private`]; see [`spawn_with`]).
pub fn spawn(plan: std::sync::Arc<Plan>) -> Result<Spawned, SandboxError> {
    let table = if sys::private_fd_tables() {
        FdTable::Private
    } else {
        FdTable::Copied
    };
    spawn_with(plan, table)
}

/// Which descriptor table the sandbox child is cloned from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdTable {
    /// A table of the cloning thread's own holding only the child's pipe ends (Linux 5.9+:
    /// `close_range(CLOSE_RANGE_UNSHARE)` and `pidfd_getfd`).
    Private,
    /// The process's whole table, copied by the clone; the child closes all but its ends.
    Copied,
}

/// [`spawn`] with the descriptor table chosen by the caller (tests run both).
pub fn spawn_with(plan: std::sync::Arc<Plan>, table: FdTable) -> Result<Spawned, SandboxError> {
    let (report_r, report_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    for w in [&out_w, &err_w] {
        // Room for what the instance logs while the agent's log thread gathers lines
        // (logs::GATHER); the default 64 KiB would block a chatty instance sooner.
        // Best effort: the kernel may cap it (fs.pipe-max-size).
        // SAFETY: F_SETPIPE_SZ on a pipe we own; no memory is passed.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, LOG_PIPE_BYTES) };
    }
    let (alive_r, alive_w) = pipe()?;
    let steps = plan.ops.iter().map(|(_, d)| d.clone()).collect();
    let ends = [report_w, go_r, out_w, err_w, alive_w];
    let mut args = Box::new(ChildArgs {
        plan,
        fds: ends.each_ref().map(|f| f.as_raw_fd()),
    });
    // With a private table the cloning thread takes copies of the child's ends and says so;
    // the originals are closed here then. Otherwise the child copies the whole table at the
    // clone and the cloning thread closes the originals once the clone returns.
    let private = table == FdTable::Private;
    let (mut here, mut there) = (Some(ends), None);
    if !private {
        there = here.take();
    }
    let (copied_tx, copied_rx) = std::sync::mpsc::sync_channel::<()>(1);
    let os = |what: &'static str| move |e: std::io::Error| SandboxError::Os { what, source: e };
    let stack = ChildStack::new(CHILD_STACK).map_err(os("child stack"))?;
    let pid = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(0));
    let pid_slot = pid.clone();
    let cloner = std::thread::Builder::new()
        .name("sandbox-clone".into())
        .spawn(move || -> Result<(), i32> {
            if private {
                let r = sys::private_fd_table(&mut args.fds);
                let _ = copied_tx.send(());
                // This thread's copies go with it (its table is its own).
                r?;
            }
            // SAFETY: sigset_t values filled by sigfillset before use; pthread_sigmask only
            // changes this thread's mask.
            let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
            unsafe {
                let mut all: libc::sigset_t = std::mem::zeroed();
                libc::sigfillset(&mut all);
                libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            }
            // SAFETY: the child runs `child_entry` on `stack`, reading `args`, both kept alive
            // here until clone returns, which with CLONE_VFORK is after the child's exec or
            // exit. It only makes raw syscalls on prepared data (no allocation, no locks).
            let r = unsafe {
                libc::clone(
                    child_entry,
                    stack.top(),
                    NS_FLAGS
                        | libc::CLONE_VM
                        | libc::CLONE_VFORK
                        | libc::CLONE_PARENT_SETTID
                        | libc::SIGCHLD,
                    (&*args as *const ChildArgs).cast_mut().cast(),
                    pid_slot.as_ptr(),
                )
            };
            let e = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            // SAFETY: restores this thread's own mask.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
            // The child has exec'd or exited: its stack and arguments (and our copies of its
            // pipe ends, so `release` sees EOF on exec) can go.
            if private {
                for fd in args.fds {
                    // SAFETY: closing this thread's own copies, made above.
                    unsafe { libc::close(fd) };
                }
            }
            drop((stack, args, there));
            if r < 0 { Err(e) } else { Ok(()) }
        })
        .map_err(os("sandbox clone thread"))?;
    if private {
        // Sent, or the thread ended without sending: either way it holds its copies or none.
        let _ = copied_rx.recv();
        drop(here.take());
    }
    let mut byte = [0u8; 1];
    // SAFETY: reading one byte into a stack buffer.
    let n = loop {
        let n = unsafe { libc::read(alive_r.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        break n;
    };
    if n != 1 {
        // EOF: the clone failed, or the child ended before it ran.
        let r = cloner.join().unwrap_or(Err(libc::EIO));
        return Err(SandboxError::Os {
            what: "clone",
            source: match r {
                Err(e) => std::io::Error::from_raw_os_error(e),
                Ok(()) => std::io::Error::other("the sandbox child ended before it started"),
            },
        });
    }
    Ok(Spawned {
        pid: pid.load(std::sync::atomic::Ordering::SeqCst),
        go: go_w,
        report: report_r,
        stdout: out_r,
        stderr: err_r,
        steps,
    })
}

fn fail(report: RawFd, step: u32, errno: i32) -> ! {
    let mut buf = [0u8; 8];
    buf[..4].copy_from_slice(&step.to_ne_bytes());
    buf[4..].copy_from_slice(&errno.to_ne_bytes());
    let _ = sys::write_all(report, &buf);
    sys::exit_now(126)
}

fn run_op(op: &Op) -> sys::SysResult {
    match op {
        Op::Mount {
            src,
            target,
            fstype,
            flags,
            data,
        } => sys::mount(
            src.as_deref(),
            target,
            fstype.as_deref(),
            *flags,
            data.as_deref(),
        ),
        Op::SetattrRecursive { target, attrs } => sys::mount_setattr_recursive(target, *attrs),
        Op::Mkdir { path, mode } => sys::mkdir(path, *mode),
        Op::Touch { path } => sys::touch(path),
        Op::Symlink { target, link } => sys::symlink(target, link),
    }
}

/// The child: no allocation, no locks, no panics.
fn child_main(plan: &Plan, report: RawFd, go: RawFd, out: RawFd, err: RawFd) -> ! {
    let ck = |step: u32, r: sys::SysResult| {
        if let Err(e) = r {
            fail(report, step, e);
        }
    };
    // While the host's cgroupfs is still in reach (before pivot_root).
    for procs in &plan.cgroup_procs {
        ck(STEP_CGROUP, sys::write_file(procs, b"0"));
    }
    ck(
        STEP_PRIVATE,
        sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None),
    );
    for (i, (op, _)) in plan.ops.iter().enumerate() {
        ck(i as u32, run_op(op));
    }
    ck(STEP_PIVOT, sys::chdir(&plan.rootfs));
    ck(STEP_PIVOT, sys::pivot_root_dot());
    ck(STEP_PIVOT, sys::umount2(c".", libc::MNT_DETACH));
    ck(STEP_PIVOT, sys::chdir(c"/"));
    ck(STEP_HOSTNAME, sys::sethostname(&plan.hostname));
    match sys::read_byte(go) {
        Ok(true) => {}
        // The agent went away: give up quietly.
        Ok(false) => sys::exit_now(125),
        Err(e) => fail(report, STEP_GO, e),
    }
    finish_child(plan, report, None, out, err)
}

/// Stdio, privileges, seccomp, exec: the common tail of the sandbox child and exec.
fn finish_child(plan: &Plan, report: RawFd, stdin: Option<RawFd>, out: RawFd, err: RawFd) -> ! {
    let ck = |step: u32, r: sys::SysResult| {
        if let Err(e) = r {
            fail(report, step, e);
        }
    };
    let input = match stdin {
        Some(fd) => fd,
        None => match sys::open_rdwr(c"/dev/null") {
            Ok(fd) => fd,
            Err(e) => fail(report, STEP_STDIO, e),
        },
    };
    ck(STEP_STDIO, sys::dup2(input, 0));
    ck(STEP_STDIO, sys::dup2(out, 1));
    ck(STEP_STDIO, sys::dup2(err, 2));
    ck(STEP_FDS, sys::cloexec_from(3));
    ck(STEP_SIGNALS, sys::reset_signals());
    ck(STEP_RLIMIT, sys::restore_nofile());
    ck(STEP_NNP, sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1));
    for cap in 0..=plan.last_cap {
        if plan.caps & (1u64 << cap) == 0 {
            match sys::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong) {
                Ok(()) | Err(libc::EINVAL) => {}
                Err(e) => fail(report, STEP_CAPBSET, e),
            }
        }
    }
    ck(STEP_GROUPS, sys::setgroups(&[plan.gid]));
    ck(STEP_GID, sys::setresgid(plan.gid));
    ck(STEP_UID, sys::setresuid(plan.uid));
    if plan.uid == 0 {
        ck(STEP_CAPS, sys::capset(plan.caps));
    }
    ck(
        STEP_CAPS,
        sys::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        ),
    );
    ck(STEP_CHDIR, sys::chdir(&plan.workdir));
    for p in &plan.seccomp {
        ck(STEP_SECCOMP, sys::seccomp_install(p));
    }
    let e = sys::execve(&plan.exec_path, &plan.argv_ptrs, &plan.env_ptrs);
    fail(report, STEP_EXEC, e)
}

/// What exec needs to join a running sandbox.
#[derive(Debug, Clone)]
pub struct ExecTarget {
    /// The sandbox's init, as the host sees it.
    pub pid: libc::pid_t,
    pub cgroup: crate::cgroup::Cgroup,
    pub env: Vec<String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub rootfs: PathBuf,
}

/// A terminal's size, as `TIOCSWINSZ` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

/// How an exec'd process gets its stdio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecStdio {
    /// Three pipes; `stdin: false` connects stdin to /dev/null.
    Pipes { stdin: bool },
    /// A pseudo-terminal from the instance's own devpts as stdin, stdout and stderr, and the
    /// controlling terminal of a new session.
    Tty(WinSize),
}

/// An exec'd process that has passed exec: its host pid (a helper in the agent's pid
/// namespace whose exit status is the command's) and the agent's ends of its stdio.
pub struct ExecChild {
    pub pid: libc::pid_t,
    /// Where the command's stdin comes from (pipe or pty master); `None` for /dev/null.
    pub stdin: Option<OwnedFd>,
    /// Stdout, or everything the terminal prints with a TTY.
    pub stdout: OwnedFd,
    /// `None` with a TTY: stderr goes to the terminal.
    pub stderr: Option<OwnedFd>,
    /// The pty master, for resizes; `None` without a TTY.
    pub pty: Option<OwnedFd>,
}

impl ExecChild {
    /// Blocks until the command ends; (code, signal).
    pub fn wait(&self) -> std::io::Result<(Option<i32>, Option<i32>)> {
        wait_exec(self.pid)
    }

    /// SIGKILLs the command (the helper's child) and then the helper: for a client that went
    /// away. Processes the command started stay until the instance stops, as with `docker exec`.
    pub fn kill(&self) {
        kill_exec(self.pid);
    }
}

/// See [`ExecChild::kill`]; `pid` is the exec helper.
pub fn kill_exec(pid: libc::pid_t) {
    let path = format!("/proc/{pid}/task/{pid}/children");
    if let Ok(list) = fs::read_to_string(path) {
        for p in list.split_whitespace().filter_map(|p| p.parse().ok()) {
            let _ = sys::kill(p, libc::SIGKILL);
        }
    }
    let _ = sys::kill(pid, libc::SIGKILL);
}

/// Blocks until the exec helper `pid` ends: (code, signal) of the command, which the helper
/// passes on as its exit code (128 + the signal when a signal ended it).
pub fn wait_exec(pid: libc::pid_t) -> std::io::Result<(Option<i32>, Option<i32>)> {
    Ok(match wait(pid)? {
        (Some(c), _) if c > 128 => (None, Some(c - 128)),
        other => other,
    })
}

/// Sets the window size of a pty (the master side).
pub fn set_winsize(pty: &OwnedFd, size: WinSize) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize struct that lives across the call.
    if unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Opens a pty in the devpts instance of the sandbox whose init is `pid` (so `tty` inside
/// names a /dev/pts entry the sandbox has), sized `size`, its terminal owned by `uid:gid`.
/// Returns (master, terminal); both close-on-exec.
fn open_pty(
    pid: libc::pid_t,
    size: WinSize,
    uid: libc::uid_t,
    gid: libc::gid_t,
) -> Result<(OwnedFd, OwnedFd), SandboxError> {
    let os = |what: &'static str| move |e: std::io::Error| SandboxError::Os { what, source: e };
    let master = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(format!("/proc/{pid}/root/dev/pts/ptmx"))
        .map_err(os("open the instance's /dev/pts/ptmx"))?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int; TIOCGPTPEER returns a new fd for the terminal side.
    let peer = unsafe {
        if libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) < 0 {
            return Err(os("unlock pty")(std::io::Error::last_os_error()));
        }
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if peer < 0 {
        return Err(os("open pty peer")(std::io::Error::last_os_error()));
    }
    // SAFETY: TIOCGPTPEER returned a new fd nobody else owns.
    let peer = unsafe { OwnedFd::from_raw_fd(peer) };
    // SAFETY: fchown on an fd we own.
    if unsafe { libc::fchown(peer.as_raw_fd(), uid, gid) } < 0 {
        return Err(os("chown pty")(std::io::Error::last_os_error()));
    }
    let master = OwnedFd::from(master);
    set_winsize(&master, size).map_err(os("size pty"))?;
    Ok((master, peer))
}

/// Starts `argv` inside the sandbox whose init is `pid`: joins its ipc, uts, net, pid and
/// mount namespaces and its cgroup, then drops privileges exactly like the sandbox itself.
/// Returns once the command is exec'd (or with the step that failed).
pub fn spawn_exec(
    target: &ExecTarget,
    argv: &[String],
    stdio: ExecStdio,
) -> Result<ExecChild, SandboxError> {
    let ExecTarget {
        pid,
        cgroup,
        env,
        user,
        workdir,
        rootfs,
    } = target;
    let (pid, user, workdir) = (*pid, user.as_deref(), workdir.as_deref());
    let (uid, gid) = resolve_user(rootfs, user)?;
    let argv0 = argv.first().ok_or(SandboxError::NoCommand)?;
    let exec_path = find_executable(rootfs, argv0, env)?;
    let spec = SandboxSpec {
        rootfs: rootfs.to_path_buf(),
        hostname: String::new(),
        argv: argv.to_vec(),
        env: env.to_vec(),
        workdir: None,
        user: None,
    };
    let plan = process_plan(
        &spec,
        Vec::new(),
        uid,
        gid,
        workdir.unwrap_or("/"),
        &exec_path,
    )?;
    let os = |what: &'static str| move |e: std::io::Error| SandboxError::Os { what, source: e };
    let mut ns = Vec::new();
    for (name, flag) in [
        ("ipc", libc::CLONE_NEWIPC),
        ("uts", libc::CLONE_NEWUTS),
        ("net", libc::CLONE_NEWNET),
        ("pid", libc::CLONE_NEWPID),
        ("mnt", libc::CLONE_NEWNS),
    ] {
        let f = fs::File::open(ns_path(pid, name)).map_err(os("open instance namespace"))?;
        ns.push((OwnedFd::from(f), flag));
    }
    let (report_r, report_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    // The child's stdin, stdout and stderr (None: /dev/null), and the agent's ends.
    let (child_in, child_out, child_err, ours_in, ours_out, ours_err, pty, tty) = match stdio {
        ExecStdio::Tty(size) => {
            let (master, term) = open_pty(pid, size, uid, gid)?;
            let dup = |f: &OwnedFd| f.try_clone().map_err(os("dup pty"));
            let (t_out, t_err) = (dup(&term)?, dup(&term)?);
            let (m_in, m_out) = (dup(&master)?, dup(&master)?);
            (
                Some(term),
                t_out,
                t_err,
                Some(m_in),
                m_out,
                None,
                Some(master),
                true,
            )
        }
        ExecStdio::Pipes { stdin } => {
            let (in_r, in_w) = if stdin {
                let (r, w) = pipe()?;
                (Some(r), Some(w))
            } else {
                (None, None)
            };
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            (in_r, out_w, err_w, in_w, out_r, Some(err_r), None, false)
        }
    };
    let in_fd = child_in.as_ref().map(|f| f.as_raw_fd());
    let mut keep: Vec<RawFd> = [&report_w, &go_r, &child_out, &child_err]
        .iter()
        .map(|f| f.as_raw_fd())
        .chain(in_fd)
        .chain(ns.iter().map(|(f, _)| f.as_raw_fd()))
        .collect();
    keep.sort_unstable();
    // SAFETY: the child only makes raw syscalls on prepared data and ends in _exit or exec.
    let child = unsafe { sys::clone_fork(0) }.map_err(|e| SandboxError::Os {
        what: "fork",
        source: std::io::Error::from_raw_os_error(e),
    })?;
    if child == 0 {
        let report = report_w.as_raw_fd();
        // Only our ends stay (see `spawn`).
        if let Err(e) = sys::close_all_except(&keep) {
            fail(report, STEP_FDS, e);
        }
        for (fd, flag) in &ns {
            if let Err(e) = sys::setns(fd.as_raw_fd(), *flag) {
                fail(report, STEP_GO, e);
            }
        }
        match sys::read_byte(go_r.as_raw_fd()) {
            Ok(true) => {}
            // The agent went away.
            Ok(false) => sys::exit_now(125),
            Err(e) => fail(report, STEP_GO, e),
        }
        // A second fork: only children enter the joined pid namespace.
        // SAFETY: as above.
        match unsafe { sys::clone_fork(0) } {
            Ok(0) => {
                if tty {
                    // A session of its own with the pty as its controlling terminal, so job
                    // control and ^C reach the command.
                    let term = in_fd.unwrap_or(-1);
                    if let Err(e) = sys::setsid().and_then(|()| sys::set_ctty(term)) {
                        fail(report, STEP_STDIO, e);
                    }
                }
                finish_child(
                    &plan,
                    report,
                    in_fd,
                    child_out.as_raw_fd(),
                    child_err.as_raw_fd(),
                )
            }
            Ok(grandchild) => {
                // SAFETY: closing our copies so the agent sees EOF when the grandchild ends.
                unsafe {
                    libc::close(report);
                    libc::close(child_out.as_raw_fd());
                    libc::close(child_err.as_raw_fd());
                    if let Some(fd) = in_fd {
                        libc::close(fd);
                    }
                }
                let mut status = 0;
                loop {
                    // SAFETY: waitpid into a local.
                    if unsafe { libc::waitpid(grandchild, &mut status, 0) } >= 0 {
                        break;
                    }
                    // Only EINTR is worth a retry; anything else (ECHILD) would spin forever.
                    // SAFETY: reading this thread's errno.
                    if unsafe { *libc::__errno_location() } != libc::EINTR {
                        sys::exit_now(127);
                    }
                }
                if libc::WIFSIGNALED(status) {
                    sys::exit_now(128 + libc::WTERMSIG(status));
                }
                sys::exit_now(libc::WEXITSTATUS(status))
            }
            Err(e) => fail(report, STEP_EXEC, e),
        }
    }
    drop((report_w, go_r, child_in, child_out, child_err));
    let kill_child = |e: SandboxError| {
        let _ = sys::kill(child, libc::SIGKILL);
        let _ = wait(child);
        e
    };
    cgroup.add(child).map_err(|e| {
        kill_child(SandboxError::Os {
            what: "join instance cgroup",
            source: std::io::Error::other(e.to_string()),
        })
    })?;
    sys::write_all(go_w.as_raw_fd(), b"g").map_err(|e| {
        kill_child(SandboxError::Os {
            what: "release exec child",
            source: std::io::Error::from_raw_os_error(e),
        })
    })?;
    drop(go_w);
    // EOF once the command is exec'd (the report end is close-on-exec) or failed.
    let mut rep = Vec::new();
    let _ = std::io::Read::read_to_end(&mut fs::File::from(report_r), &mut rep);
    if rep.len() >= 8 {
        let step = u32::from_ne_bytes(rep[..4].try_into().expect("4 bytes"));
        let errno = i32::from_ne_bytes(rep[4..8].try_into().expect("4 bytes"));
        let _ = wait(child);
        return Err(SandboxError::Child {
            step: step_name(step, &[]),
            source: std::io::Error::from_raw_os_error(errno),
        });
    }
    Ok(ExecChild {
        pid: child,
        stdin: ours_in,
        stdout: ours_out,
        stderr: ours_err,
        pty,
    })
}

/// Runs `argv` inside the sandbox whose init is `pid` (see [`spawn_exec`]) with `stdin` as
/// its input; collects stdout and stderr; returns the exit code or signal.
pub fn exec_in(
    target: &ExecTarget,
    argv: &[String],
    stdin: &[u8],
) -> Result<crate::ExecOutput, SandboxError> {
    let child = spawn_exec(target, argv, ExecStdio::Pipes { stdin: true })?;
    let ExecChild {
        pid,
        stdin: in_w,
        stdout,
        stderr,
        pty,
    } = child;
    let input = stdin.to_vec();
    // The writer owns the only write end: the command sees EOF when it is done.
    let writer = std::thread::spawn(move || {
        if let Some(fd) = in_w {
            let _ = std::io::Write::write_all(&mut fs::File::from(fd), &input);
        }
    });
    let read_all = |fd: Option<OwnedFd>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(fd) = fd {
                let _ = std::io::Read::read_to_end(&mut fs::File::from(fd), &mut v);
            }
            v
        })
    };
    let out_t = read_all(Some(stdout));
    let err_t = read_all(stderr);
    let status = wait_exec(pid);
    drop(pty);
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    let _ = writer.join();
    let (code, signal) = status.map_err(|e| SandboxError::Os {
        what: "wait for exec",
        source: e,
    })?;
    Ok(crate::ExecOutput {
        code,
        signal,
        stdout,
        stderr,
    })
}

/// Reads the exit status of `pid` (blocking). Returns (code, signal).
pub fn wait(pid: libc::pid_t) -> std::io::Result<(Option<i32>, Option<i32>)> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status into a local.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        break;
    }
    if libc::WIFEXITED(status) {
        Ok((Some(libc::WEXITSTATUS(status)), None))
    } else if libc::WIFSIGNALED(status) {
        Ok((None, Some(libc::WTERMSIG(status))))
    } else {
        Ok((None, None))
    }
}

/// A pidfd of the child `pid` (Linux 5.3+), for [`wait_pidfd`].
pub fn pidfd(pid: libc::pid_t) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall on integers; the fd is owned right after.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Waits for the child behind `pidfd` to end and reaps it, without a thread: the runtime
/// watches the pidfd, readable once the process has exited, and `waitid(P_PIDFD)` (Linux 5.4+)
/// then collects it. (code, signal) as [`wait`] gives them. A runtime that cannot watch the
/// fd leaves the wait to a blocking thread.
pub async fn wait_pidfd(pidfd: OwnedFd) -> std::io::Result<(Option<i32>, Option<i32>)> {
    use tokio::io::{Interest, unix::AsyncFd};
    // SAFETY: the AsyncFd owns the OwnedFd, so the fd stays open while it is registered.
    match unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) } {
        Ok(afd) => {
            let _ready = afd.readable().await?;
            reap_pidfd(afd.get_ref())
        }
        Err(e) => {
            let (pidfd, cause) = e.into_parts();
            tracing::debug!(error = %cause, "pidfd not watched; waiting on a blocking thread");
            tokio::task::spawn_blocking(move || reap_pidfd(&pidfd))
                .await
                .map_err(std::io::Error::other)?
        }
    }
}

/// `waitid(P_PIDFD, WEXITED)`: blocks until the process has exited, then reaps it.
fn reap_pidfd(pidfd: &OwnedFd) -> std::io::Result<(Option<i32>, Option<i32>)> {
    const P_PIDFD: libc::idtype_t = 3;
    loop {
        // SAFETY: waitid writes a siginfo_t into a zeroed local.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(
                P_PIDFD,
                pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: for a WEXITED result the kernel filled si_status.
        let status = unsafe { info.si_status() };
        return Ok(match info.si_code {
            libc::CLD_EXITED => (Some(status), None),
            libc::CLD_KILLED | libc::CLD_DUMPED => (None, Some(status)),
            _ => (None, None),
        });
    }
}

/// The path of a namespace of `pid`.
pub fn ns_path(pid: libc::pid_t, ns: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/{ns}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_resolve_in_the_image() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::write(
            r.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .unwrap();
        fs::write(r.join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        assert_eq!(resolve_user(r, None).unwrap(), (0, 0));
        assert_eq!(resolve_user(r, Some("app")).unwrap(), (1000, 1001));
        assert_eq!(resolve_user(r, Some("1000")).unwrap(), (1000, 1001));
        assert_eq!(resolve_user(r, Some("2000")).unwrap(), (2000, 2000));
        assert_eq!(resolve_user(r, Some("app:staff")).unwrap(), (1000, 50));
        assert_eq!(resolve_user(r, Some("5:6")).unwrap(), (5, 6));
        assert!(matches!(
            resolve_user(r, Some("nobody")),
            Err(SandboxError::UnknownUser(_))
        ));
    }
}
