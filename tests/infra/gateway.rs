//! The gateway in front of real platform processes (and, for the retry and breaker rules,
//! stand-in upstreams that count what reaches them).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use axum::routing::get;
use platform::Part;
use serde_json::json;

use crate::support::{self, localhost, read};

fn gateway_settings(dir: &std::path::Path) -> platform::Settings {
    let mut settings = support::settings(dir);
    settings.gateway.gateway_health_interval_ms = 100;
    settings.gateway.gateway_breaker_open_ms = 500;
    settings.gateway.gateway_command_timeout_ms = 5_000;
    settings.gateway.gateway_read_timeout_ms = 5_000;
    settings
}

fn order(customer: &str) -> serde_json::Value {
    json!({
        "customer_id": customer,
        "currency": "EUR",
        "payment_token": "tok_approve",
        "lines": [{"sku": "SKU-1", "quantity": 1, "unit_price_minor": 100}]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reach_the_instance_owning_their_partition() {
    let dir = tempfile::tempdir().expect("temp dir");
    let base = support::settings(dir.path());
    // Two order instances splitting the partitions, and the query API, on one log.
    let mut first = base.clone();
    first.assignment = platform::settings::AssignmentMode::Static;
    first.instances = 2;
    first.instance = 0;
    let mut second = first.clone();
    second.instance = 1;
    let order_0 = support::platform(first, Part::Order).await;
    let order_1 = support::platform(second, Part::Order).await;

    let mut settings = gateway_settings(dir.path());
    settings.http_addr = localhost();
    settings.gateway.gateway_order = vec![order_0.url(), order_1.url()];
    let gateway = support::gateway(settings).await;
    let client = reqwest::Client::new();

    // Sent to one instance directly, about half of new orders land on the other's partitions.
    let mut refused_directly = 0;
    for index in 0..12 {
        let response = client
            .post(format!("{}/orders", order_0.url()))
            .header("idempotency-key", format!("direct-{index}"))
            .json(&order("c-direct"))
            .send()
            .await
            .expect("request");
        if response.status().as_u16() == 503 {
            refused_directly += 1;
        }
    }
    assert!(
        refused_directly > 0,
        "some orders belong to the other instance"
    );

    // Through the gateway every one is placed, with or without an Idempotency-Key.
    let mut placed = Vec::new();
    for index in 0..12 {
        let mut request = client
            .post(format!("{}/orders", gateway.url()))
            .json(&order("c-gw"));
        if index % 2 == 0 {
            request = request.header("idempotency-key", format!("gw-{index}"));
        }
        let (status, headers, body) = read(request.send().await.expect("request")).await;
        assert_eq!(status, 201, "order {index}: {body}");
        assert!(
            headers.get("x-correlation-id").is_some(),
            "the correlation id comes back"
        );
        placed.push(body["order_id"].as_str().expect("order id").to_owned());
    }
    // (Reads through the gateway are covered by the failover test: a query process on the
    // embedded backend sees another process's writes only after its poll timeout.)
    for order_id in &placed {
        let (status, _, body) = read(
            client
                .post(format!("{}/orders/{order_id}/cancel", gateway.url()))
                .json(&json!({"reason": "testing the gateway"}))
                .send()
                .await
                .expect("request"),
        )
        .await;
        assert_eq!(status, 200, "cancel {order_id}: {body}");
    }
    let (status, _, problem) = read(
        client
            .get(format!("{}/nowhere", gateway.url()))
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(
        (status, problem["type"].as_str()),
        (404, Some("/problems/not-found"))
    );
    gateway.stop().await;
    for running in [order_0, order_1] {
        running.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_commands_reach_the_instance_owning_the_customer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut first = support::settings(dir.path());
    first.assignment = platform::settings::AssignmentMode::Static;
    first.instances = 2;
    first.instance = 0;
    let mut second = first.clone();
    second.instance = 1;
    let partitions = first.partitions;
    let customer_0 = support::platform(first, Part::Customer).await;
    let customer_1 = support::platform(second, Part::Customer).await;
    let mut settings = gateway_settings(dir.path());
    settings.http_addr = localhost();
    settings.gateway.gateway_customer = vec![customer_0.url(), customer_1.url()];
    let gateway = support::gateway(settings).await;
    let client = reqwest::Client::new();

    // Registered through the gateway (which gives a request without an Idempotency-Key one, to
    // know the new customer's partition), changed and erased on whichever instance owns it.
    let mut owners = std::collections::BTreeSet::new();
    for index in 0..8 {
        let mut request = client.post(format!("{}/customers", gateway.url())).json(
            &json!({"name": format!("Customer {index}"), "email": format!("c{index}@example.com")}),
        );
        if index % 2 == 0 {
            request = request.header("idempotency-key", format!("customer-{index}"));
        }
        let (status, _, body) = read(request.send().await.expect("request")).await;
        assert_eq!(status, 201, "customer {index}: {body}");
        let id = body["customer_id"]
            .as_str()
            .expect("customer id")
            .to_owned();
        owners.insert(event_log::partition_for(&id, partitions) % 2);
        let (status, _, body) = read(
            client
                .patch(format!("{}/customers/{id}", gateway.url()))
                .json(&json!({"email": format!("new{index}@example.com")}))
                .send()
                .await
                .expect("request"),
        )
        .await;
        assert_eq!(status, 200, "change {id}: {body}");
        let (status, _, body) = read(
            client
                .post(format!("{}/customers/{id}/erase", gateway.url()))
                .send()
                .await
                .expect("request"),
        )
        .await;
        assert_eq!(
            (status, body["version"].as_u64()),
            (200, Some(3)),
            "erase {id}: {body}"
        );
    }
    assert_eq!(
        owners.len(),
        2,
        "both instances owned some of the customers"
    );
    gateway.stop().await;
    for running in [customer_0, customer_1] {
        running.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_keeps_serving_when_one_of_two_instances_is_killed() {
    let dirs = [
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    ];
    let first = support::platform(support::settings(dirs[0].path()), Part::All).await;
    let second = support::platform(support::settings(dirs[1].path()), Part::All).await;
    let gateway_dir = tempfile::tempdir().expect("dir");
    let mut settings = gateway_settings(gateway_dir.path());
    settings.http_addr = localhost();
    settings.gateway.gateway_query = vec![first.url(), second.url()];
    settings.gateway.gateway_inventory = vec![first.url(), second.url()];
    let gateway = support::gateway(settings).await;
    let client = reqwest::Client::new();

    let mut failures = Vec::new();
    let mut first = Some(first);
    for index in 0..60 {
        if index == 20 {
            first.take().expect("first").stop().await;
        }
        let (read_status, _, read_body) = read(
            client
                .get(format!("{}/inventory?below=5", gateway.url()))
                .send()
                .await
                .expect("request"),
        )
        .await;
        // A command with an Idempotency-Key may be retried on the other instance.
        let (write_status, _, write_body) = read(
            client
                .post(format!("{}/inventory/SKU-{index}/receipts", gateway.url()))
                .header("idempotency-key", format!("receipt-{index}"))
                .json(&json!({"quantity": 1}))
                .send()
                .await
                .expect("request"),
        )
        .await;
        if read_status != 200 || write_status != 200 {
            failures.push((index, read_status, read_body, write_status, write_body));
        }
    }
    assert!(failures.is_empty(), "requests failed: {failures:?}");

    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, _, body) = read(
        client
            .get(format!("{}/health/ready", gateway.url()))
            .send()
            .await
            .expect("ready"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["upstreams"]["query"]["healthy"], 1, "{body}");
    let metrics = client
        .get(format!("{}/metrics", gateway.url()))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("platform_gateway_upstream_healthy{upstream=\"query\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("platform_gateway_requests_total{upstream=\"query\",status=\"200\"}"),
        "{metrics}"
    );
    gateway.stop().await;
    second.stop().await;
}

/// Sends `request` and gives its status.
async fn status_of(request: reqwest::RequestBuilder) -> u16 {
    request.send().await.expect("request").status().as_u16()
}

/// A stand-in upstream that counts requests and answers `status` (and 200 on /health/ready).
fn counting(status: u16, hits: Arc<AtomicU32>) -> axum::Router {
    let answer = move || {
        let hits = hits.clone();
        async move {
            hits.fetch_add(1, Ordering::SeqCst);
            (
                axum::http::StatusCode::from_u16(status).expect("status"),
                axum::Json(json!({"from": "stand-in"})),
            )
        }
    };
    axum::Router::new()
        .route(
            "/health/ready",
            get(|| async { axum::Json(json!({"status": "ready"})) }),
        )
        .route("/sagas", get(answer.clone()))
        .route("/sagas/{id}/retry", axum::routing::post(answer))
}

/// An instance that says "not decided here" (503 with `Platform-Routing: elsewhere`) for every
/// request, as one that lost its partitions does.
fn not_the_owner(hits: Arc<AtomicU32>) -> axum::Router {
    let answer = move || {
        let hits = hits.clone();
        async move {
            hits.fetch_add(1, Ordering::SeqCst);
            (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                [("platform-routing", "elsewhere")],
                axum::Json(json!({"type": "/problems/not-owner", "status": 503})),
            )
        }
    };
    axum::Router::new()
        .route(
            "/health/ready",
            get(|| async { axum::Json(json!({"status": "ready"})) }),
        )
        .route("/sagas/{id}/retry", axum::routing::post(answer))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_the_owner_is_routing_information_not_a_failure() {
    // One instance never owns anything, the other answers. A command without an
    // Idempotency-Key goes on to the other instance (nothing was done by the first), and the
    // first one's breaker stays closed however often it says so.
    let elsewhere_hits = Arc::new(AtomicU32::new(0));
    let good_hits = Arc::new(AtomicU32::new(0));
    let elsewhere = support::serve(not_the_owner(elsewhere_hits.clone()), localhost()).await;
    let good = support::serve(counting(200, good_hits.clone()), localhost()).await;
    let dir = tempfile::tempdir().expect("dir");
    let mut settings = gateway_settings(dir.path());
    settings.http_addr = localhost();
    settings.gateway.gateway_saga = vec![elsewhere.url(), good.url()];
    settings.gateway.gateway_retries = 2;
    settings.gateway.gateway_breaker_failures = 2;
    settings.gateway.gateway_health_interval_ms = 60_000;
    let gateway = support::gateway(settings).await;
    let client = reqwest::Client::new();
    for index in 0..20 {
        let status =
            status_of(client.post(format!("{}/sagas/s-{index}/retry", gateway.url()))).await;
        assert_eq!(status, 200, "command {index}");
    }
    assert_eq!(good_hits.load(Ordering::SeqCst), 20);
    assert!(
        elsewhere_hits.load(Ordering::SeqCst) >= 2,
        "the round robin offered the other instance first at times"
    );
    let (_, _, ready) = read(
        client
            .get(format!("{}/health/ready", gateway.url()))
            .send()
            .await
            .expect("ready"),
    )
    .await;
    let breakers: Vec<&str> = ready["upstreams"]["saga"]["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter_map(|instance| instance["breaker"].as_str())
        .collect();
    assert_eq!(breakers, ["closed", "closed"], "{ready}");
    gateway.stop().await;
    elsewhere.stop().await;
    good.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_idempotent_requests_are_retried() {
    let hits = Arc::new(AtomicU32::new(0));
    let upstream = support::serve(counting(503, hits.clone()), localhost()).await;
    let dir = tempfile::tempdir().expect("dir");
    let mut settings = gateway_settings(dir.path());
    settings.http_addr = localhost();
    settings.gateway.gateway_saga = vec![upstream.url()];
    settings.gateway.gateway_retries = 2;
    settings.gateway.gateway_breaker_failures = 100;
    let gateway = support::gateway(settings).await;
    let client = reqwest::Client::new();
    let retry = format!(
        "{}/sagas/0192f5a4-1111-7000-8000-000000000001/retry",
        gateway.url()
    );

    let status = status_of(client.post(&retry)).await;
    assert_eq!(
        (status, hits.swap(0, Ordering::SeqCst)),
        (503, 1),
        "a command without a key: once"
    );
    let status = status_of(client.get(format!("{}/sagas", gateway.url()))).await;
    assert_eq!(
        (status, hits.swap(0, Ordering::SeqCst)),
        (503, 3),
        "a GET: 1 + 2 retries"
    );
    let status = status_of(client.post(&retry).header("idempotency-key", "retry-1")).await;
    assert_eq!(
        (status, hits.swap(0, Ordering::SeqCst)),
        (503, 3),
        "a command with a key: retried"
    );
    gateway.stop().await;
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_goes_to_an_instance_not_tried_yet() {
    // Two instances, both ready: one answers every request 503, the other 200. With the
    // breaker out of the way, every GET must reach the good one within its retries, whichever
    // instance the round robin offers first. (A retry used to follow the round robin, which
    // with two instances sent every attempt of a request to the same one.)
    let failing_hits = Arc::new(AtomicU32::new(0));
    let good_hits = Arc::new(AtomicU32::new(0));
    let failing = support::serve(counting(503, failing_hits.clone()), localhost()).await;
    let good = support::serve(counting(200, good_hits.clone()), localhost()).await;
    let dir = tempfile::tempdir().expect("dir");
    let mut settings = gateway_settings(dir.path());
    settings.http_addr = localhost();
    settings.gateway.gateway_saga = vec![failing.url(), good.url()];
    settings.gateway.gateway_retries = 2;
    settings.gateway.gateway_breaker_failures = 1_000;
    let gateway = support::gateway(settings).await;
    let client = reqwest::Client::new();
    for index in 0..20 {
        let status = status_of(client.get(format!("{}/sagas", gateway.url()))).await;
        assert_eq!(status, 200, "request {index}");
    }
    assert_eq!(good_hits.load(Ordering::SeqCst), 20);
    // The failing instance was offered first about half the time, and tried once each time.
    assert!(failing_hits.load(Ordering::SeqCst) <= 20);
    gateway.stop().await;
    failing.stop().await;
    good.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_on_failures_answers_503_and_recovers() {
    let hits = Arc::new(AtomicU32::new(0));
    let upstream = support::serve(counting(200, hits.clone()), localhost()).await;
    let address = upstream.address;
    let dir = tempfile::tempdir().expect("dir");
    let mut settings = gateway_settings(dir.path());
    settings.http_addr = localhost();
    settings.gateway.gateway_saga = vec![upstream.url()];
    settings.gateway.gateway_retries = 0;
    settings.gateway.gateway_breaker_failures = 3;
    settings.gateway.gateway_breaker_open_ms = 700;
    // Health checks would also take the instance out; leave the breaker to do it here.
    settings.gateway.gateway_health_interval_ms = 60_000;
    let gateway = support::gateway(settings).await;
    let client = reqwest::Client::new();
    let sagas = format!("{}/sagas", gateway.url());

    assert_eq!(status_of(client.get(&sagas)).await, 200);
    upstream.stop().await;
    for attempt in 0..3 {
        let status = status_of(client.get(&sagas)).await;
        assert_eq!(
            status, 502,
            "attempt {attempt} reaches for the dead upstream"
        );
    }
    let started = Instant::now();
    let (status, headers, problem) = read(client.get(&sagas).send().await.expect("get")).await;
    assert_eq!(status, 503, "{problem}");
    assert_eq!(problem["type"], "/problems/circuit-open", "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("saga")),
        "{problem}"
    );
    assert!(headers.get("retry-after").is_some());
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "an open breaker answers at once"
    );
    let (_, _, ready) = read(
        client
            .get(format!("{}/health/ready", gateway.url()))
            .send()
            .await
            .expect("ready"),
    )
    .await;
    assert_eq!(
        ready["upstreams"]["saga"]["instances"][0]["breaker"], "open",
        "{ready}"
    );

    // The upstream comes back on the same address: still refused until the open time is over,
    // then one probe closes the breaker.
    let upstream = support::serve(counting(200, hits.clone()), address).await;
    assert_eq!(status_of(client.get(&sagas)).await, 503);
    tokio::time::sleep(Duration::from_millis(800)).await;
    for attempt in 0..5 {
        let status = status_of(client.get(&sagas)).await;
        assert_eq!(status, 200, "attempt {attempt} after recovery");
    }
    let (_, _, ready) = read(
        client
            .get(format!("{}/health/ready", gateway.url()))
            .send()
            .await
            .expect("ready"),
    )
    .await;
    assert_eq!(
        ready["upstreams"]["saga"]["instances"][0]["breaker"], "closed",
        "{ready}"
    );
    gateway.stop().await;
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_starts_a_trace_and_passes_the_correlation_id_on() {
    let echo = axum::Router::new()
        .route(
            "/health/ready",
            get(|| async { axum::Json(json!({"status": "ready"})) }),
        )
        .route(
            "/sagas",
            get(|headers: axum::http::HeaderMap| async move {
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                axum::Json(json!({
                    "traceparent": header("traceparent"),
                    "correlation_id": header("x-correlation-id"),
                }))
            }),
        );
    let upstream = support::serve(echo, localhost()).await;
    let dir = tempfile::tempdir().expect("dir");
    let mut settings = gateway_settings(dir.path());
    settings.http_addr = localhost();
    settings.gateway.gateway_saga = vec![upstream.url()];
    let gateway = support::gateway(settings).await;
    let client = reqwest::Client::new();

    let (_, headers, seen) = read(
        client
            .get(format!("{}/sagas", gateway.url()))
            .send()
            .await
            .expect("get"),
    )
    .await;
    let traceparent = seen["traceparent"]
        .as_str()
        .expect("a traceparent upstream");
    assert!(http_edge::trace::is_valid(traceparent), "{traceparent}");
    assert_eq!(
        headers
            .get("x-correlation-id")
            .and_then(|v| v.to_str().ok()),
        seen["correlation_id"].as_str(),
        "the id sent upstream is the one returned"
    );

    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (_, _, seen) = read(
        client
            .get(format!("{}/sagas", gateway.url()))
            .header("traceparent", given)
            .header("x-correlation-id", "corr-gw")
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(seen["traceparent"], given, "a client's trace goes on");
    assert_eq!(seen["correlation_id"], "corr-gw");
    gateway.stop().await;
    upstream.stop().await;
}

/// The console behind the gateway, on Kafka + Postgres with each part in its own server: the
/// projections part's console shows the saga part's sagas, and an operator's retry made there
/// is carried out by the saga part. With authentication on, one sign-in at the gateway opens
/// the console of every instance behind it (the session is signed, not kept by one process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_behind_the_gateway_across_parts_and_instances() {
    let (Ok(brokers), Ok(database)) = (
        std::env::var("TEST_KAFKA_BROKERS"),
        std::env::var("TEST_DATABASE_URL"),
    ) else {
        assert!(
            std::env::var("TEST_REQUIRE_BACKENDS").as_deref() != Ok("1"),
            "TEST_REQUIRE_BACKENDS=1 but TEST_KAFKA_BROKERS / TEST_DATABASE_URL are not set"
        );
        return;
    };
    const OPERATOR: &str = "operator-key-0123456789abcdef";
    const CLIENT: &str = "client-key-0123456789abcdef";
    let dir = tempfile::tempdir().expect("dir");
    let unique = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let mut settings = gateway_settings(dir.path());
    settings.store.kafka = Some(brokers);
    settings.store.database_url = Some(database);
    settings.store.topic_prefix = format!("t{unique}");
    settings.store.schema_prefix = format!("t{unique}_");
    settings.security.auth = Some(platform::settings::Toggle::On);
    settings.security.api_keys = Some(platform::settings::Secret::from(format!(
        "client:{CLIENT},operator:{OPERATOR}"
    )));
    // A refund's resends are parked after about 2 s.
    settings.saga.compensation_timeout_ms = 300;
    let part = |part| {
        let mut settings = settings.clone();
        settings.http_addr = localhost();
        support::platform(settings, part)
    };
    let commands = part(Part::Commands).await;
    let saga = part(Part::Saga).await;
    let projections = [part(Part::Projections).await, part(Part::Projections).await];
    let mut gateway = settings.clone();
    gateway.http_addr = localhost();
    gateway.gateway.gateway_order = vec![commands.url()];
    gateway.gateway.gateway_inventory = vec![commands.url()];
    gateway.gateway.gateway_saga = vec![saga.url()];
    gateway.gateway.gateway_query = projections.iter().map(|part| part.url()).collect();
    let gateway = support::gateway(gateway).await;
    let url = gateway.url();
    let api = reqwest::Client::new();
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");

    // An order whose refund keeps failing, cancelled once confirmed: its saga needs attention.
    let (status, _, body) = read(
        api.post(format!("{url}/inventory/SKU-G/receipts"))
            .header("x-api-key", CLIENT)
            .json(&json!({"quantity": 5}))
            .send()
            .await
            .expect("receive"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = read(
        api.post(format!("{url}/orders"))
            .header("x-api-key", CLIENT)
            .json(&json!({"customer_id": "c-1", "currency": "EUR", "payment_token": "tok_refund_fails",
                          "lines": [{"sku": "SKU-G", "quantity": 1, "unit_price_minor": 100}]}))
            .send()
            .await
            .expect("place"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let order_id = body["order_id"].as_str().expect("id").to_owned();
    let saga_state = || async {
        let (_, _, body) = read(
            api.get(format!("{url}/sagas/{order_id}"))
                .header("x-api-key", OPERATOR)
                .send()
                .await
                .expect("saga"),
        )
        .await;
        body["saga"]["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let until = |wanted: &'static str| async move {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let state = saga_state().await;
            if state == wanted {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the saga is {state}, never {wanted}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    until("confirmed").await;
    let (status, _, body) = read(
        api.post(format!("{url}/orders/{order_id}/cancel"))
            .header("x-api-key", CLIENT)
            .json(&json!({}))
            .send()
            .await
            .expect("cancel"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    until("needs_attention").await;

    // One sign-in at the gateway.
    let signed_in = browser
        .post(format!("{url}/console/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("sec-fetch-site", "same-origin")
        .body(format!("token={OPERATOR}"))
        .send()
        .await
        .expect("sign in");
    assert_eq!(signed_in.status(), 303);
    let session = format!(
        "platform_console={}",
        support::set_cookie(signed_in.headers(), "platform_console").expect("a session cookie")
    );
    // The saga's page, from either projections instance: the same session opens both.
    let mut csrf = None;
    for _ in 0..4 {
        let page = browser
            .get(format!("{url}/console/sagas/{order_id}"))
            .header("cookie", session.clone())
            .send()
            .await
            .expect("page");
        assert_eq!(page.status(), 200, "every instance accepts the session");
        if let Some(token) = support::set_cookie(page.headers(), "console_csrf") {
            csrf = Some(token);
        }
        let body = page.text().await.expect("text");
        assert!(
            body.contains("needs_attention") && body.contains("Retry the parked step"),
            "{body}"
        );
    }
    let csrf = csrf.expect("a page token");
    // The overview (measured every second while looked at) covers sagas and projections.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let overview = browser
            .get(format!("{url}/console/overview"))
            .header("cookie", session.clone())
            .send()
            .await
            .expect("overview");
        assert_eq!(overview.status(), 200);
        let overview = overview.text().await.expect("text");
        if overview.contains("1 need attention") && overview.contains("Lag (events)") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the overview never covered the saga needing attention and the projections: {overview}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The retry, made at a projections instance, carried out by the saga part.
    let retried = browser
        .post(format!("{url}/console/sagas/{order_id}/retry"))
        .header("cookie", format!("{session}; console_csrf={csrf}"))
        .header("sec-fetch-site", "same-origin")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}"))
        .send()
        .await
        .expect("retry");
    assert_eq!(
        retried.status(),
        303,
        "{}",
        retried.text().await.unwrap_or_default()
    );
    until("cancelled").await;

    // A browser that sends `Origin` but no `Sec-Fetch-Site` signs in through the gateway too:
    // the console compares the origin with the host the browser addressed.
    let host = url.trim_start_matches("http://").to_owned();
    let signed_in = browser
        .post(format!("{url}/console/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("origin", format!("http://{host}"))
        .body(format!("token={OPERATOR}"))
        .send()
        .await
        .expect("sign in");
    assert_eq!(
        signed_in.status(),
        303,
        "a same-origin sign-in behind the gateway"
    );
    let foreign = browser
        .post(format!("{url}/console/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("origin", "http://evil.example")
        .body(format!("token={OPERATOR}"))
        .send()
        .await
        .expect("sign in");
    assert_eq!(foreign.status(), 403, "a sign-in from another site");

    // Paths the gateway would class by their first segment but its client would resolve
    // elsewhere are refused.
    // (Sent over a raw socket: an HTTP client resolves the dot segments before sending.)
    for path in ["/console/../metrics", "/console/%2e%2e/audit/order/x"] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut socket = tokio::net::TcpStream::connect(&host)
            .await
            .expect("connect");
        socket
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .expect("send");
        let mut answer = String::new();
        socket.read_to_string(&mut answer).await.expect("read");
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{path}: {}",
            answer.lines().next().unwrap_or_default()
        );
    }

    // Without the session, or with a forged one: the console's sign-in page.
    for cookie in [String::new(), format!("{session}x")] {
        let page = browser
            .get(format!("{url}/console"))
            .header("cookie", cookie.clone())
            .send()
            .await
            .expect("page");
        assert_eq!(page.status(), 303, "{cookie:?} is sent to sign in");
        assert_eq!(page.headers()["location"], "/console/login");
    }

    gateway.stop().await;
    for part in projections {
        part.stop().await;
    }
    saga.stop().await;
    commands.stop().await;
}
