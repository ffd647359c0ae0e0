//! One instance's life: image → rootfs → cgroup → sandbox → network → readiness → supervise →
//! stop → cleanup, reporting every state change.

use crate::cgroup::{Cgroup, Limits};
use crate::net::InstanceNet;
use crate::sandbox::{self, SandboxSpec};
use crate::{AgentError, Shared, rootfs};
use ferry_api::ImageRef;
use ferry_api::agent::{
    AgentEvent, ExitReason, InstanceSpec, InstanceState, InstanceStatus, Probe, ProbeKind,
    RegistryAuth,
};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// What `exec` collected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

use crate::sandbox::ExecTarget as ExecInfo;

/// The agent's grip on a running instance.
pub(crate) struct Handle {
    pub stop: mpsc::UnboundedSender<Duration>,
    /// Cgroup and the host veth's interface index, once set up (for usage samples).
    pub sampling: Arc<Mutex<(Option<Cgroup>, Option<i32>)>>,
    pub exec: Arc<Mutex<Option<ExecInfo>>>,
}

impl Handle {
    pub fn new() -> (Handle, mpsc::UnboundedReceiver<Duration>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Handle {
                stop: tx,
                sampling: Arc::default(),
                exec: Arc::default(),
            },
            rx,
        )
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn status(
    shared: &Shared,
    id: &str,
    state: InstanceState,
    address: Option<SocketAddr>,
    reason: Option<ExitReason>,
) -> AgentEvent {
    AgentEvent::Status(InstanceStatus {
        instance_id: id.to_string(),
        node: shared.config.node_name.clone(),
        state,
        address,
        reason,
        at_ms: now_ms(),
    })
}

/// Fetches (source) and unpacks (cache) an image; records it as cached.
pub(crate) async fn prepare_image(
    shared: &Shared,
    image: &ImageRef,
    auth: Option<&RegistryAuth>,
) -> Result<crate::image::PreparedImage, crate::ImageError> {
    // Pinned and already unpacked: no need to ask the source.
    let digest = match image.digest.as_deref().and_then(|d| d.parse().ok()) {
        Some(d) if shared.store.is_cached(&d) => d,
        _ => {
            shared
                .images
                .fetch(image, auth, shared.store.layout())
                .await?
        }
    };
    let p = shared.store.prepare(&digest).await?;
    shared.cached.lock().unwrap().insert(digest.to_string());
    Ok(p)
}

/// Everything an instance holds, released by [`cleanup`].
#[derive(Default)]
struct Resources {
    dir: Option<PathBuf>,
    ip: Option<Ipv4Addr>,
    cgroup: Option<Cgroup>,
    net: Option<InstanceNet>,
}

fn cleanup(shared: &Shared, res: &mut Resources) {
    if let Some(cg) = res.cgroup.take() {
        cg.kill_all();
        if let Err(e) = cg.remove() {
            tracing::warn!(error = %e, "cgroup removal failed");
        }
    }
    if let Some(n) = res.net.take()
        && let Err(e) = crate::net::teardown_instance(&n)
    {
        tracing::warn!(error = %e, "network teardown failed");
    }
    if let Some(ip) = res.ip.take() {
        shared.ipam.release(ip);
    }
    if let Some(d) = res.dir.take()
        && let Err(e) = rootfs::remove(&d)
    {
        tracing::warn!(error = %e, "rootfs removal failed");
    }
}

fn env_contract(spec: &InstanceSpec, image_env: &[String]) -> Vec<String> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| {
        if let Some(e) = out.iter_mut().find(|(ek, _)| ek == k) {
            e.1 = v.to_string();
        } else {
            out.push((k.to_string(), v.to_string()));
        }
    };
    set(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    set("HOSTNAME", &hostname(spec));
    for e in image_env {
        let (k, v) = e.split_once('=').unwrap_or((e, ""));
        set(k, v);
    }
    for (k, v) in &spec.env {
        set(k, v);
    }
    // The platform's variables win: Knative and Cloud Run reserve them.
    set("PORT", &spec.port.to_string());
    set("K_SERVICE", &spec.service);
    set("K_REVISION", &spec.revision);
    set("K_CONFIGURATION", &spec.configuration);
    out.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

fn argv(spec: &InstanceSpec, img: &crate::RuntimeConfig) -> Vec<String> {
    // Kubernetes/Knative semantics: a command replaces Entrypoint and drops the image's Cmd.
    match &spec.command {
        Some(cmd) => cmd
            .iter()
            .chain(spec.args.iter().flatten())
            .cloned()
            .collect(),
        None => img
            .entrypoint
            .iter()
            .chain(spec.args.as_ref().unwrap_or(&img.cmd))
            .cloned()
            .collect(),
    }
}

fn hostname(spec: &InstanceSpec) -> String {
    let mut h: String = spec
        .instance_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    h.truncate(63);
    h
}

fn resolv_conf() -> String {
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let mut out: String = host
        .lines()
        .filter(|l| {
            !(l.trim_start().starts_with("nameserver")
                && (l.contains(" 127.") || l.contains(" ::1")))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    if !out
        .lines()
        .any(|l| l.trim_start().starts_with("nameserver"))
    {
        out.push_str("nameserver 1.1.1.1\nnameserver 8.8.8.8\n");
    }
    out
}

struct Started {
    pid: i32,
    exit: oneshot::Receiver<(Option<i32>, Option<i32>)>,
}

/// Blocking part of the start: rootfs, cgroup, sandbox, network. Fills `res` as it goes.
fn start_blocking(
    shared: &Shared,
    spec: &InstanceSpec,
    image: &crate::image::PreparedImage,
    res: &Arc<Mutex<Resources>>,
    log: &Arc<crate::logs::LogFile>,
) -> Result<(Started, ExecInfo), String> {
    let id = &spec.instance_id;
    let dir = crate::instance_dir(&shared.config.data_dir, id);
    std::fs::create_dir_all(&dir).map_err(|e| format!("instance dir {dir:?}: {e}"))?;
    res.lock().unwrap().dir = Some(dir.clone());
    // The record goes first and is updated before each further resource: a later run of the
    // agent finds everything this instance holds from it (crate::state::recover).
    let mut record = crate::state::InstanceRecord::new(id, spec.outbound_network);
    let save = |r: &crate::state::InstanceRecord| {
        r.write(&dir)
            .map_err(|e| format!("instance record in {dir:?}: {e}"))
    };
    save(&record)?;
    let root = rootfs::mount_overlay(&dir, &image.layers).map_err(|e| e.to_string())?;
    let ip = shared.ipam.allocate(id).map_err(|e| e.to_string())?;
    res.lock().unwrap().ip = Some(ip);
    record.ip = Some(ip);
    save(&record)?;
    let host = hostname(spec);
    let w = |rel: &str, c: &str| rootfs::write_file_in_root(&root, rel, c.as_bytes());
    w(
        "/etc/hosts",
        &format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n{ip}\t{host}\n"),
    )
    .and_then(|()| w("/etc/resolv.conf", &resolv_conf()))
    .and_then(|()| w("/etc/hostname", &format!("{host}\n")))
    .map_err(|e| e.to_string())?;
    let limits = Limits {
        cpu_millis: spec.cpu.millis(),
        memory_bytes: spec.memory.bytes(),
        pids: spec.pids_limit.unwrap_or(shared.config.default_pids_limit),
    };
    let cg = Cgroup::create(&shared.hierarchy, id, &limits).map_err(|e| e.to_string())?;
    res.lock().unwrap().cgroup = Some(cg.clone());
    let env = env_contract(spec, &image.config.env);
    let sspec = SandboxSpec {
        rootfs: root.clone(),
        hostname: host,
        argv: argv(spec, &image.config),
        env: env.clone(),
        workdir: image.config.working_dir.clone(),
        user: image.config.user.clone(),
    };
    let mut plan = sandbox::plan(&sspec).map_err(|e| e.to_string())?;
    plan.join_cgroup(&cg.dirs());
    let spawned = sandbox::spawn(Arc::new(plan)).map_err(|e| e.to_string())?;
    let pid = spawned.pid;
    let (exit_tx, exit_rx) = oneshot::channel();
    // The exit is watched through a pidfd on the runtime: no thread per instance (there was
    // one blocked in waitpid for each: a pid apiece, and `ferry server` grew 47 KiB of RSS
    // per instance with them, 23 KiB without; docs/agent.md).
    // Without pidfds (Linux < 5.3) or outside a runtime, a thread waits as before.
    let watched = match (sandbox::pidfd(pid), tokio::runtime::Handle::try_current()) {
        (Ok(fd), Ok(rt)) => {
            rt.spawn(async move {
                let r = sandbox::wait_pidfd(fd).await.unwrap_or_else(|e| {
                    tracing::warn!(pid, error = %e, "waiting for an instance's exit");
                    (None, None)
                });
                let _ = exit_tx.send(r);
            });
            Ok(())
        }
        _ => std::thread::Builder::new()
            .name(format!("wait-{pid}"))
            .spawn(move || {
                let r = sandbox::wait(pid).unwrap_or((None, None));
                let _ = exit_tx.send(r);
            })
            .map(drop),
    };
    if let Err(e) = watched {
        // Nobody would reap the child: do it here.
        let _ = crate::sys::kill(pid, libc::SIGKILL);
        let _ = sandbox::wait(pid);
        return Err(format!("waiter thread: {e}"));
    }
    record.pid = Some(pid);
    if let Err(e) = save(&record) {
        tracing::warn!(error = %e, "instance record not updated with the pid");
    }
    let started = Started { pid, exit: exit_rx };
    let fail = |msg: String| {
        let _ = crate::sys::kill(pid, libc::SIGKILL);
        msg
    };
    // Logs: readers before release so the pipes never fill.
    for (fd, stream) in [
        (spawned.stdout.try_clone(), "stdout"),
        (spawned.stderr.try_clone(), "stderr"),
    ] {
        let fd = fd.map_err(|e| fail(format!("log pipe: {e}")))?;
        crate::logs::collect(fd, stream, log.clone())
            .map_err(|e| fail(format!("log pipe: {e}")))?;
    }
    // The child joins its cgroup itself (see `Plan::join_cgroup`), overlapping this.
    let net = crate::net::setup_instance(&shared.config.net, id, pid, ip, spec.outbound_network)
        .map_err(|e| fail(e.to_string()))?;
    res.lock().unwrap().net = Some(net);
    spawned.release().map_err(|e| fail(e.to_string()))?;
    // The instance has its own copy of the overlay mount (its mount namespace, made private
    // before its exec): the host's goes, so the host's mount table holds only the starts in
    // flight. Every clone copies that table into the new namespace, and the child pays for it
    // inside its CPU quota: with a thousand instances' overlays left mounted, a 0.1-vCPU start
    // was throttled for whole 100 ms periods. From here on the instance's files are reached
    // through /proc/<pid>/root.
    rootfs::unmount_host_view(&root);
    let info = ExecInfo {
        pid,
        cgroup: cg,
        env,
        user: image.config.user.clone(),
        workdir: image.config.working_dir.clone(),
        rootfs: PathBuf::from(format!("/proc/{pid}/root")),
    };
    Ok((started, info))
}

async fn probe_once(addr: SocketAddr, probe: &Probe, starting: bool) -> bool {
    let mut timeout = Duration::from_millis(probe.timeout_ms.max(1));
    if starting {
        // While starting, a lost SYN must not cost a 1 s retransmit: retry with a fresh one.
        timeout = timeout.min(Duration::from_millis(100));
    }
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        match &probe.kind {
            ProbeKind::Tcp => Some(true),
            ProbeKind::Http { path } => {
                let req = format!(
                    "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: ferry-probe\r\nConnection: close\r\n\r\n"
                );
                s.write_all(req.as_bytes()).await.ok()?;
                let mut head = [0u8; 16];
                let mut n = 0;
                while n < 12 {
                    let r = s.read(&mut head[n..]).await.ok()?;
                    if r == 0 {
                        break;
                    }
                    n += r;
                }
                let code: u16 = std::str::from_utf8(head.get(9..12)?).ok()?.parse().ok()?;
                Some((200..400).contains(&code))
            }
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

fn exit_reason(cg: Option<&Cgroup>, code: Option<i32>, signal: Option<i32>) -> ExitReason {
    if cg.is_some_and(|c| c.oom_kills() > 0) {
        return ExitReason::OomKilled;
    }
    match (code, signal) {
        (_, Some(s)) => ExitReason::Signaled { signal: s },
        (Some(c), _) => ExitReason::Exited { code: c },
        _ => ExitReason::Exited { code: -1 },
    }
}

enum End {
    Stopped,
    Failed(ExitReason),
}

/// How long readiness is polled at a fixed sub-/millisecond cadence before backing off.
const FAST_PROBING: Duration = Duration::from_millis(100);

/// The pause between two readiness probes. TCP probes: 250 µs for the first 10 ms, then 1 ms
/// up to [`FAST_PROBING`], then doubling from 1 ms up to `max`. Most apps listen within the
/// first milliseconds, and every moment between listening and the probe seeing it adds to a
/// cold start; a refused TCP probe costs tens of µs. The fine pauses run on a timerfd: tokio's
/// timer has 1 ms ticks, and its 1 ms sleep lasted 1.6–2.6 ms here. HTTP probes (a request
/// each, which a warming app may answer slowly) only double from 1 ms up to `max`.
async fn probe_pause(tcp: bool, since: Instant, backoff: &mut Duration, max: Duration) {
    let t = since.elapsed();
    let fine = if !tcp {
        None
    } else if t < Duration::from_millis(10) {
        Some(Duration::from_micros(250))
    } else if t < FAST_PROBING {
        Some(Duration::from_millis(1))
    } else {
        None
    };
    match fine {
        Some(d) => {
            let precise = match tokio_timerfd::Delay::new(Instant::now() + d) {
                Ok(delay) => delay.await.is_ok(),
                Err(_) => false,
            };
            if !precise {
                tokio::time::sleep(d).await;
            }
        }
        None => {
            tokio::time::sleep(*backoff).await;
            *backoff = (*backoff * 2).min(max);
        }
    }
}

/// The instance task.
pub(crate) async fn run(
    shared: Arc<Shared>,
    spec: InstanceSpec,
    mut stop_rx: mpsc::UnboundedReceiver<Duration>,
) {
    let id = spec.instance_id.clone();
    let span = tracing::info_span!("instance", instance = %id);
    let _e = span.enter();
    drop(_e);
    shared
        .emit(status(&shared, &id, InstanceState::Pending, None, None))
        .await;
    let res = Arc::new(Mutex::new(Resources::default()));
    let (end, address) = supervise(&shared, &spec, &mut stop_rx, &res).await;
    {
        let shared2 = shared.clone();
        let res2 = res.clone();
        let _ =
            tokio::task::spawn_blocking(move || cleanup(&shared2, &mut res2.lock().unwrap())).await;
    }
    shared.instances.lock().unwrap().remove(&id);
    let (state, reason) = match end {
        End::Stopped => (InstanceState::Stopped, ExitReason::Stopped),
        End::Failed(r) => (InstanceState::Failed, r),
    };
    tracing::info!(instance = %id, ?state, ?reason, "instance ended");
    shared
        .emit(status(&shared, &id, state, address, Some(reason)))
        .await;
}

async fn supervise(
    shared: &Arc<Shared>,
    spec: &InstanceSpec,
    stop_rx: &mut mpsc::UnboundedReceiver<Duration>,
    res: &Arc<Mutex<Resources>>,
) -> (End, Option<SocketAddr>) {
    let id = spec.instance_id.clone();
    let image = tokio::select! {
        r = prepare_image(shared, &spec.image, spec.registry_auth.as_ref()) => r,
        _ = stop_rx.recv() => return (End::Stopped, None),
    };
    let image = match image {
        Ok(i) => i,
        Err(e) => {
            return (
                End::Failed(ExitReason::ImageError {
                    message: e.to_string(),
                }),
                None,
            );
        }
    };
    let log_path = shared.log_path(&id);
    let log = match crate::logs::LogFile::create(&log_path, shared.config.log_max_bytes) {
        Ok(f) => f,
        Err(e) => {
            return (
                End::Failed(ExitReason::StartError {
                    message: format!("log file {log_path:?}: {e}"),
                }),
                None,
            );
        }
    };
    let started = {
        let (shared, spec, res, log) = (shared.clone(), spec.clone(), res.clone(), log.clone());
        tokio::task::spawn_blocking(move || start_blocking(&shared, &spec, &image, &res, &log))
            .await
            .unwrap_or_else(|e| Err(format!("start task: {e}")))
    };
    let (mut started, info) = match started {
        Ok(s) => s,
        Err(message) => {
            tracing::warn!(instance = %id, error = %message, "start failed");
            return (End::Failed(ExitReason::StartError { message }), None);
        }
    };
    let cg = info.cgroup.clone();
    let ip = res.lock().unwrap().ip.expect("ip leased");
    let veth = res.lock().unwrap().net.as_ref().map(|n| n.host_index);
    let addr = SocketAddr::from((ip, spec.port));
    if let Some(h) = shared.instances.lock().unwrap().get(&id) {
        *h.sampling.lock().unwrap() = (Some(cg.clone()), veth);
        *h.exec.lock().unwrap() = Some(info);
    }
    shared
        .emit(status(
            shared,
            &id,
            InstanceState::Starting,
            Some(addr),
            None,
        ))
        .await;

    // Readiness: see `probe_pause` for the cadence.
    let probing_since = Instant::now();
    let deadline = Instant::now() + shared.config.start_timeout;
    let max_delay = match spec.readiness.kind {
        ProbeKind::Tcp => Duration::from_millis(10),
        ProbeKind::Http { .. } => Duration::from_millis(spec.readiness.period_ms.clamp(10, 100)),
    };
    let mut delay = Duration::from_millis(1);
    loop {
        tokio::select! {
            r = &mut started.exit => {
                let (code, sig) = r.unwrap_or((None, None));
                return (End::Failed(exit_reason(Some(&cg), code, sig)), Some(addr));
            }
            g = stop_rx.recv() => {
                return (stop(shared, &id, started, g, &cg, addr).await, Some(addr));
            }
            ok = probe_once(addr, &spec.readiness, true) => {
                if ok { break; }
                if Instant::now() > deadline {
                    let _ = crate::sys::kill(started.pid, libc::SIGKILL);
                    let _ = (&mut started.exit).await;
                    return (End::Failed(ExitReason::ProbeFailed {
                        message: format!("not ready after {:?}", shared.config.start_timeout),
                    }), Some(addr));
                }
                let tcp = matches!(spec.readiness.kind, ProbeKind::Tcp);
                probe_pause(tcp, probing_since, &mut delay, max_delay).await;
            }
        }
    }
    shared
        .emit(status(shared, &id, InstanceState::Ready, Some(addr), None))
        .await;

    let liveness = spec.liveness.clone();
    let period = liveness.as_ref().map_or(Duration::from_secs(3600), |p| {
        Duration::from_millis(p.period_ms.max(10))
    });
    let mut failures = 0u32;
    loop {
        tokio::select! {
            r = &mut started.exit => {
                let (code, sig) = r.unwrap_or((None, None));
                return (End::Failed(exit_reason(Some(&cg), code, sig)), Some(addr));
            }
            g = stop_rx.recv() => {
                return (stop(shared, &id, started, g, &cg, addr).await, Some(addr));
            }
            _ = tokio::time::sleep(period), if liveness.is_some() => {
                let p = liveness.as_ref().expect("liveness set");
                if probe_once(addr, p, false).await {
                    failures = 0;
                } else {
                    failures += 1;
                    if failures >= p.failure_threshold.max(1) {
                        let _ = crate::sys::kill(started.pid, libc::SIGKILL);
                        let _ = (&mut started.exit).await;
                        return (End::Failed(ExitReason::ProbeFailed {
                            message: format!("liveness failed {failures} times"),
                        }), Some(addr));
                    }
                }
            }
        }
    }
}

/// SIGTERM, grace, SIGKILL to the pid namespace's init (which takes the namespace with it).
async fn stop(
    shared: &Shared,
    id: &str,
    mut started: Started,
    grace: Option<Duration>,
    cg: &Cgroup,
    addr: SocketAddr,
) -> End {
    shared
        .emit(status(
            shared,
            id,
            InstanceState::Draining,
            Some(addr),
            None,
        ))
        .await;
    let grace = grace.unwrap_or(Duration::from_secs(10));
    let _ = crate::sys::kill(started.pid, libc::SIGTERM);
    if tokio::time::timeout(grace, &mut started.exit)
        .await
        .is_err()
    {
        let _ = crate::sys::kill(started.pid, libc::SIGKILL);
        cg.kill_all();
        let _ = (&mut started.exit).await;
    }
    End::Stopped
}

/// Sends the lines of the log at `path`: the rotated part and the current file, then what is
/// appended, following it across rotations. Ends once `running` says the instance is gone and
/// nothing more came (its last lines sent), when the log is removed, `stop` is cancelled or
/// the receiver dropped.
pub(crate) fn follow_log(
    path: PathBuf,
    running: impl Fn() -> bool + Send + 'static,
    stop: CancellationToken,
) -> mpsc::Receiver<String> {
    use std::os::unix::fs::MetadataExt;
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        let p = path.clone();
        let Ok(Ok((older, current))) =
            tokio::task::spawn_blocking(move || crate::logs::open_log(&p)).await
        else {
            return;
        };
        let mut lines = LineSplitter::default();
        if let Some(f) = older
            && lines
                .send_rest(&mut tokio::fs::File::from_std(f), &tx)
                .await
                .is_none()
        {
            return;
        }
        let mut cur = tokio::fs::File::from_std(current);
        let mut quiet_and_gone = 0;
        loop {
            let Some(n) = lines.send_rest(&mut cur, &tx).await else {
                return;
            };
            // The path names another file after a rotation: what the old one still held was
            // just read; go on with the new one from its start.
            let now = tokio::fs::metadata(&path).await.ok().map(|m| m.ino());
            let mine = cur.metadata().await.ok().map(|m| m.ino());
            if now != mine {
                if lines.send_rest(&mut cur, &tx).await.is_none() {
                    return;
                }
                match tokio::fs::File::open(&path).await {
                    Ok(f) => {
                        cur = f;
                        continue;
                    }
                    Err(_) => return,
                }
            }
            // Gone, and nothing written over two rounds: the collector had time to drain its
            // pipes (it writes every few milliseconds).
            if n == 0 && !running() {
                quiet_and_gone += 1;
                if quiet_and_gone >= 2 {
                    return;
                }
            } else {
                quiet_and_gone = 0;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    });
    rx
}

/// Cuts what a log file gives into lines (without their newline) and sends them.
#[derive(Default)]
struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Reads `f` to its end and sends its whole lines: how many bytes were read, None once
    /// the receiver is gone.
    async fn send_rest(
        &mut self,
        f: &mut tokio::fs::File,
        tx: &mpsc::Sender<String>,
    ) -> Option<usize> {
        let mut buf = Vec::new();
        let n = f.read_to_end(&mut buf).await.unwrap_or(0);
        self.pending.extend_from_slice(&buf);
        // Whole lines go out; the rest waits. One drain at the end: draining line by line
        // moved the rest of a 10 MiB read once per line.
        let mut start = 0;
        while let Some(i) = self.pending[start..].iter().position(|&b| b == b'\n') {
            let line = &self.pending[start..start + i];
            let s = String::from_utf8_lossy(line).into_owned();
            start += i + 1;
            if tx.send(s).await.is_err() {
                return None;
            }
        }
        self.pending.drain(..start);
        Some(n)
    }
}

/// Runs `f` on a blocking thread with what exec needs to join instance `id`.
async fn in_instance<T: Send + 'static>(
    shared: &Arc<Shared>,
    id: &str,
    f: impl FnOnce(ExecInfo) -> Result<T, crate::sandbox::SandboxError> + Send + 'static,
) -> Result<T, AgentError> {
    let info = shared
        .instances
        .lock()
        .unwrap()
        .get(id)
        .and_then(|h| h.exec.lock().unwrap().clone())
        .ok_or_else(|| AgentError::NoInstance(id.into()))?;
    let failed = |message: String| AgentError::Exec {
        instance: id.to_string(),
        message,
    };
    tokio::task::spawn_blocking(move || f(info))
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(|e| failed(e.to_string()))
}

pub(crate) async fn exec(
    shared: &Arc<Shared>,
    id: &str,
    argv: Vec<String>,
    stdin: Vec<u8>,
) -> Result<ExecOutput, AgentError> {
    in_instance(shared, id, move |info| {
        crate::sandbox::exec_in(&info, &argv, &stdin)
    })
    .await
}

/// Starts `argv` in the instance `id` with stdio `stdio` and returns once it is exec'd: the
/// agent's ends of its stdio for an interactive session.
pub(crate) async fn spawn_exec(
    shared: &Arc<Shared>,
    id: &str,
    argv: Vec<String>,
    stdio: crate::sandbox::ExecStdio,
) -> Result<crate::sandbox::ExecChild, AgentError> {
    in_instance(shared, id, move |info| {
        crate::sandbox::spawn_exec(&info, &argv, stdio)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::{Cpu, Memory};
    use std::sync::atomic::{AtomicBool, Ordering};

    async fn recv(rx: &mut mpsc::Receiver<String>) -> Option<String> {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a line or the end within 10 s")
    }

    #[tokio::test]
    async fn following_a_log_goes_across_rotations_and_ends_when_the_instance_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.log");
        // Four lines of 1,006 bytes fit in a file; the fifth starts the next one.
        let log = crate::logs::LogFile::create(&path, 4096).unwrap();
        let write = |i: usize| log.write(format!("{i:04} {}\n", "x".repeat(1000)).as_bytes(), "t");
        // Kept before following starts: 4..8 rotated into `.1`, 8 and 9 current; 0..4 gone.
        (0..10).for_each(write);
        let running = Arc::new(AtomicBool::new(true));
        let r = running.clone();
        let mut rx = follow_log(
            path.clone(),
            move || r.load(Ordering::SeqCst),
            CancellationToken::new(),
        );
        let mut got = Vec::new();
        for _ in 4..10 {
            got.push(recv(&mut rx).await.unwrap());
        }
        // Written while following, rotating twice more: every line arrives, in order.
        for i in 10..19 {
            write(i);
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        for _ in 10..19 {
            got.push(recv(&mut rx).await.unwrap());
        }
        let numbers: Vec<String> = got.iter().map(|l| l[..4].to_string()).collect();
        let want: Vec<String> = (4..19).map(|i| format!("{i:04}")).collect();
        assert_eq!(numbers, want);
        assert!(got.iter().all(|l| l.len() == 1005));
        // The instance goes: its last line still comes, then the stream ends.
        write(19);
        running.store(false, Ordering::SeqCst);
        assert!(recv(&mut rx).await.unwrap().starts_with("0019 "));
        assert_eq!(recv(&mut rx).await, None);
    }

    fn spec() -> InstanceSpec {
        InstanceSpec {
            instance_id: "rev-1-abc".into(),
            service: "svc".into(),
            revision: "rev-1".into(),
            configuration: "svc".into(),
            image: "localhost/x@sha256:0000000000000000000000000000000000000000000000000000000000000000"
                .parse()
                .unwrap(),
            registry_auth: None,
            command: None,
            args: None,
            env: [("A".to_string(), "spec".to_string()), ("PORT".into(), "1".into())]
                .into_iter()
                .collect(),
            port: 8080,
            cpu: Cpu(500),
            memory: Memory(64 << 20),
            pids_limit: None,
            outbound_network: true,
            readiness: Probe::default(),
            liveness: None,
            termination_grace_ms: 1000,
            isolation: Default::default(),
        }
    }

    #[test]
    fn env_order_image_then_spec_then_platform() {
        let env = env_contract(
            &spec(),
            &[
                "A=image".into(),
                "B=image".into(),
                "PATH=/x".into(),
                "K_SERVICE=image".into(),
            ],
        );
        assert!(env.contains(&"K_SERVICE=svc".to_string()));
        assert!(env.contains(&"K_REVISION=rev-1".to_string()));
        assert!(env.contains(&"K_CONFIGURATION=svc".to_string()));
        assert!(env.contains(&"A=spec".to_string()));
        assert!(env.contains(&"B=image".to_string()));
        assert!(env.contains(&"PATH=/x".to_string()));
        // The platform's PORT and K_* win over the image and the spec (Knative reserves them).
        assert!(env.contains(&"PORT=8080".to_string()), "{env:?}");
        assert!(!env.iter().any(|e| e == "PORT=1" || e == "K_SERVICE=image"));
    }

    #[test]
    fn command_and_args_override() {
        let img = crate::RuntimeConfig {
            entrypoint: vec!["/e".into()],
            cmd: vec!["c".into()],
            ..Default::default()
        };
        let mut s = spec();
        assert_eq!(argv(&s, &img), ["/e", "c"]);
        s.args = Some(vec!["a".into()]);
        assert_eq!(argv(&s, &img), ["/e", "a"]);
        s.command = Some(vec!["/x".into()]);
        s.args = None;
        assert_eq!(argv(&s, &img), ["/x"]);
    }
}
