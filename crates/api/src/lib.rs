//! ferry-api: the wire types of Ferry's public API and of the internal messages between
//! control, agent and gateway, plus validation of names, quantities and image references.
//!
//! Owns: plain data and pure validation. Must not: do I/O or depend on tokio.
//!
//! Entry points: [`quantity`] (CPU and memory strings), [`name`] (service and revision names),
//! [`image_ref`] (image references), [`agent`] (control ↔ agent messages), [`gateway`]
//! (control ↔ gateway messages), [`exec`] (the interactive exec stream).

pub mod agent;
pub mod exec;
pub mod gateway;
pub mod image_ref;
pub mod name;
pub mod quantity;
pub mod service;

pub use image_ref::ImageRef;
pub use quantity::{Cpu, Memory};
