//! The saga against the real aggregates, whatever the timing.
//!
//! A small world plays the participants: the order, payment and stock aggregates of the `domain`
//! crate decide the saga's commands (deduped by command id, one aggregate's commands in the
//! order they were sent, like a command-topic partition), a payment provider approves, declines
//! or never answers, and the customer may cancel or the warehouse ship at any moment. Every event
//! goes through its envelope and [`SagaEvent::from_envelope`], and the saga goes through JSON
//! between inputs, as the driver stores it.
//!
//! A random schedule then decides what happens next: a participant decides its next command (or,
//! in some runs, loses it), an event reaches the saga (in any order, across and within
//! aggregates), an event is delivered again, a deadline passes, the clock moves, an operator
//! retries. After the schedule the world is left to settle: every command decided, every event
//! delivered, every deadline allowed to pass. Then the saga must rest, and nothing it undid may
//! still be held.

use std::collections::{BTreeMap, HashSet, VecDeque};

use chrono::{DateTime, TimeDelta, Utc};
use domain::order::{OrderAggregate, OrderCommand, OrderLine, OrderState, OrderStatus, PlaceOrder};
use domain::payment::{
    PaymentAggregate, PaymentCommand, PaymentState, PaymentStatus, ProviderAnswer,
};
use domain::stock::{StockAggregate, StockCommand, StockItem};
use domain::{Aggregate, CustomerId, Decision, OrderId, PaymentToken, Quantity, Sku};
use event_schema::catalog::EventCodec;
use event_schema::commands::ServiceCommand;
use event_schema::{CommandMeta, Envelope};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use saga_orchestrator::testing::start_time;
use saga_orchestrator::{
    Action, Fact, Input, Saga, SagaConfig, SagaEvent, SagaState, command_id, react,
};
use uuid::Uuid;

const CASES: u32 = 512;
const MAX_OPS: usize = 120;

// ---------------------------------------------------------------------------------------------
// The schedule

#[derive(Debug, Clone, Copy)]
enum Provider {
    Approves,
    Declines,
    NeverAnswers,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    /// A participant decides the next command of one of its aggregates.
    Decide(usize),
    /// A participant loses the next command of one of its aggregates (only in runs that allow
    /// it): no event, as when a command is not decided.
    Lose(usize),
    /// An event not yet seen by the saga reaches it.
    Deliver(usize),
    /// An event the saga has seen reaches it again.
    Redeliver(usize),
    /// The saga's deadline comes.
    Deadline,
    /// The saga is woken up before its deadline.
    EarlyWakeUp,
    /// The clock moves on, in milliseconds.
    Tick(u64),
    CustomerCancels,
    WarehouseShips,
    OperatorRetries,
}

/// What happens once the world has settled, before it settles again.
#[derive(Debug, Clone, Copy)]
enum Epilogue {
    Nothing,
    WarehouseShips,
    CustomerCancels,
}

#[derive(Debug, Clone)]
struct Case {
    /// Quantity, unit price and units on hand of each line.
    lines: Vec<(u32, i64, u64)>,
    provider: Provider,
    ops: Vec<Op>,
    /// Where in the schedule the customer cancels, if at all.
    cancel_at: Option<usize>,
    epilogue: Epilogue,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => any::<usize>().prop_map(Op::Decide),
        1 => any::<usize>().prop_map(Op::Lose),
        12 => any::<usize>().prop_map(Op::Deliver),
        3 => any::<usize>().prop_map(Op::Redeliver),
        1 => Just(Op::Deadline),
        1 => Just(Op::EarlyWakeUp),
        1 => (0u64..4_000).prop_map(Op::Tick),
        1 => Just(Op::WarehouseShips),
        1 => Just(Op::OperatorRetries),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        vec((1u32..=3, 0i64..=2_000, 0u64..=6), 1..=3),
        prop_oneof![
            3 => Just(Provider::Approves),
            1 => Just(Provider::Declines),
            1 => Just(Provider::NeverAnswers),
        ],
        vec(op(), 0..MAX_OPS),
        proptest::option::weighted(0.25, 0..MAX_OPS),
        prop_oneof![
            Just(Epilogue::Nothing),
            Just(Epilogue::WarehouseShips),
            Just(Epilogue::CustomerCancels),
        ],
    )
        .prop_map(|(lines, provider, ops, cancel_at, epilogue)| Case {
            lines,
            provider,
            ops,
            cancel_at,
            epilogue,
        })
}

// ---------------------------------------------------------------------------------------------
// The world

