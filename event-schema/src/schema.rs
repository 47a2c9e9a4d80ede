//! JSON Schemas of every event type at every schema version ever released, and the check that
//! guards stored events against a breaking change.
//!
//! The schemas describe the CloudEvents `data` of each event type. They are generated from the
//! Rust types (the current shapes in `domain`, the earlier ones in [`crate::upcast::legacy`]) and
//! checked in under `event-schema/schemas/<type>.v<version>.json`, so a reviewer sees every
//! change to the shape of stored data as a diff, and tools outside Rust can validate events.
//!
//! Events are immutable: once a version is released, events of that shape sit in the log
//! forever. So a version's schema may only ever be *widened* (an optional property added, a
//! constraint relaxed); anything that could make a stored event unreadable is a new version with
//! an upcaster. [`breaking_changes`] tells the two apart, and the tests of this crate refuse to
//! overwrite a released version's checked-in schema with a breaking change.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use domain::customer::{CustomerEmailChanged, CustomerErased, CustomerRegistered};
use domain::order::{OrderCancelled, OrderConfirmed, OrderPlaced, OrderRejected, OrderShipped};
use domain::payment::{
    PaymentAuthorised, PaymentCaptured, PaymentDeclined, PaymentRefunded, PaymentVoided,
};
use domain::stock::{
    StockAdjusted, StockReceived, StockReservationCommitted, StockReservationRejected,
    StockReservationReleased, StockReserved,
};
use schemars::{JsonSchema, schema_for};
use serde_json::{Map, Value};

use crate::catalog::{self, EventType};
use crate::upcast::legacy;

/// The folder, relative to this crate's root, where the schemas are checked in.
pub const SCHEMA_DIR: &str = "schemas";

/// The JSON Schema of one event type at one schema version.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedSchema {
    pub event_type: &'static str,
    pub version: u16,
    pub schema: Value,
}

impl GeneratedSchema {
    /// `<type>.v<version>.json`, the name of its checked-in file.
    pub fn file_name(&self) -> String {
        file_name(self.event_type, self.version)
    }

    /// The checked-in form: pretty JSON with keys in a stable order, ending with a newline.
    pub fn to_pretty_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(&sorted(&self.schema))
            .unwrap_or_else(|_| "null".to_owned());
        text.push('\n');
        text
    }
}

/// The file name of an event type's schema at `version`: `<type>.v<version>.json`.
pub fn file_name(event_type: &str, version: u16) -> String {
    format!("{event_type}.v{version}.json")
}

/// The `$id` of an event type's schema at `version`. A URN rather than a URL: the schemas are
/// files in this repository, not documents served anywhere.
pub fn schema_id(event_type: &str, version: u16) -> String {
    format!("urn:fulfilment:event-schema:{event_type}:v{version}")
}

/// The schema of every (event type, schema version) ever released: each type's current version
/// from [`catalog::ALL`] and every earlier version still in the log. Sorted by type, then version.
pub fn generate() -> Vec<GeneratedSchema> {
    use catalog::*;
    let mut schemas = vec![
        current::<CustomerRegistered>(CUSTOMER_REGISTERED),
        current::<CustomerEmailChanged>(CUSTOMER_EMAIL_CHANGED),
        current::<CustomerErased>(CUSTOMER_ERASED),
        current::<OrderPlaced>(ORDER_PLACED),
        current::<OrderConfirmed>(ORDER_CONFIRMED),
        current::<OrderRejected>(ORDER_REJECTED),
        current::<OrderCancelled>(ORDER_CANCELLED),
        current::<OrderShipped>(ORDER_SHIPPED),
        current::<PaymentAuthorised>(PAYMENT_AUTHORISED),
        current::<PaymentDeclined>(PAYMENT_DECLINED),
        current::<PaymentCaptured>(PAYMENT_CAPTURED),
        current::<PaymentRefunded>(PAYMENT_REFUNDED),
        current::<PaymentVoided>(PAYMENT_VOIDED),
        current::<StockReceived>(STOCK_RECEIVED),
        current::<StockAdjusted>(STOCK_ADJUSTED),
        current::<StockReserved>(STOCK_RESERVED),
        current::<StockReservationRejected>(STOCK_RESERVATION_REJECTED),
        current::<StockReservationReleased>(STOCK_RESERVATION_RELEASED),
        current::<StockReservationCommitted>(STOCK_RESERVATION_COMMITTED),
        // Earlier versions: their events are still in the log, upcast when read.
        released::<legacy::OrderPlacedV1>(ORDER_PLACED.name, 1),
    ];
    schemas.sort_by(|a, b| (a.event_type, a.version).cmp(&(b.event_type, b.version)));
    schemas
}

