//! The saga driver: everything around the pure state machine that does IO.
//!
//! - Events reach the saga through the projection runtime (`projections::runtime`): a consumer
//!   group over the order, payment and stock topics, positions stored in the same transaction
//!   as the effect, the effective-history rule, parking. The saga's "read model" is its own
//!   state: [`SagaProjection::apply`] loads each saga, runs [`react`], and in the same
//!   transaction stores the new state and puts the commands it decided in the outbox.
//! - A ticker fires due deadlines the same way (load, react, store + outbox, one transaction).
//! - A relay publishes the outbox to the command topics, in order per aggregate, and marks rows
//!   sent. On a stop it flushes: it publishes what the worker and the ticker commit until they
//!   have ended (bounded by [`FLUSH_LIMIT`]); what is left is published at the next start.
//! - The relay and the ticker are woken by this process's commits ([`Wakes`]): the relay when
//!   commands were committed to the outbox, the ticker when a deadline earlier than the one it
//!   sleeps until was committed; otherwise the ticker sleeps until its next deadline. Each also
//!   looks on its own every [`RESCAN`], for what no commit of this process announces (see
//!   there). A crash between the publish and the mark sends a command twice; participants dedupe
//!   it by its command id, which is derived from the saga, the step and the attempt.
//! - Two instances never apply the same events: the runtime fences each batch with a claim on
//!   its partitions' stored positions, checked in the batch's transaction, and judges events
//!   against the versions stored there, so an instance that lost its partitions (a rebalance,
//!   a pause past the session timeout) and then commits applies nothing another applied.
//! - The worker and the ticker (or an operator's retry) writing the same saga are kept apart by
//!   a revision number: an update that lost the race is retried on what is stored.
//! - A stored position beyond the log's end stops the saga's consumer on that partition (see
//!   `projections::runtime`); the saga's `recovery` text says what an operator can do, as no
//!   tool rebuilds a saga from the log.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::OrderId;
use event_log::{SharedLog, partition_for, topics};
use event_schema::commands::{CommandMessage, SAGA_ACTOR, saga_on_behalf_of};
use projections::runtime::{ApplyError, Event, Projection};
use serde::Serialize;
use sql_store::{Db, DbError, Kind, Migrations, Tx, Value, write_rows, write_rows_returning};
use tokio::sync::{Notify, watch};
use tokio_util::task::TaskTracker;

use crate::saga::{Action, Input, Saga, SagaConfig, SagaEvent, SagaState, react};

/// The orchestrator's tables (`migrations/saga/`).
pub static MIGRATIONS: LazyLock<Migrations> = LazyLock::new(|| {
    sql_store::migrations!(
        "saga",
        "../migrations/saga/20261207000601_sagas_outbox.sql",
        "../migrations/saga/20261208000601_sagas_by_update.sql",
    )
});

/// How often the relay and the ticker look for work no commit of this process announced:
/// outbox rows and deadlines written by another process on the same saga database (an
/// operator's `platform sagas retry`; on Postgres, the other instances of the saga, whose
/// deadlines this ticker fires too if it is first), and publishes to retry after the log
/// refused them. Everything this process commits wakes them at once ([`Wakes`]).
pub const RESCAN: Duration = Duration::from_secs(1);

/// The longest a failing publish waits before the relay tries again (doubling from 50 ms).
const RELAY_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// What wakes the relay and the ticker of this process. The saga's batches and pokes announce
/// their commits here; nothing is announced before its transaction commits, so a woken task
/// always finds what woke it.
#[derive(Debug)]
pub struct Wakes {
    outbox: Notify,
    deadline: Notify,
    /// The deadline the ticker sleeps until (ms since the epoch); `i64::MAX` while it reads the
    /// next one, so that any deadline committed meanwhile wakes it again.
    ticker_until: AtomicI64,
    /// What the current batch of [`SagaProjection::apply`] put in the outbox and the earliest
    /// deadline it set, announced by [`Projection::committed`].
    batch_sent: AtomicBool,
    batch_deadline: AtomicI64,
}

impl Default for Wakes {
    fn default() -> Self {
        Wakes {
            outbox: Notify::new(),
            deadline: Notify::new(),
            ticker_until: AtomicI64::new(i64::MAX),
            batch_sent: AtomicBool::new(false),
            batch_deadline: AtomicI64::new(i64::MAX),
        }
    }
}

impl Wakes {
    /// Commands were committed to the outbox.
    pub fn outbox_committed(&self) {
        self.outbox.notify_one();
    }

    /// A saga with this deadline (ms since the epoch) was committed.
    pub fn deadline_committed(&self, deadline_ms: i64) {
        if deadline_ms < self.ticker_until.load(Ordering::SeqCst) {
            self.deadline.notify_one();
        }
    }

    fn note_batch(&self, sent: bool, deadline_ms: Option<i64>) {
        if sent {
            self.batch_sent.store(true, Ordering::SeqCst);
        }
        if let Some(deadline_ms) = deadline_ms {
            self.batch_deadline.fetch_min(deadline_ms, Ordering::SeqCst);
        }
    }

    fn batch_committed(&self) {
        if self.batch_sent.swap(false, Ordering::SeqCst) {
            self.outbox_committed();
        }
        let deadline = self.batch_deadline.swap(i64::MAX, Ordering::SeqCst);
        if deadline != i64::MAX {
            self.deadline_committed(deadline);
        }
    }
}

fn now_ms(now: DateTime<Utc>) -> i64 {
    now.timestamp_millis()
}

