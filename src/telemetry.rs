//! The request span and its `answered` log line, and the process's HTTP command metrics, which
//! `/metrics` exposes with the log's histograms of `event_log::metrics` ([`register`]).
//!
//! [`instrument`] wraps the router: tower-http's `TraceLayer` opens a `request` span per
//! request (method, path, correlation id, trace id), logs one `answered` line in it, and
//! [`track`] inside it counts and times every request of the command class (as its route
//! declares it, [`http_edge::security::routes`]) by route and outcome. The metrics are per
//! process, as a Prometheus registry is: several platforms in one test process add to the same
//! series.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

use opentelemetry::trace::TraceContextExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tower_http::trace::TraceLayer;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use http_edge::headers::CORRELATION_ID;
use http_edge::security::RouteClass;

const SERVER_TIMING: &str = "server-timing";
const TRACEPARENT: &str = "traceparent";

/// Upper bounds (seconds) of the command latency histogram's buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    route: String,
    outcome: &'static str,
}

struct Metrics {
    commands: Family<CommandLabels, Counter>,
    latency: Histogram,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    commands: Family::default(),
    latency: Histogram::new(BUCKETS),
});

/// Adds the command series and the log's histograms to a registry that `/metrics` encodes.
pub fn register(registry: &mut Registry) {
    registry.register(
        "platform_commands",
        "HTTP commands answered, by route and outcome (accepted, conflict, rejected, refused, failed)",
        METRICS.commands.clone(),
    );
    registry.register(
        "platform_command_duration_seconds",
        "Time from a command's arrival to its answer (decide, append, read back as effective)",
        METRICS.latency.clone(),
    );
    event_log::metrics::register(registry);
}

/// What a command's status says about it.
pub fn outcome(status: u16) -> &'static str {
    match status {
        200..=299 => "accepted",
        409 => "conflict",
        401 | 403 | 429 => "refused",
        400..=499 => "rejected",
        _ => "failed",
    }
}

/// The request span and its log line around `router`, with [`track`] inside the span. The
/// span reads the correlation id, so `http_edge::headers::correlation_ids` goes outside this.
pub fn instrument<S>(router: Router<S>) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    router.layer(axum::middleware::from_fn(track)).layer(
        TraceLayer::new_for_http()
            .make_span_with(request_span)
            .on_request(())
            .on_response(answered)
            // A failed request is logged once, by `answered`; 500s log their cause where they
            // happen.
            .on_failure(()),
    )
}

/// The `request` span, carrying the request's correlation id, so every log line of the request
/// has it. With the OpenTelemetry layer (`--otlp-endpoint`), the span is a child of the
/// client's trace (or starts one).
fn request_span(request: &Request) -> tracing::Span {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
    };
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        correlation_id = header(CORRELATION_ID).unwrap_or_default(),
        trace_id = tracing::field::Empty,
    );
    let traceparent = header(TRACEPARENT);
    if let Some(parent) = http_edge::trace::remote_parent(traceparent) {
        let _ = span.set_parent(parent);
    }
    let own = span.context().span().span_context().clone();
    let trace_id = if own.is_valid() {
        Some(own.trace_id().to_string())
    } else {
        http_edge::trace::ids(traceparent).map(|(trace_id, _)| trace_id)
    };
    if let Some(trace_id) = trace_id {
        span.record("trace_id", trace_id.as_str());
    }
    span
}

/// One line per request, inside its span: JSON logs carry its correlation and trace ids. The
/// open routes (probes, scrapers) answer every few seconds, so they log only at debug.
fn answered(response: &Response, latency: Duration, _: &tracing::Span) {
    let status = response.status().as_u16();
    let millis = latency.as_secs_f64() * 1e3;
    if response.extensions().get::<RouteClass>() == Some(&RouteClass::Open) {
        tracing::debug!(status, millis, "answered");
    } else {
        tracing::info!(status, millis, "answered");
    }
}

/// Inside the request span: makes the span's own context the request's `traceparent` (the
/// command API writes that into the events, so the projections' and saga's spans are its
/// children; without the OpenTelemetry layer the span has no context and the client's header
/// stays), gives the answer its `Server-Timing`, and counts and times the requests the routes'
/// own declaration says are commands.
pub async fn track(mut request: Request, next: Next) -> Response {
    let own = tracing::Span::current().context();
    let own = own.span().span_context().clone();
    if own.is_valid()
        && let Ok(value) = HeaderValue::from_str(&http_edge::trace::format(&own))
    {
        request.headers_mut().insert(TRACEPARENT, value);
    }
    // Cheap clones (an `Arc<str>` and a method): the label is made only for commands.
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let method = request.method().clone();
    let started = Instant::now();
    let mut response = next.run(request).await;
    let elapsed = started.elapsed();
    // The server's own time, in the standard header browsers' developer tools and load
    // generators read (`platform-bench commands` splits its latency with it).
    let millis = elapsed.as_secs_f64() * 1e3;
    if let Ok(value) = HeaderValue::from_str(&format!("app;dur={millis:.3}")) {
        response.headers_mut().append(SERVER_TIMING, value);
    }
    if response.extensions().get::<RouteClass>() == Some(&RouteClass::Command) {
        let route = format!(
            "{method} {}",
            matched.as_ref().map_or("unmatched", MatchedPath::as_str)
        );
        METRICS
            .commands
            .get_or_create(&CommandLabels {
                route,
                outcome: outcome(response.status().as_u16()),
            })
            .inc();
        METRICS.latency.observe(elapsed.as_secs_f64());
    }
    response
}

/// The saga instances per state, for `platform_saga_instances`; none when the count fails.
pub async fn saga_instances(saga: &saga_orchestrator::side::SagaSide) -> Vec<(String, i64)> {
    saga_orchestrator::driver::count_by_state(saga.db())
        .await
        .unwrap_or_default()
}