/// The generated schema of `event_type` at `version`, if that version was ever released.
pub fn generated(event_type: &str, version: u16) -> Option<GeneratedSchema> {
    generate()
        .into_iter()
        .find(|schema| schema.event_type == event_type && schema.version == version)
}

fn current<T: JsonSchema>(event_type: EventType) -> GeneratedSchema {
    released::<T>(event_type.name, event_type.version)
}

fn released<T: JsonSchema>(event_type: &'static str, version: u16) -> GeneratedSchema {
    let mut schema = schema_for!(T);
    // The Rust type name schemars puts in `title` would rename with the type; the stored name
    // and version are what identify this shape.
    schema.insert("$id".to_owned(), schema_id(event_type, version).into());
    schema.insert(
        "title".to_owned(),
        format!("{event_type} v{version}").into(),
    );
    GeneratedSchema {
        event_type,
        version,
        schema: schema.to_value(),
    }
}

/// The same JSON with every object's keys in sorted order, whatever map serde_json is built with.
fn sorted(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let entries: BTreeMap<&String, Value> = map
                .iter()
                .map(|(key, value)| (key, sorted(value)))
                .collect();
            Value::Object(
                entries
                    .into_iter()
                    .map(|(key, value)| (key.clone(), value))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

// ---------------------------------------------------------------------------------------------
// Compatibility

/// The changes from `old` to `new`, two schemas of the same event type and version, that would
/// make an event valid under `old` (one already in the log) unreadable under `new`: a removed
/// property, a changed type or format, a new required property, a narrowed enum or a tightened
/// constraint. Widening changes (an optional property added, a constraint relaxed) are fine and
/// not reported. `$ref`s are resolved within each schema's own `$defs`, so renaming a definition
/// is not a change. Each entry names the property path, e.g. ``lines[].unit_price_minor``.
pub fn breaking_changes(old: &Value, new: &Value) -> Vec<String> {
    let mut compare = Compare {
        old_root: old,
        new_root: new,
        in_progress: HashSet::new(),
        changes: Vec::new(),
    };
    compare.schemas("", old, new);
    compare.changes
}

struct Compare<'a> {
    old_root: &'a Value,
    new_root: &'a Value,
    /// `$ref` pairs being compared further up, so a recursive shape does not recurse forever.
    in_progress: HashSet<(String, String)>,
    changes: Vec<String>,
}

impl Compare<'_> {
    fn report(&mut self, path: &str, what: impl std::fmt::Display) {
        let place = if path.is_empty() {
            "the event data".to_owned()
        } else {
            format!("`{path}`")
        };
        self.changes.push(format!("{place}: {what}"));
    }

    fn schemas(&mut self, path: &str, old: &Value, new: &Value) {
        let refs = (ref_of(old), ref_of(new));
        let key = match refs {
            (None, None) => None,
            (old_ref, new_ref) => Some((
                old_ref.unwrap_or_default().to_owned(),
                new_ref.unwrap_or_default().to_owned(),
            )),
        };
        if let Some(key) = &key {
            if self.in_progress.contains(key) {
                return;
            }
            self.in_progress.insert(key.clone());
        }
        match (resolve(self.old_root, old), resolve(self.new_root, new)) {
            (Ok(old), Ok(new)) => self.resolved(path, &old, &new),
            (Err(reference), _) => self.report(
                path,
                format!("the old schema's $ref {reference:?} does not resolve"),
            ),
            (_, Err(reference)) => {
                self.report(path, format!("$ref {reference:?} does not resolve"))
            }
        }
        if let Some(key) = key {
            self.in_progress.remove(&key);
        }
    }

    fn resolved(&mut self, path: &str, old: &Value, new: &Value) {
        // Boolean schemas: `true` accepts everything, `false` nothing.
        match (old, new) {
            (_, Value::Bool(true)) | (Value::Bool(false), _) => return,
            (_, Value::Bool(false)) => return self.report(path, "no longer accepts any value"),
            _ => {}
        }
        let empty = Map::new();
        let old = old.as_object().unwrap_or(&empty);
        let new = new.as_object().unwrap_or(&empty);

        if alternatives(old).is_some() || alternatives(new).is_some() {
            return self.alternatives(path, old, new);
        }
        if old.get("allOf") != new.get("allOf") {
            return self.report(path, "`allOf` changed; check it by hand");
        }
        if !self.types(path, old, new) {
            // Once the type changed, the details below it are noise.
            return;
        }
        self.format(path, old, new);
        self.values(path, old, new);
        self.bounds(path, old, new);
        self.object(path, old, new);
        self.array(path, old, new);
    }

    /// Each alternative `old` allowed must still be accepted by some alternative of `new`.
    fn alternatives(&mut self, path: &str, old: &Map<String, Value>, new: &Map<String, Value>) {
        let old_alternatives = alternatives(old);
        let new_alternatives = alternatives(new);
        let old_branches = old_alternatives
            .clone()
            .unwrap_or_else(|| vec![Value::Object(old.clone())]);
        let new_branches = new_alternatives
            .clone()
            .unwrap_or_else(|| vec![Value::Object(new.clone())]);
        for (index, old_branch) in old_branches.iter().enumerate() {
            // The new alternative closest to accepting this one, and what it lacks.
            let closest = new_branches
                .iter()
                .map(|new_branch| breaking_within(self, path, old_branch, new_branch))
                .min_by_key(Vec::len)
                .unwrap_or_default();
            if closest.is_empty() {
                continue;
            }
            if new_alternatives.is_none() {
                // One schema now stands for all: say precisely what it no longer accepts.
                self.changes.extend(closest);
            } else if old_alternatives.is_some() {
                self.report(
                    path,
                    format!("alternative {} is no longer accepted", index + 1),
                );
            } else {
                self.report(path, "no alternative accepts what it accepted before");
            }
        }
    }

    /// Returns whether the types are compatible.
    fn types(&mut self, path: &str, old: &Map<String, Value>, new: &Map<String, Value>) -> bool {
        let Some(new_types) = types_of(new) else {
            return true;
        };
        let Some(old_types) = types_of(old) else {
            self.report(
                path,
                format!("accepted any type, now only {}", list(&new_types)),
            );
            return false;
        };
        let lost: BTreeSet<&String> = old_types
            .iter()
            .filter(|ty| {
                !(new_types.contains(*ty)
                    || (ty.as_str() == "integer" && new_types.contains("number")))
            })
            .collect();
        if lost.is_empty() {
            return true;
        }
        self.report(
            path,
            format!(
                "type changed from {} to {}",
                list(&old_types),
                list(&new_types)
            ),
        );
        false
    }

    fn format(&mut self, path: &str, old: &Map<String, Value>, new: &Map<String, Value>) {
        let Some(new_format) = new.get("format").and_then(Value::as_str) else {
            return;
        };
        match old.get("format").and_then(Value::as_str) {
            Some(old_format) if old_format == new_format => {}
            Some(old_format) if integer_widens(old_format, new_format) => {}
            Some(old_format) => self.report(
                path,
                format!("format changed from {old_format:?} to {new_format:?}"),
            ),
            None => self.report(path, format!("now requires format {new_format:?}")),
        }
    }

    fn values(&mut self, path: &str, old: &Map<String, Value>, new: &Map<String, Value>) {
        let Some(new_values) = allowed_values(new) else {
            return;
        };
        match allowed_values(old) {
            None => self.report(
                path,
                format!("now restricted to {}", values_list(&new_values)),
            ),
            Some(old_values) => {
                let dropped: Vec<Value> = old_values
                    .into_iter()
                    .filter(|value| !new_values.contains(value))
                    .collect();
                if !dropped.is_empty() {
                    self.report(
                        path,
                        format!("enum narrowed: no longer accepts {}", values_list(&dropped)),
                    );
                }
            }
        }
    }

    fn bounds(&mut self, path: &str, old: &Map<String, Value>, new: &Map<String, Value>) {
        for keyword in [
            "minimum",
            "exclusiveMinimum",
            "minLength",
            "minItems",
            "minProperties",
        ] {
            self.bound(path, keyword, old, new, |old, new| new > old);
        }
        for keyword in [
            "maximum",
            "exclusiveMaximum",
            "maxLength",
            "maxItems",
            "maxProperties",
        ] {
            self.bound(path, keyword, old, new, |old, new| new < old);
        }
        for keyword in ["pattern", "multipleOf"] {
            if let Some(new_value) = new.get(keyword)
                && old.get(keyword) != Some(new_value)
            {
                self.report(path, format!("`{keyword}` is now {new_value}"));
            }
        }
        if new.get("uniqueItems") == Some(&Value::Bool(true))
            && old.get("uniqueItems") != Some(&Value::Bool(true))
        {
            self.report(path, "items must now be unique");
        }
    }

    fn bound(
        &mut self,
        path: &str,
        keyword: &str,
        old: &Map<String, Value>,
        new: &Map<String, Value>,
        tighter: fn(f64, f64) -> bool,
    ) {
        let Some(new_bound) = new.get(keyword).and_then(Value::as_f64) else {
            return;
        };
        match old.get(keyword).and_then(Value::as_f64) {
            Some(old_bound) if !tighter(old_bound, new_bound) => {}
            Some(old_bound) => self.report(
                path,
                format!("`{keyword}` tightened from {old_bound} to {new_bound}"),
            ),
            // A widened integer format drops the bound its old format implied, never adds one.
            None => self.report(path, format!("new constraint `{keyword}`: {new_bound}")),
        }
    }

    fn object(&mut self, path: &str, old: &Map<String, Value>, new: &Map<String, Value>) {
        let empty = Map::new();
        let old_properties = old
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let new_properties = new
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        for (name, old_property) in old_properties {
            let at = join(path, name);
            match new_properties.get(name) {
                Some(new_property) => self.schemas(&at, old_property, new_property),
                None => self.report(&at, "property removed"),
            }
        }
        let old_required = required(old);
        for name in required(new) {
            if old_required.contains(name) {
                continue;
            }
            let at = join(path, name);
            if old_properties.contains_key(name) {
                self.report(&at, "optional property became required");
            } else {
                self.report(&at, "new required property");
            }
        }
        match (
            old.get("additionalProperties"),
            new.get("additionalProperties"),
        ) {
            (Some(Value::Bool(false)), _) | (_, None | Some(Value::Bool(true))) => {}
            (_, Some(Value::Bool(false))) => {
                self.report(path, "no longer accepts properties it does not name")
            }
            (None | Some(Value::Bool(true)), Some(_)) => {
                self.report(path, "properties it does not name are now constrained")
            }
            (Some(old_extra), Some(new_extra)) => {
                self.schemas(&format!("{path}.*"), old_extra, new_extra)
            }
        }
    }

    fn array(&mut self, path: &str, old: &Map<String, Value>, new: &Map<String, Value>) {
        let at = format!("{path}[]");
        match (old.get("items"), new.get("items")) {
            (Some(old_items), Some(new_items)) => self.schemas(&at, old_items, new_items),
            (None, Some(new_items)) => self.schemas(&at, &Value::Bool(true), new_items),
            _ => {}
        }
        let tuple = |schema: &Map<String, Value>| {
            schema
                .get("prefixItems")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        let (old_tuple, new_tuple) = (tuple(old), tuple(new));
        if old_tuple.is_empty() && new_tuple.is_empty() {
            return;
        }
        if old_tuple.len() != new_tuple.len() {
            return self.report(
                path,
                format!(
                    "tuple length changed from {} to {}",
                    old_tuple.len(),
                    new_tuple.len()
                ),
            );
        }
        for (index, (old_item, new_item)) in old_tuple.iter().zip(&new_tuple).enumerate() {
            self.schemas(&format!("{path}[{index}]"), old_item, new_item);
        }
    }
}

/// The breaking changes between two alternatives, collected apart from the main report.
fn breaking_within(outer: &Compare<'_>, path: &str, old: &Value, new: &Value) -> Vec<String> {
    let mut inner = Compare {
        old_root: outer.old_root,
        new_root: outer.new_root,
        in_progress: outer.in_progress.clone(),
        changes: Vec::new(),
    };
    inner.schemas(path, old, new);
    inner.changes
}

fn ref_of(schema: &Value) -> Option<&str> {
    schema.get("$ref").and_then(Value::as_str)
}

/// `schema` with its `$ref` (if any) replaced by the definition it points to within `root`; the
/// keywords beside the `$ref` are kept, as JSON Schema 2020-12 applies both. Errs with the
/// reference that does not resolve.
fn resolve(root: &Value, schema: &Value) -> Result<Value, String> {
    let mut schema = schema.clone();
    // A definition may itself be a `$ref`; a chain longer than this is a cycle.
    for _ in 0..32 {
        let Some(reference) = ref_of(&schema).map(str::to_owned) else {
            return Ok(schema);
        };
        let target = reference
            .strip_prefix('#')
            .and_then(|pointer| root.pointer(pointer))
            .ok_or_else(|| reference.clone())?;
        let mut merged = match target {
            Value::Object(map) => map.clone(),
            Value::Bool(true) => Map::new(),
            other => return Ok(other.clone()),
        };
        if let Value::Object(siblings) = &schema {
            for (key, value) in siblings {
                if key != "$ref" {
                    merged.insert(key.clone(), value.clone());
                }
            }
        }
        schema = Value::Object(merged);
    }
    Err("a cycle of $refs".to_owned())
}

fn alternatives(schema: &Map<String, Value>) -> Option<Vec<Value>> {
    schema
        .get("anyOf")
        .or_else(|| schema.get("oneOf"))
        .and_then(Value::as_array)
        .cloned()
}

/// The JSON types a schema accepts; `None` when it does not restrict them.
fn types_of(schema: &Map<String, Value>) -> Option<BTreeSet<String>> {
    match schema.get("type") {
        Some(Value::String(ty)) => Some(BTreeSet::from([ty.clone()])),
        Some(Value::Array(types)) => Some(
            types
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
        ),
        _ => allowed_values(schema).map(|values| values.iter().map(json_type).collect()),
    }
}

fn json_type(value: &Value) -> String {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(number) if number.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
    .to_owned()
}

/// The values of `enum` or `const`; `None` when neither restricts them.
fn allowed_values(schema: &Map<String, Value>) -> Option<Vec<Value>> {
    if let Some(value) = schema.get("const") {
        return Some(vec![value.clone()]);
    }
    schema.get("enum").and_then(Value::as_array).cloned()
}

fn required(schema: &Map<String, Value>) -> BTreeSet<&str> {
    schema
        .get("required")
        .and_then(Value::as_array)
        .map(|names| names.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Whether every value of integer format `old` fits integer format `new` (e.g. `uint32` in
/// `int64`): widening an integer field keeps stored events readable.
fn integer_widens(old: &str, new: &str) -> bool {
    fn range(format: &str) -> Option<(i128, i128)> {
        let (signed, bits) = match format {
            "int" => (true, 64),
            "uint" => (false, 64),
            _ => match format.strip_prefix("uint") {
                Some(bits) => (false, bits.parse::<u32>().ok()?),
                None => (true, format.strip_prefix("int")?.parse::<u32>().ok()?),
            },
        };
        if !(1..=64).contains(&bits) {
            return None;
        }
        Some(if signed {
            (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1)
        } else {
            (0, (1i128 << bits) - 1)
        })
    }
    match (range(old), range(new)) {
        (Some((old_min, old_max)), Some((new_min, new_max))) => {
            new_min <= old_min && old_max <= new_max
        }
        _ => false,
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

fn list(types: &BTreeSet<String>) -> String {
    types.iter().cloned().collect::<Vec<_>>().join(" or ")
}

fn values_list(values: &[Value]) -> String {
    values
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_version_of_every_event_type_has_exactly_one_schema() {
        let generated: Vec<(&str, u16)> = generate()
            .iter()
            .map(|schema| (schema.event_type, schema.version))
            .collect();
        let mut released: Vec<(&str, u16)> = catalog::ALL
            .iter()
            .flat_map(|ty| (1..=ty.version).map(move |version| (ty.name, version)))
            .collect();
        released.sort();
        assert_eq!(generated, released);
    }

    #[test]
    fn each_schema_names_its_type_and_version() {
        for schema in generate() {
            let id = schema_id(schema.event_type, schema.version);
            assert_eq!(schema.schema["$id"], Value::from(id));
            assert_eq!(
                schema.schema["title"],
                Value::from(format!("{} v{}", schema.event_type, schema.version))
            );
        }
    }

    #[test]
    fn integer_formats_widen_only_to_wider_ranges() {
        assert!(integer_widens("uint32", "int64"));
        assert!(integer_widens("uint32", "uint64"));
        assert!(integer_widens("int32", "int64"));
        assert!(!integer_widens("int64", "uint64"));
        assert!(!integer_widens("uint64", "int64"));
        assert!(!integer_widens("int64", "int32"));
        assert!(!integer_widens("uuid", "int64"));
    }
}
