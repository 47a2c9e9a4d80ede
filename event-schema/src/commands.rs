//! Commands sent to a service through its command topic (`<prefix>.<service>.commands`), by the
//! saga or any other process. Keyed by aggregate id, partitioned like the events topic, so the
//! owner of an aggregate's events also consumes its commands.

use crate::{CommandMeta, Header, Record};
use chrono::{DateTime, Utc};
use domain::{Money, OrderId, PaymentToken, Quantity};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub const CONTENT_TYPE: &str = "application/json";
pub const HEADER_COMMAND_TYPE: &str = "command-type";

/// The actor of the commands the saga sends on its own account (a deadline that passed).
pub const SAGA_ACTOR: &str = "saga";

/// The actor of the commands the saga sends because of what `actor` did (an order placed, an
/// operator's retry, a participant's answer to an earlier step): `saga on behalf of <actor>`,
/// the actor being the principal that started it all, never another saga.
pub fn saga_on_behalf_of(actor: &str) -> String {
    if is_saga_actor(actor) {
        actor.to_owned()
    } else {
        format!("{SAGA_ACTOR} on behalf of {actor}")
    }
}

/// Whether `actor` is the saga ([`SAGA_ACTOR`] or [`saga_on_behalf_of`] someone).
pub fn is_saga_actor(actor: &str) -> bool {
    actor == SAGA_ACTOR
        || actor
            .strip_prefix(SAGA_ACTOR)
            .is_some_and(|rest| rest.starts_with(" on behalf of "))
}

/// One command on a command topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandMessage {
    /// Participants dedupe by it: a redelivered command takes effect once.
    pub command_id: Uuid,
    pub correlation_id: String,
    /// The event (or command) that caused this command.
    pub causation_id: Option<String>,
    pub actor: String,
    pub aggregate_id: String,
    pub issued_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The sender's attempt number for this step (1 for the first send, then 2, 3, ... for
    /// each resend under a new command id); absent from senders that do not retry. A participant
    /// may pass it on to an outside system (the payment provider) but decides nothing by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    pub command: ServiceCommand,
}

/// The commands services accept from their command topics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServiceCommand {
    // inventory
    ReserveStock {
        order_id: OrderId,
        quantity: Quantity,
    },
    ReleaseStock {
        order_id: OrderId,
    },
    CommitStock {
        order_id: OrderId,
    },
    // payment
    AuthorisePayment {
        amount: Money,
        token: PaymentToken,
    },
    CapturePayment {
        amount: Option<Money>,
    },
    RefundPayment {
        amount: Money,
        reason: String,
    },
    VoidPayment {
        reason: String,
    },
    // order
    ConfirmOrder,
    RejectOrder {
        reason: String,
    },
}

impl ServiceCommand {
    pub fn name(&self) -> &'static str {
        match self {
            ServiceCommand::ReserveStock { .. } => "reserve_stock",
            ServiceCommand::ReleaseStock { .. } => "release_stock",
            ServiceCommand::CommitStock { .. } => "commit_stock",
            ServiceCommand::AuthorisePayment { .. } => "authorise_payment",
            ServiceCommand::CapturePayment { .. } => "capture_payment",
            ServiceCommand::RefundPayment { .. } => "refund_payment",
            ServiceCommand::VoidPayment { .. } => "void_payment",
            ServiceCommand::ConfirmOrder => "confirm_order",
            ServiceCommand::RejectOrder { .. } => "reject_order",
        }
    }

    /// The service whose command topic carries it.
    pub fn service(&self) -> &'static str {
        match self {
            ServiceCommand::ReserveStock { .. }
            | ServiceCommand::ReleaseStock { .. }
            | ServiceCommand::CommitStock { .. } => "inventory",
            ServiceCommand::AuthorisePayment { .. }
            | ServiceCommand::CapturePayment { .. }
            | ServiceCommand::RefundPayment { .. }
            | ServiceCommand::VoidPayment { .. } => "payment",
            ServiceCommand::ConfirmOrder | ServiceCommand::RejectOrder { .. } => "order",
        }
    }
}

impl CommandMessage {
    pub fn meta(&self) -> CommandMeta {
        CommandMeta {
            command_id: self.command_id,
            correlation_id: self.correlation_id.clone(),
            causation_id: Some(
                self.causation_id
                    .clone()
                    .unwrap_or_else(|| self.command_id.to_string()),
            ),
            actor: self.actor.clone(),
            request_hash: None,
            traceparent: self.traceparent.clone(),
            tracestate: None,
        }
    }

    pub fn to_record(&self) -> Record {
        Record {
            key: self.aggregate_id.clone(),
            headers: vec![
                Header {
                    name: "content-type".into(),
                    value: CONTENT_TYPE.into(),
                },
                Header {
                    name: HEADER_COMMAND_TYPE.into(),
                    value: self.command.name().into(),
                },
            ],
            value: serde_json::to_vec(self).unwrap_or_default(),
        }
    }

    pub fn from_record(record: &Record) -> Result<Self, String> {
        let message: CommandMessage =
            serde_json::from_slice(&record.value).map_err(|error| error.to_string())?;
        if message.aggregate_id != record.key {
            return Err(format!(
                "record key {:?} does not match the command's aggregate {:?}",
                record.key, message.aggregate_id
            ));
        }
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_saga_acts_on_behalf_of_the_principal_that_started_it() {
        assert_eq!(saga_on_behalf_of("key:1a2b"), "saga on behalf of key:1a2b");
        // An answer to a saga's command carries the saga's actor: it stays the same.
        assert_eq!(
            saga_on_behalf_of("saga on behalf of key:1a2b"),
            "saga on behalf of key:1a2b"
        );
        assert_eq!(saga_on_behalf_of(SAGA_ACTOR), SAGA_ACTOR);
        assert!(is_saga_actor("saga") && is_saga_actor("saga on behalf of jwt:7"));
        assert!(!is_saga_actor("sagacious") && !is_saga_actor("jwt:saga"));
    }
}
