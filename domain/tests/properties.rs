//! Invariants of the aggregates that must hold whatever the command sequence.
//!
//! Every property drives one aggregate with a random sequence of commands, drawn from small value
//! ranges so that they collide (the same order reserved twice, a refund larger than the capture,
//! a late approval after a void). [`run`] decides each command against the current state, folds
//! every appended event with `evolve`, numbers it with the next version, and after every step
//! checks the contract all aggregates share; each property then checks its own rule on the step.

use std::collections::{BTreeMap, BTreeSet};

use domain::order::{
    MAX_LINES, OrderAggregate, OrderCommand, OrderError, OrderEvent, OrderLine, OrderState,
    OrderStatus, PlaceOrder,
};
use domain::payment::{
    PaymentAggregate, PaymentCommand, PaymentEvent, PaymentState, PaymentStatus, ProviderAnswer,
};
use domain::stock::{StockAggregate, StockCommand, StockEvent, StockItem};
use domain::{
    Aggregate, Currency, CustomerId, Decision, Money, OrderId, PaymentToken, Quantity, Sku,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use uuid::Uuid;

const CASES: u32 = 1000;
/// Long enough for a payment or an order to reach its terminal states, short enough to shrink.
const MAX_COMMANDS: usize = 40;

// ---------------------------------------------------------------------------------------------
// The shared runner

type Outcome<A> = Result<Decision<<A as Aggregate>::Event>, <A as Aggregate>::Error>;

/// One decided command, as a property sees it.
struct Step<'a, A: Aggregate> {
    before: &'a A::State,
    command: &'a A::Command,
    outcome: &'a Outcome<A>,
    after: &'a A::State,
    /// Every event appended so far, this step's included.
    history: &'a [A::Event],
}

impl<A: Aggregate> Step<'_, A> {
    fn appended(&self) -> Option<&A::Event> {
        match self.outcome {
            Ok(Decision::Append(event)) => Some(event),
            _ => None,
        }
    }
}

