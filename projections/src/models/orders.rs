//! Orders: the order summary (status, lines, totals, payment and reservation status,
//! timestamps) and the orders of a customer.
//!
//! Payment and reservation status come from other aggregates' events, which reach this
//! projection in no particular order relative to the order's own events (other topics, other
//! partitions). They are kept in their own tables keyed by order id and joined when read, so a
//! payment event that arrives before `order.placed` is kept, not lost.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use async_trait::async_trait;
use domain::order::{OrderAggregate, OrderEvent};
use domain::payment::{PaymentAggregate, PaymentEvent};
use domain::stock::{StockAggregate, StockEvent};

use super::{Kind, fetch_for_keys, write_rows};
use crate::db::{Migrations, Tx, Value};
use crate::runtime::{ApplyError, Event, Projection};

#[derive(Debug, Default)]
pub struct Orders;

#[derive(Debug, Clone, Default)]
struct Summary {
    customer_id: String,
    status: String,
    currency: String,
    total_minor: i64,
    lines: String,
    reason: Option<String>,
    placed_at: i64,
    updated_at: i64,
    version: i64,
}

#[async_trait]
impl Projection for Orders {
    fn name(&self) -> &'static str {
        "orders"
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["order", "payment", "stock"]
    }

    fn migrations(&self) -> &'static Migrations {
        static MIGRATIONS: LazyLock<Migrations> = LazyLock::new(|| {
            sql_store::migrations!(
                "orders",
                "../../migrations/orders/20261207000201_order_summary.sql"
            )
        });
        &MIGRATIONS
    }

    async fn apply(&self, tx: &mut Tx, events: &[Event]) -> Result<(), ApplyError> {
        let mut orders = Vec::new();
        let mut payments: BTreeMap<String, (String, i64, i64)> = BTreeMap::new();
        let mut reservations: BTreeMap<(String, String), (i64, String, i64, i64)> = BTreeMap::new();
        for (index, event) in events.iter().enumerate() {
            let envelope = &event.envelope;
            let at = envelope.occurred_at.timestamp_millis();
            let poison = |error: event_schema::DecodeError| ApplyError::Poison {
                index,
                message: error.to_string(),
            };
            match envelope.aggregate_type.as_str() {
                "order" => orders.push((
                    index,
                    event,
                    envelope.event::<OrderAggregate>().map_err(poison)?,
                )),
                "payment" => {
                    let status = match envelope.event::<PaymentAggregate>().map_err(poison)? {
                        PaymentEvent::Authorised(_) => "authorised",
                        PaymentEvent::Declined(_) => "declined",
                        PaymentEvent::Captured(_) => "captured",
                        PaymentEvent::Refunded(_) => "refunded",
                        PaymentEvent::Voided(_) => "voided",
                    };
                    payments.insert(
                        envelope.aggregate_id.clone(),
                        (status.to_owned(), envelope.aggregate_version as i64, at),
                    );
                }
                "stock" => {
                    let (order_id, quantity, status) = match envelope
                        .event::<StockAggregate>()
                        .map_err(poison)?
                    {
                        StockEvent::Reserved(e) => (e.order_id, e.quantity, "reserved"),
                        StockEvent::ReservationRejected(e) => (e.order_id, e.requested, "rejected"),
                        StockEvent::ReservationReleased(e) => (e.order_id, e.quantity, "released"),
                        StockEvent::ReservationCommitted(e) => {
                            (e.order_id, e.quantity, "committed")
                        }
                        StockEvent::Received(_) | StockEvent::Adjusted(_) => continue,
                    };
                    reservations.insert(
                        (order_id.to_string(), envelope.aggregate_id.clone()),
                        (
                            i64::from(quantity.get()),
                            status.to_owned(),
                            envelope.aggregate_version as i64,
                            at,
                        ),
                    );
                }
                _ => {}
            }
        }

        // Order summaries: load, check and fold in memory, then write.
        let ids: Vec<String> = orders
            .iter()
            .map(|(_, event, _)| event.envelope.aggregate_id.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut summaries: BTreeMap<String, Summary> = BTreeMap::new();
        for row in fetch_for_keys(
            tx,
            "SELECT * FROM order_summary WHERE order_id {keys}",
            &[],
            &ids,
        )
        .await?
        {
            summaries.insert(
                row.text("order_id"),
                Summary {
                    customer_id: row.text("customer_id"),
                    status: row.text("status"),
                    currency: row.text("currency"),
                    total_minor: row.int("total_minor"),
                    lines: row.text("lines"),
                    reason: row.get("reason").text().map(str::to_owned),
                    placed_at: row.int("placed_at"),
                    updated_at: row.int("updated_at"),
                    version: row.int("version"),
                },
            );
        }
        for (index, event, order_event) in orders {
            let envelope = &event.envelope;
            let at = envelope.occurred_at.timestamp_millis();
            if let OrderEvent::Placed(placed) = &order_event {
                summaries.insert(
                    envelope.aggregate_id.clone(),
                    Summary {
                        customer_id: placed.customer_id.to_string(),
                        status: "pending".into(),
                        currency: placed.currency.to_string(),
                        total_minor: placed.total_minor,
                        lines: serde_json::to_string(&placed.lines).unwrap_or_else(|_| "[]".into()),
                        reason: None,
                        placed_at: at,
                        updated_at: at,
                        version: envelope.aggregate_version as i64,
                    },
                );
                continue;
            }
            let Some(summary) = summaries.get_mut(&envelope.aggregate_id) else {
                return Err(ApplyError::Poison {
                    index,
                    message: format!(
                        "order {} has no summary: it was never placed",
                        envelope.aggregate_id
                    ),
                });
            };
            match order_event {
                OrderEvent::Placed(_) => {}
                OrderEvent::Confirmed(_) => summary.status = "confirmed".into(),
                OrderEvent::Rejected(e) => {
                    summary.status = "rejected".into();
                    summary.reason = Some(e.reason);
                }
                OrderEvent::Cancelled(e) => {
                    summary.status = "cancelled".into();
                    summary.reason = Some(e.reason);
                }
                OrderEvent::Shipped(_) => summary.status = "shipped".into(),
            }
            summary.updated_at = at;
            summary.version = envelope.aggregate_version as i64;
        }

        let rows: Vec<Vec<Value>> = summaries
            .into_iter()
            .map(|(order_id, summary)| {
                vec![
                    order_id.into(),
                    summary.customer_id.into(),
                    summary.status.into(),
                    summary.currency.into(),
                    summary.total_minor.into(),
                    summary.lines.into(),
                    summary.reason.into(),
                    summary.placed_at.into(),
                    summary.updated_at.into(),
                    summary.version.into(),
                ]
            })
            .collect();
        write_rows(
            tx,
            "order_summary",
            &[
                ("order_id", Kind::Text),
                ("customer_id", Kind::Text),
                ("status", Kind::Text),
                ("currency", Kind::Text),
                ("total_minor", Kind::Int),
                ("lines", Kind::Text),
                ("reason", Kind::Text),
                ("placed_at", Kind::Int),
                ("updated_at", Kind::Int),
                ("version", Kind::Int),
            ],
            &rows,
            "ON CONFLICT (order_id) DO UPDATE SET status = excluded.status, reason = excluded.reason,
             updated_at = excluded.updated_at, version = excluded.version
             WHERE order_summary.version < excluded.version",
        )
        .await?;
        let rows: Vec<Vec<Value>> = payments
            .into_iter()
            .map(|(order_id, (status, version, at))| {
                vec![order_id.into(), status.into(), version.into(), at.into()]
            })
            .collect();
        write_rows(
            tx,
            "order_payment",
            &[
                ("order_id", Kind::Text),
                ("status", Kind::Text),
                ("version", Kind::Int),
                ("updated_at", Kind::Int),
            ],
            &rows,
            "ON CONFLICT (order_id) DO UPDATE SET status = excluded.status, version = excluded.version,
             updated_at = excluded.updated_at
             WHERE order_payment.version < excluded.version",
        )
        .await?;
        let rows: Vec<Vec<Value>> = reservations
            .into_iter()
            .map(|((order_id, sku), (quantity, status, version, at))| {
                vec![
                    order_id.into(),
                    sku.into(),
                    quantity.into(),
                    status.into(),
                    version.into(),
                    at.into(),
                ]
            })
            .collect();
        write_rows(
            tx,
            "order_reservations",
            &[
                ("order_id", Kind::Text),
                ("sku", Kind::Text),
                ("quantity", Kind::Int),
                ("status", Kind::Text),
                ("stock_version", Kind::Int),
                ("updated_at", Kind::Int),
            ],
            &rows,
            "ON CONFLICT (order_id, sku) DO UPDATE SET quantity = excluded.quantity, status = excluded.status,
             stock_version = excluded.stock_version, updated_at = excluded.updated_at
             WHERE order_reservations.stock_version < excluded.stock_version",
        )
        .await?;
        Ok(())
    }
}
