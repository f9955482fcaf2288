//! The budget stores: per key id, its limit, what it has spent, and how much of the rest is
//! leased out to workers. [`MemoryStore`] serves one node (the default); [`valkey::ValkeyStore`]
//! serves a fleet sharing one Valkey/Redis. Workers never call a store on the request path: their
//! shards (budget.rs) call it to take a lease and to flush, through the ledger (ledger.rs).

pub mod valkey;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::auth::KeyId;
use crate::config::Period;

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

impl Settlement {
    pub fn is_empty(&self) -> bool {
        *self == Settlement::default()
    }

    /// Two flushes' worth as one (both not yet applied).
    pub fn merge(&mut self, other: Settlement) {
        self.spent = self.spent.saturating_add(other.spent);
        self.from_lease = self.from_lease.saturating_add(other.from_lease);
        self.returned = self.returned.saturating_add(other.returned);
    }
}

/// Who holds a lease: one worker of one node, `node/worker`. The Valkey store keeps leases and
/// exactly-once sequence numbers per holder.
pub type Holder = Arc<str>;

/// A lease asked for: `need` nano-dollars (all or nothing: a partial lease would strand budget
/// in a worker that cannot use it) plus at most a `parts`-th of what is left beyond it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    pub need: u64,
    pub parts: u64,
}

/// One worker's change to one key: a settlement, then optionally a lease. The store applies it
/// atomically, and only if `seq` is newer than the last one it applied for this holder and key,
/// so a retry or a journal replay cannot apply it twice. An empty op renews the holder's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub holder: Holder,
    pub seq: u64,
    pub key: KeyId,
    pub settle: Settlement,
    pub ask: Option<Ask>,
}

/// What an op did: the lease granted (0 when the need was not there) and the key's new totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    pub granted: u64,
    pub account: Account,
    /// A worker was refused a lease lately while others held the key's budget: holders should
    /// hand back what they are not using (so the last dollars are not stranded in busy workers).
    pub squeezed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer (down, unreachable, timed out); nothing is known of the call.
    #[error("budget store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with something this version does not understand.
    #[error("budget store answered unexpectedly: {0}")]
    Protocol(String),
}

/// A budget store. Every call is atomic per key, and together the calls keep
/// `spent + leased <= limit`, apart from spend beyond a lease (a request that cost more than its
/// estimate). Calls may block (a network round trip): workers make them only through the ledger.
pub trait Store: Send + Sync {
    /// Applies ops in order; one answer per op.
    fn apply(&self, ops: &[Op]) -> Result<Vec<Applied>, StoreError>;
    /// The key's totals (a key never seen has its configured or the default limit).
    fn account(&self, key: KeyId) -> Result<Account, StoreError>;
    /// Admin: sets the key's limit.
    fn set_limit(&self, key: KeyId, limit: u64) -> Result<Account, StoreError>;
    /// Admin: the key's spend back to zero.
    fn reset(&self, key: KeyId) -> Result<Account, StoreError>;
    /// Admin: forgets the key's limit and spend (back to its configured or the default limit).
    fn remove(&self, key: KeyId) -> Result<(), StoreError>;
    /// Every key the store holds, with its totals.
    fn accounts(&self) -> Result<Vec<(KeyId, Account)>, StoreError>;
    /// Whether the store holds the key (it has been used, or given a limit).
    fn holds(&self, key: KeyId) -> Result<bool, StoreError>;
    /// Whether the store answers at all (the ledger asks while it has nothing else to send).
    fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Seconds since the Unix epoch; a parameter so tests can move time.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    })
}

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
            entry.squeeze_until = Some(now + valkey::SQUEEZE);
        }
        entry.squeeze_until.is_some_and(|until| now < until)
    }
}

/// Which budget period `unix_secs` falls in: 0 always, the day number, or the month number.
pub fn period_of(period: Period, unix_secs: u64) -> u64 {
    let days = unix_secs / 86_400;
    match period {
        Period::Never => 0,
        Period::Daily => days,
        Period::Monthly => {
            let (year, month) = civil_year_month(days);
            year * 12 + month
        }
    }
}

/// Year and month (1-12) of a day count since 1970-01-01 (Howard Hinnant's civil_from_days).
fn civil_year_month(days: u64) -> (u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month)
}

impl MemoryStore {
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
    fn months_are_calendar_months() {
        let month = |secs| period_of(Period::Monthly, secs);
        assert_eq!(civil_year_month(0), (1970, 1));
        // 2024-02-29 (a leap day) and 2024-03-01.
        assert_eq!(civil_year_month(19_782), (2024, 2));
        assert_eq!(civil_year_month(19_783), (2024, 3));
        assert_ne!(month(1_769_903_940), month(1_769_903_940 + 120));
        assert_eq!(period_of(Period::Never, 1_769_903_940), 0);
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
