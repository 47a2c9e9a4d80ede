//! Every error the HTTP API returns, as RFC 9457 `application/problem+json`.
//!
//! Three kinds of failure stay apart all the way here: the client's mistake (4xx, message
//! shown), a version conflict (409, retryable, both versions in the body), and infrastructure
//! failure (503/500, logged with its cause, hidden from the client).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// Set to `elsewhere` on an answer that means "not decided here, ask another instance"
/// ([`ApiError::Misrouted`]).
pub const ROUTING: &str = "platform-routing";

/// A field that failed validation, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FieldError {
    /// The field's name as sent (`lines[0].quantity`).
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl ToString) -> Self {
        FieldError {
            field: field.into(),
            message: message.to_string(),
        }
    }
}

/// An RFC 9457 problem document.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// A URI reference naming the kind of problem.
    #[serde(rename = "type")]
    pub problem_type: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The fields that failed validation (422).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// On a version conflict: the version the request expected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<u64>,
    /// On a version conflict: the aggregate's current version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual_version: Option<u64>,
}

/// Everything a handler can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed (bad JSON, bad header).
    #[error("{0}")]
    BadRequest(String),
    /// 422: well-formed, but some fields are invalid.
    #[error("the request has invalid fields")]
    Validation(Vec<FieldError>),
    /// 404: no such resource.
    #[error("{0}")]
    NotFound(String),
    /// 409: the domain refused the command in the aggregate's current state.
    #[error("{0}")]
    Conflict(String),
    /// 422: the domain refused the command whatever the state (e.g. an empty order).
    #[error("{0}")]
    Unprocessable(String),
    /// 409: `If-Match` named another version than the current one. Retry after re-reading.
    #[error("expected version {expected}, but the current version is {actual}")]
    VersionConflict { expected: u64, actual: u64 },
    /// 422: an idempotency key reused with a different request.
    #[error("this idempotency key was already used for a different request")]
    IdempotencyMismatch,
    /// 405: the path exists, the method does not.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 413: the body is larger than the limit.
    #[error("the request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// 415: the body is not `application/json`.
    #[error("expected a body with content type application/json")]
    UnsupportedMediaType,
    /// 401: no credentials, or credentials that are not valid (unknown key, bad or expired
    /// token). Carries `WWW-Authenticate: Bearer`.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: valid credentials whose role may not use this route.
    #[error("{0}")]
    Forbidden(String),
    /// 414: the request target is longer than the limit.
    #[error("the request target is longer than {0} bytes")]
    UriTooLong(usize),
    /// 429: the caller exceeded its rate limit. Carries `Retry-After` (seconds).
    #[error("rate limit exceeded; retry in {retry_after_secs} s")]
    TooManyRequests { retry_after_secs: u64 },
    /// 431: the request's headers are larger than the limit.
    #[error("the request headers are larger than {0} bytes")]
    HeadersTooLarge(usize),
    /// 503: a dependency (broker, database) is down or the service is not ready; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// 503 with `Platform-Routing: elsewhere`: this instance does not decide for the
    /// aggregate's partition now (another instance owns it, a newer owner took it, or it is
    /// still catching up). Nothing was done; another instance, or this one later, will. A
    /// gateway takes it as routing information, not as a failure of the instance.
    #[error("{0}")]
    Misrouted(String),
    /// 503 (gateway): every instance of an upstream has its circuit breaker open; retry later.
    #[error("{0}")]
    CircuitOpen(String),
    /// 502 (gateway): the upstream could not be reached or answered garbage.
    #[error("{0}")]
    BadGateway(String),
    /// 504 (gateway): the upstream did not answer within the route's timeout.
    #[error("{0}")]
    GatewayTimeout(String),
    /// 500: a bug. The detail is logged, never shown.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Validation(_)
            | ApiError::Unprocessable(_)
            | ApiError::IdempotencyMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) | ApiError::VersionConflict { .. } => StatusCode::CONFLICT,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::Unavailable(_) | ApiError::Misrouted(_) | ApiError::CircuitOpen(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad-request",
            ApiError::Validation(_) => "validation",
            ApiError::NotFound(_) => "not-found",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unprocessable(_) => "unprocessable",
            ApiError::VersionConflict { .. } => "version-conflict",
            ApiError::IdempotencyMismatch => "idempotency-key-reused",
            ApiError::MethodNotAllowed => "method-not-allowed",
            ApiError::PayloadTooLarge(_) => "payload-too-large",
            ApiError::UnsupportedMediaType => "unsupported-media-type",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::UriTooLong(_) => "uri-too-long",
            ApiError::TooManyRequests { .. } => "rate-limited",
            ApiError::HeadersTooLarge(_) => "headers-too-large",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Misrouted(_) => "not-owner",
            ApiError::CircuitOpen(_) => "circuit-open",
            ApiError::BadGateway(_) => "bad-gateway",
            ApiError::GatewayTimeout(_) => "gateway-timeout",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn problem(&self) -> Problem {
        let status = self.status();
        let (expected_version, actual_version) = match self {
            ApiError::VersionConflict { expected, actual } => (Some(*expected), Some(*actual)),
            _ => (None, None),
        };
        Problem {
            problem_type: format!("/problems/{}", self.slug()),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: self.to_string(),
            errors: match self {
                ApiError::Validation(errors) => errors.clone(),
                _ => Vec::new(),
            },
            expected_version,
            actual_version,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            ApiError::Internal(cause) => tracing::error!(%cause, "internal error"),
            ApiError::Misrouted(cause) => tracing::info!(%cause, "not decided here"),
            ApiError::Unavailable(cause)
            | ApiError::CircuitOpen(cause)
            | ApiError::BadGateway(cause)
            | ApiError::GatewayTimeout(cause) => tracing::warn!(%cause, "dependency unavailable"),
            _ => tracing::info!(error = %self, "request refused"),
        }
        let status = self.status();
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        match &self {
            ApiError::Unavailable(_) | ApiError::CircuitOpen(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Misrouted(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                headers.insert(ROUTING, HeaderValue::from_static("elsewhere"));
            }
            ApiError::TooManyRequests { retry_after_secs } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            ApiError::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}
