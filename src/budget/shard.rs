//! A worker's budget shard: per active key, a lease (a slice of the key's budget granted by the
//! store), the part of it reserved by requests in flight, and spend settled since the last flush.
//! Admission is a local check against the lease: no lock, no shared atomic, no store call,
//! unless the lease cannot cover the request (then one lease ask through the ledger, which
//! grants the need plus a slice of what is left, sized so the last dollars are not stranded in
//! one worker; near the limit, other workers are asked to hand back what they do not use).
//!
//! Reserve, then settle: a request reserves its upper cost estimate before it is forwarded and
//! settles to its real cost at the end (0 when it failed), so concurrent requests cannot spend
//! beyond the limit except by their estimates' error. A [`Reservation`] settles even when its
//! request is dropped half-way (a drop guard). With a remote store every settled cost is first
//! written to this worker's journal (journal.rs), stamped with the budget period it was settled
//! in, so a kill at any instant loses none of it.
//!
//! `flush` (every flush interval, off the request path) hands settled spend to the ledger,
//! returns leases of keys gone idle and renews held ones; while the store is unreachable it
//! keeps spend here (journaled) and the failure mode decides: admit on what is known (open) or
//! refuse (closed).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use super::journal::{Appended, Record, WorkerJournal};
use super::ledger::{Ledger, Reply, Submitted};
use super::op::{
    period_of, Account, Accounts, Applied, Ask, Budget, Epoch, Holder, KeyLimits, Meter, Op,
    PeriodSpend, Restore, Settlement, Spend,
};
use super::store::Clock;
use crate::auth::{KeyId, KeyIdMap};
use crate::config::Period;

/// An idle key's lease goes back to the store after this long without a request.
pub const IDLE_RETURN: Duration = Duration::from_secs(1);
/// How often a worker reads the clock for its shard (`tick`), and so the most its idea of the
/// time (a cost's period, a key's last use) may lag: a clock read costs more than the rest of a
/// request's reserve and settle.
pub const TICK: Duration = Duration::from_millis(50);
/// A held lease is renewed every third of its store's lifetime.
const RENEWALS_PER_LIFETIME: u32 = 3;
/// Lease asks one request may make before it is refused (others may take each grant first).
const MAX_ASKS: u32 = 3;
/// A lease unconfirmed for two thirds of its store's lifetime is no longer admitted on: the
/// store may give it back to the key's budget soon (the worker is cut off from the store).
const LAPSE_AFTER_PARTS: u32 = 3;

/// The budget held for one request between admission and settle, in each account it is
/// charged to. Settle it with [`Reservation::settle`]; one dropped unsettled (its request was
/// cut) is billed in full if the request reached the upstream, else released. A concurrency
/// account is always released.
#[must_use = "a reservation holds budget until it is settled"]
pub struct Reservation<'s> {
    shard: &'s Shard,
    accounts: Accounts,
    amount: u64,
    sent: bool,
    settled: bool,
}

impl Reservation<'_> {
    /// The first account it is charged to (a key's own).
    pub fn key(&self) -> KeyId {
        self.accounts.first().unwrap_or(KeyId::from_bytes([0; 8]))
    }

    pub fn accounts(&self) -> Accounts {
        self.accounts
    }

    pub fn amount_nano(&self) -> u64 {
        self.amount
    }

    /// The request has gone upstream: from now on it may cost money.
    pub fn mark_sent(&mut self) {
        self.sent = true;
    }

    pub fn is_sent(&self) -> bool {
        self.sent
    }

    /// Ends the request: the reservation becomes its real cost (0 releases it).
    pub fn settle(mut self, cost: u64) {
        self.settled = true;
        for key in self.accounts.iter() {
            self.shard.settle(key, self.amount, cost, false);
        }
    }

    /// The upstream refused the key (401/403): nothing is spent, and once its requests are done
    /// nothing of the key is kept, here or in the store.
    pub fn settle_refused_key(mut self) {
        self.settled = true;
        // Only the key's own account is the key's; its team's stay.
        for (i, key) in self.accounts.iter().enumerate() {
            self.shard.settle(key, self.amount, 0, i == 0);
        }
    }
}

impl std::fmt::Debug for Reservation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("accounts", &self.accounts)
            .field("amount", &self.amount)
            .field("sent", &self.sent)
            .finish()
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.settled {
            let cost = if self.sent { self.amount } else { 0 };
            for key in self.accounts.iter() {
                self.shard.settle(key, self.amount, cost, false);
            }
        }
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// An account cannot reserve the estimate (amounts in the account's unit).
    Denied {
        account: KeyId,
        remaining_nano: u64,
        estimate_nano: u64,
    },
    /// The store cannot be reached for a lease and the failure mode is closed.
    Unavailable,
}

#[derive(Debug, Default)]
struct Lease {
    /// The account's window and meter, as configured when the lease was made. Neither
    /// changes for an account: its id is made from them (governance.rs), but for a key's own
    /// account, whose window is `budget_period` (a setting read at start).
    window: Period,
    meter: Meter,
    /// Granted by the store and not yet spent or returned (reservations included).
    held: u64,
    /// Reserved by requests in flight (may exceed `held` for requests admitted fail-open).
    reserved: u64,
    in_flight: u32,
    /// Settled and not handed over yet, by period.
    pending: Settlement,
    /// The sequence number of the newest journal record in `pending`.
    pending_seq: u64,
    /// Ops handed to the ledger with spend the store has not confirmed: their sequence number
    /// and spend (what a journal snapshot must still carry).
    unconfirmed: Vec<(u64, Spend)>,
    last_used: Option<Instant>,
    /// The last grant: a free lease below a quarter of it is topped up at flush.
    last_grant: u64,
    /// The sequence number of the lease ask in flight.
    asking: Option<u64>,
    /// The last answered ask: its sequence number and grant.
    answered: Option<(u64, u64)>,
    /// The store could not be reached for the ask in flight.
    unreachable: bool,
    /// The ask with this sequence number was refused by the store and set aside.
    dropped: Option<u64>,
    /// The store's last word on the key, and the period its spend is of.
    known: Option<(Account, u64)>,
    /// Spend of that period handed to the ledger since, not yet answered.
    on_its_way: u64,
    /// The sequence number of the newest op handed to the ledger for the key, and of the newest
    /// answered (or set aside): a key is not forgotten while an op of it is unanswered, so a
    /// late answer is never taken for news about a key this worker no longer follows.
    last_sent: u64,
    last_answered: u64,
    /// The account's epoch as the store last answered (none: not heard, or forgotten).
    epoch: Option<Epoch>,
    /// The sequence number of the newest op that may have dropped the account: answers to
    /// older ops tell of an account that may be gone, so their epoch is not taken.
    forgot: u64,
    /// When this worker last sent the store an op for the key (renewals are due from it).
    renewed: Option<Instant>,
    /// When the store last answered an op of this worker for the key, renewing the lease
    /// there; a lease the store has not confirmed for a while may have lapsed.
    confirmed: Option<Instant>,
    /// Another worker was refused a lease while this one held some: hand back what is unused.
    squeezed: bool,
    /// The upstream refused the key: forget it once its requests are done.
    refused: bool,
    /// The store lost data somewhere: the next flush sends this key an op, so the store can
    /// tell whether it lost this account too (and take back what this worker knows).
    renew_now: bool,
}

impl Lease {
    fn of(budget: Budget) -> Lease {
        Lease {
            window: budget.window,
            meter: budget.meter,
            ..Lease::default()
        }
    }

    /// The key's totals as this worker counts them: the store's last word plus the spend on
    /// its way there.
    fn seen(&self) -> Option<(Account, u64)> {
        self.known.map(|(account, period)| {
            let spent = account.spent.saturating_add(self.on_its_way);
            (Account { spent, ..account }, period)
        })
    }

    fn free(&self) -> u64 {
        self.held.saturating_sub(self.reserved)
    }

    fn idle(&self, now: Instant) -> bool {
        self.in_flight == 0
            && self.asking.is_none()
            && self
                .last_used
                .is_none_or(|t| now.saturating_duration_since(t) >= IDLE_RETURN)
    }
}

/// How a shard is set up.
pub struct ShardSettings {
    /// This worker's name in the store.
    pub holder: Holder,
    /// How many shards share the store (each lease takes at most half a share of what is left).
    pub workers: usize,
    /// With the store unreachable: admit on what is known, or refuse.
    pub fail_open: bool,
    /// Unix seconds (tests move it).
    pub clock: Clock,
    /// Configured limits: what a key never heard of may spend while the store is unreachable.
    pub limits: std::sync::Arc<KeyLimits>,
    /// How long a request refused while other workers hold the key's budget waits for them to
    /// hand it back before asking once more (zero: it does not wait).
    pub squeeze_wait: Duration,
    /// Where settled spend goes first (remote stores only).
    pub journal: Option<WorkerJournal>,
}

