//! Black-box tests of the platform, as one test binary. Each test starts its own platform on
//! port 0 with its own topic prefix (and Postgres schema prefix), so tests run in parallel, on
//! every backend available: the embedded one always, Kafka + Postgres when `scripts/test.sh`
//! provides them (`TEST_KAFKA_BROKERS`, `TEST_DATABASE_URL`; with `TEST_REQUIRE_BACKENDS=1`
//! their absence fails instead of skipping). Logs stay quiet unless `TEST_LOG` is set.

mod ahead_of_log;
mod audit;
mod chaos;
mod command_topics;
mod commands;
mod concurrency;
mod concurrent_starts;
mod console;
mod console_browser;
mod customers;
mod durability;
mod durable_topics;
mod graceful_stop;
mod helpers;
mod openapi;
mod ownership;
mod projection_fence;
mod read_models;
mod replay;
mod sagas;
mod supervision;
mod two_owners;
