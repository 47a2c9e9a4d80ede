//! The order-fulfilment saga: one instance per order, deciding in [`react`] what to ask of the
//! participants next.
//!
//! ```text
//! reserving_stock ──all reserved──► authorising_payment ──authorised──► confirming
//!       │ refused, deadline,              │ declined, deadline,             │ confirmed and captured
//!       │ cancelled                       │ cancelled                       ▼
//!       │                                 │                             confirmed ──shipped──► completed
//!       ▼                                 ▼                                 │   (all committed)
//!  compensating ◄─────────────────────────┴──────── cancelled (from confirming too)
//!       │ void or refund, release; once all are acknowledged:
//!       ├──► cancelled                   (the customer cancelled)
//!       └──► reject the order ──► rejected
//!
//! any retried step without an answer after max_attempts ──► needs_attention, until it is
//! answered after all or an operator retries it
//! ```
//!
//! The saga keeps *facts* (what the participants' events said) apart from *steps* (the commands
//! it sent and whether they have been answered). Every input first updates the facts; a fact
//! already known changes nothing, which is what makes a redelivered or late event harmless. The
//! saga then moves on as far as the facts allow, and takes each step at most once: a step has a
//! stable name (`reserve:SKU-1`, `void`, ...) and is looked up before it is taken.
//!
//! Each step waits for its answer until a deadline. A forward step that does not answer in time
//! (a reservation, the payment authorisation) is given up and compensated; every other step
//! (confirming, capturing, committing, and all compensations) is re-sent with the next attempt
//! number and a longer wait, and after [`SagaConfig::max_attempts`] it is parked: the saga shows
//! `needs_attention` until the answer arrives after all or an operator asks for a retry.
//!
//! Compensations are sent together, the payment's first (the later forward step), and the order
//! is rejected only once all of them have been acknowledged. A reservation whose answer is still
//! outstanding when compensation starts is released too: commands to one stock item are decided
//! in the order they were sent, so the release lands behind the reservation and is answered
//! either by `StockReservationReleased` or, if the reservation was refused, by the refusal. If
//! the release overtook its reservation after all, the missing acknowledgement makes the
//! deadline resend it.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use domain::order::{OrderAggregate, OrderEvent, OrderLine};
use domain::payment::{PaymentAggregate, PaymentEvent};
use domain::stock::{StockAggregate, StockEvent};
use domain::{Aggregate, Money, OrderId, PaymentToken, Quantity, Sku};
use event_schema::commands::ServiceCommand;
use event_schema::{DecodeError, Envelope, catalog};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The longest reason the saga puts into a command. The order and payment aggregates refuse
/// longer ones, and a refused compensation would only be retried until it is parked.
pub const MAX_REASON_LEN: usize = if domain::order::MAX_REASON_LEN < domain::payment::MAX_REASON_LEN
{
    domain::order::MAX_REASON_LEN
} else {
    domain::payment::MAX_REASON_LEN
};

// ---------------------------------------------------------------------------------------------
// Configuration

/// How long the saga waits for each kind of answer, and how it retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaConfig {
    /// How long every line's reservation may take before the order is given up.
    pub reservation_timeout: Duration,
    /// How long the payment authorisation may take before the order is given up.
    pub payment_timeout: Duration,
    /// The first wait for the order's confirmation, the capture and the commits (these are
    /// retried, not compensated: the order is past the point of no return).
    pub confirmation_timeout: Duration,
    /// The first wait for a compensation's acknowledgement.
    pub compensation_timeout: Duration,
    /// Added to the wait of the first retry, doubling with every further retry.
    pub backoff_base: Duration,
    /// Sends of one retried step (per round: an operator retry starts a new round) before the
    /// saga stops retrying it and needs attention. At least 1.
    pub max_attempts: u32,
}

impl Default for SagaConfig {
    fn default() -> Self {
        SagaConfig {
            reservation_timeout: Duration::from_secs(10),
            payment_timeout: Duration::from_secs(10),
            confirmation_timeout: Duration::from_secs(10),
            compensation_timeout: Duration::from_secs(5),
            backoff_base: Duration::from_secs(1),
            max_attempts: 5,
        }
    }
}

impl SagaConfig {
    /// How long to wait for the answer to the `attempt`-th send (1-based, within a round) of a
    /// retried step whose first wait is `first_wait`: `first_wait` for the first send, then
    /// `first_wait + backoff_base × 2^(attempt − 2)` (with the defaults and a compensation:
    /// 5 s, 6 s, 7 s, 9 s, 13 s).
    pub fn retry_wait(&self, first_wait: Duration, attempt: u32) -> Duration {
        if attempt <= 1 {
            return first_wait;
        }
        let factor = 2u32.saturating_pow(attempt - 2);
        first_wait.saturating_add(self.backoff_base.saturating_mul(factor))
    }

