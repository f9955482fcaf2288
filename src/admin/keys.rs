//! `/admin/keys`: listing every key, making, changing, rotating and revoking the admin API's
//! own, and the older calls on keys Aura does not manage (a passthrough key's limit).
//!
//! A key made here is a virtual key: Aura draws its secret, answers it once, and keeps only its
//! SHA-256 in the keyring (Valkey, or the memory store's state file). Its fields:
//!
//! | field | |
//! |---|---|
//! | `alias` | required; unique; not 16 hex digits, not `other` |
//! | `team` | a `[teams]` entry of the config file: its budgets and limits apply too |
//! | `models` | names or globs it may ask for (default: any) |
//! | `upstream` | the `[[upstreams]]` entry its requests go to (default: any serving the model) |
//! | `upstream_key` | `env:NAME`: the provider key it goes upstream with, from each node's environment (default: the upstreams' own keys) |
//! | `budgets` / `limit_dollars` | `[{"period": "daily", "limit_dollars": 5}]`, or one limit in `budget_period` (default: `default_limit_dollars`) |
//! | `rpm`, `tpm`, `max_concurrent` | rate limits |
//! | `expires_at` / `expires_in_seconds` | unix seconds, or from now |
//! | `metadata` | any JSON object, up to 4 KiB |
//!
//! `PATCH` takes the same fields; `null` clears an optional one.

use http::{Method, StatusCode};
use serde_json::{json, Map, Value};

use super::{blocking, limit_nano, parse, totals_of, unix_now, Admin};
use crate::auth::KeyId;
use crate::budget::op::period_label;
use crate::budget::store::StoreError;
use crate::budget::{Account, PeriodSpend};
use crate::config::{KeyMode, Period, ProcessEnv};
use crate::error::Error;
use crate::governance::{standing_json, Charges, Owner};
use crate::keyring::record::{
    new_id, new_secret, KeyRecord, PeriodName, SecretHash, WindowSpec, MAX_METADATA_BYTES,
    MAX_SECRETS,
};
use crate::keyring::Put;
use crate::pricing::nano_to_dollars;
use crate::reload::Shared;

/// A rotated-out secret stays valid this long unless the call says otherwise.
const DEFAULT_GRACE_SECS: u64 = 3_600;
/// The longest grace a rotation may give.
const MAX_GRACE_SECS: u64 = 30 * 86_400;

/// Where a key comes from, as answers show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Config,
    Admin,
    /// Neither: a key the store holds (a passthrough key that spent, or was given a limit).
    Store,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Admin => "admin",
            Source::Store => "store",
        }
    }
}

