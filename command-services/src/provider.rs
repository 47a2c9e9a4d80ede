//! Payment providers. The payment service asks one to authorise, then decides with its answer
//! (the domain stays pure). Real providers plug in behind [`PaymentProvider`].

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
}

/// A deterministic provider for tests and the embedded default, driven by the token:
/// - `tok_approve`: approved;
/// - `tok_decline`: declined ("card declined");
/// - `tok_timeout`: never answers, so the saga's deadline fires;
/// - `tok_flaky`: fails transiently on the first two attempts, then approves;
/// - any other token: declined ("unknown payment token").
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
            _ => Ok(ProviderAnswer::Declined {
                reason: "unknown payment token".into(),
            }),
        }
    }
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
