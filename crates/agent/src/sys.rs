//! The raw syscalls of the sandbox, in one place. Functions here take pre-built C strings and
//! return the errno on failure; they never allocate, so the sandbox child (forked from a
//! multi-threaded process) may call them between clone and exec.

use std::ffi::CStr;
use std::os::fd::RawFd;
use std::sync::OnceLock;

pub type SysResult<T = ()> = Result<T, i32>;

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn check(r: libc::c_int) -> SysResult {
    if r < 0 { Err(errno()) } else { Ok(()) }
}

fn opt_ptr(s: Option<&CStr>) -> *const libc::c_char {
    s.map_or(std::ptr::null(), CStr::as_ptr)
}

pub fn mount(
    src: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> SysResult {
    // SAFETY: all pointers are NUL-terminated strings or null, valid for the call.
    check(unsafe {
        libc::mount(
            opt_ptr(src),
            target.as_ptr(),
            opt_ptr(fstype),
            flags,
            opt_ptr(data).cast(),
        )
    })
}

pub fn umount2(target: &CStr, flags: libc::c_int) -> SysResult {
    // SAFETY: `target` is a valid C string.
    check(unsafe { libc::umount2(target.as_ptr(), flags) })
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `mount_setattr(path, AT_RECURSIVE, attr_set)`: e.g. makes a whole bind tree read-only.
pub fn mount_setattr_recursive(target: &CStr, attr_set: u64) -> SysResult {
    let attr = MountAttr {
        attr_set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `target` is a valid C string and `attr` a valid mount_attr of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            target.as_ptr(),
            libc::AT_RECURSIVE as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 { Err(errno()) } else { Ok(()) }
}

pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
pub const MOUNT_ATTR_NOEXEC: u64 = 0x8;

pub fn pivot_root_dot() -> SysResult {
    let dot = c".";
    // SAFETY: valid C strings.
    let r = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    if r < 0 { Err(errno()) } else { Ok(()) }
}

pub fn chdir(p: &CStr) -> SysResult {
    // SAFETY: valid C string.
    check(unsafe { libc::chdir(p.as_ptr()) })
}

pub fn mkdir(p: &CStr, mode: libc::mode_t) -> SysResult {
    // SAFETY: valid C string.
    match check(unsafe { libc::mkdir(p.as_ptr(), mode) }) {
        Err(libc::EEXIST) => Ok(()),
        r => r,
    }
}

pub fn symlink(target: &CStr, link: &CStr) -> SysResult {
    // SAFETY: valid C strings.
    check(unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) })
}

/// Creates an empty regular file (a bind-mount target).
pub fn touch(p: &CStr) -> SysResult {
    // SAFETY: valid C string; the returned fd is closed at once.
    let fd = unsafe {
        libc::open(
            p.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            0o644,
        )
    };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: `fd` was just opened by us.
    unsafe { libc::close(fd) };
    Ok(())
}

/// Sets `O_NONBLOCK` on `fd` (on its open file description: every descriptor of it).
pub fn set_nonblocking(fd: RawFd) -> SysResult {
    // SAFETY: fcntl with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(errno());
    }
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })
}

pub fn sethostname(name: &CStr) -> SysResult {
    // SAFETY: pointer and length describe `name`'s bytes.
    check(unsafe { libc::sethostname(name.as_ptr(), name.to_bytes().len()) })
}

