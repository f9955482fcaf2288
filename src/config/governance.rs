//! What a key or a team may spend and how fast: calendar budgets and rate limits.
//!
//! ```toml
//! [teams.research]
//! budgets = [{ period = "daily", limit_dollars = 5.0 }, { period = "monthly", limit_dollars = 100.0 }]
//! rpm = 600                  # requests per minute, shared by the team's keys across the fleet
//! tpm = 200000               # prompt + completion tokens per minute
//! max_concurrent = 20        # requests in flight
//!
//! [keys.alice]
//! key = "sk-aura-alice-..."
//! team = "research"          # also charged to the team's budgets and limits
//! budgets = [{ period = "daily", limit_dollars = 1.0 }]   # or limit_dollars = … (budget_period)
//! rpm = 60
//! ```
//! `limit_dollars` is one budget in `budget_period`; `budgets` lists windows instead (one per
//! period: `none`, `daily` or `monthly`).

use super::tables::Fields;
use super::Period;
use crate::upstream::select::ModelPattern;

/// One calendar budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    /// None: `budget_period`.
    pub period: Option<Period>,
    pub limit_dollars: f64,
}

/// Rate limits: each one per key or per team, fleet-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rates {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens (prompt and completion) per minute.
    pub tpm: Option<u64>,
    /// Requests in flight.
    pub max_concurrent: Option<u64>,
}

/// A key's or a team's budgets and rate limits.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Limits {
    /// Empty: the default limit in `budget_period` (a key), or no budget (a team).
    pub windows: Vec<Window>,
    pub rates: Rates,
}

/// One `[teams.<name>]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct TeamEntry {
    pub name: String,
    pub limits: Limits,
}

/// The fields of this module, for an entry's list of known fields.
pub const FIELDS: [&str; 5] = ["limit_dollars", "budgets", "rpm", "tpm", "max_concurrent"];

/// The budgets and rate limits of one entry (a key or a team).
pub(super) fn limits(f: &mut Fields) -> Limits {
    let mut windows = Vec::new();
    let single = f.dollars("limit_dollars");
    if let Some(limit) = single {
        check_limit(f, "limit_dollars", limit);
        windows.push(Window {
            period: None,
            limit_dollars: limit,
        });
    }
    if let Some(list) = f.entry.get("budgets") {
        if single.is_some() {
            f.error("has both `limit_dollars` and `budgets`: give one (`limit_dollars` is a budget in `budget_period`)");
        }
        windows = budgets(f, list);
    }
    Limits {
        windows,
        rates: Rates {
            rpm: f.count("rpm"),
            tpm: f.count("tpm"),
            max_concurrent: f.count("max_concurrent"),
        },
    }
}

/// `models = ["gpt-4o*", "o3"]`: the models a key may ask for (names or globs).
pub(super) fn models(f: &mut Fields) -> Vec<ModelPattern> {
    let Some(list) = f.entry.get("models") else {
        return Vec::new();
    };
    let parsed: Option<Vec<ModelPattern>> = list.as_array().and_then(|items| {
        items
            .iter()
            .map(|m| m.as_str().and_then(|m| ModelPattern::parse(m).ok()))
            .collect()
    });
    match parsed {
        Some(models) if !models.is_empty() => models,
        _ => {
            f.error("`models` must be a list of model names or globs");
            Vec::new()
        }
    }
}

fn check_limit(f: &mut Fields, field: &str, dollars: f64) {
    if let Err(e) = crate::pricing::limit_nano(dollars) {
        f.error(&format!("`{field}`: {e}"));
    }
}

