//! The budget stores, implementing budget.rs's [`Store`]: per key id, its limit, what it has
//! spent, and how much of the rest is leased out to workers. The in-memory store serves one
//! node (the default); a Valkey store will serve a fleet behind the same trait.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::auth::KeyId;
use crate::budget::{Account, Settlement, Store};
use crate::config::Period;

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
        });
        if entry.period != now {
            // A new day or month: spend starts again; leases in workers stay theirs.
            entry.account.spent = 0;
            entry.period = now;
        }
        f(&mut entry.account)
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

impl Store for MemoryStore {
    fn lease(&self, key: KeyId, need: u64, slice_parts: u64) -> (u64, Account) {
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

    fn settle(&self, key: KeyId, s: Settlement) -> Account {
        self.with(key, |a| {
            a.spent = a.spent.saturating_add(s.spent);
            a.leased = a
                .leased
                .saturating_sub(s.from_lease.saturating_add(s.returned));
            *a
        })
    }

    fn account(&self, key: KeyId) -> Account {
        self.with(key, |a| *a)
    }

    fn set_limit(&self, key: KeyId, limit: u64) -> Account {
        self.with(key, |a| {
            a.limit = limit;
            *a
        })
    }

    fn reset(&self, key: KeyId) -> Account {
        self.with(key, |a| {
            a.spent = 0;
            *a
        })
    }

    fn holds(&self, key: KeyId) -> bool {
        self.lock().contains_key(&key) || self.limits.contains_key(&key)
    }

    fn remove(&self, key: KeyId) {
        self.lock().remove(&key);
    }

    fn accounts(&self) -> Vec<(KeyId, Account)> {
        let keys: Vec<KeyId> = self.lock().keys().copied().collect();
        // Through `with`, so a period that ended shows as reset.
        keys.into_iter().map(|k| (k, self.account(k))).collect()
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
