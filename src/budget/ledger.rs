//! The ledger: the one path from workers to the budget store, off the request path.
//!
//! With the in-memory store the ledger is [`Ledger::Inline`]: a call takes the store's mutex and
//! returns. With Valkey it is [`Ledger::Remote`]: workers hand their ops to one ledger thread,
//! which owns the connection, and get the answers back in their inbox. The thread
//! - applies ops in the order each worker sent them, pipelined, exactly once (the store checks
//!   each op's sequence number, so resending after a timeout is harmless);
//! - first replays what an earlier run's journal holds (journal.rs), then deletes it;
//! - keeps undelivered ops queued while the store is down, retries with back-off, and pings
//!   the store meanwhile so workers learn at once when it is back (they keep their spend,
//!   journaled, while it is away);
//! - tells a worker at once when the lease it waits for cannot be had, so the worker can apply
//!   its failure mode (open or closed) instead of waiting;
//! - notices a store that lost its data (restarted empty) and re-establishes what this node
//!   knows: the spend it last heard of each key, and (through the workers) their leases;
//! - fsyncs the workers' journal segments every `journal_fsync_interval_ms`.
//!
//! Admin calls (the admin API, `/v1/usage`) go to a thread of their own with its own
//! connection, so a long listing never delays a lease ask. A worker never blocks on either
//! thread: a full channel leaves the spend in the worker, merged into its next flush.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_channel::{mpsc as async_mpsc, oneshot};
use serde::Serialize;

use super::journal::{Journal, Replay};
use super::op::{period_of, Account, Applied, Epoch, Holder, KeyLimits, Op, PeriodSpend, Restore};
use super::store::{Clock, Store, StoreError};
use crate::auth::KeyId;

/// Messages a worker may have queued for the thread before it must merge instead.
const CHANNEL_DEPTH: usize = 1024;
/// Admin calls waiting for the admin thread before a new one is refused.
const ADMIN_DEPTH: usize = 64;
/// How long an admin API call may take (a listing reads every account): far longer than a
/// request may wait for the store, and off the request path.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Ops per store call.
const DELIVER_AT_ONCE: usize = 1024;
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// An idle ledger asks the store whether it answers this often.
const PING_EVERY: Duration = Duration::from_secs(5);
/// After a store was found to have lost its data, more answers saying so within this long are
/// the same loss (every holder of every key finds it once).
const LOSS_WINDOW: Duration = Duration::from_secs(10);

/// What the ledger thread sends back to a worker.
#[derive(Debug)]
pub enum Reply {
    /// An op was applied.
    Applied { op: Op, applied: Applied },
    /// The store could not be reached for the op with this lease ask; it stays queued and its
    /// real answer comes later.
    Unreachable { key: KeyId, seq: u64 },
    /// The store refused the op itself and it was set aside: it will never be applied, so the
    /// worker takes back what it handed over in it.
    Dropped { op: Op },
}

/// Where a worker receives the ledger thread's answers.
pub type Inbox = async_mpsc::UnboundedReceiver<Reply>;

/// The worker's handle (a clone serves admin calls elsewhere: the control plane).
#[derive(Clone)]
pub enum Ledger {
    Inline(Arc<dyn Store>),
    Remote(Remote),
}

#[derive(Clone)]
pub struct Remote {
    worker: usize,
    to_thread: SyncSender<Message>,
    to_admin: SyncSender<Call>,
    timeout: Duration,
    lease_ttl: Duration,
    last_known: Arc<LastKnown>,
    stats: Arc<LedgerStats>,
}

/// The store's last word on each key's totals, from any worker's op on this node, and the spend
/// handed over since: a worker that has not touched a key itself starts its failure mode from
/// both rather than from nothing, and a store that lost its data gets back the first (what it
/// had confirmed; the spend on its way reaches it anyway). Written by the ledger thread; spend
/// only grows within a period, so an answer that shows less (a store that came back empty)
/// does not replace it.
#[derive(Debug, Default)]
pub struct LastKnown(std::sync::Mutex<HashMap<KeyId, Known>>);

#[derive(Debug, Clone)]
struct Known {
    /// As the store last answered.
    account: Account,
    /// The account's epoch when it answered so.
    epoch: Option<Epoch>,
    period: u64,
    /// Spend of `period` handed to the ledger and not yet answered.
    on_its_way: u64,
    at: Instant,
}

/// A key not heard of for this long is dropped from [`LastKnown`].
const FORGET_KNOWN_AFTER: Duration = Duration::from_secs(3600);

impl LastKnown {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<KeyId, Known>> {
        match self.0.lock() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The key's totals, spend on its way included, and the period their spend is of.
    pub fn get(&self, key: KeyId) -> Option<(Account, u64)> {
        self.lock().get(&key).map(|k| {
            let spent = k.account.spent.saturating_add(k.on_its_way);
            (Account { spent, ..k.account }, k.period)
        })
    }