pub struct Shard {
    ledger: Ledger,
    /// How long the store keeps a lease its holder does not renew (none: forever).
    lease_ttl: Option<Duration>,
    holder: Holder,
    next_seq: Cell<u64>,
    /// A lease takes at most 1/slice_parts of a key's unleased budget beyond its need.
    slice_parts: u64,
    fail_open: bool,
    clock: Clock,
    limits: std::sync::Arc<KeyLimits>,
    squeeze_wait: Duration,
    journal: Option<RefCell<WorkerJournal>>,
    keys: RefCell<KeyIdMap<Lease>>,
    /// Requests waiting for a lease answer.
    waiters: RefCell<Vec<Waker>>,
    /// The store losses the ledger has seen, as of this shard's last flush.
    losses_seen: Cell<u64>,
    /// `close` has run: everything was billed and handed over.
    closed: Cell<bool>,
    /// Every lease's free part is owed back to the store (`surrender`), until a flush hands
    /// it over (one that cannot, with the store away, leaves it owed).
    surrender_owed: Cell<bool>,
    /// The time as of the last `tick`.
    ticked: Cell<Ticked>,
}

/// The time as a worker last read it.
#[derive(Clone, Copy)]
struct Ticked {
    at: Instant,
    /// Unix seconds.
    unix: u64,
    /// The period of each window it falls in.
    periods: [u64; 4],
}

impl Ticked {
    fn read(clock: &Clock) -> Ticked {
        let now = clock();
        Ticked {
            at: Instant::now(),
            unix: now,
            periods: WINDOWS.map(|window| period_of(window, now)),
        }
    }

    fn period(&self, window: Period) -> u64 {
        let at = WINDOWS.iter().position(|w| *w == window).unwrap_or(0);
        self.periods[at]
    }
}

/// Every window an account may have.
const WINDOWS: [Period; 4] = [
    Period::Never,
    Period::Minute,
    Period::Daily,
    Period::Monthly,
];

impl Shard {
    pub fn new(ledger: Ledger, settings: ShardSettings) -> Shard {
        // The holder is new at every start (runtime.rs), so its sequence starts anew too.
        Shard {
            lease_ttl: ledger.lease_ttl(),
            losses_seen: Cell::new(ledger.losses()),
            ledger,
            holder: settings.holder,
            next_seq: Cell::new(0),
            slice_parts: 2 * settings.workers.max(1) as u64,
            fail_open: settings.fail_open,
            limits: settings.limits,
            squeeze_wait: settings.squeeze_wait,
            journal: settings.journal.map(RefCell::new),
            keys: RefCell::new(KeyIdMap::default()),
            waiters: RefCell::new(Vec::new()),
            closed: Cell::new(false),
            surrender_owed: Cell::new(false),
            ticked: Cell::new(Ticked::read(&settings.clock)),
            clock: settings.clock,
        }
    }

