//! Thread-per-core: one monoio runtime per worker thread, optionally pinned to a core, each with
//! its own SO_REUSEPORT listener on the same address. io_uring where the kernel allows it,
//! epoll otherwise — including when building the ring itself fails (RLIMIT_MEMLOCK on 5.10/5.11,
//! seccomp profiles that refuse io_uring_setup).
//!
//! monoio's own `bind` sets SO_REUSEPORT silently, so a second Aura (or anything else with
//! SO_REUSEPORT) could share the port and take half the connections. `bind_listeners` first
//! probes the port with a plain listener and holds an abstract-socket lock named after it.

use crate::reload::{Live, Shared};
use std::io;
use std::net::SocketAddr;
use std::os::linux::net::SocketAddrExt;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use monoio::net::TcpListener;
use socket2::{Domain, Protocol, Socket, Type};

use crate::budget::journal::{self, Journal, WorkerJournal};
use crate::budget::ledger::{Inbox, Ledger, LedgerSettings, LedgerThread};
use crate::budget::op::{period_of, KeyLimits};
use crate::budget::shard::{Shard, ShardSettings};
use crate::budget::store::valkey::{self, ValkeyStore};
use crate::budget::store::{system_clock, Clock, MemoryStore, Store};
use crate::budget::Holder;
use crate::config::{Config, Limits, ProcessEnv, StoreKind, Timeouts, ValkeySettings};
use crate::control::ControlPlane;
use crate::cut::CutSignal;
use crate::keyring::{self, file::FileKeyring, Keyring};
use crate::metrics::{self, Registry};
use crate::spend_record::{self, Recorder};

use crate::pricing::PriceTable;
use crate::proxy::Proxy;
use crate::server;

use crate::upstream::Resolver;

pub mod io_driver;

use io_driver::IoPlan;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("address {0} is already in use (another Aura or another server holds the port)")]
    PortInUse(SocketAddr),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, io::Error),
    #[error("upstream TLS setup: {0}")]
    Tls(String),
    #[error("upstreams: {0}")]
    Upstreams(String),
    #[error("cannot start worker thread: {0}")]
    Thread(io::Error),
    #[error("price file {0}: {1}")]
    PriceFile(String, String),
    #[error("budget store: {0}")]
    Store(String),
    #[error("{0}")]
    Journal(#[from] journal::JournalError),
}

/// The built-in price table, with the configured price file on top.
pub fn load_prices(config: &Config) -> Result<PriceTable, StartError> {
    let budgets = &config.budgets;
    let mut prices = PriceTable::builtin(budgets.unknown_model_price);
    if let Some(path) = &budgets.price_file {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| StartError::PriceFile(shown.clone(), e.to_string()))?;
        let added = prices
            .merge_litellm(&text)
            .map_err(|e| StartError::PriceFile(shown.clone(), e.to_string()))?;
        tracing::info!(file = shown.as_str(), models = added, "prices loaded");
    }
    for entry in &budgets.prices {
        prices.insert(&entry.model, entry.price);
    }
    prices.seal();
    Ok(prices)
}

/// The I/O driver a worker runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    IoUring,
    Epoll,
}

impl Driver {
    pub fn label(self) -> &'static str {
        match self {
            Driver::IoUring => "io_uring",
            Driver::Epoll => "epoll",
        }
    }
}

pub struct Running {
    pub addr: SocketAddr,
    /// The control plane's listener (`admin_listen`), when it has one.
    pub control_addr: Option<SocketAddr>,
    pub workers: Vec<JoinHandle<()>>,
    /// The live configuration: `main` sets how to read it again, and reloads it on SIGHUP.
    pub shared: Arc<Shared>,
    /// The Valkey store's ledger thread (none with the in-memory store).
    ledger: Option<LedgerThread>,
    /// The spend record's writer (none without `spend_record`): it ends after the workers.
    spend_writer: Option<spend_record::Writer>,
    shutdown: Arc<AtomicBool>,
    /// Held for the life of the process: the port lock.
    _port_lock: std::os::unix::net::UnixListener,
}

