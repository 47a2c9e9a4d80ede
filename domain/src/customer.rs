//! One customer per id: the person orders are placed for and order updates are sent to.
//!
//! A customer's personal fields (name, email) exist here only as [`Sealed`] values: encrypted,
//! before any command is decided, with a data key of that customer's own, which a key store
//! outside the log keeps. The log, its copies, snapshots and read models hold only the sealed
//! form, so erasing a customer is deleting their key (crypto-shredding): every copy anywhere
//! becomes unreadable at once, and the erasure event tells every reader it happened. Sealing
//! draws a fresh nonce, so it is not pure: the caller seals, and the aggregate decides on what
//! it was given, like every other input from outside.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::aggregate::{Aggregate, Decision};
use crate::values::CustomerId;

// ---------------------------------------------------------------------------------------------
// Sealed values

/// A personal field encrypted with its customer's data key: `sealed:v1:` and the unpadded
/// URL-safe base64 of a 24-byte nonce followed by the XChaCha20-Poly1305 ciphertext and tag.
/// The field's name and the customer's id are its associated data, so a sealed value opens
/// only as the field of the customer it was sealed for. Once the key is erased it never opens
/// again.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sealed(String);

impl Sealed {
    pub const PREFIX: &'static str = "sealed:v1:";
    /// The longest sealed value accepted: room for a 4,000-byte field.
    pub const MAX_LEN: usize = 5_600;

    /// Accepts the textual form (as the log and the read models hold it).
    pub fn parse(raw: &str) -> Result<Sealed, NotSealed> {
        let Some(body) = raw.strip_prefix(Self::PREFIX) else {
            return Err(NotSealed("does not start with `sealed:v1:`"));
        };
        if raw.len() > Self::MAX_LEN {
            return Err(NotSealed("is too long"));
        }
        // Nonce (24 bytes) and tag (16 bytes) at least: 40 bytes are 54 base64 characters.
        if body.len() < 54
            || !body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(NotSealed("is not base64url of a nonce and a ciphertext"));
        }
        Ok(Sealed(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a string is not a sealed value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a sealed value {0}")]
pub struct NotSealed(&'static str);

impl TryFrom<String> for Sealed {
    type Error = NotSealed;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        Sealed::parse(&raw)
    }
}

impl From<Sealed> for String {
    fn from(value: Sealed) -> String {
        value.0
    }
}

/// Never the ciphertext in logs and panics: only that it is sealed.
impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealed({} bytes)", self.0.len())
    }
}

impl JsonSchema for Sealed {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Sealed".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "Personal data, encrypted with the customer's data key (XChaCha20-Poly1305; the customer's id and the field's name are the associated data). Readers show it as erased once the key is erased.",
            "pattern": "^sealed:v1:[A-Za-z0-9_-]{54,}$",
            "maxLength": Sealed::MAX_LEN,
            "x-personal-data": "sealed"
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Commands

/// Every personal field arrives sealed (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustomerCommand {
    Register {
        customer_id: CustomerId,
        name: Sealed,
        email: Sealed,
    },
    ChangeEmail {
        email: Sealed,
    },
    /// Forget the customer: their personal fields leave the state, and readers show them as
    /// erased. The caller erases the data key first.
    Erase,
}

// ---------------------------------------------------------------------------------------------
// Events

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CustomerRegistered {
    pub customer_id: CustomerId,
    pub name: Sealed,
    pub email: Sealed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CustomerEmailChanged {
    pub customer_id: CustomerId,
    pub email: Sealed,
}

/// The customer's data key is gone: every sealed field of theirs, in any event or copy, stays
/// unreadable for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CustomerErased {
    pub customer_id: CustomerId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustomerEvent {
    Registered(CustomerRegistered),
    EmailChanged(CustomerEmailChanged),
    Erased(CustomerErased),
}

// ---------------------------------------------------------------------------------------------
// State

/// A registered customer's fields, sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    pub customer_id: CustomerId,
    pub name: Sealed,
    pub email: Sealed,
}

/// An erased customer keeps no field but the id, so a snapshot written after the erasure holds
/// nothing personal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CustomerState {
    #[default]
    NotRegistered,
    Registered(Customer),
    Erased {
        customer_id: CustomerId,
    },
}

// ---------------------------------------------------------------------------------------------
// Errors

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CustomerError {
    #[error("the customer is registered already")]
    AlreadyRegistered,
    #[error("no such customer")]
    NotRegistered,
    #[error("the customer was erased")]
    Erased,
}

// ---------------------------------------------------------------------------------------------
// Rules

/// The customer aggregate.
#[derive(Debug)]
pub enum CustomerAggregate {}

impl Aggregate for CustomerAggregate {
    const TYPE: &'static str = "customer";
    type State = CustomerState;
    type Command = CustomerCommand;
    type Event = CustomerEvent;
    type Error = CustomerError;

