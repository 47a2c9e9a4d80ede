//! Supervised long-running tasks. Every task a part runs for its whole life (a partition owner's
//! follower and snapshotter, a command consumer, a projection worker, the saga's worker, ticker
//! and relay) is started through a [`Supervisor`]:
//!
//! - a task that ends before [`Supervisor::stop`] (it returned, panicked or was aborted) is a
//!   **failure**: it is logged with why, and [`Supervisor::failures`] names it, which the part's
//!   `/health/ready` reports (503) until the process is restarted — a dead worker shows as a
//!   part that is not ready, not as lag that grows without a cause;
//! - a stop is bounded: [`Supervisor::stop`] marks the stop, and [`Supervisor::wait`] waits for
//!   every task to finish (each ends when the part's shutdown signal reaches it).
//!
//! Tasks are tracked by `tokio_util`'s `TaskTracker`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio_util::task::TaskTracker;

/// Starts, watches and stops a part's long-running tasks; cheap to clone (shared state).
#[derive(Debug, Clone, Default)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    tracker: TaskTracker,
    stopping: AtomicBool,
    next: AtomicU64,
    /// The running tasks, by id: name and a handle to abort it.
    running: Mutex<BTreeMap<u64, (String, AbortHandle)>>,
    /// Why each task that died died, in the order they died.
    failures: Mutex<Vec<String>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Supervisor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `task`, named `name` in logs and readiness, until it ends. It is expected to run
    /// until the part stops: ending earlier is a failure.
    pub fn spawn<F>(&self, name: impl Into<String>, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let name = name.into();
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let handle = self.inner.tracker.spawn(task);
        lock(&self.inner.running).insert(id, (name.clone(), handle.abort_handle()));
        let inner = self.inner.clone();
        self.inner.tracker.spawn(async move {
            let outcome = handle.await;
            lock(&inner.running).remove(&id);
            let stopping = inner.stopping.load(Ordering::Acquire);
            let why = match outcome {
                Ok(()) if stopping => return,
                Err(error) if stopping && error.is_cancelled() => return,
                Ok(()) => "ended before the stop".to_owned(),
                Err(error) if error.is_panic() => {
                    let panic = error.into_panic();
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|text| (*text).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic without a message".to_owned());
                    format!("panicked: {message}")
                }
                Err(_) => "was aborted".to_owned(),
            };
            if stopping {
                tracing::error!(task = %name, "{why} while stopping");
                return;
            }
            tracing::error!(
                task = %name,
                "{why}; this part reports not ready until it is restarted"
            );
            lock(&inner.failures).push(format!("task {name} {why}"));
        });
    }

    /// Why each task that ended before the stop ended (empty while all run).
    pub fn failures(&self) -> Vec<String> {
        lock(&self.inner.failures).clone()
    }

    /// The names of the tasks running now.
    pub fn running(&self) -> Vec<String> {
        lock(&self.inner.running)
            .values()
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Aborts the running tasks named `name` (an operator's or a test's way to kill a worker);
    /// returns how many there were. Each counts as a failure.
    pub fn abort(&self, name: &str) -> usize {
        let running = lock(&self.inner.running);
        let mut aborted = 0;
        for (task, handle) in running.values() {
            if task == name {
                handle.abort();
                aborted += 1;
            }
        }
        aborted
    }

    /// From now on a task that ends is not a failure; no new task is taken.
    pub fn stop(&self) {
        self.inner.stopping.store(true, Ordering::Release);
        self.inner.tracker.close();
    }

    /// Waits until every task has ended, at most `limit`; returns the names of those still
    /// running after it.
    pub async fn wait(&self, limit: Duration) -> Vec<String> {
        if tokio::time::timeout(limit, self.inner.tracker.wait())
            .await
            .is_ok()
        {
            return Vec::new();
        }
        self.running()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn settle() {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test]
    async fn a_task_that_dies_before_the_stop_is_a_failure_named_with_why() {
        let supervisor = Supervisor::new();
        supervisor.spawn("returns", async {});
        supervisor.spawn("panics", async { panic!("boom") });
        supervisor.spawn("runs", std::future::pending());
        settle().await;
        let mut failures = supervisor.failures();
        failures.sort();
        assert_eq!(
            failures,
            [
                "task panics panicked: boom",
                "task returns ended before the stop"
            ]
        );
        assert_eq!(supervisor.running(), ["runs"]);
        assert_eq!(supervisor.abort("runs"), 1);
        settle().await;
        assert!(
            supervisor
                .failures()
                .contains(&"task runs was aborted".to_owned())
        );
        assert!(supervisor.running().is_empty());
    }

    #[tokio::test]
    async fn tasks_that_end_at_the_stop_are_no_failures_and_the_wait_is_bounded() {
        let supervisor = Supervisor::new();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        for name in ["a", "b"] {
            let mut stopped = stopped.clone();
            supervisor.spawn(name, async move {
                let _ = stopped.changed().await;
            });
        }
        supervisor.spawn("stuck", std::future::pending());
        supervisor.stop();
        let _ = stop.send(true);
        let left = supervisor.wait(Duration::from_millis(200)).await;
        assert_eq!(left, ["stuck"]);
        assert!(supervisor.failures().is_empty());
    }
}
