//! Each service consumes its command topic (`<prefix>.<service>.commands`), for the partitions
//! it owns, and decides those commands exactly as it decides HTTP ones.
//!
//! - **Ownership by consumer group** ([`consume_group`], the default): the service's instances
//!   form one consumer group on the command topic, and the partitions the group assigns an
//!   instance are the ones it owns, on the events topic too (both have the same partition
//!   count). On an assignment the owner catches the partition up with the log and takes its
//!   epoch before its commands are read; on a revocation it stops deciding for it and the
//!   consumer stops reading it and saving its position. Scaling is starting or stopping
//!   instances.
//! - **Static ownership** ([`consume`]): a fixed set of partitions (`--instances`).
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

use async_trait::async_trait;
use event_log::{GroupEvent, GroupMember, LogError, LogRecord, ReadMode, SharedLog};
use tokio::sync::{mpsc, watch};

use crate::messages::CommandMessage;
use crate::store::CommandStore;

/// How long an idle lane lives before it is closed.
const LANE_IDLE: Duration = Duration::from_secs(2);

type Item = (CommandMessage, u32, u64);

/// How long a group member waits for its first assignment before it calls itself ready without
/// one.
const NO_ASSIGNMENT_READY: Duration = Duration::from_secs(10);

/// How long after a failed attempt an assigned partition is taken again.
const RETAKE_AFTER: Duration = Duration::from_secs(5);

/// How long a partition the group still assigns here may stay fenced off by a newer owner
/// before it is taken again: a zombie's group membership lapses within the session timeout, and
/// its partition's true owner should not wait on it much longer.
const FENCED_RETAKE: Duration = Duration::from_secs(8);

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

/// Lanes, offsets in flight and positions of the partitions a consumer reads.
struct Dispatcher<F> {
    handle: F,
    in_flight: Arc<Mutex<InFlight>>,
    lanes: HashMap<String, mpsc::UnboundedSender<Item>>,
    /// The next offset to read, and the last position saved, per partition read.
    next_read: BTreeMap<u32, u64>,
    saved: BTreeMap<u32, u64>,
}

impl<F, Fut> Dispatcher<F>
where
    F: Fn(CommandMessage) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    fn new(handle: F) -> Self {
        Dispatcher {
            handle,
            in_flight: Arc::new(Mutex::new(InFlight::default())),
            lanes: HashMap::new(),
            next_read: BTreeMap::new(),
            saved: BTreeMap::new(),
        }
    }

    /// Reads `partition` from `offset` (its stored position) on.
    fn start(&mut self, partition: u32, offset: u64) {
        self.next_read.insert(partition, offset);
        self.saved.insert(partition, offset);
        lock(&self.in_flight).offsets.remove(&partition);
    }

    /// Stops reading `partition` and saving its position. Its commands still queued are
    /// decided or refused by the owner; the next owner reads from the last saved position, so
    /// none is lost (one may be decided twice, and is recognised by its command id).
    fn stop(&mut self, partition: u32) {
        self.next_read.remove(&partition);
        self.saved.remove(&partition);
        lock(&self.in_flight).offsets.remove(&partition);
    }

    /// Hands each command to its aggregate's lane.
    fn dispatch(&mut self, records: Vec<LogRecord>) {
        for record in records {
            let partition = record.position.partition;
            let offset = record.position.offset;
            let Some(next) = self.next_read.get_mut(&partition) else {
                continue;
            };
            *next = offset + 1;
            let message = match CommandMessage::from_record(&record.record) {
                Ok(message) => message,
                Err(error) => {
                    tracing::error!(position = %record.position, %error, "unreadable command skipped");
                    continue;
                }
            };
            lock(&self.in_flight)
                .offsets
                .entry(partition)
                .or_default()
                .insert(offset);
            let aggregate = message.aggregate_id.clone();
            let mut pending = Some((message, partition, offset));
            while let Some(item) = pending.take() {
                let mut opened = false;
                let lane = self.lanes.entry(aggregate.clone()).or_insert_with(|| {
                    opened = true;
                    let (sender, receiver) = mpsc::unbounded_channel();
                    tokio::spawn(run_lane(
                        receiver,
                        self.handle.clone(),
                        self.in_flight.clone(),
                    ));
                    sender
                });
                // A lane closed for idleness refuses the item: drop it, open another.
                if let Err(mpsc::error::SendError(refused)) = lane.send(item) {
                    self.lanes.remove(&aggregate);
                    if opened {
                        // A lane that refuses at once never ran: the runtime is shutting down
                        // and drops what is spawned. Opening more would spin for good; the
                        // command stays in flight, so its position is not saved past it, and
                        // it is read again at the next start.
                        tracing::debug!(%aggregate, "no lane can run (the runtime is stopping); dispatch ends");
                        return;
                    }
                    pending = Some(refused);
                }
            }
        }
        self.lanes.retain(|_, lane| !lane.is_closed());
    }

    /// Saves, per partition, the position before its lowest unhandled offset.
    async fn save(&mut self, store: &dyn CommandStore, consumer: &str, topic: &str) {
        let safe: Vec<(u32, u64)> = {
            let in_flight = lock(&self.in_flight);
            self.next_read
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
        let moved: Vec<(u32, u64)> = safe
            .into_iter()
            .filter(|(partition, offset)| self.saved.get(partition) != Some(offset))
            .collect();
        match store.save_positions(consumer, topic, &moved).await {
            Ok(()) => self.saved.extend(moved),
            // Harmless: the commands are read again and recognised by their ids.
            Err(error) => {
                tracing::warn!(%error, %topic, "cannot save the command positions")
            }
        }
    }
}

