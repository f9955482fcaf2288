//! A worker's budget shard: per active key, a lease (a slice of the key's budget granted by the
//! store), the part of it reserved by requests in flight, and spend settled since the last flush.
//! Admission is a local check against the lease: no lock, no shared atomic, no store call,
//! unless the lease cannot cover the request (then one store call, which grants the need plus a
//! slice of what is left, sized so the last dollars are not stranded in one worker).
//! Reserve, then settle: a request reserves its upper cost estimate before it is forwarded and
//! settles to its real cost at the end (0 when it failed), so concurrent requests cannot spend
//! beyond the limit except by their estimates' error. `flush` (every flush interval, off the
//! request path) hands settled spend to the store and returns leases of keys gone idle.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::KeyId;

/// One key's totals, in nano-dollars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Account {
    pub limit: u64,
    pub spent: u64,
    /// Granted to workers and not yet spent or returned.
    pub leased: u64,
}

impl Account {
    /// Neither spent nor leased.
    pub fn unleased(&self) -> u64 {
        self.limit
            .saturating_sub(self.spent.saturating_add(self.leased))
    }

    /// What the key may still spend, leases included.
    pub fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.spent)
    }
}

/// A worker's flush for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settlement {
    /// Spend since the last flush.
    pub spent: u64,
    /// The part of `spent` that came out of the worker's lease (the rest overran it).
    pub from_lease: u64,
    /// Unused lease handed back.
    pub returned: u64,
}

/// The store's side of a budget, as the shard sees it. Every call is atomic per key, and
/// together the calls keep `spent + leased <= limit`, apart from spend beyond a lease (a request
/// that cost more than its estimate). The shard calls it only to take a lease and to flush,
/// never once per request. Implemented in store.rs.
pub trait Store: Send + Sync {
    /// Leases `need` nano-dollars of `key`'s unleased budget, plus a slice of what is left (at
    /// most `slice_parts`-th of it) so the next requests need not ask. Grants nothing if `need`
    /// itself is not there: a partial lease would strand budget in a worker that cannot use it.
    fn lease(&self, key: KeyId, need: u64, slice_parts: u64) -> (u64, Account);
    /// Applies a worker's flush; returns the key's new totals.
    fn settle(&self, key: KeyId, settlement: Settlement) -> Account;
    /// The key's totals (a key never seen has its configured or the default limit).
    fn account(&self, key: KeyId) -> Account;
    /// Admin: sets the key's limit.
    fn set_limit(&self, key: KeyId, limit: u64) -> Account;
    /// Admin: the key's spend back to zero.
    fn reset(&self, key: KeyId) -> Account;
    /// Admin: forgets the key's limit and spend (back to its configured or the default limit).
    fn remove(&self, key: KeyId);
    /// Every key the store holds, with its totals.
    fn accounts(&self) -> Vec<(KeyId, Account)>;
    /// Whether the store holds the key (it has been used, or given a limit).
    fn holds(&self, key: KeyId) -> bool;
}

/// An idle key's lease goes back to the store after this long without a request.
pub const IDLE_RETURN: Duration = Duration::from_secs(1);

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

/// Why a request was refused: the key cannot reserve its estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied {
    pub remaining_nano: u64,
    pub estimate_nano: u64,
}

#[derive(Debug, Default)]
struct Lease {
    /// Granted by the store and not yet spent or returned (reservations included).
    held: u64,
    /// The part of `held` reserved by requests in flight.
    reserved: u64,
    in_flight: u32,
    pending: Settlement,
    last_used: Option<Instant>,
    /// The last grant: a free lease below a quarter of it is topped up at flush.
    last_grant: u64,
}

impl Lease {
    fn free(&self) -> u64 {
        self.held.saturating_sub(self.reserved)
    }
}

pub struct Shard {
    store: Arc<dyn Store>,
    /// A lease takes at most 1/slice_parts of a key's unleased budget beyond its need.
    slice_parts: u64,
    keys: RefCell<HashMap<KeyId, Lease>>,
}

impl Shard {
    /// `workers`: how many shards share the store (each takes at most half its share).
    pub fn new(store: Arc<dyn Store>, workers: usize) -> Shard {
        Shard {
            store,
            slice_parts: 2 * workers.max(1) as u64,
            keys: RefCell::new(HashMap::new()),
        }
    }

