//! The soak: scenario (d), a provider's long streams at 1000 clients, run against one Aura
//! again and again for a fixed time. After every cycle: Aura's CPU per request in that cycle,
//! its resident memory and its open file descriptors once the cycle's streams have ended.
//! A leak shows as growth from the first cycles to the last; the verdict compares the median
//! of the first three cycles with that of the last three, and fails on any failed request or
//! on Aura exiting.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::bench::Scenario;
use crate::load;
use crate::procstat::{self, Watch};
use crate::targets::Target;

/// Growth allowed from the start to the end before the soak calls it growth: noise on a
/// shared machine, and allocator pools settling.
const RSS_SLACK: f64 = 1.10;
const RSS_SLACK_KIB: u64 = 2 * 1024;
const CPU_SLACK: f64 = 1.15;
const FD_SLACK: usize = 8;

/// One cycle's readings.
#[derive(Debug, Clone, Copy)]
pub struct Cycle {
    pub at: Duration,
    pub completed: u64,
    pub errors: u64,
    pub cpu_ms_per_1000: f64,
    pub rss_kib: u64,
    pub fds: usize,
}

/// Runs `scenario` against `target` until `length` is spent (and at least 6 cycles, so that
/// start and end do not overlap), printing each cycle as it ends.
pub fn run(
    scenario: &Scenario,
    target: &Target,
    length: Duration,
    load_threads: usize,
) -> std::io::Result<Vec<Cycle>> {
    let started = Instant::now();
    let spec = scenario.load(target.addr, load_threads);
    let mut cycles = Vec::new();
    while started.elapsed() < length || cycles.len() < 6 {
        let watch = Watch::start(target.pids())?;
        let run = load::run(&spec)?;
        let usage = watch.stop();
        let pids = target.pids();
        if !target.alive() {
            return Err(std::io::Error::other(format!(
                "{} exited during the soak, after {} cycles",
                target.name,
                cycles.len()
            )));
        }
        let cycle = Cycle {
            at: started.elapsed(),
            completed: run.completed,
            errors: run.errors,
            cpu_ms_per_1000: usage.cpu_ns as f64 / 1e6 * 1000.0 / run.completed.max(1) as f64,
            rss_kib: procstat::rss_kib(&pids),
            fds: open_fds(&pids),
        };
        eprintln!(
            "  soak {:>4} s: {} ok, {} errors, {:.1} ms CPU / 1000 req, RSS {:.1} MiB, {} fds",
            cycle.at.as_secs(),
            cycle.completed,
            cycle.errors,
            cycle.cpu_ms_per_1000,
            cycle.rss_kib as f64 / 1024.0,
            cycle.fds
        );
        cycles.push(cycle);
    }
    Ok(cycles)
}

/// Open file descriptors of `pids`.
pub fn open_fds(pids: &[u32]) -> usize {
    pids.iter()
        .filter_map(|pid| std::fs::read_dir(format!("/proc/{pid}/fd")).ok())
        .map(|dir| dir.count())
        .sum()
}

fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// What went wrong over the soak: failed requests in any cycle, and what grew from the first
/// three cycles to the last three (medians), each with its figures; empty when nothing did.
/// `cycles` holds at least 6.
pub fn growth(cycles: &[Cycle]) -> Vec<String> {
    let (start, end) = (&cycles[..3], &cycles[cycles.len() - 3..]);
    let m = |c: &[Cycle], f: fn(&Cycle) -> f64| median(c.iter().map(f).collect());
    let mut grew = Vec::new();
    let errors: u64 = cycles.iter().map(|c| c.errors).sum();
    if errors > 0 {
        grew.push(format!("{errors} failed requests"));
    }
    let (rss0, rss1) = (m(start, |c| c.rss_kib as f64), m(end, |c| c.rss_kib as f64));
    if rss1 > rss0 * RSS_SLACK && rss1 - rss0 > RSS_SLACK_KIB as f64 {
        grew.push(format!(
            "RSS {:.1} → {:.1} MiB",
            rss0 / 1024.0,
            rss1 / 1024.0
        ));
    }
    let (fd0, fd1) = (m(start, |c| c.fds as f64), m(end, |c| c.fds as f64));
    if fd1 > fd0 + FD_SLACK as f64 {
        grew.push(format!("file descriptors {fd0} → {fd1}"));
    }
    let (cpu0, cpu1) = (
        m(start, |c| c.cpu_ms_per_1000),
        m(end, |c| c.cpu_ms_per_1000),
    );
    if cpu1 > cpu0 * CPU_SLACK {
        grew.push(format!("CPU {cpu0:.1} → {cpu1:.1} ms / 1000 req"));
    }
    grew
}

