//! The read side: projections with exactly-once effect, the query API, read-your-writes,
//! parking, consumer groups, and crash recovery equal to a fresh replay.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use domain::order::{OrderAggregate, OrderConfirmed, OrderEvent, OrderShipped};
use event_log::partition_for;
use event_schema::{CommandMeta, Envelope, Record};
use projections::parked::{self, Resolution};
use projections::{ReadBackend, ReadSide};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::helpers::{Backend, TestApp, backends, open_log, settings};

/// Every read-model table, with its primary key order.
const TABLES: &[(&str, &str, &str)] = &[
    ("orders", "order_summary", "order_id"),
    ("orders", "order_payment", "order_id"),
    ("orders", "order_reservations", "order_id, sku"),
    ("inventory", "stock_levels", "sku"),
    ("payments", "payments", "order_id"),
    ("audit", "audit_events", "event_id"),
];

fn read_backend(backend: Backend, settings: &platform::Settings) -> ReadBackend {
    match backend {
        Backend::Embedded => ReadBackend::Sqlite {
            dir: settings.store.data_dir.clone(),
        },
        Backend::Kafka => ReadBackend::Postgres {
            url: settings.store.database_url.clone().expect("database url"),
            schema_prefix: settings.store.schema_prefix.clone(),
        },
    }
}

/// Builds every read model from scratch, from the whole log, into a fresh database.
async fn fresh_replay(
    backend: Backend,
    settings: &platform::Settings,
) -> (ReadSide, watch::Sender<bool>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut fresh = settings.clone();
    let unique = uuid::Uuid::new_v4().simple().to_string();
    fresh.store.data_dir = dir.path().to_owned();
    fresh.store.schema_prefix = format!("r{}_", &unique[..12]);
    let log = open_log(backend, settings).await;
    let read = ReadSide::open_in_group(
        log,
        &read_backend(backend, &fresh),
        &settings.store.topic_prefix,
        &format!("replay-{unique}"),
    )
    .await
    .expect("open the fresh read side");
    let (stop, stopped) = watch::channel(false);
    read.start_workers(stopped, &supervisor::Supervisor::new());
    assert!(
        read.wait_caught_up(Duration::from_secs(60))
            .await
            .expect("status"),
        "the replay caught up"
    );
    (read, stop, dir)
}

