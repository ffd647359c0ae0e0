//! The instance rootfs: an overlayfs of the cached layers (read-only lowers) with the
//! instance's own upper and work dirs, plus the files the platform writes into it.

use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("rootfs {path:?}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("rootfs {path:?}: {reason}")]
    Unsafe { path: PathBuf, reason: &'static str },
    #[error("overlay mount at {target:?} (lowerdir of {layers} layers): {source}")]
    Mount {
        target: PathBuf,
        layers: usize,
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RootfsError + '_ {
    move |source| RootfsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Mounts the overlay at `<instance_dir>/rootfs` and returns that path. `layers` bottom first.
pub fn mount_overlay(instance_dir: &Path, layers: &[PathBuf]) -> Result<PathBuf, RootfsError> {
    let upper = instance_dir.join("upper");
    let work = instance_dir.join("work");
    let target = instance_dir.join("rootfs");
    for d in [&upper, &work, &target] {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(d)
            .map_err(io_err(d))?;
    }
    // overlayfs lists lowers top first.
    let lower: Vec<String> = layers
        .iter()
        .rev()
        .map(|l| l.display().to_string())
        .collect();
    let lowerdir = if lower.is_empty() {
        // overlay needs at least one lower: an empty dir.
        let empty = instance_dir.join("empty");
        fs::create_dir_all(&empty).map_err(io_err(&empty))?;
        empty.display().to_string()
    } else {
        lower.join(":")
    };
    let data = format!(
        "lowerdir={lowerdir},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("path without NUL");
    let data = CString::new(data).expect("no NUL");
    crate::sys::mount(
        Some(c"overlay"),
        &c(&target),
        Some(c"overlay"),
        libc::MS_NODEV,
        Some(&data),
    )
    .map_err(|e| RootfsError::Mount {
        target: target.clone(),
        layers: layers.len(),
        source: io::Error::from_raw_os_error(e),
    })?;
    Ok(target)
}

/// Detaches the host's view of a started instance's overlay (`<instance_dir>/rootfs`); the
/// instance keeps its own. Not mounted is fine.
pub fn unmount_host_view(rootfs: &Path) {
    let c = CString::new(rootfs.as_os_str().as_bytes()).expect("path without NUL");
    if let Err(e) = crate::sys::umount2(&c, libc::MNT_DETACH)
        && e != libc::EINVAL
        && e != libc::ENOENT
    {
        tracing::warn!(path = %rootfs.display(), errno = e, "unmounting the host's view of a rootfs");
    }
}

/// Unmounts the overlay (lazily if busy) and removes the instance dir.
pub fn remove(instance_dir: &Path) -> Result<(), RootfsError> {
    let target = instance_dir.join("rootfs");
    let ct = CString::new(target.as_os_str().as_bytes()).expect("no NUL");
    if is_mountpoint(&target)
        && let Err(e) = crate::sys::umount2(&ct, 0)
        && e != libc::EINVAL
    {
        crate::sys::umount2(&ct, libc::MNT_DETACH).map_err(|e| RootfsError::Io {
            path: target.clone(),
            source: io::Error::from_raw_os_error(e),
        })?;
    }
    match fs::remove_dir_all(instance_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RootfsError::Io {
            path: instance_dir.to_path_buf(),
            source: e,
        }),
    }
}

/// Whether `path` is a mount point: it lies on another device than its parent (an overlay
/// mount gets a device of its own). Reading /proc/self/mountinfo instead cost O(mounts) per
/// call, and with a thousand instances' overlays a stop spent most of its time there.
pub fn is_mountpoint(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(parent) = path.parent() else {
        return false;
    };
    match (fs::symlink_metadata(path), fs::metadata(parent)) {
        (Ok(m), Ok(p)) => m.is_dir() && m.dev() != p.dev(),
        _ => false,
    }
}

pub(crate) fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Creates `rel` (relative to `root`) as a directory, refusing to follow symlinks planted by the
/// image: a symlink or file in the way is replaced by a directory.
pub fn mkdir_in_root(root: &Path, rel: &Path, mode: u32) -> Result<PathBuf, RootfsError> {
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        match c {
            Component::Normal(p) => cur.push(p),
            Component::RootDir | Component::CurDir => continue,
            _ => {
                return Err(RootfsError::Unsafe {
                    path: rel.to_path_buf(),
                    reason: "path leaves the rootfs",
                });
            }
        }
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                fs::remove_file(&cur).map_err(io_err(&cur))?;
                fs::DirBuilder::new()
                    .mode(mode)
                    .create(&cur)
                    .map_err(io_err(&cur))?;
            }
            Err(_) => {
                fs::DirBuilder::new()
                    .mode(mode)
                    .create(&cur)
                    .map_err(io_err(&cur))?;
            }
        }
    }
    Ok(cur)
}

/// Writes `rel` in the rootfs, replacing whatever the image had there (never following it).
pub fn write_file_in_root(root: &Path, rel: &str, content: &[u8]) -> Result<(), RootfsError> {
    let rel = Path::new(rel.trim_start_matches('/'));
    if let Some(parent) = rel.parent() {
        mkdir_in_root(root, parent, 0o755)?;
    }
    let path = root.join(rel);
    if let Ok(m) = fs::symlink_metadata(&path) {
        if m.is_dir() {
            fs::remove_dir_all(&path).map_err(io_err(&path))?;
        } else {
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io_err(&path))?;
    f.write_all(content).map_err(io_err(&path))
}

/// Resolves a path inside the rootfs following symlinks relative to the rootfs (never the host);
/// returns the host path. Used to find executables and to read /etc/passwd.
pub fn resolve_in_root(root: &Path, path: &str) -> Option<PathBuf> {
    let mut parts: Vec<std::ffi::OsString> = Vec::new();
    let mut todo: Vec<std::ffi::OsString> = Path::new(path)
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p.to_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        if c == ".." {
            parts.pop();
            continue;
        }
        parts.push(c);
        let host: PathBuf = std::iter::once(root.as_os_str().to_owned())
            .chain(parts.iter().cloned())
            .collect();
        if let Ok(m) = fs::symlink_metadata(&host)
            && m.file_type().is_symlink()
        {
            hops += 1;
            if hops > 40 {
                return None;
            }
            let target = fs::read_link(&host).ok()?;
            parts.pop();
            if target.is_absolute() {
                parts.clear();
            }
            for tc in target.components().rev() {
                match tc {
                    Component::Normal(p) => todo.push(p.to_owned()),
                    Component::ParentDir => todo.push("..".into()),
                    _ => {}
                }
            }
        }
    }
    let host: PathBuf = std::iter::once(root.as_os_str().to_owned())
        .chain(parts)
        .collect();
    host.exists().then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_stays_in_root() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        fs::create_dir_all(r.join("usr/bin")).unwrap();
        fs::write(r.join("usr/bin/app"), b"x").unwrap();
        std::os::unix::fs::symlink("/usr/bin", r.join("bin")).unwrap();
        std::os::unix::fs::symlink("../../../../../etc", r.join("esc")).unwrap();
        assert_eq!(resolve_in_root(r, "/bin/app"), Some(r.join("usr/bin/app")));
        assert_eq!(resolve_in_root(r, "/esc/passwd"), None);
        std::os::unix::fs::symlink("/etc", r.join("etc")).unwrap();
        write_file_in_root(r, "/etc/hosts", b"h").unwrap();
        assert_eq!(fs::read(r.join("etc/hosts")).unwrap(), b"h");
        assert!(fs::symlink_metadata(r.join("etc")).unwrap().is_dir());
    }
}
