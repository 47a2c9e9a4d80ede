//! Opening the chosen backend: the embedded one (SQLite files in the data directory) or the
//! distributed one (Kafka and Postgres).

use std::sync::Arc;
use std::time::Duration;

use command_services::store::{CommandStore, SqlStore};
use event_log::SharedLog;
use event_log::embedded::{Durability, EmbeddedLog};
use event_log::kafka::{KafkaLog, KafkaSettings};
use personal_data::KeyStore;
use sql_store::Db;

use crate::error::{Error, Result};
use crate::settings::{Settings, StoreSettings};

/// The log and stores every part runs on.
#[derive(Clone)]
pub struct Backend {
    pub log: SharedLog,
    pub command_store: Arc<dyn CommandStore>,
    /// The customers' data keys (`keys.db`, or the `<prefix>keys` schema on Postgres).
    pub keys: KeyStore,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Backend({})", self.log.backend())
    }
}

/// The Kafka client settings the platform runs with (also used by `platform-bench`, so its raw
/// produce baseline uses exactly the platform's producer configuration).
pub fn kafka_settings(brokers: &str, settings: &Settings) -> KafkaSettings {
    let mut kafka = reader_kafka_settings(brokers, &settings.store);
    kafka.linger_ms = settings.kafka_linger_ms;
    kafka.fetch_wait_max_ms = settings.kafka_fetch_wait_ms;
    kafka.idle_check_ms = settings.kafka_idle_check_ms;
    kafka.replication_factor = settings.replication_factor;
    kafka
}

/// The Kafka client settings of an operator tool, which reads the log in the background and
/// never produces, tails a topic or creates one.
fn reader_kafka_settings(brokers: &str, store: &StoreSettings) -> KafkaSettings {
    let mut kafka = KafkaSettings::new(brokers);
    kafka.background_fetch_wait_ms = store.kafka_background_fetch_wait_ms;
    kafka.delivery_timeout = Duration::from_secs(15);
    kafka
}

impl Backend {
    /// The backend `platform serve` runs on.
    pub async fn open(settings: &Settings) -> Result<Self> {
        let kafka = settings
            .store
            .kafka
            .as_deref()
            .map(|brokers| kafka_settings(brokers, settings));
        Self::open_with(&settings.store, kafka, settings.durability.into()).await
    }

    /// The backend an operator tool opens beside the serving processes. It appends nothing to
    /// the log, so the durability of appends is the embedded log's default.
    pub async fn open_for_tool(store: &StoreSettings) -> Result<Self> {
        let kafka = store
            .kafka
            .as_deref()
            .map(|brokers| reader_kafka_settings(brokers, store));
        Self::open_with(store, kafka, Durability::default()).await
    }

    async fn open_with(
        store: &StoreSettings,
        kafka: Option<KafkaSettings>,
        durability: Durability,
    ) -> Result<Self> {
        let log: SharedLog = match kafka {
            Some(kafka) => Arc::new(
                KafkaLog::connect(kafka)
                    .await
                    .map_err(Error::log("connecting to Kafka"))?,
            ),
            None => Arc::new(
                EmbeddedLog::open_with(store.data_dir.join("log.db"), durability)
                    .await
                    .map_err(Error::log(format!(
                        "opening the embedded log in {}",
                        store.data_dir.display()
                    )))?,
            ),
        };
        let command_store: Arc<dyn CommandStore> = match (&store.database_url, &store.kafka) {
            (Some(url), _) => Arc::new(
                SqlStore::postgres(url, &format!("{}command_side", store.schema_prefix)).await?,
            ),
            (None, Some(_)) => {
                return Err(Error::Refused(
                    "--kafka needs --database-url (Postgres) as well".into(),
                ));
            }
            (None, None) => {
                std::fs::create_dir_all(&store.data_dir)
                    .map_err(Error::io(format!("creating {}", store.data_dir.display())))?;
                Arc::new(SqlStore::sqlite(store.data_dir.join("command-side.db")).await?)
            }
        };
        let keys_db = match &store.database_url {
            Some(url) => Db::postgres(url, &format!("{}keys", store.schema_prefix), 4).await,
            None => Db::sqlite_secure(&store.data_dir.join("keys.db")).await,
        }
        .map_err(Error::db("opening the key store"))?;
        let keys = KeyStore::open(keys_db)
            .await
            .map_err(|error| Error::Refused(format!("opening the key store: {error}")))?;
        Ok(Backend {
            log,
            command_store,
            keys,
        })
    }
}

/// The exclusive lock a serving process holds on an embedded data directory: two processes
/// serving one directory would each apply every partition (each owning all of them). The lock
/// is an advisory `flock` on `<dir>/platform.lock`, which also holds the holder's pid; the
/// operating system releases it when the process ends, however it ends (kill -9 included), so
/// a stale file never blocks a restart. Operator tools (`replay`, `audit`, `sagas`, ...) do not
/// take it: they run beside a serving process.
/// Parts built in one process (tests build several) share the process's lock.
#[derive(Debug, Clone)]
pub struct DataDirLock {
    _file: Arc<std::fs::File>,
}

/// The locks this process holds, by canonical directory.
static HELD: std::sync::Mutex<
    std::collections::BTreeMap<std::path::PathBuf, std::sync::Weak<std::fs::File>>,
> = std::sync::Mutex::new(std::collections::BTreeMap::new());

impl DataDirLock {
    /// Takes the lock of `dir` (created when missing), or fails naming the directory and the
    /// pid of the process that holds it, having changed nothing. Within one process the lock
    /// is shared.
    pub fn acquire(dir: &std::path::Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        let key = dir
            .canonicalize()
            .map_err(Error::io(format!("resolving {}", dir.display())))?;
        let mut held = HELD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(file) = held.get(&key).and_then(std::sync::Weak::upgrade) {
            return Ok(DataDirLock { _file: file });
        }
        let file = Arc::new(Self::lock_file(dir)?);
        held.insert(key, Arc::downgrade(&file));
        Ok(DataDirLock { _file: file })
    }

    fn lock_file(dir: &std::path::Path) -> Result<std::fs::File> {
        use std::io::{Read, Seek, Write};
        let path = dir.join("platform.lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(Error::io(format!("opening {}", path.display())))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() {
                    "another process".to_owned()
                } else {
                    format!("another process (pid {holder})")
                };
                return Err(Error::DataDirInUse {
                    dir: dir.to_owned(),
                    holder,
                });
            }
            Err(std::fs::TryLockError::Error(error)) => {
                return Err(Error::io(format!("locking {}", path.display()))(error));
            }
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .and_then(|()| file.flush())
            .map_err(Error::io(format!("writing {}", path.display())))?;
        Ok(file)
    }
}
