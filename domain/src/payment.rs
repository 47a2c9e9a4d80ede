//! The payment of one order (the payment's id is the order's id).
//!
//! ```text
//! (none) ──authorise──► Authorised ──capture──► Captured ──refund (≤ captured)──► Refunded
//!    │  ╲                   │                      ╲ partial refunds stay Captured
//!    │   ╲─declined──► Declined
//!    └──void──► Voided ◄──void─┘
//! ```
//! The provider's answer is part of the authorise command: the payment service asks the provider
//! and then decides, so the rules stay pure. Voiding a payment that was never authorised is
//! allowed and final: a late provider answer (after the saga gave up waiting) then changes
//! nothing.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::aggregate::{Aggregate, Decision};
use crate::money::{Currency, Money};
use crate::values::{OrderId, PaymentToken};

/// The longest reason text kept in the log.
pub const MAX_REASON_LEN: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    Authorised,
    Declined,
    Captured,
    Refunded,
    Voided,
}

impl PaymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Authorised => "authorised",
            PaymentStatus::Declined => "declined",
            PaymentStatus::Captured => "captured",
            PaymentStatus::Refunded => "refunded",
            PaymentStatus::Voided => "voided",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Commands

/// What the payment provider answered to an authorisation request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderAnswer {
    Approved { authorisation_id: String },
    Declined { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentCommand {
    Authorise {
        order_id: OrderId,
        amount: Money,
        token: PaymentToken,
        answer: ProviderAnswer,
    },
    /// Captures the whole authorised amount, or `amount` of it.
    Capture {
        amount: Option<Money>,
    },
    Refund {
        amount: Money,
        reason: String,
    },
    Void {
        reason: String,
    },
}

// ---------------------------------------------------------------------------------------------
// Events

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentAuthorised {
    pub order_id: OrderId,
    pub amount: Money,
    pub authorisation_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentDeclined {
    pub order_id: OrderId,
    pub amount: Money,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentCaptured {
    pub amount: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentRefunded {
    pub amount: Money,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentVoided {
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentEvent {
    Authorised(PaymentAuthorised),
    Declined(PaymentDeclined),
    Captured(PaymentCaptured),
    Refunded(PaymentRefunded),
    Voided(PaymentVoided),
}

// ---------------------------------------------------------------------------------------------
// State

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    pub status: PaymentStatus,
    /// What the provider authorised (or was asked for, when declined); `None` when voided before
    /// any authorisation.
    pub authorised: Option<Money>,
    pub captured_minor: i64,
    pub refunded_minor: i64,
    pub authorisation_id: Option<String>,
    pub reason: Option<String>,
}

impl Payment {
    /// What may still be refunded.
    pub fn refundable_minor(&self) -> i64 {
        self.captured_minor - self.refunded_minor
    }

    fn currency(&self) -> Option<Currency> {
        self.authorised.map(|money| money.currency)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentState {
    #[default]
    NotStarted,
    Started(Payment),
}

impl PaymentState {
    pub fn payment(&self) -> Option<&Payment> {
        match self {
            PaymentState::NotStarted => None,
            PaymentState::Started(payment) => Some(payment),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    #[error("payment does not exist")]
    NotFound,
    #[error("reason must not be empty")]
    EmptyReason,
    #[error("reason must be at most {MAX_REASON_LEN} characters")]
    ReasonTooLong,
    #[error("amount must not be negative")]
    NegativeAmount,
    #[error("refund amount must be positive")]
    EmptyRefund,
    #[error("amount is in {found}, the payment is in {expected}")]
    CurrencyMismatch { expected: Currency, found: Currency },
    #[error("payment was declined")]
    Declined,
    #[error("payment has been voided")]
    Voided,
    #[error("payment has already been captured")]
    AlreadyCaptured,
    #[error("payment has not been captured")]
    NotCaptured,
    #[error("capture of {requested} exceeds the authorised {authorised}")]
    ExceedsAuthorised { requested: i64, authorised: i64 },
    #[error("refund of {requested} exceeds the refundable {refundable}")]
    ExceedsCaptured { requested: i64, refundable: i64 },
}

// ---------------------------------------------------------------------------------------------
// Rules

/// The payment aggregate.
#[derive(Debug)]
pub enum PaymentAggregate {}

impl Aggregate for PaymentAggregate {
    const TYPE: &'static str = "payment";
    type State = PaymentState;
    type Command = PaymentCommand;
    type Event = PaymentEvent;
    type Error = PaymentError;

    fn decide(
        state: &PaymentState,
        command: &PaymentCommand,
    ) -> Result<Decision<PaymentEvent>, PaymentError> {
        use PaymentStatus::*;
        let payment = match (state, command) {
            (
                PaymentState::NotStarted,
                PaymentCommand::Authorise {
                    order_id,
                    amount,
                    answer,
                    ..
                },
            ) => {
                return authorise(*order_id, *amount, answer);
            }
            (PaymentState::NotStarted, PaymentCommand::Void { reason }) => {
                return Ok(Decision::Append(PaymentEvent::Voided(PaymentVoided {
                    reason: reason_text(reason)?,
                })));
            }
            (PaymentState::NotStarted, _) => return Err(PaymentError::NotFound),
            (PaymentState::Started(payment), _) => payment,
        };
        let event = match (command, payment.status) {
            // The provider was asked once; a repeat (or a late answer after a void) changes nothing.
            (PaymentCommand::Authorise { .. }, _) => return Ok(Decision::Unchanged),

            (PaymentCommand::Capture { amount }, Authorised) => {
                // Every authorised payment carries its amount (see `evolve`).
                let Some(authorised) = payment.authorised else {
                    return Err(PaymentError::NotFound);
                };
                let amount = amount.unwrap_or(authorised);
                same_currency(payment, amount)?;
                if amount.amount_minor < 0 {
                    return Err(PaymentError::NegativeAmount);
                }
                if amount.amount_minor > authorised.amount_minor {
                    return Err(PaymentError::ExceedsAuthorised {
                        requested: amount.amount_minor,
                        authorised: authorised.amount_minor,
                    });
                }
                PaymentEvent::Captured(PaymentCaptured { amount })
            }
            (PaymentCommand::Capture { .. }, Captured | Refunded) => {
                return Ok(Decision::Unchanged);
            }
            (PaymentCommand::Capture { .. }, Declined) => return Err(PaymentError::Declined),
            (PaymentCommand::Capture { .. }, Voided) => return Err(PaymentError::Voided),

            (PaymentCommand::Refund { amount, reason }, Captured) => {
                same_currency(payment, *amount)?;
                if amount.amount_minor <= 0 {
                    return Err(PaymentError::EmptyRefund);
                }
                if amount.amount_minor > payment.refundable_minor() {
                    return Err(PaymentError::ExceedsCaptured {
                        requested: amount.amount_minor,
                        refundable: payment.refundable_minor(),
                    });
                }
                PaymentEvent::Refunded(PaymentRefunded {
                    amount: *amount,
                    reason: reason_text(reason)?,
                })
            }
            (PaymentCommand::Refund { amount, .. }, Refunded) => {
                return Err(PaymentError::ExceedsCaptured {
                    requested: amount.amount_minor,
                    refundable: 0,
                });
            }
            (PaymentCommand::Refund { .. }, Authorised) => return Err(PaymentError::NotCaptured),
            (PaymentCommand::Refund { .. }, Declined) => return Err(PaymentError::Declined),
            (PaymentCommand::Refund { .. }, Voided) => return Err(PaymentError::Voided),

            (PaymentCommand::Void { reason }, Authorised) => PaymentEvent::Voided(PaymentVoided {
                reason: reason_text(reason)?,
            }),
            // Nothing is held on a declined or voided payment.
            (PaymentCommand::Void { .. }, Declined | Voided) => return Ok(Decision::Unchanged),
            (PaymentCommand::Void { .. }, Captured | Refunded) => {
                return Err(PaymentError::AlreadyCaptured);
            }
        };
        Ok(Decision::Append(event))
    }

    fn evolve(state: PaymentState, event: &PaymentEvent) -> PaymentState {
        let mut payment = match state {
            PaymentState::Started(payment) => payment,
            PaymentState::NotStarted => Payment {
                status: PaymentStatus::Voided,
                authorised: None,
                captured_minor: 0,
                refunded_minor: 0,
                authorisation_id: None,
                reason: None,
            },
        };
        match event {
            PaymentEvent::Authorised(authorised) => {
                payment.status = PaymentStatus::Authorised;
                payment.authorised = Some(authorised.amount);
                payment.authorisation_id = Some(authorised.authorisation_id.clone());
            }
            PaymentEvent::Declined(declined) => {
                payment.status = PaymentStatus::Declined;
                payment.authorised = Some(declined.amount);
                payment.reason = Some(declined.reason.clone());
            }
            PaymentEvent::Captured(captured) => {
                payment.status = PaymentStatus::Captured;
                payment.captured_minor = payment
                    .captured_minor
                    .saturating_add(captured.amount.amount_minor);
            }
            PaymentEvent::Refunded(refunded) => {
                payment.refunded_minor = payment
                    .refunded_minor
                    .saturating_add(refunded.amount.amount_minor);
                if payment.refunded_minor >= payment.captured_minor {
                    payment.status = PaymentStatus::Refunded;
                }
            }
            PaymentEvent::Voided(voided) => {
                payment.status = PaymentStatus::Voided;
                payment.reason = Some(voided.reason.clone());
            }
        }
        PaymentState::Started(payment)
    }
}

fn authorise(
    order_id: OrderId,
    amount: Money,
    answer: &ProviderAnswer,
) -> Result<Decision<PaymentEvent>, PaymentError> {
    if amount.amount_minor < 0 {
        return Err(PaymentError::NegativeAmount);
    }
    let event = match answer {
        ProviderAnswer::Approved { authorisation_id } => {
            PaymentEvent::Authorised(PaymentAuthorised {
                order_id,
                amount,
                authorisation_id: authorisation_id.clone(),
            })
        }
        ProviderAnswer::Declined { reason } => PaymentEvent::Declined(PaymentDeclined {
            order_id,
            amount,
            reason: reason.clone(),
        }),
    };
    Ok(Decision::Append(event))
}

fn reason_text(reason: &str) -> Result<String, PaymentError> {
    let reason = reason.trim();
    if reason.is_empty() {
        return Err(PaymentError::EmptyReason);
    }
    if reason.chars().count() > MAX_REASON_LEN {
        return Err(PaymentError::ReasonTooLong);
    }
    Ok(reason.to_owned())
}

fn same_currency(payment: &Payment, amount: Money) -> Result<(), PaymentError> {
    match payment.currency() {
        Some(expected) if expected != amount.currency => Err(PaymentError::CurrencyMismatch {
            expected,
            found: amount.currency,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::testing::Scenario;

    fn order_id() -> OrderId {
        OrderId(Uuid::from_u128(1))
    }

    fn eur(amount_minor: i64) -> Money {
        Money::new(amount_minor, "EUR".parse().expect("EUR is ISO 4217"))
    }

    fn usd(amount_minor: i64) -> Money {
        Money::new(amount_minor, "USD".parse().expect("USD is ISO 4217"))
    }

    fn authorise(amount: Money, answer: ProviderAnswer) -> PaymentCommand {
        PaymentCommand::Authorise {
            order_id: order_id(),
            amount,
            token: PaymentToken::parse("tok_visa").expect("a valid token"),
            answer,
        }
    }

    fn approved() -> ProviderAnswer {
        ProviderAnswer::Approved {
            authorisation_id: "auth-1".into(),
        }
    }

    fn declined_answer() -> ProviderAnswer {
        ProviderAnswer::Declined {
            reason: "insufficient funds".into(),
        }
    }

    fn capture(amount: Option<Money>) -> PaymentCommand {
        PaymentCommand::Capture { amount }
    }

    fn refund(amount: Money) -> PaymentCommand {
        PaymentCommand::Refund {
            amount,
            reason: "returned".into(),
        }
    }

    fn void() -> PaymentCommand {
        PaymentCommand::Void {
            reason: "saga timed out".into(),
        }
    }

    fn authorised() -> PaymentEvent {
        PaymentEvent::Authorised(PaymentAuthorised {
            order_id: order_id(),
            amount: eur(10_000),
            authorisation_id: "auth-1".into(),
        })
    }

    fn declined() -> PaymentEvent {
        PaymentEvent::Declined(PaymentDeclined {
            order_id: order_id(),
            amount: eur(10_000),
            reason: "insufficient funds".into(),
        })
    }

    fn captured(amount_minor: i64) -> PaymentEvent {
        PaymentEvent::Captured(PaymentCaptured {
            amount: eur(amount_minor),
        })
    }

    fn refunded(amount_minor: i64) -> PaymentEvent {
        PaymentEvent::Refunded(PaymentRefunded {
            amount: eur(amount_minor),
            reason: "returned".into(),
        })
    }

    fn voided() -> PaymentEvent {
        PaymentEvent::Voided(PaymentVoided {
            reason: "saga timed out".into(),
        })
    }

    fn payment(state: &PaymentState) -> &Payment {
        state.payment().expect("the payment exists")
    }

    // Authorise

    #[test]
    fn an_approved_authorisation_authorises_the_payment() {
        let state = PaymentAggregate::given([])
            .when(authorise(eur(10_000), approved()))
            .then(authorised());
        let payment = payment(&state);
        assert_eq!(payment.status, PaymentStatus::Authorised);
        assert_eq!(payment.authorised, Some(eur(10_000)));
        assert_eq!(payment.authorisation_id.as_deref(), Some("auth-1"));
        assert_eq!(payment.captured_minor, 0);
    }

    #[test]
    fn a_declined_authorisation_declines_the_payment() {
        let state = PaymentAggregate::given([])
            .when(authorise(eur(10_000), declined_answer()))
            .then(declined());
        let payment = payment(&state);
        assert_eq!(payment.status, PaymentStatus::Declined);
        assert_eq!(payment.reason.as_deref(), Some("insufficient funds"));
        assert_eq!(payment.authorisation_id, None);
    }

    #[test]
    fn a_negative_amount_cannot_be_authorised() {
        PaymentAggregate::given([])
            .when(authorise(eur(-1), approved()))
            .then_err(PaymentError::NegativeAmount);
    }

    #[test]
    fn a_repeated_authorisation_changes_nothing() {
        PaymentAggregate::given([authorised()])
            .when(authorise(eur(10_000), approved()))
            .then_unchanged();
        PaymentAggregate::given([declined()])
            .when(authorise(eur(10_000), approved()))
            .then_unchanged();
        PaymentAggregate::given([authorised(), captured(10_000)])
            .when(authorise(eur(5_000), declined_answer()))
            .then_unchanged();
    }

    #[test]
    fn a_payment_voided_before_authorisation_ignores_a_late_approval() {
        let given = PaymentAggregate::given([voided()]);
        assert_eq!(payment(given.state()).status, PaymentStatus::Voided);
        assert_eq!(payment(given.state()).authorised, None);
        given
            .when(authorise(eur(10_000), approved()))
            .then_unchanged();
        PaymentAggregate::given([voided()])
            .when(capture(None))
            .then_err(PaymentError::Voided);
    }

    // Capture

    #[test]
    fn the_whole_authorised_amount_is_captured_by_default() {
        let state = PaymentAggregate::given([authorised()])
            .when(capture(None))
            .then(captured(10_000));
        assert_eq!(payment(&state).status, PaymentStatus::Captured);
        assert_eq!(payment(&state).captured_minor, 10_000);
        assert_eq!(payment(&state).refundable_minor(), 10_000);
    }

    #[test]
    fn part_of_the_authorised_amount_can_be_captured() {
        let state = PaymentAggregate::given([authorised()])
            .when(capture(Some(eur(6_000))))
            .then(captured(6_000));
        assert_eq!(payment(&state).captured_minor, 6_000);
    }

    #[test]
    fn exactly_the_authorised_amount_can_be_captured() {
        PaymentAggregate::given([authorised()])
            .when(capture(Some(eur(10_000))))
            .then(captured(10_000));
    }

    #[test]
    fn more_than_the_authorised_amount_cannot_be_captured() {
        PaymentAggregate::given([authorised()])
            .when(capture(Some(eur(10_001))))
            .then_err(PaymentError::ExceedsAuthorised {
                requested: 10_001,
                authorised: 10_000,
            });
    }

    #[test]
    fn a_capture_in_another_currency_is_refused() {
        PaymentAggregate::given([authorised()])
            .when(capture(Some(usd(100))))
            .then_err(PaymentError::CurrencyMismatch {
                expected: eur(0).currency,
                found: usd(0).currency,
            });
    }

    #[test]
    fn a_negative_capture_is_refused() {
        PaymentAggregate::given([authorised()])
            .when(capture(Some(eur(-1))))
            .then_err(PaymentError::NegativeAmount);
    }

    #[test]
    fn a_second_capture_changes_nothing() {
        PaymentAggregate::given([authorised(), captured(6_000)])
            .when(capture(None))
            .then_unchanged();
        PaymentAggregate::given([authorised(), captured(6_000), refunded(6_000)])
            .when(capture(Some(eur(1_000))))
            .then_unchanged();
    }

    #[test]
    fn a_declined_payment_cannot_be_captured() {
        PaymentAggregate::given([declined()])
            .when(capture(None))
            .then_err(PaymentError::Declined);
    }

    #[test]
    fn a_voided_payment_cannot_be_captured() {
        PaymentAggregate::given([authorised(), voided()])
            .when(capture(None))
            .then_err(PaymentError::Voided);
    }

    #[test]
    fn a_payment_that_was_never_started_cannot_be_captured_or_refunded() {
        PaymentAggregate::given([])
            .when(capture(None))
            .then_err(PaymentError::NotFound);
        PaymentAggregate::given([])
            .when(refund(eur(100)))
            .then_err(PaymentError::NotFound);
    }

    // Refund

    #[test]
    fn a_captured_payment_can_be_refunded_in_part_then_the_rest() {
        let state = PaymentAggregate::given([authorised(), captured(6_000)])
            .when(refund(eur(2_500)))
            .then(refunded(2_500));
        assert_eq!(payment(&state).status, PaymentStatus::Captured);
        assert_eq!(payment(&state).refundable_minor(), 3_500);

        let state = PaymentAggregate::given([authorised(), captured(6_000), refunded(2_500)])
            .when(refund(eur(3_500)))
            .then(refunded(3_500));
        assert_eq!(payment(&state).status, PaymentStatus::Refunded);
        assert_eq!(payment(&state).refunded_minor, 6_000);
        assert_eq!(payment(&state).refundable_minor(), 0);
    }

    #[test]
    fn a_refund_larger_than_what_is_left_is_refused() {
        PaymentAggregate::given([authorised(), captured(6_000)])
            .when(refund(eur(6_001)))
            .then_err(PaymentError::ExceedsCaptured {
                requested: 6_001,
                refundable: 6_000,
            });
        PaymentAggregate::given([authorised(), captured(6_000), refunded(2_500)])
            .when(refund(eur(3_501)))
            .then_err(PaymentError::ExceedsCaptured {
                requested: 3_501,
                refundable: 3_500,
            });
    }

    #[test]
    fn a_fully_refunded_payment_cannot_be_refunded_again() {
        PaymentAggregate::given([authorised(), captured(6_000), refunded(6_000)])
            .when(refund(eur(1)))
            .then_err(PaymentError::ExceedsCaptured {
                requested: 1,
                refundable: 0,
            });
    }

    #[test]
    fn a_zero_or_negative_refund_is_refused() {
        for amount_minor in [0, -1] {
            PaymentAggregate::given([authorised(), captured(6_000)])
                .when(refund(eur(amount_minor)))
                .then_err(PaymentError::EmptyRefund);
        }
    }

    #[test]
    fn a_refund_in_another_currency_is_refused() {
        PaymentAggregate::given([authorised(), captured(6_000)])
            .when(refund(usd(100)))
            .then_err(PaymentError::CurrencyMismatch {
                expected: eur(0).currency,
                found: usd(0).currency,
            });
    }

    #[test]
    fn an_uncaptured_payment_cannot_be_refunded() {
        PaymentAggregate::given([authorised()])
            .when(refund(eur(100)))
            .then_err(PaymentError::NotCaptured);
    }

    #[test]
    fn a_declined_payment_cannot_be_refunded() {
        PaymentAggregate::given([declined()])
            .when(refund(eur(100)))
            .then_err(PaymentError::Declined);
    }

    #[test]
    fn a_voided_payment_cannot_be_refunded() {
        PaymentAggregate::given([authorised(), voided()])
            .when(refund(eur(100)))
            .then_err(PaymentError::Voided);
        PaymentAggregate::given([voided()])
            .when(refund(eur(100)))
            .then_err(PaymentError::Voided);
    }

    // Void

    #[test]
    fn an_authorised_payment_can_be_voided() {
        let state = PaymentAggregate::given([authorised()])
            .when(void())
            .then(voided());
        assert_eq!(payment(&state).status, PaymentStatus::Voided);
        assert_eq!(payment(&state).reason.as_deref(), Some("saga timed out"));
    }

    #[test]
    fn a_payment_can_be_voided_before_it_is_authorised() {
        let state = PaymentAggregate::given([]).when(void()).then(voided());
        assert_eq!(payment(&state).status, PaymentStatus::Voided);
        assert_eq!(payment(&state).authorised, None);
    }

    #[test]
    fn voiding_a_declined_or_voided_payment_changes_nothing() {
        PaymentAggregate::given([declined()])
            .when(void())
            .then_unchanged();
        PaymentAggregate::given([authorised(), voided()])
            .when(void())
            .then_unchanged();
        PaymentAggregate::given([voided()])
            .when(void())
            .then_unchanged();
    }

    #[test]
    fn a_captured_or_refunded_payment_cannot_be_voided() {
        PaymentAggregate::given([authorised(), captured(10_000)])
            .when(void())
            .then_err(PaymentError::AlreadyCaptured);
        PaymentAggregate::given([authorised(), captured(10_000), refunded(10_000)])
            .when(void())
            .then_err(PaymentError::AlreadyCaptured);
    }

    #[test]
    fn a_void_or_refund_without_a_reason_is_refused() {
        PaymentAggregate::given([])
            .when(PaymentCommand::Void {
                reason: "  ".into(),
            })
            .then_err(PaymentError::EmptyReason);
        PaymentAggregate::given([authorised(), captured(1000)])
            .when(PaymentCommand::Refund {
                amount: eur(100),
                reason: "x".repeat(MAX_REASON_LEN + 1),
            })
            .then_err(PaymentError::ReasonTooLong);
    }
}
