//! No command the domain accepts can overflow a read model: receipts up to 2^32 − 1 units,
//! adjustments up to ±(2^53 − 1) (and beyond, which the domain refuses), reservations, releases
//! and commits, and orders whose lines take the largest quantities and prices, are decided by
//! the domain and applied by the real projections (inventory, orders, payments) on SQLite, one
//! event per transaction as a worker would; every read-model row then equals the domain's own
//! state, and no apply fails. Payments take authorisations, captures and refunds of any amount.
//!
//! The same events go through the audit projection too, which keeps whole events as JSON:
//! integers beyond 2^53 (i64::MIN and i64::MAX amounts among them) are where a JSON path loses
//! precision, so each stored event must read back as exactly the event decided, and the audit's
//! timeline and states as of each version must be the domain's own.

use chrono::Utc;
use domain::order::{OrderAggregate, OrderCommand, OrderLine, PlaceOrder};
use domain::payment::{PaymentAggregate, PaymentCommand, PaymentState, ProviderAnswer};
use domain::stock::{MAX_ON_HAND, StockAggregate, StockCommand, StockItem};
use domain::{
    Aggregate, Currency, CustomerId, Decision, Money, OrderId, PaymentToken, Quantity, Sku,
};
use event_log::Position;
use event_schema::{CommandMeta, Envelope, EventCodec};
use projections::audit::{AsOf, state_as_of, timeline};
use projections::db::Db;
use projections::models::audit::Audit;
use projections::models::{inventory::Inventory, orders::Orders, payments::Payments};
use projections::runtime::{Event, Projection, migrate};
use proptest::prelude::*;
use serde::Serialize;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// A read-model database holding `projection`'s tables and the audit's.
async fn open(projection: &dyn Projection) -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = Db::sqlite(&dir.path().join("read.db"))
        .await
        .expect("open the read model");
    migrate(&db, projection).await.expect("migrate");
    migrate(&db, &Audit).await.expect("migrate the audit");
    (dir, db)
}

/// Applies one event to `projection` and to the audit, each in a transaction of its own, as
/// their workers do; returns the envelope they were given.
async fn apply<A: EventCodec>(
    db: &Db,
    projection: &dyn Projection,
    id: &str,
    version: u64,
    event: &A::Event,
) -> Envelope {
    let envelope = Envelope::new::<A>(id, version, event, &CommandMeta::new("test"), Utc::now());
    let event = Event {
        position: Position {
            topic: format!("t.{}.events", A::TYPE),
            partition: 0,
            offset: version - 1,
        },
        envelope,
    };
    for projection in [projection, &Audit] {
        let mut tx = db.begin().await.expect("begin");
        projection
            .apply(&mut tx, std::slice::from_ref(&event))
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "{} applying version {version} failed: {error:?}",
                    projection.name()
                )
            });
        tx.commit().await.expect("commit");
    }
    event.envelope
}

/// What was decided for one aggregate: each event with its envelope and the state after it.
struct History<A: EventCodec> {
    id: String,
    steps: Vec<(A::Event, Envelope, A::State)>,
}

