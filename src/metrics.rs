//! A worker's metrics: counters and hdrhistograms, recorded on the request path with no lock and
//! no shared atomic (each worker owns its [`Shard`]). Every [`PUBLISH_EVERY`] the worker copies
//! its shard into the [`Registry`]; `/metrics` merges the workers' copies at scrape time and
//! `metrics/prom.rs` encodes them. So a scrape sees each worker as of at most one interval ago.
//! Recording one latency: ~3 ns for a per-core hdrhistogram vs ~350 ns for a shared prometheus
//! `Histogram` with 2 threads (STACK.md); `cargo bench --bench hot_path` measures ours.

pub mod prom;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::auth::{KeyId, KeyIdHasher};

type KeyIdHashing = std::hash::BuildHasherDefault<KeyIdHasher>;
use crate::upstream::retry::AttemptOutcome;
use crate::usage::Usage;

/// Keys a worker keeps series for; requests of further keys count under `key="other"`, so a
/// passthrough gateway facing many keys cannot grow its metrics without bound.
pub const MAX_KEY_SERIES: usize = 1000;
/// The model label of a model with no price (the table's names keep the label set bounded).
pub const OTHER_MODEL: &str = "other";

pub const PUBLISH_EVERY: Duration = Duration::from_millis(250);

/// Nanoseconds, 1 ns .. 100 s at 2 significant figures (within 1%; the exported buckets step
/// 1, 2.5, 5), larger values clamped. 2 rather than 3 figures: 29 KiB per histogram instead of
/// 229 KiB, and each worker holds four (its own two and its published copy); with 3, Aura's
/// RSS at idle grew by 2.6 MiB (perf scenario a).
#[derive(Debug, Clone)]
pub struct Latency {
    histogram: Histogram<u64>,
    /// Exact: hdrhistogram's own sum is only as precise as its buckets.
    sum_ns: u64,
}

impl Default for Latency {
    fn default() -> Latency {
        #[allow(clippy::expect_used)]
        let histogram =
            Histogram::new_with_bounds(1, 100_000_000_000, 2).expect("constant bounds are valid");
        Latency {
            histogram,
            sum_ns: 0,
        }
    }
}

impl Latency {
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.histogram.saturating_record(ns.max(1));
        self.sum_ns = self.sum_ns.saturating_add(ns);
    }

    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    pub fn sum_ns(&self) -> u64 {
        self.sum_ns
    }

    /// Observations at or below `ns` (to the histogram's precision).
    pub fn count_at_or_below(&self, ns: u64) -> u64 {
        self.cumulative_counts(&[ns])[0]
    }

    /// For each of the ascending `edges_ns`, the observations at or below it: one pass.
    pub fn cumulative_counts(&self, edges_ns: &[u64]) -> Vec<u64> {
        let h = &self.histogram;
        let mut counts = vec![0; edges_ns.len()];
        let mut below = 0;
        let mut edge = 0;
        for v in h.iter_recorded() {
            let value = h.lowest_equivalent(v.value_iterated_to());
            while edge < edges_ns.len() && value > edges_ns[edge] {
                counts[edge] = below;
                edge += 1;
            }
            below += v.count_at_value();
        }
        for c in &mut counts[edge..] {
            *c = below;
        }
        counts
    }

    fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides: `add` cannot fail.
        let _ = self.histogram.add(&other.histogram);
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
    }
}

/// What one finished request contributes.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub route: &'static str,
    /// 0 when no status was sent.
    pub status: u16,
    pub error: Option<&'static str>,
    /// Upstream's first body byte read → written to the client.
    pub ttft_overhead: Option<Duration>,
    /// Request received → request written upstream.
    pub to_upstream: Option<Duration>,
    pub usage: Option<&'a Usage>,
    /// A billable request succeeded without usage: its cost was estimated from bytes.
    pub usage_missing: bool,
    /// The usage reported was beyond what the model can do: billed the reservation.
    pub usage_implausible: bool,
    /// What the request was billed, in nano-dollars.
    pub cost_nano: u64,
    /// Its model had no price: billed at the default price.
    pub default_price: bool,
    /// A billed request: its key and its model's name in the price table (`None`: no price).
    pub billed: Option<(KeyId, Option<&'a Arc<str>>)>,
    /// The upstream whose answer it relayed, by name.
    pub upstream: Option<&'a str>,
    /// Request received → first body byte to the client.
    pub ttft: Option<Duration>,
}

