//! The single-node store: every key's totals in a map behind one mutex, touched only at lease,
//! flush and admin time (never on the request path). One process: no holders to keep apart,
//! no retries, so no sequence numbers, and nothing to lose but the process itself.
//!
//! Spend is kept per budget period (the current one and `HISTORY_PERIODS` before it). An entry
//! with no spend, no admin limit and no lease is dropped at once: a million keys seen once
//! cost nothing after their leases return.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Clock, Store, StoreError};
use crate::auth::KeyId;
use crate::budget::op::{period_of, Account, Applied, KeyLimits, Op, PeriodSpend};

pub struct MemoryStore {
    limits: Arc<KeyLimits>,
    clock: Clock,
    accounts: Mutex<HashMap<KeyId, Entry>>,
}

#[derive(Debug, Default)]
struct Entry {
    /// Set by the admin API; none: the configured limit.
    limit: Option<u64>,
    /// Spend per period, oldest first.
    spent: Vec<PeriodSpend>,
    /// Granted to workers and not yet spent or returned.
    leased: u64,
    /// Until then, holders are asked to hand back their unused lease.
    squeeze_until: Option<std::time::Instant>,
}

impl Entry {
    fn spent_in(&self, period: u64) -> u64 {
        self.spent
            .iter()
            .find(|p| p.period == period)
            .map_or(0, |p| p.nano)
    }

    fn add(&mut self, period: u64, nano: u64) {
        match self.spent.iter_mut().find(|p| p.period == period) {
            Some(p) => p.nano = p.nano.saturating_add(nano),
            None => {
                self.spent.push(PeriodSpend { period, nano });
                self.spent.sort_by_key(|p| p.period);
            }
        }
    }

    /// Forgets spend older than the `history` periods kept before `period`.
    fn prune(&mut self, period: u64, history: u64) {
        self.spent
            .retain(|p| p.period + history >= period && p.nano > 0);
    }

    /// Nothing in it that a fresh entry would not have.
    fn idle(&self) -> bool {
        self.limit.is_none() && self.leased == 0 && self.spent.iter().all(|p| p.nano == 0)
    }

    fn account(&self, configured: u64, period: u64) -> Account {
        Account {
            limit: self.limit.unwrap_or(configured),
            spent: self.spent_in(period),
            leased: self.leased,
        }
    }
}

