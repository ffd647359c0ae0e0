//! The registry with the clients users have: skopeo, oras (PyPI), podman, and `ferry image`,
//! through the real `ferry registry` process. scripts/test installs the clients.

use anyhow::{Context, Result, bail, ensure};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn need(tool: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "{tool} is not installed; scripts/test installs it"
    );
}

/// A `ferry registry` child process on a free port; killed on drop.
struct Registry {
    child: Child,
    addr: String,
}

impl Registry {
    fn start(data: &Path) -> Result<Registry> {
        let _ = std::fs::remove_file(data.join("addresses.json"));
        let child = ferry()
            .args(["registry", "--registry-addr", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .env("FERRY_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(b) = std::fs::read(data.join("addresses.json")) {
                let v: serde_json::Value = serde_json::from_slice(&b)?;
                let addr = v["registry"]
                    .as_str()
                    .context("registry address")?
                    .to_string();
                return Ok(Registry { child, addr });
            }
            ensure!(Instant::now() < deadline, "registry did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn skopeo(args: &[&str]) -> Result<String> {
    run(Command::new("skopeo")
        .args(["--insecure-policy"])
        .args(args))
}

/// Files of an OCI layout's blob directory: name → bytes' sha256 (checked against the name).
fn layout_blobs(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir.join("blobs/sha256"))? {
        let p = e?.path();
        let (d, _) = ferry_oci::layout::hash_file(&p)?;
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        ensure!(d.hex() == name, "blob {} hashes to {d}", p.display());
        names.push(name);
    }
    names.sort();
    Ok(names)
}

fn manifest_digest(layout: &Path) -> Result<String> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    Ok(v["manifests"][0]["digest"]
        .as_str()
        .context("index entry")?
        .to_string())
}

/// Builds an image of `layers` layers with `mib_per_layer` MiB of incompressible data each.
fn build_image(work: &Path, layers: usize, mib_per_layer: usize) -> Result<(PathBuf, String)> {
    let mut cmd = ferry();
    cmd.args([
        "image",
        "build",
        "--tag",
        "v1",
        "--entrypoint",
        "/bin/app",
        "--port",
        "8080",
    ]);
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..layers {
        let dir = work.join(format!("layer{i}"));
        std::fs::create_dir_all(&dir)?;
        let mut data = vec![0u8; mib_per_layer << 20];
        for chunk in data.chunks_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            chunk.copy_from_slice(&seed.to_le_bytes()[..chunk.len()]);
        }
        std::fs::write(dir.join(format!("data{i}.bin")), &data)?;
        cmd.arg("--dir").arg(&dir);
    }
    let archive = work.join("image.tar");
    let digest = run(cmd.arg("-o").arg(&archive))?.trim().to_string();
    Ok((archive, digest))
}

fn round_trip(layers: usize, mib: usize) -> Result<()> {
    need("skopeo");
    let work = tempfile::tempdir()?;
    let reg = Registry::start(&work.path().join("data"))?;
    let (archive, digest) = build_image(work.path(), layers, mib)?;
    let dest = format!("docker://{}/rt/image:v1", reg.addr);
    skopeo(&[
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci-archive:{}:v1", archive.display()),
        &dest,
    ])?;
    let back = work.path().join("back");
    skopeo(&[
        "copy",
        "--preserve-digests",
        "--src-tls-verify=false",
        &dest,
        &format!("oci:{}:v1", back.display()),
    ])?;
    assert_eq!(
        manifest_digest(&back)?,
        digest,
        "same manifest digest after the round trip"
    );
    // The original layout, unpacked, has exactly the same blobs, byte for byte (names are
    // verified hashes).
    let orig = work.path().join("orig");
    ferry_oci::layout::unpack_archive(&archive, &orig)?;
    assert_eq!(layout_blobs(&orig)?, layout_blobs(&back)?);
    assert_eq!(layout_blobs(&back)?.len(), layers + 2);
    Ok(())
}

#[test]
fn skopeo_round_trip_tiny_image() -> Result<()> {
    round_trip(1, 1)
}

#[test]
fn skopeo_round_trip_200mb_five_layers() -> Result<()> {
    round_trip(5, 40)
}

#[test]
fn ferry_image_push_then_skopeo_inspect() -> Result<()> {
    need("skopeo");
    let work = tempfile::tempdir()?;
    let reg = Registry::start(&work.path().join("data"))?;
    let (archive, digest) = build_image(work.path(), 2, 1)?;
    let pushed = run(ferry()
        .args(["image", "push"])
        .arg(format!("{}:v1", archive.display()))
        .arg(format!("{}/pushed:v7", reg.addr)))?;
    assert_eq!(pushed.trim(), digest);
    let out = skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{}/pushed:v7", reg.addr),
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["Digest"], digest);
    // Bad destination is named in the error.
    let o = ferry()
        .args(["image", "push"])
        .arg(&archive)
        .arg("NOPE/x")
        .output()?;
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("NOPE/x"));
    Ok(())
}

