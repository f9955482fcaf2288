//! Who a request is charged to and what it may use: for each configured key, the accounts a
//! request of it reserves in (the key's own budget and its other calendar windows, its team's
//! windows) and its rate-limit accounts (requests and tokens per minute, requests in flight,
//! the key's and the team's). Every one is an account of the budget machinery (leases granted
//! by the store, reserve then settle, exactly-once flushes, the journal), so a team's budget
//! and a fleet's rate limit hold across workers and nodes as a key's budget does.
//!
//! A key's own budget keeps the key's id as its account (its spend, `/v1/usage` and the
//! admin API stay where they were); every other account's id is derived from its owner and
//! what it counts, never from an alias, so renaming a key keeps its spend.

use std::collections::HashMap;

use crate::auth::{KeyId, KeyIdMap, Member};
use crate::budget::op::{iso_time, period_end, period_label, period_of};
use crate::budget::{Account, Accounts, Budget, LimitTable, Meter};
use crate::config::governance::{Limits, TeamEntry, Window};
use crate::config::Period;
use crate::pricing::{dollars_to_nano, nano_to_dollars};

/// The accounts a request of one key is charged to, by what they count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Charges {
    pub dollars: Accounts,
    pub requests: Accounts,
    pub tokens: Accounts,
    pub concurrent: Accounts,
    /// For the record: the key's and its team's spend per day (never refused).
    pub reports: Accounts,
}

impl Charges {
    /// A key Aura has no configuration for: its own budget, and the record of every such
    /// key's spend together.
    pub fn own(key: KeyId) -> Charges {
        Charges {
            dollars: Accounts::one(key),
            reports: Accounts::one(report_of("key:other")),
            ..Charges::default()
        }
    }

    /// The accounts a request's cost is reserved in and settled to: its budgets, then its
    /// reports.
    pub fn money(&self) -> Accounts {
        let mut all = self.dollars;
        for report in self.reports.iter() {
            all.push(report);
        }
        all
    }

    /// Whether any rate limit applies.
    pub fn rate_limited(&self) -> bool {
        !(self.requests.is_empty() && self.tokens.is_empty() && self.concurrent.is_empty())
    }
}

/// Whose an account is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// A key, by alias.
    Key(String),
    Team(String),
    /// A model's spend (a report), by the price table's name.
    Model(String),
}

impl Owner {
    /// `("key", alias)`, `("team", name)`, `("model", name)`.
    pub fn kind_and_name(&self) -> (&'static str, &str) {
        match self {
            Owner::Key(alias) => ("key", alias),
            Owner::Team(name) => ("team", name),
            Owner::Model(name) => ("model", name),
        }
    }
}

/// An account as shown: whose it is, and its budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountInfo {
    pub owner: Owner,
    pub budget: Budget,
}

impl AccountInfo {
    /// `team "research" daily budget`, `key "alice" requests per minute`.
    pub fn describe(&self) -> String {
        let owner = match &self.owner {
            Owner::Key(alias) => format!("key \"{alias}\""),
            Owner::Team(name) => format!("team \"{name}\""),
            Owner::Model(name) => format!("model \"{name}\""),
        };
        let what = match (self.budget.meter, self.budget.window) {
            (Meter::Dollars, Period::Daily) => "daily budget",
            (Meter::Dollars, Period::Monthly) => "monthly budget",
            (Meter::Dollars, _) => "budget",
            (Meter::Requests, _) => "requests per minute",
            (Meter::Tokens, _) => "tokens per minute",
            (Meter::Concurrent, _) => "concurrent requests",
            (Meter::Report, _) => "spend record",
        };
        format!("{owner} {what}")
    }

    /// A label for metrics: `alice`, `alice/monthly`, `team:research/daily`.
    pub fn label(&self) -> String {
        let owner = match &self.owner {
            Owner::Key(alias) => alias.clone(),
            Owner::Team(name) => format!("team:{name}"),
            Owner::Model(name) => format!("model:{name}"),
        };
        match self.budget.window {
            Period::Daily => format!("{owner}/daily"),
            Period::Monthly => format!("{owner}/monthly"),
            _ => owner,
        }
    }
}

/// The governance of a configuration: each configured key's charges, every account's
/// description, and the budgets the store enforces.
#[derive(Debug, Default)]
pub struct Governance {
    charges: KeyIdMap<Charges>,
    /// Read per request (rate headers): keyed by the ids' own bits, as `charges` is.
    catalog: KeyIdMap<AccountInfo>,
    table: LimitTable,
    /// Each team's own accounts, and its keys.
    teams: std::collections::BTreeMap<String, Team>,
    /// Each key's team.
    team_of: KeyIdMap<String>,
    /// Each key's report account, to its key.
    report_keys: HashMap<KeyId, KeyId>,
}

