//! Privileged operations the sandbox must refuse (`/try?op=...`) and the fork bomb
//! (`/forkbomb?n=N`). Each attempt is harmless when it succeeds: it undoes itself or writes
//! back what was already there, so a run outside a sandbox leaves the host as it was.

use nix::errno::Errno;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The argv[1] that makes the binary sleep instead of serving (children of `/forkbomb` and
/// the default `/try?op=ptrace` target).
pub const SLEEP_CHILD_ARG: &str = "--sleep-child";
pub const TTY_PROBE_ARG: &str = "tty-probe";

/// The window size of the terminal on stdin, as `ROWSxCOLS` (`none` without one).
fn tty_size() -> String {
    let mut ws = nix::libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into a local.
    if unsafe { nix::libc::ioctl(0, nix::libc::TIOCGWINSZ, &mut ws) } == 0 {
        format!("{}x{}", ws.ws_row, ws.ws_col)
    } else {
        "none".into()
    }
}

/// `testapp tty-probe`: see the crate docs.
pub fn tty_probe() -> std::process::ExitCode {
    use std::io::{BufRead, IsTerminal, Write};
    let mut out = std::io::stdout();
    eprintln!("tty-probe: on stderr");
    let _ = writeln!(
        out,
        "isatty stdin={} stdout={} size={}",
        std::io::stdin().is_terminal(),
        out.is_terminal(),
        tty_size()
    );
    let _ = out.flush();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let line = line.trim_end_matches('\r');
        if line == "size" {
            let _ = writeln!(out, "size={}", tty_size());
        } else if let Some(code) = line.strip_prefix("exit ") {
            let _ = out.flush();
            return std::process::ExitCode::from(code.trim().parse::<u8>().unwrap_or(1));
        } else {
            let _ = writeln!(out, "got: {line}");
        }
        let _ = out.flush();
    }
    let _ = writeln!(out, "eof");
    std::process::ExitCode::SUCCESS
}

pub const OPS: [&str; 7] = [
    "mount",
    "ptrace",
    "raw_socket",
    "module",
    "cgroup_write",
    "chroot",
    "sethostname",
];

/// The outcome of one attempt, rendered as `{op, ok, errno, error, detail}`.
#[derive(Debug)]
pub struct Attempt {
    pub op: String,
    pub ok: bool,
    pub errno: Option<i32>,
    pub error: Option<String>,
    pub detail: Value,
}

impl Attempt {
    fn from_result(op: &str, result: Result<Value, Errno>) -> Self {
        match result {
            Ok(detail) => Attempt {
                op: op.into(),
                ok: true,
                errno: None,
                error: None,
                detail,
            },
            Err(e) => Attempt {
                op: op.into(),
                ok: false,
                errno: Some(e as i32),
                error: Some(e.to_string()),
                detail: Value::Null,
            },
        }
    }

    fn failed(op: &str, error: String, detail: Value) -> Self {
        Attempt {
            op: op.into(),
            ok: false,
            errno: None,
            error: Some(error),
            detail,
        }
    }

    pub fn to_json(&self) -> Value {
        json!({ "op": self.op, "ok": self.ok, "errno": self.errno, "error": self.error, "detail": self.detail })
    }
}

fn io_errno(e: &std::io::Error) -> Errno {
    e.raw_os_error()
        .map(Errno::from_raw)
        .unwrap_or(Errno::UnknownErrno)
}

