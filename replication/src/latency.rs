//! [`LatencyHistogram`]: a fixed-bucket latency histogram updated with relaxed atomics only
//! (no lock, no allocation per observation), read by the Prometheus endpoint. The replicated
//! write path records its peer-ack latency in one; the SCSI layer its per-LUN command
//! latencies.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets in nanoseconds (100 µs .. 10 s, roughly 1-2.5-5 steps): wide
/// enough for a RAM disk on loopback and for a disk behind a stalled peer alike.
pub const BUCKET_BOUNDS_NS: [u64; 16] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Observations per bucket (the last one is `+Inf`) and their sum. Readers may see one
/// observation's bucket before its sum: a scrape is a snapshot within its own duration.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; BUCKET_BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
}

/// A point-in-time copy of a [`LatencyHistogram`], cumulative as Prometheus wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// `(upper bound in ns, observations <= it)`, one per [`BUCKET_BOUNDS_NS`] entry.
    pub cumulative: Vec<(u64, u64)>,
    /// All observations (the `+Inf` bucket).
    pub count: u64,
    /// Sum of all observations in nanoseconds.
    pub sum_ns: u64,
}

impl LatencyHistogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BUCKET_BOUNDS_NS
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(BUCKET_BOUNDS_NS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Sum of all observations in nanoseconds (without copying the buckets).
    pub fn sum_ns(&self) -> u64 {
        self.sum_ns.load(Ordering::Relaxed)
    }

    /// The cumulative buckets now. `count` is the sum of the buckets read, so it always
    /// equals the last cumulative value plus the `+Inf` bucket.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut running = 0u64;
        let mut cumulative = Vec::with_capacity(BUCKET_BOUNDS_NS.len());
        for (bound, b) in BUCKET_BOUNDS_NS.iter().zip(&self.buckets) {
            running = running.saturating_add(b.load(Ordering::Relaxed));
            cumulative.push((*bound, running));
        }
        let count =
            running.saturating_add(self.buckets[BUCKET_BOUNDS_NS.len()].load(Ordering::Relaxed));
        HistogramSnapshot {
            cumulative,
            count,
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(100)); // on the first bound: first bucket
        h.observe(Duration::from_micros(101));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60)); // above every bound: +Inf only
        let s = h.snapshot();
        assert_eq!(s.cumulative[0], (100_000, 1));
        assert_eq!(s.cumulative[1], (250_000, 2));
        assert_eq!(s.cumulative[4], (2_500_000, 2));
        assert_eq!(s.cumulative[5], (5_000_000, 3));
        assert_eq!(s.cumulative.last(), Some(&(10_000_000_000, 3)));
        assert_eq!(s.count, 4);
        assert_eq!(s.sum_ns, 100_000 + 101_000 + 3_000_000 + 60_000_000_000);
    }

    #[test]
    fn an_unrepresentable_duration_saturates_instead_of_wrapping() {
        let h = LatencyHistogram::default();
        h.observe(Duration::MAX);
        let s = h.snapshot();
        assert_eq!(s.count, 1);
        assert_eq!(s.sum_ns, u64::MAX);
        assert_eq!(s.cumulative.last().map(|c| c.1), Some(0));
    }
}