/// The soak's table and verdict, in Markdown.
pub fn report(scenario: &Scenario, target: &str, cycles: &[Cycle]) -> String {
    let mut md = String::new();
    let total: u64 = cycles.iter().map(|c| c.completed).sum();
    let errors: u64 = cycles.iter().map(|c| c.errors).sum();
    let _ = writeln!(
        md,
        "### Soak: scenario ({}) {} against {target}, {} cycles, {total} requests, {errors} errors\n",
        scenario.id,
        scenario.title,
        cycles.len()
    );
    md.push_str("| cycle | at s | ok | errors | CPU ms / 1000 req | RSS after MiB | open fds after |\n|---:|---:|---:|---:|---:|---:|---:|\n");
    for (i, c) in cycles.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.1} | {:.1} | {} |",
            i + 1,
            c.at.as_secs(),
            c.completed,
            c.errors,
            c.cpu_ms_per_1000,
            c.rss_kib as f64 / 1024.0,
            c.fds
        );
    }
    let grew = growth(cycles);
    let _ = writeln!(
        md,
        "\nVerdict (medians of the first 3 cycles vs the last 3; RSS may grow {:.0}% and {} MiB, \
         fds {FD_SLACK}, CPU {:.0}% before it counts): {}",
        (RSS_SLACK - 1.0) * 100.0,
        RSS_SLACK_KIB / 1024,
        (CPU_SLACK - 1.0) * 100.0,
        if grew.is_empty() {
            "**no growth, no errors**".to_string()
        } else {
            format!("**failed**: {}", grew.join("; "))
        }
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cycle(rss_mib: u64, fds: usize, cpu: f64) -> Cycle {
        Cycle {
            at: Duration::ZERO,
            completed: 2000,
            errors: 0,
            cpu_ms_per_1000: cpu,
            rss_kib: rss_mib * 1024,
            fds,
        }
    }

    #[test]
    fn growth_is_judged_on_the_first_and_last_cycles_past_noise() {
        let flat: Vec<Cycle> = [30, 31, 30, 32, 31, 31, 30]
            .iter()
            .map(|&r| cycle(r, 20, 100.0))
            .collect();
        assert!(growth(&flat).is_empty(), "{:?}", growth(&flat));
        // One noisy cycle at the end does not make growth: medians.
        let mut spike = flat.clone();
        spike.push(cycle(60, 200, 300.0));
        assert!(growth(&spike).is_empty(), "{:?}", growth(&spike));
        let leaking: Vec<Cycle> = (0..8)
            .map(|i| cycle(30 + 3 * i, 20 + 10 * i as usize, 100.0 + 10.0 * i as f64))
            .collect();
        let grew = growth(&leaking);
        assert_eq!(grew.len(), 3, "{grew:?}");
        assert!(grew[0].starts_with("RSS 33.0 → 48.0 MiB"), "{grew:?}");
        assert!(grew[1].starts_with("file descriptors 30 → 80"), "{grew:?}");
        assert!(grew[2].starts_with("CPU 110.0 → 160.0"), "{grew:?}");
        let md = report(&crate::bench::scenarios(1.0)[3], "aura", &leaking);
        assert!(md.contains("**failed**: RSS"), "{md}");
        let mut failing = flat.clone();
        failing[4].errors = 3;
        assert_eq!(growth(&failing), ["3 failed requests"]);
        assert_eq!(
            md.lines()
                .filter(|l| l.starts_with("| ") && !l.starts_with("| cycle"))
                .count(),
            8
        );
    }
}
