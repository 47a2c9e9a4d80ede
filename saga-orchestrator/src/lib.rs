//! The order-fulfilment saga, as a pure state machine: reserve stock for every line, authorise
//! the payment, then confirm the order and capture the payment; on a refusal, a missed deadline
//! or a cancellation, compensate what was done, in reverse (see `ARCHITECTURE.md`, "Sagas").
//!
//! [`react`]`(&saga, &input, now, &config) -> (saga, actions)` is the whole of it. It does no IO
//! and reads no clock: a driver ([`driver`]) feeds it the participants' events
//! ([`SagaEvent::from_envelope`]) and its own wake-ups, and in one transaction stores the new
//! [`Saga`] (as JSON) with the commands of its [`Action::Send`]s in an outbox, and the wake-up of
//! its [`Action::Deadline`]. Command ids are derived with [`command_id`] from the saga, the step
//! and the attempt, so a send repeated after a crash is one command to its participant.
//!
//! # Layout
//! - [`saga`]: everything the state machine is made of: [`SagaConfig`], the inputs ([`Input`],
//!   [`SagaEvent`] and its [`Fact`]), the [`Action`]s, the [`Saga`] with its read-model fields
//!   ([`SagaState`], [`StepRecord`] history, [`Attention`]) and [`react`]. The module docs
//!   explain how duplicates, late answers, retries and parking are handled.
//! - [`testing`]: a given/when/then harness for the saga (`Scenario`), used by the tests beside
//!   the code (`saga/tests.rs`); the property test that drives the saga against the real
//!   aggregates with shuffled, duplicated and dropped messages is `tests/properties.rs`.
//!
//! [`saga`] and [`testing`] use no IO: the commands the saga emits are
//! `event_schema::commands::ServiceCommand`. The IO is in:
//! - [`driver`]: the saga as a consumer of events (through the projection runtime), its store
//!   and outbox, the deadline ticker and the outbox relay;
//! - [`side`]: starting all of that for one process ([`side::SagaSide`]);
//! - [`http`]: `GET /sagas/{order_id}`, `GET /sagas?state=…&stuck_for=…`, `POST …/retry`.

pub mod driver;
pub mod http;
pub mod saga;
pub mod side;
pub mod testing;

pub use saga::{
    Action, Attention, Fact, Input, Phase, Saga, SagaConfig, SagaEvent, SagaEventError, SagaState,
    Step, StepOutcome, StepRecord, command_id, react,
};