/// `budgets = [{ period = "daily", limit_dollars = 5.0 }, …]`: one per period.
fn budgets(f: &mut Fields, list: &toml::Value) -> Vec<Window> {
    const SHAPE: &str = "`budgets` must be a list of { period = \"none\" | \"daily\" | \"monthly\", limit_dollars = <dollars> }";
    let Some(items) = list.as_array().filter(|items| !items.is_empty()) else {
        f.error(SHAPE);
        return Vec::new();
    };
    let mut windows: Vec<Window> = Vec::new();
    for item in items {
        let Some(table) = item.as_table() else {
            f.error(SHAPE);
            continue;
        };
        let mut fields = Fields {
            at: format!("{}.budgets", f.at),
            entry: table,
            errors: &mut *f.errors,
        };
        fields.only(&["period", "limit_dollars"]);
        let period = table
            .get("period")
            .and_then(|p| p.as_str())
            .and_then(Period::window);
        let limit = fields.dollars("limit_dollars");
        if let Some(limit) = limit {
            check_limit(&mut fields, "limit_dollars", limit);
        }
        let (Some(period), Some(limit_dollars)) = (period, limit) else {
            f.error(SHAPE);
            continue;
        };
        if windows.iter().any(|w| w.period == Some(period)) {
            f.error("`budgets` names a period twice");
            continue;
        }
        windows.push(Window {
            period: Some(period),
            limit_dollars,
        });
    }
    windows
}

/// `[teams]`: each entry's budgets and rate limits.
pub(super) fn teams(value: &toml::Value, errors: &mut Vec<String>) -> Vec<TeamEntry> {
    let Some(entries) = value.as_table() else {
        errors.push("config file: `teams` must be a table".into());
        return Vec::new();
    };
    let mut teams = Vec::new();
    for (name, entry) in entries {
        let Some(entry) = entry.as_table() else {
            errors.push(format!("config file: `teams.{name}` must be a table"));
            continue;
        };
        let mut fields = Fields {
            at: format!("teams.{name}"),
            entry,
            errors: &mut *errors,
        };
        fields.only(&FIELDS);
        let limits = limits(&mut fields);
        if limits == Limits::default() {
            fields.error("sets no budget and no rate limit");
        }
        teams.push(TeamEntry {
            name: name.clone(),
            limits,
        });
    }
    teams
}

#[cfg(test)]
mod tests {
    use crate::config::tables::tests::tables;
    use crate::config::Period;

    #[test]
    fn teams_and_keys_take_windows_and_rates() {
        let t = tables(
            r#"
            [teams.research]
            budgets = [{ period = "daily", limit_dollars = 5 }, { period = "monthly", limit_dollars = 100.0 }]
            rpm = 600
            tpm = 200000
            max_concurrent = 20

            [keys.alice]
            key = "sk-a"
            team = "research"
            rpm = 60
            "#,
        )
        .unwrap();
        let team = &t.teams[0];
        assert_eq!(team.name, "research");
        assert_eq!(team.limits.windows.len(), 2);
        assert_eq!(team.limits.windows[0].period, Some(Period::Daily));
        assert_eq!(team.limits.windows[1].limit_dollars, 100.0);
        assert_eq!(
            (
                team.limits.rates.rpm,
                team.limits.rates.tpm,
                team.limits.rates.max_concurrent
            ),
            (Some(600), Some(200_000), Some(20))
        );
        let alice = &t.keys[0];
        assert_eq!(alice.team.as_deref(), Some("research"));
        assert_eq!(alice.limits.rates.rpm, Some(60));
        assert!(alice.limits.windows.is_empty());
    }

    #[test]
    fn bad_windows_teams_and_rates_are_each_named() {
        let errors = tables(
            r#"
            [teams.empty]
            [teams.twice]
            budgets = [{ period = "daily", limit_dollars = 1 }, { period = "daily", limit_dollars = 2 }]
            [teams.weekly]
            budgets = [{ period = "weekly", limit_dollars = 1 }]
            [keys.both]
            key = "sk-b"
            limit_dollars = 1
            budgets = [{ period = "daily", limit_dollars = 1 }]
            [keys.lost]
            key = "sk-l"
            team = "nobody"
            rpm = 0
            "#,
        )
        .unwrap_err()
        .join("\n");
        for expected in [
            "`teams.empty` sets no budget and no rate limit",
            "`teams.twice` `budgets` names a period twice",
            "`teams.weekly` `budgets` must be a list of",
            "`keys.both` has both `limit_dollars` and `budgets`",
            "`keys.lost` `team` names no `[teams.nobody]`",
            "`keys.lost` `rpm` must be a positive integer",
        ] {
            assert!(errors.contains(expected), "{expected}\n{errors}");
        }
    }
}
