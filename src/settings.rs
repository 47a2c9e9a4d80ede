//! The typed settings, filled from command-line flags with environment fallbacks. The doc
//! comment of each field is its `--help` text, and its default is written once, in its `#[arg]`
//! attribute ([`Settings::embedded`] starts from those defaults too).
//!
//! Each command takes only the flags it uses:
//! - [`StoreSettings`], where the log and the stores are: every command (`serve` and the
//!   operator tools) opens them by the same flags.
//! - [`SagaSettings`], the saga's timeouts and retries: `serve`, and `sagas` (a retry schedules
//!   the compensation's resends by them).
//! - [`Settings`], all of `serve`: the two above, plus the address, the partitions and their
//!   owners, the Kafka producer's and consumers' tuning, snapshots, idempotency, readiness,
//!   security, the gateway's upstreams and the HTTP server's limits.

use std::net::SocketAddr;
use std::path::PathBuf;

use projections::ReadBackend;

pub use gateway::GatewaySettings;
pub use http_edge::security::{Secret, SecuritySettings, Toggle};
pub use http_edge::serve::HttpSettings;

/// Which part of the platform a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Every part in one process.
    All,
    /// The four command services (order, payment, inventory, customer) in one process.
    Commands,
    /// The order command service.
    Order,
    /// The payment command service.
    Payment,
    /// The inventory command service.
    Inventory,
    /// The customer command service (and the key store its personal fields are sealed with).
    Customer,
    /// The projection workers and the query API.
    Projections,
    /// The order-fulfilment saga orchestrator.
    Saga,
    /// The API gateway in front of the other parts (`--gateway-*` settings).
    Gateway,
}

/// Where the log and the stores are: what every command opens.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreSettings {
    /// Kafka bootstrap servers (`host:port,...`). Without it the embedded log in --data-dir is
    /// used and no server is needed.
    #[arg(long, env = "PLATFORM_KAFKA")]
    pub kafka: Option<String>,

    /// Postgres URL for the command side's snapshots, the read models and the saga's state.
    /// Required with --kafka. Never logged.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Where the embedded backend keeps its SQLite files.
    #[arg(long, env = "PLATFORM_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Prefix of every topic name (`<prefix>.order.events`), so tenants and tests can share a
    /// cluster.
    #[arg(long, env = "PLATFORM_TOPIC_PREFIX", default_value = "fulfilment")]
    pub topic_prefix: String,

    /// Prefix of every Postgres schema the platform creates.
    #[arg(long, env = "PLATFORM_SCHEMA_PREFIX", default_value = "")]
    pub schema_prefix: String,

    /// Kafka `fetch.wait.max.ms` of background readers: replays, rebuilds, the command-topic
    /// readers of `--assignment static` (plain readers never pause when idle) and whatever else
    /// nobody waits on to the millisecond. Longer waits spare the broker fetches (a broker such
    /// as nisshi holds every fetch for its full wait).
    #[arg(
        long,
        env = "PLATFORM_KAFKA_BACKGROUND_FETCH_WAIT_MS",
        default_value_t = event_log::kafka::DEFAULT_BACKGROUND_FETCH_WAIT_MS
    )]
    pub kafka_background_fetch_wait_ms: u32,
}

impl StoreSettings {
    /// Kafka or Postgres: a deployment rather than a developer's machine.
    pub fn distributed(&self) -> bool {
        self.kafka.is_some() || self.database_url.is_some()
    }

    /// Where the read models and the saga's state are.
    pub fn read_backend(&self) -> ReadBackend {
        match &self.database_url {
            Some(url) => ReadBackend::Postgres {
                url: url.clone(),
                schema_prefix: self.schema_prefix.clone(),
            },
            None => ReadBackend::Sqlite {
                dir: self.data_dir.clone(),
            },
        }
    }
}

/// The saga's timeouts and retries.
#[derive(Debug, Clone, clap::Args)]
pub struct SagaSettings {
    /// How long the saga waits for a reservation, an authorisation or a confirmation before it
    /// compensates (ms).
    #[arg(
        long = "saga-timeout-ms",
        value_name = "SAGA_TIMEOUT_MS",
        env = "PLATFORM_SAGA_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub timeout_ms: u64,

