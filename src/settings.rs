//! One typed settings struct, filled from command-line flags with environment fallbacks. The
//! doc comment of each field is its `--help` text.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Which part of the platform a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Every part in one process.
    All,
    /// The order command service.
    Order,
    /// The payment command service.
    Payment,
    /// The inventory command service.
    Inventory,
    /// The projection workers and the query API.
    Projections,
    /// The order-fulfilment saga orchestrator.
    Saga,
}

#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Kafka bootstrap servers (`host:port,...`). Without it the embedded log in --data-dir is
    /// used and no server is needed.
    #[arg(long, global = true, env = "PLATFORM_KAFKA")]
    pub kafka: Option<String>,

    /// Postgres URL for the command side's snapshots (and, later, read models). Required with
    /// --kafka. Never logged.
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Where the embedded backend keeps its SQLite files.
    #[arg(
        long,
        global = true,
        env = "PLATFORM_DATA_DIR",
        default_value = "./data"
    )]
    pub data_dir: PathBuf,

    /// The address the HTTP API listens on (port 0 picks a free port).
    #[arg(
        long,
        global = true,
        env = "PLATFORM_HTTP_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub http_addr: SocketAddr,

    /// Prefix of every topic name (`<prefix>.order.events`), so tenants and tests can share a
    /// cluster.
    #[arg(
        long,
        global = true,
        env = "PLATFORM_TOPIC_PREFIX",
        default_value = "fulfilment"
    )]
    pub topic_prefix: String,

    /// Prefix of every Postgres schema the platform creates.
    #[arg(
        long,
        global = true,
        env = "PLATFORM_SCHEMA_PREFIX",
        default_value = ""
    )]
    pub schema_prefix: String,

    /// Partitions of each topic, used when the topics are created.
    #[arg(long, global = true, env = "PLATFORM_PARTITIONS", default_value_t = 8)]
    pub partitions: u32,

    /// This instance's index (0-based) when a command service runs as several instances; it
    /// owns the partitions p with p % instances == instance.
    #[arg(long, global = true, env = "PLATFORM_INSTANCE", default_value_t = 0)]
    pub instance: u32,

    /// How many instances of each command service run.
    #[arg(long, global = true, env = "PLATFORM_INSTANCES", default_value_t = 1)]
    pub instances: u32,

    /// How long the Kafka producer lingers to fill a batch, in ms.
    #[arg(
        long,
        global = true,
        env = "PLATFORM_KAFKA_LINGER_MS",
        default_value_t = 2
    )]
    pub kafka_linger_ms: u32,

    /// Kafka fetch.wait.max.ms for tailing readers. Keep it small: some brokers (nisshi) do not
    /// answer a fetch early when data arrives.
    #[arg(
        long,
        global = true,
        env = "PLATFORM_KAFKA_FETCH_WAIT_MS",
        default_value_t = 5
    )]
    pub kafka_fetch_wait_ms: u32,

    /// Take a partition's snapshot after this many new events.
    #[arg(
        long,
        global = true,
        env = "PLATFORM_SNAPSHOT_EVERY",
        default_value_t = 5000
    )]
    pub snapshot_every: u64,

    /// /health/ready answers 503 while a projection lags more than this many seconds.
    #[arg(
        long,
        global = true,
        env = "PLATFORM_MAX_LAG_SECONDS",
        default_value_t = 30.0
    )]
    pub max_lag_seconds: f64,

    /// How long the saga waits for a reservation, an authorisation or a confirmation before it
    /// compensates (ms).
    #[arg(
        long,
        global = true,
        env = "PLATFORM_SAGA_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub saga_timeout_ms: u64,

    /// How long the saga waits for a compensation's acknowledgement before sending it again (ms);
    /// it backs off exponentially from there.
    #[arg(
        long,
        global = true,
        env = "PLATFORM_SAGA_COMPENSATION_TIMEOUT_MS",
        default_value_t = 5_000
    )]
    pub saga_compensation_timeout_ms: u64,

    /// Sends of a compensation before the saga is parked as needs_attention.
    #[arg(
        long,
        global = true,
        env = "PLATFORM_SAGA_MAX_ATTEMPTS",
        default_value_t = 5
    )]
    pub saga_max_attempts: u32,
}

impl Settings {
    /// The saga's timeouts and retries.
    pub fn saga_config(&self) -> saga_orchestrator::SagaConfig {
        let step = std::time::Duration::from_millis(self.saga_timeout_ms);
        saga_orchestrator::SagaConfig {
            reservation_timeout: step,
            payment_timeout: step,
            confirmation_timeout: step,
            compensation_timeout: std::time::Duration::from_millis(
                self.saga_compensation_timeout_ms,
            ),
            max_attempts: self.saga_max_attempts,
            ..saga_orchestrator::SagaConfig::default()
        }
    }

    /// Defaults for tests and tools: embedded backend in `data_dir`, a free port.
    pub fn embedded(data_dir: impl Into<PathBuf>) -> Self {
        Settings {
            kafka: None,
            database_url: None,
            data_dir: data_dir.into(),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            topic_prefix: "fulfilment".into(),
            schema_prefix: String::new(),
            partitions: 8,
            instance: 0,
            instances: 1,
            kafka_linger_ms: 2,
            kafka_fetch_wait_ms: 5,
            snapshot_every: 5000,
            max_lag_seconds: 30.0,
            saga_timeout_ms: 10_000,
            saga_compensation_timeout_ms: 5_000,
            saga_max_attempts: 5,
        }
    }
}
