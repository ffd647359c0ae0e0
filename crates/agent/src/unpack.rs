//! Layer unpacking and the layer cache.
//!
//! Each layer blob (gzip or plain tar) is verified against its digest and unpacked once into
//! `<cache>/layers/<alg>-<hex>/`, a directory usable as an overlayfs lower dir: OCI whiteouts
//! become overlay whiteouts (`.wh.<name>` → char device 0:0, `.wh..wh..opq` → the xattr
//! `trusted.overlay.opaque=y` on the directory). Unpacking goes into a temp dir that is synced
//! and renamed into place, so a cache dir that exists is complete. Concurrent requests for the
//! same layer share one unpack.
//!
//! Entries that would escape the layer (absolute paths, `..`, writes through a symlink, hard
//! links to outside) are refused with an error naming the entry.

use ferry_oci::{Digest, Hasher};
use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{self, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer {digest}: blob {path:?}: {source}")]
    Blob {
        digest: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("layer {digest}: content has digest {actual}")]
    DigestMismatch { digest: String, actual: String },
    #[error("layer {digest}: unsupported compression (magic {magic})")]
    Compression { digest: String, magic: String },
    #[error("layer {digest}: entry {entry:?}: {reason}")]
    Unsafe {
        digest: String,
        entry: String,
        reason: &'static str,
    },
    #[error("layer {digest}: entry {entry:?}: {source}")]
    Entry {
        digest: String,
        entry: String,
        source: io::Error,
    },
    #[error("layer {digest}: reading tar: {source}")]
    Tar { digest: String, source: io::Error },
    #[error("layer cache {path:?}: {source}")]
    Cache { path: PathBuf, source: io::Error },
    #[error("layer {digest}: unpack task failed: {message}")]
    Task { digest: String, message: String },
}

/// The on-disk layer cache. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct LayerCache {
    root: PathBuf,
    inflight: Mutex<HashMap<Digest, Arc<OnceCell<PathBuf>>>>,
}

