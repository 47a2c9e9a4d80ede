//! An envelope as a Kafka record: keyed by aggregate id (so one aggregate's events stay in one
//! partition, in order), the CloudEvents JSON as the value (structured mode), and headers that
//! repeat what tools route on (type, versions, trace context) so they need not parse the value.

use crate::envelope::{CONTENT_TYPE, DecodeError, Envelope};

pub const HEADER_CONTENT_TYPE: &str = "content-type";
pub const HEADER_EVENT_ID: &str = "ce_id";
pub const HEADER_EVENT_TYPE: &str = "ce_type";
pub const HEADER_SCHEMA_VERSION: &str = "ce_schemaversion";
pub const HEADER_AGGREGATE_VERSION: &str = "ce_aggregateversion";
pub const HEADER_CORRELATION_ID: &str = "ce_correlationid";
pub const HEADER_TRACEPARENT: &str = "traceparent";
pub const HEADER_TRACESTATE: &str = "tracestate";

/// A header of a record; values are UTF-8 text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// What goes on the log for one event, independent of the log's technology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: String,
    pub headers: Vec<Header>,
    pub value: Vec<u8>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|header| header.name == name)
            .map(|header| header.value.as_str())
    }
}

impl From<&Envelope> for Record {
    fn from(envelope: &Envelope) -> Self {
        let mut headers = vec![
            header(HEADER_CONTENT_TYPE, CONTENT_TYPE),
            header(HEADER_EVENT_ID, envelope.event_id.to_string()),
            header(HEADER_EVENT_TYPE, &envelope.event_type),
            header(HEADER_SCHEMA_VERSION, envelope.schema_version.to_string()),
            header(
                HEADER_AGGREGATE_VERSION,
                envelope.aggregate_version.to_string(),
            ),
            header(HEADER_CORRELATION_ID, &envelope.correlation_id),
        ];
        if let Some(traceparent) = &envelope.traceparent {
            headers.push(header(HEADER_TRACEPARENT, traceparent));
        }
        if let Some(tracestate) = &envelope.tracestate {
            headers.push(header(HEADER_TRACESTATE, tracestate));
        }
        Record {
            key: envelope.aggregate_id.clone(),
            headers,
            value: envelope.to_json_bytes(),
        }
    }
}

impl TryFrom<&Record> for Envelope {
    type Error = DecodeError;

    /// The value is the source of truth; the key must agree with it.
    fn try_from(record: &Record) -> Result<Self, DecodeError> {
        let envelope = Envelope::from_json_bytes(&record.value)?;
        if envelope.aggregate_id != record.key {
            return Err(DecodeError::KeyMismatch {
                key: record.key.clone(),
                subject: envelope.aggregate_id,
            });
        }
        Ok(envelope)
    }
}

fn header(name: &str, value: impl Into<String>) -> Header {
    Header {
        name: name.to_owned(),
        value: value.into(),
    }
}