    fn decide(
        state: &CustomerState,
        command: &CustomerCommand,
    ) -> Result<Decision<CustomerEvent>, CustomerError> {
        let event = match (state, command) {
            (CustomerState::Erased { .. }, CustomerCommand::Erase) => {
                return Ok(Decision::Unchanged);
            }
            (CustomerState::Erased { .. }, _) => return Err(CustomerError::Erased),
            (
                CustomerState::NotRegistered,
                CustomerCommand::Register {
                    customer_id,
                    name,
                    email,
                },
            ) => CustomerEvent::Registered(CustomerRegistered {
                customer_id: customer_id.clone(),
                name: name.clone(),
                email: email.clone(),
            }),
            (CustomerState::NotRegistered, _) => return Err(CustomerError::NotRegistered),
            (
                CustomerState::Registered(customer),
                CustomerCommand::Register { name, email, .. },
            ) => {
                // The same sealed values again is a redelivery of the registration.
                if &customer.name == name && &customer.email == email {
                    return Ok(Decision::Unchanged);
                }
                return Err(CustomerError::AlreadyRegistered);
            }
            (CustomerState::Registered(customer), CustomerCommand::ChangeEmail { email }) => {
                if &customer.email == email {
                    return Ok(Decision::Unchanged);
                }
                CustomerEvent::EmailChanged(CustomerEmailChanged {
                    customer_id: customer.customer_id.clone(),
                    email: email.clone(),
                })
            }
            (CustomerState::Registered(customer), CustomerCommand::Erase) => {
                CustomerEvent::Erased(CustomerErased {
                    customer_id: customer.customer_id.clone(),
                })
            }
        };
        Ok(Decision::Append(event))
    }

    fn evolve(state: CustomerState, event: &CustomerEvent) -> CustomerState {
        match event {
            CustomerEvent::Registered(registered) => CustomerState::Registered(Customer {
                customer_id: registered.customer_id.clone(),
                name: registered.name.clone(),
                email: registered.email.clone(),
            }),
            CustomerEvent::EmailChanged(changed) => match state {
                CustomerState::Registered(customer) => CustomerState::Registered(Customer {
                    email: changed.email.clone(),
                    ..customer
                }),
                other => other,
            },
            CustomerEvent::Erased(erased) => CustomerState::Erased {
                customer_id: erased.customer_id.clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(tag: char) -> Sealed {
        Sealed::parse(&format!("{}{}", Sealed::PREFIX, tag.to_string().repeat(60))).unwrap()
    }

    fn id() -> CustomerId {
        CustomerId::parse("cust-1").unwrap()
    }

    fn registered() -> CustomerEvent {
        CustomerEvent::Registered(CustomerRegistered {
            customer_id: id(),
            name: sealed('n'),
            email: sealed('e'),
        })
    }

    fn decide(
        history: &[CustomerEvent],
        command: CustomerCommand,
    ) -> Result<Decision<CustomerEvent>, CustomerError> {
        CustomerAggregate::decide(&CustomerAggregate::fold(history), &command)
    }

    #[test]
    fn a_new_customer_registers_with_sealed_fields() {
        let decision = decide(
            &[],
            CustomerCommand::Register {
                customer_id: id(),
                name: sealed('n'),
                email: sealed('e'),
            },
        );
        assert_eq!(decision, Ok(Decision::Append(registered())));
    }

    #[test]
    fn a_registration_redelivered_changes_nothing_and_another_is_refused() {
        let same = CustomerCommand::Register {
            customer_id: id(),
            name: sealed('n'),
            email: sealed('e'),
        };
        assert_eq!(decide(&[registered()], same), Ok(Decision::Unchanged));
        let other = CustomerCommand::Register {
            customer_id: id(),
            name: sealed('m'),
            email: sealed('e'),
        };
        assert_eq!(
            decide(&[registered()], other),
            Err(CustomerError::AlreadyRegistered)
        );
    }

    #[test]
    fn the_email_changes_only_for_a_registered_customer() {
        let change = || CustomerCommand::ChangeEmail { email: sealed('f') };
        assert_eq!(decide(&[], change()), Err(CustomerError::NotRegistered));
        let changed = CustomerEvent::EmailChanged(CustomerEmailChanged {
            customer_id: id(),
            email: sealed('f'),
        });
        assert_eq!(
            decide(&[registered()], change()),
            Ok(Decision::Append(changed.clone()))
        );
        assert_eq!(
            decide(&[registered(), changed], change()),
            Ok(Decision::Unchanged)
        );
    }

    #[test]
    fn an_erased_customer_keeps_no_sealed_field_and_takes_no_command_but_erase() {
        let erased = CustomerEvent::Erased(CustomerErased { customer_id: id() });
        assert_eq!(
            decide(&[registered()], CustomerCommand::Erase),
            Ok(Decision::Append(erased.clone()))
        );
        let history = [registered(), erased];
        assert_eq!(
            CustomerAggregate::fold(&history),
            CustomerState::Erased { customer_id: id() }
        );
        assert_eq!(
            decide(&history, CustomerCommand::Erase),
            Ok(Decision::Unchanged)
        );
        assert_eq!(
            decide(
                &history,
                CustomerCommand::ChangeEmail { email: sealed('g') }
            ),
            Err(CustomerError::Erased)
        );
        assert_eq!(
            decide(
                &history,
                CustomerCommand::Register {
                    customer_id: id(),
                    name: sealed('n'),
                    email: sealed('e'),
                }
            ),
            Err(CustomerError::Erased)
        );
        assert_eq!(
            decide(&[], CustomerCommand::Erase),
            Err(CustomerError::NotRegistered)
        );
    }

    #[test]
    fn only_the_sealed_form_parses_and_debug_never_shows_it() {
        assert!(Sealed::parse("alice@example.com").is_err());
        assert!(Sealed::parse("sealed:v1:short").is_err());
        assert!(Sealed::parse(&format!("{}{}", Sealed::PREFIX, "+".repeat(60))).is_err());
        let value = sealed('a');
        assert!(!format!("{value:?}").contains("aaaa"));
        let json = serde_json::to_string(&value).unwrap();
        assert_eq!(serde_json::from_str::<Sealed>(&json).unwrap(), value);
    }
}