    /// Reads the clock: the worker calls it every `TICK` (and each flush does).
    pub fn tick(&self) {
        self.ticked.set(Ticked::read(&self.clock));
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    fn seq(&self) -> u64 {
        let seq = self.next_seq.get() + 1;
        self.next_seq.set(seq);
        seq
    }

    /// The period of `window` as of the last tick.
    fn period_now(&self, window: Period) -> u64 {
        self.ticked.get().period(window)
    }

    /// Unix seconds as of the last tick.
    pub fn unix_now(&self) -> u64 {
        self.ticked.get().unix
    }

    /// What the account has left in its current period as this worker knows it: the store's
    /// last word, less what this worker spent since and holds for requests in flight (none: no
    /// request of it came here yet).
    pub fn headroom(&self, key: KeyId) -> Option<u64> {
        let keys = self.keys.borrow();
        let lease = keys.get(&key)?;
        lease.known?;
        let pending = lease.pending.spent.in_period(self.period_now(lease.window));
        Some(
            self.known_remaining(lease)
                .saturating_sub(pending)
                .saturating_sub(lease.reserved),
        )
    }

    /// The key's lease, made (with its configured window and meter) if it has none.
    fn lease<'k>(&self, keys: &'k mut KeyIdMap<Lease>, key: KeyId) -> &'k mut Lease {
        keys.entry(key)
            .or_insert_with(|| Lease::of(self.limits.budget(key)))
    }

    /// Reserves `estimate` nano-dollars for one request of `key`: from the lease when it
    /// covers it (no store call), else after one lease ask.
    pub async fn reserve(&self, key: KeyId, estimate: u64) -> Result<Reservation<'_>, Refusal> {
        self.reserve_all(Accounts::one(key), estimate).await
    }

    /// Reserves `amount` in every one of `accounts`, in order; refused by one, the request
    /// holds nothing in any.
    pub async fn reserve_all(
        &self,
        accounts: Accounts,
        amount: u64,
    ) -> Result<Reservation<'_>, Refusal> {
        let mut reservation = Reservation {
            shard: self,
            accounts: Accounts::default(),
            amount,
            sent: false,
            settled: false,
        };
        for key in accounts.iter() {
            // Refused: `reservation` drops unsent, releasing what it took so far.
            self.reserve_one(key, amount).await?;
            reservation.accounts.push(key);
        }
        Ok(reservation)
    }

    async fn reserve_one(&self, key: KeyId, estimate: u64) -> Result<(), Refusal> {
        // Computed only if the request has to wait: reading the clock is not free.
        let mut deadline: Option<Instant> = None;
        let mut waiting = Waiting {
            mine: None,
            asks: 0,
            timed_out: false,
        };
        loop {
            if self.closed.get() {
                // Shutdown handed everything over: nothing more may be leased.
                return Err(Refusal::Unavailable);
            }
            let next = {
                let mut keys = self.keys.borrow_mut();
                let lease = self.lease(&mut keys, key);
                if lease.meter == Meter::Report {
                    // For the record only: nothing to lease, nothing refused.
                    take(lease, estimate);
                    return Ok(());
                }
                // The ticked time may be up to a tick late: judged as if a tick later.
                let lapsing =
                    self.lease_ttl.is_some() && self.lapsing(lease, self.ticked.get().at + TICK);
                waiting.timed_out = deadline.is_some_and(|d| Instant::now() >= d);
                match next_step(&view(lease, lapsing, estimate), &waiting, self.rules()) {
                    Step::Admit => {
                        take(lease, estimate);
                        return Ok(());
                    }
                    Step::FailureMode => return self.unreachable(lease, key, estimate),
                    Step::Refuse => {
                        return Err(Refusal::Denied {
                            account: key,
                            remaining_nano: self.known_remaining(lease),
                            estimate_nano: estimate,
                        })
                    }
                    Step::Wait => Next::Wait,
                    Step::AskAgainLater => Next::AskAgainLater,
                    Step::Ask => {
                        let seq = self.seq();
                        waiting.mine = Some(seq);
                        waiting.asks += 1;
                        // A lease that may have lapsed is handed back in the same op, so the
                        // store's count and this worker's agree again whichever it was.
                        let (returned, free) = if lapsing {
                            (lease.held, 0)
                        } else {
                            (0, lease.free())
                        };
                        let mut op = self.op_for(key, lease, seq, self.period_now(lease.window));
                        op.settle.returned += returned;
                        op.ask = Some(Ask {
                            need: estimate - free.min(estimate),
                            parts: self.slice_parts,
                        });
                        Next::Ask(Box::new(op))
                    }
                }
            };
            match next {
                Next::AskAgainLater => {
                    monoio::time::sleep(self.squeeze_wait).await;
                    waiting.mine = None;
                    // The next ask gets the whole store timeout again.
                    deadline = None;
                }
                Next::Ask(op) => {
                    let op = *op;
                    // Written down before the ask leaves: a replay closes the lease it may get.
                    self.journal_append(Record::Lease { key });
                    match self.ledger.submit(vec![op.clone()]) {
                        Submitted::Applied(applied) => {
                            self.commit(std::slice::from_ref(&op), Instant::now());
                            for (op, applied) in std::iter::once(op).zip(applied) {
                                self.answer(op, applied);
                            }
                        }
                        Submitted::Queued => {
                            self.commit(std::slice::from_ref(&op), Instant::now());
                            let until = *deadline
                                .get_or_insert_with(|| Instant::now() + self.ledger.wait());
                            self.wait_until(until).await;
                        }
                        Submitted::Full => {
                            let mut keys = self.keys.borrow_mut();
                            let lease = self.lease(&mut keys, key);
                            return self.unreachable(lease, key, estimate);
                        }
                    }
                }
                Next::Wait => {
                    let until =
                        *deadline.get_or_insert_with(|| Instant::now() + self.ledger.wait());
                    self.wait_until(until).await;
                }
            }
        }
    }

    fn rules(&self) -> Rules {
        Rules {
            max_asks: MAX_ASKS,
            squeeze_waits: !self.squeeze_wait.is_zero(),
        }
    }

    /// What the key may still spend as this worker knows it, in the current period.
    fn known_remaining(&self, lease: &Lease) -> u64 {
        let now = self.period_now(lease.window);
        lease.seen().map_or(0, |(account, period)| {
            let spent = if period == now { account.spent } else { 0 };
            account.limit.saturating_sub(spent)
        })
    }

    /// The failure mode, when no lease can be had from the store: open admits on the last
    /// known state (a key never heard of: its configured limit); closed refuses.
    fn unreachable(&self, lease: &mut Lease, key: KeyId, estimate: u64) -> Result<(), Refusal> {
        if !self.fail_open {
            return Err(Refusal::Unavailable);
        }
        let now = self.period_now(lease.window);
        if lease.known.is_none() {
            // This worker has not touched the key: start from what the node last heard of it.
            lease.known = self.ledger.last_known(key);
        }
        let known = match lease.seen() {
            Some((account, period)) if period == now => account,
            // The period turned since: its spend starts from zero.
            Some((account, _)) => Account {
                spent: 0,
                ..account
            },
            None => Account {
                limit: self.limits.of(key),
                spent: 0,
                leased: 0,
            },
        };
        let spent_here = lease
            .pending
            .spent
            .in_period(now)
            .saturating_add(lease.reserved.saturating_sub(lease.held));
        match fail_open_admits(known, spent_here, estimate) {
            Ok(()) => {
                take(lease, estimate);
                Ok(())
            }
            Err(remaining_nano) => Err(Refusal::Denied {
                account: key,
                remaining_nano,
                estimate_nano: estimate,
            }),
        }
    }

    /// Whether `lease` may have lapsed in the store: unconfirmed for most of its lifetime.
    fn lapsing(&self, lease: &Lease, now: Instant) -> bool {
        let Some(ttl) = self.lease_ttl else {
            return false;
        };
        lease.held > 0
            && lease
                .confirmed
                .is_none_or(|t| now.saturating_duration_since(t) >= ttl - ttl / LAPSE_AFTER_PARTS)
    }

    /// Parks the request until a ledger answer arrives or `deadline` passes.
    async fn wait_until(&self, deadline: Instant) {
        let mut registered = false;
        let woken = std::future::poll_fn(|cx| {
            if registered {
                return Poll::Ready(());
            }
            registered = true;
            self.waiters.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        });
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = monoio::time::timeout(left, woken).await;
    }

    /// Takes an answer from the ledger (the worker's inbox, or in place for the in-memory store).
    pub fn on_reply(&self, reply: Reply) {
        match reply {
            Reply::Applied { op, applied } => self.answer(op, applied),
            Reply::Unreachable { key, seq } => {
                if let Some(lease) = self.keys.borrow_mut().get_mut(&key) {
                    if lease.asking == Some(seq) {
                        lease.unreachable = true;
                    }
                }
            }
            Reply::Dropped { op } => {
                let mut keys = self.keys.borrow_mut();
                let lease = self.lease(&mut keys, op.key);
                // Never applied. Its spend is in the journal directory's rejected file for an
                // operator (sent again, it would be refused and recorded again); the lease it
                // handed back is still this worker's in the store; a request waiting on the
                // ask gets the failure mode.
                lease.held = lease.held.saturating_add(op.settle.returned);
                lease.last_answered = lease.last_answered.max(op.seq);
                // Ops merged into it went with it (their spend is in the rejected file too).
                lease.unconfirmed.retain(|(seq, _)| *seq > op.seq);
                if lease.asking == Some(op.seq) {
                    lease.asking = None;
                    lease.dropped = Some(op.seq);
                }
            }
        }
        for waker in self.waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    fn answer(&self, op: Op, applied: Applied) {
        let mut keys = self.keys.borrow_mut();
        // A key is forgotten only once all its ops are answered: this answer repeats one. A
        // grant in it is held again (and returned when idle); anything else is old news.
        let lease = if applied.granted > 0 {
            self.lease(&mut keys, op.key)
        } else {
            match keys.get_mut(&op.key) {
                Some(lease) => lease,
                None => return,
            }
        };
        lease.last_answered = lease.last_answered.max(op.seq);
        let carried = match lease.known {
            Some((_, period)) if period == op.period => op.settle.spent.in_period(period),
            _ => 0,
        };
        lease.on_its_way = lease.on_its_way.saturating_sub(carried);
        lease.known = Some((applied.account, op.period));
        lease.confirmed = Some(Instant::now());
        if op.seq >= lease.forgot {
            lease.epoch = applied.epoch;
        }
        // Ops of one key are applied in order: this one confirms every older one.
        let confirmed = lease.unconfirmed.len();
        lease.unconfirmed.retain(|(seq, _)| *seq > op.seq);
        if applied.granted > 0 {
            lease.held += applied.granted;
            lease.last_grant = applied.granted;
        }
        lease.squeezed = applied.squeezed;
        if op.ask.is_some() && lease.asking == Some(op.seq) {
            lease.asking = None;
            lease.unreachable = false;
            lease.answered = Some((op.seq, applied.granted));
        }
        // Answered for its newest op, with nothing else of the key on its way, the store counts
        // as this worker's lease what it holds plus what it spent from it since: more means a
        // lease whose answer was lost. It is this worker's to use, and to return; never less (a
        // lapse is `lapsing`'s to judge).
        if let Some(store_held) = applied.held {
            if op.seq == lease.last_sent && lease.asking.is_none() {
                let mine = lease.held + lease.pending.from_lease;
                lease.held += store_held.saturating_sub(mine);
            }
        }
        let confirmed_spend = confirmed > lease.unconfirmed.len();
        drop(keys);
        if confirmed_spend {
            // The journal need not carry this spend to a replay any more.
            self.journal_append(Record::Confirmed {
                seq: op.seq,
                key: op.key,
            });
        }
    }

    /// What each active money account may still spend in its current period, as the store
    /// last answered, less this worker's spend not yet handed over; at most `max` accounts.
    pub fn remaining(&self, max: usize) -> HashMap<KeyId, u64> {
        self.keys
            .borrow()
            .iter()
            .filter(|(_, lease)| lease.known.is_some() && lease.meter == Meter::Dollars)
            .map(|(&key, lease)| {
                let pending = lease.pending.spent.in_period(self.period_now(lease.window));
                (key, self.known_remaining(lease).saturating_sub(pending))
            })
            .take(max)
            .collect()
    }

    /// Records `cost` in a report account with no reservation before it (the model a request
    /// was answered by is known only at its end): journaled and flushed as any settled cost.
    pub fn charge(&self, account: KeyId, cost: u64) {
        if cost == 0 {
            return;
        }
        {
            let mut keys = self.keys.borrow_mut();
            take(self.lease(&mut keys, account), 0);
        }
        self.settle(account, 0, cost, false);
    }

    /// Ends a request of `key` that reserved `amount`: its real cost replaces the reservation.
    /// With a journal, the cost is written there first.
    fn settle(&self, key: KeyId, amount: u64, cost: u64, refused: bool) {
        if self.closed.get() {
            // `close` billed every request still in flight.
            return;
        }
        let (period, cost, seq) = {
            let mut keys = self.keys.borrow_mut();
            let lease = self.lease(&mut keys, key);
            let period = self.period_now(lease.window);
            // A concurrency account's reservation is its request in flight: given back.
            let cost = if lease.meter == Meter::Concurrent {
                0
            } else {
                cost
            };
            let seq = (cost > 0 && self.journal.is_some()).then(|| self.seq());
            lease.reserved = lease.reserved.saturating_sub(amount);
            lease.in_flight = lease.in_flight.saturating_sub(1);
            // A cost above the estimate overruns the lease; the store counts it as spend all
            // the same.
            let from_lease = cost.min(lease.held);
            lease.held -= from_lease;
            lease.pending.spent.add(period, cost);
            lease.pending.from_lease += from_lease;
            if let Some(seq) = seq {
                lease.pending_seq = seq;
            }
            lease.last_used = Some(self.ticked.get().at);
            if refused && lease.in_flight == 0 {
                lease.refused = true;
            }
            (period, cost, seq)
        };
        if let Some(seq) = seq {
            self.journal_append(Record::Spend {
                seq,
                key,
                period,
                nano: cost,
            });
        }
    }

    /// Writes `record` to the journal. A full segment is replaced by one that starts with a
    /// snapshot of everything the store has not confirmed: it covers a spend record (the state
    /// is updated before the record is written); any other record is written after it.
    fn journal_append(&self, record: Record) {
        let Some(journal) = &self.journal else {
            return;
        };
        let appended = journal.borrow_mut().append(record);
        if appended == Appended::Full {
            let snapshot = self.snapshot();
            let mut journal = journal.borrow_mut();
            if journal.rotate(&snapshot) == Appended::Written
                && !matches!(record, Record::Spend { .. })
            {
                journal.append(record);
            }
        }
    }

    /// Every record a new journal segment must start with: the spend of each op the store has
    /// not confirmed (under that op's sequence number), each key's spend not handed over (under
    /// its newest record's), and each lease this worker may hold.
    fn snapshot(&self) -> Vec<Record> {
        let keys = self.keys.borrow();
        let mut records = Vec::new();
        for (&key, lease) in keys.iter() {
            let spends = lease
                .unconfirmed
                .iter()
                .map(|(seq, spend)| (*seq, spend))
                .chain(std::iter::once((lease.pending_seq, &lease.pending.spent)));
            for (seq, spend) in spends {
                records.extend(spend.iter().map(|p| Record::Spend {
                    seq,
                    key,
                    period: p.period,
                    nano: p.nano,
                }));
            }
            if lease.held > 0 || lease.asking.is_some() || lease.reserved > 0 {
                records.push(Record::Lease { key });
            }
        }
        records
    }

    /// The op that carries everything this worker has for `key` now: its pending spend, and
    /// what it knows of the account, which the store takes back only if it finds it lost the
    /// account since (another epoch than the one this worker heard).
    fn op_for(&self, key: KeyId, lease: &Lease, seq: u64, period: u64) -> Op {
        let mut op = Op::new(self.holder.clone(), seq, key, period);
        op.settle = lease.pending.clone();
        op.epoch = lease.epoch.clone();
        if op.epoch.is_some() {
            op.restore = Some(Restore {
                // As the store counts it: what this worker holds plus what it spent from it
                // since (this op's `from_lease` and `returned` take their part off again).
                held: Some(lease.held + lease.pending.from_lease),
                floor: lease
                    .known
                    .filter(|(_, p)| *p == period)
                    .map(|(account, _)| PeriodSpend {
                        period,
                        nano: account.spent,
                    }),
                limit: lease.known.map(|(account, _)| account.limit),
            });
        }
        op
    }

    /// Hands settled spend to the store, returns the leases of keys idle since `IDLE_RETURN`
    /// (and of keys whose lease may have lapsed, or that the upstream refused), tops up the
    /// leases of busy keys running low (so their requests need not wait for the store), renews
    /// held leases, and re-establishes them in a store that lost its data. Nothing changes here
    /// unless the ledger took the ops; nothing is handed over while the store is unreachable
    /// (it stays here, journaled, for the failure mode to count).
    pub fn flush(&self, now: Instant) {
        self.tick();
        // After `close` handed everything over, nothing more goes to the store (the worker's
        // flush task may run once more before the worker ends).
        if self.closed.get() || !self.ledger.reachable() {
            return;
        }
        self.flush_with(now, false);
    }

    fn flush_with(&self, now: Instant, last: bool) {
        // The in-memory store keeps leases for good; a renewal every minute costs nothing.
        let renew_every = self
            .lease_ttl
            .map_or(Duration::from_secs(60), |ttl| ttl / RENEWALS_PER_LIFETIME);
        let losses = self.ledger.losses();
        let store_lost_data = losses != self.losses_seen.get();
        let ops = {
            let mut keys = self.keys.borrow_mut();
            let mut ops = Vec::new();
            for (&key, lease) in keys.iter_mut() {
                let period = self.period_now(lease.window);
                if store_lost_data && lease.held > 0 {
                    lease.renew_now = true;
                }
                let facts = FlushFacts {
                    held: lease.held,
                    free: lease.free(),
                    idle: lease.idle(now),
                    lapsing: self.lapsing(lease, now),
                    squeezed: lease.squeezed,
                    surrendering: self.surrender_owed.get(),
                    asking: lease.asking.is_some(),
                    refused_and_done: lease.refused && lease.in_flight == 0,
                    low: lease.last_grant > 0 && lease.free() < lease.last_grant / 4,
                    renew_due: lease.renew_now
                        || lease
                            .renewed
                            .is_none_or(|t| now.saturating_duration_since(t) >= renew_every),
                    pending: !lease.pending.is_empty(),
                };
                let plan = flush_plan(&facts, last, self.lease_ttl.is_some());
                if !plan.send {
                    continue;
                }
                let mut op = self.op_for(key, lease, self.seq(), period);
                op.settle.returned = plan.returned;
                op.ask = plan.ask.then_some(Ask {
                    need: 0,
                    parts: self.slice_parts,
                });
                op.forget = plan.forget;
                if op.forget {
                    // The op may drop the account: sent again after a late answer, it would
                    // find none and take the epoch it carries for an account the store lost.
                    op.epoch = None;
                    op.restore = None;
                }
                op.close = plan.close;
                ops.push(op);
            }
            ops
        };
        if ops.is_empty() {
            // Nothing held or owed: nothing to hand back.
            self.surrender_owed.set(false);
        }
        // The last flush always goes, even empty: the ledger learns this worker is done.
        if !ops.is_empty() || last {
            let taken = if last {
                self.ledger.submit_last(ops.clone())
            } else {
                self.ledger.submit(ops.clone())
            };
            let answers = match taken {
                // Not taken: what is owed stays owed, for the next flush.
                Submitted::Full => return,
                Submitted::Applied(applied) => Some(applied),
                Submitted::Queued => None,
            };
            self.commit(&ops, now);
            self.surrender_owed.set(false);
            for (op, applied) in ops.into_iter().zip(answers.into_iter().flatten()) {
                self.answer(op, applied);
            }
        }
        self.losses_seen.set(losses);
        self.keys.borrow_mut().retain(|_, lease| {
            let forgotten = lease.refused
                && lease.in_flight == 0
                && lease.asking.is_none()
                && lease.held == 0
                && lease.pending.is_empty();
            let done = lease.idle(now) && lease.held == 0 && lease.pending.is_empty();
            let unanswered = lease.last_sent > lease.last_answered;
            !(forgotten || done) || !lease.unconfirmed.is_empty() || unanswered
        });
    }

    /// The ledger took `ops`: the spend and returns they carry leave this shard (the spend stays
    /// in `unconfirmed` until the store answers, for the journal's snapshots). Until the store
    /// answers, its last known spend for the key counts them (the failure mode's limit).
    fn commit(&self, ops: &[Op], now: Instant) {
        let mut keys = self.keys.borrow_mut();
        let journaled = self.journal.is_some();
        for op in ops {
            if let Some(lease) = keys.get_mut(&op.key) {
                lease.pending = Settlement::default();
                lease.held = lease.held.saturating_sub(op.settle.returned);
                lease.renewed = Some(now);
                lease.renew_now = false;
                lease.last_sent = op.seq;
                if journaled && !op.settle.spent.is_empty() {
                    lease.unconfirmed.push((op.seq, op.settle.spent.clone()));
                }
                if let Some((_, period)) = lease.known {
                    lease.on_its_way = lease
                        .on_its_way
                        .saturating_add(op.settle.spent.in_period(period));
                }
                if op.ask.is_some() {
                    lease.asking = Some(op.seq);
                    lease.unreachable = false;
                }
                if op.forget {
                    lease.refused = true;
                    // The store may drop the account: an op sent before the answer must not
                    // take the account made anew for a lost one.
                    lease.epoch = None;
                    lease.forgot = op.seq;
                }
            }
        }
    }

    /// The configured limits changed (a reload): every lease's free part goes back to the store
    /// now, so the next request of each key is granted under its new limit; a key whose limit
    /// fell below its spend stops at once, not when its lease runs out.
    pub fn surrender(&self, now: Instant) {
        self.surrender_owed.set(true);
        self.flush(now);
    }

    /// At shutdown: requests still in flight (past the grace) are billed what they reserved,
    /// then all spend is handed over and every lease returned, waiting for room in the
    /// ledger's queue if need be. Requests dropped after this settle nothing more.
    pub fn close(&self, now: Instant) {
        self.tick();
        let cut: Vec<(KeyId, u64)> = self
            .keys
            .borrow_mut()
            .iter_mut()
            .filter(|(_, lease)| lease.in_flight > 0)
            .map(|(&key, lease)| {
                let reserved = lease.reserved;
                // `settle` below takes these back off, as for each request.
                lease.in_flight = 1;
                (key, reserved)
            })
            .collect();
        for (key, reserved) in cut {
            self.settle(key, reserved, reserved, false);
        }
        self.closed.set(true);
        self.flush_with(now + IDLE_RETURN, true);
    }
}

