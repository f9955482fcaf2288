//! What a request costs: which routes are billed, the upper estimate reserved at admission, and
//! the cost settled at the end. The usage the upstream reported, priced by the response's model,
//! when there is one; when a successful answer carried no usage (an upstream that ignores
//! `stream_options`, a stream cut short), an estimate from the bytes sent and received, never
//! more than was reserved; the whole reservation when the client left and the response could
//! not be read to its end; nothing for a failed request.

use http::Method;
use serde::Deserialize;

use crate::budget::Reservation;
use crate::pricing::Price;
use crate::usage::Usage;

/// Bytes per token for estimates: English text runs about 4 bytes a token.
const BYTES_PER_TOKEN: u64 = 4;

/// How a billable request is bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Billable {
    /// Answers with completion tokens: chat completions, completions, responses.
    Generates,
    /// Prompt tokens only: embeddings.
    Embeds,
}

/// The pass-through routes that report usage, and so are billed like chat completions.
pub fn billable_passthrough(method: &Method, path: &str) -> Option<Billable> {
    if method != Method::POST {
        return None;
    }
    match path.strip_prefix("/v1")? {
        "/completions" | "/responses" => Some(Billable::Generates),
        "/embeddings" => Some(Billable::Embeds),
        _ => None,
    }
}

/// The fields of a pass-through request body that bound its cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounds {
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    /// `n` (choices) of completions: each up to `max_tokens`.
    pub choices: u64,
}

impl Default for Bounds {
    fn default() -> Bounds {
        Bounds {
            model: None,
            max_tokens: None,
            choices: 1,
        }
    }
}

/// `model` and `max_tokens` / `max_completion_tokens` / `max_output_tokens` (Responses API) of
/// a JSON body; absent or unreadable fields are None (the request is then bounded by the
/// model's limits), so a body Aura cannot read is still billed.
pub fn bounds_of(body: &[u8]) -> Bounds {
    #[derive(Deserialize)]
    struct Fields {
        model: Option<serde_json::Value>,
        max_tokens: Option<serde_json::Value>,
        max_completion_tokens: Option<serde_json::Value>,
        max_output_tokens: Option<serde_json::Value>,
        n: Option<serde_json::Value>,
    }
    let Ok(fields) = serde_json::from_slice::<Fields>(body) else {
        return Bounds::default();
    };
    Bounds {
        model: fields.model.and_then(|m| m.as_str().map(str::to_owned)),
        max_tokens: [
            fields.max_completion_tokens,
            fields.max_tokens,
            fields.max_output_tokens,
        ]
        .into_iter()
        .flatten()
        .find_map(|v| v.as_u64()),
        choices: fields
            .n
            .and_then(|n| n.as_u64())
            .filter(|n| *n > 0)
            .unwrap_or(1),
    }
}

/// The most a request can cost: every body byte a prompt token (a token is at least a byte),
/// and each of its `choices` bounded by the request, else the model's output limit, else `cap`.
pub fn upper_estimate(
    price: &Price,
    kind: Billable,
    body_bytes: usize,
    max_tokens: Option<u64>,
    choices: u64,
    cap: u64,
) -> u64 {
    let completion = match kind {
        Billable::Embeds => 0,
        Billable::Generates => max_tokens
            .or(price.max_output_tokens)
            .unwrap_or(cap)
            .saturating_mul(choices.max(1)),
    };
    price.upper_bound_nano(body_bytes as u64, completion)
}

/// A reservation, and what settle needs to price the request.
#[derive(Debug)]
pub struct Bill {
    pub reservation: Reservation,
    pub request_bytes: u64,
}

/// How the settled cost was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// The usage the upstream reported.
    Reported,
    /// No usage in a successful answer: estimated from bytes.
    Estimated,
    /// The request failed: nothing to bill.
    Failed,
}

/// The settled cost of a request at `price` (its model's), in nano-dollars, and how it was found.
pub fn settle_cost(
    price: &Price,
    bill: &Bill,
    usage: Option<&Usage>,
    succeeded: bool,
    response_bytes: u64,
    abandoned: bool,
) -> (u64, Basis) {
    match usage {
        Some(u) => (price.cost_nano(u), Basis::Reported),
        // The client left and the rest was not read: the upstream still generates it all, so
        // the whole upper estimate is billed.
        None if abandoned => (bill.reservation.amount_nano(), Basis::Estimated),
        None if succeeded => {
            let estimate = Usage {
                prompt_tokens: bill.request_bytes.div_ceil(BYTES_PER_TOKEN),
                completion_tokens: response_bytes.div_ceil(BYTES_PER_TOKEN),
                cached_prompt_tokens: 0,
            };
            let cost = price
                .cost_nano(&estimate)
                .min(bill.reservation.amount_nano());
            (cost, Basis::Estimated)
        }
        None => (0, Basis::Failed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_usage_reporting_posts_are_billable_pass_throughs() {
        let post = Method::POST;
        assert_eq!(
            billable_passthrough(&post, "/v1/embeddings"),
            Some(Billable::Embeds)
        );
        assert_eq!(
            billable_passthrough(&post, "/v1/completions"),
            Some(Billable::Generates)
        );
        assert_eq!(
            billable_passthrough(&post, "/v1/responses"),
            Some(Billable::Generates)
        );
        assert_eq!(billable_passthrough(&Method::GET, "/v1/models"), None);
        assert_eq!(billable_passthrough(&post, "/v1/files"), None);
    }

    #[test]
    fn bounds_are_read_from_any_json_body() {
        assert_eq!(
            bounds_of(br#"{"model":"gpt-4o","input":["a","b"],"max_output_tokens":50}"#),
            Bounds {
                model: Some("gpt-4o".into()),
                max_tokens: Some(50),
                choices: 1,
            }
        );
        assert_eq!(
            bounds_of(br#"{"model":"m","max_tokens":null,"max_completion_tokens":7}"#).max_tokens,
            Some(7)
        );
        assert_eq!(bounds_of(br#"{"prompt":"x","n":4}"#).choices, 4);
        assert_eq!(bounds_of(b"not json"), Bounds::default());
        assert_eq!(bounds_of(br#"{"model":5}"#), Bounds::default());
    }

    #[test]
    fn estimates_bound_the_completion_by_request_then_model_then_cap() {
        let mut price = Price::per_million(1.0, 2.0, 1.0);
        // 1000 bytes × 1e6 pico + 10 × 2e6 pico.
        assert_eq!(
            upper_estimate(&price, Billable::Generates, 1000, Some(10), 1, 4096),
            1_020_000
        );
        // Three choices of up to 10 tokens each.
        assert_eq!(
            upper_estimate(&price, Billable::Generates, 1000, Some(10), 3, 4096),
            1_060_000
        );
        assert_eq!(
            upper_estimate(&price, Billable::Generates, 0, None, 1, 4096),
            8_192_000
        );
        price.max_output_tokens = Some(100);
        assert_eq!(
            upper_estimate(&price, Billable::Generates, 0, None, 1, 4096),
            200_000
        );
        assert_eq!(
            upper_estimate(&price, Billable::Embeds, 1000, Some(10), 1, 4096),
            1_000_000
        );
    }
}