/// A saga as stored.
#[derive(Debug, Clone)]
struct Stored {
    saga: Saga,
    revision: Option<i64>,
    correlation_id: String,
}

async fn load(tx: &mut Tx, order_ids: &[String]) -> Result<HashMap<String, Stored>, DbError> {
    let mut found = HashMap::new();
    for chunk in order_ids.chunks(400) {
        let list = (1..=chunk.len())
            .map(|n| format!("${n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let args: Vec<Value> = chunk.iter().map(|id| Value::from(id.as_str())).collect();
        for row in tx
            .fetch_all(
                &format!("SELECT order_id, revision, correlation_id, body FROM sagas WHERE order_id IN ({list})"),
                &args,
            )
            .await?
        {
            let saga: Saga = serde_json::from_str(&row.text("body"))
                .map_err(|error| DbError::Other(format!("stored saga {} is unreadable: {error}", row.text("order_id"))))?;
            found.insert(
                row.text("order_id"),
                Stored {
                    saga,
                    revision: Some(row.int("revision")),
                    correlation_id: row.text("correlation_id"),
                },
            );
        }
    }
    Ok(found)
}

/// The columns of `sagas` that [`save_all`] writes.
const SAGA_COLUMNS: &[(&str, Kind)] = &[
    ("order_id", Kind::Text),
    ("state", Kind::Text),
    ("deadline", Kind::Int),
    ("correlation_id", Kind::Text),
    ("started_at", Kind::Int),
    ("updated_at", Kind::Int),
    ("revision", Kind::Int),
    ("body", Kind::Text),
];

/// Writes each saga if nobody else changed it since it was loaded (its stored revision is the
/// one it was loaded at; a new one, if nobody stored it meanwhile), all in one statement.
/// Returns the order ids written; a saga missing from them was moved on by somebody else and
/// is left as they stored it.
async fn save_all(
    tx: &mut Tx,
    sagas: &[&Stored],
    now: DateTime<Utc>,
) -> Result<HashSet<String>, DbError> {
    let mut rows = Vec::with_capacity(sagas.len());
    for stored in sagas {
        let saga = &stored.saga;
        let body =
            serde_json::to_string(saga).map_err(|error| DbError::Other(error.to_string()))?;
        rows.push(vec![
            saga.order_id.to_string().into(),
            saga.state.as_str().into(),
            saga.deadline
                .map_or(Value::Null, |deadline| deadline.timestamp_millis().into()),
            stored.correlation_id.as_str().into(),
            saga.started_at.unwrap_or(now).timestamp_millis().into(),
            now_ms(now).into(),
            stored.revision.map_or(1, |revision| revision + 1).into(),
            body.into(),
        ]);
    }
    // A new saga is written as revision 1, which the update below never overwrites (stored
    // revisions start at 1): a concurrent first write wins and this one is judged again.
    let written = write_rows_returning(
        tx,
        "sagas",
        SAGA_COLUMNS,
        &rows,
        "ON CONFLICT (order_id) DO UPDATE SET state = excluded.state, deadline = excluded.deadline,
             updated_at = excluded.updated_at, revision = excluded.revision, body = excluded.body
         WHERE sagas.revision = excluded.revision - 1",
        "order_id",
    )
    .await?;
    Ok(written.iter().map(|row| row.text("order_id")).collect())
}

/// Orders the outbox rows of one transaction: the commands of each saga in the order they
/// were decided, after those of earlier transactions.
struct OutboxSeq(i64);

impl OutboxSeq {
    fn starting(now: DateTime<Utc>) -> OutboxSeq {
        OutboxSeq(now.timestamp_micros() * 100)
    }

    fn next(&mut self) -> i64 {
        self.0 += 1;
        self.0
    }
}

/// Why the saga sends commands: the event (or `deadline`, `operator-retry`) that caused them,
/// its trace, and the actor they are sent for.
struct Cause {
    causation_id: String,
    traceparent: Option<String>,
    /// [`event_schema::commands::saga_on_behalf_of`] the cause's actor, or the saga's own.
    actor: String,
}

impl Cause {
    fn event(envelope: &event_schema::Envelope) -> Cause {
        Cause {
            causation_id: envelope.event_id.to_string(),
            traceparent: envelope.traceparent.clone(),
            actor: saga_on_behalf_of(&envelope.actor),
        }
    }
}

/// The outbox rows for the commands among `actions`.
fn outbox_rows(
    rows: &mut Vec<Vec<Value>>,
    seq: &mut OutboxSeq,
    order_id: OrderId,
    actions: &[Action],
    correlation_id: &str,
    cause: &Cause,
    now: DateTime<Utc>,
) -> Result<(), DbError> {
    for action in actions {
        let Action::Send {
            aggregate_id,
            command,
            attempt,
            ..
        } = action
        else {
            continue;
        };
        let Some(command_id) = action.command_id(order_id) else {
            continue;
        };
        let message = CommandMessage {
            command_id,
            correlation_id: correlation_id.to_owned(),
            causation_id: Some(cause.causation_id.clone()),
            actor: cause.actor.clone(),
            aggregate_id: aggregate_id.clone(),
            issued_at: now,
            traceparent: cause.traceparent.clone(),
            attempt: Some(*attempt),
            command: command.clone(),
        };
        let body =
            serde_json::to_string(&message).map_err(|error| DbError::Other(error.to_string()))?;
        rows.push(vec![
            command_id.to_string().into(),
            seq.next().into(),
            order_id.to_string().into(),
            command.service().into(),
            aggregate_id.as_str().into(),
            body.into(),
            now_ms(now).into(),
        ]);
    }
    Ok(())
}

/// Puts outbox rows in the outbox, all in one statement (a command already there stays as it is).
async fn enqueue(tx: &mut Tx, rows: &[Vec<Value>]) -> Result<(), DbError> {
    write_rows(
        tx,
        "saga_outbox",
        &[
            ("command_id", Kind::Text),
            ("seq", Kind::Int),
            ("order_id", Kind::Text),
            ("service", Kind::Text),
            ("aggregate_id", Kind::Text),
            ("message", Kind::Text),
            ("created_at", Kind::Int),
        ],
        rows,
        "ON CONFLICT (command_id) DO NOTHING",
    )
    .await?;
    Ok(())
}

/// A saga's events of one batch, decided on `stored`: the saga after them, and each event's
/// actions.
fn decide<'e>(
    stored: &mut Stored,
    events: &[(SagaEvent, &'e event_schema::Envelope)],
    now: DateTime<Utc>,
    config: &SagaConfig,
) -> Vec<(Vec<Action>, &'e event_schema::Envelope)> {
    let mut decided = Vec::with_capacity(events.len());
    for (saga_event, envelope) in events {
        let (saga, actions) = react(&stored.saga, &Input::Event(saga_event.clone()), now, config);
        stored.saga = saga;
        decided.push((actions, *envelope));
    }
    decided
}

/// The saga as a consumer of the participants' events (see the module documentation).
#[derive(Debug, Clone)]
pub struct SagaProjection {
    pub config: SagaConfig,
    pub wakes: Arc<Wakes>,
}

#[async_trait]
impl Projection for SagaProjection {
    fn name(&self) -> &'static str {
        "saga"
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["order", "payment", "stock"]
    }

    fn migrations(&self) -> &'static Migrations {
        &MIGRATIONS
    }

    /// The saga's state includes the commands it sent, so `platform replay` does not rebuild
    /// it: the operator restores what was lost, or accepts the loss by hand.
    fn recovery(&self) -> String {
        "the log is restored, or an operator who has checked what the lost records were moves the \
         saga's stored position to the log's end (no tool rebuilds a saga from the log)"
            .into()
    }

    async fn apply(&self, tx: &mut Tx, events: &[Event]) -> Result<(), ApplyError> {
        let mut inputs = Vec::new();
        for (index, event) in events.iter().enumerate() {
            match SagaEvent::from_envelope(&event.envelope) {
                Ok(Some(saga_event)) => inputs.push((saga_event, &event.envelope)),
                Ok(None) => {}
                Err(error) => {
                    return Err(ApplyError::Poison {
                        index,
                        message: error.to_string(),
                    });
                }
            }
        }
        if inputs.is_empty() {
            return Ok(());
        }
        // Each saga's events, in log order.
        let mut by_saga: BTreeMap<String, Vec<(SagaEvent, &event_schema::Envelope)>> =
            BTreeMap::new();
        for (saga_event, envelope) in inputs {
            by_saga
                .entry(saga_event.order_id().to_string())
                .or_default()
                .push((saga_event, envelope));
        }
        let ids: Vec<String> = by_saga.keys().cloned().collect();
        let mut loaded = load(tx, &ids).await?;
        let now = Utc::now();
        let mut decided = Vec::with_capacity(by_saga.len());
        for (key, events) in &by_saga {
            let (order_id, first) = (events[0].0.order_id(), events[0].1);
            let mut stored = loaded.remove(key).unwrap_or_else(|| Stored {
                saga: Saga::new(order_id),
                revision: None,
                correlation_id: first.correlation_id.clone(),
            });
            let actions = decide(&mut stored, events, now, &self.config);
            decided.push((key, stored, actions));
        }
        let written = save_all(
            tx,
            &decided
                .iter()
                .map(|(_, stored, _)| stored)
                .collect::<Vec<_>>(),
            now,
        )
        .await?;
        let mut outbox = Vec::new();
        let mut seq = OutboxSeq::starting(now);
        let mut earliest_deadline: Option<i64> = None;
        for (key, mut stored, mut actions) in decided {
            let mut attempt = 1;
            while !written.contains(key) {
                // Somebody else (the ticker firing a deadline, an operator's retry) moved this
                // saga on since it was loaded. Reload just this saga and decide its events again
                // on what is stored now, as a retry of the whole batch would: under Postgres'
                // read committed the reload sees the other writer's commit. Retrying the whole
                // batch instead would lose the race again and again while the ticker fires a
                // backlog of deadlines after a restart.
                if attempt == 3 {
                    return Err(ApplyError::Db(DbError::Other(format!(
                        "saga {key} changed concurrently; the batch is retried"
                    ))));
                }
                attempt += 1;
                let events = &by_saga[key];
                stored = load(tx, std::slice::from_ref(key))
                    .await?
                    .remove(key)
                    .unwrap_or_else(|| Stored {
                        saga: Saga::new(events[0].0.order_id()),
                        revision: None,
                        correlation_id: events[0].1.correlation_id.clone(),
                    });
                actions = decide(&mut stored, events, now, &self.config);
                if !save_all(tx, &[&stored], now).await?.is_empty() {
                    break;
                }
            }
            if let Some(deadline) = stored.saga.deadline {
                let deadline = deadline.timestamp_millis();
                earliest_deadline = Some(earliest_deadline.map_or(deadline, |d| d.min(deadline)));
            }
            for (actions, envelope) in actions {
                outbox_rows(
                    &mut outbox,
                    &mut seq,
                    stored.saga.order_id,
                    &actions,
                    &stored.correlation_id,
                    &Cause::event(envelope),
                    now,
                )?;
            }
        }
        let sent = !outbox.is_empty();
        enqueue(tx, &outbox).await?;
        // Announced once the runtime has committed the batch (`committed`), never before: a
        // relay woken earlier would find nothing and sleep until its next look.
        self.wakes.note_batch(sent, earliest_deadline);
        Ok(())
    }

    fn committed(&self) {
        self.wakes.batch_committed();
    }
}

/// What an operator or the ticker can do to one saga. `actor` is who asks (an operator's
/// principal; the ticker's [`SAGA_ACTOR`]): the commands it causes are sent on their behalf.
pub async fn poke(
    db: &Db,
    config: &SagaConfig,
    order_id: &str,
    input: Input,
    actor: &str,
    wakes: &Wakes,
) -> Result<Option<Saga>, DbError> {
    Ok(
        match poke_if(db, config, order_id, input, actor, wakes, |_| true).await? {
            Retry::Retried(saga) => Some(*saga),
            _ => None,
        },
    )
}

/// What an operator's [`retry`] did.
#[derive(Debug)]
pub enum Retry {
    /// No saga for the order.
    NoSaga,
    /// The saga does not need attention: nothing was retried.
    NothingToRetry(SagaState),
    /// The saga moved on while the retry was decided: nothing was retried.
    Changed,
    /// The parked step is tried again; the saga as it is now.
    Retried(Box<Saga>),
}

/// An operator's retry of the parked step of a saga that needs attention (`POST
/// /sagas/{id}/retry`, the console's button, `platform sagas retry`): checked and applied in
/// one transaction, so a saga that moved on meanwhile is not retried.
pub async fn retry(
    db: &Db,
    config: &SagaConfig,
    order_id: &str,
    actor: &str,
    wakes: &Wakes,
) -> Result<Retry, DbError> {
    poke_if(
        db,
        config,
        order_id,
        Input::OperatorRetry,
        actor,
        wakes,
        |saga| saga.state == SagaState::NeedsAttention,
    )
    .await
}

async fn poke_if(
    db: &Db,
    config: &SagaConfig,
    order_id: &str,
    input: Input,
    actor: &str,
    wakes: &Wakes,
    applies: impl Fn(&Saga) -> bool,
) -> Result<Retry, DbError> {
    let mut tx = db.begin().await?;
    let mut sagas = load(&mut tx, &[order_id.to_owned()]).await?;
    let Some(stored) = sagas.get_mut(order_id) else {
        return Ok(Retry::NoSaga);
    };
    if !applies(&stored.saga) {
        return Ok(Retry::NothingToRetry(stored.saga.state));
    }
    let now = Utc::now();
    let deadline_before = stored.saga.deadline;
    let (saga, actions) = react(&stored.saga, &input, now, config);
    stored.saga = saga;
    let cause = Cause {
        causation_id: match input {
            Input::DeadlinePassed => "deadline".to_owned(),
            Input::OperatorRetry => "operator-retry".to_owned(),
            Input::Event(event) => event.event_id.to_string(),
        },
        traceparent: None,
        actor: saga_on_behalf_of(actor),
    };
    if save_all(&mut tx, &[stored], now).await?.is_empty() {
        // Someone else moved the saga on; the next tick looks again.
        return Ok(Retry::Changed);
    }
    let mut outbox = Vec::new();
    outbox_rows(
        &mut outbox,
        &mut OutboxSeq::starting(now),
        stored.saga.order_id,
        &actions,
        &stored.correlation_id,
        &cause,
        now,
    )?;
    enqueue(&mut tx, &outbox).await?;
    tx.commit().await?;
    if actions
        .iter()
        .any(|action| matches!(action, Action::Send { .. }))
    {
        wakes.outbox_committed();
    }
    if let Some(deadline) = stored.saga.deadline
        && deadline_before != stored.saga.deadline
    {
        wakes.deadline_committed(deadline.timestamp_millis());
    }
    Ok(Retry::Retried(Box::new(stored.saga.clone())))
}

/// Fires due deadlines until `shutdown`: sleeps until the earliest stored deadline, woken
/// earlier by a commit of this process that sets a sooner one, and looks again every `rescan`
/// at most (deadlines another process stored; [`RESCAN`]).
pub async fn run_ticker(
    db: Db,
    config: SagaConfig,
    wakes: Arc<Wakes>,
    rescan: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        // From here until it sleeps again, any deadline committed wakes the ticker once more.
        wakes.ticker_until.store(i64::MAX, Ordering::SeqCst);
        let mut next = None;
        loop {
            let now = Utc::now().timestamp_millis();
            let due = db
                .fetch_all(
                    "SELECT order_id, deadline FROM sagas WHERE deadline IS NOT NULL ORDER BY deadline LIMIT 200",
                    &[],
                )
                .await;
            let due = match due {
                Ok(due) => due,
                Err(error) => {
                    tracing::warn!(%error, "cannot read due saga deadlines; retrying");
                    break;
                }
            };
            // Deadlines fired that moved on (a saga whose deadline stays where it was, or that
            // could not be written, is looked at again at the next wake, not in a loop).
            let (mut fired, mut moved) = (0, 0);
            for row in &due {
                let deadline = row.int("deadline");
                if deadline > now {
                    next = Some(deadline);
                    break;
                }
                let order_id = row.text("order_id");
                fired += 1;
                match poke(
                    &db,
                    &config,
                    &order_id,
                    Input::DeadlinePassed,
                    SAGA_ACTOR,
                    &wakes,
                )
                .await
                {
                    Ok(Some(saga))
                        if saga.deadline.map(|d| d.timestamp_millis()) != Some(deadline) =>
                    {
                        moved += 1
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, order_id, "firing a saga deadline failed; retrying");
                    }
                }
            }
            // A full page of due deadlines, all moved on: there may be more.
            if fired < 200 || moved < fired {
                break;
            }
        }
        let now = Utc::now().timestamp_millis();
        let rescan_at = now.saturating_add(rescan.as_millis().min(i64::MAX as u128) as i64);
        let until = next.map_or(rescan_at, |next| next.min(rescan_at));
        wakes.ticker_until.store(until, Ordering::SeqCst);
        let wait = Duration::from_millis(until.saturating_sub(now).max(0) as u64);
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = wakes.deadline.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// How long the relay goes on publishing once the process is told to stop: the commands the
/// saga's worker and ticker committed up to their end are published by this process when the
/// log takes them within it, and by the next start otherwise. Shorter than the platform's bound
/// on a stop's tasks, so the process exits within that bound whatever the log does.
pub const FLUSH_LIMIT: Duration = Duration::from_secs(3);

/// How often the relay looks at the outbox during a stop while its producers still run, for a
/// commit whose wake-up it missed.
const FLUSH_RESCAN: Duration = Duration::from_millis(50);

/// Publishes the outbox until `shutdown`: in order per aggregate, then marks rows sent. Woken
/// by this process's commits to the outbox, and looks on its own every `rescan` ([`RESCAN`]).
///
/// On the stop it flushes: it publishes what is in the outbox until `producers` (the tasks of
/// this process that write it: the saga's worker finishing its batch, the ticker) have ended
/// and the outbox is empty, for at most [`FLUSH_LIMIT`]. `producers` must be closed once they
/// are all tracked. What is left (the log refused it, or the limit passed) stays unsent in the
/// outbox and is published at the next start.
pub async fn run_relay(
    db: Db,
    log: SharedLog,
    topic_prefix: String,
    wakes: Arc<Wakes>,
    rescan: Duration,
    mut shutdown: watch::Receiver<bool>,
    producers: TaskTracker,
) {
    let mut backoff = Duration::ZERO;
    // Set at the stop: until when the relay goes on publishing.
    let mut flush_until: Option<tokio::time::Instant> = None;
    loop {
        if flush_until.is_none() && *shutdown.borrow() {
            flush_until = Some(tokio::time::Instant::now() + FLUSH_LIMIT);
        }
        // Looked at before the rows: an outbox found empty after the producers ended stays
        // empty, as far as this process is concerned.
        let producers_ended = producers.is_closed() && producers.is_empty();
        let rows = match db
            .fetch_all(
                "SELECT command_id, service, aggregate_id, message FROM saga_outbox
                 WHERE sent_at IS NULL ORDER BY seq LIMIT 1000",
                &[],
            )
            .await
        {
            Ok(rows) => rows,
            Err(error) => {
                tracing::warn!(%error, "cannot read the saga outbox; retrying");
                Vec::new()
            }
        };
        match flush_until {
            None => {
                if rows.is_empty() || !backoff.is_zero() {
                    let wait = if rows.is_empty() { rescan } else { backoff };
                    tokio::select! {
                        // A dropped sender is a stop too.
                        _ = shutdown.changed() => {
                            flush_until = Some(tokio::time::Instant::now() + FLUSH_LIMIT);
                            continue;
                        }
                        _ = wakes.outbox.notified(), if rows.is_empty() => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                    if rows.is_empty() {
                        continue;
                    }
                }
            }
            Some(until) => {
                if rows.is_empty() && producers_ended {
                    return;
                }
                if tokio::time::Instant::now() >= until {
                    tracing::warn!(
                        "the saga's outbox was not flushed within {FLUSH_LIMIT:?} of the stop; what is left unsent is published at the next start"
                    );
                    return;
                }
                if rows.is_empty() || !backoff.is_zero() {
                    let wait = if rows.is_empty() {
                        FLUSH_RESCAN
                    } else {
                        backoff
                    };
                    let wake_at = (tokio::time::Instant::now() + wait).min(until);
                    tokio::select! {
                        _ = producers.wait(), if rows.is_empty() => {}
                        _ = wakes.outbox.notified(), if rows.is_empty() => {}
                        _ = tokio::time::sleep_until(wake_at) => {}
                    }
                    if rows.is_empty() || tokio::time::Instant::now() >= until {
                        continue;
                    }
                }
            }
        }
        let mut by_aggregate: BTreeMap<(String, String), Vec<(String, String)>> = BTreeMap::new();
        for row in rows {
            by_aggregate
                .entry((row.text("service"), row.text("aggregate_id")))
                .or_default()
                .push((row.text("command_id"), row.text("message")));
        }
        let mut running = tokio::task::JoinSet::new();
        for ((service, aggregate_id), messages) in by_aggregate {
            let log = log.clone();
            let topic = topics::commands(&topic_prefix, &service);
            running.spawn(async move {
                let mut sent = Vec::new();
                let partitions = match log.partition_count(&topic).await {
                    Ok(partitions) => partitions,
                    Err(error) => {
                        tracing::warn!(%error, topic, "cannot publish saga commands yet");
                        return (sent, false);
                    }
                };
                let partition = partition_for(&aggregate_id, partitions);
                for (command_id, message) in messages {
                    let Ok(message) = serde_json::from_str::<CommandMessage>(&message) else {
                        tracing::error!(command_id, "unreadable outbox row; left unsent");
                        return (sent, false);
                    };
                    match log.append(&topic, partition, message.to_record()).await {
                        Ok(_) => sent.push(command_id),
                        Err(error) => {
                            tracing::warn!(%error, topic, "publishing a saga command failed; retrying");
                            return (sent, false);
                        }
                    }
                }
                (sent, true)
            });
        }
        let mut sent = Vec::new();
        let mut failed = false;
        while let Some(done) = running.join_next().await {
            match done {
                Ok((done, complete)) => {
                    sent.extend(done);
                    failed |= !complete;
                }
                Err(_) => failed = true,
            }
        }
        // Rows the log refused are tried again after a pause that grows while it keeps
        // refusing, not at once.
        backoff = if failed {
            (backoff * 2).clamp(Duration::from_millis(50), RELAY_BACKOFF_MAX)
        } else {
            Duration::ZERO
        };
        for chunk in sent.chunks(400) {
            let list = (2..chunk.len() + 2)
                .map(|n| format!("${n}"))
                .collect::<Vec<_>>()
                .join(", ");
            let mut args: Vec<Value> = vec![Utc::now().timestamp_millis().into()];
            args.extend(chunk.iter().map(|id| Value::from(id.as_str())));
            if let Err(error) = db
                .execute(
                    &format!("UPDATE saga_outbox SET sent_at = $1 WHERE command_id IN ({list})"),
                    &args,
                )
                .await
            {
                // They will be sent again: participants dedupe by command id.
                tracing::warn!(%error, "cannot mark saga commands sent");
            }
        }
    }
}

/// One line of the saga list.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct SagaSummary {
    pub order_id: String,
    pub state: String,
    /// RFC 3339; absent when nothing is awaited.
    pub deadline: Option<String>,
    pub started_at: String,
    pub updated_at: String,
    pub correlation_id: String,
}

fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|time| time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// Sagas, filtered by state and by how long they have not moved, most recently changed first.
pub async fn list(
    db: &Db,
    state: Option<&str>,
    stuck_for: Option<Duration>,
    limit: i64,
) -> Result<Vec<SagaSummary>, DbError> {
    let filter = ListFilter {
        state,
        stuck_for,
        limit,
        ..ListFilter::default()
    };
    Ok(list_page(db, &filter).await?.0)
}

/// Where a page of [`list_page`] ended: the last saga's update time and order id. Its text
/// form (`<updated ms>.<order id>`) goes into links to the next page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub updated_ms: i64,
    pub order_id: String,
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.updated_ms, self.order_id)
    }
}

