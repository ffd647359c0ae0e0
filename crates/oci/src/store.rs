//! The content-addressed store on the file system, as the registry and the layout writer use it.
//!
//! ```text
//! <root>/blobs/<alg>/<hex>                      content, visible only once verified and fsynced
//! <root>/uploads/<id>/{data,repo}               upload sessions (survive restarts, resumable)
//! <root>/tmp/                                   staging for atomic writes, and uploaded copies of
//!                                               content already stored, awaiting removal;
//!                                               emptied on open
//! <root>/repos/<name>/_links/<alg>/<hex>        blob belongs to the repository
//! <root>/repos/<name>/_manifests/<alg>/<hex>    manifest revision; file holds its media type
//! <root>/repos/<name>/_tags/<tag>               tag → manifest digest
//! <root>/repos/<name>/_referrers/<subject>/<d>  referrer descriptor (JSON)
//! <root>/gc.lock                                writers hold it shared, `gc` exclusive
//! ```
//!
//! Every write goes to `tmp/`, is fsynced, renamed into place, and the directory fsynced, so a
//! kill -9 at any moment leaves either the old state or the new one, never a torn file.
//! Repository path components never start with `_`, so they cannot collide with these names.

use crate::manifest::{Descriptor, Manifest};
use crate::{Algorithm, Digest, Hasher};
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store i/o on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("content digest is {actual}, expected {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("upload {0:?} is unknown")]
    UploadUnknown(String),
}

type Result<T> = std::result::Result<T, StoreError>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Returns `Ok(None)` for a missing file.
fn read_opt(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn remove_opt(path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}

/// A repository-independent view of the store's counts after a garbage collection.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    pub blobs_kept: u64,
    pub blobs_deleted: u64,
    pub bytes_freed: u64,
    pub uploads_removed: u64,
}

/// A committed upload.
#[derive(Debug)]
pub struct Committed {
    /// The blob's size in bytes.
    pub size: u64,
    /// The upload's own copy of content that was already stored, staged under `tmp/` for the
    /// caller to remove.
    pub duplicate: Option<PathBuf>,
}

