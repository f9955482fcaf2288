//! Turns a run into `results.md` (the tables and the targets, as ratios to nginx in the same run)
//! and `ttft.svg` (TTFT by percentile, one panel per scenario, one line per target), written by
//! hand so the harness needs no plotting crate.

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
            if let Some(e) = &o.first_error {
                let _ = writeln!(md, "\nfirst error from {}: `{e}`", o.target);
            }
        }
    }
    md
}

/// One target of the issue, checked against the run.
pub struct Check {
    pub what: &'static str,
    pub measured: String,
    pub met: Option<bool>,
}

/// The issue's targets, each as a ratio or difference to nginx in the same run.
pub fn checks(results: &[ScenarioResult]) -> Vec<Check> {
    let by_id = |id: &str| results.iter().find(|r| r.scenario.id == id);
    let mut out = Vec::new();
    if let Some(b) = by_id("b") {
        let cpu = |t| find(b, t).and_then(Outcome::cpu_ms_per_1000);
        if let (Some(a), Some(n)) = (cpu("aura"), cpu("nginx")) {
            out.push(Check {
                what: "(b) CPU per streamed request ≤ 1.0× nginx",
                measured: format!("{a:.1} vs {n:.1} ms/1000 req = {:.2}×", a / n),
                met: Some(a <= n),
            });
        }
        let rps = |t| find(b, t).map(Outcome::median_rps);
        if let (Some(a), Some(n)) = (rps("aura"), rps("nginx")) {
            out.push(Check {
                what: "(b) throughput at 64 clients ≥ 1.1× nginx",
                measured: format!("{a:.0} vs {n:.0} req/s = {:.2}×", a / n),
                met: Some(a >= 1.1 * n),
            });
        }
    }
    if let Some(a) = by_id("a") {
        if let (Some(x), Some(n)) = (overhead_us(a, "aura", 0.99), overhead_us(a, "nginx", 0.99)) {
            out.push(Check {
                what: "(a) TTFT overhead p99 at 1 client ≤ nginx + 20 µs",
                measured: format!("{x:.1} vs {n:.1} µs"),
                met: Some(x <= n + 20.0),
            });
        }
    }
    if let Some(c) = by_id("c") {
        if let (Some(x), Some(n)) = (overhead_us(c, "aura", 0.99), overhead_us(c, "nginx", 0.99)) {
            out.push(Check {
                what: "(c) TTFT overhead p99 at 256 clients ≤ 1.0× nginx",
                measured: format!("{x:.1} vs {n:.1} µs"),
                met: Some(x <= n.max(0.0)),
            });
        }
        let rss = |t| find(c, t).and_then(|o| o.peak_rss_kib);
        if let (Some(a), Some(n)) = (rss("aura"), rss("nginx")) {
            out.push(Check {
                what: "(c) peak RSS with 256 open streams ≤ 1.0× nginx",
                measured: format!(
                    "{:.1} vs {:.1} MiB = {:.2}×",
                    a as f64 / 1024.0,
                    n as f64 / 1024.0,
                    a as f64 / n as f64
                ),
                met: Some(a <= n),
            });
        }
    }
    out
}

pub fn checks_table(checks: &[Check]) -> String {
    let mut md = String::from("| target | measured (Aura vs nginx) | met |\n|---|---|---|\n");
    for c in checks {
        let met = match c.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        let _ = writeln!(md, "| {} | {} | {met} |", c.what, c.measured);
    }
    md
}

const PERCENTILES: [f64; 9] = [0.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.99];
const COLOURS: [&str; 4] = ["#888888", "#2a9d3f", "#1f5fbf", "#c0392b"];

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
            let colour = COLOURS[k % COLOURS.len()];
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
