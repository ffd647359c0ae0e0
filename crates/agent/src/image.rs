//! Images on the node: an OCI image layout (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`) that
//! [`ImageSource`]s fill, and [`ImageStore`], which turns a manifest digest into verified,
//! unpacked layers plus the runtime part of the image config.

use crate::unpack::{LayerCache, UnpackError};
use ferry_api::ImageRef;
use ferry_api::agent::RegistryAuth;
use ferry_oci::{Digest, Hasher};
use futures_util::future::BoxFuture;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {image}: {message}")]
    Reference { image: String, message: String },
    #[error("blob {digest}: {path:?}: {source}")]
    Blob {
        digest: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("blob {digest}: content has digest {actual}")]
    DigestMismatch { digest: String, actual: String },
    #[error("{what} {digest}: invalid JSON: {source}")]
    Json {
        what: &'static str,
        digest: String,
        source: serde_json::Error,
    },
    #[error("{what} {digest}: {message}")]
    Invalid {
        what: &'static str,
        digest: String,
        message: String,
    },
    #[error("image layout {path:?}: {source}")]
    Layout { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Unpack(#[from] UnpackError),
    #[error("image source: {0}")]
    Source(String),
}

/// Where images come from. The agent asks a source to make sure an image's manifest, config
/// and layers are blobs in the node's OCI layout at `layout`, and gets the manifest digest back.
pub trait ImageSource: Send + Sync {
    fn fetch<'a>(
        &'a self,
        image: &'a ImageRef,
        auth: Option<&'a RegistryAuth>,
        layout: &'a Path,
    ) -> BoxFuture<'a, Result<Digest, ImageError>>;
}

/// The runtime part of an image config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeConfig {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// An image ready to become a rootfs.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    pub manifest: Digest,
    /// Unpacked layer dirs, bottom first.
    pub layers: Vec<PathBuf>,
    pub config: RuntimeConfig,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: Option<String>,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

/// A manifest or an index (they share the media type field; an index has `manifests`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestOrIndex {
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize)]
struct ConfigBlob {
    #[serde(default)]
    config: Option<ContainerConfig>,
}

/// Path of blob `digest` in the layout at `layout`.
pub fn blob_path(layout: &Path, digest: &Digest) -> PathBuf {
    layout
        .join("blobs")
        .join(digest.algorithm().as_str())
        .join(digest.hex())
}

fn parse_digest(what: &'static str, s: &str) -> Result<Digest, ImageError> {
    s.parse()
        .map_err(|e: ferry_oci::DigestError| ImageError::Invalid {
            what,
            digest: s.to_string(),
            message: e.to_string(),
        })
}

