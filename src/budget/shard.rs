//! A worker's budget shard: per active key, a lease (a slice of the key's budget granted by the
//! store), the part of it reserved by requests in flight, and spend settled since the last flush.
//! Admission is a local check against the lease: no lock, no shared atomic, no store call,
//! unless the lease cannot cover the request (then one lease ask through the ledger, which
//! grants the need plus a slice of what is left, sized so the last dollars are not stranded in
//! one worker; near the limit, other workers are asked to hand back what they do not use).
//! Reserve, then settle: a request reserves its upper cost estimate before it is forwarded and
//! settles to its real cost at the end (0 when it failed), so concurrent requests cannot spend
//! beyond the limit except by their estimates' error. `flush` (every flush interval, off the
//! request path) hands settled spend to the ledger, returns leases of keys gone idle and renews
//! held ones. With the store unreachable, the failure mode decides: admit on what is known
//! (open) or refuse (closed).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use super::ledger::{Ledger, Reply, Submitted};
use super::op::{Account, Applied, Ask, Holder, Op, Settlement};
use crate::auth::{KeyId, KeyIdMap};

/// An idle key's lease goes back to the store after this long without a request.
pub const IDLE_RETURN: Duration = Duration::from_secs(1);
/// A held lease is renewed every third of its store's lifetime.
const RENEWALS_PER_LIFETIME: u32 = 3;
/// A worker's last flush to a remote store returns this much of each lease: all of it, even a
/// grant the worker has not read yet. The Valkey script clamps at what the worker holds; the
/// in-memory store (one total per key) never sees it.
const RETURN_ALL: u64 = u64::MAX;

/// Lease asks one request may make before it is refused (others may take each grant first).
const MAX_ASKS: u32 = 3;
/// A lease unconfirmed for two thirds of its store's lifetime is no longer admitted on: the
/// store may give it back to the key's budget soon (the worker is cut off from the store).
const LAPSE_AFTER_PARTS: u32 = 3;

/// The budget held for one request between admission and settle. Settle or release it
/// exactly once.
#[derive(Debug)]
#[must_use = "a reservation holds budget until it is settled"]
pub struct Reservation {
    key: KeyId,
    amount: u64,
}

impl Reservation {
    pub fn key(&self) -> KeyId {
        self.key
    }

    pub fn amount_nano(&self) -> u64 {
        self.amount
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The key cannot reserve its estimate.
    Denied {
        remaining_nano: u64,
        estimate_nano: u64,
    },
    /// The store cannot be reached for a lease and the failure mode is closed.
    Unavailable,
}

#[derive(Debug, Default)]
struct Lease {
    /// Granted by the store and not yet spent or returned (reservations included).
    held: u64,
    /// Reserved by requests in flight (may exceed `held` for requests admitted fail-open).
    reserved: u64,
    in_flight: u32,
    pending: Settlement,
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
    /// The store's last word on the key's totals.
    known: Option<Account>,
    /// When this worker last sent the store an op for the key (renewals are due from it).
    renewed: Option<Instant>,
    /// When the store last answered an op of this worker for the key, renewing the lease
    /// there; a lease the store has not confirmed for a while may have lapsed.
    confirmed: Option<Instant>,
    /// Another worker was refused a lease while this one held some: hand back what is unused.
    squeezed: bool,
}

impl Lease {
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

pub struct Shard {
    ledger: Ledger,
    /// How long the store keeps a lease its holder does not renew (none: forever).
    lease_ttl: Option<Duration>,
    holder: Holder,
    next_seq: Cell<u64>,
    /// A lease takes at most 1/slice_parts of a key's unleased budget beyond its need.
    slice_parts: u64,
    fail_open: bool,
    keys: RefCell<KeyIdMap<Lease>>,
    /// Requests waiting for a lease answer.
    waiters: RefCell<Vec<Waker>>,
    /// How long a request refused while other workers hold the key's budget waits for them to
    /// hand it back before asking once more (zero: it does not wait).
    squeeze_wait: Duration,
}

impl Shard {
    /// `workers`: how many shards share the store (each takes at most half its share).
    /// `holder`: this worker's name in the store; `fail_open`: admit on what is known while the
    /// store cannot be reached, or refuse.
    pub fn new(ledger: Ledger, holder: Holder, workers: usize, fail_open: bool) -> Shard {
        // The holder is new at every start (runtime.rs), so its sequence starts anew too.
        Shard {
            lease_ttl: ledger.lease_ttl(),
            ledger,
            holder,
            next_seq: Cell::new(0),
            slice_parts: 2 * workers.max(1) as u64,
            fail_open,
            keys: RefCell::new(KeyIdMap::default()),
            waiters: RefCell::new(Vec::new()),
            squeeze_wait: Duration::ZERO,
        }
    }

