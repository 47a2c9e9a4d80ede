//! Customers: one row per customer (status, sealed name and email, times). The fields stay
//! sealed here: only a reader holding the key store opens them, and an erasure removes them.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use async_trait::async_trait;
use domain::customer::{CustomerAggregate, CustomerEvent};

use super::{Kind, fetch_for_keys, write_rows};
use crate::db::{Migrations, Tx, Value};
use crate::runtime::{ApplyError, Event, Projection};

#[derive(Debug, Default)]
pub struct Customers;

#[derive(Debug, Clone, Default)]
struct Customer {
    status: String,
    name: Option<String>,
    email: Option<String>,
    version: i64,
    registered_at: i64,
    updated_at: i64,
    erased_at: Option<i64>,
}

#[async_trait]
impl Projection for Customers {
    fn name(&self) -> &'static str {
        "customers"
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["customer"]
    }

    fn migrations(&self) -> &'static Migrations {
        static MIGRATIONS: LazyLock<Migrations> = LazyLock::new(|| {
            sql_store::migrations!(
                "customers",
                "../../migrations/customers/20261210000201_customers.sql"
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
            let customer = event
                .envelope
                .event::<CustomerAggregate>()
                .map_err(|error| ApplyError::Poison {
                    index,
                    message: error.to_string(),
                })?;
            decoded.push((event, customer));
        }
        let ids: Vec<String> = decoded
            .iter()
            .map(|(event, _)| event.envelope.aggregate_id.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut customers: BTreeMap<String, Customer> = BTreeMap::new();
        for row in fetch_for_keys(
            tx,
            "SELECT * FROM customers WHERE customer_id {keys}",
            &[],
            &ids,
        )
        .await?
        {
            customers.insert(
                row.text("customer_id"),
                Customer {
                    status: row.text("status"),
                    name: row.get("name").text().map(str::to_owned),
                    email: row.get("email").text().map(str::to_owned),
                    version: row.int("version"),
                    registered_at: row.int("registered_at"),
                    updated_at: row.int("updated_at"),
                    erased_at: row.get("erased_at").int(),
                },
            );
        }
        for (event, customer_event) in decoded {
            let at = event.envelope.occurred_at.timestamp_millis();
            let customer = customers
                .entry(event.envelope.aggregate_id.clone())
                .or_default();
            match customer_event {
                CustomerEvent::Registered(e) => {
                    customer.status = "registered".into();
                    customer.name = Some(e.name.into());
                    customer.email = Some(e.email.into());
                    customer.registered_at = at;
                }
                CustomerEvent::EmailChanged(e) => {
                    customer.email = Some(e.email.into());
                }
                CustomerEvent::Erased(_) => {
                    customer.status = "erased".into();
                    customer.name = None;
                    customer.email = None;
                    customer.erased_at = Some(at);
                }
            }
            customer.version = event.envelope.aggregate_version as i64;
            customer.updated_at = at;
        }
        let rows: Vec<Vec<Value>> = customers
            .into_iter()
            .map(|(customer_id, customer)| {
                vec![
                    customer_id.into(),
                    customer.status.into(),
                    customer.name.into(),
                    customer.email.into(),
                    customer.version.into(),
                    customer.registered_at.into(),
                    customer.updated_at.into(),
                    customer.erased_at.into(),
                ]
            })
            .collect();
        write_rows(
            tx,
            "customers",
            &[
                ("customer_id", Kind::Text),
                ("status", Kind::Text),
                ("name", Kind::Text),
                ("email", Kind::Text),
                ("version", Kind::Int),
                ("registered_at", Kind::Int),
                ("updated_at", Kind::Int),
                ("erased_at", Kind::Int),
            ],
            &rows,
            "ON CONFLICT (customer_id) DO UPDATE SET status = excluded.status, name = excluded.name,
             email = excluded.email, version = excluded.version,
             registered_at = excluded.registered_at, updated_at = excluded.updated_at,
             erased_at = excluded.erased_at
             WHERE customers.version < excluded.version",
        )
        .await?;
        Ok(())
    }
}
