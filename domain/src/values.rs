//! Newtypes parsed at the edge: once a value has one of these types it is valid, so no rule
//! deeper in has to check it again ("parse, don't validate").

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a raw value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    #[error("{field} must be at most {max} characters")]
    TooLong { field: &'static str, max: usize },
    #[error("{field} may contain only letters, digits, '-', '_' and '.'")]
    BadCharacters { field: &'static str },
    #[error("quantity must be at least 1")]
    ZeroQuantity,
    #[error("{0:?} is not a UUID")]
    NotAUuid(String),
}

/// Validates the identifier-like strings (SKUs, customer ids, tokens) the same way.
fn identifier(field: &'static str, raw: &str, max: usize) -> Result<String, ValueError> {
    if raw.is_empty() {
        return Err(ValueError::Empty { field });
    }
    if raw.chars().count() > max {
        return Err(ValueError::TooLong { field, max });
    }
    if !raw
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(ValueError::BadCharacters { field });
    }
    Ok(raw.to_owned())
}

macro_rules! identifier_newtype {
    ($(#[$doc:meta])* $name:ident, $field:literal, $max:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
        #[serde(try_from = "String", into = "String")]
        #[schemars(extend("minLength" = 1, "maxLength" = $max, "pattern" = "^[A-Za-z0-9._-]+$"))]
        pub struct $name(String);

        impl $name {
            pub const MAX_LEN: usize = $max;

            pub fn parse(raw: &str) -> Result<Self, ValueError> {
                identifier($field, raw, $max).map($name)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValueError;
            fn try_from(raw: String) -> Result<Self, Self::Error> {
                Self::parse(&raw)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl FromStr for $name {
            type Err = ValueError;
            fn from_str(raw: &str) -> Result<Self, Self::Err> {
                Self::parse(raw)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

identifier_newtype!(
    /// A stock-keeping unit, the identity of a stock item (`SKU-1`).
    Sku,
    "sku",
    64
);
identifier_newtype!(
    /// The customer who placed an order.
    CustomerId,
    "customer_id",
    64
);
identifier_newtype!(
    /// An opaque token standing for the customer's means of payment; the payment provider
    /// resolves it. Never a card number.
    PaymentToken,
    "payment_token",
    128
);

/// An order's identity; also the identity of its payment.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct OrderId(pub Uuid);

impl OrderId {
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        Uuid::parse_str(raw)
            .map(OrderId)
            .map_err(|_| ValueError::NotAUuid(raw.to_owned()))
    }
}

impl FromStr for OrderId {
    type Err = ValueError;
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        Self::parse(raw)
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A positive number of units.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(try_from = "u32", into = "u32")]
#[schemars(extend("minimum" = 1))]
pub struct Quantity(u32);

impl Quantity {
    pub fn new(units: u32) -> Result<Self, ValueError> {
        if units == 0 {
            Err(ValueError::ZeroQuantity)
        } else {
            Ok(Quantity(units))
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for Quantity {
    type Error = ValueError;
    fn try_from(units: u32) -> Result<Self, Self::Error> {
        Quantity::new(units)
    }
}

impl From<Quantity> for u32 {
    fn from(quantity: Quantity) -> u32 {
        quantity.0
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sku_with_letters_digits_and_dashes_parses() {
        assert_eq!(
            Sku::parse("SKU-1_a.b").map(|s| s.to_string()),
            Ok("SKU-1_a.b".into())
        );
    }

    #[test]
    fn an_empty_long_or_odd_sku_is_refused_with_the_field_named() {
        assert_eq!(Sku::parse(""), Err(ValueError::Empty { field: "sku" }));
        assert_eq!(
            Sku::parse(&"x".repeat(65)),
            Err(ValueError::TooLong {
                field: "sku",
                max: 64
            })
        );
        assert_eq!(
            Sku::parse("a/b"),
            Err(ValueError::BadCharacters { field: "sku" })
        );
        assert!(serde_json::from_str::<Sku>("\"a b\"").is_err());
    }

    #[test]
    fn a_zero_quantity_is_refused() {
        assert_eq!(Quantity::new(0), Err(ValueError::ZeroQuantity));
        assert!(serde_json::from_str::<Quantity>("0").is_err());
        assert_eq!(
            serde_json::from_str::<Quantity>("3")
                .map(Quantity::get)
                .ok(),
            Some(3)
        );
    }

    #[test]
    fn an_order_id_is_a_uuid() {
        assert!(OrderId::parse("not-a-uuid").is_err());
        let id = OrderId(Uuid::nil());
        assert_eq!(OrderId::parse(&id.to_string()), Ok(id));
    }
}
