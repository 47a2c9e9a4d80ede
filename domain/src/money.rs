//! Money as integer minor units plus an ISO 4217 currency. There are no floats anywhere.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The active ISO 4217 alphabetic codes. A typo such as `"EUE"` is refused at the edge rather
/// than stored forever in the log.
/// The ISO 4217 currency codes a [`Currency`] may have.
pub const ISO_4217: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT",
    "BGN", "BHD", "BIF", "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD",
    "CDF", "CHF", "CLP", "CNY", "COP", "CRC", "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD",
    "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ",
    "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD", "IRR", "ISK", "JMD", "JOD",
    "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK", "LBP", "LKR",
    "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR",
    "MWK", "MXN", "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN",
    "PGK", "PHP", "PKR", "PLN", "PYG", "QAR", "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR",
    "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB",
    "TJS", "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "UYU", "UZS",
    "VED", "VES", "VND", "VUV", "WST", "XAF", "XCD", "XCG", "XOF", "XPF", "YER", "ZAR", "ZMW",
    "ZWG",
];

/// An ISO 4217 currency code, such as `EUR`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency([u8; 3]);

impl Currency {
    pub fn as_str(&self) -> &str {
        // Only ever built from three ASCII uppercase letters.
        std::str::from_utf8(&self.0).unwrap_or("XXX")
    }
}

impl FromStr for Currency {
    type Err = MoneyError;

    fn from_str(code: &str) -> Result<Self, Self::Err> {
        if !ISO_4217.contains(&code) {
            return Err(MoneyError::UnknownCurrency(code.to_owned()));
        }
        let bytes = code.as_bytes();
        Ok(Currency([bytes[0], bytes[1], bytes[2]]))
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Currency({})", self.as_str())
    }
}

impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = String::deserialize(deserializer)?;
        code.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Currency {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Currency".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "ISO 4217 alphabetic currency code",
            "pattern": "^[A-Z]{3}$"
        })
    }
}

/// An amount of money: integer minor units (cents for EUR) and its currency. Amounts in events
/// are never negative; direction is carried by the event type (captured, refunded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub struct Money {
    /// The amount in the currency's minor unit (e.g. cents).
    pub amount_minor: i64,
    pub currency: Currency,
}

impl Money {
    pub fn new(amount_minor: i64, currency: Currency) -> Self {
        Money {
            amount_minor,
            currency,
        }
    }

    pub fn zero(currency: Currency) -> Self {
        Money::new(0, currency)
    }

    /// Adds two amounts of the same currency, refusing overflow and mixed currencies.
    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        self.amount_minor
            .checked_add(other.amount_minor)
            .map(|amount| Money::new(amount, self.currency))
            .ok_or(MoneyError::Overflow)
    }

    /// Multiplies by a count, refusing overflow.
    pub fn checked_mul(self, factor: u32) -> Result<Money, MoneyError> {
        self.amount_minor
            .checked_mul(i64::from(factor))
            .map(|amount| Money::new(amount, self.currency))
            .ok_or(MoneyError::Overflow)
    }

    fn same_currency(self, other: Money) -> Result<(), MoneyError> {
        if self.currency == other.currency {
            Ok(())
        } else {
            Err(MoneyError::CurrencyMismatch {
                expected: self.currency,
                found: other.currency,
            })
        }
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.amount_minor, self.currency)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("{0:?} is not an ISO 4217 currency code")]
    UnknownCurrency(String),
    #[error("amount is in {found}, expected {expected}")]
    CurrencyMismatch { expected: Currency, found: Currency },
    #[error("amount is too large")]
    Overflow,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_iso_code_parses_and_prints_back() {
        let eur: Currency = "EUR".parse().expect("EUR is ISO 4217");
        assert_eq!(eur.to_string(), "EUR");
        assert_eq!(serde_json::to_string(&eur).expect("serialises"), "\"EUR\"");
    }

    #[test]
    fn an_unknown_or_lowercase_code_is_refused() {
        for code in ["EUE", "eur", "EURO", "", "€"] {
            assert_eq!(
                code.parse::<Currency>(),
                Err(MoneyError::UnknownCurrency(code.into()))
            );
        }
        assert!(serde_json::from_str::<Currency>("\"XYZ\"").is_err());
    }

    #[test]
    fn adding_different_currencies_is_refused() {
        let eur = Money::new(100, "EUR".parse().expect("currency"));
        let usd = Money::new(100, "USD".parse().expect("currency"));
        assert!(matches!(
            eur.checked_add(usd),
            Err(MoneyError::CurrencyMismatch { .. })
        ));
        assert_eq!(eur.checked_add(eur), Ok(Money::new(200, eur.currency)));
    }

    #[test]
    fn overflow_is_refused_not_wrapped() {
        let big = Money::new(i64::MAX, "EUR".parse().expect("currency"));
        assert_eq!(big.checked_mul(2), Err(MoneyError::Overflow));
        assert_eq!(
            big.checked_add(Money::new(1, big.currency)),
            Err(MoneyError::Overflow)
        );
    }
}