/// What an upload session holds so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadState {
    pub repository: String,
    pub size: u64,
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// A held gc lock (shared for writers, exclusive for gc); released on drop.
pub struct GcGuard(#[allow(dead_code)] nix::fcntl::Flock<File>);

impl Store {
    /// Opens (creating) the store at `root`, and empties its staging directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        for d in ["blobs/sha256", "blobs/sha512", "uploads", "repos", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        let tmp = root.join("tmp");
        for e in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let e = e.map_err(io_err(&tmp))?;
            let _ = fs::remove_file(e.path());
        }
        Ok(Store { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self, exclusive: bool) -> Result<GcGuard> {
        use nix::fcntl::{Flock, FlockArg};
        let path = self.root.join("gc.lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let arg = if exclusive {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockShared
        };
        Flock::lock(f, arg)
            .map(GcGuard)
            .map_err(|(_, e)| io_err(&path)(io::Error::from(e)))
    }

    /// Held by every write that makes content reachable; `gc` waits for them and they for it.
    pub fn write_lock(&self) -> Result<GcGuard> {
        self.lock(false)
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(d.algorithm().as_str())
            .join(d.hex())
    }

    /// Size of a stored blob, if present.
    pub fn blob_size(&self, d: &Digest) -> Result<Option<u64>> {
        let p = self.blob_path(d);
        match fs::metadata(&p) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&p)(e)),
        }
    }

    pub fn read_blob(&self, d: &Digest) -> Result<Option<Vec<u8>>> {
        read_opt(&self.blob_path(d))
    }

    /// Writes `bytes` to `dest` atomically and durably.
    pub fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<()> {
        let tmp = self
            .root
            .join("tmp")
            .join(uuid::Uuid::new_v4().simple().to_string());
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        drop(f);
        self.install(&tmp, dest)
    }

    /// Renames a synced staging file into place and syncs the directory.
    fn install(&self, tmp: &Path, dest: &Path) -> Result<()> {
        let parent = dest.parent().expect("store paths have parents");
        fs::create_dir_all(parent).map_err(io_err(parent))?;
        fs::rename(tmp, dest).map_err(io_err(dest))?;
        fsync_dir(parent)
    }

    /// Stores `bytes` as a blob after checking they hash to `digest`.
    pub fn put_blob(&self, digest: &Digest, bytes: &[u8]) -> Result<()> {
        let actual = Digest::of(digest.algorithm(), bytes);
        if &actual != digest {
            return Err(StoreError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        if self.blob_size(digest)?.is_some() {
            return Ok(());
        }
        self.write_atomic(&self.blob_path(digest), bytes)
    }

    // ---- uploads ----

    fn upload_dir(&self, id: &str) -> PathBuf {
        self.root.join("uploads").join(id)
    }

    /// Path of an upload's data file (appended to by the registry).
    pub fn upload_data(&self, id: &str) -> PathBuf {
        self.upload_dir(id).join("data")
    }

    pub fn create_upload(&self, repository: &str) -> Result<String> {
        let id = uuid::Uuid::new_v4().to_string();
        let dir = self.upload_dir(&id);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let data = dir.join("data");
        File::create(&data).map_err(io_err(&data))?;
        let repo = dir.join("repo");
        fs::write(&repo, repository).map_err(io_err(&repo))?;
        Ok(id)
    }

    pub fn upload_state(&self, id: &str) -> Result<Option<UploadState>> {
        if uuid::Uuid::parse_str(id).is_err() {
            return Ok(None);
        }
        let dir = self.upload_dir(id);
        let Some(repo) = read_opt(&dir.join("repo"))? else {
            return Ok(None);
        };
        let data = dir.join("data");
        let size = match fs::metadata(&data) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&data)(e)),
        };
        Ok(Some(UploadState {
            repository: String::from_utf8_lossy(&repo).into_owned(),
            size,
        }))
    }

    pub fn delete_upload(&self, id: &str) -> Result<bool> {
        if uuid::Uuid::parse_str(id).is_err() {
            return Ok(false);
        }
        let dir = self.upload_dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(&dir)(e)),
        }
    }

    /// Verifies an upload against `expected` and makes it a blob linked into `repository`.
    /// `hashed` is the streaming sha256 the caller kept while appending, when it covers the
    /// whole file; otherwise the file is hashed again here.
    ///
    /// When the blob is already stored (another repository pushed the same content), the
    /// stored file stays and its modification time is renewed, so that gc's grace period
    /// counts from this push; the upload's copy is staged under `tmp/` and returned for the
    /// caller to remove when it suits it: unlinking a large file is slow on a disk mounted
    /// with `discard` (8 ms for 40 MiB here), and replacing the stored file by rename did the
    /// same unlink inside the request. [`Store::open`] empties `tmp/` of anything left.
    pub fn commit_upload(
        &self,
        id: &str,
        repository: &str,
        expected: &Digest,
        hashed: Option<Digest>,
    ) -> Result<Committed> {
        let data = self.upload_data(id);
        let f = File::open(&data).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::UploadUnknown(id.to_string()),
            _ => io_err(&data)(e),
        })?;
        let actual = match hashed {
            Some(d) if d.algorithm() == expected.algorithm() => d,
            _ => hash_reader(expected.algorithm(), &f).map_err(io_err(&data))?,
        };
        if &actual != expected {
            return Err(StoreError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        f.sync_all().map_err(io_err(&data))?;
        let size = f.metadata().map_err(io_err(&data))?.len();
        drop(f);
        let dest = self.blob_path(expected);
        let _guard = self.write_lock()?;
        let duplicate = match fs::metadata(&dest) {
            Ok(m) if m.is_file() && m.len() == size => {
                OpenOptions::new()
                    .write(true)
                    .open(&dest)
                    .and_then(|f| f.set_modified(SystemTime::now()))
                    .map_err(io_err(&dest))?;
                let staged = self.root.join("tmp").join(format!("upload-{id}"));
                fs::rename(&data, &staged).map_err(io_err(&staged))?;
                Some(staged)
            }
            _ => {
                self.install(&data, &dest)?;
                None
            }
        };
        self.link_blob_locked(repository, expected)?;
        self.delete_upload(id)?;
        Ok(Committed { size, duplicate })
    }

    // ---- repositories ----

    fn repo_dir(&self, repository: &str) -> PathBuf {
        self.root.join("repos").join(repository)
    }

    fn link_path(&self, repository: &str, d: &Digest) -> PathBuf {
        self.repo_dir(repository)
            .join("_links")
            .join(d.algorithm().as_str())
            .join(d.hex())
    }

    fn revision_path(&self, repository: &str, d: &Digest) -> PathBuf {
        self.repo_dir(repository)
            .join("_manifests")
            .join(d.algorithm().as_str())
            .join(d.hex())
    }

    fn tag_path(&self, repository: &str, tag: &str) -> PathBuf {
        self.repo_dir(repository).join("_tags").join(tag)
    }

    fn referrers_dir(&self, repository: &str, subject: &Digest) -> PathBuf {
        self.repo_dir(repository).join("_referrers").join(format!(
            "{}-{}",
            subject.algorithm().as_str(),
            subject.hex()
        ))
    }

    pub fn repository_exists(&self, repository: &str) -> bool {
        self.repo_dir(repository).is_dir()
    }

    /// Links an existing blob into `repository` (a cross-repository mount). False if the blob
    /// is not stored.
    pub fn link_blob(&self, repository: &str, d: &Digest) -> Result<bool> {
        let _guard = self.write_lock()?;
        if self.blob_size(d)?.is_none() {
            return Ok(false);
        }
        self.link_blob_locked(repository, d)?;
        Ok(true)
    }

    fn link_blob_locked(&self, repository: &str, d: &Digest) -> Result<()> {
        let link = self.link_path(repository, d);
        if link.exists() {
            return Ok(());
        }
        self.write_atomic(&link, b"")
    }

    /// Whether `d` is stored and belongs to `repository` (uploaded, mounted, or a manifest's).
    pub fn blob_in_repository(&self, repository: &str, d: &Digest) -> Result<Option<u64>> {
        if !self.link_path(repository, d).exists() && !self.revision_path(repository, d).exists() {
            return Ok(None);
        }
        self.blob_size(d)
    }

    pub fn unlink_blob(&self, repository: &str, d: &Digest) -> Result<bool> {
        remove_opt(&self.link_path(repository, d))
    }

    /// Stores a verified manifest: its bytes as a blob, the revision, its referrer entry, and
    /// the tag last. `missing` blobs are checked by the caller under the same lock.
    pub fn put_manifest(
        &self,
        repository: &str,
        digest: &Digest,
        body: &[u8],
        manifest: &Manifest,
        tag: Option<&str>,
    ) -> Result<()> {
        self.put_blob(digest, body)?;
        self.write_atomic(
            &self.revision_path(repository, digest),
            manifest.media_type.as_bytes(),
        )?;
        if let Some(subject) = &manifest.subject {
            let mut desc = Descriptor::new(&manifest.media_type, digest.clone(), body.len() as u64);
            desc.artifact_type = manifest.effective_artifact_type();
            desc.annotations = manifest.annotations.clone();
            let entry = self
                .referrers_dir(repository, &subject.digest)
                .join(format!("{}-{}", digest.algorithm().as_str(), digest.hex()));
            let json = serde_json::to_vec(&desc).expect("descriptors serialise");
            self.write_atomic(&entry, &json)?;
        }
        if let Some(tag) = tag {
            self.write_atomic(
                &self.tag_path(repository, tag),
                digest.to_string().as_bytes(),
            )?;
        }
        Ok(())
    }

    pub fn resolve_tag(&self, repository: &str, tag: &str) -> Result<Option<Digest>> {
        Ok(read_opt(&self.tag_path(repository, tag))?
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.trim().parse().ok()))
    }

    /// A manifest of `repository` by digest: (media type, bytes).
    pub fn get_manifest(&self, repository: &str, d: &Digest) -> Result<Option<(String, Vec<u8>)>> {
        let Some(mt) = read_opt(&self.revision_path(repository, d))? else {
            return Ok(None);
        };
        let Some(body) = self.read_blob(d)? else {
            return Ok(None);
        };
        Ok(Some((String::from_utf8_lossy(&mt).into_owned(), body)))
    }

    pub fn tags(&self, repository: &str) -> Result<Option<Vec<String>>> {
        if !self.repository_exists(repository) {
            return Ok(None);
        }
        let dir = self.repo_dir(repository).join("_tags");
        let mut tags = list_names(&dir)?;
        tags.sort();
        Ok(Some(tags))
    }

    pub fn delete_tag(&self, repository: &str, tag: &str) -> Result<bool> {
        remove_opt(&self.tag_path(repository, tag))
    }

    /// Deletes a manifest revision, the tags that point to it and its referrer entry.
    pub fn delete_manifest(&self, repository: &str, d: &Digest) -> Result<bool> {
        let rev = self.revision_path(repository, d);
        let Some(_) = read_opt(&rev)? else {
            return Ok(false);
        };
        if let Some(body) = self.read_blob(d)?
            && let Ok(m) = Manifest::parse(&body, None)
            && let Some(subject) = m.subject
        {
            let entry = self
                .referrers_dir(repository, &subject.digest)
                .join(format!("{}-{}", d.algorithm().as_str(), d.hex()));
            remove_opt(&entry)?;
        }
        for tag in self.tags(repository)?.unwrap_or_default() {
            if self.resolve_tag(repository, &tag)?.as_ref() == Some(d) {
                remove_opt(&self.tag_path(repository, &tag))?;
            }
        }
        remove_opt(&rev)
    }

    pub fn referrers(&self, repository: &str, subject: &Digest) -> Result<Vec<Descriptor>> {
        let dir = self.referrers_dir(repository, subject);
        let mut out = Vec::new();
        for name in list_names(&dir)? {
            if let Some(b) = read_opt(&dir.join(&name))?
                && let Ok(d) = serde_json::from_slice::<Descriptor>(&b)
            {
                // A referrer whose manifest was deleted behind our back is not reported.
                if self.revision_path(repository, &d.digest).exists() {
                    out.push(d);
                }
            }
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(out)
    }

    /// All repository names, sorted.
    pub fn repositories(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let base = self.root.join("repos");
        walk_repos(&base, "", &mut out)?;
        out.sort();
        Ok(out)
    }

    fn manifests_of(&self, repository: &str) -> Result<Vec<Digest>> {
        let mut out = Vec::new();
        for alg in [Algorithm::Sha256, Algorithm::Sha512] {
            let dir = self
                .repo_dir(repository)
                .join("_manifests")
                .join(alg.as_str());
            for hex in list_names(&dir)? {
                if let Ok(d) = format!("{}:{hex}", alg.as_str()).parse() {
                    out.push(d);
                }
            }
        }
        Ok(out)
    }

    /// Deletes blobs no manifest references and that are older than `grace` (so that blobs of
    /// a push in progress, whose manifest has not arrived yet, survive), the links to them, and
    /// upload sessions idle for longer than `upload_ttl`. Safe while the registry serves: it
    /// holds the store's lock exclusively, which every write that makes content reachable
    /// holds shared.
    pub fn gc(&self, grace: Duration, upload_ttl: Duration) -> Result<GcReport> {
        let mut report = GcReport::default();
        let now = SystemTime::now();
        let old = |p: &Path, age: Duration| -> bool {
            fs::metadata(p)
                .and_then(|m| m.modified())
                .map(|t| now.duration_since(t).unwrap_or_default() >= age)
                .unwrap_or(false)
        };
        let uploads = self.root.join("uploads");
        for id in list_names(&uploads)? {
            let data = uploads.join(&id).join("data");
            if old(&data, upload_ttl) || !data.exists() && old(&uploads.join(&id), upload_ttl) {
                self.delete_upload(&id)?;
                report.uploads_removed += 1;
            }
        }
        let _guard = self.lock(true)?;
        let repos = self.repositories()?;
        let mut live: HashSet<Digest> = HashSet::new();
        for repo in &repos {
            for d in self.manifests_of(repo)? {
                if let Some(body) = self.read_blob(&d)?
                    && let Ok(m) = Manifest::parse(&body, None)
                {
                    live.extend(m.blob_references().map(|b| b.digest.clone()));
                }
                live.insert(d);
            }
        }
        let mut deleted = HashSet::new();
        for alg in [Algorithm::Sha256, Algorithm::Sha512] {
            let dir = self.root.join("blobs").join(alg.as_str());
            for hex in list_names(&dir)? {
                let Ok(d) = format!("{}:{hex}", alg.as_str()).parse::<Digest>() else {
                    continue;
                };
                let p = dir.join(&hex);
                if live.contains(&d) || !old(&p, grace) {
                    report.blobs_kept += 1;
                    continue;
                }
                report.bytes_freed += fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                remove_opt(&p)?;
                report.blobs_deleted += 1;
                deleted.insert(d);
            }
        }
        for repo in &repos {
            for d in &deleted {
                remove_opt(&self.link_path(repo, d))?;
            }
        }
        Ok(report)
    }
}

