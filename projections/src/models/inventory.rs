//! Inventory: stock per SKU (on hand, reserved, available) and the low-stock list.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use async_trait::async_trait;
use domain::stock::{StockAggregate, StockEvent};

use super::{Kind, fetch_for_keys, write_rows};
use crate::db::{Migrations, Tx, Value};
use crate::runtime::{ApplyError, Event, Projection};

#[derive(Debug, Default)]
pub struct Inventory;

#[derive(Debug, Clone, Default)]
struct Level {
    on_hand: i64,
    reserved: i64,
    version: i64,
    updated_at: i64,
}

#[async_trait]
impl Projection for Inventory {
    fn name(&self) -> &'static str {
        "inventory"
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["stock"]
    }

    fn migrations(&self) -> &'static Migrations {
        static MIGRATIONS: LazyLock<Migrations> = LazyLock::new(|| {
            sql_store::migrations!(
                "inventory",
                "../../migrations/inventory/20261207000301_stock_levels.sql"
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
            let stock =
                event
                    .envelope
                    .event::<StockAggregate>()
                    .map_err(|error| ApplyError::Poison {
                        index,
                        message: error.to_string(),
                    })?;
            decoded.push((event, stock));
        }
        let skus: Vec<String> = decoded
            .iter()
            .map(|(event, _)| event.envelope.aggregate_id.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut levels: BTreeMap<String, Level> = BTreeMap::new();
        for row in fetch_for_keys(
            tx,
            "SELECT sku, on_hand, reserved, version, updated_at FROM stock_levels WHERE sku {keys}",
            &[],
            &skus,
        )
        .await?
        {
            levels.insert(
                row.text("sku"),
                Level {
                    on_hand: row.int("on_hand"),
                    reserved: row.int("reserved"),
                    version: row.int("version"),
                    updated_at: row.int("updated_at"),
                },
            );
        }
        for (event, stock) in decoded {
            let level = levels
                .entry(event.envelope.aggregate_id.clone())
                .or_default();
            match stock {
                StockEvent::Received(e) => level.on_hand += i64::from(e.quantity.get()),
                StockEvent::Adjusted(e) => level.on_hand += e.delta,
                StockEvent::Reserved(e) => level.reserved += i64::from(e.quantity.get()),
                StockEvent::ReservationRejected(_) => {}
                StockEvent::ReservationReleased(e) => level.reserved -= i64::from(e.quantity.get()),
                StockEvent::ReservationCommitted(e) => {
                    level.reserved -= i64::from(e.quantity.get());
                    level.on_hand -= i64::from(e.quantity.get());
                }
            }
            level.version = event.envelope.aggregate_version as i64;
            level.updated_at = event.envelope.occurred_at.timestamp_millis();
        }
        let rows: Vec<Vec<Value>> = levels
            .into_iter()
            .map(|(sku, level)| {
                vec![
                    sku.into(),
                    level.on_hand.into(),
                    level.reserved.into(),
                    (level.on_hand - level.reserved).into(),
                    level.version.into(),
                    level.updated_at.into(),
                ]
            })
            .collect();
        write_rows(
            tx,
            "stock_levels",
            &[
                ("sku", Kind::Text),
                ("on_hand", Kind::Int),
                ("reserved", Kind::Int),
                ("available", Kind::Int),
                ("version", Kind::Int),
                ("updated_at", Kind::Int),
            ],
            &rows,
            "ON CONFLICT (sku) DO UPDATE SET on_hand = excluded.on_hand, reserved = excluded.reserved,
             available = excluded.available, version = excluded.version, updated_at = excluded.updated_at
             WHERE stock_levels.version < excluded.version",
        )
        .await?;
        Ok(())
    }
}
