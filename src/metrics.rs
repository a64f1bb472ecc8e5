//! Prometheus metrics, rendered in the text exposition format on the admin listener's
//! `/metrics`. Counters are atomics found through `DashMap`s keyed by bounded label sets:
//! upstream and endpoint names and price-book entries come from config, statuses and refusal
//! reasons are fixed sets; client-chosen strings (model names, keys, dimensions) never become
//! labels, so cardinality stays bounded by the config.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::FastDashMap as DashMap;

use crate::ledger::UsageRecord;
use crate::pricing::from_nanos;

/// Upper bounds of the upstream latency histogram buckets, seconds.
const LATENCY_BUCKETS_S: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Counts per bucket, not cumulative: an observation is one increment (plus count and sum);
/// [`Histogram::cumulative`] sums them up for the exposition format.
#[derive(Default)]
struct Histogram {
    /// Observations in `(previous bound, bound]`; the +Inf bucket is `count` minus the rest.
    buckets: [AtomicU64; LATENCY_BUCKETS_S.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, us: u64) {
        let s = us as f64 / 1e6;
        if let Some(i) = LATENCY_BUCKETS_S.iter().position(|bound| s <= *bound) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Observations at or below each bound, as Prometheus' `le` buckets count them.
    fn cumulative(&self) -> [u64; LATENCY_BUCKETS_S.len()] {
        let mut total = 0;
        std::array::from_fn(|i| {
            total += self.buckets[i].load(Ordering::Relaxed);
            total
        })
    }
}

/// Why tollgate refused a request (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    Auth,
    Cap,
    Balance,
    RateLimit,
    BadRequest,
}

impl RefusalReason {
    fn as_str(self) -> &'static str {
        match self {
            RefusalReason::Auth => "auth",
            RefusalReason::Cap => "cap",
            RefusalReason::Balance => "balance",
            RefusalReason::RateLimit => "rate_limit",
            RefusalReason::BadRequest => "bad_request",
        }
    }
}

