//! The audit trail, read from the audit read model (every effective event with its envelope):
//! an aggregate's timeline, one correlation's causation tree across services, and an
//! aggregate's state as of a time or version, folded with the domain's own `evolve`. The CLI
//! (`platform audit`) and the HTTP routes (`/audit/...`) share these functions.

use std::collections::{BTreeMap, HashMap};

use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use domain::Aggregate;
use domain::customer::CustomerAggregate;
use domain::order::OrderAggregate;
use domain::payment::PaymentAggregate;
use domain::stock::StockAggregate;
use event_schema::{DecodeError, Envelope, EventCodec};
use http_edge::ApiQuery;
use http_edge::{ApiError, FieldError, Problem};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::ReadSide;
use crate::db::{Db, DbError, Row};

/// The aggregate types the audit knows.
pub const AGGREGATE_TYPES: [&str; 4] = ["order", "payment", "stock", "customer"];

/// Why an audit question has no answer.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{0}")]
    NotFound(String),
    /// Not `order`, `payment` or `stock`.
    #[error("{0}")]
    UnknownType(String),
    /// A stored event cannot be decoded: the audit data is broken, not the request.
    #[error("{0}")]
    Unreadable(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<AuditError> for ApiError {
    fn from(error: AuditError) -> Self {
        match error {
            AuditError::NotFound(message) => ApiError::NotFound(message),
            AuditError::UnknownType(message) => {
                ApiError::Validation(vec![FieldError::new("aggregate_type", message)])
            }
            AuditError::Unreadable(message) => ApiError::Internal(message),
            AuditError::Db(error) => ApiError::Unavailable(format!("audit read model: {error}")),
        }
    }
}

/// One event of an aggregate's timeline.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct TimelineEntry {
    pub version: i64,
    /// RFC 3339.
    pub occurred_at: String,
    pub event_type: String,
    pub actor: String,
    /// The command that produced the event (`place_order`, `reserve_stock`, ...).
    pub command: String,
    pub command_id: String,
    pub correlation_id: String,
    pub causation_id: String,
    pub event_id: String,
    /// What the event changed in the aggregate's state (`field: before → after`, ...).
    pub summary: String,
}

/// `GET /audit/{aggregate_type}/{id}`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Timeline {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub events: Vec<TimelineEntry>,
}

/// One step of a correlation's flow: a command and the event it produced, with the steps the
/// event caused.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TraceStep {
    pub command_id: String,
    /// The command, as its event shows it (`place_order`, `reserve_stock`, ...).
    pub command: String,
    /// Who sent it (`saga` for the orchestrator's steps).
    pub actor: String,
    /// What caused the command: an event id, the client's request (the command itself), or
    /// the saga's `deadline` / `operator-retry`.
    pub caused_by: String,
    /// Undoes an earlier step (releasing stock, voiding or refunding a payment, rejecting the
    /// order after part of it was done).
    pub compensation: bool,
    pub event_id: String,
    pub event_type: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub version: i64,
    /// RFC 3339.
    pub occurred_at: String,
    /// Depth in the causation tree (0: a root).
    pub depth: usize,
    /// The saga step that reacted to this event and sent the children.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    #[schema(no_recursion)]
    pub caused: Vec<TraceStep>,
}

/// `GET /audit/trace/{correlation_id}`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Trace {
    pub correlation_id: String,
    /// The causation tree's roots (client requests, saga deadlines), oldest first.
    pub roots: Vec<TraceStep>,
    /// Every step in causal order (the tree, depth first), without children.
    pub steps: Vec<TraceStep>,
}

/// `GET /audit/{aggregate_type}/{id}/state`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StateAsOf {
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// The last version folded in.
    pub version: i64,
    /// When that version's event occurred (RFC 3339).
    pub occurred_at: Option<String>,
    /// The state, as the domain's `evolve` builds it.
    #[schema(value_type = Object)]
    pub state: Value,
}

/// A point in an aggregate's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    Latest,
    Version(u64),
    Time(DateTime<Utc>),
}

impl std::str::FromStr for AsOf {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        if !raw.is_empty()
            && raw.bytes().all(|byte| byte.is_ascii_digit())
            && let Ok(version) = raw.parse::<u64>()
        {
            return Ok(AsOf::Version(version));
        }
        DateTime::parse_from_rfc3339(raw)
            .map(|time| AsOf::Time(time.with_timezone(&Utc)))
            .map_err(|_| format!("{raw:?} is neither a version number nor an RFC 3339 time"))
    }
}

