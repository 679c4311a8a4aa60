//! The last hour of what the console's dashboard charts, kept in memory by the node (no
//! Prometheus needed): every 10 s the node reads its own metrics — the text `/metrics` serves —
//! and keeps the counters it needs; `GET /v1/metrics/history` answers the rates between
//! consecutive samples (the last interval ends now).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};

/// How often a sample is kept.
pub(crate) const INTERVAL: Duration = Duration::from_secs(10);
/// How many are kept: one hour.
const KEPT: usize = 360;

/// The status classes charted.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Cumulative values read from one rendering of the metrics.
#[derive(Debug, Clone, Default, PartialEq)]
struct Sample {
    at_ms: i64,
    handshakes_ok: f64,
    handshakes_failed: f64,
    /// Failed or refused handshakes by reason.
    failures: BTreeMap<String, f64>,
    /// Requests by status class (`CLASSES`).
    requests: [f64; 5],
    /// The request duration histogram summed over domains and mappings: (upper bound in
    /// seconds, cumulative count), by bound.
    buckets: Vec<(f64, f64)>,
    connections: f64,
    mqtt_sessions: f64,
}

/// The samples of the last hour.
#[derive(Debug, Default)]
pub(crate) struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    /// Keeps a sample of `metrics` (Prometheus text) taken at `at_ms`.
    pub(crate) fn record(&self, metrics: &str, at_ms: i64) {
        let sample = parse(metrics, at_ms);
        if let Ok(mut samples) = self.samples.lock() {
            samples.push_back(sample);
            while samples.len() > KEPT {
                samples.pop_front();
            }
        }
    }

    /// The charted rates, the last interval ending with `now` (the metrics at `now_ms`).
    pub(crate) fn json(&self, now: &str, now_ms: i64) -> Value {
        let mut samples: Vec<Sample> = self
            .samples
            .lock()
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        samples.push(parse(now, now_ms));
        let points: Vec<Value> = samples
            .windows(2)
            .filter_map(|w| point(&w[0], &w[1]))
            .collect();
        let mut failures = BTreeMap::new();
        if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
            for (reason, count) in &last.failures {
                let delta = count - first.failures.get(reason).copied().unwrap_or(0.0);
                if delta > 0.0 {
                    failures.insert(reason.clone(), delta);
                }
            }
        }
        json!({
            "interval_secs": INTERVAL.as_secs(),
            "window_secs": INTERVAL.as_secs() * KEPT as u64,
            "points": points,
            "failures_by_reason": failures,
        })
    }
}

/// The rates between two samples (none when the counters went backwards: a restart).
fn point(a: &Sample, b: &Sample) -> Option<Value> {
    let secs = (b.at_ms - a.at_ms) as f64 / 1000.0;
    if secs <= 0.0 {
        return None;
    }
    let rate = |x: f64, y: f64| ((y - x).max(0.0) / secs * 100.0).round() / 100.0;
    let requests: BTreeMap<&str, f64> = CLASSES
        .iter()
        .enumerate()
        .map(|(i, c)| (*c, rate(a.requests[i], b.requests[i])))
        .collect();
    // The interval's histogram: the later cumulative counts less the earlier.
    let delta: Vec<(f64, f64)> = b
        .buckets
        .iter()
        .map(|(le, n)| {
            let before = a
                .buckets
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, m)| *m);
            (*le, (n - before).max(0.0))
        })
        .collect();
    let ms = |q: f64| quantile(&delta, q).map(|s| (s * 1000.0 * 100.0).round() / 100.0);
    Some(json!({
        "at": b.at_ms / 1000,
        "handshakes_ok": rate(a.handshakes_ok, b.handshakes_ok),
        "handshakes_failed": rate(a.handshakes_failed, b.handshakes_failed),
        "requests": requests,
        "latency_p50_ms": ms(0.5),
        "latency_p99_ms": ms(0.99),
        "connections": b.connections,
        "mqtt_sessions": b.mqtt_sessions,
    }))
}

/// The `q` quantile of a cumulative histogram, interpolated within its bucket as Prometheus'
/// `histogram_quantile` does; none without observations.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.iter().find(|(le, _)| le.is_infinite())?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let within = count - lower.1;
            let fraction = if within > 0.0 {
                (rank - lower.1) / within
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * fraction);
        }
        lower = (le, count);
    }
    None
}

