//! Two owners of the same partitions at once (a zombie, or a misconfigured second instance):
//! neither may acknowledge a write that readers skip; the earlier owner stops deciding once it
//! sees the later one's record (a later epoch), and the later one goes on serving.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_log::Position;
use event_schema::EffectiveHistory;

use command_services::owner::WATCH_EVERY;

use crate::helpers::{TestApp, backends, read_partition, settings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_owners_of_one_partition_never_acknowledge_a_write_readers_skip() {
    for backend in backends() {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let mut settings = settings(backend, dir.path());
        // Both own every partition: what two instances given the same static identity, or a
        // zombie and its replacement, amount to.
        settings.assignment = platform::settings::AssignmentMode::Static;
        let a = Arc::new(TestApp::spawn_with(backend, settings.clone(), dir.clone()).await);
        let b = Arc::new(TestApp::spawn_with(backend, settings.clone(), dir.clone()).await);

        let mut writers = Vec::new();
        for (name, app) in [("a", a.clone()), ("b", b.clone())] {
            for _ in 0..4 {
                let app = app.clone();
                writers.push(tokio::spawn(async move {
                    let mut acknowledged = Vec::new();
                    let mut refused = 0;
                    for _ in 0..15 {
                        let reply = app.receive("SKU-CONTESTED", 1).await;
                        match reply.status {
                            200 => {
                                let position: Position = reply.body["consistency_token"]
                                    .as_str()
                                    .expect("token")
                                    .parse()
                                    .expect("position");
                                acknowledged.push((reply.version(), position));
                            }
                            503 => refused += 1,
                            other => panic!("{name}: unexpected {other}: {}", reply.body),
                        }
                    }
                    (name, acknowledged, refused)
                }));
            }
        }
        let mut acknowledged = Vec::new();
        let mut refused = HashMap::new();
        for writer in writers {
            let (name, acks, refusals) = writer.await.expect("writer");
            acknowledged.extend(acks);
            *refused.entry(name).or_insert(0) += refusals;
        }

        // Readers decide by the shared rule; every acknowledged write must be effective there.
        let log = a.log().await;
        let topic = event_log::topics::events(&settings.store.topic_prefix, "stock");
        let partition = event_log::partition_for("SKU-CONTESTED", settings.partitions);
        let mut history = EffectiveHistory::new();
        let mut effective = HashMap::new();
        for (position, envelope) in read_partition(&log, &topic, partition).await {
            if history
                .observe(&envelope.aggregate_id, envelope.aggregate_version)
                .is_effective()
            {
                effective.insert(position, envelope.aggregate_version);
            }
        }
        for (version, position) in &acknowledged {
            assert_eq!(
                effective.get(position),
                Some(version),
                "{backend:?}: acknowledged version {version} at {position} is effective"
            );
        }
        let mut versions: Vec<u64> = acknowledged.iter().map(|(version, _)| *version).collect();
        versions.sort_unstable();
        versions.dedup();
        assert_eq!(
            versions.len(),
            acknowledged.len(),
            "{backend:?}: no version acknowledged twice"
        );
        assert!(
            refused.get("a").copied().unwrap_or(0) > 0,
            "{backend:?}: the earlier owner stopped deciding once the later one wrote ({} acknowledged, refused {refused:?})",
            acknowledged.len()
        );
        // The later owner serves on; the earlier one sends its clients elsewhere.
        b.receive("SKU-CONTESTED", 1).await.expect(200);
        let moved = a.receive("SKU-CONTESTED", 1).await;
        moved.expect_problem(503);
        assert_eq!(
            moved.body["type"], "/problems/not-owner",
            "{backend:?}: {}",
            moved.body
        );
        eprintln!(
            "{backend:?}: {} acknowledged, refused {refused:?}, {} skipped by readers",
            acknowledged.len(),
            history.skipped()
        );
    }
}

/// The owner has no continuous tail: it folds its own records from the log's acknowledgements
/// and reads only what it did not write. A record of another writer must still be found, both
/// when the owner writes nothing itself (it asks the log where its partitions end) and when a
/// command's record lands behind it (the command waits for that gap only, not for a time-out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_reads_another_writers_record_without_a_tail() {
    for backend in backends() {
        // The owner writes nothing: the other writer's record is found by the watch. It is a
        // zombie's (no epoch, so an earlier one): folded, and the owner serves on.
        let app = TestApp::spawn(backend).await;
        app.receive("SKU-WATCHED", 5).await.expect(200);
        let partition = foreign_append(&app, "SKU-WATCHED", None).await;
        let started = Instant::now();
        loop {
            let ready = app.get("/health/ready").await;
            let stock = ready.body["services"]
                .as_array()
                .expect("services")
                .iter()
                .find(|service| {
                    service["topic"]
                        .as_str()
                        .is_some_and(|topic| topic.ends_with(".stock.events"))
                })
                .expect("the stock owner")
                .clone();
            let status = stock["partitions"]
                .as_array()
                .expect("partitions")
                .iter()
                .find(|status| status["partition"] == partition)
                .expect("the partition's status")
                .clone();
            assert_eq!(status["stepped_down"], false, "{backend:?}: {status}");
            assert_eq!(status["fenced"], false, "{backend:?}: {status}");
            if status["next_offset"] == 2 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{backend:?}: the owner did not find the other writer's record: {stock}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Decided on the state the zombie's record made: version 3.
        let reply = app.receive("SKU-WATCHED", 1).await;
        reply.expect(200);
        assert_eq!(reply.version(), 3, "{backend:?}: {}", reply.body);

        // A record of a later epoch: a newer owner took the partition, this one stops deciding
        // for it and says so as routing information.
        let epoch = app.get("/health/ready").await.body["services"]
            .as_array()
            .expect("services")
            .iter()
            .flat_map(|service| {
                service["partitions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|status| status["epoch"].as_u64())
            .max()
            .expect("an epoch");
        foreign_append(&app, "SKU-WATCHED", Some(epoch + 1)).await;
        let started = Instant::now();
        loop {
            let reply = app.receive("SKU-WATCHED", 1).await;
            if reply.status == 503 {
                assert_eq!(
                    reply.body["type"], "/problems/not-owner",
                    "{backend:?}: {}",
                    reply.body
                );
                assert_eq!(
                    reply.headers.get("platform-routing").map(|v| v.as_bytes()),
                    Some(&b"elsewhere"[..]),
                    "{backend:?}: the answer is routing information"
                );
                break;
            }
            assert_eq!(reply.status, 200, "{backend:?}: {}", reply.body);
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{backend:?}: the owner did not stop after a newer owner's record"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(app);

        // A command's record lands right behind another writer's: the owner reads the gap,
        // folds the other record, and answers the command from the log.
        let app = TestApp::spawn(backend).await;
        app.receive("SKU-GAP", 5).await.expect(200);
        let neighbour = (0..)
            .map(|n| format!("SKU-NEIGHBOUR-{n}"))
            .find(|sku| {
                event_log::partition_for(sku, app.settings.partitions)
                    == event_log::partition_for("SKU-GAP", app.settings.partitions)
            })
            .expect("a SKU on the same partition");
        let partition = foreign_append(&app, "SKU-GAP", None).await;
        let appended = Instant::now();
        let reply = app.receive(&neighbour, 1).await;
        let elapsed = appended.elapsed();
        // The watch reads only up to an end it saw one check earlier, so it cannot read the
        // other record within a check interval of its append: an answer sooner comes from the
        // gap read.
        assert_eq!(reply.status, 200, "{backend:?}: {}", reply.body);
        assert!(
            elapsed < WATCH_EVERY,
            "{backend:?}: the command waited {elapsed:?} after the other record's append, which \
             only the watch, not a read of the gap, would take"
        );
        // Acknowledged: it must be effective for every reader, behind the other record.
        let position: Position = reply.body["consistency_token"]
            .as_str()
            .expect("token")
            .parse()
            .expect("position");
        assert_eq!(reply.version(), 1, "{backend:?}: {}", reply.body);
        let log = app.log().await;
        let mut history = EffectiveHistory::new();
        let mut ours = None;
        let mut foreign_before_ours = false;
        // The command was acknowledged, so its record lies before the partition's end.
        for (at, envelope) in read_partition(&log, &position.topic, partition).await {
            let verdict = history.observe(&envelope.aggregate_id, envelope.aggregate_version);
            if envelope.aggregate_id == "SKU-GAP" && envelope.aggregate_version == 2 {
                foreign_before_ours = ours.is_none();
            }
            if at == position {
                ours = Some(verdict.is_effective());
            }
        }
        assert!(
            foreign_before_ours,
            "{backend:?}: the other writer's record lies before the command's"
        );
        assert_eq!(
            ours,
            Some(true),
            "{backend:?}: the acknowledged record is effective"
        );
        // The other writer's record was a zombie's: the owner serves on, on the state it made.
        let reply = app.receive("SKU-GAP", 1).await;
        reply.expect(200);
        assert_eq!(reply.version(), 3, "{backend:?}: {}", reply.body);
    }
}

/// Appends, as another writer would, the next event of `sku`'s stock aggregate (a copy of its
/// last one with a new event id and the next version), with `epoch` as its owner epoch or none;
/// returns its partition.
async fn foreign_append(app: &TestApp, sku: &str, epoch: Option<u64>) -> u32 {
    let log = app.log().await;
    let topic = event_log::topics::events(&app.settings.store.topic_prefix, "stock");
    let partition = event_log::partition_for(sku, app.settings.partitions);
    let last = read_partition(&log, &topic, partition)
        .await
        .into_iter()
        .map(|(_, envelope)| envelope)
        .rfind(|envelope| envelope.aggregate_id == sku);
    let mut envelope = last.expect("the SKU has an event");
    envelope.event_id = uuid::Uuid::now_v7();
    envelope.command_id = uuid::Uuid::now_v7();
    envelope.aggregate_version += 1;
    let mut record = event_schema::Record::from(&envelope);
    if let Some(epoch) = epoch {
        record.headers.push(event_schema::Header {
            name: command_services::owner::EPOCH_HEADER.to_owned(),
            value: epoch.to_string(),
        });
    }
    log.append(&topic, partition, record).await.expect("append");
    partition
}
