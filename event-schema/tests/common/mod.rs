//! Events decided by the aggregates themselves, shared by the test binaries.
//!
//! Each test file is its own binary and uses only part of this module.
#![allow(dead_code)]

use chrono::{DateTime, TimeZone, Utc};
use domain::Aggregate;
use domain::customer::{CustomerAggregate, CustomerCommand, CustomerEvent, Sealed};
use domain::order::{OrderAggregate, OrderCommand, OrderEvent, OrderLine, PlaceOrder};
use domain::payment::{PaymentAggregate, PaymentCommand, PaymentEvent, ProviderAnswer};
use domain::stock::{StockAggregate, StockCommand, StockEvent};
use domain::{Currency, CustomerId, Decision, Money, OrderId, PaymentToken, Quantity, Sku};
use event_schema::CommandMeta;
use uuid::Uuid;

/// The event `command` yields against `history`; panics if it yields none.
#[track_caller]
pub fn decided<A: Aggregate>(history: &[&A::Event], command: A::Command) -> A::Event {
    match A::decide(&A::fold(history.iter().copied()), &command) {
        Ok(Decision::Append(event)) => event,
        other => panic!("{command:?} should append an event, got {other:?}"),
    }
}

pub fn order_id() -> OrderId {
    OrderId(Uuid::from_u128(0x0196_0000_0000_7000_8000_0000_0000_0001))
}

pub fn eur() -> Currency {
    "EUR".parse().expect("EUR is ISO 4217")
}

pub fn sku(raw: &str) -> Sku {
    Sku::parse(raw).expect("a valid sku")
}

pub fn quantity(units: u32) -> Quantity {
    Quantity::new(units).expect("a positive quantity")
}

pub fn place_order() -> OrderCommand {
    OrderCommand::Place(PlaceOrder {
        order_id: order_id(),
        customer_id: CustomerId::parse("customer-7").expect("a valid customer id"),
        currency: eur(),
        payment_token: PaymentToken::parse("tok_visa.4242").expect("a valid token"),
        lines: vec![
            OrderLine {
                sku: sku("SKU-1"),
                quantity: quantity(2),
                unit_price_minor: 1250,
            },
            OrderLine {
                sku: sku("SKU-2"),
                quantity: quantity(1),
                unit_price_minor: 499,
            },
        ],
    })
}

/// One of each order event type, each decided by the order aggregate.
pub fn order_events() -> Vec<OrderEvent> {
    type A = OrderAggregate;
    let placed = decided::<A>(&[], place_order());
    let confirmed = decided::<A>(&[&placed], OrderCommand::Confirm);
    let shipped = decided::<A>(&[&placed, &confirmed], OrderCommand::Ship);
    let cancelled = decided::<A>(
        &[&placed, &confirmed],
        OrderCommand::Cancel { reason: None },
    );
    let rejected = decided::<A>(
        &[&placed],
        OrderCommand::Reject {
            reason: "stock unavailable for SKU-2".into(),
        },
    );
    vec![placed, confirmed, shipped, cancelled, rejected]
}

/// One of each payment event type, each decided by the payment aggregate.
pub fn payment_events() -> Vec<PaymentEvent> {
    type A = PaymentAggregate;
    let authorise = |answer| PaymentCommand::Authorise {
        order_id: order_id(),
        amount: Money::new(2999, eur()),
        token: PaymentToken::parse("tok_visa.4242").expect("a valid token"),
        answer,
    };
    let authorised = decided::<A>(
        &[],
        authorise(ProviderAnswer::Approved {
            authorisation_id: "auth-123".into(),
        }),
    );
    let declined = decided::<A>(
        &[],
        authorise(ProviderAnswer::Declined {
            reason: "insufficient funds".into(),
        }),
    );
    let captured = decided::<A>(&[&authorised], PaymentCommand::Capture { amount: None });
    let refunded = decided::<A>(
        &[&authorised, &captured],
        PaymentCommand::Refund {
            amount: Money::new(1000, eur()),
            reason: "one item returned".into(),
        },
    );
    let voided = decided::<A>(
        &[&authorised],
        PaymentCommand::Void {
            reason: "order cancelled".into(),
        },
    );
    vec![authorised, declined, captured, refunded, voided]
}

/// One of each stock event type, each decided by the stock aggregate.
pub fn stock_events() -> Vec<StockEvent> {
    type A = StockAggregate;
    let received = decided::<A>(
        &[],
        StockCommand::Receive {
            quantity: quantity(10),
        },
    );
    let adjusted = decided::<A>(
        &[&received],
        StockCommand::Adjust {
            delta: -2,
            reason: "damaged in the warehouse".into(),
        },
    );
    let reserved = decided::<A>(
        &[&received],
        StockCommand::Reserve {
            order_id: order_id(),
            quantity: quantity(3),
        },
    );
    let rejected = decided::<A>(
        &[&received],
        StockCommand::Reserve {
            order_id: order_id(),
            quantity: quantity(11),
        },
    );
    let released = decided::<A>(
        &[&received, &reserved],
        StockCommand::Release {
            order_id: order_id(),
        },
    );
    let committed = decided::<A>(
        &[&received, &reserved],
        StockCommand::Commit {
            order_id: order_id(),
        },
    );
    vec![received, adjusted, reserved, rejected, released, committed]
}

/// A sealed field as the customer service writes it (the tests here need its form only).
pub fn sealed(fill: char) -> Sealed {
    Sealed::parse(&format!(
        "{}{}",
        Sealed::PREFIX,
        fill.to_string().repeat(64)
    ))
    .expect("the sealed form")
}

pub fn customer_events() -> Vec<CustomerEvent> {
    type A = CustomerAggregate;
    let registered = decided::<A>(
        &[],
        CustomerCommand::Register {
            customer_id: CustomerId::parse("0196a000-0000-7000-8000-0000000000c1")
                .expect("a customer id"),
            name: sealed('n'),
            email: sealed('e'),
        },
    );
    let changed = decided::<A>(
        &[&registered],
        CustomerCommand::ChangeEmail { email: sealed('f') },
    );
    let erased = decided::<A>(&[&registered, &changed], CustomerCommand::Erase);
    vec![registered, changed, erased]
}

/// Metadata of a command caused by an earlier event, with trace context: every field set.
pub fn full_meta() -> CommandMeta {
    CommandMeta {
        command_id: Uuid::from_u128(0x0196_0000_0000_7000_8000_0000_0000_00c0),
        correlation_id: "corr-42".into(),
        causation_id: Some("0196a000-0000-7000-8000-0000000000e1".into()),
        actor: "saga:fulfilment".into(),
        request_hash: Some("sha256:abcdef".into()),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        tracestate: Some("vendor=opaque".into()),
    }
}

/// A fixed instant with sub-second precision, to catch a lossy time encoding.
pub fn at() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 21, 10, 0, 0)
        .single()
        .expect("a valid instant")
        + chrono::Duration::microseconds(123_456)
}
