//! Each instance's circuit breaker: `--gateway-breaker-failures` consecutive failures open it;
//! while open the instance gets no requests; after `--gateway-breaker-open-ms` one probe goes
//! through and closes it again on success.

use std::time::Instant;

use crate::registry::{Instance, Policy};

#[derive(Debug)]

pub(crate) enum BreakerState {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is in flight; another may go after `until`.
    HalfOpen {
        until: Instant,
    },
}

impl Instance {
    /// Could a request go to this instance now (breaker closed, or open past its time and no
    /// probe in flight)? Does not change the breaker.
    pub(crate) fn available(&self) -> bool {
        let now = Instant::now();
        match *self.breaker.lock().unwrap_or_else(|e| e.into_inner()) {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until } | BreakerState::HalfOpen { until } => now >= until,
        }
    }

    /// Takes the right to send a request now. An open breaker past its time lets exactly one
    /// probe through (half-open); a probe that never reports back frees the slot after the
    /// open time again.
    pub(crate) fn admit(&self, policy: &Policy) -> bool {
        let now = Instant::now();
        let mut breaker = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        match *breaker {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until } | BreakerState::HalfOpen { until } if now >= until => {
                *breaker = BreakerState::HalfOpen {
                    until: now + policy.breaker_open,
                };
                true
            }
            BreakerState::Open { .. } | BreakerState::HalfOpen { .. } => false,
        }
    }

    pub fn breaker_state(&self) -> &'static str {
        match *self.breaker.lock().unwrap_or_else(|e| e.into_inner()) {
            BreakerState::Closed { .. } => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half_open",
        }
    }

    pub(crate) fn record(&self, success: bool, policy: &Policy) {
        let mut breaker = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        *breaker = match (&*breaker, success) {
            (_, true) => BreakerState::Closed { failures: 0 },
            (BreakerState::Closed { failures }, false)
                if failures + 1 < policy.breaker_failures =>
            {
                BreakerState::Closed {
                    failures: failures + 1,
                }
            }
            (_, false) => {
                tracing::warn!(instance = %self.base, "circuit breaker open");
                BreakerState::Open {
                    until: Instant::now() + policy.breaker_open,
                }
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_breaker_opens_after_the_failures_and_lets_one_probe_through_later() {
        let policy = Policy {
            command_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
            retries: 0,
            health_interval: Duration::from_secs(1),
            breaker_failures: 2,
            breaker_open: Duration::from_millis(20),
        };
        let instance = Instance::new("http://x".into());
        instance.record(false, &policy);
        assert!(instance.admit(&policy), "one failure keeps it closed");
        instance.record(false, &policy);
        assert!(!instance.available() && !instance.admit(&policy), "open");
        std::thread::sleep(Duration::from_millis(25));
        assert!(instance.available());
        assert!(instance.admit(&policy), "the probe");
        assert!(!instance.admit(&policy), "only one probe at a time");
        instance.record(false, &policy);
        assert_eq!(
            instance.breaker_state(),
            "open",
            "a failed probe opens it again"
        );
        std::thread::sleep(Duration::from_millis(25));
        assert!(instance.admit(&policy), "the next probe");
        instance.record(true, &policy);
        assert_eq!(instance.breaker_state(), "closed");
    }
}