/// The stored position of a consumer on a partition, retried while the store is unavailable;
/// `None` at shutdown.
async fn stored_position(
    store: &dyn CommandStore,
    consumer: &str,
    topic: &str,
    partition: u32,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<u64> {
    loop {
        match store.load_position(consumer, topic, partition).await {
            Ok(offset) => return Some(offset.unwrap_or(0)),
            Err(error) => {
                tracing::warn!(%error, %topic, "cannot load the command position; retrying");
                tokio::select! {
                    _ = shutdown.changed() => return None,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
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
    let mut dispatcher = Dispatcher::new(handle);
    let mut start = Vec::new();
    for &partition in &partitions {
        let Some(offset) =
            stored_position(&*store, &consumer, &topic, partition, &mut shutdown).await
        else {
            return;
        };
        dispatcher.start(partition, offset);
        start.push((partition, offset));
    }
    let mut reader = loop {
        // A plain reader never pauses when idle (only group members do), so with static
        // ownership the command topics are read with the background fetch wait: an idle
        // platform then costs a broker that holds every fetch (nisshi) a few fetches a second
        // per service, and a saga's commands wait up to that long each.
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
    loop {
        let batch = tokio::select! {
            _ = shutdown.changed() => return,
            batch = reader.poll(500, Duration::from_millis(50)) => batch,
        };
        match batch {
            Ok(records) => dispatcher.dispatch(records),
            Err(error) => {
                tracing::warn!(%error, %topic, "reading the command topic failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        dispatcher.save(&*store, &consumer, &topic).await;
    }
}

/// What a group-driven consumer needs of the owner of the partitions it reads.
#[async_trait]
pub trait Ownership: Send + Sync {
    /// Catches the partition up and starts deciding for it; `Err` says why it cannot.
    async fn acquire(
        &self,
        partition: u32,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), String>;
    /// Stops deciding for the partition.
    async fn release(&self, partition: u32);
    /// The group's first assignment has been taken up.
    fn assigned(&self);
    /// A partition assigned to this instance that it cannot serve, and why (`None`: it can).
    fn report(&self, partition: u32, problem: Option<String>);
    /// Partitions held but fenced off by a newer owner's records.
    fn fenced(&self) -> Vec<u32>;
}

/// Joins `group` on `topic` and owns what the group assigns (see the module documentation),
/// until shutdown; leaving the group hands the partitions to the other members.
#[allow(clippy::too_many_arguments)]
pub async fn consume_group<F, Fut>(
    log: SharedLog,
    store: Arc<dyn CommandStore>,
    consumer: String,
    group: String,
    topic: String,
    owner: Arc<dyn Ownership>,
    handle: F,
    mut shutdown: watch::Receiver<bool>,
) where
    F: Fn(CommandMessage) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut member = loop {
        // Commands come from the saga, and an order's confirmation waits on three of them in a
        // row: each is read as soon as the log gives it (an idle member pauses, see
        // `event_log::kafka`, so this costs an idle broker nothing).
        match log
            .join_group_as(&group, std::slice::from_ref(&topic), ReadMode::Latency)
            .await
        {
            Ok(member) => break member,
            Err(error) => {
                tracing::warn!(%error, %group, "cannot join the owners' group; retrying");
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let mut dispatcher = Dispatcher::new(handle);
    // A member the group gives nothing (more instances than partitions) may hear of no
    // assignment at all: it is ready all the same, to send its clients elsewhere.
    let unassigned = tokio::time::Instant::now() + NO_ASSIGNMENT_READY;
    let mut told = false;
    let mut assigned: BTreeSet<u32> = BTreeSet::new();
    // Assigned partitions to take (again) at a time: after a failure, or fenced while still
    // assigned.
    let mut retry: BTreeMap<u32, tokio::time::Instant> = BTreeMap::new();
    let mut fenced_since: BTreeMap<u32, tokio::time::Instant> = BTreeMap::new();
    loop {
        let now = tokio::time::Instant::now();
        if !told && now >= unassigned {
            tracing::debug!(%group, "no partition assigned yet; ready to send commands to their owners");
            owner.assigned();
            told = true;
        }
        // Fenced while the group still says it is ours: the newer owner was a zombie (evicted
        // but not told yet) or has given it up since. Once the group has had time to tell a
        // zombie, take the partition again with a new epoch.
        let fenced: BTreeSet<u32> = owner.fenced().into_iter().collect();
        fenced_since.retain(|partition, _| fenced.contains(partition));
        for partition in fenced.intersection(&assigned) {
            let since = *fenced_since.entry(*partition).or_insert(now);
            if now.duration_since(since) >= FENCED_RETAKE && !retry.contains_key(partition) {
                tracing::warn!(%topic, partition, "fenced off a partition the group still assigns here; taking it again");
                retry.insert(*partition, now);
                fenced_since.remove(partition);
            }
        }
        let event = tokio::select! {
            _ = shutdown.changed() => return,
            event = member.poll(500, Duration::from_millis(50)) => event,
        };
        let mut newly_assigned = false;
        match event {
            Ok(GroupEvent::Assigned(partitions)) => {
                for (listed, partition) in partitions {
                    if listed != topic {
                        continue;
                    }
                    tracing::debug!(%topic, partition, "partition assigned");
                    assigned.insert(partition);
                    retry.insert(partition, tokio::time::Instant::now());
                }
                // An empty assignment too: the member is ready to send commands elsewhere.
                newly_assigned = true;
            }
            Ok(GroupEvent::Revoked(partitions)) => {
                for (listed, partition) in partitions {
                    if listed != topic {
                        continue;
                    }
                    tracing::info!(%topic, partition, "partition revoked");
                    assigned.remove(&partition);
                    retry.remove(&partition);
                    dispatcher.stop(partition);
                    owner.report(partition, None);
                    owner.release(partition).await;
                }
            }
            Ok(GroupEvent::Records(records)) => dispatcher.dispatch(records),
            Err(error) => {
                tracing::warn!(%error, %topic, "reading the command topic failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        // Assigned partitions are taken here, after the event that assigned them, and so are
        // those due again (after a failed attempt, or fenced while still assigned).
        let now = tokio::time::Instant::now();
        let due: Vec<u32> = retry
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(partition, _)| *partition)
            .collect();
        for partition in due {
            retry.remove(&partition);
            if !assigned.contains(&partition) {
                continue;
            }
            let taken = take(
                &log,
                &*store,
                &consumer,
                &topic,
                &*owner,
                &mut *member,
                &mut dispatcher,
                partition,
                &mut shutdown,
            )
            .await;
            if *shutdown.borrow() {
                return;
            }
            if !taken {
                retry.insert(partition, tokio::time::Instant::now() + RETAKE_AFTER);
            }
        }
        if newly_assigned {
            owner.assigned();
            told = true;
        }
        dispatcher.save(&*store, &consumer, &topic).await;
    }
}

/// Takes an assigned partition: the owner catches it up and takes its epoch, then its commands
/// are read from the stored position. Returns false when it could not (the reason is reported
/// and the caller tries again later): state ahead of the log, the store or the log unavailable.
#[allow(clippy::too_many_arguments)]
async fn take<F, Fut>(
    log: &SharedLog,
    store: &dyn CommandStore,
    consumer: &str,
    topic: &str,
    owner: &dyn Ownership,
    member: &mut dyn GroupMember,
    dispatcher: &mut Dispatcher<F>,
    partition: u32,
    shutdown: &mut watch::Receiver<bool>,
) -> bool
where
    F: Fn(CommandMessage) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    if let Err(problem) = owner.acquire(partition, shutdown).await {
        if !*shutdown.borrow() {
            tracing::error!(%topic, partition, %problem, "cannot own an assigned partition; will try again");
            owner.report(partition, Some(problem));
        }
        return false;
    }
    let Some(offset) = stored_position(store, consumer, topic, partition, shutdown).await else {
        return false;
    };
    match log.end_offset(topic, partition).await {
        Ok(end) if offset > end => {
            let problem = format!(
                "the position in {topic} partition {partition} is offset {offset}, but the topic ends at {end}: the topic lost records or was recreated; after checking it, run `platform recover --apply`"
            );
            tracing::error!(%problem, "not reading the partition's commands; will look again");
            owner.report(partition, Some(problem));
            owner.release(partition).await;
            return false;
        }
        Ok(_) => {}
        Err(error) => {
            owner.report(partition, Some(error.to_string()));
            owner.release(partition).await;
            return false;
        }
    }
    match member.start(topic, partition, offset).await {
        Ok(()) => {
            owner.report(partition, None);
            dispatcher.start(partition, offset);
            true
        }
        // Revoked meanwhile (its `Revoked` follows): nobody should decide for it here.
        Err(LogError::UnknownPartition { .. }) => {
            owner.release(partition).await;
            true
        }
        Err(error) => {
            tracing::warn!(%error, %topic, partition, "cannot start reading an assigned partition");
            owner.report(partition, Some(error.to_string()));
            owner.release(partition).await;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_schema::commands::ServiceCommand;

    fn record(offset: u64) -> LogRecord {
        let message = CommandMessage {
            command_id: uuid::Uuid::now_v7(),
            correlation_id: "c".into(),
            causation_id: None,
            actor: "test".into(),
            aggregate_id: "order-1".into(),
            issued_at: chrono::Utc::now(),
            traceparent: None,
            attempt: None,
            command: ServiceCommand::ConfirmOrder,
        };
        LogRecord {
            position: event_log::Position {
                topic: "t".into(),
                partition: 0,
                offset,
            },
            timestamp_ms: 0,
            record: message.to_record(),
        }
    }

    /// On a runtime that is shutting down, spawned lanes never run and refuse every item:
    /// dispatching gives up instead of opening lanes for ever (which hung a stopping process
    /// at full CPU), and the command stays in flight, so its position is not saved past it.
    #[test]
    fn dispatch_ends_when_no_lane_can_run() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let handle = runtime.handle().clone();
        drop(runtime);
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _entered = handle.enter();
            let mut dispatcher = Dispatcher::new(|_message: CommandMessage| async {});
            dispatcher.start(0, 0);
            dispatcher.dispatch(vec![record(0)]);
            let in_flight = lock(&dispatcher.in_flight).offsets.get(&0).cloned();
            let _ = done.send(in_flight);
        });
        let in_flight = finished
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("dispatch returned");
        assert_eq!(
            in_flight.map(|offsets| offsets.into_iter().collect::<Vec<_>>()),
            Some(vec![0]),
            "the undispatched command stays in flight"
        );
    }
}