impl LayerCache {
    /// A cache rooted at `root` (layers go to `root/layers/`).
    pub fn new(root: impl Into<PathBuf>) -> LayerCache {
        LayerCache {
            root: root.into(),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// Where the unpacked layer `digest` lives (whether or not it exists yet).
    pub fn layer_dir(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("layers")
            .join(format!("{}-{}", digest.algorithm().as_str(), digest.hex()))
    }

    /// Whether `digest` is unpacked.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.layer_dir(digest).is_dir()
    }

    /// Unpacks the blob at `blob` (which must have digest `digest`) unless it is cached;
    /// returns the layer dir. Concurrent calls for one digest do the work once.
    pub async fn ensure(&self, digest: &Digest, blob: &Path) -> Result<PathBuf, UnpackError> {
        let dir = self.layer_dir(digest);
        if dir.is_dir() {
            return Ok(dir);
        }
        let cell = {
            let mut map = self.inflight.lock().unwrap();
            map.entry(digest.clone()).or_default().clone()
        };
        let result = cell
            .get_or_try_init(|| {
                let digest = digest.clone();
                let blob = blob.to_path_buf();
                let dir = dir.clone();
                async move {
                    if dir.is_dir() {
                        return Ok(dir);
                    }
                    let d2 = digest.clone();
                    tokio::task::spawn_blocking(move || unpack_into_cache(&d2, &blob, &dir))
                        .await
                        .map_err(|e| UnpackError::Task {
                            digest: digest.to_string(),
                            message: e.to_string(),
                        })?
                }
            })
            .await
            .cloned();
        // Done (or failed): later callers find the dir on disk, or retry.
        self.inflight.lock().unwrap().remove(digest);
        result
    }
}

fn unpack_into_cache(digest: &Digest, blob: &Path, dir: &Path) -> Result<PathBuf, UnpackError> {
    let parent = dir.parent().expect("layer dir has a parent");
    let cache_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| UnpackError::Cache { path, source }
    };
    fs::create_dir_all(parent).map_err(cache_err(parent))?;
    let tmp = parent.join(format!(
        ".tmp-{}-{}",
        digest.hex(),
        uuid::Uuid::new_v4().simple()
    ));
    fs::DirBuilder::new()
        .mode(0o755)
        .create(&tmp)
        .map_err(cache_err(&tmp))?;
    let result = (|| {
        let file = fs::File::open(blob).map_err(|source| UnpackError::Blob {
            digest: digest.to_string(),
            path: blob.to_path_buf(),
            source,
        })?;
        unpack_layer(digest, file, &tmp)?;
        sync_fs(&tmp).map_err(cache_err(&tmp))?;
        match fs::rename(&tmp, dir) {
            Ok(()) => {}
            // Another process won the race: its copy is as good as ours.
            Err(_) if dir.is_dir() => {
                let _ = fs::remove_dir_all(&tmp);
            }
            Err(e) => return Err(cache_err(dir)(e)),
        }
        fs::File::open(parent)
            .and_then(|f| f.sync_all())
            .map_err(cache_err(parent))?;
        Ok(dir.to_path_buf())
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

fn sync_fs(path: &Path) -> io::Result<()> {
    let f = fs::File::open(path)?;
    use std::os::fd::AsRawFd;
    // SAFETY: syncfs takes a valid open fd, which `f` owns for the duration of the call.
    let r = unsafe { libc::syncfs(f.as_raw_fd()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads a blob while hashing it.
struct HashingReader<R> {
    inner: R,
    hasher: Option<Hasher>,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = self.hasher.as_mut() {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// Unpacks one layer blob (gzip or plain tar) read from `blob` into `dest`, verifying that the
/// blob's bytes have `digest`. `dest` should be empty; on error it is left partly written.
pub fn unpack_layer(digest: &Digest, blob: impl Read, dest: &Path) -> Result<(), UnpackError> {
    let dstr = digest.to_string();
    let mut hashing = BufReader::with_capacity(
        256 * 1024,
        HashingReader {
            inner: blob,
            hasher: Some(Hasher::new(digest.algorithm())),
        },
    );
    let magic = {
        use std::io::BufRead;
        let buf = hashing.fill_buf().map_err(|source| UnpackError::Tar {
            digest: dstr.clone(),
            source,
        })?;
        buf[..buf.len().min(4)].to_vec()
    };
    let reader: Box<dyn Read + '_> = if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(&mut hashing))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Err(UnpackError::Compression {
            digest: dstr,
            magic: "zstd".into(),
        });
    } else {
        Box::new(&mut hashing)
    };
    let mut archive = tar::Archive::new(reader);
    let mut dirs: Vec<(PathBuf, u64)> = Vec::new();
    let entries = archive.entries().map_err(|source| UnpackError::Tar {
        digest: dstr.clone(),
        source,
    })?;
    for entry in entries {
        let mut entry = entry.map_err(|source| UnpackError::Tar {
            digest: dstr.clone(),
            source,
        })?;
        unpack_entry(&dstr, &mut entry, dest, &mut dirs)?;
    }
    // Drain what the tar reader left (padding, gzip trailer) so the digest covers it all.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|source| UnpackError::Tar {
        digest: dstr.clone(),
        source,
    })?;
    drop(rest);
    io::copy(&mut hashing, &mut io::sink()).map_err(|source| UnpackError::Tar {
        digest: dstr.clone(),
        source,
    })?;
    let actual = hashing.into_inner().hasher.take().expect("hasher").finish();
    if &actual != digest {
        return Err(UnpackError::DigestMismatch {
            digest: dstr,
            actual: actual.to_string(),
        });
    }
    // Directory times last: adding children changed them.
    for (dir, mtime) in dirs.iter().rev() {
        let _ = set_mtime(dir, mtime_of(*mtime), false);
    }
    Ok(())
}

fn mtime_of(secs: u64) -> i64 {
    i64::try_from(secs).unwrap_or(0)
}

/// Normalizes an entry path to components below the layer root, refusing escapes.
pub(crate) fn safe_relative(path: &Path) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err("path contains \"..\""),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
        }
    }
    Ok(out)
}

/// Refuses when any parent of `rel` inside `root` is a symlink or not a directory, creating
/// missing parents as directories (mode 0755).
fn ensure_parents(root: &Path, rel: &Path) -> Result<(), Result<io::Error, &'static str>> {
    let mut cur = root.to_path_buf();
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    for c in parent.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => return Err(Err("parent is a symlink")),
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(Err("parent is not a directory")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new().mode(0o755).create(&cur).map_err(Ok)?;
            }
            Err(e) => return Err(Ok(e)),
        }
    }
    Ok(())
}