    /// How long the saga waits for a compensation's acknowledgement before sending it again (ms);
    /// it backs off exponentially from there (adding a fifth of it, doubling per resend).
    #[arg(
        long = "saga-compensation-timeout-ms",
        value_name = "SAGA_COMPENSATION_TIMEOUT_MS",
        env = "PLATFORM_SAGA_COMPENSATION_TIMEOUT_MS",
        default_value_t = 5_000
    )]
    pub compensation_timeout_ms: u64,

    /// Sends of a compensation before the saga is parked as needs_attention.
    #[arg(
        long = "saga-max-attempts",
        value_name = "SAGA_MAX_ATTEMPTS",
        env = "PLATFORM_SAGA_MAX_ATTEMPTS",
        default_value_t = 5
    )]
    pub max_attempts: u32,
}

impl SagaSettings {
    /// The orchestrator's configuration.
    pub fn config(&self) -> saga_orchestrator::SagaConfig {
        let step = std::time::Duration::from_millis(self.timeout_ms);
        saga_orchestrator::SagaConfig {
            reservation_timeout: step,
            payment_timeout: step,
            confirmation_timeout: step,
            compensation_timeout: std::time::Duration::from_millis(self.compensation_timeout_ms),
            // A fifth of the compensation timeout (1 s with the defaults): resends wait 5, 6, 7,
            // 9, 13 s by default, and proportionally less with a shorter timeout.
            backoff_base: std::time::Duration::from_millis(self.compensation_timeout_ms / 5),
            max_attempts: self.max_attempts,
        }
    }
}

/// Everything `platform serve` runs with. It holds [`StoreSettings`] and reads as if it were
/// one flat struct with them (`settings.kafka` is `settings.store.kafka`, by `Deref`), since
/// every part and every caller that builds one uses them throughout.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    #[command(flatten)]
    pub store: StoreSettings,

    /// The address the HTTP API listens on (port 0 picks a free port).
    #[arg(long, env = "PLATFORM_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,

    /// Partitions of each topic, used when the topics are created.
    #[arg(long, env = "PLATFORM_PARTITIONS", default_value_t = 8)]
    pub partitions: u32,

    /// How a command service's instance learns which partitions it owns. `group`: the
    /// service's instances form one consumer group on its command topic and each owns what the
    /// group assigns it; scale by starting or stopping instances, and a partition whose
    /// instance dies moves on after the group's session timeout (6 s). `static`: instance
    /// `--instance` of `--instances` owns the partitions p with p % instances == instance;
    /// nothing takes over the partitions of an instance that is gone.
    #[arg(long, env = "PLATFORM_ASSIGNMENT", value_enum, default_value = "group")]
    pub assignment: AssignmentMode,

    /// With `--assignment static`: this instance's index (0-based); it owns the partitions p
    /// with p % instances == instance.
    #[arg(long, env = "PLATFORM_INSTANCE", default_value_t = 0)]
    pub instance: u32,

    /// With `--assignment static`: how many instances of each command service run.
    #[arg(long, env = "PLATFORM_INSTANCES", default_value_t = 1)]
    pub instances: u32,

    /// When the embedded log acknowledges an append: `fsync` once its group commit is synced
    /// to disk (an acknowledged command survives a power loss, and no read model, saga or
    /// snapshot ever gets ahead of the log); `os` once the operating system has it, which
    /// survives a crash of the process but not of the machine: a power loss, kernel crash or
    /// VM reset loses what was acknowledged since the last checkpoint (up to 1000 pages of
    /// log). For tests and throwaway data only.
    #[arg(long, env = "PLATFORM_DURABILITY", value_enum, default_value = "fsync")]
    pub durability: DurabilityMode,

    /// How long the Kafka producer lingers to fill a batch when other appends are in flight,
    /// in ms. Longer means fewer, larger produce requests under load: less work for the broker
    /// per event, more latency per append. An append made while none is in flight is sent at
    /// once, whatever this says. 10 ms halved the half-load p99 on nisshi against 2 ms, at the
    /// same p50 (BENCHMARKS.md, Commands).
    #[arg(
        long,
        env = "PLATFORM_KAFKA_LINGER_MS",
        default_value_t = event_log::kafka::DEFAULT_LINGER_MS
    )]
    pub kafka_linger_ms: u32,

    /// Kafka fetch.wait.max.ms for tailing readers and consumer groups (projections, saga, the
    /// command-topic consumers of `--assignment group`).
    /// Some brokers (nisshi) hold every fetch for this long, so it is both the read-your-writes
    /// delay and how often every idle reader costs the broker a fetch; 50 ms keeps nisshi from
    /// saturating on idle fetches (5 ms cut the saga's throughput tenfold, BENCHMARKS.md).
    #[arg(
        long,
        env = "PLATFORM_KAFKA_FETCH_WAIT_MS",
        default_value_t = event_log::kafka::DEFAULT_FETCH_WAIT_MS
    )]
    pub kafka_fetch_wait_ms: u32,

    /// A consumer stops fetching each partition that gave nothing for a second and waits on its
    /// end instead (one request per process per check: the first 100 ms after one went idle,
    /// then less and less often, up to every this many ms), so the first record another process
    /// writes to it after a long quiet spell arrives up to this much later (a record this
    /// process wrote: at once). 0: consumers never stop fetching, for brokers that hold an idle
    /// fetch until data arrives (Apache Kafka).
    #[arg(
        long,
        env = "PLATFORM_KAFKA_IDLE_CHECK_MS",
        default_value_t = event_log::kafka::DEFAULT_IDLE_CHECK_MS
    )]
    pub kafka_idle_check_ms: u32,

    /// Replication factor of the topics the platform creates: each partition is kept on this
    /// many brokers, and its min.insync.replicas is set one lower (at least 1, at most 2), so
    /// with acks=all and a factor of 3 an acknowledged event is on two brokers and writes go on
    /// with one broker down. Capped at the number of brokers in the cluster, with a warning: a
    /// capped topic has fewer copies than asked for (on a single broker, one: losing that
    /// broker's disk loses the log). An existing topic is never changed; one with fewer
    /// replicas is reported at start.
    #[arg(
        long,
        env = "PLATFORM_REPLICATION_FACTOR",
        default_value_t = event_log::kafka::DEFAULT_REPLICATION_FACTOR,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(i16::MAX))
    )]
    pub replication_factor: u32,

    /// Take a partition's snapshot after this many new events.
    #[arg(long, env = "PLATFORM_SNAPSHOT_EVERY", default_value_t = 5000)]
    pub snapshot_every: u64,

    /// How long a command's outcome is remembered, in seconds of the partition's log time: a
    /// request repeated with the same `Idempotency-Key` (or a command redelivered with the same
    /// id) within it gets the original answer and appends nothing; after it, it is decided
    /// anew. Bounds the memory and snapshots the command services keep for idempotency.
    #[arg(
        long,
        env = "PLATFORM_IDEMPOTENCY_WINDOW_SECS",
        default_value_t = 86_400
    )]
    pub idempotency_window_secs: u64,

    /// /health/ready answers 503 while a projection lags more than this many seconds.
    #[arg(long, env = "PLATFORM_MAX_LAG_SECONDS", default_value_t = 30.0)]
    pub max_lag_seconds: f64,

    #[command(flatten)]
    pub saga: SagaSettings,

    #[command(flatten)]
    pub security: SecuritySettings,

    #[command(flatten)]
    pub gateway: GatewaySettings,

    #[command(flatten)]
    pub http: HttpSettings,
}

