//! The fulfilment saga end to end, over HTTP, on every backend: each path from the README's
//! tokens to its terminal state, with stock and money where they must be.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, backends, platform_binary, settings};

/// A platform whose saga gives up on a step after 1.5 s, for the timeout path only. The other
/// paths use the tests' settings (two minutes), so a busy machine cannot turn a path that
/// should succeed into a timeout: with 1.5 s, a stock reservation timed out while the suite
/// shared the machine with a build.
async fn spawn_impatient(backend: Backend) -> TestApp {
    let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
    let mut settings = settings(backend, dir.path());
    settings.saga.timeout_ms = 1_500;
    settings.saga.compensation_timeout_ms = 1_000;
    TestApp::spawn_with(backend, settings, dir).await
}

/// Polls an order until its status is one of `statuses`.
async fn order_until(app: &TestApp, order_id: &str, statuses: &[&str]) -> Value {
    order_where(app, order_id, |order| {
        statuses.contains(&order["status"].as_str().unwrap_or_default())
    })
    .await
}

/// Polls an order until every `(field, value)` holds. Its payment and reservation statuses come
/// from other topics than its own status, so they may trail it.
async fn order_with(app: &TestApp, order_id: &str, fields: &[(&str, &str)]) -> Value {
    order_where(app, order_id, |order| {
        fields.iter().all(|(field, value)| order[*field] == *value)
    })
    .await
}

