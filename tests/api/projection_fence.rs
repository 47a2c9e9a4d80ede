//! Projection workers judge against what the database holds, never against their own memory:
//! a worker that lost its partition (a rebalance, a pause past the session timeout, a replay
//! swap) and then commits applies nothing another worker applied, and a stored position beyond
//! the log's end stops its partition with an error that says how to recover.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use domain::Quantity;
use domain::stock::{StockAggregate, StockEvent, StockReceived};
use event_log::{LogRecord, SharedLog, partition_for, topics};
use event_schema::{CommandMeta, Envelope, Record};
use projections::ReadBackend;
use projections::db::Db;
use projections::models::inventory::Inventory;
use projections::replay::{self, ReplayOptions};
use projections::runtime::{Worker, WorkerState, migrate};
use tokio::sync::watch;

use crate::helpers::{Backend, TestApp, backends, open_log, settings};

/// SKUs whose receipts the tests write, interleaved, to one partition.
const SKUS: [&str; 2] = ["SKU-F1", "SKU-F2"];

/// A log with one single-partition stock topic and an inventory database, both fresh.
struct Fixture {
    backend: Backend,
    log: SharedLog,
    topic: String,
    settings: platform::Settings,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn new(backend: Backend) -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let settings = settings(backend, dir.path());
        let log = open_log(backend, &settings).await;
        let topic = topics::events(&settings.store.topic_prefix, "stock");
        log.ensure_topic(&topic, 1).await.expect("create the topic");
        Fixture {
            backend,
            log,
            topic,
            settings,
            _dir: dir,
        }
    }

    /// A fresh inventory database (its own SQLite file or Postgres schema), migrated.
    async fn database(&self) -> Db {
        let unique = &uuid::Uuid::new_v4().simple().to_string()[..12];
        let db = match self.backend {
            Backend::Embedded => Db::sqlite(
                &self
                    .settings
                    .store
                    .data_dir
                    .join(format!("inventory-{unique}.db")),
            )
            .await
            .expect("sqlite"),
            Backend::Kafka => Db::postgres(
                self.settings.store.database_url.as_deref().expect("url"),
                &format!("{}{unique}_inventory", self.settings.store.schema_prefix),
                4,
            )
            .await
            .expect("postgres"),
        };
        migrate(&db, &Inventory).await.expect("migrate");
        db
    }

    fn worker(&self, db: &Db, group: &str) -> Worker {
        Worker {
            log: self.log.clone(),
            db: db.clone(),
            projection: Arc::new(Inventory),
            topics: vec![self.topic.clone()],
            group: Arc::new(event_log::shared::SharedGroup::new(
                self.log.clone(),
                group,
                vec![self.topic.clone()],
            )),
            state: Arc::new(WorkerState::default()),
        }
    }

    /// Appends receipts `first..first + count` (receipt `n` of the run is `n` units), the SKUs
    /// taking turns, each SKU's versions following on from `versions`.
    async fn receive(&self, first: u64, count: u64, versions: &mut [u64; 2]) {
        for n in first..first + count {
            let which = (n % 2) as usize;
            versions[which] += 1;
            let event = StockEvent::Received(StockReceived {
                quantity: Quantity::new(n as u32 + 1).expect("quantity"),
            });
            let envelope = Envelope::new::<StockAggregate>(
                SKUS[which],
                versions[which],
                &event,
                &CommandMeta::new("test"),
                Utc::now(),
            );
            self.log
                .append(&self.topic, 0, Record::from(&envelope))
                .await
                .expect("append");
        }
    }

    /// The partition's records `from..to`, read back from the log.
    async fn records(&self, from: u64, to: u64) -> Vec<LogRecord> {
        let mut reader = self
            .log
            .reader(&self.topic, &[(0, from)])
            .await
            .expect("reader");
        let mut records: Vec<LogRecord> = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while (records.len() as u64) < to - from {
            assert!(tokio::time::Instant::now() < deadline, "the log answers");
            records.extend(
                reader
                    .poll(1000, Duration::from_millis(200))
                    .await
                    .expect("poll"),
            );
        }
        records.truncate((to - from) as usize);
        records
    }
}

/// The units received by each SKU in receipts `0..count` (receipt `n` is `n + 1` units).
fn expected_on_hand(count: u64) -> Vec<i64> {
    let mut on_hand = vec![0i64; SKUS.len()];
    for n in 0..count {
        on_hand[(n % 2) as usize] += n as i64 + 1;
    }
    on_hand
}

