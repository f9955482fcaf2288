//! Configuration: defaults in code < TOML file (`--config`) < environment < CLI flags.
//! One table (`SETTINGS`) names every setting once: its TOML key, its environment variable and
//! its help text; the CLI, the file and the environment are all read through it. The process
//! environment is read through [`Source`] so tests pass a map. Validation reports every error.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::pricing::{self, Price};
use crate::runtime::io_driver::{IoDriver, IoSettings, RingFlags};

pub mod governance;
pub mod print;
pub mod tables;
pub mod upstreams;

use crate::upstream::health::HealthRules;
pub use tables::{KeyEntry, PriceEntry, Secret, Tables};
pub use upstreams::{UpstreamEntry, UpstreamKind, MAX_UPSTREAMS};

/// Where environment-style settings come from (the process environment, or a map in tests).
pub trait Source {
    fn get(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Source for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Source for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

pub struct Setting {
    /// TOML key; the CLI flag is the same with `-` for `_`.
    pub key: &'static str,
    /// Environment variables, first match wins (the original Aura's names are kept).
    pub env: &'static [&'static str],
    pub help: &'static str,
}

pub const PORT: &str = "PORT";
pub const UPSTREAM_URL: &str = "UPSTREAM_URL";
pub const MOCK_UPSTREAM: &str = "MOCK_UPSTREAM";
pub const LISTEN_ADDR: &str = "AURA_LISTEN_ADDR";
pub const ADMIN_LISTEN: &str = "AURA_ADMIN_LISTEN";
pub const WORKERS: &str = "AURA_WORKERS";
pub const PIN_WORKERS: &str = "AURA_PIN_WORKERS";
pub const DEMO: &str = "AURA_DEMO";
pub const MAX_HEAD_BYTES: &str = "AURA_MAX_HEAD_BYTES";
pub const MAX_HEADERS: &str = "AURA_MAX_HEADERS";
pub const MAX_BODY_BYTES: &str = "AURA_MAX_BODY_BYTES";
pub const CLIENT_HEAD_TIMEOUT_MS: &str = "AURA_CLIENT_HEAD_TIMEOUT_MS";
pub const IDLE_TIMEOUT_MS: &str = "AURA_IDLE_TIMEOUT_MS";
pub const CLIENT_SEND_TIMEOUT_MS: &str = "AURA_CLIENT_SEND_TIMEOUT_MS";
pub const UPSTREAM_CONNECT_TIMEOUT_MS: &str = "AURA_UPSTREAM_CONNECT_TIMEOUT_MS";
pub const UPSTREAM_FIRST_BYTE_TIMEOUT_MS: &str = "AURA_UPSTREAM_FIRST_BYTE_TIMEOUT_MS";
pub const UPSTREAM_READ_TIMEOUT_MS: &str = "AURA_UPSTREAM_READ_TIMEOUT_MS";
pub const UPSTREAM_POOL_MAX_IDLE: &str = "AURA_UPSTREAM_POOL_MAX_IDLE";
pub const UPSTREAM_CA_FILE: &str = "AURA_UPSTREAM_CA_FILE";
pub const INJECT_STREAM_USAGE: &str = "AURA_INJECT_STREAM_USAGE";
pub const UPSTREAM_MAX_ATTEMPTS: &str = "AURA_UPSTREAM_MAX_ATTEMPTS";
pub const UPSTREAM_TOTAL_TIMEOUT_MS: &str = "AURA_UPSTREAM_TOTAL_TIMEOUT_MS";
pub const UPSTREAM_EJECT_AFTER_FAILURES: &str = "AURA_UPSTREAM_EJECT_AFTER_FAILURES";
pub const UPSTREAM_EJECT_MS: &str = "AURA_UPSTREAM_EJECT_MS";
pub const LOG_FORMAT: &str = "AURA_LOG_FORMAT";
pub const DEFAULT_LIMIT_DOLLARS: &str = "AURA_DEFAULT_LIMIT_DOLLARS";
pub const PRICE_FILE: &str = "AURA_PRICE_FILE";
pub const UNKNOWN_MODEL_INPUT_DOLLARS_PER_MILLION: &str =
    "AURA_UNKNOWN_MODEL_INPUT_DOLLARS_PER_MILLION";
pub const UNKNOWN_MODEL_OUTPUT_DOLLARS_PER_MILLION: &str =
    "AURA_UNKNOWN_MODEL_OUTPUT_DOLLARS_PER_MILLION";
pub const DEFAULT_MAX_OUTPUT_TOKENS: &str = "AURA_DEFAULT_MAX_OUTPUT_TOKENS";
pub const BUDGET_FLUSH_INTERVAL_MS: &str = "AURA_BUDGET_FLUSH_INTERVAL_MS";
pub const KEY_MODE: &str = "AURA_KEY_MODE";
pub const MAX_DRAINS_PER_WORKER: &str = "AURA_MAX_DRAINS_PER_WORKER";
pub const ADMIN_TOKEN: &str = "AURA_ADMIN_TOKEN";
pub const BUDGET_PERIOD: &str = "AURA_BUDGET_PERIOD";
pub const STORE: &str = "AURA_STORE";
pub const VALKEY_URL: &str = "AURA_VALKEY_URL";
pub const VALKEY_CA_FILE: &str = "AURA_VALKEY_CA_FILE";
pub const STORE_FAILURE: &str = "AURA_STORE_FAILURE";
pub const STORE_TIMEOUT_MS: &str = "AURA_STORE_TIMEOUT_MS";
pub const NODE_ID: &str = "AURA_NODE_ID";
pub const LEDGER_JOURNAL: &str = "AURA_LEDGER_JOURNAL";
pub const JOURNAL_DIR: &str = "AURA_JOURNAL_DIR";
pub const KEY_STATE_FILE: &str = "AURA_KEY_STATE_FILE";
pub const SPEND_RECORD: &str = "AURA_SPEND_RECORD";
pub const SPEND_RECORD_MAX_BYTES: &str = "AURA_SPEND_RECORD_MAX_BYTES";
pub const SPEND_RECORD_FILES: &str = "AURA_SPEND_RECORD_FILES";
pub const ALLOW_UNPRICED_ROUTES: &str = "AURA_ALLOW_UNPRICED_ROUTES";
pub const MAX_USAGE_TOKENS: &str = "AURA_MAX_USAGE_TOKENS";
pub const JOURNAL_FSYNC_INTERVAL_MS: &str = "AURA_JOURNAL_FSYNC_INTERVAL_MS";
pub const SHUTDOWN_GRACE_MS: &str = "AURA_SHUTDOWN_GRACE_MS";
pub const IO_DRIVER: &str = "AURA_IO_DRIVER";
pub const IO_URING_SETUP: &str = "AURA_IO_URING_SETUP";
pub const IO_URING_ENTRIES: &str = "AURA_IO_URING_ENTRIES";

pub const SETTINGS: &[Setting] = &[
    Setting { key: "port", env: &[PORT], help: "TCP port to listen on [default: 8080]" },
    Setting { key: "listen_addr", env: &[LISTEN_ADDR], help: "address to listen on [default: 0.0.0.0]" },
    Setting { key: "admin_listen", env: &[ADMIN_LISTEN], help: "address:port of a separate listener for /metrics and the admin API (e.g. 127.0.0.1:9091); set, the data-plane port no longer answers them [default: none]" },
    Setting {
        key: "upstream_url",
        env: &[UPSTREAM_URL],
        help: "upstream API base, e.g. https://api.openai.com/v1 (a full .../chat/completions URL is accepted) [default: https://api.openai.com/v1]",
    },
    Setting { key: "demo", env: &[DEMO, MOCK_UPSTREAM], help: "also start the built-in mock upstream and relay to it (no internet needed) [default: false]" },
    Setting { key: "workers", env: &[WORKERS], help: "worker threads, one monoio runtime each [default: the CPUs Aura may use]" },
    Setting { key: "pin_workers", env: &[PIN_WORKERS], help: "pin each worker to a core; turn off where cores are shared with busy processes [default: true]" },
    Setting { key: "io_driver", env: &[IO_DRIVER], help: "auto, io_uring or epoll: what the workers wait on; auto and io_uring use io_uring where the kernel allows it and epoll where it refuses (seccomp, old kernels) [default: auto]" },
    Setting { key: "io_uring_setup", env: &[IO_URING_SETUP], help: "auto, none, or io_uring setup flags separated by commas (coop_taskrun, taskrun_flag, single_issuer, defer_taskrun); each is probed at start and dropped, with a warning, where the kernel refuses it [default: auto]" },
    Setting { key: "io_uring_entries", env: &[IO_URING_ENTRIES], help: "submission queue entries of each worker's io_uring [default: 1024]" },
    Setting { key: "max_head_bytes", env: &[MAX_HEAD_BYTES], help: "largest request head accepted [default: 65536]" },
    Setting { key: "max_headers", env: &[MAX_HEADERS], help: "most headers accepted in a request or response head [default: 100]" },
    Setting { key: "max_body_bytes", env: &[MAX_BODY_BYTES], help: "largest request body accepted [default: 33554432]" },
    Setting { key: "client_head_timeout_ms", env: &[CLIENT_HEAD_TIMEOUT_MS], help: "time a client has to send a whole request from its first byte: the head, and the body, which gets this plus its length at 16 KiB/s [default: 10000]" },
    Setting { key: "idle_timeout_ms", env: &[IDLE_TIMEOUT_MS], help: "keep-alive client connection idle timeout [default: 60000]" },
    Setting { key: "client_send_timeout_ms", env: &[CLIENT_SEND_TIMEOUT_MS], help: "longest a client may leave a write to it unaccepted (a client that stops reading is cut; its stream is still read for its usage) [default: 60000]" },
    Setting { key: "upstream_connect_timeout_ms", env: &[UPSTREAM_CONNECT_TIMEOUT_MS], help: "upstream TCP+TLS connect timeout [default: 5000]" },
    Setting { key: "upstream_first_byte_timeout_ms", env: &[UPSTREAM_FIRST_BYTE_TIMEOUT_MS], help: "time from sending a request to the upstream's first response byte [default: 300000]" },
    Setting { key: "upstream_read_timeout_ms", env: &[UPSTREAM_READ_TIMEOUT_MS], help: "longest silence between two upstream reads mid-response [default: 300000]" },
    Setting { key: "upstream_pool_max_idle", env: &[UPSTREAM_POOL_MAX_IDLE], help: "idle keep-alive upstream connections kept per worker [default: 256]" },
    Setting { key: "upstream_ca_file", env: &[UPSTREAM_CA_FILE], help: "PEM file of extra CA certificates trusted for an https upstream [default: none]" },
    Setting { key: "upstream_max_attempts", env: &[UPSTREAM_MAX_ATTEMPTS], help: "upstreams a request may try before its answer starts: on a connect or TLS failure, a timeout or reset before the response head, or a 429/500/502/503/504/529, the next upstream serving its model (never the same one twice) is tried; 1 turns retries off [default: 3]" },
    Setting { key: "upstream_total_timeout_ms", env: &[UPSTREAM_TOTAL_TIMEOUT_MS], help: "longest time from a request's arrival to an upstream's response head, all attempts together; each attempt's connect, write and first-byte waits are cut to what is left [default: none: each attempt is bounded by its own timeouts]" },
    Setting { key: "upstream_eject_after_failures", env: &[UPSTREAM_EJECT_AFTER_FAILURES], help: "consecutive failures that eject an upstream from a worker's choices for a rest (5 s, doubling while it keeps failing, at most 5 min); it comes back on a trial request [default: 3]" },
    Setting { key: "upstream_eject_ms", env: &[UPSTREAM_EJECT_MS], help: "the first rest of an ejected upstream or a refused pool key [default: 5000]" },
    Setting { key: "inject_stream_usage", env: &[INJECT_STREAM_USAGE], help: "add stream_options.include_usage to streaming requests; off for upstreams that reject it [default: true]" },
    Setting { key: "log_format", env: &[LOG_FORMAT], help: "text or json [default: text]" },
    Setting { key: "default_limit_dollars", env: &[DEFAULT_LIMIT_DOLLARS], help: "spend limit of every API key, in dollars [default: 10.00]" },
    Setting { key: "price_file", env: &[PRICE_FILE], help: "model prices in LiteLLM's model_prices_and_context_window.json format, added to the built-in table [default: none]" },
    Setting { key: "unknown_model_input_dollars_per_million", env: &[UNKNOWN_MODEL_INPUT_DOLLARS_PER_MILLION], help: "price of prompt tokens of a model with no price [default: 5.00]" },
    Setting { key: "unknown_model_output_dollars_per_million", env: &[UNKNOWN_MODEL_OUTPUT_DOLLARS_PER_MILLION], help: "price of completion tokens of a model with no price [default: 15.00]" },
    Setting { key: "default_max_output_tokens", env: &[DEFAULT_MAX_OUTPUT_TOKENS], help: "completion tokens reserved for a request that sets no max_tokens, for a model with no known output limit [default: 4096]" },
    Setting { key: "key_mode", env: &[KEY_MODE], help: "passthrough: the client's key goes upstream and is its budget identity; virtual: only keys of the [keys] table are accepted, each sent upstream as its upstream_key [default: passthrough]" },
    Setting { key: "max_usage_tokens", env: &[MAX_USAGE_TOKENS], help: "the most prompt or completion tokens an upstream may report for one request; beyond it, or beyond the model's context window or output limit, the usage is not believed and the request is billed its reservation [default: 10000000]" },
    Setting { key: "allow_unpriced_routes", env: &[ALLOW_UNPRICED_ROUTES], help: "forward, for virtual keys too, routes that cost money Aura cannot price (batches, fine-tuning, assistant runs, realtime sessions, vector stores, unknown POST routes); they are never billed [default: false]" },
    Setting { key: "admin_token", env: &[ADMIN_TOKEN], help: "bearer token of the /admin/keys API; unset, the admin API is off [default: none]" },
    Setting { key: "budget_period", env: &[BUDGET_PERIOD], help: "none, daily or monthly: spend resets at the start of each UTC day or month [default: none]" },
    Setting { key: "max_drains_per_worker", env: &[MAX_DRAINS_PER_WORKER], help: "responses a worker keeps reading after their client left, to bill their usage; past it, a left response is billed its whole reservation [default: 64]" },
    Setting { key: "budget_flush_interval_ms", env: &[BUDGET_FLUSH_INTERVAL_MS], help: "how often each worker flushes settled spend to the budget store [default: 50]" },
    Setting { key: "store", env: &[STORE], help: "where budgets live: memory (this node only) or valkey (a fleet sharing one Valkey/Redis) [default: memory]" },
    Setting { key: "valkey_url", env: &[VALKEY_URL], help: "the Valkey or Redis server of the valkey store (any node of a cluster), redis://[user:password@]host:port/[db], or rediss:// for TLS [default: redis://127.0.0.1:6379/]" },
    Setting { key: "valkey_ca_file", env: &[VALKEY_CA_FILE], help: "PEM file of the CA certificates trusted for a rediss:// valkey_url, instead of the system's [default: none]" },
    Setting { key: "store_failure", env: &[STORE_FAILURE], help: "with the store unreachable: open admits on the leases in hand, then on the last known spend; closed answers 503 once a key's lease is spent [default: open]" },
    Setting { key: "store_timeout_ms", env: &[STORE_TIMEOUT_MS], help: "longest wait for the valkey store: connect, each call, and a request waiting for a lease [default: 500]" },
    Setting { key: "node_id", env: &[NODE_ID], help: "this node's name in the valkey store (leases and exactly-once sequences are kept per node and worker); unique per node, stable across restarts [default: the host name]" },
    Setting { key: "journal_dir", env: &[JOURNAL_DIR], help: "directory of the journal: every settled cost is written there before it can be lost to a kill, until the valkey store has it; replayed at the next start; locked by one Aura at a time [default: /var/lib/aura where writable, else $XDG_STATE_HOME/aura or ~/.local/state/aura]" },
    Setting { key: "journal_fsync_interval_ms", env: &[JOURNAL_FSYNC_INTERVAL_MS], help: "how often the journal is flushed to disk: a power loss (not a kill) can lose at most this much settled spend [default: 1000]" },
    Setting { key: "ledger_journal", env: &[LEDGER_JOURNAL], help: "the journal file of an Aura from before journal_dir: replayed once at start (spend it kept when it stopped without the store), then deleted [default: aura-ledger.journal, where it exists]" },
    Setting { key: "key_state_file", env: &[KEY_STATE_FILE], help: "with the memory store: the file keeping the keys the admin API makes (hashes of their secrets, never the secrets), read at start; one Aura at a time [default: with an admin_token, keys.json in the journal's default directory; without, none]" },
    Setting { key: "spend_record", env: &[SPEND_RECORD], help: "one JSON line per settled request (key, team, models, upstream, tokens, cost, TTFT, status): an absolute file path, or stdout [default: none]" },
    Setting { key: "spend_record_max_bytes", env: &[SPEND_RECORD_MAX_BYTES], help: "a spend record file past this size is rotated (spend.jsonl to spend.jsonl.1, and so on) [default: 104857600]" },
    Setting { key: "spend_record_files", env: &[SPEND_RECORD_FILES], help: "rotated spend record files kept beside the current one [default: 5]" },
    Setting { key: "shutdown_grace_ms", env: &[SHUTDOWN_GRACE_MS], help: "on SIGTERM or SIGINT, how long requests in flight may take to finish before spend is flushed and Aura exits (a request cut then is billed its reservation) [default: 20000]" },
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

/// The upstream base URL, split once at startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// Path prefix that replaces the client's `/v1`, without a trailing slash (e.g. `/v1`).
    pub base_path: String,
}

impl Config {
    /// The upstreams requests are routed to, in config order: the `[[upstreams]]`, or
    /// `upstream_url` alone serving every model.
    pub fn routes(&self) -> Vec<UpstreamEntry> {
        if !self.upstreams.is_empty() {
            return self.upstreams.clone();
        }
        vec![UpstreamEntry::single("default", self.upstream.clone())]
    }
}

/// Where provider keys may go. An upstream's own keys need virtual keys: in passthrough mode
/// any bearer string is a budget identity, so anyone could spend them. A virtual key's
/// `upstream_key` (the operator's provider key) goes to every upstream without keys of its
/// own: refused where those are on more than one host.
pub fn credentials_stay_with_their_provider(config: &Config) -> Result<(), String> {
    let virtual_keys = config.budgets.key_mode == KeyMode::Virtual;
    let keyed: Vec<&str> = config
        .upstreams
        .iter()
        .filter(|u| !u.keys.is_empty())
        .map(|u| u.name.as_str())
        .collect();
    if !virtual_keys && !keyed.is_empty() {
        return Err(format!(
            "[[upstreams]] {} have provider keys (key, keys), which need key_mode = \"virtual\": in passthrough mode any bearer string would spend them",
            keyed.join(", ")
        ));
    }
    // Origins, not hosts: the same host over http, or on another port, is another server.
    let mut hosts: Vec<String> = config
        .upstreams
        .iter()
        .filter(|u| u.keys.is_empty())
        .map(|u| {
            let scheme = match u.url.scheme {
                Scheme::Http => "http",
                Scheme::Https => "https",
            };
            format!("{scheme}://{}", u.url.authority().to_ascii_lowercase())
        })
        .collect();
    hosts.sort_unstable();
    hosts.dedup();
    let keys_sent = config.budgets.keys.iter().any(|k| k.upstream_key.is_some());
    if hosts.len() > 1 && keys_sent && virtual_keys {
        return Err(format!(
            "[[upstreams]] without keys of their own are on {} origins ({}), and each would get a virtual key's upstream_key: give those upstreams key or keys, or leave upstream_key out",
            hosts.len(),
            hosts.join(", ")
        ));
    }
    Ok(())
}

impl UpstreamUrl {
    pub fn parse(raw: &str) -> Result<UpstreamUrl, String> {
        let uri: http::Uri = raw.parse().map_err(|e| format!("not a URL ({e})"))?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::Http,
            Some("https") => Scheme::Https,
            _ => return Err("scheme must be http or https".into()),
        };
        let host = uri.host().ok_or("URL has no host")?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(match scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
        });
        if uri.query().is_some() {
            return Err("URL must not carry a query".into());
        }
        let mut base_path = uri.path().trim_end_matches('/').to_string();
        // The original Aura took the full endpoint URL: accept it as the base it implies.
        if let Some(base) = base_path.strip_suffix("/chat/completions") {
            base_path = base.to_string();
        }
        Ok(UpstreamUrl {
            scheme,
            host,
            port,
            base_path,
        })
    }

    /// `Host` header value: the port only when it is not the scheme's default.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match (&self.scheme, self.port) {
            (Scheme::Http, 80) | (Scheme::Https, 443) => host,
            _ => format!("{host}:{}", self.port),
        }
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        write!(f, "{scheme}://{}{}", self.authority(), self.base_path)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen_addr: IpAddr,
    pub port: u16,
    /// The control plane's listener (/metrics, /admin, /healthz), when apart from the data plane.
    pub admin_listen: Option<SocketAddr>,
    pub upstream: UpstreamUrl,
    /// The file's `[[upstreams]]`; empty: `upstream` serves every model.
    pub upstreams: Vec<UpstreamEntry>,
    /// The file's `[fallbacks]`: model → the models its requests go on to.
    pub fallbacks: Vec<(String, Vec<String>)>,
    pub demo: bool,
    /// `None`: as many as `available_parallelism()` (which honours cgroup CPU quotas).
    pub workers: Option<usize>,
    pub pin_workers: bool,
    /// The I/O driver and its ring's setup.
    pub io: IoSettings,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub upstream_pool_max_idle: usize,
    pub upstream_ca_file: Option<PathBuf>,
    pub inject_stream_usage: bool,
    /// Upstreams a request may try before its answer starts (1: no retries).
    pub max_attempts: u32,
    /// Arrival → response head, all attempts together (None: each attempt bounded by its own
    /// timeouts alone).
    pub upstream_total_timeout: Option<Duration>,
    /// When an upstream or a pool key is ejected, and for how long.
    pub health: HealthRules,
    pub log_format: LogFormat,
    pub budgets: Budgets,
    /// On SIGTERM, how long requests in flight may take before Aura flushes and exits.
    pub shutdown_grace: Duration,
    /// Where settled requests are recorded, one JSON line each (none: nowhere).
    pub spend_record: Option<crate::spend_record::Target>,
}