    fn attempts_allowed(&self) -> u32 {
        self.max_attempts.max(1)
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs

/// What the saga reacts to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "input", rename_all = "snake_case")]
pub enum Input {
    /// A participant's event about this order.
    Event(SagaEvent),
    /// The wake-up the saga asked for (see [`Action::Deadline`]) is due. A wake-up that comes
    /// early changes nothing.
    DeadlinePassed,
    /// An operator asks the saga to try its parked steps again.
    OperatorRetry,
}

/// A stored event the saga needs, with the id of the stored event (the cause of whatever the
/// saga does about it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaEvent {
    pub event_id: Uuid,
    pub fact: Fact,
}

/// The part of a domain event the saga needs. Every fact names its order; stock facts also name
/// their SKU, which is the stock aggregate's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Fact {
    OrderPlaced {
        order_id: OrderId,
        lines: Vec<OrderLine>,
        total: Money,
        payment_token: PaymentToken,
    },
    OrderConfirmed {
        order_id: OrderId,
    },
    OrderRejected {
        order_id: OrderId,
        reason: String,
    },
    OrderCancelled {
        order_id: OrderId,
        reason: String,
        was_confirmed: bool,
    },
    OrderShipped {
        order_id: OrderId,
    },
    PaymentAuthorised {
        order_id: OrderId,
        amount: Money,
    },
    PaymentDeclined {
        order_id: OrderId,
        reason: String,
    },
    PaymentCaptured {
        order_id: OrderId,
        amount: Money,
    },
    PaymentRefunded {
        order_id: OrderId,
        amount: Money,
    },
    PaymentVoided {
        order_id: OrderId,
    },
    StockReserved {
        order_id: OrderId,
        sku: Sku,
        quantity: Quantity,
    },
    StockReservationRejected {
        order_id: OrderId,
        sku: Sku,
        requested: Quantity,
        available: u64,
    },
    StockReservationReleased {
        order_id: OrderId,
        sku: Sku,
    },
    StockReservationCommitted {
        order_id: OrderId,
        sku: Sku,
    },
}

impl Fact {
    /// The order (and so the saga) the fact is about.
    pub fn order_id(&self) -> OrderId {
        match self {
            Fact::OrderPlaced { order_id, .. }
            | Fact::OrderConfirmed { order_id }
            | Fact::OrderRejected { order_id, .. }
            | Fact::OrderCancelled { order_id, .. }
            | Fact::OrderShipped { order_id }
            | Fact::PaymentAuthorised { order_id, .. }
            | Fact::PaymentDeclined { order_id, .. }
            | Fact::PaymentCaptured { order_id, .. }
            | Fact::PaymentRefunded { order_id, .. }
            | Fact::PaymentVoided { order_id }
            | Fact::StockReserved { order_id, .. }
            | Fact::StockReservationRejected { order_id, .. }
            | Fact::StockReservationReleased { order_id, .. }
            | Fact::StockReservationCommitted { order_id, .. } => *order_id,
        }
    }

    /// The stored event type it was read from.
    pub fn event_type(&self) -> &'static str {
        match self {
            Fact::OrderPlaced { .. } => catalog::ORDER_PLACED.name,
            Fact::OrderConfirmed { .. } => catalog::ORDER_CONFIRMED.name,
            Fact::OrderRejected { .. } => catalog::ORDER_REJECTED.name,
            Fact::OrderCancelled { .. } => catalog::ORDER_CANCELLED.name,
            Fact::OrderShipped { .. } => catalog::ORDER_SHIPPED.name,
            Fact::PaymentAuthorised { .. } => catalog::PAYMENT_AUTHORISED.name,
            Fact::PaymentDeclined { .. } => catalog::PAYMENT_DECLINED.name,
            Fact::PaymentCaptured { .. } => catalog::PAYMENT_CAPTURED.name,
            Fact::PaymentRefunded { .. } => catalog::PAYMENT_REFUNDED.name,
            Fact::PaymentVoided { .. } => catalog::PAYMENT_VOIDED.name,
            Fact::StockReserved { .. } => catalog::STOCK_RESERVED.name,
            Fact::StockReservationRejected { .. } => catalog::STOCK_RESERVATION_REJECTED.name,
            Fact::StockReservationReleased { .. } => catalog::STOCK_RESERVATION_RELEASED.name,
            Fact::StockReservationCommitted { .. } => catalog::STOCK_RESERVATION_COMMITTED.name,
        }
    }
}

/// Why a stored event the saga should read could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SagaEventError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("{aggregate_type} event for {aggregate_id:?}, which is not an order id")]
    NotAnOrderId {
        aggregate_type: String,
        aggregate_id: String,
    },
    #[error("stock event for {0:?}, which is not a sku")]
    NotASku(String),
}

impl SagaEvent {
    /// Reads the fact the saga needs from a stored event: `Ok(None)` for events the saga does
    /// not follow (stock received or adjusted, unknown aggregate types), an error for an event it
    /// follows but cannot read (which the driver must not skip silently: the saga would wait for
    /// it until a deadline compensates an order that may in fact have gone ahead).
    pub fn from_envelope(envelope: &Envelope) -> Result<Option<SagaEvent>, SagaEventError> {
        let aggregate_type = envelope.aggregate_type.as_str();
        let fact = if aggregate_type == OrderAggregate::TYPE {
            let order_id = order_id_of(envelope)?;
            match envelope.event::<OrderAggregate>()? {
                OrderEvent::Placed(placed) => Fact::OrderPlaced {
                    order_id,
                    total: Money::new(placed.total_minor, placed.currency),
                    lines: placed.lines,
                    payment_token: placed.payment_token,
                },
                OrderEvent::Confirmed(_) => Fact::OrderConfirmed { order_id },
                OrderEvent::Rejected(rejected) => Fact::OrderRejected {
                    order_id,
                    reason: rejected.reason,
                },
                OrderEvent::Cancelled(cancelled) => Fact::OrderCancelled {
                    order_id,
                    reason: cancelled.reason,
                    was_confirmed: cancelled.was_confirmed,
                },
                OrderEvent::Shipped(_) => Fact::OrderShipped { order_id },
            }
        } else if aggregate_type == PaymentAggregate::TYPE {
            let order_id = order_id_of(envelope)?;
            match envelope.event::<PaymentAggregate>()? {
                PaymentEvent::Authorised(authorised) => Fact::PaymentAuthorised {
                    order_id,
                    amount: authorised.amount,
                },
                PaymentEvent::Declined(declined) => Fact::PaymentDeclined {
                    order_id,
                    reason: declined.reason,
                },
                PaymentEvent::Captured(captured) => Fact::PaymentCaptured {
                    order_id,
                    amount: captured.amount,
                },
                PaymentEvent::Refunded(refunded) => Fact::PaymentRefunded {
                    order_id,
                    amount: refunded.amount,
                },
                PaymentEvent::Voided(_) => Fact::PaymentVoided { order_id },
            }
        } else if aggregate_type == StockAggregate::TYPE {
            let sku = Sku::parse(&envelope.aggregate_id)
                .map_err(|_| SagaEventError::NotASku(envelope.aggregate_id.clone()))?;
            match envelope.event::<StockAggregate>()? {
                StockEvent::Received(_) | StockEvent::Adjusted(_) => return Ok(None),
                StockEvent::Reserved(reserved) => Fact::StockReserved {
                    order_id: reserved.order_id,
                    sku,
                    quantity: reserved.quantity,
                },
                StockEvent::ReservationRejected(rejected) => Fact::StockReservationRejected {
                    order_id: rejected.order_id,
                    sku,
                    requested: rejected.requested,
                    available: rejected.available,
                },
                StockEvent::ReservationReleased(released) => Fact::StockReservationReleased {
                    order_id: released.order_id,
                    sku,
                },
                StockEvent::ReservationCommitted(committed) => Fact::StockReservationCommitted {
                    order_id: committed.order_id,
                    sku,
                },
            }
        } else {
            return Ok(None);
        };
        Ok(Some(SagaEvent {
            event_id: envelope.event_id,
            fact,
        }))
    }

