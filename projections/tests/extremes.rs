//! No command the domain accepts can overflow a read model: receipts up to 2^32 − 1 units,
//! adjustments up to ±(2^53 − 1) (and beyond, which the domain refuses), reservations, releases
//! and commits, and orders whose lines take the largest quantities and prices, are decided by
//! the domain and applied by the real projections (inventory, orders, payments) on SQLite, one
//! event per transaction as a worker would; every read-model row then equals the domain's own
//! state, and no apply fails. Payments take authorisations, captures and refunds of any amount.

use chrono::Utc;
use domain::order::{OrderAggregate, OrderCommand, OrderLine, PlaceOrder};
use domain::payment::{PaymentAggregate, PaymentCommand, PaymentState, ProviderAnswer};
use domain::stock::{MAX_ON_HAND, StockAggregate, StockCommand, StockItem};
use domain::{
    Aggregate, Currency, CustomerId, Decision, Money, OrderId, PaymentToken, Quantity, Sku,
};
use event_log::Position;
use event_schema::{CommandMeta, Envelope, EventCodec};
use projections::db::Db;
use projections::models::{inventory::Inventory, orders::Orders, payments::Payments};
use projections::runtime::{Event, Projection, migrate};
use proptest::prelude::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

async fn open(projection: &dyn Projection) -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = Db::sqlite(&dir.path().join("read.db"))
        .await
        .expect("open the read model");
    migrate(&db, projection).await.expect("migrate");
    (dir, db)
}

/// Applies one event in a transaction of its own, as a worker does.
async fn apply<A: EventCodec>(
    db: &Db,
    projection: &dyn Projection,
    id: &str,
    version: u64,
    event: &A::Event,
) {
    let envelope = Envelope::new::<A>(id, version, event, &CommandMeta::new("test"), Utc::now());
    let event = Event {
        position: Position {
            topic: format!("t.{}.events", A::TYPE),
            partition: 0,
            offset: version - 1,
        },
        envelope,
    };
    let mut tx = db.begin().await.expect("begin");
    projection
        .apply(&mut tx, std::slice::from_ref(&event))
        .await
        .unwrap_or_else(|error| panic!("applying version {version} failed: {error:?}"));
    tx.commit().await.expect("commit");
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
            let mut version = 0;
            for command in &commands {
                if let Ok(Decision::Append(event)) = StockAggregate::decide(&item, command) {
                    item = StockAggregate::evolve(item, &event);
                    version += 1;
                    apply::<StockAggregate>(&db, &Inventory, "SKU-X", version, &event).await;
                }
            }
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
        });
    }

    #[test]
    fn the_orders_read_model_holds_every_total_the_domain_accepts(
        lines in proptest::collection::vec(
            (
                prop_oneof![Just(u32::MAX), 1u32..=u32::MAX],
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
            apply::<OrderAggregate>(&db, &Orders, &order_id.to_string(), 1, &event).await;
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
            let mut version = 0;
            for command in std::iter::once(&authorise).chain(&commands) {
                if let Ok(Decision::Append(event)) = PaymentAggregate::decide(&state, command) {
                    state = PaymentAggregate::evolve(state, &event);
                    version += 1;
                    let id = order_id.to_string();
                    apply::<PaymentAggregate>(&db, &Payments, &id, version, &event).await;
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
        });
    }
}
