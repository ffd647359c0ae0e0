//! Instances' stdout and stderr into their log files, from one thread for the whole agent.
//!
//! Each pipe is in a level-triggered epoll set of this thread. A round reads every pipe that
//! has data, writes each pipe's whole lines to its log in one write, then sleeps for
//! [`GATHER`] before it waits again. An instance that logs a line per request therefore costs
//! the agent a few wake-ups a second, not one per line: on the tokio runtime the pipes were
//! edge-triggered, and every line an instance wrote woke a runtime thread out of `epoll_wait`
//! (17,600 times a second with wrk at 64 connections straight to one instance, strace), even
//! while the reader waited between reads, and those were the threads serving the gateway.
//! While the thread sleeps, an instance's pipe (256 KiB, `sandbox::LOG_PIPE_BYTES`) holds what
//! it writes.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The pause after a round: the most a line waits before it reaches the log.
const GATHER: Duration = Duration::from_millis(5);
/// A log file nothing was written to for this long is closed (reopened at the next line).
const IDLE_CLOSE: Duration = Duration::from_secs(10);
/// How often the thread looks for such files, at the latest.
const SWEEP: Duration = Duration::from_secs(1);
/// How much is read from a pipe at once.
const READ: usize = 128 << 10;
/// A line longer than this goes out in pieces of this size.
const MAX_LINE: usize = 64 << 10;

/// An instance's log file, open only while the instance writes to it: an idle instance costs
/// the agent no descriptor for its log (thousands of idle instances otherwise held thousands
/// of files open, a quarter of the agent's descriptors; docs/agent.md).
///
/// The file is capped: a write that would take it past `max_bytes` first renames it to
/// `<path>.1` (replacing the one before) and starts a new one, so an instance keeps at most
/// twice the cap on disk however much it prints. Output that cannot be written (a full disk,
/// the directory gone) is counted, logged once by the agent, and noted in the log as a
/// `ferry` line once writing works again.
pub(crate) struct LogFile {
    path: PathBuf,
    max_bytes: u64,
    state: Mutex<WriteState>,
}

#[derive(Default)]
struct WriteState {
    open: Option<Open>,
    /// Bytes of output dropped since the last write that worked, and why.
    lost: u64,
    error: String,
}

struct Open {
    file: File,
    len: u64,
    at: Instant,
}

impl LogFile {
    /// Creates the file (or keeps what it holds) and closes it again.
    pub(crate) fn create(path: &Path, max_bytes: u64) -> std::io::Result<Arc<LogFile>> {
        open_append(path)?;
        Ok(Arc::new(LogFile {
            path: path.to_path_buf(),
            max_bytes,
            state: Mutex::default(),
        }))
    }

    /// Appends `data` (whole lines stamped `ts`), rotating first when the file is full.
    pub(crate) fn write(&self, data: &[u8], ts: &str) {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let r = if g.lost == 0 {
            g.append(&self.path, self.max_bytes, data)
        } else {
            let mut buf = Vec::with_capacity(data.len() + 128);
            let note = format!("{} bytes of output lost: {}", g.lost, g.error);
            push_line(&mut buf, ts, "ferry", note.as_bytes());
            buf.extend_from_slice(data);
            g.append(&self.path, self.max_bytes, &buf)
        };
        match r {
            Ok(()) if g.lost > 0 => {
                tracing::info!(log = %self.path.display(), lost_bytes = g.lost, "instance log writable again");
                g.lost = 0;
                g.error.clear();
            }
            Ok(()) => {}
            Err(e) => {
                if g.lost == 0 {
                    tracing::warn!(
                        log = %self.path.display(),
                        error = %e,
                        "instance output lost: its log cannot be written"
                    );
                }
                g.lost += data.len() as u64;
                g.error = e.to_string();
            }
        }
    }

    /// Closes the file if nothing was written to it for `idle`.
    fn close_if_idle(&self, now: Instant, idle: Duration) {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if g.open
            .as_ref()
            .is_some_and(|o| now.saturating_duration_since(o.at) >= idle)
        {
            g.open = None;
        }
    }

    #[cfg(test)]
    fn is_open(&self) -> bool {
        self.state.lock().unwrap().open.is_some()
    }
}