/// One key's spend on one model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spend {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_nano: u64,
}

impl Spend {
    fn add(&mut self, other: &Spend) {
        // Counters saturate: a Prometheus counter that wraps reads as a reset.
        self.requests = self.requests.saturating_add(other.requests);
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(other.completion_tokens);
        self.cost_nano = self.cost_nano.saturating_add(other.cost_nano);
    }
}

/// Counters and histograms of one worker, or of all workers merged.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// (route, status class such as "2xx") → requests.
    pub requests: Vec<((&'static str, &'static str), u64)>,
    /// error label → requests that ended with it.
    pub errors: Vec<(&'static str, u64)>,
    pub ttft_overhead: Latency,
    pub to_upstream: Latency,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub usage_missing: u64,
    pub usage_implausible: u64,
    pub cost_nano: u64,
    pub default_priced: u64,
    /// Key (`None`: past `MAX_KEY_SERIES`) → model → spend.
    pub by_key: HashMap<Option<KeyId>, HashMap<Arc<str>, Spend>, KeyIdHashing>,
    /// What each active key may still spend, as the store last told a worker (the least of
    /// the workers' figures once merged: spend only grows between resets).
    pub remaining: HashMap<KeyId, u64>,
    /// Requests being handled when the copy was made.
    pub in_flight: u64,
    /// Per upstream, by its `[[upstreams]]` name (names, not places in the table: a reload
    /// may reorder it).
    pub upstreams: Vec<(String, UpstreamStats)>,
}

/// One upstream's counters on one worker (or all workers merged).
#[derive(Debug, Clone, Default)]
pub struct UpstreamStats {
    /// Status class → requests it answered (the attempt whose answer went to the client).
    pub requests: Vec<(&'static str, u64)>,
    /// Attempts by how they ended (`AttemptOutcome::index`).
    pub attempts: [u64; AttemptOutcome::ALL.len()],
    /// Request received → first body byte to the client, for requests it answered; made on
    /// its first answer (29 KiB each).
    pub ttft: Option<Latency>,
    /// Workers that held it available when they published, and workers that published.
    pub up: u64,
    pub workers: u64,
}

impl UpstreamStats {
    fn merge(&mut self, other: &UpstreamStats) {
        for &(class, n) in &other.requests {
            bump(&mut self.requests, class, n);
        }
        for (mine, theirs) in self.attempts.iter_mut().zip(other.attempts) {
            *mine = mine.saturating_add(theirs);
        }
        if let Some(theirs) = &other.ttft {
            self.ttft.get_or_insert_with(Latency::default).merge(theirs);
        }
        self.up += other.up;
        self.workers += other.workers;
    }
}

fn bump<K: PartialEq + Copy>(counts: &mut Vec<(K, u64)>, key: K, by: u64) {
    match counts.iter_mut().find(|(k, _)| *k == key) {
        Some((_, n)) => *n = n.saturating_add(by),
        None => counts.push((key, by)),
    }
}

fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "none",
    }
}

impl Snapshot {
    /// Upstream `name`'s counters, made on first use.
    pub fn upstream(&mut self, name: &str) -> &mut UpstreamStats {
        let at = match self.upstreams.iter().position(|(n, _)| n == name) {
            Some(at) => at,
            None => {
                self.upstreams
                    .push((name.to_string(), UpstreamStats::default()));
                self.upstreams.len() - 1
            }
        };
        &mut self.upstreams[at].1
    }

    pub fn record_attempt(&mut self, upstream: &str, outcome: AttemptOutcome) {
        let counts = &mut self.upstream(upstream).attempts[outcome.index()];
        *counts = counts.saturating_add(1);
    }