/// Budget settings: limits, where prices come from, how reservations are sized.
#[derive(Debug, Clone)]
pub struct Budgets {
    pub default_limit_nano: u64,
    pub price_file: Option<PathBuf>,
    /// The price of a model missing from the table.
    pub unknown_model_price: Price,
    /// Completion tokens reserved when neither the request nor the price table bounds them.
    pub default_max_output_tokens: u64,
    pub flush_interval: Duration,
    pub key_mode: KeyMode,
    /// Responses each worker reads on after their client left (each bounded in bytes and time).
    pub max_drains_per_worker: usize,
    pub admin_token: Option<Secret>,
    /// With the memory store: where admin-made keys are kept (none: the default directory's).
    pub key_state_file: Option<PathBuf>,
    pub period: Period,
    /// The `[keys]` table of the config file.
    pub keys: Vec<KeyEntry>,
    /// The `[teams]` table of the config file.
    pub teams: Vec<governance::TeamEntry>,
    /// The `[prices]` table of the config file: over the built-in table and the price file.
    pub prices: Vec<PriceEntry>,
    pub store: StoreKind,
    /// With the store unreachable: admit on what is known (true) or refuse with 503.
    pub fail_open: bool,
    /// Virtual keys may use routes Aura cannot price (never billed).
    pub allow_unpriced_routes: bool,
    /// The most tokens a usage may report.
    pub max_usage_tokens: u64,
}