#[test]
fn oras_artifact_round_trip() -> Result<()> {
    let work = tempfile::tempdir()?;
    let reg = Registry::start(&work.path().join("data"))?;
    let files = work.path().join("files");
    std::fs::create_dir_all(&files)?;
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(files.join("model.bin"), &payload)?;
    std::fs::write(files.join("README.txt"), b"an artifact")?;
    let script = r#"
import sys, os, oras.client
addr, out = sys.argv[1], sys.argv[2]
c = oras.client.OrasClient(hostname=addr, insecure=True)
r = c.push(files=["model.bin", "README.txt"], target=f"{addr}/artifacts/demo:v1", disable_path_validation=True)
assert r.status_code == 201, r.status_code
got = c.pull(target=f"{addr}/artifacts/demo:v1", outdir=out)
print("\n".join(sorted(os.path.basename(f) for f in got)))
"#;
    let out = work.path().join("out");
    let o = Command::new("python3")
        .current_dir(&files)
        .args(["-c", script, &reg.addr])
        .arg(&out)
        .output()?;
    ensure!(
        o.status.success(),
        "oras: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "README.txt\nmodel.bin"
    );
    assert_eq!(std::fs::read(out.join("model.bin"))?, payload);
    Ok(())
}

#[test]
fn podman_push_and_pull() -> Result<()> {
    need("podman");
    need("skopeo");
    let work = tempfile::tempdir()?;
    let reg = Registry::start(&work.path().join("data"))?;
    let (archive, _) = build_image(work.path(), 1, 1)?;
    let src = format!("{}/podman/src:v1", reg.addr);
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci-archive:{}:v1", archive.display()),
        &format!("docker://{src}"),
    ])?;
    let storage = [
        "--root",
        &work.path().join("podman-root").display().to_string(),
        "--runroot",
        &work.path().join("podman-run").display().to_string(),
    ];
    run(Command::new("podman")
        .args(storage)
        .args(["pull", "--tls-verify=false", &src]))?;
    let dst = format!("{}/podman/dst:v2", reg.addr);
    run(Command::new("podman")
        .args(storage)
        .args(["push", "--tls-verify=false", &src, &dst]))?;
    let out = skopeo(&["inspect", "--tls-verify=false", &format!("docker://{dst}")])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(
        v["Layers"].as_array().is_some_and(|l| l.len() == 1),
        "{out}"
    );
    Ok(())
}

/// A kill -9 in the middle of a large push, then a restart: nothing half-written is served,
/// every stored blob matches its name, and the push can be done again.
#[test]
fn kill_9_during_push_then_restart() -> Result<()> {
    need("skopeo");
    let work = tempfile::tempdir()?;
    let data = work.path().join("data");
    let reg = Registry::start(&data)?;
    let (archive, digest) = build_image(work.path(), 3, 40)?;
    let src = format!("oci-archive:{}:v1", archive.display());
    let dest = format!("docker://{}/crash/image:v1", reg.addr);
    let mut push = Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--dest-tls-verify=false",
            &src,
            &dest,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // Wait until an upload holds some bytes, then kill the registry mid-stream.
    let uploads = data.join("registry/uploads");
    let deadline = Instant::now() + Duration::from_secs(60);
    'wait: loop {
        if let Ok(rd) = std::fs::read_dir(&uploads) {
            for e in rd.flatten() {
                if std::fs::metadata(e.path().join("data"))
                    .map(|m| m.len())
                    .unwrap_or(0)
                    > 4 << 20
                {
                    break 'wait;
                }
            }
        }
        if Instant::now() > deadline {
            bail!("no upload in progress seen");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    reg.kill9();
    let status = push.wait()?;
    assert!(!status.success(), "the push cannot have succeeded");

    let reg = Registry::start(&data)?;
    // Nothing of the interrupted push is visible as an image; every blob is intact.
    let o = Command::new("skopeo")
        .args([
            "inspect",
            "--tls-verify=false",
            &format!("docker://{}/crash/image:v1", reg.addr),
        ])
        .output()?;
    assert!(
        !o.status.success(),
        "the manifest never arrived, so the image must not exist"
    );
    for alg in ["sha256", "sha512"] {
        if let Ok(rd) = std::fs::read_dir(data.join("registry/blobs").join(alg)) {
            for e in rd {
                let p = e?.path();
                let (d, _) = ferry_oci::layout::hash_file(&p)?;
                assert_eq!(
                    d.hex(),
                    p.file_name().unwrap().to_string_lossy(),
                    "corrupt blob {}",
                    p.display()
                );
            }
        }
    }
    // The push can be done again, and the image comes back identical.
    let dest = format!("docker://{}/crash/image:v1", reg.addr);
    skopeo(&[
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &src,
        &dest,
    ])?;
    let back = work.path().join("back");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &dest,
        &format!("oci:{}:v1", back.display()),
    ])?;
    assert_eq!(manifest_digest(&back)?, digest);
    layout_blobs(&back)?;
    // Stale upload sessions are cleaned by gc.
    drop(reg);
    let out =
        run(ferry()
            .args(["registry", "--data-dir"])
            .arg(&data)
            .args(["gc", "--grace-secs", "0"]))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert!(v["blobs_kept"].as_u64().unwrap() >= 5, "{out}");
    Ok(())
}