/// How long the ledger may take to hand the last spend to the store at shutdown.
const LEDGER_FINISH: Duration = Duration::from_secs(5);

impl Running {
    /// Graceful stop: workers stop accepting, let requests in flight finish (up to the
    /// configured grace), flush their spend and return their leases; then the ledger delivers
    /// it (or journals it) and stops.
    pub fn stop(self) {
        self.shutdown.store(true, Ordering::Relaxed);
        for worker in self.workers {
            let _ = worker.join();
        }
        if let Some(ledger) = self.ledger {
            ledger.finish(Instant::now() + LEDGER_FINISH);
        }
        // Every recorder went with its worker: the last lines are written and synced.
        if let Some(writer) = self.spend_writer {
            writer.finish();
        }
    }

    /// Blocks until every worker has exited (they exit only on `stop`).
    pub fn wait(self) {
        for worker in self.workers {
            let _ = worker.join();
        }
        if let Some(writer) = self.spend_writer {
            writer.finish();
        }
    }
}

/// Binds, then starts one pinned (if configured) runtime per worker. Returns once every
/// listener is bound; the workers run until the process exits.
/// Starts the workers; `resolvers` are one per upstream of `config.routes()`, in its order.
pub fn start(config: &Config, resolvers: Vec<Resolver>) -> Result<Running, StartError> {
    let workers = config.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let (listeners, addr, port_lock) =
        bind_listeners(SocketAddr::new(config.listen_addr, config.port), workers)?;
    // The live part (upstreams, keys, prices), checked whole before any thread starts: as a
    // reload checks it.
    let live = Live::new(config, resolvers)?;
    let cores = if config.pin_workers {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };
    let io = config.io.plan();
    match io {
        IoPlan::Uring { flags, entries } => {
            tracing::info!(driver = "io_uring", setup = %flags, entries, "I/O driver")
        }
        IoPlan::Epoll => tracing::info!(driver = "epoll", "I/O driver"),
    }
    let registry = Registry::new(listeners.len());
    let budgets = &config.budgets;
    let clock = system_clock();
    // Filled from the keys (the config's and the keyring's) before anything reads it.
    let limits = Arc::new(KeyLimits::default());
    let keyring = open_keyring(config, &limits, &clock)?;
    let (shared, keyring_version) =
        Shared::new(live, keyring.clone(), limits.clone(), registry.clone());
    if matches!(budgets.store, StoreKind::Valkey(_)) {
        // Other nodes make keys too: heard of within a poll.
        keyring::follow(keyring, shared.clone(), keyring_version).map_err(StartError::Thread)?;
    }
    let shard_count = listeners.len();
    // Holders are `node/boot/worker`: new at every start, so a restarted node neither renews
    // the leases of its previous run (they lapse) nor depends on its clock for sequence
    // numbers, and two nodes given one name by mistake still cannot skip each other's ops.
    let node = match &budgets.store {
        StoreKind::Valkey(valkey) => valkey.node_id.clone(),
        StoreKind::Memory => "local".to_string(),
    };
    // The clock, and random bits in case it stepped back (a holder name used twice would have
    // its new ops taken for replays of old ones and skipped).
    let boot = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let mut random = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random);
    let boot = format!("{boot:x}{:08x}", u32::from_le_bytes(random));
    let node = format!("{node}/{boot}");
    let (ledger, mut ledgers, journal): (_, Vec<(Ledger, Option<Inbox>)>, _) = match &budgets.store
    {
        StoreKind::Memory => {
            let store: Arc<dyn Store> = Arc::new(MemoryStore::new(limits.clone(), clock.clone()));
            let inline = (0..shard_count)
                .map(|_| (Ledger::Inline(store.clone()), None))
                .collect();
            (None, inline, None)
        }
        StoreKind::Valkey(settings) => {
            let (thread, handles, journal) = start_ledger(
                settings,
                limits.clone(),
                clock.clone(),
                shard_count,
                Holder::from(format!("{node}/ledger")),
            )?;
            registry.set_ledger(thread.stats.clone());
            let remote = handles
                .into_iter()
                .map(|(l, inbox)| (l, Some(inbox)))
                .collect();
            (Some(thread), remote, Some(journal))
        }
    };
    let (spend_writer, recorder) = match &config.spend_record {
        None => (None, None),
        Some(target) => {
            let (writer, recorder) = spend_record::Writer::start(target.clone())
                .map_err(|e| StartError::Store(format!("spend_record: {e}")))?;
            registry.set_spend_record(recorder.dropped());
            (Some(writer), Some(recorder))
        }
    };
    let shutdown = Arc::new(AtomicBool::new(false));
    let control_addr = match config.admin_listen {
        None => None,
        Some(admin_addr) => {
            let listener = std::net::TcpListener::bind(admin_addr).map_err(|e| match e.kind() {
                io::ErrorKind::AddrInUse => StartError::PortInUse(admin_addr),
                _ => StartError::Bind(admin_addr, e),
            })?;
            let control = ControlPlane {
                registry: registry.clone(),
                ledger: ledgers
                    .first()
                    .map(|(ledger, _)| ledger.clone())
                    .ok_or_else(|| StartError::Store("no worker".into()))?,
                shared: shared.clone(),
                admin_token: budgets.admin_token.clone(),
                period: budgets.period,
                timeouts: config.timeouts,
                stopping: shutdown.clone(),
            };
            let bound = control
                .start(listener, config)
                .map_err(StartError::Thread)?;
            tracing::info!(addr = %bound, "control plane (metrics, admin API) listening");
            Some(bound)
        }
    };
    let mut handles = Vec::with_capacity(workers);
    for (id, listener) in listeners.into_iter().enumerate() {
        let registry = registry.clone();
        let (ledger, inbox) = ledgers.remove(0);
        let holder = Holder::from(format!("{node}/{id}"));
        let budget = Budget {
            ledger,
            inbox,
            journal: journal
                .as_ref()
                .map(|j| j.worker(holder.clone(), &format!("{boot}-w{id}"))),
            holder,
            fail_open: budgets.fail_open,
            shared: shared.clone(),
            limits: limits.clone(),
            recorder: recorder.clone(),
            clock: clock.clone(),
            shards: shard_count,
        };
        let shutdown = shutdown.clone();
        let config = config.clone();

        let core = (!cores.is_empty()).then(|| cores[id % cores.len()]);
        let handle = std::thread::Builder::new()
            .name(format!("aura-worker-{id}"))
            .spawn(move || {
                if let Some(core) = core {
                    if !core_affinity::set_for_current(core) {
                        tracing::warn!(worker = id, core = core.id, "could not pin worker to core");
                    }
                }
                run_worker(id, listener, config, io, registry, budget, shutdown);
            })
            .map_err(StartError::Thread)?;
        handles.push(handle);
    }
    Ok(Running {
        addr,
        control_addr,
        shared,
        workers: handles,
        ledger,
        spend_writer,
        shutdown,
        _port_lock: port_lock,
    })
}

