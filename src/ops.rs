//! Operator commands: `platform projections status`, `platform parked list|retry|skip`,
//! `platform sagas list|show|retry` and `platform recover`. They open the same backend as the
//! services (by the same flags, [`StoreSettings`]) and run no worker: a saga retry goes into the
//! saga's outbox, which the running orchestrator's relay publishes. Their tables are plain text
//! ([`table`]), for a terminal and for scripts alike.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use comfy_table::{CellAlignment, Table};
use event_log::Position;
use projections::ReadSide;
use projections::parked::{self, Resolution};

use saga_orchestrator::Saga;
use saga_orchestrator::driver;
use saga_orchestrator::side::SagaSide;

use crate::backend::Backend;
use crate::error::{Error, Result};

/// The actor of what an operator does with this CLI (the saga's commands after a retry are
/// sent on its behalf).
const OPERATOR_CLI: &str = "operator:platform-cli";
use crate::settings::{SagaSettings, StoreSettings};

/// A table as the operator commands print it, to a terminal or a pipe alike: a header row, no
/// borders, no colours and no wrapping, columns two spaces apart, those at `right` (0-based)
/// aligned right. Printed with [`Table::trim_fmt`], its lines have no trailing spaces.
pub(crate) fn table<const N: usize>(header: [&str; N], right: &[usize]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(comfy_table::presets::NOTHING)
        .set_header(header);
    for (index, column) in table.column_iter_mut().enumerate() {
        column.set_padding((0, 2));
        if right.contains(&index) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
}

#[derive(Debug, clap::Subcommand)]
pub enum ProjectionsCommand {
    /// Lag per projection and partition, in events and seconds, and parked events.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum ParkedCommand {
    /// Events a projection could not apply (and those waiting behind them).
    List {
        /// Only this projection (orders, inventory, payments, audit).
        #[arg(long)]
        projection: Option<String>,
        /// Also list events already retried or skipped.
        #[arg(long)]
        all: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Apply a parked event again (after a fix); the events waiting behind it follow.
    Retry {
        projection: String,
        /// The event's position, `<topic>:<partition>:<offset>` (as `list` prints it).
        position: String,
    },
    /// Give up a parked event; the events waiting behind it are applied.
    Skip {
        projection: String,
        position: String,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum SagasCommand {
    /// Sagas, most recently changed first.
    List {
        /// Only sagas in this state: reserving_stock, authorising_payment, confirming,
        /// confirmed, completed, compensating, rejected, cancelled, needs_attention.
        #[arg(long)]
        state: Option<String>,
        /// Only sagas not terminal and unchanged for at least this long (`90`, `90s`, `5m`,
        /// `2h 30m`).
        #[arg(long, value_parser = parse_duration)]
        stuck_for: Option<Duration>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One saga: its state, reason, deadline and every step with its attempts and answer.
    Show {
        /// The saga's id, which is its order's id (a correlation id finds it too).
        id: String,
        /// Print the saga's JSON (as `GET /sagas/{id}` answers) instead.
        #[arg(long)]
        json: bool,
    },
    /// Resend the parked compensation of a saga in `needs_attention` (a new round of attempts).
    Retry {
        /// The saga's (order's) id.
        id: String,
        /// Print the saga's JSON after the retry.
        #[arg(long)]
        json: bool,
    },
}

/// A duration as humantime reads it (`90s`, `5m`, `2h 30m`, `1d`), or bare seconds (`90`).
fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    if !raw.is_empty() && raw.bytes().all(|byte| byte.is_ascii_digit()) {
        return raw
            .parse()
            .map(Duration::from_secs)
            .map_err(|_| format!("{raw:?} is too many seconds"));
    }
    humantime::parse_duration(raw)
        .map_err(|error| format!("{raw:?} is not a duration such as 90s, 5m or 2h 30m: {error}"))
}

async fn open_saga(store: &StoreSettings, saga: &SagaSettings) -> Result<SagaSide> {
    let backend = Backend::open_for_tool(store).await?;
    SagaSide::open(
        backend.log,
        &store.read_backend(),
        &store.topic_prefix,
        saga.config(),
    )
    .await
    .map_err(Error::db("opening the saga orchestrator's database"))
}

fn time(time: Option<DateTime<Utc>>) -> String {
    time.map(|time| time.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_else(|| "-".into())
}

/// The saga's id from an order id or a correlation id.
async fn find_saga(side: &SagaSide, id: &str) -> Result<Option<(Saga, i64)>> {
    if let Some(found) = driver::show(side.db(), id)
        .await
        .map_err(Error::db("reading the saga"))?
    {
        return Ok(Some(found));
    }
    let row = side
        .db()
        .fetch_optional(
            "SELECT order_id FROM sagas WHERE correlation_id = $1",
            &[id.into()],
        )
        .await
        .map_err(Error::db("finding the saga by correlation id"))?;
    match row {
        None => Ok(None),
        Some(row) => driver::show(side.db(), &row.text("order_id"))
            .await
            .map_err(Error::db("reading the saga")),
    }
}

fn print_saga(saga: &Saga, revision: i64) {
    println!("saga      {}  (revision {revision})", saga.order_id);
    println!("state     {}", saga.state);
    if let Some(reason) = &saga.reason {
        println!("reason    {reason}");
    }
    if let Some(attention) = &saga.attention {
        println!(
            "attention {} since {}: {}",
            attention.step,
            time(Some(attention.since)),
            attention.reason
        );
    }
    println!("started   {}", time(saga.started_at));
    println!("updated   {}", time(saga.updated_at));
    println!("deadline  {}", time(saga.deadline));
    println!();
    let mut steps = table(
        [
            "STEP", "ATTEMPT", "STARTED", "FINISHED", "DEADLINE", "OUTCOME",
        ],
        &[1],
    );
    for step in &saga.history {
        steps.add_row([
            step.step.to_string(),
            step.attempt.to_string(),
            time(Some(step.started_at)),
            time(step.finished_at),
            time(step.deadline),
            step.outcome_text(),
        ]);
    }
    println!("{}", steps.trim_fmt());
}

pub async fn sagas(
    command: SagasCommand,
    store: &StoreSettings,
    saga: &SagaSettings,
) -> Result<()> {
    let side = open_saga(store, saga).await?;
    match command {
        SagasCommand::List {
            state,
            stuck_for,
            limit,
            json,
        } => {
            let sagas = driver::list(
                side.db(),
                state.as_deref(),
                stuck_for,
                limit.clamp(1, 10_000),
            )
            .await
            .map_err(Error::db("listing the sagas"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sagas)?);
                return Ok(());
            }
            if sagas.is_empty() {
                println!("no sagas");
                return Ok(());
            }
            let mut rows = table(["ORDER", "STATE", "UPDATED", "STARTED", "DEADLINE"], &[]);
            for saga in &sagas {
                rows.add_row([
                    saga.order_id.to_string(),
                    saga.state.to_string(),
                    saga.updated_at.to_string(),
                    saga.started_at.to_string(),
                    saga.deadline.clone().unwrap_or_else(|| "-".into()),
                ]);
            }
            println!("{}", rows.trim_fmt());
            Ok(())
        }
        SagasCommand::Show { id, json } => {
            let Some((saga, revision)) = find_saga(&side, &id).await? else {
                return Err(Error::Refused(format!(
                    "no saga for {id:?} (neither an order id nor a correlation id)"
                )));
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"revision": revision, "saga": saga})
                    )?
                );
            } else {
                print_saga(&saga, revision);
            }
            Ok(())
        }
        SagasCommand::Retry { id, json } => {
            let Some((before, _)) = find_saga(&side, &id).await? else {
                return Err(Error::Refused(format!("no saga for {id:?}")));
            };
            let order_id = before.order_id.to_string();
            let after = match driver::retry(
                side.db(),
                side.config(),
                &order_id,
                OPERATOR_CLI,
                side.wakes(),
            )
            .await
            .map_err(Error::db("retrying the saga"))?
            {
                driver::Retry::Retried(after) => *after,
                driver::Retry::NoSaga => {
                    return Err(Error::Refused(format!("no saga for {id:?}")));
                }
                driver::Retry::NothingToRetry(state) => {
                    return Err(Error::Refused(format!(
                        "saga {order_id} is {state}, not needs_attention: nothing to retry"
                    )));
                }
                driver::Retry::Changed => {
                    return Err(Error::Refused(format!(
                        "saga {order_id} changed while retrying; look again and retry"
                    )));
                }
            };
            let (_, revision) = driver::show(side.db(), &order_id)
                .await
                .map_err(Error::db("reading the saga"))?
                .unwrap_or((after.clone(), 0));
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"revision": revision, "saga": after})
                    )?
                );
            } else {
                println!(
                    "retrying: saga {order_id} is now {} (the running orchestrator sends the commands)",
                    after.state
                );
                print_saga(&after, revision);
            }
            Ok(())
        }
    }
}

