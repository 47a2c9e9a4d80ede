//! The process's histograms of the log and of what reads it, which the platform's Prometheus
//! `/metrics` exposes ([`register`]): append latency by backend and topic
//! (`platform_append_duration_seconds`, observed by both backends' `append`) and projection
//! batch sizes by projection (`platform_projection_batch_size`, observed by the projection
//! runtime for every batch it applies). Per process, as a Prometheus registry is.

use std::collections::HashMap;
use std::sync::{LazyLock, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Upper bounds (seconds) of the append latency buckets.
const APPEND_BOUNDS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Upper bounds (events) of the batch size buckets.
const BATCH_BOUNDS: [f64; 10] = [1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppendLabels {
    backend: &'static str,
    topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BatchLabels {
    projection: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

struct Metrics {
    append: Histograms<AppendLabels>,
    /// The append family's histograms by backend and borrowed topic name: the family is looked
    /// up by an owned label set, which would allocate a topic name per append.
    append_by_topic: RwLock<HashMap<&'static str, HashMap<String, Histogram>>>,
    batch: Histograms<BatchLabels>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    append: Family::new_with_constructor(|| Histogram::new(APPEND_BOUNDS)),
    append_by_topic: RwLock::default(),
    batch: Family::new_with_constructor(|| Histogram::new(BATCH_BOUNDS)),
});

/// Adds the log's histogram families to a registry that `/metrics` encodes.
pub fn register(registry: &mut Registry) {
    registry.register(
        "platform_append_duration_seconds",
        "Time from an append to the log's durable acknowledgement, by backend and topic",
        METRICS.append.clone(),
    );
    registry.register(
        "platform_projection_batch_size",
        "Events per batch a projection applies in one transaction",
        METRICS.batch.clone(),
    );
}

/// Records one append's latency (from the call to its durable acknowledgement, or its error).
pub fn observe_append(backend: &'static str, topic: &str, elapsed: Duration) {
    let seconds = elapsed.as_secs_f64();
    if let Ok(known) = METRICS.append_by_topic.read()
        && let Some(histogram) = known.get(backend).and_then(|topics| topics.get(topic))
    {
        histogram.observe(seconds);
        return;
    }
    let histogram = METRICS.append.get_or_create_owned(&AppendLabels {
        backend,
        topic: topic.to_owned(),
    });
    histogram.observe(seconds);
    if let Ok(mut known) = METRICS.append_by_topic.write() {
        known
            .entry(backend)
            .or_default()
            .insert(topic.to_owned(), histogram);
    }
}

/// Times an append until dropped: `let _timer = AppendTimer::start(backend, topic);`.
#[derive(Debug)]
pub struct AppendTimer<'a> {
    backend: &'static str,
    topic: &'a str,
    started: Instant,
}

impl<'a> AppendTimer<'a> {
    pub fn start(backend: &'static str, topic: &'a str) -> Self {
        AppendTimer {
            backend,
            topic,
            started: Instant::now(),
        }
    }
}

impl Drop for AppendTimer<'_> {
    fn drop(&mut self) {
        observe_append(self.backend, self.topic, self.started.elapsed());
    }
}

/// Records the number of events in one batch a projection applies.
pub fn observe_batch(projection: &'static str, size: usize) {
    METRICS
        .batch
        .get_or_create(&BatchLabels { projection })
        .observe(size as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_expose_cumulative_buckets_by_label() {
        observe_append("embedded", "metrics-test", Duration::from_millis(3));
        observe_append("embedded", "metrics-test", Duration::from_millis(30));
        observe_batch("metrics-test-projection", 7);
        let mut registry = Registry::default();
        register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).expect("encoded");
        let labels = "backend=\"embedded\",topic=\"metrics-test\"";
        for line in [
            "# TYPE platform_append_duration_seconds histogram".to_owned(),
            format!("platform_append_duration_seconds_bucket{{{labels},le=\"0.001\"}} 0"),
            format!("platform_append_duration_seconds_bucket{{{labels},le=\"0.005\"}} 1"),
            format!("platform_append_duration_seconds_bucket{{{labels},le=\"0.05\"}} 2"),
            format!("platform_append_duration_seconds_bucket{{{labels},le=\"+Inf\"}} 2"),
            format!("platform_append_duration_seconds_count{{{labels}}} 2"),
            format!("platform_append_duration_seconds_sum{{{labels}}} 0.033"),
            "platform_projection_batch_size_bucket{projection=\"metrics-test-projection\",le=\"5\"} 0".to_owned(),
            "platform_projection_batch_size_bucket{projection=\"metrics-test-projection\",le=\"10\"} 1".to_owned(),
            "platform_projection_batch_size_sum{projection=\"metrics-test-projection\"} 7.0".to_owned(),
        ] {
            assert!(out.lines().any(|l| l == line), "{line} not in:\n{out}");
        }
    }
}
