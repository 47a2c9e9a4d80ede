//! Payment providers. The payment service asks one to authorise, then decides with its answer
//! (the domain stays pure); it asks one to void an authorisation or refund a capture before it
//! records the void or refund, and records nothing when the provider fails (the saga resends,
//! backing off, and parks the compensation as `needs_attention` if it keeps failing). Real
//! providers plug in behind [`PaymentProvider`].

use std::time::Duration;

use async_trait::async_trait;
use domain::payment::ProviderAnswer;
use domain::{Money, OrderId, PaymentToken};

/// Why a provider gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// Worth retrying (a network blip, a 5xx).
    #[error("transient provider failure: {0}")]
    Transient(String),
}

#[async_trait]
pub trait PaymentProvider: Send + Sync + 'static {
    /// Asks for an authorisation. `attempt` counts from 1. Implementations must be idempotent
    /// per order (providers take the order id as their idempotency key), must not capture, and
    /// may never answer (the caller bounds the wait).
    async fn authorise(
        &self,
        order_id: OrderId,
        amount: Money,
        token: &PaymentToken,
        attempt: u32,
    ) -> Result<ProviderAnswer, ProviderError>;

    /// Releases the hold of the authorisation `authorisation_id` (which this provider gave).
    /// `attempt` is the sender's attempt (1, 2, ...). Must be idempotent per authorisation: a
    /// void asked again after it succeeded succeeds.
    async fn void(
        &self,
        order_id: OrderId,
        authorisation_id: &str,
        attempt: u32,
    ) -> Result<(), ProviderError>;

    /// Pays `amount` of the captured authorisation `authorisation_id` back. Must be idempotent
    /// per authorisation and amount (the payment service asks once per refund it records, but
    /// asks again when recording failed after the provider succeeded).
    async fn refund(
        &self,
        order_id: OrderId,
        authorisation_id: &str,
        amount: Money,
        attempt: u32,
    ) -> Result<(), ProviderError>;
}

/// Sends of a void or refund that `tok_refund_fails` fails: the default `--saga-max-attempts`,
/// so the saga parks the compensation as `needs_attention` and an operator's retry succeeds.
pub const REFUND_FAILS_ATTEMPTS: u32 = 5;

/// The authorisation id the test provider gives a `tok_refund_fails` payment: it recognises
/// such payments by it when asked to void or refund (it keeps no state, so restarts change
/// nothing).
const REFUND_FAILS_SUFFIX: &str = "-refund-fails";

/// A deterministic provider for tests and the embedded default, driven by the token:
/// - `tok_approve`: approved;
/// - `tok_decline`: declined ("card declined");
/// - `tok_timeout`: never answers, so the saga's deadline fires;
/// - `tok_flaky`: fails transiently on the first two attempts, then approves;
/// - `tok_refund_fails`: approved, but every void or refund of it fails on the saga's first
///   [`REFUND_FAILS_ATTEMPTS`] sends and succeeds from the next (an operator's retry);
/// - any other token: declined ("unknown payment token").
///
/// Voids and refunds of any other payment succeed.
#[derive(Debug, Clone, Default)]
pub struct TestProvider;

#[async_trait]
impl PaymentProvider for TestProvider {
    async fn authorise(
        &self,
        order_id: OrderId,
        _amount: Money,
        token: &PaymentToken,
        attempt: u32,
    ) -> Result<ProviderAnswer, ProviderError> {
        let approved = || ProviderAnswer::Approved {
            authorisation_id: format!("auth-{order_id}"),
        };
        match token.as_str() {
            "tok_approve" => Ok(approved()),
            "tok_decline" => Ok(ProviderAnswer::Declined {
                reason: "card declined".into(),
            }),
            "tok_timeout" => {
                std::future::pending::<()>().await;
                Err(ProviderError::Transient("unreachable".into()))
            }
            "tok_flaky" if attempt <= 2 => Err(ProviderError::Transient(format!(
                "provider unavailable (attempt {attempt})"
            ))),
            "tok_flaky" => Ok(approved()),
            "tok_refund_fails" => Ok(ProviderAnswer::Approved {
                authorisation_id: format!("auth-{order_id}{REFUND_FAILS_SUFFIX}"),
            }),
            _ => Ok(ProviderAnswer::Declined {
                reason: "unknown payment token".into(),
            }),
        }
    }

    async fn void(
        &self,
        _order_id: OrderId,
        authorisation_id: &str,
        attempt: u32,
    ) -> Result<(), ProviderError> {
        refund_fails(authorisation_id, attempt, "void")
    }

    async fn refund(
        &self,
        _order_id: OrderId,
        authorisation_id: &str,
        _amount: Money,
        attempt: u32,
    ) -> Result<(), ProviderError> {
        refund_fails(authorisation_id, attempt, "refund")
    }
}

fn refund_fails(authorisation_id: &str, attempt: u32, what: &str) -> Result<(), ProviderError> {
    if authorisation_id.ends_with(REFUND_FAILS_SUFFIX) && attempt <= REFUND_FAILS_ATTEMPTS {
        return Err(ProviderError::Transient(format!(
            "the provider cannot {what} now (attempt {attempt})"
        )));
    }
    Ok(())
}

/// How the payment service calls its provider.
#[derive(Debug, Clone)]
pub struct ProviderPolicy {
    /// The wait for one attempt.
    pub attempt_timeout: Duration,
    pub max_attempts: u32,
    /// Doubled after each failed attempt.
    pub first_backoff: Duration,
}

impl Default for ProviderPolicy {
    fn default() -> Self {
        ProviderPolicy {
            attempt_timeout: Duration::from_secs(2),
            max_attempts: 4,
            first_backoff: Duration::from_millis(50),
        }
    }
}

/// Asks the provider to void or refund, a few times with backoff; false when it did not succeed
/// (the sender resends the command later).
pub async fn release_with_retries<F, Fut>(
    policy: &ProviderPolicy,
    order_id: OrderId,
    call: F,
) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), ProviderError>>,
{
    let mut backoff = policy.first_backoff;
    for attempt in 1..=policy.max_attempts {
        match tokio::time::timeout(policy.attempt_timeout, call()).await {
            Ok(Ok(())) => return true,
            Ok(Err(error)) => {
                tracing::info!(%order_id, attempt, %error, "payment provider failed to void or refund")
            }
            Err(_) => {
                tracing::info!(%order_id, attempt, "payment provider did not answer a void or refund in time");
                return false;
            }
        }
        if attempt < policy.max_attempts {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
    false
}

/// Asks the provider with retries and backoff; `None` when it never gave an answer.
pub async fn authorise_with_retries(
    provider: &dyn PaymentProvider,
    policy: &ProviderPolicy,
    order_id: OrderId,
    amount: Money,
    token: &PaymentToken,
) -> Option<ProviderAnswer> {
    let mut backoff = policy.first_backoff;
    for attempt in 1..=policy.max_attempts {
        match tokio::time::timeout(
            policy.attempt_timeout,
            provider.authorise(order_id, amount, token, attempt),
        )
        .await
        {
            Ok(Ok(answer)) => return Some(answer),
            Ok(Err(error)) => {
                tracing::info!(%order_id, attempt, %error, "payment provider failed; retrying")
            }
            Err(_) => {
                tracing::info!(%order_id, attempt, "payment provider did not answer in time");
                // A provider that does not answer is not retried into a pile-up.
                return None;
            }
        }
        tokio::time::sleep(backoff).await;
        backoff *= 2;
    }
    None
}