/// A team as the admin API shows it.
#[derive(Debug, Clone, Default)]
pub struct Team {
    pub charges: Charges,
    pub keys: Vec<KeyId>,
}

impl Governance {
    /// `default_limit`: a key's budget when it sets none, in `window` (`budget_period`);
    /// `models`: the price table's names (each has a report of its spend per day).
    pub fn new(
        default_limit: u64,
        window: Period,
        keys: &[Member],
        teams: &[TeamEntry],
        models: &[&str],
    ) -> Governance {
        let mut g = Governance {
            table: LimitTable {
                default: default_limit,
                window,
                accounts: HashMap::new(),
            },
            ..Governance::default()
        };
        for team in teams {
            let owner = Owner::Team(team.name.clone());
            let mut charges = Charges::default();
            g.add_limits(
                &owner,
                &format!("team:{}", team.name),
                None,
                &team.limits,
                &mut charges,
            );
            let report = g.report(owner, &format!("team:{}", team.name));
            charges.reports.push(report);
            let keys = Vec::new();
            g.teams.insert(team.name.clone(), Team { charges, keys });
        }
        g.report(Owner::Key("(other keys)".into()), "key:other");
        for model in models.iter().copied().chain(["other"]) {
            g.report(Owner::Model(model.to_string()), &format!("model:{model}"));
        }
        for key in keys {
            let id = key.id;
            let owner = Owner::Key(key.alias.clone());
            let mut charges = Charges::default();
            g.add_limits(
                &owner,
                &format!("key:{id}"),
                Some(id),
                &key.limits,
                &mut charges,
            );
            if charges.dollars.is_empty() {
                // No budget of its own: the default limit, in `budget_period`.
                charges.dollars.push(id);
                let budget = Budget {
                    limit: default_limit,
                    window,
                    meter: Meter::Dollars,
                };
                let owner = owner.clone();
                g.catalog.insert(id, AccountInfo { owner, budget });
            }
            let report = g.report(owner, &format!("key:{id}"));
            g.report_keys.insert(report, id);
            charges.reports.push(report);
            if let Some(team) = key.team.as_deref().and_then(|t| g.teams.get_mut(t)) {
                team.keys.push(id);
                g.team_of.insert(id, key.team.clone().unwrap_or_default());
                let team = &team.charges;
                for (mine, theirs) in [
                    (&mut charges.dollars, team.dollars),
                    (&mut charges.reports, team.reports),
                    (&mut charges.requests, team.requests),
                    (&mut charges.tokens, team.tokens),
                    (&mut charges.concurrent, team.concurrent),
                ] {
                    for account in theirs.iter() {
                        // Windows are one per period per owner: at most 3 + 3 fit.
                        mine.push(account);
                    }
                }
            }
            g.charges.insert(id, charges);
        }
        g
    }

    /// Adds an owner's budgets and rate limits. A key's budget in `budget_period` is the key's
    /// own account (`own`), listed first; every other account's id is derived from `scope` and
    /// what it counts (a window's period), never from where it is listed, so a reload that
    /// reorders or reshapes a key's budgets finds each window's spend where it was.
    fn add_limits(
        &mut self,
        owner: &Owner,
        scope: &str,
        own: Option<KeyId>,
        limits: &Limits,
        charges: &mut Charges,
    ) {
        let mut windows: Vec<(KeyId, Budget)> = limits
            .windows
            .iter()
            .map(|window| {
                let Window {
                    period,
                    limit_dollars,
                } = *window;
                let period = period.unwrap_or(self.table.window);
                let id = match own {
                    Some(own) if period == self.table.window => own,
                    _ => derived(scope, &format!("dollars/{}", period.name())),
                };
                let budget = Budget {
                    limit: dollars_to_nano(limit_dollars),
                    window: period,
                    meter: Meter::Dollars,
                };
                (id, budget)
            })
            .collect();
        // The key's own account first: `/v1/usage`'s top-level fields are its.
        windows.sort_by_key(|(id, _)| Some(*id) != own);
        for (id, budget) in windows {
            self.add(id, owner, budget);
            charges.dollars.push(id);
        }
        let rates = [
            (limits.rates.rpm, Meter::Requests, Period::Minute, "rpm"),
            (limits.rates.tpm, Meter::Tokens, Period::Minute, "tpm"),
            (
                limits.rates.max_concurrent,
                Meter::Concurrent,
                Period::Never,
                "concurrent",
            ),
        ];
        for (limit, meter, window, what) in rates {
            let Some(limit) = limit else { continue };
            let id = derived(scope, what);
            self.add(
                id,
                owner,
                Budget {
                    limit,
                    window,
                    meter,
                },
            );
            let accounts = match meter {
                Meter::Requests => &mut charges.requests,
                Meter::Tokens => &mut charges.tokens,
                _ => &mut charges.concurrent,
            };
            accounts.push(id);
        }
    }

