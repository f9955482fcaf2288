//! The admin API, on when `admin_token` is set; every call needs
//! `Authorization: Bearer <admin_token>`, or Basic credentials with the token as the password
//! (what a browser sends once asked), compared in constant time.
//!
//! | call | does |
//! |---|---|
//! | `GET /admin/keys` | every key: the config file's, the admin API's, and any other the store holds, each with where it comes from, its budgets (every window) and rate limits |
//! | `POST /admin/keys` `{"alias": "alice", ...}` | makes a key (`keys.rs`): its secret is in this answer only |
//! | `POST /admin/keys` `{"key": "...", "limit_dollars": 5}` | sets the limit of a key Aura does not manage (passthrough) |
//! | `GET /admin/keys/{id}` | one key, with its spend in each period the store keeps |
//! | `PATCH /admin/keys/{id}` | an admin-made key: any of its fields; any other: `{"limit_dollars": 7.5}` |
//! | `POST /admin/keys/{id}/rotate` `{"grace_seconds": 3600}` | an admin-made key's new secret; the old ones stay valid for the grace |
//! | `POST /admin/keys/{id}/reset` | its spend in the current period back to zero |
//! | `DELETE /admin/keys/{id}` | revokes an admin-made key (401 from then on); forgets another key's limit and spend |
//! | `GET /admin/teams` | every team, its budgets (every window), rate limits and keys |
//! | `GET /admin/spend?from=2026-11-01&to=2026-11-30` | spend per day by key, team and model, from the store (`spend.rs`) |
//! | `GET /admin/ui` | the console (`ui.rs`): one page, in a browser |
//! | `POST /admin/reload` | reads the configuration again (as SIGHUP does): applied, or refused whole with its errors |
//!
//! `{id}` is a key id (16 hex digits, as every answer shows it) or an alias: a key appears in
//! clear only in the answer that made it. Answers are JSON, errors OpenAI-shaped.

mod keys;
mod spend;
mod teams;
mod ui;

use http::{HeaderMap, Method, StatusCode};
use serde::Deserialize;
use serde_json::json;

use std::sync::Arc;

use crate::auth;
use crate::budget::ledger::Ledger;
use crate::config::{Period, Secret};
use crate::error::Error;
use crate::pricing;
use crate::reload::Shared;

/// An admin call's answer: JSON, or the console's page.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub headers: &'static [(&'static str, &'static str)],
}

impl Answer {
    fn json(status: StatusCode, body: &serde_json::Value) -> Answer {
        Answer {
            status,
            content_type: "application/json",
            body: body.to_string().into_bytes(),
            headers: &[],
        }
    }
}

pub struct Admin<'a> {
    pub ledger: &'a Ledger,
    /// The live configuration and keys, the keyring, reloads.
    pub shared: &'a Arc<Shared>,
    pub token: &'a Secret,
    /// `budget_period`: the window of keys' own limits.
    pub period: Period,
}

impl Admin<'_> {
    /// `POST /admin/reload`: the configuration read again, off the worker (file reads and DNS
    /// block); 200 with what was applied, or 400 with why it was refused.
    async fn reload(&self) -> Result<(StatusCode, serde_json::Value), Error> {
        if !self.shared.reloadable() {
            return Err(Error::NotFound("/admin/reload".into()));
        }
        let shared = self.shared.clone();
        match blocking(move || shared.reload()).await? {
            Ok(done) => {
                let body = json!({
                    "reloaded": true,
                    "generation": done.generation,
                    "upstreams": done.upstreams,
                    "keys": done.keys,
                    "restart_needed_for": done.restart_only,
                });
                Ok((StatusCode::OK, body))
            }
            Err(refused) => Err(Error::ConfigRefused(refused)),
        }
    }

    /// Answers one admin call: its status and JSON body.
    pub async fn handle(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Answer, Error> {
        // A bearer token, or a browser's Basic credentials with the token as the password.
        let basic = auth::basic_password(headers);
        let bearer = auth::bearer(headers);
        let token = bearer.or(basic.as_deref()).ok_or(Error::AdminToken)?;
        if !auth::constant_time_eq(token.as_bytes(), self.token.expose().as_bytes()) {
            return Err(Error::AdminToken);
        }
        let changes = !matches!(*method, Method::GET | Method::HEAD);
        // A browser sends stored Basic credentials with any site's form: a change made by them
        // needs the console's own header (no other site can set one without CORS, which Aura
        // never grants), and comes from no other origin.
        if changes && bearer.is_none() && !from_the_console(headers) {
            return Err(Error::Forbidden(
                "an admin change by browser credentials needs the console's x-aura-console header"
                    .into(),
            ));
        }
        // And JSON only: a form's text/plain body that happens to be JSON is no admin call.
        if bearer.is_none() && !body.is_empty() && !is_json(headers) {
            return Err(Error::MalformedBody(
                "admin calls take JSON: content-type: application/json".into(),
            ));
        }
        // HEAD is GET without the body (the caller leaves the body out).
        let method = if method == Method::HEAD {
            &Method::GET
        } else {
            method
        };
        let answer = match path {
            "/admin/ui" => {
                return match *method {
                    Method::GET => Ok(ui::page()),
                    _ => Err(Error::MethodNotAllowed { allow: "GET, HEAD" }),
                }
            }
            "/admin/reload" => match *method {
                Method::POST => self.reload().await?,
                _ => return Err(Error::MethodNotAllowed { allow: "POST" }),
            },
            "/admin/teams" => match *method {
                Method::GET => self.teams().await?,
                _ => return Err(Error::MethodNotAllowed { allow: "GET, HEAD" }),
            },
            "/admin/spend" => match *method {
                Method::GET => self.spend(query).await?,
                _ => return Err(Error::MethodNotAllowed { allow: "GET, HEAD" }),
            },
            _ => {
                let rest = path
                    .strip_prefix("/admin/keys")
                    .filter(|rest| rest.is_empty() || rest.starts_with('/'))
                    .ok_or_else(|| Error::NotFound(path.to_string()))?;
                let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
                self.keys(method, path, &parts, body).await?
            }
        };
        Ok(Answer::json(answer.0, &answer.1))
    }
}

/// The console's own call: its header, and no other site's origin.
fn from_the_console(headers: &HeaderMap) -> bool {
    let from_another_site = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|site| !site.eq_ignore_ascii_case("same-origin"));
    headers.contains_key("x-aura-console") && !from_another_site
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

/// Runs `call` on a thread of its own (a keyring write fsyncs or crosses the network; a
/// reload reads files): the worker or control plane waits without blocking.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    let (tx, rx) = futures_channel::oneshot::channel();
    std::thread::Builder::new()
        .name("aura-admin".into())
        .spawn(move || {
            let _ = tx.send(call());
        })
        .map_err(|e| Error::Internal(format!("cannot start an admin call: {e}")))?;
    rx.await
        .map_err(|_| Error::Internal("an admin call ended without an answer".into()))
}

/// Each account's totals in its current period (one store call for them all).
fn totals_of(
    store: &dyn crate::budget::store::Store,
    accounts: &[crate::auth::KeyId],
) -> Result<
    std::collections::HashMap<crate::auth::KeyId, crate::budget::Account>,
    crate::budget::store::StoreError,
> {
    accounts
        .iter()
        .map(|id| Ok((*id, store.account(*id)?)))
        .collect()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| Error::MalformedBody(e.to_string()))
}

fn limit_nano(dollars: f64) -> Result<u64, Error> {
    pricing::limit_nano(dollars).map_err(|e| Error::MalformedBody(format!("`limit_dollars`: {e}")))
}
