//! Starting a platform for a test, and talking to it.

use std::path::PathBuf;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use event_log::embedded::EmbeddedLog;
use event_log::kafka::{KafkaLog, KafkaSettings};
use event_log::{Position, SharedLog};
use event_schema::Envelope;
use platform::{Part, Platform, Settings};
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// Which backend a test platform runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Kafka,
}

/// Every backend this run can test.
pub fn backends() -> Vec<Backend> {
    let mut backends = vec![Backend::Embedded];
    let kafka =
        std::env::var("TEST_KAFKA_BROKERS").is_ok() && std::env::var("TEST_DATABASE_URL").is_ok();
    if kafka {
        backends.push(Backend::Kafka);
    } else if std::env::var("TEST_REQUIRE_BACKENDS").is_ok_and(|value| value == "1") {
        panic!("TEST_REQUIRE_BACKENDS=1 but TEST_KAFKA_BROKERS / TEST_DATABASE_URL are not set");
    }
    backends
}

fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var("TEST_LOG").is_ok() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "info,sqlx=warn".into()),
                ))
                .with_test_writer()
                .try_init();
        }
    });
}

/// Settings for a fresh, isolated platform on `backend` (its own data dir, topic prefix and
/// schema prefix).
pub fn settings(backend: Backend, dir: &std::path::Path) -> Settings {
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let mut settings = Settings::embedded(dir);
    settings.store.topic_prefix = format!("t{}", &unique[..12]);
    settings.store.schema_prefix = format!("t{}_", &unique[..12]);
    settings.partitions = 4;
    // The saga acts on every order a test places; it waits this long for a payment that never
    // answers (`tok_timeout`), so such an order stays pending for the test unless it says so.
    settings.saga.timeout_ms = 120_000;
    if backend == Backend::Kafka {
        settings.store.kafka = std::env::var("TEST_KAFKA_BROKERS").ok();
        settings.store.database_url = std::env::var("TEST_DATABASE_URL").ok();
    }
    settings
}