    /// The order (and so the saga) the event is about: the driver routes by it.
    pub fn order_id(&self) -> OrderId {
        self.fact.order_id()
    }
}

fn order_id_of(envelope: &Envelope) -> Result<OrderId, SagaEventError> {
    OrderId::parse(&envelope.aggregate_id).map_err(|_| SagaEventError::NotAnOrderId {
        aggregate_type: envelope.aggregate_type.clone(),
        aggregate_id: envelope.aggregate_id.clone(),
    })
}

// ---------------------------------------------------------------------------------------------
// Actions

/// What the saga asks its driver to do, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Send `command` to the aggregate `aggregate_id` (a SKU for stock, the order id for the
    /// payment and the order), through the command topic of `command.service()`. Its command id
    /// is [`command_id`]`(order id, step, attempt)`, so the same send made twice (a relay
    /// resending after a crash) is deduped by the participant, while a retry (the next attempt)
    /// is a new command.
    Send {
        aggregate_id: String,
        command: ServiceCommand,
        /// The step's stable name, e.g. `reserve:SKU-1` (see [`Step`]).
        step: String,
        /// 1 for the first send of the step; never repeats within a step.
        attempt: u32,
    },
    /// Wake the saga up with [`Input::DeadlinePassed`] at this time, replacing any earlier
    /// wake-up; `None` clears it.
    Deadline(Option<DateTime<Utc>>),
}

/// Namespace of the saga's command ids (UUIDv5).
const COMMAND_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1d_3c2e_9a4b_4e57_8c0d_52a7_e1b9_f304);

/// The command id of the `attempt`-th send of `step` by the saga of `order_id`: deterministic,
/// so a command written to the outbox twice is one command to its participant.
pub fn command_id(order_id: OrderId, step: &str, attempt: u32) -> Uuid {
    let name = format!("order-fulfilment/{order_id}/{step}/{attempt}");
    Uuid::new_v5(&COMMAND_ID_NAMESPACE, name.as_bytes())
}

impl Action {
    /// The command id of a [`Action::Send`] by the saga of `order_id`.
    pub fn command_id(&self, order_id: OrderId) -> Option<Uuid> {
        match self {
            Action::Send { step, attempt, .. } => Some(command_id(order_id, step, *attempt)),
            Action::Deadline(_) => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Steps

/// A step of the saga: one command it sends (and may re-send), named stably.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Step {
    /// `reserve:<sku>`
    Reserve(Sku),
    /// `authorise`
    Authorise,
    /// `confirm`
    Confirm,
    /// `capture`
    Capture,
    /// `commit:<sku>`
    Commit(Sku),
    /// `release:<sku>`, a compensation.
    Release(Sku),
    /// `void`, a compensation.
    Void,
    /// `refund`, a compensation.
    Refund,
    /// `reject`, the last step of a compensation.
    Reject,
}

impl Step {
    /// A forward step that is given up (and compensated) when it does not answer in time,
    /// rather than retried.
    fn compensated_on_timeout(&self) -> bool {
        matches!(self, Step::Reserve(_) | Step::Authorise)
    }

    fn is_forward(&self) -> bool {
        matches!(
            self,
            Step::Reserve(_) | Step::Authorise | Step::Confirm | Step::Capture | Step::Commit(_)
        )
    }

    /// Undoes an earlier step: a release, void, refund or the rejection ending a compensation.
    pub fn is_compensation(&self) -> bool {
        !self.is_forward()
    }

    fn first_wait(&self, config: &SagaConfig) -> Duration {
        match self {
            Step::Reserve(_) => config.reservation_timeout,
            Step::Authorise => config.payment_timeout,
            Step::Confirm | Step::Capture | Step::Commit(_) => config.confirmation_timeout,
            Step::Release(_) | Step::Void | Step::Refund | Step::Reject => {
                config.compensation_timeout
            }
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Reserve(sku) => write!(f, "reserve:{sku}"),
            Step::Authorise => f.write_str("authorise"),
            Step::Confirm => f.write_str("confirm"),
            Step::Capture => f.write_str("capture"),
            Step::Commit(sku) => write!(f, "commit:{sku}"),
            Step::Release(sku) => write!(f, "release:{sku}"),
            Step::Void => f.write_str("void"),
            Step::Refund => f.write_str("refund"),
            Step::Reject => f.write_str("reject"),
        }
    }
}

/// Why a string is not a step name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a saga step")]
pub struct UnknownStep(pub String);

impl FromStr for Step {
    type Err = UnknownStep;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let unknown = || UnknownStep(raw.to_owned());
        let with_sku = |sku: &str| Sku::parse(sku).map_err(|_| unknown());
        match raw.split_once(':') {
            None => match raw {
                "authorise" => Ok(Step::Authorise),
                "confirm" => Ok(Step::Confirm),
                "capture" => Ok(Step::Capture),
                "void" => Ok(Step::Void),
                "refund" => Ok(Step::Refund),
                "reject" => Ok(Step::Reject),
                _ => Err(unknown()),
            },
            Some(("reserve", sku)) => with_sku(sku).map(Step::Reserve),
            Some(("commit", sku)) => with_sku(sku).map(Step::Commit),
            Some(("release", sku)) => with_sku(sku).map(Step::Release),
            Some(_) => Err(unknown()),
        }
    }
}

impl TryFrom<String> for Step {
    type Error = UnknownStep;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        raw.parse()
    }
}

