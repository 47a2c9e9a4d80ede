//! The contract every event-log backend keeps, run against each of them: the embedded SQLite
//! log always, and Kafka when `TEST_KAFKA_BROKERS` names a broker (`scripts/test.sh` starts
//! one; with `TEST_REQUIRE_BACKENDS=1` a missing broker fails the suite instead of skipping).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use domain::Quantity;
use domain::stock::{StockAggregate, StockEvent, StockReceived};
use event_log::embedded::EmbeddedLog;
use event_log::kafka::{KafkaLog, KafkaSettings};
use event_log::{LogRecord, Position, SharedLog, partition_for};
use event_schema::{CommandMeta, EffectiveHistory, Envelope, Record, Verdict};

struct Backend {
    name: &'static str,
    log: SharedLog,
    /// Opens a second, independent client of the same log (a restart, or another process).
    reopen: Box<dyn Fn() -> futures_lite::BoxedLog + Send + Sync>,
    _dir: Option<tempfile::TempDir>,
}

mod futures_lite {
    use std::future::Future;
    use std::pin::Pin;

    pub type BoxedLog = Pin<Box<dyn Future<Output = super::SharedLog> + Send>>;
}

async fn backends() -> Vec<Backend> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("log.db");
    let embedded: SharedLog = Arc::new(EmbeddedLog::open(&path).await.expect("open embedded log"));
    let reopen_path = path.clone();
    let mut backends = vec![Backend {
        name: "embedded",
        log: embedded,
        reopen: Box::new(move || {
            let path = reopen_path.clone();
            Box::pin(async move {
                Arc::new(EmbeddedLog::open(&path).await.expect("reopen embedded log")) as SharedLog
            })
        }),
        _dir: Some(dir),
    }];
    match std::env::var("TEST_KAFKA_BROKERS") {
        Ok(brokers) => {
            let connect = move || {
                let brokers = brokers.clone();
                Box::pin(async move {
                    Arc::new(
                        KafkaLog::connect(KafkaSettings::new(brokers))
                            .await
                            .expect("connect to the test broker"),
                    ) as SharedLog
                }) as futures_lite::BoxedLog
            };
            backends.push(Backend {
                name: "kafka",
                log: connect().await,
                reopen: Box::new(connect),
                _dir: None,
            });
        }
        Err(_) if std::env::var("TEST_REQUIRE_BACKENDS").is_ok_and(|v| v == "1") => {
            panic!("TEST_REQUIRE_BACKENDS=1 but TEST_KAFKA_BROKERS is not set")
        }
        Err(_) => eprintln!("TEST_KAFKA_BROKERS not set: the Kafka backend is skipped"),
    }
    backends
}

fn unique_topic(name: &str) -> String {
    format!("contract-{}.{name}", uuid::Uuid::new_v4().simple())
}

fn stock_record(sku: &str, version: u64) -> (Envelope, Record) {
    let event = StockEvent::Received(StockReceived {
        quantity: Quantity::new(1).expect("quantity"),
    });
    let envelope = Envelope::new::<StockAggregate>(
        sku,
        version,
        &event,
        &CommandMeta::new("test"),
        Utc::now(),
    );
    let record = Record::from(&envelope);
    (envelope, record)
}

