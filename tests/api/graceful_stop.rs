//! A stop (SIGTERM) flushes the saga's outbox. The saga writes the commands it sends into its
//! outbox in the same transaction as its state, and a relay publishes them to the command topics;
//! a process told to stop while orders flow publishes, before it exits, every command its saga
//! committed up to the stop, and marks none sent that is not in the log. The next start takes
//! it from there: every order's saga completes.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use event_log::{SharedLog, topics};
use event_schema::commands::CommandMessage;
use platform::Settings;
use projections::db::Db;
use serde_json::json;

use crate::durability::start_process;
use crate::helpers::{Backend, backends, http_client, open_log, read_records, settings};

const SKUS: [&str; 4] = ["SKU-S1", "SKU-S2", "SKU-S3", "SKU-S4"];

/// Outbox rows the saga must have written before the test stops the process: enough that
/// commands are being written and published when the stop comes.
const ROWS_BEFORE_THE_STOP: i64 = 40;

/// The saga's database, as the process keeps it.
async fn saga_db(backend: Backend, settings: &Settings) -> Db {
    match backend {
        Backend::Embedded => Db::sqlite(&settings.store.data_dir.join("saga.db"))
            .await
            .expect("open the saga's database"),
        Backend::Kafka => Db::postgres(
            settings
                .store
                .database_url
                .as_deref()
                .expect("a database URL"),
            &format!("{}saga", settings.store.schema_prefix),
            1,
        )
        .await
        .expect("open the saga's schema"),
    }
}

/// One outbox row: the command id, its service, and whether it is marked sent.
#[derive(Debug)]
struct OutboxRow {
    command_id: String,
    service: String,
    sent: bool,
}

async fn outbox(db: &Db) -> Vec<OutboxRow> {
    db.fetch_all(
        "SELECT command_id, service, sent_at FROM saga_outbox ORDER BY seq",
        &[],
    )
    .await
    .expect("read the outbox")
    .into_iter()
    .map(|row| OutboxRow {
        command_id: row.text("command_id"),
        service: row.text("service"),
        sent: row.get("sent_at").int().is_some(),
    })
    .collect()
}

async fn outbox_size(db: &Db) -> i64 {
    db.fetch_optional("SELECT COUNT(*) AS n FROM saga_outbox", &[])
        .await
        .expect("count the outbox")
        .map_or(0, |row| row.int("n"))
}

/// The ids of every command in the command topics.
async fn published(log: &SharedLog, settings: &Settings) -> HashSet<String> {
    let mut ids = HashSet::new();
    for service in ["order", "payment", "inventory"] {
        let topic = topics::commands(&settings.store.topic_prefix, service);
        for partition in 0..settings.partitions {
            for record in read_records(log, &topic, partition).await {
                let message = CommandMessage::from_record(&record.record)
                    .unwrap_or_else(|error| panic!("{topic}: an unreadable command: {error}"));
                ids.insert(message.command_id.to_string());
            }
        }
    }
    ids
}

/// Sends SIGTERM to the process and waits for it to exit, at most `limit`; panics unless it
/// exits successfully within it.
async fn terminate(child: &mut std::process::Child, limit: Duration) {
    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {}", child.id());
    let deadline = tokio::time::Instant::now() + limit;
    let exit = loop {
        if let Some(exit) = child.try_wait().expect("wait for the process") {
            break exit;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the process did not exit within {limit:?} of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "the stopped process exited with {exit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_publishes_every_saga_command_committed_up_to_the_stop() {
    for backend in backends() {
        let dir = tempfile::tempdir().expect("temp dir");
        let settings = settings(backend, dir.path());
        let mut process = start_process(&settings).await;
        let client = http_client();
        for sku in SKUS {
            let received = client
                .post(format!("{}/inventory/{sku}/receipts", process.address))
                .json(&json!({"quantity": 1_000_000}))
                .send()
                .await
                .expect("receive stock");
            assert_eq!(received.status(), 200, "{backend:?}: receiving {sku}");
        }

        // Orders keep coming until the process stops answering, so the saga is writing and the
        // relay publishing when the stop comes.
        let placing = Arc::new(AtomicBool::new(true));
        let mut clients = Vec::new();
        for task in 0..6 {
            let (client, address, placing) =
                (client.clone(), process.address.clone(), placing.clone());
            clients.push(tokio::spawn(async move {
                let mut placed = Vec::new();
                let mut n = 0;
                while placing.load(Ordering::SeqCst) {
                    n += 1;
                    let sku = SKUS[(task + n) % SKUS.len()];
                    let reply = client
                        .post(format!("{address}/orders"))
                        .json(&json!({
                            "customer_id": "c-1",
                            "currency": "EUR",
                            "payment_token": "tok_approve",
                            "lines": [{"sku": sku, "quantity": 1, "unit_price_minor": 100}],
                        }))
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await;
                    match reply {
                        Ok(response) if response.status() == 201 => {
                            let body: serde_json::Value = response.json().await.expect("json");
                            placed.push(body["order_id"].as_str().expect("an order id").to_owned());
                        }
                        Ok(_) => {}
                        // Refused once the process stops listening.
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                placed
            }));
        }
        let db = saga_db(backend, &settings).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while outbox_size(&db).await < ROWS_BEFORE_THE_STOP {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{backend:?}: the saga wrote fewer than {ROWS_BEFORE_THE_STOP} outbox rows in a minute"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The platform's own bounds on a stop (HTTP drain, last snapshots, tasks) are well
        // within this.
        terminate(&mut process.child, Duration::from_secs(30)).await;
        placing.store(false, Ordering::SeqCst);
        let mut orders = Vec::new();
        for client in clients {
            orders.extend(client.await.expect("client task"));
        }

        let log = open_log(backend, &settings).await;
        let in_log = published(&log, &settings).await;
        let after_stop = outbox(&db).await;
        for row in after_stop.iter().filter(|row| row.sent) {
            assert!(
                in_log.contains(&row.command_id),
                "{backend:?}: {} command {} is marked sent but is not in the log",
                row.service,
                row.command_id
            );
        }
        let unsent: Vec<&OutboxRow> = after_stop.iter().filter(|row| !row.sent).collect();

        // The next start publishes whatever the stop left, and every order's saga completes.
        let process = start_process(&settings).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        for order_id in &orders {
            loop {
                let reply = client
                    .get(format!("{}/sagas/{order_id}", process.address))
                    .send()
                    .await
                    .expect("ask for the saga");
                let status = reply.status();
                let body: serde_json::Value = reply.json().await.unwrap_or_default();
                if status == 200 && body["saga"]["state"] == "confirmed" {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{backend:?}: the saga of order {order_id} did not complete after the restart: {body}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let in_log = published(&log, &settings).await;
        for row in &unsent {
            assert!(
                in_log.contains(&row.command_id),
                "{backend:?}: {} command {}, unsent at the stop, was not published after the restart",
                row.service,
                row.command_id
            );
        }
        drop(process);

        assert!(
            unsent.is_empty(),
            "{backend:?}: the stop left {} of the outbox's {} saga commands unsent: {:?}",
            unsent.len(),
            after_stop.len(),
            unsent
                .iter()
                .map(|row| format!("{} {}", row.service, row.command_id))
                .collect::<Vec<_>>()
        );
        assert!(
            !orders.is_empty(),
            "{backend:?}: no order was placed before the stop"
        );
    }
}