impl Admin<'_> {
    pub(super) async fn keys(
        &self,
        method: &Method,
        path: &str,
        parts: &[&str],
        body: &[u8],
    ) -> Result<(StatusCode, Value), Error> {
        let not_found = || Error::NotFound(path.to_string());
        match (method, parts) {
            (&Method::GET, []) => Ok((StatusCode::OK, json!({ "keys": self.list().await? }))),
            (&Method::POST, []) => {
                let fields: Map<String, Value> = parse(body)?;
                if fields.contains_key("key") {
                    self.set_passthrough_limit(fields).await
                } else {
                    self.create(fields).await
                }
            }
            (&Method::GET, [id]) => {
                let id = self.resolve(id).await?.ok_or_else(not_found)?;
                Ok((StatusCode::OK, self.one(id).await?))
            }
            (&Method::PATCH, [id]) => {
                let id = self.resolve(id).await?.ok_or_else(not_found)?;
                let fields: Map<String, Value> = parse(body)?;
                match self.source_of(id).await? {
                    Source::Admin => self.change(id, fields).await,
                    _ => self.set_limit(id, fields).await,
                }
            }
            (&Method::POST, [id, "rotate"]) => {
                let id = self.resolve(id).await?.ok_or_else(not_found)?;
                self.rotate(id, body).await
            }
            (&Method::POST, [id, "reset"]) => {
                let id = self.resolve(id).await?.ok_or_else(not_found)?;
                // Every window of the key's own (its team's are the team's).
                let keys = self.shared.keys();
                let mut own: Vec<KeyId> = keys
                    .governance
                    .charges(id)
                    .dollars
                    .iter()
                    .filter(|a| {
                        keys.governance
                            .account(*a)
                            .is_none_or(|info| matches!(info.owner, Owner::Key(_)))
                    })
                    .collect();
                if !own.contains(&id) {
                    own.push(id);
                }
                let reset = own.clone();
                self.ledger
                    .admin_call(move |s| reset.iter().try_for_each(|a| s.reset(*a).map(|_| ())))
                    .await?;
                for account in own {
                    self.ledger.forget_known(account);
                }
                Ok((StatusCode::OK, self.one(id).await?))
            }
            (&Method::DELETE, [id]) => {
                let id = self.resolve(id).await?.ok_or_else(not_found)?;
                match self.source_of(id).await? {
                    Source::Admin => self.revoke(id).await,
                    Source::Config => Err(Error::Conflict(format!(
                        "key {id} comes from the config file: remove it there and reload"
                    ))),
                    Source::Store => {
                        self.ledger.admin_call(move |s| s.remove(id)).await?;
                        self.ledger.forget_known(id);
                        let body = json!({ "key_id": id.to_string(), "deleted": true });
                        Ok((StatusCode::OK, body))
                    }
                }
            }
            (_, []) => Err(Error::MethodNotAllowed {
                allow: "GET, HEAD, POST",
            }),
            (_, [_]) => Err(Error::MethodNotAllowed {
                allow: "GET, HEAD, PATCH, DELETE",
            }),
            (_, [_, "reset" | "rotate"]) => Err(Error::MethodNotAllowed { allow: "POST" }),
            _ => Err(not_found()),
        }
    }

    /// A key the store holds, Aura knows or the keyring has (one made on another node a
    /// moment ago, or one this node cannot serve), by id or alias.
    async fn resolve(&self, id_or_alias: &str) -> Result<Option<KeyId>, Error> {
        let keys = self.shared.keys();
        if let Some(id) = KeyId::parse(id_or_alias) {
            // A report (of a key gone from the configuration too) is no key to act on.
            let shared = self.shared.clone();
            let report = blocking(move || shared.keyring().report_names())
                .await??
                .iter()
                .any(|(named, _)| *named == id.to_string());
            let derived = report
                || (keys.governance.account(id).is_some() && keys.directory.alias(id).is_none());
            if keys.directory.alias(id).is_some()
                || (!derived && self.ledger.admin_call(move |s| s.holds(id)).await?)
            {
                return Ok(Some(id));
            }
        }
        if let Some(id) = keys.directory.by_alias(id_or_alias) {
            return Ok(Some(id));
        }
        // The keyring's own: by id or by alias.
        let shared = self.shared.clone();
        let wanted = id_or_alias.to_string();
        let found = blocking(move || {
            let (_, records) = shared.keyring().load()?;
            Ok::<_, StoreError>(
                records
                    .into_iter()
                    .find(|r| r.id == wanted || r.alias == wanted)
                    .and_then(|r| r.key_id()),
            )
        })
        .await??;
        Ok(found)
    }

    /// Where a key comes from as this node knows it (an admin-made key this node cannot
    /// serve is still the admin's).
    fn source(&self, id: KeyId) -> Source {
        match self.shared.keys().directory.origin(id) {
            Some("admin") => Source::Admin,
            Some(_) => Source::Config,
            None if self.record(id).is_some() => Source::Admin,
            None => Source::Store,
        }
    }

    /// Where a key comes from, the keyring asked when this node does not know it (one made
    /// on another node a moment ago is not a store key to wipe).
    async fn source_of(&self, id: KeyId) -> Result<Source, Error> {
        match self.source(id) {
            Source::Store if self.fresh(id).await?.is_some() => Ok(Source::Admin),
            source => Ok(source),
        }
    }

    fn record(&self, id: KeyId) -> Option<KeyRecord> {
        let id = id.to_string();
        self.shared
            .admin_keys()
            .iter()
            .find(|r| r.id == id)
            .cloned()
    }

    /// Every key: those Aura knows, then the others the store holds. One store call reads
    /// every account shown.
    async fn list(&self) -> Result<Vec<Value>, Error> {
        let keys = self.shared.keys();
        let mut known: Vec<(KeyId, String)> = keys.directory.aliases().into_iter().collect();
        known.sort_by(|a, b| a.1.cmp(&b.1));
        let accounts: Vec<KeyId> = known
            .iter()
            .flat_map(|(id, _)| {
                keys.governance
                    .charges(*id)
                    .dollars
                    .iter()
                    .collect::<Vec<_>>()
            })
            .collect();
        let (totals, everything) = self
            .ledger
            .admin_call(move |s| Ok((totals_of(s, &accounts)?, s.accounts()?)))
            .await?;
        let mut shown: Vec<Value> = known
            .iter()
            .map(|(id, _)| self.describe(*id, &totals))
            .collect();
        // Keys only the store holds: neither known here, nor one of a key's or a team's other
        // accounts, nor a report (one of a key or team gone from the configuration too).
        let shared = self.shared.clone();
        let reports: std::collections::HashSet<String> =
            blocking(move || shared.keyring().report_names())
                .await??
                .into_iter()
                .map(|(id, _)| id)
                .collect();
        let mut others: Vec<(KeyId, Account)> = everything
            .into_iter()
            .filter(|(id, _)| {
                keys.governance.account(*id).is_none() && !reports.contains(&id.to_string())
            })
            .collect();
        others.sort_by_key(|(id, _)| *id);
        shown.extend(others.iter().map(|(id, a)| self.summary(*id, a)));
        Ok(shown)
    }

    /// One key, with the spend of its first budget (its own in `budget_period`, else its
    /// first window) in each period the store keeps.
    async fn one(&self, id: KeyId) -> Result<Value, Error> {
        let accounts: Vec<KeyId> = self
            .shared
            .keys()
            .governance
            .charges(id)
            .dollars
            .iter()
            .collect();
        let first = accounts.first().copied().unwrap_or(id);
        let (totals, history) = self
            .ledger
            .admin_call(move |s| Ok((totals_of(s, &accounts)?, s.history(first)?)))
            .await?;
        let mut shown = if self.source(id) == Source::Store {
            self.summary(id, &totals.get(&id).copied().unwrap_or_default())
        } else {
            self.describe(id, &totals)
        };
        shown["periods"] = self.periods(first, &history);
        Ok(shown)
    }

    /// A known key: where it comes from, its own budget, every budget it is charged to, its
    /// rate limits, and (an admin-made key) its other fields.
    fn describe(&self, id: KeyId, totals: &std::collections::HashMap<KeyId, Account>) -> Value {
        let keys = self.shared.keys();
        let charges = keys.governance.charges(id);
        let own = totals.get(&id).copied().unwrap_or_default();
        let mut shown = self.summary(id, &own);
        shown["source"] = self.source(id).name().into();
        let now = unix_now();
        shown["budgets"] = charges
            .dollars
            .iter()
            .filter_map(|account| {
                let info = keys.governance.account(account)?;
                let total = totals.get(&account).copied().unwrap_or_default();
                Some(standing_json(info, &total, now))
            })
            .collect();
        shown["rate_limits"] = rate_limits(&keys.governance, &charges);
        if let Some(record) = self.record(id) {
            shown["team"] = json!(record.team);
            shown["models"] = json!(record.models);
            shown["upstream"] = json!(record.upstream);
            shown["upstream_key"] = json!(record.upstream_key);
            shown["expires_at"] = json!(record.expires_at);
            shown["created_at"] = json!(record.created_at);
            shown["metadata"] = Value::Object(record.metadata.clone());
            shown["secrets"] = record
                .live_secrets(now)
                .map(|s| json!({ "valid_until": s.valid_until }))
                .collect();
        } else {
            let team = keys
                .governance
                .teams()
                .find(|(_, t)| t.keys.contains(&id))
                .map(|(name, _)| name);
            shown["team"] = json!(team);
        }
        shown
    }

    /// A key's id, alias and own budget.
    fn summary(&self, id: KeyId, a: &Account) -> Value {
        let keys = self.shared.keys();
        json!({
            "key_id": id.to_string(),
            "alias": keys.directory.alias(id),
            "source": self.source(id).name(),
            "limit_dollars": nano_to_dollars(a.limit),
            "usage_dollars": nano_to_dollars(a.spent),
            "remaining_dollars": nano_to_dollars(a.remaining()),
        })
    }

    /// Spend per period, oldest first, with the period as a date (`2026-11-30`, `2026-11`).
    fn periods(&self, id: KeyId, history: &[PeriodSpend]) -> Value {
        let window = self
            .shared
            .keys()
            .governance
            .account(id)
            .map_or(self.period, |info| info.budget.window);
        history
            .iter()
            .map(|p| {
                json!({
                    "period": period_label(window, p.period),
                    "usage_dollars": nano_to_dollars(p.nano),
                })
            })
            .collect()
    }

    /// `POST /admin/keys` `{"key": ..., "limit_dollars": ...}`: a limit for a key Aura does
    /// not manage (its own secret, sent by its client).
    async fn set_passthrough_limit(
        &self,
        fields: Map<String, Value>,
    ) -> Result<(StatusCode, Value), Error> {
        only(&fields, &["key", "limit_dollars"])?;
        let key = fields
            .get("key")
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| Error::MalformedBody("`key` must be a non-empty string".into()))?;
        let id = KeyId::of(key);
        if self.source(id) == Source::Admin {
            return Err(Error::Conflict(
                "that key is an admin-made key: PATCH it".into(),
            ));
        }
        let limit = limit_nano(dollars(&fields, "limit_dollars")?)?;
        let account = self
            .ledger
            .admin_call(move |s| s.set_limit(id, limit))
            .await?;
        Ok((StatusCode::CREATED, self.summary(id, &account)))
    }

    /// `PATCH` of a key Aura does not make: `{"limit_dollars": ...}` over its configured limit.
    async fn set_limit(
        &self,
        id: KeyId,
        fields: Map<String, Value>,
    ) -> Result<(StatusCode, Value), Error> {
        only(&fields, &["limit_dollars"])?;
        let limit = limit_nano(dollars(&fields, "limit_dollars")?)?;
        let account = self
            .ledger
            .admin_call(move |s| s.set_limit(id, limit))
            .await?;
        Ok((StatusCode::OK, self.summary(id, &account)))
    }

    /// `POST /admin/keys` `{"alias": ...}`: a new virtual key; its secret is in this answer
    /// and nowhere else.
    async fn create(&self, fields: Map<String, Value>) -> Result<(StatusCode, Value), Error> {
        let live = self.shared.live();
        if live.config.budgets.key_mode != KeyMode::Virtual {
            return Err(Error::Conflict(
                "keys made by the admin API are virtual keys: set key_mode = \"virtual\"".into(),
            ));
        }
        if !fields.contains_key("alias") {
            return Err(Error::MalformedBody("`alias` is required".into()));
        }
        let id = new_id().map_err(no_random)?;
        let (secret, hash) = new_secret().map_err(no_random)?;
        let now = unix_now();
        let mut record = KeyRecord::new(id, hash, now);
        self.apply(&mut record, &fields, now)?;
        self.check(&record, None)?;
        let alias = record.alias.clone();
        match self.write(record, None).await? {
            Put::Written => {}
            Put::AliasTaken => return Err(Error::Conflict(format!("alias `{alias}` is taken"))),
            Put::Changed => return Err(Error::Conflict("the key id is taken: try again".into())),
        }
        Ok((
            StatusCode::CREATED,
            self.with_secret(id, &alias, secret).await,
        ))
    }

    /// `PATCH` of an admin-made key: the fields given, over the keyring's own copy (never
    /// this node's, which may be a poll old), checked as a new key's are.
    async fn change(
        &self,
        id: KeyId,
        fields: Map<String, Value>,
    ) -> Result<(StatusCode, Value), Error> {
        self.update(id, |admin, record, now| {
            admin.apply(record, &fields, now)?;
            admin.check(record, Some(id))
        })
        .await?;
        Ok((StatusCode::OK, self.one(id).await?))
    }

    /// A new secret for an admin-made key; the ones it had stay valid for the grace.
    async fn rotate(&self, id: KeyId, body: &[u8]) -> Result<(StatusCode, Value), Error> {
        match self.source_of(id).await? {
            Source::Admin => {}
            Source::Config => {
                return Err(Error::Conflict(format!(
                    "key {id} comes from the config file: change its secret there and reload"
                )))
            }
            Source::Store => {
                return Err(Error::Conflict(format!(
                    "key {id} is not an admin-made key: its secret is its client's"
                )))
            }
        }
        let fields: Map<String, Value> = if body.iter().all(u8::is_ascii_whitespace) {
            Map::new()
        } else {
            parse(body)?
        };
        only(&fields, &["grace_seconds"])?;
        let grace = match fields.get("grace_seconds") {
            None => DEFAULT_GRACE_SECS,
            Some(v) => v.as_u64().filter(|g| *g <= MAX_GRACE_SECS).ok_or_else(|| {
                Error::MalformedBody(format!("`grace_seconds` must be 0 to {MAX_GRACE_SECS}"))
            })?,
        };
        let (secret, hash) = new_secret().map_err(no_random)?;
        let mut until = 0;
        let record = self
            .update(id, |_, record, now| {
                until = now + grace;
                record
                    .secrets
                    .retain(|s| s.valid_until.is_none_or(|u| now < u));
                for old in &mut record.secrets {
                    old.valid_until = Some(old.valid_until.map_or(until, |u| u.min(until)));
                }
                record.secrets.push(SecretHash {
                    sha256: hash.clone(),
                    valid_until: None,
                });
                // The oldest go first when a key rotates faster than its graces end.
                let excess = record.secrets.len().saturating_sub(MAX_SECRETS);
                record.secrets.drain(..excess);
                Ok(())
            })
            .await?;
        let mut shown = self.with_secret(id, &record.alias, secret).await;
        shown["previous_valid_until"] = json!(until);
        Ok((StatusCode::OK, shown))
    }

    /// Revokes an admin-made key: refused (401) on every node from the next poll on. Its
    /// spend stays in the store.
    async fn revoke(&self, id: KeyId) -> Result<(StatusCode, Value), Error> {
        let key = id.to_string();
        let shared = self.shared.clone();
        let removed = blocking(move || {
            let ring = shared.keyring().clone();
            let removed = ring.delete(&key)?;
            install(&shared);
            Ok::<_, StoreError>(removed)
        })
        .await??;
        if !removed {
            return Err(Error::NotFound(id.to_string()));
        }
        Ok((
            StatusCode::OK,
            json!({ "key_id": id.to_string(), "revoked": true }),
        ))
    }

    /// Changes an admin-made key as the keyring has it now: `change` is applied to a fresh
    /// copy, written only over the revision it was made from (a few tries, then 409).
    async fn update(
        &self,
        id: KeyId,
        mut change: impl FnMut(&Self, &mut KeyRecord, u64) -> Result<(), Error>,
    ) -> Result<KeyRecord, Error> {
        for _ in 0..3 {
            let mut record = self
                .fresh(id)
                .await?
                .ok_or_else(|| Error::NotFound(id.to_string()))?;
            let read = record.rev;
            change(self, &mut record, unix_now())?;
            record.rev = read + 1;
            match self.write(record.clone(), Some(read)).await? {
                Put::Written => return Ok(record),
                Put::Changed => continue,
                Put::AliasTaken => {
                    return Err(Error::Conflict(format!(
                        "alias `{}` is taken",
                        record.alias
                    )))
                }
            }
        }
        Err(Error::Conflict(format!(
            "key {id} kept changing meanwhile: try again"
        )))
    }

    /// The key as the keyring has it now (not this node's copy).
    async fn fresh(&self, id: KeyId) -> Result<Option<KeyRecord>, Error> {
        let shared = self.shared.clone();
        let key = id.to_string();
        let found = blocking(move || {
            let (_, keys) = shared.keyring().load()?;
            Ok::<_, StoreError>(keys.into_iter().find(|k| k.id == key))
        })
        .await??;
        Ok(found)
    }

    /// Writes `record` over revision `expected` (none: a new key) off the worker; once
    /// written, installs the keyring's keys on this node (other nodes hear of them at their
    /// next poll).
    async fn write(&self, record: KeyRecord, expected: Option<u64>) -> Result<Put, Error> {
        let shared = self.shared.clone();
        let put = blocking(move || {
            let put = shared.keyring().put(&record, expected)?;
            if put == Put::Written {
                install(&shared);
            }
            Ok::<_, StoreError>(put)
        })
        .await??;
        Ok(put)
    }

    /// The answer that carries a key's new secret: never lost to a read that fails after the
    /// write (the key would exist, its secret in no answer).
    async fn with_secret(&self, id: KeyId, alias: &str, secret: String) -> Value {
        let mut shown = match self.one(id).await {
            Ok(shown) => shown,
            Err(_) => json!({ "key_id": id.to_string(), "alias": alias, "source": "admin" }),
        };
        shown["key"] = secret.into();
        shown
    }

    /// Sets the fields given on `record`; `null` clears an optional one.
    fn apply(
        &self,
        record: &mut KeyRecord,
        fields: &Map<String, Value>,
        now: u64,
    ) -> Result<(), Error> {
        only(
            fields,
            &[
                "alias",
                "team",
                "models",
                "upstream",
                "upstream_key",
                "budgets",
                "limit_dollars",
                "rpm",
                "tpm",
                "max_concurrent",
                "expires_at",
                "expires_in_seconds",
                "metadata",
            ],
        )?;
        if fields.contains_key("budgets") && fields.contains_key("limit_dollars") {
            return Err(Error::MalformedBody(
                "give `budgets` or `limit_dollars`, not both".into(),
            ));
        }
        for (name, value) in fields {
            let bad = |what: &str| Error::MalformedBody(format!("`{name}` must be {what}"));
            let text = |v: &Value| {
                v.as_str()
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .ok_or_else(|| bad("a non-empty string"))
            };
            let optional = |v: &Value| {
                if v.is_null() {
                    Ok(None)
                } else {
                    text(v).map(Some)
                }
            };
            let count = |v: &Value| match v {
                Value::Null => Ok(None),
                v => v
                    .as_u64()
                    .filter(|n| *n > 0)
                    .map(Some)
                    .ok_or_else(|| bad("a positive integer")),
            };
            match name.as_str() {
                "alias" => record.alias = text(value)?,
                "team" => record.team = optional(value)?,
                "upstream" => record.upstream = optional(value)?,
                "upstream_key" => record.upstream_key = optional(value)?,
                "models" => {
                    record.models = match value {
                        Value::Null => Vec::new(),
                        Value::Array(items) => items.iter().map(text).collect::<Result<_, _>>()?,
                        _ => return Err(bad("a list of model names or globs")),
                    }
                }
                "budgets" => {
                    record.budgets = if value.is_null() {
                        Vec::new()
                    } else {
                        serde_json::from_value(value.clone()).map_err(|_| {
                            bad("a list of {\"period\": \"none\" | \"daily\" | \"monthly\", \"limit_dollars\": <dollars>}")
                        })?
                    }
                }
                "limit_dollars" => {
                    record.budgets = match value {
                        Value::Null => Vec::new(),
                        _ => vec![WindowSpec {
                            period: period_name(self.period),
                            limit_dollars: dollars(fields, "limit_dollars")?,
                        }],
                    }
                }
                "rpm" => record.rpm = count(value)?,
                "tpm" => record.tpm = count(value)?,
                "max_concurrent" => record.max_concurrent = count(value)?,
                "expires_at" => record.expires_at = count(value)?,
                "expires_in_seconds" => {
                    record.expires_at = count(value)?.map(|secs| now.saturating_add(secs))
                }
                "metadata" => {
                    record.metadata = match value {
                        Value::Null => Map::new(),
                        Value::Object(map) => map.clone(),
                        _ => return Err(bad("a JSON object")),
                    };
                    if value.to_string().len() > MAX_METADATA_BYTES {
                        return Err(bad(&format!("at most {MAX_METADATA_BYTES} bytes of JSON")));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether this node can serve `record` as it is: its alias free (but for the key
    /// itself), its team, upstream and upstream key found, its models and limits valid.
    fn check(&self, record: &KeyRecord, itself: Option<KeyId>) -> Result<(), Error> {
        let keys = self.shared.keys();
        let live = self.shared.live();
        let alias = &record.alias;
        let looks_like_id = alias.len() == 16 && alias.bytes().all(|b| b.is_ascii_hexdigit());
        let reserved = alias == "other" || alias == "(other keys)";
        if looks_like_id || reserved || alias.len() > 64 || alias.contains(['/', '"']) {
            return Err(Error::MalformedBody(
                "`alias` must be at most 64 characters, not `other`, not 16 hex digits, without / or \"".into(),
            ));
        }
        if keys
            .directory
            .by_alias(alias)
            .is_some_and(|other| Some(other) != itself)
        {
            return Err(Error::Conflict(format!("alias `{alias}` is taken")));
        }
        let mut periods = std::collections::HashSet::new();
        for window in &record.budgets {
            limit_nano(window.limit_dollars)?;
            if !periods.insert(window.period) {
                return Err(Error::MalformedBody(
                    "`budgets` names a period twice".into(),
                ));
            }
        }
        let routes = live.config.routes();
        let keyed = routes.iter().all(|r| !r.keys.is_empty());
        if record.upstream_key.is_none() && !keyed {
            return Err(Error::MalformedBody(
                "`upstream_key` (`env:NAME`) is required: not every upstream has keys of its own"
                    .into(),
            ));
        }
        let member = record.member(&ProcessEnv).map_err(Error::MalformedBody)?;
        if let Some(team) = &member.team {
            if !live.config.budgets.teams.iter().any(|t| &t.name == team) {
                return Err(Error::MalformedBody(format!(
                    "`team`: no [teams.{team}] in the config file"
                )));
            }
        }
        if let Some(upstream) = &member.upstream {
            if !routes.iter().any(|r| &r.name == upstream) {
                return Err(Error::MalformedBody(format!(
                    "`upstream`: no upstream `{upstream}` in the config file"
                )));
            }
        }
        Ok(())
    }
}

/// The rate limits that apply to a key: its own and its team's, by kind.
fn rate_limits(governance: &crate::governance::Governance, charges: &Charges) -> Value {
    let limits = |accounts: crate::budget::Accounts| -> Vec<Value> {
        accounts
            .iter()
            .filter_map(|id| governance.account(id))
            .map(|info| json!({ "limit": info.budget.limit, "applies": info.describe() }))
            .collect()
    };
    json!({
        "requests_per_minute": limits(charges.requests),
        "tokens_per_minute": limits(charges.tokens),
        "concurrent_requests": limits(charges.concurrent),
    })
}

fn period_name(period: Period) -> PeriodName {
    match period {
        Period::Daily => PeriodName::Daily,
        Period::Monthly => PeriodName::Monthly,
        _ => PeriodName::None,
    }
}

/// Unknown fields are refused: a typo must not pass for a default.
fn only(fields: &Map<String, Value>, known: &[&str]) -> Result<(), Error> {
    match fields.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) => Err(Error::MalformedBody(format!("unknown field `{unknown}`"))),
        None => Ok(()),
    }
}

fn dollars(fields: &Map<String, Value>, name: &str) -> Result<f64, Error> {
    fields
        .get(name)
        .and_then(Value::as_f64)
        .ok_or_else(|| Error::MalformedBody(format!("`{name}` must be a number of dollars")))
}

fn no_random(e: ring::error::Unspecified) -> Error {
    Error::Internal(format!("no random numbers: {e:?}"))
}

/// Installs the keyring's keys on this node; a read that fails now leaves them to the next
/// poll (the write it follows is done).
fn install(shared: &Shared) {
    match shared.keyring().load() {
        Ok(loaded) => shared.set_admin_keys(Some(loaded)),
        Err(e) => {
            tracing::warn!(error = %e, "keyring: written, not read back; the next poll installs it")
        }
    }
}