/// Reads everything from the given start positions until `count` records arrived.
async fn read_all(
    log: &SharedLog,
    topic: &str,
    start: &[(u32, u64)],
    count: usize,
) -> Vec<LogRecord> {
    let mut reader = log.reader(topic, start).await.expect("open reader");
    let mut records = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while records.len() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {count} records arrived",
            records.len()
        );
        records.extend(
            reader
                .poll(500, Duration::from_millis(200))
                .await
                .expect("poll"),
        );
    }
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_one_key_keep_their_order_and_positions_are_contiguous() {
    for backend in backends().await {
        let log = &backend.log;
        let topic = unique_topic("events");
        assert_eq!(log.ensure_topic(&topic, 4).await.expect("create topic"), 4);

        let keys: Vec<String> = (0..6).map(|i| format!("SKU-{i}")).collect();
        let mut writers = Vec::new();
        for key in keys.clone() {
            let log = log.clone();
            let topic = topic.clone();
            writers.push(tokio::spawn(async move {
                let mut positions = Vec::new();
                for version in 1..=20 {
                    let (_, record) = stock_record(&key, version);
                    let partition = partition_for(&key, 4);
                    positions.push(log.append(&topic, partition, record).await.expect("append"));
                }
                positions
            }));
        }
        let mut acknowledged = Vec::new();
        for writer in writers {
            acknowledged.extend(writer.await.expect("writer task"));
        }

        let start: Vec<(u32, u64)> = (0..4).map(|partition| (partition, 0)).collect();
        let records = read_all(log, &topic, &start, 120).await;
        let mut versions: HashMap<String, Vec<u64>> = HashMap::new();
        let mut offsets: HashMap<u32, Vec<u64>> = HashMap::new();
        for record in &records {
            let envelope = Envelope::try_from(&record.record).expect("decode");
            assert_eq!(
                record.position.partition,
                partition_for(&envelope.aggregate_id, 4)
            );
            versions
                .entry(envelope.aggregate_id)
                .or_default()
                .push(envelope.aggregate_version);
            offsets
                .entry(record.position.partition)
                .or_default()
                .push(record.position.offset);
        }
        for key in &keys {
            assert_eq!(
                versions[key],
                (1..=20).collect::<Vec<_>>(),
                "{}: order of {key}",
                backend.name
            );
        }
        for (partition, offsets) in &offsets {
            let expected: Vec<u64> = (0..offsets.len() as u64).collect();
            assert_eq!(
                offsets, &expected,
                "{}: offsets of partition {partition}",
                backend.name
            );
            assert_eq!(
                log.end_offset(&topic, *partition)
                    .await
                    .expect("end offset"),
                offsets.len() as u64
            );
        }
        let read_positions: Vec<&Position> =
            records.iter().map(|record| &record.position).collect();
        for position in &acknowledged {
            assert!(
                read_positions.contains(&position),
                "{}: acknowledged {position} not read back",
                backend.name
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_starts_exactly_at_the_position_it_is_given() {
    for backend in backends().await {
        let log = &backend.log;
        let topic = unique_topic("events");
        log.ensure_topic(&topic, 1).await.expect("create topic");
        for version in 1..=10 {
            let (_, record) = stock_record("SKU-1", version);
            log.append(&topic, 0, record).await.expect("append");
        }
        let records = read_all(log, &topic, &[(0, 7)], 3).await;
        let offsets: Vec<u64> = records
            .iter()
            .map(|record| record.position.offset)
            .collect();
        assert_eq!(offsets, vec![7, 8, 9], "{}", backend.name);
        let mut reader = log
            .reader(&topic, &[(0, 10)])
            .await
            .expect("reader at the end");
        assert!(
            reader
                .poll(10, Duration::from_millis(300))
                .await
                .expect("poll")
                .is_empty(),
            "{}: nothing past the end",
            backend.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_an_existing_topic_keeps_its_partitions_and_unknown_ones_are_errors() {
    for backend in backends().await {
        let log = &backend.log;
        let topic = unique_topic("events");
        assert_eq!(log.ensure_topic(&topic, 3).await.expect("create"), 3);
        assert_eq!(
            log.ensure_topic(&topic, 8).await.expect("create again"),
            3,
            "{}",
            backend.name
        );
        assert_eq!(log.partition_count(&topic).await.expect("count"), 3);
        let missing = unique_topic("missing");
        assert!(
            log.partition_count(&missing).await.is_err(),
            "{}",
            backend.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_appends_all_land_once() {
    for backend in backends().await {
        let log = &backend.log;
        let topic = unique_topic("events");
        log.ensure_topic(&topic, 2).await.expect("create topic");
        let appends = (0..500u64).map(|i| {
            let log = log.clone();
            let topic = topic.clone();
            tokio::spawn(async move {
                let key = format!("SKU-{i}");
                let (envelope, record) = stock_record(&key, 1);
                let position = log
                    .append(&topic, partition_for(&key, 2), record)
                    .await
                    .expect("append");
                (envelope.event_id, position)
            })
        });
        let mut acknowledged = HashMap::new();
        for append in appends.collect::<Vec<_>>() {
            let (event_id, position) = append.await.expect("append task");
            assert!(
                acknowledged.insert(position, event_id).is_none(),
                "two appends at one position"
            );
        }
        let records = read_all(log, &topic, &[(0, 0), (1, 0)], 500).await;
        assert_eq!(records.len(), 500, "{}: no record twice", backend.name);
        for record in records {
            let envelope = Envelope::try_from(&record.record).expect("decode");
            assert_eq!(
                acknowledged.get(&record.position),
                Some(&envelope.event_id),
                "{}",
                backend.name
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_survive_a_restart_and_appends_continue_after_them() {
    for backend in backends().await {
        let topic = unique_topic("events");
        backend
            .log
            .ensure_topic(&topic, 1)
            .await
            .expect("create topic");
        for version in 1..=3 {
            let (_, record) = stock_record("SKU-1", version);
            backend.log.append(&topic, 0, record).await.expect("append");
        }
        let reopened = (backend.reopen)().await;
        assert_eq!(reopened.partition_count(&topic).await.expect("count"), 1);
        assert_eq!(
            reopened.end_offset(&topic, 0).await.expect("end"),
            3,
            "{}",
            backend.name
        );
        let (_, record) = stock_record("SKU-1", 4);
        let position = reopened
            .append(&topic, 0, record)
            .await
            .expect("append after reopen");
        assert_eq!(position.offset, 3, "{}", backend.name);
        assert_eq!(read_all(&reopened, &topic, &[(0, 0)], 4).await.len(), 4);
    }
}

/// A writer in the style of the command side: decide against its own view, append, then tail
/// the partition until its own record is judged, and acknowledge only if it became effective.
async fn write_and_confirm(
    log: SharedLog,
    topic: String,
    start: u64,
    sku: &str,
    version: u64,
) -> (uuid::Uuid, bool) {
    let (envelope, record) = stock_record(sku, version);
    log.append(&topic, 0, record).await.expect("append");
    let mut reader = log.reader(&topic, &[(0, start)]).await.expect("reader");
    let mut history = EffectiveHistory::new();
    loop {
        for record in reader
            .poll(100, Duration::from_millis(200))
            .await
            .expect("poll")
        {
            let read = Envelope::try_from(&record.record).expect("decode");
            let verdict = history.observe(&read.aggregate_id, read.aggregate_version);
            if read.event_id == envelope.event_id {
                return (envelope.event_id, verdict == Verdict::Effective);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_writers_of_one_version_agree_with_every_reader_on_the_winner() {
    for backend in backends().await {
        let topic = unique_topic("events");
        backend
            .log
            .ensure_topic(&topic, 1)
            .await
            .expect("create topic");
        let (_, first) = stock_record("SKU-1", 1);
        backend
            .log
            .append(&topic, 0, first)
            .await
            .expect("append v1");
        let second_client = (backend.reopen)().await;

        // Both writers believe the aggregate is at version 1 and write version 2 at once.
        for round in 0..5u64 {
            let version = 2 + round;
            let a = tokio::spawn(write_and_confirm(
                backend.log.clone(),
                topic.clone(),
                0,
                "SKU-1",
                version,
            ));
            let b = tokio::spawn(write_and_confirm(
                second_client.clone(),
                topic.clone(),
                0,
                "SKU-1",
                version,
            ));
            let (a, b) = (a.await.expect("writer a"), b.await.expect("writer b"));
            assert!(
                a.1 ^ b.1,
                "{}: exactly one writer acknowledges version {version}",
                backend.name
            );
            let winner = if a.1 { a.0 } else { b.0 };

            // Three independent readers, on two clients, agree on the history.
            let end = backend.log.end_offset(&topic, 0).await.expect("end offset");
            for log in [&backend.log, &second_client, &backend.log] {
                let records = read_all(log, &topic, &[(0, 0)], end as usize).await;
                let mut history = EffectiveHistory::new();
                let effective: Vec<(u64, uuid::Uuid)> = records
                    .iter()
                    .map(|record| Envelope::try_from(&record.record).expect("decode"))
                    .filter(|envelope| {
                        history
                            .observe(&envelope.aggregate_id, envelope.aggregate_version)
                            .is_effective()
                    })
                    .map(|envelope| (envelope.aggregate_version, envelope.event_id))
                    .collect();
                let versions: Vec<u64> = effective.iter().map(|(version, _)| *version).collect();
                assert_eq!(
                    versions,
                    (1..=version).collect::<Vec<_>>(),
                    "{}: gapless",
                    backend.name
                );
                assert_eq!(
                    effective.last().map(|(_, id)| *id),
                    Some(winner),
                    "{}: the acknowledged write is the effective one",
                    backend.name
                );
                assert_eq!(
                    history.skipped(),
                    round + 1,
                    "{}: each loser skipped",
                    backend.name
                );
            }
        }
    }
}

/// A member's view: which partitions it holds, and the records it got.
struct Member {
    member: Box<dyn event_log::GroupMember>,
    owned: std::collections::BTreeSet<(String, u32)>,
    records: Vec<LogRecord>,
}

impl Member {
    async fn join(log: &SharedLog, group: &str, topic: &str) -> Member {
        Member {
            member: log
                .join_group(group, &[topic.to_owned()])
                .await
                .expect("join group"),
            owned: Default::default(),
            records: Vec::new(),
        }
    }

    /// Joins a new group alone and polls until it owns `partitions` partitions (from 0).
    async fn join_owning(log: &SharedLog, topic: &str, partitions: usize, name: &str) -> Member {
        let group = format!("group-{}", uuid::Uuid::new_v4().simple());
        let mut member = Member::join(log, &group, topic).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while member.owned.len() < partitions {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}: never assigned"
            );
            member.step(0).await;
        }
        member
    }

    /// Polls once; starts newly assigned partitions at `start`.
    async fn step(&mut self, start: u64) {
        match self
            .member
            .poll(100, Duration::from_millis(100))
            .await
            .expect("poll")
        {
            event_log::GroupEvent::Assigned(partitions) => {
                for (topic, partition) in partitions {
                    // A partition revoked again before it started is skipped (its Revoked
                    // event follows).
                    if self.member.start(&topic, partition, start).await.is_ok() {
                        self.owned.insert((topic, partition));
                    }
                }
            }
            event_log::GroupEvent::Revoked(partitions) => {
                for partition in partitions {
                    self.owned.remove(&partition);
                }
            }
            event_log::GroupEvent::Records(records) => self.records.extend(records),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_split_the_partitions_and_take_over_when_one_leaves() {
    for backend in backends().await {
        let log = &backend.log;
        let topic = unique_topic("events");
        log.ensure_topic(&topic, 4).await.expect("create topic");
        for partition in 0..4 {
            for version in 1..=3 {
                let (_, record) = stock_record(&format!("SKU-{partition}"), version);
                log.append(&topic, partition, record).await.expect("append");
            }
        }
        let group = format!("group-{}", uuid::Uuid::new_v4().simple());
        let mut a = Member::join(log, &group, &topic).await;
        // Embedded groups live in one process (the embedded backend is single-node).
        let mut b = Member::join(log, &group, &topic).await;
        {
            let (a_ref, b_ref) = (&mut a, &mut b);
            let mut members = [a_ref, b_ref];
            let split = |members: &[&mut Member]| {
                let (x, y) = (&members[0].owned, &members[1].owned);
                x.len() + y.len() == 4 && x.is_disjoint(y) && !x.is_empty() && !y.is_empty()
            };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while !split(&members) {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{}: the members never split the partitions",
                    backend.name
                );
                for member in members.iter_mut() {
                    member.step(1).await;
                }
            }
        }
        // Nothing before the offset a member was told is ever delivered.
        for member in [&a, &b] {
            assert!(
                member
                    .records
                    .iter()
                    .all(|record| record.position.offset >= 1),
                "{}",
                backend.name
            );
        }
        // New records go to the owner of their partition, once.
        a.records.clear();
        b.records.clear();
        for partition in 0..4 {
            let (_, record) = stock_record(&format!("SKU-{partition}"), 4);
            log.append(&topic, partition, record).await.expect("append");
        }
        let fresh = |member: &Member| {
            member
                .records
                .iter()
                .filter(|record| record.position.offset == 3)
                .count()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while fresh(&a) + fresh(&b) < 4 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: new records not delivered",
                backend.name
            );
            a.step(1).await;
            b.step(1).await;
        }
        for member in [&a, &b] {
            for record in member
                .records
                .iter()
                .filter(|record| record.position.offset == 3)
            {
                assert!(
                    member
                        .owned
                        .contains(&(topic.clone(), record.position.partition)),
                    "{}: delivered to its owner",
                    backend.name
                );
            }
        }
        assert_eq!(
            fresh(&a) + fresh(&b),
            4,
            "{}: each new record once",
            backend.name
        );

        // b leaves; a takes over all four and reads b's partitions from where it is told.
        let b_partitions = b.owned.clone();
        drop(b);
        a.records.clear();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while a.owned.len() < 4 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: a never took over",
                backend.name
            );
            a.step(2).await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while a.records.len() < 2 * b_partitions.len() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: takeover records",
                backend.name
            );
            a.step(2).await;
        }
        let from_b: Vec<&LogRecord> = a
            .records
            .iter()
            .filter(|record| b_partitions.contains(&(topic.clone(), record.position.partition)))
            .collect();
        assert!(
            !from_b.is_empty(),
            "{}: a reads the partitions b left",
            backend.name
        );
        assert!(
            from_b.iter().all(|record| record.position.offset >= 2),
            "{}",
            backend.name
        );
    }
}

/// A member that has been idle for a while (on Kafka: its partitions paused, their ends
/// watched) still gets every record written meanwhile, by another client of the log too, in
/// order, none skipped, none twice; and promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_member_gets_every_record_written_by_anyone_promptly_and_once() {
    for backend in backends().await {
        let log = &backend.log;
        let other = (backend.reopen)().await;
        let topic = unique_topic("idle");
        log.ensure_topic(&topic, 2).await.expect("create topic");
        let mut member = Member::join_owning(log, &topic, 2, backend.name).await;
        let mut expected: HashMap<u32, u64> = HashMap::new();
        for round in 0..3u64 {
            // Quiet for longer than a member stays fetching without records.
            let quiet_until = tokio::time::Instant::now() + Duration::from_millis(1500);
            while tokio::time::Instant::now() < quiet_until {
                member.step(0).await;
            }
            // Written by another client (another process): nothing in this one says so.
            let writer = if round % 2 == 0 { &other } else { log };
            let written = tokio::time::Instant::now();
            for version in 1..=5 {
                let (_, record) = stock_record(&format!("SKU-{round}"), round * 10 + version);
                let position = writer.append(&topic, 1, record).await.expect("append");
                assert_eq!(position.offset, expected.get(&1).copied().unwrap_or(0));
                *expected.entry(1).or_default() += 1;
            }
            let want = expected[&1] as usize;
            while member.records.len() < want {
                assert!(
                    written.elapsed() < Duration::from_secs(5),
                    "{}: round {round}: {} of {want} records arrived after a quiet spell",
                    backend.name,
                    member.records.len()
                );
                member.step(0).await;
            }
        }
        let offsets: Vec<u64> = member
            .records
            .iter()
            .map(|record| record.position.offset)
            .collect();
        assert_eq!(
            offsets,
            (0..15).collect::<Vec<u64>>(),
            "{}: every record once, in order",
            backend.name
        );
    }
}

/// An idle member of a process that appends to its partition gets the record at once, not at
/// the next check of idle partitions' ends (by then up to `--kafka-idle-check-ms` apart): the
/// saga's relay and the command consumers of one process depend on it.
#[tokio::test]
async fn an_idle_member_gets_its_own_process_append_at_once() {
    for backend in backends().await {
        let log = &backend.log;
        let topic = unique_topic("idle-own");
        log.ensure_topic(&topic, 2).await.expect("create topic");
        let mut member = Member::join_owning(log, &topic, 2, backend.name).await;
        let mut slowest = Duration::ZERO;
        for round in 0..3u64 {
            // Quiet long enough for the checks of idle ends to be a second apart.
            let quiet_until = tokio::time::Instant::now() + Duration::from_secs(4);
            while tokio::time::Instant::now() < quiet_until {
                member.step(0).await;
            }
            let written = tokio::time::Instant::now();
            let (_, record) = stock_record("SKU-own", round + 1);
            log.append(&topic, 1, record).await.expect("append");
            let want = round as usize + 1;
            while member.records.len() < want {
                assert!(
                    written.elapsed() < Duration::from_secs(10),
                    "{}: round {round}: the record never arrived",
                    backend.name
                );
                member.step(0).await;
            }
            slowest = slowest.max(written.elapsed());
        }
        assert!(
            slowest < Duration::from_millis(600),
            "{}: a record this process appended reached its idle member after {slowest:?}",
            backend.name
        );
    }
}

/// On Kafka, an append made when the process is quiet (nothing in flight, nothing appended
/// within the linger) does not wait for the producer's linger to fill a batch; appends made
/// together still all land, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_append_does_not_wait_for_the_linger() {
    let Ok(brokers) = std::env::var("TEST_KAFKA_BROKERS") else {
        eprintln!("TEST_KAFKA_BROKERS not set: skipped");
        return;
    };
    const LINGER_MS: u32 = 1_000;
    let log: SharedLog = Arc::new(
        KafkaLog::connect(KafkaSettings {
            linger_ms: LINGER_MS,
            ..KafkaSettings::new(brokers)
        })
        .await
        .expect("connect to the test broker"),
    );
    let topic = unique_topic("lone-append");
    log.ensure_topic(&topic, 2).await.expect("create topic");
    let mut slowest = Duration::ZERO;
    for version in 1..=3 {
        if version > 1 {
            tokio::time::sleep(Duration::from_millis(u64::from(LINGER_MS) + 100)).await;
        }
        let (_, record) = stock_record("SKU-lone", version);
        let started = tokio::time::Instant::now();
        log.append(&topic, 0, record).await.expect("append");
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        slowest < Duration::from_millis(u64::from(LINGER_MS) / 2),
        "a lone append took {slowest:?} with a {LINGER_MS} ms linger"
    );
    let mut appends = tokio::task::JoinSet::new();
    for n in 0..20u64 {
        let log = log.clone();
        let topic = topic.clone();
        appends.spawn(async move {
            let (_, record) = stock_record(&format!("SKU-{n}"), 1);
            log.append(&topic, (n % 2) as u32, record).await
        });
    }
    while let Some(appended) = appends.join_next().await {
        appended.expect("append task").expect("append");
    }
    let landed = read_all(&log, &topic, &[(0, 0), (1, 0)], 23).await;
    assert_eq!(landed.len(), 23);
}

/// A member that reads one busy partition and one quiet one (which it stops fetching, on
/// Kafka) still gets every record of both, once and in order, and the quiet one's promptly
/// when someone else writes to it.
#[tokio::test]
async fn a_quiet_partition_beside_a_busy_one_misses_nothing() {
    for backend in backends().await {
        let log = &backend.log;
        let other = (backend.reopen)().await;
        let topic = unique_topic("quiet-busy");
        log.ensure_topic(&topic, 2).await.expect("create topic");
        let mut member = Member::join_owning(log, &topic, 2, backend.name).await;
        let mut written = [0u64; 2];
        for round in 0..2u64 {
            // Partition 0 busy for 3 s, partition 1 quiet.
            let busy_until = tokio::time::Instant::now() + Duration::from_secs(3);
            while tokio::time::Instant::now() < busy_until {
                let (_, record) = stock_record("SKU-busy", written[0] + 1);
                log.append(&topic, 0, record).await.expect("append");
                written[0] += 1;
                member.step(0).await;
            }
            let (_, record) = stock_record("SKU-quiet", round + 1);
            let at = tokio::time::Instant::now();
            other.append(&topic, 1, record).await.expect("append");
            written[1] += 1;
            let count = |member: &Member, partition: u32| {
                member
                    .records
                    .iter()
                    .filter(|record| record.position.partition == partition)
                    .count() as u64
            };
            while count(&member, 1) < written[1] || count(&member, 0) < written[0] {
                assert!(
                    at.elapsed() < Duration::from_secs(5),
                    "{}: round {round}: the quiet partition's record never arrived",
                    backend.name
                );
                member.step(0).await;
            }
        }
        for partition in 0..2u32 {
            let offsets: Vec<u64> = member
                .records
                .iter()
                .filter(|record| record.position.partition == partition)
                .map(|record| record.position.offset)
                .collect();
            assert_eq!(
                offsets,
                (0..written[partition as usize]).collect::<Vec<u64>>(),
                "{}: partition {partition}: every record once, in order",
                backend.name
            );
        }
    }
}

/// Polls a shared member until `count` records arrived, starting partitions at `start` as they
/// are assigned.
async fn collect_shared(
    member: &mut dyn event_log::GroupMember,
    start: u64,
    count: usize,
    name: &str,
) -> Vec<LogRecord> {
    let mut records = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while records.len() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}: {} of {count} records",
            records.len()
        );
        match member
            .poll(3, Duration::from_millis(100))
            .await
            .expect("poll")
        {
            event_log::GroupEvent::Assigned(partitions) => {
                for (topic, partition) in partitions {
                    member.start(&topic, partition, start).await.expect("start");
                }
            }
            event_log::GroupEvent::Revoked(_) => {}
            event_log::GroupEvent::Records(batch) => records.extend(batch),
        }
    }
    records
}

/// Consumers sharing one group member (the projections of a process) each get their own
/// topics' records from their own positions, in order, once; one starting again lower than
/// the shared member reads gets its records again without the others seeing any twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_sharing_a_group_member_each_read_their_topics_from_their_own_positions() {
    for backend in backends().await {
        let log = &backend.log;
        let (first, second) = (unique_topic("a"), unique_topic("b"));
        for topic in [&first, &second] {
            log.ensure_topic(topic, 1).await.expect("create topic");
            for version in 1..=6 {
                let (_, record) = stock_record("SKU-1", version);
                log.append(topic, 0, record).await.expect("append");
            }
        }
        let group = event_log::shared::SharedGroup::new(
            log.clone(),
            format!("group-{}", uuid::Uuid::new_v4().simple()),
            vec![first.clone(), second.clone()],
        );
        // Reads both topics from 2; the other reads only the second, from 4.
        let mut both = group
            .join(&[first.clone(), second.clone()])
            .await
            .expect("join");
        let mut late = group
            .join(std::slice::from_ref(&second))
            .await
            .expect("join");
        assert!(
            group.join(&["elsewhere".to_owned()]).await.is_err(),
            "{}: a topic outside the group is refused",
            backend.name
        );
        let (got_both, got_late) = tokio::join!(
            collect_shared(both.as_mut(), 2, 8, backend.name),
            collect_shared(late.as_mut(), 4, 2, backend.name),
        );
        let offsets = |records: &[LogRecord], topic: &str| -> Vec<u64> {
            records
                .iter()
                .filter(|record| record.position.topic == topic)
                .map(|record| record.position.offset)
                .collect()
        };
        assert_eq!(
            offsets(&got_both, &first),
            vec![2, 3, 4, 5],
            "{}",
            backend.name
        );
        assert_eq!(
            offsets(&got_both, &second),
            vec![2, 3, 4, 5],
            "{}",
            backend.name
        );
        assert_eq!(offsets(&got_late, &second), vec![4, 5], "{}", backend.name);
        assert_eq!(
            offsets(&got_late, &first),
            Vec::<u64>::new(),
            "{}",
            backend.name
        );

        // The late one starts again from 0 (a rebuild swapped in): it reads 0.. again, and
        // the other gets only what is new.
        late.start(&second, 0, 0).await.expect("start again");
        let (_, record) = stock_record("SKU-1", 7);
        log.append(&second, 0, record).await.expect("append");
        let (again_late, again_both) = tokio::join!(
            collect_shared(late.as_mut(), 0, 7, backend.name),
            collect_shared(both.as_mut(), 0, 1, backend.name),
        );
        assert_eq!(
            offsets(&again_late, &second),
            (0..7).collect::<Vec<u64>>(),
            "{}",
            backend.name
        );
        assert_eq!(offsets(&again_both, &second), vec![6], "{}", backend.name);
        // Nothing more for the one that has everything.
        let extra = collect_shared(both.as_mut(), 0, 0, backend.name).await;
        assert!(extra.is_empty());
        match both
            .poll(10, Duration::from_millis(300))
            .await
            .expect("poll")
        {
            event_log::GroupEvent::Records(records) => {
                assert!(records.is_empty(), "{}: {records:?} twice", backend.name)
            }
            other => panic!("{}: {other:?}", backend.name),
        }
    }
}

/// A partition taken from a member while it was idle (on Kafka: its partitions paused) and
/// given back while the member is busy with another partition is read again: librdkafka keeps
/// an application's pause of a partition across its revocation and a later re-assignment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_taken_while_idle_and_given_back_while_busy_is_read_again() {
    for backend in backends().await {
        let log = &backend.log;
        let topic = unique_topic("back");
        log.ensure_topic(&topic, 2).await.expect("create topic");
        let group = format!("group-{}", uuid::Uuid::new_v4().simple());
        let mut a = Member::join(log, &group, &topic).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while a.owned.len() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: never assigned",
                backend.name
            );
            a.step(0).await;
        }
        // Idle for longer than a member keeps fetching without records.
        let quiet_until = tokio::time::Instant::now() + Duration::from_millis(1500);
        while tokio::time::Instant::now() < quiet_until {
            a.step(0).await;
        }
        // A second member takes one of the partitions while the first is idle.
        let mut b = Member::join(log, &group, &topic).await;
        while !(a.owned.len() == 1 && b.owned.len() == 1) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: never split",
                backend.name
            );
            a.step(0).await;
            b.step(0).await;
        }
        let kept = a.owned.iter().next().expect("kept").1;
        let moved = 1 - kept;
        // From now on the first member is busy: a record of its partition every 200 ms.
        let mut version = 0u64;
        let mut next_write = tokio::time::Instant::now();
        macro_rules! busy_step {
            () => {
                if tokio::time::Instant::now() >= next_write {
                    version += 1;
                    let (_, record) = stock_record("SKU-busy", version);
                    log.append(&topic, kept, record).await.expect("append");
                    next_write += Duration::from_millis(200);
                }
                a.step(0).await;
            };
        }
        busy_step!();
        // The second member leaves: the partition comes back to the busy first one.
        drop(b);
        while a.owned.len() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: never given back",
                backend.name
            );
            busy_step!();
        }
        let (_, record) = stock_record("SKU-moved", 1);
        let position = log.append(&topic, moved, record).await.expect("append");
        let written = tokio::time::Instant::now();
        while !a.records.iter().any(|record| record.position == position) {
            assert!(
                written.elapsed() < Duration::from_secs(10),
                "{}: the record of the partition given back never arrived",
                backend.name
            );
            busy_step!();
        }
    }
}

/// A consumer of a shared member that stops taking its records (its database is down) gets no
/// more than its queue holds and holds nobody back; once it polls again it gets everything, in
/// order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_consumer_of_a_shared_member_holds_nobody_back_and_misses_nothing() {
    for backend in backends().await {
        let log = &backend.log;
        let topic = unique_topic("stuck");
        log.ensure_topic(&topic, 1).await.expect("create topic");
        let group = event_log::shared::SharedGroup::new(
            log.clone(),
            format!("group-{}", uuid::Uuid::new_v4().simple()),
            vec![topic.clone()],
        )
        .with_queue_limit(10);
        let mut stuck = group
            .join(std::slice::from_ref(&topic))
            .await
            .expect("join");
        let mut busy = group
            .join(std::slice::from_ref(&topic))
            .await
            .expect("join");
        // Both start the partition; then the stuck one stops polling.
        let mut started = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while started < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: never assigned",
                backend.name
            );
            for member in [&mut stuck, &mut busy] {
                if let event_log::GroupEvent::Assigned(partitions) = member
                    .poll(10, Duration::from_millis(100))
                    .await
                    .expect("poll")
                {
                    for (topic, partition) in partitions {
                        member.start(&topic, partition, 0).await.expect("start");
                        started += 1;
                    }
                }
            }
        }
        for version in 1..=50 {
            let (_, record) = stock_record("SKU-1", version);
            log.append(&topic, 0, record).await.expect("append");
        }
        let got_busy = collect_shared(busy.as_mut(), 0, 50, backend.name).await;
        let got_stuck = collect_shared(stuck.as_mut(), 0, 50, backend.name).await;
        for (name, got) in [("busy", &got_busy), ("stuck", &got_stuck)] {
            let offsets: Vec<u64> = got.iter().map(|record| record.position.offset).collect();
            assert_eq!(
                offsets,
                (0..50).collect::<Vec<u64>>(),
                "{}: {name}: every record once, in order",
                backend.name
            );
        }
    }
}
