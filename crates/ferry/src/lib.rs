//! The `ferry` binary's library half: daemon settings and the composition of the service crates
//! into `ferry server`, shared by the binary and the end-to-end tests (which run it in-process).
//!
//! Owns: config layering and wiring. Must not: hold platform logic; that lives in the service crates.

pub mod config;
pub mod server;

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
