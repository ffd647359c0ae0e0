//! ferry-oci: digests, media types, manifests and indexes (OCI and Docker v2), image config,
//! the content-addressed on-disk store, OCI image layouts, and a client that pulls from and
//! pushes to any registry.
//!
//! Owns: the OCI formats and their storage. Must not: know about services or instances.

pub mod client;
pub mod digest;
pub mod layout;
pub mod manifest;
pub mod media;
pub mod store;

pub use digest::{Algorithm, Digest, DigestError, Hasher};
pub use manifest::{Descriptor, ImageConfig, Manifest, ManifestError, Platform};
pub use store::{Committed, GcReport, Store, StoreError, UploadState};
