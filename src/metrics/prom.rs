//! The Prometheus exposition, through the `prometheus` crate: a custom [`Collector`] turns the
//! workers' last published snapshots (merged; each worker records into its own, lock-free, and
//! publishes a copy off the request path) and the ledger's counters into the crate's metric
//! families at each scrape, and the crate's registry and text encoder write them (version
//! 0.0.4). Nothing is recorded through the crate: it would need its own atomics on the request
//! path. Label values are escaped by the crate.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};

use super::{Latency, Registry, Snapshot, Spend};
use crate::auth::KeyId;
use crate::budget::ledger::LedgerStats;

/// Bucket edges of the latency histograms, in seconds: microseconds up to seconds.
const BUCKETS_SECONDS: [f64; 22] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
    5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every family Aura exports: name, help, type and label names.
const FAMILIES: &[(&str, &str, MetricType, &[&str])] = &[
    ("aura_requests_total", "Requests answered, by route and status class.", MetricType::COUNTER, &["route", "status_class"]),
    ("aura_errors_total", "Requests that ended in an error, by kind.", MetricType::COUNTER, &["kind"]),
    ("aura_ttft_overhead_seconds", "Time from reading the upstream's first body byte to writing it to the client.", MetricType::HISTOGRAM, &[]),
    ("aura_request_to_upstream_seconds", "Time from receiving a request to writing it upstream.", MetricType::HISTOGRAM, &[]),
    ("aura_tokens_total", "Tokens in the usage upstreams reported.", MetricType::COUNTER, &["kind"]),
    ("aura_usage_missing_total", "Successful answers on billed routes that carried no usage (billed by an estimate from bytes).", MetricType::COUNTER, &[]),
    ("aura_usage_implausible_total", "Answers whose usage was beyond what the model can do (more tokens than its context or output limit, or max_usage_tokens): billed their reservation, their tokens not counted.", MetricType::COUNTER, &[]),
    ("aura_cost_dollars_total", "What requests were billed, in dollars.", MetricType::COUNTER, &[]),
    ("aura_default_price_requests_total", "Billed requests whose model had no price (billed at the default price).", MetricType::COUNTER, &[]),
    ("aura_worker_driver", "The IO driver each worker runs on (1).", MetricType::GAUGE, &["worker", "driver"]),
    ("aura_active_requests", "Requests being handled (streams included), as of each worker's last copy.", MetricType::GAUGE, &[]),
    ("aura_key_requests_total", "Billed requests, by key (alias or key id) and model.", MetricType::COUNTER, &["key", "model"]),
    ("aura_key_tokens_total", "Tokens in reported usage, by key, model and kind.", MetricType::COUNTER, &["key", "model", "kind"]),
    ("aura_key_cost_dollars_total", "What requests were billed, in dollars, by key and model.", MetricType::COUNTER, &["key", "model"]),
    ("aura_budget_remaining_dollars", "What each active key may still spend, as the budget store last answered.", MetricType::GAUGE, &["key"]),
    ("aura_upstream_up", "Whether each upstream is in the workers' choices (not ejected for failing, a pool key not resting): the share of workers that hold it available, 1 = all.", MetricType::GAUGE, &["upstream"]),
    ("aura_upstream_requests_total", "Requests each upstream answered (its answer went to the client), by status class.", MetricType::COUNTER, &["upstream", "status_class"]),
    ("aura_upstream_attempts_total", "Attempts at each upstream, by how they ended: answered (its answer went to the client), retryable_status (a 429 or 5xx the request went on from), key_refused (a pool key refused: 401, 403, 429), connect_failed, timeout, reset, protocol_error, other.", MetricType::COUNTER, &["upstream", "outcome"]),
    ("aura_upstream_ttft_seconds", "Time from receiving a request to writing the first body byte of its answer to the client, by the upstream that answered.", MetricType::HISTOGRAM, &["upstream"]),
        ("aura_config_reloads_total", "Configuration reloads (SIGHUP, POST /admin/reload), applied or refused (a configuration with an error is refused whole; the running one stays).", MetricType::COUNTER, &["result"]),
    ("aura_store_up",  "1 while the last budget store call succeeded.", MetricType::GAUGE, &[]),
    ("aura_ledger_queue_ops", "Budget ops waiting for the store.", MetricType::GAUGE, &[]),
    ("aura_ledger_replay_ops", "Ops of an earlier run's journal (a kill, an outage at shutdown) not yet applied.", MetricType::GAUGE, &[]),
    ("aura_journal_errors_total", "Journal writes that failed (a full disk): that settled spend was in memory only.", MetricType::COUNTER, &[]),
    ("aura_store_data_lost_total", "Times the budget store was found to have lost its data (restarted without persistence, flushed); what this node knew was re-established.", MetricType::COUNTER, &[]),
    ("aura_store_lost_accounts_total", "Accounts the store answered for as if it had never seen them, though it had.", MetricType::COUNTER, &[]),
    ("aura_store_errors_total", "Budget store calls that failed.", MetricType::COUNTER, &[]),
    ("aura_ledger_applied_ops_total", "Budget ops the store applied.", MetricType::COUNTER, &[]),
    ("aura_ledger_rejected_ops_total", "Budget ops the store refused repeatedly, set aside in the rejected file.", MetricType::COUNTER, &[]),
        ("aura_ledger_flush_seconds", "Round trips of ledger flushes to the budget store.", MetricType::SUMMARY, &[]),
    ("aura_spend_record_dropped_total", "Spend record lines dropped because its writer was behind (a stalled disk or stdout).", MetricType::COUNTER, &[]),
];