impl From<Step> for String {
    fn from(step: Step) -> String {
        step.to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// State

/// Where the saga is, as a read model shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaState {
    /// Created for an order whose `OrderPlaced` it has not seen yet.
    NotStarted,
    ReservingStock,
    AuthorisingPayment,
    Confirming,
    /// Stock reserved, payment captured, order confirmed. The saga still follows the order:
    /// shipping commits the reservations, a cancellation refunds and releases.
    Confirmed,
    /// Shipped, and every reservation committed.
    Completed,
    /// Undoing what was done; `reason` says why.
    Compensating,
    Rejected,
    Cancelled,
    /// A step was retried `max_attempts` times without an answer (see `attention`).
    NeedsAttention,
}

impl SagaState {
    /// The states a saga can be found in once started (every one but `NotStarted`).
    pub const STARTED: [SagaState; 9] = [
        SagaState::ReservingStock,
        SagaState::AuthorisingPayment,
        SagaState::Confirming,
        SagaState::Confirmed,
        SagaState::Completed,
        SagaState::Compensating,
        SagaState::Rejected,
        SagaState::Cancelled,
        SagaState::NeedsAttention,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SagaState::NotStarted => "not_started",
            SagaState::ReservingStock => "reserving_stock",
            SagaState::AuthorisingPayment => "authorising_payment",
            SagaState::Confirming => "confirming",
            SagaState::Confirmed => "confirmed",
            SagaState::Completed => "completed",
            SagaState::Compensating => "compensating",
            SagaState::Rejected => "rejected",
            SagaState::Cancelled => "cancelled",
            SagaState::NeedsAttention => "needs_attention",
        }
    }

    /// A state the saga rests in: nothing is awaited without an operator or a new event from
    /// outside (a shipment, a cancellation).
    pub fn is_resting(self) -> bool {
        matches!(
            self,
            SagaState::Confirmed
                | SagaState::Completed
                | SagaState::Rejected
                | SagaState::Cancelled
                | SagaState::NeedsAttention
        )
    }
}

impl fmt::Display for SagaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The saga's progress through the flow, apart from any parked step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    NotStarted,
    ReservingStock,
    AuthorisingPayment,
    Confirming,
    Confirmed,
    Completed,
    Compensating,
    Rejected,
    Cancelled,
}

impl From<Phase> for SagaState {
    fn from(phase: Phase) -> SagaState {
        match phase {
            Phase::NotStarted => SagaState::NotStarted,
            Phase::ReservingStock => SagaState::ReservingStock,
            Phase::AuthorisingPayment => SagaState::AuthorisingPayment,
            Phase::Confirming => SagaState::Confirming,
            Phase::Confirmed => SagaState::Confirmed,
            Phase::Completed => SagaState::Completed,
            Phase::Compensating => SagaState::Compensating,
            Phase::Rejected => SagaState::Rejected,
            Phase::Cancelled => SagaState::Cancelled,
        }
    }
}

/// The order as placed: what the payment steps need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacedOrder {
    pub total: Money,
    pub payment_token: PaymentToken,
}

/// What the stock events said about one line. The flags are independent facts, so events seen
/// in any order (a release before its reservation) fold to the same state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineProgress {
    pub sku: Sku,
    pub quantity: Quantity,
    pub reserved: bool,
    /// The reservation was refused for want of stock.
    pub unavailable: bool,
    pub released: bool,
    pub committed: bool,
}

impl LineProgress {
    /// Stock may be held for the order: reserved, or not answered yet.
    fn maybe_held(&self) -> bool {
        !self.unavailable && !self.released && !self.committed
    }
}

/// What the payment events said.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentProgress {
    pub authorised: Option<Money>,
    pub declined: Option<String>,
    pub captured: Option<Money>,
    /// The first refund seen (the saga asks for one refund of the whole capture).
    pub refunded: Option<Money>,
    pub voided: bool,
}

/// What the order events said, after `OrderPlaced`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderProgress {
    pub confirmed: bool,
    pub rejected: Option<String>,
    pub cancelled: Option<Cancellation>,
    pub shipped: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancellation {
    pub reason: String,
    pub was_confirmed: bool,
}

/// An event that changed what the saga knows (redeliveries are not recorded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub event_id: Uuid,
    pub event_type: String,
    pub received_at: DateTime<Utc>,
}

/// How a step ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum StepOutcome {
    /// An event settled it: the participant's answer (whichever way it went), or an event that
    /// makes the answer moot (`order.cancelled` for `confirm`, `payment.captured` for `void`).
    Answered { event_id: Uuid, event_type: String },
    /// A forward step that did not answer in time; compensation followed.
    TimedOut,
    /// No longer awaited because the saga began compensating.
    Abandoned,
}