impl std::str::FromStr for Cursor {
    type Err = String;

    fn from_str(text: &str) -> Result<Cursor, String> {
        text.split_once('.')
            .and_then(|(ms, order_id)| {
                Some(Cursor {
                    updated_ms: ms.parse().ok()?,
                    order_id: order_id.to_owned(),
                })
            })
            .filter(|cursor| !cursor.order_id.is_empty())
            .ok_or_else(|| format!("{text:?} is not a page position (<milliseconds>.<order id>)"))
    }
}

/// Which sagas [`list_page`] shows.
#[derive(Debug, Clone, Default)]
pub struct ListFilter<'a> {
    pub state: Option<&'a str>,
    /// Unfinished and unchanged for at least this long.
    pub stuck_for: Option<Duration>,
    /// Changed at or after this time (milliseconds since the epoch).
    pub updated_from: Option<i64>,
    /// Changed before this time (milliseconds since the epoch).
    pub updated_to: Option<i64>,
    /// Start after this saga (the previous page's end).
    pub after: Option<Cursor>,
    pub limit: i64,
}

/// One page of sagas, most recently changed first, and where the next page starts when there
/// is one. Pages are keyed by (update time, order id), so a saga that changes while someone
/// pages moves to the front instead of shifting every later page.
pub async fn list_page(
    db: &Db,
    filter: &ListFilter<'_>,
) -> Result<(Vec<SagaSummary>, Option<Cursor>), DbError> {
    let mut sql = String::from(
        "SELECT order_id, state, deadline, started_at, updated_at, correlation_id FROM sagas WHERE 1 = 1",
    );
    let mut args: Vec<Value> = Vec::new();
    if let Some(state) = filter.state {
        args.push(state.into());
        sql.push_str(&format!(" AND state = ${}", args.len()));
    }
    if let Some(stuck_for) = filter.stuck_for {
        args.push((Utc::now().timestamp_millis() - stuck_for.as_millis() as i64).into());
        sql.push_str(&format!(" AND {}", stuck_since(args.len())));
    }
    if let Some(from) = filter.updated_from {
        args.push(from.into());
        sql.push_str(&format!(" AND updated_at >= ${}", args.len()));
    }
    if let Some(to) = filter.updated_to {
        args.push(to.into());
        sql.push_str(&format!(" AND updated_at < ${}", args.len()));
    }
    if let Some(after) = &filter.after {
        args.push(after.updated_ms.into());
        args.push(after.order_id.as_str().into());
        let (ms, id) = (args.len() - 1, args.len());
        sql.push_str(&format!(
            " AND (updated_at < ${ms} OR (updated_at = ${ms} AND order_id > ${id}))"
        ));
    }
    // One more than asked: whether a next page exists.
    args.push((filter.limit + 1).into());
    sql.push_str(&format!(
        " ORDER BY updated_at DESC, order_id LIMIT ${}",
        args.len()
    ));
    let mut rows = db.fetch_all(&sql, &args).await?;
    let more = rows.len() as i64 > filter.limit;
    rows.truncate(filter.limit.max(0) as usize);
    let next = match rows.last() {
        Some(last) if more => Some(Cursor {
            updated_ms: last.int("updated_at"),
            order_id: last.text("order_id"),
        }),
        _ => None,
    };
    let sagas = rows
        .into_iter()
        .map(|row| SagaSummary {
            order_id: row.text("order_id"),
            state: row.text("state"),
            deadline: row.get("deadline").int().map(rfc3339),
            started_at: rfc3339(row.int("started_at")),
            updated_at: rfc3339(row.int("updated_at")),
            correlation_id: row.text("correlation_id"),
        })
        .collect();
    Ok((sagas, next))
}

