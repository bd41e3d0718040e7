//! Summaries of samples: percentiles read from the sorted samples.

use std::time::Duration;

/// Sorted samples of one measurement.
#[derive(Clone, Debug)]
pub struct Samples {
    sorted: Vec<f64>,
}

impl Samples {
    /// Sorts `values` (NaNs are not expected and sort last).
    pub fn new(mut values: Vec<f64>) -> Self {
        values.sort_by(|a, b| a.total_cmp(b));
        Samples { sorted: values }
    }

    /// Durations as microseconds.
    pub fn from_micros(durations: &[Duration]) -> Self {
        Samples::new(durations.iter().map(|d| d.as_secs_f64() * 1e6).collect())
    }

    /// Durations as milliseconds.
    pub fn from_millis(durations: &[Duration]) -> Self {
        Samples::new(durations.iter().map(|d| d.as_secs_f64() * 1e3).collect())
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// The `p`-th percentile (0..=100) by the nearest-rank method: the
    /// smallest sample such that at least `p` % of the samples are at or
    /// below it. NaN when there are no samples.
    pub fn percentile(&self, p: f64) -> f64 {
        let n = self.sorted.len();
        if n == 0 {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        self.sorted[rank.clamp(1, n) - 1]
    }

    /// Median (nearest rank).
    pub fn p50(&self) -> f64 {
        self.percentile(50.0)
    }

    /// Smallest sample.
    pub fn min(&self) -> f64 {
        self.sorted.first().copied().unwrap_or(f64::NAN)
    }

    /// Largest sample.
    pub fn max(&self) -> f64 {
        self.sorted.last().copied().unwrap_or(f64::NAN)
    }

    /// Arithmetic mean.
    pub fn mean(&self) -> f64 {
        if self.sorted.is_empty() {
            return f64::NAN;
        }
        self.sorted.iter().sum::<f64>() / self.sorted.len() as f64
    }

    /// Sum of the samples.
    pub fn sum(&self) -> f64 {
        self.sorted.iter().sum()
    }
}

/// Formats a figure with a precision that suits its size.
pub fn fmt_num(v: f64) -> String {
    if v.is_nan() {
        "n/a".to_string()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Formats a figure rounded to a whole number.
pub fn fmt_int(v: f64) -> String {
    if v.is_nan() {
        "n/a".to_string()
    } else {
        format!("{v:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = Samples::new((1..=100).rev().map(f64::from).collect());
        assert_eq!(s.p50(), 50.0);
        assert_eq!(s.percentile(90.0), 90.0);
        assert_eq!(s.percentile(99.0), 99.0);
        assert_eq!(s.percentile(100.0), 100.0);
        assert_eq!(s.percentile(0.0), 1.0);
        assert_eq!(s.min(), 1.0);
        assert_eq!(s.max(), 100.0);
        assert_eq!(s.mean(), 50.5);
    }

    #[test]
    fn small_and_empty() {
        let s = Samples::new(vec![3.0, 1.0, 2.0]);
        assert_eq!(s.p50(), 2.0);
        assert_eq!(s.percentile(90.0), 3.0);
        assert!(Samples::new(vec![]).p50().is_nan());
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_num(1234.56), "1235");
        assert_eq!(fmt_num(123.456), "123.5");
        assert_eq!(fmt_num(1.234), "1.23");
        assert_eq!(fmt_num(f64::NAN), "n/a");
        assert_eq!(fmt_int(314.7), "315");
    }
}
