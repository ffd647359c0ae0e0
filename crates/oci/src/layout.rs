//! OCI image layouts (a directory with `oci-layout`, `index.json` and `blobs/`), oci-archives
//! (the same as a tar), and a builder that packages directories or a static binary as an image.

use crate::manifest::{ContainerConfig, Descriptor, ImageConfig, Manifest, Platform};
use crate::{Digest, Hasher, media};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}: not an OCI image layout (no oci-layout / index.json)")]
    NotALayout(PathBuf),
    #[error("image layout {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("blob {digest} in {path}: content hashes to {actual}")]
    Corrupt {
        path: PathBuf,
        digest: Digest,
        actual: Digest,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> LayoutError + '_ {
    move |source| LayoutError::Io {
        path: path.to_path_buf(),
        source,
    }
}

type Result<T> = std::result::Result<T, LayoutError>;

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexFile {
    schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    manifests: Vec<Descriptor>,
}

impl Layout {
    /// Creates an empty layout at `root`.
    pub fn create(root: impl Into<PathBuf>) -> Result<Layout> {
        let root = root.into();
        let blobs = root.join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(io_at(&blobs))?;
        let l = Layout { root };
        let p = l.root.join("oci-layout");
        fs::write(&p, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io_at(&p))?;
        l.write_index(&[])?;
        Ok(l)
    }

    /// Opens an existing layout.
    pub fn open(root: impl Into<PathBuf>) -> Result<Layout> {
        let root = root.into();
        if !root.join("oci-layout").is_file() || !root.join("index.json").is_file() {
            return Err(LayoutError::NotALayout(root));
        }
        Ok(Layout { root })
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(d.algorithm().as_str())
            .join(d.hex())
    }

    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>> {
        let p = self.blob_path(d);
        let b = fs::read(&p).map_err(io_at(&p))?;
        let actual = Digest::of(d.algorithm(), &b);
        if &actual != d {
            return Err(LayoutError::Corrupt {
                path: p,
                digest: d.clone(),
                actual,
            });
        }
        Ok(b)
    }

    /// Adds `bytes` as a blob and returns its digest.
    pub fn add_blob(&self, bytes: &[u8]) -> Result<Digest> {
        let d = Digest::sha256(bytes);
        let p = self.blob_path(&d);
        if !p.exists() {
            write_synced(&p, bytes)?;
        }
        Ok(d)
    }

    /// Moves an already-hashed file into the blob directory.
    pub fn adopt_blob(&self, file: &Path, d: &Digest) -> Result<()> {
        let p = self.blob_path(d);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).map_err(io_at(parent))?;
        }
        fs::rename(file, &p).map_err(io_at(&p))
    }

    pub fn manifests(&self) -> Result<Vec<Descriptor>> {
        let p = self.root.join("index.json");
        let b = fs::read(&p).map_err(io_at(&p))?;
        let idx: IndexFile = serde_json::from_slice(&b).map_err(|e| LayoutError::Invalid {
            path: p.clone(),
            message: format!("index.json: {e}"),
        })?;
        Ok(idx.manifests)
    }

    fn write_index(&self, manifests: &[Descriptor]) -> Result<()> {
        let idx = IndexFile {
            schema_version: 2,
            media_type: Some(media::OCI_INDEX.to_string()),
            manifests: manifests.to_vec(),
        };
        let p = self.root.join("index.json");
        write_synced(
            &p,
            &serde_json::to_vec_pretty(&idx).expect("index serialises"),
        )
    }

    /// Records `desc` in index.json under `tag` (replacing an entry of the same tag).
    pub fn tag(&self, mut desc: Descriptor, tag: &str) -> Result<()> {
        let mut list = self.manifests()?;
        list.retain(|d| {
            d.annotations
                .as_ref()
                .and_then(|a| a.get(REF_NAME))
                .map(String::as_str)
                != Some(tag)
        });
        desc.annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(REF_NAME.to_string(), tag.to_string());
        list.push(desc);
        self.write_index(&list)
    }

    /// The manifest descriptor for `tag`, or the only one when `tag` is None.
    pub fn find(&self, tag: Option<&str>) -> Result<Descriptor> {
        let list = self.manifests()?;
        let invalid = |message: String| LayoutError::Invalid {
            path: self.root.clone(),
            message,
        };
        match tag {
            Some(t) => list
                .into_iter()
                .find(|d| {
                    d.annotations
                        .as_ref()
                        .and_then(|a| a.get(REF_NAME))
                        .map(String::as_str)
                        == Some(t)
                })
                .ok_or_else(|| invalid(format!("no image tagged {t:?}"))),
            None if list.len() == 1 => Ok(list.into_iter().next().expect("one entry")),
            None => Err(invalid(format!(
                "{} images in index.json; name one with :tag",
                list.len()
            ))),
        }
    }

    /// Every blob the manifest `d` needs (children first for an index), with the manifest last.
    pub fn closure(&self, desc: &Descriptor) -> Result<Vec<Descriptor>> {
        let body = self.read_blob(&desc.digest)?;
        let m =
            Manifest::parse(&body, Some(&desc.media_type)).map_err(|e| LayoutError::Invalid {
                path: self.root.clone(),
                message: e.to_string(),
            })?;
        let mut out = Vec::new();
        for child in &m.manifests {
            out.extend(self.closure(child)?);
        }
        out.extend(m.blob_references().cloned());
        let mut me = desc.clone();
        me.annotations = None;
        out.push(me);
        Ok(out)
    }
}