impl WriteState {
    /// Appends `data` (whole lines), rotating where the next line would take the file past
    /// `max_bytes`: a file passes the cap only when it holds one line longer than it. On an
    /// error the file is closed, so the next write opens it afresh.
    fn append(&mut self, path: &Path, max_bytes: u64, data: &[u8]) -> std::io::Result<()> {
        let mut open = match self.open.take() {
            Some(o) => o,
            None => {
                let file = open_append(path)?;
                let len = file.metadata()?.len();
                Open {
                    file,
                    len,
                    at: Instant::now(),
                }
            }
        };
        let mut rest = data;
        while !rest.is_empty() {
            let room = usize::try_from(max_bytes.saturating_sub(open.len)).unwrap_or(usize::MAX);
            let take = if rest.len() <= room {
                rest.len()
            } else {
                match rest[..room].iter().rposition(|&b| b == b'\n') {
                    Some(i) => i + 1,
                    // Not even one line fits an empty file: it gets that line alone.
                    None if open.len == 0 => rest
                        .iter()
                        .position(|&b| b == b'\n')
                        .map_or(rest.len(), |i| i + 1),
                    None => 0,
                }
            };
            if take == 0 {
                drop(open);
                std::fs::rename(path, rotated(path))?;
                open = Open {
                    file: open_append(path)?,
                    len: 0,
                    at: Instant::now(),
                };
                continue;
            }
            (&open.file).write_all(&rest[..take])?;
            open.len += take as u64;
            rest = &rest[take..];
        }
        open.at = Instant::now();
        self.open = Some(open);
        Ok(())
    }
}

/// Where a full log goes: `<path>.1`.
pub(crate) fn rotated(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// An instance's log file under an agent's data dir: lines `<RFC 3339> stdout|stderr <line>`.
pub(crate) fn log_path(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join("logs").join(format!("{id}.log"))
}

/// Opens an instance's log as it stands: the rotated file, if there is one, and the current
/// one, as a pair that follow each other (opened again if the log rotates in between).
pub(crate) fn open_log(path: &Path) -> std::io::Result<(Option<File>, File)> {
    use std::os::unix::fs::MetadataExt;
    let older_path = rotated(path);
    for _ in 0..16 {
        let older = match File::open(&older_path) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let current = File::open(path)?;
        let older_ino = match &older {
            Some(f) => Some(f.metadata()?.ino()),
            None => None,
        };
        // Unchanged since it was opened: no rotation came between the two opens.
        if std::fs::metadata(&older_path).ok().map(|m| m.ino()) == older_ino {
            return Ok((older, current));
        }
    }
    Err(std::io::Error::other(format!(
        "{}: rotated on every attempt to open it",
        path.display()
    )))
}

/// Removes the logs in `dir` of instances `running` does not name whose last write is older
/// than `retention`; returns how many files went.
pub(crate) fn sweep(
    dir: &Path,
    retention: Duration,
    running: impl Fn(&str) -> bool,
) -> std::io::Result<usize> {
    let now = std::time::SystemTime::now();
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(id) = name
            .strip_suffix(".log")
            .or_else(|| name.strip_suffix(".log.1"))
        else {
            continue;
        };
        if running(id) {
            continue;
        }
        let Ok(modified) = entry.metadata().and_then(|m| m.modified()) else {
            continue;
        };
        if now.duration_since(modified).unwrap_or_default() > retention {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

fn open_append(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

struct Stream {
    fd: OwnedFd,
    name: &'static str,
    log: Arc<LogFile>,
    /// The start of a line whose end has not come yet.
    partial: Vec<u8>,
}

struct Collector {
    epoll: OwnedFd,
    streams: Mutex<HashMap<u64, Stream>>,
    next: AtomicU64,
}

/// The agent's collector, started on first use; published only once its thread runs.
fn collector() -> std::io::Result<&'static Collector> {
    static C: OnceLock<&'static Collector> = OnceLock::new();
    static START: Mutex<()> = Mutex::new(());
    if let Some(c) = C.get() {
        return Ok(c);
    }
    let _g = START.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = C.get() {
        return Ok(c);
    }
    // SAFETY: epoll_create1 takes no pointers.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // One per process, for the life of the process.
    let c: &'static Collector = Box::leak(Box::new(Collector {
        // SAFETY: a new descriptor nobody else owns.
        epoll: unsafe { OwnedFd::from_raw_fd(fd) },
        streams: Mutex::new(HashMap::new()),
        next: AtomicU64::new(1),
    }));
    std::thread::Builder::new()
        .name("agent-logs".into())
        .spawn(move || c.run())?;
    let _ = C.set(c);
    Ok(c)
}