    /// The store answered an op carrying `carried` of this period's spend. Within one epoch of
    /// the account spend only grows: the largest answer is kept. An answer from a new epoch
    /// (the store lost the account) replaces what was known only once it shows at least as
    /// much: until then the old knowledge, and its epoch, are what a restore must give back.
    fn set(&self, key: KeyId, answer: &Applied, period: u64, carried: u64, now: Instant) {
        let mut map = self.lock();
        let entry = map.entry(key).or_insert(Known {
            account: answer.account,
            epoch: answer.epoch.clone(),
            period,
            on_its_way: 0,
            at: now,
        });
        if entry.period > period {
            // An op of an older period (a replay) says nothing of the current one.
            return;
        }
        let on_its_way = if entry.period == period {
            entry.on_its_way.saturating_sub(carried)
        } else {
            0
        };
        let same_epoch = entry.epoch.is_none() || entry.epoch == answer.epoch;
        let (spent, epoch) = if entry.period != period {
            (answer.account.spent, answer.epoch.clone())
        } else if same_epoch {
            (
                entry.account.spent.max(answer.account.spent),
                answer.epoch.clone(),
            )
        } else if answer.account.spent >= entry.account.spent {
            (answer.account.spent, answer.epoch.clone())
        } else {
            (entry.account.spent, entry.epoch.clone())
        };
        *entry = Known {
            account: Account {
                spent,
                ..answer.account
            },
            epoch,
            period,
            on_its_way,
            at: now,
        };
    }

    /// Forgets `key` (an admin changed it: what this node heard is no longer so).
    pub fn forget(&self, key: KeyId) {
        self.lock().remove(&key);
    }

    fn add_spent(&self, key: KeyId, spent: &super::op::Spend, now: Instant) {
        if let Some(known) = self.lock().get_mut(&key) {
            known.on_its_way = known
                .on_its_way
                .saturating_add(spent.in_period(known.period));
            known.at = now;
        }
    }

    fn forget_older_than(&self, age: Duration, now: Instant) {
        self.lock()
            .retain(|_, k| now.saturating_duration_since(k.at) < age);
    }

    /// Each key's totals as the store last answered them (spend on its way left out), the
    /// period of that spend, and the epoch it was heard in.
    fn confirmed(&self) -> Vec<(KeyId, Account, u64, Option<Epoch>)> {
        self.lock()
            .iter()
            .map(|(k, v)| (*k, v.account, v.period, v.epoch.clone()))
            .collect()
    }
}

/// What [`Ledger::submit`] did with a worker's ops.
pub enum Submitted {
    /// Applied in place (the in-memory store): here are the answers.
    Applied(Vec<Applied>),
    /// Queued for the ledger thread: answers arrive in the worker's inbox.
    Queued,
    /// The thread is backed up: nothing was taken; keep the spend and try at the next flush.
    Full,
}

/// An admin call from a worker, run on the admin thread.
type Call = Box<dyn FnOnce(&dyn Store) + Send>;

enum Message {
    /// `last`: the worker's final flush; it sends nothing after.
    Ops {
        worker: usize,
        ops: Vec<Op>,
        last: bool,
    },
    Finish {
        deadline: Instant,
    },
}

impl Ledger {
    pub fn submit(&self, ops: Vec<Op>) -> Submitted {
        self.hand_over(ops, false)
    }

    /// The worker's last flush: waits for room in the ledger's queue rather than keep spend
    /// in a worker that is about to exit.
    pub fn submit_last(&self, ops: Vec<Op>) -> Submitted {
        self.hand_over(ops, true)
    }

    fn hand_over(&self, ops: Vec<Op>, last: bool) -> Submitted {
        match self {
            Ledger::Inline(store) => match store.apply(&ops) {
                Ok(applied) => Submitted::Applied(applied),
                // The in-memory store does not fail; were one to, the spend stays in the worker.
                Err(_) => Submitted::Full,
            },
            Ledger::Remote(remote) => {
                let message = Message::Ops {
                    worker: remote.worker,
                    ops,
                    last,
                };
                let sent = if last {
                    remote.to_thread.send(message).is_ok()
                } else {
                    match remote.to_thread.try_send(message) {
                        Ok(()) => true,
                        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
                    }
                };
                if sent {
                    Submitted::Queued
                } else {
                    Submitted::Full
                }
            }
        }
    }

    /// Runs a read for a client (`/v1/usage`) on the store: in place, or on the admin thread
    /// (its own connection) within the store timeout.
    pub async fn call<T: Send + 'static>(
        &self,
        call: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let timeout = match self {
            Ledger::Inline(_) => Duration::ZERO,
            Ledger::Remote(remote) => remote.timeout,
        };
        self.call_within(timeout, call).await
    }

