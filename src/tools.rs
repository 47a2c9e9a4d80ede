//! Operator tools over the log and the read models: `platform replay` and `platform audit`.
//! Like the other operator commands they open the backend by the same flags as the services
//! ([`StoreSettings`]) and run no worker; a replay runs beside a live platform, which keeps
//! answering queries.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use projections::ReadSide;
use projections::audit::{self, AsOf, Trace, TraceStep};
use projections::replay::{self, Filter, Progress, ReplayOptions, ReplayReport};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ops::table;
use crate::settings::StoreSettings;

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Only this projection (orders, inventory, payments, audit); repeat for several. Default:
    /// all of them.
    #[arg(long = "projection")]
    pub projections: Vec<String>,
    /// Only events that occurred at or after this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    pub from: Option<DateTime<Utc>>,
    /// Only events that occurred before this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    pub to: Option<DateTime<Utc>>,
    /// Only events of this type (`order.placed`, ...); repeat for several.
    #[arg(long = "event-type")]
    pub event_types: Vec<String>,
    /// Only this aggregate's events (an order id, or a SKU).
    #[arg(long)]
    pub aggregate_id: Option<String>,
    /// Read the log and count what would be applied, per event type; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Rebuild into the shadow and print the rows that differ from the live read model (exit
    /// status 1 when any does); swap nothing.
    #[arg(long)]
    pub diff: bool,
    /// Start afresh instead of resuming an interrupted replay.
    #[arg(long)]
    pub restart: bool,
    /// Records per transaction. Large batches mean fewer commits, and each commit writes every
    /// index page the batch touched (random keys such as event ids touch most of them).
    #[arg(long, default_value_t = 25_000)]
    pub batch: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_time(raw: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(raw)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|error| format!("not an RFC 3339 time: {error}"))
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum AggregateKind {
    Order,
    Payment,
    Stock,
}

