//! The ledger: the one path from workers to the budget store, off the request path.
//!
//! With the in-memory store the ledger is [`Ledger::Inline`]: a call takes the store's mutex and
//! returns. With Valkey it is [`Ledger::Remote`]: workers hand their ops to one ledger thread,
//! which owns the connection, and get the answers back in their inbox. The thread
//! - applies ops in the order each worker sent them, pipelined, exactly once (the store checks
//!   each op's sequence number, so resending after a timeout is harmless);
//! - keeps undelivered ops queued while the store is down, retries with back-off, and keeps a
//!   journal file of the spend they carry, replayed at the next start;
//! - tells a worker at once when the lease it waits for cannot be had, so the worker can apply
//!   its failure mode (open or closed) instead of waiting;
//! - returns a lease granted to a worker that no longer exists.
//!
//! A worker never blocks on the thread: a full channel leaves the spend in the worker, merged
//! into its next flush.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_channel::{mpsc as async_mpsc, oneshot};
use serde::{Deserialize, Serialize};

use super::op::{Account, Applied, Holder, Op, Settlement};
use super::store::{Store, StoreError};
use crate::auth::KeyId;

/// Messages a worker may have queued for the thread before it must merge instead.
const CHANNEL_DEPTH: usize = 1024;
/// Ops per store call.
const DELIVER_AT_ONCE: usize = 1024;
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// An idle ledger asks the store whether it answers this often.
const PING_EVERY: Duration = Duration::from_secs(5);

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

/// The worker's handle.
pub enum Ledger {
    Inline(Arc<dyn Store>),
    Remote(Remote),
}

pub struct Remote {
    worker: usize,
    to_thread: SyncSender<Message>,
    timeout: Duration,
    lease_ttl: Duration,
    last_known: Arc<LastKnown>,
}

/// The store's last word on each key's totals, from any worker's op on this node: a worker that
/// has not touched a key itself starts its failure mode from it rather than from nothing.
/// Written by the ledger thread, read by a worker only while the store is unreachable.
#[derive(Debug, Default)]
pub struct LastKnown(std::sync::Mutex<HashMap<KeyId, (Account, Instant)>>);

/// A key not heard of for this long is dropped from [`LastKnown`].
const FORGET_KNOWN_AFTER: Duration = Duration::from_secs(3600);

impl LastKnown {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<KeyId, (Account, Instant)>> {
        match self.0.lock() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    pub fn get(&self, key: KeyId) -> Option<Account> {
        self.lock().get(&key).map(|(account, _)| *account)
    }

    fn set(&self, key: KeyId, account: Account, now: Instant) {
        self.lock().insert(key, (account, now));
    }

    fn add_spent(&self, key: KeyId, spent: u64, now: Instant) {
        if let Some((account, at)) = self.lock().get_mut(&key) {
            account.spent = account.spent.saturating_add(spent);
            *at = now;
        }
    }

    fn forget_older_than(&self, age: Duration, now: Instant) {
        self.lock()
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < age);
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

/// A store call from a worker: run with the store, or with `None` while the store is known to
/// be unreachable (it then answers unavailable at once); returns the failure that marks the
/// store unreachable, if it hit one.
type Call = Box<dyn FnOnce(Option<&dyn Store>) -> Option<StoreError> + Send>;

enum Message {
    Ops { worker: usize, ops: Vec<Op> },
    Call(Call),
    Finish { deadline: Instant },
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

