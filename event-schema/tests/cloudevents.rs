//! The JSON form is a valid CloudEvents 1.0 structured-mode event, as read by an independent
//! implementation: the official CloudEvents SDK (`cloudevents-sdk`, no HTTP or Kafka binding).
//! The spec rules the SDK does not enforce (attribute naming, the integer range) are checked by
//! hand against the spec text.

mod common;

use cloudevents::event::{ExtensionValue, SpecVersion};
use cloudevents::{AttributesReader, Data, Event};
use common::{at, full_meta, order_id};
use domain::customer::CustomerAggregate;
use domain::order::OrderAggregate;
use domain::payment::PaymentAggregate;
use domain::stock::StockAggregate;
use event_schema::{CommandMeta, Envelope};
use serde_json::Value;

fn envelopes() -> Vec<Envelope> {
    let meta = full_meta();
    let order = order_id().to_string();
    let mut envelopes = Vec::new();
    for (index, event) in common::order_events().iter().enumerate() {
        envelopes.push(Envelope::new::<OrderAggregate>(
            &order,
            index as u64 + 1,
            event,
            &meta,
            at(),
        ));
    }
    for (index, event) in common::payment_events().iter().enumerate() {
        envelopes.push(Envelope::new::<PaymentAggregate>(
            &order,
            index as u64 + 1,
            event,
            &meta,
            at(),
        ));
    }
    for (index, event) in common::stock_events().iter().enumerate() {
        envelopes.push(Envelope::new::<StockAggregate>(
            "SKU-1",
            index as u64 + 1,
            event,
            &meta,
            at(),
        ));
    }
    for (index, event) in common::customer_events().iter().enumerate() {
        envelopes.push(Envelope::new::<CustomerAggregate>(
            "0196a000-0000-7000-8000-0000000000c1",
            index as u64 + 1,
            event,
            &meta,
            at(),
        ));
    }
    envelopes
}

#[track_caller]
fn parse(envelope: &Envelope) -> Event {
    serde_json::from_slice::<Event>(&envelope.to_json_bytes()).unwrap_or_else(|error| {
        panic!(
            "the CloudEvents SDK refuses our {}: {error}",
            envelope.event_type
        )
    })
}

fn extension_names(event: &Event) -> Vec<&str> {
    let mut names: Vec<&str> = event.iter_extensions().map(|(name, _)| name).collect();
    names.sort_unstable();
    names
}

#[track_caller]
fn string_extension(event: &Event, name: &str) -> String {
    match event.extension(name) {
        Some(ExtensionValue::String(value)) => value.clone(),
        other => panic!("extension {name} should be a string, got {other:?}"),
    }
}

#[track_caller]
fn integer_extension(event: &Event, name: &str) -> i64 {
    match event.extension(name) {
        Some(ExtensionValue::Integer(value)) => *value,
        other => panic!("extension {name} should be an integer, got {other:?}"),
    }
}

#[test]
fn the_cloudevents_sdk_reads_every_attribute_of_every_event_type() {
    for envelope in envelopes() {
        let event = parse(&envelope);
        assert_eq!(event.specversion(), SpecVersion::V10);
        assert_eq!(event.id(), envelope.event_id.to_string());
        assert_eq!(
            event.source(),
            &format!("/fulfilment/{}", envelope.aggregate_type)
        );
        assert_eq!(event.ty(), envelope.event_type);
        assert_eq!(event.subject(), Some(envelope.aggregate_id.as_str()));
        assert_eq!(event.time(), Some(&envelope.occurred_at));
        assert_eq!(event.datacontenttype(), Some("application/json"));
        assert_eq!(event.dataschema(), None);
        assert_eq!(event.data(), Some(&Data::Json(envelope.data.clone())));

        assert_eq!(
            string_extension(&event, "aggregatetype"),
            envelope.aggregate_type
        );
        assert_eq!(
            integer_extension(&event, "aggregateversion"),
            i64::try_from(envelope.aggregate_version).expect("small version")
        );
        assert_eq!(
            integer_extension(&event, "schemaversion"),
            i64::from(envelope.schema_version)
        );
        assert_eq!(string_extension(&event, "correlationid"), "corr-42");
        assert_eq!(
            string_extension(&event, "causationid"),
            "0196a000-0000-7000-8000-0000000000e1"
        );
        assert_eq!(
            string_extension(&event, "commandid"),
            envelope.command_id.to_string()
        );
        assert_eq!(string_extension(&event, "actor"), "saga:fulfilment");
        assert_eq!(string_extension(&event, "requesthash"), "sha256:abcdef");
        assert_eq!(
            string_extension(&event, "traceparent"),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(string_extension(&event, "tracestate"), "vendor=opaque");
        assert_eq!(
            extension_names(&event),
            [
                "actor",
                "aggregatetype",
                "aggregateversion",
                "causationid",
                "commandid",
                "correlationid",
                "requesthash",
                "schemaversion",
                "traceparent",
                "tracestate",
            ],
            "no attribute beyond the ones we mean to write"
        );
    }
}

#[test]
fn optional_metadata_left_out_is_absent_for_the_sdk_too() {
    let event = &common::stock_events()[0];
    let envelope =
        Envelope::new::<StockAggregate>("SKU-1", 1, event, &CommandMeta::new("alice"), at());
    let parsed = parse(&envelope);
    for absent in ["requesthash", "traceparent", "tracestate"] {
        assert_eq!(parsed.extension(absent), None, "{absent}");
    }
    assert_eq!(parsed.iter_extensions().count(), 7);
}

#[test]
fn an_event_written_back_by_the_sdk_reads_as_the_same_envelope() {
    // Tooling that re-emits our events (a router, a dead-letter store) must not make them
    // unreadable: the SDK's own serialisation reads back to the same envelope.
    for envelope in envelopes() {
        let rewritten = serde_json::to_vec(&parse(&envelope)).expect("the SDK serialises");
        assert_eq!(
            Envelope::from_json_bytes(&rewritten).as_ref(),
            Ok(&envelope),
            "{}",
            String::from_utf8_lossy(&rewritten)
        );
    }
}

/// CloudEvents 1.0, "Attribute Naming Convention": names MUST consist of lower-case letters
/// ('a' to 'z') or digits ('0' to '9') and SHOULD NOT exceed 20 characters. "Type System":
/// an Integer is within the signed 32-bit range; required attributes are non-empty strings.
#[test]
fn the_json_keeps_the_spec_rules_the_sdk_does_not_enforce() {
    for envelope in envelopes() {
        let json = envelope.to_json();
        let Value::Object(attributes) = &json else {
            panic!("an envelope is a JSON object");
        };
        for (name, value) in attributes {
            if name == "data" {
                continue;
            }
            assert!(
                !name.is_empty()
                    && name.len() <= 20
                    && name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
                "attribute name {name:?} breaks the naming rule"
            );
            match value {
                Value::String(text) => assert!(!text.is_empty(), "{name} is empty"),
                Value::Number(number) => {
                    let integer = number.as_i64().expect("an integer");
                    assert!(
                        i32::try_from(integer).is_ok(),
                        "{name} = {integer} is beyond the CloudEvents Integer range"
                    );
                }
                other => panic!("{name} = {other} is not a CloudEvents attribute type"),
            }
        }
        for required in ["specversion", "id", "source", "type"] {
            assert!(attributes.contains_key(required), "{required} is required");
        }
    }
}
