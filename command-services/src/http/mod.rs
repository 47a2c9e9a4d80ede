//! The command side's HTTP API: routes, errors and extractors.

pub mod commands;
pub mod error;
pub mod extract;
pub mod headers;

pub use error::{ApiError, FieldError, PROBLEM_JSON, Problem};
pub use extract::{ApiJson, MAX_BODY_BYTES};