    /// The report of `scope`'s spend per day: in the store's table and the catalog.
    fn report(&mut self, owner: Owner, scope: &str) -> KeyId {
        let id = report_of(scope);
        let budget = Budget {
            limit: crate::pricing::MAX_LIMIT_NANO,
            window: Period::Daily,
            meter: Meter::Report,
        };
        self.table.accounts.insert(id, budget);
        self.catalog.insert(id, AccountInfo { owner, budget });
        id
    }

    /// The report of a model's spend (the price table's name; none: the default price).
    pub fn model_report(&self, model: Option<&str>) -> KeyId {
        report_of(&format!("model:{}", model.unwrap_or("other")))
    }

    /// Every report account with whose spend it records, as the keyring names it (JSON:
    /// `{"kind":"key","name":"alice","key_id":"…"}`).
    pub fn report_names(&self) -> Vec<(KeyId, String)> {
        self.reports()
            .map(|(id, owner)| {
                let (kind, name) = owner.kind_and_name();
                let mut named = serde_json::json!({ "kind": kind, "name": name });
                if let Some(key) = self.report_keys.get(&id) {
                    named["key_id"] = key.to_string().into();
                }
                (id, named.to_string())
            })
            .collect()
    }

    /// Every report account, with whose spend it records.
    pub fn reports(&self) -> impl Iterator<Item = (KeyId, &Owner)> {
        self.catalog
            .iter()
            .filter(|(_, info)| info.budget.meter == Meter::Report)
            .map(|(id, info)| (*id, &info.owner))
    }

    fn add(&mut self, id: KeyId, owner: &Owner, budget: Budget) {
        self.table.accounts.insert(id, budget);
        let owner = owner.clone();
        self.catalog.insert(id, AccountInfo { owner, budget });
    }

    /// The team a key is charged to as well.
    pub fn team_of(&self, key: KeyId) -> Option<&str> {
        self.team_of.get(&key).map(String::as_str)
    }

    /// Every team, by name.
    pub fn teams(&self) -> impl Iterator<Item = (&str, &Team)> {
        self.teams.iter().map(|(name, team)| (name.as_str(), team))
    }

    /// What a request of `key` is charged to.
    pub fn charges(&self, key: KeyId) -> Charges {
        self.charges
            .get(&key)
            .copied()
            .unwrap_or_else(|| Charges::own(key))
    }

    /// The account's owner and budget (none: a key Aura has no configuration for).
    pub fn account(&self, id: KeyId) -> Option<&AccountInfo> {
        self.catalog.get(&id)
    }

    /// The budgets the store enforces.
    pub fn limits(&self) -> LimitTable {
        self.table.clone()
    }

    /// Every money account's label (for metrics).
    pub fn labels(&self) -> impl Iterator<Item = (KeyId, String)> + '_ {
        self.catalog
            .iter()
            .filter(|(_, info)| info.budget.meter == Meter::Dollars)
            .map(|(id, info)| (*id, info.label()))
    }
}

/// One money account as `/v1/usage` and the admin API show it: whose, which window, its
/// limit, spend and remaining in the current period, and when that period ends.
pub fn standing_json(info: &AccountInfo, account: &Account, unix_now: u64) -> serde_json::Value {
    let window = info.budget.window;
    let period = period_of(window, unix_now);
    let (kind, name) = info.owner.kind_and_name();
    serde_json::json!({
        "budget": info.describe(),
        "owner": kind,
        "name": name,
        "period": window.name(),
        "current_period": period_label(window, period),
        "resets_at": period_end(window, period).map(iso_time),
        "limit_dollars": nano_to_dollars(account.limit),
        "usage_dollars": nano_to_dollars(account.spent),
        "remaining_dollars": nano_to_dollars(account.remaining()),
    })
}

/// The id of `scope`'s report account.
fn report_of(scope: &str) -> KeyId {
    derived(scope, "report")
}