/// Decides `commands` one by one and folds what they append (`Unchanged` and errors append
/// nothing), checking after every step that versions are gapless from 1 and that folding the
/// whole history from the start gives the state built step by step. `check` then sees each step.
fn run<A: Aggregate>(
    commands: &[A::Command],
    mut check: impl FnMut(&Step<'_, A>) -> Result<(), TestCaseError>,
) -> Result<(), TestCaseError>
where
    A::State: PartialEq,
{
    let mut state = A::State::default();
    let mut log: Vec<(u64, A::Event)> = Vec::new();
    for command in commands {
        let before = state.clone();
        let outcome = A::decide(&before, command);
        if let Ok(Decision::Append(event)) = &outcome {
            let version = log.last().map_or(1, |(version, _)| version + 1);
            // `evolve` must take whatever `decide` produced; a panic here fails the property.
            state = A::evolve(state, event);
            log.push((version, event.clone()));
        }

        let versions: Vec<u64> = log.iter().map(|(version, _)| *version).collect();
        let gapless: Vec<u64> = (1..=log.len() as u64).collect();
        prop_assert_eq!(
            versions,
            gapless,
            "versions must run 1, 2, 3, ... without gaps"
        );

        let history: Vec<A::Event> = log.iter().map(|(_, event)| event.clone()).collect();
        prop_assert_eq!(
            &A::fold(&history),
            &state,
            "refolding the history differs from the state built step by step"
        );

        check(&Step {
            before: &before,
            command,
            outcome: &outcome,
            after: &state,
            history: &history,
        })?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Small values, so that commands collide

fn eur() -> Currency {
    "EUR".parse().expect("EUR is ISO 4217")
}

fn usd() -> Currency {
    "USD".parse().expect("USD is ISO 4217")
}

fn order_id() -> impl Strategy<Value = OrderId> {
    (1u128..=3).prop_map(|n| OrderId(Uuid::from_u128(n)))
}

fn quantity() -> impl Strategy<Value = Quantity> {
    (1u32..20).prop_map(|units| Quantity::new(units).expect("1..20 is positive"))
}

fn reason() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => Just("stock-take".to_owned()),
        1 => Just(String::new()),
        1 => Just("   ".to_owned()),
    ]
}

// ---------------------------------------------------------------------------------------------
// Stock

fn stock_command() -> impl Strategy<Value = StockCommand> {
    prop_oneof![
        2 => quantity().prop_map(|quantity| StockCommand::Receive { quantity }),
        2 => (-30i64..30, reason()).prop_map(|(delta, reason)| StockCommand::Adjust { delta, reason }),
        4 => (order_id(), quantity())
            .prop_map(|(order_id, quantity)| StockCommand::Reserve { order_id, quantity }),
        2 => order_id().prop_map(|order_id| StockCommand::Release { order_id }),
        2 => order_id().prop_map(|order_id| StockCommand::Commit { order_id }),
    ]
}

fn stock_commands() -> impl Strategy<Value = Vec<StockCommand>> {
    vec(stock_command(), 0..MAX_COMMANDS)
}

/// On hand and the reservations held, computed from the events alone in wide integers, without
/// the aggregate's own `evolve`.
#[derive(Debug, Default)]
struct StockModel {
    on_hand: i128,
    reservations: BTreeMap<OrderId, u32>,
}

impl StockModel {
    fn from_events(events: &[StockEvent]) -> Result<Self, TestCaseError> {
        let mut model = StockModel::default();
        for event in events {
            match event {
                StockEvent::Received(received) => {
                    model.on_hand += i128::from(received.quantity.get());
                }
                StockEvent::Adjusted(adjusted) => model.on_hand += i128::from(adjusted.delta),
                StockEvent::Reserved(reserved) => {
                    let previous = model
                        .reservations
                        .insert(reserved.order_id, reserved.quantity.get());
                    prop_assert_eq!(previous, None, "a reservation was made twice: {:?}", event);
                }
                StockEvent::ReservationRejected(_) => {}
                StockEvent::ReservationReleased(released) => {
                    let held = model.reservations.remove(&released.order_id);
                    prop_assert_eq!(held, Some(released.quantity.get()), "{:?}", event);
                }
                StockEvent::ReservationCommitted(committed) => {
                    let held = model.reservations.remove(&committed.order_id);
                    prop_assert_eq!(held, Some(committed.quantity.get()), "{:?}", event);
                    model.on_hand -= i128::from(committed.quantity.get());
                }
            }
        }
        Ok(model)
    }

    fn reserved(&self) -> i128 {
        self.reservations
            .values()
            .map(|&units| i128::from(units))
            .sum()
    }
}

fn reserved_sum(item: &StockItem) -> u64 {
    item.reservations
        .values()
        .map(|quantity| u64::from(quantity.get()))
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Payment

fn money(amounts_minor: std::ops::Range<i64>) -> impl Strategy<Value = Money> {
    (
        amounts_minor,
        prop_oneof![5 => Just(eur()), 1 => Just(usd())],
    )
        .prop_map(|(amount_minor, currency)| Money::new(amount_minor, currency))
}

fn provider_answer() -> impl Strategy<Value = ProviderAnswer> {
    prop_oneof![
        3 => (1u8..=3).prop_map(|n| ProviderAnswer::Approved {
            authorisation_id: format!("auth-{n}"),
        }),
        1 => Just(ProviderAnswer::Declined {
            reason: "insufficient funds".into(),
        }),
    ]
}

fn authorise_command() -> impl Strategy<Value = PaymentCommand> {
    (order_id(), money(-2..60), provider_answer()).prop_map(|(order_id, amount, answer)| {
        PaymentCommand::Authorise {
            order_id,
            amount,
            token: PaymentToken::parse("tok_visa").expect("a valid token"),
            answer,
        }
    })
}

fn void_command() -> impl Strategy<Value = PaymentCommand> {
    Just(PaymentCommand::Void {
        reason: "saga timed out".into(),
    })
}

fn payment_command() -> impl Strategy<Value = PaymentCommand> {
    prop_oneof![
        3 => authorise_command(),
        3 => proptest::option::of(money(-2..60))
            .prop_map(|amount| PaymentCommand::Capture { amount }),
        // Refunds are smaller than captures, so that a few of them add up to the whole.
        4 => money(-2..12).prop_map(|amount| PaymentCommand::Refund {
            amount,
            reason: "returned".into(),
        }),
        1 => void_command(),
    ]
}

fn payment_status(state: &PaymentState) -> Option<PaymentStatus> {
    state.payment().map(|payment| payment.status)
}

/// The documented machine: (none) → authorised | declined | voided, authorised → captured |
/// voided, captured → refunded (a partial refund stays captured).
fn payment_may_move(from: Option<PaymentStatus>, to: Option<PaymentStatus>) -> bool {
    use PaymentStatus::*;
    from == to
        || matches!(
            (from, to),
            (None, Some(Authorised | Declined | Voided))
                | (Some(Authorised), Some(Captured | Voided))
                | (Some(Captured), Some(Refunded))
        )
}

// ---------------------------------------------------------------------------------------------
// Order

fn order_line(sku: String) -> impl Strategy<Value = OrderLine> {
    (quantity(), unit_price()).prop_map(move |(quantity, unit_price_minor)| OrderLine {
        sku: Sku::parse(&sku).expect("a valid sku"),
        quantity,
        unit_price_minor,
    })
}

/// Mostly ordinary prices, some negative ones, and some so large that the total overflows.
fn unit_price() -> impl Strategy<Value = i64> {
    prop_oneof![
        12 => 0i64..1_000,
        1 => -3i64..0,
        1 => (i64::MAX / 4)..=i64::MAX,
    ]
}

/// A few lines over three SKUs (so duplicates happen), or around `MAX_LINES` distinct ones.
fn order_lines() -> impl Strategy<Value = Vec<OrderLine>> {
    let few = vec(
        prop_oneof![Just("SKU-A"), Just("SKU-B"), Just("SKU-C")]
            .prop_flat_map(|sku| order_line(sku.to_owned())),
        0..5,
    );
    let many = (MAX_LINES - 1..=MAX_LINES + 1).prop_flat_map(|count| {
        (0..count)
            .map(|i| order_line(format!("SKU-{i}")))
            .collect::<Vec<_>>()
    });
    prop_oneof![20 => few, 1 => many]
}

fn place_order() -> impl Strategy<Value = PlaceOrder> {
    (order_id(), order_lines()).prop_map(|(order_id, lines)| PlaceOrder {
        order_id,
        customer_id: CustomerId::parse("customer-1").expect("a valid customer id"),
        currency: eur(),
        payment_token: PaymentToken::parse("tok_visa").expect("a valid token"),
        lines,
    })
}

fn order_command() -> impl Strategy<Value = OrderCommand> {
    prop_oneof![
        2 => place_order().prop_map(OrderCommand::Place),
        1 => Just(OrderCommand::Confirm),
        1 => reason().prop_map(|reason| OrderCommand::Reject { reason }),
        1 => proptest::option::of(reason()).prop_map(|reason| OrderCommand::Cancel { reason }),
        1 => Just(OrderCommand::Ship),
    ]
}

/// What placing these lines must give, computed in wide integers: the total, or the first rule
/// broken in the order `decide` checks them (line by line: duplicate, then negative price).
fn expected_placement(lines: &[OrderLine]) -> Result<i64, OrderError> {
    if lines.is_empty() {
        return Err(OrderError::NoLines);
    }
    if lines.len() > MAX_LINES {
        return Err(OrderError::TooManyLines);
    }
    let mut seen = BTreeSet::new();
    let mut total: i128 = 0;
    for line in lines {
        if !seen.insert(line.sku.clone()) {
            return Err(OrderError::DuplicateSku(line.sku.clone()));
        }
        if line.unit_price_minor < 0 {
            return Err(OrderError::NegativePrice(line.sku.clone()));
        }
        total += i128::from(line.unit_price_minor) * i128::from(line.quantity.get());
        if total > i128::from(i64::MAX) {
            return Err(OrderError::TotalTooLarge);
        }
    }
    Ok(i64::try_from(total).expect("checked against i64::MAX"))
}

fn order_status(state: &OrderState) -> Option<OrderStatus> {
    state.order().map(|order| order.status)
}

/// The documented machine: pending → confirmed | rejected | cancelled, confirmed → shipped |
/// cancelled; rejected, cancelled and shipped are terminal.
fn order_may_move(from: Option<OrderStatus>, to: Option<OrderStatus>) -> bool {
    use OrderStatus::*;
    from == to
        || matches!(
            (from, to),
            (None, Some(Pending))
                | (Some(Pending), Some(Confirmed | Rejected | Cancelled))
                | (Some(Confirmed), Some(Shipped | Cancelled))
        )
}

// ---------------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn every_stock_history_refolds_to_the_state_built_step_by_step(commands in stock_commands()) {
        run::<StockAggregate>(&commands, |_| Ok(()))?;
    }

    #[test]
    fn stock_on_hand_never_falls_below_what_is_reserved(commands in stock_commands()) {
        run::<StockAggregate>(&commands, |step| {
            let item = step.after;
            prop_assert!(item.reserved <= item.on_hand, "{:?}", item);
            prop_assert_eq!(item.available(), item.on_hand - item.reserved);
            prop_assert_eq!(item.reserved, reserved_sum(item), "{:?}", item);
            match step.appended() {
                Some(StockEvent::Reserved(reserved)) => {
                    prop_assert!(u64::from(reserved.quantity.get()) <= step.before.available());
                }
                Some(StockEvent::ReservationRejected(rejected)) => {
                    prop_assert_eq!(rejected.available, step.before.available());
                    prop_assert!(u64::from(rejected.requested.get()) > rejected.available);
                }
                _ => {}
            }
            Ok(())
        })?;
    }

    #[test]
    fn stock_levels_equal_a_model_computed_independently_from_the_events(
        commands in stock_commands(),
    ) {
        run::<StockAggregate>(&commands, |step| {
            let model = StockModel::from_events(step.history)?;
            let item = step.after;
            prop_assert!(model.on_hand >= 0, "{:?}", model);
            prop_assert_eq!(i128::from(item.on_hand), model.on_hand);
            prop_assert_eq!(i128::from(item.reserved), model.reserved());
            let held: BTreeMap<OrderId, u32> = item
                .reservations
                .iter()
                .map(|(order_id, quantity)| (*order_id, quantity.get()))
                .collect();
            prop_assert_eq!(held, model.reservations);
            Ok(())
        })?;
    }

    #[test]
    fn every_payment_history_refolds_to_the_state_built_step_by_step(
        commands in vec(payment_command(), 0..MAX_COMMANDS),
    ) {
        run::<PaymentAggregate>(&commands, |_| Ok(()))?;
    }

    #[test]
    fn a_payment_never_captures_more_than_authorised_nor_refunds_more_than_captured(
        commands in vec(payment_command(), 0..MAX_COMMANDS),
    ) {
        run::<PaymentAggregate>(&commands, |step| {
            let (from, to) = (payment_status(step.before), payment_status(step.after));
            prop_assert!(payment_may_move(from, to), "{:?} -> {:?} on {:?}", from, to, step.command);
            if matches!(from, Some(PaymentStatus::Declined | PaymentStatus::Voided | PaymentStatus::Refunded)) {
                prop_assert!(step.appended().is_none(), "{:?} changed a final payment", step.command);
            }
            let Some(payment) = step.after.payment() else {
                return Ok(());
            };

            let authorised = payment.authorised.map_or(0, |money| money.amount_minor);
            prop_assert!(0 <= payment.captured_minor, "{:?}", payment);
            prop_assert!(payment.captured_minor <= authorised, "{:?}", payment);
            prop_assert!(0 <= payment.refunded_minor, "{:?}", payment);
            prop_assert!(payment.refunded_minor <= payment.captured_minor, "{:?}", payment);
            if payment.status == PaymentStatus::Refunded {
                prop_assert_eq!(payment.refunded_minor, payment.captured_minor);
            }

            // Money moves only through the events, in the payment's currency, never negative.
            let (mut captured, mut refunded) = (0, 0);
            for event in step.history {
                let amount = match event {
                    PaymentEvent::Authorised(authorised) => authorised.amount,
                    PaymentEvent::Declined(declined) => declined.amount,
                    PaymentEvent::Captured(capture) => {
                        captured += capture.amount.amount_minor;
                        capture.amount
                    }
                    PaymentEvent::Refunded(refund) => {
                        refunded += refund.amount.amount_minor;
                        refund.amount
                    }
                    PaymentEvent::Voided(_) => continue,
                };
                prop_assert!(amount.amount_minor >= 0, "{:?}", event);
                prop_assert_eq!(Some(amount.currency), payment.authorised.map(|money| money.currency));
            }
            prop_assert_eq!((captured, refunded), (payment.captured_minor, payment.refunded_minor));
            Ok(())
        })?;
    }

    #[test]
    fn an_approved_authorisation_after_a_void_never_takes_effect(
        (void, rest) in (void_command(), vec(payment_command(), 0..MAX_COMMANDS)),
    ) {
        let commands: Vec<PaymentCommand> = std::iter::once(void).chain(rest).collect();
        run::<PaymentAggregate>(&commands, |step| {
            let payment = step.after.payment();
            prop_assert_eq!(payment.map(|payment| payment.status), Some(PaymentStatus::Voided));
            prop_assert_eq!(payment.and_then(|payment| payment.authorised), None);
            prop_assert_eq!(payment.and_then(|payment| payment.authorisation_id.clone()), None);
            prop_assert_eq!(payment.map(|payment| payment.captured_minor), Some(0));
            prop_assert_eq!(step.history.len(), 1, "only the void was appended");
            Ok(())
        })?;
    }

    #[test]
    fn every_order_history_refolds_to_the_state_built_step_by_step(
        commands in vec(order_command(), 0..MAX_COMMANDS),
    ) {
        run::<OrderAggregate>(&commands, |_| Ok(()))?;
    }

    #[test]
    fn an_order_moves_only_along_its_status_machine_and_terminal_states_never_change(
        commands in vec(order_command(), 0..MAX_COMMANDS),
    ) {
        run::<OrderAggregate>(&commands, |step| {
            let (from, to) = (order_status(step.before), order_status(step.after));
            prop_assert!(order_may_move(from, to), "{:?} -> {:?} on {:?}", from, to, step.command);
            if matches!(from, Some(OrderStatus::Rejected | OrderStatus::Cancelled | OrderStatus::Shipped)) {
                prop_assert!(step.appended().is_none(), "{:?} changed a final order", step.command);
            }
            if let Some(OrderEvent::Cancelled(cancelled)) = step.appended() {
                prop_assert_eq!(cancelled.was_confirmed, from == Some(OrderStatus::Confirmed));
            }
            if let (Some(before), Some(after)) = (step.before.order(), step.after.order()) {
                // Only the status and its reason move once an order is placed.
                prop_assert_eq!(
                    (before.order_id, &before.lines, before.total),
                    (after.order_id, &after.lines, after.total)
                );
            }
            if let Some(order) = step.after.order() {
                let has_reason = order.reason.as_deref().is_some_and(|reason| !reason.trim().is_empty());
                let needs_reason = matches!(order.status, OrderStatus::Rejected | OrderStatus::Cancelled);
                prop_assert_eq!(has_reason, needs_reason, "{:?}", order);
            }
            Ok(())
        })?;
    }

    #[test]
    fn a_placed_order_totals_its_lines_or_names_the_first_rule_it_breaks(place in place_order()) {
        let decided = OrderAggregate::decide(&OrderState::NotPlaced, &OrderCommand::Place(place.clone()));
        match (expected_placement(&place.lines), decided) {
            (Ok(total), Ok(Decision::Append(OrderEvent::Placed(placed)))) => {
                prop_assert_eq!(placed.total_minor, total);
                prop_assert_eq!(placed.lines, place.lines);
                prop_assert_eq!(placed.order_id, place.order_id);
            }
            (Err(expected), Err(error)) => prop_assert_eq!(error, expected),
            (expected, decided) => {
                prop_assert!(false, "expected {:?}, decided {:?}", expected, decided);
            }
        }
    }
}
