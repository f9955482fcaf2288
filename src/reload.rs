//! Hot reload: what a new configuration replaces while Aura runs (the routing table and every
//! upstream's settings, the retry and health rules, the keys and their limits, the prices) and
//! how. A reload (SIGHUP, or `POST /admin/reload`) reads the configuration again as at start;
//! a configuration with any error is refused as a whole and the running one stays. An accepted
//! one becomes the next [`Live`] and its generation number is bumped; each worker, at its next
//! request, sees the number change and builds its own view of it (its pools, its health). A
//! request keeps the view it started with to its end, so connections and streams in flight are
//! untouched. The request path reads one atomic per request.
//!
//! Settings that shape the process (listeners, workers, the store, the journal, client-side
//! limits) take effect at the next start: a reload that changes them says so in its log line.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::auth::{Directory, KeyId, Member};
use crate::budget::op::{KeyLimits, LimitTable};
use crate::config::{Config, Secret, UpstreamEntry};
use crate::config::{ProcessEnv, Source as ConfigSource};
use crate::governance::Governance;
use crate::keyring::record::KeyRecord;
use crate::keyring::Keyring;
use crate::metrics::Registry;
use crate::pricing::PriceTable;
use crate::runtime::{load_prices, StartError};
use crate::upstream::{tls_configs, Resolver, Upstream};

/// What workers build their views from: one configuration's live part, checked whole.
pub struct Live {
    pub config: Config,
    pub routes: Vec<UpstreamEntry>,
    /// One per route, in its order.
    pub resolvers: Vec<Resolver>,
    pub tls: Vec<Option<Arc<rustls::ClientConfig>>>,
    pub prices: Arc<PriceTable>,
}

impl Live {
    /// Everything `config`'s live part needs, checked: credentials, TLS, every upstream, the
    /// price file. `resolvers` are one per route of `config.routes()`.
    pub fn new(config: &Config, resolvers: Vec<Resolver>) -> Result<Live, StartError> {
        crate::config::credentials_stay_with_their_provider(config)
            .map_err(StartError::Upstreams)?;
        let routes = config.routes();
        if resolvers.len() != routes.len() {
            return Err(StartError::Upstreams(format!(
                "{} resolvers for {} upstreams",
                resolvers.len(),
                routes.len()
            )));
        }
        let tls = tls_configs(config, &routes).map_err(StartError::Tls)?;
        for ((route, resolver), tls) in routes.iter().zip(&resolvers).zip(&tls) {
            Upstream::new(route, config, resolver.clone(), tls.clone())
                .map_err(|e| StartError::Tls(format!("upstream `{}`: {e}", route.name)))?;
        }
        let prices = Arc::new(load_prices(config)?);
        Ok(Live {
            config: config.clone(),
            routes,
            resolvers,
            tls,
            prices,
        })
    }
}

/// The keys workers authorize and charge by: the config file's and the admin API's
/// (`keyring`), with what each key's requests are charged to (teams, windows, rate limits).
/// Replaced on its own when admin-made keys change, so a key change leaves every worker's
/// upstream pools and health as they are.
pub struct KeySet {
    pub directory: Arc<Directory>,
    pub governance: Arc<Governance>,
}

impl KeySet {
    /// The config's keys, then each admin-made key `config` can serve (one naming an alias
    /// the config uses, a team it lacks, an upstream it lacks or an environment variable this
    /// node lacks is left out, and so refused, with an error logged).
    pub fn build(
        config: &Config,
        prices: &PriceTable,
        admin: &[KeyRecord],
        env: &dyn ConfigSource,
    ) -> KeySet {
        let budgets = &config.budgets;
        let routes = config.routes();
        let mut members: Vec<Member> = budgets.keys.iter().map(Member::from_config).collect();
        for record in admin {
            let taken = members.iter().any(|m| m.alias == record.alias);
            let fits = record
                .member(env)
                .and_then(|m| {
                    if taken {
                        Err(format!("alias `{}` is the config file's", m.alias))
                    } else {
                        Ok(m)
                    }
                })
                .and_then(|m| match &m.team {
                    Some(team) if !budgets.teams.iter().any(|t| &t.name == team) => {
                        Err(format!("team `{team}` is not in the config file"))
                    }
                    _ => Ok(m),
                })
                .and_then(|m| match &m.upstream {
                    Some(name) if !routes.iter().any(|r| &r.name == name) => {
                        Err(format!("upstream `{name}` is not in the config file"))
                    }
                    _ => Ok(m),
                });
            match fits {
                Ok(member) => members.push(member),
                Err(why) => {
                    tracing::error!(key_id = %record.id, alias = %record.alias, why, "an admin-made key is refused on this node")
                }
            }
        }
        let keyed = routes.iter().all(|r| !r.keys.is_empty());
        KeySet {
            directory: Arc::new(Directory::new(budgets.key_mode, &members).upstreams_keyed(keyed)),
            governance: Arc::new(Governance::new(
                budgets.default_limit_nano,
                budgets.period,
                &members,
                &budgets.teams,
                &prices.names().collect::<Vec<_>>(),
            )),
        }
    }