    /// Reserves `estimate` nano-dollars for one request of `key`.
    pub fn reserve(&self, key: KeyId, estimate: u64) -> Result<Reservation, Denied> {
        let mut keys = self.keys.borrow_mut();
        let lease = keys.entry(key).or_default();
        if lease.free() < estimate {
            let need = estimate - lease.free();
            let (granted, account) = self.store.lease(key, need, self.slice_parts);
            if granted == 0 {
                return Err(Denied {
                    remaining_nano: account.remaining(),
                    estimate_nano: estimate,
                });
            }
            lease.held += granted;
            lease.last_grant = granted;
        }
        lease.reserved += estimate;
        lease.in_flight += 1;
        Ok(Reservation {
            key,
            amount: estimate,
        })
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
        lease.pending.spent += cost;
        lease.pending.from_lease += from_lease;
        lease.last_used = Some(now);
    }

    /// Hands settled spend to the store, returns the leases of keys idle since `IDLE_RETURN`,
    /// and tops up the leases of busy keys running low, so their requests need not wait for the
    /// store.
    pub fn flush(&self, now: Instant) {
        let mut keys = self.keys.borrow_mut();
        keys.retain(|&key, lease| {
            let idle = lease.in_flight == 0
                && lease
                    .last_used
                    .is_none_or(|t| now.saturating_duration_since(t) >= IDLE_RETURN);
            let returned = if idle { lease.free() } else { 0 };
            let settlement = Settlement {
                returned,
                ..std::mem::take(&mut lease.pending)
            };
            if settlement != Settlement::default() {
                self.store.settle(key, settlement);
                lease.held -= returned;
            }
            if !idle && lease.free() < lease.last_grant / 4 {
                // A slice of what is left, no more: it shrinks as the budget does.
                let (granted, _) = self.store.lease(key, 0, self.slice_parts);
                lease.held += granted;
            }
            !(idle && lease.held == 0)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn key() -> KeyId {
        KeyId::of("sk-budget-test")
    }

    fn store(limit: u64) -> Arc<MemoryStore> {
        Arc::new(MemoryStore::new(
            limit,
            HashMap::new(),
            crate::config::Period::Never,
            crate::store::system_clock(),
        ))
    }

    #[test]
    fn reserve_settle_flush_is_exact() {
        let store = store(1_000);
        let shard = Shard::new(store.clone(), 1);
        let now = Instant::now();
        let r = shard.reserve(key(), 300).unwrap();
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
        let shard = Shard::new(store.clone(), 1);
        let first = shard.reserve(key(), 100).unwrap();
        let leased = store.account(key()).leased;
        assert_eq!(leased, 100 + 900 / 2);
        let second = shard.reserve(key(), 100).unwrap();
        assert_eq!(store.account(key()).leased, leased, "no second store call");
        shard.settle(first, 0, Instant::now());
        shard.settle(second, 0, Instant::now());
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_limit() {
        let store = store(1_000);
        let shards: Vec<Shard> = (0..4).map(|_| Shard::new(store.clone(), 4)).collect();
        let mut admitted = 0;
        let mut held = Vec::new();
        for i in 0..100 {
            if let Ok(r) = shards[i % 4].reserve(key(), 70) {
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
        let shard = Shard::new(store.clone(), 1);
        let now = Instant::now();
        // Need 1000 + half of the 9000 left: a lease of 5500.
        let first = shard.reserve(key(), 1_000).unwrap();
        assert_eq!(store.account(key()).leased, 5_500);
        let second = shard.reserve(key(), 4_200).unwrap();
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
        let shard = Shard::new(store(100), 1);
        let denied = shard.reserve(key(), 101).unwrap_err();
        assert_eq!(
            denied,
            Denied {
                remaining_nano: 100,
                estimate_nano: 101
            }
        );
        let r = shard.reserve(key(), 100).unwrap();
        shard.settle(r, 100, Instant::now());
        shard.flush(Instant::now());
        assert_eq!(shard.reserve(key(), 1).unwrap_err().remaining_nano, 0);
    }

    #[test]
    fn a_cost_above_the_estimate_is_still_billed_in_full() {
        let store = store(100);
        let shard = Shard::new(store.clone(), 1);
        let r = shard.reserve(key(), 50).unwrap();
        shard.settle(r, 130, Instant::now());
        shard.flush(Instant::now() + IDLE_RETURN);
        let account = store.account(key());
        assert_eq!((account.spent, account.leased), (130, 0));
    }
}
