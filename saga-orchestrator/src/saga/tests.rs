//! The saga's paths, given/when/then. Clock: every scenario starts at `start_time()`; default
//! settings (reservation, payment and confirmation 10 s, compensation 5 s, backoff 1 s, 5
//! attempts) unless a test says otherwise.

use std::time::Duration;

use domain::order::{OrderEvent, OrderLine, OrderPlaced};
use domain::payment::{PaymentAuthorised, PaymentCaptured, PaymentEvent};
use domain::stock::{StockEvent, StockReceived, StockReservationReleased, StockReserved};
use domain::{Currency, CustomerId};
use event_schema::CommandMeta;
use event_schema::catalog::EventCodec;

use super::*;
use crate::testing::{Scenario, event, start_time};

const SECOND: Duration = Duration::from_secs(1);

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

// ---------------------------------------------------------------------------------------------
// Fixtures

fn order_id() -> OrderId {
    OrderId(Uuid::from_u128(7))
}

fn eur_currency() -> Currency {
    "EUR".parse().expect("EUR is ISO 4217")
}

fn eur(amount_minor: i64) -> Money {
    Money::new(amount_minor, eur_currency())
}

fn sku(raw: &str) -> Sku {
    Sku::parse(raw).expect("a valid sku")
}

fn units(n: u32) -> Quantity {
    Quantity::new(n).expect("a positive quantity")
}

fn token() -> PaymentToken {
    PaymentToken::parse("tok_visa").expect("a valid token")
}

fn line(raw_sku: &str, quantity: u32, unit_price_minor: i64) -> OrderLine {
    OrderLine {
        sku: sku(raw_sku),
        quantity: units(quantity),
        unit_price_minor,
    }
}

/// SKU-1 × 2 at 12.50 and SKU-2 × 1 at 5.00: 30.00 EUR.
fn two_lines() -> Vec<OrderLine> {
    vec![line("SKU-1", 2, 1_250), line("SKU-2", 1, 500)]
}

fn placed_with(lines: Vec<OrderLine>) -> Input {
    let total_minor = lines
        .iter()
        .map(|line| line.unit_price_minor * i64::from(line.quantity.get()))
        .sum();
    event(Fact::OrderPlaced {
        order_id: order_id(),
        lines,
        total: eur(total_minor),
        payment_token: token(),
    })
}

fn placed() -> Input {
    placed_with(two_lines())
}

fn reserved(raw_sku: &str) -> Input {
    let quantity = two_lines()
        .into_iter()
        .find(|line| line.sku.as_str() == raw_sku)
        .map_or(units(1), |line| line.quantity);
    event(Fact::StockReserved {
        order_id: order_id(),
        sku: sku(raw_sku),
        quantity,
    })
}

fn out_of_stock(raw_sku: &str) -> Input {
    event(Fact::StockReservationRejected {
        order_id: order_id(),
        sku: sku(raw_sku),
        requested: units(1),
        available: 0,
    })
}

fn released(raw_sku: &str) -> Input {
    event(Fact::StockReservationReleased {
        order_id: order_id(),
        sku: sku(raw_sku),
    })
}

fn committed(raw_sku: &str) -> Input {
    event(Fact::StockReservationCommitted {
        order_id: order_id(),
        sku: sku(raw_sku),
    })
}

fn authorised_for(amount_minor: i64) -> Input {
    event(Fact::PaymentAuthorised {
        order_id: order_id(),
        amount: eur(amount_minor),
    })
}

fn authorised() -> Input {
    authorised_for(3_000)
}

fn declined(reason: &str) -> Input {
    event(Fact::PaymentDeclined {
        order_id: order_id(),
        reason: reason.into(),
    })
}

fn captured_for(amount_minor: i64) -> Input {
    event(Fact::PaymentCaptured {
        order_id: order_id(),
        amount: eur(amount_minor),
    })
}

fn captured() -> Input {
    captured_for(3_000)
}

fn refunded() -> Input {
    event(Fact::PaymentRefunded {
        order_id: order_id(),
        amount: eur(3_000),
    })
}

fn voided() -> Input {
    event(Fact::PaymentVoided {
        order_id: order_id(),
    })
}

fn confirmed() -> Input {
    event(Fact::OrderConfirmed {
        order_id: order_id(),
    })
}

fn rejected(reason: &str) -> Input {
    event(Fact::OrderRejected {
        order_id: order_id(),
        reason: reason.into(),
    })
}

fn cancelled(was_confirmed: bool) -> Input {
    event(Fact::OrderCancelled {
        order_id: order_id(),
        reason: "changed my mind".into(),
        was_confirmed,
    })
}

fn shipped() -> Input {
    event(Fact::OrderShipped {
        order_id: order_id(),
    })
}

fn send_attempt(aggregate_id: &str, command: ServiceCommand, step: &str, attempt: u32) -> Action {
    Action::Send {
        aggregate_id: aggregate_id.into(),
        command,
        step: step.into(),
        attempt,
    }
}