struct World {
    config: SagaConfig,
    now: DateTime<Utc>,
    order_id: OrderId,
    skus: Vec<Sku>,
    saga: Saga,
    order: OrderState,
    payment: PaymentState,
    stock: BTreeMap<Sku, StockItem>,
    provider: Provider,
    /// Commands not yet decided, per aggregate, in the order they were sent.
    queues: BTreeMap<String, VecDeque<(Uuid, ServiceCommand)>>,
    /// Command ids already decided: participants dedupe by them.
    decided: HashSet<Uuid>,
    /// Every event the participants wrote, and whether the saga has seen it.
    log: Vec<(SagaEvent, bool)>,
    /// What the saga was told (first deliveries only).
    told: Vec<Fact>,
    /// Every (step, attempt) the saga sent.
    sent: HashSet<(String, u32)>,
    lost: usize,
}

fn fail(message: String) -> TestCaseError {
    TestCaseError::fail(message)
}

impl World {
    fn new(case: &Case) -> Result<World, TestCaseError> {
        let order_id = OrderId(Uuid::from_u128(42));
        let skus: Vec<Sku> = (0..case.lines.len())
            .map(|index| Sku::parse(&format!("SKU-{index}")).expect("a valid sku"))
            .collect();
        let lines: Vec<OrderLine> = case
            .lines
            .iter()
            .zip(&skus)
            .map(|(&(quantity, unit_price_minor, _), sku)| OrderLine {
                sku: sku.clone(),
                quantity: Quantity::new(quantity).expect("a positive quantity"),
                unit_price_minor,
            })
            .collect();
        let stock = case
            .lines
            .iter()
            .zip(&skus)
            .map(|(&(_, _, on_hand), sku)| {
                (
                    sku.clone(),
                    StockItem {
                        on_hand,
                        ..StockItem::default()
                    },
                )
            })
            .collect();
        let mut world = World {
            config: SagaConfig::default(),
            now: start_time(),
            order_id,
            skus,
            saga: Saga::new(order_id),
            order: OrderState::NotPlaced,
            payment: PaymentState::NotStarted,
            stock,
            provider: case.provider,
            queues: BTreeMap::new(),
            decided: HashSet::new(),
            log: Vec::new(),
            told: Vec::new(),
            sent: HashSet::new(),
            lost: 0,
        };
        let place = OrderCommand::Place(PlaceOrder {
            order_id,
            customer_id: CustomerId::parse("customer-1").expect("a valid customer id"),
            currency: "EUR".parse().expect("EUR is ISO 4217"),
            payment_token: PaymentToken::parse("tok_visa").expect("a valid token"),
            lines,
        });
        world.order_decides(&place);
        world.deliver(0)?;
        Ok(world)
    }

    // The participants

    fn write<A: EventCodec>(&mut self, aggregate_id: &str, event: &A::Event) {
        let envelope =
            Envelope::new::<A>(aggregate_id, 1, event, &CommandMeta::new("test"), self.now);
        let read = SagaEvent::from_envelope(&envelope).expect("every event is readable");
        if let Some(event) = read {
            self.log.push((event, false));
        }
    }

    fn order_decides(&mut self, command: &OrderCommand) {
        if let Ok(Decision::Append(event)) = OrderAggregate::decide(&self.order, command) {
            self.order = OrderAggregate::evolve(self.order.clone(), &event);
            self.write::<OrderAggregate>(&self.order_id.to_string(), &event);
        }
    }

    fn payment_decides(&mut self, command: &PaymentCommand) {
        if let Ok(Decision::Append(event)) = PaymentAggregate::decide(&self.payment, command) {
            self.payment = PaymentAggregate::evolve(self.payment.clone(), &event);
            self.write::<PaymentAggregate>(&self.order_id.to_string(), &event);
        }
    }

    fn stock_decides(&mut self, sku: &Sku, command: &StockCommand) {
        let item = self.stock.get(sku).cloned().unwrap_or_default();
        if let Ok(Decision::Append(event)) = StockAggregate::decide(&item, command) {
            self.stock
                .insert(sku.clone(), StockAggregate::evolve(item, &event));
            self.write::<StockAggregate>(sku.as_str(), &event);
        }
    }

    fn busy_aggregates(&self) -> Vec<String> {
        self.queues
            .iter()
            .filter(|(_, queue)| !queue.is_empty())
            .map(|(aggregate, _)| aggregate.clone())
            .collect()
    }

    fn take_command(&mut self, pick: usize) -> Option<(String, Uuid, ServiceCommand)> {
        let busy = self.busy_aggregates();
        let aggregate = busy.get(pick % busy.len().max(1))?.clone();
        let (id, command) = self.queues.get_mut(&aggregate)?.pop_front()?;
        Some((aggregate, id, command))
    }

