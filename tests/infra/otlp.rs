//! OpenTelemetry traces exported by OTLP/HTTP: the platform binary, started with
//! `--otlp-endpoint` pointing at a real OTLP/HTTP receiver in this test (an axum server decoding
//! the protobuf `ExportTraceServiceRequest`s), exports the command's request span as a child of
//! the client's `traceparent`, and the projections' and saga's spans as children of that request
//! span, all in the client's trace.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use prost::Message;
use serde_json::json;

use crate::support::read;

/// One span as the receiver got it: its service, ids (hex) and string attributes.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: Vec<(String, String)>,
}

impl Received {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.as_str())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn strings(attributes: &[KeyValue]) -> Vec<(String, String)> {
    attributes
        .iter()
        .filter_map(
            |attribute| match attribute.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(value) => {
                    Some((attribute.key.clone(), value.clone()))
                }
                _ => None,
            },
        )
        .collect()
}

type Spans = Arc<Mutex<Vec<Received>>>;

/// `POST /v1/traces` as an OTLP/HTTP collector answers it: protobuf in, an empty
/// `ExportTraceServiceResponse` (also protobuf) out; 400 for a body that does not decode.
async fn receive(
    State(spans): State<Spans>,
    body: Bytes,
) -> (StatusCode, [(&'static str, &'static str); 1], Vec<u8>) {
    let headers = [("content-type", "application/x-protobuf")];
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, headers, Vec::new());
    };
    let mut received = Vec::new();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .as_ref()
            .map(|resource| strings(&resource.attributes))
            .unwrap_or_default()
            .into_iter()
            .find(|(key, _)| key == "service.name")
            .map(|(_, value)| value)
            .unwrap_or_default();
        for scope_spans in resource_spans.scope_spans {
            for span in scope_spans.spans {
                received.push(Received {
                    service: service.clone(),
                    name: span.name.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: strings(&span.attributes),
                });
            }
        }
    }
    spans.lock().expect("spans").extend(received);
    (StatusCode::OK, headers, Vec::new())
}

struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_its_projections_and_saga_steps_are_exported_in_one_trace() {
    let spans = Spans::default();
    let receiver = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the receiver");
    let collector = format!("http://{}", receiver.local_addr().expect("address"));
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(receive))
        .with_state(spans.clone());
    tokio::spawn(async move { axum::serve(receiver, app).await });

    let dir = tempfile::tempdir().expect("temp dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let _platform = Kill(
        Command::new(env!("CARGO_BIN_EXE_platform"))
            .args(["serve", "--partitions", "2", "--data-dir"])
            .arg(dir.path())
            .arg("--http-addr")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--otlp-endpoint")
            .arg(&collector)
            .env("RUST_LOG", "info,sqlx=warn")
            // Export every 100 ms rather than every 5 s.
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env_remove("OTEL_SERVICE_NAME")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("platform binary"),
    );
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while client
        .get(format!("{url}/health/ready"))
        .send()
        .await
        .map_or(true, |response| !response.status().is_success())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "platform never came up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let client_span = "00f067aa0ba902b7";
    let (status, _, body) = read(
        client
            .post(format!("{url}/orders"))
            .header("traceparent", format!("00-{trace_id}-{client_span}-01"))
            .json(
                &json!({"customer_id": "c-otlp", "currency": "EUR", "payment_token": "tok_timeout",
                "lines": [{"sku": "SKU-OTLP", "quantity": 1, "unit_price_minor": 100}]}),
            )
            .send()
            .await
            .expect("order"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let order_id = body["order_id"].as_str().expect("order id").to_owned();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ours: Vec<Received> = spans
            .lock()
            .expect("spans")
            .iter()
            .filter(|span| span.trace_id == trace_id)
            .cloned()
            .collect();
        // The request span continues the client's trace, under the client's span.
        let request = ours.iter().find(|span| {
            span.name == "request"
                && span.parent_span_id == client_span
                && span.attribute("path") == Some("/orders")
        });
        let under_request = |name: &str, projection: Option<&str>, aggregate: Option<&str>| {
            request.is_some_and(|request| {
                ours.iter().any(|span| {
                    span.name == name
                        && span.parent_span_id == request.span_id
                        && (projection.is_none() || span.attribute("projection") == projection)
                        && (aggregate.is_none() || span.attribute("aggregate_id") == aggregate)
                })
            })
        };
        let projection = under_request("projection.apply", Some("orders"), Some(&order_id));
        let saga = under_request("saga.step", None, Some(&order_id));
        // The saga's command to reserve stock carries the trace on, into the stock's events.
        let downstream = under_request("projection.apply", Some("inventory"), None);
        if projection && saga && downstream {
            assert!(
                ours.iter().all(|span| span.service == "platform-all"),
                "service names: {ours:#?}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "exported spans of trace {trace_id} (request {}, projection {projection}, saga \
             {saga}, downstream {downstream}): {ours:#?}",
            request.is_some()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
