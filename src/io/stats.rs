//! Per-operation latency and volume of an engine's I/O.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Spans shorter apart than this are merged into one when recorded (keeps the list short
/// when many small operations follow each other; the error is at most this per gap).
const MERGE_GAP: Duration = Duration::from_micros(5);

/// The time intervals during which some activity (copies, writes) was going on, possibly
/// on several threads at once. [`BusySpans::busy`] is the length of their union: wall-clock
/// time with at least one operation in progress, however many ran in parallel.
#[derive(Debug, Clone, Default)]
pub struct BusySpans {
    spans: Vec<(Instant, Instant)>,
}

impl BusySpans {
    /// Records that the activity ran from `start` to `end`.
    pub fn add(&mut self, start: Instant, end: Instant) {
        let end = end.max(start);
        if let Some(last) = self.spans.last_mut() {
            // Operations mostly complete in order: extend the last span when they touch.
            if start <= last.1 + MERGE_GAP && end + MERGE_GAP >= last.0 {
                last.0 = last.0.min(start);
                last.1 = last.1.max(end);
                return;
            }
        }
        self.spans.push((start, end));
    }

    /// Adds every span of `other` (from another thread) to these.
    pub fn merge(&mut self, other: &BusySpans) {
        self.spans.extend_from_slice(&other.spans);
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Length of the union of the spans.
    pub fn busy(&self) -> Duration {
        union_len(self.spans.clone())
    }

    /// Length of the union of these spans and `other`'s.
    pub fn busy_with(&self, other: &BusySpans) -> Duration {
        let mut all = self.spans.clone();
        all.extend_from_slice(&other.spans);
        union_len(all)
    }
}

fn union_len(mut spans: Vec<(Instant, Instant)>) -> Duration {
    spans.sort_unstable_by_key(|s| s.0);
    let mut total = Duration::ZERO;
    let mut current: Option<(Instant, Instant)> = None;
    for (start, end) in spans {
        match current.as_mut() {
            Some(cur) if start <= cur.1 => cur.1 = cur.1.max(end),
            _ => {
                if let Some((s, e)) = current.replace((start, end)) {
                    total += e - s;
                }
            }
        }
    }
    if let Some((s, e)) = current {
        total += e - s;
    }
    total
}

/// How much two activities overlapped: `(a + b - union) / min(a, b)`, i.e. the share of the
/// shorter one that ran while the other did too. 0 when either is zero; clamped to 0..=1.
pub fn overlap_ratio(a: &BusySpans, b: &BusySpans) -> f64 {
    let (ta, tb) = (a.busy().as_secs_f64(), b.busy().as_secs_f64());
    let shorter = ta.min(tb);
    if shorter <= 0.0 {
        return 0.0;
    }
    let both = ta + tb - a.busy_with(b).as_secs_f64();
    (both / shorter).clamp(0.0, 1.0)
}

/// Counts and a latency histogram (microseconds, 3 significant digits) of one engine's
/// writes or reads.
#[derive(Debug, Clone)]
pub struct IoStats {
    /// Operations completed.
    pub ops: u64,
    /// Bytes transferred.
    pub bytes: u64,
    /// Completion latency of each operation, from submission to completion, in µs.
    pub latency_us: Histogram<u64>,
    /// Calls into the kernel that submitted work (io_uring_enter), where the engine batches.
    pub submits: u64,
    /// When operations were in flight (from submission to the completion being seen).
    pub busy: BusySpans,
    /// Submission queue entries handed to the kernel by those calls.
    pub sqes_submitted: u64,
    /// Bytes of fresh read destinations faulted in ahead with huge pages, and with 4 KiB
    /// pages, where the read chose ([`Pages::Chosen`](super::Pages)).
    pub fresh_pages: FreshPages,
}

/// Bytes of fresh read destinations faulted in with each page size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct FreshPages {
    /// With transparent huge pages.
    pub huge_bytes: u64,
    /// With 4 KiB pages.
    pub small_bytes: u64,
}

impl Default for IoStats {
    fn default() -> Self {
        IoStats {
            ops: 0,
            bytes: 0,
            latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("static histogram bounds are valid"),
            submits: 0,
            busy: BusySpans::default(),
            sqes_submitted: 0,
            fresh_pages: FreshPages::default(),
        }
    }
}

impl IoStats {
    /// Records one completed operation, which was submitted `latency` ago.
    pub fn record(&mut self, bytes: usize, latency: Duration) {
        let now = Instant::now();
        self.busy.add(now.checked_sub(latency).unwrap_or(now), now);
        self.ops += 1;
        self.bytes += bytes as u64;
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
        self.latency_us.saturating_record(us);
    }

    /// Adds another engine's figures to these.
    pub fn merge(&mut self, other: &IoStats) {
        self.ops += other.ops;
        self.bytes += other.bytes;
        self.submits += other.submits;
        self.sqes_submitted += other.sqes_submitted;
        self.fresh_pages.huge_bytes += other.fresh_pages.huge_bytes;
        self.fresh_pages.small_bytes += other.fresh_pages.small_bytes;
        self.busy.merge(&other.busy);
        // Both histograms share bounds, so adding cannot fail; saturate if it ever did.
        let _ = self.latency_us.add(&other.latency_us);
    }

    /// Latency percentiles p50, p99 and p99.9 in microseconds (zeros when nothing ran).
    pub fn percentiles_us(&self) -> LatencySummary {
        if self.latency_us.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            p50_us: self.latency_us.value_at_quantile(0.50),
            p99_us: self.latency_us.value_at_quantile(0.99),
            p999_us: self.latency_us.value_at_quantile(0.999),
            max_us: self.latency_us.max(),
        }
    }
}

/// Latency percentiles of one kind of operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LatencySummary {
    /// Median, µs.
    pub p50_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// 99.9th percentile, µs.
    pub p999_us: u64,
    /// Slowest, µs.
    pub max_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_merges() {
        let mut a = IoStats::default();
        for ms in 1..=100 {
            a.record(4096, Duration::from_millis(ms));
        }
        let mut b = IoStats::default();
        b.record(10, Duration::from_secs(1));
        a.merge(&b);
        assert_eq!(a.ops, 101);
        assert_eq!(a.bytes, 100 * 4096 + 10);
        let p = a.percentiles_us();
        // 101 values: the median is the 51st, 51 ms (within the histogram's precision).
        assert!((50_000..=52_000).contains(&p.p50_us), "{p:?}");
        assert!(p.max_us >= 999_000);
    }

    #[test]
    fn busy_spans_union_and_overlap() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut copy = BusySpans::default();
        copy.add(ms(0), ms(10));
        copy.add(ms(20), ms(30));
        let mut other = BusySpans::default();
        other.add(ms(5), ms(25)); // overlaps both copy spans
        copy.merge(&other);
        assert_eq!(copy.busy(), Duration::from_millis(30));

        let mut a = BusySpans::default();
        a.add(ms(0), ms(100));
        let mut b = BusySpans::default();
        b.add(ms(50), ms(150));
        assert!((overlap_ratio(&a, &b) - 0.5).abs() < 1e-9);
        let mut c = BusySpans::default();
        c.add(ms(200), ms(210));
        assert_eq!(overlap_ratio(&a, &c), 0.0);
        assert_eq!(overlap_ratio(&a, &BusySpans::default()), 0.0);
        let mut inside = BusySpans::default();
        inside.add(ms(10), ms(20));
        assert!((overlap_ratio(&a, &inside) - 1.0).abs() < 1e-9);
    }
}