async fn open(store: &StoreSettings) -> Result<ReadSide> {
    let backend = Backend::open_for_tool(store).await?;
    ReadSide::open(backend.log, &store.read_backend(), &store.topic_prefix)
        .await
        .map_err(Error::db("opening the read models"))
}

pub async fn projections(command: ProjectionsCommand, store: &StoreSettings) -> Result<()> {
    let ProjectionsCommand::Status { json } = command;
    let read = open(store).await?;
    let statuses = read.status().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&statuses)?);
        return Ok(());
    }
    let mut rows = table(
        [
            "PROJECTION",
            "TOPIC",
            "PARTITION",
            "APPLIED",
            "END",
            "LAG",
            "LAG (s)",
        ],
        &[2, 3, 4, 5, 6],
    );
    for status in &statuses {
        for lag in &status.partitions {
            rows.add_row([
                status.projection.to_string(),
                lag.topic.clone(),
                lag.partition.to_string(),
                lag.applied.to_string(),
                lag.end.to_string(),
                lag.lag_events.to_string(),
                format!("{:.1}", lag.lag_seconds),
            ]);
        }
    }
    println!("{}", rows.trim_fmt());
    println!();
    for status in &statuses {
        println!(
            "{}: lag {} events, {:.1} s; {} parked",
            status.projection, status.lag_events, status.lag_seconds, status.parked
        );
        for problem in &status.problems {
            println!("  STOPPED: {problem}");
        }
    }
    Ok(())
}

