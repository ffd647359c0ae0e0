//! Manifests and indexes (OCI and Docker v2 schema 2): parsing, validation, and the references
//! they make to other content.

use crate::Digest;
use crate::media;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("manifest schemaVersion must be 2, found {0}")]
    SchemaVersion(i64),
    #[error(
        "manifest media type {0:?} is not supported (OCI manifest/index, Docker v2 manifest/list are)"
    )]
    MediaType(String),
    #[error("manifest mediaType {body:?} does not match Content-Type {header:?}")]
    MediaTypeMismatch { body: String, header: String },
    #[error("manifest has no config descriptor")]
    MissingConfig,
    #[error("index entry {0} is missing or malformed")]
    BadEntry(usize),
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.to_string(),
            digest,
            size,
            artifact_type: None,
            annotations: None,
            platform: None,
            urls: None,
            data: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(
        default,
        rename = "os.version",
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
}

impl Platform {
    /// The platform this process runs on, in OCI's names.
    pub fn current() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            other => other,
        };
        Platform {
            architecture: architecture.to_string(),
            os: std::env::consts::OS.to_string(),
            variant: None,
            os_version: None,
        }
    }
}

/// The generic shape shared by manifests and indexes; unknown fields are kept by keeping the
/// original bytes, never by re-serialising.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    schema_version: Option<i64>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<serde_json::Value>>,
    subject: Option<Descriptor>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

/// A parsed manifest or index.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub media_type: String,
    pub artifact_type: Option<String>,
    pub config: Option<Descriptor>,
    pub layers: Vec<Descriptor>,
    pub manifests: Vec<Descriptor>,
    pub subject: Option<Descriptor>,
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Manifest {
    /// Parses and validates `body`. `content_type` is the type the client declared (the HTTP
    /// Content-Type); when absent or generic, the body's `mediaType` decides.
    pub fn parse(body: &[u8], content_type: Option<&str>) -> Result<Manifest, ManifestError> {
        let raw: Raw = serde_json::from_slice(body)?;
        match raw.schema_version {
            Some(2) => {}
            Some(v) => return Err(ManifestError::SchemaVersion(v)),
            None => return Err(ManifestError::SchemaVersion(0)),
        }
        let header = content_type
            .map(|c| c.split(';').next().unwrap_or("").trim().to_string())
            .filter(|c| media::MANIFEST_TYPES.contains(&c.as_str()));
        let media_type = match (&raw.media_type, &header) {
            (Some(b), Some(h)) if b != h => {
                return Err(ManifestError::MediaTypeMismatch {
                    body: b.clone(),
                    header: h.clone(),
                });
            }
            (Some(b), _) => b.clone(),
            (None, Some(h)) => h.clone(),
            // No declared type at all: an OCI index if it lists manifests, else a manifest.
            (None, None) if raw.manifests.is_some() => media::OCI_INDEX.to_string(),
            (None, None) => media::OCI_MANIFEST.to_string(),
        };
        if !media::MANIFEST_TYPES.contains(&media_type.as_str()) {
            return Err(ManifestError::MediaType(media_type));
        }
        let mut manifests = Vec::new();
        if media::is_index(&media_type) {
            for (i, v) in raw.manifests.unwrap_or_default().into_iter().enumerate() {
                let d: Descriptor =
                    serde_json::from_value(v).map_err(|_| ManifestError::BadEntry(i))?;
                manifests.push(d);
            }
        } else if raw.config.is_none() {
            return Err(ManifestError::MissingConfig);
        }
        Ok(Manifest {
            media_type,
            artifact_type: raw.artifact_type,
            config: raw.config,
            layers: raw.layers.unwrap_or_default(),
            manifests,
            subject: raw.subject,
            annotations: raw.annotations,
        })
    }

    pub fn is_index(&self) -> bool {
        media::is_index(&self.media_type)
    }

    /// The artifact type the referrers API reports: `artifactType`, else the config's media type.
    pub fn effective_artifact_type(&self) -> Option<String> {
        self.artifact_type
            .clone()
            .or_else(|| self.config.as_ref().map(|c| c.media_type.clone()))
    }

    /// Blobs (config and layers) an image manifest needs in the same repository.
    pub fn blob_references(&self) -> impl Iterator<Item = &Descriptor> {
        self.config.iter().chain(self.layers.iter())
    }

    /// For an index: the entry matching `platform`, if any.
    pub fn select_platform(&self, platform: &Platform) -> Option<&Descriptor> {
        self.manifests.iter().find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == platform.os && p.architecture == platform.architecture)
        })
    }
}

/// An image configuration's parts Ferry uses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub config: Option<ContainerConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    #[test]
    fn parses_image_manifest_and_references() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"{}","digest":"{}","size":2}},"layers":[{{"mediaType":"{}","digest":"{}","size":3}}]}}"#,
            media::OCI_MANIFEST,
            media::OCI_CONFIG,
            d(1),
            media::OCI_LAYER_GZIP,
            d(2)
        );
        let m = Manifest::parse(body.as_bytes(), Some(media::OCI_MANIFEST)).unwrap();
        assert_eq!(m.blob_references().count(), 2);
        assert_eq!(
            m.effective_artifact_type().as_deref(),
            Some(media::OCI_CONFIG)
        );
        assert!(!m.is_index());
    }

    #[test]
    fn refuses_malformed() {
        assert!(matches!(
            Manifest::parse(b"{", None),
            Err(ManifestError::Json(_))
        ));
        assert!(matches!(
            Manifest::parse(br#"{"schemaVersion":1}"#, None),
            Err(ManifestError::SchemaVersion(1))
        ));
        assert!(matches!(
            Manifest::parse(br#"{"schemaVersion":2,"layers":[]}"#, None),
            Err(ManifestError::MissingConfig)
        ));
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[]}}"#,
            media::OCI_INDEX
        );
        assert!(matches!(
            Manifest::parse(body.as_bytes(), Some(media::OCI_MANIFEST)),
            Err(ManifestError::MediaTypeMismatch { .. })
        ));
        let bad_digest =
            r#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:zz","size":1}}"#;
        assert!(Manifest::parse(bad_digest.as_bytes(), None).is_err());
    }

    #[test]
    fn index_selects_platform() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"mediaType":"{}","digest":"{}","size":1,"platform":{{"architecture":"arm64","os":"linux"}}}},{{"mediaType":"{}","digest":"{}","size":1,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
            media::OCI_INDEX,
            media::OCI_MANIFEST,
            d(1),
            media::OCI_MANIFEST,
            d(2)
        );
        let m = Manifest::parse(body.as_bytes(), None).unwrap();
        let p = Platform {
            architecture: "amd64".into(),
            os: "linux".into(),
            variant: None,
            os_version: None,
        };
        assert_eq!(m.select_platform(&p).unwrap().digest.to_string(), d(2));
    }
}
