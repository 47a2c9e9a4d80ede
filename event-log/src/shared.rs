//! One consumer-group member shared by several consumers of one process.
//!
//! The projections of a process (and, in the same way, any set of consumers that always run
//! together) read overlapping topics. Each consumer joining a group of its own would make the
//! broker serve the same records once per consumer, and keep one idle fetch loop per consumer.
//! A [`SharedGroup`] joins the group once, for the union of the topics, and hands each consumer
//! a [`GroupMember`] of its own that behaves exactly like a member of a group that reads only
//! its topics:
//! - assignment changes reach every consumer, each seeing only its topics' partitions (a
//!   consumer that joins later first hears of the partitions already assigned);
//! - each consumer starts each partition at its own position; the shared member reads a
//!   partition from the lowest position any consumer asked for (seeking back when a consumer
//!   starts below what was read), and each consumer gets only the records at or past its own
//!   position, in log order, once;
//! - whichever consumer polls while its queue is empty polls the shared member for everyone.
//!   A consumer whose queue holds [`QUEUE_LIMIT`] records gets no more until it has taken them:
//!   it overflows, and when it next polls with its queue empty, the shared member reads its
//!   partitions again from where it stands (the others skip what they already have). So a slow
//!   or stuck consumer (its database down) costs memory only up to that limit and never holds
//!   the others back, and the shared member keeps being polled (a consumer that stops polling
//!   is dropped from the group).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use crate::{GroupEvent, GroupMember, LogError, LogRecord, SharedLog, TopicPartition};

/// Records a consumer may have queued before the shared member stops being polled.
pub const QUEUE_LIMIT: usize = 20_000;

/// A consumer group joined once per process and shared by several consumers (see the module
/// documentation).
pub struct SharedGroup {
    log: SharedLog,
    group: String,
    topics: Vec<String>,
    queue_limit: usize,
    /// The members' common state, while one of them lives. Held while the group is joined,
    /// so consumers joining at once join it once.
    hub: tokio::sync::Mutex<std::sync::Weak<Hub>>,
}

impl std::fmt::Debug for SharedGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedGroup")
            .field("group", &self.group)
            .field("topics", &self.topics)
            .finish()
    }
}

impl SharedGroup {
    /// A group `group` over `topics`: every topic any of its consumers reads.
    pub fn new(log: SharedLog, group: impl Into<String>, topics: Vec<String>) -> Self {
        let mut unique = Vec::new();
        for topic in topics {
            if !unique.contains(&topic) {
                unique.push(topic);
            }
        }
        SharedGroup {
            log,
            group: group.into(),
            topics: unique,
            queue_limit: QUEUE_LIMIT,
            hub: tokio::sync::Mutex::new(std::sync::Weak::new()),
        }
    }

    /// The same group with another limit to a consumer's queue than [`QUEUE_LIMIT`].
    pub fn with_queue_limit(mut self, limit: usize) -> Self {
        self.queue_limit = limit.max(1);
        self
    }

    pub fn name(&self) -> &str {
        &self.group
    }

