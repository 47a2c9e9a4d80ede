//! The order: placed by a customer, then confirmed or rejected by the fulfilment saga, and
//! possibly cancelled by the customer (until it ships) or shipped.
//!
//! ```text
//!            confirm            ship
//! Pending ──────────► Confirmed ──────► Shipped
//!    │ ╲ reject           │
//!    │  ╲──────► Rejected │ cancel (refund + restock follow)
//!    │ cancel             ▼
//!    └──────────────► Cancelled
//! ```

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::aggregate::{Aggregate, Decision};
use crate::money::{Currency, Money};
use crate::values::{CustomerId, OrderId, PaymentToken, Quantity, Sku};

/// The most lines one order may carry; each line becomes one stock reservation.
pub const MAX_LINES: usize = 100;
/// The longest reason text kept in the log.
pub const MAX_REASON_LEN: usize = 500;

/// One line of an order. The unit price is in the order's currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OrderLine {
    pub sku: Sku,
    pub quantity: Quantity,
    /// Price of one unit in minor units of the order's currency.
    pub unit_price_minor: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Pending,
    Confirmed,
    Rejected,
    Cancelled,
    Shipped,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "pending",
            OrderStatus::Confirmed => "confirmed",
            OrderStatus::Rejected => "rejected",
            OrderStatus::Cancelled => "cancelled",
            OrderStatus::Shipped => "shipped",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Commands

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaceOrder {
    pub order_id: OrderId,
    pub customer_id: CustomerId,
    pub currency: Currency,
    pub payment_token: PaymentToken,
    pub lines: Vec<OrderLine>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderCommand {
    Place(PlaceOrder),
    /// Sent by the saga once stock is reserved and payment authorised.
    Confirm,
    /// Sent by the saga when stock or payment could not be had.
    Reject {
        reason: String,
    },
    /// Asked by the customer; allowed until the order ships.
    Cancel {
        reason: Option<String>,
    },
    Ship,
}

// ---------------------------------------------------------------------------------------------
// Events

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderPlaced {
    pub order_id: OrderId,
    pub customer_id: CustomerId,
    pub currency: Currency,
    pub lines: Vec<OrderLine>,
    /// Sum of quantity × unit price over the lines, in minor units.
    pub total_minor: i64,
    pub payment_token: PaymentToken,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderConfirmed {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderRejected {
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderCancelled {
    pub reason: String,
    /// The order had been confirmed, so its payment must be refunded and its stock released.
    pub was_confirmed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderShipped {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderEvent {
    Placed(OrderPlaced),
    Confirmed(OrderConfirmed),
    Rejected(OrderRejected),
    Cancelled(OrderCancelled),
    Shipped(OrderShipped),
}

// ---------------------------------------------------------------------------------------------
// State

/// An order that exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub order_id: OrderId,
    pub customer_id: CustomerId,
    pub currency: Currency,
    pub lines: Vec<OrderLine>,
    pub total: Money,
    pub payment_token: PaymentToken,
    pub status: OrderStatus,
    /// Why it was rejected or cancelled.
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum OrderState {
    #[default]
    NotPlaced,
    Placed(Order),
}

impl OrderState {
    pub fn order(&self) -> Option<&Order> {
        match self {
            OrderState::NotPlaced => None,
            OrderState::Placed(order) => Some(order),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("order does not exist")]
    NotFound,
    #[error("order has already been placed")]
    AlreadyPlaced,
    #[error("order must have at least one line")]
    NoLines,
    #[error("order must have at most {MAX_LINES} lines")]
    TooManyLines,
    #[error("sku {0} appears on more than one line")]
    DuplicateSku(Sku),
    #[error("unit price of {0} must not be negative")]
    NegativePrice(Sku),
    #[error("order total is too large")]
    TotalTooLarge,
    #[error("reason must not be empty")]
    EmptyReason,
    #[error("reason must be at most {MAX_REASON_LEN} characters")]
    ReasonTooLong,
    #[error("order has already been confirmed")]
    AlreadyConfirmed,
    #[error("order has been rejected")]
    Rejected,
    #[error("order has been cancelled")]
    Cancelled,
    #[error("order has already been shipped")]
    AlreadyShipped,
    #[error("order has not been confirmed yet")]
    NotConfirmed,
}

// ---------------------------------------------------------------------------------------------
// Rules

/// The order aggregate.
#[derive(Debug)]
pub enum OrderAggregate {}

impl Aggregate for OrderAggregate {
    const TYPE: &'static str = "order";
    type State = OrderState;
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;

    fn decide(
        state: &OrderState,
        command: &OrderCommand,
    ) -> Result<Decision<OrderEvent>, OrderError> {
        use OrderStatus::*;
        let order = match (state, command) {
            (OrderState::NotPlaced, OrderCommand::Place(place)) => return place_order(place),
            (OrderState::NotPlaced, _) => return Err(OrderError::NotFound),
            (OrderState::Placed(order), _) => order,
        };
        let event = match (command, order.status) {
            (OrderCommand::Place(_), _) => return Err(OrderError::AlreadyPlaced),

            (OrderCommand::Confirm, Pending) => OrderEvent::Confirmed(OrderConfirmed {}),
            (OrderCommand::Confirm, Confirmed | Shipped) => return Ok(Decision::Unchanged),
            (OrderCommand::Confirm, Rejected) => return Err(OrderError::Rejected),
            (OrderCommand::Confirm, Cancelled) => return Err(OrderError::Cancelled),

            (OrderCommand::Reject { reason }, Pending) => OrderEvent::Rejected(OrderRejected {
                reason: reason_text(reason)?,
            }),
            (OrderCommand::Reject { .. }, Rejected) => return Ok(Decision::Unchanged),
            (OrderCommand::Reject { .. }, Confirmed) => return Err(OrderError::AlreadyConfirmed),
            (OrderCommand::Reject { .. }, Cancelled) => return Err(OrderError::Cancelled),
            (OrderCommand::Reject { .. }, Shipped) => return Err(OrderError::AlreadyShipped),

            (OrderCommand::Cancel { reason }, Pending | Confirmed) => {
                let reason = match reason {
                    Some(reason) => reason_text(reason)?,
                    None => "cancelled by the customer".to_owned(),
                };
                OrderEvent::Cancelled(OrderCancelled {
                    reason,
                    was_confirmed: order.status == Confirmed,
                })
            }
            (OrderCommand::Cancel { .. }, Cancelled) => return Ok(Decision::Unchanged),
            (OrderCommand::Cancel { .. }, Rejected) => return Err(OrderError::Rejected),
            (OrderCommand::Cancel { .. }, Shipped) => return Err(OrderError::AlreadyShipped),

            (OrderCommand::Ship, Confirmed) => OrderEvent::Shipped(OrderShipped {}),
            (OrderCommand::Ship, Shipped) => return Ok(Decision::Unchanged),
            (OrderCommand::Ship, Pending) => return Err(OrderError::NotConfirmed),
            (OrderCommand::Ship, Rejected) => return Err(OrderError::Rejected),
            (OrderCommand::Ship, Cancelled) => return Err(OrderError::Cancelled),
        };
        Ok(Decision::Append(event))
    }

    fn evolve(state: OrderState, event: &OrderEvent) -> OrderState {
        match (state, event) {
            (_, OrderEvent::Placed(placed)) => OrderState::Placed(Order {
                order_id: placed.order_id,
                customer_id: placed.customer_id.clone(),
                currency: placed.currency,
                lines: placed.lines.clone(),
                total: Money::new(placed.total_minor, placed.currency),
                payment_token: placed.payment_token.clone(),
                status: OrderStatus::Pending,
                reason: None,
            }),
            // An event for an order that was never placed cannot be decided; if the log holds
            // one anyway, it has nothing to change.
            (OrderState::NotPlaced, _) => OrderState::NotPlaced,
            (OrderState::Placed(mut order), event) => {
                match event {
                    OrderEvent::Placed(_) => {}
                    OrderEvent::Confirmed(_) => order.status = OrderStatus::Confirmed,
                    OrderEvent::Rejected(rejected) => {
                        order.status = OrderStatus::Rejected;
                        order.reason = Some(rejected.reason.clone());
                    }
                    OrderEvent::Cancelled(cancelled) => {
                        order.status = OrderStatus::Cancelled;
                        order.reason = Some(cancelled.reason.clone());
                    }
                    OrderEvent::Shipped(_) => order.status = OrderStatus::Shipped,
                }
                OrderState::Placed(order)
            }
        }
    }
}

fn place_order(place: &PlaceOrder) -> Result<Decision<OrderEvent>, OrderError> {
    if place.lines.is_empty() {
        return Err(OrderError::NoLines);
    }
    if place.lines.len() > MAX_LINES {
        return Err(OrderError::TooManyLines);
    }
    let mut total = Money::zero(place.currency);
    for (index, line) in place.lines.iter().enumerate() {
        if place.lines[..index].iter().any(|seen| seen.sku == line.sku) {
            return Err(OrderError::DuplicateSku(line.sku.clone()));
        }
        if line.unit_price_minor < 0 {
            return Err(OrderError::NegativePrice(line.sku.clone()));
        }
        total = Money::new(line.unit_price_minor, place.currency)
            .checked_mul(line.quantity.get())
            .and_then(|amount| total.checked_add(amount))
            .map_err(|_| OrderError::TotalTooLarge)?;
    }
    Ok(Decision::Append(OrderEvent::Placed(OrderPlaced {
        order_id: place.order_id,
        customer_id: place.customer_id.clone(),
        currency: place.currency,
        lines: place.lines.clone(),
        total_minor: total.amount_minor,
        payment_token: place.payment_token.clone(),
    })))
}

fn reason_text(reason: &str) -> Result<String, OrderError> {
    let reason = reason.trim();
    if reason.is_empty() {
        return Err(OrderError::EmptyReason);
    }
    if reason.chars().count() > MAX_REASON_LEN {
        return Err(OrderError::ReasonTooLong);
    }
    Ok(reason.to_owned())
}
