//! Stored state ahead of the log (a topic recreated under the same name, a broker restored from
//! an older backup): the command side refuses to decide on it, says which partition and both
//! offsets, and `platform recover --apply` is the way out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use command_services::store::{CommandStore, Snapshot, SqlStore};
use platform::{Part, Platform, Settings};

use crate::helpers::{Backend, TestApp, backends, http_client, platform_binary};

async fn command_store(backend: Backend, settings: &Settings) -> SqlStore {
    match backend {
        Backend::Embedded => SqlStore::sqlite(settings.store.data_dir.join("command-side.db"))
            .await
            .expect("open the command-side store"),
        Backend::Kafka => SqlStore::postgres(
            settings
                .store
                .database_url
                .as_deref()
                .expect("database url"),
            &format!("{}command_side", settings.store.schema_prefix),
        )
        .await
        .expect("open the command-side store"),
    }
}

/// Runs `platform recover [--apply]` on the test's backend; returns what it printed.
fn recover(backend: Backend, settings: &Settings, apply: bool) -> String {
    let mut command = std::process::Command::new(platform_binary());
    command
        .arg("recover")
        .arg("--data-dir")
        .arg(&settings.store.data_dir)
        .arg("--topic-prefix")
        .arg(&settings.store.topic_prefix)
        .arg("--schema-prefix")
        .arg(&settings.store.schema_prefix)
        .env("RUST_LOG", "off")
        .env_remove("DATABASE_URL")
        .env_remove("PLATFORM_KAFKA");
    if apply {
        command.arg("--apply");
    }
    if backend == Backend::Kafka {
        command
            .arg("--kafka")
            .arg(settings.store.kafka.as_deref().expect("kafka"))
            .arg("--database-url")
            .arg(
                settings
                    .store
                    .database_url
                    .as_deref()
                    .expect("database url"),
            );
    }
    let output = command.output().expect("run platform recover");
    assert!(
        output.status.success(),
        "platform recover failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_ahead_of_the_log_is_refused_named_and_recovered() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        app.receive("SKU-AHEAD", 5).await.expect(200);
        let (settings, dir) = app.stop().await;
        let topic = event_log::topics::events(&settings.store.topic_prefix, "stock");
        let partition = event_log::partition_for("SKU-AHEAD", settings.partitions);
        let log = crate::helpers::open_log(backend, &settings).await;
        let end = log.end_offset(&topic, partition).await.expect("end");
        drop(log);

        // A snapshot that covers 10 records the log does not have.
        let store = command_store(backend, &settings).await;
        let ahead = end + 10;
        store
            .save_snapshot(
                &topic,
                partition,
                Snapshot {
                    format: command_services::owner::SNAPSHOT_FORMAT,
                    next_offset: ahead,
                    epoch: 1_000,
                    aggregates: Vec::new(),
                    new_aggregates: Vec::new(),
                    outcomes: Vec::new(),
                    forgotten_outcomes: Vec::new(),
                },
                false,
            )
            .await
            .expect("store the snapshot");
        drop(store);

        // The service starts, but does not decide for that partition, and says why.
        let platform = Platform::build(settings.clone(), Part::All)
            .await
            .expect("build");
        let url = format!("http://{}", platform.local_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let _ = platform
                .run_until_stopped(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        let client = http_client();
        let deadline = Instant::now() + Duration::from_secs(30);
        let problem = loop {
            let ready = client
                .get(format!("{url}/health/ready"))
                .send()
                .await
                .expect("ready");
            let status = ready.status().as_u16();
            let body: serde_json::Value = ready.json().await.expect("json");
            let problems: Vec<String> = body["services"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|service| service["problems"].as_array().cloned().unwrap_or_default())
                .filter_map(|problem| problem.as_str().map(str::to_owned))
                .collect();
            if let Some(problem) = problems.first() {
                assert_eq!(status, 503, "{backend:?}: not ready: {body}");
                break problem.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{backend:?}: no problem reported: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for named in [
            topic.clone(),
            format!("partition {partition}"),
            ahead.to_string(),
            end.to_string(),
            "platform recover".to_owned(),
        ] {
            assert!(
                problem.contains(&named),
                "{backend:?}: the problem names {named}: {problem}"
            );
        }
        let refused = client
            .post(format!("{url}/inventory/SKU-AHEAD/receipts"))
            .json(&serde_json::json!({"quantity": 1}))
            .send()
            .await
            .expect("receipt");
        assert_eq!(
            refused.status().as_u16(),
            503,
            "{backend:?}: nothing is decided on a snapshot ahead of the log"
        );
        let _ = stop.send(());
        let _ = server.await;

        // `recover` lists it, `recover --apply` drops it, and the service starts on the log.
        let listed = recover(backend, &settings, false);
        assert!(
            listed.contains(&format!("partition {partition} at offset {ahead}")),
            "{backend:?}: {listed}"
        );
        let applied = recover(backend, &settings, true);
        assert!(applied.contains("dropped"), "{backend:?}: {applied}");
        assert!(
            recover(backend, &settings, false).contains("nothing stored is ahead of the log"),
            "{backend:?}"
        );
        let app = TestApp::spawn_with(backend, settings, Arc::clone(&dir)).await;
        let reply = app.receive("SKU-AHEAD", 1).await;
        reply.expect(200);
        assert_eq!(reply.version(), 2, "{backend:?}: rebuilt from the log");
    }
}
