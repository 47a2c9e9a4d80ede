//! The wire form of the platform's events, and the one rule every reader applies to them.
//!
//! Domain events (crate `domain`) are plain Rust values. This crate gives them a stable,
//! versioned identity on the log: a hand-written type name and schema version per event
//! ([`catalog`]), an [`Envelope`] of metadata around them whose JSON form is a CloudEvents 1.0
//! structured-mode event ([`envelope`]), the mapping to a Kafka record ([`record`]), the
//! upcasters that turn old shapes into today's when reading ([`upcast`]), JSON Schemas
//! generated for every type ([`schema`]), and the effective-history rule ([`history`]).
//!
//! # Layout
//! - [`catalog`]: every event type name with its current schema version, and the
//!   [`EventCodec`] each aggregate implements (encode to / decode from JSON data).
//! - [`commands`]: the commands that travel on command topics (the saga sends them; each
//!   service consumes its own topic).
//! - [`envelope`]: [`Envelope`], its metadata, and its CloudEvents JSON encoding.
//! - [`record`]: an envelope as a Kafka record: key, headers, value.
//! - [`upcast`]: the upcaster chain, applied at this boundary so no reader sees an old shape.
//! - [`schema`]: JSON Schema generation for every event type and version, and the
//!   compatibility check that guards stored events against breaking changes.
//! - [`history`]: the effective-history rule ("the log decides"), one function for all readers.
//!
//! No IO crate is used here; the log backends live elsewhere.

pub mod catalog;
pub mod commands;
pub mod envelope;
pub mod history;
pub mod record;
pub mod schema;
pub mod upcast;

pub use catalog::{EventCodec, EventType};
pub use envelope::{CommandMeta, DecodeError, Envelope};
pub use history::{EffectiveHistory, Verdict, judge};
pub use record::{Header, Record};
