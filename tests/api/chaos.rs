//! The chaos test: hundreds of orders with mixed payment tokens and scarce stock, some cancelled
//! and some shipped, while the saga orchestrator and the command services are killed (-9) and
//! restarted at random moments. After recovery every saga has finished (an operator retries any
//! parked one), stock and money are conserved, and no command took effect twice: checked against
//! the log itself, folded with the domain's own `evolve` under the effective-history rule, and
//! against the read models.
//!
//! Kafka + Postgres: each part runs as its own process (`serve order|inventory|payment|saga|
//! projections`); the orchestrator and a command service chosen at random are the victims.
//! Embedded: one process (`serve`), killed and restarted whole. `CHAOS_LOG_DIR=<dir>` (with
//! `TEST_LOG=1` for the level) writes each part's log to `<dir>/<part>.log`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use domain::Aggregate;
use domain::order::{OrderAggregate, OrderState, OrderStatus};
use domain::payment::{PaymentAggregate, PaymentState};
use domain::stock::{StockAggregate, StockItem};
use event_schema::{EffectiveHistory, Envelope};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::durability::read_topic;
use crate::helpers::{Backend, backends, open_log, platform_binary, settings};

const ORDERS: usize = 500;
const CLIENTS: usize = 12;
const SKUS: usize = 12;
const STOCK_PER_SKU: i64 = 60;

/// A small deterministic generator (xorshift), seeded per run and printed, so a failing run's
/// choices can be replayed with `CHAOS_SEED`.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let seed = std::env::var("CHAOS_SEED")
            .ok()
            .and_then(|seed| seed.parse().ok())
            .unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0 | 1);
        eprintln!("chaos seed: {seed} (CHAOS_SEED={seed} repeats this run's choices)");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One platform process, restartable on the same port.
pub(crate) struct Part {
    name: &'static str,
    port: u16,
    child: Option<Child>,
}

