//! The registry suite: push and pull of a ~200 MiB, 5-layer image with skopeo into Ferry's
//! registry and into docker-registry 2.8, beside two floors that show what the client alone
//! costs: a push to a registry that reads every byte and keeps nothing, and a pull from nginx
//! serving the image's files with sendfile.

use crate::gateway::run_nginx;
use crate::suites::{Proc, addresses, cpu_ns, free_port, ms, peak_rss_mib, skopeo, wait_http};
use crate::{Row, ensure_packages, percentile, run, sorted};
use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Which registry a measurement went to.
const FERRY: usize = 0;
const PEER: usize = 1;
const FLOOR: usize = 2;

pub fn registry(ferry: &Path, runs: usize) -> Result<(String, Vec<Row>)> {
    ensure_packages(&["skopeo", "docker-registry", "nginx-light"])?;
    let work = tempfile::tempdir()?;
    let w = work.path();
    let mut build = Command::new(ferry);
    build
        .args([
            "image",
            "build",
            "--tag",
            "v1",
            "--entrypoint",
            "/bin/app",
            "-o",
        ])
        .arg(w.join("image.tar"));
    for i in 0..5 {
        let d = w.join(format!("layer{i}"));
        std::fs::create_dir_all(&d)?;
        crate::suites::write_random(&d.join("data.bin"), 40, 0x9E37_79B9_7F4A_7C15 + i)?;
        build.arg("--dir").arg(&d);
    }
    run(&mut build)?;
    let size = std::fs::metadata(w.join("image.tar"))?.len() as f64 / (1 << 20) as f64;
    // Pushes read an OCI layout directory: from an oci-archive skopeo would first unpack the
    // archive to a temporary directory, the same client-side work before every push.
    let layout = w.join("layout");
    std::fs::create_dir_all(&layout)?;
    run(Command::new("tar")
        .arg("-xf")
        .arg(w.join("image.tar"))
        .arg("-C")
        .arg(&layout))?;
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let manifest = &index["manifests"][0];
    let manifest_digest = manifest["digest"].as_str().context("manifest digest")?;
    let manifest_type = manifest["mediaType"].as_str().context("manifest type")?;

    // Ferry.
    let data = w.join("ferry");
    let ferry_proc = Proc(
        Command::new(ferry)
            .args(["registry", "--registry-addr", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .env("FERRY_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?,
    );
    let ferry_addr: SocketAddr = addresses(&data, Duration::from_secs(10))?["registry"]
        .as_str()
        .context("registry address")?
        .parse()?;
    // docker-registry 2.8 with a config of its own.
    let port = free_port()?;
    let cfg = w.join("docker-registry.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            w.join("dr").display()
        ),
    )?;
    let peer_proc = Proc(
        Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let peer_addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    // The floors.
    let null_addr = start_null_registry()?;
    let static_port = free_port()?;
    let static_addr: SocketAddr = format!("127.0.0.1:{static_port}").parse()?;
    let static_proc = start_static_registry(
        &w.join("nginx"),
        static_port,
        &layout,
        manifest_digest,
        manifest_type,
    )?;
    for a in [ferry_addr, peer_addr, null_addr, static_addr] {
        wait_http(a, "localhost", "/v2/", Duration::from_secs(10))?;
    }

    let src = format!("oci:{}:v1", layout.display());
    let pids = [vec![ferry_proc.0.id()], vec![peer_proc.0.id()], vec![]];
    // [registry] -> (push ms, pull ms, push CPU ms, pull CPU ms), one entry per run
    let mut times: Vec<[Vec<f64>; 4]> =
        vec![Default::default(), Default::default(), Default::default()];
    for i in 0..runs {
        // Rotate who goes first, so none always gets the warmer page cache.
        for k in (0..3).map(|k| (k + i) % 3) {
            let (push_to, pull_from) = match k {
                FERRY => (ferry_addr, ferry_addr),
                PEER => (peer_addr, peer_addr),
                _ => (null_addr, static_addr),
            };
            let repo = if k == FLOOR { "floor" } else { "bench" };
            let cpu0 = cpu_ns(&pids[k]);
            let push = skopeo(&[
                "copy",
                "--dest-tls-verify=false",
                &src,
                &format!("docker://{push_to}/{repo}/run{i}:v1"),
            ])?;
            let cpu1 = cpu_ns(&pids[k]);
            let out = w.join(format!("pull-{k}-{i}"));
            let pulled = if k == FLOOR {
                "floor:v1".to_string()
            } else {
                format!("{repo}/run{i}:v1")
            };
            let pull = skopeo(&[
                "copy",
                "--src-tls-verify=false",
                &format!("docker://{pull_from}/{pulled}"),
                &format!("oci:{}:v1", out.display()),
            ])?;
            let cpu2 = cpu_ns(&pids[k]);
            std::fs::remove_dir_all(&out)?;
            let t = &mut times[k];
            t[0].push(ms(push));
            t[1].push(ms(pull));
            t[2].push(cpu1.saturating_sub(cpu0) as f64 / 1e6);
            t[3].push(cpu2.saturating_sub(cpu1) as f64 / 1e6);
            eprintln!(
                "registry run {i}: {}: push {:.0} ms, pull {:.0} ms",
                ["ferry", "docker-registry", "floor"][k],
                ms(push),
                ms(pull)
            );
        }
    }
    let (fr, pr) = (
        peak_rss_mib(ferry_proc.0.id()),
        peak_rss_mib(peer_proc.0.id()),
    );
    drop(static_proc);
    let med = |k: usize, m: usize| percentile(&sorted(times[k][m].clone()), 0.5);
    let peer = Some("docker-registry 2.8".to_string());
    let mut rows = Vec::new();
    for (m, what) in [(0, "push"), (1, "pull")] {
        rows.push(Row {
            metric: format!("{what} {size:.0} MiB, 5 layers (median of {runs})"),
            unit: "ms".into(),
            ferry: med(FERRY, m),
            peer_name: peer.clone(),
            peer: Some(med(PEER, m)),
            goal: Some("≤ 0.8× peer".into()),
        });
    }
    rows.push(Row {
        metric: format!("push {size:.0} MiB: floor, a registry that reads and keeps nothing"),
        unit: "ms".into(),
        ferry: med(FERRY, 0),
        peer_name: Some("null registry (skopeo alone)".into()),
        peer: Some(med(FLOOR, 0)),
        goal: None,
    });
    rows.push(Row {
        metric: format!("pull {size:.0} MiB: floor, nginx serving the files (sendfile)"),
        unit: "ms".into(),
        ferry: med(FERRY, 1),
        peer_name: Some("static nginx (skopeo alone)".into()),
        peer: Some(med(FLOOR, 1)),
        goal: None,
    });
    // The pull floor is within noise of both registries, so only the push gets this row.
    rows.push(Row {
        metric: "push: time the registry adds over the floor (median − floor median)".into(),
        unit: "ms".into(),
        ferry: med(FERRY, 0) - med(FLOOR, 0),
        peer_name: peer.clone(),
        peer: Some(med(PEER, 0) - med(FLOOR, 0)),
        goal: None,
    });
    for (m, what) in [(2, "push"), (3, "pull")] {
        rows.push(Row {
            metric: format!("registry CPU time per {what}"),
            unit: "ms".into(),
            ferry: med(FERRY, m),
            peer_name: peer.clone(),
            peer: Some(med(PEER, m)),
            goal: None,
        });
    }
    rows.push(Row {
        metric: "registry peak RSS".into(),
        unit: "MiB".into(),
        ferry: fr,
        peer_name: peer,
        peer: Some(pr),
        goal: Some("≤ peer".into()),
    });
    drop(ferry_proc);
    drop(peer_proc);
    Ok((
        format!(
            "skopeo 1.9 copies an OCI layout directory of 5 layers × 40 MiB of incompressible data ({size:.0} MiB) into each registry (a fresh repository per run) and back into an OCI directory, {runs} runs each, rotating which registry goes first; skopeo's blob-info cache is removed before every copy. Wall time of each skopeo command; registry CPU time is the on-CPU time of the registry process's threads during the command; peak RSS is VmHWM of the registry process after all runs. Ferry: `ferry registry` (release build); peer: Debian's docker-registry 2.8 with filesystem storage. The floors take the registry out: the push floor goes to a server in the harness that answers the upload protocol and reads every byte but hashes and stores nothing; the pull floor comes from nginx serving the layout's files with sendfile. What is left in a floor is skopeo's own work."
        ),
        rows,
    ))
}

/// nginx serving the OCI layout at `layout` as repository `floor`, tag `v1`, read-only.
fn start_static_registry(
    dir: &Path,
    port: u16,
    layout: &Path,
    manifest_digest: &str,
    manifest_type: &str,
) -> Result<Proc> {
    let blobs = layout.join("blobs/sha256");
    let b = blobs.display();
    let hex = manifest_digest
        .strip_prefix("sha256:")
        .context("manifest digest is not sha256")?;
    run_nginx(
        dir,
        &format!(
            "  sendfile on;
  server {{
    listen 127.0.0.1:{port};
    location = /v2/ {{ default_type application/json; return 200 '{{}}'; }}
    location ~ ^/v2/floor/manifests/v1$ {{ default_type {manifest_type}; alias {b}/{hex}; }}
    location ~ ^/v2/floor/blobs/sha256:([0-9a-f]+)$ {{ default_type application/octet-stream; alias {b}/$1; }}
  }}
"
        ),
    )
}

/// A registry that answers the upload protocol and reads every byte of every body but keeps
/// nothing: no blob exists, every upload and manifest is accepted. It runs on a thread of its
/// own for the rest of the process.
fn start_null_registry() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("null-registry".into())
        .spawn(move || {
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                loop {
                    let Ok((s, _)) = listener.accept().await else {
                        continue;
                    };
                    tokio::spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(
                                hyper_util::rt::TokioIo::new(s),
                                hyper::service::service_fn(null_registry),
                            )
                            .await;
                    });
                }
            })
        })?;
    Ok(addr)
}

