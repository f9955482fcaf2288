//! The vocabulary shared by shards, the ledger and the stores: a key's totals, a worker's
//! settlement, a lease ask, the op that carries them, the store's answer, and the budget period
//! a time falls in. Pure: no IO, no clocks, no logging.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::auth::KeyId;
use crate::config::Period;

/// Budget periods of spend a store keeps before the current one (shown by the admin API).
pub const HISTORY_PERIODS: u64 = 3;

/// The configured budgets: the default a key gets, and each configured account's own (a key's
/// limit, a key's or a team's calendar window, a rate limit). Shared by the workers and the
/// store; a reload replaces the table in place (stores read it at each op).
#[derive(Debug, Default)]
pub struct KeyLimits {
    table: RwLock<Arc<LimitTable>>,
}

/// A budget: how much an account may spend in each of its windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// In the account's unit.
    pub limit: u64,
    /// When its spend starts again from zero.
    pub window: Period,
    pub meter: Meter,
}

/// What an account counts. Every one is leased, reserved and settled alike; only a
/// concurrency account gives back what a request reserved when it ends, whatever happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Meter {
    /// Nano-dollars.
    #[default]
    Dollars,
    /// Requests (a rate limit per minute).
    Requests,
    /// Prompt and completion tokens (a rate limit per minute).
    Tokens,
    /// Requests in flight.
    Concurrent,
    /// Nano-dollars, for the record only: a key's, a team's or a model's spend per day
    /// (`GET /admin/spend`). Never refuses, never leased; keeps `REPORT_DAYS` of history.
    Report,
}

/// Days of spend a report account keeps before the current one.
pub const REPORT_DAYS: u64 = 400;

impl Budget {
    /// Periods of spend the store keeps before the current one: a rate limit's minutes are
    /// worth nothing once past, a report's days are what it is for.
    pub fn history(&self) -> u64 {
        match (self.meter, self.window) {
            (Meter::Report, _) => REPORT_DAYS,
            (_, Period::Minute) => 0,
            _ => HISTORY_PERIODS,
        }
    }
}

/// The budgets of a configuration, as [`KeyLimits`] serves them.
#[derive(Debug, Clone, Default)]
pub struct LimitTable {
    /// What an account the table does not name may spend (a key's own limit).
    pub default: u64,
    /// The window of every key's own limit (`budget_period`).
    pub window: Period,
    pub accounts: HashMap<KeyId, Budget>,
}

impl LimitTable {
    /// Keys' own limits, every one in `window`.
    pub fn keys(default: u64, window: Period, keys: HashMap<KeyId, u64>) -> LimitTable {
        let accounts = keys
            .into_iter()
            .map(|(id, limit)| {
                let meter = Meter::Dollars;
                (
                    id,
                    Budget {
                        limit,
                        window,
                        meter,
                    },
                )
            })
            .collect();
        LimitTable {
            default,
            window,
            accounts,
        }
    }
}

impl LimitTable {
    /// Whether `fresh` leaves some account less than this table gives it (a smaller limit, or
    /// none where this one had one).
    pub fn tightened_by(&self, fresh: &LimitTable) -> bool {
        fresh.default < self.default
            || self.accounts.iter().any(|(id, old)| {
                fresh
                    .accounts
                    .get(id)
                    .is_none_or(|new| new.limit < old.limit || new.window != old.window)
            })
    }
}

impl KeyLimits {
    /// Keys' own limits without a window (spend never starts again).
    pub fn new(default: u64, keys: HashMap<KeyId, u64>) -> KeyLimits {
        KeyLimits::of_table(LimitTable::keys(default, Period::Never, keys))
    }

    pub fn of_table(table: LimitTable) -> KeyLimits {
        KeyLimits {
            table: RwLock::new(Arc::new(table)),
        }
    }

