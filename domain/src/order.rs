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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    // The limit holds for the reason as sent, the emptiness for what is left once trimmed.
    if reason.chars().count() > MAX_REASON_LEN {
        return Err(OrderError::ReasonTooLong);
    }
    let reason = reason.trim();
    if reason.is_empty() {
        return Err(OrderError::EmptyReason);
    }
    Ok(reason.to_owned())
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::testing::Scenario;

    fn order_id() -> OrderId {
        OrderId(Uuid::from_u128(1))
    }

    fn eur() -> Currency {
        "EUR".parse().expect("EUR is ISO 4217")
    }

    fn sku(raw: &str) -> Sku {
        Sku::parse(raw).expect("a valid sku")
    }

    fn line(raw_sku: &str, units: u32, unit_price_minor: i64) -> OrderLine {
        OrderLine {
            sku: sku(raw_sku),
            quantity: Quantity::new(units).expect("a positive quantity"),
            unit_price_minor,
        }
    }

    fn lines() -> Vec<OrderLine> {
        vec![line("SKU-1", 2, 1_250), line("SKU-2", 1, 500)]
    }

    fn place_with(lines: Vec<OrderLine>) -> OrderCommand {
        OrderCommand::Place(PlaceOrder {
            order_id: order_id(),
            customer_id: CustomerId::parse("customer-1").expect("a valid customer id"),
            currency: eur(),
            payment_token: PaymentToken::parse("tok_visa").expect("a valid token"),
            lines,
        })
    }

    fn place() -> OrderCommand {
        place_with(lines())
    }

    fn placed() -> OrderEvent {
        OrderEvent::Placed(OrderPlaced {
            order_id: order_id(),
            customer_id: CustomerId::parse("customer-1").expect("a valid customer id"),
            currency: eur(),
            lines: lines(),
            total_minor: 3_000,
            payment_token: PaymentToken::parse("tok_visa").expect("a valid token"),
        })
    }

    fn confirmed() -> OrderEvent {
        OrderEvent::Confirmed(OrderConfirmed {})
    }

    fn rejected() -> OrderEvent {
        OrderEvent::Rejected(OrderRejected {
            reason: "out of stock".into(),
        })
    }

    fn cancelled() -> OrderEvent {
        OrderEvent::Cancelled(OrderCancelled {
            reason: "changed my mind".into(),
            was_confirmed: false,
        })
    }

    fn shipped() -> OrderEvent {
        OrderEvent::Shipped(OrderShipped {})
    }

    fn reject(reason: &str) -> OrderCommand {
        OrderCommand::Reject {
            reason: reason.into(),
        }
    }

    fn cancel(reason: &str) -> OrderCommand {
        OrderCommand::Cancel {
            reason: Some(reason.into()),
        }
    }

    fn status(state: &OrderState) -> OrderStatus {
        state.order().expect("the order exists").status
    }

    // Place

    #[test]
    fn a_new_order_is_placed_pending_with_its_total() {
        let state = OrderAggregate::given([]).when(place()).then(placed());
        let order = state.order().expect("the order exists");
        assert_eq!(order.status, OrderStatus::Pending);
        assert_eq!(order.total, Money::new(3_000, eur()));
        assert_eq!(order.lines, lines());
        assert_eq!(order.reason, None);
    }

    #[test]
    fn a_line_may_be_free() {
        let state = OrderAggregate::given([])
            .when(place_with(vec![line("SKU-1", 3, 0)]))
            .then(OrderEvent::Placed(OrderPlaced {
                order_id: order_id(),
                customer_id: CustomerId::parse("customer-1").expect("a valid customer id"),
                currency: eur(),
                lines: vec![line("SKU-1", 3, 0)],
                total_minor: 0,
                payment_token: PaymentToken::parse("tok_visa").expect("a valid token"),
            }));
        assert_eq!(
            state.order().map(|order| order.total),
            Some(Money::zero(eur()))
        );
    }

    #[test]
    fn an_order_without_lines_cannot_be_placed() {
        OrderAggregate::given([])
            .when(place_with(vec![]))
            .then_err(OrderError::NoLines);
    }

    #[test]
    fn an_order_with_the_maximum_number_of_lines_can_be_placed() {
        let lines: Vec<_> = (0..MAX_LINES)
            .map(|i| line(&format!("SKU-{i}"), 1, 100))
            .collect();
        let decision = OrderAggregate::decide(&OrderState::NotPlaced, &place_with(lines));
        assert!(
            matches!(decision, Ok(Decision::Append(OrderEvent::Placed(ref placed))) if placed.total_minor == 100 * MAX_LINES as i64),
            "got {decision:?}"
        );
    }

    #[test]
    fn an_order_with_more_than_the_maximum_number_of_lines_cannot_be_placed() {
        let lines = (0..=MAX_LINES)
            .map(|i| line(&format!("SKU-{i}"), 1, 100))
            .collect();
        OrderAggregate::given([])
            .when(place_with(lines))
            .then_err(OrderError::TooManyLines);
    }

    #[test]
    fn an_order_naming_a_sku_on_two_lines_cannot_be_placed() {
        OrderAggregate::given([])
            .when(place_with(vec![
                line("SKU-1", 1, 100),
                line("SKU-2", 1, 100),
                line("SKU-1", 4, 100),
            ]))
            .then_err(OrderError::DuplicateSku(sku("SKU-1")));
    }

    #[test]
    fn an_order_with_a_negative_unit_price_cannot_be_placed() {
        OrderAggregate::given([])
            .when(place_with(vec![
                line("SKU-1", 1, 100),
                line("SKU-2", 1, -1),
            ]))
            .then_err(OrderError::NegativePrice(sku("SKU-2")));
    }

    #[test]
    fn an_order_whose_line_total_overflows_cannot_be_placed() {
        OrderAggregate::given([])
            .when(place_with(vec![line("SKU-1", 2, i64::MAX)]))
            .then_err(OrderError::TotalTooLarge);
    }

    #[test]
    fn an_order_whose_sum_of_lines_overflows_cannot_be_placed() {
        OrderAggregate::given([])
            .when(place_with(vec![
                line("SKU-1", 1, i64::MAX),
                line("SKU-2", 1, 1),
            ]))
            .then_err(OrderError::TotalTooLarge);
    }

    #[test]
    fn an_order_cannot_be_placed_twice() {
        OrderAggregate::given([placed()])
            .when(place())
            .then_err(OrderError::AlreadyPlaced);
        OrderAggregate::given([placed(), confirmed(), shipped()])
            .when(place())
            .then_err(OrderError::AlreadyPlaced);
    }

    #[test]
    fn an_order_that_was_never_placed_cannot_be_confirmed_rejected_cancelled_or_shipped() {
        for command in [
            OrderCommand::Confirm,
            reject("out of stock"),
            OrderCommand::Cancel { reason: None },
            OrderCommand::Ship,
        ] {
            OrderAggregate::given([])
                .when(command)
                .then_err(OrderError::NotFound);
        }
    }

    // Confirm

    #[test]
    fn a_pending_order_can_be_confirmed() {
        let state = OrderAggregate::given([placed()])
            .when(OrderCommand::Confirm)
            .then(confirmed());
        assert_eq!(status(&state), OrderStatus::Confirmed);
    }

    #[test]
    fn confirming_a_confirmed_order_again_changes_nothing() {
        OrderAggregate::given([placed(), confirmed()])
            .when(OrderCommand::Confirm)
            .then_unchanged();
    }

    #[test]
    fn confirming_a_shipped_order_changes_nothing() {
        OrderAggregate::given([placed(), confirmed(), shipped()])
            .when(OrderCommand::Confirm)
            .then_unchanged();
    }

    #[test]
    fn a_rejected_order_cannot_be_confirmed() {
        OrderAggregate::given([placed(), rejected()])
            .when(OrderCommand::Confirm)
            .then_err(OrderError::Rejected);
    }

    #[test]
    fn a_cancelled_order_cannot_be_confirmed() {
        OrderAggregate::given([placed(), cancelled()])
            .when(OrderCommand::Confirm)
            .then_err(OrderError::Cancelled);
    }

    // Reject

    #[test]
    fn a_pending_order_can_be_rejected_and_keeps_the_trimmed_reason() {
        let state = OrderAggregate::given([placed()])
            .when(reject("  out of stock \n"))
            .then(rejected());
        assert_eq!(status(&state), OrderStatus::Rejected);
        assert_eq!(
            state.order().and_then(|order| order.reason.as_deref()),
            Some("out of stock")
        );
    }

    #[test]
    fn an_order_cannot_be_rejected_without_a_reason() {
        for blank in ["", "   ", "\t\n"] {
            OrderAggregate::given([placed()])
                .when(reject(blank))
                .then_err(OrderError::EmptyReason);
        }
    }

    #[test]
    fn a_reason_of_the_maximum_length_is_kept_and_a_longer_one_is_refused() {
        let longest = "é".repeat(MAX_REASON_LEN);
        OrderAggregate::given([placed()])
            .when(reject(&longest))
            .then(OrderEvent::Rejected(OrderRejected {
                reason: longest.clone(),
            }));
        OrderAggregate::given([placed()])
            .when(reject(&format!("{longest}x")))
            .then_err(OrderError::ReasonTooLong);
        OrderAggregate::given([placed()])
            .when(cancel(&format!("{longest}x")))
            .then_err(OrderError::ReasonTooLong);
    }

    #[test]
    fn rejecting_a_rejected_order_again_changes_nothing() {
        OrderAggregate::given([placed(), rejected()])
            .when(reject("payment declined"))
            .then_unchanged();
    }

    #[test]
    fn a_confirmed_order_cannot_be_rejected() {
        OrderAggregate::given([placed(), confirmed()])
            .when(reject("out of stock"))
            .then_err(OrderError::AlreadyConfirmed);
    }

    #[test]
    fn a_cancelled_order_cannot_be_rejected() {
        OrderAggregate::given([placed(), cancelled()])
            .when(reject("out of stock"))
            .then_err(OrderError::Cancelled);
    }

    #[test]
    fn a_shipped_order_cannot_be_rejected() {
        OrderAggregate::given([placed(), confirmed(), shipped()])
            .when(reject("out of stock"))
            .then_err(OrderError::AlreadyShipped);
    }

    // Cancel

    #[test]
    fn a_pending_order_can_be_cancelled_and_was_not_confirmed() {
        let state = OrderAggregate::given([placed()])
            .when(cancel("changed my mind"))
            .then(cancelled());
        assert_eq!(status(&state), OrderStatus::Cancelled);
        assert_eq!(
            state.order().and_then(|order| order.reason.as_deref()),
            Some("changed my mind")
        );
    }

    #[test]
    fn a_confirmed_order_can_be_cancelled_and_was_confirmed() {
        let state = OrderAggregate::given([placed(), confirmed()])
            .when(cancel("changed my mind"))
            .then(OrderEvent::Cancelled(OrderCancelled {
                reason: "changed my mind".into(),
                was_confirmed: true,
            }));
        assert_eq!(status(&state), OrderStatus::Cancelled);
    }

    #[test]
    fn a_cancellation_without_a_reason_says_the_customer_cancelled() {
        OrderAggregate::given([placed()])
            .when(OrderCommand::Cancel { reason: None })
            .then(OrderEvent::Cancelled(OrderCancelled {
                reason: "cancelled by the customer".into(),
                was_confirmed: false,
            }));
    }

    #[test]
    fn a_cancellation_with_a_blank_reason_is_refused() {
        OrderAggregate::given([placed()])
            .when(cancel("  "))
            .then_err(OrderError::EmptyReason);
    }

    #[test]
    fn cancelling_a_cancelled_order_again_changes_nothing() {
        OrderAggregate::given([placed(), cancelled()])
            .when(OrderCommand::Cancel { reason: None })
            .then_unchanged();
    }

    #[test]
    fn a_rejected_order_cannot_be_cancelled() {
        OrderAggregate::given([placed(), rejected()])
            .when(OrderCommand::Cancel { reason: None })
            .then_err(OrderError::Rejected);
    }

    #[test]
    fn a_shipped_order_cannot_be_cancelled() {
        OrderAggregate::given([placed(), confirmed(), shipped()])
            .when(OrderCommand::Cancel { reason: None })
            .then_err(OrderError::AlreadyShipped);
    }

    // Ship

    #[test]
    fn a_confirmed_order_can_be_shipped() {
        let state = OrderAggregate::given([placed(), confirmed()])
            .when(OrderCommand::Ship)
            .then(shipped());
        assert_eq!(status(&state), OrderStatus::Shipped);
    }

    #[test]
    fn shipping_a_shipped_order_again_changes_nothing() {
        OrderAggregate::given([placed(), confirmed(), shipped()])
            .when(OrderCommand::Ship)
            .then_unchanged();
    }

    #[test]
    fn a_pending_order_cannot_be_shipped() {
        OrderAggregate::given([placed()])
            .when(OrderCommand::Ship)
            .then_err(OrderError::NotConfirmed);
    }

    #[test]
    fn a_rejected_order_cannot_be_shipped() {
        OrderAggregate::given([placed(), rejected()])
            .when(OrderCommand::Ship)
            .then_err(OrderError::Rejected);
    }

    #[test]
    fn a_cancelled_order_cannot_be_shipped() {
        OrderAggregate::given([placed(), cancelled()])
            .when(OrderCommand::Ship)
            .then_err(OrderError::Cancelled);
    }

    // Evolve

    #[test]
    fn an_event_for_an_order_that_was_never_placed_changes_nothing() {
        for event in [confirmed(), rejected(), cancelled(), shipped()] {
            assert_eq!(
                OrderAggregate::evolve(OrderState::NotPlaced, &event),
                OrderState::NotPlaced
            );
        }
    }
}