    fn decide(&mut self, pick: usize) {
        let Some((aggregate, id, command)) = self.take_command(pick) else {
            return;
        };
        if !self.decided.insert(id) {
            return;
        }
        let order_id = self.order_id;
        match command {
            ServiceCommand::ReserveStock { order_id, quantity } => {
                let sku = Sku::parse(&aggregate).expect("stock commands go to a sku");
                self.stock_decides(&sku, &StockCommand::Reserve { order_id, quantity });
            }
            ServiceCommand::ReleaseStock { order_id } => {
                let sku = Sku::parse(&aggregate).expect("stock commands go to a sku");
                self.stock_decides(&sku, &StockCommand::Release { order_id });
            }
            ServiceCommand::CommitStock { order_id } => {
                let sku = Sku::parse(&aggregate).expect("stock commands go to a sku");
                self.stock_decides(&sku, &StockCommand::Commit { order_id });
            }
            ServiceCommand::AuthorisePayment { amount, token } => {
                // As the payment service: the provider is asked once per payment.
                if !matches!(self.payment, PaymentState::NotStarted) {
                    return;
                }
                let answer = match self.provider {
                    Provider::Approves => ProviderAnswer::Approved {
                        authorisation_id: "auth-1".into(),
                    },
                    Provider::Declines => ProviderAnswer::Declined {
                        reason: "insufficient funds".into(),
                    },
                    Provider::NeverAnswers => return,
                };
                self.payment_decides(&PaymentCommand::Authorise {
                    order_id,
                    amount,
                    token,
                    answer,
                });
            }
            ServiceCommand::CapturePayment { amount } => {
                self.payment_decides(&PaymentCommand::Capture { amount });
            }
            ServiceCommand::RefundPayment { amount, reason } => {
                self.payment_decides(&PaymentCommand::Refund { amount, reason });
            }
            ServiceCommand::VoidPayment { reason } => {
                self.payment_decides(&PaymentCommand::Void { reason });
            }
            ServiceCommand::ConfirmOrder => self.order_decides(&OrderCommand::Confirm),
            ServiceCommand::RejectOrder { reason } => {
                self.order_decides(&OrderCommand::Reject { reason });
            }
        }
    }

    fn lose(&mut self, pick: usize) {
        if self.take_command(pick).is_some() {
            self.lost += 1;
        }
    }

    // The saga and its driver

    fn feed(&mut self, input: &Input) -> Result<Vec<Action>, TestCaseError> {
        let stored = serde_json::to_string(&self.saga).map_err(|e| fail(e.to_string()))?;
        let saga: Saga = serde_json::from_str(&stored).map_err(|e| fail(e.to_string()))?;
        prop_assert_eq!(&saga, &self.saga, "the saga changed through JSON");

        let (next, actions) = react(&saga, input, self.now, &self.config);

        let deadlines: Vec<Option<DateTime<Utc>>> = actions
            .iter()
            .filter_map(|action| match action {
                Action::Deadline(deadline) => Some(*deadline),
                Action::Send { .. } => None,
            })
            .collect();
        if next.deadline == saga.deadline {
            prop_assert!(deadlines.is_empty(), "a deadline action without a change");
        } else {
            prop_assert_eq!(
                deadlines,
                vec![next.deadline],
                "the new deadline is announced"
            );
        }

        for action in &actions {
            let Action::Send {
                aggregate_id,
                command,
                step,
                attempt,
            } = action
            else {
                continue;
            };
            prop_assert!(
                self.sent.insert((step.clone(), *attempt)),
                "{} attempt {} sent twice",
                step,
                attempt
            );
            if matches!(
                command,
                ServiceCommand::CapturePayment { .. } | ServiceCommand::ConfirmOrder
            ) {
                self.check_ready_to_confirm(command)?;
            }
            self.queues
                .entry(aggregate_id.clone())
                .or_default()
                .push_back((command_id(self.order_id, step, *attempt), command.clone()));
        }
        self.saga = next;
        Ok(actions)
    }

