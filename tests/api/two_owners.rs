//! Two owners of the same partitions at once (a zombie, or a misconfigured second instance):
//! neither may acknowledge a write that readers skip, and the one that sees the other's record
//! steps down from the partition.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use event_log::Position;
use event_schema::{EffectiveHistory, Envelope};

use crate::helpers::{TestApp, backends, settings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_owners_of_one_partition_never_acknowledge_a_write_readers_skip() {
    for backend in backends() {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let settings = settings(backend, dir.path());
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
        let topic = event_log::topics::events(&settings.topic_prefix, "stock");
        let partition = event_log::partition_for("SKU-CONTESTED", settings.partitions);
        let end = log.end_offset(&topic, partition).await.expect("end");
        let mut reader = log.reader(&topic, &[(partition, 0)]).await.expect("reader");
        let mut history = EffectiveHistory::new();
        let mut effective = HashMap::new();
        let mut read = 0;
        while read < end {
            for record in reader
                .poll(1000, Duration::from_millis(300))
                .await
                .expect("poll")
            {
                read = record.position.offset + 1;
                let envelope = Envelope::try_from(&record.record).expect("decode");
                if history
                    .observe(&envelope.aggregate_id, envelope.aggregate_version)
                    .is_effective()
                {
                    effective.insert(record.position.clone(), envelope.aggregate_version);
                }
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
        let total_refused: i32 = refused.values().sum();
        assert!(
            total_refused > 0,
            "{backend:?}: with two writers on one partition, one of them stepped down ({} acknowledged)",
            acknowledged.len()
        );
        eprintln!(
            "{backend:?}: {} acknowledged, refused {refused:?}, {} skipped by readers",
            acknowledged.len(),
            history.skipped()
        );
    }
}
