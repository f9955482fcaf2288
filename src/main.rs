//! `aura`: CLI → config → runtime. The only place that exits the process.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use aura::config::{self, Config, LogFormat, ProcessEnv, SETTINGS};
use aura::mock::demo::Demo;
use aura::runtime;
use aura::upstream::Resolver;
use clap::{Arg, ArgAction, Command};

fn cli() -> Command {
    let mut cmd = Command::new("aura")
        .version(env!("CARGO_PKG_VERSION"))
        .about("OpenAI-compatible LLM gateway: streams through, captures usage in-stream")
        .after_help(
            "Precedence: defaults < --config FILE < environment < flags.\n\
             Environment names: PORT, UPSTREAM_URL, MOCK_UPSTREAM=true (same as --demo), AURA_<SETTING> for the rest.",
        )
        .arg(Arg::new("config").long("config").value_name("FILE").help("TOML file with any of the settings below (keys as the flag names with _)"))
        .arg(Arg::new("print-config").long("print-config").action(ArgAction::SetTrue).help("print the routing table (upstreams, their keys and settings, retries, health; secrets redacted) as TOML and exit"));
    // Made once: a reload parses the command line again.
    static FLAGS: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    let flags = FLAGS.get_or_init(|| {
        SETTINGS
            .iter()
            .map(|s| &*Box::leak(s.key.replace('_', "-").into_boxed_str()))
            .collect()
    });
    for (s, &flag) in SETTINGS.iter().zip(flags) {
        let env = s.env.join(", ");
        let help = format!("{} [env: {env}]", s.help);
        let arg = Arg::new(s.key).long(flag).help(help);
        cmd = cmd.arg(if s.key == "demo" {
            arg.action(ArgAction::SetTrue)
        } else {
            arg.value_name("VALUE")
        });
    }
    cmd
}