/// Spawns a copy of this binary that only sleeps.
pub fn spawn_sleeper() -> std::io::Result<Child> {
    // Without /proc (an empty rootfs) fall back to argv[0], which the runtime set to the path
    // it executed.
    let exe = std::env::current_exe()
        .ok()
        .or_else(|| std::env::args_os().next().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
    // The sleeper never writes; without /dev/null (an empty rootfs) it shares our streams.
    let stdio = || {
        if Path::new("/dev/null").exists() {
            Stdio::null()
        } else {
            Stdio::inherit()
        }
    };
    Command::new(exe)
        .arg(SLEEP_CHILD_ARG)
        .stdin(stdio())
        .stdout(stdio())
        .stderr(stdio())
        .spawn()
}

fn reap(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Attempts `op`; `pid` is the ptrace target (default: a freshly spawned sleeping child).
pub fn attempt(op: &str, pid: Option<i32>) -> Attempt {
    match op {
        "mount" => Attempt::from_result(op, try_mount()),
        "ptrace" => try_ptrace(pid),
        "raw_socket" => Attempt::from_result(op, try_raw_socket()),
        "module" => Attempt::from_result(op, try_module()),
        "cgroup_write" => try_cgroup_write(),
        "chroot" => {
            Attempt::from_result(op, nix::unistd::chroot("/").map(|()| json!({"path": "/"})))
        }
        "sethostname" => Attempt::from_result(op, try_sethostname()),
        other => Attempt::failed(
            other,
            format!("unknown op {other:?}; expected one of {}", OPS.join(", ")),
            Value::Null,
        ),
    }
}

fn try_mount() -> Result<Value, Errno> {
    use nix::mount::{MsFlags, mount, umount};
    let dir = std::env::temp_dir().join(format!("testapp-mount-{}", std::process::id()));
    if std::fs::create_dir_all(&dir).is_err() {
        // No writable /tmp: bind "/" onto itself instead (the view stays the same while it is
        // mounted), so the kernel still gets to refuse the mount itself rather than the mkdir.
        let result = mount(Some("/"), "/", None::<&str>, MsFlags::MS_BIND, None::<&str>);
        if result.is_ok() {
            let _ = umount("/");
        }
        return result.map(|()| json!({ "target": "/", "fs_type": "bind" }));
    }
    let result = mount(
        Some("tmpfs"),
        &dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("size=64k"),
    );
    if result.is_ok() {
        let _ = umount(&dir);
    }
    let _ = std::fs::remove_dir(&dir);
    result.map(|()| json!({ "target": dir.display().to_string(), "fs_type": "tmpfs" }))
}

fn try_ptrace(pid: Option<i32>) -> Attempt {
    use nix::sys::ptrace;
    use nix::unistd::Pid;
    let (target, child) = match pid {
        Some(p) => (Pid::from_raw(p), None),
        None => match spawn_sleeper() {
            Ok(c) => (Pid::from_raw(c.id() as i32), Some(c)),
            Err(e) => {
                eprintln!("testapp: ptrace: cannot spawn a target ({e}); using the parent");
                (nix::unistd::getppid(), None)
            }
        },
    };
    let result = ptrace::attach(target).map(|()| {
        // Wait for the attach stop, then let the tracee go again.
        let _ = nix::sys::wait::waitpid(target, Some(nix::sys::wait::WaitPidFlag::__WALL));
        let _ = ptrace::detach(target, None);
        json!({ "pid": target.as_raw() })
    });
    if let Some(c) = child {
        reap(c);
    }
    let mut a = Attempt::from_result("ptrace", result);
    if a.detail.is_null() {
        a.detail = json!({ "pid": target.as_raw() });
    }
    a
}

fn try_raw_socket() -> Result<Value, Errno> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Icmp,
    )?;
    drop(fd);
    Ok(json!({ "family": "AF_INET", "type": "SOCK_RAW", "protocol": "IPPROTO_ICMP" }))
}

fn try_module() -> Result<Value, Errno> {
    // An empty image can never load: success is impossible, and the errno says whether the
    // kernel got as far as parsing it (ENOEXEC/EINVAL = allowed) or refused it (EPERM).
    match nix::kmod::init_module(&[], c"") {
        Ok(()) => Ok(json!({ "syscall": "init_module" })),
        Err(e) => Err(e),
    }
}

fn try_sethostname() -> Result<Value, Errno> {
    let current = nix::unistd::gethostname()?;
    nix::unistd::sethostname(&current)?;
    Ok(json!({ "hostname": current.to_string_lossy() }))
}

fn try_cgroup_write() -> Attempt {
    let root = Path::new("/sys/fs/cgroup");
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let files = crate::sysinfo::cgroup_limit_files(root, &own);
    let Some(file) = files.first() else {
        return Attempt::failed(
            "cgroup_write",
            "no cgroup limit file found under /sys/fs/cgroup".into(),
            Value::Null,
        );
    };
    let current = match std::fs::read_to_string(file) {
        Ok(s) => s.trim().to_string(),
        Err(e) => return Attempt::from_result("cgroup_write", Err(io_errno(&e))),
    };
    // Writing back the current value: proves write access without changing the limit.
    let result = std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .and_then(|mut f| std::io::Write::write_all(&mut f, current.as_bytes()))
        .map_err(|e| io_errno(&e))
        .map(|()| Value::Null);
    let mut a = Attempt::from_result("cgroup_write", result);
    a.detail = json!({ "file": file.display().to_string(), "value": current });
    a
}

/// Forks up to `n` sleeping children, counts how many started, then kills and reaps them all.
pub fn forkbomb(n: u64) -> Value {
    let mut children = Vec::new();
    let mut first_error = None;
    for _ in 0..n {
        match spawn_sleeper() {
            Ok(c) => children.push(c),
            Err(e) => {
                first_error = Some(json!({ "errno": e.raw_os_error(), "error": e.to_string() }));
                break;
            }
        }
    }
    let started = children.len();
    for c in children {
        reap(c);
    }
    json!({ "requested": n, "started": started, "error": first_error })
}
