//! Every event type's stable name and current schema version, and how each aggregate's events
//! are encoded to and decoded from JSON data.
//!
//! Names are written by hand and never derived from Rust type names, so renaming a variant
//! never renames history. Bump a `version` only together with an upcaster from the previous
//! version (see [`crate::upcast`]) and a new checked-in schema (see [`crate::schema`]).

use domain::Aggregate;
use domain::customer::{CustomerAggregate, CustomerEvent};
use domain::order::{OrderAggregate, OrderEvent};
use domain::payment::{PaymentAggregate, PaymentEvent};
use domain::stock::{StockAggregate, StockEvent};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::envelope::DecodeError;

/// A stored event type: its name and the schema version written today.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventType {
    pub name: &'static str,
    pub version: u16,
}

const fn ty(name: &'static str, version: u16) -> EventType {
    EventType { name, version }
}

pub const ORDER_PLACED: EventType = ty("order.placed", 2);
pub const ORDER_CONFIRMED: EventType = ty("order.confirmed", 1);
pub const ORDER_REJECTED: EventType = ty("order.rejected", 1);
pub const ORDER_CANCELLED: EventType = ty("order.cancelled", 1);
pub const ORDER_SHIPPED: EventType = ty("order.shipped", 1);

pub const PAYMENT_AUTHORISED: EventType = ty("payment.authorised", 1);
pub const PAYMENT_DECLINED: EventType = ty("payment.declined", 1);
pub const PAYMENT_CAPTURED: EventType = ty("payment.captured", 1);
pub const PAYMENT_REFUNDED: EventType = ty("payment.refunded", 1);
pub const PAYMENT_VOIDED: EventType = ty("payment.voided", 1);

pub const STOCK_RECEIVED: EventType = ty("stock.received", 1);
pub const STOCK_ADJUSTED: EventType = ty("stock.adjusted", 1);
pub const STOCK_RESERVED: EventType = ty("stock.reserved", 1);
pub const STOCK_RESERVATION_REJECTED: EventType = ty("stock.reservation_rejected", 1);
pub const STOCK_RESERVATION_RELEASED: EventType = ty("stock.reservation_released", 1);
pub const STOCK_RESERVATION_COMMITTED: EventType = ty("stock.reservation_committed", 1);

pub const CUSTOMER_REGISTERED: EventType = ty("customer.registered", 1);
pub const CUSTOMER_EMAIL_CHANGED: EventType = ty("customer.email_changed", 1);
pub const CUSTOMER_ERASED: EventType = ty("customer.erased", 1);

/// Every event type of every aggregate, at its current version.
pub const ALL: &[EventType] = &[
    CUSTOMER_REGISTERED,
    CUSTOMER_EMAIL_CHANGED,
    CUSTOMER_ERASED,
    ORDER_PLACED,
    ORDER_CONFIRMED,
    ORDER_REJECTED,
    ORDER_CANCELLED,
    ORDER_SHIPPED,
    PAYMENT_AUTHORISED,
    PAYMENT_DECLINED,
    PAYMENT_CAPTURED,
    PAYMENT_REFUNDED,
    PAYMENT_VOIDED,
    STOCK_RECEIVED,
    STOCK_ADJUSTED,
    STOCK_RESERVED,
    STOCK_RESERVATION_REJECTED,
    STOCK_RESERVATION_RELEASED,
    STOCK_RESERVATION_COMMITTED,
];

/// The current schema version of a named event type.
pub fn current_version(name: &str) -> Option<u16> {
    ALL.iter().find(|ty| ty.name == name).map(|ty| ty.version)
}

/// How an aggregate's events travel as JSON data. `decode` sees only current shapes: the
/// envelope upcasts before calling it.
pub trait EventCodec: Aggregate {
    /// The event types this aggregate writes.
    const EVENT_TYPES: &'static [EventType];

    fn event_type(event: &Self::Event) -> EventType;