fn to_order(command: ServiceCommand, step: &str) -> Action {
    send_attempt(&order_id().to_string(), command, step, 1)
}

fn reserve(raw_sku: &str, quantity: u32) -> Action {
    send_attempt(
        raw_sku,
        ServiceCommand::ReserveStock {
            order_id: order_id(),
            quantity: units(quantity),
        },
        &format!("reserve:{raw_sku}"),
        1,
    )
}

fn release_attempt(raw_sku: &str, attempt: u32) -> Action {
    send_attempt(
        raw_sku,
        ServiceCommand::ReleaseStock {
            order_id: order_id(),
        },
        &format!("release:{raw_sku}"),
        attempt,
    )
}

fn release(raw_sku: &str) -> Action {
    release_attempt(raw_sku, 1)
}

fn commit(raw_sku: &str) -> Action {
    send_attempt(
        raw_sku,
        ServiceCommand::CommitStock {
            order_id: order_id(),
        },
        &format!("commit:{raw_sku}"),
        1,
    )
}

fn authorise() -> Action {
    to_order(
        ServiceCommand::AuthorisePayment {
            amount: eur(3_000),
            token: token(),
        },
        "authorise",
    )
}

fn confirm() -> Action {
    to_order(ServiceCommand::ConfirmOrder, "confirm")
}

fn capture() -> Action {
    to_order(ServiceCommand::CapturePayment { amount: None }, "capture")
}

fn void(reason: &str) -> Action {
    to_order(
        ServiceCommand::VoidPayment {
            reason: reason.into(),
        },
        "void",
    )
}

fn refund(amount_minor: i64, reason: &str) -> Action {
    to_order(
        ServiceCommand::RefundPayment {
            amount: eur(amount_minor),
            reason: reason.into(),
        },
        "refund",
    )
}

fn reject(reason: &str) -> Action {
    to_order(
        ServiceCommand::RejectOrder {
            reason: reason.into(),
        },
        "reject",
    )
}

fn deadline_in(scenario: &Scenario, wait: Duration) -> Action {
    Action::Deadline(Some(scenario.later(wait)))
}

fn no_deadline() -> Action {
    Action::Deadline(None)
}

const CANCELLED: &str = "order cancelled: changed my mind";

// Where a saga stands after the usual inputs, all at the start time.

fn reserving() -> Scenario {
    Scenario::new(order_id()).given([placed()])
}

fn authorising() -> Scenario {
    reserving().given([reserved("SKU-1"), reserved("SKU-2")])
}

fn confirming() -> Scenario {
    authorising().given([authorised()])
}

fn confirmed_saga() -> Scenario {
    confirming().given([confirmed(), captured()])
}

// ---------------------------------------------------------------------------------------------
// The happy path

#[test]
fn an_order_placed_reserves_stock_for_every_line_and_waits_for_the_reservations() {
    let scenario = Scenario::new(order_id());
    let deadline = deadline_in(&scenario, secs(10));
    scenario
        .when(placed())
        .then([reserve("SKU-1", 2), reserve("SKU-2", 1), deadline])
        .expect_state(SagaState::ReservingStock);
}

#[test]
fn a_line_reserved_while_another_is_pending_waits_for_the_rest() {
    reserving()
        .after(SECOND)
        .when(reserved("SKU-1"))
        .then([])
        .expect_state(SagaState::ReservingStock);
}

#[test]
fn once_every_line_is_reserved_the_payment_is_authorised_for_the_order_total() {
    let scenario = reserving().given([reserved("SKU-1")]).after(secs(2));
    let deadline = deadline_in(&scenario, secs(10));
    scenario
        .when(reserved("SKU-2"))
        .then([authorise(), deadline])
        .expect_state(SagaState::AuthorisingPayment);
}

#[test]
fn an_authorised_payment_confirms_the_order_and_captures_the_payment() {
    let scenario = authorising().after(SECOND);
    let deadline = deadline_in(&scenario, secs(10));
    scenario
        .when(authorised())
        .then([confirm(), capture(), deadline])
        .expect_state(SagaState::Confirming);
}

#[test]
fn the_saga_is_confirmed_once_the_order_is_confirmed_and_the_payment_captured_in_either_order() {
    confirming()
        .when(captured())
        .then([])
        .expect_state(SagaState::Confirming)
        .when(confirmed())
        .then([no_deadline()])
        .expect_state(SagaState::Confirmed);
    confirming()
        .when(confirmed())
        .then([])
        .when(captured())
        .then([no_deadline()])
        .expect_state(SagaState::Confirmed);
}

#[test]
fn a_shipped_order_commits_every_reservation_and_completes_once_all_are_committed() {
    let scenario = confirmed_saga();
    let deadline = deadline_in(&scenario, secs(10));
    scenario
        .when(shipped())
        .then([commit("SKU-1"), commit("SKU-2"), deadline])
        .expect_state(SagaState::Confirmed)
        .when(committed("SKU-2"))
        .then([])
        .when(committed("SKU-1"))
        .then([no_deadline()])
        .expect_state(SagaState::Completed);
}

