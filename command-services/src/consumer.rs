//! Each service consumes its command topic (`<prefix>.<service>.commands`), for the partitions
//! it owns, and decides those commands exactly as it decides HTTP ones. Delivery is at least
//! once: the consumed position is stored after the batch's outcomes are durable, and a command
//! seen again is recognised by its command id and changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use event_log::SharedLog;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::messages::CommandMessage;
use crate::store::CommandStore;

/// Runs `handle` for every command of `topic` in `partitions`, commands of one aggregate in
/// order, different aggregates concurrently. Returns when `shutdown` turns true.
pub async fn consume<F, Fut>(
    log: SharedLog,
    store: Arc<dyn CommandStore>,
    consumer: String,
    topic: String,
    partitions: Vec<u32>,
    handle: F,
    mut shutdown: watch::Receiver<bool>,
) where
    F: Fn(CommandMessage) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut start = Vec::new();
    for &partition in &partitions {
        let offset = loop {
            match store.load_position(&consumer, &topic, partition).await {
                Ok(offset) => break offset.unwrap_or(0),
                Err(error) => {
                    tracing::warn!(%error, %topic, "cannot load the command position; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        start.push((partition, offset));
    }
    let mut reader = loop {
        match log.reader(&topic, &start).await {
            Ok(reader) => break reader,
            Err(error) => {
                tracing::warn!(%error, %topic, "cannot read the command topic; retrying");
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    loop {
        let batch = tokio::select! {
            _ = shutdown.changed() => return,
            batch = reader.poll(500, Duration::from_millis(100)) => batch,
        };
        let records = match batch {
            Ok(records) => records,
            Err(error) => {
                tracing::warn!(%error, %topic, "reading the command topic failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if records.is_empty() {
            continue;
        }
        let mut next: BTreeMap<u32, u64> = BTreeMap::new();
        let mut by_aggregate: HashMap<String, Vec<CommandMessage>> = HashMap::new();
        for record in &records {
            next.insert(record.position.partition, record.position.offset + 1);
            match CommandMessage::from_record(&record.record) {
                Ok(message) => by_aggregate
                    .entry(message.aggregate_id.clone())
                    .or_default()
                    .push(message),
                Err(error) => {
                    tracing::error!(position = %record.position, %error, "unreadable command skipped");
                }
            }
        }
        let mut running = JoinSet::new();
        for (_, messages) in by_aggregate {
            let handle = handle.clone();
            running.spawn(async move {
                for message in messages {
                    handle(message).await;
                }
            });
        }
        while running.join_next().await.is_some() {}
        for (partition, offset) in next {
            if let Err(error) = store
                .save_position(&consumer, &topic, partition, offset)
                .await
            {
                // Harmless: the commands are read again and recognised by their ids.
                tracing::warn!(%error, %topic, partition, "cannot save the command position");
            }
        }
    }
}