    /// Runs an admin API call: as [`Ledger::call`], with the admin API's longer deadline.
    pub async fn admin_call<T: Send + 'static>(
        &self,
        call: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.call_within(ADMIN_TIMEOUT, call).await
    }

    async fn call_within<T: Send + 'static>(
        &self,
        timeout: Duration,
        call: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        match self {
            Ledger::Inline(store) => call(store.as_ref()),
            Ledger::Remote(remote) => {
                let (tx, rx) = oneshot::channel();
                let job: Call = Box::new(move |store| {
                    let _ = tx.send(call(store));
                });
                let busy = || StoreError::Unavailable("the admin connection is busy".into());
                remote.to_admin.try_send(job).map_err(|_| busy())?;
                match monoio::time::timeout(timeout, rx).await {
                    Ok(Ok(answer)) => answer,
                    Ok(Err(_canceled)) => Err(busy()),
                    Err(_elapsed) => Err(StoreError::Unavailable("timed out".into())),
                }
            }
        }
    }

    /// How long the store keeps a lease its holder stops renewing (the in-memory store: forever).
    pub fn lease_ttl(&self) -> Option<Duration> {
        match self {
            Ledger::Inline(_) => None,
            Ledger::Remote(remote) => Some(remote.lease_ttl),
        }
    }

    /// The store's last word on `key` from any worker of this node, and the period of its
    /// spend (remote stores only).
    pub fn last_known(&self, key: KeyId) -> Option<(Account, u64)> {
        match self {
            Ledger::Inline(_) => None,
            Ledger::Remote(remote) => remote.last_known.get(key),
        }
    }

    /// Forgets what this node heard of `key` (an admin changed the account).
    pub fn forget_known(&self, key: KeyId) {
        if let Ledger::Remote(remote) = self {
            remote.last_known.forget(key);
        }
    }

    /// How long a request may wait for a lease before the failure mode applies.
    pub fn wait(&self) -> Duration {
        match self {
            Ledger::Inline(_) => Duration::ZERO,
            Ledger::Remote(remote) => remote.timeout,
        }
    }

    /// Whether the store answered last time it was asked.
    pub fn reachable(&self) -> bool {
        match self {
            Ledger::Inline(_) => true,
            Ledger::Remote(remote) => remote.stats.up.load(Ordering::Relaxed) == 1,
        }
    }

    /// How many times the store was found to have lost its data (workers then re-establish
    /// their leases there).
    pub fn losses(&self) -> u64 {
        match self {
            Ledger::Inline(_) => 0,
            Ledger::Remote(remote) => remote.stats.losses.load(Ordering::Relaxed),
        }
    }
}

/// The ledger's health, read by `/metrics`.
#[derive(Debug, Default)]
pub struct LedgerStats {
    /// 1 while the last store call succeeded.
    pub up: AtomicU64,
    pub errors: AtomicU64,
    /// Ops waiting for the store.
    pub queued: AtomicU64,
    /// Ops of an earlier run's journal not yet applied.
    pub replaying: AtomicU64,
    pub applied: AtomicU64,
    /// Ops the store refused again and again (set aside in the rejected file).
    pub rejected: AtomicU64,
    /// Times the store was found to have lost its data.
    pub losses: AtomicU64,
    /// Accounts found lost (each holder of each key finds it once).
    pub lost_accounts: AtomicU64,
    /// Sum and count of store round trips, for a mean flush latency.
    pub call_nanos: AtomicU64,
    pub calls: AtomicU64,
    /// Journal write failures (from the journal).
    pub journal: std::sync::OnceLock<Arc<Journal>>,
}

impl LedgerStats {
    pub fn journal_errors(&self) -> u64 {
        self.journal
            .get()
            .map_or(0, |j| j.errors.load(Ordering::Relaxed))
    }
}

/// What the ledger thread is started with.
pub struct LedgerSettings {
    /// The store ops go to.
    pub store: Arc<dyn Store>,
    /// The same store on a connection of its own, for admin calls.
    pub admin: Arc<dyn Store>,
    pub workers: usize,
    pub timeout: Duration,
    pub lease_ttl: Duration,
    /// The workers' journals (their directory), fsynced and cleared by the thread.
    pub journal: Option<Arc<Journal>>,
    /// An earlier run's journal, to apply first.
    pub replay: Replay,
    /// Each account's window (the period its spend is of).
    pub limits: Arc<KeyLimits>,
    pub clock: Clock,
    pub fsync_every: Duration,
    /// The thread's own name in the store (for the ops that re-establish spend after a loss).
    pub holder: Holder,
}

/// The running ledger thread.
pub struct LedgerThread {
    to_thread: SyncSender<Message>,
    thread: std::thread::JoinHandle<()>,
    admin: std::thread::JoinHandle<()>,
    pub stats: Arc<LedgerStats>,
}

