//! ferry-metering (placeholder)
