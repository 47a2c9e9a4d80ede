//! The process's histograms of the log and of what reads it, for the Prometheus `/metrics`
//! exposition the platform renders ([`render`]): append latency by backend and topic
//! (`platform_append_duration_seconds`, observed by both backends' `append`) and projection
//! batch sizes by projection (`platform_projection_batch_size`, observed by the projection
//! runtime for every batch it applies). Per process, as a Prometheus registry is.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Upper bounds (seconds) of the append latency buckets.
const APPEND_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Upper bounds (events) of the batch size buckets.
const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

/// A cumulative histogram with fixed bounds.
#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in millionths of the unit.
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    fn observe(&self, value: f64) {
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            if value <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((value * 1e6).round() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// Label values → histogram, one family.
type Family = Mutex<BTreeMap<Vec<String>, Arc<Histogram>>>;

#[derive(Debug, Default)]
struct Registry {
    /// (backend, topic)
    append: Family,
    /// (projection)
    batch: Family,
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

fn observe(family: &Family, bounds: &'static [f64], labels: &[&str], value: f64) {
    let histogram = {
        let Ok(mut family) = family.lock() else {
            return;
        };
        // Look up by borrowed labels first: the common case allocates nothing.
        match family
            .iter()
            .find(|(key, _)| key.iter().map(String::as_str).eq(labels.iter().copied()))
        {
            Some((_, histogram)) => histogram.clone(),
            None => family
                .entry(labels.iter().map(|label| (*label).to_owned()).collect())
                .or_insert_with(|| Arc::new(Histogram::new(bounds)))
                .clone(),
        }
    };
    histogram.observe(value);
}

/// Records one append's latency (from the call to its durable acknowledgement, or its error).
pub fn observe_append(backend: &str, topic: &str, elapsed: Duration) {
    observe(
        &registry().append,
        APPEND_BOUNDS,
        &[backend, topic],
        elapsed.as_secs_f64(),
    );
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
pub fn observe_batch(projection: &str, size: usize) {
    observe(&registry().batch, BATCH_BOUNDS, &[projection], size as f64);
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Appends both histogram families to a Prometheus text exposition.
pub fn render(out: &mut String) {
    let families: [(&Family, &str, &str, &[&str]); 2] = [
        (
            &registry().append,
            "platform_append_duration_seconds",
            "Time from an append to the log's durable acknowledgement, by backend and topic.",
            &["backend", "topic"],
        ),
        (
            &registry().batch,
            "platform_projection_batch_size",
            "Events per batch a projection applies in one transaction.",
            &["projection"],
        ),
    ];
    for (family, name, help, label_names) in families {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let Ok(family) = family.lock() else {
            continue;
        };
        for (values, histogram) in family.iter() {
            let labels = label_names
                .iter()
                .zip(values)
                .map(|(name, value)| format!("{name}=\"{}\"", escape(value)))
                .collect::<Vec<_>>()
                .join(",");
            histogram.render(out, name, &labels);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_cumulative_buckets_by_label() {
        observe_append("embedded", "metrics-test", Duration::from_millis(3));
        observe_append("embedded", "metrics-test", Duration::from_millis(30));
        observe_batch("metrics-test-projection", 7);
        let mut out = String::new();
        render(&mut out);
        let labels = "backend=\"embedded\",topic=\"metrics-test\"";
        for line in [
            format!("platform_append_duration_seconds_bucket{{{labels},le=\"0.001\"}} 0"),
            format!("platform_append_duration_seconds_bucket{{{labels},le=\"0.005\"}} 1"),
            format!("platform_append_duration_seconds_bucket{{{labels},le=\"0.05\"}} 2"),
            format!("platform_append_duration_seconds_count{{{labels}}} 2"),
            format!("platform_append_duration_seconds_sum{{{labels}}} 0.033"),
            "platform_projection_batch_size_bucket{projection=\"metrics-test-projection\",le=\"5\"} 0".to_owned(),
            "platform_projection_batch_size_bucket{projection=\"metrics-test-projection\",le=\"10\"} 1".to_owned(),
            "platform_projection_batch_size_sum{projection=\"metrics-test-projection\"} 7".to_owned(),
        ] {
            assert!(out.lines().any(|l| l == line), "{line} not in:\n{out}");
        }
    }
}