/// Reserves `estimate` in `lease` for one request.
fn take(lease: &mut Lease, estimate: u64) {
    lease.reserved = lease.reserved.saturating_add(estimate);
    lease.in_flight += 1;
}

/// What a waiting reservation does next.
enum Next {
    /// Send this lease ask (boxed: an op is large, and asks are rare).
    Ask(Box<Op>),
    /// An ask is in flight: wait for its answer.
    Wait,
    /// Refused while other workers hold the budget: wait for them to hand it back, then ask.
    AskAgainLater,
}

/// What a reservation sees of its key's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LeaseView {
    /// The lease covers the estimate and has not lapsed.
    covers: bool,
    asking: Option<u64>,
    answered: Option<(u64, u64)>,
    dropped: Option<u64>,
    unreachable: bool,
    /// Other workers hold part of the key's budget, and the estimate fits in what is left once
    /// they hand it back.
    others_hold: bool,
}

fn view(lease: &Lease, lapsing: bool, estimate: u64) -> LeaseView {
    // The store counts this worker's lease as what it holds plus what it spent from it since
    // its last flush; the rest is other workers'.
    let mine_in_store = lease.held + lease.pending.from_lease;
    LeaseView {
        covers: !lapsing && lease.free() >= estimate,
        asking: lease.asking,
        answered: lease.answered,
        dropped: lease.dropped,
        unreachable: lease.unreachable,
        others_hold: lease
            .seen()
            .is_some_and(|(a, _)| a.leased > mine_in_store && a.remaining() >= estimate),
    }
}

