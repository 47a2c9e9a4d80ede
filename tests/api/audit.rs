//! The audit views over HTTP (`/audit/...`) and the command line: an aggregate's timeline, a
//! correlation's causation tree, and state as of a time or version.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{TestApp, backends, operator_command};

/// Polls `path` until `done` holds for its body.
async fn until(app: &TestApp, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let reply = app.get(path).await;
        if reply.status == 200 && done(&reply.body) {
            return reply.body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}: {path} never got there: {} {}",
            app.backend,
            reply.status,
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_of_a_compensated_saga_lists_every_step_in_causal_order() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        app.receive("SKU-T", 10).await.expect(200);
        let correlation = format!("trace-{}", uuid::Uuid::new_v4().simple());
        let placed = app
            .post_with(
                "/orders",
                json!({"customer_id": "c-9", "currency": "EUR", "payment_token": "tok_decline",
                       "lines": [{"sku": "SKU-T", "quantity": 3, "unit_price_minor": 100}]}),
                &[("X-Correlation-Id", &correlation)],
            )
            .await;
        let order_id = placed.expect(201)["order_id"]
            .as_str()
            .expect("order id")
            .to_owned();
        // Declined: the saga releases the stock and rejects the order. The audit model reads
        // each topic's partitions on their own, so the compensations may be in it before the
        // decline that caused them: wait for all three.
        let trace = until(&app, &format!("/audit/trace/{correlation}"), |trace| {
            trace["steps"].as_array().is_some_and(|steps| {
                [
                    "payment.declined",
                    "order.rejected",
                    "stock.reservation_released",
                ]
                .iter()
                .all(|event| steps.iter().any(|step| step["event_type"] == *event))
            })
        })
        .await;
        let steps: Vec<(String, String, bool, u64)> = trace["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .map(|step| {
                (
                    step["command"].as_str().expect("command").to_owned(),
                    step["event_type"].as_str().expect("event").to_owned(),
                    step["compensation"].as_bool().expect("flag"),
                    step["depth"].as_u64().expect("depth"),
                )
            })
            .collect();
        let expected = [
            ("place_order", "order.placed", false, 0),
            ("reserve_stock", "stock.reserved", false, 1),
            ("authorise_payment", "payment.declined", false, 2),
        ];
        for (at, step) in expected.iter().enumerate() {
            let (command, event, compensation, depth) = step;
            assert_eq!(
                steps[at],
                (
                    command.to_string(),
                    event.to_string(),
                    *compensation,
                    *depth
                ),
                "{backend:?}: step {at} of {steps:?}"
            );
        }
        // Then both compensations, caused (directly or through the release) by the decline.
        let rest: Vec<_> = steps[3..].to_vec();
        assert_eq!(rest.len(), 2, "{backend:?}: {steps:?}");
        for (command, event) in [
            ("release_stock", "stock.reservation_released"),
            ("reject_order", "order.rejected"),
        ] {
            assert!(
                rest.iter().any(|(c, e, compensation, depth)| c == command
                    && e == event
                    && *compensation
                    && *depth >= 3),
                "{backend:?}: {command} is a compensation after the decline: {steps:?}"
            );
        }
        assert_eq!(trace["roots"][0]["caused_by"], "request");
        assert_eq!(trace["roots"][0]["aggregate_id"], order_id.as_str());

        // The command line draws the same tree.
        let mut command = operator_command(&app.settings, &["audit", "trace", &correlation]);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("join")
            .expect("run platform audit");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{backend:?}: {stdout}");
        let lines: Vec<&str> = stdout.lines().collect();
        let position = |needle: &str| {
            lines
                .iter()
                .position(|line| line.contains(needle))
                .unwrap_or_else(|| panic!("{backend:?}: {needle:?} in {stdout}"))
        };
        assert!(position("place_order") < position("reserve_stock"));
        assert!(position("reserve_stock") < position("authorise_payment"));
        assert!(position("authorise_payment") < position("release_stock"));
        assert!(lines[position("release_stock")].contains("[compensation]"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_as_of_a_time_matches_what_the_read_model_showed_at_that_time() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        let placed = app.place_pending_order("SKU-S").await;
        let order_id = placed.expect(201)["order_id"]
            .as_str()
            .expect("order id")
            .to_owned();
        let then = until(&app, &format!("/orders/{order_id}"), |order| {
            order["status"] == "pending"
        })
        .await;
        let seen_at = chrono::Utc::now();
        tokio::time::sleep(Duration::from_millis(50)).await;
        app.post(
            &format!("/orders/{order_id}/cancel"),
            json!({"reason": "changed my mind"}),
        )
        .await
        .expect(200);
        until(&app, &format!("/orders/{order_id}"), |order| {
            order["status"] == "cancelled"
        })
        .await;
        // The audit log is its own projection: wait until it has the cancellation too.
        until(&app, &format!("/audit/order/{order_id}/state"), |latest| {
            latest["state"]["Placed"]["status"] == "cancelled"
        })
        .await;

        let at_time = app
            .get(&format!(
                "/audit/order/{order_id}/state?as_of={}",
                seen_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            ))
            .await;
        let at_time = at_time.expect(200);
        assert_eq!(
            at_time["version"], then["version"],
            "{backend:?}: {at_time}"
        );
        let order = &at_time["state"]["Placed"];
        assert_eq!(order["status"], "pending", "{backend:?}: {at_time}");
        assert_eq!(
            order["total"]["amount_minor"], then["total_minor"],
            "{backend:?}: {at_time}"
        );
        assert_eq!(order["customer_id"], then["customer_id"]);

        let by_version = app
            .get(&format!("/audit/order/{order_id}/state?as_of=1"))
            .await;
        assert_eq!(by_version.expect(200)["state"], at_time["state"]);
        let latest = app.get(&format!("/audit/order/{order_id}/state")).await;
        assert_eq!(
            latest.expect(200)["state"]["Placed"]["status"],
            "cancelled",
            "{backend:?}"
        );

        let timeline = app.get(&format!("/audit/order/{order_id}")).await;
        let events = timeline.expect(200)["events"]
            .as_array()
            .expect("events")
            .clone();
        assert_eq!(events.len(), 2, "{backend:?}: {events:?}");
        assert_eq!(events[1]["event_type"], "order.cancelled");
        assert!(
            events[1]["summary"]
                .as_str()
                .expect("summary")
                .contains("status: pending → cancelled"),
            "{backend:?}: {events:?}"
        );
        assert!(!events[0]["actor"].as_str().expect("actor").is_empty());

        app.get("/audit/order/no-such-order")
            .await
            .expect_problem(404);
        app.get("/audit/invoice/1").await.expect_problem(422);
        app.get(&format!("/audit/order/{order_id}/state?as_of=yesterday"))
            .await
            .expect_problem(422);
    }
}