impl Part {
    pub(crate) fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The process id, while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

/// Starts `serve <part>` on `port` and waits until it is ready.
pub(crate) async fn start(settings: &platform::Settings, name: &'static str, port: u16) -> Part {
    let mut command = Command::new(platform_binary());
    command
        .arg("serve")
        .arg(name)
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
        .arg("--saga-timeout-ms")
        .arg(settings.saga.timeout_ms.to_string())
        .arg("--saga-compensation-timeout-ms")
        .arg(settings.saga.compensation_timeout_ms.to_string())
        .arg("--saga-max-attempts")
        .arg(settings.saga.max_attempts.to_string())
        // The test's clients carry no credentials (authentication has its own tests).
        .arg("--auth")
        .arg("off")
        .env(
            "RUST_LOG",
            if std::env::var("TEST_LOG").is_ok() {
                "info,sqlx=warn,rdkafka=warn"
            } else {
                "error"
            },
        )
        .env_remove("DATABASE_URL")
        .env_remove("PLATFORM_KAFKA")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if let Ok(dir) = std::env::var("CHAOS_LOG_DIR") {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(format!("{dir}/{name}.log"))
            .expect("log file");
        command.stdout(file);
    }
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
    let mut part = Part {
        name,
        port,
        child: Some(child),
    };
    let client = crate::helpers::http_client();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(response) = client
            .get(format!("{}/health/ready", part.address()))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            && response.status() == 200
        {
            return part;
        }
        if let Some(child) = part.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!("serve {name} exited at start: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "serve {name} did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The processes of one platform, and where clients reach each API.
struct Topology {
    parts: Vec<Part>,
    /// Where orders are placed and cancelled (order command API).
    orders: String,
    /// Where stock is received (inventory command API).
    inventory: String,
    /// The query API (read models).
    query: String,
    /// The saga API.
    sagas: String,
}

async fn start_topology(backend: Backend, settings: &platform::Settings) -> Topology {
    match backend {
        Backend::Embedded => {
            let all = start(settings, "all", free_port()).await;
            let address = all.address();
            Topology {
                parts: vec![all],
                orders: address.clone(),
                inventory: address.clone(),
                query: address.clone(),
                sagas: address,
            }
        }
        Backend::Kafka => {
            let mut parts = Vec::new();
            for name in ["order", "inventory", "payment", "saga", "projections"] {
                parts.push(start(settings, name, free_port()).await);
            }
            Topology {
                orders: parts[0].address(),
                inventory: parts[1].address(),
                sagas: parts[3].address(),
                query: parts[4].address(),
                parts,
            }
        }
    }
}

/// Sends until the platform answers other than with a transport error or a 5xx (a process is
/// down or restarting); then returns the status and body.
async fn send(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<&Value>,
    key: Option<&str>,
) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut request = client
            .request(method.clone(), url)
            .timeout(Duration::from_secs(5));
        if let Some(body) = body {
            request = request.json(body);
        }
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        if let Ok(response) = request.send().await {
            let status = response.status().as_u16();
            if status < 500 {
                let body = response.json().await.unwrap_or(Value::Null);
                return (status, body);
            }
        }
        assert!(Instant::now() < deadline, "{method} {url} never answered");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

const TOKENS: [&str; 10] = [
    "tok_approve",
    "tok_approve",
    "tok_approve",
    "tok_approve",
    "tok_approve",
    "tok_decline",
    "tok_decline",
    "tok_flaky",
    "tok_flaky",
    "tok_timeout",
];

fn sku(n: u64) -> String {
    format!("SKU-CH{n}")
}

/// What a client does with order `index` after placing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FollowUp {
    None,
    /// Cancel at once, racing the saga.
    Cancel,
    /// Ship once it is confirmed.
    Ship,
    /// Cancel once it is confirmed (refund and restock).
    CancelConfirmed,
}

async fn client_task(
    rng: Arc<Mutex<Rng>>,
    next: Arc<AtomicUsize>,
    orders_url: String,
    query_url: String,
) -> Vec<String> {
    let client = crate::helpers::http_client();
    let mut placed = Vec::new();
    let mut later = Vec::new();
    loop {
        let index = next.fetch_add(1, Ordering::SeqCst);
        if index >= ORDERS {
            break;
        }
        let (body, follow_up) = {
            let mut rng = rng.lock().await;
            let token = TOKENS[rng.below(TOKENS.len() as u64) as usize];
            let first = rng.below(SKUS as u64);
            let mut lines = vec![json!({
                "sku": sku(first),
                "quantity": 1 + rng.below(3),
                "unit_price_minor": 100 + rng.below(900),
            })];
            if rng.below(2) == 0 {
                lines.push(json!({
                    "sku": sku((first + 1 + rng.below(SKUS as u64 - 1)) % SKUS as u64),
                    "quantity": 1 + rng.below(2),
                    "unit_price_minor": 100 + rng.below(900),
                }));
            }
            let follow_up = match rng.below(10) {
                0 => FollowUp::Cancel,
                1 | 2 => FollowUp::Ship,
                3 => FollowUp::CancelConfirmed,
                _ => FollowUp::None,
            };
            (
                json!({"customer_id": format!("chaos-{}", index % 17), "currency": "EUR",
                       "payment_token": token, "lines": lines}),
                follow_up,
            )
        };
        let (status, reply) = send(
            &client,
            reqwest::Method::POST,
            &format!("{orders_url}/orders"),
            Some(&body),
            Some(&format!("chaos-order-{index}")),
        )
        .await;
        assert!(
            status == 201 || status == 200,
            "placing order {index}: {status} {reply}"
        );
        let order_id = reply["order_id"].as_str().expect("order id").to_owned();
        match follow_up {
            FollowUp::Cancel => {
                let (status, reply) = send(
                    &client,
                    reqwest::Method::POST,
                    &format!("{orders_url}/orders/{order_id}/cancel"),
                    Some(&json!({"reason": "chaos"})),
                    None,
                )
                .await;
                // 409: the saga got there first (rejected).
                assert!(
                    status == 200 || status == 409,
                    "cancel {order_id}: {status} {reply}"
                );
            }
            FollowUp::Ship | FollowUp::CancelConfirmed => later.push((order_id.clone(), follow_up)),
            FollowUp::None => {}
        }
        placed.push(order_id);
    }
    // Ship or cancel the confirmed ones, while the chaos goes on, all at once (an order still
    // pending after 30 s, slowed down by the chaos, is left as it is).
    let mut follow_ups = Vec::new();
    for (order_id, follow_up) in later {
        let client = client.clone();
        let (orders_url, query_url) = (orders_url.clone(), query_url.clone());
        follow_ups.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let (status, order) = send(
                    &client,
                    reqwest::Method::GET,
                    &format!("{query_url}/orders/{order_id}"),
                    None,
                    None,
                )
                .await;
                let state = if status == 200 {
                    order["status"].as_str().unwrap_or_default().to_owned()
                } else {
                    "unknown".to_owned()
                };
                if state == "rejected" || state == "cancelled" || state == "shipped" {
                    break;
                }
                if state == "confirmed" {
                    let path = if follow_up == FollowUp::Ship {
                        "ship"
                    } else {
                        "cancel"
                    };
                    let (status, reply) = send(
                        &client,
                        reqwest::Method::POST,
                        &format!("{orders_url}/orders/{order_id}/{path}"),
                        Some(&json!({})),
                        None,
                    )
                    .await;
                    assert!(
                        status == 200 || status == 409,
                        "{path} {order_id}: {status} {reply}"
                    );
                    break;
                }
                if Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }));
    }
    for follow_up in follow_ups {
        follow_up.await.expect("follow-up task");
    }
    placed
}