/// The state of one reservation's wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Waiting {
    /// The sequence number of this request's own ask.
    mine: Option<u64>,
    asks: u32,
    /// Its wait for the store's answer is over.
    timed_out: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rules {
    max_asks: u32,
    /// Whether a refused request may wait for other workers to hand back their lease.
    squeeze_waits: bool,
}

/// What a reservation does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Admit,
    /// Ask the store for a lease.
    Ask,
    /// An ask is out: wait for its answer.
    Wait,
    /// Refused while other workers hold the budget: wait for them to hand it back, then ask.
    AskAgainLater,
    Refuse,
    /// The store cannot be reached: the failure mode decides.
    FailureMode,
}

/// The admission decision, pure: admit from the lease; else ask the store (once at a time per
/// key, up to `max_asks`); a refusal while other workers hold the budget waits for them once
/// they were squeezed; a store that cannot be reached (or set the ask aside, or did not answer
/// in time) leaves it to the failure mode.
fn next_step(lease: &LeaseView, waiting: &Waiting, rules: Rules) -> Step {
    if lease.covers {
        return Step::Admit;
    }
    if waiting.mine.is_some() && lease.dropped == waiting.mine {
        return Step::FailureMode;
    }
    let my_grant = waiting
        .mine
        .and_then(|m| lease.answered.filter(|(seq, _)| *seq == m))
        .map(|(_, granted)| granted);
    if lease.asking.is_none()
        && my_grant == Some(0)
        && lease.others_hold
        && waiting.asks < rules.max_asks
        && rules.squeeze_waits
    {
        return Step::AskAgainLater;
    }
    match (lease.asking, my_grant) {
        // My ask was answered and others took the grant, or there was none.
        (None, Some(granted)) if granted == 0 || waiting.asks >= rules.max_asks => Step::Refuse,
        (None, _) => Step::Ask,
        (Some(_), _) if lease.unreachable || waiting.timed_out => Step::FailureMode,
        (Some(_), _) => Step::Wait,
    }
}

/// What a flush knows of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct FlushFacts {
    held: u64,
    /// Held and not reserved by a request in flight.
    free: u64,
    /// No request in flight, no ask out, unused since `IDLE_RETURN`.
    idle: bool,
    /// The store has not confirmed the lease for most of its lifetime.
    lapsing: bool,
    squeezed: bool,
    /// The limits changed (a reload): what is free goes back, and the store grants anew.
    surrendering: bool,
    asking: bool,
    /// The upstream refused the key and its requests are done.
    refused_and_done: bool,
    /// Busy, with less than a quarter of the last grant free.
    low: bool,
    /// A renewal is due (or the store lost data somewhere and this key should be checked).
    renew_due: bool,
    /// Spend settled and not handed over.
    pending: bool,
}

/// What a flush sends for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct FlushPlan {
    send: bool,
    returned: u64,
    /// A top-up ask (need 0).
    ask: bool,
    forget: bool,
    close: bool,
}

/// The flush decision, pure. The last flush (`last`, at shutdown) returns everything and, with
/// a remote store, closes the lease. A key the upstream refused returns everything and is
/// forgotten. A lease that may have lapsed is handed back whole; an idle one (or a squeezed one
/// without an ask of its own) its free part. A busy key running low is topped up. A held lease
/// is renewed when due. An op goes when it carries anything of this.
fn flush_plan(key: &FlushFacts, last: bool, remote: bool) -> FlushPlan {
    let forget = key.refused_and_done && !last;
    let returned = if last || forget || key.lapsing {
        key.held
    } else if key.idle || key.surrendering || (key.squeezed && !key.asking) {
        // (Not while an ask of its own is out: its need counted on the free part.)
        key.free
    } else {
        0
    };
    let ask = !key.idle && !last && !forget && !key.squeezed && key.low && !key.asking;
    let renew = key.held > 0 && key.renew_due;
    let close = last && remote;
    FlushPlan {
        send: key.pending || returned > 0 || ask || renew || forget || (close && key.asking),
        returned,
        ask,
        forget,
        close,
    }
}

