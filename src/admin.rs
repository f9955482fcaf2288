//! The admin API for keys, on when `admin_token` is set; every call needs
//! `Authorization: Bearer <admin_token>` (compared in constant time).
//!
//! | call | does |
//! |---|---|
//! | `GET /admin/keys` | every key the store holds |
//! | `POST /admin/keys` `{"key": "...", "limit_dollars": 5}` | sets a key's limit (creates it) |
//! | `GET /admin/keys/{id}` | one key, with its spend in each budget period the store keeps |
//! | `PATCH /admin/keys/{id}` `{"limit_dollars": 7.5}` | updates its limit |
//! | `POST /admin/keys/{id}/reset` | its spend back to zero |
//! | `DELETE /admin/keys/{id}` | forgets its limit and spend |
//!
//! | `POST /admin/reload` | reads the configuration again (as SIGHUP does): applied, or refused whole with its errors |
//!
//! `{id}` is a key id (16 hex digits, as every answer shows it) or a configured alias: keys
//! appear in clear only in the body that registers them. Answers are JSON, errors OpenAI-shaped.

use http::{HeaderMap, Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use std::sync::Arc;

use crate::auth::{self, Directory, KeyId};
use crate::budget::ledger::Ledger;
use crate::budget::op::period_label;
use crate::budget::{Account, PeriodSpend};
use crate::config::{Period, Secret};
use crate::error::Error;
use crate::pricing::{self, nano_to_dollars};
use crate::reload::Shared;

pub struct Admin<'a> {
    pub ledger: &'a Ledger,
    pub directory: &'a Directory,
    /// The live configuration, for `POST /admin/reload`.
    pub shared: &'a Arc<Shared>,
    pub token: &'a Secret,
    /// How periods are shown.
    pub period: Period,
}