/// Where budgets live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// In this process: one node.
    Memory,
    Valkey(ValkeySettings),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValkeySettings {
    /// May hold a password: never logged.
    pub url: Secret,
    /// CA certificates for a `rediss://` URL, instead of the system's.
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
    pub node_id: String,
    /// None: the default directory (chosen at start: it depends on what is writable).
    pub journal_dir: Option<PathBuf>,
    /// How often the journal is flushed to disk.
    pub fsync_every: Duration,
    /// An earlier Aura's journal file, replayed once where it exists.
    pub legacy_journal: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMode {
    /// The client's key is its budget identity and goes upstream (the original Aura).
    Passthrough,
    /// Only configured keys are accepted; each goes upstream as its `upstream_key`.
    Virtual,
}

/// When spend starts again from zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Period {
    #[default]
    Never,
    /// At each whole minute (rate limits).
    Minute,
    /// At 00:00 UTC.
    Daily,
    /// At 00:00 UTC on the 1st.
    Monthly,
}

impl Period {
    /// The budget windows a configuration or the admin API may name (a minute is a rate
    /// limit's, never named).
    pub const WINDOWS: [(&'static str, Period); 3] = [
        ("none", Period::Never),
        ("daily", Period::Daily),
        ("monthly", Period::Monthly),
    ];

    /// `none`, `minute`, `daily`, `monthly`.
    pub fn name(self) -> &'static str {
        match self {
            Period::Never => "none",
            Period::Minute => "minute",
            Period::Daily => "daily",
            Period::Monthly => "monthly",
        }
    }

