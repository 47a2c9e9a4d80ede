//! The envelope's JSON form round-trips, for an event of every type of every aggregate.

mod common;

use common::{at, full_meta, order_id};
use domain::order::OrderAggregate;
use domain::payment::PaymentAggregate;
use domain::stock::StockAggregate;
use event_schema::envelope::{CONTENT_TYPE, DATA_CONTENT_TYPE, SPEC_VERSION};
use event_schema::{CommandMeta, DecodeError, Envelope, EventCodec};
use serde_json::json;

/// Wraps each event, writes it as JSON, reads it back, and gets the same envelope and event.
#[track_caller]
fn assert_round_trips<A: EventCodec>(aggregate_id: &str, events: &[A::Event], meta: &CommandMeta)
where
    A::Event: PartialEq,
{
    for (index, event) in events.iter().enumerate() {
        let version = index as u64 + 1;
        let envelope = Envelope::new::<A>(aggregate_id, version, event, meta, at());
        assert_eq!(envelope.aggregate_type, A::TYPE);
        assert_eq!(envelope.aggregate_version, version);
        assert_eq!(envelope.event_type, A::event_type(event).name);
        assert_eq!(envelope.schema_version, A::event_type(event).version);

        let read = Envelope::from_json_bytes(&envelope.to_json_bytes())
            .unwrap_or_else(|error| panic!("{} does not read back: {error}", envelope.event_type));
        assert_eq!(read, envelope);
        assert_eq!(read.event::<A>().as_ref(), Ok(event));
        assert_eq!(Envelope::from_json(envelope.to_json()), Ok(envelope));
    }
}

#[test]
fn an_order_event_of_each_type_round_trips() {
    let id = order_id().to_string();
    assert_round_trips::<OrderAggregate>(&id, &common::order_events(), &full_meta());
}

#[test]
fn a_payment_event_of_each_type_round_trips() {
    let id = order_id().to_string();
    assert_round_trips::<PaymentAggregate>(&id, &common::payment_events(), &full_meta());
}

#[test]
fn a_stock_event_of_each_type_round_trips() {
    assert_round_trips::<StockAggregate>("SKU-1", &common::stock_events(), &full_meta());
}

#[test]
fn an_envelope_without_optional_metadata_round_trips_and_leaves_it_out() {
    let meta = CommandMeta::new("alice");
    let event = &common::stock_events()[0];
    let envelope = Envelope::new::<StockAggregate>("SKU-1", 1, event, &meta, at());
    let json = envelope.to_json();
    for absent in ["requesthash", "traceparent", "tracestate"] {
        assert!(json.get(absent).is_none(), "{absent} should be left out");
    }
    assert_eq!(
        Envelope::from_json_bytes(&envelope.to_json_bytes()),
        Ok(envelope)
    );
}

#[test]
fn a_client_command_is_its_own_events_cause_and_correlation() {
    let meta = CommandMeta::new("alice");
    let event = &common::stock_events()[0];
    let envelope = Envelope::new::<StockAggregate>("SKU-1", 1, event, &meta, at());
    assert_eq!(envelope.command_id, meta.command_id);
    assert_eq!(envelope.causation_id, meta.command_id.to_string());
    assert_eq!(envelope.correlation_id, meta.command_id.to_string());
    assert_eq!(envelope.actor, "alice");
    assert_eq!(
        envelope.event_id.get_version_num(),
        7,
        "event ids are UUIDv7"
    );
}

#[test]
fn the_json_form_carries_every_field_of_the_envelope() {
    let meta = full_meta();
    let event = &common::order_events()[0];
    let envelope = Envelope::new::<OrderAggregate>(order_id().to_string(), 1, event, &meta, at());
    assert_eq!(
        envelope.to_json(),
        json!({
            "specversion": SPEC_VERSION,
            "id": envelope.event_id,
            "source": "/fulfilment/order",
            "type": "order.placed",
            "subject": order_id().to_string(),
            "time": "2026-11-21T10:00:00.123456Z",
            "datacontenttype": DATA_CONTENT_TYPE,
            "data": OrderAggregate::encode(event),
            "aggregatetype": "order",
            "aggregateversion": 1,
            "schemaversion": 2,
            "correlationid": "corr-42",
            "causationid": "0196a000-0000-7000-8000-0000000000e1",
            "commandid": meta.command_id,
            "actor": "saga:fulfilment",
            "requesthash": "sha256:abcdef",
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "tracestate": "vendor=opaque",
        })
    );
    assert!(CONTENT_TYPE.starts_with("application/cloudevents+json"));
}

#[test]
fn another_specversion_or_a_malformed_envelope_is_refused() {
    let event = &common::stock_events()[0];
    let envelope = Envelope::new::<StockAggregate>("SKU-1", 1, event, &full_meta(), at());
    let mut json = envelope.to_json();
    json["specversion"] = json!("0.3");
    assert_eq!(
        Envelope::from_json(json.clone()),
        Err(DecodeError::SpecVersion("0.3".into()))
    );
    json["specversion"] = json!("1.0");
    json.as_object_mut().map(|map| map.remove("subject"));
    assert!(matches!(
        Envelope::from_json(json),
        Err(DecodeError::Malformed(message)) if message.contains("subject")
    ));
    assert!(matches!(
        Envelope::from_json_bytes(b"not json"),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn an_event_read_as_the_wrong_aggregate_is_an_unknown_type() {
    let event = &common::stock_events()[0];
    let envelope = Envelope::new::<StockAggregate>("SKU-1", 1, event, &full_meta(), at());
    assert_eq!(
        envelope.event::<OrderAggregate>(),
        Err(DecodeError::UnknownEventType("stock.received".into()))
    );
}
