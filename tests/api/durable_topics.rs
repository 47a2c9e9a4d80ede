//! Durable topics on Kafka: a topic is created with `--replication-factor` copies, capped at the
//! cluster's broker count with a warning, and an existing topic with fewer copies than asked for
//! is reported (from the cluster's metadata) and left as it is. The test broker (nisshi) is a
//! single broker, so the default of 3 is capped to 1 there. Kafka only: the embedded log has no
//! replicas.

use std::sync::{Arc, Mutex};

use event_log::EventLog;
use event_log::kafka::{DEFAULT_REPLICATION_FACTOR, KafkaLog, KafkaSettings};
use tracing_subscriber::layer::SubscriberExt as _;

use crate::helpers::{Backend, backends};

/// The warnings logged while it is the thread's subscriber: each one's message and fields.
#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<String>>>);

impl Warnings {
    fn taken(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().expect("warnings"))
    }
}

struct Line(String);

impl tracing::field::Visit for Line {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={value:?}", field.name()));
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() == tracing::Level::WARN {
            let mut line = Line(String::new());
            event.record(&mut line);
            self.0.lock().expect("warnings").push(line.0);
        }
    }
}

fn brokers() -> Option<String> {
    backends()
        .contains(&Backend::Kafka)
        .then(|| std::env::var("TEST_KAFKA_BROKERS").expect("TEST_KAFKA_BROKERS"))
}

async fn connect(brokers: &str, replication_factor: u32) -> KafkaLog {
    let mut settings = KafkaSettings::new(brokers);
    settings.replication_factor = replication_factor;
    KafkaLog::connect(settings)
        .await
        .expect("connect to the test broker")
}

fn fresh_topic() -> String {
    let unique = uuid::Uuid::new_v4().simple().to_string();
    format!("t{}.stock.events", &unique[..12])
}

// A current-thread runtime: the log's warnings are logged on the test's thread, where the
// capturing subscriber is the default.
#[tokio::test(flavor = "current_thread")]
async fn the_default_replication_factor_is_capped_at_one_broker_with_a_warning() {
    let Some(brokers) = brokers() else { return };
    let warnings = Warnings::default();
    let _default =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(warnings.clone()));
    assert_eq!(DEFAULT_REPLICATION_FACTOR, 3);
    let log = connect(&brokers, DEFAULT_REPLICATION_FACTOR).await;
    let topic = fresh_topic();

    assert_eq!(
        log.ensure_topic(&topic, 2).await.expect("create the topic"),
        2
    );
    let created = warnings.taken();
    assert_eq!(created.len(), 1, "one warning at creation: {created:?}");
    for part in [
        format!("creating topic {topic} with replication factor 1 instead of the requested 3"),
        "the cluster has 1 broker(s)".to_owned(),
        "requested=3".to_owned(),
        "replication_factor=1".to_owned(),
    ] {
        assert!(
            created[0].contains(&part),
            "the warning says {part:?}: {}",
            created[0]
        );
    }

    // A later start (another process, a restart) finds the topic with one replica in the
    // cluster's metadata and reports it, naming the topic and both numbers.
    let restarted = connect(&brokers, DEFAULT_REPLICATION_FACTOR).await;
    assert_eq!(
        restarted
            .ensure_topic(&topic, 8)
            .await
            .expect("ensure again"),
        2,
        "an existing topic keeps its partitions"
    );
    let existing = warnings.taken();
    assert_eq!(
        existing.len(),
        1,
        "one warning for the weaker topic: {existing:?}"
    );
    assert!(
        existing[0].contains(&format!(
            "topic {topic} has replication factor 1, below the requested 3"
        )),
        "{}",
        existing[0]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_replication_factor_the_cluster_can_hold_is_used_without_warnings() {
    let Some(brokers) = brokers() else { return };
    let warnings = Warnings::default();
    let _default =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(warnings.clone()));
    let log = connect(&brokers, 1).await;
    let topic = fresh_topic();
    assert_eq!(
        log.ensure_topic(&topic, 3).await.expect("create the topic"),
        3
    );
    // The topic exists now: another start checks its replicas and finds enough.
    assert_eq!(log.ensure_topic(&topic, 3).await.expect("ensure again"), 3);
    let seen = warnings.taken();
    assert!(seen.is_empty(), "no warnings: {seen:?}");
}
