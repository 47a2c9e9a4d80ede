//! Tests of running the platform for real: the deployment files (docker-compose.yml,
//! deploy/k8s, Dockerfile) checked against the platform's real flags, the security layer (the
//! auth matrix, rate limits), the gateway (registry, partition routing, failover, breaker) and
//! the metrics, logs and OTLP traces, and the API contract (schemathesis against /openapi.json).

mod contract;
mod deploy;
mod gateway;
mod observability;
mod otlp;
mod security;
mod support;