fn rfc3339(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map(|time| time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

fn check_type(aggregate_type: &str) -> Result<(), AuditError> {
    if AGGREGATE_TYPES.contains(&aggregate_type) {
        Ok(())
    } else {
        Err(AuditError::UnknownType(format!(
            "must be one of {}",
            AGGREGATE_TYPES.join(", ")
        )))
    }
}

async fn events_of(
    db: &Db,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Vec<Row>, AuditError> {
    check_type(aggregate_type)?;
    Ok(db
        .fetch_all(
            "SELECT * FROM audit_events WHERE aggregate_type = $1 AND aggregate_id = $2
             ORDER BY aggregate_version",
            &[aggregate_type.into(), aggregate_id.into()],
        )
        .await?)
}

fn envelope_of(row: &Row) -> Result<Envelope, DecodeError> {
    Envelope::from_json_bytes(row.text("envelope").as_bytes())
}

/// Folds events into states with the aggregate's `evolve`: the state after each event.
fn fold<A: EventCodec>(envelopes: &[Envelope]) -> Result<Vec<Value>, DecodeError>
where
    A::State: Serialize,
{
    let mut state = A::State::default();
    let mut states = Vec::with_capacity(envelopes.len());
    for envelope in envelopes {
        let event = envelope.event::<A>()?;
        state = A::evolve(state, &event);
        states.push(serde_json::to_value(&state).unwrap_or(Value::Null));
    }
    Ok(states)
}

fn states_after(aggregate_type: &str, envelopes: &[Envelope]) -> Result<Vec<Value>, AuditError> {
    let folded = match aggregate_type {
        "order" => fold::<OrderAggregate>(envelopes),
        "payment" => fold::<PaymentAggregate>(envelopes),
        "stock" => fold::<StockAggregate>(envelopes),
        "customer" => fold::<CustomerAggregate>(envelopes),
        other => {
            return Err(AuditError::UnknownType(format!(
                "unknown aggregate type {other}"
            )));
        }
    };
    folded.map_err(|error| AuditError::Unreadable(format!("an event cannot be read: {error}")))
}

/// Leaf values of a JSON document by path; an enum's single-variant wrapper (`{"Placed":
/// {...}}`) is kept as the path's first step.
fn leaves(value: &Value, path: String, out: &mut BTreeMap<String, String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                let path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                leaves(value, path, out);
            }
        }
        Value::Array(items) => {
            out.insert(path, Value::Array(items.clone()).to_string());
        }
        Value::String(text) => {
            out.insert(path, text.clone());
        }
        other => {
            out.insert(path, other.to_string());
        }
    }
}

/// `field: before → after`, for every leaf that changed.
fn summary(before: &Value, after: &Value) -> String {
    let mut old = BTreeMap::new();
    let mut new = BTreeMap::new();
    if !before.is_null() {
        leaves(before, String::new(), &mut old);
    }
    if !after.is_null() {
        leaves(after, String::new(), &mut new);
    }
    // Drop the enum variant wrapper (`Placed.status` → `status`) for readability.
    let strip = |path: &String| {
        path.split_once('.')
            .filter(|(head, _)| head.chars().next().is_some_and(char::is_uppercase))
            .map(|(_, rest)| rest.to_owned())
            .unwrap_or_else(|| path.clone())
    };
    let mut changes = Vec::new();
    for (path, value) in &new {
        match old.get(path) {
            Some(previous) if previous == value => {}
            Some(previous) => changes.push(format!("{}: {previous} → {value}", strip(path))),
            None if old.is_empty() || !old.keys().any(|key| strip(key) == strip(path)) => {
                changes.push(format!("{}: {value}", strip(path)))
            }
            None => {
                let previous = old
                    .iter()
                    .find(|(key, _)| strip(key) == strip(path))
                    .map(|(_, value)| value.clone())
                    .unwrap_or_default();
                if previous != *value {
                    changes.push(format!("{}: {previous} → {value}", strip(path)));
                }
            }
        }
    }
    for path in old.keys() {
        if !new.contains_key(path) && !new.keys().any(|key| strip(key) == strip(path)) {
            changes.push(format!("{}: removed", strip(path)));
        }
    }
    if changes.is_empty() {
        "no change".into()
    } else {
        changes.join(", ")
    }
}