type Bound = (
    Vec<std::net::TcpListener>,
    SocketAddr,
    std::os::unix::net::UnixListener,
);

/// Binds `count` SO_REUSEPORT listeners on one address after checking nobody else holds it.
pub fn bind_listeners(addr: SocketAddr, count: usize) -> Result<Bound, StartError> {
    if addr.port() != 0 {
        // A plain bind fails if any socket (SO_REUSEPORT or not) already listens there.
        match std::net::TcpListener::bind(addr) {
            Ok(probe) => drop(probe),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                return Err(StartError::PortInUse(addr))
            }
            Err(e) => return Err(StartError::Bind(addr, e)),
        }
    }
    let mut listeners = Vec::with_capacity(count);
    let mut bound = addr;
    for _ in 0..count.max(1) {
        let listener = reuseport_listener(bound).map_err(|e| match e.kind() {
            io::ErrorKind::AddrInUse => StartError::PortInUse(bound),
            _ => StartError::Bind(bound, e),
        })?;
        bound = listener
            .local_addr()
            .map_err(|e| StartError::Bind(addr, e))?;
        listeners.push(listener);
    }
    // Two Aura processes starting at once could both pass the probe: the abstract socket
    // name is unique per network namespace and vanishes with the process.
    let name = format!("aura-port-{}-{}", bound.ip(), bound.port());
    let lock = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .and_then(|a| std::os::unix::net::UnixListener::bind_addr(&a))
        .map_err(|e| match e.kind() {
            io::ErrorKind::AddrInUse => StartError::PortInUse(bound),
            _ => StartError::Bind(bound, e),
        })?;
    Ok((listeners, bound, lock))
}

fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

#[allow(clippy::too_many_arguments)]
fn run_worker(
    id: usize,
    listener: std::net::TcpListener,
    config: Config,
    io: IoPlan,
    registry: Arc<Registry>,
    budget: Budget,
    shutdown: Arc<AtomicBool>,
) {
    let main = move |driver: Driver| async move {
        tracing::info!(worker = id, driver = driver.label(), "worker started");
        registry.set_driver(id, driver.label());
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(worker = id, error = %e, "cannot adopt listener");
                return;
            }
        };

        let shard = Shard::new(
            budget.ledger,
            ShardSettings {
                holder: budget.holder,
                workers: budget.shards,
                fail_open: budget.fail_open,
                clock: budget.clock,
                limits: budget.limits,
                // Holders hand back unused lease at their next flush; a refused request waits
                // for it.
                squeeze_wait: config.budgets.flush_interval * 3,
                journal: budget.journal,
            },
        );
        let proxy = match Proxy::new(budget.shared, id, &config, registry.clone(), shard) {
            Ok(proxy) => Rc::new(proxy.recording(budget.recorder)),
            Err(e) => {
                tracing::error!(worker = id, error = %e, "upstream setup failed");
                return;
            }
        };
        if let Some(inbox) = budget.inbox {
            monoio::spawn(take_ledger_replies(proxy.clone(), inbox));
        }
        monoio::spawn(publish_metrics(id, proxy.clone(), registry.clone()));
        monoio::spawn(flush_budget(proxy.clone(), config.budgets.flush_interval));
        monoio::spawn(trim_buffers(proxy.clone()));
        let cut = Rc::new(CutSignal::default());
        monoio::select! {
            _ = accept_loop(listener, proxy.clone(), cut.clone(), config.limits, config.timeouts) => {}
            _ = shutdown_requested(&shutdown) => {}
        }
        // The listener is closed: finish what is in flight, then hand over all spend.
        proxy.stop_keeping_alive();
        let deadline = Instant::now() + config.shutdown_grace;
        while proxy.in_flight() > 0 && Instant::now() < deadline {
            monoio::time::sleep(Duration::from_millis(10)).await;
        }
        if proxy.in_flight() > 0 {
            tracing::warn!(
                worker = id,
                requests = proxy.in_flight(),
                "shutdown grace over; requests cut"
            );
        }
        // Every connection still open drops what it was doing: a request in flight is settled
        // (billed, counted, logged), one half received is logged; idle ones just close.
        cut.fire();
        for _ in 0..100 {
            monoio::time::sleep(Duration::from_millis(1)).await;
            if proxy.in_flight() == 0 {
                break;
            }
        }
        proxy.close_budget();
        if let Some(snapshot) = proxy.metrics_if_changed(&mut metrics::Seen::default()) {
            registry.publish(id, snapshot);
        }
        tracing::info!(worker = id, "worker stopped");
    };
    match build_runtime(io) {
        Ok(monoio::FusionRuntime::Uring(mut rt)) => rt.block_on(main(Driver::IoUring)),
        Ok(monoio::FusionRuntime::Legacy(mut rt)) => rt.block_on(main(Driver::Epoll)),
        Err(e) => tracing::error!(worker = id, error = %e, "cannot build any runtime"),
    }
}

type Runtime = monoio::FusionRuntime<
    monoio::time::TimeDriver<monoio::IoUringDriver>,
    monoio::time::TimeDriver<monoio::LegacyDriver>,