    fn hand_over(&self, ops: Vec<Op>, wait_for_room: bool) -> Submitted {
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
                };
                let sent = if wait_for_room {
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

    /// Runs `call` on the store: in place, or on the ledger thread within the store timeout.
    pub async fn call<T: Send + 'static>(
        &self,
        call: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        match self {
            Ledger::Inline(store) => call(store.as_ref()),
            Ledger::Remote(remote) => {
                let (tx, rx) = oneshot::channel();
                let job: Call = Box::new(move |store| {
                    let result = match store {
                        Some(store) => call(store),
                        None => Err(StoreError::Unavailable("unreachable, retrying".into())),
                    };
                    let failure = match &result {
                        Err(e @ StoreError::Unavailable(_)) => Some(e.clone()),
                        _ => None,
                    };
                    let _ = tx.send(result);
                    failure
                });
                let busy = || StoreError::Unavailable("the ledger is busy".into());
                remote
                    .to_thread
                    .try_send(Message::Call(job))
                    .map_err(|_| busy())?;
                match monoio::time::timeout(remote.timeout, rx).await {
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

    /// The store's last word on `key` from any worker of this node (remote stores only).
    pub fn last_known(&self, key: KeyId) -> Option<Account> {
        match self {
            Ledger::Inline(_) => None,
            Ledger::Remote(remote) => remote.last_known.get(key),
        }
    }

    /// How long a request may wait for a lease before the failure mode applies.
    pub fn wait(&self) -> Duration {
        match self {
            Ledger::Inline(_) => Duration::ZERO,
            Ledger::Remote(remote) => remote.timeout,
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
    /// Ops in the journal file.
    pub journaled: AtomicU64,
    pub applied: AtomicU64,
    /// Ops the store refused again and again (set aside in the rejected file).
    pub rejected: AtomicU64,
    /// Sum and count of store round trips, for a mean flush latency.
    pub call_nanos: AtomicU64,
    pub calls: AtomicU64,
}

/// The running ledger thread.
pub struct LedgerThread {
    to_thread: SyncSender<Message>,
    thread: std::thread::JoinHandle<()>,
    pub stats: Arc<LedgerStats>,
}

impl LedgerThread {
    /// Starts the thread; `workers` inboxes are made, one per worker, returned with their
    /// handles. Spend journaled by an earlier run is queued first.
    pub fn start(
        store: Arc<dyn Store>,
        workers: usize,
        timeout: Duration,
        lease_ttl: Duration,
        journal: PathBuf,
    ) -> std::io::Result<(LedgerThread, Vec<(Ledger, Inbox)>)> {
        let (to_thread, from_workers) = mpsc::sync_channel(CHANNEL_DEPTH);
        let last_known = Arc::new(LastKnown::default());
        let mut inboxes = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for worker in 0..workers {
            let (tx, rx) = async_mpsc::unbounded();
            inboxes.push(tx);
            let ledger = Ledger::Remote(Remote {
                worker,
                to_thread: to_thread.clone(),
                timeout,
                lease_ttl,
                last_known: last_known.clone(),
            });
            handles.push((ledger, rx));
        }
        let stats = Arc::new(LedgerStats::default());
        let mut state = Thread {
            store,
            inboxes,
            queue: VecDeque::new(),
            last_seq: HashMap::new(),
            retry_at: None,
            backoff: FIRST_BACKOFF,
            journal: Journal::new(journal),
            stats: stats.clone(),
            last_warning: None,
            orphans: Vec::new(),
            finishing: false,
            one_at_a_time: false,
            last_known,
            pruned_at: Instant::now(),
            // The first loop asks the store at once.
            heard_at: Instant::now()
                .checked_sub(PING_EVERY)
                .unwrap_or_else(Instant::now),
        };
        state.replay_journal();
        let thread = std::thread::Builder::new()
            .name("aura-ledger".into())
            .spawn(move || state.run(from_workers))?;
        Ok((
            LedgerThread {
                to_thread,
                thread,
                stats,
            },
            handles,
        ))
    }

    /// Delivers what is queued, until `deadline` at the latest (then it is journaled), and
    /// stops the thread. Call after the workers flushed for the last time.
    pub fn finish(self, deadline: Instant) {
        if self.to_thread.send(Message::Finish { deadline }).is_ok() {
            let _ = self.thread.join();
        }
    }
}

struct Queued {
    /// `None` for ops replayed from the journal: their worker is gone.
    worker: Option<usize>,
    op: Op,
    /// Handed to the store at least once, so it may have been applied: never merged.
    sent: bool,
    /// The worker was told its ask is unreachable.
    told: bool,
    /// Times the store refused this op alone as malformed.
    refusals: u32,
}

/// Times the store may refuse one op on its own before it is set aside.
const MAX_REFUSALS: u32 = 3;

struct Thread {
    store: Arc<dyn Store>,
    inboxes: Vec<async_mpsc::UnboundedSender<Reply>>,
    queue: VecDeque<Queued>,
    /// The newest sequence number seen per holder, to return leases of gone workers after it.
    last_seq: HashMap<Holder, u64>,
    /// Set after a failed delivery: no store call before then.
    retry_at: Option<Instant>,
    backoff: Duration,
    journal: Journal,
    stats: Arc<LedgerStats>,
    last_warning: Option<Instant>,
    /// Grants whose worker is gone: returned once every worker has sent its last op.
    orphans: Vec<(Holder, KeyId, u64)>,
    /// Every worker has stopped (its last flush is queued).
    finishing: bool,
    /// After the store refused a batch: ops go one by one to find the one it refuses.
    one_at_a_time: bool,
    last_known: Arc<LastKnown>,
    pruned_at: Instant,
    /// When the store last answered (or was last asked while idle).
    heard_at: Instant,
}

impl Thread {
    fn run(mut self, from_workers: Receiver<Message>) {
        let mut finish_by: Option<Instant> = None;
        loop {
            let mut wait = match (self.queue.is_empty(), self.retry_at) {
                (true, _) => Duration::from_secs(1),
                (false, None) => Duration::ZERO,
                (false, Some(at)) => at.saturating_duration_since(Instant::now()),
            };
            if let Some(deadline) = finish_by {
                wait = wait.min(deadline.saturating_duration_since(Instant::now()));
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
                    Message::Ops { worker, ops } => self.enqueue(Some(worker), ops),
                    Message::Call(call) => self.call(call),
                    Message::Finish { deadline } => {
                        finish_by = Some(deadline);
                        self.finishing = true;
                    }
                }
            }
            if self.finishing {
                self.return_orphans();
            }
            if self.retry_at.is_none_or(|at| Instant::now() >= at) {
                self.deliver();
                self.ping_when_idle();
            }
            if let Some(deadline) = finish_by {
                if self.queue.is_empty() || Instant::now() >= deadline {
                    self.journal_queue();
                    if !self.queue.is_empty() {
                        tracing::warn!(
                            ops = self.queue.len(),
                            journal = %self.journal.path.display(),
                            "budget store unreachable at shutdown: spend kept in the journal"
                        );
                    }
                    return;
                }
            }
        }
    }

    /// With nothing to send for a while, asks the store whether it answers, so `aura_store_up`
    /// tells the truth on an idle node and an outage is seen before traffic needs the store.
    fn ping_when_idle(&mut self) {
        let now = Instant::now();
        if !self.queue.is_empty() || now.saturating_duration_since(self.heard_at) < PING_EVERY {
            return;
        }
        self.heard_at = now;
        match self.store.ping() {
            Ok(()) => {
                if self.retry_at.take().is_some() {
                    tracing::info!("budget store reachable again");
                }
                self.backoff = FIRST_BACKOFF;
                self.stats.up.store(1, Ordering::Relaxed);
            }
            Err(error) => self.failed(&error),
        }
    }

    /// Runs a worker's store call, unless the store is known to be down (back-off running):
    /// then it is answered unavailable at once, so calls cannot hold up the queue.
    fn call(&mut self, call: Call) {
        let down = self.retry_at.is_some_and(|at| Instant::now() < at);
        if down {
            call(None);
        } else if let Some(error) = call(Some(self.store.as_ref())) {
            self.failed(&error);
        }
    }

    fn enqueue(&mut self, worker: Option<usize>, ops: Vec<Op>) {
        // Replayed ops may have been applied before the journal was written: never merged.
        let sent = worker.is_none();
        let now = Instant::now();
        for op in ops {
            if op.settle.spent > 0 {
                // Spend on its way counts now in what this node knows of the key.
                self.last_known.add_spent(op.key, op.settle.spent, now);
            }
            let last = self.last_seq.entry(op.holder.clone()).or_default();
            *last = (*last).max(op.seq);
            self.queue.push_back(Queued {
                worker,
                op,
                sent,
                told: false,
                refusals: 0,
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
                    if self.retry_at.take().is_some() {
                        tracing::info!("budget store reachable again");
                    }
                    self.backoff = FIRST_BACKOFF;
                    self.stats.up.store(1, Ordering::Relaxed);
                    self.heard_at = Instant::now();
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
        if self.journal.written {
            match self.journal.clear() {
                Ok(()) => self.stats.journaled.store(0, Ordering::Relaxed),
                Err(e) => tracing::error!(error = %e, "cannot clear the ledger journal"),
            }
        }
    }

    /// How many ops from the head go in one store call: at most one per holder and key, so a
    /// retried batch cannot hold an op older than one the store already applied from it (the
    /// older one's grant would then read as 0).
    fn batch_len(&self) -> usize {
        if self.one_at_a_time {
            return 1;
        }
        let mut seen = std::collections::HashSet::new();
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
        let entry = JournalEntry::of(&refused.op);
        let path = self.journal.path.with_extension("rejected");
        tracing::error!(
            %message,
            key_id = %refused.op.key,
            spent_nano = entry.spent,
            file = %path.display(),
            "budget store refused an op repeatedly; set aside"
        );
        let line = serde_json::to_string(&entry).unwrap_or_default();
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{line}").and_then(|()| f.sync_data()));
        if let Err(e) = written {
            tracing::error!(error = %e, %line, "cannot write the rejected op; it is in this log line only");
        }
        if let Some(inbox) = refused.worker.and_then(|w| self.inboxes.get(w)) {
            let _ = inbox.unbounded_send(Reply::Dropped { op: refused.op });
        }
    }

    fn answer(&mut self, queued: Queued, applied: Applied) {
        let now = Instant::now();
        self.last_known.set(queued.op.key, applied.account, now);
        if now.saturating_duration_since(self.pruned_at) >= Duration::from_secs(60) {
            self.pruned_at = now;
            self.last_known.forget_older_than(FORGET_KNOWN_AFTER, now);
        }
        let Some(worker) = queued.worker else {
            return;
        };
        let granted = applied.granted;
        let holder = queued.op.holder.clone();
        let key = queued.op.key;
        let reply = Reply::Applied {
            op: queued.op,
            applied,
        };
        let delivered = self
            .inboxes
            .get(worker)
            .is_some_and(|inbox| inbox.unbounded_send(reply).is_ok());
        if !delivered && granted > 0 {
            // The worker is gone: its grant goes back, after its last flush.
            self.orphans.push((holder, key, granted));
            if self.finishing {
                self.return_orphans();
            }
        }
    }

    /// Returns the grants of gone workers, numbered after each worker's last op. Only once
    /// every worker has stopped: before, a worker's last flush could still be on its way
    /// with the same sequence number.
    fn return_orphans(&mut self) {
        for (holder, key, granted) in std::mem::take(&mut self.orphans) {
            let last = self.last_seq.entry(holder.clone()).or_default();
            *last += 1;
            let op = Op {
                holder,
                seq: *last,
                key,
                settle: Settlement {
                    returned: granted,
                    ..Settlement::default()
                },
                ask: None,
            };
            self.queue.push_back(Queued {
                worker: None,
                op,
                sent: false,
                told: false,
                refusals: 0,
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
        self.journal_queue();
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

    /// While the store is down, settlements never sent merge per holder and key into the
    /// newest one (which keeps its newer sequence number), so the queue stays as small as the
    /// set of active keys however long the outage lasts.
    fn coalesce(&mut self) {
        let mergeable = |q: &Queued| !q.sent && q.op.ask.is_none();
        let mut newest: HashMap<(Holder, KeyId), usize> = HashMap::new();
        for (i, q) in self.queue.iter().enumerate() {
            if mergeable(q) {
                newest.insert((q.op.holder.clone(), q.op.key), i);
            }
        }
        let mut carried: HashMap<(Holder, KeyId), Settlement> = HashMap::new();
        let queue = std::mem::take(&mut self.queue);
        for (i, mut q) in queue.into_iter().enumerate() {
            if mergeable(&q) {
                let id = (q.op.holder.clone(), q.op.key);
                if newest.get(&id) != Some(&i) {
                    carried.entry(id).or_default().merge(q.op.settle);
                    continue;
                }
                if let Some(earlier) = carried.remove(&id) {
                    q.op.settle.merge(earlier);
                }
            }
            self.queue.push_back(q);
        }
    }

    /// Writes the spend of every queued op to the journal (replacing it).
    fn journal_queue(&mut self) {
        let entries: Vec<JournalEntry> = self
            .queue
            .iter()
            .filter(|q| !q.op.settle.is_empty())
            .map(|q| JournalEntry::of(&q.op))
            .collect();
        if entries.is_empty() && !self.journal.written {
            return;
        }
        match self.journal.write(&entries) {
            Ok(()) => self
                .stats
                .journaled
                .store(entries.len() as u64, Ordering::Relaxed),
            Err(e) => tracing::error!(
                error = %e,
                journal = %self.journal.path.display(),
                "cannot write the ledger journal: undelivered spend is only in memory"
            ),
        }
    }

    fn replay_journal(&mut self) {
        match self.journal.read() {
            Ok((ops, bad)) => {
                if bad > 0 {
                    tracing::error!(lines = bad, "ledger journal lines unreadable, skipped");
                }
                if !ops.is_empty() {
                    tracing::info!(ops = ops.len(), "replaying the ledger journal");
                    self.journal.written = true;
                    self.stats
                        .journaled
                        .store(ops.len() as u64, Ordering::Relaxed);
                    self.enqueue(None, ops);
                }
            }
            Err(e) => tracing::error!(
                error = %e,
                journal = %self.journal.path.display(),
                "cannot read the ledger journal"
            ),
        }
    }
}

/// Spend not yet in the store, one JSON object per line; the whole file is rewritten (through a
/// temporary file and a rename) so it always holds exactly the undelivered queue.
struct Journal {
    path: PathBuf,
    /// The file exists with entries the store may not have.
    written: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct JournalEntry {
    holder: String,
    seq: u64,
    key: String,
    spent: u64,
    from_lease: u64,
    returned: u64,
}

impl JournalEntry {
    fn of(op: &Op) -> JournalEntry {
        JournalEntry {
            holder: op.holder.to_string(),
            seq: op.seq,
            key: op.key.to_string(),
            spent: op.settle.spent,
            from_lease: op.settle.from_lease,
            returned: op.settle.returned,
        }
    }

    fn op(self) -> Option<Op> {
        Some(Op {
            holder: Holder::from(self.holder),
            seq: self.seq,
            key: KeyId::parse(&self.key)?,
            settle: Settlement {
                spent: self.spent,
                from_lease: self.from_lease,
                returned: self.returned,
            },
            ask: None,
        })
    }
}

impl Journal {
    fn new(path: PathBuf) -> Journal {
        Journal {
            path,
            written: false,
        }
    }

    fn write(&mut self, entries: &[JournalEntry]) -> std::io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        {
            let mut file = std::fs::File::create(&tmp)?;
            let mut text = String::new();
            for entry in entries {
                text.push_str(&serde_json::to_string(entry).map_err(std::io::Error::other)?);
                text.push('\n');
            }
            file.write_all(text.as_bytes())?;
            file.sync_data()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        sync_dir(&self.path);
        self.written = !entries.is_empty();
        if !self.written {
            std::fs::remove_file(&self.path)?;
        }
        Ok(())
    }

    fn clear(&mut self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        sync_dir(&self.path);
        self.written = false;
        Ok(())
    }

    /// The journaled ops and how many lines could not be read.
    fn read(&self) -> std::io::Result<(Vec<Op>, usize)> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
            Err(e) => return Err(e),
        };
        let mut ops = Vec::new();
        let mut bad = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<JournalEntry>(line)
                .ok()
                .and_then(JournalEntry::op)
            {
                Some(op) => ops.push(op),
                None => bad += 1,
            }
        }
        Ok((ops, bad))
    }
}

/// Makes a rename or removal durable (best effort: some filesystems refuse a directory fsync).
fn sync_dir(path: &Path) {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::store::{system_clock, MemoryStore};
    use crate::config::Period;

    fn thread(workers: usize) -> (Thread, Vec<Inbox>) {
        let store = Arc::new(MemoryStore::new(
            1_000_000,
            HashMap::new(),
            Period::Never,
            system_clock(),
        ));
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..workers).map(|_| async_mpsc::unbounded()).unzip();
        let path = std::env::temp_dir().join(format!(
            "aura-ledger-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let thread = Thread {
            store,
            inboxes: senders,
            queue: VecDeque::new(),
            last_seq: HashMap::new(),
            retry_at: None,
            backoff: FIRST_BACKOFF,
            journal: Journal::new(path),
            stats: Arc::new(LedgerStats::default()),
            last_warning: None,
            orphans: Vec::new(),
            finishing: false,
            one_at_a_time: false,
            last_known: Arc::new(LastKnown::default()),
            pruned_at: Instant::now(),
            heard_at: Instant::now(),
        };
        (thread, receivers)
    }

    fn op(holder: &str, seq: u64, key: &str, spent: u64, ask: Option<Ask>) -> Op {
        Op {
            holder: Holder::from(holder),
            seq,
            key: KeyId::of(key),
            settle: Settlement {
                spent,
                ..Settlement::default()
            },
            ask,
        }
    }

    use crate::budget::op::Ask;

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
        );
        assert_eq!(t.batch_len(), 3);
        t.one_at_a_time = true;
        assert_eq!(t.batch_len(), 1);
    }

    #[test]
    fn unsent_spend_merges_into_the_newest_op_but_replayed_or_sent_ops_never_merge() {
        let (mut t, _inboxes) = thread(1);
        // Replayed from a journal: may have been applied already.
        t.enqueue(None, vec![op("n/0", 1, "sk-a", 100, None)]);
        t.enqueue(
            Some(0),
            vec![
                op("n/0", 2, "sk-a", 10, None),
                op("n/0", 3, "sk-a", 20, None),
            ],
        );
        t.coalesce();
        let left: Vec<(u64, u64)> = t
            .queue
            .iter()
            .map(|q| (q.op.seq, q.op.settle.spent))
            .collect();
        assert_eq!(left, vec![(1, 100), (3, 30)]);
    }

    #[test]
    fn a_gone_workers_grant_is_returned_after_its_last_op() {
        let (mut t, inboxes) = thread(1);
        drop(inboxes);
        let ask = Some(Ask { need: 5, parts: 1 });
        t.enqueue(Some(0), vec![op("n/0", 7, "sk-a", 0, ask)]);
        t.deliver();
        assert!(
            t.queue.is_empty(),
            "the grant waits until every worker has stopped"
        );
        assert_eq!(t.orphans.len(), 1);
        // The worker's last flush arrives after the grant was answered.
        t.enqueue(Some(0), vec![op("n/0", 8, "sk-a", 4, None)]);
        t.finishing = true;
        t.return_orphans();
        let seqs: Vec<u64> = t.queue.iter().map(|q| q.op.seq).collect();
        assert_eq!(
            seqs,
            vec![8, 9],
            "the return is numbered after the last flush"
        );
        t.deliver();
        let account = t.store.account(KeyId::of("sk-a")).unwrap();
        assert_eq!((account.spent, account.leased), (4, 0));
    }

    #[test]
    fn the_journal_holds_exactly_the_undelivered_spend_and_reads_back() {
        let (mut t, _inboxes) = thread(1);
        t.enqueue(
            Some(0),
            vec![
                op("n/0", 1, "sk-a", 10, None),
                op("n/0", 2, "sk-b", 0, None),
            ],
        );
        t.journal_queue();
        let (ops, bad) = t.journal.read().unwrap();
        assert_eq!(bad, 0);
        assert_eq!(
            ops,
            vec![op("n/0", 1, "sk-a", 10, None)],
            "empty ops are not kept"
        );
        t.deliver();
        assert!(!t.journal.path.exists(), "cleared once delivered");
    }
}
