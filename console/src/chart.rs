//! The overview's small charts: stacked bar charts over fixed intervals, drawn by the server as
//! inline SVG (no script). Every bar carries a `<title>` with its figures, and the chart an
//! `aria-label` with its totals (or its latest figures), so the figures are readable without
//! seeing the colours.

use chrono::{DateTime, Utc};

/// A chart of `intervals` consecutive intervals ending now.
pub struct Chart {
    pub caption: String,
    /// What a screen reader says for the whole chart.
    pub summary: String,
    pub width: u32,
    pub height: u32,
    pub bars: Vec<Bar>,
    /// The series, in stacking order, with their CSS class.
    pub legend: Vec<(String, &'static str)>,
    /// The tallest interval's total, labelled on the axis.
    pub peak: String,
    pub from: String,
    pub to: String,
}

/// One series' part of one interval's bar.
pub struct Bar {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    pub class: &'static str,
    pub title: String,
}

/// The window a chart covers: `intervals` intervals of `interval_ms`, the last one holding now.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub first_ms: i64,
    pub interval_ms: i64,
    pub intervals: usize,
}

impl Window {
    pub fn ending_at(now: DateTime<Utc>, interval_ms: i64, intervals: usize) -> Window {
        let current = now.timestamp_millis().div_euclid(interval_ms) * interval_ms;
        Window {
            first_ms: current - interval_ms * (intervals as i64 - 1),
            interval_ms,
            intervals,
        }
    }

    /// Which interval a start time (as the database bucketed it) falls in.
    fn index(&self, start_ms: i64) -> Option<usize> {
        let index = (start_ms - self.first_ms).div_euclid(self.interval_ms);
        (0..self.intervals as i64)
            .contains(&index)
            .then_some(index as usize)
    }
}

const WIDTH: u32 = 600;
const HEIGHT: u32 = 100;

/// What a chart's figures are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Figures {
    /// Counts of what happened in each interval, shown as rates (count ÷ interval); the
    /// summary gives the window's totals.
    Rates,
    /// How many there were at the end of each interval; the summary gives the latest.
    Levels,
}

