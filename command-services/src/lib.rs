//! The write side of the platform: the order, payment and inventory command services.
//!
//! Each service owns the partitions of its aggregate type (all of them, or a share when it
//! runs as several instances), keeps their aggregates' state in memory, and decides commands
//! from two sources: HTTP (orders and inventory) and its command topic (all three; the saga
//! sends there). Decisions use the domain's pure `decide`; the resulting event is appended to
//! the log and acknowledged only once read back as effective (see [`owner`]).
//!
//! # Layout
//! - [`owner`]: the generic partition owner: state rebuild, per-aggregate locking, append and
//!   read-back, idempotency, snapshots, stepping down.
//! - [`sharded`]: the sharded hash map behind the owners' tables (growing without stalls).
//! - [`store`]: snapshots and command-topic positions, in SQLite or Postgres.
//! - [`messages`]: the commands that travel on command topics (from `event-schema`).
//! - [`consumer`]: the command-topic consumer loop.
//! - [`provider`]: payment providers (a trait, and the deterministic test provider).
//! - [`services`]: starting the three services and wiring the command topics to them.
//! - [`http`]: the HTTP command API (routes, problem+json errors, extractors).

pub mod consumer;
pub mod http;
/// The commands on command topics (defined with the wire format, in `event-schema`).
pub use event_schema::commands as messages;
pub mod owner;
pub mod provider;
pub mod services;
pub mod sharded;
pub mod store;

pub use services::{CommandSettings, CommandState, ServiceSet};