/// One step of the saga, from its first send to its answer: the read model's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: Step,
    pub aggregate_id: String,
    /// The command, kept so that a retry re-sends exactly it.
    pub command: ServiceCommand,
    /// The event that made the saga take the step; `None` when a deadline did.
    pub caused_by: Option<Uuid>,
    pub started_at: DateTime<Utc>,
    pub last_sent_at: DateTime<Utc>,
    /// The attempt number of the last send (1, 2, ...); never reused, even after an operator
    /// retry, so every send is a distinct command id.
    pub attempt: u32,
    /// Sends since the step was started or last retried by an operator.
    pub attempts_this_round: u32,
    /// One per send, in order: see [`command_id`].
    pub command_ids: Vec<Uuid>,
    /// When the answer is due; `None` once finished or parked.
    pub deadline: Option<DateTime<Utc>>,
    /// Set while the step waits for an operator.
    pub parked_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: Option<StepOutcome>,
}

impl StepRecord {
    pub fn is_open(&self) -> bool {
        self.finished_at.is_none()
    }

    /// How the step ended, in a word or the answering event's type: `stock.reserved`,
    /// `timed out`, `abandoned`, `parked` (waiting for an operator) or `waiting`.
    pub fn outcome_text(&self) -> String {
        match &self.outcome {
            Some(StepOutcome::Answered { event_type, .. }) => event_type.clone(),
            Some(StepOutcome::TimedOut) => "timed out".into(),
            Some(StepOutcome::Abandoned) => "abandoned".into(),
            None if self.parked_at.is_some() => "parked".into(),
            None => "waiting".into(),
        }
    }
}

/// Why the saga needs an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attention {
    /// The step's name, as in [`Action::Send`].
    pub step: String,
    pub reason: String,
    pub since: DateTime<Utc>,
}

/// One order's fulfilment saga. Serialisable: the driver stores it as JSON, and its fields are
/// what the saga read model shows. Only [`react`] changes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saga {
    /// The saga's id: one saga per order.
    pub order_id: OrderId,
    /// Derived from `phase` and `attention`, kept for readers of the stored JSON.
    pub state: SagaState,
    pub phase: Phase,
    /// Why the saga is compensating, rejected or cancelled.
    pub reason: Option<String>,
    /// The first parked step, if any.
    pub attention: Option<Attention>,
    /// The next wake-up: the earliest deadline of the steps awaiting an answer.
    pub deadline: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    pub order: Option<PlacedOrder>,
    pub lines: Vec<LineProgress>,
    pub payment: PaymentProgress,
    pub order_progress: OrderProgress,
    pub events: Vec<EventRecord>,
    pub history: Vec<StepRecord>,
}

impl Saga {
    /// The saga of `order_id`, before its `OrderPlaced`.
    pub fn new(order_id: OrderId) -> Saga {
        Saga {
            order_id,
            state: SagaState::NotStarted,
            phase: Phase::NotStarted,
            reason: None,
            attention: None,
            deadline: None,
            started_at: None,
            updated_at: None,
            order: None,
            lines: Vec::new(),
            payment: PaymentProgress::default(),
            order_progress: OrderProgress::default(),
            events: Vec::new(),
            history: Vec::new(),
        }
    }

    /// The record of `step`, if the saga took it.
    pub fn step(&self, step: &Step) -> Option<&StepRecord> {
        self.history.iter().find(|record| &record.step == step)
    }

    /// The steps awaiting an answer (parked ones included).
    pub fn open_steps(&self) -> impl Iterator<Item = &StepRecord> {
        self.history.iter().filter(|record| record.is_open())
    }
}

// ---------------------------------------------------------------------------------------------
// Reacting

/// Decides what the saga does about `input` at `now`: its next state and the actions for the
/// driver, which stores both atomically. Pure and deterministic. An input that changes nothing
/// (a redelivered event, an event for another order, an early wake-up) returns the saga as it
/// was and no action.
pub fn react(
    saga: &Saga,
    input: &Input,
    now: DateTime<Utc>,
    config: &SagaConfig,
) -> (Saga, Vec<Action>) {
    let mut next = saga.clone();
    let mut run = Run {
        now,
        config,
        cause: None,
        sends: Vec::new(),
    };
    let changed = match input {
        Input::Event(event) => {
            run.cause = Some(event.event_id);
            next.learn(event, now)
        }
        Input::DeadlinePassed => next.deadline_passed(&mut run),
        Input::OperatorRetry => next.operator_retry(&mut run),
    };
    if !changed {
        return (saga.clone(), Vec::new());
    }
    next.advance(&mut run);
    next.refresh(now);
    let mut actions = run.sends;
    if next.deadline != saga.deadline {
        actions.push(Action::Deadline(next.deadline));
    }
    (next, actions)
}

/// One reaction in progress: the clock, the settings, the cause of any step taken, and the
/// sends so far.
struct Run<'a> {
    now: DateTime<Utc>,
    config: &'a SagaConfig,
    cause: Option<Uuid>,
    sends: Vec<Action>,
}

impl Saga {
    /// Folds an event into the facts and closes the steps it answers. False if it told the saga
    /// nothing new.
    fn learn(&mut self, event: &SagaEvent, now: DateTime<Utc>) -> bool {
        if event.order_id() != self.order_id || !self.apply(&event.fact) {
            return false;
        }
        let event_type = event.fact.event_type();
        self.events.push(EventRecord {
            event_id: event.event_id,
            event_type: event_type.to_owned(),
            received_at: now,
        });
        let answered: Vec<usize> = self
            .history
            .iter()
            .enumerate()
            .filter(|(_, record)| record.is_open() && self.is_answered(&record.step))
            .map(|(index, _)| index)
            .collect();
        for index in answered {
            self.history[index].finish(
                now,
                StepOutcome::Answered {
                    event_id: event.event_id,
                    event_type: event_type.to_owned(),
                },
            );
        }
        true
    }