impl<A: EventCodec> History<A>
where
    A::Event: PartialEq,
    A::State: Serialize,
{
    fn new(id: &str) -> Self {
        History {
            id: id.to_owned(),
            steps: Vec::new(),
        }
    }

    /// Applies `event` (see [`apply`]) as the next version, and records it.
    async fn apply(
        &mut self,
        db: &Db,
        projection: &dyn Projection,
        event: A::Event,
        state: &A::State,
    ) {
        let version = self.steps.len() as u64 + 1;
        let envelope = apply::<A>(db, projection, &self.id, version, &event).await;
        self.steps.push((event, envelope, state.clone()));
    }

    /// The audit holds every event exactly as it was decided, and reads back the domain's own
    /// history: the stored JSON is the envelope's, decodes to the very event (every integer of
    /// it, beyond 2^53 too), the timeline lists the events in order, and the state as of each
    /// version (and the latest) is the state the domain folded.
    async fn assert_audited(&self, db: &Db) {
        let rows = db
            .fetch_all(
                "SELECT aggregate_version, envelope FROM audit_events
                 WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY aggregate_version",
                &[A::TYPE.into(), self.id.as_str().into()],
            )
            .await
            .expect("read the audit");
        assert_eq!(
            rows.len(),
            self.steps.len(),
            "the audit holds one row per event"
        );
        for (row, (event, envelope, _)) in rows.iter().zip(&self.steps) {
            let version = envelope.aggregate_version;
            assert_eq!(row.int("aggregate_version"), version as i64);
            let stored = row.text("envelope");
            assert_eq!(
                stored.as_bytes(),
                envelope.to_json_bytes().as_slice(),
                "version {version}: the stored JSON is not the envelope's"
            );
            let read = Envelope::from_json_bytes(stored.as_bytes()).unwrap_or_else(|error| {
                panic!("version {version}: the stored JSON does not read back: {error}")
            });
            assert_eq!(
                &read, envelope,
                "version {version}: read back as another envelope"
            );
            let decoded = read
                .event::<A>()
                .unwrap_or_else(|error| panic!("version {version} does not decode: {error}"));
            assert_eq!(
                &decoded, event,
                "version {version}: read back as another event"
            );
        }

        let timeline = timeline(db, A::TYPE, &self.id)
            .await
            .unwrap_or_else(|error| panic!("no timeline for {}: {error}", self.id));
        let listed: Vec<(i64, String, String)> = timeline
            .events
            .iter()
            .map(|entry| {
                (
                    entry.version,
                    entry.event_id.clone(),
                    entry.event_type.clone(),
                )
            })
            .collect();
        let decided: Vec<(i64, String, String)> = self
            .steps
            .iter()
            .map(|(_, envelope, _)| {
                (
                    envelope.aggregate_version as i64,
                    envelope.event_id.to_string(),
                    envelope.event_type.clone(),
                )
            })
            .collect();
        assert_eq!(listed, decided, "the timeline is not the events decided");

        let mut as_of: Vec<(AsOf, u64, &A::State)> = self
            .steps
            .iter()
            .map(|(_, envelope, state)| {
                let version = envelope.aggregate_version;
                (AsOf::Version(version), version, state)
            })
            .collect();
        if let Some((_, envelope, state)) = self.steps.last() {
            as_of.push((AsOf::Latest, envelope.aggregate_version, state));
        }
        for (point, version, state) in as_of {
            let audited = state_as_of(db, A::TYPE, &self.id, point)
                .await
                .unwrap_or_else(|error| panic!("no state as of {point:?}: {error}"));
            assert_eq!(audited.version, version as i64, "as of {point:?}");
            assert_eq!(
                audited.state,
                serde_json::to_value(state).expect("the state as JSON"),
                "as of {point:?}: the audit's state is not the domain's"
            );
        }
    }
}

fn units(n: u32) -> Quantity {
    Quantity::new(n).expect("a positive quantity")
}

fn stock_command() -> impl Strategy<Value = StockCommand> {
    let order = (1u128..4).prop_map(|n| OrderId(uuid::Uuid::from_u128(n)));
    prop_oneof![
        prop_oneof![Just(u32::MAX), 1u32..=u32::MAX]
            .prop_map(|n| StockCommand::Receive { quantity: units(n) }),
        prop_oneof![
            Just(MAX_ON_HAND as i64),
            Just(-(MAX_ON_HAND as i64)),
            Just(i64::MAX),
            Just(i64::MIN),
            proptest::num::i64::ANY,
            -1_000_000i64..1_000_000,
        ]
        .prop_map(|delta| StockCommand::Adjust {
            delta,
            reason: "stock-take".into(),
        }),
        (order.clone(), prop_oneof![Just(u32::MAX), 1u32..=u32::MAX]).prop_map(|(order_id, n)| {
            StockCommand::Reserve {
                order_id,
                quantity: units(n),
            }
        }),
        order
            .clone()
            .prop_map(|order_id| StockCommand::Release { order_id }),
        order.prop_map(|order_id| StockCommand::Commit { order_id }),
    ]
}

fn amount() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(i64::MAX),
        Just(0i64),
        Just(1i64),
        Just(i64::MIN),
        proptest::num::i64::ANY,
        0i64..1_000_000,
    ]
}

fn euros(amount_minor: i64) -> Money {
    Money {
        amount_minor,
        currency: "EUR".parse().expect("currency"),
    }
}

