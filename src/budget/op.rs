//! The vocabulary shared by shards, the ledger and the stores: a key's totals, a worker's
//! settlement, a lease ask, the op that carries them, the store's answer, and the budget period
//! a time falls in. Pure: no IO, no clocks, no logging.

use std::sync::Arc;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
