//! The command headers: `Idempotency-Key`, `If-Match`, `X-Correlation-Id`, `traceparent`, and
//! the correlation id every request gets ([`correlation_ids`]).

use axum::Router;
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use event_schema::CommandMeta;
use sha2::{Digest, Sha256};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use uuid::Uuid;

use crate::error::ApiError;

pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
pub const CORRELATION_ID: &str = "x-correlation-id";
pub const CONSISTENCY_TOKEN: &str = "x-consistency-token";
const MAX_HEADER_LEN: usize = 255;

/// Namespace of the command ids derived from idempotency keys.
const COMMAND_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_2a7e_44d1_4c1b_9f0e_8b8a_3c51_d2e7);

/// Who sent a request, as the authentication layer found it (a request extension). Without
/// one (authentication off) commands are recorded as `anonymous`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor(pub String);

/// The actor recorded for commands sent without authentication.
pub const ANONYMOUS: &str = "anonymous";

/// The command-related headers of a request, parsed, with the request's [`Actor`].
#[derive(Debug, Clone)]
pub struct CommandHeaders {
    /// Scoped to the actor: two callers using the same key send two commands.
    pub idempotency_key: Option<String>,
    pub actor: Option<String>,
    pub expected_version: Option<u64>,
    pub correlation_id: String,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

fn text<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => {
            let value = value
                .to_str()
                .map_err(|_| ApiError::BadRequest(format!("header {name} must be visible ASCII")))?
                .trim();
            // `to_str` lets a tab through; the documented form is printable ASCII and spaces.
            if value.bytes().any(|byte| !(b' '..=b'~').contains(&byte)) {
                return Err(ApiError::BadRequest(format!(
                    "header {name} must be visible ASCII"
                )));
            }
            if value.is_empty() || value.len() > MAX_HEADER_LEN {
                return Err(ApiError::BadRequest(format!(
                    "header {name} must be 1 to {MAX_HEADER_LEN} characters"
                )));
            }
            Ok(Some(value))
        }
    }
}

/// Gives every request of `router` an `X-Correlation-Id` and returns it in the answer: the
/// client's, or a new UUIDv7 when it sent none or one that is blank, longer than 255 characters
/// or not visible ASCII (as the OpenAPI document says), so the handlers, the events and the
/// logs always have one they can use.
pub fn correlation_ids<S>(router: Router<S>) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let header = HeaderName::from_static(CORRELATION_ID);
    router
        .layer(PropagateRequestIdLayer::new(header.clone()))
        .layer(SetRequestIdLayer::new(header, NewCorrelationId))
        .layer(axum::middleware::map_request(drop_unusable_correlation_id))
}

/// tower-http keeps whatever header arrives; one the command headers would refuse is dropped
/// here, so that a new one takes its place.
async fn drop_unusable_correlation_id(mut request: Request) -> Request {
    if text(request.headers(), CORRELATION_ID).is_err() {
        request.headers_mut().remove(CORRELATION_ID);
    }
    request
}

/// UUIDv7: correlation ids sort by the time their request arrived.
#[derive(Debug, Clone, Copy)]
struct NewCorrelationId;

impl MakeRequestId for NewCorrelationId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        HeaderValue::try_from(Uuid::now_v7().to_string())
            .ok()
            .map(RequestId::new)
    }
}

/// `If-Match: "3"` (also `3` and `W/"3"`): the version the client expects.
fn expected_version(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(raw) = text(headers, "if-match")? else {
        return Ok(None);
    };
    let unquoted = raw.trim_start_matches("W/").trim_matches('"');
    unquoted.parse().map(Some).map_err(|_| {
        ApiError::BadRequest(format!(
            "If-Match must be an aggregate version such as \"3\", got {raw:?}"
        ))
    })
}

impl<S: Send + Sync> FromRequestParts<S> for CommandHeaders {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let headers = &parts.headers;
        let traceparent = text(headers, "traceparent")?
            .filter(|raw| crate::trace::is_valid(raw))
            .map(str::to_owned);
        Ok(CommandHeaders {
            idempotency_key: text(headers, IDEMPOTENCY_KEY)?.map(str::to_owned),
            actor: parts.extensions.get::<Actor>().map(|actor| actor.0.clone()),
            expected_version: expected_version(headers)?,
            correlation_id: text(headers, CORRELATION_ID)?
                .map(str::to_owned)
                .unwrap_or_else(|| Uuid::now_v7().to_string()),
            tracestate: traceparent
                .as_ref()
                .and_then(|_| text(headers, "tracestate").ok().flatten())
                .map(str::to_owned),
            traceparent,
        })
    }
}

impl CommandHeaders {
    /// The command's metadata, with the request's actor. With an idempotency key, the command
    /// id is derived from it and the actor (so the same caller's retry is recognised, and
    /// another caller's use of the same key is a command of its own) and the request's digest
    /// is kept (so a different request with the same key is refused).
    pub fn meta(&self, service: &str, request_fingerprint: &str) -> CommandMeta {
        let (command_id, request_hash) = match &self.idempotency_key {
            Some(key) => (
                id_for_key(service, key, self.actor.as_deref()),
                Some(digest(request_fingerprint)),
            ),
            None => (Uuid::now_v7(), None),
        };
        CommandMeta {
            command_id,
            correlation_id: self.correlation_id.clone(),
            causation_id: None,
            actor: self.actor.clone().unwrap_or_else(|| ANONYMOUS.to_owned()),
            request_hash,
            traceparent: self.traceparent.clone(),
            tracestate: self.tracestate.clone(),
        }
    }

