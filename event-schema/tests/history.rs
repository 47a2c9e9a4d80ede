//! The effective-history rule: reading a partition in log order, a record is effective when it
//! claims exactly the aggregate's last effective version + 1; everything else is skipped.

use event_schema::{EffectiveHistory, Verdict, judge};
use proptest::prelude::*;
use proptest::sample::Index;

/// The names of the records that become effective, reading `log` in order.
fn effective<'a>(log: &[(&str, u64, &'a str)]) -> Vec<&'a str> {
    let mut history = EffectiveHistory::new();
    log.iter()
        .filter(|(aggregate, version, _)| history.observe(aggregate, *version).is_effective())
        .map(|(_, _, name)| *name)
        .collect()
}

#[test]
fn the_next_version_is_effective_and_any_other_is_not() {
    assert_eq!(judge(0, 1), Verdict::Effective);
    assert_eq!(judge(4, 5), Verdict::Effective);
    assert_eq!(judge(4, 4), Verdict::Stale { last_effective: 4 });
    assert_eq!(judge(4, 1), Verdict::Stale { last_effective: 4 });
    assert_eq!(judge(0, 0), Verdict::Stale { last_effective: 0 });
    assert_eq!(judge(4, 6), Verdict::Gap { expected: 5 });
    assert_eq!(judge(0, 2), Verdict::Gap { expected: 1 });
}

#[test]
fn a_duplicate_delivery_is_skipped_as_stale() {
    let mut history = EffectiveHistory::new();
    assert_eq!(history.observe("order-1", 1), Verdict::Effective);
    assert_eq!(history.observe("order-1", 2), Verdict::Effective);
    assert_eq!(
        history.observe("order-1", 2),
        Verdict::Stale { last_effective: 2 }
    );
    assert_eq!(
        history.observe("order-1", 1),
        Verdict::Stale { last_effective: 2 }
    );
    assert_eq!(history.last_version("order-1"), 2);
    assert_eq!(history.skipped(), 2);
}

#[test]
fn of_two_writes_claiming_the_same_version_the_first_in_log_order_wins() {
    let log = [
        ("order-1", 1, "placed"),
        ("order-1", 2, "confirmed by writer A"),
        ("order-1", 2, "cancelled by writer B"),
        ("order-1", 3, "shipped"),
    ];
    assert_eq!(
        effective(&log),
        ["placed", "confirmed by writer A", "shipped"]
    );
    let mut history = EffectiveHistory::new();
    let verdicts: Vec<Verdict> = log
        .iter()
        .map(|(aggregate, version, _)| history.observe(aggregate, *version))
        .collect();
    assert_eq!(verdicts[2], Verdict::Stale { last_effective: 2 });
}

#[test]
fn a_version_beyond_the_next_is_a_gap_and_the_missing_one_still_counts_when_it_comes() {
    let mut history = EffectiveHistory::new();
    assert_eq!(history.observe("order-1", 1), Verdict::Effective);
    assert_eq!(history.observe("order-1", 3), Verdict::Gap { expected: 2 });
    assert_eq!(history.last_version("order-1"), 1);
    assert_eq!(history.observe("order-1", 2), Verdict::Effective);
    // The gapped record was skipped for good; only a later record claiming 3 counts.
    assert_eq!(history.observe("order-1", 3), Verdict::Effective);
    assert_eq!(history.skipped(), 1);
}

#[test]
fn interleaved_aggregates_are_judged_independently() {
    let log = [
        ("order-1", 1, "1.1"),
        ("order-2", 1, "2.1"),
        ("order-1", 2, "1.2"),
        ("order-2", 3, "2.3 gap"),
        ("order-3", 1, "3.1"),
        ("order-2", 2, "2.2"),
        ("order-1", 2, "1.2 again"),
        ("order-2", 3, "2.3"),
        ("order-3", 1, "3.1 again"),
    ];
    assert_eq!(effective(&log), ["1.1", "2.1", "1.2", "3.1", "2.2", "2.3"]);
}

#[test]
fn a_reader_starting_from_a_snapshot_continues_from_its_versions() {
    let mut history = EffectiveHistory::with_versions([("stock-1".to_owned(), 5)]);
    assert_eq!(history.last_version("stock-1"), 5);
    assert_eq!(
        history.observe("stock-1", 5),
        Verdict::Stale { last_effective: 5 }
    );
    assert_eq!(history.observe("stock-1", 6), Verdict::Effective);
    assert_eq!(history.observe("stock-2", 1), Verdict::Effective);
    assert_eq!(history.skipped(), 1);
}

// ---------------------------------------------------------------------------------------------
// Any log built from valid histories