impl Settings {
    /// What `platform serve gateway` is built from.
    pub fn gateway_config(&self) -> gateway::Config {
        gateway::Config {
            http_addr: self.http_addr,
            topic_prefix: self.store.topic_prefix.clone(),
            partitions: self.partitions,
            distributed: self.store.distributed(),
            gateway: self.gateway.clone(),
            security: self.security.clone(),
            http: self.http.clone(),
        }
    }

    /// The saga's timeouts and retries.
    pub fn saga_config(&self) -> saga_orchestrator::SagaConfig {
        self.saga.config()
    }

    /// For tests, benchmarks and tools: every flag's default (neither the command line nor the
    /// environment is read), on the embedded backend in `data_dir`, on a free port, with
    /// authentication off (tests/infra turns it on where it is the subject).
    pub fn embedded(data_dir: impl Into<PathBuf>) -> Self {
        let mut settings: Settings = http_edge::flag_defaults();
        settings.store.data_dir = data_dir.into();
        settings.http_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        settings.security.auth = Some(Toggle::Off);
        settings
    }
}

/// `--durability`: see [`event_log::embedded::Durability`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DurabilityMode {
    Fsync,
    Os,
}

impl From<DurabilityMode> for event_log::embedded::Durability {
    fn from(mode: DurabilityMode) -> Self {
        match mode {
            DurabilityMode::Fsync => event_log::embedded::Durability::Fsync,
            DurabilityMode::Os => event_log::embedded::Durability::Os,
        }
    }
}

/// `--assignment`: see [`command_services::services::Assignment`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AssignmentMode {
    Group,
    Static,
}

impl From<AssignmentMode> for command_services::services::Assignment {
    fn from(mode: AssignmentMode) -> Self {
        match mode {
            AssignmentMode::Group => command_services::services::Assignment::Group,
            AssignmentMode::Static => command_services::services::Assignment::Static,
        }
    }
}
