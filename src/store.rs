//! The budget stores, implementing budget.rs's [`Store`]: per key id, its limit, what it has
//! spent, and how much of the rest is leased out to workers. The in-memory store serves one
//! node (the default); a Valkey store will serve a fleet behind the same trait.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::auth::KeyId;
use crate::budget::{Account, Settlement, Store};

/// The single-node store: a map behind one mutex, touched only at lease and flush time.
#[derive(Debug)]
pub struct MemoryStore {
    default_limit: u64,
    limits: HashMap<KeyId, u64>,
    accounts: Mutex<HashMap<KeyId, Account>>,
}

impl MemoryStore {
    /// `limits` override `default_limit` for their keys.
    pub fn new(default_limit: u64, limits: HashMap<KeyId, u64>) -> MemoryStore {
        MemoryStore {
            default_limit,
            limits,
            accounts: Mutex::new(HashMap::new()),
        }
    }

    fn with<T>(&self, key: KeyId, f: impl FnOnce(&mut Account) -> T) -> T {
        let mut accounts = match self.accounts.lock() {
            Ok(a) => a,
            // A panic elsewhere while holding the lock leaves the map consistent (every update
            // is a few integer stores): keep going rather than lose all budgets.
            Err(poisoned) => poisoned.into_inner(),
        };
        let limit = self.limits.get(&key).copied().unwrap_or(self.default_limit);
        let account = accounts.entry(key).or_insert(Account {
            limit,
            ..Account::default()
        });
        f(account)
    }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> KeyId {
        KeyId::of(&format!("sk-test-{n}"))
    }

    #[test]
    fn leases_never_exceed_the_limit() {
        let store = MemoryStore::new(1_000, HashMap::new());
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
        let store = MemoryStore::new(1_000, HashMap::new());
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
        let store = MemoryStore::new(100, HashMap::new());
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
        let store = MemoryStore::new(10, HashMap::from([(key(4), 99)]));
        assert_eq!(store.account(key(4)).limit, 99);
        assert_eq!(store.account(key(5)).limit, 10);
    }
}