>;

/// The runtime `plan` settled on; epoll when the ring still fails to build (RLIMIT_MEMLOCK on
/// 5.10/5.11 can refuse a full-size ring after a small probe ring passed).
pub fn build_runtime(plan: IoPlan) -> io::Result<Runtime> {
    let legacy = || -> io::Result<Runtime> {
        Ok(monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()?
            .into())
    };
    let IoPlan::Uring { flags, entries } = plan else {
        return legacy();
    };
    match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .with_entries(entries)
        .uring_builder(flags.builder())
        .enable_timer()
        .build()
    {
        Ok(rt) => Ok(rt.into()),
        Err(e) => {
            tracing::warn!(error = %e, "io_uring runtime failed to build; falling back to epoll");
            legacy()
        }
    }
}

/// Copies this worker's metrics to the registry every interval in which it recorded any, off
/// the request path.
async fn publish_metrics(id: usize, proxy: Rc<Proxy>, registry: Arc<Registry>) {
    let mut seen = metrics::Seen::default();
    loop {
        monoio::time::sleep(metrics::PUBLISH_EVERY).await;
        if let Some(snapshot) = proxy.metrics_if_changed(&mut seen) {
            registry.publish(id, snapshot);
        }
    }
}

/// Flushes this worker's settled spend to the store every interval, off the request path, and
/// keeps its budget clock ticking in between (however long the interval).
async fn flush_budget(proxy: Rc<Proxy>, every: std::time::Duration) {
    // Ticks of at most TICK that add up to the interval exactly.
    let ticks_per_flush = every
        .as_nanos()
        .div_ceil(crate::budget::shard::TICK.as_nanos().max(1))
        .max(1);
    let ticks_per_flush = u32::try_from(ticks_per_flush).unwrap_or(u32::MAX);
    let tick = every / ticks_per_flush;
    let mut ticks = 0;
    loop {
        monoio::time::sleep(tick).await;
        ticks += 1;
        if ticks >= ticks_per_flush {
            ticks = 0;
            proxy.flush_budget();
        } else {
            proxy.tick_budget();
        }
    }
}

/// The worker's side of the ledger thread: its answers, applied to this worker's shard.
async fn take_ledger_replies(proxy: Rc<Proxy>, mut inbox: Inbox) {
    while let Ok(reply) = inbox.recv().await {
        proxy.ledger_reply(reply);
    }
}

/// Resolves once the process has been asked to stop.
async fn shutdown_requested(flag: &AtomicBool) {
    while !flag.load(Ordering::Relaxed) {
        monoio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Returns buffers a burst left in this worker's pool, off the request path.
async fn trim_buffers(proxy: Rc<Proxy>) {
    loop {
        monoio::time::sleep(crate::buffers::TRIM_EVERY).await;
        proxy.trim_buffers();
    }
}

/// What each worker's budget shard is built from.
struct Budget {
    ledger: Ledger,
    /// Answers from the ledger thread (the Valkey store).
    inbox: Option<Inbox>,
    /// Where settled spend goes first (the Valkey store).
    journal: Option<WorkerJournal>,
    holder: Holder,
    fail_open: bool,
    /// The live configuration (upstreams, keys, prices), replaced by reloads.
    shared: Arc<Shared>,
    limits: Arc<KeyLimits>,
    clock: Clock,
    shards: usize,
    /// Where settled requests are recorded (`spend_record`).
    recorder: Option<Recorder>,
}

type LedgerParts = (LedgerThread, Vec<(Ledger, Inbox)>, Arc<Journal>);

/// Where admin-made keys are kept: Valkey, on a connection of its own, or the memory store's
/// state file.
fn open_keyring(
    config: &Config,
    limits: &Arc<KeyLimits>,
    clock: &Clock,
) -> Result<Arc<dyn Keyring>, StartError> {
    match &config.budgets.store {
        StoreKind::Valkey(settings) => Ok(Arc::new(valkey_store(settings, limits.clone(), clock)?)),
        // No file named and no admin API to make keys: none to keep.
        StoreKind::Memory
            if config.budgets.key_state_file.is_none() && config.budgets.admin_token.is_none() =>
        {
            Ok(Arc::new(FileKeyring::in_memory()))
        }
        StoreKind::Memory => {
            let path = config
                .budgets
                .key_state_file
                .clone()
                .unwrap_or_else(|| journal::default_dir(&ProcessEnv).join("keys.json"));
            let ring = FileKeyring::open(&path).map_err(|e| StartError::Store(e.to_string()))?;
            tracing::info!(file = %path.display(), "admin-made keys kept in a state file");
            Ok(Arc::new(ring))
        }
    }
}

/// A connection to the configured Valkey (made at its first call).
fn valkey_store(
    settings: &ValkeySettings,
    limits: Arc<KeyLimits>,
    clock: &Clock,
) -> Result<ValkeyStore, StartError> {
    match &settings.ca_file {
        None => ValkeyStore::new(
            settings.url.expose(),
            settings.timeout,
            limits.clone(),
            clock.clone(),
        ),
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                StartError::Store(format!("valkey_ca_file {}: {e}", path.display()))
            })?;
            if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                return Err(StartError::Store(format!(
                    "valkey_ca_file {}: no PEM certificate in it",
                    path.display()
                )));
            }
            ValkeyStore::with_ca(
                settings.url.expose(),
                pem,
                settings.timeout,
                limits.clone(),
                clock.clone(),
            )
        }
    }
    .map_err(|e| StartError::Store(e.to_string()))
}

