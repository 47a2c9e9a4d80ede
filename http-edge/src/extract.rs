//! Extractors whose rejections are our [`ApiError`], so a malformed request gets the same
//! problem+json as every other error.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// The largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// `axum::Json` with our rejections: 400 malformed, 415 wrong content type, 413 too large, 422
/// wrong shape (missing field, wrong type).
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::JsonDataError(error) => {
            ApiError::Validation(vec![crate::error::FieldError::new(
                "body",
                error.body_text().trim_start_matches(
                    "Failed to deserialize the JSON body into the target type: ",
                ),
            )])
        }
        JsonRejection::JsonSyntaxError(error) => ApiError::BadRequest(format!(
            "the body is not valid JSON: {}",
            error
                .body_text()
                .trim_start_matches("Failed to parse the request body as JSON: ")
        )),
        JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType,
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::PayloadTooLarge(MAX_BODY_BYTES)
        }
        other => ApiError::BadRequest(other.body_text()),
    }
}

/// An optional JSON body: absent (no body at all) or `null` is `None`; present must be valid JSON.
#[derive(Debug, Clone)]
pub struct OptionalJson<T>(pub Option<T>);

impl<S, T> FromRequest<S> for OptionalJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let empty = request
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .is_some_and(|length| length == "0")
            || (!request
                .headers()
                .contains_key(axum::http::header::CONTENT_TYPE)
                && !request
                    .headers()
                    .contains_key(axum::http::header::TRANSFER_ENCODING)
                && !request
                    .headers()
                    .contains_key(axum::http::header::CONTENT_LENGTH));
        if empty {
            return Ok(OptionalJson(None));
        }
        // `null` is no body as well.
        let ApiJson(value) = ApiJson::<Option<T>>::from_request(request, state).await?;
        Ok(OptionalJson(value))
    }
}

/// `axum::extract::Query` with our rejections: a query string that does not fit (a repeated
/// parameter, a wrong shape) is a 400 problem+json like every other error.
#[derive(Debug, Clone)]
pub struct ApiQuery<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(ApiError::BadRequest(format!(
                "the query string does not fit this route: {}",
                rejection.body_text()
            ))),
        }
    }
}

/// Deserializes a whole number as JSON Schema reads one: `2` and `2.0` alike (a number whose
/// fraction is zero is an integer), within `i64`.
pub fn whole_number<'de, D>(deserializer: D) -> Result<i64, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct WholeNumber;

    impl serde::de::Visitor<'_> for WholeNumber {
        type Value = i64;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a whole number")
        }

        fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<i64, E> {
            Ok(value)
        }

        fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<i64, E> {
            i64::try_from(value).map_err(|_| E::custom(format!("{value} is too large")))
        }

        fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<i64, E> {
            // i64::MIN is a power of two, so exactly a float; i64::MAX + 1 as well.
            const LOW: f64 = i64::MIN as f64;
            if value.fract() == 0.0 && (LOW..-LOW).contains(&value) {
                Ok(value as i64)
            } else {
                Err(E::custom(format!("{value} is not a whole number in range")))
            }
        }
    }

    deserializer.deserialize_any(WholeNumber)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Quantity {
        #[serde(deserialize_with = "whole_number")]
        n: i64,
    }

    fn read(json: &str) -> Result<i64, String> {
        serde_json::from_str::<Quantity>(json)
            .map(|quantity| quantity.n)
            .map_err(|error| error.to_string())
    }

    #[test]
    fn a_whole_number_may_be_written_with_a_zero_fraction() {
        assert_eq!(read(r#"{"n": 2}"#), Ok(2));
        assert_eq!(read(r#"{"n": 2.0}"#), Ok(2));
        assert_eq!(read(r#"{"n": -781945.0}"#), Ok(-781945));
        assert_eq!(read(r#"{"n": 9223372036854775807}"#), Ok(i64::MAX));
        assert!(read(r#"{"n": 2.5}"#).is_err());
        assert!(read(r#"{"n": 9223372036854775808}"#).is_err());
        assert!(read(r#"{"n": 9.3e18}"#).is_err());
        assert!(read(r#"{"n": "2"}"#).is_err());
    }
}
