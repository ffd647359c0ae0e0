//! A registry client (OCI Distribution API): resolve a tag to a digest, pull an image (an index
//! resolved to this node's platform) into a layout with every digest verified, and push a
//! layout's image. Speaks basic auth and the bearer-token challenge flow.

use crate::layout::{Layout, LayoutError};
use crate::manifest::{Descriptor, Manifest, Platform};
use crate::{Digest, Hasher, media};
use ferry_api::ImageRef;
use futures_util::StreamExt;
use reqwest::{Method, RequestBuilder, Response, StatusCode, header};
use std::io::Write;
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("image reference {0}: no registry named")]
    NoRegistry(String),
    #[error("{url}: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("{url}: registry answered {status}: {body}")]
    Status {
        url: String,
        status: StatusCode,
        body: String,
    },
    #[error("{0}: not found in the registry")]
    NotFound(String),
    #[error("{what}: content hashes to {actual}, expected {expected}")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("writing {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, ClientError>;

/// Wraps a transport error with the URL it happened on.
fn http_err(url: &str) -> impl FnOnce(reqwest::Error) -> ClientError + '_ {
    move |source| ClientError::Http {
        url: url.to_string(),
        source,
    }
}

/// Credentials for a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    Basic { username: String, password: String },
    Bearer(String),
}

impl From<&ferry_api::agent::RegistryAuth> for Credentials {
    fn from(a: &ferry_api::agent::RegistryAuth) -> Credentials {
        match a {
            ferry_api::agent::RegistryAuth::Basic { username, password } => Credentials::Basic {
                username: username.clone(),
                password: password.clone(),
            },
            ferry_api::agent::RegistryAuth::Bearer { token } => Credentials::Bearer(token.clone()),
        }
    }
}

pub struct Client {
    http: reqwest::Client,
    credentials: Option<Credentials>,
    /// A token obtained through the bearer challenge flow.
    token: Mutex<Option<String>>,
}

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Loopback registries and ones named with an explicit `http://` speak plain HTTP.
pub fn base_url(registry: &str) -> String {
    if registry.starts_with("http://") || registry.starts_with("https://") {
        return registry.trim_end_matches('/').to_string();
    }
    let host = registry.rsplit_once(':').map_or(registry, |(h, _)| h);
    let plain = host == "localhost"
        || host.starts_with("127.")
        || host == "[::1]"
        || host.ends_with(".localhost");
    format!("{}://{registry}", if plain { "http" } else { "https" })
}

/// A pulled image: the platform manifest chosen, and its parsed config.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The digest the reference resolved to (the index's when it was one).
    pub digest: Digest,
    /// The image manifest for this platform.
    pub manifest: Descriptor,
}

impl Client {
    pub fn new(credentials: Option<Credentials>) -> Client {
        let http = reqwest::Client::builder()
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .build()
            .expect("reqwest client builds");
        Client {
            http,
            credentials,
            token: Mutex::new(None),
        }
    }