/// A stacked bar chart of `points` (interval start, series, count). `series` gives each
/// series' name and CSS class in stacking order; points of other series are left out. Points
/// of one series in one interval add up for [`Figures::Rates`]; for [`Figures::Levels`] the
/// last one counts.
pub fn stacked(
    caption: &str,
    window: Window,
    series: &[(&str, &'static str)],
    points: &[(i64, &str, i64)],
    figures: Figures,
) -> Chart {
    let per_second = figures == Figures::Rates;
    let mut counts = vec![vec![0i64; series.len()]; window.intervals];
    for (start, name, count) in points {
        if let (Some(index), Some(which)) = (
            window.index(*start),
            series.iter().position(|(series, _)| series == name),
        ) {
            match figures {
                Figures::Rates => counts[index][which] += count,
                Figures::Levels => counts[index][which] = *count,
            }
        }
    }
    let seconds = window.interval_ms as f64 / 1000.0;
    let figure = |count: i64| {
        if per_second {
            format!("{:.1}/s", count as f64 / seconds)
        } else {
            count.to_string()
        }
    };
    let peak = counts
        .iter()
        .map(|interval| interval.iter().sum::<i64>())
        .max()
        .unwrap_or(0);
    let slot = WIDTH / window.intervals.max(1) as u32;
    let mut bars = Vec::new();
    for (index, interval) in counts.iter().enumerate() {
        let start = window.first_ms + window.interval_ms * index as i64;
        let mut top = HEIGHT;
        for (which, count) in interval.iter().enumerate() {
            if *count == 0 {
                continue;
            }
            let height = ((*count as f64 / peak as f64) * HEIGHT as f64)
                .round()
                .max(1.0) as u32;
            let height = height.min(top);
            top -= height;
            bars.push(Bar {
                x: slot * index as u32,
                y: top,
                width: slot.saturating_sub(1).max(1),
                height,
                class: series[which].1,
                title: format!("{}: {} {}", clock(start), figure(*count), series[which].0),
            });
        }
    }
    // Levels: the latest interval that has any figure.
    let latest = counts
        .iter()
        .rposition(|interval| interval.iter().any(|count| *count != 0));
    let totals: Vec<String> = series
        .iter()
        .enumerate()
        .map(|(which, (name, _))| {
            let total: i64 = match figures {
                Figures::Rates => counts.iter().map(|interval| interval[which]).sum(),
                Figures::Levels => latest.map_or(0, |index| counts[index][which]),
            };
            format!("{name} {total}")
        })
        .collect();
    let totals_are = match figures {
        Figures::Rates => "in all",
        Figures::Levels => "latest",
    };
    let end = window.first_ms + window.interval_ms * window.intervals as i64;
    Chart {
        caption: caption.to_owned(),
        summary: format!(
            "{caption}, {} to {}, {totals_are}: {}",
            clock(window.first_ms),
            clock(end),
            totals.join(", ")
        ),
        width: WIDTH,
        height: HEIGHT,
        bars,
        legend: series
            .iter()
            .map(|(name, class)| ((*name).to_owned(), *class))
            .collect(),
        peak: figure(peak),
        from: clock(window.first_ms),
        to: clock(end),
    }
}

fn clock(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|time| time.format("%H:%M:%S").to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window() -> Window {
        Window {
            first_ms: 1_000_000,
            interval_ms: 10_000,
            intervals: 6,
        }
    }

    #[test]
    fn bars_stack_in_series_order_and_the_tallest_interval_fills_the_chart() {
        let chart = stacked(
            "Sagas",
            window(),
            &[("confirmed", "ok"), ("rejected", "off")],
            &[
                (1_000_000, "confirmed", 3),
                (1_000_000, "rejected", 1),
                (1_020_000, "confirmed", 2),
                // Outside the window, or of no series shown: left out.
                (990_000, "confirmed", 50),
                (1_060_000, "confirmed", 50),
                (1_020_000, "reserving_stock", 9),
            ],
            Figures::Rates,
        );
        assert_eq!(chart.peak, "0.4/s", "4 in the 10-s interval");
        let first: Vec<(u32, u32, &str)> = chart
            .bars
            .iter()
            .filter(|bar| bar.x == 0)
            .map(|bar| (bar.y, bar.height, bar.class))
            .collect();
        assert_eq!(first, vec![(25, 75, "ok"), (0, 25, "off")]);
        let third: Vec<u32> = chart
            .bars
            .iter()
            .filter(|bar| bar.x == 200)
            .map(|bar| bar.height)
            .collect();
        assert_eq!(third, vec![50]);
        assert_eq!(chart.bars.len(), 3);
        assert!(
            chart.summary.contains("in all: confirmed 5, rejected 1"),
            "{}",
            chart.summary
        );
    }

    #[test]
    fn rates_are_counts_over_the_interval() {
        let chart = stacked(
            "Commands",
            window(),
            &[("commands", "ok")],
            &[(1_010_000, "commands", 25)],
            Figures::Rates,
        );
        assert_eq!(chart.peak, "2.5/s");
        assert!(chart.bars[0].title.ends_with("2.5/s commands"));
    }

    #[test]
    fn an_empty_window_draws_no_bars() {
        let chart = stacked(
            "Commands",
            window(),
            &[("commands", "ok")],
            &[],
            Figures::Rates,
        );
        assert!(chart.bars.is_empty());
        assert_eq!(chart.peak, "0.0/s");
    }

    #[test]
    fn levels_keep_the_last_figure_of_an_interval_and_summarise_the_latest() {
        let chart = stacked(
            "In flight",
            window(),
            &[("waiting", "ok"), ("stuck", "off")],
            &[
                (1_000_000, "waiting", 7),
                (1_000_000, "waiting", 3),
                (1_030_000, "waiting", 2),
                (1_030_000, "stuck", 1),
            ],
            Figures::Levels,
        );
        assert_eq!(chart.peak, "3");
        assert!(
            chart.summary.contains("latest: waiting 2, stuck 1"),
            "{}",
            chart.summary
        );
    }

    #[test]
    fn the_window_ends_with_the_interval_holding_now() {
        let now = DateTime::<Utc>::from_timestamp_millis(1_234_567).expect("time");
        let window = Window::ending_at(now, 10_000, 60);
        assert_eq!(window.first_ms + 59 * 10_000, 1_230_000);
        assert_eq!(window.index(1_230_000), Some(59));
        assert_eq!(window.index(1_240_000), None);
    }
}