    /// Every budget the store enforces: keys' own, windows, teams', rate limits.
    pub fn limits(&self) -> LimitTable {
        self.governance.limits()
    }

    /// The labels metrics show for key ids: keys' aliases, and every other money account's.
    pub fn labels(&self) -> HashMap<KeyId, String> {
        let mut labels = self.directory.aliases();
        for (id, label) in self.governance.labels() {
            labels.entry(id).or_insert(label);
        }
        labels
    }
}

/// Reads the configuration again, as at start (file, environment, flags).
pub type LoadConfig = Box<dyn Fn() -> Result<Config, String> + Send + Sync>;
/// A resolver for an upstream host and port new to the configuration (one the running
/// configuration has keeps its resolver: a reload looks nothing up again).
pub type Resolve = Box<dyn Fn(&str, u16) -> Resolver + Send + Sync>;

/// How to read the configuration again: set by `main`; without it, nothing reloads.
struct Source {
    load: LoadConfig,
    resolve: Resolve,
}

/// The live configuration every worker follows, and the reloads that replace it; the keys
/// they authorize by, and the admin-made keys that replace those.
pub struct Shared {
    generation: AtomicU64,
    live: RwLock<Arc<Live>>,
    /// Bumped whenever `keys` is replaced (a reload, an admin-made key's change).
    keys_generation: AtomicU64,
    /// The keys generation at which a budget last shrank or went.
    tightened_at: AtomicU64,
    keys: RwLock<Arc<KeySet>>,
    /// The admin-made keys as last heard from the keyring, and the keyring's version then.
    admin_keys: Mutex<(u64, Arc<Vec<KeyRecord>>)>,
    keyring: Arc<dyn Keyring>,
    /// The report accounts named in the keyring.
    named_reports: Mutex<std::collections::HashSet<KeyId>>,
    /// The configuration the process started with: what settings a reload cannot change are
    /// compared with (the last one applied may already differ from what runs).
    started: Config,
    /// A source was set: reloads are possible (read without the reload's lock).
    has_source: std::sync::atomic::AtomicBool,
    limits: Arc<KeyLimits>,
    registry: Arc<Registry>,
    source: Mutex<Option<Source>>,
}