static UPLOADS: AtomicU64 = AtomicU64::new(0);

async fn null_registry(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, mut body) = req.into_parts();
    let path = parts.uri.path();
    let manifest = path.contains("/manifests/");
    let mut hasher = Sha256::new();
    let mut n: u64 = 0;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(d) = frame.data_ref() {
            n += d.len() as u64;
            if manifest {
                hasher.update(d);
            }
        }
    }
    let digest = parts.uri.query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("digest="))
            .map(|d| d.replace("%3A", ":").replace("%3a", ":"))
    });
    let name = path
        .strip_prefix("/v2/")
        .and_then(|p| {
            p.split_once("/blobs/")
                .or_else(|| p.split_once("/manifests/"))
        })
        .map_or("", |(name, _)| name);
    let reply = |status: StatusCode, headers: &[(&str, String)]| {
        let mut r = Response::builder()
            .status(status)
            .header("docker-distribution-api-version", "registry/2.0");
        for (k, v) in headers {
            r = r.header(*k, v);
        }
        Ok(r.body(Full::new(Bytes::new())).expect("valid response"))
    };
    let m = parts.method.as_str();
    if path == "/v2/" || path == "/v2" {
        return reply(StatusCode::OK, &[]);
    }
    if path.contains("/blobs/uploads/") {
        let upload = |id: &str| format!("/v2/{name}/blobs/uploads/{id}");
        return match (m, digest) {
            ("POST" | "PUT", Some(d)) => reply(
                StatusCode::CREATED,
                &[
                    ("location", format!("/v2/{name}/blobs/{d}")),
                    ("docker-content-digest", d),
                ],
            ),
            ("POST", None) => {
                let id = UPLOADS.fetch_add(1, Ordering::Relaxed).to_string();
                reply(
                    StatusCode::ACCEPTED,
                    &[
                        ("location", upload(&id)),
                        ("range", "0-0".into()),
                        ("docker-upload-uuid", id),
                    ],
                )
            }
            ("PATCH", _) => reply(
                StatusCode::ACCEPTED,
                &[
                    ("location", path.to_string()),
                    ("range", format!("0-{}", n.saturating_sub(1))),
                ],
            ),
            _ => reply(StatusCode::NOT_FOUND, &[]),
        };
    }
    if manifest && m == "PUT" {
        let d = format!("sha256:{:x}", hasher.finalize());
        let reference = path.rsplit('/').next().unwrap_or_default();
        return reply(
            StatusCode::CREATED,
            &[
                ("location", format!("/v2/{name}/manifests/{reference}")),
                ("docker-content-digest", d),
            ],
        );
    }
    reply(StatusCode::NOT_FOUND, &[])
}