fn unpack_entry<R: Read>(
    digest: &str,
    entry: &mut tar::Entry<'_, R>,
    dest: &Path,
    dirs: &mut Vec<(PathBuf, u64)>,
) -> Result<(), UnpackError> {
    let raw_path = entry.path().map_err(|source| UnpackError::Tar {
        digest: digest.to_string(),
        source,
    })?;
    let entry_name = raw_path.display().to_string();
    let unsafe_err = |reason: &'static str| UnpackError::Unsafe {
        digest: digest.to_string(),
        entry: entry_name.clone(),
        reason,
    };
    let io_err = |source: io::Error| UnpackError::Entry {
        digest: digest.to_string(),
        entry: entry_name.clone(),
        source,
    };
    let rel = safe_relative(&raw_path).map_err(unsafe_err)?;
    if rel.as_os_str().is_empty() {
        // The root itself ("./"): nothing to create.
        return Ok(());
    }
    ensure_parents(dest, &rel).map_err(|e| match e {
        Ok(io) => io_err(io),
        Err(reason) => unsafe_err(reason),
    })?;
    let file_name = rel.file_name().expect("non-empty path").to_owned();
    let name_bytes = file_name.as_bytes();

    // OCI whiteouts.
    if let Some(hidden) = name_bytes.strip_prefix(b".wh.") {
        let parent = dest.join(rel.parent().unwrap_or(Path::new("")));
        if hidden == b".wh..opq" {
            lsetxattr(&parent, "trusted.overlay.opaque", b"y").map_err(io_err)?;
        } else {
            if hidden.is_empty() {
                return Err(unsafe_err("empty whiteout name"));
            }
            let target = parent.join(OsStr::from_bytes(hidden));
            remove_existing(&target).map_err(io_err)?;
            mknod(&target, libc::S_IFCHR, 0).map_err(io_err)?;
        }
        return Ok(());
    }

    let target = dest.join(&rel);
    let header = entry.header();
    let kind = header.entry_type();
    let mode = header.mode().unwrap_or(0o644) & 0o7777;
    let uid = header.uid().unwrap_or(0);
    let gid = header.gid().unwrap_or(0);
    let mtime = header.mtime().unwrap_or(0);
    let existing = fs::symlink_metadata(&target).ok();
    if let Some(m) = &existing
        && !(m.is_dir() && kind.is_dir())
    {
        remove_existing(&target).map_err(io_err)?;
    }
    use tar::EntryType as T;
    match kind {
        T::Directory => {
            if existing.as_ref().is_none_or(|m| !m.is_dir()) {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&target)
                    .map_err(io_err)?;
            }
            dirs.push((target.clone(), mtime));
        }
        T::Regular | T::Continuous | T::GNUSparse => {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&target)
                .map_err(io_err)?;
            io::copy(entry, &mut f).map_err(io_err)?;
        }
        T::Symlink => {
            let link = entry
                .link_name()
                .map_err(io_err)?
                .ok_or_else(|| unsafe_err("symlink without target"))?;
            std::os::unix::fs::symlink(&link, &target).map_err(io_err)?;
        }
        T::Link => {
            let link = entry
                .link_name()
                .map_err(io_err)?
                .ok_or_else(|| unsafe_err("hard link without target"))?;
            let link_rel = safe_relative(&link)
                .map_err(|_| unsafe_err("hard link points outside the layer"))?;
            if link_rel.as_os_str().is_empty() {
                return Err(unsafe_err("hard link to the layer root"));
            }
            ensure_parents(dest, &link_rel).map_err(|e| match e {
                Ok(io) => io_err(io),
                Err(_) => unsafe_err("hard link points through a symlink"),
            })?;
            let src = dest.join(&link_rel);
            match fs::symlink_metadata(&src) {
                Ok(m) if m.is_dir() => return Err(unsafe_err("hard link to a directory")),
                Ok(_) => {}
                Err(_) => return Err(unsafe_err("hard link target not in this layer")),
            }
            fs::hard_link(&src, &target).map_err(io_err)?;
            // A hard link shares the target's metadata; the header's is not applied.
            return Ok(());
        }
        T::Char | T::Block | T::Fifo => {
            let major = header.device_major().ok().flatten().unwrap_or(0);
            let minor = header.device_minor().ok().flatten().unwrap_or(0);
            let ty = match kind {
                T::Char => libc::S_IFCHR,
                T::Block => libc::S_IFBLK,
                _ => libc::S_IFIFO,
            };
            mknod(&target, ty | 0o600, libc::makedev(major, minor)).map_err(io_err)?;
        }
        // PAX/GNU headers are consumed by the tar crate; anything else is skipped.
        _ => return Ok(()),
    }

    // Ownership, xattrs, mode, times (mode after chown: chown clears set-id bits).
    let is_link = kind == T::Symlink;
    lchown(&target, uid, gid).map_err(io_err)?;
    if let Ok(Some(exts)) = entry.pax_extensions() {
        for ext in exts.flatten() {
            let Ok(key) = ext.key() else { continue };
            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                lsetxattr(&target, name, ext.value_bytes()).map_err(io_err)?;
            }
        }
    }
    if !is_link {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&target, fs::Permissions::from_mode(mode)).map_err(io_err)?;
    }
    if !kind.is_dir() {
        set_mtime(&target, mtime_of(mtime), is_link).map_err(io_err)?;
    }
    Ok(())
}