fn write_synced(p: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).map_err(io_at(parent))?;
    }
    // A unique staging name: several writers may store the same blob at once.
    let tmp = p.with_extension(format!("{}.tmp", uuid::Uuid::new_v4().simple()));
    let mut f = File::create(&tmp).map_err(io_at(&tmp))?;
    f.write_all(bytes).map_err(io_at(&tmp))?;
    f.sync_all().map_err(io_at(&tmp))?;
    fs::rename(&tmp, p).map_err(io_at(p))
}

/// Packs a layout directory into an oci-archive (a tar of the layout).
pub fn pack_archive(layout: &Layout, archive: &Path) -> Result<()> {
    let f = File::create(archive).map_err(io_at(archive))?;
    let mut t = tar::Builder::new(BufWriter::new(f));
    t.mode(tar::HeaderMode::Deterministic);
    for name in ["oci-layout", "index.json"] {
        t.append_path_with_name(layout.root.join(name), name)
            .map_err(io_at(archive))?;
    }
    let mut blobs: Vec<PathBuf> = Vec::new();
    for alg in ["sha256", "sha512"] {
        let dir = layout.root.join("blobs").join(alg);
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                blobs.push(e.path());
            }
        }
    }
    blobs.sort();
    for b in blobs {
        let rel = b
            .strip_prefix(&layout.root)
            .expect("blob under layout root");
        t.append_path_with_name(&b, rel).map_err(io_at(archive))?;
    }
    let w = t.into_inner().map_err(io_at(archive))?;
    w.into_inner()
        .map_err(|e| io_at(archive)(e.into_error()))?
        .sync_all()
        .map_err(io_at(archive))
}

/// Unpacks an oci-archive into `dest` and opens it as a layout.
pub fn unpack_archive(archive: &Path, dest: &Path) -> Result<Layout> {
    fs::create_dir_all(dest).map_err(io_at(dest))?;
    let f = File::open(archive).map_err(io_at(archive))?;
    let mut t = tar::Archive::new(io::BufReader::new(f));
    for entry in t.entries().map_err(io_at(archive))? {
        let mut entry = entry.map_err(io_at(archive))?;
        // `unpack_in` refuses paths that escape `dest`.
        entry.unpack_in(dest).map_err(io_at(archive))?;
    }
    Layout::open(dest)
}

