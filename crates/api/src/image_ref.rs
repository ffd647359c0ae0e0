//! Image references: `[registry/]repository[:tag][@digest]`, validated with the grammar of the
//! OCI distribution spec (repository path components, tags, digests).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageRefError {
    #[error("image reference {0:?}: empty")]
    Empty(String),
    #[error("image reference {0:?}: invalid repository name {1:?}")]
    Repository(String, String),
    #[error("image reference {0:?}: invalid tag {1:?}")]
    Tag(String, String),
    #[error("image reference {0:?}: invalid digest {1:?}")]
    Digest(String, String),
}

/// A parsed image reference. `registry` is `None` when the reference names none (the caller
/// picks its default registry).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageRef {
    pub registry: Option<String>,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl ImageRef {
    /// The tag or digest to ask a registry for: the digest when pinned, else the tag, else `latest`.
    pub fn reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// This reference pinned to `digest` (the tag is kept for display).
    pub fn pinned(&self, digest: &str) -> ImageRef {
        ImageRef {
            digest: Some(digest.to_string()),
            ..self.clone()
        }
    }
}

impl FromStr for ImageRef {
    type Err = ImageRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Err(ImageRefError::Empty(s.to_string()));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                if !is_valid_digest(d) {
                    return Err(ImageRefError::Digest(s.to_string(), d.to_string()));
                }
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        let (registry, path) = match rest.split_once('/') {
            Some((first, remainder))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (Some(first.to_string()), remainder)
            }
            _ => (None, rest),
        };
        // A tag follows the last ':' that comes after the last '/'.
        let last_slash = path.rfind('/').map_or(0, |i| i + 1);
        let (repository, tag) = match path[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&path[..at], Some(path[at + 1..].to_string()))
            }
            None => (path, None),
        };
        if !is_valid_repository(repository) {
            return Err(ImageRefError::Repository(
                s.to_string(),
                repository.to_string(),
            ));
        }
        if let Some(t) = &tag
            && !is_valid_tag(t)
        {
            return Err(ImageRefError::Tag(s.to_string(), t.clone()));
        }
        Ok(ImageRef {
            registry,
            repository: repository.to_string(),
            tag,
            digest,
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(r) = &self.registry {
            write!(f, "{r}/")?;
        }
        write!(f, "{}", self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Repository name per the distribution spec:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`, at most 255 bytes.
pub fn is_valid_repository(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.split('/').all(is_valid_path_component)
}

fn is_valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or "-+"; it must be followed by an alphanumeric.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !alnum(b[i]) {
            return false;
        }
    }
    true
}

/// Tag per the distribution spec: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn is_valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Digest syntax per the OCI image spec: `algorithm ":" encoded` with the registered
/// algorithms checked strictly (sha256: 64 lowercase hex, sha512: 128 lowercase hex).
pub fn is_valid_digest(d: &str) -> bool {
    let Some((alg, enc)) = d.split_once(':') else {
        return false;
    };
    let hex =
        |n: usize| enc.len() == n && enc.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    match alg {
        "sha256" => hex(64),
        "sha512" => hex(128),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_forms() {
        let r: ImageRef = "127.0.0.1:5000/hello:v1".parse().unwrap();
        assert_eq!(r.registry.as_deref(), Some("127.0.0.1:5000"));
        assert_eq!(r.repository, "hello");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        let r: ImageRef = format!("localhost/a/b@{D}").parse().unwrap();
        assert_eq!(r.registry.as_deref(), Some("localhost"));
        assert_eq!(r.repository, "a/b");
        assert_eq!(r.reference(), D);
        let r: ImageRef = "library/hello".parse().unwrap();
        assert_eq!(r.registry, None);
        assert_eq!(r.reference(), "latest");
        assert_eq!(r.to_string(), "library/hello");
    }

    #[test]
    fn refuses_bad() {
        for bad in [
            "",
            "Hello",
            "a//b",
            "a:b:c",
            "a@sha256:zz",
            "a:-x",
            "a__-b",
            "-a",
            "a-",
        ] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad:?}");
        }
        assert!(is_valid_repository("a__b.c-d---e/f"));
        assert!(!is_valid_repository("a___b"));
    }
}