/// Fail-open admission, pure: the key's last known totals (for the current period) less what
/// this worker spent since must cover the estimate; else the refusal says what is left.
fn fail_open_admits(known: Account, spent_here: u64, estimate: u64) -> Result<(), u64> {
    let left = known.remaining().saturating_sub(spent_here);
    if left >= estimate {
        Ok(())
    } else {
        Err(left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::op::{LimitTable, PeriodSpend};
    use crate::budget::store::{system_clock, MemoryStore, Store, StoreError};
    use std::future::Future;
    use std::sync::Arc;

    fn key() -> KeyId {
        KeyId::of("sk-budget-test")
    }

    fn settings(holder: &str, workers: usize) -> ShardSettings {
        ShardSettings {
            holder: Holder::from(holder),
            workers,
            fail_open: true,
            clock: system_clock(),
            limits: Arc::new(KeyLimits::new(1_000, HashMap::new())),
            squeeze_wait: Duration::ZERO,
            journal: None,
        }
    }

    fn shard(store: Arc<MemoryStore>, workers: usize) -> Shard {
        Shard::new(Ledger::Inline(store), settings("test/0", workers))
    }

    /// A ledger thread on `store` for one worker (leases lapsing after `ttl`): the thread, the
    /// worker's ledger, and its inbox for `pump`.
    fn remote(
        store: Arc<dyn Store>,
        ttl: Duration,
    ) -> (
        crate::budget::ledger::LedgerThread,
        Ledger,
        crate::budget::ledger::Inbox,
    ) {
        let (thread, mut handles) =
            crate::budget::ledger::LedgerThread::start(crate::budget::ledger::LedgerSettings {
                store: store.clone(),
                admin: store,
                workers: 1,
                timeout: Duration::from_secs(2),
                lease_ttl: ttl,
                journal: None,
                replay: Default::default(),
                limits: Arc::new(KeyLimits::new(1_000_000, HashMap::new())),
                clock: system_clock(),
                fsync_every: Duration::from_secs(1),
                holder: Holder::from("test/remote/ledger"),
            })
            .unwrap();
        let (ledger, inbox) = handles.remove(0);
        (thread, ledger, inbox)
    }

    /// Delivers the ledger's answers to `shard` (inside its runtime).
    fn pump(shard: &std::rc::Rc<Shard>, mut inbox: crate::budget::ledger::Inbox) {
        let shard = shard.clone();
        monoio::spawn(async move {
            while let Ok(reply) = inbox.recv().await {
                shard.on_reply(reply);
            }
        });
    }

    /// A runtime for the tests that wait (a remote ledger, a squeeze).
    fn runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>> {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
    }

    /// The in-memory ledger answers in place: a reservation is ready at the first poll.
    fn reserve(shard: &Shard, key: KeyId, estimate: u64) -> Result<Reservation<'_>, Refusal> {
        let mut future = std::pin::pin!(shard.reserve(key, estimate));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(Refusal::Unavailable),
        }
    }

    fn store(limit: u64) -> Arc<MemoryStore> {
        Arc::new(MemoryStore::new(
            Arc::new(KeyLimits::new(limit, HashMap::new())),
            system_clock(),
        ))
    }

    #[test]
    fn reserve_settle_flush_is_exact() {
        let store = store(1_000);
        let shard = shard(store.clone(), 1);
        let now = Instant::now();
        let r = reserve(&shard, key(), 300).unwrap();
        r.settle(120);
        assert_eq!(
            store.account(key()).spent,
            0,
            "spend reaches the store at flush"
        );
        shard.flush(now);
        assert_eq!(store.account(key()).spent, 120);
        // Idle long enough: the rest of the lease goes back.
        shard.flush(Instant::now() + IDLE_RETURN);
        assert_eq!(
            store.account(key()),
            Account {
                limit: 1_000,
                spent: 120,
                leased: 0
            }
        );
    }

    #[test]
    fn a_dropped_reservation_is_billed_if_it_went_upstream_and_released_if_not() {
        let store = store(1_000);
        let shard = shard(store.clone(), 1);
        drop(reserve(&shard, key(), 300).unwrap());
        let mut sent = reserve(&shard, key(), 200).unwrap();
        sent.mark_sent();
        drop(sent);
        shard.flush(Instant::now() + IDLE_RETURN);
        assert_eq!(
            (store.account(key()).spent, store.account(key()).leased),
            (200, 0)
        );
    }

    /// A request charged to several accounts (a key's, its team's) holds all or nothing: the
    /// one that refuses is named, and what the others had reserved is released.
    #[test]
    fn a_request_reserves_in_every_account_or_in_none() {
        let team = KeyId::of("team-account");
        let concurrent = KeyId::of("concurrent-account");
        let table = LimitTable {
            default: 1_000,
            window: Period::Never,
            accounts: HashMap::from([
                (
                    team,
                    Budget {
                        limit: 250,
                        window: Period::Daily,
                        meter: Meter::Dollars,
                    },
                ),
                (
                    concurrent,
                    Budget {
                        limit: 1,
                        window: Period::Never,
                        meter: Meter::Concurrent,
                    },
                ),
            ]),
        };
        let limits = Arc::new(KeyLimits::of_table(table));
        let store = Arc::new(MemoryStore::new(limits.clone(), system_clock()));
        let mut s = settings("test/0", 1);
        s.limits = limits;
        let shard = Shard::new(Ledger::Inline(store.clone()), s);
        let mut both = Accounts::one(key());
        both.push(team);
        let reserve_all = |accounts: Accounts, amount: u64| {
            let mut future = std::pin::pin!(shard.reserve_all(accounts, amount));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            match future.as_mut().poll(&mut cx) {
                Poll::Ready(result) => result,
                Poll::Pending => Err(Refusal::Unavailable),
            }
        };
        let first = reserve_all(both, 200).unwrap();
        match reserve_all(both, 100) {
            Err(Refusal::Denied { account, .. }) => assert_eq!(account, team),
            other => panic!("{other:?}"),
        }
        first.settle(150);
        // The refused request left nothing reserved in the key's account: 850 is there.
        reserve(&shard, key(), 850).unwrap().settle(0);
        reserve_all(both, 100).unwrap().settle(100);
        // One place in flight: taken, refused to a second request, given back even when its
        // request went upstream (never billed).
        let mut flying = reserve(&shard, concurrent, 1).unwrap();
        flying.mark_sent();
        assert!(reserve(&shard, concurrent, 1).is_err());
        drop(flying);
        reserve(&shard, concurrent, 1).unwrap().settle(1);
        shard.flush(Instant::now() + IDLE_RETURN);
        assert_eq!(store.account(key()).spent, 250);
        assert_eq!(store.account(team).spent, 250);
        assert_eq!(
            (
                store.account(concurrent).spent,
                store.account(concurrent).leased
            ),
            (0, 0)
        );
    }

    #[test]
    fn admission_is_local_while_the_lease_covers_it() {
        let store = store(1_000);
        let shard = shard(store.clone(), 1);
        let first = reserve(&shard, key(), 100).unwrap();
        let leased = store.account(key()).leased;
        assert_eq!(leased, 100 + 900 / 2);
        let second = reserve(&shard, key(), 100).unwrap();
        assert_eq!(store.account(key()).leased, leased, "no second store call");
        first.settle(0);
        second.settle(0);
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_limit() {
        let store = store(1_000);
        let shards: Vec<Shard> = (0..4).map(|_| shard(store.clone(), 4)).collect();
        let mut admitted = 0;
        let mut held = Vec::new();
        for i in 0..100 {
            if let Ok(r) = reserve(&shards[i % 4], key(), 70) {
                admitted += 70;
                held.push(r);
            }
        }
        assert!(admitted <= 1_000, "admitted {admitted}");
        // Every admitted request costs its full estimate: spend reaches but never passes 1000.
        for r in held {
            r.settle(70);
        }
        for s in &shards {
            s.flush(Instant::now() + IDLE_RETURN);
        }
        let account = store.account(key());
        assert_eq!(account.spent, admitted);
        assert_eq!(account.leased, 0);
        assert!(
            admitted > 1_000 - 4 * 70,
            "budget stranded: admitted {admitted}"
        );
    }

    #[test]
    fn a_busy_key_running_low_is_topped_up_at_flush() {
        let store = store(10_000);
        let shard = shard(store.clone(), 1);
        let now = Instant::now();
        // Need 1000 + half of the 9000 left: a lease of 5500.
        let first = reserve(&shard, key(), 1_000).unwrap();
        assert_eq!(store.account(key()).leased, 5_500);
        let second = reserve(&shard, key(), 4_200).unwrap();
        first.settle(1_000);
        // 300 free, below a quarter of the 5500 granted; the key is still busy.
        shard.flush(now);
        let account = store.account(key());
        assert_eq!(account.spent, 1_000);
        // Topped up by half of the 4500 neither spent nor leased.
        assert_eq!(account.leased, 4_500 + 2_250);
        assert!(account.spent + account.leased <= account.limit);
        second.settle(0);
    }

    #[test]
    fn a_key_without_budget_for_the_estimate_is_denied() {
        let shard = shard(store(100), 1);
        let denied = reserve(&shard, key(), 101).unwrap_err();
        assert_eq!(
            denied,
            Refusal::Denied {
                account: key(),
                remaining_nano: 100,
                estimate_nano: 101
            }
        );
        let r = reserve(&shard, key(), 100).unwrap();
        r.settle(100);
        shard.flush(Instant::now());
        assert!(matches!(
            reserve(&shard, key(), 1),
            Err(Refusal::Denied {
                remaining_nano: 0,
                ..
            })
        ));
    }

    /// The decision table of `next_step`.
    #[test]
    fn the_admission_decision() {
        let idle = LeaseView {
            covers: false,
            asking: None,
            answered: None,
            dropped: None,
            unreachable: false,
            others_hold: false,
        };
        let fresh = Waiting {
            mine: None,
            asks: 0,
            timed_out: false,
        };
        let asked = Waiting {
            mine: Some(7),
            asks: 1,
            timed_out: false,
        };
        let rules = Rules {
            max_asks: 3,
            squeeze_waits: true,
        };
        let cases = [
            (
                LeaseView {
                    covers: true,
                    ..idle
                },
                fresh,
                Step::Admit,
            ),
            (idle, fresh, Step::Ask),
            (
                LeaseView {
                    asking: Some(7),
                    ..idle
                },
                asked,
                Step::Wait,
            ),
            (
                LeaseView {
                    asking: Some(7),
                    unreachable: true,
                    ..idle
                },
                asked,
                Step::FailureMode,
            ),
            (
                LeaseView {
                    asking: Some(7),
                    ..idle
                },
                Waiting {
                    timed_out: true,
                    ..asked
                },
                Step::FailureMode,
            ),
            (
                LeaseView {
                    dropped: Some(7),
                    ..idle
                },
                asked,
                Step::FailureMode,
            ),
            // Answered with nothing: refused, unless others hold budget to squeeze out.
            (
                LeaseView {
                    answered: Some((7, 0)),
                    ..idle
                },
                asked,
                Step::Refuse,
            ),
            (
                LeaseView {
                    answered: Some((7, 0)),
                    others_hold: true,
                    ..idle
                },
                asked,
                Step::AskAgainLater,
            ),
            (
                LeaseView {
                    answered: Some((7, 0)),
                    others_hold: true,
                    ..idle
                },
                Waiting { asks: 3, ..asked },
                Step::Refuse,
            ),
            // Granted, but others took it first: ask again, up to the limit.
            (
                LeaseView {
                    answered: Some((7, 50)),
                    ..idle
                },
                asked,
                Step::Ask,
            ),
            (
                LeaseView {
                    answered: Some((7, 50)),
                    ..idle
                },
                Waiting { asks: 3, ..asked },
                Step::Refuse,
            ),
            // Another request's answer is not mine.
            (
                LeaseView {
                    answered: Some((6, 0)),
                    ..idle
                },
                asked,
                Step::Ask,
            ),
        ];
        for (lease, waiting, want) in cases {
            assert_eq!(
                next_step(&lease, &waiting, rules),
                want,
                "{lease:?} {waiting:?}"
            );
        }
        let impatient = Rules {
            squeeze_waits: false,
            ..rules
        };
        assert_eq!(
            next_step(
                &LeaseView {
                    answered: Some((7, 0)),
                    others_hold: true,
                    ..idle
                },
                &asked,
                impatient
            ),
            Step::Refuse
        );
    }

    /// The decision table of `flush_plan`.
    #[test]
    fn the_flush_decision() {
        let busy = FlushFacts {
            held: 100,
            free: 60,
            ..FlushFacts::default()
        };
        let plan = |facts: FlushFacts, last: bool| flush_plan(&facts, last, true);
        // A busy key with nothing to say: no op.
        assert_eq!(plan(busy, false), FlushPlan::default());
        // Spend to hand over.
        assert!(
            plan(
                FlushFacts {
                    pending: true,
                    ..busy
                },
                false
            )
            .send
        );
        // Idle: the free part goes back.
        let idle = plan(FlushFacts { idle: true, ..busy }, false);
        assert_eq!((idle.send, idle.returned), (true, 60));
        // Squeezed: the free part goes back, unless an ask of its own is out.
        assert_eq!(
            plan(
                FlushFacts {
                    squeezed: true,
                    ..busy
                },
                false
            )
            .returned,
            60
        );
        assert_eq!(
            plan(
                FlushFacts {
                    squeezed: true,
                    asking: true,
                    ..busy
                },
                false
            )
            .returned,
            0
        );
        // Lapsing: all of it.
        assert_eq!(
            plan(
                FlushFacts {
                    lapsing: true,
                    ..busy
                },
                false
            )
            .returned,
            100
        );
        // Running low and busy: a top-up; not when squeezed or asking already.
        assert!(plan(FlushFacts { low: true, ..busy }, false).ask);
        assert!(
            !plan(
                FlushFacts {
                    low: true,
                    squeezed: true,
                    ..busy
                },
                false
            )
            .ask
        );
        assert!(
            !plan(
                FlushFacts {
                    low: true,
                    asking: true,
                    ..busy
                },
                false
            )
            .ask
        );
        // A renewal when due, only with a lease.
        assert!(
            plan(
                FlushFacts {
                    renew_due: true,
                    ..busy
                },
                false
            )
            .send
        );
        assert!(
            !plan(
                FlushFacts {
                    renew_due: true,
                    held: 0,
                    free: 0,
                    ..busy
                },
                false
            )
            .send
        );
        // Refused by the upstream: everything back, and forgotten.
        let refused = plan(
            FlushFacts {
                refused_and_done: true,
                ..busy
            },
            false,
        );
        assert_eq!((refused.returned, refused.forget), (100, true));
        // The last flush: everything back and, remote, closed; an ask out still gets a close.
        let last = plan(busy, true);
        assert_eq!((last.returned, last.close, last.forget), (100, true, false));
        assert!(
            plan(
                FlushFacts {
                    held: 0,
                    free: 0,
                    asking: true,
                    ..busy
                },
                true
            )
            .send
        );
        assert!(
            !flush_plan(&busy, true, false).close,
            "in memory: nothing to close"
        );
    }

    #[test]
    fn failing_open_admits_what_the_last_known_totals_leave() {
        let known = Account {
            limit: 1_000,
            spent: 600,
            leased: 0,
        };
        assert_eq!(fail_open_admits(known, 100, 300), Ok(()));
        assert_eq!(fail_open_admits(known, 101, 300), Err(299));
        assert_eq!(fail_open_admits(known, 2_000, 1), Err(0));
    }

    /// With a remote store, a lease the store has not confirmed for two thirds of its
    /// lifetime is not admitted on: the next request asks again and hands the old lease back in
    /// the same op, so the store's count and the worker's agree whether or not it lapsed there.
    #[test]
    fn a_lease_unconfirmed_for_most_of_its_lifetime_is_handed_back_not_spent() {
        let store = store(1_000_000);
        let ttl = Duration::from_millis(300);
        let (thread, ledger, inbox) = remote(store.clone(), ttl);
        let mut settings = settings("test/remote/0", 1);
        settings.fail_open = false;
        let shard = std::rc::Rc::new(Shard::new(ledger, settings));
        let mut runtime = runtime();
        runtime.block_on(async {
            pump(&shard, inbox);
            let first = shard.reserve(key(), 1_000).await.unwrap();
            let granted = store.account(key()).leased;
            assert_eq!(granted, 1_000 + 999_000 / 2);
            first.settle(0);
            // Nothing renews the lease (no flush) for longer than two thirds of its life.
            monoio::time::sleep(ttl - ttl / 4).await;
            // The worker reads the clock every tick.
            shard.tick();
            let second = shard.reserve(key(), 3_000).await.unwrap();
            let account = store.account(key());
            // Spent from the old lease: 500,500 leased still. Asked on top of it: 751,750.
            assert_eq!(
                account.leased,
                3_000 + (1_000_000 - 3_000) / 2,
                "the old lease was handed back as the new one was granted"
            );
            second.settle(0);
        });
        thread.finish(Instant::now() + Duration::from_secs(1));
    }

    /// Near the limit, a request refused while another worker holds unused lease waits for
    /// that worker to hear of the squeeze (in the answer to its next flush) and hand its lease
    /// back, then is admitted; without a squeeze wait it is refused at once.
    #[test]
    fn a_refused_request_is_admitted_once_another_worker_hands_back_its_lease() {
        let store = store(1_000);
        let wait = Duration::from_millis(30);
        let patient = |holder| {
            let mut settings = settings(holder, 2);
            settings.squeeze_wait = wait;
            std::rc::Rc::new(Shard::new(Ledger::Inline(store.clone()), settings))
        };
        let a = patient("a");
        let b = patient("b");
        let impatient = shard(store.clone(), 2);
        let mut runtime = runtime();
        runtime.block_on(async {
            // A leases 600 + a quarter of the 400 left, and spends 10 of it.
            let r = a.reserve(key(), 600).await.unwrap();
            r.settle(10);
            assert_eq!(store.account(key()).leased, 700);
            // Only 300 is not leased: 400 cannot be had without A's unused lease.
            assert!(matches!(
                impatient.reserve(key(), 400).await,
                Err(Refusal::Denied { .. })
            ));
            let waiting = monoio::spawn({
                let b = b.clone();
                async move { b.reserve(key(), 400).await.map(|r| r.settle(0)) }
            });
            monoio::time::sleep(Duration::from_millis(5)).await;
            // A's flush hears of the squeeze; its next one hands back what it does not use.
            a.flush(Instant::now());
            a.flush(Instant::now());
            assert!(waiting.await.is_ok());
            let account = store.account(key());
            assert_eq!(account.spent, 10);
            assert!(account.spent + account.leased <= account.limit);
        });
    }

    #[test]
    fn a_cost_above_the_estimate_is_still_billed_in_full() {
        let store = store(100);
        let shard = shard(store.clone(), 1);
        let r = reserve(&shard, key(), 50).unwrap();
        r.settle(130);
        shard.flush(Instant::now() + IDLE_RETURN);
        let account = store.account(key());
        assert_eq!((account.spent, account.leased), (130, 0));
    }

    #[test]
    fn a_key_the_upstream_refused_leaves_nothing_in_the_store() {
        let store = store(1_000);
        let shard = shard(store.clone(), 1);
        let r = reserve(&shard, key(), 100).unwrap();
        assert!(store.holds(key()));
        r.settle_refused_key();
        shard.flush(Instant::now());
        assert!(!store.holds(key()), "the account is gone");
        assert!(shard.remaining(10).is_empty(), "and so is the lease here");
    }

    #[test]
    fn spend_is_stamped_with_the_period_it_was_settled_in() {
        use std::sync::atomic::{AtomicU64, Ordering};
        // 2026-01-31 23:59:59 UTC.
        let now = Arc::new(AtomicU64::new(1_769_903_999));
        let clock: Clock = {
            let now = now.clone();
            Arc::new(move || now.load(Ordering::Relaxed))
        };
        let limits = Arc::new(KeyLimits::of_table(LimitTable::keys(
            1_000,
            Period::Daily,
            HashMap::new(),
        )));
        let store = Arc::new(MemoryStore::new(limits.clone(), clock.clone()));
        let mut settings = settings("test/0", 1);
        settings.limits = limits;
        settings.clock = clock;
        let shard = Shard::new(Ledger::Inline(store.clone()), settings);
        let before = reserve(&shard, key(), 100).unwrap();
        before.settle(40);
        // Midnight passes before the flush: each cost stays in its own day.
        now.fetch_add(2, Ordering::Relaxed);
        shard.tick();
        let after = reserve(&shard, key(), 100).unwrap();
        after.settle(7);
        shard.flush(Instant::now());
        let day = period_of(Period::Daily, 1_769_903_999);
        assert_eq!(store.spent_in(key(), day), 40);
        assert_eq!(store.spent_in(key(), day + 1), 7);
        assert_eq!(store.account(key()).spent, 7);
    }

    /// The in-memory store, answering each op with the holder's lease as Valkey does (one
    /// holder per key here: the key's leased total), that can lose the answer to its first ask
    /// (the retry of an applied ask, answered 0), and be slow (every call waits while `gate` is
    /// held and `gated` is set).
    struct Reporting {
        inner: Arc<MemoryStore>,
        lose_first_grant: bool,
        lost: std::sync::atomic::AtomicBool,
        gate: std::sync::Mutex<()>,
        gated: std::sync::atomic::AtomicBool,
        /// The epoch every account is answered with (none: as the memory store answers).
        epoch: Option<Epoch>,
        /// Every op applied, in order.
        seen: std::sync::Mutex<Vec<Op>>,
        /// Unreachable while set: every call fails.
        down: std::sync::atomic::AtomicBool,
    }

    impl Reporting {
        fn new(inner: Arc<MemoryStore>, lose_first_grant: bool) -> Reporting {
            Reporting {
                inner,
                lose_first_grant,
                lost: Default::default(),
                gate: Default::default(),
                gated: Default::default(),
                epoch: None,
                seen: Default::default(),
                down: Default::default(),
            }
        }

        fn unreachable(&self) -> Result<(), StoreError> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Unavailable("down".into()));
            }
            Ok(())
        }
    }

    impl Store for Reporting {
        fn apply(&self, ops: &[Op]) -> Result<Vec<Applied>, StoreError> {
            self.unreachable()?;
            use std::sync::atomic::Ordering::SeqCst;
            if self.gated.load(SeqCst) {
                drop(self.gate.lock());
            }
            let mut applied = self.inner.apply(ops)?;
            self.seen.lock().unwrap().extend(ops.iter().cloned());
            for (op, answer) in ops.iter().zip(applied.iter_mut()) {
                answer.held = Some(self.inner.account(op.key).leased);
                if !op.forget {
                    answer.epoch = self.epoch.clone();
                }
                if self.lose_first_grant && op.ask.is_some() && !self.lost.swap(true, SeqCst) {
                    answer.granted = 0;
                }
            }
            Ok(applied)
        }
        fn account(&self, key: KeyId) -> Result<Account, StoreError> {
            Store::account(&*self.inner, key)
        }
        fn history(&self, key: KeyId) -> Result<Vec<PeriodSpend>, StoreError> {
            self.inner.history(key)
        }
        fn set_limit(&self, key: KeyId, limit: u64) -> Result<Account, StoreError> {
            self.inner.set_limit(key, limit)
        }
        fn reset(&self, key: KeyId) -> Result<Account, StoreError> {
            self.inner.reset(key)
        }
        fn remove(&self, key: KeyId) -> Result<(), StoreError> {
            self.inner.remove(key)
        }
        fn accounts(&self) -> Result<Vec<(KeyId, Account)>, StoreError> {
            self.inner.accounts()
        }
        fn holds(&self, key: KeyId) -> Result<bool, StoreError> {
            Store::holds(&*self.inner, key)
        }
        fn ping(&self) -> Result<(), StoreError> {
            self.unreachable()
        }
    }

    #[test]
    fn a_grant_whose_answer_was_lost_is_held_used_and_returned() {
        let inner = store(1_000_000);
        let lossy = Arc::new(Reporting::new(inner.clone(), true));
        let shard = Shard::new(Ledger::Inline(lossy), settings("test/0", 1));
        let request = reserve(&shard, key(), 1_000)
            .expect("admitted on the lease the store counts as this worker's");
        request.settle(400);
        shard.close(Instant::now());
        let account = inner.account(key());
        assert_eq!(
            (account.spent, account.leased),
            (400, 0),
            "spent once, nothing stranded"
        );
    }

    /// A renewal held up in a slow store, then the key idle: the next flush hands its whole lease
    /// back. The renewal's late answer (the lease as it was) must not bring back a lease the
    /// store no longer counts.
    #[test]
    // The gate holds up the ledger thread, not this runtime: holding it across a sleep is the
    // point.
    #[allow(clippy::await_holding_lock)]
    fn a_late_answer_never_brings_back_a_returned_lease() {
        use std::sync::atomic::Ordering::SeqCst;
        let inner = store(1_000_000);
        let slow = Arc::new(Reporting::new(inner.clone(), false));
        let (thread, ledger, inbox) = remote(slow.clone(), Duration::from_secs(30));
        let shard = std::rc::Rc::new(Shard::new(ledger, settings("test/remote/0", 1)));
        let other = Shard::new(Ledger::Inline(inner.clone()), settings("test/other/0", 1));
        runtime().block_on(async {
            pump(&shard, inbox);
            let request = shard.reserve(key(), 1_000).await.unwrap();
            assert_eq!(inner.account(key()).leased, 500_500);
            // The store is slow: a renewal (no spend) waits in the ledger.
            let gate = slow.gate.lock().unwrap();
            slow.gated.store(true, SeqCst);
            shard.flush(Instant::now() + Duration::from_secs(11));
            monoio::time::sleep(Duration::from_millis(20)).await;
            request.settle(0);
            // Idle: the whole lease goes back, behind the renewal.
            shard.flush(Instant::now() + Duration::from_secs(12));
            slow.gated.store(false, SeqCst);
            drop(gate);
            monoio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(
                inner.account(key()).leased,
                0,
                "the store took the lease back"
            );
            // This worker must ask again; another takes the whole budget first.
            let theirs = reserve(&other, key(), 1_000_000).expect("the store has it all");
            theirs.settle(1_000_000);
            other.flush(Instant::now());
            let mine = shard.reserve(key(), 500_000).await;
            assert!(
                mine.is_err(),
                "admitted on a lease the store does not count"
            );
            assert_eq!(inner.account(key()).spent, 1_000_000);
        });
        thread.finish(Instant::now() + Duration::from_secs(1));
    }

    /// The worker's flush task may run once more after `close`: with the close's ops still on
    /// their way, it must not ask for a lease (nothing would ever hand it back).
    #[test]
    fn nothing_goes_to_the_store_after_close() {
        use std::sync::atomic::Ordering::SeqCst;
        let inner = store(1_000_000);
        let slow = Arc::new(Reporting::new(inner.clone(), false));
        let (thread, ledger, inbox) = remote(slow.clone(), Duration::from_secs(30));
        let shard = std::rc::Rc::new(Shard::new(ledger, settings("test/remote/0", 1)));
        runtime().block_on(async {
            pump(&shard, inbox);
            let request = shard.reserve(key(), 1_000).await.unwrap();
            request.settle(900);
            let gate = slow.gate.lock().unwrap();
            slow.gated.store(true, SeqCst);
            shard.close(Instant::now());
            // A busy key running low: a flush would top its lease up.
            shard.flush(Instant::now());
            slow.gated.store(false, SeqCst);
            drop(gate);
            monoio::time::sleep(Duration::from_millis(200)).await;
            let account = inner.account(key());
            assert_eq!((account.spent, account.leased), (900, 0));
        });
        thread.finish(Instant::now() + Duration::from_secs(1));
    }

    /// A settlement answered only after the op that drops the key's account was sent: its
    /// epoch is of an account that may be gone, and an ask carrying it would be taken for
    /// knowledge of an account the store lost.
    #[test]
    fn an_answer_older_than_a_drop_leaves_no_epoch_to_the_next_ask() {
        let inner = store(1_000_000);
        let mut epochs = Reporting::new(inner.clone(), false);
        epochs.epoch = Some(Epoch::from("e1"));
        let epochs = Arc::new(epochs);
        let (thread, ledger, mut inbox) = remote(epochs.clone(), Duration::from_secs(30));
        let shard = std::rc::Rc::new(Shard::new(ledger, settings("test/remote/0", 1)));
        runtime().block_on(async {
            // The first ask is answered in turn (its answer carries the epoch).
            let first = {
                let asking = shard.reserve(key(), 1_000);
                let mut asking = std::pin::pin!(asking);
                loop {
                    let reply = monoio::select! {
                        r = &mut asking => break r.unwrap(),
                        reply = inbox.recv() => reply.unwrap(),
                    };
                    shard.on_reply(reply);
                }
            };
            first.settle(10);
            // A settlement, then the drop of a key the upstream refused: both sent, neither
            // answer taken in yet.
            shard.flush(Instant::now());
            let refused = reserve(&shard, key(), 1_000).unwrap();
            refused.settle_refused_key();
            shard.flush(Instant::now());
            let settlement = inbox.recv().await.unwrap();
            shard.on_reply(settlement);
            // A request before the drop's answer: its ask must carry no epoch.
            let next = shard.clone();
            monoio::spawn(async move {
                let _ = next.reserve(key(), 1_000).await;
            });
            monoio::time::sleep(Duration::from_millis(100)).await;
            let ops = epochs.seen.lock().unwrap().clone();
            let ask = ops.last().unwrap();
            assert!(ask.ask.is_some(), "{ops:?}");
            assert_eq!(ask.epoch, None, "the ask after the drop heard no epoch");
        });
        thread.finish(Instant::now() + Duration::from_secs(1));
    }

    /// A reload cut the key's limit while the store was away: the lease the worker held under
    /// the old limit stays owed back, and goes back at the first flush that reaches the store,
    /// so the key is held to its new limit from then on.
    #[test]
    fn a_surrender_owed_while_the_store_is_away_is_made_once_it_is_back() {
        use std::sync::atomic::Ordering::SeqCst;
        let limits = Arc::new(KeyLimits::new(1_000_000, HashMap::new()));
        let inner = Arc::new(MemoryStore::new(limits.clone(), system_clock()));
        let flaky = Arc::new(Reporting::new(inner.clone(), false));
        let (thread, ledger, inbox) = remote(flaky.clone(), Duration::from_secs(30));
        let mut s = settings("test/remote/0", 1);
        s.limits = limits.clone();
        let shard = std::rc::Rc::new(Shard::new(ledger, s));
        runtime().block_on(async {
            pump(&shard, inbox);
            let first = shard.reserve(key(), 1_000).await.unwrap();
            first.settle(1_000);
            // The store goes down; a flush with spend finds it so.
            flaky.down.store(true, SeqCst);
            shard.flush(Instant::now());
            for _ in 0..100 {
                if !shard.ledger().reachable() {
                    break;
                }
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(!shard.ledger().reachable());
            // Reload: the limit is cut to 2_000 (1_000 spent), the worker surrenders.
            limits.replace(LimitTable::keys(2_000, Period::Never, HashMap::new()));
            shard.surrender(Instant::now());
            // The store comes back; ordinary flushes go on.
            flaky.down.store(false, SeqCst);
            for _ in 0..300 {
                if shard.ledger().reachable() {
                    break;
                }
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(shard.ledger().reachable(), "store back");
            shard.flush(Instant::now());
            monoio::time::sleep(Duration::from_millis(100)).await;
            shard.flush(Instant::now());
            monoio::time::sleep(Duration::from_millis(100)).await;
            // 100_000 more: far past the new limit of 2_000.
            let more = shard.reserve(key(), 100_000).await;
            assert!(
                more.is_err(),
                "admitted 100_000 under a limit of 2_000 with 1_000 spent: {:?}",
                inner.account(key())
            );
        });
        thread.finish(Instant::now() + Duration::from_secs(1));
    }
}