/// Opens `path` as a layout directory, or unpacks it into `scratch` when it is an archive.
pub fn open_image(path: &Path, scratch: &Path) -> Result<Layout> {
    if path.is_dir() {
        Layout::open(path)
    } else {
        unpack_archive(path, scratch)
    }
}

/// One layer to build.
pub enum LayerSource {
    /// A directory's contents become the layer's root.
    Dir(PathBuf),
    /// One file placed at `dest` (absolute path inside the image), mode 0755.
    File { src: PathBuf, dest: String },
}

/// What `ferry image build` packages.
pub struct BuildSpec {
    pub layers: Vec<LayerSource>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub exposed_port: Option<u16>,
    pub labels: BTreeMap<String, String>,
}

/// A writer that hashes what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
    size: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A writer that only hashes (the uncompressed diff id).
struct HashOnly(Hasher);

impl Write for HashOnly {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Tees into the gzip stream and the diff-id hasher.
struct Tee<A, B>(A, B);

impl<A: Write, B: Write> Write for Tee<A, B> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(buf)?;
        self.1.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()?;
        self.1.flush()
    }
}

/// Writes one gzip layer into the layout: (descriptor, diff id).
fn build_layer(layout: &Layout, src: &LayerSource) -> Result<(Descriptor, Digest)> {
    let tmp = layout
        .root
        .join(format!("layer-{}.tmp", uuid::Uuid::new_v4().simple()));
    let file = File::create(&tmp).map_err(io_at(&tmp))?;
    let out = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        hasher: Hasher::new(crate::Algorithm::Sha256),
        size: 0,
    };
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
    let mut builder = tar::Builder::new(Tee(gz, HashOnly(Hasher::new(crate::Algorithm::Sha256))));
    builder.mode(tar::HeaderMode::Deterministic);
    builder.follow_symlinks(false);
    match src {
        LayerSource::Dir(dir) => {
            append_dir_sorted(&mut builder, dir, Path::new("")).map_err(io_at(dir))?
        }
        LayerSource::File { src, dest } => {
            let rel = dest.trim_start_matches('/');
            let mut f = File::open(src).map_err(io_at(src))?;
            let mut h = tar::Header::new_gnu();
            h.set_size(f.metadata().map_err(io_at(src))?.len());
            h.set_mode(0o755);
            h.set_mtime(0);
            h.set_entry_type(tar::EntryType::Regular);
            // Parent directories, so the layer unpacks anywhere.
            let parts: Vec<&str> = rel.split('/').collect();
            for i in 1..parts.len() {
                let mut d = tar::Header::new_gnu();
                d.set_entry_type(tar::EntryType::Directory);
                d.set_mode(0o755);
                d.set_size(0);
                d.set_mtime(0);
                builder
                    .append_data(&mut d, format!("{}/", parts[..i].join("/")), io::empty())
                    .map_err(io_at(src))?;
            }
            builder
                .append_data(&mut h, rel, &mut f)
                .map_err(io_at(src))?;
        }
    }
    let Tee(gz, HashOnly(diff)) = builder.into_inner().map_err(io_at(&tmp))?;
    let mut out = gz.finish().map_err(io_at(&tmp))?;
    out.flush().map_err(io_at(&tmp))?;
    let HashingWriter {
        inner,
        hasher,
        size,
    } = out;
    inner
        .into_inner()
        .map_err(|e| io_at(&tmp)(e.into_error()))?
        .sync_all()
        .map_err(io_at(&tmp))?;
    let digest = hasher.finish();
    layout.adopt_blob(&tmp, &digest)?;
    Ok((
        Descriptor::new(media::OCI_LAYER_GZIP, digest, size),
        diff.finish(),
    ))
}

fn append_dir_sorted<W: Write>(b: &mut tar::Builder<W>, root: &Path, rel: &Path) -> io::Result<()> {
    let dir = root.join(rel);
    let mut names: Vec<_> = fs::read_dir(&dir)?.collect::<io::Result<Vec<_>>>()?;
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let r = rel.join(e.file_name());
        let ft = e.file_type()?;
        b.append_path_with_name(root.join(&r), &r)?;
        if ft.is_dir() {
            append_dir_sorted(b, root, &r)?;
        }
    }
    Ok(())
}