impl Shared {
    /// The live configuration, with the keys of its config and of `keyring` (as far as it
    /// answers now: a keyring that does not is followed later), and the keyring's version.
    pub fn new(
        live: Live,
        keyring: Arc<dyn Keyring>,
        limits: Arc<KeyLimits>,
        registry: Arc<Registry>,
    ) -> (Arc<Shared>, u64) {
        let (version, admin_keys) = keyring.load().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "keyring unavailable at start: admin-made keys come once it answers");
            (0, Vec::new())
        });
        let keys = KeySet::build(&live.config, &live.prices, &admin_keys, &ProcessEnv);
        limits.replace(keys.limits());
        registry.set_aliases(keys.labels());
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            keys_generation: AtomicU64::new(0),
            tightened_at: AtomicU64::new(0),
            keys: RwLock::new(Arc::new(keys)),
            admin_keys: Mutex::new((version, Arc::new(admin_keys))),
            keyring,
            named_reports: Mutex::default(),
            started: live.config.clone(),
            has_source: std::sync::atomic::AtomicBool::new(false),
            live: RwLock::new(Arc::new(live)),
            limits,
            registry,
            source: Mutex::new(None),
        });
        shared.name_reports(&shared.keys());
        (shared, version)
    }

    /// Where admin-made keys are kept.
    pub fn keyring(&self) -> &Arc<dyn Keyring> {
        &self.keyring
    }

    /// Bumped by every reload applied: a worker that saw another number builds a new view.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn live(&self) -> Arc<Live> {
        match self.live.read() {
            Ok(live) => live.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Bumped whenever the keys change: a worker that saw another number takes `keys()`.
    pub fn keys_generation(&self) -> u64 {
        self.keys_generation.load(Ordering::Acquire)
    }

    pub fn keys(&self) -> Arc<KeySet> {
        match self.keys.read() {
            Ok(keys) => keys.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The admin-made keys as last heard from the keyring.
    pub fn admin_keys(&self) -> Arc<Vec<KeyRecord>> {
        match self.admin_keys.lock() {
            Ok(keys) => keys.1.clone(),
            Err(poisoned) => poisoned.into_inner().1.clone(),
        }
    }

    /// The keyring changed (`Some`: its version and keys), or the config did (`None`): every
    /// worker authorizes by the config's keys and the admin-made ones from its next request.
    /// One at a time, so the keys installed last are built from the newest of both; keys
    /// older than those installed (a poll that began before an admin call's write) are
    /// ignored.
    pub fn set_admin_keys(&self, admin_keys: Option<(u64, Vec<KeyRecord>)>) {
        let mut slot = match self.admin_keys.lock() {
            Ok(slot) => slot,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some((version, admin_keys)) = admin_keys {
            if version < slot.0 {
                return;
            }
            *slot = (version, Arc::new(admin_keys));
        }
        let live = self.live();
        self.install_keys(KeySet::build(
            &live.config,
            &live.prices,
            &slot.1,
            &ProcessEnv,
        ));
    }

    /// `keys` from now on: the store's budgets, the metric labels, then the workers. Where a
    /// budget shrank or went, workers hand back their leases at once (those granted under the
    /// old budget would let the key run past the new one).
    fn install_keys(&self, keys: KeySet) {
        self.name_reports(&keys);
        let fresh = keys.limits();
        let tightened = self.keys().limits().tightened_by(&fresh);
        self.limits.replace(fresh);
        self.registry.set_aliases(keys.labels());
        match self.keys.write() {
            Ok(mut slot) => *slot = Arc::new(keys),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(keys),
        }
        let generation = self.keys_generation.fetch_add(1, Ordering::AcqRel) + 1;
        if tightened {
            self.tightened_at.store(generation, Ordering::Release);
        }
    }

    /// Names in the keyring the report accounts it has not named yet: their days stay readable
    /// after their key, team or model leaves the configuration. A keyring that does not answer
    /// is asked again at the next install.
    fn name_reports(&self, keys: &KeySet) {
        let mut named = match self.named_reports.lock() {
            Ok(named) => named,
            Err(poisoned) => poisoned.into_inner(),
        };
        let new: Vec<(KeyId, String)> = keys
            .governance
            .report_names()
            .into_iter()
            .filter(|(id, _)| !named.contains(id))
            .collect();
        if new.is_empty() {
            return;
        }
        let names: Vec<(String, String)> = new
            .iter()
            .map(|(id, name)| (id.to_string(), name.clone()))
            .collect();
        match self.keyring.name_reports(&names) {
            Ok(()) => named.extend(new.into_iter().map(|(id, _)| id)),
            Err(e) => {
                tracing::warn!(error = %e, "keyring: report names not written; tried again at the next change")
            }
        }
    }

    /// The newest keys generation at which some budget shrank or went.
    pub fn tightened_at(&self) -> u64 {
        self.tightened_at.load(Ordering::Acquire)
    }

    /// How to read the configuration again.
    pub fn set_source(&self, load: LoadConfig, resolve: Resolve) {
        if let Ok(mut source) = self.source.lock() {
            *source = Some(Source { load, resolve });
            self.has_source.store(true, Ordering::Release);
        }
    }

    /// Whether a reload is possible (a source was set). Never waits for a reload under way.
    pub fn reloadable(&self) -> bool {
        self.has_source.load(Ordering::Acquire)
    }

    /// Reads the configuration again and applies it, or refuses it whole; logs and counts
    /// either. Blocking (file reads, DNS): call it off the workers. One at a time.
    pub fn reload(&self) -> Result<Reloaded, String> {
        let source = match self.source.lock() {
            Ok(source) => source,
            Err(poisoned) => poisoned.into_inner(),
        };
        let Some(source) = source.as_ref() else {
            return Err("this Aura has no configuration source to reload from".into());
        };
        let old = self.live();
        let result = (source.load)().and_then(|config| {
            let resolvers = config
                .routes()
                .iter()
                .map(|route| {
                    let (host, port) = (&route.url.host, route.url.port);
                    old.routes
                        .iter()
                        .zip(&old.resolvers)
                        .find(|(known, _)| known.url.host == *host && known.url.port == port)
                        .map_or_else(|| (source.resolve)(host, port), |(_, r)| r.clone())
                })
                .collect();
            Live::new(&config, resolvers).map_err(|e| e.to_string())
        });
        match result {
            Ok(live) => {
                let restart = restart_only_changes(&self.started, &live.config);
                let reloaded = Reloaded {
                    generation: self.generation() + 1,
                    upstreams: live.routes.iter().map(|r| r.name.clone()).collect(),
                    keys: live.config.budgets.keys.len(),
                    restart_only: restart.clone(),
                };
                match self.live.write() {
                    Ok(mut slot) => *slot = Arc::new(live),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(live),
                }
                // The keys of the new config, with the admin-made ones.
                self.set_admin_keys(None);
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.registry.count_reload(true);
                tracing::info!(
                    generation = reloaded.generation,
                    upstreams = reloaded.upstreams.join(" "),
                    keys = reloaded.keys,
                    "configuration reloaded"
                );
                if !restart.is_empty() {
                    tracing::warn!(
                        settings = restart.join(", "),
                        "reload: these settings changed and take effect at the next start"
                    );
                }
                Ok(reloaded)
            }
            Err(e) => {
                self.registry.count_reload(false);
                tracing::error!(error = %e, "reload refused: the running configuration stays");
                Err(e)
            }
        }
    }
}

/// What a reload applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub generation: u64,
    pub upstreams: Vec<String>,
    pub keys: usize,
    /// Settings that changed but take effect at the next start.
    pub restart_only: Vec<&'static str>,
}

/// The store's settings, its URL in clear (its Debug hides it): compared, never shown.
fn store_settings(budgets: &crate::config::Budgets) -> String {
    let url = match &budgets.store {
        crate::config::StoreKind::Valkey(valkey) => valkey.url.expose().to_string(),
        crate::config::StoreKind::Memory => String::new(),
    };
    format!("{url}{:?}{}", budgets.store, budgets.fail_open)
}

/// The settings a reload cannot change (they shape listeners, threads, the store and the
/// client side of connections) that differ between `old` and `new`.
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let (a, b) = (&old.budgets, &new.budgets);
    let differs = |x: String, y: String| x != y;
    let checks: [(&'static str, bool); 17] = [
        ("listen_addr", old.listen_addr != new.listen_addr),
        ("port", old.port != new.port),
        ("admin_listen", old.admin_listen != new.admin_listen),
        ("workers", old.workers != new.workers),
        ("pin_workers", old.pin_workers != new.pin_workers),
        ("io_driver / io_uring_setup / io_uring_entries", differs(format!("{:?}", old.io), format!("{:?}", new.io))),
        ("max_head_bytes / max_headers / max_body_bytes", differs(format!("{:?}", old.limits), format!("{:?}", new.limits))),
        (
            "client_head_timeout_ms / idle_timeout_ms / client_send_timeout_ms",
            (old.timeouts.client_head, old.timeouts.idle, old.timeouts.client_send)
                != (new.timeouts.client_head, new.timeouts.idle, new.timeouts.client_send),
        ),
        ("log_format", old.log_format != new.log_format),
                ("store / valkey_url / store_failure / journal", differs(store_settings(a), store_settings(b))),
        ("demo", old.demo != new.demo),
        ("budget_period", a.period != b.period),
        ("budget_flush_interval_ms", a.flush_interval != b.flush_interval),
        ("admin_token / allow_unpriced_routes / max_drains_per_worker / max_usage_tokens / default_max_output_tokens", differs(
                        // A secret's Debug hides it: compared in clear, never printed.
            format!("{:?}{}{}{}{}", a.admin_token.as_ref().map(Secret::expose), a.allow_unpriced_routes, a.max_drains_per_worker, a.max_usage_tokens, a.default_max_output_tokens),
            format!("{:?}{}{}{}{}", b.admin_token.as_ref().map(Secret::expose), b.allow_unpriced_routes, b.max_drains_per_worker, b.max_usage_tokens, b.default_max_output_tokens),
        )),
        ("shutdown_grace_ms", old.shutdown_grace != new.shutdown_grace),
        ("spend_record / spend_record_max_bytes / spend_record_files", old.spend_record != new.spend_record),
        ("key_state_file", a.key_state_file != b.key_state_file),
    ];
    checks
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(name, _)| name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        crate::config::resolve(&[crate::config::file_layer(text).unwrap()]).unwrap()
    }

    #[test]
    fn settings_a_reload_cannot_change_are_named() {
        let old = config("port = 8080\nadmin_token = \"a\"\nupstream_max_attempts = 3\n");
        let same = config("port = 8080\nadmin_token = \"a\"\nupstream_max_attempts = 1\n");
        assert!(restart_only_changes(&old, &same).is_empty());
        let new = config("port = 9090\nadmin_token = \"b\"\nidle_timeout_ms = 1000\n");
        let changed = restart_only_changes(&old, &new);
        assert!(changed.contains(&"port"), "{changed:?}");
        assert!(
            changed.iter().any(|c| c.starts_with("admin_token")),
            "{changed:?}"
        );
        assert!(
            changed.iter().any(|c| c.contains("idle_timeout_ms")),
            "{changed:?}"
        );
        let recording = config("port = 8080\nadmin_token = \"a\"\nspend_record = \"stdout\"\n");
        let changed = restart_only_changes(&old, &recording);
        assert!(
            changed.iter().any(|c| c.starts_with("spend_record")),
            "{changed:?}"
        );
    }
}