#[test]
fn the_history_records_each_step_with_its_cause_attempts_and_answer() {
    let scenario = confirmed_saga();
    let saga = scenario.saga();
    let Input::Event(placed_event) = placed() else {
        unreachable!("placed() is an event")
    };
    let Input::Event(reserved_event) = reserved("SKU-1") else {
        unreachable!("reserved() is an event")
    };
    let reserve = saga
        .step(&Step::Reserve(sku("SKU-1")))
        .expect("the reservation was asked for");
    assert_eq!(reserve.caused_by, Some(placed_event.event_id));
    assert_eq!(reserve.attempt, 1);
    assert_eq!(
        reserve.command_ids,
        vec![command_id(order_id(), "reserve:SKU-1", 1)]
    );
    assert_eq!(reserve.started_at, start_time());
    assert_eq!(reserve.finished_at, Some(start_time()));
    assert_eq!(
        reserve.outcome,
        Some(StepOutcome::Answered {
            event_id: reserved_event.event_id,
            event_type: "stock.reserved".into()
        })
    );
    let steps: Vec<String> = saga
        .history
        .iter()
        .map(|record| record.step.to_string())
        .collect();
    assert_eq!(
        steps,
        [
            "reserve:SKU-1",
            "reserve:SKU-2",
            "authorise",
            "confirm",
            "capture"
        ]
    );
    assert!(saga.open_steps().next().is_none());
    assert_eq!(
        saga.events.len(),
        6,
        "placed, 2 reserved, authorised, confirmed, captured"
    );
    assert_eq!(saga.deadline, None);
}

// ---------------------------------------------------------------------------------------------
// Stock unavailable

#[test]
fn a_line_without_stock_releases_the_lines_already_reserved() {
    let scenario = reserving().given([reserved("SKU-1")]);
    let deadline = deadline_in(&scenario, secs(5));
    let scenario = scenario
        .when(out_of_stock("SKU-2"))
        .then([release("SKU-1"), deadline])
        .expect_state(SagaState::Compensating);
    assert_eq!(
        scenario.saga().reason.as_deref(),
        Some("stock unavailable for SKU-2")
    );
}

#[test]
fn the_order_is_rejected_once_every_reservation_is_released_and_the_saga_ends_rejected() {
    let scenario = reserving()
        .given([reserved("SKU-1"), out_of_stock("SKU-2")])
        .after(SECOND);
    let deadline = deadline_in(&scenario, secs(5));
    scenario
        .when(released("SKU-1"))
        .then([reject("stock unavailable for SKU-2"), deadline])
        .expect_state(SagaState::Compensating)
        .when(rejected("stock unavailable for SKU-2"))
        .then([no_deadline()])
        .expect_state(SagaState::Rejected);
}

#[test]
fn a_single_line_without_stock_rejects_the_order_at_once() {
    let scenario = Scenario::new(order_id()).given([placed_with(vec![line("SKU-1", 1, 100)])]);
    let deadline = deadline_in(&scenario, secs(5));
    scenario
        .when(out_of_stock("SKU-1"))
        .then([reject("stock unavailable for SKU-1"), deadline])
        .when(rejected("stock unavailable for SKU-1"))
        .then([no_deadline()])
        .expect_state(SagaState::Rejected);
}

#[test]
fn a_reservation_still_pending_when_another_line_is_refused_is_released_behind_it() {
    let scenario = reserving();
    let deadline = deadline_in(&scenario, secs(5));
    scenario
        .when(out_of_stock("SKU-2"))
        // SKU-1's reservation has not answered yet; the release queues behind it.
        .then([release("SKU-1"), deadline])
        .when(reserved("SKU-1"))
        // The late reservation is released by the release already sent: no second one.
        .then([])
        .expect_state(SagaState::Compensating)
        .when(released("SKU-1"))
        .then([reject("stock unavailable for SKU-2")])
        .when(rejected("stock unavailable for SKU-2"))
        .then([no_deadline()])
        .expect_state(SagaState::Rejected);
}

#[test]
fn a_late_reservation_whose_release_overtook_it_is_released_again_at_the_deadline() {
    // The release was decided before the reservation (nothing to release, no event); the
    // reservation then took the stock. The unacknowledged release is resent.
    let scenario = reserving()
        .given([out_of_stock("SKU-2"), reserved("SKU-1")])
        .at_deadline();
    let deadline = deadline_in(&scenario, secs(6));
    let reject_deadline = deadline_in(&scenario, secs(5));
    scenario
        .when(Input::DeadlinePassed)
        .then([release_attempt("SKU-1", 2), deadline])
        .when(released("SKU-1"))
        .then([reject("stock unavailable for SKU-2"), reject_deadline])
        .expect_state(SagaState::Compensating);
}