pub fn read_byte(fd: RawFd) -> SysResult<bool> {
    let mut b = [0u8; 1];
    loop {
        // SAFETY: reading into a 1-byte stack buffer.
        let r = unsafe { libc::read(fd, b.as_mut_ptr().cast(), 1) };
        if r < 0 {
            let e = errno();
            if e == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        return Ok(r == 1);
    }
}

pub fn write_all(fd: RawFd, data: &[u8]) -> SysResult {
    let mut off = 0;
    while off < data.len() {
        // SAFETY: the pointer and length describe the unwritten tail of `data`.
        let r = unsafe { libc::write(fd, data[off..].as_ptr().cast(), data.len() - off) };
        if r < 0 {
            let e = errno();
            if e == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        off += r as usize;
    }
    Ok(())
}

pub fn open_rdwr(p: &CStr) -> SysResult<RawFd> {
    // SAFETY: valid C string.
    let fd = unsafe { libc::open(p.as_ptr(), libc::O_RDWR) };
    if fd < 0 { Err(errno()) } else { Ok(fd) }
}

/// Writes `data` to the existing file `p` (one write; for cgroup and proc files).
pub fn write_file(p: &CStr, data: &[u8]) -> SysResult {
    // SAFETY: valid C string; the fd is closed below.
    let fd = unsafe { libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(errno());
    }
    let r = write_all(fd, data);
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    r
}

pub fn dup2(from: RawFd, to: RawFd) -> SysResult {
    // SAFETY: dup2 on fds; an invalid fd yields EBADF.
    check(unsafe { libc::dup2(from, to) })
}

/// Marks every fd >= `from` close-on-exec.
pub fn cloexec_from(from: u32) -> SysResult {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only changes fd flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            from,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r < 0 { Err(errno()) } else { Ok(()) }
}

pub fn prctl(op: libc::c_int, a: libc::c_ulong) -> SysResult {
    // SAFETY: prctl options used here take integer arguments only.
    check(unsafe {
        libc::prctl(
            op,
            a,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    })
}

// setgroups/setresgid/setresuid go straight to the kernel: glibc's wrappers run its "setxid"
// broadcast to every thread it believes exists, and in a cloned child of a multi-threaded
// process those threads do not exist, so the wrapper waits on a futex forever.

pub fn setgroups(groups: &[libc::gid_t]) -> SysResult {
    // SAFETY: pointer and length describe `groups`; a raw syscall touches no libc state.
    check(
        unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) } as libc::c_int,
    )
}

pub fn setresgid(g: libc::gid_t) -> SysResult {
    // SAFETY: plain integer syscall.
    check(unsafe { libc::syscall(libc::SYS_setresgid, g, g, g) } as libc::c_int)
}

pub fn setresuid(u: libc::uid_t) -> SysResult {
    // SAFETY: plain integer syscall.
    check(unsafe { libc::syscall(libc::SYS_setresuid, u, u, u) } as libc::c_int)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Sets effective = permitted = `caps`, inheritable = none.
pub fn capset(caps: u64) -> SysResult {
    let mut h = CapHeader {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let lo = caps as u32;
    let hi = (caps >> 32) as u32;
    let d = [
        CapData {
            effective: lo,
            permitted: lo,
            inheritable: 0,
        },
        CapData {
            effective: hi,
            permitted: hi,
            inheritable: 0,
        },
    ];
    // SAFETY: header and two data structs of the v3 layout, valid for the call.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut h as *mut CapHeader, d.as_ptr()) };
    if r < 0 { Err(errno()) } else { Ok(()) }
}

/// Installs a seccomp filter (no_new_privs must be set).
pub fn seccomp_install(prog: &[seccompiler::sock_filter]) -> SysResult {
    let fprog = libc::sock_fprog {
        len: prog.len() as libc::c_ushort,
        // seccompiler's sock_filter is repr(C) with libc's layout.
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `fprog` points at `prog`, which outlives the call; the kernel copies it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            1 as libc::c_ulong, // SECCOMP_SET_MODE_FILTER
            0 as libc::c_ulong,
            &fprog as *const libc::sock_fprog,
        )
    };
    if r < 0 { Err(errno()) } else { Ok(()) }
}

pub fn execve(path: &CStr, argv: &[*const libc::c_char], envp: &[*const libc::c_char]) -> i32 {
    // SAFETY: argv/envp are NULL-terminated arrays of pointers to C strings that the caller
    // keeps alive; execve only returns on failure.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    errno()
}

pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit ends the process without running atexit handlers or destructors, the only
    // safe way out of a forked child of a multi-threaded process.
    unsafe { libc::_exit(code) }
}

/// A fork-like clone into new namespaces: returns 0 in the child, its pid in the parent.
///
/// # Safety
/// The caller is multi-threaded: in the child only async-signal-safe work (raw syscalls on
/// pre-built data, no allocation, no locks) may happen before exec or `_exit`.
pub unsafe fn clone_fork(flags: libc::c_int) -> SysResult<libc::pid_t> {
    // SAFETY: with a null stack pointer, clone behaves like fork (the child runs on a copy of
    // the caller's stack); the caller upholds the child-side rules above.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if r < 0 {
        Err(errno())
    } else {
        Ok(r as libc::pid_t)
    }
}

/// A new session with the caller as its leader (and no controlling terminal yet).
pub fn setsid() -> SysResult {
    // SAFETY: plain syscall without arguments.
    check(unsafe { libc::setsid() })
}

/// Makes the terminal `fd` the controlling terminal of the caller's session.
pub fn set_ctty(fd: RawFd) -> SysResult {
    // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal from another session).
    check(unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0) })
}

pub fn setns(fd: RawFd, nstype: libc::c_int) -> SysResult {
    // SAFETY: setns on an fd; a bad fd yields EBADF.
    check(unsafe { libc::setns(fd, nstype) })
}

pub fn kill(pid: libc::pid_t, sig: libc::c_int) -> SysResult {
    // SAFETY: plain integer syscall.
    check(unsafe { libc::kill(pid, sig) })
}