/// The configuration, and whether it is only to be printed (`--print-config`).
fn load() -> Result<(Config, bool), String> {
    let matches = cli().get_matches();
    let mut layers = Vec::new();
    let mut tables = config::Tables::default();
    if let Some(path) = matches.get_one::<String>("config") {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        layers.push(config::file_layer(&text).map_err(|e| e.to_string())?);
        tables = config::file_tables(&text, &ProcessEnv).map_err(|e| e.to_string())?;
    }
    layers.push(config::env_layer(&ProcessEnv));
    let mut flags = config::Layer::new();
    for s in SETTINGS {
        if s.key == "demo" {
            if matches.get_flag("demo") {
                flags.insert(s.key, "true".into());
            }
        } else if let Some(v) = matches.get_one::<String>(s.key) {
            flags.insert(s.key, v.clone());
        }
    }
    layers.push(flags);
    if !tables.upstreams.is_empty() {
        // One way to say where requests go: a URL given as well would be silently unused.
        if layers.iter().any(|l| l.contains_key("upstream_url")) {
            return Err(
                "invalid configuration:\n  upstream_url (the file's upstream_url, UPSTREAM_URL or --upstream-url) and [[upstreams]] are both set: give one (with [[upstreams]], each entry has its url)".into(),
            );
        }
    }
    let mut config = config::resolve(&layers).map_err(|e| e.to_string())?;
    config.budgets.keys = tables.keys;
    config.budgets.teams = tables.teams;
    config.budgets.prices = tables.prices;
    if config.demo && !tables.upstreams.is_empty() {
        return Err(
            "invalid configuration:\n  demo (--demo, AURA_DEMO or MOCK_UPSTREAM) serves its own upstream: turn it off, or leave [[upstreams]] out"
                .into(),
        );
    }
    config.upstreams = tables.upstreams;
    config.fallbacks = tables.fallbacks;
    config::credentials_stay_with_their_provider(&config)
        .map_err(|e| format!("invalid configuration:\n  {e}"))?;
    Ok((config, matches.get_flag("print-config")))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AURA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let mut config = match load() {
        Ok((config, false)) => config,
        Ok((config, true)) => {
            print!("{}", config::print::routing_table(&config));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("aura: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.log_format);
    // The demo's routing table stands for [[upstreams]]: a reload keeps it.
    let mut demo_routes = None;
    if config.demo {
        match Demo::start() {
            Ok(demo) => {
                config.upstreams = demo.routes();
                demo_routes = Some(config.upstreams.clone());
                tracing::info!(
                    healthy = %demo.healthy.addr,
                    flaky = %demo.flaky.addr,
                    "demo: built-in mock upstreams started; demo-flaky answers half its requests 503, and they go on to demo"
                );
                // The mocks live as long as the process.
                std::mem::forget(demo);
            }
            Err(e) => {
                eprintln!("aura: cannot start the demo upstreams: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let demo = config.demo;
    let resolvers = resolvers_of(&config, demo);
    let running = match runtime::start(&config, resolvers) {
        Ok(running) => running,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("aura: {e}");
            return ExitCode::FAILURE;
        }
    };
    let upstreams: Vec<String> = config
        .routes()
        .iter()
        .map(|u| format!("{}={}", u.name, u.url))
        .collect();
    let passthrough = config.budgets.key_mode == config::KeyMode::Passthrough;
    if config.upstreams.len() > 1 && passthrough && !config.demo {
        tracing::warn!(
            upstreams = upstreams.join(" "),
            "passthrough: each client's key goes to whichever upstream serves its model"
        );
    }
    tracing::info!(addr = %running.addr, upstreams = upstreams.join(" "), workers = running.workers.len(), "listening");
    // A reload reads the configuration as this start did: file, environment, flags.
    running.shared.set_source(
        Box::new(move || {
            let (mut config, _) = load()?;
            if let Some(routes) = &demo_routes {
                config.upstreams = routes.clone();
            }
            Ok(config)
        }),
        Box::new(move |host, port| resolver(host, port, demo)),
    );
    // A machine-readable line for scripts and tests; on stderr when stdout is the spend
    // record's (JSON lines only).
    if matches!(
        config.spend_record,
        Some(aura::spend_record::Target::Stdout)
    ) {
        eprintln!("aura listening on http://{}", running.addr);
    } else {
        println!("aura listening on http://{}", running.addr);
    }
    let mut wanted = STOP_SIGNALS.to_vec();
    wanted.extend_from_slice(IGNORED_SIGNALS);
    match signal_hook::iterator::Signals::new(&wanted) {
        Ok(mut signals) => {
            // Real-time signals end a process by default too. Each is taken where it can be:
            // some are the environment's own (valgrind keeps a few), and one refused must not
            // cost the handling of SIGTERM.
            for signal in libc::SIGRTMIN()..=libc::SIGRTMAX() {
                if signals.add_signal(signal).is_err() {
                    tracing::debug!(signal, "real-time signal not handled");
                }
            }
            for signal in signals.forever() {
                if STOP_SIGNALS.contains(&signal) {
                    tracing::info!(
                        signal,
                        "stopping: finishing requests in flight, then flushing spend"
                    );
                    break;
                }
                if signal == signal_hook::consts::SIGHUP {
                    // On a thread of its own: a slow reload (DNS, a file) must not hold a
                    // stop signal back. Logged and counted either way; reloads go one at a
                    // time, and a refused configuration changes nothing.
                    let shared = running.shared.clone();
                    let spawned = std::thread::Builder::new()
                        .name("aura-reload".into())
                        .spawn(move || {
                            let _ = shared.reload();
                        });
                    if let Err(e) = spawned {
                        tracing::error!(error = %e, "cannot start the reload");
                    }
                    continue;
                }
                log_ignored(signal);
            }
            // A second stop signal while stopping means now.
            std::thread::spawn(move || {
                for signal in signals.forever() {
                    if STOP_SIGNALS.contains(&signal) {
                        tracing::warn!(signal, "second signal: exiting without waiting");
                        #[allow(clippy::disallowed_methods)] // main.rs is the one place that exits
                        std::process::exit(130);
                    }
                    log_ignored(signal);
                }
            });
            running.stop();
            tracing::info!("stopped");
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot handle signals; running until killed");
            running.wait();
        }
    }
    ExitCode::SUCCESS
}

/// Signals that stop Aura the graceful way: requests in flight finish (up to the grace), spend
/// is flushed, leases are returned.
const STOP_SIGNALS: &[i32] = &[
    signal_hook::consts::SIGTERM,
    signal_hook::consts::SIGINT,
    signal_hook::consts::SIGQUIT,
];

/// Signals whose default action would end Aura at once (streams cut, spend in memory lost):
/// SIGHUP reloads the configuration; the others are logged and ignored.
const IGNORED_SIGNALS: &[i32] = &[
    signal_hook::consts::SIGHUP,
    signal_hook::consts::SIGUSR1,
    signal_hook::consts::SIGUSR2,
    signal_hook::consts::SIGALRM,
    signal_hook::consts::SIGVTALRM,
    signal_hook::consts::SIGPROF,
    signal_hook::consts::SIGIO,
    libc::SIGPWR,
    signal_hook::consts::SIGXCPU,
    signal_hook::consts::SIGXFSZ,
    libc::SIGSTKFLT,
];

fn log_ignored(signal: i32) {
    tracing::warn!(
        signal,
        "signal ignored (SIGTERM, SIGINT or SIGQUIT stop Aura; SIGHUP reloads its configuration)"
    );
}

/// The resolvers of `config`'s routes.
fn resolvers_of(config: &Config, demo: bool) -> Vec<Resolver> {
    config
        .routes()
        .iter()
        .map(|u| resolver(&u.url.host, u.url.port, demo))
        .collect()
}

/// The demo's mocks are on loopback at fixed ports; a real host is looked up now and kept
/// fresh by a thread of its own.
fn resolver(host: &str, port: u16, demo: bool) -> Resolver {
    if demo {
        Resolver::fixed(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
    } else {
        Resolver::start(host, port)
    }
}