async fn order_where(app: &TestApp, order_id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let reply = app.get(&format!("/orders/{order_id}")).await;
        if reply.status == 200 && done(&reply.body) {
            return reply.body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}: order {order_id} never got there: {}",
            app.backend,
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls a saga until its state is `state`.
async fn saga_until(app: &TestApp, order_id: &str, state: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let reply = app.get(&format!("/sagas/{order_id}")).await;
        if reply.status == 200 && reply.body["saga"]["state"] == state {
            return reply.body["saga"].clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}: saga never {state}: {}",
            app.backend,
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `(on_hand, reserved)` of a SKU, once its read model has it.
async fn stock(app: &TestApp, sku: &str) -> Option<(i64, i64)> {
    let reply = app.get(&format!("/inventory/{sku}")).await;
    (reply.status == 200).then(|| {
        (
            reply.body["on_hand"].as_i64().expect("on hand"),
            reply.body["reserved"].as_i64().expect("reserved"),
        )
    })
}

/// Polls a SKU until its stock is `(on_hand, reserved)`.
async fn stock_until(app: &TestApp, sku: &str, expected: (i64, i64)) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while stock(app, sku).await != Some(expected) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}: {sku} never {expected:?}: {:?}",
            app.backend,
            stock(app, sku).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls an order's payment until its status is `status` (the payments read model may trail
/// the saga, which hears of the payment first).
async fn payment_until(app: &TestApp, order_id: &str, status: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let reply = app.get(&format!("/payments/{order_id}")).await;
        if reply.status == 200 && reply.body["status"] == status {
            return reply.body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}: payment of {order_id} never {status}: {}",
            app.backend,
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn place(app: &TestApp, token: &str, lines: &[(&str, i64, i64)]) -> String {
    let reply = app.place_order(token, lines).await;
    reply.expect(201)["order_id"]
        .as_str()
        .expect("order id")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_order_is_confirmed_captured_then_shipped_and_its_stock_committed() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        app.receive("SKU-A", 10).await.expect(200);
        app.receive("SKU-A2", 5).await.expect(200);
        let order_id = place(
            &app,
            "tok_approve",
            &[("SKU-A", 2, 1999), ("SKU-A2", 1, 500)],
        )
        .await;
        order_with(
            &app,
            &order_id,
            &[
                ("status", "confirmed"),
                ("payment_status", "captured"),
                ("reservation_status", "reserved"),
            ],
        )
        .await;
        saga_until(&app, &order_id, "confirmed").await;
        stock_until(&app, "SKU-A", (10, 2)).await;
        let payment = payment_until(&app, &order_id, "captured").await;
        assert_eq!(payment["captured_minor"], 2 * 1999 + 500);

        app.post(&format!("/orders/{order_id}/ship"), json!({}))
            .await
            .expect(200);
        let saga = saga_until(&app, &order_id, "completed").await;
        stock_until(&app, "SKU-A", (8, 0)).await;
        stock_until(&app, "SKU-A2", (4, 0)).await;
        // The saga's steps, with their timestamps and the commands sent.
        let steps: Vec<&str> = saga["history"]
            .as_array()
            .expect("history")
            .iter()
            .map(|step| step["step"].as_str().expect("step"))
            .collect();
        for step in [
            "reserve:SKU-A",
            "reserve:SKU-A2",
            "authorise",
            "confirm",
            "capture",
            "commit:SKU-A",
        ] {
            assert!(steps.contains(&step), "{backend:?}: {step} in {steps:?}");
        }
        let listed = app.get("/sagas?state=completed").await;
        assert!(
            listed.expect(200)["sagas"]
                .as_array()
                .expect("sagas")
                .iter()
                .any(|saga| saga["order_id"] == order_id.as_str())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_without_enough_stock_is_rejected_and_what_was_reserved_released() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        app.receive("SKU-B", 10).await.expect(200);
        app.receive("SKU-SCARCE", 1).await.expect(200);
        let order_id = place(
            &app,
            "tok_approve",
            &[("SKU-B", 3, 100), ("SKU-SCARCE", 2, 100)],
        )
        .await;
        let order = order_until(&app, &order_id, &["rejected"]).await;
        assert!(
            order["reason"]
                .as_str()
                .expect("reason")
                .contains("SKU-SCARCE"),
            "{backend:?}: {order}"
        );
        saga_until(&app, &order_id, "rejected").await;
        stock_until(&app, "SKU-B", (10, 0)).await;
        stock_until(&app, "SKU-SCARCE", (1, 0)).await;
        app.get(&format!("/payments/{order_id}"))
            .await
            .expect_problem(404);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_payment_releases_the_stock_and_rejects_the_order() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        app.receive("SKU-C", 10).await.expect(200);
        let order_id = place(&app, "tok_decline", &[("SKU-C", 4, 100)]).await;
        order_with(
            &app,
            &order_id,
            &[("status", "rejected"), ("payment_status", "declined")],
        )
        .await;
        saga_until(&app, &order_id, "rejected").await;
        stock_until(&app, "SKU-C", (10, 0)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_that_never_answers_times_out_voids_and_releases() {
    for backend in backends() {
        let app = spawn_impatient(backend).await;
        app.receive("SKU-D", 10).await.expect(200);
        let order_id = place(&app, "tok_timeout", &[("SKU-D", 4, 100)]).await;
        let order = order_until(&app, &order_id, &["rejected"]).await;
        assert!(
            order["reason"]
                .as_str()
                .expect("reason")
                .contains("timed out"),
            "{backend:?}: {order}"
        );
        saga_until(&app, &order_id, "rejected").await;
        stock_until(&app, "SKU-D", (10, 0)).await;
        payment_until(&app, &order_id, "voided").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_provider_is_retried_and_the_order_confirmed() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        app.receive("SKU-E", 10).await.expect(200);
        let order_id = place(&app, "tok_flaky", &[("SKU-E", 1, 700)]).await;
        order_with(
            &app,
            &order_id,
            &[("status", "confirmed"), ("payment_status", "captured")],
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_confirmed_order_refunds_it_and_releases_its_stock() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        app.receive("SKU-F", 10).await.expect(200);
        let order_id = place(&app, "tok_approve", &[("SKU-F", 3, 1000)]).await;
        order_until(&app, &order_id, &["confirmed"]).await;
        saga_until(&app, &order_id, "confirmed").await;
        app.post(
            &format!("/orders/{order_id}/cancel"),
            json!({"reason": "changed my mind"}),
        )
        .await
        .expect(200);
        saga_until(&app, &order_id, "cancelled").await;
        stock_until(&app, "SKU-F", (10, 0)).await;
        let payment = payment_until(&app, &order_id, "refunded").await;
        assert_eq!(payment["refunded_minor"], 3000, "{backend:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_pending_order_compensates_what_the_saga_had_done() {
    for backend in backends() {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let settings = settings(backend, dir.path());
        let app = TestApp::spawn_with(backend, settings, dir).await;
        app.receive("SKU-G", 10).await.expect(200);
        // Stock reserved, payment asked and never answered: the order waits, pending.
        let order_id = place(&app, "tok_timeout", &[("SKU-G", 2, 100)]).await;
        stock_until(&app, "SKU-G", (10, 2)).await;
        // The saga hears of the reservation on the stock topic and of the cancellation on the
        // order topic, in either order: cancel only once it has asked for the payment, or
        // there is nothing to void.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let reply = app.get(&format!("/sagas/{order_id}")).await;
            let asked = reply.status == 200
                && reply.body["saga"]["history"]
                    .as_array()
                    .is_some_and(|steps| steps.iter().any(|step| step["step"] == "authorise"));
            if asked {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{backend:?}: the saga never asked for the payment: {}",
                reply.body
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        app.post(&format!("/orders/{order_id}/cancel"), json!({}))
            .await
            .expect(200);
        saga_until(&app, &order_id, "cancelled").await;
        stock_until(&app, "SKU-G", (10, 0)).await;
        payment_until(&app, &order_id, "voided").await;
        // Stuck-saga detection: nothing is stuck now.
        let stuck = app.get("/sagas?stuck_for=0").await;
        assert!(
            stuck.expect(200)["sagas"]
                .as_array()
                .expect("sagas")
                .is_empty(),
            "{backend:?}"
        );
        app.get("/sagas/0190a0a0-0000-7000-8000-000000000000")
            .await
            .expect_problem(404);
        app.get("/sagas?stuck_for=soon").await.expect_problem(422);
    }
}

/// `platform sagas …` against `app`'s backend, as an operator would run it.
async fn sagas_cli(app: &TestApp, args: &[&str]) -> (bool, String) {
    let settings = &app.settings;
    let mut command = std::process::Command::new(platform_binary());
    command
        .arg("sagas")
        .args(args)
        .arg("--data-dir")
        .arg(&settings.store.data_dir)
        .arg("--topic-prefix")
        .arg(&settings.store.topic_prefix)
        .arg("--schema-prefix")
        .arg(&settings.store.schema_prefix)
        .arg("--saga-compensation-timeout-ms")
        .arg(settings.saga.compensation_timeout_ms.to_string())
        .env("RUST_LOG", "error")
        .env_remove("DATABASE_URL")
        .env_remove("PLATFORM_KAFKA");
    if let (Some(kafka), Some(url)) = (&settings.store.kafka, &settings.store.database_url) {
        command
            .arg("--kafka")
            .arg(kafka)
            .arg("--database-url")
            .arg(url);
    }
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("run platform sagas");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_that_keeps_failing_is_parked_until_an_operator_retries_it() {
    for backend in backends() {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let mut settings = settings(backend, dir.path());
        settings.saga.timeout_ms = 5_000;
        // Resends after 0.3, 0.36, 0.42, 0.54 s: parked about 2 s after the first refund.
        settings.saga.compensation_timeout_ms = 300;
        let app = TestApp::spawn_with(backend, settings, dir).await;
        app.receive("SKU-H", 10).await.expect(200);
        // Two orders whose refunds fail at the provider: one retried over HTTP, one by the CLI.
        let by_http = place(&app, "tok_refund_fails", &[("SKU-H", 2, 1000)]).await;
        let by_cli = place(&app, "tok_refund_fails", &[("SKU-H", 3, 700)]).await;
        for order_id in [&by_http, &by_cli] {
            order_with(
                &app,
                order_id,
                &[("status", "confirmed"), ("payment_status", "captured")],
            )
            .await;
            saga_until(&app, order_id, "confirmed").await;
            app.post(&format!("/orders/{order_id}/cancel"), json!({}))
                .await
                .expect(200);
        }
        for order_id in [&by_http, &by_cli] {
            let saga = saga_until(&app, order_id, "needs_attention").await;
            assert_eq!(saga["attention"]["step"], "refund", "{backend:?}: {saga}");
            let refund = saga["history"]
                .as_array()
                .expect("history")
                .iter()
                .find(|step| step["step"] == "refund")
                .expect("a refund step")
                .clone();
            // Sent max_attempts times, each under its own command id, then parked.
            assert_eq!(refund["attempt"], 5, "{backend:?}: {refund}");
            assert_eq!(
                refund["command_ids"].as_array().expect("ids").len(),
                5,
                "{backend:?}: {refund}"
            );
            assert!(refund["parked_at"].is_string(), "{backend:?}: {refund}");
            // The money has not moved back; the stock was released (its compensation worked).
            payment_until(&app, order_id, "captured").await;
        }
        stock_until(&app, "SKU-H", (10, 0)).await;
        let parked = app.get("/sagas?state=needs_attention").await;
        assert_eq!(
            parked.expect(200)["sagas"].as_array().expect("sagas").len(),
            2,
            "{backend:?}: both listed as needing attention"
        );
        let stuck = app.get("/sagas?stuck_for=0").await;
        assert_eq!(
            stuck.expect(200)["sagas"].as_array().expect("sagas").len(),
            2,
            "{backend:?}: parked sagas are stuck sagas"
        );
        // The CLI shows it, and lists it by state.
        let (ok, shown) = sagas_cli(&app, &["show", &by_cli]).await;
        assert!(ok, "{backend:?}: sagas show: {shown}");
        assert!(
            shown.contains("needs_attention") && shown.contains("refund"),
            "{backend:?}: {shown}"
        );
        let (ok, listed) = sagas_cli(&app, &["list", "--state", "needs_attention", "--json"]).await;
        assert!(ok, "{backend:?}: sagas list: {listed}");
        let listed: Value = serde_json::from_str(&listed).expect("sagas list --json is JSON");
        assert_eq!(listed.as_array().expect("a list").len(), 2, "{backend:?}");

        // The operator retries: the 6th send succeeds at the provider.
        let retried = app
            .post(&format!("/sagas/{by_http}/retry"), json!({}))
            .await;
        assert_eq!(
            retried.expect(200)["saga"]["state"],
            "compensating",
            "{backend:?}"
        );
        let (ok, output) = sagas_cli(&app, &["retry", &by_cli]).await;
        assert!(ok, "{backend:?}: sagas retry: {output}");
        for (order_id, refunded) in [(&by_http, 2000), (&by_cli, 2100)] {
            let saga = saga_until(&app, order_id, "cancelled").await;
            assert!(saga["attention"].is_null(), "{backend:?}: {saga}");
            let payment = payment_until(&app, order_id, "refunded").await;
            assert_eq!(payment["refunded_minor"], refunded, "{backend:?}");
        }
        // Retrying a saga that needs nothing is refused by the CLI and the API.
        let (ok, output) = sagas_cli(&app, &["retry", &by_cli]).await;
        assert!(
            !ok && output.contains("nothing to retry"),
            "{backend:?}: {output}"
        );
        let again = app
            .post(&format!("/sagas/{by_http}/retry"), json!({}))
            .await;
        let problem = again.expect_problem(409);
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|detail| detail.contains("nothing to retry")),
            "{backend:?}: {problem}"
        );
    }
}