    pub fn record(&mut self, r: &Record) {
        bump(&mut self.requests, (r.route, status_class(r.status)), 1);
        if let Some(name) = r.upstream.filter(|_| r.status != 0) {
            let stats = self.upstream(name);
            bump(&mut stats.requests, status_class(r.status), 1);
            if let Some(d) = r.ttft {
                stats.ttft.get_or_insert_with(Latency::default).record(d);
            }
        }
        if let Some(label) = r.error {
            bump(&mut self.errors, label, 1);
        }
        if let Some(d) = r.ttft_overhead {
            self.ttft_overhead.record(d);
        }
        if let Some(d) = r.to_upstream {
            self.to_upstream.record(d);
        }
        // Counters saturate: a Prometheus counter that wraps reads as a reset.
        if let Some(u) = r.usage {
            self.prompt_tokens = self.prompt_tokens.saturating_add(u.prompt_tokens);
            self.completion_tokens = self.completion_tokens.saturating_add(u.completion_tokens);
            self.cached_prompt_tokens = self
                .cached_prompt_tokens
                .saturating_add(u.cached_prompt_tokens);
        }
        self.usage_missing += u64::from(r.usage_missing);
        self.usage_implausible += u64::from(r.usage_implausible);
        self.cost_nano = self.cost_nano.saturating_add(r.cost_nano);
        self.default_priced += u64::from(r.default_price);
        if let Some((key, model)) = r.billed {
            let key = (self.by_key.contains_key(&Some(key)) || self.by_key.len() < MAX_KEY_SERIES)
                .then_some(key);
            let models = self.by_key.entry(key).or_default();
            let spend = Spend {
                requests: 1,
                prompt_tokens: r.usage.map_or(0, |u| u.prompt_tokens),
                completion_tokens: r.usage.map_or(0, |u| u.completion_tokens),
                cost_nano: r.cost_nano,
            };
            match models.get_mut(model.map_or(OTHER_MODEL, |m| m.as_ref())) {
                Some(total) => total.add(&spend),
                None => {
                    let label = model.cloned().unwrap_or_else(|| Arc::from(OTHER_MODEL));
                    models.insert(label, spend);
                }
            }
        }
    }

    pub fn merge(&mut self, other: &Snapshot) {
        for &(key, n) in &other.requests {
            bump(&mut self.requests, key, n);
        }
        for &(key, n) in &other.errors {
            bump(&mut self.errors, key, n);
        }
        self.ttft_overhead.merge(&other.ttft_overhead);
        self.to_upstream.merge(&other.to_upstream);
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(other.completion_tokens);
        self.cached_prompt_tokens = self
            .cached_prompt_tokens
            .saturating_add(other.cached_prompt_tokens);
        self.usage_missing = self.usage_missing.saturating_add(other.usage_missing);
        self.usage_implausible = self
            .usage_implausible
            .saturating_add(other.usage_implausible);
        self.cost_nano = self.cost_nano.saturating_add(other.cost_nano);
        self.default_priced = self.default_priced.saturating_add(other.default_priced);
        // The cap holds for the merge too: keys past it fold into `other`.
        for (key, models) in &other.by_key {
            let key = (self.by_key.contains_key(key) || self.by_key.len() < MAX_KEY_SERIES)
                .then_some(*key)
                .flatten();
            let mine = self.by_key.entry(key).or_default();
            for (model, spend) in models {
                mine.entry(model.clone()).or_default().add(spend);
            }
        }
        for (&key, &left) in &other.remaining {
            if let Some(mine) = self.remaining.get_mut(&key) {
                *mine = (*mine).min(left);
            } else if self.remaining.len() < MAX_KEY_SERIES {
                self.remaining.insert(key, left);
            }
        }
        self.in_flight += other.in_flight;
        for (name, theirs) in &other.upstreams {
            self.upstream(name).merge(theirs);
        }
    }
}

/// What a worker last published: its record count, requests in flight and remaining budgets.
#[derive(Debug, Default)]
pub struct Seen {
    pub recorded: u64,
    pub in_flight: u64,
    pub remaining: HashMap<KeyId, u64>,
    /// Which upstreams were up, by name.
    pub up: Vec<(String, bool)>,
}

/// One worker's metrics; `!Sync`, touched only by its worker.
#[derive(Debug, Default)]
pub struct Shard {
    current: RefCell<Snapshot>,
    /// Requests recorded so far, so an idle worker need not copy its histograms to publish.
    recorded: Cell<u64>,
}

impl Shard {
    pub fn record(&self, r: &Record) {
        self.current.borrow_mut().record(r);
        self.recorded.set(self.recorded.get() + 1);
    }

    /// One attempt at upstream `upstream`, and how it ended.
    pub fn record_attempt(&self, upstream: &str, outcome: AttemptOutcome) {
        self.current.borrow_mut().record_attempt(upstream, outcome);
        self.recorded.set(self.recorded.get() + 1);
    }

    pub fn snapshot(&self) -> Snapshot {
        self.current.borrow().clone()
    }

    /// A copy, if anything was recorded since `*seen` (which it then updates) or `anyway`.
    pub fn snapshot_if_changed(&self, seen: &mut u64, anyway: bool) -> Option<Snapshot> {
        let now = self.recorded.get();
        (anyway || now != *seen).then(|| {
            *seen = now;
            self.snapshot()
        })
    }
}

