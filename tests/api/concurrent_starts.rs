//! Every part started at the same moment on a fresh database and a fresh topic prefix (what
//! `docker compose up` or a Deployment's replicas do): all of them start and become ready, and
//! each schema's migrations are recorded once. Kafka + Postgres only: on the embedded backend
//! one process holds the data directory.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use platform::{Part, Platform, Settings};
use projections::db::Db;

use crate::helpers::{Backend, backends, http_client, platform_binary, settings};

/// The parts a deployment runs, each in its own process (projections twice: its workers form
/// one consumer group per projection and scale out).
const PARTS: [&str; 6] = [
    "order",
    "payment",
    "inventory",
    "projections",
    "projections",
    "saga",
];

/// Each schema of `settings`' prefix with migrations: how often each migration is recorded,
/// which must be once.
async fn assert_migrated_once(settings: &Settings) {
    let url = settings
        .store
        .database_url
        .as_deref()
        .expect("a database URL");
    let prefix = &settings.store.schema_prefix;
    let any = Db::postgres(url, &format!("{prefix}command_side"), 1)
        .await
        .expect("connect");
    let schemas: Vec<String> = any
        .fetch_all(
            "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1) ORDER BY nspname",
            &[prefix.as_str().into()],
        )
        .await
        .expect("list the schemas")
        .iter()
        .map(|row| row.text("nspname"))
        .collect();
    if let Db::Postgres(pool) = any {
        pool.close().await;
    }
    let parts = [
        "command_side",
        "saga",
        "orders",
        "inventory",
        "payments",
        "audit",
    ];
    for expected in parts {
        assert!(
            schemas.contains(&format!("{prefix}{expected}")),
            "schema {prefix}{expected} was created: {schemas:?}"
        );
    }
    for schema in &schemas {
        let db = Db::postgres(url, schema, 1).await.expect("connect");
        let rows = db
            .fetch_all(
                "SELECT version, COUNT(*) AS times FROM _sqlx_migrations
                 GROUP BY version ORDER BY version",
                &[],
            )
            .await
            .unwrap_or_else(|error| panic!("read {schema}._sqlx_migrations: {error}"));
        assert!(!rows.is_empty(), "{schema} has migrations");
        for row in &rows {
            assert_eq!(
                row.int("times"),
                1,
                "{schema}: migration {} is recorded once",
                row.int("version")
            );
        }
        if let Db::Postgres(pool) = db {
            pool.close().await;
        }
    }
}

/// In one process: the parts built at once on one schema prefix, as the binary builds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parts_built_at_once_on_a_fresh_database_all_start() {
    if !backends().contains(&Backend::Kafka) {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let settings = settings(Backend::Kafka, dir.path());
    let parts = [
        Part::Order,
        Part::Payment,
        Part::Inventory,
        Part::Projections,
        Part::Projections,
        Part::Saga,
    ];
    let builds: Vec<_> = parts
        .into_iter()
        .map(|part| {
            let settings = settings.clone();
            tokio::spawn(async move { (part, Platform::build(settings, part).await) })
        })
        .collect();
    let mut platforms = Vec::new();
    for build in builds {
        let (part, built) = build.await.expect("the build task");
        match built {
            Ok(platform) => platforms.push(platform),
            Err(error) => panic!("building {part:?} failed: {error:#}"),
        }
    }
    for platform in &platforms {
        assert!(
            platform
                .commands()
                .wait_ready(Duration::from_secs(60))
                .await,
            "a part did not become ready"
        );
    }
    assert_migrated_once(&settings).await;
}

/// One `platform serve <part>` process.
struct Process {
    name: &'static str,
    port: u16,
    child: Child,
    log: std::path::PathBuf,
}

impl Process {
    /// Its log's last lines, to say why it did not start.
    fn tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

fn spawn(settings: &Settings, name: &'static str, index: usize, dir: &std::path::Path) -> Process {
    let port = free_port();
    let log = dir.join(format!("{index}-{name}.log"));
    let file = std::fs::File::create(&log).expect("log file");
    let child = Command::new(platform_binary())
        .arg("serve")
        .arg(name)
        .arg("--data-dir")
        .arg(dir.join(format!("data-{index}")))
        .arg("--http-addr")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--topic-prefix")
        .arg(&settings.store.topic_prefix)
        .arg("--schema-prefix")
        .arg(&settings.store.schema_prefix)
        .arg("--partitions")
        .arg(settings.partitions.to_string())
        .arg("--kafka")
        .arg(settings.store.kafka.as_deref().expect("brokers"))
        .arg("--database-url")
        .arg(
            settings
                .store
                .database_url
                .as_deref()
                .expect("a database URL"),
        )
        // The test's client carries no credentials (authentication has its own tests).
        .arg("--auth")
        .arg("off")
        .env("RUST_LOG", "warn,rdkafka=error")
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log file"))
        .stderr(file)
        .spawn()
        .expect("start the platform binary");
    Process {
        name,
        port,
        child,
        log,
    }
}

/// As separate processes of the built binary, spawned at the same moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_started_as_processes_at_the_same_moment_on_a_fresh_database_all_become_ready() {
    if !backends().contains(&Backend::Kafka) {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let settings = settings(Backend::Kafka, dir.path());
    let mut processes: Vec<Process> = PARTS
        .iter()
        .enumerate()
        .map(|(index, name)| spawn(&settings, name, index, dir.path()))
        .collect();
    let client = http_client();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut waiting: Vec<usize> = (0..processes.len()).collect();
    while !waiting.is_empty() {
        let mut still = Vec::new();
        for index in waiting {
            let process = &mut processes[index];
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!(
                    "serve {} exited at start ({status}):\n{}",
                    process.name,
                    process.tail()
                );
            }
            let ready = client
                .get(format!("http://127.0.0.1:{}/health/ready", process.port))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|response| response.status() == 200);
            if !ready {
                still.push(index);
            }
        }
        waiting = still;
        if !waiting.is_empty() {
            let names: Vec<&str> = waiting.iter().map(|index| processes[*index].name).collect();
            assert!(
                Instant::now() < deadline,
                "not ready after 120 s: {names:?}\n{}",
                processes[waiting[0]].tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_migrated_once(&settings).await;
}