/// At least this many kills per run, even when the load is through sooner.
const MIN_KILLS: usize = 4;

/// The session timeout of the platform's consumer groups (`event-log/src/kafka.rs`). A member
/// killed with -9 stays in its group until the broker has not heard from it for this long; only
/// then is the group rebalanced and the restarted process given partitions. The orchestrator
/// consumes the participants' events in such a group, so it resumes only this long after a kill.
const GROUP_SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// Kills a victim with -9 at random moments and restarts it after a random pause, until `stop`
/// and at least [`MIN_KILLS`] kills; returns the victims.
///
/// Each process runs for a while between kills, so the platform makes progress under the chaos
/// rather than only once it stops: in one process (embedded) 0.6-2.4 s, which is plenty for a
/// restart; with each part its own process (Kafka), the group session timeout plus 0.5-3.5 s,
/// because a kill of the orchestrator stops every saga until its group has rebalanced. (Kills
/// every 2-4 s there kept the orchestrator out of its group for the whole load: it was never
/// assigned a partition until the chaos stopped, so no saga step ran under the chaos at all.)
async fn chaos(
    topology: Arc<Mutex<Topology>>,
    rng: Arc<Mutex<Rng>>,
    stop: Arc<AtomicBool>,
    settings: platform::Settings,
) -> Vec<&'static str> {
    let mut kills = Vec::new();
    let mut round = 0u64;
    let distributed = topology.lock().await.parts.len() > 1;
    while !stop.load(Ordering::SeqCst) || kills.len() < MIN_KILLS {
        let (pause, victim, down) = {
            let mut rng = rng.lock().await;
            let pause = if distributed {
                GROUP_SESSION_TIMEOUT.as_millis() as u64 + 500 + rng.below(3_000)
            } else {
                600 + rng.below(1_800)
            };
            // Kafka: the orchestrator every other time, else a command service at random.
            let victim = if round.is_multiple_of(2) {
                3
            } else {
                rng.below(3) as usize
            };
            (pause, victim, rng.below(800))
        };
        round += 1;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let mut topology = topology.lock().await;
        let index = if topology.parts.len() == 1 { 0 } else { victim };
        let part = &mut topology.parts[index];
        let (name, port) = (part.name, part.port);
        part.kill();
        kills.push(name);
        tokio::time::sleep(Duration::from_millis(down)).await;
        let restart = Instant::now();
        *part = start(&settings, name, port).await;
        eprintln!(
            "chaos: killed {name}, down {down} ms, ready again {} ms after its restart",
            restart.elapsed().as_millis()
        );
    }
    kills
}