impl LedgerThread {
    /// Starts the thread and the admin thread; `workers` inboxes are made, one per worker,
    /// returned with their handles. Ops of an earlier run's journal are queued first.
    pub fn start(
        settings: LedgerSettings,
    ) -> std::io::Result<(LedgerThread, Vec<(Ledger, Inbox)>)> {
        let (to_thread, from_workers) = mpsc::sync_channel(CHANNEL_DEPTH);
        let (to_admin, admin_calls) = mpsc::sync_channel::<Call>(ADMIN_DEPTH);
        let last_known = Arc::new(LastKnown::default());
        let stats = Arc::new(LedgerStats::default());
        if let Some(journal) = &settings.journal {
            let _ = stats.journal.set(journal.clone());
        }
        let mut inboxes = Vec::with_capacity(settings.workers);
        let mut handles = Vec::with_capacity(settings.workers);
        for worker in 0..settings.workers {
            let (tx, rx) = async_mpsc::unbounded();
            inboxes.push(tx);
            let ledger = Ledger::Remote(Remote {
                worker,
                to_thread: to_thread.clone(),
                to_admin: to_admin.clone(),
                timeout: settings.timeout,
                lease_ttl: settings.lease_ttl,
                last_known: last_known.clone(),
                stats: stats.clone(),
            });
            handles.push((ledger, rx));
        }
        let admin_store = settings.admin;
        let admin = std::thread::Builder::new()
            .name("aura-admin".into())
            .spawn(move || {
                for call in admin_calls {
                    call(admin_store.as_ref());
                }
            })?;
        let mut state = Thread {
            store: settings.store,
            inboxes,
            queue: VecDeque::new(),
            retry_at: None,
            backoff: FIRST_BACKOFF,
            journal: settings.journal,
            replay_files: Vec::new(),
            stats: stats.clone(),
            last_warning: None,
            one_at_a_time: false,
            last_known,
            pruned_at: Instant::now(),
            // The first loop asks the store at once.
            heard_at: Instant::now()
                .checked_sub(PING_EVERY)
                .unwrap_or_else(Instant::now),
            limits: settings.limits,
            clock: settings.clock,
            fsync_every: settings.fsync_every,
            synced_at: Instant::now(),
            holder: settings.holder,
            next_seq: 0,
            last_loss: None,
            workers: settings.workers,
            closed: HashSet::new(),
        };
        state.replay(settings.replay);
        let thread = std::thread::Builder::new()
            .name("aura-ledger".into())
            .spawn(move || state.run(from_workers))?;
        Ok((
            LedgerThread {
                to_thread,
                thread,
                admin,
                stats,
            },
            handles,
        ))
    }

    /// Delivers what is queued, until `deadline` at the latest (what is left stays in the
    /// journal), and stops the threads. Call after the workers flushed for the last time.
    pub fn finish(self, deadline: Instant) {
        if self.to_thread.send(Message::Finish { deadline }).is_ok() {
            let _ = self.thread.join();
        }
        // The admin thread ends once every handle (and so every sender) is gone.
        drop(self.to_thread);
        let _ = self.admin;
    }
}

struct Queued {
    /// `None` for the thread's own ops (a replay, a re-establishment).
    worker: Option<usize>,
    op: Op,
    /// Handed to the store at least once, so it may have been applied: never merged.
    sent: bool,
    /// The worker was told its ask is unreachable.
    told: bool,
    /// Times the store refused this op alone as malformed.
    refusals: u32,
    /// Part of the replay of an earlier run's journal.
    replayed: bool,
}

/// Times the store may refuse one op on its own before it is set aside.
const MAX_REFUSALS: u32 = 3;

struct Thread {
    store: Arc<dyn Store>,
    inboxes: Vec<async_mpsc::UnboundedSender<Reply>>,
    queue: VecDeque<Queued>,
    /// Set after a failed delivery: no store call before then.
    retry_at: Option<Instant>,
    backoff: Duration,
    journal: Option<Arc<Journal>>,
    /// The replayed journal's files, deleted once its last op is applied.
    replay_files: Vec<PathBuf>,
    stats: Arc<LedgerStats>,
    last_warning: Option<Instant>,
    /// After the store refused a batch: ops go one by one to find the one it refuses.
    one_at_a_time: bool,
    last_known: Arc<LastKnown>,
    pruned_at: Instant,
    /// When the store last answered (or was last asked while idle).
    heard_at: Instant,
    limits: Arc<KeyLimits>,
    clock: Clock,
    fsync_every: Duration,
    synced_at: Instant,
    holder: Holder,
    next_seq: u64,
    /// When the store was last found to have lost its data.
    last_loss: Option<Instant>,
    workers: usize,
    /// Workers whose last flush arrived.
    closed: HashSet<usize>,
}

