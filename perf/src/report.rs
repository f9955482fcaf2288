//! Turns a run into `results.md` (the tables and the targets, as ratios to nginx in the same run)
//! and `ttft.svg` (TTFT by percentile, one panel per scenario, one line per target), written by
//! hand so the harness needs no plotting crate. Every Aura target (in-memory store on its
//! default driver and on epoll, Valkey store, variants) is checked against nginx alike, and the
//! default driver against epoll; the Valkey server's own CPU and memory are reported
//! in a note under each table, never added into Aura's columns (nginx has no store).

use std::fmt::Write;

use hdrhistogram::Histogram;

use crate::bench::{Outcome, ScenarioResult};

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

fn quantile_us(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return f64::NAN;
    }
    us(h.value_at_quantile(q))
}

fn find<'a>(r: &'a ScenarioResult, target: &str) -> Option<&'a Outcome> {
    r.outcomes.iter().find(|o| o.target == target)
}

/// TTFT at quantile `q` of `target` minus the direct run's, in µs.
pub fn overhead_us(r: &ScenarioResult, target: &str, q: f64) -> Option<f64> {
    let direct = r.outcomes.first()?;
    let o = find(r, target)?;
    Some(quantile_us(&o.ttft_ns, q) - quantile_us(&direct.ttft_ns, q))
}

fn opt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "—".into(),
    }
}

/// The results tables, one per scenario.
pub fn tables(results: &[ScenarioResult]) -> String {
    let mut md = String::new();
    for r in results {
        let s = &r.scenario;
        let _ = writeln!(
            md,
            "\n### ({}) {} — {} requests per target per round\n",
            s.id, s.title, s.requests
        );
        md.push_str("| target | ok | errors | req/s (median) | TTFT p50 µs | TTFT p99 µs | overhead p50 µs | overhead p99 µs | total p50 ms | total p99 ms | CPU ms / 1000 req | peak RSS MiB |\n");
        md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for (i, o) in r.outcomes.iter().enumerate() {
            let (o50, o99) = if i == 0 {
                ("—".to_string(), "—".to_string())
            } else {
                (
                    opt(overhead_us(r, o.target, 0.5), 1),
                    opt(overhead_us(r, o.target, 0.99), 1),
                )
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.0} | {:.1} | {:.1} | {} | {} | {:.2} | {:.2} | {} | {} |",
                if i == 0 { "direct (mock)" } else { o.target },
                o.completed,
                o.errors,
                o.median_rps(),
                quantile_us(&o.ttft_ns, 0.5),
                quantile_us(&o.ttft_ns, 0.99),
                o50,
                o99,
                quantile_us(&o.total_ns, 0.5) / 1e3,
                quantile_us(&o.total_ns, 0.99) / 1e3,
                opt(o.cpu_ms_per_1000(), 1),
                opt(o.peak_rss_kib.map(|k| k as f64 / 1024.0), 1),
            );
        }
        for o in &r.outcomes {
            if let Some(note) = store_note(o) {
                let _ = writeln!(md, "\n{note}");
            }
        }
        for o in &r.outcomes {
            if let Some(e) = &o.first_error {
                let _ = writeln!(md, "\nfirst error from {}: `{e}`", o.target);
            }
        }
    }
    md
}

/// The line under a table for a target with a store process: the store's CPU and peak RSS,
/// and Aura's CPU with the store's added, for whoever wants the whole cost of the deployment.
pub fn store_note(o: &Outcome) -> Option<String> {
    let store = o.store?;
    let cpu = o.store_cpu_ms_per_1000();
    let both = match (o.cpu_ms_per_1000(), cpu) {
        (Some(a), Some(s)) => Some(a + s),
        _ => None,
    };
    Some(format!(
        "{target}'s store, {store} (a separate process): {} ms CPU / 1000 req, peak RSS {} MiB. \
         Not in the {target} row, whose CPU and RSS are Aura's alone (nginx has no store); \
         Aura and {store} together: {} ms CPU / 1000 req.",
        opt(cpu, 1),
        opt(o.store_peak_rss_kib.map(|k| k as f64 / 1024.0), 1),
        opt(both, 1),
        target = o.target,
    ))
}