    /// A request refused while other workers hold the key's budget waits `wait` (a couple of
    /// flush intervals: holders hand back unused lease at their next flush), then asks again.
    pub fn with_squeeze_wait(mut self, wait: Duration) -> Shard {
        self.squeeze_wait = wait;
        self
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    fn seq(&self) -> u64 {
        let seq = self.next_seq.get() + 1;
        self.next_seq.set(seq);
        seq
    }

    /// Reserves `estimate` nano-dollars for one request of `key`: from the lease when it
    /// covers it (no store call), else after one lease ask.
    pub async fn reserve(&self, key: KeyId, estimate: u64) -> Result<Reservation, Refusal> {
        // Computed only if the request has to wait: reading the clock is not free.
        let mut deadline: Option<Instant> = None;
        let mut mine: Option<u64> = None;
        let mut asks = 0;
        loop {
            let next = {
                let mut keys = self.keys.borrow_mut();
                let lease = keys.entry(key).or_default();
                let lapsing = self.lease_ttl.is_some() && self.lapsing(lease, Instant::now());
                if !lapsing && lease.free() >= estimate {
                    return Ok(take(lease, key, estimate));
                }
                if mine.is_some() && lease.dropped == mine {
                    return self.unreachable(lease, key, estimate);
                }
                let my_answer = mine.and_then(|m| lease.answered.filter(|(seq, _)| *seq == m));
                // The store counts this worker's lease as what it holds plus what it spent from
                // it since its last flush; the rest is other workers'. Waiting helps only if
                // the key has the estimate left once they hand theirs back.
                let mine_in_store = lease.held + lease.pending.from_lease;
                let others_hold = lease
                    .known
                    .is_some_and(|a| a.leased > mine_in_store && a.remaining() >= estimate);
                if lease.asking.is_none()
                    && my_answer.is_some_and(|(_, granted)| granted == 0)
                    && others_hold
                    && asks < MAX_ASKS
                    && !self.squeeze_wait.is_zero()
                {
                    // Refused while other workers hold the budget: the store asked them to hand
                    // back their unused lease at their next flush; ask again after it.
                    Next::AskAgainLater
                } else {
                    match (lease.asking, my_answer) {
                        // My ask was answered and others took the grant, or there was none.
                        (None, Some((_, granted))) if granted == 0 || asks >= MAX_ASKS => {
                            return Err(Refusal::Denied {
                                remaining_nano: lease.known.map_or(0, |a| a.remaining()),
                                estimate_nano: estimate,
                            });
                        }
                        (None, _) => {
                            let seq = self.seq();
                            lease.asking = Some(seq);
                            lease.unreachable = false;
                            mine = Some(seq);
                            asks += 1;
                            // A lease that may have lapsed is handed back in the same op, so the
                            // store's count and this worker's agree again whichever it was.
                            let returned = if lapsing {
                                std::mem::take(&mut lease.held)
                            } else {
                                0
                            };
                            Next::Ask(Op {
                                holder: self.holder.clone(),
                                seq,
                                key,
                                settle: Settlement {
                                    returned,
                                    ..Settlement::default()
                                },
                                ask: Some(Ask {
                                    need: estimate - lease.free(),
                                    parts: self.slice_parts,
                                }),
                            })
                        }
                        (Some(_), _)
                            if lease.unreachable
                                || deadline.is_some_and(|d| Instant::now() >= d) =>
                        {
                            return self.unreachable(lease, key, estimate);
                        }
                        (Some(_), _) => Next::WaitForAnswer,
                    }
                }
            };
            match next {
                Next::AskAgainLater => {
                    monoio::time::sleep(self.squeeze_wait).await;
                    mine = None;
                    // The next ask gets the whole store timeout again.
                    deadline = None;
                }
                Next::Ask(op) => match self.ledger.submit(vec![op.clone()]) {
                    Submitted::Applied(applied) => {
                        for (op, applied) in std::iter::once(op).zip(applied) {
                            self.answer(op, applied);
                        }
                    }
                    Submitted::Queued => {
                        let until =
                            *deadline.get_or_insert_with(|| Instant::now() + self.ledger.wait());
                        self.wait_until(until).await;
                    }
                    Submitted::Full => {
                        let mut keys = self.keys.borrow_mut();
                        let lease = keys.entry(key).or_default();
                        lease.asking = None;
                        lease.held += op.settle.returned;
                        return self.unreachable(lease, key, estimate);
                    }
                },
                Next::WaitForAnswer => {
                    let until =
                        *deadline.get_or_insert_with(|| Instant::now() + self.ledger.wait());
                    self.wait_until(until).await;
                }
            }
        }
    }

    /// The failure mode, when no lease can be had from the store: open admits on the last
    /// known state (everything, for a key never seen); closed refuses.
    fn unreachable(
        &self,
        lease: &mut Lease,
        key: KeyId,
        estimate: u64,
    ) -> Result<Reservation, Refusal> {
        if !self.fail_open {
            return Err(Refusal::Unavailable);
        }
        if lease.known.is_none() {
            // This worker has not touched the key: start from what the node last heard of it.
            lease.known = self.ledger.last_known(key);
        }
        let spent_here = lease
            .pending
            .spent
            .saturating_add(lease.reserved.saturating_sub(lease.held));
        match lease.known {
            Some(account) if account.remaining().saturating_sub(spent_here) < estimate => {
                Err(Refusal::Denied {
                    remaining_nano: account.remaining().saturating_sub(spent_here),
                    estimate_nano: estimate,
                })
            }
            _ => Ok(take(lease, key, estimate)),
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
                let lease = keys.entry(op.key).or_default();
                // Never applied. Its spend is in the ledger's rejected file for an operator (sent
                // again, it would be refused and recorded again); the lease it handed back is
                // still this worker's in the store; a request waiting on the ask gets the
                // failure mode.
                lease.held = lease.held.saturating_add(op.settle.returned);
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
        // A grant for a key this shard forgot is held again, and returned when idle.
        let lease = keys.entry(op.key).or_default();
        lease.known = Some(applied.account);
        lease.confirmed = Some(Instant::now());
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
    }

    /// What each active key may still spend, as the store last answered, less this worker's
    /// spend not yet handed over; at most `max` keys.
    pub fn remaining(&self, max: usize) -> HashMap<KeyId, u64> {
        self.keys
            .borrow()
            .iter()
            .filter_map(|(&key, lease)| {
                let known = lease.known?;
                Some((key, known.remaining().saturating_sub(lease.pending.spent)))
            })
            .take(max)
            .collect()
    }

    /// Ends a request: its reservation is replaced by its real cost (0 releases it).
    pub fn settle(&self, reservation: Reservation, cost: u64, now: Instant) {
        let mut keys = self.keys.borrow_mut();
        let lease = keys.entry(reservation.key).or_default();
        lease.reserved = lease.reserved.saturating_sub(reservation.amount);
        lease.in_flight = lease.in_flight.saturating_sub(1);
        // A cost above the estimate overruns the lease; the store counts it as spend all the same.
        let from_lease = cost.min(lease.held);
        lease.held -= from_lease;
        lease.pending.spent = lease.pending.spent.saturating_add(cost);
        lease.pending.from_lease += from_lease;
        lease.last_used = Some(now);
    }

    /// Hands settled spend to the store, returns the leases of keys idle since `IDLE_RETURN`
    /// (and of keys whose lease may have lapsed), tops up the leases of busy keys running low
    /// (so their requests need not wait for the store), and renews held leases. Nothing changes
    /// here unless the ledger took the ops.
    pub fn flush(&self, now: Instant) {
        self.flush_with(now, false);
    }

    fn flush_with(&self, now: Instant, last: bool) {
        // The in-memory store keeps leases for good; a renewal every minute costs nothing.
        let renew_every = self
            .lease_ttl
            .map_or(Duration::from_secs(60), |ttl| ttl / RENEWALS_PER_LIFETIME);
        let ops = {
            let keys = self.keys.borrow();
            let mut ops = Vec::new();
            for (&key, lease) in keys.iter() {
                let idle = lease.idle(now);
                let returned = if last
                    && self.lease_ttl.is_some()
                    && (lease.held > 0 || lease.asking.is_some())
                {
                    // A grant may still sit unread in the inbox: hand back whatever the store
                    // holds for this worker (it clamps at what it holds).
                    RETURN_ALL
                } else if last || self.lapsing(lease, now) {
                    lease.held
                } else if idle || (lease.squeezed && lease.asking.is_none()) {
                    // (Not while an ask of its own is out: its need counted on the free part.)
                    lease.free()
                } else {
                    0
                };
                let settle = Settlement {
                    returned,
                    ..lease.pending
                };
                let low = lease.last_grant > 0 && lease.free() < lease.last_grant / 4;
                let ask = (!idle && !last && !lease.squeezed && low && lease.asking.is_none())
                    .then_some(Ask {
                        need: 0,
                        parts: self.slice_parts,
                    });
                let renew = lease.held > 0
                    && lease
                        .renewed
                        .is_none_or(|t| now.saturating_duration_since(t) >= renew_every);
                if !settle.is_empty() || ask.is_some() || renew {
                    ops.push(Op {
                        holder: self.holder.clone(),
                        seq: self.seq(),
                        key,
                        settle,
                        ask,
                    });
                }
            }
            ops
        };
        if !ops.is_empty() {
            let taken = if last {
                self.ledger.submit_last(ops.clone())
            } else {
                self.ledger.submit(ops.clone())
            };
            let answers = match taken {
                Submitted::Full => return,
                Submitted::Applied(applied) => Some(applied),
                Submitted::Queued => None,
            };
            self.commit(&ops, now);
            for (op, applied) in ops.into_iter().zip(answers.into_iter().flatten()) {
                self.answer(op, applied);
            }
        }
        self.keys
            .borrow_mut()
            .retain(|_, lease| !(lease.idle(now) && lease.held == 0 && lease.pending.is_empty()));
    }

    /// The ledger took `ops`: the spend and returns they carry leave this shard. Until the
    /// store answers, its last known spend for the key counts them (the failure mode's limit).
    fn commit(&self, ops: &[Op], now: Instant) {
        let mut keys = self.keys.borrow_mut();
        for op in ops {
            if let Some(lease) = keys.get_mut(&op.key) {
                lease.pending = Settlement::default();
                lease.held = lease.held.saturating_sub(op.settle.returned);
                lease.renewed = Some(now);
                if let Some(known) = lease.known.as_mut() {
                    known.spent = known.spent.saturating_add(op.settle.spent);
                }
                if op.ask.is_some() {
                    lease.asking = Some(op.seq);
                }
            }
        }
    }

    /// At shutdown: requests still in flight (past the grace) are billed what they reserved,
    /// then all spend is handed over and every lease returned, waiting for room in the
    /// ledger's queue if need be.
    pub fn close(&self, now: Instant) {
        for lease in self.keys.borrow_mut().values_mut() {
            if lease.in_flight > 0 {
                let cut = std::mem::take(&mut lease.reserved);
                let from_lease = cut.min(lease.held);
                lease.held -= from_lease;
                lease.pending.spent = lease.pending.spent.saturating_add(cut);
                lease.pending.from_lease += from_lease;
                lease.in_flight = 0;
                lease.last_used = None;
            }
        }
        self.flush_with(now + IDLE_RETURN, true);
    }
}

/// What a waiting reservation does next.
enum Next {
    /// Send this lease ask.
    Ask(Op),
    /// An ask is in flight: wait for its answer.
    WaitForAnswer,
    /// Refused while other workers hold the budget: wait for them to hand it back, then ask.
    AskAgainLater,
}

/// Reserves `estimate` in `lease` for one request.
fn take(lease: &mut Lease, key: KeyId, estimate: u64) -> Reservation {
    lease.reserved = lease.reserved.saturating_add(estimate);
    lease.in_flight += 1;
    Reservation {
        key,
        amount: estimate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::store::{system_clock, MemoryStore};
    use std::future::Future;
    use std::sync::Arc;

    fn key() -> KeyId {
        KeyId::of("sk-budget-test")
    }

    fn shard(store: Arc<MemoryStore>, workers: usize) -> Shard {
        Shard::new(Ledger::Inline(store), Holder::from("test/0"), workers, true)
    }

    /// A runtime for the tests that wait (a remote ledger, a squeeze).
    fn runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>> {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
    }

    /// The in-memory ledger answers in place: a reservation is ready at the first poll.
    fn reserve(shard: &Shard, key: KeyId, estimate: u64) -> Result<Reservation, Refusal> {
        let mut future = std::pin::pin!(shard.reserve(key, estimate));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(Refusal::Unavailable),
        }
    }

    fn store(limit: u64) -> Arc<MemoryStore> {
        Arc::new(MemoryStore::new(
            limit,
            HashMap::new(),
            crate::config::Period::Never,
            system_clock(),
        ))
    }

    #[test]
    fn reserve_settle_flush_is_exact() {
        let store = store(1_000);
        let shard = shard(store.clone(), 1);
        let now = Instant::now();
        let r = reserve(&shard, key(), 300).unwrap();
        shard.settle(r, 120, now);
        assert_eq!(
            store.account(key()).spent,
            0,
            "spend reaches the store at flush"
        );
        shard.flush(now);
        assert_eq!(store.account(key()).spent, 120);
        // Idle long enough: the rest of the lease goes back.
        shard.flush(now + IDLE_RETURN);
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
    fn admission_is_local_while_the_lease_covers_it() {
        let store = store(1_000);
        let shard = shard(store.clone(), 1);
        let first = reserve(&shard, key(), 100).unwrap();
        let leased = store.account(key()).leased;
        assert_eq!(leased, 100 + 900 / 2);
        let second = reserve(&shard, key(), 100).unwrap();
        assert_eq!(store.account(key()).leased, leased, "no second store call");
        shard.settle(first, 0, Instant::now());
        shard.settle(second, 0, Instant::now());
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
                held.push((i % 4, r));
            }
        }
        assert!(admitted <= 1_000, "admitted {admitted}");
        // Every admitted request costs its full estimate: spend reaches but never passes 1000.
        let now = Instant::now();
        for (s, r) in held {
            shards[s].settle(r, 70, now);
        }
        for s in &shards {
            s.flush(now + IDLE_RETURN);
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
        shard.settle(first, 1_000, now);
        // 300 free, below a quarter of the 5500 granted; the key is still busy.
        shard.flush(now);
        let account = store.account(key());
        assert_eq!(account.spent, 1_000);
        // Topped up by half of the 4500 neither spent nor leased.
        assert_eq!(account.leased, 4_500 + 2_250);
        assert!(account.spent + account.leased <= account.limit);
        shard.settle(second, 0, now);
    }

    #[test]
    fn a_key_without_budget_for_the_estimate_is_denied() {
        let shard = shard(store(100), 1);
        let denied = reserve(&shard, key(), 101).unwrap_err();
        assert_eq!(
            denied,
            Refusal::Denied {
                remaining_nano: 100,
                estimate_nano: 101
            }
        );
        let r = reserve(&shard, key(), 100).unwrap();
        shard.settle(r, 100, Instant::now());
        shard.flush(Instant::now());
        assert!(matches!(
            reserve(&shard, key(), 1),
            Err(Refusal::Denied {
                remaining_nano: 0,
                ..
            })
        ));
    }

    /// With a remote store, a lease the store has not confirmed for two thirds of its
    /// lifetime is not admitted on: the next request asks again and hands the old lease back in
    /// the same op, so the store's count and the worker's agree whether or not it lapsed there.
    #[test]
    fn a_lease_unconfirmed_for_most_of_its_lifetime_is_handed_back_not_spent() {
        let store = store(1_000_000);
        let ttl = Duration::from_millis(300);
        let journal = std::env::temp_dir().join(format!("aura-budget-test-{}", std::process::id()));
        let (thread, mut handles) = crate::budget::ledger::LedgerThread::start(
            store.clone(),
            1,
            Duration::from_secs(2),
            ttl,
            journal,
        )
        .unwrap();
        let (ledger, mut inbox) = handles.remove(0);
        let shard = std::rc::Rc::new(Shard::new(ledger, Holder::from("test/remote/0"), 1, false));
        let mut runtime = runtime();
        runtime.block_on(async {
            let pump = shard.clone();
            monoio::spawn(async move {
                while let Ok(reply) = inbox.recv().await {
                    pump.on_reply(reply);
                }
            });
            let first = shard.reserve(key(), 1_000).await.unwrap();
            let granted = store.account(key()).leased;
            assert_eq!(granted, 1_000 + 999_000 / 2);
            shard.settle(first, 0, Instant::now());
            // Nothing renews the lease (no flush) for longer than two thirds of its life.
            monoio::time::sleep(ttl - ttl / 4).await;
            let second = shard.reserve(key(), 3_000).await.unwrap();
            let account = store.account(key());
            // Spent from the old lease: 500,500 leased still. Asked on top of it: 751,750.
            assert_eq!(
                account.leased,
                3_000 + (1_000_000 - 3_000) / 2,
                "the old lease was handed back as the new one was granted"
            );
            shard.settle(second, 0, Instant::now());
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
        let a = std::rc::Rc::new(shard(store.clone(), 2).with_squeeze_wait(wait));
        let b = std::rc::Rc::new(shard(store.clone(), 2).with_squeeze_wait(wait));
        let impatient = shard(store.clone(), 2);
        let mut runtime = runtime();
        runtime.block_on(async {
            // A leases 600 + a quarter of the 400 left, and spends 10 of it.
            let r = a.reserve(key(), 600).await.unwrap();
            a.settle(r, 10, Instant::now());
            assert_eq!(store.account(key()).leased, 700);
            // Only 300 is not leased: 400 cannot be had without A's unused lease.
            assert!(matches!(
                impatient.reserve(key(), 400).await,
                Err(Refusal::Denied { .. })
            ));
            let waiting = monoio::spawn({
                let b = b.clone();
                async move { b.reserve(key(), 400).await }
            });
            monoio::time::sleep(Duration::from_millis(5)).await;
            // A's flush hears of the squeeze; its next one hands back what it does not use.
            a.flush(Instant::now());
            a.flush(Instant::now());
            let admitted = waiting.await.unwrap();
            let account = store.account(key());
            assert_eq!(account.spent, 10);
            assert!(account.spent + account.leased <= account.limit);
            b.settle(admitted, 0, Instant::now());
        });
    }

    #[test]
    fn a_cost_above_the_estimate_is_still_billed_in_full() {
        let store = store(100);
        let shard = shard(store.clone(), 1);
        let r = reserve(&shard, key(), 50).unwrap();
        shard.settle(r, 130, Instant::now());
        shard.flush(Instant::now() + IDLE_RETURN);
        let account = store.account(key());
        assert_eq!((account.spent, account.leased), (130, 0));
    }
}