    fn table(&self) -> Arc<LimitTable> {
        match self.table.read() {
            Ok(table) => table.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The account's configured limit (its own, or the default).
    pub fn of(&self, key: KeyId) -> u64 {
        self.budget(key).limit
    }

    /// The window the account's spend is kept in.
    pub fn window(&self, key: KeyId) -> Period {
        self.budget(key).window
    }

    pub fn budget(&self, key: KeyId) -> Budget {
        let table = self.table();
        table.accounts.get(&key).copied().unwrap_or(Budget {
            limit: table.default,
            window: table.window,
            meter: Meter::Dollars,
        })
    }

    /// The window of keys' own limits (`budget_period`).
    pub fn budget_window(&self) -> Period {
        self.table().window
    }

    /// Whether the configuration names the account.
    pub fn names(&self, key: KeyId) -> bool {
        self.table().accounts.contains_key(&key)
    }

    /// A reloaded config's budgets, from now on.
    pub fn replace(&self, fresh: LimitTable) {
        let fresh = Arc::new(fresh);
        match self.table.write() {
            Ok(mut table) => *table = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
    }
}

/// The most accounts one request is charged to: a key's windows and its team's (three each),
/// and the key's and the team's reports.
pub const MAX_ACCOUNTS: usize = 8;

/// The accounts a request is charged to together (a key's own, its other windows, its
/// team's), in the order they are checked; inline, so admission never allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accounts {
    ids: [KeyId; MAX_ACCOUNTS],
    len: usize,
}

impl Default for Accounts {
    fn default() -> Accounts {
        Accounts {
            ids: [KeyId::from_bytes([0; 8]); MAX_ACCOUNTS],
            len: 0,
        }
    }
}

impl Accounts {
    pub fn one(id: KeyId) -> Accounts {
        let mut accounts = Accounts::default();
        accounts.push(id);
        accounts
    }

    /// Adds `id` (false: there are `MAX_ACCOUNTS` already; configurations are checked so that
    /// none needs more).
    pub fn push(&mut self, id: KeyId) -> bool {
        match self.ids.get_mut(self.len) {
            Some(slot) => {
                *slot = id;
                self.len += 1;
                true
            }
            None => false,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.ids[..self.len].iter().copied()
    }

    pub fn first(&self) -> Option<KeyId> {
        self.iter().next()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

/// One key's totals in one budget period, in nano-dollars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Account {
    pub limit: u64,
    /// Spent in the period asked about.
    pub spent: u64,
    /// Granted to workers and not yet spent or returned (leases do not belong to a period).
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

/// Spend in one budget period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeriodSpend {
    pub period: u64,
    pub nano: u64,
}

/// Spend by the budget period in which it was settled. Almost always one period; two or more
/// only when a flush (or an outage) spans a period's end, and then each stays in its own.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Spend {
    /// Inline, so the common case never allocates on the request path.
    first: Option<PeriodSpend>,
    later: Vec<PeriodSpend>,
}

impl Spend {
    pub fn of(period: u64, nano: u64) -> Spend {
        let mut spend = Spend::default();
        spend.add(period, nano);
        spend
    }

    /// Adds `nano` to `period`'s spend (a clock stepped back finds its period's entry again).
    pub fn add(&mut self, period: u64, nano: u64) {
        if nano == 0 {
            return;
        }
        match &mut self.first {
            None => self.first = Some(PeriodSpend { period, nano }),
            Some(first) if first.period == period => first.nano = first.nano.saturating_add(nano),
            Some(_) => match self.later.iter_mut().find(|p| p.period == period) {
                Some(entry) => entry.nano = entry.nano.saturating_add(nano),
                None => self.later.push(PeriodSpend { period, nano }),
            },
        }
    }

    pub fn merge(&mut self, other: &Spend) {
        for p in other.iter() {
            self.add(p.period, p.nano);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = PeriodSpend> + '_ {
        self.first.iter().chain(self.later.iter()).copied()
    }

    /// All periods together.
    pub fn total(&self) -> u64 {
        self.iter().fold(0, |sum, p| sum.saturating_add(p.nano))
    }

    /// The spend of one period.
    pub fn in_period(&self, period: u64) -> u64 {
        self.iter()
            .filter(|p| p.period == period)
            .fold(0, |sum, p| sum.saturating_add(p.nano))
    }

    pub fn is_empty(&self) -> bool {
        self.first.is_none()
    }
}

/// A worker's flush for one key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settlement {
    /// Spend since the last flush, by period.
    pub spent: Spend,
    /// The part of `spent` that came out of the worker's lease (the rest overran it).
    pub from_lease: u64,
    /// Unused lease handed back.
    pub returned: u64,
}

impl Settlement {
    pub fn is_empty(&self) -> bool {
        self.spent.is_empty() && self.from_lease == 0 && self.returned == 0
    }

    /// Two flushes' worth as one (both not yet applied).
    pub fn merge(&mut self, other: &Settlement) {
        self.spent.merge(&other.spent);
        self.from_lease = self.from_lease.saturating_add(other.from_lease);
        self.returned = self.returned.saturating_add(other.returned);
    }
}

/// Who holds a lease: one worker of one run of one node, `node/boot/worker`. The Valkey store
/// keeps leases and exactly-once sequence numbers per holder.
pub type Holder = Arc<str>;

/// A lease asked for: `need` nano-dollars (all or nothing: a partial lease would strand budget
/// in a worker that cannot use it) plus at most a `parts`-th of what is left beyond it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    pub need: u64,
    pub parts: u64,
}

/// An account's incarnation in the store: made when the account is created, the same for as
/// long as it lives. An account found with another epoch than a holder last heard was lost
/// (a store restarted empty, flushed, evicted, a cluster shard that came back empty) and made
/// anew since.
pub type Epoch = Arc<str>;

/// What a holder knows of a key, for a store that lost it: applied by the store only when the
/// account's epoch is not the one the holder heard (before it grants anything), so it can never
/// add to an account that kept its data, nor be counted twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Restore {
    /// The holder's lease as the store counted it before this op: set, not added.
    pub held: Option<u64>,
    /// The spend of `floor.period` the holder heard: the store's spend for that period becomes
    /// at least this plus what was spent since it came back (the largest floor any holder gives).
    pub floor: Option<PeriodSpend>,
    /// The limit the store last answered (kept only if it is not the configured one, that is,
    /// if the admin API had set it).
    pub limit: Option<u64>,
}

/// One holder's change to one key: a settlement, then optionally a lease ask. The store applies
/// it atomically, and only if `seq` is newer than the last one it applied for this holder and
/// key, so a retry or a journal replay cannot apply it twice. An empty op renews the holder's
/// lease. Every op of a holder's that the store applies carries all the spend that holder
/// settled for that key before it (the journal's replay depends on it: an applied op covers
/// every older record); an op set aside or never sent leaves its number unused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub holder: Holder,
    pub seq: u64,
    pub key: KeyId,
    /// The budget period the holder is in: a lease is granted against this period's spend, and
    /// the totals answered are this period's.
    pub period: u64,
    pub settle: Settlement,
    pub ask: Option<Ask>,
    /// The account's epoch as the holder last heard it (none: it has not heard of it).
    pub epoch: Option<Epoch>,
    /// What the holder knows, for an account found with another epoch.
    pub restore: Option<Restore>,
    /// The holder is gone after this op (a journal replay, a worker's last flush): the store
    /// drops whatever lease it still counts for it, applied or not, and never re-arms it.
    pub close: bool,
    /// The key was refused by the upstream (401/403): the store forgets the account if nothing
    /// is left in it (no spend, no admin limit, no lease).
    pub forget: bool,
}

