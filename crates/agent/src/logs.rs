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
pub(crate) struct LogFile {
    path: PathBuf,
    open: Mutex<Option<(File, Instant)>>,
}

impl LogFile {
    /// Creates the file (or keeps what it holds) and closes it again.
    pub(crate) fn create(path: &Path) -> std::io::Result<Arc<LogFile>> {
        open_append(path)?;
        Ok(Arc::new(LogFile {
            path: path.to_path_buf(),
            open: Mutex::new(None),
        }))
    }

    fn write(&self, data: &[u8]) -> std::io::Result<()> {
        let mut g = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let f = match g.take() {
            Some((f, _)) => f,
            None => open_append(&self.path)?,
        };
        let r = (&f).write_all(data);
        *g = Some((f, Instant::now()));
        r
    }

    /// Closes the file if nothing was written to it for `idle`.
    fn close_if_idle(&self, now: Instant, idle: Duration) {
        let mut g = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if g.as_ref()
            .is_some_and(|(_, at)| now.saturating_duration_since(*at) >= idle)
        {
            *g = None;
        }
    }

    #[cfg(test)]
    fn is_open(&self) -> bool {
        self.open.lock().unwrap().is_some()
    }
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
            let _ = self.log.write(out);
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
        let log = LogFile::create(&path).unwrap();
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
            let log = LogFile::create(&path).unwrap();
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
        let log = LogFile::create(&path).unwrap();
        assert!(!log.is_open(), "created and closed");
        log.write(b"a\n").unwrap();
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
        log.write(b"b\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a\nb\n");
    }
}