/// Each SKU's on-hand stock in `db` (0 when it has no row).
async fn on_hand(db: &Db) -> Vec<i64> {
    let mut levels = Vec::new();
    for sku in SKUS {
        let row = db
            .fetch_optional(
                "SELECT on_hand FROM stock_levels WHERE sku = $1",
                &[sku.into()],
            )
            .await
            .expect("stock level");
        levels.push(row.map_or(0, |row| row.int("on_hand")));
    }
    levels
}

async fn dump(db: &Db) -> Vec<String> {
    db.fetch_all(
        "SELECT sku, on_hand, reserved, available, version FROM stock_levels ORDER BY sku",
        &[],
    )
    .await
    .expect("stock levels")
    .iter()
    .map(|row| format!("{:?}", row.columns))
    .collect()
}

/// The stock levels a single worker builds from receipts `0..count` on a fresh database.
async fn fresh_replay(fixture: &Fixture, count: u64) -> Vec<String> {
    let db = fixture.database().await;
    fixture
        .worker(&db, "unused")
        .apply_batch(&fixture.records(0, count).await)
        .await
        .expect("replay");
    dump(&db).await
}

async fn stored_position(db: &Db) -> Option<u64> {
    db.fetch_optional(
        "SELECT next_offset FROM projection_positions WHERE projection = 'inventory'",
        &[],
    )
    .await
    .expect("position")
    .map(|row| row.int("next_offset") as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_lost_its_partition_applies_nothing_another_worker_applied() {
    for backend in backends() {
        let fixture = Fixture::new(backend).await;
        let mut versions = [0; 2];
        fixture.receive(0, 30, &mut versions).await;
        let records = fixture.records(0, 30).await;
        let db = fixture.database().await;
        let (a, b) = (fixture.worker(&db, "unused"), fixture.worker(&db, "unused"));

        // A applies the first ten records and remembers both SKUs' versions. Then the partition
        // moves to B (A paused past the session timeout), which applies the next ten.
        a.apply_batch(&records[..10]).await.expect("A: 0..10");
        b.apply_batch(&records[10..20]).await.expect("B: 10..20");
        assert_eq!(b.state.applied(), 10, "{backend:?}: B applied its batch");

        // A wakes up and commits the batch it had polled, which overlaps B's: only the five
        // records nobody applied count.
        let applied = a.state.applied();
        a.apply_batch(&records[10..25])
            .await
            .expect("A: 10..25, again");
        assert_eq!(
            a.state.applied() - applied,
            5,
            "{backend:?}: A applied only 20..25"
        );
        assert_eq!(
            on_hand(&db).await,
            expected_on_hand(25),
            "{backend:?}: every receipt counted once"
        );
        assert_eq!(stored_position(&db).await, Some(25), "{backend:?}");

        // B goes on; A, behind again, commits a batch B has wholly applied: nothing.
        b.apply_batch(&records[25..30]).await.expect("B: 25..30");
        let applied = a.state.applied();
        a.apply_batch(&records[25..30])
            .await
            .expect("A: 25..30, again");
        assert_eq!(
            a.state.applied(),
            applied,
            "{backend:?}: A applied nothing B had applied"
        );
        assert_eq!(
            on_hand(&db).await,
            expected_on_hand(30),
            "{backend:?}: every receipt counted once"
        );
        assert_eq!(
            dump(&db).await,
            fresh_replay(&fixture, 30).await,
            "{backend:?}: the read model equals a fresh replay"
        );
        assert_eq!(stored_position(&db).await, Some(30), "{backend:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_committing_the_same_records_at_once_apply_each_once() {
    for backend in backends() {
        let fixture = Fixture::new(backend).await;
        let db = fixture.database().await;
        let (a, b) = (fixture.worker(&db, "unused"), fixture.worker(&db, "unused"));
        let mut versions = [0; 2];
        for round in 0..8 {
            // Both hold the same batch (one of them a zombie) and commit it at the same time:
            // one claim waits for the other's transaction, then finds the position moved.
            fixture.receive(round * 10, 10, &mut versions).await;
            let records = fixture.records(round * 10, round * 10 + 10).await;
            let (first, second) = tokio::join!(a.apply_batch(&records), b.apply_batch(&records));
            first.expect("A");
            second.expect("B");
            assert_eq!(
                a.state.applied() + b.state.applied(),
                (round + 1) * 10,
                "{backend:?}: round {round}: each record applied by one worker"
            );
        }
        assert_eq!(on_hand(&db).await, expected_on_hand(80), "{backend:?}");
        assert_eq!(
            dump(&db).await,
            fresh_replay(&fixture, 80).await,
            "{backend:?}: the read model equals a fresh replay"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_stored_position_moved_back_reads_the_log_again_from_there() {
    for backend in backends() {
        let fixture = Fixture::new(backend).await;
        let mut versions = [0; 2];
        fixture.receive(0, 20, &mut versions).await;
        let db = fixture.database().await;
        let worker = fixture.worker(
            &db,
            &format!("{}.fence", fixture.settings.store.topic_prefix),
        );
        let (stop, stopped) = watch::channel(false);
        let running = tokio::spawn(worker.run(stopped));
        let wait_for = |target: u64, what: &'static str| {
            let db = db.clone();
            async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                while stored_position(&db).await != Some(target) {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{backend:?}: {what}: the worker reached {:?}, not {target}",
                        stored_position(&db).await
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        wait_for(20, "caught up").await;
        assert_eq!(on_hand(&db).await, expected_on_hand(20), "{backend:?}");

        // The read model is replaced by a rebuild that stands at offset 10 (what a replay swap
        // does when the live position was beyond what it could rebuild), while the worker
        // remembers offset 20 and the versions it wrote there.
        for table in ["stock_levels", "applied_versions", "projection_positions"] {
            db.execute(&format!("DELETE FROM {table}"), &[])
                .await
                .expect("clear");
        }
        fixture
            .worker(&db, "unused")
            .apply_batch(&fixture.records(0, 10).await)
            .await
            .expect("rebuild up to 10");
        assert_eq!(stored_position(&db).await, Some(10), "{backend:?}");

        // New records: the worker must read the log again from the stored position, not go on
        // from where its memory says it was.
        fixture.receive(20, 5, &mut versions).await;
        wait_for(25, "after the rewind").await;
        let _ = stop.send(true);
        running.await.expect("the worker stopped");
        assert_eq!(
            on_hand(&db).await,
            expected_on_hand(25),
            "{backend:?}: every receipt counted once, none skipped"
        );
        assert_eq!(
            dump(&db).await,
            fresh_replay(&fixture, 25).await,
            "{backend:?}: the read model equals a fresh replay"
        );
    }
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_position_beyond_the_log_end_stops_its_partition_until_a_replay_rebuilds_it() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        let sku = "SKU-BEYOND";
        app.receive(sku, 3).await.expect(200);
        app.receive(sku, 4).await.expect(200);
        let read = app.read.clone().expect("read side");
        assert!(
            read.wait_caught_up(Duration::from_secs(60))
                .await
                .expect("status"),
            "{backend:?}: caught up"
        );

        // The log loses its tail (or the topic is recreated under the same prefix): the stored
        // position of the SKU's partition is now beyond the log's end. The platform restarts.
        let topic = topics::events(&app.settings.store.topic_prefix, "stock");
        let partition = partition_for(sku, app.settings.partitions);
        let end = app
            .log()
            .await
            .end_offset(&topic, partition)
            .await
            .expect("end");
        let beyond = end + 100;
        let db = read.db("inventory").expect("inventory db").clone();
        let (settings, dir) = app.stop().await;
        db.execute(
            "UPDATE projection_positions SET next_offset = $1
             WHERE projection = 'inventory' AND topic = $2 AND partition = $3",
            &[beyond.into(), topic.as_str().into(), partition.into()],
        )
        .await
        .expect("move the position beyond the end");
        let app = TestApp::spawn_with(backend, settings, dir).await;

        // Not ready, saying which projection, topic, partition and offsets, and what to run.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let problems = loop {
            let ready = app.get("/health/ready").await;
            if ready.status == 503 {
                break ready.body["problems"].to_string();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{backend:?}: still ready: {}",
                ready.body
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for part in [
            "inventory",
            topic.as_str(),
            &format!("partition {partition}"),
            &beyond.to_string(),
            &end.to_string(),
            "platform replay --projection inventory",
        ] {
            assert!(
                problems.contains(part),
                "{backend:?}: the problem names {part:?}: {problems}"
            );
        }

        // Nothing of that partition is applied, even as it grows.
        app.receive(sku, 5).await.expect(200);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            app.get(&format!("/inventory/{sku}")).await.expect(200)["on_hand"],
            7,
            "{backend:?}: the new receipt is not applied behind a position beyond the end"
        );
        let read = app.read.clone().expect("read side");
        let db = read.db("inventory").expect("inventory db").clone();
        let stored = db
            .fetch_optional(
                "SELECT next_offset FROM projection_positions
                 WHERE projection = 'inventory' AND topic = $1 AND partition = $2",
                &[topic.as_str().into(), partition.into()],
            )
            .await
            .expect("position")
            .map(|row| row.int("next_offset") as u64);
        assert_eq!(
            stored,
            Some(beyond),
            "{backend:?}: the position did not move"
        );

        // The documented recovery: rebuild from the log. The worker goes on from the rebuild.
        let report = replay::replay(
            &read.log(),
            &read_backend(&app),
            &app.settings.store.topic_prefix,
            &db,
            read.projection("inventory").expect("projection"),
            &ReplayOptions {
                restart: true,
                ..ReplayOptions::default()
            },
            &mut |_| {},
        )
        .await
        .unwrap_or_else(|error| panic!("{backend:?}: replaying inventory: {error}"));
        assert!(report.swapped, "{backend:?}: swapped in");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ready = app.get("/health/ready").await;
            if ready.status == 200 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{backend:?}: not ready after the rebuild: {}",
                ready.body
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        app.receive(sku, 6).await.expect(200);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let stock = app.get(&format!("/inventory/{sku}")).await;
            if stock.status == 200 && stock.body["on_hand"] == 18 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{backend:?}: the receipts after the rebuild are applied once: {}",
                stock.body
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
/// The worker's own check, without a platform around it: a partition whose stored position is
/// beyond the log's end is not started, and the worker says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_does_not_start_a_partition_whose_stored_position_is_beyond_the_log_end() {
    for backend in backends() {
        let fixture = Fixture::new(backend).await;
        let mut versions = [0; 2];
        fixture.receive(0, 4, &mut versions).await;
        let db = fixture.database().await;
        db.execute(
            "INSERT INTO projection_positions (projection, topic, partition, next_offset, updated_at)
             VALUES ('inventory', $1, 0, 40, 0)",
            &[fixture.topic.as_str().into()],
        )
        .await
        .expect("a position beyond the end");
        let worker = fixture.worker(
            &db,
            &format!("{}.beyond", fixture.settings.store.topic_prefix),
        );
        let state = worker.state.clone();
        let (stop, stopped) = watch::channel(false);
        let running = tokio::spawn(worker.run(stopped));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let problems = loop {
            let problems = state.problems();
            if !problems.is_empty() {
                break problems.join("\n");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{backend:?}: the worker never reported the position beyond the end"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        for part in [
            "inventory",
            fixture.topic.as_str(),
            "partition 0",
            "40",
            "4",
        ] {
            assert!(
                problems.contains(part),
                "{backend:?}: the problem names {part:?}: {problems}"
            );
        }
        fixture.receive(4, 40, &mut versions).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let _ = stop.send(true);
        running.await.expect("the worker stopped");
        assert_eq!(state.applied(), 0, "{backend:?}: nothing applied");
        assert_eq!(on_hand(&db).await, vec![0, 0], "{backend:?}");
        assert_eq!(stored_position(&db).await, Some(40), "{backend:?}");
    }
}

/// The same check when the stored position jumps beyond the end under a running worker: its
/// next batch fails its claim, and the partition stops instead of going on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_worker_stops_a_partition_whose_stored_position_jumped_beyond_the_log_end() {
    for backend in backends() {
        let fixture = Fixture::new(backend).await;
        let mut versions = [0; 2];
        fixture.receive(0, 10, &mut versions).await;
        let db = fixture.database().await;
        let worker = fixture.worker(
            &db,
            &format!("{}.jump", fixture.settings.store.topic_prefix),
        );
        let state = worker.state.clone();
        let (stop, stopped) = watch::channel(false);
        let running = tokio::spawn(worker.run(stopped));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while stored_position(&db).await != Some(10) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{backend:?}: caught up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        db.execute(
            "UPDATE projection_positions SET next_offset = 90 WHERE projection = 'inventory'",
            &[],
        )
        .await
        .expect("a position beyond the end");
        fixture.receive(10, 5, &mut versions).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let problems = loop {
            let problems = state.problems();
            if !problems.is_empty() {
                break problems.join("\n");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{backend:?}: the worker never reported the position beyond the end"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            problems.contains("offset 90, beyond the log's end at offset 15"),
            "{backend:?}: {problems}"
        );
        fixture.receive(15, 5, &mut versions).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = stop.send(true);
        running.await.expect("the worker stopped");
        assert_eq!(
            state.applied(),
            10,
            "{backend:?}: nothing applied after the jump"
        );
        assert_eq!(on_hand(&db).await, expected_on_hand(10), "{backend:?}");
        assert_eq!(stored_position(&db).await, Some(90), "{backend:?}");
    }
}
