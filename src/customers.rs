//! `platform customers erasure-report <id>`: every place a customer's personal data could live,
//! and for each, what is there and whether any of it can still be read.
//!
//! Personal fields exist only sealed with the customer's data key (see `personal_data`), so the
//! report finds every sealed value in each place and tries to open it with the key store: once
//! the customer is erased, none opens. The places: the key store itself, the customer's records
//! in the log (the partition their id maps to), the command side's snapshot of the customer, the
//! customers and audit read models, and every projection's parked events. The saga's outbox
//! holds order commands only, none with a customer's field.

use comfy_table::Cell;
use domain::CustomerId;
use event_log::topics;
use personal_data::{KeyState, Opened, open, sealed_fields};
use projections::ReadSide;
use serde_json::Value;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ops::table;
use crate::settings::StoreSettings;

#[derive(Debug, clap::Subcommand)]
pub enum CustomersCommand {
    /// Where a customer's personal data could live, and that nothing readable remains there
    /// once they are erased. Exits with status 1 while anything can still be read.
    ErasureReport {
        /// The customer's id.
        customer_id: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// One place in the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Place {
    pub place: String,
    /// What the place holds of the customer.
    pub holds: String,
    /// Sealed fields found there.
    pub sealed: usize,
    /// Of those, the ones the key store can still open.
    pub readable: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub customer_id: String,
    /// `erased at <time>`, `live` or `unknown`.
    pub key: String,
    pub places: Vec<Place>,
    /// True when no place holds anything that can be read.
    pub nothing_readable: bool,
}

/// Counts the sealed fields of `documents` and the ones `key` opens.
fn judged(customer: &CustomerId, key: &KeyState, documents: &[Value]) -> (usize, usize) {
    let mut sealed = 0;
    let mut readable = 0;
    for document in documents {
        for (field, value) in sealed_fields(document) {
            sealed += 1;
            if matches!(open(key, customer, &field, &value), Opened::Text(_)) {
                readable += 1;
            }
        }
    }
    (sealed, readable)
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::String(text.to_owned()))
}

fn db_error(what: &str) -> impl FnOnce(projections::db::DbError) -> Error + '_ {
    move |error| Error::Refused(format!("{what}: {error}"))
}

