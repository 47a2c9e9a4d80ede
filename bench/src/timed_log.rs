//! A decorator of the event log that tells [`set_hook`]'s hook of every append's topic and
//! latency: `platform-bench commands` splits the log's part off each side's latency with it,
//! finer than the `/metrics` histograms' buckets. The platform under test gets it through
//! [`platform::Platform::build_with`]; the raw baseline's log is wrapped the same way, so both
//! sides are timed alike (from the `append` call to the log's acknowledgement).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use event_log::{
    EventLog, GroupMember, LogError, LogReader, Position, ReadMode, Record, SharedLog,
};

/// Told of each append's topic and latency while set.
pub type AppendHook = Arc<dyn Fn(&str, Duration) + Send + Sync>;

static HOOK: RwLock<Option<AppendHook>> = RwLock::new(None);

/// Sets the hook every [`TimedLog`] of this process tells, or removes it with `None`.
pub fn set_hook(hook: Option<AppendHook>) {
    *HOOK
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = hook;
}

fn hook() -> Option<AppendHook> {
    HOOK.read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

/// `inner`, with each append timed.
pub fn timed(inner: SharedLog) -> SharedLog {
    Arc::new(TimedLog { inner })
}

struct TimedLog {
    inner: SharedLog,
}

#[async_trait]
impl EventLog for TimedLog {
    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<u32, LogError> {
        self.inner.ensure_topic(topic, partitions).await
    }

    async fn partition_count(&self, topic: &str) -> Result<u32, LogError> {
        self.inner.partition_count(topic).await
    }

    async fn append(
        &self,
        topic: &str,
        partition: u32,
        record: Record,
    ) -> Result<Position, LogError> {
        let started = Instant::now();
        let appended = self.inner.append(topic, partition, record).await;
        if let Some(hook) = hook() {
            hook(topic, started.elapsed());
        }
        appended
    }

    async fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        self.inner.end_offset(topic, partition).await
    }

    async fn end_offsets(
        &self,
        topic: &str,
        partitions: &[u32],
    ) -> Result<Vec<(u32, u64)>, LogError> {
        self.inner.end_offsets(topic, partitions).await
    }

    async fn open_reader(
        &self,
        topic: &str,
        start: &[(u32, u64)],
        mode: ReadMode,
    ) -> Result<Box<dyn LogReader>, LogError> {
        self.inner.open_reader(topic, start, mode).await
    }

    async fn join_group(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<Box<dyn GroupMember>, LogError> {
        self.inner.join_group(group, topics).await
    }

    async fn join_group_as(
        &self,
        group: &str,
        topics: &[String],
        mode: ReadMode,
    ) -> Result<Box<dyn GroupMember>, LogError> {
        self.inner.join_group_as(group, topics, mode).await
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_log::embedded::EmbeddedLog;

    #[tokio::test]
    async fn the_hook_sees_each_append_until_removed() {
        let dir = std::env::temp_dir().join(format!("timed-log-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = timed(Arc::new(
            EmbeddedLog::open(dir.join("log.db")).await.unwrap(),
        ));
        log.ensure_topic("t", 1).await.unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let recorder = seen.clone();
        set_hook(Some(Arc::new(move |topic, _| {
            recorder.lock().unwrap().push(topic.to_owned())
        })));
        let record = || Record {
            key: "k".to_owned(),
            headers: Vec::new(),
            value: b"v".to_vec(),
        };
        log.append("t", 0, record()).await.unwrap();
        set_hook(None);
        log.append("t", 0, record()).await.unwrap();
        assert_eq!(*seen.lock().unwrap(), vec!["t".to_owned()]);
        let _ = std::fs::remove_dir_all(dir);
    }
}
