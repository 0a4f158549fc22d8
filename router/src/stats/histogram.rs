//! A histogram of fixed buckets made of atomics: observing is a few
//! comparisons and two relaxed adds, never a lock (prometheus-client's own
//! histogram takes a lock per observation, too much for the relay's hot
//! path). Rendered through prometheus-client at each scrape.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

/// Buckets by upper bound (in seconds), counted in microseconds.
#[derive(Debug)]
pub(crate) struct Histogram {
    bounds: &'static [f64],
    bounds_us: Vec<u64>,
    /// One per bound, plus the last for what is past every bound.
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            bounds_us: bounds.iter().map(|b| (b * 1e6).round() as u64).collect(),
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe_us(&self, us: u64) {
        let bucket = self
            .bounds_us
            .iter()
            .position(|bound| us <= *bound)
            .unwrap_or(self.bounds_us.len());
        if let Some(count) = self.counts.get(bucket) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Observes a plain number (a count), in the bounds' unit.
    pub fn observe_value(&self, value: u64) {
        self.observe_us(value.saturating_mul(1_000_000));
    }

    /// Sum (seconds), count, and the cumulative count at each bound.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(self.bounds.len() + 1);
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let bound = self.bounds.get(i).copied().unwrap_or(f64::INFINITY);
            buckets.push((bound, cumulative));
        }
        HistogramSnapshot {
            sum: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
            count: cumulative,
            buckets,
        }
    }
}

/// A histogram as read at one scrape.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HistogramSnapshot {
    pub sum: f64,
    pub count: u64,
    /// Upper bound and cumulative count, the last one at +Inf.
    pub buckets: Vec<(f64, u64)>,
}

impl EncodeMetric for HistogramSnapshot {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = Histogram::new(&[0.001, 0.01, 1.0]);
        for us in [0, 1_000, 1_001, 10_000, 2_000_000] {
            h.observe_us(us);
        }
        let s = h.snapshot();
        assert_eq!(
            s.buckets,
            vec![(0.001, 2), (0.01, 4), (1.0, 4), (f64::INFINITY, 5)]
        );
        assert_eq!(s.count, 5);
        assert!((s.sum - 2.012001).abs() < 1e-9);
    }
}
