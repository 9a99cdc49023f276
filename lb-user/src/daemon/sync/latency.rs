//! How far behind a peer's view of this node's new connections is: from the moment the
//! sender's data plane confirmed a connection to the moment this node installed it, in
//! power-of-two buckets of microseconds (enough for a p50 and a p99 within a factor of 2,
//! in constant memory).
use std::sync::atomic::{AtomicU64, Ordering};

const BUCKETS: usize = 32;

#[derive(Default)]
pub struct Latency {
    /// `buckets[i]`: samples in `[2^i, 2^(i+1))` µs (bucket 0 also takes 0).
    buckets: [AtomicU64; BUCKETS],
}

impl Latency {
    pub fn record(&self, micros: u64) {
        let bucket = (u64::BITS - micros.max(1).leading_zeros() - 1) as usize;
        self.buckets[bucket.min(BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn samples(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The upper bound (µs) of the bucket holding the `q` quantile; None without samples.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(1u64 << (i + 1));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_bound_their_samples_within_a_factor_of_two() {
        let latency = Latency::default();
        assert_eq!(latency.quantile(0.5), None);
        for _ in 0..98 {
            latency.record(3_000);
        }
        latency.record(90_000);
        latency.record(0);
        assert_eq!(latency.samples(), 100);
        let p50 = latency.quantile(0.5).unwrap();
        assert!((3_000..6_000).contains(&p50), "{p50}");
        let p99 = latency.quantile(0.99).unwrap();
        assert!((3_000..6_000).contains(&p99), "{p99}");
        assert!(latency.quantile(1.0).unwrap() >= 90_000);
    }
}