#[test]
fn a_refusal_answering_a_release_queued_behind_its_reservation_settles_the_line() {
    reserving()
        .given([out_of_stock("SKU-2")])
        .when(out_of_stock("SKU-1"))
        .then([reject("stock unavailable for SKU-2")])
        .when(rejected("stock unavailable for SKU-2"))
        .then([no_deadline()])
        .expect_state(SagaState::Rejected);
}

#[test]
fn the_first_refused_line_gives_the_reason_and_a_later_refusal_keeps_it() {
    let scenario = reserving()
        .given([out_of_stock("SKU-2")])
        .when(out_of_stock("SKU-1"))
        .and();
    assert_eq!(
        scenario.saga().reason.as_deref(),
        Some("stock unavailable for SKU-2")
    );
}

#[test]
fn a_reservation_timeout_names_every_line_that_did_not_answer() {
    let scenario = reserving().when_deadline_passes().and();
    assert_eq!(
        scenario.saga().reason.as_deref(),
        Some("timed out waiting for the stock reservation of SKU-1, SKU-2")
    );
}

// ---------------------------------------------------------------------------------------------
// Payment declined

#[test]
fn a_declined_payment_releases_the_stock_and_rejects_the_order() {
    let scenario = authorising().after(SECOND);
    let deadline = deadline_in(&scenario, secs(5));
    scenario
        .when(declined("insufficient funds"))
        // Nothing is held on a declined payment: no void.
        .then([release("SKU-1"), release("SKU-2"), deadline])
        .expect_state(SagaState::Compensating)
        .when(released("SKU-2"))
        .then([])
        .when(released("SKU-1"))
        .then([reject("payment declined: insufficient funds")])
        .when(rejected("payment declined: insufficient funds"))
        .then([no_deadline()])
        .expect_state(SagaState::Rejected);
}

#[test]
fn a_decline_reason_too_long_for_the_order_is_cut_to_fit() {
    let long = "x".repeat(2 * MAX_REASON_LEN);
    let when = authorising()
        .given([declined(&long), released("SKU-1")])
        .when(released("SKU-2"));
    let [
        Action::Send {
            command: ServiceCommand::RejectOrder { reason },
            ..
        },
    ] = when.actions()
    else {
        panic!("expected the order's rejection, got {:?}", when.actions())
    };
    assert_eq!(reason.chars().count(), MAX_REASON_LEN);
    assert!(reason.starts_with("payment declined: xxx"));
}

// ---------------------------------------------------------------------------------------------
// Deadlines

#[test]
fn a_reservation_that_does_not_answer_in_time_is_released_and_the_order_rejected() {
    let reason = "timed out waiting for the stock reservation of SKU-2";
    let scenario = reserving().given([reserved("SKU-1")]).at_deadline();
    let deadline = deadline_in(&scenario, secs(5));
    let scenario = scenario
        .when(Input::DeadlinePassed)
        // SKU-2 may still be reserved late: its release queues behind the reservation.
        .then([release("SKU-1"), release("SKU-2"), deadline])
        .expect_state(SagaState::Compensating);
    assert_eq!(scenario.saga().reason.as_deref(), Some(reason));
    assert_eq!(
        scenario
            .saga()
            .step(&Step::Reserve(sku("SKU-2")))
            .and_then(|record| record.outcome.clone()),
        Some(StepOutcome::TimedOut)
    );
    scenario
        .when(reserved("SKU-2"))
        .then([])
        .when(released("SKU-1"))
        .then([])
        .when(released("SKU-2"))
        .then([reject(reason)])
        .when(rejected(reason))
        .then([no_deadline()])
        .expect_state(SagaState::Rejected);
}

#[test]
fn a_payment_that_does_not_answer_in_time_is_voided_and_the_stock_released() {
    let reason = "timed out waiting for the payment authorisation";
    let scenario = authorising().at_deadline();
    let deadline = deadline_in(&scenario, secs(5));
    scenario
        .when(Input::DeadlinePassed)
        // Reverse order: the payment (asked last) is undone first.
        .then([void(reason), release("SKU-1"), release("SKU-2"), deadline])
        .when(voided())
        .then([])
        .when(released("SKU-1"))
        .then([])
        .when(released("SKU-2"))
        .then([reject(reason)])
        .when(rejected(reason))
        .then([no_deadline()])
        .expect_state(SagaState::Rejected);
}

#[test]
fn a_late_authorisation_after_the_void_was_sent_does_not_confirm_the_order() {
    authorising()
        .when_deadline_passes()
        .and()
        .when(authorised())
        .then([])
        .expect_state(SagaState::Compensating)
        .when(voided())
        .then([])
        .given([released("SKU-1"), released("SKU-2")])
        .expect_state(SagaState::Compensating);
}

