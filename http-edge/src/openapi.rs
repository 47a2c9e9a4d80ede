//! The constraints the handlers enforce, stated in the OpenAPI document: the shapes shared by
//! several services (headers, identifiers, consistency tokens, reasons), as JSON Schema
//! fragments for `#[schema(...)]` and `#[param(...)]` attributes.

use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, OneOfBuilder, Schema, SchemaFormat};
use utoipa::openapi::{KnownFormat, Type};

/// 1 to 255 visible ASCII characters, spaces inside only: `Idempotency-Key`, `X-Correlation-Id`.
pub fn header_text() -> Schema {
    text("^[!-~]([ -~]{0,253}[!-~])?$", None, None)
}

/// `If-Match`: an aggregate version, quoted, bare or weak (`"3"`, `3`, `W/"3"`).
pub fn if_match() -> Schema {
    text("^(W/)?\"?[0-9]{1,19}\"?$", None, None)
}

/// A consistency token: `<topic>:<partition>:<offset>`.
pub fn position() -> Schema {
    text("^.+:[0-9]{1,9}:[0-9]{1,19}$", None, None)
}

/// A reason: 1 to 500 characters, at least one not white space.
pub fn reason() -> Schema {
    text("\\S", Some(1), Some(500))
}

/// A SKU: 1 to 64 letters, digits, `-`, `_`, `.`.
pub fn sku() -> Schema {
    text(IDENTIFIER, Some(1), Some(64))
}

/// A customer id: as a SKU.
pub fn customer_id() -> Schema {
    text(IDENTIFIER, Some(1), Some(64))
}

/// A payment token: 1 to 128 letters, digits, `-`, `_`, `.`.
pub fn payment_token() -> Schema {
    text(IDENTIFIER, Some(1), Some(128))
}

/// Letters, digits, `-`, `_`, `.`: the identifiers' characters.
const IDENTIFIER: &str = "^[A-Za-z0-9._-]+$";

fn text(pattern: &str, min: Option<usize>, max: Option<usize>) -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(pattern))
        .min_length(min)
        .max_length(max)
        .build()
        .into()
}

/// A string of one of `values`.
pub fn one_of(values: &[&str]) -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values.iter().copied()))
        .build()
        .into()
}

/// An aggregate version (a whole number) or an RFC 3339 time.
pub fn version_or_time() -> Schema {
    AnyOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[0-9]{1,19}$"))
                .description(Some("an aggregate version")),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
                .description(Some("an RFC 3339 time")),
        )
        .build()
        .into()
}

/// A whole number from `min` to `max` except 0.
pub fn nonzero_between(min: i64, max: i64) -> Schema {
    OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                .minimum(Some(min))
                .maximum(Some(-1)),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                .minimum(Some(1))
                .maximum(Some(max)),
        )
        .build()
        .into()
}
