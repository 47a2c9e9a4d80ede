//! The read models, one module each. Every one checks all events of a batch in memory first
//! (loading the rows they touch with one query), then writes with multi-row upserts.

pub mod audit;
pub mod inventory;
pub mod orders;
pub mod payments;

use crate::db::Value;

/// `$first, $first+1, ...` for an `IN (...)` list of `count` values.
pub(crate) fn in_list(count: usize, first: usize) -> String {
    (first..first + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn texts<'a>(values: impl IntoIterator<Item = &'a String>) -> Vec<Value> {
    values
        .into_iter()
        .map(|value| Value::from(value.as_str()))
        .collect()
}