pub async fn parked(command: ParkedCommand, store: &StoreSettings) -> Result<()> {
    let read = open(store).await?;
    match command {
        ParkedCommand::List {
            projection,
            all,
            json,
        } => {
            let mut events = Vec::new();
            for name in read.projection_names() {
                if projection.as_deref().is_some_and(|wanted| wanted != name) {
                    continue;
                }
                let Some(db) = read.db(name) else { continue };
                events.extend(
                    parked::list(db, name, all)
                        .await
                        .map_err(Error::db(format!("listing the events {name} parked")))?,
                );
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&events)?);
                return Ok(());
            }
            if events.is_empty() {
                println!("no parked events");
                return Ok(());
            }
            let mut rows = table(
                [
                    "PROJECTION",
                    "POSITION",
                    "AGGREGATE",
                    "ID",
                    "VERSION",
                    "EVENT",
                    "STATUS",
                    "ERROR",
                ],
                &[4],
            );
            for event in &events {
                rows.add_row([
                    event.projection.to_string(),
                    format!("{}:{}:{}", event.topic, event.partition, event.offset),
                    event.aggregate_type.to_string(),
                    event.aggregate_id.to_string(),
                    event.aggregate_version.to_string(),
                    event.event_type.to_string(),
                    event.status.to_string(),
                    event.error.to_string(),
                ]);
            }
            println!("{}", rows.trim_fmt());
            Ok(())
        }
        ParkedCommand::Retry {
            projection,
            position,
        } => resolve(&read, &projection, &position, Resolution::Retry).await,
        ParkedCommand::Skip {
            projection,
            position,
        } => resolve(&read, &projection, &position, Resolution::Skip).await,
    }
}