    fn encode(event: &Self::Event) -> Value;

    fn decode(event_type: &str, data: Value) -> Result<Self::Event, DecodeError>;
}

fn to_value<T: Serialize>(payload: &T) -> Value {
    // Every event payload is a plain struct of strings, numbers and lists: serialising it to a
    // `Value` cannot fail.
    serde_json::to_value(payload).unwrap_or(Value::Null)
}

fn from_value<T: DeserializeOwned>(event_type: &str, data: Value) -> Result<T, DecodeError> {
    serde_json::from_value(data).map_err(|source| DecodeError::InvalidData {
        event_type: event_type.to_owned(),
        message: source.to_string(),
    })
}

fn unknown(event_type: &str) -> DecodeError {
    DecodeError::UnknownEventType(event_type.to_owned())
}

impl EventCodec for OrderAggregate {
    const EVENT_TYPES: &'static [EventType] = &[
        ORDER_PLACED,
        ORDER_CONFIRMED,
        ORDER_REJECTED,
        ORDER_CANCELLED,
        ORDER_SHIPPED,
    ];

    fn event_type(event: &OrderEvent) -> EventType {
        match event {
            OrderEvent::Placed(_) => ORDER_PLACED,
            OrderEvent::Confirmed(_) => ORDER_CONFIRMED,
            OrderEvent::Rejected(_) => ORDER_REJECTED,
            OrderEvent::Cancelled(_) => ORDER_CANCELLED,
            OrderEvent::Shipped(_) => ORDER_SHIPPED,
        }
    }

    fn encode(event: &OrderEvent) -> Value {
        match event {
            OrderEvent::Placed(e) => to_value(e),
            OrderEvent::Confirmed(e) => to_value(e),
            OrderEvent::Rejected(e) => to_value(e),
            OrderEvent::Cancelled(e) => to_value(e),
            OrderEvent::Shipped(e) => to_value(e),
        }
    }

    fn decode(event_type: &str, data: Value) -> Result<OrderEvent, DecodeError> {
        Ok(match event_type {
            "order.placed" => OrderEvent::Placed(from_value(event_type, data)?),
            "order.confirmed" => OrderEvent::Confirmed(from_value(event_type, data)?),
            "order.rejected" => OrderEvent::Rejected(from_value(event_type, data)?),
            "order.cancelled" => OrderEvent::Cancelled(from_value(event_type, data)?),
            "order.shipped" => OrderEvent::Shipped(from_value(event_type, data)?),
            other => return Err(unknown(other)),
        })
    }
}

impl EventCodec for PaymentAggregate {
    const EVENT_TYPES: &'static [EventType] = &[
        PAYMENT_AUTHORISED,
        PAYMENT_DECLINED,
        PAYMENT_CAPTURED,
        PAYMENT_REFUNDED,
        PAYMENT_VOIDED,
    ];

    fn event_type(event: &PaymentEvent) -> EventType {
        match event {
            PaymentEvent::Authorised(_) => PAYMENT_AUTHORISED,
            PaymentEvent::Declined(_) => PAYMENT_DECLINED,
            PaymentEvent::Captured(_) => PAYMENT_CAPTURED,
            PaymentEvent::Refunded(_) => PAYMENT_REFUNDED,
            PaymentEvent::Voided(_) => PAYMENT_VOIDED,
        }
    }

    fn encode(event: &PaymentEvent) -> Value {
        match event {
            PaymentEvent::Authorised(e) => to_value(e),
            PaymentEvent::Declined(e) => to_value(e),
            PaymentEvent::Captured(e) => to_value(e),
            PaymentEvent::Refunded(e) => to_value(e),
            PaymentEvent::Voided(e) => to_value(e),
        }
    }

    fn decode(event_type: &str, data: Value) -> Result<PaymentEvent, DecodeError> {
        Ok(match event_type {
            "payment.authorised" => PaymentEvent::Authorised(from_value(event_type, data)?),
            "payment.declined" => PaymentEvent::Declined(from_value(event_type, data)?),
            "payment.captured" => PaymentEvent::Captured(from_value(event_type, data)?),
            "payment.refunded" => PaymentEvent::Refunded(from_value(event_type, data)?),
            "payment.voided" => PaymentEvent::Voided(from_value(event_type, data)?),
            other => return Err(unknown(other)),
        })
    }
}

