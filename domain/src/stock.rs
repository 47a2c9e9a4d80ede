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

/// The most units one stock item may hold on hand: 2^53 − 1, the largest count every reader
/// holds exactly (a JSON number in any client, a read model's `BIGINT`, with room for the
/// largest receipt or adjustment on top of it). A receipt or adjustment past it is refused.
pub const MAX_ON_HAND: u64 = (1 << 53) - 1;

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

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    #[error("stock on hand would exceed {MAX_ON_HAND} units")]
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
                if item.on_hand.saturating_add(u64::from(quantity.get())) > MAX_ON_HAND {
                    return Err(StockError::Overflow);
                }
                StockEvent::Received(StockReceived {
                    quantity: *quantity,
                })
            }
            StockCommand::Adjust { delta, reason } => {
                if *delta == 0 {
                    return Err(StockError::ZeroAdjustment);
                }
                // The limit holds for the reason as sent, the emptiness once trimmed.
                if reason.chars().count() > MAX_REASON_LEN {
                    return Err(StockError::ReasonTooLong);
                }
                let reason = reason.trim();
                if reason.is_empty() {
                    return Err(StockError::EmptyReason);
                }
                let on_hand_after = i128::from(item.on_hand) + i128::from(*delta);
                if on_hand_after < i128::from(item.reserved) {
                    return Err(StockError::BelowReserved {
                        on_hand_after,
                        reserved: item.reserved,
                    });
                }
                if on_hand_after > i128::from(MAX_ON_HAND) {
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

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::testing::Scenario;
    use proptest::prelude::*;

    fn order(n: u128) -> OrderId {
        OrderId(Uuid::from_u128(n))
    }

    fn units(n: u32) -> Quantity {
        Quantity::new(n).expect("a positive quantity")
    }

    fn received(n: u32) -> StockEvent {
        StockEvent::Received(StockReceived { quantity: units(n) })
    }

    fn adjusted(delta: i64) -> StockEvent {
        StockEvent::Adjusted(StockAdjusted {
            delta,
            reason: "stock-take".into(),
        })
    }

    fn reserved(order_n: u128, n: u32) -> StockEvent {
        StockEvent::Reserved(StockReserved {
            order_id: order(order_n),
            quantity: units(n),
        })
    }

    fn released(order_n: u128, n: u32) -> StockEvent {
        StockEvent::ReservationReleased(StockReservationReleased {
            order_id: order(order_n),
            quantity: units(n),
        })
    }

    fn committed(order_n: u128, n: u32) -> StockEvent {
        StockEvent::ReservationCommitted(StockReservationCommitted {
            order_id: order(order_n),
            quantity: units(n),
        })
    }

    fn adjust(delta: i64, reason: &str) -> StockCommand {
        StockCommand::Adjust {
            delta,
            reason: reason.into(),
        }
    }

    fn reserve(order_n: u128, n: u32) -> StockCommand {
        StockCommand::Reserve {
            order_id: order(order_n),
            quantity: units(n),
        }
    }

    fn release(order_n: u128) -> StockCommand {
        StockCommand::Release {
            order_id: order(order_n),
        }
    }

    fn commit(order_n: u128) -> StockCommand {
        StockCommand::Commit {
            order_id: order(order_n),
        }
    }

    /// A stock item holding one unit less than [`MAX_ON_HAND`].
    fn nearly_full() -> [StockEvent; 1] {
        [adjusted(MAX_ON_HAND as i64 - 1)]
    }

    // Receive

    #[test]
    fn received_units_are_added_on_hand() {
        let item = StockAggregate::given([received(5)])
            .when(StockCommand::Receive { quantity: units(3) })
            .then(received(3));
        assert_eq!((item.on_hand, item.reserved, item.available()), (8, 0, 8));
    }

    #[test]
    fn receiving_beyond_the_largest_count_is_refused() {
        StockAggregate::given(nearly_full())
            .when(StockCommand::Receive { quantity: units(1) })
            .then(received(1));
        StockAggregate::given(nearly_full())
            .when(StockCommand::Receive { quantity: units(2) })
            .then_err(StockError::Overflow);
    }

    // Adjust

    #[test]
    fn a_positive_adjustment_adds_units_on_hand() {
        let item = StockAggregate::given([received(5)])
            .when(adjust(4, "found a box"))
            .then(StockEvent::Adjusted(StockAdjusted {
                delta: 4,
                reason: "found a box".into(),
            }));
        assert_eq!(item.on_hand, 9);
    }

    #[test]
    fn a_negative_adjustment_removes_units_on_hand() {
        let item = StockAggregate::given([received(5)])
            .when(adjust(-2, "stock-take"))
            .then(adjusted(-2));
        assert_eq!(item.on_hand, 3);
    }

    #[test]
    fn an_adjustment_keeps_its_reason_trimmed() {
        StockAggregate::given([received(5)])
            .when(adjust(-1, "  stock-take\n"))
            .then(adjusted(-1));
    }

    #[test]
    fn an_adjustment_may_bring_on_hand_down_to_what_is_reserved() {
        let item = StockAggregate::given([received(10), reserved(1, 4)])
            .when(adjust(-6, "stock-take"))
            .then(adjusted(-6));
        assert_eq!((item.on_hand, item.reserved, item.available()), (4, 4, 0));
    }

    #[test]
    fn an_adjustment_may_not_take_on_hand_below_what_is_reserved() {
        StockAggregate::given([received(10), reserved(1, 4)])
            .when(adjust(-7, "stock-take"))
            .then_err(StockError::BelowReserved {
                on_hand_after: 3,
                reserved: 4,
            });
    }

    #[test]
    fn an_adjustment_may_not_take_on_hand_below_zero() {
        StockAggregate::given([received(2)])
            .when(adjust(-3, "stock-take"))
            .then_err(StockError::BelowReserved {
                on_hand_after: -1,
                reserved: 0,
            });
        StockAggregate::given([])
            .when(adjust(i64::MIN, "stock-take"))
            .then_err(StockError::BelowReserved {
                on_hand_after: i128::from(i64::MIN),
                reserved: 0,
            });
    }

    #[test]
    fn an_adjustment_beyond_the_largest_count_is_refused() {
        StockAggregate::given(nearly_full())
            .when(adjust(2, "stock-take"))
            .then_err(StockError::Overflow);
    }

    #[test]
    fn a_zero_adjustment_is_refused() {
        StockAggregate::given([received(5)])
            .when(adjust(0, "stock-take"))
            .then_err(StockError::ZeroAdjustment);
    }

    #[test]
    fn an_adjustment_without_a_reason_is_refused() {
        for blank in ["", "  ", "\n\t"] {
            StockAggregate::given([received(5)])
                .when(adjust(-1, blank))
                .then_err(StockError::EmptyReason);
        }
    }

    #[test]
    fn an_adjustment_reason_of_the_maximum_length_is_kept_and_a_longer_one_is_refused() {
        let longest = "ü".repeat(MAX_REASON_LEN);
        StockAggregate::given([received(5)])
            .when(adjust(1, &longest))
            .then(StockEvent::Adjusted(StockAdjusted {
                delta: 1,
                reason: longest.clone(),
            }));
        StockAggregate::given([received(5)])
            .when(adjust(1, &format!("{longest}x")))
            .then_err(StockError::ReasonTooLong);
    }

    // Reserve

    #[test]
    fn available_units_can_be_reserved_for_an_order() {
        let item = StockAggregate::given([received(10)])
            .when(reserve(1, 3))
            .then(reserved(1, 3));
        assert_eq!((item.on_hand, item.reserved, item.available()), (10, 3, 7));
        assert_eq!(item.reservations.get(&order(1)), Some(&units(3)));
    }

    #[test]
    fn everything_available_can_be_reserved() {
        let item = StockAggregate::given([received(10), reserved(1, 3)])
            .when(reserve(2, 7))
            .then(reserved(2, 7));
        assert_eq!(item.available(), 0);
        assert_eq!(item.reservations.len(), 2);
    }

    #[test]
    fn a_reservation_beyond_what_is_available_is_rejected_with_what_was_available() {
        let item = StockAggregate::given([received(10), reserved(1, 3)])
            .when(reserve(2, 8))
            .then(StockEvent::ReservationRejected(StockReservationRejected {
                order_id: order(2),
                requested: units(8),
                available: 7,
            }));
        assert_eq!((item.reserved, item.available()), (3, 7));
        assert!(!item.reservations.contains_key(&order(2)));
    }

    #[test]
    fn a_reservation_on_an_empty_item_is_rejected() {
        StockAggregate::given([])
            .when(reserve(1, 1))
            .then(StockEvent::ReservationRejected(StockReservationRejected {
                order_id: order(1),
                requested: units(1),
                available: 0,
            }));
    }

    #[test]
    fn a_second_reservation_for_the_same_order_changes_nothing() {
        StockAggregate::given([received(10), reserved(1, 3)])
            .when(reserve(1, 3))
            .then_unchanged();
        // Even when the repeat asks for a different quantity: the reservation held is the answer.
        StockAggregate::given([received(10), reserved(1, 3)])
            .when(reserve(1, 50))
            .then_unchanged();
    }

    #[test]
    fn a_rejected_reservation_is_not_held_and_can_be_tried_again_once_stock_arrives() {
        let rejection = StockEvent::ReservationRejected(StockReservationRejected {
            order_id: order(1),
            requested: units(5),
            available: 2,
        });
        StockAggregate::given([received(2), rejection.clone(), received(3)])
            .when(reserve(1, 5))
            .then(reserved(1, 5));
    }

    // Release

    #[test]
    fn a_held_reservation_can_be_released() {
        let item = StockAggregate::given([received(10), reserved(1, 3), reserved(2, 4)])
            .when(release(1))
            .then(released(1, 3));
        assert_eq!((item.on_hand, item.reserved, item.available()), (10, 4, 6));
        assert!(!item.reservations.contains_key(&order(1)));
    }

    #[test]
    fn releasing_a_reservation_that_is_not_held_changes_nothing() {
        StockAggregate::given([received(10)])
            .when(release(1))
            .then_unchanged();
        StockAggregate::given([received(10), reserved(1, 3), released(1, 3)])
            .when(release(1))
            .then_unchanged();
        StockAggregate::given([received(10), reserved(1, 3), committed(1, 3)])
            .when(release(1))
            .then_unchanged();
    }

    // Commit

    #[test]
    fn a_committed_reservation_leaves_on_hand() {
        let item = StockAggregate::given([received(10), reserved(1, 3), reserved(2, 4)])
            .when(commit(1))
            .then(committed(1, 3));
        assert_eq!((item.on_hand, item.reserved, item.available()), (7, 4, 3));
        assert!(!item.reservations.contains_key(&order(1)));
    }

    #[test]
    fn a_reservation_that_is_not_held_cannot_be_committed() {
        StockAggregate::given([received(10)])
            .when(commit(1))
            .then_err(StockError::NoReservation(order(1)));
        StockAggregate::given([received(10), reserved(1, 3), released(1, 3)])
            .when(commit(1))
            .then_err(StockError::NoReservation(order(1)));
        StockAggregate::given([received(10), reserved(1, 3), committed(1, 3)])
            .when(commit(1))
            .then_err(StockError::NoReservation(order(1)));
    }

    // Evolve

    #[test]
    fn a_release_or_commit_of_a_reservation_not_held_changes_nothing_when_folded() {
        let before = StockAggregate::given([received(10), reserved(1, 3)])
            .state()
            .clone();
        for event in [released(2, 3), committed(2, 3)] {
            assert_eq!(StockAggregate::evolve(before.clone(), &event), before);
        }
    }

    #[test]
    fn available_is_never_negative_even_for_an_inconsistent_item() {
        let item = StockItem {
            on_hand: 2,
            reserved: 5,
            reservations: BTreeMap::new(),
        };
        assert_eq!(item.available(), 0);
    }

    proptest! {
        /// Whatever receipts and adjustments are asked, in any order, the units on hand and
        /// reserved stay within [`MAX_ON_HAND`], so every read model's `BIGINT` holds them and
        /// each event's delta added to a stored count stays in range.
        #[test]
        fn on_hand_never_leaves_the_range_every_reader_holds(
            commands in proptest::collection::vec(
                prop_oneof![
                    (1u32..=u32::MAX).prop_map(|n| StockCommand::Receive { quantity: units(n) }),
                    prop_oneof![
                        Just(i64::MAX),
                        Just(i64::MIN),
                        Just(MAX_ON_HAND as i64),
                        proptest::num::i64::ANY,
                    ]
                    .prop_map(|delta| adjust(delta, "stock-take")),
                    (1u128..4, 1u32..=u32::MAX).prop_map(|(n, q)| reserve(n, q)),
                ],
                1..40,
            )
        ) {
            let mut item = StockItem::default();
            for command in &commands {
                if let Ok(Decision::Append(event)) = StockAggregate::decide(&item, command) {
                    item = StockAggregate::evolve(item, &event);
                    prop_assert!(item.on_hand <= MAX_ON_HAND);
                    prop_assert!(item.reserved <= item.on_hand);
                    if let StockEvent::Adjusted(adjusted) = &event {
                        prop_assert!(adjusted.delta.unsigned_abs() <= MAX_ON_HAND);
                    }
                }
            }
        }
    }
}
