//! The platform: every part of the order-fulfilment system behind one binary, `platform`.
//!
//! `platform` (or `platform serve`) runs every part in one process on the embedded backend
//! (SQLite files under `--data-dir`); `platform serve order --kafka … --database-url …` runs one
//! part as its own process on Kafka and Postgres.
//!
//! # Layout
//! - [`settings`]: the typed settings, from flags with environment fallbacks: the backend's
//!   (every command), the saga's (`serve`, `sagas`), and the rest of `serve`'s.
//! - [`backend`]: opening the event log and the stores for the chosen backend.
//! - [`error`]: why the platform could not start or a tool could not finish, causes kept.
//! - [`server`]: [`Platform::build`] binds and starts the parts; `run_until_stopped` serves.
//! - the HTTP edge every part shares (errors, authentication and roles, the server loop) is the
//!   `http_edge` crate.
//! - [`telemetry`]: the request span and its log line, and the command metrics (by route and
//!   outcome, latency) and saga states in `/metrics`.
//! - `platform serve gateway`, the single entry point (registry, health checks, partition-aware
//!   routing, retries, circuit breakers), is the `gateway` crate.
//! - [`ops`]: operator commands (`projections status`, `parked list|retry|skip`,
//!   `sagas list|show|retry`, `recover`) and the plain-text tables they print.
//! - [`tools`]: `platform replay` and `platform audit`.

pub mod backend;
pub mod customers;
pub mod error;
pub mod ops;
pub mod otlp;
pub mod server;
pub mod settings;
pub mod telemetry;
pub mod tools;

pub use error::Error;
pub use server::Platform;
pub use settings::{Part, Settings};