impl EventCodec for StockAggregate {
    const EVENT_TYPES: &'static [EventType] = &[
        STOCK_RECEIVED,
        STOCK_ADJUSTED,
        STOCK_RESERVED,
        STOCK_RESERVATION_REJECTED,
        STOCK_RESERVATION_RELEASED,
        STOCK_RESERVATION_COMMITTED,
    ];

    fn event_type(event: &StockEvent) -> EventType {
        match event {
            StockEvent::Received(_) => STOCK_RECEIVED,
            StockEvent::Adjusted(_) => STOCK_ADJUSTED,
            StockEvent::Reserved(_) => STOCK_RESERVED,
            StockEvent::ReservationRejected(_) => STOCK_RESERVATION_REJECTED,
            StockEvent::ReservationReleased(_) => STOCK_RESERVATION_RELEASED,
            StockEvent::ReservationCommitted(_) => STOCK_RESERVATION_COMMITTED,
        }
    }

    fn encode(event: &StockEvent) -> Value {
        match event {
            StockEvent::Received(e) => to_value(e),
            StockEvent::Adjusted(e) => to_value(e),
            StockEvent::Reserved(e) => to_value(e),
            StockEvent::ReservationRejected(e) => to_value(e),
            StockEvent::ReservationReleased(e) => to_value(e),
            StockEvent::ReservationCommitted(e) => to_value(e),
        }
    }

    fn decode(event_type: &str, data: Value) -> Result<StockEvent, DecodeError> {
        Ok(match event_type {
            "stock.received" => StockEvent::Received(from_value(event_type, data)?),
            "stock.adjusted" => StockEvent::Adjusted(from_value(event_type, data)?),
            "stock.reserved" => StockEvent::Reserved(from_value(event_type, data)?),
            "stock.reservation_rejected" => {
                StockEvent::ReservationRejected(from_value(event_type, data)?)
            }
            "stock.reservation_released" => {
                StockEvent::ReservationReleased(from_value(event_type, data)?)
            }
            "stock.reservation_committed" => {
                StockEvent::ReservationCommitted(from_value(event_type, data)?)
            }
            other => return Err(unknown(other)),
        })
    }
}

impl EventCodec for CustomerAggregate {
    const EVENT_TYPES: &'static [EventType] =
        &[CUSTOMER_REGISTERED, CUSTOMER_EMAIL_CHANGED, CUSTOMER_ERASED];

    fn event_type(event: &CustomerEvent) -> EventType {
        match event {
            CustomerEvent::Registered(_) => CUSTOMER_REGISTERED,
            CustomerEvent::EmailChanged(_) => CUSTOMER_EMAIL_CHANGED,
            CustomerEvent::Erased(_) => CUSTOMER_ERASED,
        }
    }

    fn encode(event: &CustomerEvent) -> Value {
        match event {
            CustomerEvent::Registered(e) => to_value(e),
            CustomerEvent::EmailChanged(e) => to_value(e),
            CustomerEvent::Erased(e) => to_value(e),
        }
    }

    fn decode(event_type: &str, data: Value) -> Result<CustomerEvent, DecodeError> {
        Ok(match event_type {
            "customer.registered" => CustomerEvent::Registered(from_value(event_type, data)?),
            "customer.email_changed" => CustomerEvent::EmailChanged(from_value(event_type, data)?),
            "customer.erased" => CustomerEvent::Erased(from_value(event_type, data)?),
            other => return Err(unknown(other)),
        })
    }
}