/// Polls the saga API until every order's saga is in one of `states`; the sagas not there yet
/// when it gives up are in the panic message.
async fn sagas_until(
    sagas_url: &str,
    orders: &[String],
    states: &[&str],
    limit: Duration,
) -> HashMap<String, Value> {
    let client = crate::helpers::http_client();
    let deadline = Instant::now() + limit;
    let mut done: HashMap<String, Value> = HashMap::new();
    loop {
        let mut waiting = Vec::new();
        for order_id in orders {
            if done.contains_key(order_id) {
                continue;
            }
            let (status, body) = send(
                &client,
                reqwest::Method::GET,
                &format!("{sagas_url}/sagas/{order_id}"),
                None,
                None,
            )
            .await;
            let state = body["saga"]["state"].as_str().unwrap_or_default();
            if status == 200 && states.contains(&state) {
                done.insert(order_id.clone(), body["saga"].clone());
            } else {
                waiting.push(format!(
                    "{order_id}: {status} {}",
                    if status == 200 {
                        state.to_owned()
                    } else {
                        body.to_string()
                    }
                ));
            }
        }
        if waiting.is_empty() {
            return done;
        }
        assert!(
            Instant::now() < deadline,
            "{} sagas never reached {states:?}, e.g. {:?}",
            waiting.len(),
            &waiting[..waiting.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The state of every aggregate, folded from the log by the effective-history rule.
#[derive(Default)]
struct Folded {
    orders: HashMap<String, OrderState>,
    payments: HashMap<String, PaymentState>,
    stock: BTreeMap<String, StockItem>,
    /// Effective events per (aggregate id, event type, order id): each at most once.
    effects: HashMap<(String, String, String), u32>,
}

async fn fold(backend: Backend, settings: &platform::Settings) -> Folded {
    let log = open_log(backend, settings).await;
    let mut folded = Folded::default();
    let mut commands = HashSet::new();
    for aggregate in ["order", "payment", "stock"] {
        let topic = event_log::topics::events(&settings.store.topic_prefix, aggregate);
        let records: Vec<(event_log::Position, Envelope)> =
            read_topic(&log, &topic, settings.partitions).await;
        let mut history = EffectiveHistory::new();
        for (position, envelope) in records {
            if !history
                .observe(&envelope.aggregate_id, envelope.aggregate_version)
                .is_effective()
            {
                continue;
            }
            assert!(
                commands.insert(envelope.command_id),
                "{backend:?}: command {} took effect twice (again at {position:?})",
                envelope.command_id
            );
            let id = envelope.aggregate_id.clone();
            let order_of = match aggregate {
                "order" => {
                    let event = envelope.event::<OrderAggregate>().expect("order event");
                    let state = folded.orders.remove(&id).unwrap_or_default();
                    folded
                        .orders
                        .insert(id.clone(), OrderAggregate::evolve(state, &event));
                    id.clone()
                }
                "payment" => {
                    let event = envelope.event::<PaymentAggregate>().expect("payment event");
                    let state = folded.payments.remove(&id).unwrap_or_default();
                    folded
                        .payments
                        .insert(id.clone(), PaymentAggregate::evolve(state, &event));
                    id.clone()
                }
                _ => {
                    let event = envelope.event::<StockAggregate>().expect("stock event");
                    let state = folded.stock.remove(&id).unwrap_or_default();
                    folded
                        .stock
                        .insert(id.clone(), StockAggregate::evolve(state, &event));
                    envelope.data["order_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned()
                }
            };
            *folded
                .effects
                .entry((id, envelope.event_type.clone(), order_of))
                .or_default() += 1;
        }
    }
    folded
}

async fn run(backend: Backend) {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = settings(backend, dir.path());
    settings.partitions = 4;
    // Long enough that a kill of a participant seldom gives a healthy order up; tok_timeout
    // orders are compensated after it.
    settings.saga.timeout_ms = 10_000;
    settings.saga.compensation_timeout_ms = 3_000;
    settings.saga.max_attempts = 6;
    let topology = start_topology(backend, &settings).await;
    eprintln!(
        "chaos {backend:?}: started ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    let client = crate::helpers::http_client();
    for n in 0..SKUS as u64 {
        let (status, reply) = send(
            &client,
            reqwest::Method::POST,
            &format!("{}/inventory/{}/receipts", topology.inventory, sku(n)),
            Some(&json!({"quantity": STOCK_PER_SKU})),
            Some(&format!("chaos-receipt-{n}")),
        )
        .await;
        assert_eq!(status, 200, "{backend:?}: receipt: {reply}");
    }
    let (orders_url, query_url, sagas_url) = (
        topology.orders.clone(),
        topology.query.clone(),
        topology.sagas.clone(),
    );
    let topology = Arc::new(Mutex::new(topology));
    let rng = Arc::new(Mutex::new(Rng::seeded()));
    let stop = Arc::new(AtomicBool::new(false));
    let chaos_task = tokio::spawn(chaos(
        topology.clone(),
        rng.clone(),
        stop.clone(),
        settings.clone(),
    ));
    let next = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(tokio::spawn(client_task(
            rng.clone(),
            next.clone(),
            orders_url.clone(),
            query_url.clone(),
        )));
    }
    let mut orders = Vec::new();
    for client in clients {
        orders.extend(client.await.expect("client task"));
    }
    stop.store(true, Ordering::SeqCst);
    let kills = chaos_task.await.expect("chaos task");
    let load_done = started.elapsed();
    eprintln!(
        "chaos {backend:?}: load done, {} kills ({:.1} s)",
        kills.len(),
        load_done.as_secs_f64()
    );
    assert_eq!(orders.len(), ORDERS, "{backend:?}: every order placed");

    // Recovery: every saga ends or is parked; an operator retries the parked ones.
    let terminal = ["confirmed", "completed", "rejected", "cancelled"];
    let mut resting: Vec<&str> = terminal.to_vec();
    resting.push("needs_attention");
    let settled = sagas_until(&sagas_url, &orders, &resting, Duration::from_secs(180)).await;
    let parked: Vec<&String> = settled
        .iter()
        .filter(|(_, saga)| saga["state"] == "needs_attention")
        .map(|(id, _)| id)
        .collect();
    for order_id in &parked {
        let (status, reply) = send(
            &client,
            reqwest::Method::POST,
            &format!("{sagas_url}/sagas/{order_id}/retry"),
            Some(&json!({})),
            None,
        )
        .await;
        assert_eq!(status, 200, "{backend:?}: retry {order_id}: {reply}");
    }
    let sagas = sagas_until(&sagas_url, &orders, &terminal, Duration::from_secs(120)).await;
    let settle_done = started.elapsed();
    eprintln!(
        "chaos {backend:?}: settled ({:.1} s)",
        settle_done.as_secs_f64()
    );

    // The log, folded with the domain's own evolve.
    let folded = fold(backend, &settings).await;
    for ((aggregate, event_type, order_id), count) in &folded.effects {
        let once = [
            "stock.reserved",
            "stock.reservation_rejected",
            "stock.reservation_released",
            "stock.reservation_committed",
            "payment.authorised",
            "payment.declined",
            "payment.captured",
            "payment.refunded",
            "payment.voided",
            "order.placed",
            "order.confirmed",
            "order.rejected",
            "order.cancelled",
            "order.shipped",
        ];
        if once.contains(&event_type.as_str()) {
            assert_eq!(
                *count, 1,
                "{backend:?}: {event_type} of {aggregate} for order {order_id} took effect {count} times"
            );
        }
    }
    let mut reserved: BTreeMap<String, u64> = BTreeMap::new();
    let mut shipped: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_status: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut captured_total = 0i64;
    let mut confirmed_total = 0i64;
    for order_id in &orders {
        let order = folded
            .orders
            .get(order_id)
            .and_then(OrderState::order)
            .unwrap_or_else(|| panic!("{backend:?}: order {order_id} is in the log"));
        *by_status.entry(order.status.as_str()).or_default() += 1;
        let saga_state = sagas[order_id]["state"].as_str().unwrap_or_default();
        let expected_saga = match order.status {
            OrderStatus::Confirmed => "confirmed",
            OrderStatus::Shipped => "completed",
            OrderStatus::Rejected => "rejected",
            OrderStatus::Cancelled => "cancelled",
            OrderStatus::Pending => panic!("{backend:?}: order {order_id} still pending"),
        };
        assert_eq!(
            saga_state, expected_saga,
            "{backend:?}: order {order_id} is {:?}",
            order.status
        );
        let net = folded
            .payments
            .get(order_id)
            .and_then(PaymentState::payment)
            .map(|payment| payment.captured_minor - payment.refunded_minor)
            .unwrap_or(0);
        let kept = matches!(order.status, OrderStatus::Confirmed | OrderStatus::Shipped);
        let expected = if kept { order.total.amount_minor } else { 0 };
        assert_eq!(
            net, expected,
            "{backend:?}: order {order_id} ({:?}) keeps {net} of the customer's money",
            order.status
        );
        captured_total += net;
        if kept {
            confirmed_total += order.total.amount_minor;
        }
        for line in &order.lines {
            let quantity = u64::from(line.quantity.get());
            match order.status {
                OrderStatus::Confirmed => {
                    *reserved.entry(line.sku.to_string()).or_default() += quantity
                }
                OrderStatus::Shipped => {
                    *shipped.entry(line.sku.to_string()).or_default() += quantity
                }
                _ => {}
            }
        }
    }
    assert_eq!(captured_total, confirmed_total, "{backend:?}: money");
    for n in 0..SKUS as u64 {
        let sku = sku(n);
        let item = &folded.stock[&sku];
        let shipped = shipped.get(&sku).copied().unwrap_or(0);
        let held = reserved.get(&sku).copied().unwrap_or(0);
        assert_eq!(
            item.on_hand,
            STOCK_PER_SKU as u64 - shipped,
            "{backend:?}: {sku} on hand = received - shipped"
        );
        assert_eq!(
            item.reserved, held,
            "{backend:?}: {sku} reserved = the confirmed orders' lines ({:?})",
            item.reservations
        );
    }
    assert!(
        by_status.get("confirmed").copied().unwrap_or(0)
            + by_status.get("shipped").copied().unwrap_or(0)
            > 0
            && by_status.get("rejected").copied().unwrap_or(0) > 0,
        "{backend:?}: the mix reached both ends: {by_status:?}"
    );
    // Clients ship confirmed orders only while the chaos goes on (each gives up 30 s after its
    // last placement), so a shipped order shows that sagas got through under the kills, not
    // only once they stopped.
    assert!(
        by_status.get("shipped").copied().unwrap_or(0) > 0,
        "{backend:?}: no order was confirmed and shipped while the chaos went on: {by_status:?}"
    );

    eprintln!(
        "chaos {backend:?}: log folded and checked ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    // The read models agree with the log (once the projections have caught up).
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in 0..SKUS as u64 {
        let sku = sku(n);
        let item = &folded.stock[&sku];
        loop {
            let (status, body) = send(
                &client,
                reqwest::Method::GET,
                &format!("{query_url}/inventory/{sku}"),
                None,
                None,
            )
            .await;
            if status == 200
                && body["on_hand"].as_u64() == Some(item.on_hand)
                && body["reserved"].as_u64() == Some(item.reserved)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{backend:?}: read model of {sku} is {body}, the log says on hand {} reserved {}",
                item.on_hand,
                item.reserved
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eprintln!(
        "chaos {backend:?}: {ORDERS} orders, {} kills ({kills:?}), {} parked and retried; orders {by_status:?}; \
         load {:.1} s, settled {:.1} s, total {:.1} s",
        kills.len(),
        parked.len(),
        load_done.as_secs_f64(),
        settle_done.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let mut topology = topology.lock().await;
    for part in &mut topology.parts {
        part.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_survive_kill_9_of_the_orchestrator_and_the_command_services_under_load() {
    for backend in backends() {
        run(backend).await;
    }
}
