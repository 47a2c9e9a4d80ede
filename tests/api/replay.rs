//! `platform replay`: rebuilding read models into shadow tables and swapping them in under a
//! live platform, the diff against the live models, dry runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use projections::ReadBackend;
use projections::db::{DbError, Tx};
use projections::replay::{self, Filter, ReplayOptions, ReplayReport};
use projections::runtime::{ApplyError, Event, Projection};
use serde_json::json;

use crate::helpers::{Backend, TestApp, backends, operator_command};

/// Every read-model table, with its primary key order.
const TABLES: &[(&str, &str, &str)] = &[
    ("orders", "order_summary", "order_id"),
    ("orders", "order_payment", "order_id"),
    ("orders", "order_reservations", "order_id, sku"),
    ("inventory", "stock_levels", "sku"),
    ("payments", "payments", "order_id"),
    ("audit", "audit_events", "event_id"),
];

fn read_backend(app: &TestApp) -> ReadBackend {
    match app.backend {
        Backend::Embedded => ReadBackend::Sqlite {
            dir: app.settings.store.data_dir.clone(),
        },
        Backend::Kafka => ReadBackend::Postgres {
            url: app
                .settings
                .store
                .database_url
                .clone()
                .expect("database url"),
            schema_prefix: app.settings.store.schema_prefix.clone(),
        },
    }
}

/// Some history: stock, an approved order, a declined one (compensated), a cancelled one.
/// The orders `make_history` places.
const HISTORY_ORDERS: usize = 3;

async fn make_history(app: &TestApp) -> String {
    app.receive("SKU-R1", 20).await.expect(200);
    app.receive("SKU-R2", 20).await.expect(200);
    app.place_order("tok_approve", &[("SKU-R1", 2, 150), ("SKU-R2", 1, 900)])
        .await
        .expect(201);
    app.place_order("tok_decline", &[("SKU-R1", 1, 150)])
        .await
        .expect(201);
    let pending = app.place_pending_order("SKU-R3").await;
    let order_id = pending.expect(201)["order_id"]
        .as_str()
        .expect("order id")
        .to_owned();
    app.post(
        &format!("/orders/{order_id}/cancel"),
        json!({"reason": "changed my mind"}),
    )
    .await;
    order_id
}

async fn settle(app: &TestApp) {
    let read = app.read.as_ref().expect("read side");
    // The saga acts on what the projections see: wait until every order has left `pending`
    // and every confirmed one's payment is captured (on Kafka each saga hop can take a
    // quarter of a second), then give the last events time and catch up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let page = app.get("/orders?customer_id=c-1&limit=100").await;
        let orders = page.body["orders"].as_array().cloned().unwrap_or_default();
        // Every order `make_history` placed must be listed: one not projected yet is not
        // listed at all, so it cannot show as pending.
        let mut settled = page.status == 200 && orders.len() == HISTORY_ORDERS;
        for order in &orders {
            match order["status"].as_str() {
                Some("pending") => settled = false,
                Some("confirmed") => {
                    let id = order["order_id"].as_str().expect("order id");
                    let payment = app.get(&format!("/payments/{id}")).await;
                    settled &= payment.status == 200 && payment.body["status"] == "captured";
                }
                _ => {}
            }
        }
        if settled {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}: the sagas never settled: {}",
            app.backend,
            page.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        read.wait_caught_up(Duration::from_secs(60))
            .await
            .expect("status"),
        "{:?}: the live read models caught up",
        app.backend
    );
}

async fn dump_all(app: &TestApp) -> Vec<Vec<Vec<String>>> {
    let read = app.read.as_ref().expect("read side");
    let mut tables = Vec::new();
    for (projection, table, order) in TABLES {
        tables.push(read.dump(projection, table, order).await.expect("dump"));
    }
    tables
}

/// A projection that applies `batches_left` batches, then fails as a lost database would.
struct BreaksOff {
    inner: Arc<dyn Projection>,
    batches_left: AtomicUsize,
}

#[async_trait::async_trait]
impl Projection for BreaksOff {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        self.inner.aggregate_types()
    }

    fn migrations(&self) -> &'static projections::db::Migrations {
        self.inner.migrations()
    }

    async fn apply(&self, tx: &mut Tx, events: &[Event]) -> Result<(), ApplyError> {
        let left = self.batches_left.load(Ordering::SeqCst);
        if left == 0 {
            return Err(ApplyError::Db(DbError::Other(
                "the connection was lost".into(),
            )));
        }
        self.batches_left.store(left - 1, Ordering::SeqCst);
        self.inner.apply(tx, events).await
    }
}

