//! Partition ownership by consumer group: a command service rescaled under load (instances
//! joining and leaving) hands its partitions over without losing or doubling a command, and
//! no partition stays without an owner for longer than the group's session timeout plus the
//! new owner's catch-up.
//!
//! On Kafka only: the embedded log is one process's (its consumer groups live in that process),
//! so it has no second instance to hand partitions to.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_log::Position;
use event_schema::EffectiveHistory;
use platform::{Part, Platform, Settings};
use serde_json::json;
use tokio::sync::oneshot;

use crate::helpers::{Backend, backends, http_client, open_log, read_partition, settings};

/// One part of the platform running in this process.
struct Running {
    url: String,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn start(settings: &Settings, part: Part) -> Running {
        let platform = Platform::build(settings.clone(), part)
            .await
            .expect("build the platform");
        let url = format!("http://{}", platform.local_addr());
        assert!(
            platform
                .commands()
                .wait_ready(Duration::from_secs(60))
                .await,
            "the part did not become ready"
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            platform
                .run_until_stopped(async move {
                    let _ = stopped.await;
                })
                .await
                .expect("serve");
        });
        Running {
            url,
            stop: Some(stop),
            server,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.server.await;
    }
}

/// What the load saw: every acknowledged receipt (SKU, quantity, version, position), and the
/// longest stretch without any acknowledgement.
#[derive(Debug, Default)]
struct Seen {
    acknowledged: Vec<(String, i64, u64, Position)>,
    last_ack: Option<Instant>,
    longest_gap: Duration,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_service_rescaled_1_2_3_2_1_under_load_loses_and_doubles_nothing() {
    if !backends().contains(&Backend::Kafka) {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let settings = settings(Backend::Kafka, dir.path());
    let projections = Running::start(&settings, Part::Projections).await;
    let instances: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let mut running = vec![Running::start(&settings, Part::Inventory).await];
    instances.lock().unwrap().push(running[0].url.clone());
    let load = Load::start(instances.clone());

    // 1 → 2 → 3 → 2 → 1, a few seconds apart.
    let step = Duration::from_secs(4);
    tokio::time::sleep(step).await;
    for _ in 0..2 {
        let joined = Running::start(&settings, Part::Inventory).await;
        instances.lock().unwrap().push(joined.url.clone());
        running.push(joined);
        tokio::time::sleep(step).await;
    }
    for _ in 0..2 {
        let left = running.remove(0);
        instances.lock().unwrap().retain(|url| *url != left.url);
        left.stop().await;
        tokio::time::sleep(step).await;
    }
    let seen = load.stop().await;
    // Session timeout (6 s) + 2 s: a graceful leave hands over at once, so this is generous.
    seen.check(Duration::from_secs(8));
    let on_hand = check_log(&settings, &seen).await;
    check_read_model(&projections.url, &on_hand).await;
    for part in running {
        part.stop().await;
    }
    projections.stop().await;
}

/// Two instances of the inventory service as processes, one of them frozen (SIGSTOP) and
/// thawed (SIGCONT) at random under load: for a few hundred ms, for a few seconds, and once for
/// longer than the group's session timeout, so that its partitions move to the other and it
/// comes back a zombie that still believes it owns them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_frozen_and_thawed_under_load_loses_and_doubles_nothing() {
    if !backends().contains(&Backend::Kafka) {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let settings = settings(Backend::Kafka, dir.path());
    let first = crate::chaos::start(&settings, "inventory", crate::chaos::free_port()).await;
    let second = crate::chaos::start(&settings, "inventory", crate::chaos::free_port()).await;
    let projections = Running::start(&settings, Part::Projections).await;
    let instances = Arc::new(Mutex::new(vec![first.address(), second.address()]));
    let load = Load::start(instances);
    let mut random = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        random
    };
    // Pauses in ms: short ones, a few seconds, one past the 6 s session timeout.
    let mut pauses: Vec<u64> = (0..4).map(|_| 100 + next() % 900).collect();
    pauses.push(1_500 + next() % 2_000);
    pauses.push(9_000);
    pauses.push(200 + next() % 800);
    for pause in pauses {
        let frozen = if next() % 2 == 0 { &first } else { &second };
        let pid = frozen.pid().expect("running").to_string();
        tokio::time::sleep(Duration::from_millis(500 + next() % 1_500)).await;
        signal("-STOP", &pid);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        signal("-CONT", &pid);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen = load.stop().await;
    // A frozen owner's partitions move after the session timeout (6 s), then the new owner
    // catches up: 2 s more.
    seen.check(Duration::from_secs(8));
    let on_hand = check_log(&settings, &seen).await;
    check_read_model(&projections.url, &on_hand).await;
    projections.stop().await;
    drop((first, second));
}

fn signal(which: &str, pid: &str) {
    let status = std::process::Command::new("kill")
        .arg(which)
        .arg(pid)
        .status()
        .expect("kill");
    assert!(status.success(), "kill {which} {pid}");
}

/// Receipts sent by a few concurrent clients, each retried with its `Idempotency-Key` on any
/// instance until acknowledged.
struct Load {
    seen: Arc<Mutex<Seen>>,
    stop: tokio::sync::watch::Sender<bool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(instances: Arc<Mutex<Vec<String>>>) -> Load {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut workers = Vec::new();
        for worker in 0..6u64 {
            workers.push(tokio::spawn(send_receipts(
                worker,
                instances.clone(),
                seen.clone(),
                stopped.clone(),
            )));
        }
        Load {
            seen,
            stop,
            workers,
        }
    }

    async fn stop(self) -> Seen {
        self.stop.send_replace(true);
        for worker in self.workers {
            worker.await.expect("load worker");
        }
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

impl Seen {
    fn check(&self, longest_gap: Duration) {
        assert!(
            self.acknowledged.len() > 100,
            "the load got {} receipts through",
            self.acknowledged.len()
        );
        assert!(
            self.longest_gap <= longest_gap,
            "{:?} passed without an acknowledged command",
            self.longest_gap
        );
        eprintln!(
            "{} receipts acknowledged, longest gap {:?}",
            self.acknowledged.len(),
            self.longest_gap
        );
    }
}

async fn send_receipts(
    worker: u64,
    instances: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<Seen>>,
    stopped: tokio::sync::watch::Receiver<bool>,
) {
    let client = http_client();
    let mut sent = 0u64;
    while !*stopped.borrow() {
        sent += 1;
        let sku = format!("SKU-{}", (sent * 7 + worker) % 24);
        let quantity = (sent % 5 + 1) as i64;
        let key = format!("w{worker}-{sent}");
        let mut attempt = 0u64;
        loop {
            let urls = instances.lock().unwrap().clone();
            let url = &urls[(attempt + worker) as usize % urls.len()];
            attempt += 1;
            // Short: a frozen instance does not answer, and the other one should be asked. The
            // wait counts in the measured gap: a worker that asked the frozen instance just
            // before the other took its partitions over learns of it only after this long.
            let answer = client
                .post(format!("{url}/inventory/{sku}/receipts"))
                .header("idempotency-key", &key)
                .json(&json!({ "quantity": quantity }))
                .timeout(Duration::from_secs(1))
                .send()
                .await;
            let Ok(answer) = answer else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let status = answer.status().as_u16();
            let body: serde_json::Value = answer.json().await.unwrap_or_default();
            if status == 200 {
                let position: Position = body["consistency_token"]
                    .as_str()
                    .expect("token")
                    .parse()
                    .expect("position");
                let version = body["version"].as_u64().expect("version");
                let mut seen = seen.lock().unwrap();
                let now = Instant::now();
                if let Some(last) = seen.last_ack {
                    seen.longest_gap = seen.longest_gap.max(now - last);
                }
                seen.last_ack = Some(now);
                seen.acknowledged
                    .push((sku.clone(), quantity, version, position));
                break;
            }
            assert_eq!(status, 503, "an unexpected answer: {body}");
            assert!(
                attempt < 3_000,
                "{key} was never acknowledged; last answer {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Every acknowledged receipt is effective in the log at its position; the stock the log adds
/// up to is exactly what was acknowledged. Returns it, per SKU.
async fn check_log(settings: &Settings, seen: &Seen) -> BTreeMap<String, i64> {
    let log = open_log(Backend::Kafka, settings).await;
    let topic = event_log::topics::events(&settings.store.topic_prefix, "stock");
    let mut effective: HashMap<Position, (String, u64)> = HashMap::new();
    let mut on_hand: BTreeMap<String, i64> = BTreeMap::new();
    for partition in 0..settings.partitions {
        let mut history = EffectiveHistory::new();
        for (position, envelope) in read_partition(&log, &topic, partition).await {
            if history
                .observe(&envelope.aggregate_id, envelope.aggregate_version)
                .is_effective()
            {
                let quantity = envelope.data["quantity"].as_i64().unwrap_or(0);
                *on_hand.entry(envelope.aggregate_id.clone()).or_default() += quantity;
                effective.insert(
                    position,
                    (envelope.aggregate_id.clone(), envelope.aggregate_version),
                );
            }
        }
    }
    let mut acknowledged_on_hand: BTreeMap<String, i64> = BTreeMap::new();
    for (sku, quantity, version, position) in &seen.acknowledged {
        assert_eq!(
            effective.get(position),
            Some(&(sku.clone(), *version)),
            "the acknowledged receipt at {position} is effective"
        );
        *acknowledged_on_hand.entry(sku.clone()).or_default() += quantity;
    }
    assert_eq!(
        on_hand, acknowledged_on_hand,
        "the log holds exactly the acknowledged receipts"
    );
    on_hand
}

/// The read model equals the log, once the projections have caught up.
async fn check_read_model(query: &str, on_hand: &BTreeMap<String, i64>) {
    let client = http_client();
    let deadline = Instant::now() + Duration::from_secs(60);
    for (sku, expected) in on_hand {
        loop {
            let level: serde_json::Value = client
                .get(format!("{query}/inventory/{sku}"))
                .send()
                .await
                .expect("query")
                .json()
                .await
                .unwrap_or_default();
            if level["on_hand"].as_i64() == Some(*expected) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{sku}: the read model shows {level}, the log adds up to {expected}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