/// How many sagas are in each state, by state name.
pub async fn count_by_state(db: &Db) -> Result<Vec<(String, i64)>, DbError> {
    Ok(db
        .fetch_all(
            "SELECT state, COUNT(*) AS sagas FROM sagas GROUP BY state ORDER BY state",
            &[],
        )
        .await?
        .iter()
        .map(|row| (row.text("state"), row.int("sagas")))
        .collect())
}

/// The condition "unfinished and unchanged since the time in parameter `$n`".
fn stuck_since(n: usize) -> String {
    format!(
        "updated_at <= ${n} AND state NOT IN ('confirmed', 'completed', 'rejected', 'cancelled')"
    )
}

/// How many sagas [`list`] would find stuck for `stuck_for`, counted by the database.
pub async fn count_stuck(db: &Db, stuck_for: Duration) -> Result<i64, DbError> {
    let since = Utc::now().timestamp_millis() - stuck_for.as_millis() as i64;
    let row = db
        .fetch_optional(
            &format!(
                "SELECT COUNT(*) AS stuck FROM sagas WHERE {}",
                stuck_since(1)
            ),
            &[since.into()],
        )
        .await?;
    Ok(row.map_or(0, |row| row.int("stuck")))
}

/// One saga, whole.
pub async fn show(db: &Db, order_id: &str) -> Result<Option<(Saga, i64)>, DbError> {
    let row = db
        .fetch_optional(
            "SELECT revision, body FROM sagas WHERE order_id = $1",
            &[order_id.into()],
        )
        .await?;
    match row {
        None => Ok(None),
        Some(row) => {
            let saga = serde_json::from_str(&row.text("body"))
                .map_err(|error| DbError::Other(error.to_string()))?;
            Ok(Some((saga, row.int("revision"))))
        }
    }
}