    /// Records a fact; false if it was already known (or is not about a line of this order).
    fn apply(&mut self, fact: &Fact) -> bool {
        if let Fact::OrderPlaced {
            lines,
            total,
            payment_token,
            ..
        } = fact
        {
            if self.order.is_some() {
                return false;
            }
            self.order = Some(PlacedOrder {
                total: *total,
                payment_token: payment_token.clone(),
            });
            self.lines = lines
                .iter()
                .map(|line| LineProgress {
                    sku: line.sku.clone(),
                    quantity: line.quantity,
                    reserved: false,
                    unavailable: false,
                    released: false,
                    committed: false,
                })
                .collect();
            return true;
        }
        // Nothing about an order can be understood before its placement.
        if self.order.is_none() {
            return false;
        }
        match fact {
            Fact::OrderPlaced { .. } => false,
            Fact::OrderConfirmed { .. } => set(&mut self.order_progress.confirmed),
            Fact::OrderRejected { reason, .. } => {
                set_once(&mut self.order_progress.rejected, reason.clone())
            }
            Fact::OrderCancelled {
                reason,
                was_confirmed,
                ..
            } => set_once(
                &mut self.order_progress.cancelled,
                Cancellation {
                    reason: reason.clone(),
                    was_confirmed: *was_confirmed,
                },
            ),
            Fact::OrderShipped { .. } => set(&mut self.order_progress.shipped),
            Fact::PaymentAuthorised { amount, .. } => {
                set_once(&mut self.payment.authorised, *amount)
            }
            Fact::PaymentDeclined { reason, .. } => {
                set_once(&mut self.payment.declined, reason.clone())
            }
            Fact::PaymentCaptured { amount, .. } => set_once(&mut self.payment.captured, *amount),
            Fact::PaymentRefunded { amount, .. } => set_once(&mut self.payment.refunded, *amount),
            Fact::PaymentVoided { .. } => set(&mut self.payment.voided),
            Fact::StockReserved { sku, .. } => self.line_fact(sku, |line| &mut line.reserved),
            Fact::StockReservationRejected { sku, .. } => {
                self.line_fact(sku, |line| &mut line.unavailable)
            }
            Fact::StockReservationReleased { sku, .. } => {
                self.line_fact(sku, |line| &mut line.released)
            }
            Fact::StockReservationCommitted { sku, .. } => {
                self.line_fact(sku, |line| &mut line.committed)
            }
        }
    }

    fn line_fact(&mut self, sku: &Sku, flag: impl FnOnce(&mut LineProgress) -> &mut bool) -> bool {
        self.lines
            .iter_mut()
            .find(|line| &line.sku == sku)
            .is_some_and(|line| set(flag(line)))
    }

    fn line(&self, sku: &Sku) -> Option<&LineProgress> {
        self.lines.iter().find(|line| &line.sku == sku)
    }

    /// Whether the facts settle `step`: its answer, or an event that makes the answer moot.
    fn is_answered(&self, step: &Step) -> bool {
        let payment = &self.payment;
        let order = &self.order_progress;
        match step {
            Step::Reserve(sku) => self
                .line(sku)
                .is_none_or(|line| line.reserved || line.unavailable),
            // A void can overtake the authorisation and make it impossible.
            Step::Authorise => {
                payment.authorised.is_some() || payment.declined.is_some() || payment.voided
            }
            // A cancelled or rejected order refuses the confirmation without an event.
            Step::Confirm => {
                order.confirmed || order.cancelled.is_some() || order.rejected.is_some()
            }
            Step::Capture => payment.captured.is_some() || payment.voided,
            Step::Commit(sku) => self.line(sku).is_none_or(|line| line.committed),
            // A release behind a refused reservation has nothing to release, and says nothing.
            Step::Release(sku) => self.line(sku).is_none_or(|line| !line.maybe_held()),
            // Voiding a declined payment changes nothing and says nothing; voiding a captured one
            // is refused (a refund follows instead).
            Step::Void => {
                payment.voided || payment.declined.is_some() || payment.captured.is_some()
            }
            Step::Refund => payment.refunded.is_some(),
            // The customer's cancellation overtook the rejection, which is then refused.
            Step::Reject => order.rejected.is_some() || order.cancelled.is_some(),
        }
    }

    fn has_taken(&self, step: &Step) -> bool {
        self.step(step).is_some()
    }

    /// Handles the steps whose deadline has passed: a late reservation or authorisation starts
    /// compensation; any other step is re-sent, or parked once out of attempts.
    fn deadline_passed(&mut self, run: &mut Run<'_>) -> bool {
        let due: Vec<usize> = self
            .history
            .iter()
            .enumerate()
            .filter(|(_, record)| {
                record.is_open() && record.deadline.is_some_and(|deadline| deadline <= run.now)
            })
            .map(|(index, _)| index)
            .collect();
        if due.is_empty() {
            return false;
        }
        let mut late_reservations = Vec::new();
        let mut late_payment = false;
        for index in due {
            let step = self.history[index].step.clone();
            if !step.compensated_on_timeout() {
                self.retry_or_park(index, run);
                continue;
            }
            self.history[index].finish(run.now, StepOutcome::TimedOut);
            match step {
                Step::Reserve(sku) => late_reservations.push(sku.to_string()),
                _ => late_payment = true,
            }
        }
        if late_payment {
            self.compensate(
                "timed out waiting for the payment authorisation".to_owned(),
                run,
            );
        } else if !late_reservations.is_empty() {
            self.compensate(
                format!(
                    "timed out waiting for the stock reservation of {}",
                    late_reservations.join(", ")
                ),
                run,
            );
        }
        true
    }

