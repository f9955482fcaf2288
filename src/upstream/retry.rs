//! When a request goes to another upstream: only before any byte of an answer went to the
//! client, and only on a failure another upstream may not have (connect or TLS failure, a
//! timeout or a reset before the response head, or a 429 / 500 / 502 / 503 / 504 / 529
//! answer). Pure: the proxy asks, and counts each attempt by its [`AttemptOutcome`].

use std::time::Duration;

use http::HeaderMap;

use crate::error::Error;

/// How one attempt ended, as `aura_upstream_attempts_total{outcome}` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// Its answer (whatever the status) went to the client.
    Answered,
    /// It answered 429 or a 5xx another upstream may not, and the request went on.
    RetryableStatus,
    /// The provider refused the pool key it was sent with (401, 403, 429).
    KeyRefused,
    /// No connection: refused, unreachable, or the TLS handshake failed.
    ConnectFailed,
    /// No response head in time.
    Timeout,
    /// The connection closed or reset before the response head.
    Reset,
    /// A response head Aura could not read.
    Protocol,
    /// Any other failure: not retried.
    Other,
}

impl AttemptOutcome {
    pub const ALL: [AttemptOutcome; 8] = [
        AttemptOutcome::Answered,
        AttemptOutcome::RetryableStatus,
        AttemptOutcome::KeyRefused,
        AttemptOutcome::ConnectFailed,
        AttemptOutcome::Timeout,
        AttemptOutcome::Reset,
        AttemptOutcome::Protocol,
        AttemptOutcome::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            AttemptOutcome::Answered => "answered",
            AttemptOutcome::RetryableStatus => "retryable_status",
            AttemptOutcome::KeyRefused => "key_refused",
            AttemptOutcome::ConnectFailed => "connect_failed",
            AttemptOutcome::Timeout => "timeout",
            AttemptOutcome::Reset => "reset",
            AttemptOutcome::Protocol => "protocol_error",
            AttemptOutcome::Other => "other",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// The outcome of an attempt that got no response head, and whether another upstream
    /// may be tried.
    pub fn of_error(error: &Error) -> (AttemptOutcome, bool) {
        match error {
            Error::UpstreamUnreachable(_) => (AttemptOutcome::ConnectFailed, true),
            Error::UpstreamTimeout => (AttemptOutcome::Timeout, true),
            Error::UpstreamReset => (AttemptOutcome::Reset, true),
            Error::UpstreamProtocol(_) => (AttemptOutcome::Protocol, true),
            _ => (AttemptOutcome::Other, false),
        }
    }
}

/// A status another upstream may not answer: rate limited (429), overloaded (503, Anthropic's
/// 529) or failing (500, 502, 504).
pub fn retryable_status(status: u16) -> bool {
    matches!(status, 429 | 500 | 502 | 503 | 504 | 529)
}

/// How long the upstream asked to be left alone: `retry-after-ms` (OpenAI's), else
/// `Retry-After` in seconds (an HTTP date is not read: the growing rest applies).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| -> Option<f64> {
        let value = headers
            .get(name)?
            .to_str()
            .ok()?
            .trim()
            .parse::<f64>()
            .ok()?;
        (value.is_finite() && value >= 0.0).then_some(value)
    };
    if let Some(ms) = number("retry-after-ms") {
        return Some(Duration::from_secs_f64(ms.min(86_400_000.0) / 1000.0));
    }
    number("retry-after").map(|s| Duration::from_secs_f64(s.min(86_400.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_milliseconds_then_seconds() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "1500".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "-3".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn only_failures_another_upstream_may_not_have_are_retried() {
        for s in [429, 500, 502, 503, 504, 529] {
            assert!(retryable_status(s), "{s}");
        }
        for s in [200, 400, 401, 403, 404, 413, 422, 501] {
            assert!(!retryable_status(s), "{s}");
        }
        assert_eq!(
            AttemptOutcome::of_error(&Error::UpstreamTimeout),
            (AttemptOutcome::Timeout, true)
        );
        assert!(!AttemptOutcome::of_error(&Error::InvalidKey).1);
    }
}