/// Copies what is written to the pipe `fd` (its read end) into `log`, a line at a time as
/// `<RFC 3339 time> <stream> <line>`, until every write end is closed.
pub(crate) fn collect(fd: OwnedFd, stream: &'static str, log: Arc<LogFile>) -> std::io::Result<()> {
    let c = collector()?;
    crate::sys::set_nonblocking(fd.as_raw_fd()).map_err(std::io::Error::from_raw_os_error)?;
    let key = c.next.fetch_add(1, Ordering::Relaxed);
    let raw = fd.as_raw_fd();
    c.streams.lock().unwrap().insert(
        key,
        Stream {
            fd,
            name: stream,
            log,
            partial: Vec::new(),
        },
    );
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
        u64: key,
    };
    // SAFETY: `ev` is a valid epoll_event; both descriptors are open.
    if unsafe { libc::epoll_ctl(c.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, raw, &mut ev) } != 0 {
        let e = std::io::Error::last_os_error();
        c.streams.lock().unwrap().remove(&key);
        return Err(e);
    }
    Ok(())
}

impl Collector {
    fn run(&self) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut buf = vec![0u8; READ];
        let mut out = Vec::new();
        let mut swept = Instant::now();
        loop {
            if swept.elapsed() >= SWEEP {
                swept = Instant::now();
                for s in self.streams.lock().unwrap().values() {
                    s.log.close_if_idle(swept, IDLE_CLOSE);
                }
            }
            // SAFETY: `events` has room for `events.len()` entries.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    SWEEP.as_millis() as i32,
                )
            };
            if n < 0 {
                if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                    std::thread::sleep(GATHER);
                }
                continue;
            }
            let ts = now();
            for ev in &events[..n as usize] {
                let key = ev.u64;
                let mut streams = self.streams.lock().unwrap();
                let Some(s) = streams.get_mut(&key) else {
                    continue;
                };
                let open = s.drain(&mut buf, &mut out, &ts);
                if !open && let Some(s) = streams.remove(&key) {
                    // SAFETY: removing a descriptor this set holds; no event pointer needed.
                    unsafe {
                        libc::epoll_ctl(
                            self.epoll.as_raw_fd(),
                            libc::EPOLL_CTL_DEL,
                            s.fd.as_raw_fd(),
                            std::ptr::null_mut(),
                        )
                    };
                }
            }
            std::thread::sleep(GATHER);
        }
    }
}