    /// A budget window by its name.
    pub fn window(name: &str) -> Option<Period> {
        Period::WINDOWS
            .iter()
            .find(|(known, _)| *known == name)
            .map(|(_, period)| *period)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_head_bytes: usize,
    pub max_headers: usize,
    pub max_body_bytes: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From a request's first byte to its last (head and body).
    pub client_head: Duration,
    pub idle: Duration,
    /// Each write to a client (nginx's `send_timeout`).
    pub client_send: Duration,
    pub upstream_connect: Duration,
    pub upstream_first_byte: Duration,
    pub upstream_read: Duration,
}

/// Every problem found in the configuration, reported together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigErrors(pub Vec<String>);

/// Raw values by setting key, before parsing; later layers overwrite earlier ones.
pub type Layer = HashMap<&'static str, String>;

fn setting(key: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.key == key)
}

/// Values from a TOML file's text. Unknown keys are errors (a typo must not be ignored).
/// A TOML syntax error by its place and reason: never the line's text, which may hold a key.
fn syntax_error(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("config file: line {line}, column {column}: {}", e.message())
        }
        None => format!("config file: {}", e.message()),
    }
}

pub fn file_layer(text: &str) -> Result<Layer, ConfigErrors> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigErrors(vec![syntax_error(text, &e)]))?;
    let mut layer = Layer::new();
    let mut errors = Vec::new();
    for (key, value) in table {
        if tables::TABLES.contains(&key.as_str()) {
            continue;
        }
        let Some(s) = setting(&key) else {
            errors.push(format!("config file: unknown key `{key}`"));
            continue;
        };
        let text = match value {
            toml::Value::String(v) => v,
            toml::Value::Integer(v) => v.to_string(),
            toml::Value::Boolean(v) => v.to_string(),
            toml::Value::Float(v) => v.to_string(),
            other => {
                errors.push(format!(
                    "config file: `{key}` has unsupported type {}",
                    other.type_str()
                ));
                continue;
            }
        };
        layer.insert(s.key, text);
    }
    if errors.is_empty() {
        Ok(layer)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// The `[keys]` and `[prices]` tables of a TOML file's text.
/// The file's tables; `env` answers the `env:NAME` references of upstream keys.
pub fn file_tables(text: &str, env: &dyn Source) -> Result<Tables, ConfigErrors> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigErrors(vec![syntax_error(text, &e)]))?;
    tables::parse(&table, env).map_err(ConfigErrors)
}