async fn assert_equal_read_models(live: &ReadSide, replay: &ReadSide, context: &str) {
    for (projection, table, order) in TABLES {
        let expected = replay
            .dump(projection, table, order)
            .await
            .expect("dump replay");
        let actual = live
            .dump(projection, table, order)
            .await
            .expect("dump live");
        assert_eq!(actual.len(), expected.len(), "{context}: {table} row count");
        for (actual, expected) in actual.iter().zip(&expected) {
            assert_eq!(actual, expected, "{context}: {table} row for row");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_holds_right_after_a_command() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        for round in 1..=5 {
            let receipt = app.receive("SKU-RYW", 2).await;
            let token = receipt.expect(200)["consistency_token"]
                .as_str()
                .expect("token")
                .to_owned();
            let stock = app
                .client
                .get(app.url("/inventory/SKU-RYW"))
                .header("X-Consistency-Token", &token)
                .send()
                .await
                .expect("query");
            assert_eq!(stock.status(), 200, "{backend:?}");
            let stock: serde_json::Value = stock.json().await.expect("json");
            assert_eq!(
                stock["on_hand"],
                2 * round,
                "{backend:?}: the read includes the write"
            );
            assert_eq!(stock["version"], round);
        }
        app.receive("SKU-2", 10).await.expect(200);
        let placed = app
            .place_order("tok_timeout", &[("SKU-RYW", 1, 250), ("SKU-2", 2, 100)])
            .await;
        let body = placed.expect(201).clone();
        let order_id = body["order_id"].as_str().expect("id");
        let token = body["consistency_token"].as_str().expect("token");
        let order = app.get(&format!("/orders/{order_id}?after={token}")).await;
        let order = order.expect(200);
        assert_eq!(order["status"], "pending", "{backend:?}");
        assert_eq!(order["total_minor"], 450);
        assert_eq!(order["lines"].as_array().expect("lines").len(), 2);
        let cancelled = app
            .post(&format!("/orders/{order_id}/cancel"), json!({}))
            .await;
        let token = cancelled.expect(200)["consistency_token"]
            .as_str()
            .expect("token")
            .to_owned();
        let order = app.get(&format!("/orders/{order_id}?after={token}")).await;
        assert_eq!(order.expect(200)["status"], "cancelled", "{backend:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consistency_token_the_read_model_cannot_reach_is_a_503_with_retry_after() {
    let app = TestApp::spawn(Backend::Embedded).await;
    app.receive("SKU-1", 1).await.expect(200);
    let topic = event_log::topics::events(&app.settings.store.topic_prefix, "stock");
    let partition = partition_for("SKU-1", app.settings.partitions);
    let started = std::time::Instant::now();
    let reply = app
        .get(&format!("/inventory/SKU-1?after={topic}:{partition}:999"))
        .await;
    reply.expect_problem(503);
    assert!(reply.header("retry-after").is_some());
    assert!(
        started.elapsed() >= projections::query::CONSISTENCY_WAIT,
        "it waited the bounded time"
    );
    app.get("/inventory/SKU-1?after=not-a-token")
        .await
        .expect_problem(400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_answer_404_304_and_pages_newest_first() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        app.get("/orders/0190a0a0-0000-7000-8000-000000000000")
            .await
            .expect_problem(404);
        app.get("/inventory/NOPE").await.expect_problem(404);
        app.get("/payments/0190a0a0-0000-7000-8000-000000000000")
            .await
            .expect_problem(404);
        app.get("/orders").await.expect_problem(422);
        app.get("/orders?customer_id=c-1&status=lost")
            .await
            .expect_problem(422);
        app.get("/orders?customer_id=c-1&cursor=zzz")
            .await
            .expect_problem(400);
        app.get("/inventory").await.expect_problem(422);

        let mut ids = Vec::new();
        app.receive("SKU-P", 100).await.expect(200);
        for _ in 0..5 {
            let body = app
                .place_order("tok_timeout", &[("SKU-P", 1, 100)])
                .await
                .expect(201)
                .clone();
            let id = body["order_id"].as_str().expect("id").to_owned();
            // Each order may sit in another partition: wait for each through its own token.
            let token = body["consistency_token"].as_str().expect("token");
            app.get(&format!("/orders/{id}?after={token}"))
                .await
                .expect(200);
            ids.push(id);
        }
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(cursor) => format!("/orders?customer_id=c-1&limit=2&cursor={cursor}"),
                None => "/orders?customer_id=c-1&limit=2".to_owned(),
            };
            let page = app.get(&path).await;
            let page = page.expect(200);
            for order in page["orders"].as_array().expect("orders") {
                seen.push((
                    order["placed_at"].as_str().expect("time").to_owned(),
                    order["order_id"].as_str().expect("id").to_owned(),
                ));
            }
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
        }
        assert_eq!(seen.len(), 5, "{backend:?}: every order once");
        let mut sorted = seen.clone();
        sorted.sort_by(|a, b| b.cmp(a));
        assert_eq!(seen, sorted, "{backend:?}: newest first");
        let pending = app
            .get("/orders?customer_id=c-1&status=pending&limit=100")
            .await;
        assert_eq!(
            pending.expect(200)["orders"]
                .as_array()
                .expect("orders")
                .len(),
            5
        );
        let cancelled = app.get("/orders?customer_id=c-1&status=cancelled").await;
        assert!(
            cancelled.expect(200)["orders"]
                .as_array()
                .expect("orders")
                .is_empty()
        );

        // ETag and If-None-Match.
        let first = app.get(&format!("/orders/{}", ids[0])).await;
        let etag = first.header("etag").expect("an etag").to_owned();
        let again = app
            .client
            .get(app.url(&format!("/orders/{}", ids[0])))
            .header("If-None-Match", &etag)
            .send()
            .await
            .expect("query");
        assert_eq!(again.status(), 304, "{backend:?}");
        let token = app
            .post(&format!("/orders/{}/cancel", ids[0]), json!({}))
            .await
            .expect(200)["consistency_token"]
            .as_str()
            .expect("token")
            .to_owned();
        let changed = app
            .client
            .get(app.url(&format!("/orders/{}?after={token}", ids[0])))
            .header("If-None-Match", &etag)
            .send()
            .await
            .expect("query");
        assert_eq!(
            changed.status(),
            200,
            "{backend:?}: a changed order is sent again"
        );
        // The low-stock list. A consistency token covers its own partition only, and the two
        // SKUs may be on different ones: the list is asked once both are in.
        let low_token = app.receive("SKU-LOW", 3).await.expect(200)["consistency_token"]
            .as_str()
            .expect("t")
            .to_owned();
        let token = app.receive("SKU-HIGH", 300).await.expect(200)["consistency_token"]
            .as_str()
            .expect("t")
            .to_owned();
        app.get(&format!("/inventory/SKU-LOW?after={low_token}"))
            .await
            .expect(200);
        let low = app.get(&format!("/inventory?below=10&after={token}")).await;
        let skus: Vec<&str> = low.expect(200)["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|item| item["sku"].as_str().expect("sku"))
            .collect();
        assert!(
            skus.contains(&"SKU-LOW") && !skus.contains(&"SKU-HIGH"),
            "{backend:?}: {skus:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_batch_changes_nothing() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        for i in 0..10 {
            app.receive(&format!("SKU-{i}"), 5).await.expect(200);
        }
        let token = app
            .post(
                "/inventory/SKU-1/adjustments",
                json!({"delta": -1, "reason": "count"}),
            )
            .await;
        let token = token.expect(200)["consistency_token"]
            .as_str()
            .expect("token")
            .to_owned();
        app.get(&format!("/inventory/SKU-1?after={token}"))
            .await
            .expect(200);
        let read = app.read.clone().expect("read side");
        assert!(
            read.wait_caught_up(Duration::from_secs(30))
                .await
                .expect("status")
        );
        let before = read
            .dump("inventory", "stock_levels", "sku")
            .await
            .expect("dump");

        // Deliver every record again to the inventory projection, as a redelivery would.
        let log = app.log().await;
        let topic = event_log::topics::events(&app.settings.store.topic_prefix, "stock");
        let mut records = Vec::new();
        for partition in 0..app.settings.partitions {
            let end = log.end_offset(&topic, partition).await.expect("end");
            if end == 0 {
                continue;
            }
            let mut reader = log.reader(&topic, &[(partition, 0)]).await.expect("reader");
            while records
                .iter()
                .filter(|r: &&event_log::LogRecord| r.position.partition == partition)
                .count()
                < end as usize
            {
                records.extend(
                    reader
                        .poll(1000, Duration::from_millis(200))
                        .await
                        .expect("poll"),
                );
            }
        }
        let worker = projections::runtime::Worker {
            log: log.clone(),
            db: read.db("inventory").expect("db").clone(),
            projection: Arc::new(projections::models::inventory::Inventory),
            topics: vec![topic.clone()],
            group: Arc::new(event_log::shared::SharedGroup::new(
                log.clone(),
                "unused",
                vec![topic.clone()],
            )),
            state: Default::default(),
        };
        worker.apply_batch(&records).await.expect("apply again");
        worker
            .apply_batch(&records[..records.len() / 2])
            .await
            .expect("apply a part again");
        let after = read
            .dump("inventory", "stock_levels", "sku")
            .await
            .expect("dump");
        assert_eq!(before, after, "{backend:?}: nothing changed");

        // The audit model writes by COPY, trusting the runtime to hand over only new events.
        // Handed the applied ones again (tables changed by hand, a replay gone wrong), it falls
        // back to its upsert, which keeps them once.
        read.wait_caught_up(Duration::from_secs(30))
            .await
            .expect("status");
        let audit_before = read
            .dump("audit", "audit_events", "event_id")
            .await
            .expect("dump");
        let events: Vec<projections::runtime::Event> = records
            .iter()
            .map(|record| projections::runtime::Event {
                position: record.position.clone(),
                envelope: Envelope::try_from(&record.record).expect("envelope"),
            })
            .collect();
        assert!(!events.is_empty());
        let audit_db = read.db("audit").expect("db").clone();
        let mut tx = audit_db.begin().await.expect("begin");
        use projections::runtime::Projection;
        projections::models::audit::Audit
            .apply(&mut tx, &events)
            .await
            .expect("apply applied events again");
        tx.commit().await.expect("commit");
        let audit_after = read
            .dump("audit", "audit_events", "event_id")
            .await
            .expect("dump");
        assert_eq!(
            audit_before, audit_after,
            "{backend:?}: the audit kept each event once"
        );

        // A worker remembers the versions it committed. Here another worker applies the whole
        // log while the first one, which applied the first half, still remembers its own
        // (older) versions; handed the second half, the first worker must see that the stored
        // versions moved on and change nothing.
        let scratch = tempfile::tempdir().expect("temp dir");
        let db = match backend {
            Backend::Embedded => projections::db::Db::sqlite(&scratch.path().join("inventory.db"))
                .await
                .expect("sqlite"),
            Backend::Kafka => projections::db::Db::postgres(
                app.settings.store.database_url.as_deref().expect("url"),
                &format!(
                    "k{}_inventory",
                    &uuid::Uuid::new_v4().simple().to_string()[..12]
                ),
                4,
            )
            .await
            .expect("postgres"),
        };
        let inventory: Arc<dyn projections::runtime::Projection> =
            Arc::new(projections::models::inventory::Inventory);
        projections::runtime::migrate(&db, &*inventory)
            .await
            .expect("migrate");
        let worker = |db: &projections::db::Db| projections::runtime::Worker {
            log: log.clone(),
            db: db.clone(),
            projection: inventory.clone(),
            topics: vec![topic.clone()],
            group: Arc::new(event_log::shared::SharedGroup::new(
                log.clone(),
                "unused",
                vec![topic.clone()],
            )),
            state: Default::default(),
        };
        let (first, second) = (worker(&db), worker(&db));
        // Each SKU's first event, then the rest: the first worker remembers every SKU at v1.
        let (opening, rest): (Vec<_>, Vec<_>) = records.iter().cloned().partition(|record| {
            Envelope::try_from(&record.record)
                .expect("envelope")
                .aggregate_version
                == 1
        });
        assert!(!rest.is_empty(), "some SKU has more than one event");
        first.apply_batch(&opening).await.expect("first events");
        second.apply_batch(&records).await.expect("everything");
        let applied = first.state.applied();
        first.apply_batch(&rest).await.expect("the rest, again");
        assert_eq!(
            first.state.conflicts(),
            rest.len() as u64,
            "{backend:?}: the rest, already applied by the other worker, judged stale"
        );
        assert_eq!(
            first.state.applied(),
            applied,
            "{backend:?}: nothing applied again"
        );
        let dump = |rows: Vec<projections::db::Row>| -> Vec<String> {
            rows.iter()
                .map(|row| format!("{:?}", row.columns))
                .collect()
        };
        let stock = dump(
            db.fetch_all("SELECT * FROM stock_levels ORDER BY sku", &[])
                .await
                .expect("stock"),
        );
        let live = dump(
            read.db("inventory")
                .expect("db")
                .fetch_all("SELECT * FROM stock_levels ORDER BY sku", &[])
                .await
                .expect("stock"),
        );
        assert!(!stock.is_empty());
        assert_eq!(
            stock, live,
            "{backend:?}: every stock event applied once, though one worker's memory was out of date"
        );

        // A worker that starts a partition at offset 0 takes its aggregates to have no version
        // and writes their first versions by COPY. Here the positions are gone but the versions
        // are not: the COPY conflicts, and the checked upsert it falls back to finds the versions
        // moved on, so the batch is judged again from the database: every event stale.
        db.execute("DELETE FROM projection_positions", &[])
            .await
            .expect("forget the positions");
        let third = projections::runtime::Worker {
            group: Arc::new(event_log::shared::SharedGroup::new(
                log.clone(),
                format!("fresh-{}", uuid::Uuid::new_v4().simple()),
                vec![topic.clone()],
            )),
            ..worker(&db)
        };
        let state = third.state.clone();
        let (stop, stopped) = watch::channel(false);
        let running = tokio::spawn(third.run(stopped));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while state.conflicts() < records.len() as u64 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{backend:?}: only {} of {} records judged stale",
                state.conflicts(),
                records.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = stop.send(true);
        running.await.expect("worker stopped");
        assert_eq!(state.applied(), 0, "{backend:?}: nothing applied twice");
        let again = dump(
            db.fetch_all("SELECT * FROM stock_levels ORDER BY sku", &[])
                .await
                .expect("stock"),
        );
        assert_eq!(again, stock, "{backend:?}: the stock levels did not move");
    }
}

pub(crate) fn crafted(order_id: &str, version: u64, event: &OrderEvent) -> Record {
    let envelope = Envelope::new::<OrderAggregate>(
        order_id,
        version,
        event,
        &CommandMeta::new("test"),
        Utc::now(),
    );
    Record::from(&envelope)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_is_parked_its_aggregate_waits_and_the_rest_go_on() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        let read = app.read.clone().expect("read side");
        let log = app.log().await;
        let topic = event_log::topics::events(&app.settings.store.topic_prefix, "order");
        // An order that was never placed gets confirmed, then shipped: the orders projection
        // cannot apply either. Written straight to the log, as a buggy producer might.
        let ghost = uuid::Uuid::now_v7().to_string();
        let partition = partition_for(&ghost, app.settings.partitions);
        log.append(
            &topic,
            partition,
            crafted(&ghost, 1, &OrderEvent::Confirmed(OrderConfirmed {})),
        )
        .await
        .expect("append");
        log.append(
            &topic,
            partition,
            crafted(&ghost, 2, &OrderEvent::Shipped(OrderShipped {})),
        )
        .await
        .expect("append");
        // Other orders go on. (Records the owner did not write make it step down from the
        // ghost's partition, as it must: an order that lands there is refused with 503, so
        // place until one lands elsewhere.)
        let mut body = Value::Null;
        for _ in 0..50 {
            let placed = app.place_order("tok_approve", &[("SKU-1", 1, 100)]).await;
            if placed.status == 503 {
                assert!(
                    placed.body["detail"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("stepped down")
                );
                continue;
            }
            body = placed.expect(201).clone();
            break;
        }
        assert!(
            body.is_object(),
            "{backend:?}: an order landed on another partition"
        );
        let order = app
            .get(&format!(
                "/orders/{}?after={}",
                body["order_id"].as_str().expect("id"),
                body["consistency_token"].as_str().expect("token")
            ))
            .await;
        order.expect(200);
        assert!(
            read.wait_caught_up(Duration::from_secs(30))
                .await
                .expect("status")
        );

        let db = read.db("orders").expect("db");
        let waiting = parked::list(db, "orders", false).await.expect("list");
        assert_eq!(waiting.len(), 2, "{backend:?}: {waiting:?}");
        assert_eq!(waiting[0].event_type, "order.confirmed");
        assert!(
            waiting[0].error.contains("never placed"),
            "{}",
            waiting[0].error
        );
        assert_eq!(waiting[1].event_type, "order.shipped");
        assert!(waiting[1].error.contains("waiting behind"));
        app.get(&format!("/orders/{ghost}"))
            .await
            .expect_problem(404);
        let status = read.status().await.expect("status");
        assert_eq!(
            status
                .iter()
                .find(|s| s.projection == "orders")
                .expect("orders")
                .parked,
            2
        );
        // The audit trail, another projection, applied both.
        let audit = read
            .dump("audit", "audit_events", "event_id")
            .await
            .expect("dump");
        assert!(
            audit
                .iter()
                .any(|row| row.iter().any(|column| column.contains(&ghost))),
            "{backend:?}"
        );

        // Retrying the later one first is refused; retrying the first fails again.
        let second = event_log::Position {
            topic: topic.clone(),
            partition,
            offset: waiting[1].offset,
        };
        let first = event_log::Position {
            topic: topic.clone(),
            partition,
            offset: waiting[0].offset,
        };
        let orders = projections::models::orders::Orders;
        assert!(matches!(
            parked::resolve(db, &orders, &second, Resolution::Retry).await,
            Err(parked::ResolveError::NotFirst { .. })
        ));
        let retried = parked::resolve(db, &orders, &first, Resolution::Retry)
            .await
            .expect("retry");
        assert!(
            retried.applied.is_empty() && retried.still_parked.is_some(),
            "{retried:?}"
        );
        // Skipping it lets the next one be tried (it fails too: still no order), then skip it.
        let skipped = parked::resolve(db, &orders, &first, Resolution::Skip)
            .await
            .expect("skip");
        assert_eq!(skipped.skipped, Some(first.offset));
        assert_eq!(
            skipped.still_parked.as_ref().map(|(offset, _)| *offset),
            Some(second.offset)
        );
        parked::resolve(db, &orders, &second, Resolution::Skip)
            .await
            .expect("skip");
        assert!(
            parked::list(db, "orders", false)
                .await
                .expect("list")
                .is_empty(),
            "{backend:?}"
        );
        assert_eq!(
            parked::list(db, "orders", true).await.expect("list").len(),
            2
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_in_one_group_split_the_partitions_and_take_over_on_stop() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        let live = app.read.clone().expect("read side");
        for i in 0..8 {
            app.receive(&format!("SKU-{i}"), 1).await.expect(200);
        }
        // A second worker process of the same projections, on the same read-model database.
        let log = match backend {
            Backend::Embedded => app_log_shared(&app).await,
            Backend::Kafka => app.log().await,
        };
        let second = ReadSide::open(
            log,
            &read_backend(backend, &app.settings),
            &app.settings.store.topic_prefix,
        )
        .await
        .expect("open");
        let (stop_second, stopped) = watch::channel(false);
        second.start_workers(stopped, &supervisor::Supervisor::new());
        // The projections of a process share one member of the group, so the group splits the
        // union of their topics (the audit reads every one): balanced in number, not per topic.
        let total = projections::audit::AGGREGATE_TYPES.len() * app.settings.partitions as usize;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (a, b) = (
                live.held_partitions("audit"),
                second.held_partitions("audit"),
            );
            // A worker hears of a revocation when it next polls, so for a moment both may
            // list a partition (the stored positions keep them from both applying it).
            let disjoint = a.iter().all(|p| {
                !b.iter()
                    .any(|q| q.topic == p.topic && q.partition == p.partition)
            });
            if a.len() + b.len() == total && !a.is_empty() && !b.is_empty() && disjoint {
                // Every projection of a process holds the partitions of its topics the
                // process holds (once its worker has started them).
                let agree = [(&live, &a), (&second, &b)].iter().all(|(side, held)| {
                    let mut stock: Vec<u32> = held
                        .iter()
                        .filter(|p| p.topic.ends_with(".stock.events"))
                        .map(|p| p.partition)
                        .collect();
                    let mut inventory: Vec<u32> = side
                        .held_partitions("inventory")
                        .iter()
                        .map(|p| p.partition)
                        .collect();
                    stock.sort_unstable();
                    inventory.sort_unstable();
                    stock == inventory
                });
                if agree {
                    break;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{backend:?}: never split: {a:?} / {b:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Writes keep being applied, by whichever worker holds the partition.
        let token = app.receive("SKU-3", 1).await.expect(200)["consistency_token"]
            .as_str()
            .expect("t")
            .to_owned();
        app.get(&format!("/inventory/SKU-3?after={token}"))
            .await
            .expect(200);

        let _ = stop_second.send(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while live.held_partitions("audit").len() < total {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{backend:?}: no takeover"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for i in 0..8 {
            let reply = app.receive(&format!("SKU-{i}"), 1).await;
            let token = reply.expect(200)["consistency_token"]
                .as_str()
                .expect("t")
                .to_owned();
            let stock = app.get(&format!("/inventory/SKU-{i}?after={token}")).await;
            assert!(
                stock.expect(200)["on_hand"].as_i64().expect("on hand") >= 2,
                "{backend:?}"
            );
        }
    }
}

/// The embedded backend's groups live in one process, in one log client: the second worker
/// must use the same client as the first.
async fn app_log_shared(app: &TestApp) -> event_log::SharedLog {
    app.read.as_ref().expect("read side").log()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_kill_the_read_models_equal_a_fresh_replay_row_for_row() {
    for backend in backends() {
        let dir = tempfile::tempdir().expect("temp dir");
        let settings = settings(backend, dir.path());
        let mut process = crate::durability::start_process(&settings).await;
        let client = crate::helpers::http_client();
        let address = process.address.clone();
        let load = tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                n += 1;
                let sku = format!("SKU-{}", n % 7);
                let _ = client
                    .post(format!("{address}/inventory/{sku}/receipts"))
                    .json(&json!({"quantity": 1}))
                    .send()
                    .await;
                let order = client
                    .post(format!("{address}/orders"))
                    .json(&json!({"customer_id": format!("c-{}", n % 3), "currency": "EUR", "payment_token": "tok_approve",
                                  "lines": [{"sku": sku, "quantity": 1, "unit_price_minor": 100}]}))
                    .send()
                    .await;
                if let Ok(order) = order
                    && n.is_multiple_of(3)
                    && let Ok(body) = order.json::<serde_json::Value>().await
                    && let Some(id) = body["order_id"].as_str()
                {
                    let _ = client
                        .post(format!("{address}/orders/{id}/cancel"))
                        .send()
                        .await;
                }
            }
        });
        let jitter = u64::from(uuid::Uuid::new_v4().as_bytes()[0]) * 4;
        tokio::time::sleep(Duration::from_millis(1000 + jitter)).await;
        process.kill();
        load.abort();

        let mut process = crate::durability::start_process(&settings).await;
        let log = open_log(backend, &settings).await;
        let live = ReadSide::open(
            log,
            &read_backend(backend, &settings),
            &settings.store.topic_prefix,
        )
        .await
        .expect("open the live read models");
        assert!(
            live.wait_caught_up(Duration::from_secs(60))
                .await
                .expect("status"),
            "{backend:?}: caught up after the restart"
        );
        process.kill();
        // The saga may have appended a last event or two between that check and the kill.
        // The log is still now: let the live read models' own workers (same consumer groups)
        // apply the rest, then compare with a replay from scratch.
        let (stop_live, stopped) = watch::channel(false);
        live.start_workers(stopped, &supervisor::Supervisor::new());
        assert!(
            live.wait_caught_up(Duration::from_secs(60))
                .await
                .expect("status"),
            "{backend:?}: caught up after the last kill"
        );
        let _ = stop_live.send(true);
        let (replay, stop, _dir) = fresh_replay(backend, &settings).await;
        assert_equal_read_models(&live, &replay, &format!("{backend:?}")).await;
        let _ = stop.send(true);
    }
}