/// The process-wide side: each worker's last published copy, and the driver it runs on.
#[derive(Debug)]
pub struct Registry {
    workers: Vec<Mutex<Worker>>,
    /// Configured keys' aliases, their label in the per-key series (replaced by a reload).
    aliases: std::sync::RwLock<Arc<HashMap<KeyId, String>>>,
    /// Reloads applied, and refused.
    reloads: [std::sync::atomic::AtomicU64; 2],
    /// The ledger thread's counters, when budgets live in Valkey.
    ledger: std::sync::OnceLock<Arc<crate::budget::ledger::LedgerStats>>,
    /// Spend record lines dropped (its writer behind), when there is a record.
    spend_dropped: std::sync::OnceLock<Arc<std::sync::atomic::AtomicU64>>,
}

#[derive(Debug, Default)]
struct Worker {
    driver: Option<&'static str>,
    published: Snapshot,
}

impl Registry {
    pub fn new(workers: usize) -> Arc<Registry> {
        Arc::new(Registry {
            workers: (0..workers).map(|_| Mutex::default()).collect(),
            ledger: std::sync::OnceLock::new(),
            aliases: std::sync::RwLock::default(),
            reloads: Default::default(),
            spend_dropped: Default::default(),
        })
    }

    pub fn set_aliases(&self, aliases: HashMap<KeyId, String>) {
        let aliases = Arc::new(aliases);
        match self.aliases.write() {
            Ok(mut slot) => *slot = aliases,
            Err(poisoned) => *poisoned.into_inner() = aliases,
        }
    }

