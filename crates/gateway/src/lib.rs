//! ferry-gateway (placeholder)