    fn retry_or_park(&mut self, index: usize, run: &mut Run<'_>) {
        let record = &mut self.history[index];
        if record.attempts_this_round >= run.config.attempts_allowed() {
            record.deadline = None;
            record.parked_at = Some(run.now);
        } else {
            self.resend(index, run);
        }
    }

    /// Re-sends every parked step, in a new round of attempts.
    fn operator_retry(&mut self, run: &mut Run<'_>) -> bool {
        let parked: Vec<usize> = self
            .history
            .iter()
            .enumerate()
            .filter(|(_, record)| record.is_open() && record.parked_at.is_some())
            .map(|(index, _)| index)
            .collect();
        for &index in &parked {
            let record = &mut self.history[index];
            record.parked_at = None;
            record.attempts_this_round = 0;
            self.resend(index, run);
        }
        !parked.is_empty()
    }

    /// Moves through the flow as far as the facts allow, taking each step at most once.
    fn advance(&mut self, run: &mut Run<'_>) {
        loop {
            let before = self.phase;
            match self.phase {
                Phase::NotStarted => self.start(run),
                Phase::ReservingStock => self.reserving(run),
                Phase::AuthorisingPayment => self.authorising(run),
                Phase::Confirming => self.confirming(run),
                Phase::Confirmed => self.confirmed(run),
                Phase::Compensating => self.compensating(run),
                Phase::Completed | Phase::Rejected | Phase::Cancelled => {}
            }
            if self.phase == before {
                break;
            }
        }
    }

    fn start(&mut self, run: &mut Run<'_>) {
        if self.order.is_none() {
            return;
        }
        self.started_at = Some(run.now);
        self.phase = Phase::ReservingStock;
        for line in self.lines.clone() {
            self.take(
                Step::Reserve(line.sku.clone()),
                line.sku.to_string(),
                ServiceCommand::ReserveStock {
                    order_id: self.order_id,
                    quantity: line.quantity,
                },
                run,
            );
        }
    }

    fn reserving(&mut self, run: &mut Run<'_>) {
        let unavailable: Vec<String> = self
            .lines
            .iter()
            .filter(|line| line.unavailable)
            .map(|line| line.sku.to_string())
            .collect();
        if let Some(reason) = self.ended_by_order() {
            self.compensate(reason, run);
        } else if !unavailable.is_empty() {
            self.compensate(
                format!("stock unavailable for {}", unavailable.join(", ")),
                run,
            );
        } else if self.lines.iter().all(|line| line.reserved) {
            let Some(order) = self.order.clone() else {
                return;
            };
            self.phase = Phase::AuthorisingPayment;
            self.take(
                Step::Authorise,
                self.order_id.to_string(),
                ServiceCommand::AuthorisePayment {
                    amount: order.total,
                    token: order.payment_token,
                },
                run,
            );
        }
    }

    fn authorising(&mut self, run: &mut Run<'_>) {
        if let Some(reason) = self.ended_by_order() {
            self.compensate(reason, run);
        } else if let Some(declined) = &self.payment.declined {
            self.compensate(format!("payment declined: {declined}"), run);
        } else if self.payment.voided {
            self.compensate("payment voided".to_owned(), run);
        } else if self.payment.authorised.is_some() {
            self.phase = Phase::Confirming;
            let order_id = self.order_id.to_string();
            self.take(
                Step::Confirm,
                order_id.clone(),
                ServiceCommand::ConfirmOrder,
                run,
            );
            self.take(
                Step::Capture,
                order_id,
                ServiceCommand::CapturePayment { amount: None },
                run,
            );
        }
    }

    fn confirming(&mut self, run: &mut Run<'_>) {
        if let Some(reason) = self.ended_by_order() {
            self.compensate(reason, run);
        } else if self.order_progress.confirmed && self.payment.captured.is_some() {
            self.phase = Phase::Confirmed;
        }
    }

    fn confirmed(&mut self, run: &mut Run<'_>) {
        if let Some(reason) = self.ended_by_order() {
            self.compensate(reason, run);
        } else if self.order_progress.shipped {
            for line in self.lines.clone() {
                let step = Step::Commit(line.sku.clone());
                if !self.has_taken(&step) {
                    self.take(
                        step,
                        line.sku.to_string(),
                        ServiceCommand::CommitStock {
                            order_id: self.order_id,
                        },
                        run,
                    );
                }
            }
            if self.lines.iter().all(|line| line.committed) {
                self.phase = Phase::Completed;
            }
        }
    }

    /// Why the order ended without the saga: cancelled by the customer (or rejected elsewhere).
    fn ended_by_order(&self) -> Option<String> {
        if let Some(cancelled) = &self.order_progress.cancelled {
            Some(format!("order cancelled: {}", cancelled.reason))
        } else {
            self.order_progress
                .rejected
                .as_ref()
                .map(|reason| format!("order rejected: {reason}"))
        }
    }

    /// Starts undoing what was done: no forward step is awaited any more.
    fn compensate(&mut self, reason: String, run: &Run<'_>) {
        self.reason = Some(fit(&reason));
        self.phase = Phase::Compensating;
        for record in self.history.iter_mut() {
            if record.is_open() && record.step.is_forward() {
                record.finish(run.now, StepOutcome::Abandoned);
            }
        }
    }