/// The live read model's indexes (name and definition), primary keys' included.
async fn indexes(app: &TestApp, projection: &str) -> Vec<(String, String)> {
    let db = app
        .read
        .as_ref()
        .expect("read side")
        .db(projection)
        .expect("live db");
    let sql = if db.is_postgres() {
        "SELECT indexname::text AS name, indexdef AS definition FROM pg_indexes
         WHERE schemaname = current_schema() ORDER BY indexname"
    } else {
        "SELECT name, COALESCE(sql, '') AS definition FROM sqlite_master
         WHERE type = 'index' ORDER BY name"
    };
    db.fetch_all(sql, &[])
        .await
        .expect("listing indexes")
        .iter()
        .map(|row| (row.text("name"), row.text("definition")))
        .collect()
}

async fn run(app: &TestApp, projection: &str, options: &ReplayOptions) -> ReplayReport {
    let read = app.read.as_ref().expect("read side");
    let mut progress_calls = 0;
    let report = replay::replay(
        &read.log(),
        &read_backend(app),
        &app.settings.store.topic_prefix,
        read.db(projection).expect("live db"),
        read.projection(projection).expect("projection"),
        options,
        &mut |_| progress_calls += 1,
    )
    .await
    .unwrap_or_else(|error| panic!("{:?}: replaying {projection}: {error}", app.backend));
    assert!(progress_calls > 0, "progress is reported");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_swapped_in_equals_the_live_read_models_row_for_row_and_the_live_worker_goes_on() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        make_history(&app).await;
        settle(&app).await;
        let before = dump_all(&app).await;
        assert!(!before[5].is_empty(), "{backend:?}: the audit has events");

        let on_hand_before = app.get("/inventory/SKU-R1").await.expect(200)["on_hand"]
            .as_i64()
            .expect("on hand");
        for projection in ["orders", "inventory", "payments", "audit"] {
            let indexes_before = indexes(&app, projection).await;
            let report = run(&app, projection, &ReplayOptions::default()).await;
            assert!(report.swapped, "{backend:?}: {projection} swapped in");
            assert!(report.read > 0, "{backend:?}: {projection} read the log");
            // The shadow's secondary indexes are dropped while it loads: they are back.
            assert_eq!(
                indexes(&app, projection).await,
                indexes_before,
                "{backend:?}: {projection} has the same indexes after the swap"
            );
        }
        let after = dump_all(&app).await;
        for ((_, table, _), (before, after)) in TABLES.iter().zip(before.iter().zip(&after)) {
            assert_eq!(
                before, after,
                "{backend:?}: {table} row for row after the swap"
            );
        }

        // The live worker goes on from the swapped positions: a new command shows up.
        let receipt = app.receive("SKU-R1", 5).await;
        let token = receipt.expect(200)["consistency_token"]
            .as_str()
            .expect("token")
            .to_owned();
        let stock = app.get(&format!("/inventory/SKU-R1?after={token}")).await;
        let stock = stock.expect(200);
        assert_eq!(
            stock["on_hand"].as_i64().expect("on hand") - on_hand_before,
            5,
            "{backend:?}: the receipt after the swap was applied once"
        );

        // Running it again (nothing new) is harmless.
        let again = run(&app, "inventory", &ReplayOptions::default()).await;
        assert!(again.swapped);
        settle(&app).await;
        let reply = app.get("/inventory/SKU-R1").await;
        assert_eq!(
            reply.expect(200)["on_hand"],
            stock["on_hand"],
            "{backend:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_replay_resumes_when_run_again_and_swaps_in_a_whole_read_model() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        make_history(&app).await;
        settle(&app).await;
        let read = app.read.as_ref().expect("read side");
        let before = dump_all(&app).await;
        let indexes_before = indexes(&app, "audit").await;

        // A replay of the audit model in batches of one record that breaks off at its third
        // batch (a database gone, the operator's Ctrl-C): two batches are in the shadow.
        let interrupted = replay::replay(
            &read.log(),
            &read_backend(&app),
            &app.settings.store.topic_prefix,
            read.db("audit").expect("live db"),
            Arc::new(BreaksOff {
                inner: read.projection("audit").expect("projection"),
                batches_left: AtomicUsize::new(2),
            }),
            &ReplayOptions {
                batch: 1,
                ..ReplayOptions::default()
            },
            &mut |_| {},
        )
        .await;
        assert!(
            interrupted.is_err(),
            "{backend:?}: the first run broke off: {interrupted:?}"
        );

        let report = run(&app, "audit", &ReplayOptions::default()).await;
        assert!(
            report.resumed,
            "{backend:?}: the second run resumed the first"
        );
        assert!(report.swapped, "{backend:?}: and swapped the shadow in");
        assert_eq!(
            dump_all(&app).await,
            before,
            "{backend:?}: every read model row for row after the resumed replay"
        );
        assert_eq!(
            indexes(&app, "audit").await,
            indexes_before,
            "{backend:?}: the audit model has every index after the resumed replay"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_reports_a_deliberately_corrupted_row_and_exits_non_zero() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        make_history(&app).await;
        settle(&app).await;
        let read = app.read.as_ref().expect("read side");

        let clean = run(
            &app,
            "inventory",
            &ReplayOptions {
                diff: true,
                ..ReplayOptions::default()
            },
        )
        .await;
        assert!(
            clean.differences.is_empty(),
            "{backend:?}: a healthy model has no differences: {:?}",
            clean.differences
        );
        assert!(!clean.swapped, "a diff swaps nothing");

        read.db("inventory")
            .expect("db")
            .execute(
                "UPDATE stock_levels SET on_hand = on_hand + 1000 WHERE sku = 'SKU-R2'",
                &[],
            )
            .await
            .expect("corrupt a row");
        let corrupted = run(
            &app,
            "inventory",
            &ReplayOptions {
                diff: true,
                ..ReplayOptions::default()
            },
        )
        .await;
        assert_eq!(corrupted.differences.len(), 1, "{backend:?}: {corrupted:?}");
        let difference = &corrupted.differences[0];
        assert_eq!(difference.table, "stock_levels");
        assert_eq!(difference.key, "sku=SKU-R2");
        let live = difference.live.as_ref().expect("live row");
        let rebuilt = difference.replay.as_ref().expect("rebuilt row");
        assert_eq!(
            live["on_hand"].parse::<i64>().expect("number")
                - rebuilt["on_hand"].parse::<i64>().expect("number"),
            1000
        );

        // The command line says so too, and fails.
        let mut command = operator_command(
            &app.settings,
            &["replay", "--diff", "--projection", "inventory"],
        );
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("join")
            .expect("run platform replay");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            !output.status.success(),
            "{backend:?}: --diff exits non-zero on a difference; stdout: {stdout}"
        );
        assert!(
            stdout.contains("stock_levels [sku=SKU-R2]"),
            "{backend:?}: the row is printed: {stdout}"
        );

        // A replay repairs it.
        run(&app, "inventory", &ReplayOptions::default()).await;
        let repaired = run(
            &app,
            "inventory",
            &ReplayOptions {
                diff: true,
                ..ReplayOptions::default()
            },
        )
        .await;
        assert!(repaired.differences.is_empty(), "{backend:?}: {repaired:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_counts_per_event_type_what_a_filtered_replay_would_apply_and_writes_nothing() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        let order_id = make_history(&app).await;
        settle(&app).await;
        let before = dump_all(&app).await;

        let all = run(
            &app,
            "audit",
            &ReplayOptions {
                dry_run: true,
                ..ReplayOptions::default()
            },
        )
        .await;
        assert_eq!(
            all.applied as usize,
            before[5].len(),
            "{backend:?}: one audit row per effective event"
        );
        assert_eq!(
            all.by_type.get("stock.received"),
            Some(&3),
            "{backend:?}: {all:?}"
        );

        let one = run(
            &app,
            "audit",
            &ReplayOptions {
                dry_run: true,
                filter: Filter {
                    aggregate_id: Some(order_id.clone()),
                    event_types: vec!["order.placed".into(), "order.cancelled".into()],
                    ..Filter::default()
                },
                ..ReplayOptions::default()
            },
        )
        .await;
        assert_eq!(one.applied, 2, "{backend:?}: {one:?}");
        assert_eq!(one.by_type.get("order.cancelled"), Some(&1));

        // A filtered replay cannot replace a read model.
        let read = app.read.as_ref().expect("read side");
        let refused = replay::replay(
            &read.log(),
            &read_backend(&app),
            &app.settings.store.topic_prefix,
            read.db("audit").expect("db"),
            read.projection("audit").expect("projection"),
            &ReplayOptions {
                filter: Filter {
                    aggregate_id: Some(order_id.clone()),
                    ..Filter::default()
                },
                ..ReplayOptions::default()
            },
            &mut |_| {},
        )
        .await;
        assert!(refused.is_err(), "{backend:?}");
        assert_eq!(dump_all(&app).await, before, "{backend:?}: nothing written");
    }
}
