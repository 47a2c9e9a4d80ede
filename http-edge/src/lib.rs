//! The HTTP edge every service of the platform shares (the command services, the query API, the
//! saga API and the gateway), so that no service depends on another to speak HTTP:
//! - [`error`]: [`ApiError`], every error as RFC 9457 problem+json;
//! - [`extract`]: JSON bodies whose rejections are problem+json;
//! - [`headers`]: the command headers (`Idempotency-Key`, `If-Match`, `X-Correlation-Id`,
//!   `traceparent`) and the request's [`headers::Actor`];
//! - [`security`]: authentication, roles, rate limits and request limits;
//! - [`trace`]: the W3C trace context, read by OpenTelemetry's propagator;
//! - [`serve`]: the server loop (timeouts, connection cap, graceful drain).

pub mod error;
pub mod extract;
pub mod headers;
pub mod openapi;
pub mod security;
pub mod serve;
pub mod trace;

pub use error::{ApiError, FieldError, PROBLEM_JSON, Problem};

/// A group of flags as their defaults make it: an empty command line, the environment not read.
/// The flags' attributes are where the defaults are written; `Default` impls and test settings
/// come from here.
///
/// # Panics
/// When a flag of the group has no default: a mistake in the code, found by any test.
pub fn flag_defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let command = T::augment_args(clap::Command::new("defaults").no_binary_name(true))
        .mut_args(|arg| arg.env(None::<&str>));
    let matches = command
        .try_get_matches_from(std::iter::empty::<String>())
        .expect("every flag of the group has a default");
    T::from_arg_matches(&matches).expect("the defaults are valid")
}
pub use extract::{ApiJson, ApiQuery, MAX_BODY_BYTES};
