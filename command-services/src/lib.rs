//! The write side of the platform: the order, payment and inventory command services.
//!
//! Each service owns the partitions of its aggregate type that its consumer group assigns it
//! (all of them for a single instance, a share when several run), keeps their aggregates'
//! state in memory, and decides commands from two sources: HTTP (orders and inventory) and its
//! command topic (all three; the saga sends there). Decisions use the domain's pure `decide`;
//! the resulting event is appended to the log and acknowledged only once read back as effective
//! (see [`owner`]).
//!
//! # Layout
//! - [`owner`]: the generic partition owner: taking and giving up partitions, state rebuild,
//!   per-aggregate locking, append and read-back, idempotency, snapshots, fencing by epoch.
//! - [`sharded`]: the sharded hash map behind the owners' tables (growing without stalls).
//! - [`store`]: snapshots, owner epochs and command-topic positions, in SQLite or Postgres.
//! - [`messages`]: the commands that travel on command topics (from `event-schema`).
//! - [`consumer`]: the command-topic consumer: the consumer group that assigns partitions to
//!   owners, and the lanes that decide each aggregate's commands in order.
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
