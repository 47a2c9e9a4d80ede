//! A given/when/then harness for aggregates, so tests read as the rule they check:
//!
//! ```
//! use domain::stock::{StockAggregate, StockCommand, StockEvent, StockError};
//! use domain::testing::Scenario;
//!
//! StockAggregate::given([])
//!     .when(StockCommand::Adjust { delta: 0, reason: "count".into() })
//!     .then_err(StockError::ZeroAdjustment);
//! ```

use crate::aggregate::{Aggregate, Decision};

/// The starting point of a scenario: an aggregate's past events.
#[derive(Debug)]
pub struct Given<A: Aggregate> {
    state: A::State,
}

/// A command decided against the given history.
#[derive(Debug)]
pub struct When<A: Aggregate> {
    state: A::State,
    command: A::Command,
    outcome: Result<Decision<A::Event>, A::Error>,
}

/// `Aggregate::given(events)` for every aggregate.
pub trait Scenario: Aggregate + Sized {
    fn given(events: impl IntoIterator<Item = Self::Event>) -> Given<Self> {
        let state = events
            .into_iter()
            .fold(Self::State::default(), |state, event| {
                Self::evolve(state, &event)
            });
        Given { state }
    }
}

impl<A: Aggregate> Scenario for A {}

impl<A: Aggregate> Given<A> {
    pub fn when(self, command: A::Command) -> When<A> {
        let outcome = A::decide(&self.state, &command);
        When {
            state: self.state,
            command,
            outcome,
        }
    }

    /// The state folded from the given events.
    pub fn state(&self) -> &A::State {
        &self.state
    }
}

impl<A: Aggregate> When<A>
where
    A::Event: PartialEq,
{
    /// The command yields exactly this event; returns the state after it.
    #[track_caller]
    pub fn then(self, expected: A::Event) -> A::State {
        match self.outcome {
            Ok(Decision::Append(event)) => {
                assert_eq!(event, expected, "after {:?}", self.command);
                A::evolve(self.state, &event)
            }
            other => panic!(
                "expected {expected:?} from {:?}, got {other:?}",
                self.command
            ),
        }
    }

    /// The command has already taken effect: nothing to append.
    #[track_caller]
    pub fn then_unchanged(self) {
        match self.outcome {
            Ok(Decision::Unchanged) => {}
            other => panic!("expected no change from {:?}, got {other:?}", self.command),
        }
    }

    /// The command breaks this rule.
    #[track_caller]
    pub fn then_err(self, expected: A::Error) {
        match self.outcome {
            Err(error) => assert_eq!(error, expected, "after {:?}", self.command),
            other => panic!(
                "expected error {expected:?} from {:?}, got {other:?}",
                self.command
            ),
        }
    }
}
