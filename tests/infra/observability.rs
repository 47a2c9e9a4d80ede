//! `/metrics` exposes the named series and every series README.md documents, in the Prometheus
//! text format, and every part answers `/health/live`, `/health/ready` and `/metrics`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use platform::Part;
use serde_json::json;

use crate::support::{self, read};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_commands_by_outcome_latency_lag_parking_conflicts_and_saga_states() {
    let dir = tempfile::tempdir().expect("temp dir");
    let app = support::platform(support::settings(dir.path()), Part::All).await;
    let client = reqwest::Client::new();
    let url = app.url();
    let (status, _, body) = read(
        client
            .post(format!("{url}/inventory/SKU-M/receipts"))
            .json(&json!({"quantity": 5}))
            .send()
            .await
            .expect("receipt"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let status = client
        .post(format!("{url}/inventory/SKU-M/receipts"))
        .header("if-match", "\"7\"")
        .json(&json!({"quantity": 5}))
        .send()
        .await
        .expect("conflict")
        .status();
    assert_eq!(status.as_u16(), 409);
    let status = client
        .post(format!("{url}/orders"))
        .json(&json!({"customer_id": "", "currency": "EUR", "payment_token": "tok_approve", "lines": []}))
        .send()
        .await
        .expect("invalid order")
        .status();
    assert_eq!(status.as_u16(), 422);
    let status = client
        .post(format!("{url}/orders"))
        .json(
            &json!({"customer_id": "c-m", "currency": "EUR", "payment_token": "tok_timeout",
            "lines": [{"sku": "SKU-M", "quantity": 1, "unit_price_minor": 100}]}),
        )
        .send()
        .await
        .expect("order")
        .status();
    assert_eq!(status.as_u16(), 201);

    // The saga starts on the order; its state shows once it has consumed it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        let metrics = client
            .get(format!("{url}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        if metrics.contains("platform_saga_instances{state=")
            && metrics.contains("platform_projection_batch_size_count{projection=\"orders\"}")
        {
            break metrics;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no saga state in:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for series in [
        "platform_commands_total{route=\"POST /inventory/{sku}/receipts\",outcome=\"accepted\"}",
        "platform_commands_total{route=\"POST /inventory/{sku}/receipts\",outcome=\"conflict\"}",
        "platform_commands_total{route=\"POST /orders\",outcome=\"rejected\"}",
        "platform_commands_total{route=\"POST /orders\",outcome=\"accepted\"}",
        "platform_command_duration_seconds_bucket{le=\"+Inf\"}",
        "platform_command_duration_seconds_count",
        "platform_command_conflicts_total{topic=",
        "platform_projection_lag_events{projection=",
        "platform_projection_lag_seconds{projection=",
        "platform_projection_parked_events{projection=",
        "platform_projection_conflicts_total{projection=",
        "platform_saga_instances{state=",
        "# TYPE platform_append_duration_seconds histogram",
        "platform_append_duration_seconds_bucket{backend=\"embedded\",topic=",
        "# TYPE platform_projection_batch_size histogram",
        "platform_projection_batch_size_bucket{projection=\"orders\",le=\"+Inf\"}",
        "platform_projection_batch_size_count{projection=\"saga\"}",
    ] {
        assert!(
            metrics.contains(series),
            "{series} missing from:\n{metrics}"
        );
    }
    // The order and the receipts were appended to their topics, and timed.
    let appended = |suffix: &str| {
        metrics.lines().any(|line| {
            line.starts_with("platform_append_duration_seconds_count{backend=\"embedded\",topic=")
                && line.contains(&format!("{suffix}\"}}"))
                && line.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok()) >= Some(1)
        })
    };
    assert!(
        appended(".order.events"),
        "no order append timed in:\n{metrics}"
    );
    assert!(
        appended(".stock.events"),
        "no receipt append timed in:\n{metrics}"
    );
    // Every series README.md lists is there, with the labels it lists, and has samples.
    let exposition = Exposition::parse(&metrics);
    let documented = documented_series();
    assert!(
        documented.len() >= 10,
        "README.md's observability section lists fewer series than it should: {documented:?}"
    );
    for (name, labels) in documented {
        let Some(kind) = exposition.types.get(&name) else {
            panic!("README.md documents {name}, which /metrics does not declare:\n{metrics}");
        };
        let samples: Vec<&Sample> = exposition
            .samples
            .iter()
            .filter(|sample| sample.family == name)
            .collect();
        assert!(!samples.is_empty(), "no sample of {name} in:\n{metrics}");
        if let Some(labels) = labels {
            for sample in samples {
                let mut names: Vec<&str> = sample
                    .labels
                    .iter()
                    .map(|(label, _)| label.as_str())
                    .filter(|label| !(kind == "histogram" && *label == "le"))
                    .collect();
                names.sort_unstable();
                let mut expected: Vec<&str> = labels.iter().map(String::as_str).collect();
                expected.sort_unstable();
                assert_eq!(names, expected, "labels of {name} (README.md): {sample:?}");
            }
        }
    }
    app.stop().await;
}

/// The series README.md's observability section lists for `/metrics` (the parts' own; the
/// gateway's are `platform_gateway_*`), each with the labels it names (`name{a,b}`), if any.
fn documented_series() -> Vec<(String, Option<Vec<String>>)> {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("\n### Observability\n")
        .nth(1)
        .and_then(|section| section.split("`--log-json`").next())
        .expect("README.md has an Observability section that lists the /metrics series");
    section
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|code| code.starts_with("platform_") && !code.ends_with('*'))
        .map(|code| match code.split_once('{') {
            Some((name, labels)) => (
                name.to_owned(),
                Some(
                    labels
                        .trim_end_matches('}')
                        .split(',')
                        .map(str::to_owned)
                        .collect(),
                ),
            ),
            None => (code.to_owned(), None),
        })
        .collect()
}

/// One sample of an exposition: its family (the name a `# TYPE` line declares), its own name
/// and labels.
#[derive(Debug)]
struct Sample {
    family: String,
    name: String,
    labels: Vec<(String, String)>,
}

/// A Prometheus text exposition (format 0.0.4), parsed by that format's rules; a line that
/// breaks one fails the test.
#[derive(Debug)]
struct Exposition {
    /// Family name → type, from the `# TYPE` lines.
    types: HashMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        assert!(text.ends_with('\n'), "an exposition ends with a line feed");
        let mut types = HashMap::new();
        let mut samples = Vec::new();
        let mut series = HashSet::new();
        for line in text.lines().filter(|line| !line.is_empty()) {
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.trim_start().splitn(3, ' ');
                match (words.next(), words.next(), words.next()) {
                    (Some("TYPE"), Some(name), Some(kind)) => {
                        assert!(is_metric_name(name), "bad metric name: {line}");
                        assert!(
                            ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                            "bad type: {line}"
                        );
                        assert!(
                            !samples.iter().any(|sample: &Sample| sample.family == name),
                            "TYPE after the family's samples: {line}"
                        );
                        let earlier = types.insert(name.to_owned(), kind.to_owned());
                        assert!(earlier.is_none(), "a second TYPE line: {line}");
                    }
                    (Some("HELP"), Some(name), _) => {
                        assert!(is_metric_name(name), "bad metric name: {line}");
                    }
                    (Some("TYPE" | "HELP"), ..) => panic!("incomplete: {line}"),
                    _ => {}
                }
                continue;
            }
            let sample = parse_sample(line);
            let family = family_of(&sample.name, &types)
                .unwrap_or_else(|| panic!("a sample of no declared family: {line}"));
            if types[&family] == "histogram" && sample.name.ends_with("_bucket") {
                assert!(
                    sample.labels.iter().any(|(label, _)| label == "le"),
                    "a bucket without le: {line}"
                );
            }
            let mut key = sample.labels.clone();
            key.sort();
            assert!(
                series.insert((sample.name.clone(), key)),
                "a series twice: {line}"
            );
            samples.push(Sample { family, ..sample });
        }
        Exposition { types, samples }
    }
}

/// The declared family a sample belongs to: its own name, or a histogram's or summary's that
/// its `_bucket`, `_sum` or `_count` suffix extends.
fn family_of(name: &str, types: &HashMap<String, String>) -> Option<String> {
    if types.contains_key(name) {
        return Some(name.to_owned());
    }
    ["_bucket", "_sum", "_count"]
        .iter()
        .filter_map(|suffix| name.strip_suffix(suffix))
        .find(|base| {
            types
                .get(*base)
                .is_some_and(|kind| kind == "histogram" || kind == "summary")
        })
        .map(str::to_owned)
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_' || first == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    is_metric_name(name) && !name.contains(':')
}

/// `name{label="value",...} value [timestamp]`, label values escaped (`\\`, `\"`, `\n`).
fn parse_sample(line: &str) -> Sample {
    let end = line
        .find(['{', ' '])
        .unwrap_or_else(|| panic!("a sample without a value: {line}"));
    let name = &line[..end];
    assert!(is_metric_name(name), "bad metric name: {line}");
    let mut rest = &line[end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (label, after) = rest
                .split_once("=\"")
                .unwrap_or_else(|| panic!("bad label: {line}"));
            assert!(is_label_name(label), "bad label name {label:?}: {line}");
            let mut value = String::new();
            let mut chars = after.char_indices();
            let closed = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        _ => panic!("bad escape in a label value: {line}"),
                    },
                    Some((at, '"')) => break at,
                    Some((_, c)) => value.push(c),
                    None => panic!("an unclosed label value: {line}"),
                }
            };
            labels.push((label.to_owned(), value));
            rest = &after[closed + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
    }
    let mut fields = rest
        .strip_prefix(' ')
        .unwrap_or_else(|| panic!("no space before the value: {line}"))
        .split(' ');
    let value = fields.next().unwrap_or_default();
    assert!(
        matches!(value, "+Inf" | "-Inf" | "NaN") || value.parse::<f64>().is_ok_and(f64::is_finite),
        "bad value {value:?}: {line}"
    );
    if let Some(timestamp) = fields.next() {
        assert!(timestamp.parse::<i64>().is_ok(), "bad timestamp: {line}");
    }
    assert!(fields.next().is_none(), "trailing fields: {line}");
    Sample {
        family: String::new(),
        name: name.to_owned(),
        labels,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_part_answers_health_and_metrics() {
    let dir = tempfile::tempdir().expect("temp dir");
    let client = reqwest::Client::new();
    let mut urls = Vec::new();
    let mut running = Vec::new();
    for part in [
        Part::Order,
        Part::Payment,
        Part::Inventory,
        Part::Projections,
        Part::Saga,
    ] {
        let app = support::platform(support::settings(dir.path()), part).await;
        urls.push((format!("{part:?}"), app.url()));
        running.push(app);
    }
    let mut gateway_settings = support::settings(dir.path());
    gateway_settings.http_addr = support::localhost();
    gateway_settings.gateway.gateway_order = vec![urls[0].1.clone()];
    gateway_settings.gateway.gateway_query = vec![urls[3].1.clone()];
    let gateway = support::gateway(gateway_settings).await;
    urls.push(("Gateway".into(), gateway.url()));
    for (part, url) in &urls {
        for path in ["/health/live", "/health/ready", "/metrics"] {
            let mut status = 0;
            // A projection may need a moment to measure its lag after start.
            for _ in 0..50 {
                status = client
                    .get(format!("{url}{path}"))
                    .send()
                    .await
                    .expect("request")
                    .status()
                    .as_u16();
                if status == 200 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(status, 200, "{part} {path}");
        }
        let response = client
            .get(format!("{url}/metrics"))
            .send()
            .await
            .expect("metrics");
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{part}: {content_type}"
        );
        Exposition::parse(&response.text().await.expect("text"));
    }
    gateway.stop().await;
    for app in running {
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_the_correlation_id() {
    let dir = tempfile::tempdir().expect("temp dir");
    let app = support::platform(support::settings(dir.path()), Part::All).await;
    let client = reqwest::Client::new();
    let given = client
        .get(format!("{}/inventory/SKU-C", app.url()))
        .header("x-correlation-id", "corr-123")
        .send()
        .await
        .expect("read");
    assert_eq!(
        given
            .headers()
            .get("x-correlation-id")
            .and_then(|v| v.to_str().ok()),
        Some("corr-123")
    );
    let command = client
        .post(format!("{}/inventory/SKU-C/receipts", app.url()))
        .header("x-correlation-id", "corr-456")
        .json(&json!({"quantity": 1}))
        .send()
        .await
        .expect("command");
    assert_eq!(
        command
            .headers()
            .get("x-correlation-id")
            .and_then(|v| v.to_str().ok()),
        Some("corr-456"),
        "the command's own correlation id is the client's"
    );
    let timing = command
        .headers()
        .get("server-timing")
        .and_then(|v| v.to_str().ok())
        .expect("a Server-Timing header");
    let millis: f64 = timing
        .strip_prefix("app;dur=")
        .and_then(|millis| millis.parse().ok())
        .unwrap_or_else(|| panic!("an app;dur= metric: {timing}"));
    assert!((0.0..10_000.0).contains(&millis), "{timing}");
    let generated = client
        .get(format!("{}/inventory/SKU-C", app.url()))
        .send()
        .await
        .expect("read");
    let id = generated
        .headers()
        .get("x-correlation-id")
        .and_then(|v| v.to_str().ok())
        .expect("a generated correlation id");
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_id_set_on_a_command_is_on_the_projection_and_saga_spans() {
    let dir = tempfile::tempdir().expect("temp dir");
    let app = support::platform(support::settings(dir.path()), Part::All).await;
    let client = reqwest::Client::new();
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let (status, _, body) = read(
        client
            .post(format!("{}/orders", app.url()))
            .header("traceparent", &traceparent)
            .json(
                &json!({"customer_id": "c-trace", "currency": "EUR", "payment_token": "tok_timeout",
                "lines": [{"sku": "SKU-T", "quantity": 1, "unit_price_minor": 100}]}),
            )
            .send()
            .await
            .expect("order"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let order_id = body["order_id"].as_str().expect("order id").to_owned();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ours: Vec<support::SeenSpan> = support::spans()
            .into_iter()
            .filter(|span| span.fields.get("trace_id") == Some(&trace_id))
            .collect();
        let projection = ours.iter().any(|span| {
            span.name == "projection.apply"
                && span.fields.get("projection").map(String::as_str) == Some("orders")
                && span.fields.get("aggregate_id") == Some(&order_id)
                && span.fields.get("parent_span_id").map(String::as_str) == Some("00f067aa0ba902b7")
        });
        let saga = ours.iter().any(|span| {
            span.name == "saga.step" && span.fields.get("aggregate_id") == Some(&order_id)
        });
        // The saga's command to reserve stock carries the trace on, into the stock's events.
        let downstream = ours.iter().any(|span| {
            span.name == "projection.apply"
                && span.fields.get("projection").map(String::as_str) == Some("inventory")
        });
        if projection && saga && downstream {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans with trace {trace_id} (projection {projection}, saga {saga}, downstream {downstream}): {ours:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}

/// The binary with `--log-json` logs one JSON line per request, inside the request's span,
/// which carries the client's `X-Correlation-Id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_correlation_id() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().expect("temp dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_platform"))
        .args(["serve", "--log-json", "--partitions", "2", "--data-dir"])
        .arg(dir.path())
        .arg("--http-addr")
        .arg(format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "info,sqlx=warn")
        .env_remove("PLATFORM_LOG_JSON")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("platform binary");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().expect("stdout");
    let _child = Kill(child);
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

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
    let correlation_id = format!("json-log-{}", uuid::Uuid::new_v4());
    let response = client
        .post(format!("{url}/inventory/SKU-LOG/receipts"))
        .header("x-correlation-id", &correlation_id)
        .json(&json!({"quantity": 3}))
        .send()
        .await
        .expect("receipt");
    assert_eq!(response.status().as_u16(), 200);

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    let found = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Ok(line) = lines.recv_timeout(left) else {
            break None;
        };
        let record: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|error| panic!("not a JSON log line ({error}): {line}"));
        if record["span"]["correlation_id"] == correlation_id.as_str() {
            break Some(record);
        }
        seen.push(line);
    };
    let record = found.unwrap_or_else(|| {
        panic!(
            "no JSON log line with correlation id {correlation_id}:\n{}",
            seen.join("\n")
        )
    });
    assert_eq!(record["span"]["name"], "request", "{record}");
    assert_eq!(
        record["span"]["path"], "/inventory/SKU-LOG/receipts",
        "{record}"
    );
    assert_eq!(record["fields"]["message"], "answered", "{record}");
    assert_eq!(record["fields"]["status"], 200, "{record}");
    assert_eq!(record["level"], "INFO", "{record}");
}
