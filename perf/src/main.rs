//! `aura-perf`: Aura's benchmark harness. `run` starts the perf mock, nginx, Aura (in-memory
//! store) on its default driver and on epoll, Aura with a Valkey store (a local valkey-server
//! or redis-server), and any `--variant`, on loopback; runs the scenarios against all of them in
//! alternating rounds, and writes the tables and the picture. `soak` runs scenario (d) against
//! Aura for a fixed time; `scaling` runs scenario (b) against Aura at several worker counts;
//! `mock` is the fast upstream itself (started by the others). `scripts/perf` is the one
//! command.

mod bench;
mod burst;
mod keys;
mod load;
mod procstat;
mod report;
mod soak;
mod targets;
mod upstream;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "aura-perf", about = "Aura's benchmark harness (loopback only)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve OpenAI-shaped streams as cheaply as possible (x-mock-chunks, x-mock-delay-ms).
    Mock {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Scenarios (a) to (d) against the mock directly, nginx, Aura (default driver and epoll),
    /// Aura with Valkey and any variants, in the same run.
    Run {
        #[command(flatten)]
        common: Common,
        /// Path of nginx (Debian's: /usr/sbin/nginx).
        #[arg(long, default_value = "nginx")]
        nginx: String,
        /// Which targets, of direct, nginx, aura, aura-epoll, aura-valkey (e.g. `nginx,aura`);
        /// the direct run, every overhead's baseline, is always made. Default: all of them,
        /// aura-valkey only when a Valkey server is found (else it is skipped with a note).
        #[arg(long, value_delimiter = ',')]
        targets: Option<Vec<String>>,
        /// An extra Aura for an experiment, `NAME[@BINARY]=FLAGS` (e.g.
        /// `aura-plain=--io-uring-setup none`, or `aura-before@/tmp/aura-old=` for a build
        /// before a change), measured in the same rounds; repeatable.
        #[arg(long = "variant")]
        variants: Vec<String>,
        /// The Valkey server behind aura-valkey (default: valkey-server, else redis-server, on
        /// PATH or in /usr/bin; Debian's redis-server 7.0 is wire-compatible).
        #[arg(long)]
        valkey_server: Option<String>,
        /// Rounds; the target order rotates each round.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Which scenarios, e.g. `a,c`.
        #[arg(long, default_value = "a,b,c,d", value_delimiter = ',')]
        scenarios: Vec<String>,
    },
    /// One scenario's load against any loopback address (for profiling a running proxy).
    Load {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "b")]
        scenario: String,
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        #[arg(long, default_value_t = 1)]
        load_threads: usize,
    },
    /// What a distinct API key costs in memory: the in-memory store in this process, and a
    /// Valkey server's accounts.
    Keys {
        /// Distinct keys fed to the in-memory store (a tenth of it to Valkey).
        #[arg(long, default_value_t = 1_000_000)]
        count: usize,
        #[arg(long)]
        valkey_server: Option<String>,
        #[arg(long, default_value = "perf/out")]
        out: PathBuf,
    },
    /// Aura's resident memory under a burst of large non-streaming JSON answers.
    JsonBurst {
        #[arg(long, default_value = "target/release/aura")]
        aura: PathBuf,
        #[arg(long, default_value_t = 40)]
        answers: usize,
        #[arg(long, default_value_t = 7)]
        answer_mib: usize,
    },
    /// Scenario (d) against Aura again and again for `--minutes`: its CPU per request, RSS and
    /// open file descriptors after every cycle, and whether they grew.
    Soak {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
    },
    /// Scenario (b) against Aura alone at each worker count, pinned: requests/s per worker.
    Scaling {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value = "1,2,4,8", value_delimiter = ',')]
        workers_list: Vec<usize>,
    },
}