impl MemoryStore {
    /// `limits`: the configured ones; each account's spend is kept per period of its window.
    pub fn new(limits: Arc<KeyLimits>, clock: Clock) -> MemoryStore {
        MemoryStore {
            limits,
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

    /// The period of the account's window the clock is in.
    fn period_now(&self, key: KeyId) -> u64 {
        period_of(self.limits.window(key), (self.clock)())
    }

    /// Runs `f` on the key's entry (made if missing), then drops the entry if it is idle.
    fn with<T>(&self, key: KeyId, f: impl FnOnce(&mut Entry) -> T) -> T {
        let mut accounts = self.lock();
        let entry = accounts.entry(key).or_default();
        let out = f(entry);
        if entry.idle() {
            accounts.remove(&key);
        }
        out
    }

    /// One op: spend by period, the lease it gives back, then the lease it asks for (the need
    /// plus a `parts`-th of what is left beyond it, or nothing).
    fn apply_one(&self, op: &Op, now: std::time::Instant) -> Applied {
        let budget = self.limits.budget(op.key);
        let configured = budget.limit;
        self.with(op.key, |entry| {
            for p in op.settle.spent.iter() {
                entry.add(p.period, p.nano);
            }
            entry.prune(op.period, budget.history());
            entry.leased = entry
                .leased
                .saturating_sub(op.settle.from_lease.saturating_add(op.settle.returned));
            let mut granted = 0;
            if let Some(ask) = op.ask {
                let unleased = entry.account(configured, op.period).unleased();
                if unleased >= ask.need {
                    granted = ask.need + (unleased - ask.need) / ask.parts.max(1);
                    entry.leased += granted;
                }
            }
            // A top-up (need 0) granted nothing is no refusal: nobody is waiting on it.
            let refused = op.ask.is_some_and(|a| a.need > 0) && granted == 0;
            if refused && entry.leased > 0 {
                entry.squeeze_until = Some(now + super::valkey::SQUEEZE);
            }
            Applied {
                granted,
                account: entry.account(configured, op.period),
                squeezed: entry.squeeze_until.is_some_and(|until| now < until),
                lost: false,
                // One process: an account cannot be lost while holders remember it.
                epoch: None,
                // Answered in place: no answer is ever lost.
                held: None,
            }
        })
    }

    pub fn account(&self, key: KeyId) -> Account {
        let period = self.period_now(key);
        let configured = self.limits.of(key);
        self.with(key, |e| e.account(configured, period))
    }

    /// The key's spend in `period`.
    pub fn spent_in(&self, key: KeyId, period: u64) -> u64 {
        self.lock().get(&key).map_or(0, |e| e.spent_in(period))
    }

    pub fn holds(&self, key: KeyId) -> bool {
        self.lock().contains_key(&key) || self.limits.names(key)
    }
}

impl Store for MemoryStore {
    fn apply(&self, ops: &[Op]) -> Result<Vec<Applied>, StoreError> {
        let now = std::time::Instant::now();
        Ok(ops.iter().map(|op| self.apply_one(op, now)).collect())
    }

    fn account(&self, key: KeyId) -> Result<Account, StoreError> {
        Ok(MemoryStore::account(self, key))
    }

    fn history(&self, key: KeyId) -> Result<Vec<PeriodSpend>, StoreError> {
        Ok(self
            .lock()
            .get(&key)
            .map(|e| e.spent.clone())
            .unwrap_or_default())
    }

    fn set_limit(&self, key: KeyId, limit: u64) -> Result<Account, StoreError> {
        let period = self.period_now(key);
        Ok(self.with(key, |e| {
            e.limit = Some(limit);
            e.account(limit, period)
        }))
    }

    fn reset(&self, key: KeyId) -> Result<Account, StoreError> {
        let period = self.period_now(key);
        let configured = self.limits.of(key);
        Ok(self.with(key, |e| {
            e.spent.retain(|p| p.period != period);
            e.account(configured, period)
        }))
    }

    fn remove(&self, key: KeyId) -> Result<(), StoreError> {
        // Leases stay: they belong to workers that will spend or return them.
        self.with(key, |e| {
            e.limit = None;
            e.spent.clear();
        });
        Ok(())
    }

    fn accounts(&self) -> Result<Vec<(KeyId, Account)>, StoreError> {
        let now = (self.clock)();
        Ok(self
            .lock()
            .iter()
            .map(|(k, e)| {
                let budget = self.limits.budget(*k);
                (*k, e.account(budget.limit, period_of(budget.window, now)))
            })
            .collect())
    }

    fn holds(&self, key: KeyId) -> Result<bool, StoreError> {
        Ok(MemoryStore::holds(self, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::op::{Ask, Holder, LimitTable, Spend, HISTORY_PERIODS};
    use crate::budget::store::system_clock;
    use crate::config::Period;

    fn key(n: u8) -> KeyId {
        KeyId::of(&format!("sk-test-{n}"))
    }

    fn memory(limit: u64) -> MemoryStore {
        MemoryStore::new(
            Arc::new(KeyLimits::new(limit, HashMap::new())),
            system_clock(),
        )
    }

    fn op(k: KeyId, period: u64, spent: u64, from_lease: u64, returned: u64) -> Op {
        let mut op = Op::new(Holder::from("t/0"), 1, k, period);
        op.settle.spent = Spend::of(period, spent);
        op.settle.from_lease = from_lease;
        op.settle.returned = returned;
        op
    }

    fn lease(store: &MemoryStore, k: KeyId, need: u64, parts: u64) -> (u64, Account) {
        let mut ask = Op::new(Holder::from("t/0"), 1, k, 0);
        ask.ask = Some(Ask { need, parts });
        let applied = store.apply(&[ask]).unwrap().remove(0);
        (applied.granted, applied.account)
    }

    #[test]
    fn spend_is_kept_per_period_and_the_current_one_is_answered() {
        use std::sync::atomic::{AtomicU64, Ordering};
        // 2026-01-31 23:59:00 UTC.
        let now = Arc::new(AtomicU64::new(1_769_903_940));
        let clock: Clock = {
            let now = now.clone();
            Arc::new(move || now.load(Ordering::Relaxed))
        };
        let limits = Arc::new(KeyLimits::of_table(LimitTable::keys(
            1_000,
            Period::Daily,
            HashMap::new(),
        )));
        let daily = MemoryStore::new(limits.clone(), clock.clone());
        let day = period_of(Period::Daily, 1_769_903_940);
        daily.apply(&[op(key(9), day, 400, 0, 0)]).unwrap();
        assert_eq!(daily.account(key(9)).spent, 400);
        // Two minutes later: a new day. Spend settled before midnight but delivered after
        // still lands in the old day.
        now.fetch_add(120, Ordering::Relaxed);
        assert_eq!(daily.account(key(9)).spent, 0);
        daily.apply(&[op(key(9), day, 5, 0, 0)]).unwrap();
        daily.apply(&[op(key(9), day + 1, 7, 0, 0)]).unwrap();
        assert_eq!(
            (daily.spent_in(key(9), day), daily.account(key(9)).spent),
            (405, 7)
        );
        assert_eq!(
            daily.history(key(9)).unwrap(),
            vec![
                PeriodSpend {
                    period: day,
                    nano: 405
                },
                PeriodSpend {
                    period: day + 1,
                    nano: 7
                }
            ]
        );
        // History goes back HISTORY_PERIODS periods, no further.
        daily
            .apply(&[op(key(9), day + 1 + HISTORY_PERIODS, 1, 0, 0)])
            .unwrap();
        assert_eq!(daily.spent_in(key(9), day), 0);
        assert_eq!(daily.spent_in(key(9), day + 1), 7);
    }

    #[test]
    fn admin_operations() {
        let store = memory(1_000);
        store.apply(&[op(key(6), 0, 300, 0, 0)]).unwrap();
        assert_eq!(store.set_limit(key(6), 5_000).unwrap().remaining(), 4_700);
        assert_eq!(store.reset(key(6)).unwrap().spent, 0);
        assert_eq!(store.accounts().unwrap().len(), 1);
        assert!(store.holds(key(6)));
        store.remove(key(6)).unwrap();
        assert!(store.accounts().unwrap().is_empty());
        assert!(!store.holds(key(6)));
        assert_eq!(store.account(key(6)).limit, 1_000);
    }

    #[test]
    fn leases_never_exceed_the_limit() {
        let store = memory(1_000);
        let (a, _) = lease(&store, key(1), 100, 4);
        // 100 needed + a quarter of the 900 left.
        assert_eq!(a, 100 + 225);
        let (b, account) = lease(&store, key(1), 600, 4);
        assert_eq!(b, 600 + (1_000 - 325 - 600) / 4);
        assert!(account.spent + account.leased <= account.limit);
        // Not enough left for the need: nothing is granted.
        let (c, account) = lease(&store, key(1), 500, 4);
        assert_eq!(c, 0);
        assert_eq!(account.leased, a + b);
    }

    #[test]
    fn settling_moves_lease_to_spend_and_returns_the_rest() {
        let store = memory(1_000);
        let (granted, _) = lease(&store, key(2), 300, 1);
        assert_eq!(granted, 1_000);
        let account = store.apply(&[op(key(2), 0, 250, 250, 750)]).unwrap()[0].account;
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
        lease(&store, key(3), 100, 1);
        let account = store.apply(&[op(key(3), 0, 130, 100, 0)]).unwrap()[0].account;
        assert_eq!(
            (account.spent, account.leased, account.remaining()),
            (130, 0, 0)
        );
        assert_eq!(lease(&store, key(3), 1, 1).0, 0);
    }

    #[test]
    fn configured_limits_override_the_default() {
        let store = MemoryStore::new(
            Arc::new(KeyLimits::new(10, HashMap::from([(key(4), 99)]))),
            system_clock(),
        );
        assert_eq!(store.account(key(4)).limit, 99);
        assert_eq!(store.account(key(5)).limit, 10);
    }

    #[test]
    fn an_entry_with_nothing_in_it_is_not_kept() {
        let store = memory(1_000);
        let (granted, _) = lease(&store, key(7), 10, 1);
        assert!(store.holds(key(7)));
        store.apply(&[op(key(7), 0, 0, 0, granted)]).unwrap();
        assert!(
            !store.holds(key(7)),
            "no spend, no limit, no lease: dropped"
        );
        assert!(store.accounts().unwrap().is_empty());
    }
}