#[cfg(test)]
mod tests {
    //! The relay and the ticker move on what this process commits without waiting for a look of
    //! their own: both run here with a rescan of an hour, so only the wake-ups can move them.

    use super::*;
    use domain::order::{OrderAggregate, OrderCommand, OrderLine, PlaceOrder};
    use domain::{Aggregate, CustomerId, Decision, PaymentToken, Quantity, Sku};
    use event_log::embedded::EmbeddedLog;
    use event_schema::{CommandMeta, Envelope};

    const NEVER: Duration = Duration::from_secs(3600);
    const PATIENCE: Duration = Duration::from_secs(30);

    struct Rig {
        _dir: tempfile::TempDir,
        db: Db,
        log: SharedLog,
        projection: SagaProjection,
        stop: watch::Sender<bool>,
        shutdown: watch::Receiver<bool>,
    }

    /// No producers: a relay given these flushes only what is in the outbox when it stops.
    fn ended() -> TaskTracker {
        let producers = TaskTracker::new();
        producers.close();
        producers
    }

    async fn rig(config: SagaConfig) -> Rig {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = Db::sqlite(&dir.path().join("saga.db")).await.expect("db");
        let log: SharedLog = Arc::new(
            EmbeddedLog::open(dir.path().join("log.db"))
                .await
                .expect("log"),
        );
        for service in ["order", "payment", "inventory"] {
            log.ensure_topic(&topics::commands("t", service), 1)
                .await
                .expect("topic");
        }
        let projection = SagaProjection {
            config,
            wakes: Arc::new(Wakes::default()),
        };
        projections::runtime::migrate(&db, &projection)
            .await
            .expect("migrate");
        let (stop, shutdown) = watch::channel(false);
        Rig {
            _dir: dir,
            db,
            log,
            projection,
            stop,
            shutdown,
        }
    }