/// The Aura targets of a scenario (every target named `aura…`: the default driver, epoll, the
/// Valkey store, and any `--variant`), in the order they ran.
fn auras(r: &ScenarioResult) -> impl Iterator<Item = &'static str> + '_ {
    r.outcomes
        .iter()
        .map(|o| o.target)
        .filter(|t| t.starts_with("aura"))
}

/// One target of the issue, checked against the run.
pub struct Check {
    pub what: &'static str,
    /// Which Aura target.
    pub proxy: &'static str,
    pub measured: String,
    pub met: Option<bool>,
}

/// The issue's targets, each as a ratio or difference to nginx in the same run, for every Aura
/// target that ran; and Aura's default driver (`aura_driver`, as it reported it) against Aura
/// on epoll, judged only when the default was io_uring. Met or not is judged on Aura's own CPU
/// and RSS; a store's are shown beside them.
pub fn checks(results: &[ScenarioResult], aura_driver: Option<&str>) -> Vec<Check> {
    let by_id = |id: &str| results.iter().find(|r| r.scenario.id == id);
    let mut out = Vec::new();
    let store_cpu = |o: Option<&Outcome>| {
        o.and_then(|o| Some((o.store?, o.store_cpu_ms_per_1000()?)))
            .map(|(s, c)| format!(" (+ {s} {c:.1} ms/1000 req, apart)"))
            .unwrap_or_default()
    };
    let store_rss = |o: Option<&Outcome>| {
        o.and_then(|o| Some((o.store?, o.store_peak_rss_kib?)))
            .map(|(s, k)| format!(" (+ {s} {:.1} MiB, apart)", k as f64 / 1024.0))
            .unwrap_or_default()
    };
    // CPU per request is targeted wherever streams are: 64 clients at full speed (b), 256
    // sparse streams (c), a provider's long streams (d).
    let streamed = [
        (
            "b",
            "(b) CPU per streamed request ≤ 1.0× nginx",
            "(b) CPU per streamed request, io_uring ≤ 1.0× epoll",
        ),
        (
            "c",
            "(c) CPU per streamed request ≤ 1.0× nginx",
            "(c) CPU per streamed request, io_uring ≤ 1.0× epoll",
        ),
        (
            "d",
            "(d) CPU per streamed request ≤ 1.0× nginx",
            "(d) CPU per streamed request, io_uring ≤ 1.0× epoll",
        ),
    ];
    for (id, what, _) in streamed {
        let Some(scenario) = by_id(id) else { continue };
        let cpu = |t| find(scenario, t).and_then(Outcome::cpu_ms_per_1000);
        for proxy in auras(scenario) {
            if let (Some(a), Some(n)) = (cpu(proxy), cpu("nginx")) {
                out.push(Check {
                    what,
                    proxy,
                    measured: format!(
                        "{a:.1} vs {n:.1} ms/1000 req = {:.2}×{}",
                        a / n,
                        store_cpu(find(scenario, proxy))
                    ),
                    met: Some(a <= n),
                });
            }
        }
    }
    for (id, _, what) in streamed {
        let Some(scenario) = by_id(id) else { continue };
        let cpu = |t| find(scenario, t).and_then(Outcome::cpu_ms_per_1000);
        if let (Some(a), Some(e)) = (cpu("aura"), cpu("aura-epoll")) {
            let on_uring = aura_driver == Some("io_uring");
            out.push(Check {
                what,
                proxy: "aura",
                measured: format!(
                    "{a:.1} vs {e:.1} ms/1000 req (aura-epoll) = {:.2}×{}",
                    a / e,
                    if on_uring {
                        String::new()
                    } else {
                        format!(
                            " (aura ran on {}: not judged)",
                            aura_driver.unwrap_or("an unknown driver")
                        )
                    }
                ),
                met: on_uring.then_some(a <= e),
            });
        }
    }
    if let Some(b) = by_id("b") {
        let rps = |t| find(b, t).map(Outcome::median_rps);
        for proxy in auras(b) {
            if let (Some(a), Some(n)) = (rps(proxy), rps("nginx")) {
                out.push(Check {
                    what: "(b) throughput at 64 clients ≥ 1.1× nginx",
                    proxy,
                    measured: format!("{a:.0} vs {n:.0} req/s = {:.2}×", a / n),
                    met: Some(a >= 1.1 * n),
                });
            }
        }
    }
    if let Some(a) = by_id("a") {
        for proxy in auras(a) {
            if let (Some(x), Some(n)) = (overhead_us(a, proxy, 0.99), overhead_us(a, "nginx", 0.99))
            {
                out.push(Check {
                    what: "(a) TTFT overhead p99 at 1 client ≤ nginx + 20 µs",
                    proxy,
                    measured: format!("{x:.1} vs {n:.1} µs"),
                    met: Some(x <= n + 20.0),
                });
            }
        }
    }
    for (id, ttft, rss_what) in [
        (
            "c",
            "(c) TTFT overhead p99 at 256 clients ≤ 1.0× nginx",
            "(c) peak RSS with 256 open streams ≤ 1.0× nginx",
        ),
        (
            "d",
            "(d) TTFT overhead p99 at 1000 clients ≤ 1.0× nginx",
            "(d) peak RSS with 1000 open streams ≤ 1.0× nginx",
        ),
    ] {
        let Some(scenario) = by_id(id) else { continue };
        let rss = |t| find(scenario, t).and_then(|o| o.peak_rss_kib);
        for proxy in auras(scenario) {
            if let (Some(x), Some(n)) = (
                overhead_us(scenario, proxy, 0.99),
                overhead_us(scenario, "nginx", 0.99),
            ) {
                out.push(Check {
                    what: ttft,
                    proxy,
                    measured: format!("{x:.1} vs {n:.1} µs"),
                    met: Some(x <= n.max(0.0)),
                });
            }
            if let (Some(a), Some(n)) = (rss(proxy), rss("nginx")) {
                out.push(Check {
                    what: rss_what,
                    proxy,
                    measured: format!(
                        "{:.1} vs {:.1} MiB = {:.2}×{}",
                        a as f64 / 1024.0,
                        n as f64 / 1024.0,
                        a as f64 / n as f64,
                        store_rss(find(scenario, proxy))
                    ),
                    met: Some(a <= n),
                });
            }
        }
    }
    out
}

