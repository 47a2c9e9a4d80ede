//! The shape every aggregate shares.

use std::fmt::Debug;

/// What a command decided: one new event, or nothing because the command had already taken
/// effect (natural idempotency, e.g. a second reservation for the same order and SKU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<E> {
    /// Append this event: it becomes the aggregate's next version.
    Append(E),
    /// The command is already reflected in the state; append nothing and report the current
    /// version as its outcome.
    Unchanged,
}

impl<E> Decision<E> {
    /// The event to append, if any.
    pub fn into_event(self) -> Option<E> {
        match self {
            Decision::Append(event) => Some(event),
            Decision::Unchanged => None,
        }
    }
}

/// A consistency boundary: a state folded from its own events, and the rules that decide
/// commands against it.
///
/// Implementations must keep `decide` and `evolve` pure: no IO, no clock, no randomness. `evolve`
/// must accept every event `decide` can produce (and every event ever stored, after upcasting)
/// without panicking: history is a fact and cannot be refused.
pub trait Aggregate {
    /// The stable name of this aggregate type, used in topic names and envelopes.
    const TYPE: &'static str;
    /// The folded state; `Default` is the state before the first event.
    type State: Default + Clone + Debug;
    type Command: Debug;
    type Event: Clone + Debug;
    type Error: std::error::Error + Clone + PartialEq;

    /// Decides a command against the current state: the event it yields, [`Decision::Unchanged`]
    /// when it has already taken effect, or the business rule it breaks.
    fn decide(
        state: &Self::State,
        command: &Self::Command,
    ) -> Result<Decision<Self::Event>, Self::Error>;

    /// Folds one event into the state. Never fails and never validates.
    fn evolve(state: Self::State, event: &Self::Event) -> Self::State;

    /// Folds a whole history, from the initial state.
    fn fold<'a>(events: impl IntoIterator<Item = &'a Self::Event>) -> Self::State
    where
        Self::Event: 'a,
    {
        events
            .into_iter()
            .fold(Self::State::default(), |state, event| {
                Self::evolve(state, event)
            })
    }
}
