//! Each service consumes its command topic (`<prefix>.<service>.commands`), for the partitions
//! it owns, and decides those commands exactly as it decides HTTP ones.
//!
//! Commands of one aggregate are handled in order, one at a time, in a lane of their own;
//! different aggregates' lanes run concurrently and never wait for each other (a payment
//! provider that does not answer holds up only its own order). Delivery is at least once: the
//! stored position of a partition only moves past a command once it and every command before
//! it have been handled; a command seen again after a restart is recognised by its command id
//! and changes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_log::{ReadMode, SharedLog};
use tokio::sync::{mpsc, watch};

use crate::messages::CommandMessage;
use crate::store::CommandStore;

/// How long an idle lane lives before it is closed.
const LANE_IDLE: Duration = Duration::from_secs(2);

type Item = (CommandMessage, u32, u64);

/// Offsets read but not yet handled, per partition.
#[derive(Debug, Default)]
struct InFlight {
    offsets: BTreeMap<u32, BTreeSet<u64>>,
}

fn lock(in_flight: &Mutex<InFlight>) -> std::sync::MutexGuard<'_, InFlight> {
    in_flight
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Handles a lane's commands in order until it has been idle for a while.
async fn run_lane<F, Fut>(
    mut queue: mpsc::UnboundedReceiver<Item>,
    handle: F,
    in_flight: Arc<Mutex<InFlight>>,
) where
    F: Fn(CommandMessage) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        let item = match tokio::time::timeout(LANE_IDLE, queue.recv()).await {
            Ok(Some(item)) => Some(item),
            Ok(None) => None,
            Err(_) => {
                // Refuse new work, then finish what is already queued.
                queue.close();
                queue.try_recv().ok()
            }
        };
        let Some((message, partition, offset)) = item else {
            return;
        };
        handle(message).await;
        if let Some(offsets) = lock(&in_flight).offsets.get_mut(&partition) {
            offsets.remove(&offset);
        }
    }
}

/// Runs `handle` for every command of `topic` in `partitions` (see the module documentation).
/// Returns when `shutdown` turns true.
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
        // Commands come from the saga, which does not wait on their arrival to the millisecond.
        match log.open_reader(&topic, &start, ReadMode::Background).await {
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
    // The next offset to read, and the last position saved, per partition.
    let mut next_read: BTreeMap<u32, u64> = start.iter().copied().collect();
    let mut saved = next_read.clone();
    let in_flight = Arc::new(Mutex::new(InFlight::default()));
    let mut lanes: HashMap<String, mpsc::UnboundedSender<Item>> = HashMap::new();
    loop {
        let batch = tokio::select! {
            _ = shutdown.changed() => return,
            batch = reader.poll(500, Duration::from_millis(50)) => batch,
        };
        match batch {
            Ok(records) => {
                for record in records {
                    let partition = record.position.partition;
                    let offset = record.position.offset;
                    next_read.insert(partition, offset + 1);
                    let message = match CommandMessage::from_record(&record.record) {
                        Ok(message) => message,
                        Err(error) => {
                            tracing::error!(position = %record.position, %error, "unreadable command skipped");
                            continue;
                        }
                    };
                    lock(&in_flight)
                        .offsets
                        .entry(partition)
                        .or_default()
                        .insert(offset);
                    let aggregate = message.aggregate_id.clone();
                    let mut pending = Some((message, partition, offset));
                    while let Some(item) = pending.take() {
                        let lane = lanes.entry(aggregate.clone()).or_insert_with(|| {
                            let (sender, receiver) = mpsc::unbounded_channel();
                            tokio::spawn(run_lane(receiver, handle.clone(), in_flight.clone()));
                            sender
                        });
                        // A lane closed for idleness refuses the item: drop it, open another.
                        if let Err(mpsc::error::SendError(refused)) = lane.send(item) {
                            lanes.remove(&aggregate);
                            pending = Some(refused);
                        }
                    }
                }
                lanes.retain(|_, lane| !lane.is_closed());
            }
            Err(error) => {
                tracing::warn!(%error, %topic, "reading the command topic failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        // Everything before the lowest unhandled offset is handled.
        let safe: Vec<(u32, u64)> = {
            let in_flight = lock(&in_flight);
            next_read
                .iter()
                .map(|(partition, next)| {
                    let lowest = in_flight
                        .offsets
                        .get(partition)
                        .and_then(|offsets| offsets.first().copied());
                    (*partition, lowest.unwrap_or(*next))
                })
                .collect()
        };
        for (partition, offset) in safe {
            if saved.get(&partition) == Some(&offset) {
                continue;
            }
            match store
                .save_position(&consumer, &topic, partition, offset)
                .await
            {
                Ok(()) => {
                    saved.insert(partition, offset);
                }
                // Harmless: the commands are read again and recognised by their ids.
                Err(error) => {
                    tracing::warn!(%error, %topic, partition, "cannot save the command position")
                }
            }
        }
    }
}
