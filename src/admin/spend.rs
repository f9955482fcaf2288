//! `GET /admin/spend?from=YYYY-MM-DD&to=YYYY-MM-DD`: what was spent each day of the range (UTC,
//! both ends included; default: the last 30 days), by key, by team and by model, with the
//! range's totals. Read from the store's report accounts (governance.rs), which every settled
//! cost reaches exactly once as budgets' spend does, and which keep `REPORT_DAYS` of days: a
//! finance question needs no log. Keys Aura has no configuration for are one line, `(other
//! keys)`; a model is the price table's name for the model that answered (`other`: the
//! default price).

use std::collections::BTreeMap;

use http::StatusCode;
use serde_json::{json, Value};

use super::{unix_now, Admin};
use crate::auth::KeyId;
use crate::budget::op::{day_of_date, period_label, period_of, REPORT_DAYS};
use crate::config::Period;
use crate::error::Error;

use crate::pricing::nano_to_dollars;

/// The days asked for when the call names none.
const DEFAULT_DAYS: u64 = 30;

impl Admin<'_> {
    pub(super) async fn spend(&self, query: Option<&str>) -> Result<(StatusCode, Value), Error> {
        let today = period_of(Period::Daily, unix_now());
        let (from, to) = range(query, today)?;
        let keys = self.shared.keys();
        let reports = self.every_report().await?;
        let ids: Vec<KeyId> = reports.iter().map(|(id, _)| *id).collect();
        let histories = self.ledger.admin_call(move |s| s.histories(&ids)).await?;
        let key_ids: std::collections::HashMap<String, String> = reports
            .iter()
            .filter_map(|(_, r)| Some((r.name.clone(), r.key_id.clone()?)))
            .collect();
        // day → kind → name → nano
        let mut days: BTreeMap<u64, BTreeMap<&'static str, BTreeMap<String, u64>>> =
            BTreeMap::new();
        let mut totals: BTreeMap<&'static str, BTreeMap<String, u64>> = BTreeMap::new();
        for ((_, report), history) in reports.iter().zip(&histories) {
            let (kind, name) = (report.kind, report.name.as_str());
            for spend in history.iter().filter(|p| (from..=to).contains(&p.period)) {
                let day = days.entry(spend.period).or_default();
                *day.entry(kind)
                    .or_default()
                    .entry(name.to_string())
                    .or_default() += spend.nano;
                *totals
                    .entry(kind)
                    .or_default()
                    .entry(name.to_string())
                    .or_default() += spend.nano;
            }
        }
        let shown = |by: Option<&BTreeMap<String, u64>>, kind: &str| -> Vec<Value> {
            by.into_iter()
                .flatten()
                .filter(|(_, nano)| **nano > 0)
                .map(|(name, nano)| {
                    let mut line =
                        json!({ "usage_nano": nano, "usage_dollars": nano_to_dollars(*nano) });
                    line[kind] = name.clone().into();
                    if kind == "key" {
                        let id = key_ids
                            .get(name)
                            .cloned()
                            .or_else(|| keys.directory.by_alias(name).map(|id| id.to_string()));
                        line["key_id"] = json!(id);
                    }
                    line
                })
                .collect()
        };
        let total =
            |by: Option<&BTreeMap<String, u64>>| by.map_or(0, |by| by.values().sum::<u64>());
        let days: Vec<Value> = days
            .iter()
            .map(|(day, by)| {
                let nano = total(by.get("key"));
                json!({
                    "date": period_label(Period::Daily, *day),
                    "usage_nano": nano,
                    "usage_dollars": nano_to_dollars(nano),
                    "keys": shown(by.get("key"), "key"),
                    "teams": shown(by.get("team"), "team"),
                    "models": shown(by.get("model"), "model"),
                })
            })
            .collect();
        let nano = total(totals.get("key"));
        Ok((
            StatusCode::OK,
            json!({
                "from": period_label(Period::Daily, from),
                "to": period_label(Period::Daily, to),
                "usage_nano": nano,
                "usage_dollars": nano_to_dollars(nano),
                "keys": shown(totals.get("key"), "key"),
                "teams": shown(totals.get("team"), "team"),
                "models": shown(totals.get("model"), "model"),
                "days": days,
            }),
        ))
    }
}

/// Whose spend a report account records.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Report {
    kind: &'static str,
    name: String,
    key_id: Option<String>,
}

/// A report as the keyring names it.
#[derive(serde::Deserialize)]
struct Named {
    kind: String,
    name: String,
    key_id: Option<String>,
}

impl Admin<'_> {
    /// Every report account: the configuration's now, and every one the keyring ever named (a
    /// revoked key's days, a team or a model gone from the configuration, still count).
    async fn every_report(&self) -> Result<Vec<(KeyId, Report)>, Error> {
        let shared = self.shared.clone();
        let named = super::blocking(move || shared.keyring().report_names()).await??;
        let mut reports: BTreeMap<KeyId, Report> = BTreeMap::new();
        for (id, json) in named {
            let (Some(id), Ok(named)) = (KeyId::parse(&id), serde_json::from_str::<Named>(&json))
            else {
                continue;
            };
            let kind = match named.kind.as_str() {
                "key" => "key",
                "team" => "team",
                "model" => "model",
                _ => continue,
            };
            let (name, key_id) = (named.name, named.key_id);
            reports.insert(id, Report { kind, name, key_id });
        }
        let keys = self.shared.keys();
        for (id, name) in keys.governance.report_names() {
            if let Ok(named) = serde_json::from_str::<Named>(&name) {
                let kind = match named.kind.as_str() {
                    "team" => "team",
                    "model" => "model",
                    _ => "key",
                };
                let (name, key_id) = (named.name, named.key_id);
                reports.insert(id, Report { kind, name, key_id });
            }
        }
        Ok(reports.into_iter().collect())
    }
}

/// The days of `from` and `to` in `query` (each defaulting from the other and `today`), both
/// within the days the store keeps.
fn range(query: Option<&str>, today: u64) -> Result<(u64, u64), Error> {
    let mut from = None;
    let mut to = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let day = || {
            day_of_date(value)
                .ok_or_else(|| Error::MalformedBody(format!("`{name}` must be a date, YYYY-MM-DD")))
        };
        match name {
            "from" => from = Some(day()?),
            "to" => to = Some(day()?),
            _ => return Err(Error::MalformedBody(format!("unknown parameter `{name}`"))),
        }
    }
    let to = to.unwrap_or(today);
    let from = from.unwrap_or(to.saturating_sub(DEFAULT_DAYS - 1));
    if from > to {
        return Err(Error::MalformedBody("`from` is after `to`".into()));
    }
    if from + REPORT_DAYS < today {
        return Err(Error::MalformedBody(format!(
            "the store keeps {REPORT_DAYS} days: `from` is before them"
        )));
    }
    Ok((from, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_defaults_to_the_last_thirty_days_and_refuses_nonsense() {
        let today = day_of_date("2026-12-01").unwrap();
        assert_eq!(range(None, today).unwrap(), (today - 29, today));
        let asked = range(Some("from=2026-11-01&to=2026-11-30"), today).unwrap();
        assert_eq!(asked, (today - 30, today - 1));
        for bad in [
            "from=2026-12-02&to=2026-12-01",
            "from=yesterday",
            "since=2026-11-01",
            "from=2020-01-01",
        ] {
            assert!(range(Some(bad), today).is_err(), "{bad}");
        }
    }
}