    /// An id derived from the idempotency key when there is one (so a retried `POST /orders`
    /// names the same order), else a fresh UUIDv7.
    pub fn new_id(&self, purpose: &str) -> Uuid {
        match &self.idempotency_key {
            Some(key) => id_for_key(purpose, key, self.actor.as_deref()),
            None => Uuid::now_v7(),
        }
    }
}

/// The id a request with this idempotency key gets from this actor (`purpose` is the service
/// for a command id, `order-id` for the order `POST /orders` creates); the gateway uses it to
/// find the instance owning the new aggregate's partition. A header value cannot hold a line
/// feed, so no actor and key run together into another pair.
pub fn id_for_key(purpose: &str, key: &str, actor: Option<&str>) -> Uuid {
    let name = match actor {
        None => format!("{purpose}:{key}"),
        Some(actor) => format!("{purpose}:{actor}\n{key}"),
    };
    Uuid::new_v5(&COMMAND_NAMESPACE, name.as_bytes())
}

/// The hex SHA-256 of `text`: a request's fingerprint.
pub fn digest(text: &str) -> String {
    let hash = Sha256::digest(text.as_bytes());
    hash.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_usable_correlation_id_is_kept_and_any_other_replaced_by_a_new_one() {
        use tower::ServiceExt;
        let app = correlation_ids(Router::new().route(
            "/",
            axum::routing::get(|headers: HeaderMap| async move {
                headers
                    .get(CORRELATION_ID)
                    .map(|value| value.as_bytes().to_vec())
                    .unwrap_or_default()
            }),
        ));
        let long = [b'x'; 256];
        let cases: [(Option<&[u8]>, bool); 5] = [
            (None, false),
            (Some(b"corr-1"), true),
            (Some(b"   "), false),
            (Some(&long), false),
            (Some(b"caf\xc3\xa9"), false),
        ];
        for (sent, kept) in cases {
            let mut request = axum::http::Request::get("/");
            if let Some(sent) = sent {
                request = request.header(CORRELATION_ID, sent);
            }
            let response = app
                .clone()
                .oneshot(request.body(axum::body::Body::empty()).expect("request"))
                .await
                .expect("response");
            let answered = response
                .headers()
                .get(CORRELATION_ID)
                .and_then(|value| value.to_str().ok())
                .expect("a correlation id in the answer")
                .to_owned();
            let seen = axum::body::to_bytes(response.into_body(), 1024)
                .await
                .expect("body");
            assert_eq!(
                seen,
                answered.as_bytes(),
                "the handler sees the answered id"
            );
            if kept {
                assert_eq!(Some(answered.as_bytes()), sent);
            } else {
                let id = Uuid::parse_str(&answered).expect("a UUID");
                assert_eq!(id.get_version_num(), 7, "{answered} for {sent:?}");
            }
        }
    }

    #[test]
    fn an_idempotency_key_is_scoped_to_its_actor() {
        let headers = |actor: Option<&str>| CommandHeaders {
            idempotency_key: Some("1".to_owned()),
            actor: actor.map(str::to_owned),
            expected_version: None,
            correlation_id: "c".to_owned(),
            traceparent: None,
            tracestate: None,
        };
        let (alice, bob, nobody) = (
            headers(Some("key:alice")),
            headers(Some("key:bob")),
            headers(None),
        );
        assert_eq!(alice.meta("order", "x").actor, "key:alice");
        assert_eq!(nobody.meta("order", "x").actor, ANONYMOUS);
        assert_eq!(
            alice.meta("order", "x").command_id,
            alice.meta("order", "x").command_id,
            "a caller's retry is the same command"
        );
        assert_ne!(
            alice.meta("order", "x").command_id,
            bob.meta("order", "x").command_id
        );
        assert_ne!(alice.new_id("order-id"), bob.new_id("order-id"));
        assert_ne!(alice.new_id("order-id"), nobody.new_id("order-id"));
        // Without an actor the id is the one the key alone always named.
        assert_eq!(
            nobody.meta("order", "x").command_id,
            Uuid::new_v5(&COMMAND_NAMESPACE, b"order:1")
        );
    }

    #[test]
    fn if_match_accepts_quoted_bare_and_weak_versions() {
        for raw in ["\"3\"", "3", "W/\"3\""] {
            let mut headers = HeaderMap::new();
            headers.insert("if-match", raw.parse().expect("header value"));
            assert_eq!(expected_version(&headers), Ok(Some(3)));
        }
        let mut headers = HeaderMap::new();
        headers.insert("if-match", "\"three\"".parse().expect("header value"));
        assert!(matches!(
            expected_version(&headers),
            Err(ApiError::BadRequest(_))
        ));
    }
}