impl Admin<'_> {
    /// `POST /admin/reload`: the configuration read again, off the worker (file reads and DNS
    /// block); 200 with what was applied, or 400 with why it was refused.
    async fn reload(&self) -> Result<(StatusCode, Vec<u8>), Error> {
        if !self.shared.reloadable() {
            return Err(Error::NotFound("/admin/reload".into()));
        }
        let (tx, rx) = futures_channel::oneshot::channel();
        let shared = self.shared.clone();
        std::thread::Builder::new()
            .name("aura-reload".into())
            .spawn(move || {
                let _ = tx.send(shared.reload());
            })
            .map_err(|e| Error::Internal(format!("cannot start the reload: {e}")))?;
        match rx.await {
            Ok(Ok(done)) => {
                let body = json!({
                    "reloaded": true,
                    "generation": done.generation,
                    "upstreams": done.upstreams,
                    "keys": done.keys,
                    "restart_needed_for": done.restart_only,
                });
                Ok((StatusCode::OK, body.to_string().into_bytes()))
            }
            Ok(Err(refused)) => Err(Error::ConfigRefused(refused)),
            Err(_) => Err(Error::Internal("the reload ended without an answer".into())),
        }
    }

    /// Answers one admin call: its status and JSON body.
    pub async fn handle(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<(StatusCode, Vec<u8>), Error> {
        let token = auth::bearer(headers).ok_or(Error::AdminToken)?;
        if !auth::constant_time_eq(token.as_bytes(), self.token.expose().as_bytes()) {
            return Err(Error::AdminToken);
        }
        let not_found = || Error::NotFound(path.to_string());
        if path == "/admin/reload" {
            return match *method {
                Method::POST => self.reload().await,
                _ => Err(Error::MethodNotAllowed { allow: "POST" }),
            };
        }
        let rest = path.strip_prefix("/admin/keys").ok_or_else(not_found)?;
        let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
        // HEAD is GET without the body (the caller leaves the body out).
        let method = if method == Method::HEAD {
            &Method::GET
        } else {
            method
        };
        let answer = match (method, parts.as_slice()) {
            (&Method::GET, []) => {
                let mut keys = self.ledger.admin_call(|s| s.accounts()).await?;
                keys.sort_by_key(|(id, _)| *id);
                let keys: Vec<Value> = keys.iter().map(|(id, a)| self.show(*id, a)).collect();
                (StatusCode::OK, json!({ "keys": keys }))
            }
            (&Method::POST, []) => {
                let create: Create = parse(body)?;
                if create.key.trim().is_empty() {
                    return Err(Error::MalformedBody("`key` must not be empty".into()));
                }
                let id = KeyId::of(create.key.trim());
                let limit = limit_nano(create.limit_dollars)?;
                let account = self
                    .ledger
                    .admin_call(move |s| s.set_limit(id, limit))
                    .await?;
                (StatusCode::CREATED, self.show(id, &account))
            }
            (&Method::GET, [id]) => {
                let id = self.resolve(id).await?.ok_or_else(not_found)?;
                let (account, history) = self
                    .ledger
                    .admin_call(move |s| Ok((s.account(id)?, s.history(id)?)))
                    .await?;
                let mut shown = self.show(id, &account);
                shown["periods"] = self.periods(&history);
                (StatusCode::OK, shown)
            }
            (&Method::PATCH, [id]) => {
                let id = self.resolve(id).await?.ok_or_else(not_found)?;
                let update: Update = parse(body)?;
                let limit = limit_nano(update.limit_dollars)?;
                let account = self
                    .ledger
                    .admin_call(move |s| s.set_limit(id, limit))
                    .await?;
                (StatusCode::OK, self.show(id, &account))
            }
            (&Method::POST, [id, "reset"]) => {
                let id = self.resolve(id).await?.ok_or_else(not_found)?;
                let account = self.ledger.admin_call(move |s| s.reset(id)).await?;
                self.ledger.forget_known(id);
                (StatusCode::OK, self.show(id, &account))
            }
            (&Method::DELETE, [id]) => {
                let id = self.resolve(id).await?.ok_or_else(not_found)?;
                self.ledger.admin_call(move |s| s.remove(id)).await?;
                self.ledger.forget_known(id);
                (
                    StatusCode::OK,
                    json!({ "key_id": id.to_string(), "deleted": true }),
                )
            }
            (_, []) => {
                return Err(Error::MethodNotAllowed {
                    allow: "GET, HEAD, POST",
                })
            }
            (_, [_]) => {
                return Err(Error::MethodNotAllowed {
                    allow: "GET, HEAD, PATCH, DELETE",
                })
            }
            (_, [_, "reset"]) => return Err(Error::MethodNotAllowed { allow: "POST" }),
            _ => return Err(not_found()),
        };
        Ok((answer.0, answer.1.to_string().into_bytes()))
    }

    /// A key the store holds or the config names, by id or alias.
    async fn resolve(&self, id_or_alias: &str) -> Result<Option<KeyId>, Error> {
        if let Some(id) = KeyId::parse(id_or_alias) {
            if self.directory.alias(id).is_some()
                || self.ledger.admin_call(move |s| s.holds(id)).await?
            {
                return Ok(Some(id));
            }
        }
        Ok(self.directory.by_alias(id_or_alias))
    }

    /// Spend per period, oldest first, with the period as a date (`2026-11-30`, `2026-11`).
    fn periods(&self, history: &[PeriodSpend]) -> Value {
        history
            .iter()
            .map(|p| {
                json!({
                    "period": period_label(self.period, p.period),
                    "usage_dollars": nano_to_dollars(p.nano),
                })
            })
            .collect()
    }

    fn show(&self, id: KeyId, a: &Account) -> Value {
        json!({
            "key_id": id.to_string(),
            "alias": self.directory.alias(id),
            "limit_dollars": nano_to_dollars(a.limit),
            "usage_dollars": nano_to_dollars(a.spent),
            "remaining_dollars": nano_to_dollars(a.remaining()),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    key: String,
    limit_dollars: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Update {
    limit_dollars: f64,
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| Error::MalformedBody(e.to_string()))
}

fn limit_nano(dollars: f64) -> Result<u64, Error> {
    pricing::limit_nano(dollars).map_err(|e| Error::MalformedBody(format!("`limit_dollars`: {e}")))
}
