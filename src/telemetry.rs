//! The process's HTTP command metrics, rendered into `/metrics` in the Prometheus text format,
//! and the correlation id of every request's log lines (each request logs one `answered` line
//! inside its span). The log's append latency and the projections' batch sizes are histograms
//! of `event_log::metrics`, rendered here too.
//!
//! A middleware times every request of the command class (as its route declares it, [`http_edge::security::routes`])
//! and counts it by route and outcome; `/metrics` renders the counters and a latency histogram.
//! The registry is per process, as a Prometheus registry is: several platforms in one test
//! process add to the same series.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

use opentelemetry::trace::TraceContextExt;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use http_edge::security::RouteClass;

const CORRELATION_ID: &str = "x-correlation-id";
const SERVER_TIMING: &str = "server-timing";

/// Upper bounds (seconds) of the command latency histogram's buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds.
    sum_micros: AtomicU64,
}

#[derive(Default)]
struct Registry {
    /// (route, outcome) → count
    commands: Mutex<BTreeMap<(String, &'static str), u64>>,
    latency: Histogram,
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
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

/// The middleware: gives every request a correlation id (the client's `X-Correlation-Id`, or a
/// new one) and a span carrying it, so every log line of the request has it; returns it in the
/// answer; counts and times command requests.
pub async fn track(mut request: Request, next: Next) -> Response {
    let correlation_id = request
        .headers()
        .get(CORRELATION_ID)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|value| !value.is_empty() && value.len() <= 255)
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    if let Ok(value) = HeaderValue::from_str(&correlation_id) {
        request.headers_mut().insert(CORRELATION_ID, value);
    }
    let traceparent = request
        .headers()
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        correlation_id = %correlation_id,
        trace_id = tracing::field::Empty,
    );
    // With the OpenTelemetry layer (`--otlp-endpoint`), the span is a child of the client's
    // trace (or starts one), and its own context becomes the request's `traceparent`: the
    // command API writes that into the events, so the projections' and saga's spans are its
    // children. Without the layer the span has no context and the client's header stays.
    if let Some(parent) = http_edge::trace::remote_parent(traceparent.as_deref()) {
        let _ = span.set_parent(parent);
    }
    let own = span.context();
    let own = own.span().span_context().clone();
    let traceparent = if own.is_valid() {
        let own = http_edge::trace::format(&own);
        if let Ok(value) = HeaderValue::from_str(&own) {
            request.headers_mut().insert("traceparent", value);
        }
        Some(own)
    } else {
        traceparent
    };
    if let Some((trace_id, _)) = http_edge::trace::ids(traceparent.as_deref()) {
        span.record("trace_id", trace_id.as_str());
    }
    let probe = matches!(
        request.uri().path(),
        "/metrics" | "/health/live" | "/health/ready"
    );
    let started = Instant::now();
    let mut response = timed(request, next).instrument(span.clone()).await;
    let millis = started.elapsed().as_secs_f64() * 1e3;
    // One line per request, inside its span: JSON logs carry its correlation and trace ids.
    // Probes answer every few seconds, so they log only at debug.
    span.in_scope(|| {
        let status = response.status().as_u16();
        if probe {
            tracing::debug!(status, millis, "answered");
        } else {
            tracing::info!(status, millis, "answered");
        }
    });
    // The server's own time, in the standard header browsers' developer tools and load
    // generators read (`platform-bench commands` splits its latency with it).
    if let Ok(value) = HeaderValue::from_str(&format!("app;dur={millis:.3}")) {
        response.headers_mut().append(SERVER_TIMING, value);
    }
    if !response.headers().contains_key(CORRELATION_ID)
        && let Ok(value) = HeaderValue::from_str(&correlation_id)
    {
        response.headers_mut().insert(CORRELATION_ID, value);
    }
    response
}

/// Times and counts the requests the routes' own declaration says are commands.
async fn timed(request: Request, next: Next) -> Response {
    // Cheap clones (an `Arc<str>` and a method): the label is made only for commands.
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let method = request.method().clone();
    let started = Instant::now();
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    if response.extensions().get::<RouteClass>() != Some(&RouteClass::Command) {
        return response;
    }
    let route = format!(
        "{method} {}",
        matched.as_ref().map_or("unmatched", MatchedPath::as_str)
    );
    let registry = registry();
    if let Ok(mut commands) = registry.commands.lock() {
        *commands
            .entry((route, outcome(response.status().as_u16())))
            .or_default() += 1;
    }
    let seconds = elapsed.as_secs_f64();
    for (bound, bucket) in BUCKETS.iter().zip(&registry.latency.buckets) {
        if seconds <= *bound {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
    }
    registry.latency.count.fetch_add(1, Ordering::Relaxed);
    registry
        .latency
        .sum_micros
        .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    response
}

/// Appends the command series to a Prometheus text exposition.
pub fn render(out: &mut String) {
    let registry = registry();
    let _ = writeln!(
        out,
        "# HELP platform_commands_total HTTP commands answered, by route and outcome (accepted, conflict, rejected, refused, failed)."
    );
    let _ = writeln!(out, "# TYPE platform_commands_total counter");
    if let Ok(commands) = registry.commands.lock() {
        for ((route, outcome), count) in commands.iter() {
            let _ = writeln!(
                out,
                "platform_commands_total{{route=\"{}\",outcome=\"{outcome}\"}} {count}",
                route.replace('"', "'")
            );
        }
    }
    let name = "platform_command_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time from a command's arrival to its answer (decide, append, read back as effective)."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (bound, bucket) in BUCKETS.iter().zip(&registry.latency.buckets) {
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{bound}\"}} {}",
            bucket.load(Ordering::Relaxed)
        );
    }
    let count = registry.latency.count.load(Ordering::Relaxed);
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(
        out,
        "{name}_sum {}",
        registry.latency.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
    );
    let _ = writeln!(out, "{name}_count {count}");
    event_log::metrics::render(out);
}

/// Appends the saga instances per state.
pub async fn render_sagas(out: &mut String, saga: &saga_orchestrator::side::SagaSide) {
    let rows = saga
        .db()
        .fetch_all(
            "SELECT state, COUNT(*) AS n FROM sagas GROUP BY state ORDER BY state",
            &[],
        )
        .await;
    let _ = writeln!(
        out,
        "# HELP platform_saga_instances Saga instances by state (needs_attention: parked for an operator)."
    );
    let _ = writeln!(out, "# TYPE platform_saga_instances gauge");
    if let Ok(rows) = rows {
        for row in rows {
            let _ = writeln!(
                out,
                "platform_saga_instances{{state=\"{}\"}} {}",
                row.text("state"),
                row.int("n")
            );
        }
    }
}
