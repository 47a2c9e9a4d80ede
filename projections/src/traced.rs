//! Spans around a projection's work: one per event it applies, carrying the W3C trace id and
//! parent span id of the request that caused the event (the envelope's `traceparent`, which the
//! command API took from the request and the log keeps in a record header), and its correlation
//! id. So one trace id leads from the HTTP command to every read model and saga step it fed,
//! in the logs (`--log-json` shows span fields) and, with `--otlp-endpoint`, in the OpenTelemetry
//! traces the platform exports: each span's OpenTelemetry parent is the remote span the
//! `traceparent` names. Each batch's size also goes to `platform_projection_batch_size`.

use std::sync::Arc;

use async_trait::async_trait;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::db::Tx;
use crate::runtime::{ApplyError, Event, Projection};

/// Which span a [`Traced`] projection opens per event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// `projection.apply`
    Projection,
    /// `saga.step`
    Saga,
}

/// A projection whose `apply` opens a span per event.
pub struct Traced {
    inner: Arc<dyn Projection>,
    kind: SpanKind,
}

impl std::fmt::Debug for Traced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Traced({}, {:?})", self.inner.name(), self.kind)
    }
}

impl Traced {
    pub fn wrap(inner: Arc<dyn Projection>, kind: SpanKind) -> Arc<dyn Projection> {
        Arc::new(Traced { inner, kind })
    }
}

/// `(trace id, parent span id)` of a W3C `traceparent`, when it is one.
pub fn trace_context(traceparent: Option<&str>) -> Option<(&str, &str)> {
    let mut parts = traceparent?.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex =
        |part: &str, len: usize| part.len() == len && part.chars().all(|c| c.is_ascii_hexdigit());
    (parts.next().is_none() && hex(version, 2) && hex(trace, 32) && hex(span, 16) && hex(flags, 2))
        .then_some((trace, span))
}

/// The W3C `traceparent` as an OpenTelemetry context with that remote parent, when it is one:
/// the parent of an OpenTelemetry span, so a tracing layer that exports spans (the platform's
/// OTLP exporter) puts this span in the request's trace, under the span that appended the event.
pub fn remote_parent(traceparent: Option<&str>) -> Option<opentelemetry::Context> {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    let (trace, span) = trace_context(traceparent)?;
    let flags = traceparent?.trim().rsplit('-').next()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let context = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    context
        .is_valid()
        .then(|| opentelemetry::Context::new().with_remote_span_context(context))
}

#[async_trait]
impl Projection for Traced {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        self.inner.aggregate_types()
    }

    fn migrations(&self) -> &'static [&'static str] {
        self.inner.migrations()
    }

    fn recovery(&self) -> String {
        self.inner.recovery()
    }

    fn committed(&self) {
        self.inner.committed()
    }

    async fn apply(&self, tx: &mut Tx, events: &[Event]) -> Result<(), ApplyError> {
        event_log::metrics::observe_batch(self.inner.name(), events.len());
        // Opened before and closed after the batch: each span covers its event's application.
        let spans: Vec<tracing::Span> = events
            .iter()
            .map(|event| {
                let envelope = &event.envelope;
                let (trace_id, parent_span_id) =
                    trace_context(envelope.traceparent.as_deref()).unwrap_or_default();
                let span = match self.kind {
                    SpanKind::Projection => tracing::info_span!(
                        "projection.apply",
                        projection = self.inner.name(),
                        event_type = %envelope.event_type,
                        aggregate_id = %envelope.aggregate_id,
                        event_id = %envelope.event_id,
                        correlation_id = %envelope.correlation_id,
                        trace_id,
                        parent_span_id,
                    ),
                    SpanKind::Saga => tracing::info_span!(
                        "saga.step",
                        event_type = %envelope.event_type,
                        aggregate_id = %envelope.aggregate_id,
                        event_id = %envelope.event_id,
                        correlation_id = %envelope.correlation_id,
                        trace_id,
                        parent_span_id,
                    ),
                };
                if let Some(parent) = remote_parent(envelope.traceparent.as_deref()) {
                    // Without an OpenTelemetry layer this does nothing.
                    let _ = span.set_parent(parent);
                }
                span
            })
            .collect();
        let result = self.inner.apply(tx, events).await;
        drop(spans);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_splits_into_trace_and_parent_span() {
        assert_eq!(
            trace_context(Some(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            )),
            Some(("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"))
        );
        assert_eq!(trace_context(Some("00-xyz-00f067aa0ba902b7-01")), None);
        assert_eq!(trace_context(None), None);
    }

    #[test]
    fn a_traceparent_is_a_remote_parent_context() {
        use opentelemetry::trace::TraceContextExt;
        let parent = remote_parent(Some(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ))
        .expect("a parent");
        let span = parent.span();
        let context = span.span_context();
        assert!(context.is_remote() && context.is_sampled());
        assert_eq!(
            context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(context.span_id().to_string(), "00f067aa0ba902b7");
        assert!(
            remote_parent(Some(
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
            ))
            .is_none()
        );
        assert!(remote_parent(Some("garbage")).is_none());
    }
}
