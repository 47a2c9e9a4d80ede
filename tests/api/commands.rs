//! The public command contract, on every backend.

use std::sync::Arc;
use std::time::Duration;

use command_services::store::{CommandStore, SqlStore};
use serde_json::json;

use crate::helpers::{Backend, TestApp, backends, settings};

async fn total_records(app: &TestApp, aggregate: &str) -> u64 {
    let log = app.log().await;
    let topic = event_log::topics::events(&app.settings.store.topic_prefix, aggregate);
    let mut total = 0;
    for partition in 0..app.settings.partitions {
        total += log.end_offset(&topic, partition).await.expect("end offset");
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_commands_answer_the_new_version_and_where_it_was_written() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        let first = app.receive("SKU-1", 10).await;
        let body = first.expect(200);
        assert_eq!(body["sku"], "SKU-1");
        assert_eq!(body["version"], 1);
        assert_eq!(body["outcome"], "appended");
        let token = body["consistency_token"]
            .as_str()
            .expect("a consistency token");
        assert_eq!(first.header("x-consistency-token"), Some(token));
        assert_eq!(first.header("etag"), Some("\"1\""));
        assert!(
            first.header("x-correlation-id").is_some(),
            "a correlation id is generated"
        );

        let adjusted = app
            .post_with(
                "/inventory/SKU-1/adjustments",
                json!({"delta": -2, "reason": "damaged"}),
                &[("X-Correlation-Id", "corr-42")],
            )
            .await;
        assert_eq!(adjusted.expect(200)["version"], 2, "{backend:?}");
        assert_eq!(
            adjusted.header("x-correlation-id"),
            Some("corr-42"),
            "echoed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_placed_with_201_and_its_location() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        let placed = app.place_pending_order("SKU-1").await;
        let body = placed.expect(201);
        let order_id = body["order_id"].as_str().expect("an order id");
        assert_eq!(
            placed.header("location"),
            Some(format!("/orders/{order_id}").as_str())
        );
        assert_eq!(body["version"], 1);

        let cancelled = app
            .post(
                &format!("/orders/{order_id}/cancel"),
                json!({"reason": "changed my mind"}),
            )
            .await;
        assert_eq!(cancelled.expect(200)["version"], 2, "{backend:?}");
        // A second cancel is already in effect: nothing new is written.
        let again = app
            .client
            .post(app.url(&format!("/orders/{order_id}/cancel")))
            .send()
            .await
            .expect("send");
        assert_eq!(again.status(), 200);
        let again: serde_json::Value = again.json().await.expect("json");
        assert_eq!(again["outcome"], "unchanged");
        assert_eq!(again["version"], 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_idempotency_key_returns_the_original_response_and_appends_nothing() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        // Stock on hand and a payment that never answers: the saga writes nothing more to the
        // order's topic while the test counts its records.
        app.receive("SKU-1", 10).await.expect(200);
        let order = json!({"customer_id": "c-1", "currency": "EUR", "payment_token": "tok_timeout",
                           "lines": [{"sku": "SKU-1", "quantity": 2, "unit_price_minor": 1999}]});
        let first = app
            .post_with(
                "/orders",
                order.clone(),
                &[("Idempotency-Key", "order-key-1")],
            )
            .await;
        let first = first.expect(201).clone();
        let before = total_records(&app, "order").await;

        let repeat = app
            .post_with(
                "/orders",
                order.clone(),
                &[("Idempotency-Key", "order-key-1")],
            )
            .await;
        let repeat = repeat.expect(201);
        assert_eq!(
            repeat["order_id"], first["order_id"],
            "{backend:?}: same order"
        );
        assert_eq!(repeat["consistency_token"], first["consistency_token"]);
        assert_eq!(repeat["outcome"], "repeated");
        assert_eq!(
            total_records(&app, "order").await,
            before,
            "{backend:?}: nothing appended"
        );

        let mut different = order.clone();
        different["customer_id"] = json!("c-2");
        let reused = app
            .post_with("/orders", different, &[("Idempotency-Key", "order-key-1")])
            .await;
        let problem = reused.expect_problem(422);
        assert!(
            problem["detail"]
                .as_str()
                .expect("detail")
                .contains("idempotency key")
        );
        assert_eq!(total_records(&app, "order").await, before);
    }
}

/// The command side's store of a stopped platform, as the platform opens it.
async fn command_store(app_settings: &platform::Settings) -> SqlStore {
    match &app_settings.store.database_url {
        Some(url) => SqlStore::postgres(
            url,
            &format!("{}command_side", app_settings.store.schema_prefix),
        )
        .await
        .expect("open the command side's Postgres schema"),
        None => SqlStore::sqlite(app_settings.store.data_dir.join("command-side.db"))
            .await
            .expect("open the command side's SQLite file"),
    }
}

async fn receipt(app: &TestApp, sku: &str, key: Option<&str>) -> serde_json::Value {
    let headers: Vec<(&str, &str)> = key
        .map(|key| ("Idempotency-Key", key))
        .into_iter()
        .collect();
    app.post_with(
        &format!("/inventory/{sku}/receipts"),
        json!({"quantity": 1}),
        &headers,
    )
    .await
    .expect(200)
    .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_outcomes_a_client_can_ask_for_again_are_kept() {
    for backend in backends() {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let mut settings = settings(backend, dir.path());
        settings.snapshot_every = 1;
        let app = TestApp::spawn_with(backend, settings, dir).await;
        for _ in 0..3 {
            receipt(&app, "SKU-K", None).await;
        }
        receipt(&app, "SKU-K", Some("receipt-k")).await;
        // The graceful stop writes every partition's last snapshot.
        let (settings, _dir) = app.stop().await;
        let store = command_store(&settings).await;
        let topic = event_log::topics::events(&settings.store.topic_prefix, "stock");
        let partition = event_log::partition_for("SKU-K", settings.partitions);
        let snapshot = store
            .load_snapshot(&topic, partition)
            .await
            .expect("load")
            .expect("a snapshot was written");
        assert_eq!(
            snapshot.outcomes.len(),
            1,
            "{backend:?}: the keyed receipt's outcome only, not the three without a key: {:?}",
            snapshot.outcomes
        );
        assert!(
            snapshot.outcomes[0].1.contains("\"version\":4"),
            "{backend:?}: {:?}",
            snapshot.outcomes
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_is_remembered_across_restarts_and_forgotten_past_its_window() {
    for backend in backends() {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let mut settings = settings(backend, dir.path());
        settings.snapshot_every = 1;
        settings.idempotency_window_secs = 2;
        let app = TestApp::spawn_with(backend, settings, dir).await;
        let early = receipt(&app, "SKU-W", Some("early")).await;
        assert_eq!(early["version"], 1);
        let repeat = receipt(&app, "SKU-W", Some("early")).await;
        assert_eq!(
            repeat["outcome"], "repeated",
            "{backend:?}: within the window"
        );
        assert_eq!(repeat["version"], 1);
        // Snapshots (taken every 500 ms when due) store the early outcome.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let (settings, dir) = app.stop().await;
        let app = TestApp::spawn_with(backend, settings, dir).await;
        let repeat = receipt(&app, "SKU-W", Some("early")).await;
        assert_eq!(
            repeat["outcome"], "repeated",
            "{backend:?}: remembered through a restart"
        );

        // The window passes in the partition's log time once a later event is folded there.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let late = receipt(&app, "SKU-W", Some("late")).await;
        assert_eq!(late["version"], 2);
        let (settings, dir) = app.stop().await;
        let app = TestApp::spawn_with(backend, settings, dir).await;
        let repeat = receipt(&app, "SKU-W", Some("late")).await;
        assert_eq!(repeat["outcome"], "repeated", "{backend:?}");
        assert_eq!(repeat["version"], 2);
        let again = receipt(&app, "SKU-W", Some("early")).await;
        assert_eq!(
            (again["outcome"].as_str(), again["version"].as_u64()),
            (Some("appended"), Some(3)),
            "{backend:?}: forgotten past the window, in memory and in the snapshot, so decided anew"
        );
        // Forgotten again and used again before the next snapshot: that snapshot deletes the
        // key's old outcome and stores its new one.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(receipt(&app, "SKU-W", None).await["version"], 4);
        let again = receipt(&app, "SKU-W", Some("early")).await;
        assert_eq!(
            (again["outcome"].as_str(), again["version"].as_u64()),
            (Some("appended"), Some(5)),
            "{backend:?}"
        );
        let (settings, dir) = app.stop().await;
        let app = TestApp::spawn_with(backend, settings, dir).await;
        let repeat = receipt(&app, "SKU-W", Some("early")).await;
        assert_eq!(
            (repeat["outcome"].as_str(), repeat["version"].as_u64()),
            (Some("repeated"), Some(5)),
            "{backend:?}: the key's new outcome is remembered through a restart"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_match_with_a_stale_version_is_a_409_naming_both_versions() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        app.receive("SKU-9", 1).await.expect(200);
        app.receive("SKU-9", 1).await.expect(200);
        let stale = app
            .post_with(
                "/inventory/SKU-9/receipts",
                json!({"quantity": 1}),
                &[("If-Match", "\"1\"")],
            )
            .await;
        let problem = stale.expect_problem(409);
        assert_eq!(problem["expected_version"], 1, "{backend:?}");
        assert_eq!(problem["actual_version"], 2);
        let current = app
            .post_with(
                "/inventory/SKU-9/receipts",
                json!({"quantity": 1}),
                &[("If-Match", "\"2\"")],
            )
            .await;
        assert_eq!(current.expect(200)["version"], 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_problem_with_the_right_status_and_writes_nothing() {
    let app = TestApp::spawn(Backend::Embedded).await;
    // Malformed JSON.
    let malformed = app
        .client
        .post(app.url("/orders"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("send");
    assert_eq!(malformed.status(), 400);
    assert_eq!(
        malformed.headers()["content-type"],
        "application/problem+json"
    );
    // Wrong content type.
    let wrong_type = app
        .client
        .post(app.url("/orders"))
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_eq!(wrong_type.status(), 415);
    // Too large.
    let huge = format!("{{\"quantity\": 1, \"pad\": \"{}\"}}", "x".repeat(100_000));
    let too_large = app
        .client
        .post(app.url("/inventory/SKU-1/receipts"))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .expect("send");
    assert_eq!(too_large.status(), 413);
    // Wrong shape, and invalid fields, named.
    app.post("/inventory/SKU-1/receipts", json!({"quantity": "ten"}))
        .await
        .expect_problem(422);
    let invalid = app
        .post(
            "/orders",
            json!({"customer_id": "", "currency": "EUE", "payment_token": "tok_approve",
                   "lines": [{"sku": "bad sku", "quantity": 0, "unit_price_minor": -5}]}),
        )
        .await;
    let problem = invalid.expect_problem(422);
    let fields: Vec<&str> = problem["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|error| error["field"].as_str().expect("field"))
        .collect();
    assert_eq!(
        fields,
        [
            "customer_id",
            "currency",
            "lines[0].sku",
            "lines[0].quantity",
            "lines[0].unit_price_minor"
        ]
    );
    app.post(
        "/orders",
        json!({"customer_id": "c", "currency": "EUR", "payment_token": "t", "lines": []}),
    )
    .await
    .expect_problem(422);
    app.post("/inventory/SKU-1/receipts", json!({"quantity": 0}))
        .await
        .expect_problem(422);
    app.post("/inventory/a%20b/receipts", json!({"quantity": 1}))
        .await
        .expect_problem(422);
    // The domain says no: 422 whatever the state, 409 because of it.
    app.post(
        "/inventory/SKU-1/adjustments",
        json!({"delta": 0, "reason": "x"}),
    )
    .await
    .expect_problem(422);
    app.post(
        "/inventory/SKU-1/adjustments",
        json!({"delta": -1, "reason": "lost"}),
    )
    .await
    .expect_problem(409);
    // Beyond the most units an item may hold (2^53 - 1, which every read model holds).
    for delta in [i64::MAX, 1 << 53] {
        app.post(
            "/inventory/SKU-1/adjustments",
            json!({"delta": delta, "reason": "found"}),
        )
        .await
        .expect_problem(422);
    }
    // Unknown things.
    app.post(
        "/orders/0190a0a0-0000-7000-8000-000000000000/cancel",
        json!({}),
    )
    .await
    .expect_problem(404);
    app.post("/orders/not-an-id/cancel", json!({}))
        .await
        .expect_problem(404);
    app.get("/no/such/route").await.expect_problem(404);
    app.get("/orders/x/ship").await.expect_problem(405);
    // Bad headers.
    app.post_with(
        "/inventory/SKU-1/receipts",
        json!({"quantity": 1}),
        &[("If-Match", "yesterday")],
    )
    .await
    .expect_problem(400);
    // Nothing was written.
    assert_eq!(total_records(&app, "stock").await, 0);
    assert_eq!(total_records(&app, "order").await, 0);
    // Within the range but past the most an item may hold on top of what it holds: the state
    // says no (409), and the same request succeeds once the item holds less.
    app.receive("SKU-FULL", 1).await.expect(200);
    app.post(
        "/inventory/SKU-FULL/adjustments",
        json!({"delta": (1_i64 << 53) - 1, "reason": "found"}),
    )
    .await
    .expect_problem(409);
    let order = app.place_pending_order("SKU-S").await;
    let order_id = order.expect(201)["order_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let ship = app
        .post(&format!("/orders/{order_id}/ship"), json!({}))
        .await;
    assert_eq!(
        ship.expect_problem(409)["detail"],
        "order has not been confirmed yet"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_live_and_ready() {
    let app = TestApp::spawn(Backend::Embedded).await;
    app.get("/health/live").await.expect(200);
    let ready = app.get("/health/ready").await;
    let body = ready.expect(200);
    assert_eq!(body["status"], "ready");
    assert_eq!(body["services"].as_array().expect("services").len(), 4);
}
