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

#[derive(Debug, Clone, PartialEq, Eq)]
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

#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
                    reason: reason.clone(),
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
                    reason: reason.clone(),
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
                reason: reason.clone(),
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

fn same_currency(payment: &Payment, amount: Money) -> Result<(), PaymentError> {
    match payment.currency() {
        Some(expected) if expected != amount.currency => Err(PaymentError::CurrencyMismatch {
            expected,
            found: amount.currency,
        }),
        _ => Ok(()),
    }
}