impl Thread {
    fn run(mut self, from_workers: Receiver<Message>) {
        let mut finish_by: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let mut wait = match (self.queue.is_empty(), self.retry_at) {
                (true, None) => Duration::from_secs(1),
                (false, None) => Duration::ZERO,
                (_, Some(at)) => at.saturating_duration_since(now),
            };
            if self.journal.is_some() {
                wait = wait.min((self.synced_at + self.fsync_every).saturating_duration_since(now));
            }
            if let Some(deadline) = finish_by {
                wait = wait.min(deadline.saturating_duration_since(now));
            }
            let first = match from_workers.recv_timeout(wait) {
                Ok(message) => Some(message),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    finish_by.get_or_insert_with(Instant::now);
                    None
                }
            };
            for message in first.into_iter().chain(from_workers.try_iter()) {
                match message {
                    Message::Ops { worker, ops, last } => {
                        self.enqueue(Some(worker), ops, false);
                        if last {
                            self.closed.insert(worker);
                        }
                    }
                    Message::Finish { deadline } => finish_by = Some(deadline),
                }
            }
            if self.retry_at.is_none_or(|at| Instant::now() >= at) {
                self.deliver();
                self.ping_when_idle();
            }
            self.sync_journal(false);
            if let Some(deadline) = finish_by {
                if self.queue.is_empty() || Instant::now() >= deadline {
                    self.sync_journal(true);
                    self.finish();
                    return;
                }
            }
        }
    }

    /// The end: with everything delivered and every worker's last flush in, this run's
    /// journal is no longer needed; otherwise it stays for the next start.
    fn finish(&mut self) {
        let Some(journal) = &self.journal else {
            return;
        };
        if self.queue.is_empty() && self.closed.len() == self.workers {
            journal.remove_live();
        } else {
            tracing::warn!(
                ops = self.queue.len(),
                journal = %journal.dir().display(),
                "budget store unreachable at shutdown: spend kept in the journal, replayed at the next start"
            );
        }
    }

    fn sync_journal(&mut self, now_anyway: bool) {
        let Some(journal) = &self.journal else {
            return;
        };
        if now_anyway || self.synced_at.elapsed() >= self.fsync_every {
            journal.sync();
            self.synced_at = Instant::now();
        }
    }

    /// The period of the account's window the clock is in.
    fn period_now(&self, key: KeyId) -> u64 {
        period_of(self.limits.window(key), (self.clock)())
    }

    /// Queues an earlier run's journal ahead of everything else.
    fn replay(&mut self, replay: Replay) {
        for path in &replay.unreadable {
            tracing::error!(file = %path.display(), "journal segment unreadable (not Aura's, or damaged): left in place");
        }
        if replay.ops.is_empty() {
            if let Some(journal) = &self.journal {
                journal.remove(&replay.files);
            }
            return;
        }
        let spent: u64 = replay.ops.iter().map(|op| op.settle.spent.total()).sum();
        tracing::info!(
            ops = replay.ops.len(),
            spent_nano = spent,
            files = replay.files.len(),
            "replaying the journal of an earlier run"
        );
        self.replay_files = replay.files;
        self.stats
            .replaying
            .store(replay.ops.len() as u64, Ordering::Relaxed);
        self.enqueue(None, replay.ops, true);
    }

    /// With nothing to send for a while, or while the store is away, asks the store whether it
    /// answers, so `aura_store_up` tells the truth on an idle node, an outage is seen before
    /// traffic needs the store, and workers hand their spend over as soon as it is back.
    fn ping_when_idle(&mut self) {
        let now = Instant::now();
        let down = self.retry_at.is_some();
        if !self.queue.is_empty()
            || (!down && now.saturating_duration_since(self.heard_at) < PING_EVERY)
        {
            return;
        }
        self.heard_at = now;
        match self.store.ping() {
            Ok(()) => self.reachable_again(),
            Err(error) => self.failed(&error),
        }
    }

    fn reachable_again(&mut self) {
        if self.retry_at.take().is_some() {
            tracing::info!("budget store reachable again");
        }
        self.backoff = FIRST_BACKOFF;
        self.stats.up.store(1, Ordering::Relaxed);
        self.heard_at = Instant::now();
    }

    fn enqueue(&mut self, worker: Option<usize>, ops: Vec<Op>, replayed: bool) {
        let now = Instant::now();
        for op in ops {
            if !replayed && !op.settle.spent.is_empty() {
                // Spend on its way counts now in what this node knows of the key.
                self.last_known.add_spent(op.key, &op.settle.spent, now);
            }
            self.queue.push_back(Queued {
                worker,
                op,
                // Replayed ops may have been applied before: never merged.
                sent: replayed,
                told: false,
                refusals: 0,
                replayed,
            });
        }
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            // The store is down: tell new askers now rather than after the back-off.
            self.tell_askers();
        }
        self.stats
            .queued
            .store(self.queue.len() as u64, Ordering::Relaxed);
    }

    fn deliver(&mut self) {
        while !self.queue.is_empty() {
            let n = self.batch_len();
            let ops: Vec<Op> = self.queue.iter().take(n).map(|q| q.op.clone()).collect();
            self.queue.iter_mut().take(n).for_each(|q| q.sent = true);
            let started = Instant::now();
            match self.store.apply(&ops) {
                Ok(applied) => {
                    self.stats.calls.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .call_nanos
                        .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    self.stats.applied.fetch_add(n as u64, Ordering::Relaxed);
                    let done: Vec<Queued> = self.queue.drain(..n).collect();
                    for (queued, applied) in done.into_iter().zip(applied) {
                        self.answer(queued, applied);
                    }
                    self.reachable_again();
                }
                Err(StoreError::Protocol(message)) if n > 1 => {
                    // The store answered, but refused something in the batch: find it.
                    tracing::warn!(%message, ops = n, "budget store refused a batch; retrying op by op");
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    self.one_at_a_time = true;
                }
                Err(StoreError::Protocol(message)) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    let refusals = self.queue.front_mut().map_or(0, |q| {
                        q.refusals += 1;
                        q.refusals
                    });
                    if refusals < MAX_REFUSALS {
                        self.failed(&StoreError::Protocol(message));
                        return;
                    }
                    if let Some(refused) = self.queue.pop_front() {
                        self.set_aside(refused, &message);
                    }
                }
                Err(error) => {
                    self.failed(&error);
                    return;
                }
            }
        }
        self.one_at_a_time = false;
        self.stats.queued.store(0, Ordering::Relaxed);
    }

    /// How many ops from the head go in one store call: at most one per holder and key, so a
    /// retried batch cannot hold an op older than one the store already applied from it (the
    /// older one's grant would then read as 0).
    fn batch_len(&self) -> usize {
        if self.one_at_a_time {
            return 1;
        }
        let mut seen = HashSet::new();
        self.queue
            .iter()
            .take(DELIVER_AT_ONCE)
            .take_while(|q| seen.insert((q.op.holder.clone(), q.op.key)))
            .count()
            .max(1)
    }

    /// An op the store refused on its own `MAX_REFUSALS` times (a bug, or data it cannot take):
    /// kept in the rejected file for an operator, so the ops behind it are not held up.
    fn set_aside(&mut self, refused: Queued, message: &str) {
        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        let entry = SetAside::of(&refused.op);
        tracing::error!(
            %message,
            key_id = %refused.op.key,
            spent_nano = refused.op.settle.spent.total(),
            "budget store refused an op repeatedly; set aside"
        );
        let line = serde_json::to_string(&entry).unwrap_or_default();
        let written = match &self.journal {
            Some(journal) => journal.set_aside(&line),
            None => Err(std::io::Error::other("no journal directory")),
        };
        if let Err(e) = written {
            tracing::error!(error = %e, %line, "cannot write the rejected op; it is in this log line only");
        }
        if refused.replayed {
            self.replayed_one();
        }
        if let Some(inbox) = refused.worker.and_then(|w| self.inboxes.get(w)) {
            let _ = inbox.unbounded_send(Reply::Dropped { op: refused.op });
        }
    }

    /// One op of the replay is done; the last one lets its files go.
    fn replayed_one(&mut self) {
        let left = self
            .stats
            .replaying
            .load(Ordering::Relaxed)
            .saturating_sub(1);
        self.stats.replaying.store(left, Ordering::Relaxed);
        if left == 0 {
            if let Some(journal) = &self.journal {
                journal.remove(&self.replay_files);
                tracing::info!(files = self.replay_files.len(), "journal replayed");
            }
            self.replay_files.clear();
        }
    }

    fn answer(&mut self, queued: Queued, applied: Applied) {
        let now = Instant::now();
        if applied.lost {
            // Before this answer is taken in: the restores carry what was heard before it.
            self.store_lost_data(now);
        }
        // Replayed spend never counted as on its way.
        let carried = if queued.replayed {
            0
        } else {
            queued.op.settle.spent.in_period(queued.op.period)
        };
        self.last_known
            .set(queued.op.key, &applied, queued.op.period, carried, now);
        if now.saturating_duration_since(self.pruned_at) >= Duration::from_secs(60) {
            self.pruned_at = now;
            self.last_known.forget_older_than(FORGET_KNOWN_AFTER, now);
        }
        if queued.replayed {
            self.replayed_one();
        }
        let Some(worker) = queued.worker else {
            return;
        };
        let reply = Reply::Applied {
            op: queued.op,
            applied,
        };
        // A worker that is gone closed its leases in its last op.
        if let Some(inbox) = self.inboxes.get(worker) {
            if inbox.unbounded_send(reply).is_err() {
                tracing::debug!(worker, "an answer for a worker that has stopped");
            }
        }
    }

    /// The store answered an op as if it had never heard of a holder that it had: it lost its
    /// data (restarted without persistence, flushed). Said loudly once per loss; what this node
    /// knows goes back: the spend it last heard of each key (the store keeps the largest floor
    /// any node gives it, plus what was spent since), the limits it last heard, and, through
    /// the workers (who watch `losses`), their leases.
    fn store_lost_data(&mut self, now: Instant) {
        self.stats.lost_accounts.fetch_add(1, Ordering::Relaxed);
        if self
            .last_loss
            .is_some_and(|t| now.saturating_duration_since(t) < LOSS_WINDOW)
        {
            return;
        }
        self.last_loss = Some(now);
        self.stats.losses.fetch_add(1, Ordering::Relaxed);
        let known = self.last_known.confirmed();
        tracing::error!(
            keys = known.len(),
            "BUDGET STORE LOST ITS DATA (restarted without persistence, or flushed): spend, leases and admin limits were gone; re-establishing what this node knows. Configure Valkey persistence (appendonly yes) to avoid this"
        );
        for (key, account, known_period, epoch) in known {
            // Applied only where the account's epoch is no longer the one heard: accounts the
            // store kept are left as they are.
            let Some(epoch) = epoch else {
                continue;
            };
            let period = self.period_now(key);
            self.next_seq += 1;
            let mut op = Op::new(self.holder.clone(), self.next_seq, key, period);
            op.epoch = Some(epoch);
            op.restore = Some(Restore {
                held: None,
                floor: (known_period == period).then_some(PeriodSpend {
                    period,
                    nano: account.spent,
                }),
                limit: Some(account.limit),
            });
            // The thread's own name holds no lease: its ops close nothing that exists.
            op.close = true;
            self.queue.push_back(Queued {
                worker: None,
                op,
                sent: false,
                told: false,
                refusals: 0,
                replayed: false,
            });
        }
    }

    fn failed(&mut self, error: &StoreError) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        self.stats.up.store(0, Ordering::Relaxed);
        let now = Instant::now();
        if self
            .last_warning
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
        {
            self.last_warning = Some(now);
            tracing::warn!(%error, queued = self.queue.len(), "budget store call failed; retrying");
        }
        if self.retry_at.is_some() {
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        }
        self.retry_at = Some(now + self.backoff);
        self.tell_askers();
        self.coalesce();
        self.stats
            .queued
            .store(self.queue.len() as u64, Ordering::Relaxed);
    }

    /// Workers waiting on a lease learn that it cannot be had now.
    fn tell_askers(&mut self) {
        for queued in self.queue.iter_mut().filter(|q| !q.told) {
            if let (Some(worker), Some(_)) = (queued.worker, queued.op.ask) {
                queued.told = true;
                if let Some(inbox) = self.inboxes.get(worker) {
                    let _ = inbox.unbounded_send(Reply::Unreachable {
                        key: queued.op.key,
                        seq: queued.op.seq,
                    });
                }
            }
        }
    }

    /// While the store is down (or after any failed call), plain settlements never sent merge per holder and key into the
    /// next one (which keeps its newer sequence number), so the queue stays as small as the set
    /// of active keys. Only an unbroken run of such ops merges: one carried past another op of
    /// the same holder and key (an ask, a close) would be applied after an op numbered above it,
    /// and a journal replay would then skip its spend as already applied.
    fn coalesce(&mut self) {
        let mergeable = |q: &Queued| {
            !q.sent && q.op.ask.is_none() && q.op.restore.is_none() && !q.op.close && !q.op.forget
        };
        let queue = std::mem::take(&mut self.queue);
        let mut merged: Vec<Option<Queued>> = Vec::with_capacity(queue.len());
        // The position in `merged` of the latest op of each holder and key.
        let mut latest: HashMap<(Holder, KeyId), usize> = HashMap::new();
        for mut q in queue {
            let id = (q.op.holder.clone(), q.op.key);
            if mergeable(&q) {
                let earlier = latest
                    .get(&id)
                    .and_then(|&at| merged.get_mut(at))
                    .filter(|slot| slot.as_ref().is_some_and(mergeable))
                    .and_then(Option::take);
                if let Some(earlier) = earlier {
                    q.op.settle.merge(&earlier.op.settle);
                }
            }
            latest.insert(id, merged.len());
            merged.push(Some(q));
        }
        self.queue = merged.into_iter().flatten().collect();
    }
}

