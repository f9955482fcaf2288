//! Rate limits on the request path. A request reserves one request, its token estimate and
//! one place in flight in each rate account of its key and team (governance.rs), on leases
//! like money's: admission stays local, and the fleet admits at most the limit plus what its
//! workers hold leased. It settles to one request when it reached its upstream, the tokens
//! its usage reports, and gives its place in flight back.
//!
//! Every answer to a rate-limited key carries OpenAI's `x-ratelimit-*` headers for the
//! tightest limit of each kind: its limit, what is left of it as this worker knows, and when
//! the minute turns.

use crate::budget::{Accounts, Meter, Refusal, Reservation, Shard};
use crate::error::Error;
use crate::governance::{Charges, Governance};

/// A request's reservations in its rate accounts (none where no limit applies).
#[derive(Debug, Default)]
pub struct Rates<'s> {
    requests: Option<Reservation<'s>>,
    tokens: Option<Reservation<'s>>,
    /// Released when the request ends, whatever happened (the shard never bills it).
    concurrent: Option<Reservation<'s>>,
}

impl<'s> Rates<'s> {
    /// Reserves in every rate account of `charges`: in flight first, then requests, then
    /// tokens. Refused by one, the request holds nothing in any.
    pub async fn admit(
        shard: &'s Shard,
        governance: &Governance,
        charges: &Charges,
        tokens: u64,
    ) -> Result<Rates<'s>, Error> {
        let mut rates = Rates::default();
        if !charges.rate_limited() {
            return Ok(rates);
        }
        let reserve = |accounts: Accounts, amount: u64| async move {
            if accounts.is_empty() {
                return Ok(None);
            }
            match shard.reserve_all(accounts, amount).await {
                Ok(reservation) => Ok(Some(reservation)),
                Err(refusal) => Err(refused(governance, shard, refusal)),
            }
        };
        // A request no minute could take is told so, not to come back.
        for id in charges.tokens.iter() {
            if let Some(info) = governance.account(id).filter(|i| i.budget.limit < tokens) {
                return Err(Error::TooLargeForLimit {
                    limit: info.describe(),
                    allowed: info.budget.limit,
                    requested: tokens,
                });
            }
        }
        rates.concurrent = reserve(charges.concurrent, 1).await?;
        rates.requests = reserve(charges.requests, 1).await?;
        rates.tokens = reserve(charges.tokens, tokens).await?;
        Ok(rates)
    }

    /// The request went to its upstream: its request and tokens count from now on.
    pub fn mark_sent(&mut self) {
        for reservation in [&mut self.requests, &mut self.tokens].into_iter().flatten() {
            reservation.mark_sent();
        }
    }

    /// The request ended: one request if it reached its upstream, the tokens it used.
    pub fn settle(self, tokens_used: u64) {
        if let Some(requests) = self.requests {
            let sent = u64::from(requests.is_sent());
            requests.settle(sent);
        }
        if let Some(tokens) = self.tokens {
            let used = if tokens.is_sent() { tokens_used } else { 0 };
            tokens.settle(used);
        }
        if let Some(concurrent) = self.concurrent {
            concurrent.settle(0);
        }
    }
}

/// A rate account's refusal as the client hears it: 429 `rate_limit_exceeded`, with when to
/// come back.
fn refused(governance: &Governance, shard: &Shard, refusal: Refusal) -> Error {
    let Refusal::Denied { account, .. } = refusal else {
        return Error::StoreUnavailable;
    };
    let Some(info) = governance.account(account) else {
        return Error::StoreUnavailable;
    };
    let (kind, retry_after_secs) = match info.budget.meter {
        Meter::Tokens => ("tokens", until_the_minute_turns(shard.unix_now())),
        Meter::Requests => ("requests", until_the_minute_turns(shard.unix_now())),
        // A place in flight frees when any request ends.
        _ => ("requests", 1),
    };
    Error::RateLimited {
        limit: info.describe(),
        kind,
        allowed: info.budget.limit,
        retry_after_secs,
    }
}

fn until_the_minute_turns(unix: u64) -> u64 {
    60 - unix % 60
}

/// The `x-ratelimit-*` values of one kind: the tightest limit's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub limit: u64,
    pub remaining: u64,
    pub reset_secs: u64,
}

/// What the `x-ratelimit-*` headers of an answer say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateHeaders {
    pub requests: Option<Standing>,
    pub tokens: Option<Standing>,
}

impl RateHeaders {
    /// For a rate-limited key with `charges`, as this worker knows its accounts now (none of
    /// a kind it has no limit of: its answers then carry no header of that kind, the
    /// upstream's neither).
    pub fn of(shard: &Shard, governance: &Governance, charges: &Charges) -> RateHeaders {
        let reset_secs = until_the_minute_turns(shard.unix_now());
        let tightest = |accounts: Accounts| {
            accounts
                .iter()
                .filter_map(|id| {
                    let limit = governance.account(id)?.budget.limit;
                    let remaining = shard.headroom(id).unwrap_or(limit).min(limit);
                    Some(Standing {
                        limit,
                        remaining,
                        reset_secs,
                    })
                })
                .min_by_key(|s| s.remaining)
        };
        RateHeaders {
            requests: tightest(charges.requests),
            tokens: tightest(charges.tokens),
        }
    }

    /// The headers, as name and value.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = Vec::with_capacity(6);
        for (standing, names) in [
            (
                self.requests,
                [
                    "x-ratelimit-limit-requests",
                    "x-ratelimit-remaining-requests",
                    "x-ratelimit-reset-requests",
                ],
            ),
            (
                self.tokens,
                [
                    "x-ratelimit-limit-tokens",
                    "x-ratelimit-remaining-tokens",
                    "x-ratelimit-reset-tokens",
                ],
            ),
        ] {
            if let Some(s) = standing {
                pairs.push((names[0], s.limit.to_string()));
                pairs.push((names[1], s.remaining.to_string()));
                pairs.push((names[2], format!("{}s", s.reset_secs)));
            }
        }
        pairs
    }
}

impl RateHeaders {
    /// An upstream's answer: its own rate-limit headers (its account's, not the caller's)
    /// give way to these.
    pub fn replace_in(&self, headers: &mut http::HeaderMap) {
        for name in UPSTREAM_RATE_HEADERS {
            headers.remove(name);
        }
        for (name, value) in self.pairs() {
            if let Ok(value) = http::HeaderValue::try_from(value) {
                headers.insert(name, value);
            }
        }
    }
}

/// The rate-limit headers an upstream may send.
const UPSTREAM_RATE_HEADERS: [&str; 6] = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_name_each_kind_once() {
        let headers = RateHeaders {
            requests: Some(Standing {
                limit: 60,
                remaining: 59,
                reset_secs: 12,
            }),
            tokens: None,
        };
        assert_eq!(
            headers.pairs(),
            vec![
                ("x-ratelimit-limit-requests", "60".to_string()),
                ("x-ratelimit-remaining-requests", "59".to_string()),
                ("x-ratelimit-reset-requests", "12s".to_string()),
            ]
        );
        assert_eq!(until_the_minute_turns(120), 60);
        assert_eq!(until_the_minute_turns(179), 1);
    }
}
