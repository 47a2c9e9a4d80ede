//! Forwarding a request to an instance: retries of idempotent requests on another instance,
//! per-class timeouts, hop-by-hop headers, and the upstream's answer passed on as it is.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use http_edge::{ApiError, MAX_BODY_BYTES};

use crate::registry::{Instance, Registry};
use http_edge::security::Security;

use crate::IDEMPOTENCY_KEY;
use crate::routing::{Upstream, class, route, segments};
use http_edge::headers::CORRELATION_ID;

/// An upstream's answer, passed on as it is (less hop-by-hop headers).
pub(crate) async fn forward(
    response: reqwest::Response,
    upstream: &str,
) -> Result<Response, ApiError> {
    let mut out = Response::builder().status(response.status());
    if let Some(out_headers) = out.headers_mut() {
        for (name, value) in response.headers() {
            if !is_hop_by_hop(name) {
                out_headers.append(name.clone(), value.clone());
            }
        }
    }
    let bytes = response.bytes().await.map_err(|error| {
        ApiError::BadGateway(format!("upstream {upstream} broke off its answer: {error}"))
    })?;
    out.body(Body::from(bytes))
        .map_err(|error| ApiError::Internal(format!("building the gateway's answer: {error}")))
}

impl Registry {
    /// Forwards one request; the answer is the upstream's, or a problem of the gateway's own.
    pub(crate) async fn forward(&self, request: Request) -> Result<Response, ApiError> {
        let (parts, body) = request.into_parts();
        let mut headers = parts.headers;
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
        let client_key = headers
            .get(IDEMPOTENCY_KEY)
            .and_then(|value| value.to_str().ok())
            .map(|key| key.trim().to_owned())
            .filter(|key| !key.is_empty());
        // A new order's or customer's id comes from its idempotency key: give it one, so the
        // gateway knows the owner of the new aggregate's partition (and may retry it safely).
        let generated_key = (parts.method == Method::POST
            && matches!(
                segments(parts.uri.path()).as_slice(),
                [only] if only == "orders" || only == "customers"
            )
            && client_key.is_none())
        .then(|| format!("gw-{}", uuid::Uuid::now_v7()));
        if let Some(key) = &generated_key
            && let Ok(value) = HeaderValue::from_str(key)
        {
            headers.insert(IDEMPOTENCY_KEY, value);
        }
        let key = client_key.as_deref().or(generated_key.as_deref());
        // The caller the security layer authenticated, from which the order service derives a
        // new order's id as this does (the gateway forwards the same credentials).
        let actor = parts
            .extensions
            .get::<http_edge::headers::Actor>()
            .map(|actor| actor.0.as_str());
        let route = route(&parts.method, parts.uri.path(), key, actor)
            .ok_or_else(|| ApiError::NotFound(format!("no route for {}", parts.uri.path())))?;
        let pool = self.pool(route.upstream).ok_or_else(|| {
            ApiError::NotFound(format!(
                "no upstream {} is configured for {}",
                route.upstream.name(),
                parts.uri.path()
            ))
        })?;
        let body = axum::body::to_bytes(body, MAX_BODY_BYTES)
            .await
            .map_err(|_| ApiError::PayloadTooLarge(MAX_BODY_BYTES))?;
        let idempotent = !route.command || key.is_some();
        let timeout = if route.command {
            self.inner.policy.command_timeout
        } else {
            self.inner.policy.read_timeout
        };
        let owner_of = route.aggregate.as_ref().map(|(kind, id)| {
            (
                format!("{}.{kind}.events", self.inner.topic_prefix),
                event_log::partition_for(id, self.inner.partitions),
            )
        });
        // The host the client addressed, for the upstream's same-origin checks (the console's
        // forms): `Host` itself names the upstream once forwarded.
        if let Some(host) = headers.get(axum::http::header::HOST).cloned() {
            headers.insert("x-forwarded-host", host);
        }
        strip_hop_by_hop(&mut headers);

        let attempts = 1 + self.inner.policy.retries;
        let mut last_error = None;
        // The instances this request went to, by base URL.
        let mut tried: Vec<String> = Vec::new();
        for attempt in 0..attempts {
            let candidates = match pool.candidates(
                owner_of
                    .as_ref()
                    .map(|(topic, partition)| (topic.as_str(), *partition)),
            ) {
                Ok(candidates) => candidates,
                Err(error) => {
                    if matches!(error, ApiError::CircuitOpen(_)) {
                        self.inner.counters.breaker_rejections.inc();
                    }
                    // After a failed attempt, the attempt's own error says more.
                    return Err(last_error.unwrap_or(error));
                }
            };
            // The first candidate not tried yet for this request that takes it, else the first
            // tried one that does. Each call of `candidates` moves the round robin on, so a
            // turn counted from the attempt number could land on the same instance every time
            // (with two instances it did: the rotation and the turn cancelled out).
            let is_tried =
                |instance: &Arc<Instance>| tried.iter().any(|base: &String| *base == instance.base);
            let Some(instance) = candidates
                .iter()
                .filter(|instance| !is_tried(instance))
                .chain(candidates.iter().filter(|instance| is_tried(instance)))
                .find(|instance| instance.admit(&self.inner.policy))
                .cloned()
            else {
                self.inner.counters.breaker_rejections.inc();
                return Err(last_error.unwrap_or_else(|| {
                    ApiError::CircuitOpen(format!(
                        "the circuit breaker of every instance of upstream {} is open: retry later",
                        route.upstream.name()
                    ))
                }));
            };
            if !tried.contains(&instance.base) {
                tried.push(instance.base.clone());
            }
            if attempt > 0 {
                self.inner.counters.retries.inc();
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
            }
            let url = format!("{}{}", instance.base, path_and_query);
            let sent = self
                .inner
                .client
                .request(parts.method.clone(), &url)
                .headers(headers.clone())
                .body(body.clone())
                .timeout(timeout)
                .send()
                .await;
            match sent {
                Ok(response)
                    if response
                        .headers()
                        .get(http_edge::error::ROUTING)
                        .is_some_and(|value| value == "elsewhere") =>
                {
                    // "Not decided here": routing information, not a failure of the instance (it
                    // answered, which closes a half-open breaker). Nothing was done, so another
                    // instance may always be asked.
                    instance.record(true, &self.inner.policy);
                    if let Some((topic, partition)) = &owner_of {
                        instance.disown(topic, *partition);
                    }
                    if attempt + 1 < attempts {
                        tracing::info!(instance = %instance.base, attempt, "not the owner; asking another instance");
                        last_error = Some(ApiError::Unavailable(format!(
                            "no instance of upstream {} decides for this aggregate right now",
                            route.upstream.name()
                        )));
                        continue;
                    }
                    return forward(response, route.upstream.name()).await;
                }
                Ok(response) => {
                    let status = response.status();
                    let failed = matches!(
                        status,
                        StatusCode::BAD_GATEWAY
                            | StatusCode::SERVICE_UNAVAILABLE
                            | StatusCode::GATEWAY_TIMEOUT
                    ) || status == StatusCode::INTERNAL_SERVER_ERROR;
                    instance.record(!failed, &self.inner.policy);
                    let retryable = failed && status != StatusCode::INTERNAL_SERVER_ERROR;
                    if retryable && idempotent && attempt + 1 < attempts {
                        tracing::info!(instance = %instance.base, %status, attempt, "retrying on another attempt");
                        last_error = Some(ApiError::Unavailable(format!(
                            "upstream {} answered {status}",
                            route.upstream.name()
                        )));
                        continue;
                    }
                    return forward(response, route.upstream.name()).await;
                }
                Err(error) => {
                    instance.record(false, &self.inner.policy);
                    let never_sent = error.is_connect();
                    let problem = if error.is_timeout() {
                        ApiError::GatewayTimeout(format!(
                            "upstream {} did not answer within {} ms",
                            route.upstream.name(),
                            timeout.as_millis()
                        ))
                    } else {
                        ApiError::BadGateway(format!(
                            "upstream {} could not be reached",
                            route.upstream.name()
                        ))
                    };
                    tracing::warn!(instance = %instance.base, %error, attempt, "upstream attempt failed");
                    if (idempotent || never_sent) && attempt + 1 < attempts {
                        last_error = Some(problem);
                        continue;
                    }
                    return Err(problem);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| {
            ApiError::Unavailable(format!("upstream {} failed", route.upstream.name()))
        }))
    }
}

pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

pub(crate) async fn proxy(State(registry): State<Registry>, mut request: Request) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    // Set by `http_edge::headers::correlation_ids` around the gateway, and forwarded upstream
    // with the other headers.
    let correlation_id = request
        .headers()
        .get(CORRELATION_ID)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    // Start a W3C trace here unless the client already did: its id travels with the command
    // into the events' `traceparent` header, the projections and the saga's commands.
    let trace_id = match request
        .headers()
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .and_then(|traceparent| http_edge::trace::ids(Some(traceparent)))
    {
        Some((trace_id, _)) => trace_id,
        None => {
            let trace_id = uuid::Uuid::new_v4().simple().to_string();
            let span_id = &uuid::Uuid::new_v4().simple().to_string()[..16];
            if let Ok(value) = HeaderValue::from_str(&format!("00-{trace_id}-{span_id}-01")) {
                request.headers_mut().insert("traceparent", value);
            }
            trace_id
        }
    };
    if !crate::routing::is_plain(&path) {
        return ApiError::BadRequest(format!(
            "the path {path:?} has a `.` or `..` segment or a backslash: name the resource directly"
        ))
        .into_response();
    }
    let upstream = route(&method, &path, Some(""), None).map(|route| route.upstream);
    // The gateway checks the caller for the class of the route it forwards to, as that route's
    // service declares it (the service checks again: the credentials travel on).
    let admitted = match request.extensions().get::<Arc<Security>>().cloned() {
        Some(security) => security.authorize(class(&method, &path), &mut request),
        None => Err(ApiError::Internal(
            "the gateway serves without its security layer".to_owned(),
        )),
    };
    let response = match admitted {
        Ok(()) => match registry.forward(request).await {
            Ok(response) => response,
            Err(error) => error.into_response(),
        },
        Err(error) => error.into_response(),
    };
    if let Some(upstream) = upstream {
        registry.count(upstream, response.status());
    }
    tracing::info!(
        %method,
        path,
        upstream = upstream.map(Upstream::name),
        status = response.status().as_u16(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        correlation_id,
        trace_id,
        "gateway request"
    );
    response
}
