//! The upcaster chain: old shapes of stored events become today's shape when read, here at the
//! event-schema boundary, so nothing downstream ever sees an old shape.
//!
//! An upcaster turns version `n` of one event type into version `n + 1`; reading applies them
//! one after another up to the current version in [`crate::catalog`]. Events are immutable, so
//! the log keeps the old bytes forever: an upcaster, once released, is never removed.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::catalog;
use crate::envelope::DecodeError;

/// One step of the chain.
#[derive(Debug, Clone, Copy)]
pub struct Upcaster {
    pub event_type: &'static str,
    pub from_version: u16,
    pub upcast: fn(Value) -> Result<Value, String>,
}

/// Every upcaster ever released.
pub const UPCASTERS: &[Upcaster] = &[Upcaster {
    event_type: "order.placed",
    from_version: 1,
    upcast: order_placed_v1_to_v2,
}];

/// Brings `data` of `event_type` at `version` to the current schema version.
pub fn to_current(
    event_type: &str,
    version: u16,
    mut data: Value,
) -> Result<(u16, Value), DecodeError> {
    let newest = catalog::current_version(event_type)
        .ok_or_else(|| DecodeError::UnknownEventType(event_type.to_owned()))?;
    if version == 0 || version > newest {
        return Err(DecodeError::UnknownSchemaVersion {
            event_type: event_type.to_owned(),
            version,
            newest,
        });
    }
    let mut current = version;
    while current < newest {
        let step = UPCASTERS
            .iter()
            .find(|step| step.event_type == event_type && step.from_version == current)
            .ok_or_else(|| DecodeError::MissingUpcaster {
                event_type: event_type.to_owned(),
                version: current,
            })?;
        data = (step.upcast)(data).map_err(|message| DecodeError::InvalidData {
            event_type: format!("{event_type} v{current}"),
            message,
        })?;
        current += 1;
    }
    Ok((current, data))
}

/// The shapes of earlier schema versions, kept so their JSON Schemas stay checked in and the
/// upcasters are tested against them.
pub mod legacy {
    use super::*;

    /// `order.placed` v1: the customer was `customer`, a line's price was `price_minor`, and
    /// the total was not stored.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct OrderPlacedV1 {
        pub order_id: uuid::Uuid,
        pub customer: String,
        pub currency: String,
        pub lines: Vec<OrderLineV1>,
        pub payment_token: String,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct OrderLineV1 {
        pub sku: String,
        pub quantity: u32,
        pub price_minor: i64,
    }
}

/// `order.placed` v1 → v2: `customer` → `customer_id`, `price_minor` → `unit_price_minor`, and
/// `total_minor` computed from the lines.
fn order_placed_v1_to_v2(data: Value) -> Result<Value, String> {
    let v1: legacy::OrderPlacedV1 =
        serde_json::from_value(data).map_err(|error| error.to_string())?;
    let mut total: i64 = 0;
    let mut lines = Vec::with_capacity(v1.lines.len());
    for line in &v1.lines {
        total = line
            .price_minor
            .checked_mul(i64::from(line.quantity))
            .and_then(|amount| total.checked_add(amount))
            .ok_or("order total overflows")?;
        lines.push(serde_json::json!({
            "sku": line.sku,
            "quantity": line.quantity,
            "unit_price_minor": line.price_minor,
        }));
    }
    Ok(serde_json::json!({
        "order_id": v1.order_id,
        "customer_id": v1.customer,
        "currency": v1.currency,
        "lines": lines,
        "total_minor": total,
        "payment_token": v1.payment_token,
    }))
}