type RequestLabels = (Arc<str>, Arc<str>, &'static str, u16);

/// Token kinds (the `kind` label), in [`TokenCounts`] order.
const TOKEN_KINDS: [&str; 4] = ["input", "output", "cached_input", "reasoning"];

/// Tokens of one price-book entry, by kind (one lookup per request for all kinds).
#[derive(Default)]
struct TokenCounts([AtomicU64; TOKEN_KINDS.len()]);

/// Latencies of one upstream (one lookup per request for both histograms).
#[derive(Default)]
struct UpstreamLatency {
    ttfb: Histogram,
    total: Histogram,
}

/// The gateway's counters.
#[derive(Default)]
pub struct Metrics {
    requests: DashMap<RequestLabels, AtomicU64>,
    tokens: DashMap<Arc<str>, TokenCounts>,
    spend_nanos: DashMap<(Arc<str>, Arc<str>), AtomicI64>,
    refusals: DashMap<RefusalReason, AtomicU64>,
    latency: DashMap<Arc<str>, UpstreamLatency>,
    estimated: AtomicU64,
}

fn add<K: std::hash::Hash + Eq + Clone>(map: &DashMap<K, AtomicU64>, key: &K, n: u64) {
    if n == 0 && map.contains_key(key) {
        return;
    }
    if let Some(c) = map.get(key) {
        c.fetch_add(n, Ordering::Relaxed);
        return;
    }
    map.entry(key.clone())
        .or_default()
        .fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    /// Counts one journaled request. `price_label` names the price-book entry that priced it
    /// (or `unpriced`); `charge_nanos` is what it cost, in nano-units of `record.unit` (the
    /// settlement's figure, which `record.cost` renders).
    pub fn observe(&self, record: &UsageRecord, price_label: &Arc<str>, charge_nanos: i64) {
        add(
            &self.requests,
            &(
                record.upstream.clone(),
                price_label.clone(),
                record.endpoint.as_str(),
                record.status,
            ),
            1,
        );
        let u = &record.usage;
        let counts = [
            u.input_tokens,
            u.output_tokens,
            u.cached_input_tokens,
            u.reasoning_tokens,
        ];
        if counts.iter().any(|&n| n > 0) {
            let add_all = |c: &TokenCounts| {
                for (cell, n) in c.0.iter().zip(counts) {
                    if n > 0 {
                        cell.fetch_add(n, Ordering::Relaxed);
                    }
                }
            };
            match self.tokens.get(price_label) {
                Some(c) => add_all(&c),
                None => add_all(&self.tokens.entry(price_label.clone()).or_default()),
            }
        }
        if let Some(unit) = &record.unit
            && charge_nanos != 0
        {
            let key = (price_label.clone(), unit.clone());
            match self.spend_nanos.get(&key) {
                Some(c) => {
                    c.fetch_add(charge_nanos, Ordering::Relaxed);
                }
                None => {
                    self.spend_nanos
                        .entry(key)
                        .or_default()
                        .fetch_add(charge_nanos, Ordering::Relaxed);
                }
            }
        }
        if let Some(ttfb) = record.upstream_ttfb_us {
            let observe = |l: &UpstreamLatency| {
                l.ttfb.observe(ttfb);
                l.total.observe(record.upstream_total_us);
            };
            match self.latency.get(&record.upstream) {
                Some(l) => observe(&l),
                None => observe(&self.latency.entry(record.upstream.clone()).or_default()),
            }
        }
        if record.estimated {
            self.estimated.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn refused(&self, reason: RefusalReason) {
        add(&self.refusals, &reason, 1);
    }

    /// The text exposition format. `extra` appends lines rendered elsewhere (alerts, ledger).
    pub fn render(&self, extra: &[(&str, &str, u64)]) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP tollgate_requests_total Metered requests by upstream, price-book model entry, endpoint and status.\n# TYPE tollgate_requests_total counter\n");
        for e in self.requests.iter() {
            let (upstream, model, endpoint, status) = e.key();
            let _ = writeln!(
                out,
                "tollgate_requests_total{{upstream=\"{}\",model=\"{}\",endpoint=\"{endpoint}\",status=\"{status}\"}} {}",
                escape(upstream),
                escape(model),
                e.value().load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP tollgate_tokens_total Tokens by price-book entry and kind.\n# TYPE tollgate_tokens_total counter\n");
        for e in self.tokens.iter() {
            let model = escape(e.key());
            for (kind, cell) in TOKEN_KINDS.iter().zip(&e.value().0) {
                // A kind appears once it has been counted (as when each had its own series).
                let n = cell.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "tollgate_tokens_total{{model=\"{model}\",kind=\"{kind}\"}} {n}"
                    );
                }
            }
        }
        out.push_str("# HELP tollgate_spend_total Charges by price-book entry, in each account unit.\n# TYPE tollgate_spend_total counter\n");
        for e in self.spend_nanos.iter() {
            let (model, unit) = e.key();
            let _ = writeln!(
                out,
                "tollgate_spend_total{{model=\"{}\",unit=\"{}\"}} {}",
                escape(model),
                escape(unit),
                from_nanos(e.value().load(Ordering::Relaxed))
            );
        }
        out.push_str("# HELP tollgate_refusals_total Requests tollgate refused, by reason.\n# TYPE tollgate_refusals_total counter\n");
        for e in self.refusals.iter() {
            let _ = writeln!(
                out,
                "tollgate_refusals_total{{reason=\"{}\"}} {}",
                e.key().as_str(),
                e.value().load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP tollgate_estimated_records_total Records whose tokens were counted by the tokenizer fallback.\n# TYPE tollgate_estimated_records_total counter\ntollgate_estimated_records_total {}",
            self.estimated.load(Ordering::Relaxed)
        );
        type Pick = fn(&UpstreamLatency) -> &Histogram;
        for (name, help, pick) in [
            (
                "tollgate_upstream_ttfb_seconds",
                "Request sent to response headers, by upstream.",
                (|l| &l.ttfb) as Pick,
            ),
            (
                "tollgate_upstream_duration_seconds",
                "Request sent to end of response, by upstream.",
                (|l| &l.total) as Pick,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for e in self.latency.iter() {
                let upstream = escape(e.key());
                let h = pick(e.value());
                // Count first: observations landing meanwhile never make a bucket exceed it.
                let count = h.count.load(Ordering::Relaxed);
                for (bound, n) in LATENCY_BUCKETS_S.iter().zip(h.cumulative()) {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{upstream=\"{upstream}\",le=\"{bound}\"}} {}",
                        n.min(count)
                    );
                }
                let _ = writeln!(
                    out,
                    "{name}_bucket{{upstream=\"{upstream}\",le=\"+Inf\"}} {count}\n{name}_sum{{upstream=\"{upstream}\"}} {}\n{name}_count{{upstream=\"{upstream}\"}} {count}",
                    h.sum_us.load(Ordering::Relaxed) as f64 / 1e6
                );
            }
        }
        for (name, help, value) in extra {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `le` buckets are cumulative and end at the count, whatever bucket each
    /// observation landed in.
    #[test]
    fn histogram_buckets_render_cumulative() {
        let h = Histogram::default();
        // 3 ms, 7 ms, 7 ms, 400 ms, 20 min (beyond the last bound: only +Inf counts it).
        for us in [3_000, 7_000, 7_000, 400_000, 1_200_000_000] {
            h.observe(us);
        }
        let metrics = Metrics::default();
        metrics.latency.insert(
            Arc::from("up"),
            UpstreamLatency {
                ttfb: h,
                total: Histogram::default(),
            },
        );
        let text = metrics.render(&[]);
        let bucket = |le: &str| -> u64 {
            let prefix =
                format!("tollgate_upstream_ttfb_seconds_bucket{{upstream=\"up\",le=\"{le}\"}} ");
            let line = text
                .lines()
                .find(|l| l.starts_with(&prefix))
                .unwrap_or_default();
            line[prefix.len().min(line.len())..]
                .parse()
                .unwrap_or(u64::MAX)
        };
        assert_eq!(bucket("0.005"), 1);
        assert_eq!(bucket("0.01"), 3);
        assert_eq!(bucket("0.25"), 3);
        assert_eq!(bucket("0.5"), 4);
        assert_eq!(bucket("300"), 4);
        assert_eq!(bucket("+Inf"), 5);
        assert!(text.contains("tollgate_upstream_ttfb_seconds_count{upstream=\"up\"} 5"));
    }
}