/// Reads a small blob and verifies its digest.
pub fn read_blob(layout: &Path, digest: &Digest) -> Result<Vec<u8>, ImageError> {
    let path = blob_path(layout, digest);
    let data = std::fs::read(&path).map_err(|source| ImageError::Blob {
        digest: digest.to_string(),
        path: path.clone(),
        source,
    })?;
    let mut h = Hasher::new(digest.algorithm());
    h.update(&data);
    let actual = h.finish();
    if &actual != digest {
        return Err(ImageError::DigestMismatch {
            digest: digest.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(data)
}

fn parse_manifest(digest: &Digest, data: &[u8]) -> Result<ManifestOrIndex, ImageError> {
    serde_json::from_slice(data).map_err(|source| ImageError::Json {
        what: "manifest",
        digest: digest.to_string(),
        source,
    })
}

/// From an index, the linux/amd64 manifest (or the only one).
fn pick_platform(index_digest: &Digest, manifests: &[Descriptor]) -> Result<Digest, ImageError> {
    let chosen = manifests
        .iter()
        .find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        })
        .or_else(|| (manifests.len() == 1).then(|| &manifests[0]))
        .ok_or_else(|| ImageError::Invalid {
            what: "index",
            digest: index_digest.to_string(),
            message: "no linux/amd64 manifest".into(),
        })?;
    parse_digest("manifest", &chosen.digest)
}

/// Resolves an index to an image manifest; returns the manifest digest and body.
fn resolve_manifest(
    layout: &Path,
    digest: &Digest,
) -> Result<(Digest, ManifestOrIndex), ImageError> {
    let mut digest = digest.clone();
    for _ in 0..4 {
        let data = read_blob(layout, &digest)?;
        let m = parse_manifest(&digest, &data)?;
        match &m.manifests {
            Some(ms) => digest = pick_platform(&digest, ms)?,
            None => return Ok((digest, m)),
        }
    }
    Err(ImageError::Invalid {
        what: "index",
        digest: digest.to_string(),
        message: "indexes nested too deep".into(),
    })
}

/// The node's images: an OCI layout (filled by an [`ImageSource`]) and the layer cache.
#[derive(Debug, Clone)]
pub struct ImageStore {
    layout: PathBuf,
    cache: Arc<LayerCache>,
}

impl ImageStore {
    pub fn new(layout: impl Into<PathBuf>, cache: Arc<LayerCache>) -> ImageStore {
        ImageStore {
            layout: layout.into(),
            cache,
        }
    }

    /// The OCI layout dir sources write into.
    pub fn layout(&self) -> &Path {
        &self.layout
    }

    pub fn cache(&self) -> &Arc<LayerCache> {
        &self.cache
    }

    /// Creates the layout dir's skeleton if missing.
    pub fn init(&self) -> Result<(), ImageError> {
        init_layout(&self.layout)
    }

    /// Whether every layer of `manifest` is unpacked (no I/O beyond small reads).
    pub fn is_cached(&self, manifest: &Digest) -> bool {
        let Ok((_, m)) = resolve_manifest(&self.layout, manifest) else {
            return false;
        };
        m.layers.iter().all(|l| {
            l.digest
                .parse::<Digest>()
                .is_ok_and(|d| self.cache.contains(&d))
        })
    }

    /// Verifies manifest and config, unpacks every layer (concurrently, each once).
    pub async fn prepare(&self, manifest: &Digest) -> Result<PreparedImage, ImageError> {
        let (mdigest, m) = resolve_manifest(&self.layout, manifest)?;
        let config_desc = m.config.as_ref().ok_or_else(|| ImageError::Invalid {
            what: "manifest",
            digest: mdigest.to_string(),
            message: "no config".into(),
        })?;
        let cdigest = parse_digest("config", &config_desc.digest)?;
        let cdata = read_blob(&self.layout, &cdigest)?;
        let cblob: ConfigBlob =
            serde_json::from_slice(&cdata).map_err(|source| ImageError::Json {
                what: "config",
                digest: cdigest.to_string(),
                source,
            })?;
        let c = cblob.config.unwrap_or_default();
        let config = RuntimeConfig {
            env: c.env.unwrap_or_default(),
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            working_dir: c.working_dir.filter(|w| !w.is_empty()),
            user: c.user.filter(|u| !u.is_empty()),
        };
        let mut jobs = Vec::new();
        for l in &m.layers {
            if let Some(mt) = &l.media_type
                && mt.contains("zstd")
            {
                return Err(ImageError::Invalid {
                    what: "layer",
                    digest: l.digest.clone(),
                    message: format!("unsupported media type {mt}"),
                });
            }
            let d = parse_digest("layer", &l.digest)?;
            let blob = blob_path(&self.layout, &d);
            let cache = self.cache.clone();
            jobs.push(async move { cache.ensure(&d, &blob).await });
        }
        let layers = futures_util::future::try_join_all(jobs).await?;
        Ok(PreparedImage {
            manifest: mdigest,
            layers,
            config,
        })
    }
}

fn init_layout(layout: &Path) -> Result<(), ImageError> {
    let err = |source| ImageError::Layout {
        path: layout.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(layout.join("blobs")).map_err(err)?;
    let marker = layout.join("oci-layout");
    if !marker.exists() {
        std::fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(err)?;
    }
    let index = layout.join("index.json");
    if !index.exists() {
        std::fs::write(
            &index,
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#,
        )
        .map_err(err)?;
    }
    Ok(())
}

/// An [`ImageSource`] that copies images out of an OCI layout directory on disk (tests, air-gapped
/// nodes). A reference is found by digest, else by the `org.opencontainers.image.ref.name`
/// annotation equal to the tag (or the whole reference), else the layout's only manifest.
#[derive(Debug, Clone)]
pub struct LayoutImageSource {
    dir: PathBuf,
}

impl LayoutImageSource {
    pub fn new(dir: impl Into<PathBuf>) -> LayoutImageSource {
        LayoutImageSource { dir: dir.into() }
    }

    fn find(&self, image: &ImageRef) -> Result<Digest, ImageError> {
        let img = || format!("{}:{}", image.repository, image.reference());
        if let Some(d) = &image.digest {
            return d
                .parse()
                .map_err(|e: ferry_oci::DigestError| ImageError::Reference {
                    image: img(),
                    message: e.to_string(),
                });
        }
        let path = self.dir.join("index.json");
        let data = std::fs::read(&path).map_err(|source| ImageError::Layout {
            path: path.clone(),
            source,
        })?;
        let index: ManifestOrIndex =
            serde_json::from_slice(&data).map_err(|source| ImageError::Json {
                what: "index",
                digest: path.display().to_string(),
                source,
            })?;
        let manifests = index.manifests.unwrap_or_default();
        let tag = image.tag.as_deref().unwrap_or("latest");
        let full = format!("{}:{}", image.repository, tag);
        let found = manifests
            .iter()
            .find(|m| {
                m.annotations
                    .get("org.opencontainers.image.ref.name")
                    .is_some_and(|n| n == tag || *n == full)
            })
            .or_else(|| (manifests.len() == 1).then(|| &manifests[0]))
            .ok_or_else(|| ImageError::Reference {
                image: img(),
                message: format!("not found in layout {:?}", self.dir),
            })?;
        parse_digest("manifest", &found.digest)
    }

    fn copy_blob(&self, dest: &Path, digest: &Digest) -> Result<(), ImageError> {
        let to = blob_path(dest, digest);
        if to.exists() {
            return Ok(());
        }
        let from = blob_path(&self.dir, digest);
        let err = |path: &Path| {
            let path = path.to_path_buf();
            let digest = digest.to_string();
            move |source| ImageError::Blob {
                digest,
                path,
                source,
            }
        };
        let parent = to.parent().expect("blob path has a parent");
        std::fs::create_dir_all(parent).map_err(err(parent))?;
        let tmp = parent.join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
        if std::fs::hard_link(&from, &tmp).is_err() {
            std::fs::copy(&from, &tmp).map_err(err(&from))?;
        }
        std::fs::rename(&tmp, &to).map_err(err(&to))?;
        Ok(())
    }

    fn copy_image(&self, dest: &Path, digest: &Digest, depth: u32) -> Result<(), ImageError> {
        self.copy_blob(dest, digest)?;
        let data = read_blob(dest, digest)?;
        let m = parse_manifest(digest, &data)?;
        if let Some(ms) = &m.manifests {
            if depth > 3 {
                return Err(ImageError::Invalid {
                    what: "index",
                    digest: digest.to_string(),
                    message: "indexes nested too deep".into(),
                });
            }
            let chosen = pick_platform(digest, ms)?;
            return self.copy_image(dest, &chosen, depth + 1);
        }
        if let Some(c) = &m.config {
            self.copy_blob(dest, &parse_digest("config", &c.digest)?)?;
        }
        for l in &m.layers {
            self.copy_blob(dest, &parse_digest("layer", &l.digest)?)?;
        }
        Ok(())
    }
}

impl ImageSource for LayoutImageSource {
    fn fetch<'a>(
        &'a self,
        image: &'a ImageRef,
        _auth: Option<&'a RegistryAuth>,
        layout: &'a Path,
    ) -> BoxFuture<'a, Result<Digest, ImageError>> {
        Box::pin(async move {
            let this = self.clone();
            let image = image.clone();
            let layout = layout.to_path_buf();
            tokio::task::spawn_blocking(move || {
                init_layout(&layout)?;
                let digest = this.find(&image)?;
                this.copy_image(&layout, &digest, 0)?;
                Ok(digest)
            })
            .await
            .map_err(|e| ImageError::Source(e.to_string()))?
        })
    }
}

