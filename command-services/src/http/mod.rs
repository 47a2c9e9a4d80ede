//! The command side's HTTP API: its routes. Errors, extractors and command headers are the
//! shared edge's (`http_edge`).

pub mod commands;
pub mod customers;
