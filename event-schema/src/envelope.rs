//! The envelope every stored event travels in, and its JSON form: a CloudEvents 1.0 event in
//! structured mode, so ordinary CloudEvents tooling can read the log.
//!
//! ```json
//! { "specversion": "1.0", "id": "<event id, UUIDv7>", "source": "/fulfilment/order",
//!   "type": "order.placed", "subject": "<aggregate id>", "time": "2026-11-21T10:00:00Z",
//!   "datacontenttype": "application/json", "data": { ... },
//!   "aggregatetype": "order", "aggregateversion": 1, "schemaversion": 2,
//!   "correlationid": "...", "causationid": "...", "commandid": "...", "actor": "..." }
//! ```
//! Extension attribute names follow the CloudEvents rules (lower-case letters and digits).
//! `traceparent`/`tracestate` are the CloudEvents distributed-tracing extension.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::catalog::EventCodec;
use crate::upcast;

pub const SPEC_VERSION: &str = "1.0";
pub const DATA_CONTENT_TYPE: &str = "application/json";
/// The content type of a whole envelope (CloudEvents structured mode).
pub const CONTENT_TYPE: &str = "application/cloudevents+json; charset=utf-8";

/// Why bytes from the log could not be read as an envelope or event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a CloudEvents JSON envelope: {0}")]
    Malformed(String),
    #[error("unsupported CloudEvents specversion {0:?}")]
    SpecVersion(String),
    #[error("unknown event type {0:?}")]
    UnknownEventType(String),
    #[error("event type {event_type:?} has no schema version {version} (newest known: {newest})")]
    UnknownSchemaVersion {
        event_type: String,
        version: u16,
        newest: u16,
    },
    #[error("no upcaster for {event_type:?} from schema version {version}")]
    MissingUpcaster { event_type: String, version: u16 },
    #[error("invalid {event_type} data: {message}")]
    InvalidData { event_type: String, message: String },
    #[error("record key {key:?} does not match the envelope's subject {subject:?}")]
    KeyMismatch { key: String, subject: String },
}

/// Who asked for a change and why: the metadata of the command an event comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandMeta {
    pub command_id: Uuid,
    /// Ties together everything one outside request set in motion, across services.
    pub correlation_id: String,
    /// The command or event that caused this command (absent for a client's request, whose
    /// cause is the command itself).
    pub causation_id: Option<String>,
    pub actor: String,
    /// A digest of the request that carried the command, so a repeated idempotency key with a
    /// different request can be told apart from an honest retry.
    pub request_hash: Option<String>,
    /// W3C trace context of the request, carried on to consumers.
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl CommandMeta {
    /// Metadata for a command with no outside request behind it (tests, tools).
    pub fn new(actor: impl Into<String>) -> Self {
        let command_id = Uuid::now_v7();
        CommandMeta {
            command_id,
            correlation_id: command_id.to_string(),
            causation_id: None,
            actor: actor.into(),
            request_hash: None,
            traceparent: None,
            tracestate: None,
        }
    }
}

/// One stored event with its metadata. The data is always in the current shape of its event
/// type: envelopes read from the log are upcast before anyone sees them.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// UUIDv7: unique, and roughly ordered by creation time.
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// 1 for the aggregate's first event, then 2, 3, ... with no gaps (among effective events).
    pub aggregate_version: u64,
    pub event_type: String,
    pub schema_version: u16,
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: String,
    /// The command (for a client request) or event (for a saga step) that caused this event.
    pub causation_id: String,
    pub command_id: Uuid,
    pub actor: String,
    pub request_hash: Option<String>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub data: Value,
}

impl Envelope {
    /// Wraps a domain event decided for `aggregate_id` at `aggregate_version`.
    pub fn new<A: EventCodec>(
        aggregate_id: impl Into<String>,
        aggregate_version: u64,
        event: &A::Event,
        meta: &CommandMeta,
        occurred_at: DateTime<Utc>,
    ) -> Self {
        let event_type = A::event_type(event);
        Envelope {
            event_id: Uuid::now_v7(),
            aggregate_type: A::TYPE.to_owned(),
            aggregate_id: aggregate_id.into(),
            aggregate_version,
            event_type: event_type.name.to_owned(),
            schema_version: event_type.version,
            occurred_at,
            correlation_id: meta.correlation_id.clone(),
            causation_id: meta
                .causation_id
                .clone()
                .unwrap_or_else(|| meta.command_id.to_string()),
            command_id: meta.command_id,
            actor: meta.actor.clone(),
            request_hash: meta.request_hash.clone(),
            traceparent: meta.traceparent.clone(),
            tracestate: meta.tracestate.clone(),
            data: A::encode(event),
        }
    }

