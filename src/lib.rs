//! The platform: every part of the order-fulfilment system behind one binary, `platform`.
//!
//! `platform` (or `platform serve`) runs every part in one process on the embedded backend
//! (SQLite files under `--data-dir`); `platform serve order --kafka … --database-url …` runs one
//! part as its own process on Kafka and Postgres.
//!
//! # Layout
//! - [`settings`]: the typed settings, from flags with environment fallbacks.
//! - [`backend`]: opening the event log and the stores for the chosen backend.
//! - [`server`]: [`Platform::build`] binds and starts the parts; `run_until_stopped` serves.
//! - [`bench`]: the `platform bench` load generators.
//! - [`security`]: the authentication, role, rate-limit and request-limit layer of every part.
//! - [`telemetry`]: the command metrics (by route and outcome, latency) and saga states in
//!   `/metrics`.
//! - [`gateway`]: `platform serve gateway`, the single entry point: registry, health checks,
//!   partition-aware routing, retries, circuit breakers.
//! - [`ops`]: operator commands (`projections status`, `parked list|retry|skip`).
//! - [`tools`]: `platform replay` and `platform audit`.

pub mod backend;
pub mod bench;
pub mod gateway;
pub mod ops;
pub mod otlp;
pub mod security;
pub mod server;
pub mod settings;
pub mod telemetry;
pub mod tools;

pub use server::Platform;
pub use settings::{Part, Settings};