    fn authorize(&self, rb: RequestBuilder) -> RequestBuilder {
        if let Some(t) = self.token.lock().expect("token lock").clone() {
            return rb.bearer_auth(t);
        }
        match &self.credentials {
            Some(Credentials::Basic { username, password }) => {
                rb.basic_auth(username, Some(password))
            }
            Some(Credentials::Bearer(t)) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// Sends a request built by `make` (called again after an auth challenge).
    async fn send(&self, url: &str, make: impl Fn() -> RequestBuilder) -> Result<Response> {
        let resp = self.authorize(make()).send().await.map_err(http_err(url))?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        if let Some(realm) = bearer_realm(&challenge) {
            self.fetch_token(&realm).await?;
            return self.authorize(make()).send().await.map_err(http_err(url));
        }
        Ok(resp)
    }

    async fn fetch_token(&self, realm: &str) -> Result<()> {
        let mut rb = self.http.get(realm);
        if let Some(Credentials::Basic { username, password }) = &self.credentials {
            rb = rb.basic_auth(username, Some(password));
        }
        let resp = rb.send().await.map_err(http_err(realm))?;
        let resp = check(realm, resp).await?;
        let v: serde_json::Value = resp.json().await.map_err(http_err(realm))?;
        let t = v["token"]
            .as_str()
            .or(v["access_token"].as_str())
            .map(str::to_string);
        *self.token.lock().expect("token lock") = t;
        Ok(())
    }

    fn repo_url(image: &ImageRef) -> Result<String> {
        let reg = image
            .registry
            .as_deref()
            .ok_or_else(|| ClientError::NoRegistry(image.to_string()))?;
        Ok(format!("{}/v2/{}", base_url(reg), image.repository))
    }

    /// Fetches a manifest by tag or digest: (media type, bytes, digest). The digest is computed
    /// from the bytes, and checked against the reference when that is a digest.
    pub async fn get_manifest(
        &self,
        image: &ImageRef,
        reference: &str,
    ) -> Result<(String, Vec<u8>, Digest)> {
        let url = format!("{}/manifests/{reference}", Self::repo_url(image)?);
        let resp = self
            .send(&url, || self.http.get(&url).header(header::ACCEPT, ACCEPT))
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Err(ClientError::NotFound(format!(
                "{}:{reference}",
                image.repository
            )));
        }
        let resp = check(&url, resp).await?;
        let ct = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = resp.bytes().await.map_err(http_err(&url))?.to_vec();
        let digest = match reference.parse::<Digest>() {
            Ok(want) => {
                let actual = Digest::of(want.algorithm(), &body);
                if actual != want {
                    return Err(ClientError::DigestMismatch {
                        what: url,
                        expected: want,
                        actual,
                    });
                }
                actual
            }
            Err(_) => Digest::sha256(&body),
        };
        let m = Manifest::parse(&body, Some(&ct))
            .map_err(|e| ClientError::Invalid(format!("{url}: {e}")))?;
        Ok((m.media_type, body, digest))
    }

    /// Resolves the image's tag (or digest) to the manifest digest the registry serves.
    pub async fn resolve(&self, image: &ImageRef) -> Result<Digest> {
        Ok(self.get_manifest(image, image.reference()).await?.2)
    }

    /// Pulls `image` into `layout`: manifest (an index resolved to `platform`), config, layers,
    /// each verified against its digest. Blobs already in the layout are not fetched again.
    pub async fn pull(
        &self,
        image: &ImageRef,
        platform: &Platform,
        layout: &Layout,
    ) -> Result<Pulled> {
        let (mt, body, digest) = self.get_manifest(image, image.reference()).await?;
        let (mt, body, mdigest) = if media::is_index(&mt) {
            let idx = Manifest::parse(&body, Some(&mt))
                .map_err(|e| ClientError::Invalid(e.to_string()))?;
            let chosen = idx.select_platform(platform).ok_or_else(|| {
                ClientError::Invalid(format!(
                    "{image}: the index has no manifest for {}/{}",
                    platform.os, platform.architecture
                ))
            })?;
            self.get_manifest(image, &chosen.digest.to_string()).await?
        } else {
            (mt, body, digest.clone())
        };
        let m =
            Manifest::parse(&body, Some(&mt)).map_err(|e| ClientError::Invalid(e.to_string()))?;
        for d in m.blob_references() {
            if !layout.has_blob(&d.digest) {
                self.fetch_blob(image, d, layout).await?;
            }
        }
        let stored = layout.add_blob(&body)?;
        if stored != mdigest && mdigest.algorithm() == stored.algorithm() {
            return Err(ClientError::DigestMismatch {
                what: "manifest".into(),
                expected: mdigest,
                actual: stored,
            });
        }
        let desc = Descriptor::new(&mt, mdigest, body.len() as u64);
        Ok(Pulled {
            digest,
            manifest: desc,
        })
    }

    async fn fetch_blob(&self, image: &ImageRef, d: &Descriptor, layout: &Layout) -> Result<()> {
        let url = format!("{}/blobs/{}", Self::repo_url(image)?, d.digest);
        let resp = self.send(&url, || self.http.get(&url)).await?;
        let resp = check(&url, resp).await?;
        let tmp = layout
            .root
            .join(format!("pull-{}.tmp", uuid::Uuid::new_v4().simple()));
        let io = |e: std::io::Error| ClientError::Io {
            path: tmp.display().to_string(),
            source: e,
        };
        let mut f =
            std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp).map_err(io)?);
        let mut h = Hasher::new(d.digest.algorithm());
        let mut stream = resp.bytes_stream();
        let mut n = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(http_err(&url))?;
            h.update(&chunk);
            n += chunk.len() as u64;
            f.write_all(&chunk).map_err(io)?;
        }
        let f = f.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)?;
        let actual = h.finish();
        if actual != d.digest || n != d.size {
            let _ = std::fs::remove_file(&tmp);
            return Err(ClientError::DigestMismatch {
                what: url,
                expected: d.digest.clone(),
                actual,
            });
        }
        layout.adopt_blob(&tmp, &d.digest)?;
        Ok(())
    }

    /// Pushes the image `desc` of `layout` (and everything it references) to `target`, tagged
    /// with `target`'s tag (or by digest). Returns the manifest digest.
    pub async fn push(
        &self,
        layout: &Layout,
        desc: &Descriptor,
        target: &ImageRef,
    ) -> Result<Digest> {
        let base = Self::repo_url(target)?;
        let base_root = base_url(target.registry.as_deref().unwrap_or_default());
        for d in layout.closure(desc)? {
            let is_manifest = crate::media::MANIFEST_TYPES.contains(&d.media_type.as_str());
            if is_manifest {
                let body = layout.read_blob(&d.digest)?;
                let reference = if d.digest == desc.digest {
                    target.tag.clone().unwrap_or_else(|| d.digest.to_string())
                } else {
                    d.digest.to_string()
                };
                let url = format!("{base}/manifests/{reference}");
                let resp = self
                    .send(&url, || {
                        self.http
                            .put(&url)
                            .header(header::CONTENT_TYPE, d.media_type.as_str())
                            .body(body.clone())
                    })
                    .await?;
                check(&url, resp).await?;
                continue;
            }
            let head = format!("{base}/blobs/{}", d.digest);
            let resp = self
                .send(&head, || self.http.request(Method::HEAD, &head))
                .await?;
            if resp.status().is_success() {
                continue;
            }
            let start = format!("{base}/blobs/uploads/");
            let resp = self.send(&start, || self.http.post(&start)).await?;
            let resp = check(&start, resp).await?;
            let loc = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    ClientError::Invalid(format!("{start}: no Location in the upload answer"))
                })?
                .to_string();
            let loc = if loc.starts_with('/') {
                format!("{base_root}{loc}")
            } else {
                loc
            };
            let sep = if loc.contains('?') { '&' } else { '?' };
            let put = format!("{loc}{sep}digest={}", d.digest);
            let path = layout.blob_path(&d.digest);
            let resp = self
                .send(&put, || {
                    let path = path.clone();
                    let stream =
                        futures_util::stream::once(
                            async move { tokio::fs::File::open(path).await },
                        )
                        .map(|r| {
                            r.map(|f| tokio_util::io::ReaderStream::with_capacity(f, 256 << 10))
                        })
                        .flat_map(|r| match r {
                            Ok(s) => s.boxed(),
                            Err(e) => futures_util::stream::once(async move { Err(e) }).boxed(),
                        });
                    self.http
                        .put(&put)
                        .header(header::CONTENT_TYPE, "application/octet-stream")
                        .header(header::CONTENT_LENGTH, d.size)
                        .body(reqwest::Body::wrap_stream(stream))
                })
                .await?;
            check(&put, resp).await?;
        }
        Ok(desc.digest.clone())
    }
}