#[test]
fn a_decline_overtaking_the_void_settles_the_payment() {
    // Voiding a declined payment changes nothing and says nothing: the decline is the answer.
    let scenario = authorising()
        .when_deadline_passes()
        .and()
        .when(declined("insufficient funds"))
        .then([]);
    assert!(matches!(
        scenario.saga().step(&Step::Void).and_then(|record| record.outcome.clone()),
        Some(StepOutcome::Answered { event_type, .. }) if event_type == "payment.declined"
    ));
    scenario
        .given([released("SKU-1")])
        .when(released("SKU-2"))
        .then([reject("timed out waiting for the payment authorisation")]);
}

#[test]
fn a_wake_up_before_any_deadline_changes_nothing() {
    reserving()
        .after(secs(9))
        .when(Input::DeadlinePassed)
        .then_nothing();
    confirmed_saga()
        .after(secs(60))
        .when(Input::DeadlinePassed)
        .then_nothing();
}

#[test]
fn an_unanswered_confirmation_is_retried_not_compensated() {
    let scenario = confirming().at_deadline();
    let deadline = deadline_in(&scenario, secs(11));
    scenario
        .when(Input::DeadlinePassed)
        .then([
            send_attempt(
                &order_id().to_string(),
                ServiceCommand::ConfirmOrder,
                "confirm",
                2,
            ),
            send_attempt(
                &order_id().to_string(),
                ServiceCommand::CapturePayment { amount: None },
                "capture",
                2,
            ),
            deadline,
        ])
        .expect_state(SagaState::Confirming)
        .when(confirmed())
        .then([])
        .when(captured())
        .then([no_deadline()])
        .expect_state(SagaState::Confirmed);
}

// ---------------------------------------------------------------------------------------------
// Cancellation

#[test]
fn a_cancellation_while_reserving_releases_the_stock_and_ends_cancelled() {
    let scenario = reserving().given([reserved("SKU-1")]);
    let deadline = deadline_in(&scenario, secs(5));
    scenario
        .when(cancelled(false))
        .then([release("SKU-1"), release("SKU-2"), deadline])
        .expect_state(SagaState::Compensating)
        .when(released("SKU-1"))
        .then([])
        .when(out_of_stock("SKU-2"))
        // No rejection: the order is already cancelled.
        .then([no_deadline()])
        .expect_state(SagaState::Cancelled);
}

#[test]
fn a_cancellation_while_authorising_voids_the_payment_and_releases_the_stock() {
    let scenario = authorising();
    let deadline = deadline_in(&scenario, secs(5));
    scenario
        .when(cancelled(false))
        .then([
            void(CANCELLED),
            release("SKU-1"),
            release("SKU-2"),
            deadline,
        ])
        .given([released("SKU-1"), released("SKU-2")])
        .expect_state(SagaState::Compensating)
        .when(voided())
        .then([no_deadline()])
        .expect_state(SagaState::Cancelled);
}

#[test]
fn a_cancellation_after_confirmation_refunds_the_capture_and_releases_the_stock() {
    let scenario = confirmed_saga();
    let deadline = deadline_in(&scenario, secs(5));
    scenario
        .when(cancelled(true))
        .then([
            refund(3_000, CANCELLED),
            release("SKU-1"),
            release("SKU-2"),
            deadline,
        ])
        .expect_state(SagaState::Compensating)
        .when(refunded())
        .then([])
        .when(released("SKU-1"))
        .then([])
        .when(released("SKU-2"))
        .then([no_deadline()])
        .expect_state(SagaState::Cancelled);
}

#[test]
fn a_cancellation_before_the_capture_is_seen_voids_and_refunds_once_the_capture_lands() {
    let scenario = confirming().given([confirmed()]);
    let deadline = deadline_in(&scenario, secs(5));
    scenario
        .when(cancelled(true))
        .then([
            void(CANCELLED),
            release("SKU-1"),
            release("SKU-2"),
            deadline,
        ])
        // The capture was decided first; the void is then refused without an event.
        .when(captured())
        .then([refund(3_000, CANCELLED)])
        .given([released("SKU-1"), released("SKU-2")])
        .expect_state(SagaState::Compensating)
        .when(refunded())
        .then([no_deadline()])
        .expect_state(SagaState::Cancelled);
}

#[test]
fn a_free_order_cancelled_after_its_capture_needs_no_refund() {
    let scenario = Scenario::new(order_id()).given([
        placed_with(vec![line("SKU-1", 1, 0)]),
        reserved("SKU-1"),
        authorised_for(0),
        confirmed(),
        captured_for(0),
    ]);
    let deadline = deadline_in(&scenario, secs(5));
    scenario
        .expect_state(SagaState::Confirmed)
        .when(cancelled(true))
        // A refund of nothing would be refused.
        .then([release("SKU-1"), deadline])
        .when(released("SKU-1"))
        .then([no_deadline()])
        .expect_state(SagaState::Cancelled);
}

