//! W3C trace context (`traceparent`, RFC-style `00-<trace id>-<span id>-<flags>`), read by
//! OpenTelemetry's own propagator: the one parser of the header in the platform, for requests
//! (the command API keeps a valid one in its events) and for the events' spans (each names the
//! request's span as its remote parent). An invalid `traceparent` is ignored, as the
//! trace-context specification asks.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;

const TRACEPARENT: &str = "traceparent";

/// A carrier holding only a `traceparent`.
struct Traceparent<'a>(&'a str);

impl Extractor for Traceparent<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

/// The OpenTelemetry context whose remote parent the `traceparent` names, when it is a valid
/// one: the parent of a span that continues the trace (a tracing layer that exports spans then
/// puts the span under the one that sent the header or appended the event).
pub fn remote_parent(traceparent: Option<&str>) -> Option<opentelemetry::Context> {
    let context = TraceContextPropagator::new().extract(&Traceparent(traceparent?.trim()));
    let valid = context.span().span_context().is_valid();
    valid.then_some(context)
}

/// The span context a valid `traceparent` names.
pub fn span_context(traceparent: Option<&str>) -> Option<SpanContext> {
    remote_parent(traceparent).map(|context| context.span().span_context().clone())
}

/// Whether `traceparent` is a valid W3C trace parent.
pub fn is_valid(traceparent: &str) -> bool {
    span_context(Some(traceparent)).is_some()
}

/// `(trace id, parent span id)` in lower-case hex, of a valid `traceparent`.
pub fn ids(traceparent: Option<&str>) -> Option<(String, String)> {
    span_context(traceparent).map(|context| {
        (
            context.trace_id().to_string(),
            context.span_id().to_string(),
        )
    })
}

/// The `traceparent` of a span context (version 00).
pub fn format(context: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags().to_u8()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_traceparent_splits_into_trace_and_parent_span() {
        assert_eq!(
            ids(Some(PARENT)),
            Some((
                "4bf92f3577b34da6a3ce929d0e0e4736".to_owned(),
                "00f067aa0ba902b7".to_owned()
            ))
        );
        assert_eq!(ids(Some("00-xyz-00f067aa0ba902b7-01")), None);
        assert_eq!(ids(None), None);
    }

    #[test]
    fn only_the_w3c_shape_is_valid() {
        assert!(is_valid(PARENT));
        assert!(is_valid(&format!(" {PARENT} ")));
        for invalid in [
            "garbage",
            "00-xyz-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "",
        ] {
            assert!(!is_valid(invalid), "{invalid:?}");
        }
    }

    #[test]
    fn a_traceparent_is_a_remote_parent_context_and_formats_back() {
        let context = span_context(Some(PARENT)).expect("a parent");
        assert!(context.is_remote() && context.is_sampled());
        assert_eq!(format(&context), PARENT);
    }
}