/// The report on `customer_id` (see the module documentation).
pub async fn erasure_report(customer_id: &str, store: &StoreSettings) -> Result<Report> {
    let customer = CustomerId::parse(customer_id).map_err(|error| {
        Error::Refused(format!("{customer_id:?} is not a customer id: {error}"))
    })?;
    let backend = Backend::open_for_tool(store).await?;
    let key = backend
        .keys
        .key(&customer)
        .await
        .map_err(|error| Error::Refused(format!("reading the key store: {error}")))?;
    let mut places = Vec::new();
    let key_text = match &key {
        KeyState::Erased { at } => format!(
            "erased at {}",
            chrono::DateTime::from_timestamp_millis(*at)
                .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .unwrap_or_else(|| at.to_string())
        ),
        KeyState::Live(_) => "live".to_owned(),
        KeyState::Unknown => "unknown".to_owned(),
    };
    places.push(Place {
        place: "key store".into(),
        holds: match &key {
            KeyState::Live(_) => "the customer's data key".into(),
            KeyState::Erased { .. } => "a tombstone: no key, never a new one".into(),
            KeyState::Unknown => "nothing".into(),
        },
        sealed: 0,
        readable: usize::from(matches!(key, KeyState::Live(_))),
    });

    // The log: the customer's records, on the partition their id maps to.
    let topic = topics::events(&store.topic_prefix, "customer");
    let partitions = backend
        .log
        .partition_count(&topic)
        .await
        .map_err(Error::log(format!("reading {topic}")))?;
    let partition = event_log::partition_for(customer.as_str(), partitions);
    let end = backend
        .log
        .end_offset(&topic, partition)
        .await
        .map_err(Error::log(format!("reading {topic}")))?;
    let mut documents = Vec::new();
    if end > 0 {
        let mut reader = backend
            .log
            .open_reader(&topic, &[(partition, 0)], event_log::ReadMode::Background)
            .await
            .map_err(Error::log(format!("reading {topic}")))?;
        let mut next = 0;
        while next < end {
            let records = reader
                .poll(1000, std::time::Duration::from_millis(500))
                .await
                .map_err(Error::log(format!("reading {topic}")))?;
            for record in records {
                next = record.position.offset + 1;
                if record.record.key == customer.as_str() {
                    let mut document = parse(&String::from_utf8_lossy(&record.record.value));
                    // Headers too: nothing personal belongs there either.
                    for header in &record.record.headers {
                        document[format!("header {}", header.name)] =
                            Value::String(header.value.clone());
                    }
                    documents.push(document);
                }
            }
        }
    }
    let (sealed, readable) = judged(&customer, &key, &documents);
    places.push(Place {
        place: format!("log {topic} partition {partition}"),
        holds: format!("{} records of {end}", documents.len()),
        sealed,
        readable,
    });

    // The command side's snapshot of the partition, the customer's entry in it.
    let snapshot = backend
        .command_store
        .load_snapshot(&topic, partition)
        .await
        .map_err(|error| Error::Refused(format!("reading the snapshots: {error}")))?;
    let states: Vec<Value> = snapshot
        .iter()
        .flat_map(|snapshot| snapshot.aggregates.iter())
        .filter(|(id, _)| id == customer.as_str())
        .map(|(_, body)| parse(body))
        .collect();
    let (sealed, readable) = judged(&customer, &key, &states);
    places.push(Place {
        place: format!("snapshot of {topic} partition {partition}"),
        holds: if states.is_empty() {
            "no entry".into()
        } else {
            "the customer's state".into()
        },
        sealed,
        readable,
    });

    // The read models.
    let read = ReadSide::open(
        backend.log.clone(),
        &store.read_backend(),
        &store.topic_prefix,
    )
    .await
    .map_err(db_error("opening the read models"))?;
    let id = customer.as_str();
    for (projection, what, sql) in [
        (
            "customers",
            "row",
            "SELECT name, email, status FROM customers WHERE customer_id = $1",
        ),
        (
            "audit",
            "audited events",
            "SELECT envelope FROM audit_events WHERE aggregate_type = 'customer' AND aggregate_id = $1",
        ),
    ] {
        let db = read
            .db(projection)
            .ok_or_else(|| Error::Refused(format!("no {projection} read model")))?;
        let rows = db
            .fetch_all(sql, &[id.into()])
            .await
            .map_err(db_error("reading the read models"))?;
        let documents: Vec<Value> = rows
            .iter()
            .map(|row| {
                Value::Object(
                    row.columns
                        .iter()
                        .map(|(name, value)| {
                            let value = match value.text() {
                                Some(text) if text.starts_with('{') => parse(text),
                                Some(text) => Value::String(text.to_owned()),
                                None => Value::Null,
                            };
                            (name.clone(), value)
                        })
                        .collect(),
                )
            })
            .collect();
        let (sealed, readable) = judged(&customer, &key, &documents);
        places.push(Place {
            place: format!("read model {projection}"),
            holds: format!("{} {what}", documents.len()),
            sealed,
            readable,
        });
    }
    for projection in read.projection_names() {
        let Some(db) = read.db(projection) else {
            continue;
        };
        let rows = db
            .fetch_all(
                "SELECT record FROM parked_events WHERE aggregate_type = 'customer' AND aggregate_id = $1",
                &[id.into()],
            )
            .await
            .map_err(db_error("reading the parked events"))?;
        if rows.is_empty() {
            continue;
        }
        let documents: Vec<Value> = rows.iter().map(|row| parse(&row.text("record"))).collect();
        let (sealed, readable) = judged(&customer, &key, &documents);
        places.push(Place {
            place: format!("parked events of {projection}"),
            holds: format!("{} parked", documents.len()),
            sealed,
            readable,
        });
    }
    places.push(Place {
        place: "saga outbox".into(),
        holds: "order commands only: no customer field".into(),
        sealed: 0,
        readable: 0,
    });
    let nothing_readable = places.iter().all(|place| place.readable == 0);
    Ok(Report {
        customer_id: customer.to_string(),
        key: key_text,
        places,
        nothing_readable,
    })
}

/// Runs a `platform customers` command.
pub async fn customers(command: CustomersCommand, store: &StoreSettings) -> Result<()> {
    match command {
        CustomersCommand::ErasureReport { customer_id, json } => {
            let report = erasure_report(&customer_id, store).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                println!("customer {}: key {}", report.customer_id, report.key);
                let mut rows = table(["place", "holds", "sealed fields", "readable"], &[2, 3]);
                for place in &report.places {
                    rows.add_row(vec![
                        Cell::new(&place.place),
                        Cell::new(&place.holds),
                        Cell::new(place.sealed),
                        Cell::new(place.readable),
                    ]);
                }
                println!("{}", rows.trim_fmt());
                println!(
                    "{}",
                    if report.nothing_readable {
                        "nothing readable remains"
                    } else {
                        "READABLE DATA REMAINS (the customer is not erased)"
                    }
                );
            }
            if report.nothing_readable {
                Ok(())
            } else {
                Err(Error::Refused(format!(
                    "customer {customer_id}: personal data can still be read"
                )))
            }
        }
    }
}