#[derive(Debug, Clone, PartialEq, Eq)]
struct LogRecord {
    aggregate: String,
    version: u64,
    /// Tells records apart: a duplicate keeps its original's, a conflicting write has its own.
    payload: u32,
}

/// Valid histories of a few aggregates (versions 1..=n each), interleaved in one partition.
fn interleaved() -> impl Strategy<Value = (Vec<u64>, Vec<LogRecord>)> {
    prop::collection::vec(1u64..=6, 1..=4)
        .prop_flat_map(|lengths| {
            let schedule: Vec<usize> = lengths
                .iter()
                .enumerate()
                .flat_map(|(aggregate, &n)| std::iter::repeat_n(aggregate, n as usize))
                .collect();
            (Just(lengths), Just(schedule).prop_shuffle())
        })
        .prop_map(|(lengths, schedule)| {
            let mut next = vec![1u64; lengths.len()];
            let log = schedule
                .into_iter()
                .enumerate()
                .map(|(position, aggregate)| {
                    let version = next[aggregate];
                    next[aggregate] += 1;
                    LogRecord {
                        aggregate: format!("agg-{aggregate}"),
                        version,
                        payload: position as u32,
                    }
                })
                .collect();
            (lengths, log)
        })
}

/// Copies of records put anywhere in the log: exact duplicates (a redelivery, a producer retry)
/// or, when `conflicting`, another write claiming the same version.
fn with_copies(log: &[LogRecord], copies: &[(Index, Index, bool)]) -> Vec<LogRecord> {
    let mut out = log.to_vec();
    for (n, (source, position, conflicting)) in copies.iter().enumerate() {
        let mut copy = log[source.index(log.len())].clone();
        if *conflicting {
            copy.payload = 1_000_000 + n as u32;
        }
        out.insert(position.index(out.len() + 1), copy);
    }
    out
}

/// The records a reader applies, in order, and the reader's state at the end.
fn read(reader: &mut EffectiveHistory, log: &[LogRecord]) -> Vec<LogRecord> {
    log.iter()
        .filter(|record| {
            reader
                .observe(&record.aggregate, record.version)
                .is_effective()
        })
        .cloned()
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_reader_agrees_on_the_effective_history_of_any_log(
        (lengths, log) in interleaved(),
        copies in prop::collection::vec((any::<Index>(), any::<Index>(), any::<bool>()), 0..12),
        cut in any::<Index>(),
    ) {
        let log = with_copies(&log, &copies);

        let mut first = EffectiveHistory::new();
        let seen_by_first = read(&mut first, &log);

        // The second reader stops part-way (a restart, a rebalance), then a new reader goes on
        // from the versions it had reached, as from a snapshot.
        let cut = cut.index(log.len() + 1);
        let mut before = EffectiveHistory::new();
        let mut seen_by_second = read(&mut before, &log[..cut]);
        let snapshot = (0..lengths.len()).map(|aggregate| {
            let id = format!("agg-{aggregate}");
            let version = before.last_version(&id);
            (id, version)
        });
        let mut after = EffectiveHistory::with_versions(snapshot);
        seen_by_second.extend(read(&mut after, &log[cut..]));

        prop_assert_eq!(&seen_by_first, &seen_by_second);
        prop_assert_eq!(
            first.skipped() as usize,
            log.len() - seen_by_first.len()
        );
        for (aggregate, &n) in lengths.iter().enumerate() {
            let id = format!("agg-{aggregate}");
            let versions: Vec<u64> = seen_by_first
                .iter()
                .filter(|record| record.aggregate == id)
                .map(|record| record.version)
                .collect();
            prop_assert_eq!(versions, (1..=n).collect::<Vec<_>>(), "{}", id);
            prop_assert_eq!(first.last_version(&id), n);
        }
    }

    #[test]
    fn redeliveries_alone_never_change_what_is_applied(
        (_, log) in interleaved(),
        copies in prop::collection::vec((any::<Index>(), any::<Index>()), 0..12),
    ) {
        let copies: Vec<(Index, Index, bool)> =
            copies.into_iter().map(|(source, position)| (source, position, false)).collect();
        let applied = read(&mut EffectiveHistory::new(), &with_copies(&log, &copies));
        // An early copy may move an aggregate's event ahead of another's; per aggregate, what is
        // applied is exactly the original history.
        let of = |records: &[LogRecord], id: &str| -> Vec<LogRecord> {
            records.iter().filter(|record| record.aggregate == id).cloned().collect()
        };
        for id in log.iter().map(|record| record.aggregate.as_str()) {
            prop_assert_eq!(of(&applied, id), of(&log, id));
        }
    }
}