/// The values the dashboard charts, from Prometheus text.
fn parse(text: &str, at_ms: i64) -> Sample {
    let mut s = Sample {
        at_ms,
        ..Sample::default()
    };
    let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some((series, value)) => (series, value.parse::<f64>().unwrap_or(0.0)),
            None => continue,
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        match name {
            "portcullis_handshakes_total" => {
                if label(labels, "result") == Some("ok") {
                    s.handshakes_ok += value;
                } else {
                    s.handshakes_failed += value;
                    let reason = label(labels, "reason").unwrap_or_default();
                    let reason = if reason.is_empty() {
                        label(labels, "result").unwrap_or("failed")
                    } else {
                        reason
                    };
                    *s.failures.entry(reason.to_string()).or_default() += value;
                }
            }
            "portcullis_requests_total" => {
                let class = label(labels, "status")
                    .and_then(|st| st.chars().next())
                    .and_then(|c| c.to_digit(10))
                    .and_then(|d| usize::try_from(d).ok())
                    .filter(|d| (1..=5).contains(d));
                if let Some(d) = class {
                    s.requests[d - 1] += value;
                }
            }
            "portcullis_request_duration_seconds_bucket" => {
                let le = match label(labels, "le") {
                    Some("+Inf") => f64::INFINITY,
                    Some(v) => v.parse().unwrap_or(f64::INFINITY),
                    None => continue,
                };
                let entry = buckets.entry(le.to_bits()).or_insert((le, 0.0));
                entry.1 += value;
            }
            "portcullis_active_connections" => s.connections += value,
            "portcullis_mqtt_sessions_online" => s.mqtt_sessions += value,
            _ => {}
        }
    }
    let mut buckets: Vec<(f64, f64)> = buckets.into_values().collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    s.buckets = buckets;
    s
}

/// A label's value in `a="x",b="y"` (values hold no quotes here: names, reasons, numbers).
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    labels.split("\",").find_map(|pair| {
        let (k, v) = pair.split_once("=\"")?;
        (k.trim_start_matches(',') == name).then(|| v.trim_end_matches('"'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT_0: &str = r#"# TYPE portcullis_handshakes_total counter
portcullis_handshakes_total{domain="a.test",result="ok",reason=""} 10
portcullis_handshakes_total{domain="a.test",result="failed",reason="unknown-ca"} 2
portcullis_requests_total{domain="a.test",mapping="/",status="200"} 100
portcullis_requests_total{domain="a.test",mapping="/",status="503"} 1
portcullis_request_duration_seconds_bucket{domain="a.test",mapping="/",le="0.001"} 50
portcullis_request_duration_seconds_bucket{domain="a.test",mapping="/",le="0.01"} 100
portcullis_request_duration_seconds_bucket{domain="a.test",mapping="/",le="+Inf"} 101
portcullis_active_connections 3
portcullis_mqtt_sessions_online 1
"#;

    const AT_10: &str = r#"portcullis_handshakes_total{domain="a.test",result="ok",reason=""} 30
portcullis_handshakes_total{domain="a.test",result="failed",reason="unknown-ca"} 7
portcullis_handshakes_total{domain="",result="refused",reason="unknown-sni"} 5
portcullis_requests_total{domain="a.test",mapping="/",status="200"} 200
portcullis_requests_total{domain="b.test",mapping="/",status="404"} 10
portcullis_requests_total{domain="a.test",mapping="/",status="503"} 1
portcullis_request_duration_seconds_bucket{domain="a.test",mapping="/",le="0.001"} 100
portcullis_request_duration_seconds_bucket{domain="a.test",mapping="/",le="0.01"} 200
portcullis_request_duration_seconds_bucket{domain="a.test",mapping="/",le="+Inf"} 201
portcullis_request_duration_seconds_bucket{domain="b.test",mapping="/",le="0.001"} 10
portcullis_request_duration_seconds_bucket{domain="b.test",mapping="/",le="0.01"} 10
portcullis_request_duration_seconds_bucket{domain="b.test",mapping="/",le="+Inf"} 10
portcullis_active_connections 4
portcullis_mqtt_sessions_online 2
"#;

    #[test]
    fn rates_quantiles_and_failures_come_from_the_differences_between_samples() {
        let history = History::default();
        history.record(AT_0, 0);
        let out = history.json(AT_10, 10_000);
        let p = &out["points"][0];
        assert_eq!(p["handshakes_ok"], 2.0);
        assert_eq!(p["handshakes_failed"], 1.0);
        assert_eq!(p["requests"]["2xx"], 10.0);
        assert_eq!(p["requests"]["4xx"], 1.0);
        assert_eq!(p["requests"]["5xx"], 0.0);
        // 110 requests in the interval: 60 within 1 ms, 50 more within 10 ms.
        let p50 = p["latency_p50_ms"].as_f64().unwrap();
        assert!(p50 > 0.9 && p50 <= 1.0, "{p50}");
        let p99 = p["latency_p99_ms"].as_f64().unwrap();
        assert!(p99 > 9.0 && p99 <= 10.0, "{p99}");
        assert_eq!(p["connections"], 4.0);
        assert_eq!(p["mqtt_sessions"], 2.0);
        assert_eq!(out["failures_by_reason"]["unknown-ca"], 5.0);
        assert_eq!(out["failures_by_reason"]["unknown-sni"], 5.0);
    }

    #[test]
    fn a_restart_or_an_empty_interval_gives_no_negative_rates_and_no_latency() {
        let history = History::default();
        history.record(AT_10, 0);
        let out = history.json(AT_0, 10_000);
        let p = &out["points"][0];
        assert_eq!(p["handshakes_ok"], 0.0);
        assert!(p["latency_p50_ms"].is_null());
        for i in 0..400 {
            history.record(AT_0, i * 10_000);
        }
        assert_eq!(history.samples.lock().unwrap().len(), KEPT);
    }
}
