//! Old shapes become today's when read, at the envelope boundary, and anything that cannot be
//! read is an error, never a panic.

use domain::order::{OrderAggregate, OrderEvent, OrderLine, OrderPlaced};
use domain::{CustomerId, OrderId, PaymentToken, Quantity, Sku};
use event_schema::catalog;
use event_schema::upcast::{self, UPCASTERS};
use event_schema::{DecodeError, Envelope};
use serde_json::{Value, json};
use uuid::Uuid;

const ORDER: &str = "0196a000-0000-7000-8000-000000000001";

/// An `order.placed` v1 event as it was written to the log before v2 existed.
fn stored(schema_version: u16, event_type: &str, data: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "specversion": "1.0",
        "id": "0196a000-0000-7000-8000-0000000000aa",
        "source": "/fulfilment/order",
        "type": event_type,
        "subject": ORDER,
        "time": "2025-03-01T09:30:00Z",
        "datacontenttype": "application/json",
        "data": data,
        "aggregatetype": "order",
        "aggregateversion": 1,
        "schemaversion": schema_version,
        "correlationid": "corr-1",
        "causationid": "0196a000-0000-7000-8000-0000000000cc",
        "commandid": "0196a000-0000-7000-8000-0000000000cc",
        "actor": "customer-7"
    }))
    .expect("serialisable")
}

fn v1_data() -> Value {
    json!({
        "order_id": ORDER,
        "customer": "customer-7",
        "currency": "EUR",
        "lines": [
            { "sku": "SKU-1", "quantity": 2, "price_minor": 1250 },
            { "sku": "SKU-2", "quantity": 3, "price_minor": 499 }
        ],
        "payment_token": "tok_visa.4242"
    })
}

#[test]
fn a_stored_v1_order_placed_is_read_as_v2() {
    let envelope = Envelope::from_json_bytes(&stored(1, "order.placed", v1_data()))
        .expect("a v1 order.placed reads");
    assert_eq!(envelope.schema_version, 2);
    assert_eq!(
        envelope.data,
        json!({
            "order_id": ORDER,
            "customer_id": "customer-7",
            "currency": "EUR",
            "lines": [
                { "sku": "SKU-1", "quantity": 2, "unit_price_minor": 1250 },
                { "sku": "SKU-2", "quantity": 3, "unit_price_minor": 499 }
            ],
            "total_minor": 2 * 1250 + 3 * 499,
            "payment_token": "tok_visa.4242"
        })
    );
    let line = |sku: &str, units, price| OrderLine {
        sku: Sku::parse(sku).expect("sku"),
        quantity: Quantity::new(units).expect("quantity"),
        unit_price_minor: price,
    };
    assert_eq!(
        envelope.event::<OrderAggregate>(),
        Ok(OrderEvent::Placed(OrderPlaced {
            order_id: OrderId(Uuid::parse_str(ORDER).expect("uuid")),
            customer_id: CustomerId::parse("customer-7").expect("customer"),
            currency: "EUR".parse().expect("currency"),
            lines: vec![line("SKU-1", 2, 1250), line("SKU-2", 3, 499)],
            total_minor: 3997,
            payment_token: PaymentToken::parse("tok_visa.4242").expect("token"),
        }))
    );
}

#[test]
fn the_envelope_around_an_upcast_event_is_kept() {
    let envelope = Envelope::from_json_bytes(&stored(1, "order.placed", v1_data()))
        .expect("a v1 order.placed reads");
    assert_eq!(envelope.aggregate_id, ORDER);
    assert_eq!(envelope.aggregate_version, 1);
    assert_eq!(envelope.event_type, "order.placed");
    assert_eq!(envelope.actor, "customer-7");
    assert_eq!(
        envelope.occurred_at.to_rfc3339(),
        "2025-03-01T09:30:00+00:00"
    );
}

#[test]
fn a_current_version_is_read_untouched() {
    let v2 = json!({
        "order_id": ORDER, "customer_id": "c", "currency": "EUR", "lines": [],
        "total_minor": 0, "payment_token": "t"
    });
    let envelope =
        Envelope::from_json_bytes(&stored(2, "order.placed", v2.clone())).expect("v2 reads");
    assert_eq!((envelope.schema_version, envelope.data), (2, v2));
    for ty in catalog::ALL {
        assert_eq!(
            upcast::to_current(ty.name, ty.version, json!({"any": "thing"})),
            Ok((ty.version, json!({"any": "thing"}))),
            "{} v{} is current",
            ty.name,
            ty.version
        );
    }
}

#[test]
fn an_unknown_schema_version_is_an_error() {
    for version in [99, 3, 0] {
        assert_eq!(
            Envelope::from_json_bytes(&stored(version, "order.placed", v1_data())),
            Err(DecodeError::UnknownSchemaVersion {
                event_type: "order.placed".into(),
                version,
                newest: 2,
            })
        );
    }
}

#[test]
fn an_unknown_event_type_is_an_error() {
    assert_eq!(
        Envelope::from_json_bytes(&stored(1, "order.teleported", v1_data())),
        Err(DecodeError::UnknownEventType("order.teleported".into()))
    );
}

#[test]
fn a_v1_that_does_not_match_its_legacy_shape_is_invalid_data() {
    let mut missing_price = v1_data();
    missing_price["lines"][0]
        .as_object_mut()
        .map(|line| line.remove("price_minor"));
    let mut already_v2 = v1_data();
    already_v2["customer_id"] = json!("customer-7");
    let mut wrong_type = v1_data();
    wrong_type["lines"][1]["quantity"] = json!("three");
    let overflowing = json!({
        "order_id": ORDER, "customer": "c", "currency": "EUR", "payment_token": "t",
        "lines": [{ "sku": "S", "quantity": 4_000_000_000u32, "price_minor": i64::MAX / 2 }]
    });
    for (case, data) in [
        ("a line without price_minor", missing_price),
        ("an unknown field", already_v2),
        ("a quantity that is not a number", wrong_type),
        ("a total that overflows", overflowing),
        ("not an object", json!("order")),
        ("null", Value::Null),
    ] {
        match Envelope::from_json_bytes(&stored(1, "order.placed", data)) {
            Err(DecodeError::InvalidData {
                event_type,
                message,
            }) => {
                assert_eq!(event_type, "order.placed v1", "{case}");
                assert!(!message.is_empty(), "{case}");
            }
            other => panic!("{case}: expected InvalidData, got {other:?}"),
        }
    }
}

#[test]
fn a_v1_whose_values_today_refuses_upcasts_but_does_not_decode() {
    // v1 stored plain strings; v2 parses them. Such an event reads as an envelope, and decoding it
    // is an error the reader can park, not a panic.
    let mut data = v1_data();
    data["customer"] = json!("Ada Lovelace");
    let envelope =
        Envelope::from_json_bytes(&stored(1, "order.placed", data)).expect("the upcast succeeds");
    assert!(matches!(
        envelope.event::<OrderAggregate>(),
        Err(DecodeError::InvalidData { event_type, .. }) if event_type == "order.placed"
    ));
}

#[test]
fn every_released_version_below_the_current_one_has_an_upcaster() {
    for ty in catalog::ALL {
        for version in 1..ty.version {
            assert!(
                UPCASTERS
                    .iter()
                    .any(|step| step.event_type == ty.name && step.from_version == version),
                "no upcaster for {} v{version}",
                ty.name
            );
        }
    }
    for step in UPCASTERS {
        let current = catalog::current_version(step.event_type).expect("a known type");
        assert!(
            step.from_version < current,
            "{} v{} is current and cannot be upcast",
            step.event_type,
            step.from_version
        );
    }
}