    /// The domain event inside, for the aggregate type `A`.
    pub fn event<A: EventCodec>(&self) -> Result<A::Event, DecodeError> {
        A::decode(&self.event_type, self.data.clone())
    }

    /// The CloudEvents JSON form.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(CloudEvent::from(self)).unwrap_or(Value::Null)
    }

    pub fn to_json_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&CloudEvent::from(self)).unwrap_or_default()
    }

    /// Reads a CloudEvents JSON envelope, upcasting its data to the current schema version.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let event: CloudEvent = serde_json::from_slice(bytes)
            .map_err(|error| DecodeError::Malformed(error.to_string()))?;
        Envelope::try_from(event)
    }

    pub fn from_json(value: Value) -> Result<Self, DecodeError> {
        let event: CloudEvent = serde_json::from_value(value)
            .map_err(|error| DecodeError::Malformed(error.to_string()))?;
        Envelope::try_from(event)
    }
}

/// The CloudEvents 1.0 structured-mode JSON form of an [`Envelope`].
#[derive(Debug, Serialize, Deserialize)]
struct CloudEvent {
    specversion: String,
    id: Uuid,
    source: String,
    #[serde(rename = "type")]
    event_type: String,
    subject: String,
    time: DateTime<Utc>,
    datacontenttype: String,
    data: Value,
    aggregatetype: String,
    aggregateversion: u64,
    schemaversion: u16,
    correlationid: String,
    causationid: String,
    commandid: Uuid,
    actor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    requesthash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    traceparent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tracestate: Option<String>,
}

/// The CloudEvents `source` of events of an aggregate type.
pub fn source_of(aggregate_type: &str) -> String {
    format!("/fulfilment/{aggregate_type}")
}

impl From<&Envelope> for CloudEvent {
    fn from(envelope: &Envelope) -> Self {
        CloudEvent {
            specversion: SPEC_VERSION.to_owned(),
            id: envelope.event_id,
            source: source_of(&envelope.aggregate_type),
            event_type: envelope.event_type.clone(),
            subject: envelope.aggregate_id.clone(),
            time: envelope.occurred_at,
            datacontenttype: DATA_CONTENT_TYPE.to_owned(),
            data: envelope.data.clone(),
            aggregatetype: envelope.aggregate_type.clone(),
            aggregateversion: envelope.aggregate_version,
            schemaversion: envelope.schema_version,
            correlationid: envelope.correlation_id.clone(),
            causationid: envelope.causation_id.clone(),
            commandid: envelope.command_id,
            actor: envelope.actor.clone(),
            requesthash: envelope.request_hash.clone(),
            traceparent: envelope.traceparent.clone(),
            tracestate: envelope.tracestate.clone(),
        }
    }
}

impl TryFrom<CloudEvent> for Envelope {
    type Error = DecodeError;

    fn try_from(event: CloudEvent) -> Result<Self, DecodeError> {
        if event.specversion != SPEC_VERSION {
            return Err(DecodeError::SpecVersion(event.specversion));
        }
        let (schema_version, data) =
            upcast::to_current(&event.event_type, event.schemaversion, event.data)?;
        Ok(Envelope {
            event_id: event.id,
            aggregate_type: event.aggregatetype,
            aggregate_id: event.subject,
            aggregate_version: event.aggregateversion,
            event_type: event.event_type,
            schema_version,
            occurred_at: event.time,
            correlation_id: event.correlationid,
            causation_id: event.causationid,
            command_id: event.commandid,
            actor: event.actor,
            request_hash: event.requesthash,
            traceparent: event.traceparent,
            tracestate: event.tracestate,
            data,
        })
    }
}