/// Builds an image into `layout` and tags it; returns the manifest descriptor.
pub fn build(layout: &Layout, spec: &BuildSpec, tag: &str) -> Result<Descriptor> {
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for src in &spec.layers {
        let (d, diff) = build_layer(layout, src)?;
        layers.push(d);
        diff_ids.push(diff.to_string());
    }
    let platform = Platform::current();
    let config = ImageConfig {
        architecture: platform.architecture.clone(),
        os: platform.os.clone(),
        config: Some(ContainerConfig {
            user: spec.user.clone(),
            env: Some(spec.env.clone()),
            entrypoint: (!spec.entrypoint.is_empty()).then(|| spec.entrypoint.clone()),
            cmd: (!spec.cmd.is_empty()).then(|| spec.cmd.clone()),
            working_dir: spec.working_dir.clone(),
            exposed_ports: spec
                .exposed_port
                .map(|p| BTreeMap::from([(format!("{p}/tcp"), serde_json::json!({}))])),
        }),
    };
    let mut config_json = serde_json::to_value(&config).expect("config serialises");
    config_json["rootfs"] = serde_json::json!({ "type": "layers", "diff_ids": diff_ids });
    if !spec.labels.is_empty()
        && let Some(c) = config_json.get_mut("config")
    {
        c["Labels"] = serde_json::to_value(&spec.labels).expect("labels serialise");
    }
    let config_bytes = serde_json::to_vec(&config_json).expect("config serialises");
    let config_digest = layout.add_blob(&config_bytes)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": Descriptor::new(media::OCI_CONFIG, config_digest, config_bytes.len() as u64),
        "layers": layers,
    });
    let manifest_bytes = serde_json::to_vec(&manifest).expect("manifest serialises");
    let md = layout.add_blob(&manifest_bytes)?;
    let mut desc = Descriptor::new(media::OCI_MANIFEST, md, manifest_bytes.len() as u64);
    desc.platform = Some(platform);
    layout.tag(desc.clone(), tag)?;
    Ok(desc)
}

/// Hashes a file (sha256).
pub fn hash_file(path: &Path) -> io::Result<(Digest, u64)> {
    let mut f = File::open(path)?;
    let mut h = Hasher::new(crate::Algorithm::Sha256);
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            return Ok((h.finish(), n));
        }
        n += k as u64;
        h.update(&buf[..k]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_is_reproducible_and_archives_round_trip() {
        let src = tempfile::tempdir().unwrap();
        fs::create_dir_all(src.path().join("etc")).unwrap();
        fs::write(src.path().join("etc/hello"), b"hi").unwrap();
        let spec = BuildSpec {
            layers: vec![LayerSource::Dir(src.path().to_path_buf())],
            entrypoint: vec!["/bin/sh".into()],
            cmd: vec![],
            env: vec!["A=1".into()],
            working_dir: None,
            user: None,
            exposed_port: Some(8080),
            labels: BTreeMap::new(),
        };
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let da = build(&Layout::create(a.path()).unwrap(), &spec, "v1").unwrap();
        let db = build(&Layout::create(b.path()).unwrap(), &spec, "v1").unwrap();
        assert_eq!(da.digest, db.digest, "same input, same image");

        let la = Layout::open(a.path()).unwrap();
        let closure = la.closure(&la.find(Some("v1")).unwrap()).unwrap();
        assert_eq!(closure.len(), 3);
        let archive = a.path().join("../img.tar");
        pack_archive(&la, &archive).unwrap();
        let out = tempfile::tempdir().unwrap();
        let lc = unpack_archive(&archive, out.path()).unwrap();
        assert_eq!(lc.find(None).unwrap().digest, da.digest);
        for d in closure {
            lc.read_blob(&d.digest).unwrap();
        }
        fs::remove_file(archive).unwrap();
    }
}