    /// A member for a consumer of `topics` (each one of the group's topics). Joins the group
    /// when no consumer of this process is in it yet.
    pub async fn join(&self, topics: &[String]) -> Result<Box<dyn GroupMember>, LogError> {
        if let Some(topic) = topics.iter().find(|topic| !self.topics.contains(topic)) {
            return Err(LogError::UnknownTopic(format!(
                "{topic} (not one of group {}'s topics)",
                self.group
            )));
        }
        let mut slot = self.hub.lock().await;
        let hub = match slot.upgrade() {
            Some(hub) => hub,
            None => {
                let member = self.log.join_group(&self.group, &self.topics).await?;
                let hub = Arc::new(Hub {
                    member: tokio::sync::Mutex::new(member),
                    state: Mutex::new(State {
                        queue_limit: self.queue_limit,
                        ..State::default()
                    }),
                });
                *slot = Arc::downgrade(&hub);
                hub
            }
        };
        drop(slot);
        let id = {
            let mut state = lock(&hub.state);
            let id = state.next_id;
            state.next_id += 1;
            let mut queue = VecDeque::new();
            let assigned: Vec<TopicPartition> = state
                .assigned
                .iter()
                .filter(|(topic, _)| topics.contains(topic))
                .cloned()
                .collect();
            if !assigned.is_empty() {
                queue.push_back(Entry::Event(GroupEvent::Assigned(assigned)));
            }
            state.consumers.insert(
                id,
                Consumer {
                    topics: topics.to_vec(),
                    next: HashMap::new(),
                    queue,
                    queued_records: 0,
                    overflowed: false,
                },
            );
            id
        };
        Ok(Box::new(Shared { hub, id }))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Hub {
    /// The one real member; held by whoever polls it.
    member: tokio::sync::Mutex<Box<dyn GroupMember>>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    queue_limit: usize,
    next_id: u64,
    consumers: HashMap<u64, Consumer>,
    /// The partitions assigned to the shared member.
    assigned: HashSet<TopicPartition>,
    /// The next offset the shared member delivers, per partition it started.
    reading: HashMap<TopicPartition, u64>,
}

struct Consumer {
    topics: Vec<String>,
    /// The next offset to hand over, per partition this consumer started.
    next: HashMap<TopicPartition, u64>,
    queue: VecDeque<Entry>,
    queued_records: usize,
    /// Records were withheld from it (its queue was full): the shared member must read its
    /// partitions again from `next` before it gets any more.
    overflowed: bool,
}

enum Entry {
    Event(GroupEvent),
    Record(LogRecord),
}

impl State {
    /// An assignment change: every position of the partitions is forgotten (each consumer
    /// starts them again), and each consumer hears of the partitions of its topics.
    fn hand_over(
        &mut self,
        partitions: &[TopicPartition],
        event: fn(Vec<TopicPartition>) -> GroupEvent,
    ) {
        for partition in partitions {
            self.reading.remove(partition);
        }
        for consumer in self.consumers.values_mut() {
            let mine: Vec<TopicPartition> = partitions
                .iter()
                .filter(|(topic, _)| consumer.topics.contains(topic))
                .cloned()
                .collect();
            for partition in &mine {
                consumer.next.remove(partition);
            }
            if !mine.is_empty() {
                consumer.queue.push_back(Entry::Event(event(mine)));
            }
        }
    }

    /// Hands what the shared member said to every consumer it concerns.
    fn distribute(&mut self, event: GroupEvent) {
        match event {
            GroupEvent::Assigned(partitions) => {
                for partition in &partitions {
                    self.assigned.insert(partition.clone());
                }
                self.hand_over(&partitions, GroupEvent::Assigned);
            }
            GroupEvent::Revoked(partitions) => {
                for partition in &partitions {
                    self.assigned.remove(partition);
                }
                self.hand_over(&partitions, GroupEvent::Revoked);
            }
            GroupEvent::Records(records) => {
                for record in records {
                    let partition = (record.position.topic.clone(), record.position.partition);
                    if let Some(next) = self.reading.get_mut(&partition) {
                        *next = (*next).max(record.position.offset + 1);
                    }
                    for consumer in self.consumers.values_mut() {
                        let Some(next) = consumer.next.get_mut(&partition) else {
                            continue;
                        };
                        if record.position.offset < *next || consumer.overflowed {
                            continue;
                        }
                        if consumer.queued_records >= self.queue_limit {
                            consumer.overflowed = true;
                            continue;
                        }
                        *next = record.position.offset + 1;
                        consumer.queue.push_back(Entry::Record(record.clone()));
                        consumer.queued_records += 1;
                    }
                }
            }
        }
    }
}

/// One consumer's member of a [`SharedGroup`].
struct Shared {
    hub: Arc<Hub>,
    id: u64,
}

impl Drop for Shared {
    fn drop(&mut self) {
        lock(&self.hub.state).consumers.remove(&self.id);
    }
}

impl Shared {
    /// What is queued for this consumer: one assignment change, or up to `max` records (up to
    /// the next assignment change).
    fn take(&self, max: usize) -> Option<GroupEvent> {
        let mut state = lock(&self.hub.state);
        let consumer = state.consumers.get_mut(&self.id)?;
        let event = match consumer.queue.front()? {
            Entry::Event(_) => match consumer.queue.pop_front() {
                Some(Entry::Event(event)) => event,
                _ => unreachable!("the front was an event"),
            },
            Entry::Record(_) => {
                let mut records = Vec::new();
                while records.len() < max {
                    match consumer.queue.front() {
                        Some(Entry::Record(_)) => {}
                        _ => break,
                    }
                    if let Some(Entry::Record(record)) = consumer.queue.pop_front() {
                        records.push(record);
                    }
                }
                consumer.queued_records -= records.len();
                GroupEvent::Records(records)
            }
        };
        Some(event)
    }

    /// After an overflow, with the queue taken: the partitions whose records were withheld,
    /// each from where this consumer stands, if the shared member reads past it.
    fn rewind(&self) -> Vec<(TopicPartition, u64)> {
        let mut state = lock(&self.hub.state);
        let State {
            consumers, reading, ..
        } = &mut *state;
        let Some(consumer) = consumers.get_mut(&self.id) else {
            return Vec::new();
        };
        if !consumer.overflowed || !consumer.queue.is_empty() {
            return Vec::new();
        }
        consumer.overflowed = false;
        consumer
            .next
            .iter()
            .filter(|(partition, next)| reading.get(*partition).is_some_and(|read| read > *next))
            .map(|(partition, next)| (partition.clone(), *next))
            .collect()
    }
}

#[async_trait]
impl GroupMember for Shared {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<GroupEvent, LogError> {
        let max = max.max(1);
        if let Some(event) = self.take(max) {
            return Ok(event);
        }
        let deadline = tokio::time::Instant::now() + wait;
        // Whoever holds the member polls it for everyone; wait for that poll to end.
        let mut member = tokio::select! {
            member = self.hub.member.lock() => member,
            _ = tokio::time::sleep_until(deadline) => {
                return Ok(self.take(max).unwrap_or(GroupEvent::Records(Vec::new())));
            }
        };
        if let Some(event) = self.take(max) {
            return Ok(event);
        }
        for ((topic, partition), next) in self.rewind() {
            // Read again what was withheld from this consumer; a partition revoked meanwhile
            // is not read at all (its Revoked event is queued).
            match member.start(&topic, partition, next).await {
                Ok(()) => {
                    lock(&self.hub.state)
                        .reading
                        .insert((topic, partition), next);
                }
                Err(LogError::UnknownPartition { .. }) => {}
                Err(error) => {
                    if let Some(consumer) = lock(&self.hub.state).consumers.get_mut(&self.id) {
                        consumer.overflowed = true;
                    }
                    return Err(error);
                }
            }
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let event = member.poll(max, left).await?;
        lock(&self.hub.state).distribute(event);
        drop(member);
        Ok(self.take(max).unwrap_or(GroupEvent::Records(Vec::new())))
    }

    async fn start(&mut self, topic: &str, partition: u32, offset: u64) -> Result<(), LogError> {
        let key = (topic.to_owned(), partition);
        // Hold the member, so no poll distributes records while the positions change.
        let mut member = self.hub.member.lock().await;
        let reading = {
            let mut state = lock(&self.hub.state);
            if !state.assigned.contains(&key) {
                return Err(LogError::UnknownPartition {
                    topic: topic.to_owned(),
                    partition,
                });
            }
            let reading = state.reading.get(&key).copied();
            if let Some(consumer) = state.consumers.get_mut(&self.id) {
                // Whatever was queued of the partition came from an earlier start.
                let before = consumer.queue.len();
                consumer.queue.retain(|entry| match entry {
                    Entry::Record(record) => {
                        record.position.topic != topic || record.position.partition != partition
                    }
                    Entry::Event(_) => true,
                });
                consumer.queued_records -= before - consumer.queue.len();
                consumer.next.insert(key.clone(), offset);
            }
            reading
        };
        // Read from here unless the member already reads from at or before it.
        if reading.is_none_or(|reading| offset < reading) {
            if let Err(error) = member.start(topic, partition, offset).await {
                if let Some(consumer) = lock(&self.hub.state).consumers.get_mut(&self.id) {
                    consumer.next.remove(&key);
                }
                return Err(error);
            }
            lock(&self.hub.state).reading.insert(key, offset);
        }
        Ok(())
    }
}
