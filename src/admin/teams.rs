//! `GET /admin/teams`: every team of the config file, with each of its budgets (limit, spend
//! and remaining in the current period of each window), its rate limits and its keys.

use http::StatusCode;
use serde_json::{json, Value};

use super::{totals_of, unix_now, Admin};
use crate::auth::KeyId;
use crate::error::Error;
use crate::governance::standing_json;

impl Admin<'_> {
    pub(super) async fn teams(&self) -> Result<(StatusCode, Value), Error> {
        let keys = self.shared.keys();
        let accounts: Vec<KeyId> = keys
            .governance
            .teams()
            .flat_map(|(_, team)| team.charges.dollars.iter().collect::<Vec<_>>())
            .collect();
        let totals = self
            .ledger
            .admin_call(move |s| totals_of(s, &accounts))
            .await?;
        let now = unix_now();
        let teams: Vec<Value> = keys
            .governance
            .teams()
            .map(|(name, team)| {
                let budgets: Vec<Value> = team
                    .charges
                    .dollars
                    .iter()
                    .filter_map(|id| {
                        let info = keys.governance.account(id)?;
                        let total = totals.get(&id).copied().unwrap_or_default();
                        Some(standing_json(info, &total, now))
                    })
                    .collect();
                let limit = |accounts: crate::budget::Accounts| {
                    accounts
                        .first()
                        .and_then(|id| keys.governance.account(id))
                        .map(|info| info.budget.limit)
                };
                let members: Vec<Value> = team
                    .keys
                    .iter()
                    .map(|id| json!({ "key_id": id.to_string(), "alias": keys.directory.alias(*id) }))
                    .collect();
                json!({
                    "name": name,
                    "budgets": budgets,
                    "rpm": limit(team.charges.requests),
                    "tpm": limit(team.charges.tokens),
                    "max_concurrent": limit(team.charges.concurrent),
                    "keys": members,
                })
            })
            .collect();
        Ok((StatusCode::OK, json!({ "teams": teams })))
    }
}
