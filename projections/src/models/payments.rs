//! Payments: one row per order's payment (authorised, captured, refunded, status).

use std::collections::BTreeMap;
use std::sync::LazyLock;

use async_trait::async_trait;
use domain::payment::{PaymentAggregate, PaymentEvent};

use super::{Kind, fetch_for_keys, write_rows};
use crate::db::{Migrations, Tx, Value};
use crate::runtime::{ApplyError, Event, Projection};

#[derive(Debug, Default)]
pub struct Payments;

#[derive(Debug, Clone, Default)]
struct Payment {
    status: String,
    currency: Option<String>,
    authorised_minor: i64,
    captured_minor: i64,
    refunded_minor: i64,
    authorisation_id: Option<String>,
    reason: Option<String>,
    version: i64,
    updated_at: i64,
}

#[async_trait]
impl Projection for Payments {
    fn name(&self) -> &'static str {
        "payments"
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["payment"]
    }

    fn migrations(&self) -> &'static Migrations {
        static MIGRATIONS: LazyLock<Migrations> = LazyLock::new(|| {
            sql_store::migrations!(
                "payments",
                "../../migrations/payments/20261207000401_payments.sql"
            )
        });
        &MIGRATIONS
    }

    async fn apply(&self, tx: &mut Tx, events: &[Event]) -> Result<(), ApplyError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut decoded = Vec::with_capacity(events.len());
        for (index, event) in events.iter().enumerate() {
            let payment = event
                .envelope
                .event::<PaymentAggregate>()
                .map_err(|error| ApplyError::Poison {
                    index,
                    message: error.to_string(),
                })?;
            decoded.push((event, payment));
        }
        let ids: Vec<String> = decoded
            .iter()
            .map(|(event, _)| event.envelope.aggregate_id.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut payments: BTreeMap<String, Payment> = BTreeMap::new();
        for row in fetch_for_keys(
            tx,
            "SELECT * FROM payments WHERE order_id {keys}",
            &[],
            &ids,
        )
        .await?
        {
            payments.insert(
                row.text("order_id"),
                Payment {
                    status: row.text("status"),
                    currency: row.get("currency").text().map(str::to_owned),
                    authorised_minor: row.int("authorised_minor"),
                    captured_minor: row.int("captured_minor"),
                    refunded_minor: row.int("refunded_minor"),
                    authorisation_id: row.get("authorisation_id").text().map(str::to_owned),
                    reason: row.get("reason").text().map(str::to_owned),
                    version: row.int("version"),
                    updated_at: row.int("updated_at"),
                },
            );
        }
        for (event, payment_event) in decoded {
            let payment = payments
                .entry(event.envelope.aggregate_id.clone())
                .or_default();
            match payment_event {
                PaymentEvent::Authorised(e) => {
                    payment.status = "authorised".into();
                    payment.currency = Some(e.amount.currency.to_string());
                    payment.authorised_minor = e.amount.amount_minor;
                    payment.authorisation_id = Some(e.authorisation_id);
                }
                PaymentEvent::Declined(e) => {
                    payment.status = "declined".into();
                    payment.currency = Some(e.amount.currency.to_string());
                    payment.reason = Some(e.reason);
                }
                PaymentEvent::Captured(e) => {
                    payment.status = "captured".into();
                    payment.captured_minor += e.amount.amount_minor;
                }
                PaymentEvent::Refunded(e) => {
                    payment.refunded_minor += e.amount.amount_minor;
                    payment.status = if payment.refunded_minor >= payment.captured_minor {
                        "refunded".into()
                    } else {
                        "partially_refunded".into()
                    };
                    payment.reason = Some(e.reason);
                }
                PaymentEvent::Voided(e) => {
                    payment.status = "voided".into();
                    payment.reason = Some(e.reason);
                }
            }
            payment.version = event.envelope.aggregate_version as i64;
            payment.updated_at = event.envelope.occurred_at.timestamp_millis();
        }
        let rows: Vec<Vec<Value>> = payments
            .into_iter()
            .map(|(order_id, payment)| {
                vec![
                    order_id.into(),
                    payment.status.into(),
                    payment.currency.into(),
                    payment.authorised_minor.into(),
                    payment.captured_minor.into(),
                    payment.refunded_minor.into(),
                    payment.authorisation_id.into(),
                    payment.reason.into(),
                    payment.version.into(),
                    payment.updated_at.into(),
                ]
            })
            .collect();
        write_rows(
            tx,
            "payments",
            &[
                ("order_id", Kind::Text),
                ("status", Kind::Text),
                ("currency", Kind::Text),
                ("authorised_minor", Kind::Int),
                ("captured_minor", Kind::Int),
                ("refunded_minor", Kind::Int),
                ("authorisation_id", Kind::Text),
                ("reason", Kind::Text),
                ("version", Kind::Int),
                ("updated_at", Kind::Int),
            ],
            &rows,
            "ON CONFLICT (order_id) DO UPDATE SET status = excluded.status, currency = excluded.currency,
             authorised_minor = excluded.authorised_minor, captured_minor = excluded.captured_minor,
             refunded_minor = excluded.refunded_minor, authorisation_id = excluded.authorisation_id,
             reason = excluded.reason, version = excluded.version, updated_at = excluded.updated_at
             WHERE payments.version < excluded.version",
        )
        .await?;
        Ok(())
    }
}