/// The id of an account that is not a key's own: from its owner and what it counts. The
/// leading byte keeps it apart from any key a client can send (a control character).
fn derived(scope: &str, what: &str) -> KeyId {
    KeyId::of(&format!("\u{1}aura\u{1}{scope}\u{1}{what}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Origin;
    use crate::config::governance::Rates;

    fn key(alias: &str, team: Option<&str>, limits: Limits) -> Member {
        Member {
            id: KeyId::of(&format!("sk-{alias}")),
            alias: alias.into(),
            limits,
            team: team.map(String::from),
            upstream_key: None,
            models: Vec::new(),
            upstream: None,
            origin: Origin::Config,
        }
    }

    fn window(period: Option<Period>, limit_dollars: f64) -> Window {
        Window {
            period,
            limit_dollars,
        }
    }

    /// An account's id follows its owner and window, never where the window is listed: a
    /// reload that reorders or reshapes a key's budgets finds each window's spend again.
    #[test]
    fn a_windows_account_is_the_same_however_budgets_are_listed() {
        let daily = window(Some(Period::Daily), 1.0);
        let monthly = window(Some(Period::Monthly), 10.0);
        let ids = |windows: Vec<Window>| {
            let limits = Limits {
                windows,
                rates: Rates::default(),
            };
            let g = Governance::new(7, Period::Monthly, &[key("k", None, limits)], &[], &[]);
            g.charges(KeyId::of("sk-k"))
                .dollars
                .iter()
                .map(|id| (g.account(id).unwrap().budget.window, id))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let both = ids(vec![daily, monthly]);
        assert_eq!(both, ids(vec![monthly, daily]));
        // `limit_dollars` is the budget in `budget_period` (monthly): the key's own account.
        let single = ids(vec![window(None, 10.0)]);
        assert_eq!(single[&Period::Monthly], KeyId::of("sk-k"));
        assert_eq!(both[&Period::Monthly], KeyId::of("sk-k"));
        assert_eq!(ids(vec![daily])[&Period::Daily], both[&Period::Daily]);
    }

    #[test]
    fn a_key_is_charged_to_its_windows_then_its_teams() {
        let team = TeamEntry {
            name: "research".into(),
            limits: Limits {
                windows: vec![
                    window(Some(Period::Daily), 5.0),
                    window(Some(Period::Monthly), 100.0),
                ],
                rates: Rates {
                    rpm: Some(600),
                    tpm: None,
                    max_concurrent: Some(20),
                },
            },
        };
        let alice = key(
            "alice",
            Some("research"),
            Limits {
                windows: vec![window(None, 1.0), window(Some(Period::Daily), 0.5)],
                rates: Rates {
                    rpm: Some(60),
                    ..Rates::default()
                },
            },
        );
        let bob = key("bob", Some("research"), Limits::default());
        let g = Governance::new(7, Period::Monthly, &[alice, bob], &[team], &["gpt-4o"]);
        let alice_id = KeyId::of("sk-alice");
        let charges = g.charges(alice_id);
        assert_eq!(charges.dollars.len(), 4);
        assert_eq!(charges.dollars.first(), Some(alice_id));
        assert_eq!(
            (
                charges.requests.len(),
                charges.tokens.len(),
                charges.concurrent.len()
            ),
            (2, 0, 1)
        );
        let described: Vec<String> = charges
            .dollars
            .iter()
            .map(|id| g.account(id).unwrap().describe())
            .collect();
        assert_eq!(
            described,
            [
                "key \"alice\" monthly budget",
                "key \"alice\" daily budget",
                "team \"research\" daily budget",
                "team \"research\" monthly budget"
            ]
        );
        // Bob shares the team's accounts, with the default limit as his own.
        let bob = g.charges(KeyId::of("sk-bob"));
        assert_eq!(bob.dollars.len(), 3);
        assert_eq!(
            bob.dollars.iter().skip(1).collect::<Vec<_>>(),
            charges.dollars.iter().skip(2).collect::<Vec<_>>()
        );
        assert_eq!(g.account(KeyId::of("sk-bob")).unwrap().budget.limit, 7);
        // The store enforces every configured account; an unconfigured key gets the default.
        let table = g.limits();
        assert_eq!(table.accounts[&alice_id].limit, 1_000_000_000);
        assert_eq!(table.accounts[&alice_id].window, Period::Monthly);
        assert!(!table.accounts.contains_key(&KeyId::of("sk-bob")));
        let stranger = KeyId::of("sk-stranger");
        assert_eq!(g.charges(stranger), Charges::own(stranger));
        assert!(!g.charges(stranger).rate_limited());
    }
}
