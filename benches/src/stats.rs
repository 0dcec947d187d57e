//! Latency and throughput accounting.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// The result of one workload run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub workload: String,
    pub ops: u64,
    pub errors: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// Latencies in microseconds, 1 µs to 60 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let _ = h.record((d.as_micros() as u64).clamp(1, 60_000_000));
}

pub fn summarize(workload: &str, h: &Histogram<u64>, errors: u64, elapsed: Duration) -> Summary {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let secs = elapsed.as_secs_f64().max(1e-9);
    Summary {
        workload: workload.to_string(),
        ops: h.len(),
        errors,
        seconds: secs,
        ops_per_sec: h.len() as f64 / secs,
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: h.max() as f64 / 1000.0,
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "workload {}: {} ops ({} errors) in {:.2}s = {:.0} ops/s", self.workload, self.ops, self.errors, self.seconds, self.ops_per_sec)?;
        write!(
            f,
            "latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut h = histogram();
        for ms in 1..=100u64 {
            record(&mut h, Duration::from_millis(ms));
        }
        let s = summarize("t", &h, 2, Duration::from_secs(2));
        assert_eq!(s.ops, 100);
        assert!((s.ops_per_sec - 50.0).abs() < 1e-9);
        assert!((s.p50_ms - 50.0).abs() < 0.1, "{}", s.p50_ms);
        assert!((s.p99_ms - 99.0).abs() < 0.1, "{}", s.p99_ms);
        assert!((s.max_ms - 100.0).abs() < 0.1);
        assert!(s.to_string().contains("50 ops/s"));
    }
}
