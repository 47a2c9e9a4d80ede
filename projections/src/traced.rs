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

#[async_trait]
impl Projection for Traced {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        self.inner.aggregate_types()
    }

    fn migrations(&self) -> &'static sql_store::Migrations {
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
                let traceparent = envelope.traceparent.as_deref();
                let (trace_id, parent_span_id) =
                    http_edge::trace::ids(traceparent).unwrap_or_default();
                let span = match self.kind {
                    SpanKind::Projection => tracing::info_span!(
                        "projection.apply",
                        projection = self.inner.name(),
                        event_type = %envelope.event_type,
                        aggregate_id = %envelope.aggregate_id,
                        event_id = %envelope.event_id,
                        correlation_id = %envelope.correlation_id,
                        trace_id = %trace_id,
                        parent_span_id = %parent_span_id,
                    ),
                    SpanKind::Saga => tracing::info_span!(
                        "saga.step",
                        event_type = %envelope.event_type,
                        aggregate_id = %envelope.aggregate_id,
                        event_id = %envelope.event_id,
                        correlation_id = %envelope.correlation_id,
                        trace_id = %trace_id,
                        parent_span_id = %parent_span_id,
                    ),
                };
                if let Some(parent) = http_edge::trace::remote_parent(traceparent) {
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