/// The whole exposition: every worker's last published snapshot, merged, and the ledger's
/// counters when budgets live in Valkey. Scrapes are rare: the crate's registry is built for
/// each (a collector over `source`, nothing recorded in it).
pub fn render(source: &Arc<Registry>) -> String {
    let registry = prometheus::Registry::new();
    let mut text = String::with_capacity(16 * 1024);
    let encoded = Snapshots::new(source.clone())
        .and_then(|collector| registry.register(Box::new(collector)))
        .and_then(|()| prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut text));
    if let Err(e) = encoded {
        // Only a bad family name or help could do this: a bug, not a scrape's fault.
        tracing::error!(error = %e, "metrics exposition failed");
    }
    text
}

/// The collector: Aura's families, read from the workers' snapshots at each scrape.
struct Snapshots {
    source: Arc<Registry>,
    descs: Vec<Desc>,
}

impl Snapshots {
    fn new(source: Arc<Registry>) -> prometheus::Result<Snapshots> {
        let descs = FAMILIES
            .iter()
            .map(|(name, help, _, labels)| {
                Desc::new(
                    (*name).to_string(),
                    (*help).to_string(),
                    labels.iter().map(|l| (*l).to_string()).collect(),
                    HashMap::new(),
                )
            })
            .collect::<prometheus::Result<_>>()?;
        Ok(Snapshots { source, descs })
    }
}

impl Collector for Snapshots {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let (merged, drivers) = self.source.gather();
        let mut out = Families::default();
        out.snapshot(&merged, &drivers, &self.source.aliases());
        out.upstreams(&merged);
        out.reloads(self.source.reloads());
        if let Some(ledger) = self.source.ledger() {
            out.ledger(ledger);
        }
        if let Some(dropped) = self.source.spend_dropped() {
            out.add(
                "aura_spend_record_dropped_total",
                &[],
                Value::count(dropped),
            );
        }
        out.0.into_values().collect()
    }
}

