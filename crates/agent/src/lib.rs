//! ferry-agent (placeholder)
