//! ferry-registry (placeholder)