/// An aggregate's timeline: every effective event, oldest first, with what it changed.
pub async fn timeline(
    db: &Db,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Timeline, AuditError> {
    let rows = events_of(db, aggregate_type, aggregate_id).await?;
    if rows.is_empty() {
        return Err(AuditError::NotFound(format!(
            "{aggregate_type} {aggregate_id} has no events"
        )));
    }
    let envelopes: Vec<Envelope> = rows
        .iter()
        .map(envelope_of)
        .collect::<Result<_, _>>()
        .map_err(|error| AuditError::Unreadable(format!("an event cannot be read: {error}")))?;
    let states = states_after(aggregate_type, &envelopes)?;
    let mut before = Value::Null;
    let mut events = Vec::with_capacity(rows.len());
    for (row, after) in rows.iter().zip(states) {
        events.push(TimelineEntry {
            version: row.int("aggregate_version"),
            occurred_at: rfc3339(row.int("occurred_at")),
            event_type: row.text("event_type"),
            actor: row.text("actor"),
            command: command_of(&row.text("event_type")).to_owned(),
            command_id: row.text("command_id"),
            correlation_id: row.text("correlation_id"),
            causation_id: row.text("causation_id"),
            event_id: row.text("event_id"),
            summary: summary(&before, &after),
        });
        before = after;
    }
    Ok(Timeline {
        aggregate_type: aggregate_type.to_owned(),
        aggregate_id: aggregate_id.to_owned(),
        events,
    })
}

/// The state of an aggregate as of a version or a time (inclusive), folded with `evolve`.
pub async fn state_as_of(
    db: &Db,
    aggregate_type: &str,
    aggregate_id: &str,
    as_of: AsOf,
) -> Result<StateAsOf, AuditError> {
    let rows = events_of(db, aggregate_type, aggregate_id).await?;
    if rows.is_empty() {
        return Err(AuditError::NotFound(format!(
            "{aggregate_type} {aggregate_id} has no events"
        )));
    }
    let rows: Vec<&Row> = rows
        .iter()
        .filter(|row| match as_of {
            AsOf::Latest => true,
            AsOf::Version(version) => row.int("aggregate_version") as u64 <= version,
            AsOf::Time(time) => row.int("occurred_at") <= time.timestamp_millis(),
        })
        .collect();
    let envelopes: Vec<Envelope> = rows
        .iter()
        .map(|row| envelope_of(row))
        .collect::<Result<_, _>>()
        .map_err(|error| AuditError::Unreadable(format!("an event cannot be read: {error}")))?;
    let state = match envelopes.is_empty() {
        true => states_after(aggregate_type, &[])?.pop(),
        false => states_after(aggregate_type, &envelopes)?.pop(),
    };
    let state = match state {
        Some(state) => state,
        None => match aggregate_type {
            "order" => serde_json::to_value(<OrderAggregate as Aggregate>::State::default()),
            "payment" => serde_json::to_value(<PaymentAggregate as Aggregate>::State::default()),
            "customer" => serde_json::to_value(<CustomerAggregate as Aggregate>::State::default()),
            _ => serde_json::to_value(<StockAggregate as Aggregate>::State::default()),
        }
        .unwrap_or(Value::Null),
    };
    let last = rows.last();
    Ok(StateAsOf {
        aggregate_type: aggregate_type.to_owned(),
        aggregate_id: aggregate_id.to_owned(),
        version: last.map(|row| row.int("aggregate_version")).unwrap_or(0),
        occurred_at: last.map(|row| rfc3339(row.int("occurred_at"))),
        state,
    })
}

/// The command behind an event type.
fn command_of(event_type: &str) -> &'static str {
    match event_type {
        "order.placed" => "place_order",
        "order.confirmed" => "confirm_order",
        "order.rejected" => "reject_order",
        "order.cancelled" => "cancel_order",
        "order.shipped" => "ship_order",
        "payment.authorised" | "payment.declined" => "authorise_payment",
        "payment.captured" => "capture_payment",
        "payment.refunded" => "refund_payment",
        "payment.voided" => "void_payment",
        "stock.received" => "receive_stock",
        "stock.adjusted" => "adjust_stock",
        "stock.reserved" | "stock.reservation_rejected" => "reserve_stock",
        "stock.reservation_released" => "release_stock",
        "stock.reservation_committed" => "commit_stock",
        _ => "unknown",
    }
}

