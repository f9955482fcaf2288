//! The comparison: every scenario runs against every target in the same run, in rounds, the
//! target order rotating each round so drift on a noisy machine spreads over all of them. Each
//! measured run is preceded by a short unrecorded warm-up (connections, pools, page faults).

use std::time::Duration;

use hdrhistogram::Histogram;

use crate::load::{self, LoadResult, LoadSpec};
use crate::procstat::{self, Watch};
use crate::targets::Target;

#[derive(Debug, Clone)]
pub struct Scenario {
    pub id: &'static str,
    pub title: &'static str,
    pub clients: usize,
    pub requests: u64,
    pub chunks: usize,
    pub delay_ms: u64,
    /// More than `delay_ms`: each pause is drawn from the range.
    pub delay_max_ms: u64,
    pub stagger: Duration,
    pub max_duration: Duration,
}

impl Scenario {
    /// The load that runs this scenario against `target`.
    pub fn load(&self, target: std::net::SocketAddr, threads: usize) -> LoadSpec {
        LoadSpec {
            target,
            clients: self.clients,
            requests: self.requests,
            max_duration: self.max_duration,
            chunks: self.chunks,
            delay_ms: self.delay_ms,
            delay_max_ms: self.delay_max_ms,
            stagger: self.stagger,
            threads,
        }
    }
}

/// The scenarios; `scale` shrinks request counts for a smoke run. Every answer's events come
/// one write each, as real providers write them.
pub fn scenarios(scale: f64) -> Vec<Scenario> {
    let n = |full: u64| ((full as f64 * scale).round() as u64).max(10);
    vec![
        Scenario {
            id: "a",
            title: "1 client, 10 chunks, no delay",
            clients: 1,
            requests: n(300),
            chunks: 10,
            delay_ms: 0,
            delay_max_ms: 0,
            stagger: Duration::ZERO,
            max_duration: Duration::from_secs(30),
        },
        Scenario {
            id: "b",
            title: "64 clients, 20 chunks, no delay",
            clients: 64,
            requests: n(20_000),
            chunks: 20,
            delay_ms: 0,
            delay_max_ms: 0,
            stagger: Duration::ZERO,
            max_duration: Duration::from_secs(20),
        },
        Scenario {
            id: "c",
            title: "256 clients, 20 chunks 20 ms apart, starts staggered",
            clients: 256,
            requests: n(1_024),
            chunks: 20,
            delay_ms: 20,
            delay_max_ms: 0,
            stagger: Duration::from_millis(400),
            max_duration: Duration::from_secs(30),
        },
        Scenario {
            id: "d",
            title:
                "1000 clients, 200 chunks 10-40 ms apart, starts staggered (a provider's stream)",
            clients: 1000,
            requests: n(2_000),
            chunks: 200,
            delay_ms: 10,
            delay_max_ms: 40,
            stagger: Duration::from_secs(2),
            max_duration: Duration::from_secs(90),
        },
    ]
}

/// One target's results in one scenario, merged over the rounds.
#[derive(Debug)]
pub struct Outcome {
    pub target: &'static str,
    pub ttft_ns: Histogram<u64>,
    pub total_ns: Histogram<u64>,
    pub completed: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Requests per second of each round.
    pub rps: Vec<f64>,
    /// On-CPU time of the target's processes, summed over the rounds (None for the mock itself).
    pub cpu_ns: Option<u64>,
    pub peak_rss_kib: Option<u64>,
    /// The store process behind the target (aura-valkey's Valkey server), if any: its name and
    /// its own CPU and peak RSS, kept apart from the target's (nginx has no store).
    pub store: Option<&'static str>,
    pub store_cpu_ns: Option<u64>,
    pub store_peak_rss_kib: Option<u64>,
}