#[derive(Args)]
struct Common {
    /// The Aura binary to measure.
    #[arg(long, default_value = "target/release/aura")]
    aura: PathBuf,
    /// Workers for Aura and nginx alike (default: the cores this process may use).
    #[arg(long)]
    workers: Option<usize>,
    /// Pin Aura's workers to cores (off by default here: on a small shared machine the load
    /// generator and the mock share the cores, and nginx does not pin either).
    #[arg(long, default_value_t = false)]
    pin: bool,
    /// Run the proxies (Aura, and nginx in `run`) under `taskset -c CPUS` (e.g. `0-7`), to keep
    /// them off the cores of the load generator and the mock (run the harness itself under
    /// `taskset` on the others). aura-valkey's Valkey server runs on these CPUs too, sharing
    /// them with Aura.
    #[arg(long)]
    proxy_cpus: Option<String>,
    #[arg(long, default_value_t = 1)]
    mock_threads: usize,
    #[arg(long, default_value_t = 1)]
    load_threads: usize,
    /// Multiplies every request count (0.1 for a smoke run).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Where results.md, ttft.svg and nginx's prefix go.
    #[arg(long, default_value = "perf/out")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Mock { listen, threads } => serve_mock(listen, threads),
        Cmd::Run {
            common,
            nginx,
            targets,
            variants,
            valkey_server,
            rounds,
            scenarios,
        } => run(
            &common,
            &nginx,
            targets.as_deref(),
            &variants,
            valkey_server.as_deref(),
            rounds,
            &scenarios,
        ),
        Cmd::Load {
            target,
            scenario,
            scale,
            load_threads,
        } => load_only(target, &scenario, scale, load_threads),
        Cmd::Scaling {
            common,
            workers_list,
        } => scaling(&common, &workers_list),
        Cmd::Soak { common, minutes } => soak(&common, minutes),
        Cmd::JsonBurst {
            aura,
            answers,
            answer_mib,
        } => burst::run(&aura, answers, answer_mib).map(|report| print!("{report}")),
        Cmd::Keys {
            count,
            valkey_server,
            out,
        } => targets::find_valkey_server(valkey_server.as_deref())
            .map_or_else(
                || keys::run(count, None, &out.join("keys")),
                |server| keys::run(count, Some(&server), &out.join("keys")),
            )
            .map(|report| print!("{report}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aura-perf: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve_mock(listen: SocketAddr, threads: usize) -> std::io::Result<()> {
    if !listen.ip().is_loopback() {
        return Err(std::io::Error::other(
            "the perf mock listens on loopback only",
        ));
    }
    let addr = upstream::start(listen, threads.max(1))?;
    println!("perf mock listening on {addr}");
    loop {
        std::thread::park();
    }
}

fn load_only(target: SocketAddr, id: &str, scale: f64, threads: usize) -> std::io::Result<()> {
    if !target.ip().is_loopback() {
        return Err(std::io::Error::other(
            "load goes to loopback addresses only",
        ));
    }
    let s = bench::scenarios(scale)
        .into_iter()
        .find(|s| s.id == id)
        .ok_or_else(|| std::io::Error::other(format!("no scenario `{id}`")))?;
    let r = load::run(&s.load(target, threads))?;
    println!("({}) {}", s.id, r.summary());
    Ok(())
}

fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn run(
    common: &Common,
    nginx: &str,
    asked: Option<&[String]>,
    variants: &[String],
    valkey_server: Option<&str>,
    rounds: usize,
    ids: &[String],
) -> std::io::Result<()> {
    let variants = variants
        .iter()
        .map(|v| targets::parse_variant(v))
        .collect::<Result<Vec<_>, _>>()
        .map_err(std::io::Error::other)?;
    for (i, v) in variants.iter().enumerate() {
        if variants[..i].iter().any(|w| w.name == v.name) {
            return Err(std::io::Error::other(format!(
                "--variant {}: the name is given twice",
                v.name
            )));
        }
    }
    use targets::Kind;
    let workers = common.workers.unwrap_or_else(default_workers);
    let all = bench::scenarios(common.scale);
    let chosen: Vec<_> = all
        .into_iter()
        .filter(|s| ids.iter().any(|id| id == s.id))
        .collect();
    let server = targets::find_valkey_server(valkey_server);
    if let (Some(given), None) = (valkey_server, &server) {
        return Err(std::io::Error::other(format!(
            "--valkey-server {given}: no such executable"
        )));
    }
    let (kinds, note) =
        targets::select_targets(asked, server.is_some()).map_err(std::io::Error::other)?;
    if let Some(note) = &note {
        eprintln!("aura-perf: {note}");
    }
    std::fs::create_dir_all(&common.out)?;
    let cpus = common.proxy_cpus.as_deref();
    let mock = targets::mock(common.mock_threads)?;
    let nginx_target = kinds
        .contains(&Kind::Nginx)
        .then(|| {
            targets::nginx(
                nginx,
                &targets::perf_dir().join("nginx.conf.template"),
                &common.out.join("nginx"),
                mock.addr,
                workers,
                cpus,
            )
        })
        .transpose()?;
    let aura = kinds
        .contains(&Kind::Aura)
        .then(|| targets::aura(&common.aura, mock.addr, workers, common.pin, cpus))
        .transpose()?;
    let aura_epoll = kinds
        .contains(&Kind::AuraEpoll)
        .then(|| {
            targets::aura_with(
                Kind::AuraEpoll.name(),
                &common.aura,
                mock.addr,
                workers,
                common.pin,
                cpus,
                &["--io-driver".into(), "epoll".into()],
            )
        })
        .transpose()?;
    let variant_targets = variants
        .iter()
        .map(|v| {
            let bin = v.binary.as_deref().unwrap_or(&common.aura);
            targets::aura_with(v.name, bin, mock.addr, workers, common.pin, cpus, &v.flags)
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let valkey = match (&server, kinds.contains(&Kind::AuraValkey)) {
        (Some(server), true) => Some((
            server.clone(),
            targets::aura_valkey(
                &common.aura,
                server,
                &common.out.join("aura-valkey"),
                mock.addr,
                workers,
                common.pin,
                cpus,
            )?,
        )),
        _ => None,
    };
    let running: Vec<&targets::Target> = std::iter::once(&mock)
        .chain(nginx_target.as_ref())
        .chain(aura.as_ref())
        .chain(aura_epoll.as_ref())
        .chain(&variant_targets)
        .chain(valkey.as_ref().map(|(_, t)| t))
        .collect();
    let mut started = String::new();
    for t in &running {
        let _ = write!(started, "{} {} · ", t.name, t.addr);
        if let Some(store) = t.store() {
            let _ = write!(started, "its {} {} · ", store.name, store.addr);
        }
    }
    eprintln!("{started}{workers} workers each · {rounds} rounds");
    // The driver each Aura's workers run on, as it reports it: what was measured.
    let mut drivers = String::new();
    let mut aura_driver = None;
    for t in running.iter().filter(|t| t.name.starts_with("aura")) {
        let workers = targets::aura_drivers(t.addr)?;
        let _ = write!(drivers, "{}: {}; ", t.name, workers.join(", "));
        if t.name == Kind::Aura.name() {
            aura_driver = workers
                .first()
                .cloned()
                .filter(|d| workers.iter().all(|w| w == d));
        }
    }
    let mut results = Vec::new();
    for s in &chosen {
        eprintln!("scenario ({}) {}", s.id, s.title);
        results.push(bench::run_scenario(
            s,
            &running,
            rounds,
            common.load_threads,
        )?);
    }
    let checks = report::checks(&results, aura_driver.as_deref());
    let mut md = String::new();
    let nginx_ran = nginx_target.is_some().then_some(nginx);
    let valkey_ran = valkey.as_ref().map(|(path, _)| path.as_path());
    let _ = writeln!(
        md,
        "{}",
        environment(common, workers, nginx_ran, valkey_ran, note.as_deref())
    );
    if !drivers.is_empty() {
        let _ = writeln!(
            md,
            "- workers' I/O driver, as each Aura reports it: {}",
            drivers.trim_end_matches("; ")
        );
    }
    let _ = writeln!(md, "\n### Targets\n\n{}", report::checks_table(&checks));
    md.push_str(&report::tables(&results));
    std::fs::write(common.out.join("results.md"), &md)?;
    std::fs::write(common.out.join("ttft.svg"), report::svg(&results))?;
    println!("{md}");
    eprintln!("wrote {}/results.md and ttft.svg", common.out.display());
    Ok(())
}

fn soak(common: &Common, minutes: f64) -> std::io::Result<()> {
    if !(minutes.is_finite() && minutes > 0.0 && minutes <= 24.0 * 60.0) {
        return Err(std::io::Error::other("--minutes must be within (0, 1440]"));
    }
    std::fs::create_dir_all(&common.out)?;
    let workers = common.workers.unwrap_or_else(default_workers);
    let scenario = bench::scenarios(common.scale)
        .into_iter()
        .find(|s| s.id == "d")
        .ok_or_else(|| std::io::Error::other("scenario (d) is missing"))?;
    let mock = targets::mock(common.mock_threads)?;
    let aura = targets::aura(
        &common.aura,
        mock.addr,
        workers,
        common.pin,
        common.proxy_cpus.as_deref(),
    )?;
    eprintln!(
        "soak: ({}) {} against aura {} for {minutes} min",
        scenario.id, scenario.title, aura.addr
    );
    let cycles = soak::run(
        &scenario,
        &aura,
        std::time::Duration::from_secs_f64(minutes * 60.0),
        common.load_threads,
    )?;
    let mut md = environment(common, workers, None, None, None);
    let _ = writeln!(md);
    md.push_str(&soak::report(&scenario, aura.name, &cycles));
    std::fs::write(common.out.join("soak.md"), &md)?;
    println!("{md}");
    eprintln!("wrote {}/soak.md", common.out.display());
    Ok(())
}

fn scaling(common: &Common, workers_list: &[usize]) -> std::io::Result<()> {
    std::fs::create_dir_all(&common.out)?;
    let scenario = bench::scenarios(common.scale)
        .into_iter()
        .find(|s| s.id == "b")
        .ok_or_else(|| std::io::Error::other("scenario (b) is missing"))?;
    let mock = targets::mock(common.mock_threads)?;
    let mut md = environment(common, 0, None, None, None);
    let _ = writeln!(
        md,
        "\n### Scaling: scenario (b) {}, Aura alone\n",
        scenario.title
    );
    md.push_str("| workers | req/s (median of 3) | req/s per worker | scaling vs 1 worker | TTFT p99 µs | CPU ms / 1000 req |\n|---:|---:|---:|---:|---:|---:|\n");
    let mut base = None;
    for &w in workers_list {
        let aura = targets::aura(
            &common.aura,
            mock.addr,
            w,
            common.pin,
            common.proxy_cpus.as_deref(),
        )?;
        let r = bench::run_scenario(&scenario, &[&mock, &aura], 3, common.load_threads)?;
        let Some(o) = r.outcomes.get(1) else { continue };
        let rps = o.median_rps();
        let base_rps = *base.get_or_insert(rps);
        let _ = writeln!(
            md,
            "| {w} | {rps:.0} | {:.0} | {:.2}× | {:.1} | {} |",
            rps / w as f64,
            rps / base_rps,
            o.ttft_ns.value_at_quantile(0.99) as f64 / 1e3,
            o.cpu_ms_per_1000()
                .map_or("—".into(), |c| format!("{c:.1}")),
        );
    }
    std::fs::write(common.out.join("scaling.md"), &md)?;
    println!("{md}");
    Ok(())
}

/// Machine, kernel, versions and the command, for the top of a results file; with `valkey`, the
/// Valkey server behind aura-valkey and how its cost is counted; `skipped`, a target left out.
fn environment(
    common: &Common,
    workers: usize,
    nginx: Option<&str>,
    valkey: Option<&std::path::Path>,
    skipped: Option<&str>,
) -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let output = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .map(|o| {
                let text = if o.stdout.is_empty() {
                    o.stderr
                } else {
                    o.stdout
                };
                String::from_utf8_lossy(&text).trim().to_string()
            })
            .unwrap_or_else(|e| format!("unavailable ({e})"))
    };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "- date: {}",
        output("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
    );
    let _ = writeln!(
        md,
        "- machine: {} cores available, {cpu}",
        default_workers()
    );
    let _ = writeln!(
        md,
        "- kernel: {}",
        read("/proc/sys/kernel/osrelease").trim()
    );
    let _ = writeln!(
        md,
        "- aura: {} (git {})",
        output(&common.aura.display().to_string(), &["--version"]),
        output("git", &["rev-parse", "--short", "HEAD"])
    );
    if let Some(nginx) = nginx {
        let _ = writeln!(md, "- nginx: {}", output(nginx, &["-v"]));
    }
    if let Some(server) = valkey {
        let _ = writeln!(
            md,
            "- valkey (aura-valkey's store): {} ({}), on 127.0.0.1 with no persistence \
             (`--save \"\" --appendonly no`); its CPU and RSS are reported in a note under each \
             table, not in aura-valkey's columns, which are Aura's alone{}",
            output(&server.display().to_string(), &["--version"]),
            server.display(),
            match &common.proxy_cpus {
                Some(cpus) => format!(
                    "; pinned with Aura to the proxy CPUs {cpus} (taskset), where it competes \
                     with Aura for them"
                ),
                None => String::new(),
            }
        );
    }
    if let Some(skipped) = skipped {
        let _ = writeln!(md, "- {skipped}");
    }
    let _ = writeln!(md, "- rustc: {}", output("rustc", &["-V"]));
    if workers > 0 {
        let _ = writeln!(
            md,
            "- workers: {workers} for each Aura and nginx; Aura pinned: {}",
            common.pin
        );
    }
    let _ = writeln!(
        md,
        "- mock threads {}, load generator threads {}, request scale {}",
        common.mock_threads, common.load_threads, common.scale
    );
    let args: Vec<String> = std::env::args().collect();
    let _ = writeln!(md, "- command: `{}`", args.join(" "));
    md
}
