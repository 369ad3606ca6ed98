//! Percentiles of one measurement and summaries across repetitions.

use serde::Serialize;

/// The value at quantile `q` (0..=1) of `sorted`, nearest rank; `None` when
/// empty. `sorted` must be in ascending order.
pub fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let q = q.clamp(0.0, 1.0);
    // Nearest rank: the smallest value with at least q of the samples at or below it.
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The same metric measured once per repetition.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Samples {
    /// One value per repetition, in the order measured.
    pub values: Vec<f64>,
}

impl Samples {
    /// Adds one repetition's value.
    pub fn push(&mut self, v: f64) {
        self.values.push(v);
    }

    /// The median (mean of the middle two for an even count).
    pub fn median(&self) -> Option<f64> {
        let v = self.sorted();
        let n = v.len();
        if n == 0 {
            return None;
        }
        Some(if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        })
    }

    /// The smallest value.
    pub fn min(&self) -> Option<f64> {
        self.sorted().first().copied()
    }

    /// The largest value.
    pub fn max(&self) -> Option<f64> {
        self.sorted().last().copied()
    }

    /// (max - min) / median in percent: how much repetitions disagree.
    pub fn spread_pct(&self) -> Option<f64> {
        let (min, max, med) = (self.min()?, self.max()?, self.median()?);
        if med == 0.0 {
            return None;
        }
        Some((max - min) / med * 100.0)
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(50));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&v, 1.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[7], 0.99), Some(7));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn median_and_spread() {
        let s = Samples {
            values: vec![10.0, 30.0, 20.0],
        };
        assert_eq!(s.median(), Some(20.0));
        assert_eq!(s.spread_pct(), Some(100.0));
        let s = Samples {
            values: vec![4.0, 1.0, 3.0, 2.0],
        };
        assert_eq!(s.median(), Some(2.5));
        assert_eq!(Samples::default().median(), None);
    }
}
