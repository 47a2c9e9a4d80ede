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
pub use extract::{ApiJson, ApiQuery, MAX_BODY_BYTES};