    /// Sends every compensation still needed (payment first: it was the later step), and once
    /// all are acknowledged ends the saga: cancelled if the customer cancelled, rejected
    /// otherwise (after asking the order to reject itself).
    fn compensating(&mut self, run: &mut Run<'_>) {
        let reason = self.reason.clone().unwrap_or_else(|| fit(""));
        let order_id = self.order_id.to_string();
        let payment_held = self.has_taken(&Step::Authorise)
            && self.payment.declined.is_none()
            && !self.payment.voided;
        if payment_held {
            match self.payment.captured {
                Some(captured) => {
                    // A capture of nothing leaves nothing to refund (and a refund of nothing
                    // would be refused).
                    if captured.amount_minor > 0
                        && self.payment.refunded.is_none()
                        && !self.has_taken(&Step::Refund)
                    {
                        self.take(
                            Step::Refund,
                            order_id.clone(),
                            ServiceCommand::RefundPayment {
                                amount: captured,
                                reason: reason.clone(),
                            },
                            run,
                        );
                    }
                }
                None => {
                    if !self.has_taken(&Step::Void) {
                        self.take(
                            Step::Void,
                            order_id.clone(),
                            ServiceCommand::VoidPayment {
                                reason: reason.clone(),
                            },
                            run,
                        );
                    }
                }
            }
        }
        for line in self.lines.clone() {
            let release = Step::Release(line.sku.clone());
            if self.has_taken(&Step::Reserve(line.sku.clone()))
                && line.maybe_held()
                && !self.has_taken(&release)
            {
                self.take(
                    release,
                    line.sku.to_string(),
                    ServiceCommand::ReleaseStock {
                        order_id: self.order_id,
                    },
                    run,
                );
            }
        }
        if !self.compensated() {
            return;
        }
        if self.order_progress.cancelled.is_some() {
            self.phase = Phase::Cancelled;
        } else if self.order_progress.rejected.is_some() {
            self.phase = Phase::Rejected;
        } else if !self.has_taken(&Step::Reject) {
            self.take(
                Step::Reject,
                order_id,
                ServiceCommand::RejectOrder { reason },
                run,
            );
        }
    }

    /// Nothing is held for the order any more: no reservation, no authorised or captured money.
    fn compensated(&self) -> bool {
        let payment = &self.payment;
        let payment_settled = !self.has_taken(&Step::Authorise)
            || payment.declined.is_some()
            || payment.voided
            || payment
                .captured
                .is_some_and(|captured| captured.amount_minor == 0 || payment.refunded.is_some());
        let stock_settled = self
            .lines
            .iter()
            .all(|line| !line.maybe_held() || !self.has_taken(&Step::Reserve(line.sku.clone())));
        payment_settled && stock_settled
    }

    /// Takes a step: records it and sends its first attempt.
    fn take(
        &mut self,
        step: Step,
        aggregate_id: String,
        command: ServiceCommand,
        run: &mut Run<'_>,
    ) {
        let deadline = after(run.now, step.first_wait(run.config));
        self.history.push(StepRecord {
            step,
            aggregate_id,
            command,
            caused_by: run.cause,
            started_at: run.now,
            last_sent_at: run.now,
            attempt: 0,
            attempts_this_round: 0,
            command_ids: Vec::new(),
            deadline: Some(deadline),
            parked_at: None,
            finished_at: None,
            outcome: None,
        });
        let index = self.history.len() - 1;
        self.resend(index, run);
    }

    /// Sends the next attempt of a step and sets the deadline of its answer.
    fn resend(&mut self, index: usize, run: &mut Run<'_>) {
        let order_id = self.order_id;
        let record = &mut self.history[index];
        record.attempt += 1;
        record.attempts_this_round += 1;
        record.last_sent_at = run.now;
        let step = record.step.to_string();
        record
            .command_ids
            .push(command_id(order_id, &step, record.attempt));
        let wait = run.config.retry_wait(
            record.step.first_wait(run.config),
            record.attempts_this_round,
        );
        record.deadline = Some(after(run.now, wait));
        run.sends.push(Action::Send {
            aggregate_id: record.aggregate_id.clone(),
            command: record.command.clone(),
            step,
            attempt: record.attempt,
        });
    }

    /// Recomputes what is derived: the next wake-up, the parked step, the state name.
    fn refresh(&mut self, now: DateTime<Utc>) {
        self.deadline = self.open_steps().filter_map(|record| record.deadline).min();
        let attention = self
            .open_steps()
            .filter_map(|record| {
                record.parked_at.map(|since| Attention {
                    step: record.step.to_string(),
                    reason: format!(
                        "no answer to {} after {} attempts",
                        record.command.name(),
                        record.attempts_this_round
                    ),
                    since,
                })
            })
            .next();
        self.attention = attention;
        self.state = if self.attention.is_some() {
            SagaState::NeedsAttention
        } else {
            self.phase.into()
        };
        self.updated_at = Some(now);
    }
}

impl StepRecord {
    fn finish(&mut self, now: DateTime<Utc>, outcome: StepOutcome) {
        self.finished_at = Some(now);
        self.deadline = None;
        self.parked_at = None;
        self.outcome = Some(outcome);
    }
}

fn set(flag: &mut bool) -> bool {
    !std::mem::replace(flag, true)
}

fn set_once<T>(slot: &mut Option<T>, value: T) -> bool {
    if slot.is_some() {
        return false;
    }
    *slot = Some(value);
    true
}

fn after(now: DateTime<Utc>, wait: Duration) -> DateTime<Utc> {
    TimeDelta::from_std(wait)
        .ok()
        .and_then(|wait| now.checked_add_signed(wait))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// A reason the order and payment aggregates accept: trimmed, not empty, not too long.
fn fit(reason: &str) -> String {
    let text: String = reason.trim().chars().take(MAX_REASON_LEN).collect();
    let text = text.trim_end();
    if text.is_empty() {
        "order fulfilment did not go ahead".to_owned()
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests;