/// The Valkey store: its connections (one for ops, one for admin calls), the journal
/// directory (locked; what an earlier run left there is replayed first), and the ledger thread.
fn start_ledger(
    settings: &ValkeySettings,
    limits: Arc<KeyLimits>,
    clock: Clock,
    workers: usize,
    holder: Holder,
) -> Result<LedgerParts, StartError> {
    let store = valkey_store(settings, limits.clone(), &clock)?;
    let dir = settings
        .journal_dir
        .clone()
        .unwrap_or_else(|| journal::default_dir(&ProcessEnv));
    let journal = Arc::new(Journal::open(&dir)?);
    let (segments, unreadable) = journal
        .leftovers()
        .map_err(|e| StartError::Journal(journal::JournalError::Dir(dir.clone(), e)))?;
    let now = clock();
    let mut replay = journal::plan_replay(segments, &|key| period_of(limits.window(key), now));
    replay.unreadable = unreadable;
    let legacy = &settings.legacy_journal;
    // The legacy journal knew only keys' own limits, all in one window.
    let legacy_ops = journal::legacy::read(legacy, period_of(limits.budget_window(), now))
        .map_err(|e| StartError::Journal(journal::JournalError::Legacy(e)))?;
    if let Some(ops) = legacy_ops {
        tracing::info!(
            ops = ops.len(),
            file = %legacy.display(),
            "replaying an earlier Aura's journal"
        );
        replay.ops.splice(0..0, ops);
        replay.files.push(legacy.clone());
    }
    let admin = store.second_connection();
    let (thread, handles) = LedgerThread::start(LedgerSettings {
        store: Arc::new(store),
        admin: Arc::new(admin),
        workers,
        timeout: settings.timeout,
        lease_ttl: valkey::LEASE_TTL,
        journal: Some(journal.clone()),
        replay,
        limits,
        clock,
        fsync_every: settings.fsync_every,
        holder,
    })
    .map_err(StartError::Thread)?;
    tracing::info!(node = settings.node_id.as_str(), journal = %dir.display(), "budgets in valkey");
    Ok((thread, handles, journal))
}

async fn accept_loop(
    listener: TcpListener,
    proxy: Rc<Proxy>,
    cut: Rc<CutSignal>,
    limits: Limits,
    timeouts: Timeouts,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                let (proxy, cut) = (proxy.clone(), cut.clone());
                monoio::spawn(async move {
                    monoio::select! {
                        _ = server::serve_connection(stream, proxy.as_ref(), limits, timeouts) => {}
                        _ = cut.fired() => {}
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                monoio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
