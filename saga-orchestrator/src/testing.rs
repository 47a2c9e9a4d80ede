//! A given/when/then harness for the saga, so tests read as the rule they check:
//!
//! ```
//! use saga_orchestrator::testing::{Scenario, event};
//! use saga_orchestrator::{Fact, SagaState};
//! use domain::OrderId;
//! use uuid::Uuid;
//!
//! let order_id = OrderId(Uuid::from_u128(1));
//! Scenario::new(order_id)
//!     .when(event(Fact::OrderConfirmed { order_id }))
//!     .then_nothing() // nothing is understood before the order is placed
//!     .expect_state(SagaState::NotStarted);
//! ```

use std::time::Duration;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use domain::OrderId;
use uuid::Uuid;

use crate::saga::{Action, Fact, Input, Saga, SagaConfig, SagaEvent, SagaState, react};

/// The clock every scenario starts at.
pub fn start_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// `fact` as an input, with an event id derived from the fact: the same fact given twice is a
/// redelivery of one stored event.
pub fn event(fact: Fact) -> Input {
    let namespace = Uuid::from_u128(0x0b5e_77c1_2d4a_4f6e_9a31_c0de_5a6a_0001);
    let serialised = format!("{fact:?}");
    Input::Event(SagaEvent {
        event_id: Uuid::new_v5(&namespace, serialised.as_bytes()),
        fact,
    })
}

/// A saga, its settings and a clock; inputs are applied at the clock's time.
#[derive(Debug, Clone)]
pub struct Scenario {
    config: SagaConfig,
    saga: Saga,
    now: DateTime<Utc>,
}

/// An input decided against a scenario.
#[derive(Debug)]
pub struct When {
    before: Scenario,
    input: Input,
    saga: Saga,
    actions: Vec<Action>,
}

impl Scenario {
    /// A fresh saga for `order_id`, default settings, the clock at [`start_time`].
    pub fn new(order_id: OrderId) -> Self {
        Scenario {
            config: SagaConfig::default(),
            saga: Saga::new(order_id),
            now: start_time(),
        }
    }

    pub fn with_config(mut self, config: SagaConfig) -> Self {
        self.config = config;
        self
    }

    /// Applies past inputs at the current time, whatever they cause.
    pub fn given(mut self, inputs: impl IntoIterator<Item = Input>) -> Self {
        for input in inputs {
            self.saga = react(&self.saga, &input, self.now, &self.config).0;
        }
        self
    }

    /// Moves the clock on.
    pub fn after(mut self, wait: Duration) -> Self {
        self.now += TimeDelta::from_std(wait).unwrap_or(TimeDelta::MAX);
        self
    }

    /// Moves the clock to the saga's deadline, if it has one.
    pub fn at_deadline(mut self) -> Self {
        if let Some(deadline) = self.saga.deadline {
            self.now = self.now.max(deadline);
        }
        self
    }

    pub fn when(self, input: Input) -> When {
        let (saga, actions) = react(&self.saga, &input, self.now, &self.config);
        When {
            before: self,
            input,
            saga,
            actions,
        }
    }

    /// The saga's deadline comes: the clock moves to it and the saga is woken up.
    #[track_caller]
    pub fn when_deadline_passes(self) -> When {
        assert!(
            self.saga.deadline.is_some(),
            "the saga has no deadline in state {}",
            self.saga.state
        );
        self.at_deadline().when(Input::DeadlinePassed)
    }

    pub fn saga(&self) -> &Saga {
        &self.saga
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.now
    }

    /// The time `wait` after the clock.
    pub fn later(&self, wait: Duration) -> DateTime<Utc> {
        self.now + TimeDelta::from_std(wait).unwrap_or(TimeDelta::MAX)
    }

    #[track_caller]
    pub fn expect_state(self, expected: SagaState) -> Self {
        assert_eq!(
            self.saga.state, expected,
            "saga state (reason {:?}, attention {:?})",
            self.saga.reason, self.saga.attention
        );
        self
    }
}

impl When {
    /// The input yields exactly these actions, in this order; the scenario goes on from the
    /// saga it produced.
    #[track_caller]
    pub fn then(self, expected: impl IntoIterator<Item = Action>) -> Scenario {
        let expected: Vec<Action> = expected.into_iter().collect();
        assert_eq!(
            self.actions, expected,
            "actions after {:?} in state {}",
            self.input, self.before.saga.state
        );
        self.and()
    }

    /// The input changes nothing: no action, and the saga as it was.
    #[track_caller]
    pub fn then_nothing(self) -> Scenario {
        assert_eq!(
            self.actions,
            Vec::<Action>::new(),
            "actions after {:?} in state {}",
            self.input,
            self.before.saga.state
        );
        assert_eq!(
            self.saga, self.before.saga,
            "the saga changed after {:?}",
            self.input
        );
        self.and()
    }

    pub fn actions(&self) -> &[Action] {
        &self.actions
    }

    pub fn saga(&self) -> &Saga {
        &self.saga
    }

    /// Goes on from the saga the input produced, whatever its actions.
    pub fn and(self) -> Scenario {
        Scenario {
            saga: self.saga,
            ..self.before
        }
    }
}