    /// Capture and confirmation only once the payment is authorised and every line reserved,
    /// as the saga was told and as the participants hold it.
    fn check_ready_to_confirm(&self, command: &ServiceCommand) -> Result<(), TestCaseError> {
        let name = command.name();
        prop_assert!(
            self.told
                .iter()
                .any(|fact| matches!(fact, Fact::PaymentAuthorised { .. })),
            "{} before the saga heard of the authorisation",
            name
        );
        for sku in &self.skus {
            prop_assert!(
                self.told.iter().any(
                    |fact| matches!(fact, Fact::StockReserved { sku: reserved, .. } if reserved == sku)
                ),
                "{} before the saga heard {} was reserved",
                name,
                sku
            );
            prop_assert!(
                self.stock[sku].reservations.contains_key(&self.order_id),
                "{} while {} is not held",
                name,
                sku
            );
        }
        prop_assert!(
            // A retry may find the capture already made.
            matches!(
                self.payment.payment().map(|payment| payment.status),
                Some(PaymentStatus::Authorised | PaymentStatus::Captured)
            ),
            "{} while the payment is {:?}",
            name,
            self.payment
        );
        Ok(())
    }

    fn deliver(&mut self, index: usize) -> Result<(), TestCaseError> {
        let (event, seen) = self.log[index].clone();
        if seen {
            return Ok(());
        }
        self.log[index].1 = true;
        self.told.push(event.fact.clone());
        self.feed(&Input::Event(event))?;
        Ok(())
    }

    fn undelivered(&self) -> Vec<usize> {
        (0..self.log.len()).filter(|&i| !self.log[i].1).collect()
    }

    fn redeliver(&mut self, pick: usize) -> Result<(), TestCaseError> {
        let seen: Vec<usize> = (0..self.log.len()).filter(|&i| self.log[i].1).collect();
        let Some(&index) = seen.get(pick % seen.len().max(1)) else {
            return Ok(());
        };
        let before = self.saga.clone();
        let actions = self.feed(&Input::Event(self.log[index].0.clone()))?;
        prop_assert!(actions.is_empty(), "a redelivery sent {:?}", actions);
        prop_assert_eq!(&before, &self.saga, "a redelivery changed the saga");
        Ok(())
    }

    fn deadline_passes(&mut self) -> Result<(), TestCaseError> {
        if let Some(deadline) = self.saga.deadline {
            self.now = self.now.max(deadline);
            self.feed(&Input::DeadlinePassed)?;
        }
        Ok(())
    }

    fn early_wake_up(&mut self) -> Result<(), TestCaseError> {
        if self
            .saga
            .deadline
            .is_some_and(|deadline| deadline <= self.now)
        {
            return Ok(());
        }
        let before = self.saga.clone();
        let actions = self.feed(&Input::DeadlinePassed)?;
        prop_assert!(actions.is_empty(), "an early wake-up sent {:?}", actions);
        prop_assert_eq!(&before, &self.saga, "an early wake-up changed the saga");
        Ok(())
    }

    fn play(&mut self, op: Op, may_lose: bool) -> Result<(), TestCaseError> {
        match op {
            Op::Decide(pick) => self.decide(pick),
            Op::Lose(pick) if may_lose => self.lose(pick),
            Op::Lose(_) => {}
            Op::Deliver(pick) => {
                let undelivered = self.undelivered();
                if let Some(&index) = undelivered.get(pick % undelivered.len().max(1)) {
                    self.deliver(index)?;
                }
            }
            Op::Redeliver(pick) => self.redeliver(pick)?,
            Op::Deadline => self.deadline_passes()?,
            Op::EarlyWakeUp => self.early_wake_up()?,
            Op::Tick(millis) => self.now += TimeDelta::milliseconds(millis as i64),
            Op::CustomerCancels => self.order_decides(&OrderCommand::Cancel { reason: None }),
            Op::WarehouseShips => self.order_decides(&OrderCommand::Ship),
            Op::OperatorRetries => {
                self.feed(&Input::OperatorRetry)?;
            }
        }
        Ok(())
    }

    /// Lets every command be decided, every event delivered and every deadline pass, until
    /// nothing is left to happen.
    fn settle(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..10_000 {
            if !self.busy_aggregates().is_empty() {
                self.decide(0);
            } else if let Some(&index) = self.undelivered().first() {
                self.deliver(index)?;
            } else if self.saga.deadline.is_some() {
                self.deadline_passes()?;
            } else {
                return Ok(());
            }
        }
        Err(fail(format!(
            "the saga never came to rest: {:?}",
            self.saga.state
        )))
    }

    fn told_of(&self, wanted: impl Fn(&Fact) -> bool) -> bool {
        self.told.iter().any(wanted)
    }