fn hash_reader(alg: Algorithm, mut r: impl Read) -> io::Result<Digest> {
    let mut h = Hasher::new(alg);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..n]);
    }
}

fn list_names(dir: &Path) -> Result<Vec<String>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(io_err(dir))?;
        if let Some(n) = e.file_name().to_str() {
            out.push(n.to_string());
        }
    }
    Ok(out)
}

fn walk_repos(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<()> {
    for name in list_names(dir)? {
        if name.starts_with('_') {
            continue;
        }
        let p = dir.join(&name);
        if !p.is_dir() {
            continue;
        }
        let full = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        if ["_links", "_manifests", "_tags"]
            .iter()
            .any(|s| p.join(s).is_dir())
        {
            out.push(full.clone());
        }
        walk_repos(&p, &full, out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media;

    fn manifest_for(config: &[u8], layer: &[u8]) -> Vec<u8> {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"{}","digest":"{}","size":{}}},"layers":[{{"mediaType":"{}","digest":"{}","size":{}}}]}}"#,
            media::OCI_MANIFEST,
            media::OCI_CONFIG,
            Digest::sha256(config),
            config.len(),
            media::OCI_LAYER_TAR,
            Digest::sha256(layer),
            layer.len()
        )
        .into_bytes()
    }

    #[test]
    fn upload_commit_verifies_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let id = s.create_upload("a/b").unwrap();
        fs::write(s.upload_data(&id), b"hello").unwrap();
        let wrong = Digest::sha256(b"other");
        assert!(matches!(
            s.commit_upload(&id, "a/b", &wrong, None),
            Err(StoreError::DigestMismatch { .. })
        ));
        assert!(s.blob_size(&wrong).unwrap().is_none());
        let d = Digest::sha256(b"hello");
        let c = s.commit_upload(&id, "a/b", &d, None).unwrap();
        assert_eq!((c.size, c.duplicate), (5, None));
        assert_eq!(s.blob_in_repository("a/b", &d).unwrap(), Some(5));
        assert_eq!(s.blob_in_repository("other", &d).unwrap(), None);
        assert!(s.upload_state(&id).unwrap().is_none());
        assert_eq!(s.repositories().unwrap(), vec!["a/b".to_string()]);
    }

    #[test]
    fn upload_of_stored_content_keeps_the_stored_file() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let d = Digest::sha256(b"hello");
        let first = s.create_upload("a").unwrap();
        fs::write(s.upload_data(&first), b"hello").unwrap();
        s.commit_upload(&first, "a", &d, None).unwrap();
        let stored = s.blob_path(&d);
        let old = SystemTime::now() - Duration::from_secs(3600);
        File::options()
            .write(true)
            .open(&stored)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let inode = fs::metadata(&stored).unwrap().ino();

        let second = s.create_upload("b").unwrap();
        fs::write(s.upload_data(&second), b"hello").unwrap();
        let c = s.commit_upload(&second, "b", &d, None).unwrap();
        let meta = fs::metadata(&stored).unwrap();
        assert_eq!(meta.ino(), inode, "the stored file was replaced");
        assert!(
            meta.modified().unwrap() > old,
            "mtime not renewed: gc could take it"
        );
        let dup = c.duplicate.expect("the upload's copy is handed back");
        assert!(dup.starts_with(dir.path().join("tmp")));
        assert_eq!(fs::read(&dup).unwrap(), b"hello");
        assert_eq!(s.blob_in_repository("b", &d).unwrap(), Some(5));
        assert!(s.upload_state(&second).unwrap().is_none());
        // Left behind, it goes when the store is next opened.
        drop(s);
        Store::open(dir.path()).unwrap();
        assert!(!dup.exists());
    }

    #[test]
    fn manifests_tags_referrers_and_gc() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let (config, layer, orphan) = (b"{}".to_vec(), b"layer".to_vec(), b"orphan".to_vec());
        for b in [&config, &layer, &orphan] {
            s.put_blob(&Digest::sha256(b), b).unwrap();
            s.link_blob("r", &Digest::sha256(b)).unwrap();
        }
        let body = manifest_for(&config, &layer);
        let m = Manifest::parse(&body, None).unwrap();
        let md = Digest::sha256(&body);
        s.put_manifest("r", &md, &body, &m, Some("v1")).unwrap();
        assert_eq!(s.resolve_tag("r", "v1").unwrap(), Some(md.clone()));
        assert_eq!(s.tags("r").unwrap(), Some(vec!["v1".to_string()]));

        let report = s.gc(Duration::ZERO, Duration::from_secs(3600)).unwrap();
        assert_eq!(report.blobs_deleted, 1, "{report:?}");
        assert!(s.blob_size(&Digest::sha256(&orphan)).unwrap().is_none());
        assert!(s.blob_size(&Digest::sha256(&layer)).unwrap().is_some());

        assert!(s.delete_manifest("r", &md).unwrap());
        assert_eq!(s.resolve_tag("r", "v1").unwrap(), None);
        let report = s.gc(Duration::ZERO, Duration::from_secs(3600)).unwrap();
        assert_eq!(report.blobs_deleted, 3, "{report:?}");
    }

    #[test]
    fn gc_keeps_young_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.put_blob(&Digest::sha256(b"x"), b"x").unwrap();
        let r = s
            .gc(Duration::from_secs(3600), Duration::from_secs(3600))
            .unwrap();
        assert_eq!((r.blobs_deleted, r.blobs_kept), (0, 1));
    }
}
