//! The effective-history rule: the one way every reader decides which records of the log are an
//! aggregate's history.
//!
//! Kafka has no conditional append, so two writers can both append a record claiming version
//! `n` of the same aggregate. Reading a partition in log order, a record is *effective* when
//! the version it claims is exactly the aggregate's last effective version + 1; any other record
//! is skipped and counted, never applied. Since every reader sees a partition in the same
//! order and applies the same rule, all of them agree on each aggregate's history: the command
//! side rebuilding its state, projections, replay and the audit trail alike.

use std::collections::HashMap;

/// What the rule says about one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The record is the aggregate's next version: apply it.
    Effective,
    /// The record claims a version already taken: a duplicate delivery, or a losing concurrent
    /// write. Skip it.
    Stale { last_effective: u64 },
    /// The record claims a version beyond the next one: a write decided against a history this
    /// reader does not have. Skip it.
    Gap { expected: u64 },
}

impl Verdict {
    pub fn is_effective(self) -> bool {
        self == Verdict::Effective
    }
}

/// The rule itself: `last_effective` is the aggregate's last effective version (0 before its
/// first event), `claimed` the version the record carries.
pub fn judge(last_effective: u64, claimed: u64) -> Verdict {
    let expected = last_effective.saturating_add(1);
    if claimed == expected {
        Verdict::Effective
    } else if claimed < expected {
        Verdict::Stale { last_effective }
    } else {
        Verdict::Gap { expected }
    }
}

/// The rule applied across many aggregates, for a reader that keeps their last effective
/// versions in memory (readers that keep them in a database call [`judge`] with the stored
/// version instead).
#[derive(Debug, Clone, Default)]
pub struct EffectiveHistory {
    last: HashMap<String, u64>,
    skipped: u64,
}

impl EffectiveHistory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Judges the next record of `aggregate_id` in log order, remembering it when effective.
    pub fn observe(&mut self, aggregate_id: &str, claimed: u64) -> Verdict {
        let last = self.last_version(aggregate_id);
        let verdict = judge(last, claimed);
        if verdict.is_effective() {
            match self.last.get_mut(aggregate_id) {
                Some(version) => *version = claimed,
                None => {
                    self.last.insert(aggregate_id.to_owned(), claimed);
                }
            }
        } else {
            self.skipped += 1;
        }
        verdict
    }

    /// The aggregate's last effective version; 0 when it has none.
    pub fn last_version(&self, aggregate_id: &str) -> u64 {
        self.last.get(aggregate_id).copied().unwrap_or(0)
    }

    /// How many records were skipped as stale or gapped.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Starts from known versions (e.g. a snapshot).
    pub fn with_versions(versions: impl IntoIterator<Item = (String, u64)>) -> Self {
        EffectiveHistory {
            last: versions.into_iter().collect(),
            skipped: 0,
        }
    }
}