impl AggregateKind {
    fn name(self) -> &'static str {
        match self {
            AggregateKind::Order => "order",
            AggregateKind::Payment => "payment",
            AggregateKind::Stock => "stock",
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// An order's timeline: version, time, event, actor, command, correlation, causation, and
    /// what changed.
    Order {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// A payment's timeline (its id is the order's).
    Payment {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// A stock item's timeline (its id is the SKU).
    Stock {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// One request's whole flow across services, as a causation tree.
    Trace {
        correlation_id: String,
        #[arg(long)]
        json: bool,
    },
    /// An aggregate's state as of a time or version, folded with the domain's own `evolve`.
    State {
        #[arg(value_enum)]
        kind: AggregateKind,
        id: String,
        /// A version number or an RFC 3339 time; default: the latest state.
        #[arg(long)]
        as_of: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

async fn open(store: &StoreSettings) -> Result<ReadSide> {
    let backend = Backend::open_for_tool(store).await?;
    ReadSide::open(backend.log, &store.read_backend(), &store.topic_prefix)
        .await
        .map_err(Error::db("opening the read models"))
}

/// Shows progress: a bar with events/s and ETA on a terminal, a line every few seconds
/// otherwise.
struct Reporter {
    bar: Option<indicatif::ProgressBar>,
    projection: String,
    started: Instant,
    last_line: Instant,
}

impl Reporter {
    fn new(projection: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix:>10} [{bar:30}] {pos}/{len} events  {per_sec}  ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(projection.to_owned());
            bar
        });
        Reporter {
            bar,
            projection: projection.to_owned(),
            started: Instant::now(),
            last_line: Instant::now(),
        }
    }

    fn update(&mut self, progress: Progress) {
        if let Some(bar) = &self.bar {
            bar.set_length(progress.total);
            bar.set_position(progress.done);
            return;
        }
        let finished = progress.done >= progress.total;
        if self.last_line.elapsed() < Duration::from_secs(2) && !finished {
            return;
        }
        if finished && progress.done == 0 {
            return;
        }
        self.last_line = Instant::now();
        let seconds = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = progress.done as f64 / seconds;
        let eta = if rate > 0.0 {
            progress.total.saturating_sub(progress.done) as f64 / rate
        } else {
            0.0
        };
        eprintln!(
            "{}: {}/{} events ({:.0}%), {:.0} events/s, ETA {:.0} s",
            self.projection,
            progress.done,
            progress.total,
            100.0 * progress.done as f64 / progress.total.max(1) as f64,
            rate,
            eta
        );
    }

    fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

fn print_summary(report: &ReplayReport, options: &ReplayOptions) {
    let verb = if options.dry_run {
        "would apply"
    } else {
        "applied"
    };
    println!(
        "{}: read {} records in {:.1} s ({:.0} events/s); {verb} {}, filtered out {}, skipped {} by the effective-history rule, {} parked{}",
        report.projection,
        report.read,
        report.seconds,
        report.events_per_second(),
        report.applied,
        report.filtered_out,
        report.conflicts,
        report.parked,
        if report.resumed {
            "; resumed an interrupted replay"
        } else {
            ""
        },
    );
    if !report.by_type.is_empty() {
        let mut by_type = table(["EVENT", "COUNT"], &[1]);
        for (event_type, count) in &report.by_type {
            by_type.add_row([event_type.clone(), count.to_string()]);
        }
        for line in by_type.trim_fmt().lines() {
            println!("    {line}");
        }
    }
    if report.swapped {
        println!(
            "    swapped in ({} records caught up under the lock); the live projection goes on from the rebuild's positions",
            report.caught_up
        );
    }
    if options.diff {
        if report.differences.is_empty() {
            println!("    no row differs from the live read model");
        }
        for diff in report.differences.iter().take(50) {
            println!("    {} [{}]", diff.table, diff.key);
            let show =
                |side: &str, row: &Option<std::collections::BTreeMap<String, String>>| match row {
                    None => println!("      {side}: (missing)"),
                    Some(row) => println!(
                        "      {side}: {}",
                        row.iter()
                            .map(|(column, value)| format!("{column}={value}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    ),
                };
            show("live  ", &diff.live);
            show("replay", &diff.replay);
        }
        if report.differences.len() > 50 {
            println!("    ... and {} more", report.differences.len() - 50);
        }
    }
}

/// `platform replay`
pub async fn replay(args: ReplayArgs, store: &StoreSettings) -> Result<()> {
    let read = open(store).await?;
    let all = read.projection_names();
    for name in &args.projections {
        if !all.contains(&name.as_str()) {
            return Err(Error::Refused(format!(
                "no projection {name:?} (one of {})",
                all.join(", ")
            )));
        }
    }
    let options = ReplayOptions {
        filter: Filter {
            from: args.from,
            to: args.to,
            event_types: args.event_types.clone(),
            aggregate_id: args.aggregate_id.clone(),
        },
        dry_run: args.dry_run,
        diff: args.diff,
        restart: args.restart,
        batch: args.batch.max(1),
    };
    let backend = store.read_backend();
    let mut reports = Vec::new();
    for name in all {
        if !args.projections.is_empty() && !args.projections.iter().any(|wanted| wanted == name) {
            continue;
        }
        let (Some(projection), Some(live)) = (read.projection(name), read.db(name)) else {
            continue;
        };
        let mut reporter = Reporter::new(name);
        let report = replay::replay(
            &read.log(),
            &backend,
            &store.topic_prefix,
            live,
            projection,
            &options,
            &mut |progress| reporter.update(progress),
        )
        .await
        .map_err(|source| Error::Replay {
            projection: name.to_owned(),
            source,
        })?;
        reporter.finish();
        if !args.json {
            print_summary(&report, &options);
        }
        reports.push(report);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    let differing: usize = reports.iter().map(|report| report.differences.len()).sum();
    if differing > 0 {
        return Err(Error::Refused(format!(
            "{differing} rows of the rebuild differ from the live read models"
        )));
    }
    Ok(())
}

/// At most `width` characters (the JSON output has it whole).
fn clip(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_owned()
    } else {
        format!("{}…", text.chars().take(width - 1).collect::<String>())
    }
}

fn short(id: &str) -> String {
    // UUIDv7s share their leading (time) digits; their tail tells them apart.
    if id.len() == 36 && id.is_ascii() {
        format!("…{}", &id[24..])
    } else {
        id.to_owned()
    }
}

fn print_tree(step: &TraceStep, prefix: &str, last: bool, root: bool) {
    let (branch, next) = if root {
        ("", "")
    } else if last {
        ("└─ ", "   ")
    } else {
        ("├─ ", "│  ")
    };
    let mark = if step.compensation {
        "  [compensation]"
    } else {
        ""
    };
    let cause = match step.caused_by.as_str() {
        "request" => "client request".to_owned(),
        "deadline" => "saga deadline".to_owned(),
        "operator-retry" => "operator retry".to_owned(),
        _ => "saga step".to_owned(),
    };
    println!(
        "{prefix}{branch}{} by {} ({cause}){mark}",
        step.command, step.actor
    );
    let inner = format!("{prefix}{next}");
    println!(
        "{inner}   → {} {} {} v{}  {}  event {}",
        step.event_type,
        step.aggregate_type,
        step.aggregate_id,
        step.version,
        step.occurred_at,
        short(&step.event_id)
    );
    for (index, child) in step.caused.iter().enumerate() {
        print_tree(
            child,
            &format!("{inner}   "),
            index + 1 == step.caused.len(),
            false,
        );
    }
}

fn print_trace(trace: &Trace) {
    println!("correlation {}", trace.correlation_id);
    for root in &trace.roots {
        print_tree(root, "", true, true);
    }
}

/// `platform audit`
pub async fn audit(command: AuditCommand, store: &StoreSettings) -> Result<()> {
    let read = open(store).await?;
    let Some(db) = read.db("audit") else {
        return Err(Error::Refused("no audit read model".into()));
    };
    match command {
        AuditCommand::Order { id, json } => timeline(db, "order", &id, json).await,
        AuditCommand::Payment { id, json } => timeline(db, "payment", &id, json).await,
        AuditCommand::Stock { id, json } => timeline(db, "stock", &id, json).await,
        AuditCommand::Trace {
            correlation_id,
            json,
        } => {
            let trace = audit::trace(db, &correlation_id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&trace)?);
            } else {
                print_trace(&trace);
            }
            Ok(())
        }
        AuditCommand::State {
            kind,
            id,
            as_of,
            json,
        } => {
            let as_of = match as_of {
                None => AsOf::Latest,
                Some(raw) => raw.parse().map_err(Error::Refused)?,
            };
            let state = audit::state_as_of(db, kind.name(), &id, as_of).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&state)?);
            } else {
                println!(
                    "{} {} at version {}{}",
                    state.aggregate_type,
                    state.aggregate_id,
                    state.version,
                    state
                        .occurred_at
                        .as_deref()
                        .map(|at| format!(" ({at})"))
                        .unwrap_or_default()
                );
                println!("{}", serde_json::to_string_pretty(&state.state)?);
            }
            Ok(())
        }
    }
}

async fn timeline(
    db: &projections::db::Db,
    aggregate_type: &str,
    id: &str,
    json: bool,
) -> Result<()> {
    let timeline = audit::timeline(db, aggregate_type, id).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&timeline)?);
        return Ok(());
    }
    let mut rows = table(
        [
            "V",
            "TIME",
            "EVENT",
            "ACTOR",
            "COMMAND",
            "CORRELATION",
            "CAUSATION",
            "WHAT CHANGED",
        ],
        &[0],
    );
    for entry in &timeline.events {
        rows.add_row([
            entry.version.to_string(),
            entry.occurred_at.clone(),
            entry.event_type.clone(),
            entry.actor.clone(),
            short(&entry.command_id),
            short(&entry.correlation_id),
            short(&entry.causation_id),
            clip(&entry.summary, 100),
        ]);
    }
    println!("{}", rows.trim_fmt());
    Ok(())
}