async fn check(url: &str, resp: Response) -> Result<Response> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    Err(ClientError::Status {
        url: url.to_string(),
        status,
        body: body.chars().take(500).collect(),
    })
}

/// The realm of a `Bearer realm="…",service="…"` challenge.
fn bearer_realm(challenge: &str) -> Option<String> {
    let rest = challenge.strip_prefix("Bearer ")?;
    let mut realm = None;
    let mut params = Vec::new();
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        let v = v.trim_matches('"');
        if k == "realm" {
            realm = Some(v.to_string());
        } else {
            params.push(format!("{k}={v}"));
        }
    }
    let realm = realm?;
    if !realm.starts_with("http") {
        return None;
    }
    Some(if params.is_empty() {
        realm
    } else {
        format!("{realm}?{}", params.join("&"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_for_loopback_only() {
        assert_eq!(base_url("127.0.0.1:5000"), "http://127.0.0.1:5000");
        assert_eq!(base_url("localhost:5000"), "http://localhost:5000");
        assert_eq!(base_url("ghcr.io"), "https://ghcr.io");
        assert_eq!(base_url("http://reg.example:80/"), "http://reg.example:80");
    }

    #[test]
    fn bearer_challenge() {
        assert_eq!(
            bearer_realm(r#"Bearer realm="http://r/token",service="ferry-registry""#).as_deref(),
            Some("http://r/token?service=ferry-registry")
        );
        assert_eq!(bearer_realm(r#"Basic realm="x""#), None);
    }
}
