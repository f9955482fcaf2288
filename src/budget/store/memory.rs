//! The single-node store: every key's totals in a map behind one mutex, touched only at lease,
//! flush and admin time (never on the request path).

use std::collections::HashMap;
use std::sync::Mutex;

use super::{Clock, Store, StoreError};
use crate::auth::KeyId;
use crate::budget::op::{period_of, Account, Applied, Op, Settlement};
use crate::config::Period;

/// The single-node store: a map behind one mutex, touched only at lease, flush and admin time.
pub struct MemoryStore {
    default_limit: u64,
    limits: HashMap<KeyId, u64>,
    period: Period,
    clock: Clock,
    accounts: Mutex<HashMap<KeyId, Entry>>,
}

struct Entry {
    account: Account,
    /// The budget period the spend belongs to.
    period: u64,
    /// Until then, holders are asked to hand back their unused lease.
    squeeze_until: Option<std::time::Instant>,
}

impl MemoryStore {
    /// `limits` override `default_limit` for their keys; spend resets each `period`.
    pub fn new(
        default_limit: u64,
        limits: HashMap<KeyId, u64>,
        period: Period,
        clock: Clock,
    ) -> MemoryStore {
        MemoryStore {
            default_limit,
            limits,
            period,
            clock,
            accounts: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<KeyId, Entry>> {
        match self.accounts.lock() {
            Ok(a) => a,
            // A panic elsewhere while holding the lock leaves the map consistent (every update
            // is a few integer stores): keep going rather than lose all budgets.
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn with<T>(&self, key: KeyId, f: impl FnOnce(&mut Account) -> T) -> T {
        let now = period_of(self.period, (self.clock)());
        let mut accounts = self.lock();
        let limit = self.limits.get(&key).copied().unwrap_or(self.default_limit);
        let entry = accounts.entry(key).or_insert(Entry {
            account: Account {
                limit,
                ..Account::default()
            },
            period: now,
            squeeze_until: None,
        });
        if entry.period != now {
            // A new day or month: spend starts again; leases in workers stay theirs.
            entry.account.spent = 0;
            entry.period = now;
        }
        f(&mut entry.account)
    }
}

impl MemoryStore {
    /// Starts a squeeze of `key` if `refused` while workers hold some of its budget; whether
    /// the key is being squeezed.
    fn squeeze(&self, key: KeyId, refused: bool, now: std::time::Instant) -> bool {
        let mut accounts = self.lock();
        let Some(entry) = accounts.get_mut(&key) else {
            return false;
        };
        if refused && entry.account.leased > 0 {
            entry.squeeze_until = Some(now + super::valkey::SQUEEZE);
        }
        entry.squeeze_until.is_some_and(|until| now < until)
    }

    /// Leases `need` plus a `slice_parts`-th of what is left beyond it, or nothing.
    pub fn lease(&self, key: KeyId, need: u64, slice_parts: u64) -> (u64, Account) {
        self.with(key, |a| {
            let unleased = a.unleased();
            if unleased < need {
                return (0, *a);
            }
            let slice = (unleased - need) / slice_parts.max(1);
            let granted = need + slice;
            a.leased += granted;
            (granted, *a)
        })
    }

    pub fn settle(&self, key: KeyId, s: Settlement) -> Account {
        self.with(key, |a| {
            a.spent = a.spent.saturating_add(s.spent);
            a.leased = a
                .leased
                .saturating_sub(s.from_lease.saturating_add(s.returned));
            *a
        })
    }

    pub fn account(&self, key: KeyId) -> Account {
        self.with(key, |a| *a)
    }

    pub fn set_limit(&self, key: KeyId, limit: u64) -> Account {
        self.with(key, |a| {
            a.limit = limit;
            *a
        })
    }

    pub fn reset(&self, key: KeyId) -> Account {
        self.with(key, |a| {
            a.spent = 0;
            *a
        })
    }

    pub fn holds(&self, key: KeyId) -> bool {
        self.lock().contains_key(&key) || self.limits.contains_key(&key)
    }

    pub fn remove(&self, key: KeyId) {
        self.lock().remove(&key);
    }

    pub fn accounts(&self) -> Vec<(KeyId, Account)> {
        let keys: Vec<KeyId> = self.lock().keys().copied().collect();
        // Through `with`, so a period that ended shows as reset.
        keys.into_iter().map(|k| (k, self.account(k))).collect()
    }
}

impl Store for MemoryStore {
    fn apply(&self, ops: &[Op]) -> Result<Vec<Applied>, StoreError> {
        // One process: no retries, so no sequence numbers to check, and no holder outlives it.
        let now = std::time::Instant::now();
        Ok(ops
            .iter()
            .map(|op| {
                let mut applied = Applied {
                    granted: 0,
                    account: self.settle(op.key, op.settle),
                    squeezed: false,
                };
                if let Some(ask) = op.ask {
                    let (granted, account) = self.lease(op.key, ask.need, ask.parts);
                    applied.granted = granted;
                    applied.account = account;
                }
                // A top-up (need 0) granted nothing is no refusal: nobody is waiting on it.
                let refused = op.ask.is_some_and(|a| a.need > 0) && applied.granted == 0;
                applied.squeezed = self.squeeze(op.key, refused, now);
                applied
            })
            .collect())
    }

    fn account(&self, key: KeyId) -> Result<Account, StoreError> {
        Ok(MemoryStore::account(self, key))
    }

    fn set_limit(&self, key: KeyId, limit: u64) -> Result<Account, StoreError> {
        Ok(MemoryStore::set_limit(self, key, limit))
    }

    fn reset(&self, key: KeyId) -> Result<Account, StoreError> {
        Ok(MemoryStore::reset(self, key))
    }

    fn remove(&self, key: KeyId) -> Result<(), StoreError> {
        MemoryStore::remove(self, key);
        Ok(())
    }

    fn accounts(&self) -> Result<Vec<(KeyId, Account)>, StoreError> {
        Ok(MemoryStore::accounts(self))
    }

    fn holds(&self, key: KeyId) -> Result<bool, StoreError> {
        Ok(MemoryStore::holds(self, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::store::system_clock;
    use std::sync::Arc;

    fn key(n: u8) -> KeyId {
        KeyId::of(&format!("sk-test-{n}"))
    }

    fn memory(limit: u64) -> MemoryStore {
        MemoryStore::new(limit, HashMap::new(), Period::Never, system_clock())
    }

    #[test]
    fn spend_resets_when_the_period_turns() {
        use std::sync::atomic::{AtomicU64, Ordering};
        // 2026-01-31 23:59:00 UTC.
        let now = Arc::new(AtomicU64::new(1_769_903_940));
        let clock: Clock = {
            let now = now.clone();
            Arc::new(move || now.load(Ordering::Relaxed))
        };
        let daily = MemoryStore::new(1_000, HashMap::new(), Period::Daily, clock.clone());
        let monthly = MemoryStore::new(1_000, HashMap::new(), Period::Monthly, clock);
        for store in [&daily, &monthly] {
            store.lease(key(9), 400, 1);
            let s = Settlement {
                spent: 400,
                from_lease: 400,
                returned: 0,
            };
            assert_eq!(store.settle(key(9), s).spent, 400);
        }
        // Two minutes later: 2026-02-01, a new day and a new month.
        now.fetch_add(120, Ordering::Relaxed);
        assert_eq!(daily.account(key(9)).spent, 0);
        assert_eq!(monthly.account(key(9)).spent, 0);
        daily.settle(
            key(9),
            Settlement {
                spent: 7,
                ..Settlement::default()
            },
        );
        monthly.settle(
            key(9),
            Settlement {
                spent: 7,
                ..Settlement::default()
            },
        );
        // A day later: the daily budget resets again, the monthly one does not.
        now.fetch_add(86_400, Ordering::Relaxed);
        assert_eq!(daily.account(key(9)).spent, 0);
        assert_eq!(monthly.account(key(9)).spent, 7);
    }

    #[test]
    fn admin_operations() {
        let store = memory(1_000);
        store.settle(
            key(6),
            Settlement {
                spent: 300,
                ..Settlement::default()
            },
        );
        assert_eq!(store.set_limit(key(6), 5_000).remaining(), 4_700);
        assert_eq!(store.reset(key(6)).spent, 0);
        assert_eq!(store.accounts().len(), 1);
        assert!(store.holds(key(6)));
        store.remove(key(6));
        assert!(store.accounts().is_empty());
        assert!(!store.holds(key(6)));
        assert_eq!(store.account(key(6)).limit, 1_000);
    }

    #[test]
    fn leases_never_exceed_the_limit() {
        let store = memory(1_000);
        let (a, _) = store.lease(key(1), 100, 4);
        // 100 needed + a quarter of the 900 left.
        assert_eq!(a, 100 + 225);
        let (b, account) = store.lease(key(1), 600, 4);
        assert_eq!(b, 600 + (1_000 - 325 - 600) / 4);
        assert!(account.spent + account.leased <= account.limit);
        // Not enough left for the need: nothing is granted.
        let (c, account) = store.lease(key(1), 500, 4);
        assert_eq!(c, 0);
        assert_eq!(account.leased, a + b);
    }

    #[test]
    fn settling_moves_lease_to_spend_and_returns_the_rest() {
        let store = memory(1_000);
        let (granted, _) = store.lease(key(2), 300, 1);
        assert_eq!(granted, 1_000);
        let account = store.settle(
            key(2),
            Settlement {
                spent: 250,
                from_lease: 250,
                returned: 750,
            },
        );
        assert_eq!(
            account,
            Account {
                limit: 1_000,
                spent: 250,
                leased: 0
            }
        );
        assert_eq!(account.remaining(), 750);
    }

    #[test]
    fn spend_beyond_a_lease_is_counted_and_never_underflows() {
        let store = memory(100);
        store.lease(key(3), 100, 1);
        let account = store.settle(
            key(3),
            Settlement {
                spent: 130,
                from_lease: 100,
                returned: 0,
            },
        );
        assert_eq!(
            (account.spent, account.leased, account.remaining()),
            (130, 0, 0)
        );
        assert_eq!(store.lease(key(3), 1, 1).0, 0);
    }

    #[test]
    fn configured_limits_override_the_default() {
        let store = MemoryStore::new(
            10,
            HashMap::from([(key(4), 99)]),
            Period::Never,
            system_clock(),
        );
        assert_eq!(store.account(key(4)).limit, 99);
        assert_eq!(store.account(key(5)).limit, 10);
    }
}