/// The kernel's `struct sigaction` for rt_sigaction on x86_64 and aarch64 (not glibc's).
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// Restores default signal handling for exec: every signal's disposition to SIG_DFL (exec
/// resets handled signals but keeps ignored ones, like the SIGPIPE Rust's runtime ignores)
/// and an empty signal mask. Raw syscalls only: glibc's wrappers are no-lock today, but the
/// child must not depend on that.
pub fn reset_signals() -> SysResult {
    let dfl = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: `dfl` is a valid kernel sigaction of the size passed; SIG_DFL installs no
        // handler code. Signals the kernel refuses (EINVAL) are skipped.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig as libc::c_long,
                &dfl as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                8usize,
            )
        };
    }
    let empty: u64 = 0;
    // SAFETY: a valid 8-byte kernel sigset, no old set requested.
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK as libc::c_long,
            &empty as *const u64,
            std::ptr::null_mut::<u64>(),
            8usize,
        )
    };
    if r < 0 { Err(errno()) } else { Ok(()) }
}

/// Closes every fd >= 3 except those in `keep` (sorted ascending, each >= 3), so that the
/// child of a clone holds no other sandbox's pipe ends: a sibling sandbox cloned meanwhile
/// must never keep this one's release pipe open (the child would then not see EOF when the
/// agent dies) nor its report pipe (the agent would wait for the sibling's exec).
pub fn close_all_except(keep: &[RawFd]) -> SysResult {
    let mut lo: u32 = 3;
    for &k in keep {
        let k = k as u32;
        if k < lo {
            continue;
        }
        if k > lo {
            close_range(lo, k - 1)?;
        }
        lo = k + 1;
    }
    close_range(lo, u32::MAX)
}

/// Gives the calling thread a descriptor table of its own that holds stdin, stdout, stderr and
/// duplicates of `fds` (taken from the process's shared table through a pidfd of the process),
/// and replaces each of `fds` by its new, low number. Nothing else is copied: a child cloned
/// from this thread starts with a table of a few entries instead of a copy of the agent's,
/// which holds several descriptors per running instance and which the child would otherwise
/// close one by one (about a tenth of the CPU of launching with thousands running, perf).
///
/// Only for a thread of its own that ends soon after: it can no longer reach the process's
/// descriptors (closing one of `fds`' old numbers here would close something else). On an
/// error the thread's table may already be private; the process's is untouched.
pub fn private_fd_table(fds: &mut [RawFd]) -> SysResult {
    // CLOSE_RANGE_UNSHARE with a range open to the end copies only the descriptors below it.
    // SAFETY: close_range on this thread's own (new) table; the process's is not changed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_UNSHARE,
        )
    };
    if r < 0 {
        return Err(errno());
    }
    // SAFETY: plain syscalls on integers; the pidfd is closed below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if pidfd < 0 {
        return Err(errno());
    }
    let mut res = Ok(());
    for fd in fds.iter_mut() {
        // SAFETY: as above; the new descriptor is close-on-exec, as the originals are.
        let n = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, *fd, 0) };
        if n < 0 {
            res = Err(errno());
            break;
        }
        *fd = n as RawFd;
    }
    // SAFETY: closing the pidfd opened above.
    unsafe { libc::close(pidfd as RawFd) };
    res
}

/// Whether [`private_fd_table`] works here (Linux 5.9 or later, no policy against it), tried
/// once on a thread of its own.
pub fn private_fd_tables() -> bool {
    static WORKS: OnceLock<bool> = OnceLock::new();
    *WORKS.get_or_init(|| {
        use std::os::fd::AsRawFd;
        let Ok((r, w)) = crate::sandbox::pipe() else {
            return false;
        };
        let w = w.as_raw_fd();
        // The thread writes a byte through its copy of the write end; it is read back here.
        let wrote = std::thread::spawn(move || {
            let mut mine = [w];
            // SAFETY: one byte from a static buffer into the thread's own copy.
            private_fd_table(&mut mine).is_ok()
                && unsafe { libc::write(mine[0], b"x".as_ptr().cast(), 1) } == 1
        })
        .join()
        .unwrap_or(false);
        let mut b = [0u8; 1];
        // SAFETY: one byte into a stack buffer; read only when the thread wrote one, so it
        // does not block.
        wrote && unsafe { libc::read(r.as_raw_fd(), b.as_mut_ptr().cast(), 1) } == 1 && b[0] == b'x'
    })
}

fn close_range(lo: u32, hi: u32) -> SysResult {
    // SAFETY: close_range only closes descriptors; the caller owns its descriptor table.
    let r = unsafe { libc::syscall(libc::SYS_close_range, lo, hi, 0 as libc::c_uint) };
    if r < 0 { Err(errno()) } else { Ok(()) }
}