    /// The saga rests, and what it rests in is true of the participants.
    fn check_rest(&self, may_lose: bool) -> Result<(), TestCaseError> {
        let state = self.saga.state;
        prop_assert!(state.is_resting(), "the saga stopped in {}", state);
        prop_assert!(
            self.saga.open_steps().all(|step| step.parked_at.is_some()),
            "a step is still awaited at rest: {:?}",
            self.saga.open_steps().collect::<Vec<_>>()
        );
        let order_status = self.order.order().map(|order| order.status);
        let payment = self.payment.payment();
        match state {
            SagaState::Rejected | SagaState::Cancelled => {
                let expected = if state == SagaState::Rejected {
                    OrderStatus::Rejected
                } else {
                    OrderStatus::Cancelled
                };
                prop_assert_eq!(order_status, Some(expected));
                for sku in &self.skus {
                    prop_assert!(
                        !self.stock[sku].reservations.contains_key(&self.order_id),
                        "{} is still held for a {} order",
                        sku,
                        state
                    );
                    let reserved = self.told_of(
                        |fact| matches!(fact, Fact::StockReserved { sku: s, .. } if s == sku),
                    );
                    let released = self.told_of(
                        |fact| matches!(fact, Fact::StockReservationReleased { sku: s, .. } if s == sku),
                    );
                    prop_assert!(
                        !reserved || released,
                        "the saga heard {} reserved but never released",
                        sku
                    );
                }
                if let Some(payment) = payment {
                    let settled = match payment.status {
                        PaymentStatus::Declined
                        | PaymentStatus::Voided
                        | PaymentStatus::Refunded => true,
                        PaymentStatus::Captured => payment.refundable_minor() == 0,
                        PaymentStatus::Authorised => false,
                    };
                    prop_assert!(
                        settled,
                        "money is held for a {} order: {:?}",
                        state,
                        payment
                    );
                }
            }
            SagaState::Confirmed => {
                prop_assert_eq!(order_status, Some(OrderStatus::Confirmed));
                prop_assert_eq!(payment.map(|p| p.status), Some(PaymentStatus::Captured));
                for sku in &self.skus {
                    prop_assert!(
                        self.stock[sku].reservations.contains_key(&self.order_id),
                        "{} not held for a confirmed order",
                        sku
                    );
                }
            }
            SagaState::Completed => {
                prop_assert_eq!(order_status, Some(OrderStatus::Shipped));
                prop_assert_eq!(payment.map(|p| p.status), Some(PaymentStatus::Captured));
                for sku in &self.skus {
                    prop_assert!(
                        !self.stock[sku].reservations.contains_key(&self.order_id),
                        "{} still reserved after shipping",
                        sku
                    );
                    let committed = self.told_of(
                        |fact| matches!(fact, Fact::StockReservationCommitted { sku: s, .. } if s == sku),
                    );
                    prop_assert!(committed, "completed without hearing {} committed", sku);
                }
            }
            SagaState::NeedsAttention => {
                prop_assert!(
                    may_lose && self.lost > 0,
                    "needs attention though no command was lost: {:?}",
                    self.saga.attention
                );
            }
            other => return Err(fail(format!("{other} is not a resting state"))),
        }
        Ok(())
    }
}

fn run(case: &Case, may_lose: bool) -> Result<(), TestCaseError> {
    let mut world = World::new(case)?;
    for (index, &op) in case.ops.iter().enumerate() {
        if case.cancel_at == Some(index) {
            world.play(Op::CustomerCancels, may_lose)?;
        }
        world.play(op, may_lose)?;
    }
    world.settle()?;
    world.check_rest(may_lose)?;
    // A confirmed order can still ship or be cancelled; the saga follows it to its end.
    match case.epilogue {
        Epilogue::Nothing => return Ok(()),
        Epilogue::WarehouseShips => world.play(Op::WarehouseShips, may_lose)?,
        Epilogue::CustomerCancels => world.play(Op::CustomerCancels, may_lose)?,
    }
    world.settle()?;
    world.check_rest(may_lose)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// With every command eventually decided, however late and in whatever order the answers
    /// come, and however often they are repeated: no capture or confirmation before the payment
    /// is authorised and every line reserved, every run comes to rest (never needing an
    /// operator), and a rejected or cancelled order holds no stock and no money.
    #[test]
    fn whatever_the_timing_the_saga_confirms_only_what_it_holds_and_undoes_all_it_gives_up(
        case in case()
    ) {
        run(&case, false)?;
    }

    /// Even when participants lose commands, the saga comes to rest (needing attention is a
    /// resting state) and never ends rejected or cancelled with anything still held.
    #[test]
    fn with_lost_commands_the_saga_still_rests_and_never_leaks_what_it_gave_up(case in case()) {
        run(&case, true)?;
    }
}