fn remove_existing(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

fn mknod(path: &Path, mode: libc::mode_t, dev: libc::dev_t) -> io::Result<()> {
    let p = cpath(path)?;
    // SAFETY: `p` is a valid NUL-terminated string that outlives the call.
    let r = unsafe { libc::mknod(p.as_ptr(), mode, dev) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn lchown(path: &Path, uid: u64, gid: u64) -> io::Result<()> {
    let p = cpath(path)?;
    let (Ok(uid), Ok(gid)) = (u32::try_from(uid), u32::try_from(gid)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "uid/gid out of range",
        ));
    };
    // SAFETY: `p` is a valid NUL-terminated string that outlives the call.
    let r = unsafe { libc::lchown(p.as_ptr(), uid, gid) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(crate) fn lsetxattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let p = cpath(path)?;
    let n = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "xattr name contains NUL"))?;
    // SAFETY: `p` and `n` are valid NUL-terminated strings and `value` a valid slice, all
    // outliving the call.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_mtime(path: &Path, secs: i64, nofollow: bool) -> io::Result<()> {
    let p = cpath(path)?;
    let ts = libc::timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    let times = [ts, ts];
    let flags = if nofollow {
        libc::AT_SYMLINK_NOFOLLOW
    } else {
        0
    };
    // SAFETY: `p` is a valid NUL-terminated string and `times` an array of two timespecs, both
    // outliving the call.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), flags) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    fn header(path: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        // Bypass the tar crate's own path checks so hostile names can be written.
        let name = path.as_bytes();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(1000);
        h.set_gid(1001);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        h
    }

    enum E<'a> {
        Dir(&'a str),
        File(&'a str, &'a [u8]),
        Sym(&'a str, &'a str),
        Hard(&'a str, &'a str),
    }

    fn build(entries: &[E<'_>], gzip: bool) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            match e {
                E::Dir(p) => {
                    let h = header(p, tar::EntryType::Directory, 0, 0o755);
                    b.append(&h, io::empty()).unwrap();
                }
                E::File(p, data) => {
                    let h = header(p, tar::EntryType::Regular, data.len() as u64, 0o640);
                    b.append(&h, *data).unwrap();
                }
                E::Sym(p, t) | E::Hard(p, t) => {
                    let kind = if matches!(e, E::Sym(..)) {
                        tar::EntryType::Symlink
                    } else {
                        tar::EntryType::Link
                    };
                    let mut h = header(p, kind, 0, 0o777);
                    let tb = t.as_bytes();
                    h.as_old_mut().linkname[..tb.len()].copy_from_slice(tb);
                    h.set_cksum();
                    b.append(&h, io::empty()).unwrap();
                }
            }
        }
        let tar = b.into_inner().unwrap();
        if gzip {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&tar).unwrap();
            gz.finish().unwrap()
        } else {
            tar
        }
    }

    fn unpack(blob: &[u8]) -> (tempfile::TempDir, Result<(), UnpackError>) {
        let dir = tempfile::tempdir().unwrap();
        let d = Digest::sha256(blob);
        let r = unpack_layer(&d, blob, dir.path());
        (dir, r)
    }

    #[test]
    fn unpacks_files_dirs_links_and_metadata() {
        for gzip in [false, true] {
            let blob = build(
                &[
                    E::Dir("./etc/"),
                    E::File("./etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
                    E::File("bin/app", b"#!app"),
                    E::Sym("bin/sh", "/bin/app"),
                    E::Hard("bin/app2", "bin/app"),
                ],
                gzip,
            );
            let (dir, r) = unpack(&blob);
            r.unwrap();
            let root = dir.path();
            let m = fs::metadata(root.join("etc/passwd")).unwrap();
            assert_eq!(m.mode() & 0o7777, 0o640);
            assert_eq!((m.uid(), m.gid()), (1000, 1001));
            assert_eq!(m.mtime(), 1_700_000_000);
            assert_eq!(
                fs::read_link(root.join("bin/sh")).unwrap(),
                Path::new("/bin/app")
            );
            let a = fs::metadata(root.join("bin/app")).unwrap();
            let b = fs::metadata(root.join("bin/app2")).unwrap();
            assert_eq!(a.ino(), b.ino());
            assert_eq!(
                fs::metadata(root.join("etc")).unwrap().mode() & 0o7777,
                0o755
            );
        }
    }

    #[test]
    fn whiteouts_become_overlay_whiteouts() {
        let blob = build(
            &[
                E::Dir("a/"),
                E::File("a/.wh.gone", b""),
                E::Dir("b/"),
                E::File("b/.wh..wh..opq", b""),
            ],
            true,
        );
        let (dir, r) = unpack(&blob);
        r.unwrap();
        let m = fs::symlink_metadata(dir.path().join("a/gone")).unwrap();
        assert!(m.file_type().is_char_device());
        assert_eq!(m.rdev(), 0);
        assert!(!dir.path().join("a/.wh.gone").exists());
        let mut buf = [0u8; 8];
        let p = cpath(&dir.path().join("b")).unwrap();
        // SAFETY: valid C strings and buffer.
        let n = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        assert_eq!(n, 1, "opaque xattr set");
        assert_eq!(buf[0], b'y');
    }

    fn assert_refused(entries: &[E<'_>], name: &str) {
        let blob = build(entries, false);
        let (dir, r) = unpack(&blob);
        match r {
            Err(UnpackError::Unsafe { entry, .. }) => assert_eq!(entry, name),
            other => panic!("expected refusal of {name}, got {other:?}"),
        }
        drop(dir);
    }

    #[test]
    fn tar_slip_is_refused() {
        let outside = tempfile::tempdir().unwrap();
        assert_refused(&[E::File("../evil", b"x")], "../evil");
        assert_refused(&[E::File("a/../../evil", b"x")], "a/../../evil");
        assert_refused(&[E::File("/etc/evil", b"x")], "/etc/evil");
        let out = outside.path().to_str().unwrap().to_string();
        assert_refused(
            &[E::Sym("link", &out), E::File("link/evil", b"x")],
            "link/evil",
        );
        assert_refused(&[E::Hard("h", "../../etc/passwd")], "h");
        assert_refused(&[E::Hard("h", "/etc/passwd")], "h");
        assert!(!outside.path().join("evil").exists());
    }

    #[test]
    fn digest_mismatch_is_an_error() {
        let blob = build(&[E::File("a", b"x")], true);
        let dir = tempfile::tempdir().unwrap();
        let wrong = Digest::sha256(b"something else");
        let r = unpack_layer(&wrong, &blob[..], dir.path());
        assert!(
            matches!(r, Err(UnpackError::DigestMismatch { .. })),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn cache_unpacks_once_under_concurrency() {
        let tmp = tempfile::tempdir().unwrap();
        let blob = build(&[E::File("x", b"hello")], true);
        let bpath = tmp.path().join("blob");
        fs::write(&bpath, &blob).unwrap();
        let d = Digest::sha256(&blob);
        let cache = Arc::new(LayerCache::new(tmp.path().join("cache")));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (c, d, b) = (cache.clone(), d.clone(), bpath.clone());
            tasks.push(tokio::spawn(async move { c.ensure(&d, &b).await }));
        }
        for t in tasks {
            let dir = t.await.unwrap().unwrap();
            assert_eq!(fs::read(dir.join("x")).unwrap(), b"hello");
        }
        // No temp dirs left behind.
        let names: Vec<_> = fs::read_dir(tmp.path().join("cache/layers"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    proptest::proptest! {
        #[test]
        fn safe_relative_never_escapes(parts in proptest::collection::vec("[a-z.]{0,4}|\\.\\.|/", 0..8)) {
            let p: PathBuf = parts.iter().collect();
            if let Ok(rel) = safe_relative(&p) {
                proptest::prop_assert!(rel.components().all(|c| matches!(c, Component::Normal(_))));
            }
        }
    }
}