    pub fn aliases(&self) -> Arc<HashMap<KeyId, String>> {
        match self.aliases.read() {
            Ok(aliases) => aliases.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// A reload applied (`true`) or refused.
    pub fn count_reload(&self, applied: bool) {
        let slot = &self.reloads[usize::from(!applied)];
        slot.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Reloads applied, and refused.
    pub fn reloads(&self) -> (u64, u64) {
        let read = |i: usize| self.reloads[i].load(std::sync::atomic::Ordering::Relaxed);
        (read(0), read(1))
    }

    /// The spend record's count of lines dropped.
    pub fn set_spend_record(&self, dropped: Arc<std::sync::atomic::AtomicU64>) {
        let _ = self.spend_dropped.set(dropped);
    }

    pub fn spend_dropped(&self) -> Option<u64> {
        self.spend_dropped
            .get()
            .map(|n| n.load(std::sync::atomic::Ordering::Relaxed))
    }

    pub fn set_ledger(&self, stats: Arc<crate::budget::ledger::LedgerStats>) {
        let _ = self.ledger.set(stats);
    }

    pub fn ledger(&self) -> Option<&crate::budget::ledger::LedgerStats> {
        self.ledger.get().map(|s| s.as_ref())
    }

    pub fn set_driver(&self, worker: usize, driver: &'static str) {
        if let Some(slot) = self.workers.get(worker) {
            if let Ok(mut w) = slot.lock() {
                w.driver = Some(driver);
            }
        }
    }

    /// Called by `worker` itself, off the request path.
    pub fn publish(&self, worker: usize, snapshot: Snapshot) {
        if let Some(slot) = self.workers.get(worker) {
            if let Ok(mut w) = slot.lock() {
                w.published = snapshot;
            }
        }
    }

    /// All workers merged, and each worker's driver.
    pub fn gather(&self) -> (Snapshot, Vec<(usize, &'static str)>) {
        let mut merged = Snapshot::default();
        let mut drivers = Vec::new();
        for (id, slot) in self.workers.iter().enumerate() {
            if let Ok(w) = slot.lock() {
                merged.merge(&w.published);
                if let Some(d) = w.driver {
                    drivers.push((id, d));
                }
            }
        }
        (merged, drivers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(route: &'static str, status: u16, overhead_us: u64) -> Record<'static> {
        Record {
            route,
            status,
            error: None,
            ttft_overhead: Some(Duration::from_micros(overhead_us)),
            to_upstream: None,
            usage: None,
            usage_missing: false,
            usage_implausible: false,
            cost_nano: 0,
            default_price: false,
            billed: None,
            upstream: None,
            ttft: None,
        }
    }

    #[test]
    fn spend_is_kept_per_key_and_model_up_to_the_series_cap() {
        let mut s = Snapshot::default();
        let mini: Arc<str> = Arc::from("gpt-4o-mini");
        let usage = Usage {
            prompt_tokens: 10,
            completion_tokens: 5,
            cached_prompt_tokens: 0,
            ..Usage::default()
        };
        for i in 0..MAX_KEY_SERIES + 5 {
            let key = KeyId::of(&format!("sk-series-{i}"));
            let model = (i % 2 == 0).then_some(&mini);
            s.record(&Record {
                usage: Some(&usage),
                cost_nano: 7,
                billed: Some((key, model)),
                ..record("chat_completions", 200, 10)
            });
        }
        assert_eq!(s.by_key.len(), MAX_KEY_SERIES + 1, "the cap, plus `other`");
        let other: u64 = s.by_key[&None].values().map(|spend| spend.requests).sum();
        assert_eq!(other, 5);
        let first = &s.by_key[&Some(KeyId::of("sk-series-0"))];
        assert_eq!(
            first["gpt-4o-mini"],
            Spend {
                requests: 1,
                prompt_tokens: 10,
                completion_tokens: 5,
                cost_nano: 7
            }
        );
        assert!(s.by_key[&Some(KeyId::of("sk-series-1"))].contains_key(OTHER_MODEL));
        // Merged over workers: spend adds up, remaining takes the least.
        let mut a = Snapshot::default();
        a.remaining.insert(KeyId::of("sk-series-0"), 500);
        let mut b = s.clone();
        b.remaining.insert(KeyId::of("sk-series-0"), 300);
        a.merge(&b);
        a.merge(&s);
        assert_eq!(
            a.by_key[&Some(KeyId::of("sk-series-0"))]["gpt-4o-mini"].requests,
            2
        );
        assert_eq!(a.remaining[&KeyId::of("sk-series-0")], 300);
    }

    #[test]
    fn workers_merge_at_gather() {
        let registry = Registry::new(2);
        let (a, b) = (Shard::default(), Shard::default());
        a.record(&record("chat_completions", 200, 10));
        a.record(&record("chat_completions", 402, 20));
        b.record(&record("chat_completions", 200, 30));
        let usage = Usage {
            prompt_tokens: 7,
            completion_tokens: 5,
            cached_prompt_tokens: 2,
            ..Usage::default()
        };
        b.record(&Record {
            usage: Some(&usage),
            error: Some("upstream_reset"),
            ..record("passthrough", 502, 40)
        });
        registry.publish(0, a.snapshot());
        registry.publish(1, b.snapshot());
        registry.set_driver(1, "epoll");
        let (all, drivers) = registry.gather();
        let count = |route, class| {
            all.requests
                .iter()
                .find(|(k, _)| *k == (route, class))
                .map_or(0, |(_, n)| *n)
        };
        assert_eq!(count("chat_completions", "2xx"), 2);
        assert_eq!(count("chat_completions", "4xx"), 1);
        assert_eq!(count("passthrough", "5xx"), 1);
        assert_eq!(all.errors, vec![("upstream_reset", 1)]);
        assert_eq!(all.ttft_overhead.count(), 4);
        assert_eq!(all.ttft_overhead.sum_ns(), 100_000);
        assert_eq!(all.ttft_overhead.count_at_or_below(20_000), 2);
        assert_eq!(
            (
                all.prompt_tokens,
                all.completion_tokens,
                all.cached_prompt_tokens
            ),
            (7, 5, 2)
        );
        assert_eq!(drivers, vec![(1, "epoll")]);
    }

    #[test]
    fn an_unchanged_shard_is_not_copied_again() {
        let shard = Shard::default();
        let mut seen = 0;
        assert!(shard.snapshot_if_changed(&mut seen, false).is_none());
        shard.record(&record("chat_completions", 200, 1));
        let copy = shard.snapshot_if_changed(&mut seen, false).unwrap();
        assert_eq!(copy.ttft_overhead.count(), 1);
        assert!(shard.snapshot_if_changed(&mut seen, false).is_none());
    }

    #[test]
    fn a_later_publish_replaces_the_earlier_copy() {
        let registry = Registry::new(1);
        let shard = Shard::default();
        shard.record(&record("chat_completions", 200, 1));
        registry.publish(0, shard.snapshot());
        shard.record(&record("chat_completions", 200, 1));
        registry.publish(0, shard.snapshot());
        assert_eq!(registry.gather().0.ttft_overhead.count(), 2);
    }
}
