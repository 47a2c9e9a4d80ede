//! The read side: projection workers that build each service's read models from the log, and
//! the query API over them.
//!
//! Each service owns its read models in its own database: a Postgres schema
//! (`<prefix>orders`, `<prefix>inventory`, `<prefix>payments`, `<prefix>audit`) on the
//! distributed backend, a SQLite file per service on the embedded one. No service reads
//! another's tables.
//!
//! # Layout
//! - [`db`]: the shared SQL layer (crate `sql-store`), so each read model's SQL is written once.
//! - [`traced`]: a span per applied event with the trace id of the request behind it.
//! - [`runtime`]: the projection runtime: consumer groups, batches applied in one transaction
//!   with their positions and fenced by a claim on them, the effective-history rule judged
//!   against the database, parking, and the check of stored positions against the log's end.
//! - [`models`]: the read models (orders, inventory, payments, audit).
//! - [`read_side`]: opening the databases, starting the workers, read-your-writes, lag and
//!   readiness.
//! - [`parked`]: listing, retrying and skipping parked events.
//! - [`query`]: the HTTP query API.
//! - [`replay`]: rebuilding a projection into shadow tables and swapping them in.
//! - [`audit`]: an aggregate's timeline, a correlation's causation tree, state as of a time
//!   or version; for the CLI and the `/audit` routes.

pub use sql_store as db;
pub mod audit;
pub mod models;
pub mod parked;
pub mod query;
pub mod read_side;
pub mod replay;
pub mod runtime;
pub mod traced;

pub use read_side::{ReadBackend, ReadSide};