pub fn env_layer(source: &dyn Source) -> Layer {
    let mut layer = Layer::new();
    for s in SETTINGS {
        if let Some(value) = s.env.iter().find_map(|name| source.get(name)) {
            layer.insert(s.key, value);
        }
    }
    layer
}

/// Merges layers lowest-precedence first and parses the result.
pub fn resolve(layers: &[Layer]) -> Result<Config, ConfigErrors> {
    let mut merged = Layer::new();
    for layer in layers {
        merged.extend(layer.iter().map(|(k, v)| (*k, v.clone())));
    }
    Parser {
        values: &merged,
        errors: Vec::new(),
    }
    .config()
}

struct Parser<'a> {
    values: &'a Layer,
    errors: Vec<String>,
}

impl Parser<'_> {
    fn get<T: std::str::FromStr>(&mut self, key: &'static str, default: T) -> T
    where
        T::Err: fmt::Display,
    {
        let Some(raw) = self.values.get(key) else {
            return default;
        };
        match raw.trim().parse() {
            Ok(v) => v,
            Err(e) => {
                self.errors
                    .push(format!("{key} ({}): `{raw}`: {e}", env_names(key)));
                default
            }
        }
    }

    /// A setting with no default: absent, or the parsed value.
    fn optional<T: std::str::FromStr>(&mut self, key: &'static str) -> Option<T>
    where
        T::Err: fmt::Display,
    {
        let raw = self.values.get(key)?;
        match raw.trim().parse() {
            Ok(v) => Some(v),
            Err(e) => {
                self.errors
                    .push(format!("{key} ({}): `{raw}`: {e}", env_names(key)));
                None
            }
        }
    }

    fn bool(&mut self, key: &'static str, default: bool) -> bool {
        let Some(raw) = self.values.get(key) else {
            return default;
        };
        match raw.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => true,
            "0" | "false" | "no" | "off" => false,
            _ => {
                self.errors.push(format!(
                    "{key} ({}): `{raw}` is not a boolean",
                    env_names(key)
                ));
                default
            }
        }
    }

    fn positive(&mut self, key: &'static str, default: u64) -> u64 {
        let v = self.get(key, default);
        if v == 0 {
            self.errors
                .push(format!("{key} ({}) must be greater than 0", env_names(key)));
        }
        v
    }

    /// One of `options`, by name (any case).
    fn choice<T: Copy>(&mut self, key: &'static str, options: &[(&str, T)], default: T) -> T {
        let Some(raw) = self.values.get(key) else {
            return default;
        };
        let wanted = raw.trim().to_ascii_lowercase();
        match options.iter().find(|(name, _)| *name == wanted) {
            Some((_, v)) => *v,
            None => {
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                self.errors.push(format!(
                    "{key} ({}): `{raw}` is not one of {}",
                    env_names(key),
                    names.join(", ")
                ));
                default
            }
        }
    }

    fn io_settings(&mut self) -> IoSettings {
        let defaults = IoSettings::default();
        let driver = self.choice(
            "io_driver",
            &[
                ("auto", IoDriver::Auto),
                ("io_uring", IoDriver::IoUring),
                ("epoll", IoDriver::Epoll),
            ],
            defaults.driver,
        );
        let ring_flags = match self.values.get("io_uring_setup") {
            None => defaults.ring_flags,
            Some(raw) => RingFlags::parse(raw).unwrap_or_else(|e| {
                self.errors.push(format!(
                    "io_uring_setup ({}): {e}",
                    env_names("io_uring_setup")
                ));
                defaults.ring_flags
            }),
        };
        let ring_entries = self.positive("io_uring_entries", u64::from(defaults.ring_entries));
        let ring_entries = u32::try_from(ring_entries)
            .ok()
            .filter(|n| (1..=32_768).contains(n))
            .unwrap_or_else(|| {
                self.errors.push(format!(
                    "io_uring_entries ({}) must be at most 32768",
                    env_names("io_uring_entries")
                ));
                defaults.ring_entries
            });
        IoSettings {
            driver,
            ring_flags,
            ring_entries,
        }
    }

    fn store_kind(&mut self) -> StoreKind {
        let valkey = self.choice("store", &[("memory", false), ("valkey", true)], false);
        let url = self
            .values
            .get("valkey_url")
            .map_or("redis://127.0.0.1:6379/", |u| u.trim())
            .to_string();
        let schemes = ["redis://", "rediss://", "valkey://", "valkeys://"];
        if !schemes.iter().any(|s| url.starts_with(s)) {
            // Not echoed: the URL may carry a password.
            self.errors.push(format!(
                "valkey_url ({}) must start with redis://, rediss://, valkey:// or valkeys://",
                env_names("valkey_url")
            ));
        }
        let ca_file = self.values.get("valkey_ca_file").map(PathBuf::from);
        let timeout = self.millis("store_timeout_ms", 500);
        let node_id = self
            .values
            .get("node_id")
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(host_name);
        if node_id.contains(['/', '{', '}']) || node_id.len() > 64 {
            self.errors.push(format!(
                "node_id ({}): `{node_id}` must be at most 64 characters, without / {{ }}",
                env_names("node_id")
            ));
        }
        let legacy_journal = PathBuf::from(
            self.values
                .get("ledger_journal")
                .map_or("aura-ledger.journal", |p| p.trim()),
        );
        let journal_dir = self.absolute_path("journal_dir", JOURNAL_DIR);
        let fsync_every = self.millis("journal_fsync_interval_ms", 1_000);
        if !valkey {
            return StoreKind::Memory;
        }
        // The valkey schemes are the redis protocol; the redis crate knows only the redis ones.
        let url = url
            .replacen("valkeys://", "rediss://", 1)
            .replacen("valkey://", "redis://", 1);
        StoreKind::Valkey(ValkeySettings {
            url: Secret::new(url),
            ca_file,
            timeout,
            node_id,
            journal_dir,
            fsync_every,
            legacy_journal,
        })
    }

    /// `spend_record`: stdout, or a file with its rotation.
    fn spend_record(&mut self) -> Option<crate::spend_record::Target> {
        let max_bytes = self.positive("spend_record_max_bytes", 100 * 1024 * 1024);
        let keep = self.get("spend_record_files", 5usize);
        let raw = self.values.get("spend_record")?.trim().to_string();
        if raw.is_empty() {
            return None;
        }
        if raw.eq_ignore_ascii_case("stdout") {
            return Some(crate::spend_record::Target::Stdout);
        }
        let path = self.absolute_path("spend_record", SPEND_RECORD)?;
        Some(crate::spend_record::Target::File {
            path,
            max_bytes,
            keep,
        })
    }

    /// An absolute path, if set (a relative one would move with the working directory).
    fn absolute_path(&mut self, key: &'static str, env: &str) -> Option<PathBuf> {
        let path = self
            .values
            .get(key)
            .map(|d| PathBuf::from(d.trim()))
            .filter(|d| !d.as_os_str().is_empty());
        if path.as_ref().is_some_and(|d| d.is_relative()) {
            self.errors.push(format!(
                "{key} ({env}) must be an absolute path (a relative one moves with the working directory)"
            ));
        }
        path
    }

    /// A non-negative, finite amount of dollars.
    fn dollars(&mut self, key: &'static str, default: f64) -> f64 {
        let v: f64 = self.get(key, default);
        if !(v.is_finite() && v >= 0.0) {
            self.errors.push(format!(
                "{key} ({}) must be a non-negative amount of dollars",
                env_names(key)
            ));
            return default;
        }
        v
    }

    /// A limit in dollars, as nano-dollars: at most what a store can hold exactly.
    fn limit(&mut self, key: &'static str, default: f64) -> u64 {
        let dollars = self.dollars(key, default);
        match pricing::limit_nano(dollars) {
            Ok(nano) => nano,
            Err(e) => {
                self.errors.push(format!("{key} ({}): {e}", env_names(key)));
                pricing::dollars_to_nano(default)
            }
        }
    }

    fn millis(&mut self, key: &'static str, default: u64) -> Duration {
        Duration::from_millis(self.positive(key, default))
    }

    fn config(mut self) -> Result<Config, ConfigErrors> {
        let upstream_raw = self
            .values
            .get("upstream_url")
            .cloned()
            .unwrap_or_else(|| "https://api.openai.com/v1".to_string());
        let upstream = UpstreamUrl::parse(&upstream_raw).unwrap_or_else(|e| {
            self.errors.push(format!(
                "upstream_url ({UPSTREAM_URL}): `{upstream_raw}`: {e}"
            ));
            // Placeholder so the remaining settings are still checked; never used.
            UpstreamUrl {
                scheme: Scheme::Http,
                host: String::new(),
                port: 0,
                base_path: String::new(),
            }
        });
        let workers = self
            .values
            .contains_key("workers")
            .then(|| self.positive("workers", 1) as usize);
        let log_format = match self
            .values
            .get("log_format")
            .map(|s| s.trim().to_ascii_lowercase())
        {
            None => LogFormat::Text,
            Some(v) if v == "text" => LogFormat::Text,
            Some(v) if v == "json" => LogFormat::Json,
            Some(v) => {
                self.errors.push(format!(
                    "log_format ({LOG_FORMAT}): `{v}` is not text or json"
                ));
                LogFormat::Text
            }
        };
        let config = Config {
            listen_addr: self.get("listen_addr", IpAddr::from([0, 0, 0, 0])),
            admin_listen: self.optional("admin_listen"),
            port: self.get("port", 8080),
            upstream,
            upstreams: Vec::new(),
            fallbacks: Vec::new(),
            demo: self.bool("demo", false),
            workers,
            pin_workers: self.bool("pin_workers", true),
            io: self.io_settings(),
            limits: Limits {
                max_head_bytes: self.positive("max_head_bytes", 64 * 1024) as usize,
                max_headers: self.positive("max_headers", 100) as usize,
                max_body_bytes: self.positive("max_body_bytes", 32 * 1024 * 1024) as usize,
            },
            timeouts: Timeouts {
                client_head: self.millis("client_head_timeout_ms", 10_000),
                idle: self.millis("idle_timeout_ms", 60_000),
                client_send: self.millis("client_send_timeout_ms", 60_000),
                upstream_connect: self.millis("upstream_connect_timeout_ms", 5_000),
                upstream_first_byte: self.millis("upstream_first_byte_timeout_ms", 300_000),
                upstream_read: self.millis("upstream_read_timeout_ms", 300_000),
            },
            upstream_pool_max_idle: self.get("upstream_pool_max_idle", 256),
            upstream_ca_file: self.values.get("upstream_ca_file").map(PathBuf::from),
            inject_stream_usage: self.bool("inject_stream_usage", true),
            max_attempts: self
                .positive("upstream_max_attempts", 3)
                .min(MAX_UPSTREAMS as u64) as u32,
            upstream_total_timeout: self
                .values
                .contains_key("upstream_total_timeout_ms")
                .then(|| self.millis("upstream_total_timeout_ms", 1)),
            health: {
                let base_rest = self.millis("upstream_eject_ms", 5_000);
                HealthRules {
                    eject_after: self.positive("upstream_eject_after_failures", 3).min(1_000)
                        as u32,
                    base_rest,
                    max_rest: base_rest.max(Duration::from_secs(300)),
                }
            },
            log_format,
            budgets: Budgets {
                default_limit_nano: self.limit("default_limit_dollars", 10.0),
                price_file: self.values.get("price_file").map(PathBuf::from),
                unknown_model_price: {
                    let input = self.dollars("unknown_model_input_dollars_per_million", 5.0);
                    let output = self.dollars("unknown_model_output_dollars_per_million", 15.0);
                    Price::per_million(input, output, input)
                },
                default_max_output_tokens: self.positive("default_max_output_tokens", 4096),
                flush_interval: self.millis("budget_flush_interval_ms", 50),
                max_drains_per_worker: self.get("max_drains_per_worker", 64),
                key_mode: self.choice(
                    "key_mode",
                    &[
                        ("passthrough", KeyMode::Passthrough),
                        ("virtual", KeyMode::Virtual),
                    ],
                    KeyMode::Passthrough,
                ),
                admin_token: self
                    .values
                    .get("admin_token")
                    .filter(|t| !t.trim().is_empty())
                    .map(|t| Secret::new(t.trim())),
                key_state_file: self.absolute_path("key_state_file", KEY_STATE_FILE),
                period: self.choice("budget_period", &Period::WINDOWS, Period::Never),
                keys: Vec::new(),
                teams: Vec::new(),
                prices: Vec::new(),
                store: StoreKind::Memory,
                fail_open: self.choice("store_failure", &[("open", true), ("closed", false)], true),
                allow_unpriced_routes: self.bool("allow_unpriced_routes", false),
                max_usage_tokens: self.positive("max_usage_tokens", 10_000_000),
            },
            shutdown_grace: self.millis("shutdown_grace_ms", 20_000),
            spend_record: self.spend_record(),
        };
        let mut config = config;
        config.budgets.store = self.store_kind();
        if self.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(self.errors))
        }
    }
}