impl Op {
    /// An op with only the essentials set.
    pub fn new(holder: Holder, seq: u64, key: KeyId, period: u64) -> Op {
        Op {
            holder,
            seq,
            key,
            period,
            settle: Settlement::default(),
            ask: None,
            epoch: None,
            restore: None,
            close: false,
            forget: false,
        }
    }
}

/// What an op did: the lease granted (0 when the need was not there) and the key's new totals.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Applied {
    pub granted: u64,
    /// In the op's period.
    pub account: Account,
    /// A worker was refused a lease lately while others held the key's budget: holders should
    /// hand back what they are not using (so the last dollars are not stranded in busy workers).
    pub squeezed: bool,
    /// The account's epoch after the op (none: it is gone, forgotten by this op).
    pub epoch: Option<Epoch>,
    /// The op's epoch was not the account's: the store had lost the account and made it anew;
    /// what the holder knew was restored.
    pub lost: bool,
    /// The holder's lease on the key as the store counts it after the op (stores that keep one
    /// per holder). A grant whose answer was lost shows here: a retried ask answered after a
    /// newer op of the same holder and key was applied is answered 0.
    pub held: Option<u64>,
}

/// Which budget period `unix_secs` falls in: 0 always, the minute, day or month number.
pub fn period_of(period: Period, unix_secs: u64) -> u64 {
    let days = unix_secs / 86_400;
    match period {
        Period::Never => 0,
        Period::Minute => unix_secs / 60,
        Period::Daily => days,
        Period::Monthly => {
            let (year, month) = civil_year_month(days);
            year * 12 + month
        }
    }
}

/// When period `p` begins, in unix seconds (0 for spend that has no period).
pub fn period_start(period: Period, p: u64) -> u64 {
    match period {
        Period::Never => 0,
        Period::Minute => p * 60,
        Period::Daily => p * 86_400,
        Period::Monthly => {
            let (year, month) = (p.saturating_sub(1) / 12, p.saturating_sub(1) % 12 + 1);
            days_from_civil(year, month, 1) * 86_400
        }
    }
}

/// Days since 1970-01-01 of a date (Howard Hinnant's days_from_civil); 0 for a date before.
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let year = if month <= 2 {
        year.saturating_sub(1)
    } else {
        year
    };
    let era = year / 400;
    let yoe = year - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).saturating_sub(719_468)
}

/// When the period after `p` begins, in unix seconds (none for spend that has no period).
pub fn period_end(period: Period, p: u64) -> Option<u64> {
    match period {
        Period::Never => None,
        _ => Some(period_start(period, p + 1)),
    }
}