/// A running platform.
pub struct TestApp {
    pub backend: Backend,
    pub address: String,
    pub client: reqwest::Client,
    pub settings: Settings,
    pub dir: Arc<tempfile::TempDir>,
    pub read: Option<projections::ReadSide>,
    /// The platform's long-running tasks.
    pub supervisor: supervisor::Supervisor,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl TestApp {
    /// Starts a fresh platform on `backend` and waits until it is ready.
    pub async fn spawn(backend: Backend) -> TestApp {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let settings = settings(backend, dir.path());
        TestApp::spawn_with(backend, settings, dir).await
    }

    /// Starts a platform with these settings (e.g. again on the data of a stopped one).
    pub async fn spawn_with(
        backend: Backend,
        settings: Settings,
        dir: Arc<tempfile::TempDir>,
    ) -> TestApp {
        init_logging();
        let platform = Platform::build(settings.clone(), Part::All)
            .await
            .expect("build the platform");
        let address = format!("http://{}", platform.local_addr());
        let read = platform.read_side().cloned();
        let supervisor = platform.supervisor().clone();
        assert!(
            platform
                .commands()
                .wait_ready(Duration::from_secs(60))
                .await,
            "the platform did not become ready"
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
        TestApp {
            backend,
            address,
            client: http_client(),
            settings,
            dir,
            read,
            supervisor,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Stops the server gracefully (the owners write their snapshots).
    pub async fn stop(mut self) -> (Settings, Arc<tempfile::TempDir>) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task");
        }
        (self.settings.clone(), self.dir.clone())
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.post_with(path, body, &[]).await
    }

    pub async fn post_with(&self, path: &str, body: Value, headers: &[(&str, &str)]) -> Reply {
        let mut request = self.client.post(self.url(path)).json(&body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Reply::from(request.send().await.expect("send request")).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        Reply::from(
            self.client
                .get(self.url(path))
                .send()
                .await
                .expect("send request"),
        )
        .await
    }

    pub async fn receive(&self, sku: &str, quantity: i64) -> Reply {
        self.post(
            &format!("/inventory/{sku}/receipts"),
            json!({ "quantity": quantity }),
        )
        .await
    }

    /// An order that stays `pending` (stock is received for its line and its payment never
    /// answers) until the test moves it on.
    pub async fn place_pending_order(&self, sku: &str) -> Reply {
        self.receive(sku, 100).await.expect(200);
        self.place_order("tok_timeout", &[(sku, 1, 100)]).await
    }

    pub async fn place_order(&self, token: &str, lines: &[(&str, i64, i64)]) -> Reply {
        let lines: Vec<Value> = lines
            .iter()
            .map(|(sku, quantity, price)| json!({"sku": sku, "quantity": quantity, "unit_price_minor": price}))
            .collect();
        self.post(
            "/orders",
            json!({"customer_id": "c-1", "currency": "EUR", "payment_token": token, "lines": lines}),
        )
        .await
    }

    /// A separate client of the same event log.
    pub async fn log(&self) -> SharedLog {
        open_log(self.backend, &self.settings).await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub async fn open_log(backend: Backend, settings: &Settings) -> SharedLog {
    match backend {
        Backend::Embedded => Arc::new(
            EmbeddedLog::open(settings.store.data_dir.join("log.db"))
                .await
                .expect("open the embedded log"),
        ),
        Backend::Kafka => Arc::new(
            KafkaLog::connect(KafkaSettings::new(
                settings.store.kafka.clone().expect("kafka brokers"),
            ))
            .await
            .expect("connect to Kafka"),
        ),
    }
}

/// How long a test waits for any one answer: a request the server never answers fails the test
/// with the request named, instead of hanging the suite.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// The tests' HTTP client.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("build the HTTP client")
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    async fn from(response: reqwest::Response) -> Reply {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("read body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// Asserts the status, showing the body when it differs.
    #[track_caller]
    pub fn expect(&self, status: u16) -> &Value {
        assert_eq!(
            self.status, status,
            "unexpected status; body: {}",
            self.body
        );
        &self.body
    }

    /// Asserts a problem+json answer with this status.
    #[track_caller]
    pub fn expect_problem(&self, status: u16) -> &Value {
        self.expect(status);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "problems are problem+json"
        );
        assert_eq!(self.body["status"], status);
        &self.body
    }

    pub fn version(&self) -> u64 {
        self.body["version"]
            .as_u64()
            .expect("a version in the body")
    }
}

/// The path of the platform binary, for tests that run it as a process.
pub fn platform_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_platform"))
}

/// `platform <args>` as an operator runs it beside `settings`' platform: the same data
/// directory, topic and schema prefixes, broker and database.
pub fn operator_command(settings: &Settings, args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(platform_binary());
    command
        .args(args)
        .arg("--data-dir")
        .arg(&settings.store.data_dir)
        .args(["--topic-prefix", &settings.store.topic_prefix])
        .args(["--schema-prefix", &settings.store.schema_prefix]);
    if let Some(kafka) = &settings.store.kafka {
        command.args(["--kafka", kafka]);
    }
    if let Some(url) = &settings.store.database_url {
        command.args(["--database-url", url]);
    }
    command
}

/// Every record of a partition, from its start to where it ended when asked.
pub async fn read_partition(
    log: &SharedLog,
    topic: &str,
    partition: u32,
) -> Vec<(Position, Envelope)> {
    read_records(log, topic, partition)
        .await
        .into_iter()
        .map(|record| {
            let envelope = Envelope::try_from(&record.record).expect("decode");
            (record.position, envelope)
        })
        .collect()
}

/// Every record of a partition, from its start to its end as it is when called.
pub async fn read_records(
    log: &SharedLog,
    topic: &str,
    partition: u32,
) -> Vec<event_log::LogRecord> {
    let end = log.end_offset(topic, partition).await.expect("end");
    let mut records = Vec::new();
    if end == 0 {
        return records;
    }
    let mut reader = log.reader(topic, &[(partition, 0)]).await.expect("reader");
    let mut read = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while read < end {
        assert!(
            Instant::now() < deadline,
            "{topic}:{partition} was not read to its end"
        );
        for record in reader
            .poll(1000, Duration::from_millis(300))
            .await
            .expect("poll")
        {
            read = record.position.offset + 1;
            records.push(record);
        }
    }
    records
}