/// Commands that undo an earlier step when the saga sends them.
fn is_compensation(command: &str, actor: &str) -> bool {
    event_schema::commands::is_saga_actor(actor)
        && matches!(
            command,
            "release_stock" | "void_payment" | "refund_payment" | "reject_order"
        )
}

/// One correlation's flow as a causation tree: each event under the event whose saga step sent
/// its command; roots are client requests (and saga deadlines).
pub async fn trace(db: &Db, correlation_id: &str) -> Result<Trace, AuditError> {
    let rows = db
        .fetch_all(
            "SELECT event_id, aggregate_type, aggregate_id, aggregate_version, event_type, occurred_at,
                    causation_id, command_id, actor
             FROM audit_events WHERE correlation_id = $1 ORDER BY occurred_at, event_id",
            &[correlation_id.into()],
        )
        .await?;
    if rows.is_empty() {
        return Err(AuditError::NotFound(format!(
            "correlation {correlation_id} has no events"
        )));
    }
    let ids: HashMap<String, usize> = rows
        .iter()
        .enumerate()
        .map(|(index, row)| (row.text("event_id"), index))
        .collect();
    let mut children: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut roots = Vec::new();
    for (index, row) in rows.iter().enumerate() {
        match ids.get(&row.text("causation_id")) {
            Some(parent) if *parent != index => children.entry(*parent).or_default().push(index),
            _ => roots.push(index),
        }
    }
    fn build(
        rows: &[Row],
        children: &HashMap<usize, Vec<usize>>,
        index: usize,
        depth: usize,
        flat: &mut Vec<TraceStep>,
    ) -> TraceStep {
        let row = &rows[index];
        let event_type = row.text("event_type");
        let command = command_of(&event_type);
        let actor = row.text("actor");
        let causation = row.text("causation_id");
        let command_id = row.text("command_id");
        let mut step = TraceStep {
            caused_by: if causation == command_id {
                "request".into()
            } else {
                causation
            },
            compensation: is_compensation(command, &actor),
            command: command.to_owned(),
            command_id,
            actor,
            event_id: row.text("event_id"),
            event_type,
            aggregate_type: row.text("aggregate_type"),
            aggregate_id: row.text("aggregate_id"),
            version: row.int("aggregate_version"),
            occurred_at: rfc3339(row.int("occurred_at")),
            depth,
            caused: Vec::new(),
        };
        flat.push(step.clone());
        if let Some(kids) = children.get(&index) {
            step.caused = kids
                .iter()
                .map(|kid| build(rows, children, *kid, depth + 1, flat))
                .collect();
        }
        step
    }
    let mut steps = Vec::new();
    let roots = roots
        .into_iter()
        .map(|root| build(&rows, &children, root, 0, &mut steps))
        .collect();
    Ok(Trace {
        correlation_id: correlation_id.to_owned(),
        roots,
        steps,
    })
}

fn audit_db(read: &ReadSide) -> Result<&Db, ApiError> {
    read.db("audit").ok_or_else(|| {
        ApiError::Unavailable("the audit read model does not run in this process".into())
    })
}