impl Outcome {
    pub fn new(target: &'static str, store: Option<&'static str>) -> Outcome {
        Outcome {
            target,
            store,
            store_cpu_ns: None,
            store_peak_rss_kib: None,
            ttft_ns: load::histogram(),
            total_ns: load::histogram(),
            completed: 0,
            errors: 0,
            first_error: None,
            rps: Vec::new(),
            cpu_ns: None,
            peak_rss_kib: None,
        }
    }

    pub fn add(
        &mut self,
        run: LoadResult,
        usage: Option<procstat::Usage>,
        store_usage: Option<procstat::Usage>,
    ) {
        let _ = self.ttft_ns.add(&run.ttft_ns);
        let _ = self.total_ns.add(&run.total_ns);
        self.rps.push(run.requests_per_second());
        self.completed += run.completed;
        self.errors += run.errors;
        if self.first_error.is_none() {
            self.first_error = run.first_error;
        }
        if let Some(u) = usage {
            self.cpu_ns = Some(self.cpu_ns.unwrap_or(0) + u.cpu_ns);
            self.peak_rss_kib = Some(self.peak_rss_kib.unwrap_or(0).max(u.peak_rss_kib));
        }
        if let Some(u) = store_usage {
            self.store_cpu_ns = Some(self.store_cpu_ns.unwrap_or(0) + u.cpu_ns);
            self.store_peak_rss_kib =
                Some(self.store_peak_rss_kib.unwrap_or(0).max(u.peak_rss_kib));
        }
    }

    pub fn median_rps(&self) -> f64 {
        let mut v = self.rps.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    }

    /// Milliseconds of proxy CPU per 1000 completed requests.
    pub fn cpu_ms_per_1000(&self) -> Option<f64> {
        self.per_1000(self.cpu_ns?)
    }

    /// Milliseconds of the store's CPU per 1000 completed requests (aura-valkey's Valkey).
    pub fn store_cpu_ms_per_1000(&self) -> Option<f64> {
        self.per_1000(self.store_cpu_ns?)
    }

    fn per_1000(&self, cpu_ns: u64) -> Option<f64> {
        let cpu = cpu_ns as f64 / 1e6;
        (self.completed > 0).then(|| cpu * 1000.0 / self.completed as f64)
    }
}

#[derive(Debug)]
pub struct ScenarioResult {
    pub scenario: Scenario,
    /// In the order the targets were given; the first is the direct baseline.
    pub outcomes: Vec<Outcome>,
}

/// Runs one scenario against every target for `rounds` rounds. The first target is the direct
/// baseline (the mock itself): its own CPU and memory are not the subject and are not watched.
/// A target's store process (aura-valkey's Valkey server) is watched apart from the target.
pub fn run_scenario(
    scenario: &Scenario,
    targets: &[&Target],
    rounds: usize,
    load_threads: usize,
) -> std::io::Result<ScenarioResult> {
    let mut outcomes: Vec<Outcome> = targets
        .iter()
        .map(|t| Outcome::new(t.name, t.store().map(|s| s.name)))
        .collect();
    for round in 0..rounds {
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let target = targets[i];
            let spec = scenario.load(target.addr, load_threads);
            // One request per client (its connection made, the pools warm) and at least 20:
            // two per client made (d)'s warm-up as long as its run.
            let warmup = LoadSpec {
                requests: (scenario.clients as u64).max(20),
                max_duration: Duration::from_secs(10),
                ..spec.clone()
            };
            load::run(&warmup)?;
            let watch = (i > 0).then(|| Watch::start(target.pids())).transpose()?;
            let store_watch = target
                .store()
                .filter(|_| i > 0)
                .map(|s| Watch::start(s.pids()))
                .transpose()?;
            let run = load::run(&spec)?;
            let usage = watch.map(Watch::stop);
            let store_usage = store_watch.map(Watch::stop);
            eprintln!(
                "  ({}) round {} {:>11}: {}",
                scenario.id,
                round + 1,
                target.name,
                run.summary()
            );
            outcomes[i].add(run, usage, store_usage);
        }
    }
    Ok(ScenarioResult {
        scenario: scenario.clone(),
        outcomes,
    })
}