async fn resolve(
    read: &ReadSide,
    projection: &str,
    position: &str,
    resolution: Resolution,
) -> Result<()> {
    let position: Position = position.parse().map_err(Error::Refused)?;
    let (Some(db), Some(model)) = (read.db(projection), read.projection(projection)) else {
        return Err(Error::Refused(format!(
            "no projection {projection:?} ({})",
            read.projection_names().join(", ")
        )));
    };
    let resolved = parked::resolve(db, model.as_ref(), &position, resolution).await?;
    if let Some(offset) = resolved.skipped {
        println!("skipped the event at offset {offset}");
    }
    for offset in &resolved.applied {
        println!("applied the event at offset {offset}");
    }
    if let Some((offset, error)) = &resolved.still_parked {
        println!("the event at offset {offset} is still parked: {error}");
        return Err(Error::Refused("an event is still parked".into()));
    }
    Ok(())
}

/// `platform recover`: what the command side has stored beyond the log's end.
#[derive(Debug, clap::Args)]
pub struct RecoverArgs {
    /// Drop the snapshots ahead of the log (their owners rebuild those partitions from the log
    /// at their next start) and move the command-topic positions ahead of the log back to the
    /// topic's end. Without it, only list what is ahead.
    #[arg(long)]
    pub apply: bool,
}

/// Lists (and with `--apply`, resets) every command-side snapshot and command-topic position
/// that covers more of the log than the log holds, for every service. The services refuse to
/// start on such state; this is the documented way out, once an operator has checked that the
/// log itself is the one to trust (a recreated topic, a broker restored from an older backup).
/// Projections with a position ahead of the log stop that partition and are rebuilt with
/// `platform replay --projection <name> --restart`.
pub async fn recover(args: RecoverArgs, store: &StoreSettings) -> Result<()> {
    use command_services::services::command_consumer;
    use event_log::topics;

    let backend = Backend::open_for_tool(store).await?;
    let log = &backend.log;
    let command_store = &backend.command_store;
    let mut ahead = 0;
    for (service, aggregate) in [
        ("order", "order"),
        ("payment", "payment"),
        ("inventory", "stock"),
    ] {
        for (topic, is_events) in [
            (topics::events(&store.topic_prefix, aggregate), true),
            (topics::commands(&store.topic_prefix, service), false),
        ] {
            let partitions = match log.partition_count(&topic).await {
                Ok(count) => count,
                Err(event_log::LogError::UnknownTopic(_)) => continue,
                Err(error) => return Err(Error::log(format!("reading {topic}"))(error)),
            };
            for partition in 0..partitions {
                let end = log
                    .end_offset(&topic, partition)
                    .await
                    .map_err(Error::log(format!("reading the end of {topic}")))?;
                let stored = if is_events {
                    command_store
                        .load_snapshot(&topic, partition)
                        .await?
                        .map(|snapshot| snapshot.next_offset)
                } else {
                    command_store
                        .load_position(&command_consumer(service), &topic, partition)
                        .await?
                };
                let Some(stored) = stored.filter(|stored| *stored > end) else {
                    continue;
                };
                ahead += 1;
                let what = if is_events { "snapshot" } else { "position" };
                let done = match (args.apply, is_events) {
                    (false, _) => "",
                    (true, true) => {
                        command_store.drop_snapshot(&topic, partition).await?;
                        " -> dropped (rebuilt from the log at the next start)"
                    }
                    (true, false) => {
                        command_store
                            .reset_position(&command_consumer(service), &topic, partition, end)
                            .await?;
                        " -> moved back to the topic's end"
                    }
                };
                println!(
                    "{service}: {what} of {topic} partition {partition} at offset {stored}, log ends at {end}{done}"
                );
            }
        }
    }
    match (ahead, args.apply) {
        (0, _) => println!("nothing stored is ahead of the log"),
        (_, false) => {
            println!("{ahead} ahead of the log; run `platform recover --apply` to reset them")
        }
        (_, true) => println!("{ahead} reset; the services can start"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_bare_seconds_or_humantime() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h 30m"), Ok(Duration::from_secs(9000)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("").is_err());
    }
}
