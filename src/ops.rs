//! Operator commands: `platform projections status` and `platform parked list|retry|skip`.
//! They open the same backend as the services (by the same flags) and run no worker.

use anyhow::Context;
use event_log::Position;
use projections::parked::{self, Resolution};
use projections::{ReadBackend, ReadSide};

use crate::backend::Backend;
use crate::settings::Settings;

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

async fn open(settings: &Settings) -> anyhow::Result<ReadSide> {
    let backend = Backend::open(settings).await?;
    let read_backend = match &settings.database_url {
        Some(url) => ReadBackend::Postgres {
            url: url.clone(),
            schema_prefix: settings.schema_prefix.clone(),
        },
        None => ReadBackend::Sqlite {
            dir: settings.data_dir.clone(),
        },
    };
    ReadSide::open(backend.log, &read_backend, &settings.topic_prefix)
        .await
        .map_err(anyhow::Error::msg)
        .context("opening the read models")
}

pub async fn projections(command: ProjectionsCommand, settings: Settings) -> anyhow::Result<()> {
    let ProjectionsCommand::Status { json } = command;
    let read = open(&settings).await?;
    let statuses = read.status().await.map_err(anyhow::Error::msg)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&statuses)?);
        return Ok(());
    }
    println!(
        "{:<10} {:<34} {:>9} {:>10} {:>10} {:>10} {:>9}",
        "PROJECTION", "TOPIC", "PARTITION", "APPLIED", "END", "LAG", "LAG (s)"
    );
    for status in &statuses {
        for lag in &status.partitions {
            println!(
                "{:<10} {:<34} {:>9} {:>10} {:>10} {:>10} {:>9.1}",
                status.projection,
                lag.topic,
                lag.partition,
                lag.applied,
                lag.end,
                lag.lag_events,
                lag.lag_seconds
            );
        }
    }
    println!();
    for status in &statuses {
        println!(
            "{}: lag {} events, {:.1} s; {} parked",
            status.projection, status.lag_events, status.lag_seconds, status.parked
        );
    }
    Ok(())
}

pub async fn parked(command: ParkedCommand, settings: Settings) -> anyhow::Result<()> {
    let read = open(&settings).await?;
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
                let db = read.db(name).context("no such projection")?;
                events.extend(
                    parked::list(db, name, all)
                        .await
                        .map_err(anyhow::Error::msg)?,
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
            for event in &events {
                println!(
                    "{:<10} {}:{}:{}  {} {} v{}  {}  [{}] {}",
                    event.projection,
                    event.topic,
                    event.partition,
                    event.offset,
                    event.aggregate_type,
                    event.aggregate_id,
                    event.aggregate_version,
                    event.event_type,
                    event.status,
                    event.error
                );
            }
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
) -> anyhow::Result<()> {
    let position: Position = position.parse().map_err(anyhow::Error::msg)?;
    let db = read.db(projection).with_context(|| {
        format!("no projection {projection:?} (orders, inventory, payments, audit)")
    })?;
    let model = read
        .projection(projection)
        .with_context(|| format!("no projection {projection:?}"))?;
    let resolved = parked::resolve(db, model.as_ref(), &position, resolution)
        .await
        .map_err(anyhow::Error::msg)?;
    if let Some(offset) = resolved.skipped {
        println!("skipped the event at offset {offset}");
    }
    for offset in &resolved.applied {
        println!("applied the event at offset {offset}");
    }
    if let Some((offset, error)) = &resolved.still_parked {
        println!("the event at offset {offset} is still parked: {error}");
        anyhow::bail!("an event is still parked");
    }
    Ok(())
}
