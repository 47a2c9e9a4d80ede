//! An envelope as a Kafka record: keyed by aggregate id, with the headers tools route on.

mod common;

use common::{at, full_meta, order_id};
use domain::order::OrderAggregate;
use domain::stock::StockAggregate;
use event_schema::envelope::CONTENT_TYPE;
use event_schema::record::{
    HEADER_AGGREGATE_VERSION, HEADER_CONTENT_TYPE, HEADER_CORRELATION_ID, HEADER_EVENT_ID,
    HEADER_EVENT_TYPE, HEADER_SCHEMA_VERSION, HEADER_TRACEPARENT, HEADER_TRACESTATE,
};
use event_schema::{CommandMeta, DecodeError, Envelope, Record};

fn placed() -> Envelope {
    let event = &common::order_events()[0];
    Envelope::new::<OrderAggregate>(order_id().to_string(), 1, event, &full_meta(), at())
}

#[test]
fn a_record_is_keyed_by_aggregate_id_and_carries_the_routing_headers() {
    let envelope = placed();
    let record = Record::from(&envelope);
    assert_eq!(record.key, order_id().to_string());
    assert_eq!(record.value, envelope.to_json_bytes());
    assert_eq!(record.header(HEADER_CONTENT_TYPE), Some(CONTENT_TYPE));
    assert_eq!(
        record.header(HEADER_EVENT_ID),
        Some(envelope.event_id.to_string().as_str())
    );
    assert_eq!(record.header(HEADER_EVENT_TYPE), Some("order.placed"));
    assert_eq!(record.header(HEADER_SCHEMA_VERSION), Some("2"));
    assert_eq!(record.header(HEADER_AGGREGATE_VERSION), Some("1"));
    assert_eq!(record.header(HEADER_CORRELATION_ID), Some("corr-42"));
    assert_eq!(
        record.header(HEADER_TRACEPARENT),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(record.header(HEADER_TRACESTATE), Some("vendor=opaque"));
}

#[test]
fn trace_headers_are_left_out_when_there_is_no_trace() {
    let event = &common::stock_events()[0];
    let envelope =
        Envelope::new::<StockAggregate>("SKU-1", 7, event, &CommandMeta::new("alice"), at());
    let record = Record::from(&envelope);
    assert_eq!(record.key, "SKU-1");
    assert_eq!(record.header(HEADER_AGGREGATE_VERSION), Some("7"));
    assert_eq!(record.header(HEADER_TRACEPARENT), None);
    assert_eq!(record.header(HEADER_TRACESTATE), None);
    assert_eq!(record.headers.len(), 6);
}

#[test]
fn a_record_reads_back_as_its_envelope() {
    let envelope = placed();
    assert_eq!(Envelope::try_from(&Record::from(&envelope)), Ok(envelope));
}

#[test]
fn a_record_whose_key_is_not_its_subject_is_refused() {
    let mut record = Record::from(&placed());
    record.key = "some-other-order".into();
    assert_eq!(
        Envelope::try_from(&record),
        Err(DecodeError::KeyMismatch {
            key: "some-other-order".into(),
            subject: order_id().to_string(),
        })
    );
}

#[test]
fn a_record_whose_value_is_not_an_envelope_is_refused() {
    let mut record = Record::from(&placed());
    record.value = b"{}".to_vec();
    assert!(matches!(
        Envelope::try_from(&record),
        Err(DecodeError::Malformed(_))
    ));
}
