//! OpenTelemetry traces exported by OTLP over HTTP (protobuf), when an endpoint is configured
//! (`--otlp-endpoint`, or the standard `OTEL_EXPORTER_OTLP_ENDPOINT`); off otherwise.
//!
//! The process's `tracing` spans become OpenTelemetry spans through a `tracing-opentelemetry`
//! layer: each request's `request` span (a child of the client's or the gateway's `traceparent`,
//! see [`crate::telemetry::track`]), whose context the command API writes into the events'
//! `traceparent` header, and the `projection.apply` and `saga.step` spans, whose parent is that
//! remote span (`projections::traced`). The SDK's batch processor exports from its own thread.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracerProvider, Tracer};
use tracing_opentelemetry::OpenTelemetryLayer;

/// The exporting pipeline; [`Exporter::shutdown`] flushes what is left.
#[derive(Debug)]
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Exports the spans still buffered and stops the export thread.
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "OTLP trace exporter did not shut down cleanly");
        }
    }
}

/// Where traces go for an OTLP base URL (`http://collector:4318`): `<base>/v1/traces`, as
/// `OTEL_EXPORTER_OTLP_ENDPOINT` means; a URL already ending in `/v1/traces` is kept.
pub fn traces_url(endpoint: &str) -> String {
    let endpoint = endpoint.trim().trim_end_matches('/');
    if endpoint.ends_with("/v1/traces") {
        endpoint.to_owned()
    } else {
        format!("{endpoint}/v1/traces")
    }
}

/// A layer exporting spans to `endpoint` as service `service` (unless `OTEL_SERVICE_NAME` says
/// otherwise), and the pipeline to shut down on exit.
pub fn layer<S>(
    endpoint: &str,
    service: &str,
) -> crate::error::Result<(OpenTelemetryLayer<S, Tracer>, Exporter)>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let url = traces_url(endpoint);
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url.clone())
        .build()
        .map_err(|error| crate::error::Error::Otlp {
            url: url.clone(),
            source: Box::new(error),
        })?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_owned());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("platform");
    Ok((
        tracing_opentelemetry::layer().with_tracer(tracer),
        Exporter { provider },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_url_gets_the_traces_path() {
        assert_eq!(
            traces_url("http://collector:4318"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/v1/traces"),
            "http://collector:4318/v1/traces"
        );
    }
}