#[test]
fn a_cancellation_during_compensation_ends_the_saga_cancelled_not_rejected() {
    reserving()
        .given([reserved("SKU-1"), out_of_stock("SKU-2")])
        .when(cancelled(false))
        .then([])
        .when(released("SKU-1"))
        .then([no_deadline()])
        .expect_state(SagaState::Cancelled);
    // The rejection already sent is refused once the order is cancelled; the cancellation
    // answers it.
    reserving()
        .given([reserved("SKU-1"), out_of_stock("SKU-2"), released("SKU-1")])
        .when(cancelled(false))
        .then([no_deadline()])
        .expect_state(SagaState::Cancelled);
}

// ---------------------------------------------------------------------------------------------
// Retries and parking

/// Compensating with one unacknowledged release of SKU-1.
fn releasing() -> Scenario {
    reserving().given([reserved("SKU-1"), out_of_stock("SKU-2")])
}

#[test]
fn an_unacknowledged_release_is_resent_with_the_next_attempt_and_a_longer_wait() {
    let scenario = releasing().at_deadline();
    let deadline = deadline_in(&scenario, secs(6));
    let scenario = scenario
        .when(Input::DeadlinePassed)
        .then([release_attempt("SKU-1", 2), deadline])
        .at_deadline();
    let deadline = deadline_in(&scenario, secs(7));
    let scenario = scenario
        .when(Input::DeadlinePassed)
        .then([release_attempt("SKU-1", 3), deadline])
        .at_deadline();
    let deadline = deadline_in(&scenario, secs(9));
    scenario
        .when(Input::DeadlinePassed)
        .then([release_attempt("SKU-1", 4), deadline])
        .expect_state(SagaState::Compensating);
}

fn three_attempts() -> SagaConfig {
    SagaConfig {
        max_attempts: 3,
        ..SagaConfig::default()
    }
}

/// The release of SKU-1 sent three times without an answer, with three attempts allowed.
fn parked() -> Scenario {
    releasing()
        .with_config(three_attempts())
        .when_deadline_passes()
        .and()
        .when_deadline_passes()
        .and()
}

#[test]
fn a_compensation_never_acknowledged_needs_attention_after_the_maximum_attempts() {
    let scenario = parked()
        .when_deadline_passes()
        .then([no_deadline()])
        .expect_state(SagaState::NeedsAttention);
    let saga = scenario.saga();
    assert_eq!(
        saga.attention
            .as_ref()
            .map(|attention| (attention.step.as_str(), attention.reason.as_str())),
        Some((
            "release:SKU-1",
            "no answer to release_stock after 3 attempts"
        ))
    );
    assert_eq!(saga.phase, Phase::Compensating);
    let record = saga
        .step(&Step::Release(sku("SKU-1")))
        .expect("the release was sent");
    assert_eq!(record.attempt, 3);
    assert_eq!(record.command_ids.len(), 3);
    assert!(record.is_open(), "parked, not dropped");
}

#[test]
fn an_operator_retry_resends_the_parked_step_with_a_fresh_attempt() {
    let scenario = parked().when_deadline_passes().and();
    let deadline = deadline_in(&scenario, secs(5));
    scenario
        .when(Input::OperatorRetry)
        // Attempt 4: a new command id, so the participant does not take it for the old one.
        .then([release_attempt("SKU-1", 4), deadline])
        .expect_state(SagaState::Compensating)
        .when(released("SKU-1"))
        .then([reject("stock unavailable for SKU-2")]);
}

#[test]
fn a_late_acknowledgement_of_a_parked_step_resumes_the_saga() {
    let scenario = parked().when_deadline_passes().and();
    let deadline = deadline_in(&scenario, secs(5));
    scenario
        .when(released("SKU-1"))
        .then([reject("stock unavailable for SKU-2"), deadline])
        .expect_state(SagaState::Compensating);
}

#[test]
fn an_operator_retry_without_a_parked_step_changes_nothing() {
    reserving().when(Input::OperatorRetry).then_nothing();
    releasing().when(Input::OperatorRetry).then_nothing();
}

#[test]
fn the_retry_wait_grows_from_the_base_and_doubles() {
    let config = SagaConfig::default();
    let waits: Vec<u64> = (1..=5)
        .map(|attempt| config.retry_wait(secs(5), attempt).as_secs())
        .collect();
    assert_eq!(waits, [5, 6, 7, 9, 13]);
    // Absurd attempt numbers saturate rather than overflow.
    assert!(config.retry_wait(secs(5), u32::MAX) > secs(u64::from(u32::MAX)));
    let huge = SagaConfig {
        backoff_base: Duration::MAX,
        ..config
    };
    assert_eq!(huge.retry_wait(secs(5), 3), Duration::MAX);
}

// ---------------------------------------------------------------------------------------------
// Duplicates, late and stray events

