//! Restarts, graceful and not: every acknowledged command survives exactly once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use event_log::{Position, SharedLog};
use event_schema::{EffectiveHistory, Envelope};
use serde_json::json;

use crate::helpers::{Backend, TestApp, backends, open_log, platform_binary, settings};

/// Every record of a topic, in log order per partition.
pub async fn read_topic(
    log: &SharedLog,
    topic: &str,
    partitions: u32,
) -> Vec<(Position, Envelope)> {
    let mut records = Vec::new();
    for partition in 0..partitions {
        let end = log.end_offset(topic, partition).await.expect("end offset");
        if end == 0 {
            continue;
        }
        let mut reader = log.reader(topic, &[(partition, 0)]).await.expect("reader");
        let mut read = 0;
        while read < end {
            for record in reader
                .poll(1000, Duration::from_millis(500))
                .await
                .expect("poll")
            {
                read = record.position.offset + 1;
                let envelope = Envelope::try_from(&record.record)
                    .expect("every record decodes: nothing half-written");
                records.push((record.position, envelope));
            }
        }
    }
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_restart_from_snapshots_and_the_log_tail() {
    for backend in backends() {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let mut settings = settings(backend, dir.path());
        settings.snapshot_every = 7;
        let app = TestApp::spawn_with(backend, settings, dir).await;
        for _ in 0..20 {
            app.receive("SKU-R", 2).await.expect(200);
        }
        let order = app.place_pending_order("SKU-O").await;
        let order_id = order.expect(201)["order_id"]
            .as_str()
            .expect("id")
            .to_owned();
        let (settings, dir) = app.stop().await;

        let app = TestApp::spawn_with(backend, settings, dir).await;
        assert_eq!(
            app.receive("SKU-R", 1).await.version(),
            21,
            "{backend:?}: stock state restored"
        );
        let cancel = app
            .post(&format!("/orders/{order_id}/cancel"), json!({}))
            .await;
        assert_eq!(
            cancel.expect(200)["version"],
            2,
            "{backend:?}: order state restored"
        );
        // Removing 41 would leave less than nothing: the state knows the 41 on hand.
        app.post(
            "/inventory/SKU-R/adjustments",
            json!({"delta": -42, "reason": "count"}),
        )
        .await
        .expect_problem(409);
    }
}

pub struct Process {
    pub child: Child,
    pub address: String,
}

impl Process {
    /// kill -9, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

pub async fn start_process(settings: &platform::Settings) -> Process {
    let port = free_port();
    let mut command = Command::new(platform_binary());
    command
        .arg("serve")
        .arg("--data-dir")
        .arg(&settings.store.data_dir)
        .arg("--http-addr")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--topic-prefix")
        .arg(&settings.store.topic_prefix)
        .arg("--schema-prefix")
        .arg(&settings.store.schema_prefix)
        .arg("--partitions")
        .arg(settings.partitions.to_string())
        .env(
            "RUST_LOG",
            if std::env::var("TEST_LOG").is_ok() {
                "info"
            } else {
                "error"
            },
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if std::env::var("TEST_LOG").is_err() {
        command.stderr(Stdio::null());
    }
    if let (Some(kafka), Some(url)) = (&settings.store.kafka, &settings.store.database_url) {
        command
            .arg("--kafka")
            .arg(kafka)
            .arg("--database-url")
            .arg(url);
    }
    let child = command.spawn().expect("start the platform binary");
    let address = format!("http://127.0.0.1:{port}");
    let client = crate::helpers::http_client();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(response) = client.get(format!("{address}/health/ready")).send().await
            && response.status() == 200
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the platform process did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Process { child, address }
}

#[derive(Debug, Clone)]
struct Acknowledged {
    sku: String,
    version: u64,
    position: Position,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_load_loses_no_acknowledged_command_and_duplicates_none() {
    for backend in backends() {
        let dir = tempfile::tempdir().expect("temp dir");
        let settings = settings(backend, dir.path());
        let mut process = start_process(&settings).await;
        let client = crate::helpers::http_client();

        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for task in 0..12 {
            let client = client.clone();
            let address = process.address.clone();
            let stop = stop.clone();
            clients.push(tokio::spawn(async move {
                let mut sent: Vec<(String, String, Option<Acknowledged>)> = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = format!("kill-{task}-{n}");
                    let sku = format!("SKU-{}", (task * 7 + n) % 10);
                    let reply = client
                        .post(format!("{address}/inventory/{sku}/receipts"))
                        .header("Idempotency-Key", &key)
                        .json(&json!({"quantity": 1}))
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await;
                    let acknowledged = match reply {
                        Ok(response) if response.status() == 200 => {
                            let body: serde_json::Value = response.json().await.expect("json");
                            Some(Acknowledged {
                                sku: sku.clone(),
                                version: body["version"].as_u64().expect("version"),
                                position: body["consistency_token"]
                                    .as_str()
                                    .expect("token")
                                    .parse()
                                    .expect("a position"),
                            })
                        }
                        _ => None,
                    };
                    sent.push((key, sku, acknowledged));
                }
                sent
            }));
        }
        // Kill somewhere between 0.8 and 1.8 s into the load.
        let jitter = u64::from(uuid::Uuid::new_v4().as_bytes()[0]) * 4;
        tokio::time::sleep(Duration::from_millis(800 + jitter)).await;
        process.child.kill().expect("kill -9");
        process.child.wait().expect("reap");
        stop.store(true, Ordering::Relaxed);
        let mut sent = Vec::new();
        for client in clients {
            sent.extend(client.await.expect("client task"));
        }
        let acknowledged: Vec<Acknowledged> =
            sent.iter().filter_map(|(_, _, ack)| ack.clone()).collect();
        assert!(
            acknowledged.len() > 20,
            "{backend:?}: the load got going ({} acknowledged)",
            acknowledged.len()
        );

        // Restart on the same data and retry every request that got no answer, with its key.
        let mut process = start_process(&settings).await;
        for (key, sku, ack) in &sent {
            if ack.is_some() {
                continue;
            }
            let response = client
                .post(format!("{}/inventory/{sku}/receipts", process.address))
                .header("Idempotency-Key", key)
                .json(&json!({"quantity": 1}))
                .send()
                .await
                .expect("retry");
            assert_eq!(response.status(), 200, "{backend:?}: retry of {key}");
        }
        // Retrying an acknowledged one changes nothing either.
        let (key, sku, ack) = sent
            .iter()
            .find(|(_, _, ack)| ack.is_some())
            .expect("one acknowledged");
        let again: serde_json::Value = client
            .post(format!("{}/inventory/{sku}/receipts", process.address))
            .header("Idempotency-Key", key)
            .json(&json!({"quantity": 1}))
            .send()
            .await
            .expect("retry")
            .json()
            .await
            .expect("json");
        assert_eq!(again["outcome"], "repeated");
        assert_eq!(again["version"], ack.as_ref().expect("ack").version);
        process.child.kill().expect("kill");
        process.child.wait().expect("reap");

        // The log, read by the shared rule.
        let log = open_log(backend, &settings).await;
        let topic = event_log::topics::events(&settings.store.topic_prefix, "stock");
        let records = read_topic(&log, &topic, settings.partitions).await;
        let mut history = EffectiveHistory::new();
        let mut effective: HashMap<Position, (String, u64)> = HashMap::new();
        let mut versions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut commands = HashSet::new();
        for (position, envelope) in records {
            if history
                .observe(&envelope.aggregate_id, envelope.aggregate_version)
                .is_effective()
            {
                assert!(
                    commands.insert(envelope.command_id),
                    "{backend:?}: a command took effect twice"
                );
                versions
                    .entry(envelope.aggregate_id.clone())
                    .or_default()
                    .push(envelope.aggregate_version);
                effective.insert(
                    position,
                    (envelope.aggregate_id, envelope.aggregate_version),
                );
            }
        }
        for ack in &acknowledged {
            assert_eq!(
                effective.get(&ack.position),
                Some(&(ack.sku.clone(), ack.version)),
                "{backend:?}: acknowledged {ack:?} is effective in the log"
            );
        }
        assert_eq!(
            commands.len(),
            sent.len(),
            "{backend:?}: every request took effect exactly once"
        );
        for (sku, versions) in versions {
            assert_eq!(
                versions,
                (1..=versions.len() as u64).collect::<Vec<_>>(),
                "{backend:?}: {sku} gapless"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_refuses_kafka_without_a_database() {
    let output = Command::new(platform_binary())
        .args([
            "serve",
            "--kafka",
            "127.0.0.1:1",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "off")
        .output()
        .expect("run the binary");
    assert!(!output.status.success());
    let _ = Backend::Embedded;
}

/// Two processes serving one embedded data directory would each own every partition: the
/// second is refused with an error naming the directory and the first one's pid, and changes
/// nothing; after a kill -9 of the first, the directory serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_a_data_directory_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let settings = settings(Backend::Embedded, dir.path());
    let mut first = start_process(&settings).await;
    let client = crate::helpers::http_client();
    let received = client
        .post(format!("{}/inventory/SKU-LOCK/receipts", first.address))
        .json(&json!({"quantity": 5}))
        .send()
        .await
        .expect("receipt");
    assert_eq!(received.status(), 200);
    let files_before = directory_listing(&settings.store.data_dir);
    let log_before = std::fs::read(settings.store.data_dir.join("log.db")).expect("read log.db");

    let mut second = Command::new(platform_binary())
        .arg("serve")
        .arg("--data-dir")
        .arg(&settings.store.data_dir)
        .arg("--http-addr")
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(["--topic-prefix", &settings.store.topic_prefix])
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run a second platform");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = second.try_wait().expect("wait") {
            break status;
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("a second process started serving the same data directory");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(second.stderr.as_mut().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(!status.success(), "the second process must not start");
    assert!(
        stderr.contains(&settings.store.data_dir.display().to_string())
            && stderr.contains(&format!("pid {}", first.child.id())),
        "the error names the directory and the holder: {stderr}"
    );
    assert_eq!(directory_listing(&settings.store.data_dir), files_before);
    assert_eq!(
        std::fs::read(settings.store.data_dir.join("log.db")).expect("read log.db"),
        log_before,
        "the second process changed the log"
    );
    // The first one still serves.
    let received = client
        .post(format!("{}/inventory/SKU-LOCK/receipts", first.address))
        .json(&json!({"quantity": 5}))
        .send()
        .await
        .expect("receipt");
    assert_eq!(received.status(), 200);

    // A killed holder leaves no lock behind: the directory serves again, with both receipts.
    first.kill();
    let again = start_process(&settings).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stock = client
            .get(format!("{}/inventory/SKU-LOCK", again.address))
            .send()
            .await
            .expect("query");
        if stock.status() == 200 {
            let body: serde_json::Value = stock.json().await.expect("json");
            if body["on_hand"] == 10 {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restarted process never showed both receipts"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn directory_listing(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list the data directory")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}