impl Stream {
    /// Reads what the pipe holds and logs its whole lines; false once every writer is gone
    /// (then the last, unterminated line is logged too).
    fn drain(&mut self, buf: &mut [u8], out: &mut Vec<u8>, ts: &str) -> bool {
        out.clear();
        let mut open = true;
        loop {
            // SAFETY: `buf` is writable for its length; the descriptor is open.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n == 0 {
                open = false;
                break;
            }
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::Interrupted => continue,
                    std::io::ErrorKind::WouldBlock => break,
                    _ => {
                        open = false;
                        break;
                    }
                }
            }
            let mut data = &buf[..n as usize];
            while let Some(i) = data.iter().position(|&b| b == b'\n') {
                let (line, rest) = data.split_at(i + 1);
                if self.partial.is_empty() {
                    push_line(out, ts, self.name, line);
                } else {
                    self.partial.extend_from_slice(line);
                    push_line(out, ts, self.name, &self.partial);
                    self.partial.clear();
                }
                data = rest;
            }
            self.partial.extend_from_slice(data);
            while self.partial.len() > MAX_LINE {
                push_line(out, ts, self.name, &self.partial[..MAX_LINE]);
                self.partial.drain(..MAX_LINE);
            }
            if (n as usize) < buf.len() {
                break;
            }
        }
        if !open && !self.partial.is_empty() {
            push_line(out, ts, self.name, &self.partial);
            self.partial.clear();
        }
        if !out.is_empty() {
            self.log.write(out, ts);
        }
        open
    }
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Appends `<ts> <stream> <line>\n` (the line without its newline, invalid UTF-8 replaced),
/// as several lines of [`MAX_LINE`] bytes when it is longer.
fn push_line(out: &mut Vec<u8>, ts: &str, stream: &str, line: &[u8]) {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    if line.len() > MAX_LINE {
        for piece in line.chunks(MAX_LINE) {
            push_line(out, ts, stream, piece);
        }
        return;
    }
    out.extend_from_slice(ts.as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.as_bytes());
    out.push(b' ');
    out.extend_from_slice(String::from_utf8_lossy(line).as_bytes());
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipe as the sandbox makes them: (read end, write end).
    fn pipe() -> (OwnedFd, File) {
        let (r, w) = crate::sandbox::pipe().unwrap();
        (r, File::from(w))
    }

    fn wait_for_lines(path: &std::path::Path, n: usize) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(path).unwrap();
            if text.lines().count() >= n || std::time::Instant::now() > deadline {
                return text;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn lines_keep_one_line_each_across_reads_and_the_last_comes_at_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let log = LogFile::create(&path, 1 << 20).unwrap();
        let (r, mut w) = pipe();
        collect(r, "stdout", log).unwrap();
        w.write_all(b"one\ntwo\nthr").unwrap();
        // A line split across two rounds stays one line.
        std::thread::sleep(GATHER * 3);
        w.write_all(b"ee\nf\xffour\nlast without newline").unwrap();
        let text = wait_for_lines(&path, 4);
        assert_eq!(text.lines().count(), 4, "{text}");
        drop(w);
        let text = wait_for_lines(&path, 5);
        let rest: Vec<&str> = text.lines().map(|l| l.split_once(' ').unwrap().1).collect();
        assert_eq!(
            rest,
            [
                "stdout one",
                "stdout two",
                "stdout three",
                "stdout f\u{fffd}our",
                "stdout last without newline"
            ]
        );
        assert!(text.ends_with('\n'));
        let ts = text.lines().next().unwrap().split_once(' ').unwrap().0;
        assert!(
            time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).is_ok(),
            "{ts}"
        );
    }

    #[test]
    fn many_pipes_and_a_long_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut writers = Vec::new();
        for i in 0..20 {
            let path = dir.path().join(format!("{i}.log"));
            let log = LogFile::create(&path, 1 << 20).unwrap();
            let (r, w) = pipe();
            collect(r, "stderr", log).unwrap();
            writers.push((path, w));
        }
        let long = vec![b'x'; MAX_LINE + 10];
        for (i, (_, w)) in writers.iter_mut().enumerate() {
            w.write_all(format!("pipe {i}\n").as_bytes()).unwrap();
            w.write_all(&long).unwrap();
            w.write_all(b"\n").unwrap();
        }
        for (i, (path, w)) in writers.into_iter().enumerate() {
            drop(w);
            let text = wait_for_lines(&path, 3);
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), 3, "pipe {i}");
            assert!(lines[0].ends_with(&format!("stderr pipe {i}")));
            // The long line went out in two pieces: MAX_LINE bytes, then the rest.
            assert!(lines[1].ends_with(&"x".repeat(MAX_LINE)));
            assert!(lines[2].ends_with(" stderr xxxxxxxxxx"));
        }
    }

    #[test]
    fn a_log_file_is_open_only_while_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.log");
        let log = LogFile::create(&path, 1 << 20).unwrap();
        assert!(!log.is_open(), "created and closed");
        log.write(b"a\n", "t");
        assert!(log.is_open());
        // Written a moment ago: kept open.
        log.close_if_idle(Instant::now(), Duration::from_secs(10));
        assert!(log.is_open());
        log.close_if_idle(
            Instant::now() + Duration::from_secs(10),
            Duration::from_secs(10),
        );
        assert!(!log.is_open());
        // The next line reopens it and appends.
        log.write(b"b\n", "t");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a\nb\n");
    }

    fn read_pair(path: &Path) -> (String, String) {
        use std::io::Read;
        let (older, mut current) = open_log(path).unwrap();
        let mut a = String::new();
        if let Some(mut f) = older {
            f.read_to_string(&mut a).unwrap();
        }
        let mut b = String::new();
        current.read_to_string(&mut b).unwrap();
        (a, b)
    }

    #[test]
    fn a_full_log_rotates_and_two_files_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.log");
        let log = LogFile::create(&path, 4096).unwrap();
        let chunk = |c: char| format!("{}\n", c.to_string().repeat(2999));
        log.write(chunk('a').as_bytes(), "t");
        assert_eq!(read_pair(&path), (String::new(), chunk('a')));
        // 6,000 bytes would pass the cap: the first file becomes `.1`.
        log.write(chunk('b').as_bytes(), "t");
        assert_eq!(read_pair(&path), (chunk('a'), chunk('b')));
        // Rotated again after the file was closed and reopened: the oldest part goes.
        log.close_if_idle(Instant::now() + IDLE_CLOSE, IDLE_CLOSE);
        log.write(chunk('c').as_bytes(), "t");
        assert_eq!(read_pair(&path), (chunk('b'), chunk('c')));
        // Under the cap: appended.
        log.write(b"d\n", "t");
        assert_eq!(read_pair(&path), (chunk('b'), chunk('c') + "d\n"));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn a_write_larger_than_the_cap_is_cut_at_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.log");
        let log = LogFile::create(&path, 4096).unwrap();
        // One round of the collector can carry many lines: 10 of 1,000 bytes.
        let line = |i: usize| format!("{i} {}\n", "x".repeat(997));
        let all: String = (0..10).map(line).collect();
        log.write(all.as_bytes(), "t");
        let (older, current) = read_pair(&path);
        assert_eq!(older, (4..8).map(line).collect::<String>());
        assert_eq!(current, (8..10).map(line).collect::<String>());
        // A line longer than the cap gets a file of its own.
        let long = format!("{}\n", "y".repeat(5000));
        log.write(long.as_bytes(), "t");
        log.write(b"after\n", "t");
        assert_eq!(read_pair(&path), (long, "after\n".to_string()));
    }

    #[test]
    fn output_that_cannot_be_written_is_counted_and_noted_when_writing_works_again() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        std::fs::create_dir(&logs).unwrap();
        let path = logs.join("i.log");
        let log = LogFile::create(&path, 1 << 20).unwrap();
        log.write(b"t0 stdout first\n", "t0");
        // The directory goes while the file is open: the open file still takes the write.
        std::fs::remove_dir_all(&logs).unwrap();
        log.write(b"t1 stdout unseen\n", "t1");
        // Once closed, it cannot be opened again: lost, and counted.
        log.close_if_idle(Instant::now() + IDLE_CLOSE, IDLE_CLOSE);
        log.write(b"t2 stdout lost one\n", "t2");
        log.write(b"t3 stdout lost two\n", "t3");
        assert!(!log.is_open());
        std::fs::create_dir(&logs).unwrap();
        log.write(b"t4 stdout back\n", "t4");
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].starts_with("t4 ferry 38 bytes of output lost: ")
                && lines[0].contains("No such file"),
            "{text}"
        );
        assert_eq!(lines[1], "t4 stdout back");
        // Counted from zero again.
        log.write(b"t5 stdout more\n", "t5");
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .ends_with("t4 stdout back\nt5 stdout more\n")
        );
    }

    #[test]
    fn old_logs_of_instances_that_no_longer_run_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - Duration::from_secs(7200);
        for (name, when) in [
            ("gone.log", Some(old)),
            ("gone.log.1", Some(old)),
            ("running.log", Some(old)),
            ("fresh.log", None),
            ("other.txt", Some(old)),
        ] {
            let f = File::create(dir.path().join(name)).unwrap();
            if let Some(t) = when {
                f.set_modified(t).unwrap();
            }
        }
        let removed = sweep(dir.path(), Duration::from_secs(3600), |id| id == "running").unwrap();
        assert_eq!(removed, 2);
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["fresh.log", "other.txt", "running.log"]);
    }
}