/// How a period is shown: `2026-11-30T12:34` (a minute), `2026-11-30` (a day), `2026-11` (a
/// month), `all` (no period).
pub fn period_label(period: Period, p: u64) -> String {
    match period {
        Period::Never => "all".to_string(),
        Period::Minute => {
            let (year, month, day) = civil_date(p / 1_440);
            let minute = p % 1_440;
            format!(
                "{year:04}-{month:02}-{day:02}T{:02}:{:02}",
                minute / 60,
                minute % 60
            )
        }
        Period::Daily => {
            let (year, month, day) = civil_date(p);
            format!("{year:04}-{month:02}-{day:02}")
        }
        Period::Monthly => {
            // `period_of` counts months as year × 12 + month (1-12).
            let (year, month) = (p.saturating_sub(1) / 12, p.saturating_sub(1) % 12 + 1);
            format!("{year:04}-{month:02}")
        }
    }
}

/// The day number (days since 1970-01-01) of a `YYYY-MM-DD` date; none for anything else
/// (a 31st of April too).
pub fn day_of_date(text: &str) -> Option<u64> {
    let mut parts = text.split('-');
    let mut next = |len: usize| {
        parts
            .next()
            .filter(|p| p.len() == len && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<u64>().ok())
    };
    let (year, month, day) = (next(4)?, next(2)?, next(2)?);
    if parts.next().is_some() || year < 1970 || !(1..=12).contains(&month) || day == 0 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    (civil_date(days) == (year, month, day)).then_some(days)
}

/// `2026-12-01T00:00:00Z`.
pub fn iso_time(unix: u64) -> String {
    let (year, month, day) = civil_date(unix / 86_400);
    let secs = unix % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3_600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Year and month (1-12) of a day count since 1970-01-01.
fn civil_year_month(days: u64) -> (u64, u64) {
    let (year, month, _) = civil_date(days);
    (year, month)
}

/// Year, month (1-12) and day (1-31) of a day count since 1970-01-01 (Howard Hinnant's
/// civil_from_days).
fn civil_date(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
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

    #[test]
    fn periods_are_shown_as_dates() {
        // 2026-01-31 23:59:00 UTC, and two minutes later.
        let before = 1_769_903_940;
        let after = before + 120;
        assert_eq!(
            period_label(Period::Daily, period_of(Period::Daily, before)),
            "2026-01-31"
        );
        assert_eq!(
            period_label(Period::Daily, period_of(Period::Daily, after)),
            "2026-02-01"
        );
        assert_eq!(
            period_label(Period::Monthly, period_of(Period::Monthly, before)),
            "2026-01"
        );
        assert_eq!(
            period_label(Period::Monthly, period_of(Period::Monthly, after)),
            "2026-02"
        );
        assert_eq!(period_label(Period::Never, 0), "all");
        // Month 0 (spend of no period, shown as a month) is a date, not an overflow.
        assert_eq!(period_label(Period::Monthly, 0), "0000-01");
        assert_eq!(period_start(Period::Monthly, 0), 0);
        assert_eq!(
            day_of_date("2026-01-31"),
            Some(period_of(Period::Daily, before))
        );
        for bad in [
            "2026-04-31",
            "2026-13-01",
            "26-01-01",
            "2026-1-01",
            "2026-01-01x",
            "x",
        ] {
            assert_eq!(day_of_date(bad), None, "{bad}");
        }
        // A period begins where the one before it ends.
        for kind in [Period::Daily, Period::Monthly] {
            let p = period_of(kind, after);
            assert_eq!(period_of(kind, period_start(kind, p)), p);
            assert_eq!(period_of(kind, period_start(kind, p) - 1), p - 1);
        }
        assert_eq!(
            period_start(Period::Daily, period_of(Period::Daily, after)),
            1_769_904_000
        );
    }

    #[test]
    fn spend_keeps_each_period_apart() {
        let mut spend = Spend::default();
        spend.add(7, 10);
        spend.add(7, 5);
        spend.add(8, 1);
        // A clock stepped back finds its period again.
        spend.add(7, 1);
        spend.add(9, 0);
        assert_eq!(
            spend.iter().collect::<Vec<_>>(),
            vec![
                PeriodSpend {
                    period: 7,
                    nano: 16
                },
                PeriodSpend { period: 8, nano: 1 }
            ]
        );
        assert_eq!((spend.total(), spend.in_period(8)), (17, 1));
        let mut other = Spend::of(8, 2);
        other.merge(&spend);
        assert_eq!((other.in_period(7), other.in_period(8)), (16, 3));
        assert!(Spend::of(3, 0).is_empty());
    }
}