/// An aggregate's history: who did what, when, through which command, and why.
#[utoipa::path(
    get, path = "/audit/{aggregate_type}/{id}", tag = "audit",
    params(
        ("aggregate_type" = AuditedType, Path, description = "`order`, `payment`, `stock` or `customer`"),
        ("id" = String, Path, description = "The aggregate id (an order id, or a SKU)"),
    ),
    responses(
        (status = 200, description = "The timeline, oldest first", body = Timeline),
        (status = 404, description = "No events for the aggregate", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown aggregate type", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The audit read model is down", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_timeline(
    State(read): State<ReadSide>,
    Path((aggregate_type, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let timeline = timeline(audit_db(&read)?, &aggregate_type, &id).await?;
    Ok(axum::Json(timeline).into_response())
}

/// One request's whole flow across services, as a causation tree.
#[utoipa::path(
    get, path = "/audit/trace/{correlation_id}", tag = "audit",
    params(("correlation_id" = String, Path, description = "The correlation id (the first command's id)")),
    responses(
        (status = 200, description = "The causation tree", body = Trace),
        (status = 404, description = "No events for the correlation", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The audit read model is down", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_trace(
    State(read): State<ReadSide>,
    Path(correlation_id): Path<String>,
) -> Result<Response, ApiError> {
    let trace = trace(audit_db(&read)?, &correlation_id).await?;
    Ok(axum::Json(trace).into_response())
}

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AsOfQuery {
    /// A version number, or an RFC 3339 time; absent: the latest state.
    #[param(schema_with = http_edge::openapi::version_or_time)]
    pub as_of: Option<String>,
}

/// The aggregate types the audit trail has, for the OpenAPI document.
#[derive(Debug, Clone, Copy, utoipa::ToSchema)]
#[schema(as = AuditedType)]
#[allow(dead_code)]
#[serde(rename_all = "lowercase")]
pub enum AuditedType {
    Order,
    Payment,
    Stock,
    Customer,
}

/// An aggregate's state as of a version or a time, folded with the domain's `evolve`.
#[utoipa::path(
    get, path = "/audit/{aggregate_type}/{id}/state", tag = "audit",
    params(
        ("aggregate_type" = AuditedType, Path, description = "`order`, `payment`, `stock` or `customer`"),
        ("id" = String, Path, description = "The aggregate id"),
        AsOfQuery,
    ),
    responses(
        (status = 200, description = "The state", body = StateAsOf),
        (status = 404, description = "No events for the aggregate", body = Problem, content_type = "application/problem+json"),
        (status = 400, description = "Malformed query string (a repeated parameter)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown aggregate type or malformed as_of", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The audit read model is down", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_state(
    State(read): State<ReadSide>,
    Path((aggregate_type, id)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<AsOfQuery>,
) -> Result<Response, ApiError> {
    let as_of = match query.as_of.as_deref() {
        None => AsOf::Latest,
        Some(raw) => raw.parse().map_err(|message: String| {
            ApiError::Validation(vec![FieldError::new("as_of", message)])
        })?,
    };
    let state = state_as_of(audit_db(&read)?, &aggregate_type, &id, as_of).await?;
    Ok(axum::Json(state).into_response())
}

/// The audit routes, of the audit class (auditors and reads).
pub fn router() -> Router<ReadSide> {
    let routes = Router::new()
        .route("/audit/trace/{correlation_id}", get(get_trace))
        .route("/audit/{aggregate_type}/{id}", get(get_timeline))
        .route("/audit/{aggregate_type}/{id}/state", get(get_state));
    http_edge::security::routes(routes, http_edge::security::RouteClass::Audit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_summary_names_each_field_that_changed_with_before_and_after() {
        let before = json!({"Placed": {"status": "Pending", "total_minor": 100}});
        let after = json!({"Placed": {"status": "Confirmed", "total_minor": 100}});
        assert_eq!(summary(&before, &after), "status: Pending → Confirmed");
    }

    #[test]
    fn the_first_event_summarises_the_whole_new_state() {
        let after = json!({"on_hand": 5, "reserved": 0});
        assert_eq!(summary(&Value::Null, &after), "on_hand: 5, reserved: 0");
    }

    #[test]
    fn as_of_reads_a_version_or_an_rfc3339_time_and_nothing_else() {
        assert_eq!("3".parse::<AsOf>(), Ok(AsOf::Version(3)));
        assert!(matches!(
            "2026-11-21T10:00:00Z".parse::<AsOf>(),
            Ok(AsOf::Time(_))
        ));
        assert!("yesterday".parse::<AsOf>().is_err());
    }

    #[test]
    fn saga_releases_voids_refunds_and_rejections_are_compensations() {
        assert!(is_compensation(
            command_of("stock.reservation_released"),
            "saga"
        ));
        assert!(is_compensation(command_of("payment.voided"), "saga"));
        assert!(!is_compensation(command_of("stock.reserved"), "saga"));
        assert!(!is_compensation(command_of("order.cancelled"), "customer"));
        assert!(is_compensation(
            command_of("payment.refunded"),
            "saga on behalf of key:1a2b3c4d"
        ));
        assert!(!is_compensation(
            command_of("payment.refunded"),
            "key:1a2b3c4d"
        ));
    }
}