pub fn checks_table(checks: &[Check]) -> String {
    let mut md =
        String::from("| target | proxy | measured (vs nginx) | met |\n|---|---|---|---|\n");
    for c in checks {
        let met = match c.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        let _ = writeln!(md, "| {} | {} | {} | {met} |", c.what, c.proxy, c.measured);
    }
    md
}

const PERCENTILES: [f64; 9] = [0.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.99];
const COLOURS: [&str; 8] = [
    "#888888", "#2a9d3f", "#1f5fbf", "#c0392b", "#e67e22", "#8e44ad", "#16a085", "#7f8c8d",
];

/// A target's colour, the same in every picture whichever targets ran.
fn colour(name: &str, k: usize) -> &'static str {
    match name {
        "direct" => COLOURS[0],
        "nginx" => COLOURS[1],
        "aura" => COLOURS[2],
        "aura-valkey" => COLOURS[3],
        "aura-epoll" => COLOURS[4],
        _ => COLOURS[5 + k % 3],
    }
}

/// Position on the percentile axis: -log10(1 - p), so the tail gets room (0%, 90%, 99%, 99.9%
/// equally spaced), as HdrHistogram's own plots do.
fn x_of(p: f64) -> f64 {
    -(1.0 - p / 100.0).max(1e-5).log10()
}

