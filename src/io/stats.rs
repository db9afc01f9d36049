//! Per-operation latency and volume of an engine's I/O.

use std::time::Duration;

use hdrhistogram::Histogram;

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
    /// Submission queue entries handed to the kernel by those calls.
    pub sqes_submitted: u64,
}

impl Default for IoStats {
    fn default() -> Self {
        IoStats {
            ops: 0,
            bytes: 0,
            latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("static histogram bounds are valid"),
            submits: 0,
            sqes_submitted: 0,
        }
    }
}

impl IoStats {
    /// Records one completed operation.
    pub fn record(&mut self, bytes: usize, latency: Duration) {
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
        assert!((50_000..=52_000).contains(&p.p50_us), "{p:?}");
        assert!(p.max_us >= 999_000);
    }
}