/// The kernel's host name, the default node id.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "aura".to_string())
}

fn env_names(key: &str) -> String {
    setting(key).map(|s| s.env.join(" or ")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syntax_error_names_its_place_not_its_text() {
        let text = "port = 1\n[keys.a]\nkey = \"sk-secret-0001\" trailing\n";
        let errors = file_layer(text).unwrap_err().to_string();
        assert!(errors.contains("line 3"), "{errors}");
        assert!(!errors.contains("sk-secret"), "{errors}");
        let errors = file_tables(text, &HashMap::new()).unwrap_err().to_string();
        assert!(!errors.contains("sk-secret"), "{errors}");
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_hold_without_any_layer() {
        let c = resolve(&[]).unwrap();
        assert_eq!(c.port, 8080);
        assert_eq!(c.upstream.to_string(), "https://api.openai.com/v1");
        assert!(!c.demo);
        assert!(c.inject_stream_usage);
    }

    #[test]
    fn original_aura_env_names_work() {
        let e = env(&[
            ("PORT", "9000"),
            ("UPSTREAM_URL", "http://127.0.0.1:1234/v1/chat/completions"),
            ("MOCK_UPSTREAM", "true"),
        ]);
        let c = resolve(&[env_layer(&e)]).unwrap();
        assert_eq!(c.port, 9000);
        assert!(c.demo);
        assert_eq!(c.upstream.base_path, "/v1");
        assert_eq!(c.upstream.authority(), "127.0.0.1:1234");
    }

    #[test]
    fn later_layers_win() {
        let file = file_layer("port = 7000\nworkers = 3\n").unwrap();
        let e = env_layer(&env(&[("PORT", "7001")]));
        let mut cli = Layer::new();
        cli.insert("workers", "5".into());
        let c = resolve(&[file, e, cli]).unwrap();
        assert_eq!(c.port, 7001);
        assert_eq!(c.workers, Some(5));
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let e = env(&[
            ("PORT", "http"),
            ("AURA_WORKERS", "0"),
            ("UPSTREAM_URL", "ftp://x"),
            ("AURA_PIN_WORKERS", "maybe"),
        ]);
        let errors = resolve(&[env_layer(&e)]).unwrap_err().0;
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors.iter().any(|m| m.contains("PORT")));
    }

    #[test]
    fn budget_settings_have_defaults_and_take_dollars() {
        let c = resolve(&[]).unwrap();
        assert_eq!(c.budgets.default_limit_nano, 10_000_000_000);
        assert_eq!(c.budgets.unknown_model_price.input_pico, 5_000_000);
        assert_eq!(c.budgets.unknown_model_price.output_pico, 15_000_000);
        assert_eq!(c.budgets.default_max_output_tokens, 4096);
        assert_eq!(c.budgets.flush_interval, Duration::from_millis(50));
        let file = file_layer("default_limit_dollars = 2.5\nprice_file = \"/p.json\"\n").unwrap();
        let c = resolve(&[file]).unwrap();
        assert_eq!(c.budgets.default_limit_nano, 2_500_000_000);
        assert_eq!(c.budgets.price_file, Some(PathBuf::from("/p.json")));
        let bad = env(&[
            ("AURA_DEFAULT_LIMIT_DOLLARS", "-1"),
            ("AURA_UNKNOWN_MODEL_OUTPUT_DOLLARS_PER_MILLION", "NaN"),
        ]);
        let errors = resolve(&[env_layer(&bad)]).unwrap_err().0;
        assert_eq!(errors.len(), 2, "{errors:?}");
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        let errors = file_layer("prot = 1\nport = 2\n").unwrap_err().0;
        assert_eq!(errors, vec!["config file: unknown key `prot`".to_string()]);
    }

    #[test]
    fn upstream_urls_parse() {
        let cases = [
            (
                "https://api.openai.com/v1",
                "api.openai.com",
                443,
                "/v1",
                "api.openai.com",
            ),
            (
                "http://localhost:11434/v1/",
                "localhost",
                11434,
                "/v1",
                "localhost:11434",
            ),
            (
                "https://api.groq.com/openai/v1",
                "api.groq.com",
                443,
                "/openai/v1",
                "api.groq.com",
            ),
            ("http://[::1]:8000", "::1", 8000, "", "[::1]:8000"),
        ];
        for (raw, host, port, base, authority) in cases {
            let u = UpstreamUrl::parse(raw).unwrap();
            assert_eq!(
                (u.host.as_str(), u.port, u.base_path.as_str()),
                (host, port, base),
                "{raw}"
            );
            assert_eq!(u.authority(), authority);
        }
        assert!(UpstreamUrl::parse("api.openai.com").is_err());
        assert!(UpstreamUrl::parse("http://x/v1?a=b").is_err());
    }
}