#[test]
fn a_redelivered_event_changes_nothing() {
    reserving().when(placed()).then_nothing();
    reserving()
        .given([reserved("SKU-1")])
        .when(reserved("SKU-1"))
        .then_nothing();
    confirming().when(authorised()).then_nothing();
    confirming()
        .given([captured()])
        .when(captured())
        .then_nothing();
    releasing()
        .given([cancelled(false)])
        .when(cancelled(false))
        .then_nothing();
}

#[test]
fn an_answer_for_a_step_already_done_changes_nothing() {
    confirmed_saga().when(reserved("SKU-2")).then_nothing();
    confirmed_saga().when(authorised()).then_nothing();
    releasing()
        .given([released("SKU-1"), rejected("stock unavailable for SKU-2")])
        .expect_state(SagaState::Rejected)
        .when(released("SKU-1"))
        .then_nothing();
}

#[test]
fn a_release_seen_before_its_reservation_settles_the_line() {
    reserving()
        .given([out_of_stock("SKU-2")])
        .when(released("SKU-1"))
        .then([reject("stock unavailable for SKU-2")])
        .when(reserved("SKU-1"))
        // Reserved, then released: nothing is held, nothing more to do.
        .then([])
        .when(rejected("stock unavailable for SKU-2"))
        .then([no_deadline()])
        .expect_state(SagaState::Rejected);
}

#[test]
fn an_event_of_another_order_is_ignored() {
    let other = OrderId(Uuid::from_u128(8));
    reserving()
        .when(event(Fact::StockReserved {
            order_id: other,
            sku: sku("SKU-1"),
            quantity: units(2),
        }))
        .then_nothing();
}

#[test]
fn a_stock_event_for_a_sku_not_on_the_order_is_ignored() {
    reserving()
        .when(event(Fact::StockReservationRejected {
            order_id: order_id(),
            sku: sku("SKU-9"),
            requested: units(1),
            available: 0,
        }))
        .then_nothing();
}

#[test]
fn nothing_is_understood_before_the_order_is_placed() {
    Scenario::new(order_id())
        .when(cancelled(false))
        .then_nothing()
        .when(Input::DeadlinePassed)
        .then_nothing()
        .expect_state(SagaState::NotStarted);
}

#[test]
fn an_order_rejected_elsewhere_is_compensated_and_ends_rejected() {
    reserving()
        .given([reserved("SKU-1")])
        .when(rejected("fraud suspected"))
        .then([
            release("SKU-1"),
            release("SKU-2"),
            deadline_in(&reserving(), secs(5)),
        ])
        .given([released("SKU-1"), released("SKU-2")])
        .expect_state(SagaState::Rejected);
}

// ---------------------------------------------------------------------------------------------
// Reading events, naming steps, storing the saga

fn meta() -> CommandMeta {
    CommandMeta::new("test")
}

fn envelope_of<A: EventCodec>(aggregate_id: &str, event: &A::Event) -> Envelope {
    Envelope::new::<A>(aggregate_id, 1, event, &meta(), start_time())
}

#[test]
fn every_event_the_saga_follows_is_read_from_its_envelope() {
    let order = order_id().to_string();
    let placed = envelope_of::<OrderAggregate>(
        &order,
        &OrderEvent::Placed(OrderPlaced {
            order_id: order_id(),
            customer_id: CustomerId::parse("customer-1").expect("a valid customer id"),
            currency: eur_currency(),
            lines: two_lines(),
            total_minor: 3_000,
            payment_token: token(),
        }),
    );
    let read = SagaEvent::from_envelope(&placed).expect("readable");
    assert_eq!(
        read,
        Some(SagaEvent {
            event_id: placed.event_id,
            fact: Fact::OrderPlaced {
                order_id: order_id(),
                lines: two_lines(),
                total: eur(3_000),
                payment_token: token(),
            }
        })
    );

    let facts = [
        (
            envelope_of::<PaymentAggregate>(
                &order,
                &PaymentEvent::Authorised(PaymentAuthorised {
                    order_id: order_id(),
                    amount: eur(3_000),
                    authorisation_id: "auth-1".into(),
                }),
            ),
            Fact::PaymentAuthorised {
                order_id: order_id(),
                amount: eur(3_000),
            },
        ),
        (
            envelope_of::<PaymentAggregate>(
                &order,
                &PaymentEvent::Captured(PaymentCaptured { amount: eur(3_000) }),
            ),
            Fact::PaymentCaptured {
                order_id: order_id(),
                amount: eur(3_000),
            },
        ),
        (
            envelope_of::<StockAggregate>(
                "SKU-1",
                &StockEvent::Reserved(StockReserved {
                    order_id: order_id(),
                    quantity: units(2),
                }),
            ),
            Fact::StockReserved {
                order_id: order_id(),
                sku: sku("SKU-1"),
                quantity: units(2),
            },
        ),
        (
            envelope_of::<StockAggregate>(
                "SKU-1",
                &StockEvent::ReservationReleased(StockReservationReleased {
                    order_id: order_id(),
                    quantity: units(2),
                }),
            ),
            Fact::StockReservationReleased {
                order_id: order_id(),
                sku: sku("SKU-1"),
            },
        ),
    ];
    for (envelope, fact) in facts {
        let read = SagaEvent::from_envelope(&envelope).expect("readable");
        assert_eq!(read.map(|event| event.fact), Some(fact));
    }
}

