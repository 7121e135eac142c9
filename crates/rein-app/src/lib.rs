//! Rein's wiring: what the `rein` binary and the HTTP server share, so both build a store, a
//! runtime and their views the same way.
//!
//! - [`config`]: `rein.toml` parsed into typed policy (prices, budgets, limits, server, egress).
//! - [`wiring`]: the HTTP client, the store, the model and the runtime a configuration asks for.
//! - [`workers`]: where a spec's worker agents come from (files for a local user, registered
//!   agents otherwise).
//! - [`views`] and [`render`]: what people and clients read (JSON answers, the trace tree,
//!   tables).
//! - [`admin`] and [`audit`]: tenants and keys, and checking the store against its records.
//! - [`anchors`]: audit anchors made and checked.
//! - [`telemetry`]: logs and the OTLP span export.
//!
//! Depends on the runtime and its adapters; never on the CLI or the server.

pub mod admin;
pub mod anchors;
pub mod audit;
pub mod config;
pub mod error;
pub mod render;
pub mod telemetry;
pub mod views;
pub mod wiring;
pub mod workers;

pub use error::{Error, Result};