    /// Places an order through the saga's `apply`, committed as the runtime commits a batch.
    async fn place(rig: &Rig) -> OrderId {
        let order_id = OrderId(uuid::Uuid::now_v7());
        let place = PlaceOrder {
            order_id,
            customer_id: CustomerId::parse("c-1").expect("customer"),
            currency: "EUR".parse().expect("currency"),
            payment_token: PaymentToken::parse("tok_approve").expect("token"),
            lines: vec![OrderLine {
                sku: Sku::parse("SKU-1").expect("sku"),
                quantity: Quantity::new(1).expect("quantity"),
                unit_price_minor: 100,
            }],
        };
        let Ok(Decision::Append(event)) =
            OrderAggregate::decide(&Default::default(), &OrderCommand::Place(place))
        else {
            panic!("placing an order decided nothing");
        };
        let envelope = Envelope::new::<OrderAggregate>(
            order_id.to_string(),
            1,
            &event,
            &CommandMeta::new("test"),
            Utc::now(),
        );
        let event = projections::runtime::Event {
            position: event_log::Position {
                topic: topics::events("t", "order"),
                partition: 0,
                offset: 0,
            },
            envelope,
        };
        let mut tx = rig.db.begin().await.expect("begin");
        rig.projection
            .apply(&mut tx, std::slice::from_ref(&event))
            .await
            .expect("apply");
        // The runtime writes the batch's positions and versions after `apply`: a relay or
        // ticker woken before the commit finds nothing in that time.
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.commit().await.expect("commit");
        rig.projection.committed();
        order_id
    }

