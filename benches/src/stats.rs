//! Latency and throughput accounting.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The result of one workload run.
///
/// `ops` counts what the workload delivers: requests for the KV and lease workloads, delivered
/// events for `watch` (whose latency is put-to-event). `parts` breaks a mixed workload down by
/// operation (the `kube` mix) or shows a secondary measurement (the writer's puts of `watch`);
/// `extra` holds workload-specific counters (lost and duplicate events, conflicts, ...).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Summary {
    pub workload: String,
    #[serde(default)]
    pub clients: usize,
    pub ops: u64,
    pub errors: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<Summary>,
    /// The first error seen, if any (to tell a broken run from a slow one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

/// Latencies in microseconds, 1 µs to 60 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    record_us(h, d.as_micros() as u64);
}

pub fn record_us(h: &mut Histogram<u64>, us: u64) {
    let _ = h.record(us.clamp(1, 60_000_000));
}

pub fn summarize(workload: &str, h: &Histogram<u64>, errors: u64, elapsed: Duration) -> Summary {
    let ms = |q: f64| {
        if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(q) as f64 / 1000.0
        }
    };
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
        max_ms: if h.is_empty() {
            0.0
        } else {
            h.max() as f64 / 1000.0
        },
        ..Default::default()
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "workload {} ({} clients): {} ops ({} errors) in {:.2}s = {:.0} ops/s",
            self.workload, self.clients, self.ops, self.errors, self.seconds, self.ops_per_sec
        )?;
        write!(
            f,
            "  latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms
        )?;
        if !self.extra.is_empty() {
            write!(f, "\n ")?;
            for (k, v) in &self.extra {
                if v.fract() == 0.0 && v.abs() < 1e15 {
                    write!(f, " {k} {v:.0}")?;
                } else {
                    write!(f, " {k} {v:.3}")?;
                }
            }
        }
        if let Some(e) = &self.first_error {
            write!(f, "\n  first error: {e}")?;
        }
        for p in &self.parts {
            let sub = p.to_string().replace('\n', "\n  ");
            write!(f, "\n  {sub}")?;
        }
        Ok(())
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

    #[test]
    fn empty_histogram_and_json_round_trip() {
        let mut s = summarize("w", &histogram(), 0, Duration::from_secs(1));
        assert_eq!(s.p99_ms, 0.0);
        s.extra.insert("lost".into(), 0.0);
        s.parts
            .push(summarize("p", &histogram(), 1, Duration::from_secs(1)));
        let j = serde_json::to_string(&s).unwrap();
        let back: Summary = serde_json::from_str(&j).unwrap();
        assert_eq!(back, s);
        assert!(s.to_string().contains("lost 0"));
    }
}