/// TTFT by percentile, one panel per scenario, log-scaled µs.
pub fn svg(results: &[ScenarioResult]) -> String {
    let (pw, ph, left, top, bottom) = (360.0, 260.0, 60.0, 40.0, 50.0);
    let width = left + results.len() as f64 * (pw + left) + 10.0;
    let height = top + ph + bottom + 30.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let xmax = x_of(*PERCENTILES.last().unwrap_or(&99.99));
    for (n, r) in results.iter().enumerate() {
        let x0 = left + n as f64 * (pw + left);
        let series: Vec<(&str, Vec<f64>)> = r
            .outcomes
            .iter()
            .map(|o| {
                let name = if o.target == "mock" {
                    "direct"
                } else {
                    o.target
                };
                let v = PERCENTILES
                    .iter()
                    .map(|p| quantile_us(&o.ttft_ns, p / 100.0).max(1.0))
                    .collect();
                (name, v)
            })
            .collect();
        let all = series.iter().flat_map(|(_, v)| v.iter().copied());
        let lo = all
            .clone()
            .fold(f64::INFINITY, f64::min)
            .max(1.0)
            .log10()
            .floor();
        let hi = all.fold(1.0, f64::max).log10().ceil().max(lo + 1.0);
        let px = |x: f64| x0 + x / xmax * pw;
        let py = |v: f64| top + ph - (v.log10() - lo) / (hi - lo) * ph;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" font-size="12" font-weight="bold">({}) {}</text>"#,
            x0,
            top - 14.0,
            r.scenario.id,
            r.scenario.title
        );
        let _ = writeln!(
            s,
            r##"<rect x="{x0}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##
        );
        // Decades on y, percentiles on x.
        let mut d = lo;
        while d <= hi {
            let y = py(10f64.powf(d));
            let _ = writeln!(
                s,
                r##"<line x1="{x0}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
                x0 + pw,
                x0 - 4.0,
                y + 4.0,
                fmt_us(10f64.powf(d))
            );
            d += 1.0;
        }
        for p in [0.0, 90.0, 99.0, 99.9, 99.99] {
            let x = px(x_of(p));
            let _ = writeln!(
                s,
                r##"<line x1="{x}" y1="{top}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">p{p}</text>"##,
                top + ph,
                top + ph + 14.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">percentile</text>"#,
            x0 + pw / 2.0,
            top + ph + 30.0
        );
        for (k, (name, values)) in series.iter().enumerate() {
            let colour = colour(name, k);
            let points: Vec<String> = PERCENTILES
                .iter()
                .zip(values)
                .map(|(p, v)| format!("{:.1},{:.1}", px(x_of(*p)), py(*v)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
                points.join(" ")
            );
            let ly = top + 14.0 + k as f64 * 14.0;
            let _ = writeln!(
                s,
                r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{colour}" stroke-width="2"/><text x="{}" y="{}">{name}</text>"#,
                x0 + 8.0,
                ly - 4.0,
                x0 + 28.0,
                ly - 4.0,
                x0 + 32.0,
                ly
            );
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="{}">TTFT (request written → first SSE byte read), log scale; the gap to "direct" is each proxy's overhead.</text>"#,
        height - 6.0
    );
    s.push_str("</svg>\n");
    s
}

fn fmt_us(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.0} s", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0} ms", v / 1e3)
    } else {
        format!("{v:.0} µs")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::bench::{scenarios, Outcome};
    use crate::load::{self, LoadResult};
    use crate::procstat::Usage;

    /// An outcome of `completed` requests, every TTFT `ttft_us`, at 1000 req/s, with the given
    /// CPU (ms) and RSS (MiB) for the target and, if any, its store.
    fn outcome(
        target: &'static str,
        ttft_us: u64,
        usage: Option<(u64, u64)>,
        store: Option<(&'static str, u64, u64)>,
    ) -> Outcome {
        let completed = 1000;
        let mut ttft_ns = load::histogram();
        let mut total_ns = load::histogram();
        for _ in 0..completed {
            ttft_ns.record(ttft_us * 1000).unwrap();
            total_ns.record(ttft_us * 2000).unwrap();
        }
        let run = LoadResult {
            ttft_ns,
            total_ns,
            completed,
            errors: 0,
            first_error: None,
            elapsed: Duration::from_secs(1),
        };
        let usage_of = |cpu_ms: u64, rss_mib: u64| Usage {
            cpu_ns: cpu_ms * 1_000_000,
            peak_rss_kib: rss_mib * 1024,
        };
        let mut o = Outcome::new(target, store.map(|s| s.0));
        o.add(
            run,
            usage.map(|(c, r)| usage_of(c, r)),
            store.map(|(_, c, r)| usage_of(c, r)),
        );
        o
    }

    /// Scenario (b) with direct, nginx (40 ms / 1000 req), aura (30) and aura-valkey (36, its
    /// Valkey 8 more): Aura's own CPU is what is checked, the store's shown apart.
    fn run_b() -> ScenarioResult {
        let scenario = scenarios(0.1).into_iter().find(|s| s.id == "b").unwrap();
        ScenarioResult {
            scenario,
            outcomes: vec![
                outcome("mock", 100, None, None),
                outcome("nginx", 300, Some((40, 20)), None),
                outcome("aura", 250, Some((30, 10)), None),
                outcome("aura-valkey", 280, Some((36, 12)), Some(("valkey", 8, 9))),
            ],
        }
    }

    #[test]
    fn the_table_has_a_row_for_aura_valkey_and_a_note_for_its_store() {
        let md = tables(&[run_b()]);
        let row = md
            .lines()
            .find(|l| l.starts_with("| aura-valkey |"))
            .unwrap();
        // ok, errors, req/s, TTFT p50, p99, overhead p50, p99 (vs direct's 100 µs), …, CPU, RSS
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(cells[2], "1000");
        assert_eq!(cells[7], "180.0");
        assert_eq!(cells[11], "36.0", "Aura's CPU alone: {row}");
        assert_eq!(cells[12], "12.0", "Aura's RSS alone: {row}");
        let note = md
            .lines()
            .find(|l| l.starts_with("aura-valkey's store, valkey (a separate process): "))
            .unwrap();
        assert!(note.contains(": 8.0 ms CPU / 1000 req, "), "{note}");
        assert!(note.contains("peak RSS 9.0 MiB."), "{note}");
        assert!(note.contains("together: 44.0 ms"), "{note}");
        // Only the target with a store gets a note.
        assert_eq!(md.matches("(a separate process)").count(), 1);
        assert!(md.lines().any(|l| l.starts_with("| aura |")));
        assert!(md.lines().any(|l| l.starts_with("| direct (mock) |")));
    }

    #[test]
    fn both_auras_are_checked_against_nginx_on_their_own_cpu() {
        let checks = checks(&[run_b()], Some("io_uring"));
        let cpu: Vec<&Check> = checks
            .iter()
            .filter(|c| c.what.starts_with("(b) CPU"))
            .collect();
        assert_eq!(cpu.len(), 2);
        assert_eq!(cpu[0].proxy, "aura");
        assert_eq!(cpu[0].measured, "30.0 vs 40.0 ms/1000 req = 0.75×");
        assert_eq!(cpu[1].proxy, "aura-valkey");
        assert_eq!(
            cpu[1].measured,
            "36.0 vs 40.0 ms/1000 req = 0.90× (+ valkey 8.0 ms/1000 req, apart)"
        );
        assert_eq!(cpu[1].met, Some(true), "36 ≤ 40: the store is not added in");
        let rps: Vec<&Check> = checks
            .iter()
            .filter(|c| c.what.starts_with("(b) throughput"))
            .collect();
        assert_eq!(rps.len(), 2);
        assert_eq!(rps[1].proxy, "aura-valkey");
        assert_eq!(rps[1].met, Some(false), "1000 vs 1000 req/s is not 1.1×");
        let table = checks_table(&checks);
        assert!(table.starts_with("| target | proxy | measured (vs nginx) | met |"));
        assert!(table.contains("| (b) CPU per streamed request ≤ 1.0× nginx | aura-valkey | "));
    }

    #[test]
    fn the_default_driver_is_checked_against_epoll_and_epoll_against_nginx() {
        let mut r = run_b();
        r.outcomes
            .push(outcome("aura-epoll", 260, Some((25, 10)), None));
        r.outcomes
            .push(outcome("aura-plain", 260, Some((41, 10)), None));
        let on_epoll = checks(std::slice::from_ref(&r), Some("epoll"));
        let judged = on_epoll
            .iter()
            .find(|c| c.what == "(b) CPU per streamed request, io_uring ≤ 1.0× epoll")
            .unwrap();
        assert_eq!(
            judged.met, None,
            "aura on epoll is not io_uring: {}",
            judged.measured
        );
        assert!(judged.measured.ends_with("(aura ran on epoll: not judged)"));
        let checks = checks(&[r], Some("io_uring"));
        let vs_epoll: Vec<&Check> = checks
            .iter()
            .filter(|c| c.what == "(b) CPU per streamed request, io_uring ≤ 1.0× epoll")
            .collect();
        assert_eq!(vs_epoll.len(), 1);
        assert_eq!(vs_epoll[0].proxy, "aura");
        assert_eq!(
            vs_epoll[0].measured,
            "30.0 vs 25.0 ms/1000 req (aura-epoll) = 1.20×"
        );
        assert_eq!(vs_epoll[0].met, Some(false));
        // Every Aura, a variant too, is held to nginx's CPU.
        let vs_nginx: Vec<(&str, Option<bool>)> = checks
            .iter()
            .filter(|c| c.what == "(b) CPU per streamed request ≤ 1.0× nginx")
            .map(|c| (c.proxy, c.met))
            .collect();
        assert_eq!(
            vs_nginx,
            [
                ("aura", Some(true)),
                ("aura-valkey", Some(true)),
                ("aura-epoll", Some(true)),
                ("aura-plain", Some(false))
            ]
        );
    }

    #[test]
    fn without_aura_valkey_or_nginx_the_checks_leave_them_out() {
        let mut r = run_b();
        r.outcomes.retain(|o| o.target != "aura-valkey");
        let c = checks(std::slice::from_ref(&r), Some("io_uring"));
        assert!(c.iter().all(|c| c.proxy == "aura"));
        assert_eq!(c.len(), 2);
        assert!(!tables(&[r]).contains("(a separate process)"));
        let mut r = run_b();
        r.outcomes.retain(|o| o.target != "nginx");
        assert!(checks(&[r], Some("io_uring")).is_empty());
    }

    #[test]
    fn the_picture_draws_aura_valkey_in_its_own_colour() {
        let picture = svg(&[run_b()]);
        assert_eq!(picture.matches("<polyline").count(), 4);
        for name in ["direct", "nginx", "aura", "aura-valkey"] {
            assert!(picture.contains(&format!(">{name}</text>")), "{name}");
        }
        assert!(picture.contains(r##"stroke="#c0392b" stroke-width="2" points"##));
        // A target's colour does not depend on which others ran.
        let mut r = run_b();
        r.outcomes
            .retain(|o| o.target != "nginx" && o.target != "aura");
        let picture = svg(&[r]);
        assert_eq!(picture.matches("<polyline").count(), 2);
        assert!(picture.contains(r##"stroke="#c0392b" stroke-width="2" points"##));
        assert!(!picture.contains(r##"stroke="#2a9d3f" stroke-width="2" points"##));
    }
}