/// Families being filled, by name.
#[derive(Default)]
struct Families(HashMap<&'static str, MetricFamily>);

impl Families {
    /// Adds one sample of `name` (a family of [`FAMILIES`]) with these label values, in the
    /// order the family names its labels.
    fn add(&mut self, name: &'static str, labels: &[&str], value: Value) {
        let Some((_, help, kind, label_names)) = FAMILIES.iter().find(|f| f.0 == name) else {
            debug_assert!(false, "{name} is not in FAMILIES");
            return;
        };
        let family = self.0.entry(name).or_insert_with(|| {
            let mut f = MetricFamily::default();
            f.set_name(name.to_string());
            f.set_help((*help).to_string());
            f.set_field_type(*kind);
            f
        });
        let mut m = proto::Metric::default();
        m.set_label(
            label_names
                .iter()
                .zip(labels)
                .map(|(n, v)| {
                    let mut pair = proto::LabelPair::default();
                    pair.set_name((*n).to_string());
                    pair.set_value((*v).to_string());
                    pair
                })
                .collect(),
        );
        match value {
            Value::Count(v) => {
                let mut c = proto::Counter::default();
                c.set_value(v);
                m.set_counter(c);
            }
            Value::Level(v) => {
                let mut g = proto::Gauge::default();
                g.set_value(v);
                m.set_gauge(g);
            }
            Value::Latency(l) => m.set_histogram(histogram(l)),
            Value::Mean { sum, count } => {
                let mut s = proto::Summary::default();
                s.set_sample_sum(sum);
                s.set_sample_count(count);
                m.set_summary(s);
            }
        }
        family.mut_metric().push(m);
    }

    fn snapshot(
        &mut self,
        s: &Snapshot,
        drivers: &[(usize, &'static str)],
        aliases: &HashMap<KeyId, String>,
    ) {
        for ((route, class), n) in &s.requests {
            self.add("aura_requests_total", &[route, class], Value::count(*n));
        }
        for (kind, n) in &s.errors {
            self.add("aura_errors_total", &[kind], Value::count(*n));
        }
        self.add(
            "aura_ttft_overhead_seconds",
            &[],
            Value::Latency(&s.ttft_overhead),
        );
        self.add(
            "aura_request_to_upstream_seconds",
            &[],
            Value::Latency(&s.to_upstream),
        );
        for (kind, n) in [
            ("prompt", s.prompt_tokens),
            ("completion", s.completion_tokens),
            ("cached_prompt", s.cached_prompt_tokens),
        ] {
            self.add("aura_tokens_total", &[kind], Value::count(n));
        }
        self.add(
            "aura_usage_missing_total",
            &[],
            Value::count(s.usage_missing),
        );
        self.add(
            "aura_usage_implausible_total",
            &[],
            Value::count(s.usage_implausible),
        );
        self.add("aura_cost_dollars_total", &[], Value::dollars(s.cost_nano));
        self.add(
            "aura_default_price_requests_total",
            &[],
            Value::count(s.default_priced),
        );
        for (worker, driver) in drivers {
            self.add(
                "aura_worker_driver",
                &[&worker.to_string(), driver],
                Value::Level(1.0),
            );
        }
        self.add(
            "aura_active_requests",
            &[],
            Value::Level(s.in_flight as f64),
        );
        self.keys(s, aliases);
    }

    /// Per upstream, by its `[[upstreams]]` name: whether it is up, what it answered, how its
    /// attempts ended, and the TTFT of its answers.
    fn upstreams(&mut self, s: &Snapshot) {
        for (name, stats) in &s.upstreams {
            if stats.workers > 0 {
                let share = stats.up as f64 / stats.workers as f64;
                self.add("aura_upstream_up", &[name], Value::Level(share));
            }
            for (class, n) in &stats.requests {
                self.add(
                    "aura_upstream_requests_total",
                    &[name, class],
                    Value::count(*n),
                );
            }
            for outcome in crate::upstream::retry::AttemptOutcome::ALL {
                let n = stats.attempts[outcome.index()];
                if n > 0 || outcome == crate::upstream::retry::AttemptOutcome::Answered {
                    self.add(
                        "aura_upstream_attempts_total",
                        &[name, outcome.label()],
                        Value::count(n),
                    );
                }
            }
            if let Some(ttft) = &stats.ttft {
                self.add("aura_upstream_ttft_seconds", &[name], Value::Latency(ttft));
            }
        }
    }

    /// Configuration reloads, applied and refused.
    fn reloads(&mut self, (applied, refused): (u64, u64)) {
        for (result, n) in [("applied", applied), ("refused", refused)] {
            self.add("aura_config_reloads_total", &[result], Value::count(n));
        }
    }

    /// Per key (its alias, or its key id; `other` past the series cap) and model (its name in
    /// the price table, or `other`): requests, tokens and cost; and each active key's remaining
    /// budget.
    fn keys(&mut self, s: &Snapshot, aliases: &HashMap<KeyId, String>) {
        let label = |key: &Option<KeyId>| match key {
            Some(id) => aliases.get(id).cloned().unwrap_or_else(|| id.to_string()),
            None => "other".to_string(),
        };
        for (key, models) in &s.by_key {
            let key = label(key);
            for (model, spend) in models {
                let Spend {
                    requests,
                    prompt_tokens,
                    completion_tokens,
                    cost_nano,
                } = *spend;
                let labels = [key.as_str(), model];
                self.add("aura_key_requests_total", &labels, Value::count(requests));
                for (kind, n) in [("prompt", prompt_tokens), ("completion", completion_tokens)] {
                    self.add(
                        "aura_key_tokens_total",
                        &[&key, model, kind],
                        Value::count(n),
                    );
                }
                self.add(
                    "aura_key_cost_dollars_total",
                    &labels,
                    Value::dollars(cost_nano),
                );
            }
        }
        for (id, left) in &s.remaining {
            let key = label(&Some(*id));
            self.add(
                "aura_budget_remaining_dollars",
                &[&key],
                Value::dollars_level(*left),
            );
        }
    }

    /// The ledger thread's health (the Valkey store only).
    fn ledger(&mut self, stats: &LedgerStats) {
        let level = |v: u64| Value::Level(v as f64);
        self.add("aura_store_up", &[], level(stats.up.load(Relaxed)));
        self.add(
            "aura_ledger_queue_ops",
            &[],
            level(stats.queued.load(Relaxed)),
        );
        self.add(
            "aura_ledger_replay_ops",
            &[],
            level(stats.replaying.load(Relaxed)),
        );
        self.add(
            "aura_journal_errors_total",
            &[],
            Value::count(stats.journal_errors()),
        );
        self.add(
            "aura_store_data_lost_total",
            &[],
            Value::count(stats.losses.load(Relaxed)),
        );
        self.add(
            "aura_store_lost_accounts_total",
            &[],
            Value::count(stats.lost_accounts.load(Relaxed)),
        );
        self.add(
            "aura_store_errors_total",
            &[],
            Value::count(stats.errors.load(Relaxed)),
        );
        self.add(
            "aura_ledger_applied_ops_total",
            &[],
            Value::count(stats.applied.load(Relaxed)),
        );
        self.add(
            "aura_ledger_rejected_ops_total",
            &[],
            Value::count(stats.rejected.load(Relaxed)),
        );
        // A summary without quantiles: the mean flush round trip is sum / count.
        self.add(
            "aura_ledger_flush_seconds",
            &[],
            Value::Mean {
                sum: stats.call_nanos.load(Relaxed) as f64 / 1e9,
                count: stats.calls.load(Relaxed),
            },
        );
    }
}

/// One sample's value.
enum Value<'a> {
    Count(f64),
    Level(f64),
    Latency(&'a Latency),
    Mean { sum: f64, count: u64 },
}

impl Value<'_> {
    fn count(n: u64) -> Self {
        Value::Count(n as f64)
    }

    fn dollars(nano: u64) -> Self {
        Value::Count(nano as f64 / 1e9)
    }

    fn dollars_level(nano: u64) -> Self {
        Value::Level(nano as f64 / 1e9)
    }
}

/// A histogram's cumulative buckets at [`BUCKETS_SECONDS`] (the encoder adds `+Inf`).
fn histogram(l: &Latency) -> proto::Histogram {
    let edges_ns = BUCKETS_SECONDS.map(|edge| (edge * 1e9).round() as u64);
    let mut h = proto::Histogram::default();
    h.set_bucket(
        BUCKETS_SECONDS
            .iter()
            .zip(l.cumulative_counts(&edges_ns))
            .map(|(edge, n)| {
                let mut b = proto::Bucket::default();
                b.set_upper_bound(*edge);
                b.set_cumulative_count(n);
                b
            })
            .collect(),
    );
    h.set_sample_count(l.count());
    h.set_sample_sum(l.sum_ns() as f64 / 1e9);
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Record;
    use std::time::Duration;

    #[test]
    fn the_crates_text_format_with_cumulative_buckets_and_escaped_labels() {
        let mut s = Snapshot::default();
        let mini: std::sync::Arc<str> = std::sync::Arc::from("gpt-4o-mini");
        for us in [3, 40, 40, 2_000] {
            s.record(&Record {
                route: "chat_completions",
                status: 200,
                error: None,
                ttft_overhead: Some(Duration::from_micros(us)),
                to_upstream: None,
                usage: None,
                usage_missing: us == 2_000,
                usage_implausible: false,
                cost_nano: 1_500_000_000,
                default_price: us == 3,
                billed: (us == 40).then_some((KeyId::of("sk-prom-a"), Some(&mini))),
                upstream: None,
                ttft: None,
            });
        }
        s.record(&Record {
            route: "chat_completions",
            status: 200,
            error: None,
            ttft_overhead: None,
            to_upstream: None,
            usage: None,
            usage_missing: false,
            usage_implausible: false,
            cost_nano: 250_000_000,
            default_price: true,
            billed: Some((KeyId::of("sk-prom-b"), None)),
            upstream: None,
            ttft: None,
        });
        s.remaining.insert(KeyId::of("sk-prom-b"), 2_500_000_000);
        s.in_flight = 3;
        let aliases = HashMap::from([(KeyId::of("sk-prom-b"), "team \"b\"".to_string())]);
        let registry = Registry::new(1);
        registry.publish(0, s);
        registry.set_driver(0, "io_uring");
        registry.set_aliases(aliases);
        let text = render(&registry);
        let a = KeyId::of("sk-prom-a").to_string();
        for line in [
            format!("aura_key_requests_total{{key=\"{a}\",model=\"gpt-4o-mini\"}} 2"),
            format!("aura_key_cost_dollars_total{{key=\"{a}\",model=\"gpt-4o-mini\"}} 3"),
            "aura_key_cost_dollars_total{key=\"team \\\"b\\\"\",model=\"other\"} 0.25".to_string(),
            "aura_budget_remaining_dollars{key=\"team \\\"b\\\"\"} 2.5".to_string(),
            "aura_active_requests 3".to_string(),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
        for line in [
            "# TYPE aura_ttft_overhead_seconds histogram",
            "aura_ttft_overhead_seconds_bucket{le=\"0.000001\"} 0",
            "aura_ttft_overhead_seconds_bucket{le=\"0.000005\"} 1",
            "aura_ttft_overhead_seconds_bucket{le=\"0.00005\"} 3",
            "aura_ttft_overhead_seconds_bucket{le=\"0.001\"} 3",
            "aura_ttft_overhead_seconds_bucket{le=\"0.0025\"} 4",
            "aura_ttft_overhead_seconds_bucket{le=\"+Inf\"} 4",
            "aura_ttft_overhead_seconds_sum 0.002083",
            "aura_ttft_overhead_seconds_count 4",
            "aura_requests_total{route=\"chat_completions\",status_class=\"2xx\"} 5",
            "aura_usage_missing_total 1",
            "aura_cost_dollars_total 6.25",
            "aura_default_price_requests_total 2",
            "aura_worker_driver{worker=\"0\",driver=\"io_uring\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
    }
}
