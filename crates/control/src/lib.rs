//! ferry-control (placeholder)