#[test]
fn stock_received_and_unknown_aggregates_are_not_the_sagas_concern() {
    let received = envelope_of::<StockAggregate>(
        "SKU-1",
        &StockEvent::Received(StockReceived { quantity: units(5) }),
    );
    assert_eq!(SagaEvent::from_envelope(&received), Ok(None));
    let mut elsewhere = received;
    elsewhere.aggregate_type = "shipment".into();
    assert_eq!(SagaEvent::from_envelope(&elsewhere), Ok(None));
}

#[test]
fn an_event_the_saga_follows_but_cannot_read_is_an_error() {
    let mut confirmed = envelope_of::<OrderAggregate>(
        &order_id().to_string(),
        &OrderEvent::Confirmed(domain::order::OrderConfirmed {}),
    );
    confirmed.aggregate_id = "not-a-uuid".into();
    assert!(matches!(
        SagaEvent::from_envelope(&confirmed),
        Err(SagaEventError::NotAnOrderId { .. })
    ));

    let mut garbled = envelope_of::<StockAggregate>(
        "SKU-1",
        &StockEvent::Reserved(StockReserved {
            order_id: order_id(),
            quantity: units(2),
        }),
    );
    garbled.data = serde_json::json!({ "quantity": "two" });
    assert!(matches!(
        SagaEvent::from_envelope(&garbled),
        Err(SagaEventError::Decode(_))
    ));
}

#[test]
fn step_names_are_stable_and_parse_back() {
    let steps = [
        Step::Reserve(sku("SKU-1")),
        Step::Authorise,
        Step::Confirm,
        Step::Capture,
        Step::Commit(sku("SKU-1")),
        Step::Release(sku("SKU-1")),
        Step::Void,
        Step::Refund,
        Step::Reject,
    ];
    let names: Vec<String> = steps.iter().map(Step::to_string).collect();
    assert_eq!(
        names,
        [
            "reserve:SKU-1",
            "authorise",
            "confirm",
            "capture",
            "commit:SKU-1",
            "release:SKU-1",
            "void",
            "refund",
            "reject"
        ]
    );
    for (step, name) in steps.iter().zip(&names) {
        assert_eq!(name.parse::<Step>().as_ref(), Ok(step));
    }
    for bad in [
        "",
        "reserve",
        "reserve:",
        "reserve:a b",
        "ship",
        "void:SKU-1",
    ] {
        assert_eq!(bad.parse::<Step>(), Err(UnknownStep(bad.into())));
    }
}

#[test]
fn command_ids_are_deterministic_and_differ_by_step_and_attempt() {
    let first = command_id(order_id(), "release:SKU-1", 1);
    assert_eq!(first, command_id(order_id(), "release:SKU-1", 1));
    assert_ne!(first, command_id(order_id(), "release:SKU-1", 2));
    assert_ne!(first, command_id(order_id(), "release:SKU-2", 1));
    assert_ne!(
        first,
        command_id(OrderId(Uuid::from_u128(8)), "release:SKU-1", 1)
    );
    assert_eq!(release("SKU-1").command_id(order_id()), Some(first));
    assert_eq!(no_deadline().command_id(order_id()), None);
}

#[test]
fn the_saga_round_trips_through_json_and_names_its_state_for_readers() {
    let scenario = parked().when_deadline_passes().and();
    let saga = scenario.saga();
    let json = serde_json::to_value(saga).expect("serialisable");
    assert_eq!(json["state"], "needs_attention");
    assert_eq!(json["phase"], "compensating");
    assert_eq!(json["attention"]["step"], "release:SKU-1");
    assert_eq!(json["history"][2]["step"], "release:SKU-1");
    assert_eq!(json["history"][1]["outcome"]["outcome"], "answered");
    let back: Saga = serde_json::from_value(json).expect("deserialisable");
    assert_eq!(&back, saga);
}

#[test]
fn inputs_and_actions_round_trip_through_json() {
    let scenario = reserving();
    let inputs = [
        placed(),
        out_of_stock("SKU-2"),
        Input::DeadlinePassed,
        Input::OperatorRetry,
    ];
    for input in inputs {
        let json = serde_json::to_string(&input).expect("serialisable");
        let back: Input = serde_json::from_str(&json).expect("deserialisable");
        assert_eq!(back, input);
    }
    let actions = [
        reserve("SKU-1", 2),
        refund(3_000, CANCELLED),
        deadline_in(&scenario, secs(5)),
        no_deadline(),
    ];
    for action in actions {
        let json = serde_json::to_string(&action).expect("serialisable");
        let back: Action = serde_json::from_str(&json).expect("deserialisable");
        assert_eq!(back, action);
    }
}