    async fn outbox_rows(db: &Db) -> i64 {
        db.fetch_optional("SELECT COUNT(*) AS n FROM saga_outbox", &[])
            .await
            .expect("count")
            .map_or(0, |row| row.int("n"))
    }

    /// The relay publishes what a batch committed without waiting for its rescan; it is woken
    /// only after the commit (woken before it, it would find nothing and sleep).
    #[tokio::test]
    async fn the_relay_publishes_a_committed_batch_at_once() {
        let rig = rig(SagaConfig::default()).await;
        let relay = tokio::spawn(run_relay(
            rig.db.clone(),
            rig.log.clone(),
            "t".into(),
            rig.projection.wakes.clone(),
            NEVER,
            rig.shutdown.clone(),
            ended(),
        ));
        // The relay has looked once and found nothing; it now waits for a wake-up.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for placed in 1..=3 {
            place(&rig).await;
            let topic = topics::commands("t", "inventory");
            let by = tokio::time::Instant::now() + PATIENCE;
            while rig.log.end_offset(&topic, 0).await.expect("end") < placed {
                assert!(
                    tokio::time::Instant::now() < by,
                    "reservation {placed} not published: the relay was not woken by the commit"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        relay.abort();
    }

    /// A stop flushes the outbox: what the saga's worker commits while it finishes its batch
    /// after the stop is published before the relay ends, though the relay was asleep with
    /// nothing to do when the stop came.
    #[tokio::test]
    async fn on_a_stop_the_relay_publishes_what_its_producers_commit_before_they_end() {
        let rig = rig(SagaConfig::default()).await;
        let producers = TaskTracker::new();
        let mut stopped = rig.shutdown.clone();
        let worker = producers.track_future(async {
            let _ = stopped.changed().await;
            place(&rig).await;
        });
        producers.close();
        let relay = run_relay(
            rig.db.clone(),
            rig.log.clone(),
            "t".into(),
            rig.projection.wakes.clone(),
            NEVER,
            rig.shutdown.clone(),
            producers,
        );
        let stop = async {
            // The relay has looked once and found nothing; it now waits for a wake-up.
            tokio::time::sleep(Duration::from_millis(200)).await;
            rig.stop.send(true).expect("the stop is heard");
        };
        tokio::time::timeout(FLUSH_LIMIT + PATIENCE, async {
            tokio::join!(worker, relay, stop)
        })
        .await
        .expect("the relay did not end after the stop");
        let end = rig
            .log
            .end_offset(&topics::commands("t", "inventory"), 0)
            .await
            .expect("end");
        assert_eq!(
            end, 1,
            "the reservation committed during the stop was not published"
        );
        let unsent = rig
            .db
            .fetch_optional(
                "SELECT COUNT(*) AS n FROM saga_outbox WHERE sent_at IS NULL",
                &[],
            )
            .await
            .expect("count")
            .map_or(0, |row| row.int("n"));
        assert_eq!(unsent, 0, "the published reservation is not marked sent");
    }

    /// The ticker, asleep until its rescan, wakes for a deadline committed sooner, sleeps until
    /// it and fires it (the reservation is sent again).
    #[tokio::test]
    async fn the_ticker_fires_a_deadline_committed_while_it_sleeps() {
        let rig = rig(SagaConfig {
            reservation_timeout: Duration::from_millis(300),
            backoff_base: Duration::from_millis(10),
            ..SagaConfig::default()
        })
        .await;
        let ticker = tokio::spawn(run_ticker(
            rig.db.clone(),
            rig.projection.config.clone(),
            rig.projection.wakes.clone(),
            NEVER,
            rig.shutdown.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
        place(&rig).await;
        assert_eq!(outbox_rows(&rig.db).await, 1, "the first reservation");
        let by = tokio::time::Instant::now() + PATIENCE;
        while outbox_rows(&rig.db).await < 2 {
            assert!(
                tokio::time::Instant::now() < by,
                "the reservation's deadline did not fire: the ticker was not woken"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ticker.abort();
    }

    /// Nothing is announced before the batch commits.
    #[tokio::test]
    async fn a_batch_announces_nothing_before_it_commits() {
        // As while the ticker reads: any deadline committed wakes it.
        let wakes = Wakes::default();
        wakes.note_batch(true, Some(5));
        let quiet = tokio::time::timeout(Duration::from_millis(20), async {
            tokio::select! {
                _ = wakes.outbox.notified() => {}
                _ = wakes.deadline.notified() => {}
            }
        })
        .await;
        assert!(quiet.is_err(), "woken before the commit");
        wakes.batch_committed();
        tokio::time::timeout(Duration::from_secs(1), wakes.outbox.notified())
            .await
            .expect("the relay is woken after the commit");
        tokio::time::timeout(Duration::from_secs(1), wakes.deadline.notified())
            .await
            .expect("the ticker is woken after the commit");
        // A deadline later than the one the ticker sleeps until does not wake it.
        wakes.ticker_until.store(100, Ordering::SeqCst);
        wakes.deadline_committed(200);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), wakes.deadline.notified())
                .await
                .is_err()
        );
    }
}