fn payment_command() -> impl Strategy<Value = PaymentCommand> {
    prop_oneof![
        proptest::option::of(amount()).prop_map(|amount| PaymentCommand::Capture {
            amount: amount.map(euros),
        }),
        amount().prop_map(|amount| PaymentCommand::Refund {
            amount: euros(amount),
            reason: "returned".into(),
        }),
        Just(PaymentCommand::Void {
            reason: "cancelled".into(),
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_inventory_read_model_holds_every_count_the_domain_accepts(
        commands in proptest::collection::vec(stock_command(), 1..16)
    ) {
        runtime().block_on(async {
            let (_dir, db) = open(&Inventory).await;
            let mut item = StockItem::default();
            let mut history = History::<StockAggregate>::new("SKU-X");
            for command in &commands {
                if let Ok(Decision::Append(event)) = StockAggregate::decide(&item, command) {
                    item = StockAggregate::evolve(item, &event);
                    history.apply(&db, &Inventory, event, &item).await;
                }
            }
            let version = history.steps.len();
            if version == 0 {
                return;
            }
            let row = db
                .fetch_optional(
                    "SELECT on_hand, reserved, available, version FROM stock_levels WHERE sku = $1",
                    &["SKU-X".into()],
                )
                .await
                .expect("read")
                .expect("a row");
            assert_eq!(row.int("on_hand"), item.on_hand as i64, "{commands:?}");
            assert_eq!(row.int("reserved"), item.reserved as i64, "{commands:?}");
            assert_eq!(row.int("available"), item.available() as i64, "{commands:?}");
            assert_eq!(row.int("version"), version as i64);
            history.assert_audited(&db).await;
        });
    }

    #[test]
    fn the_orders_read_model_holds_every_total_the_domain_accepts(
        lines in proptest::collection::vec(
            (
                // One unit: a line whose price is beyond 2^53 is accepted.
                prop_oneof![Just(u32::MAX), Just(1u32), 1u32..=u32::MAX],
                prop_oneof![Just(i64::MAX), Just(0i64), 0i64..=i64::MAX, 0i64..10_000],
            ),
            1..4,
        )
    ) {
        runtime().block_on(async {
            let (_dir, db) = open(&Orders).await;
            let order_id = OrderId(uuid::Uuid::now_v7());
            let place = PlaceOrder {
                order_id,
                customer_id: CustomerId::parse("c-1").expect("id"),
                currency: "EUR".parse::<Currency>().expect("currency"),
                payment_token: PaymentToken::parse("tok_approve").expect("token"),
                lines: lines
                    .iter()
                    .enumerate()
                    .map(|(index, (quantity, price))| OrderLine {
                        sku: Sku::parse(&format!("SKU-{index}")).expect("sku"),
                        quantity: units(*quantity),
                        unit_price_minor: *price,
                    })
                    .collect(),
            };
            let state = Default::default();
            let Ok(Decision::Append(event)) =
                OrderAggregate::decide(&state, &OrderCommand::Place(place))
            else {
                // A total beyond i64 is refused by the domain: nothing reaches a read model.
                let total: i128 = lines.iter().map(|(q, p)| i128::from(*q) * i128::from(*p)).sum();
                assert!(total > i128::from(i64::MAX), "{lines:?} refused");
                return;
            };
            let placed = OrderAggregate::evolve(state, &event);
            let mut history = History::<OrderAggregate>::new(&order_id.to_string());
            history.apply(&db, &Orders, event, &placed).await;
            let row = db
                .fetch_optional(
                    "SELECT total_minor FROM order_summary WHERE order_id = $1",
                    &[order_id.to_string().into()],
                )
                .await
                .expect("read")
                .expect("a row");
            let total: i128 = lines.iter().map(|(q, p)| i128::from(*q) * i128::from(*p)).sum();
            assert_eq!(i128::from(row.int("total_minor")), total, "{lines:?}");
            history.assert_audited(&db).await;
        });
    }

    #[test]
    fn the_payments_read_model_holds_every_amount_the_domain_accepts(
        authorised in amount(),
        commands in proptest::collection::vec(payment_command(), 0..8),
    ) {
        runtime().block_on(async {
            let (_dir, db) = open(&Payments).await;
            let order_id = OrderId(uuid::Uuid::now_v7());
            let authorise = PaymentCommand::Authorise {
                order_id,
                amount: euros(authorised),
                token: PaymentToken::parse("tok_approve").expect("token"),
                answer: ProviderAnswer::Approved {
                    authorisation_id: "auth-1".into(),
                },
            };
            let mut state = PaymentState::default();
            let mut history = History::<PaymentAggregate>::new(&order_id.to_string());
            for command in std::iter::once(&authorise).chain(&commands) {
                if let Ok(Decision::Append(event)) = PaymentAggregate::decide(&state, command) {
                    state = PaymentAggregate::evolve(state, &event);
                    history.apply(&db, &Payments, event, &state).await;
                }
            }
            let Some(payment) = state.payment() else {
                return;
            };
            let row = db
                .fetch_optional(
                    "SELECT authorised_minor, captured_minor, refunded_minor FROM payments WHERE order_id = $1",
                    &[order_id.to_string().into()],
                )
                .await
                .expect("read")
                .expect("a row");
            let authorised = payment.authorised.map_or(0, |money| money.amount_minor);
            assert_eq!(row.int("authorised_minor"), authorised, "{commands:?}");
            assert_eq!(row.int("captured_minor"), payment.captured_minor, "{commands:?}");
            assert_eq!(row.int("refunded_minor"), payment.refunded_minor, "{commands:?}");
            history.assert_audited(&db).await;
        });
    }
}
