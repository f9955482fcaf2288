//! The gateway's error taxonomy: every failure a request can meet, who is at fault, and how it
//! is shown to the client (HTTP status, OpenAI-style `type` and `code`) and to metrics (a static
//! label). Pure: building an error never logs; the settle step logs and counts once.

use http::StatusCode;

/// Who caused a failure: decides the status class and where an operator should look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Client,
    Upstream,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("malformed HTTP request: {0}")]
    MalformedHead(&'static str),
    #[error("request head exceeds {limit_bytes} bytes")]
    HeadTooLarge { limit_bytes: usize },
    #[error("request has more than {limit} headers")]
    TooManyHeaders { limit: usize },
    #[error("request body exceeds {limit_bytes} bytes")]
    BodyTooLarge { limit_bytes: usize },
    #[error("malformed request body: {0}")]
    MalformedBody(String),
    #[error("{0} is not supported")]
    Unsupported(&'static str),
    #[error("no route for {0}")]
    NotFound(String),
    /// No configured upstream serves the model asked for (OpenAI's own code and wording).
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    #[error("request path refused: {0}")]
    BadPath(crate::route::TargetError),
    #[error("more than one credential: send exactly one of `Authorization: Bearer <key>`, `x-api-key` or `api-key`")]
    AmbiguousCredentials,
    #[error("{0} costs money Aura cannot price; the operator has not allowed such routes (allow_unpriced_routes)")]
    UnpricedRoute(String),
    #[error("missing API key: send `Authorization: Bearer <key>` (or `x-api-key: <key>`)")]
    MissingKey,
    #[error("unknown API key")]
    InvalidKey,
    #[error("missing or wrong admin token")]
    AdminToken,
    #[error(
        "budget exhausted: the {budget} has ${:.6} left and this request may cost up to ${:.6}; lower max_tokens or raise the limit",
        *remaining_nano as f64 / 1e9,
        *estimate_nano as f64 / 1e9
    )]
    BudgetExhausted {
        /// Which budget refused: `key "alice" daily budget`, `team "research" monthly budget`.
        budget: String,
        remaining_nano: u64,
        estimate_nano: u64,
    },
    /// A rate limit (requests or tokens per minute, requests in flight) is reached.
    #[error(
        "rate limit reached: the {limit} of {allowed} is used up; try again in {retry_after_secs}s"
    )]
    RateLimited {
        /// Which limit: `key "alice" requests per minute`.
        limit: String,
        /// OpenAI's error type: `requests` or `tokens`.
        kind: &'static str,
        allowed: u64,
        retry_after_secs: u64,
    },
    /// The budget store cannot be reached and `store_failure` is closed (or a store read failed).
    #[error("the budget store is unavailable; try again shortly")]
    StoreUnavailable,
    #[error("method not allowed (allowed: {allow})")]
    MethodNotAllowed { allow: &'static str },
    #[error("client sent no complete request in time")]
    ClientTimeout,
    /// A write to the client was not accepted within `client_send_timeout_ms`: it stopped
    /// reading. (Logged; the client gets nothing more.)
    #[error("client did not read the response in time")]
    ClientSendTimeout,
    /// The client closed its connection before the response ended, and the rest of the
    /// response was not read (drain bounds). (Logged; nothing reaches the client.)
    #[error("client closed the connection before the response ended")]
    ClientGone,
    /// Still in flight when the shutdown grace ended. (Logged; the client gets nothing more.)
    #[error("cut at the end of the shutdown grace")]
    ShutdownCut,
    #[error("upstream unreachable: {0}")]
    UpstreamUnreachable(String),
    #[error("upstream did not answer in time")]
    UpstreamTimeout,
    #[error("upstream sent an invalid response: {0}")]
    UpstreamProtocol(&'static str),
    #[error("upstream closed the connection before the response ended")]
    UpstreamReset,
    /// Every provider key of the upstream's pool was refused (401, 403) or rate limited
    /// (429): the provider's answer, about the operator's key, is not the client's.
    #[error("the provider refused every key Aura holds for upstream `{0}` (401, 403 or 429); the operator has been told")]
    UpstreamKeysRefused(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// A reloaded configuration with errors: refused whole, the running one stays.
    #[error("configuration refused, the running one stays: {0}")]
    ConfigRefused(String),
    /// A request that a tokens-per-minute limit could never take, however long it waited.
    #[error("request too large for the {limit} of {allowed}: it may use {requested} tokens; lower max_tokens or the prompt")]
    TooLargeForLimit {
        limit: String,
        allowed: u64,
        requested: u64,
    },
    /// An admin call that the state of things refuses (an alias taken, a config key rotated).
    #[error("{0}")]
    Conflict(String),
    /// An admin call a browser's stored credentials alone cannot make (another site could have
    /// started it).
    #[error("{0}")]
    Forbidden(String),
    /// The key may not ask for this model (its `models`).
    #[error("this key may not use model `{0}`")]
    ModelNotAllowed(String),
}

impl Error {
    pub fn fault(&self) -> Fault {
        match self {
            Error::MalformedHead(_)
            | Error::HeadTooLarge { .. }
            | Error::TooManyHeaders { .. }
            | Error::BodyTooLarge { .. }
            | Error::MalformedBody(_)
            | Error::ConfigRefused(_)
            | Error::Conflict(_)
            | Error::ModelNotAllowed(_)
            | Error::Forbidden(_)
            | Error::Unsupported(_)
            | Error::NotFound(_)
            | Error::ModelNotFound(_)
            | Error::BadPath(_)
            | Error::AmbiguousCredentials
            | Error::UnpricedRoute(_)
            | Error::MissingKey
            | Error::InvalidKey
            | Error::AdminToken
            | Error::BudgetExhausted { .. }
            | Error::RateLimited { .. }
            | Error::TooLargeForLimit { .. }
            | Error::MethodNotAllowed { .. }
            | Error::ClientTimeout
            | Error::ClientSendTimeout
            | Error::ClientGone => Fault::Client,
            Error::UpstreamUnreachable(_)
            | Error::UpstreamTimeout
            | Error::UpstreamProtocol(_)
            | Error::UpstreamReset
            | Error::UpstreamKeysRefused(_) => Fault::Upstream,
            Error::Internal(_) | Error::StoreUnavailable | Error::ShutdownCut => Fault::Internal,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::MalformedHead(_)
            | Error::MalformedBody(_)
            | Error::ConfigRefused(_)
            | Error::BadPath(_)
            | Error::AmbiguousCredentials => StatusCode::BAD_REQUEST,
            Error::UnpricedRoute(_) => StatusCode::FORBIDDEN,
            Error::HeadTooLarge { .. } | Error::TooManyHeaders { .. } => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            Error::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
            Error::NotFound(_) | Error::ModelNotFound(_) => StatusCode::NOT_FOUND,
            Error::MissingKey | Error::InvalidKey | Error::AdminToken => StatusCode::UNAUTHORIZED,
            Error::BudgetExhausted { .. } => StatusCode::PAYMENT_REQUIRED,
            Error::RateLimited { .. } | Error::TooLargeForLimit { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::ModelNotAllowed(_) | Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Error::ClientTimeout | Error::ClientSendTimeout | Error::ClientGone => {
                StatusCode::REQUEST_TIMEOUT
            }
            Error::UpstreamUnreachable(_)
            | Error::UpstreamProtocol(_)
            | Error::UpstreamReset
            | Error::UpstreamKeysRefused(_) => StatusCode::BAD_GATEWAY,
            Error::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Error::StoreUnavailable | Error::ShutdownCut => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The OpenAI error `type` clients switch on.
    pub fn openai_type(&self) -> &'static str {
        match self {
            // OpenAI's own type for a spent quota, which SDKs and clients already know.
            Error::BudgetExhausted { .. } => return "insufficient_quota",
            // OpenAI's: what ran out, `requests` or `tokens`.
            Error::RateLimited { kind, .. } => return kind,
            Error::TooLargeForLimit { .. } => return "tokens",
            _ => {}
        }
        match self.fault() {
            Fault::Client => "invalid_request_error",
            Fault::Upstream => "upstream_error",
            Fault::Internal => "server_error",
        }
    }

    /// Stable, static label: the error body's `code` and the metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Error::MalformedHead(_) => "malformed_request",
            Error::HeadTooLarge { .. } => "head_too_large",
            Error::TooManyHeaders { .. } => "too_many_headers",
            Error::BodyTooLarge { .. } => "body_too_large",
            Error::MalformedBody(_) => "invalid_body",
            Error::Unsupported(_) => "unsupported",
            Error::NotFound(_) => "not_found",
            Error::ModelNotFound(_) => "model_not_found",
            Error::BadPath(_) => "invalid_path",
            Error::AmbiguousCredentials => "ambiguous_credentials",
            Error::UnpricedRoute(_) => "route_not_priced",
            Error::MissingKey => "missing_api_key",
            Error::InvalidKey => "invalid_api_key",
            Error::AdminToken => "invalid_admin_token",
            Error::BudgetExhausted { .. } => "insufficient_quota",
            Error::RateLimited { .. } | Error::TooLargeForLimit { .. } => "rate_limit_exceeded",
            Error::MethodNotAllowed { .. } => "method_not_allowed",
            Error::ClientTimeout => "client_timeout",
            Error::ClientSendTimeout => "client_send_timeout",
            Error::ClientGone => "client_gone",
            Error::ShutdownCut => "shutdown_cut",
            Error::UpstreamUnreachable(_) => "upstream_unreachable",
            Error::UpstreamTimeout => "upstream_timeout",
            Error::UpstreamProtocol(_) => "upstream_protocol",
            Error::UpstreamReset => "upstream_reset",
            Error::UpstreamKeysRefused(_) => "upstream_keys_refused",
            Error::Internal(_) => "internal",
            Error::ConfigRefused(_) => "config_refused",
            Error::Conflict(_) => "conflict",
            Error::ModelNotAllowed(_) => "model_not_allowed",
            Error::Forbidden(_) => "forbidden",
            Error::StoreUnavailable => "budget_store_unavailable",
        }
    }

    /// `{"error":{"message","type","param","code"}}`, the shape OpenAI SDKs parse.
    pub fn body(&self) -> Vec<u8> {
        error_body(&self.to_string(), self.openai_type(), self.label())
    }
}

impl Error {
    /// A model no upstream serves, named in the error as the client sent it, cut to 200
    /// characters (the name is the client's and may be anything).
    pub fn model_not_found(model: &str) -> Error {
        let shown: String = model.chars().take(200).collect();
        Error::ModelNotFound(shown.escape_debug().to_string())
    }

    /// The Anthropic error `type` for this error's status, as Anthropic's API documents them
    /// (its SDKs raise by status; clients may switch on the type).
    pub fn anthropic_type(&self) -> &'static str {
        match self.status().as_u16() {
            401 => "authentication_error",
            402 => "billing_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 | 431 => "request_too_large",
            429 => "rate_limit_error",
            504 => "timeout_error",
            500..=599 => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// `{"type":"error","error":{"type","message"}}`, the shape of Anthropic's Messages API,
    /// for errors on its routes.
    pub fn anthropic_body(&self) -> Vec<u8> {
        let body = serde_json::json!({
            "type": "error",
            "error": { "type": self.anthropic_type(), "message": self.to_string() }
        });
        body.to_string().into_bytes()
    }
}

/// An OpenAI-style error body from parts (also used for errors Aura relays but did not raise).
pub fn error_body(message: &str, kind: &str, code: &str) -> Vec<u8> {
    let body = serde_json::json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    });
    body.to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_anthropic_routes_errors_take_anthropics_shape_at_the_same_status() {
        let cases: &[(Error, u16, &str)] = &[
            (
                Error::MalformedBody("x".into()),
                400,
                "invalid_request_error",
            ),
            (Error::InvalidKey, 401, "authentication_error"),
            (
                Error::BudgetExhausted {
                    budget: "key budget".into(),
                    remaining_nano: 1,
                    estimate_nano: 2,
                },
                402,
                "billing_error",
            ),
            (
                Error::RateLimited {
                    limit: "key \"a\" requests per minute".into(),
                    kind: "requests",
                    allowed: 60,
                    retry_after_secs: 7,
                },
                429,
                "rate_limit_error",
            ),
            (Error::UnpricedRoute("x".into()), 403, "permission_error"),
            (Error::NotFound("x".into()), 404, "not_found_error"),
            (
                Error::BodyTooLarge { limit_bytes: 1 },
                413,
                "request_too_large",
            ),
            (Error::UpstreamReset, 502, "api_error"),
            (Error::UpstreamTimeout, 504, "timeout_error"),
            (Error::StoreUnavailable, 503, "api_error"),
        ];
        for (error, status, kind) in cases {
            assert_eq!(error.status().as_u16(), *status, "{error}");
            let body: serde_json::Value = serde_json::from_slice(&error.anthropic_body()).unwrap();
            assert_eq!(body["type"], "error", "{body}");
            assert_eq!(body["error"]["type"], *kind, "{error}");
            assert_eq!(body["error"]["message"], error.to_string());
        }
    }

    #[test]
    fn statuses_match_the_issue_contract() {
        let cases: &[(Error, u16, &str)] = &[
            (Error::MalformedHead("x"), 400, "invalid_request_error"),
            (
                Error::MalformedBody("x".into()),
                400,
                "invalid_request_error",
            ),
            (
                Error::BodyTooLarge { limit_bytes: 1 },
                413,
                "invalid_request_error",
            ),
            (
                Error::HeadTooLarge { limit_bytes: 1 },
                431,
                "invalid_request_error",
            ),
            (
                Error::UpstreamUnreachable("refused".into()),
                502,
                "upstream_error",
            ),
            (Error::UpstreamTimeout, 504, "upstream_error"),
            (Error::MissingKey, 401, "invalid_request_error"),
            (
                Error::BudgetExhausted {
                    budget: "key budget".into(),
                    remaining_nano: 1,
                    estimate_nano: 2,
                },
                402,
                "insufficient_quota",
            ),
            (
                Error::RateLimited {
                    limit: "key \"a\" requests per minute".into(),
                    kind: "requests",
                    allowed: 60,
                    retry_after_secs: 7,
                },
                429,
                "requests",
            ),
            (Error::Internal("x".into()), 500, "server_error"),
        ];
        for (error, status, kind) in cases {
            assert_eq!(error.status().as_u16(), *status, "{error}");
            assert_eq!(error.openai_type(), *kind, "{error}");
        }
    }

    #[test]
    fn body_is_openai_shaped_json() {
        let body = Error::BodyTooLarge { limit_bytes: 10 }.body();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "body_too_large");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["message"], "request body exceeds 10 bytes");
        assert!(v["error"]["param"].is_null());
    }
}