/// Test and tooling helper: writes a one-manifest OCI layout at `dir` from layer blobs (already
/// compressed or not) and a runtime config. Returns the manifest digest.
pub fn write_layout(
    dir: &Path,
    layers: &[Vec<u8>],
    config: &RuntimeConfig,
    tag: &str,
) -> io::Result<Digest> {
    let put = |data: &[u8]| -> io::Result<Digest> {
        let d = Digest::sha256(data);
        let p = blob_path(dir, &d);
        std::fs::create_dir_all(p.parent().expect("parent"))?;
        std::fs::write(p, data)?;
        Ok(d)
    };
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| {
            let raw = if l.starts_with(&[0x1f, 0x8b]) {
                let mut out = Vec::new();
                io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(&l[..]), &mut out)
                    .map(|_| out)
            } else {
                Ok(l.clone())
            };
            raw.map(|r| Digest::sha256(&r).to_string())
        })
        .collect::<io::Result<_>>()?;
    let mut cfg = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": config.env,
            "Entrypoint": config.entrypoint,
            "Cmd": config.cmd,
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    if let Some(w) = &config.working_dir {
        cfg["config"]["WorkingDir"] = w.clone().into();
    }
    if let Some(u) = &config.user {
        cfg["config"]["User"] = u.clone().into();
    }
    let cfg_bytes = serde_json::to_vec(&cfg).map_err(io::Error::other)?;
    let cfg_digest = put(&cfg_bytes)?;
    let mut layer_descs = Vec::new();
    for l in layers {
        let d = put(l)?;
        let mt = if l.starts_with(&[0x1f, 0x8b]) {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        } else {
            "application/vnd.oci.image.layer.v1.tar"
        };
        layer_descs
            .push(serde_json::json!({"mediaType": mt, "digest": d.to_string(), "size": l.len()}));
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest.to_string(), "size": cfg_bytes.len()},
        "layers": layer_descs,
    });
    let m_bytes = serde_json::to_vec(&manifest).map_err(io::Error::other)?;
    let m_digest = put(&m_bytes)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": m_digest.to_string(),
            "size": m_bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).map_err(io::Error::other)?,
    )?;
    Ok(m_digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (p, data, mode) in files {
            let mut h = tar::Header::new_gnu();
            h.set_path(p).unwrap();
            h.set_size(data.len() as u64);
            h.set_mode(*mode);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        let tar = b.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &tar).unwrap();
        gz.finish().unwrap()
    }

    #[tokio::test]
    async fn layout_source_and_store_prepare() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let cfg = RuntimeConfig {
            env: vec!["A=1".into()],
            entrypoint: vec!["/bin/app".into()],
            cmd: vec!["x".into()],
            working_dir: Some("/w".into()),
            user: Some("1000:1000".into()),
        };
        let l1 = layer(&[("bin/app", b"one", 0o755), ("etc/x", b"x", 0o644)]);
        let l2 = layer(&[("etc/.wh.x", b"", 0o644)]);
        let digest = write_layout(&src, &[l1, l2], &cfg, "v1").unwrap();
        let source = LayoutImageSource::new(&src);
        let store = ImageStore::new(
            tmp.path().join("node/oci"),
            Arc::new(LayerCache::new(tmp.path().join("node/cache"))),
        );
        store.init().unwrap();
        let image: ImageRef = "localhost/app:v1".parse().unwrap();
        let got = source.fetch(&image, None, store.layout()).await.unwrap();
        assert_eq!(got, digest);
        assert!(!store.is_cached(&digest));
        let p = store.prepare(&digest).await.unwrap();
        assert_eq!(p.config, cfg);
        assert_eq!(p.layers.len(), 2);
        assert_eq!(std::fs::read(p.layers[0].join("bin/app")).unwrap(), b"one");
        assert!(store.is_cached(&digest));
        // A corrupted blob is caught.
        let bad = tmp.path().join("node/oci/blobs/sha256").join(digest.hex());
        std::fs::write(&bad, b"{}").unwrap();
        assert!(matches!(
            store.prepare(&digest).await,
            Err(ImageError::DigestMismatch { .. })
        ));
    }
}

/// Pulls images from their registry (any OCI registry; the built-in one in `ferry server`),
/// resolving an index to this node's platform, every blob verified against its digest.
#[derive(Default)]
pub struct RegistryImageSource;

impl ImageSource for RegistryImageSource {
    fn fetch<'a>(
        &'a self,
        image: &'a ImageRef,
        auth: Option<&'a RegistryAuth>,
        layout: &'a Path,
    ) -> BoxFuture<'a, Result<Digest, ImageError>> {
        Box::pin(async move {
            let l = match ferry_oci::layout::Layout::open(layout) {
                Ok(l) => l,
                Err(_) => ferry_oci::layout::Layout::create(layout)
                    .map_err(|e| ImageError::Source(e.to_string()))?,
            };
            let client = ferry_oci::client::Client::new(auth.map(Into::into));
            let pulled = client
                .pull(image, &ferry_oci::Platform::current(), &l)
                .await
                .map_err(|e| ImageError::Source(e.to_string()))?;
            Ok(pulled.manifest.digest)
        })
    }
}