/// An op set aside, as the rejected file keeps it (key id and amounts, never the key).
#[derive(Debug, Serialize)]
struct SetAside {
    holder: String,
    seq: u64,
    key: String,
    spent: Vec<(u64, u64)>,
    from_lease: u64,
    returned: u64,
}

impl SetAside {
    fn of(op: &Op) -> SetAside {
        SetAside {
            holder: op.holder.to_string(),
            seq: op.seq,
            key: op.key.to_string(),
            spent: op.settle.spent.iter().map(|p| (p.period, p.nano)).collect(),
            from_lease: op.settle.from_lease,
            returned: op.settle.returned,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::op::{Ask, Spend};
    use crate::budget::store::{system_clock, MemoryStore};

    fn thread(workers: usize) -> (Thread, Vec<Inbox>) {
        let limits = Arc::new(KeyLimits::new(1_000_000, HashMap::new()));
        let store = Arc::new(MemoryStore::new(limits.clone(), system_clock()));
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..workers).map(|_| async_mpsc::unbounded()).unzip();
        let thread = Thread {
            store,
            inboxes: senders,
            queue: VecDeque::new(),
            retry_at: None,
            backoff: FIRST_BACKOFF,
            journal: None,
            replay_files: Vec::new(),
            stats: Arc::new(LedgerStats::default()),
            last_warning: None,
            one_at_a_time: false,
            last_known: Arc::new(LastKnown::default()),
            pruned_at: Instant::now(),
            heard_at: Instant::now(),
            limits,
            clock: system_clock(),
            fsync_every: Duration::from_secs(1),
            synced_at: Instant::now(),
            holder: Holder::from("n/b/ledger"),
            next_seq: 0,
            last_loss: None,
            workers,
            closed: HashSet::new(),
        };
        (thread, receivers)
    }

    fn op(holder: &str, seq: u64, key: &str, spent: u64, ask: Option<Ask>) -> Op {
        let mut op = Op::new(Holder::from(holder), seq, KeyId::of(key), 0);
        op.settle.spent = Spend::of(0, spent);
        op.ask = ask;
        op
    }

    #[test]
    fn a_batch_holds_one_op_per_holder_and_key() {
        let (mut t, _inboxes) = thread(1);
        let ask = Some(Ask { need: 5, parts: 2 });
        t.enqueue(
            Some(0),
            vec![
                op("n/0", 1, "sk-a", 0, ask),
                op("n/0", 2, "sk-b", 3, None),
                op("n/1", 1, "sk-a", 3, None),
                // The same holder and key again: a retried batch must not hold both.
                op("n/0", 3, "sk-a", 3, None),
            ],
            false,
        );
        assert_eq!(t.batch_len(), 3);
        t.one_at_a_time = true;
        assert_eq!(t.batch_len(), 1);
    }

    #[test]
    fn unsent_spend_merges_into_the_newest_op_but_replayed_or_sent_ops_never_merge() {
        let (mut t, _inboxes) = thread(1);
        // Replayed from a journal: may have been applied already.
        t.enqueue(None, vec![op("n/0", 1, "sk-a", 100, None)], true);
        t.enqueue(
            Some(0),
            vec![
                op("n/0", 2, "sk-a", 10, None),
                op("n/0", 3, "sk-a", 20, None),
            ],
            false,
        );
        t.coalesce();
        let left: Vec<(u64, u64)> = t
            .queue
            .iter()
            .map(|q| (q.op.seq, q.op.settle.spent.total()))
            .collect();
        assert_eq!(left, vec![(1, 100), (3, 30)]);
    }

    /// Spend carried past an ask of the same holder and key would be applied after an op
    /// numbered above it: a replay after a kill would skip it as applied.
    #[test]
    fn spend_never_merges_past_another_op_of_its_key() {
        let (mut t, _inboxes) = thread(1);
        let ask = Some(Ask { need: 5, parts: 2 });
        t.enqueue(
            Some(0),
            vec![
                op("n/0", 5, "sk-a", 10, None),
                op("n/0", 6, "sk-b", 1, None),
                op("n/0", 7, "sk-a", 0, ask),
                op("n/0", 8, "sk-a", 20, None),
                op("n/0", 9, "sk-a", 30, None),
                op("n/0", 10, "sk-b", 2, None),
            ],
            false,
        );
        t.coalesce();
        let left: Vec<(u64, u64)> = t
            .queue
            .iter()
            .map(|q| (q.op.seq, q.op.settle.spent.total()))
            .collect();
        assert_eq!(left, vec![(5, 10), (7, 0), (9, 50), (10, 3)]);
    }

    fn answer(spent: u64, epoch: &str) -> Applied {
        Applied {
            account: Account {
                limit: 100,
                spent,
                leased: 0,
            },
            epoch: Some(Epoch::from(epoch)),
            ..Applied::default()
        }
    }

    #[test]
    fn what_a_node_last_heard_does_not_shrink_within_an_epoch() {
        let known = LastKnown::default();
        let key = KeyId::of("sk-a");
        let now = Instant::now();
        let seen = |spent| {
            Some((
                Account {
                    limit: 100,
                    spent,
                    leased: 0,
                },
                7,
            ))
        };
        known.set(key, &answer(50, "e1"), 7, 0, now);
        known.set(key, &answer(30, "e1"), 7, 0, now);
        assert_eq!(
            known.get(key),
            seen(50),
            "an answer behind another keeps the larger"
        );
        // An older period's answer (a replay) says nothing of the current one.
        known.set(key, &answer(99, "e1"), 6, 0, now);
        assert_eq!(known.get(key), seen(50));
        // Spend on its way counts for the failure mode, not as what the store confirmed.
        known.add_spent(key, &Spend::of(7, 5), now);
        assert_eq!(known.get(key), seen(55));
        known.set(key, &answer(55, "e1"), 7, 5, now);
        assert_eq!(known.get(key), seen(55));
        // The store lost the account: a smaller answer from the new epoch does not replace
        // what a restore must give back, and the epoch it was heard in stays with it.
        known.set(key, &answer(3, "e2"), 7, 0, now);
        assert_eq!(known.get(key), seen(55));
        assert_eq!(known.confirmed()[0].3.as_deref(), Some("e1"));
        // Once the new epoch shows at least as much, it is what is known.
        known.set(key, &answer(60, "e2"), 7, 0, now);
        assert_eq!(known.get(key), seen(60));
        assert_eq!(known.confirmed()[0].3.as_deref(), Some("e2"));
        known.set(key, &answer(1, "e2"), 8, 0, now);
        assert_eq!(known.get(key).map(|(a, p)| (a.spent, p)), Some((1, 8)));
    }

    #[test]
    fn a_store_that_lost_its_data_gets_back_what_the_node_heard_in_its_epoch() {
        let (mut t, _inboxes) = thread(1);
        let now = Instant::now();
        let mut heard = answer(40, "e1");
        heard.account.limit = 500;
        t.last_known.set(KeyId::of("sk-a"), &heard, 0, 0, now);
        t.store_lost_data(now);
        t.store_lost_data(now);
        assert_eq!(
            t.stats.losses.load(Ordering::Relaxed),
            1,
            "one loss, counted once"
        );
        assert_eq!(t.stats.lost_accounts.load(Ordering::Relaxed), 2);
        let restores: Vec<(Option<&str>, Option<Restore>)> = t
            .queue
            .iter()
            .map(|q| (q.op.epoch.as_deref(), q.op.restore))
            .collect();
        assert_eq!(
            restores,
            vec![(
                Some("e1"),
                Some(Restore {
                    held: None,
                    floor: Some(PeriodSpend {
                        period: 0,
                        nano: 40
                    }),
                    limit: Some(500),
                })
            )]
        );
    }
}
