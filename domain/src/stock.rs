//! One stock item per SKU: units on hand, and reservations held for orders against them.
//!
//! `available = on_hand − reserved`, and the rules keep `reserved ≤ on_hand`, so available is
//! never negative. A reservation is one order's claim on some units; it is either released
//! (the order did not go ahead) or committed (the order shipped: the units leave on hand).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::aggregate::{Aggregate, Decision};
use crate::values::{OrderId, Quantity};

/// The longest adjustment reason kept in the log.
pub const MAX_REASON_LEN: usize = 500;

// ---------------------------------------------------------------------------------------------
// Commands

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StockCommand {
    Receive {
        quantity: Quantity,
    },
    /// A correction of the count on hand (damage, stock-take), positive or negative.
    Adjust {
        delta: i64,
        reason: String,
    },
    Reserve {
        order_id: OrderId,
        quantity: Quantity,
    },
    Release {
        order_id: OrderId,
    },
    Commit {
        order_id: OrderId,
    },
}

// ---------------------------------------------------------------------------------------------
// Events

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StockReceived {
    pub quantity: Quantity,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StockAdjusted {
    pub delta: i64,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StockReserved {
    pub order_id: OrderId,
    pub quantity: Quantity,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StockReservationRejected {
    pub order_id: OrderId,
    pub requested: Quantity,
    /// What was available when the reservation was refused.
    pub available: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StockReservationReleased {
    pub order_id: OrderId,
    pub quantity: Quantity,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StockReservationCommitted {
    pub order_id: OrderId,
    pub quantity: Quantity,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StockEvent {
    Received(StockReceived),
    Adjusted(StockAdjusted),
    Reserved(StockReserved),
    ReservationRejected(StockReservationRejected),
    ReservationReleased(StockReservationReleased),
    ReservationCommitted(StockReservationCommitted),
}

// ---------------------------------------------------------------------------------------------
// State

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StockItem {
    pub on_hand: u64,
    pub reserved: u64,
    /// The reservations currently held, by order.
    pub reservations: BTreeMap<OrderId, Quantity>,
}

impl StockItem {
    pub fn available(&self) -> u64 {
        self.on_hand.saturating_sub(self.reserved)
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StockError {
    #[error("adjustment must not be zero")]
    ZeroAdjustment,
    #[error("reason must not be empty")]
    EmptyReason,
    #[error("reason must be at most {MAX_REASON_LEN} characters")]
    ReasonTooLong,
    #[error("adjustment would leave {on_hand_after} on hand, below the {reserved} reserved")]
    BelowReserved { on_hand_after: i128, reserved: u64 },
    #[error("stock level would be too large")]
    Overflow,
    #[error("no reservation is held for order {0}")]
    NoReservation(OrderId),
}

// ---------------------------------------------------------------------------------------------
// Rules

/// The stock item aggregate.
#[derive(Debug)]
pub enum StockAggregate {}

impl Aggregate for StockAggregate {
    const TYPE: &'static str = "stock";
    type State = StockItem;
    type Command = StockCommand;
    type Event = StockEvent;
    type Error = StockError;

    fn decide(
        item: &StockItem,
        command: &StockCommand,
    ) -> Result<Decision<StockEvent>, StockError> {
        let event = match command {
            StockCommand::Receive { quantity } => {
                item.on_hand
                    .checked_add(u64::from(quantity.get()))
                    .ok_or(StockError::Overflow)?;
                StockEvent::Received(StockReceived {
                    quantity: *quantity,
                })
            }
            StockCommand::Adjust { delta, reason } => {
                if *delta == 0 {
                    return Err(StockError::ZeroAdjustment);
                }
                let reason = reason.trim();
                if reason.is_empty() {
                    return Err(StockError::EmptyReason);
                }
                if reason.chars().count() > MAX_REASON_LEN {
                    return Err(StockError::ReasonTooLong);
                }
                let on_hand_after = i128::from(item.on_hand) + i128::from(*delta);
                if on_hand_after < i128::from(item.reserved) {
                    return Err(StockError::BelowReserved {
                        on_hand_after,
                        reserved: item.reserved,
                    });
                }
                if on_hand_after > i128::from(u64::MAX) {
                    return Err(StockError::Overflow);
                }
                StockEvent::Adjusted(StockAdjusted {
                    delta: *delta,
                    reason: reason.to_owned(),
                })
            }
            StockCommand::Reserve { order_id, quantity } => {
                // A second reservation for the same order reports the one already held.
                if item.reservations.contains_key(order_id) {
                    return Ok(Decision::Unchanged);
                }
                if u64::from(quantity.get()) <= item.available() {
                    StockEvent::Reserved(StockReserved {
                        order_id: *order_id,
                        quantity: *quantity,
                    })
                } else {
                    StockEvent::ReservationRejected(StockReservationRejected {
                        order_id: *order_id,
                        requested: *quantity,
                        available: item.available(),
                    })
                }
            }
            StockCommand::Release { order_id } => match item.reservations.get(order_id) {
                Some(quantity) => StockEvent::ReservationReleased(StockReservationReleased {
                    order_id: *order_id,
                    quantity: *quantity,
                }),
                // Nothing held (never reserved, rejected, or already released): nothing to undo.
                None => return Ok(Decision::Unchanged),
            },
            StockCommand::Commit { order_id } => match item.reservations.get(order_id) {
                Some(quantity) => StockEvent::ReservationCommitted(StockReservationCommitted {
                    order_id: *order_id,
                    quantity: *quantity,
                }),
                None => return Err(StockError::NoReservation(*order_id)),
            },
        };
        Ok(Decision::Append(event))
    }

    fn evolve(mut item: StockItem, event: &StockEvent) -> StockItem {
        match event {
            StockEvent::Received(received) => {
                item.on_hand = item
                    .on_hand
                    .saturating_add(u64::from(received.quantity.get()));
            }
            StockEvent::Adjusted(adjusted) => {
                item.on_hand = item.on_hand.saturating_add_signed(adjusted.delta);
            }
            StockEvent::Reserved(reserved) => {
                item.reserved = item
                    .reserved
                    .saturating_add(u64::from(reserved.quantity.get()));
                item.reservations
                    .insert(reserved.order_id, reserved.quantity);
            }
            StockEvent::ReservationRejected(_) => {}
            StockEvent::ReservationReleased(released) => {
                if let Some(quantity) = item.reservations.remove(&released.order_id) {
                    item.reserved = item.reserved.saturating_sub(u64::from(quantity.get()));
                }
            }
            StockEvent::ReservationCommitted(committed) => {
                if let Some(quantity) = item.reservations.remove(&committed.order_id) {
                    let units = u64::from(quantity.get());
                    item.reserved = item.reserved.saturating_sub(units);
                    item.on_hand = item.on_hand.saturating_sub(units);
                }
            }
        }
        item
    }
}