/// What the agent raises the host's `kernel.pid_max` to: the kernel's ceiling on 64-bit, which
/// systemd also sets at boot.
pub const PID_MAX: u64 = 1 << 22;

/// Raises `kernel.pid_max` to [`PID_MAX`] when it is lower (never lowers it). Every thread of
/// every instance takes a pid: at the kernel's default of 32,768 (machines with up to 32 CPUs)
/// a node with a few thousand instances of a few threads each runs out, and starts fail with
/// EAGAIN from clone. Returns the value before and after; an error when it cannot be read or
/// written (no such file in a container's read-only /proc/sys, no privilege).
pub fn raise_pid_max() -> std::io::Result<(u64, u64)> {
    let path = "/proc/sys/kernel/pid_max";
    let cur: u64 = std::fs::read_to_string(path)?
        .trim()
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    if cur >= PID_MAX {
        return Ok((cur, cur));
    }
    std::fs::write(path, PID_MAX.to_string())?;
    Ok((cur, PID_MAX))
}

/// The open-file limit (soft, hard) instances get: what the agent's process had before it
/// raised its own ([`raise_nofile`]). Set once, before any child is spawned; a child only
/// reads it.
static INSTANCE_NOFILE: OnceLock<(u64, u64)> = OnceLock::new();

/// The open-file ceiling the agent raises itself to when it may (`CAP_SYS_RESOURCE`).
const AGENT_NOFILE: u64 = 1 << 20;

fn set_nofile(soft: u64, hard: u64) -> SysResult {
    let l = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct it is given.
    check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) })
}

/// Raises this process's open-file limit: a node holds a few descriptors per instance (its
/// log pipes, its pidfd), and the usual 1,024 (or a container's 20,000) runs out long before
/// memory does. The soft limit goes to the hard one, and the hard one to min(`fs.nr_open`,
/// 2^20) when allowed. What the process had is kept for instances ([`restore_nofile`]).
/// Returns the new soft limit.
pub fn raise_nofile() -> std::io::Result<u64> {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The first agent of the process records what the process started with.
    INSTANCE_NOFILE.get_or_init(|| (cur.rlim_cur, cur.rlim_max));
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(AGENT_NOFILE);
    let want = cur.rlim_max.max(AGENT_NOFILE.min(nr_open));
    if set_nofile(want, want).is_ok() {
        return Ok(want);
    }
    set_nofile(cur.rlim_max, cur.rlim_max).map_err(std::io::Error::from_raw_os_error)?;
    Ok(cur.rlim_max)
}

/// The open-file limit (soft, hard) instances get; (0, 0) before an agent ran.
pub fn instance_nofile() -> (u64, u64) {
    INSTANCE_NOFILE.get().copied().unwrap_or((0, 0))
}

/// In a sandbox or exec child: back to the open-file limit the agent's process started with.
pub fn restore_nofile() -> SysResult {
    match INSTANCE_NOFILE.get() {
        Some(&(soft, hard)) => set_nofile(soft, hard),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    fn open_fds(n: usize) -> Vec<OwnedFd> {
        (0..n)
            .map(|_| {
                // SAFETY: opening /dev/null; the fd is owned right after.
                let fd =
                    unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
                assert!(fd >= 0);
                // SAFETY: a fresh fd we own.
                unsafe { OwnedFd::from_raw_fd(fd) }
            })
            .collect()
    }

    #[test]
    fn a_private_table_holds_only_stdio_and_the_copies() {
        assert!(
            private_fd_tables(),
            "this kernel has close_range and pidfd_getfd"
        );
        let many = open_fds(300);
        let wanted = [many[150].as_raw_fd(), many[299].as_raw_fd()];
        let (copies, open_in_thread, shared_seen) = std::thread::spawn(move || {
            let mut fds = wanted;
            private_fd_table(&mut fds).unwrap();
            // SAFETY: fcntl(F_GETFD) only reads a flag.
            let is_open = |fd: RawFd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
            let open: Vec<RawFd> = (0..1024).filter(|&fd| is_open(fd)).collect();
            (fds, open, wanted.map(is_open))
        })
        .join()
        .unwrap();
        // The copies are new, low numbers; the thread's table has nothing else above stdio.
        assert!(copies.iter().all(|&fd| (3..8).contains(&fd)), "{copies:?}");
        let above_stdio: Vec<RawFd> = open_in_thread
            .iter()
            .copied()
            .filter(|&fd| fd > 2)
            .collect();
        assert_eq!(above_stdio, copies.to_vec());
        // The originals' numbers are not in the thread's table (unless reused by a copy).
        assert_eq!(shared_seen, [false, false]);
        // The process's table is untouched: every one of the 300 is still open here.
        for f in &many {
            // SAFETY: as above.
            assert!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFD) } >= 0);
        }
    }
}
