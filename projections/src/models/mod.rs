//! The read models, one module each. Every one checks all events of a batch in memory first
//! (loading the rows they touch with one query), then writes each table with one statement.
//!
//! They read and write with the bulk statements of the SQL layer, [`fetch_for_keys`] and
//! [`write_rows`] (see `sql_store`).

pub mod audit;
pub mod customers;
pub mod inventory;
pub mod orders;
pub mod payments;

pub(crate) use crate::db::{Kind, fetch_for_keys, write_rows};
