//! What a request may cost and what it did cost, in nano-dollars: the upper estimate a request
//! reserves at admission, and the cost it settles to at the end. The usage the upstream
//! reported, priced by the response's model, when there is one; when a successful answer
//! carried no usage (an upstream that ignores `stream_options`, a stream cut short), an estimate
//! from the bytes sent and received, never more than was reserved; the whole reservation when
//! the client left and the response could not be read to its end; nothing for a failed request.
//! Pure: no IO, no clocks.

use crate::pricing::Price;
pub use crate::route::Billable;
use crate::usage::Usage;

/// Bytes per token for estimates: English text runs about 4 bytes a token.
const BYTES_PER_TOKEN: u64 = 4;

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
    reserved_nano: u64,
    request_bytes: u64,
    usage: Option<&Usage>,
    succeeded: bool,
    response_bytes: u64,
    abandoned: bool,
) -> (u64, Basis) {
    match usage {
        Some(u) => (price.cost_nano(u), Basis::Reported),
        // The client left and the rest was not read: the upstream still generates it all, so
        // the whole upper estimate is billed.
        None if abandoned => (reserved_nano, Basis::Estimated),
        None if succeeded => {
            let estimate = Usage {
                prompt_tokens: request_bytes.div_ceil(BYTES_PER_TOKEN),
                completion_tokens: response_bytes.div_ceil(BYTES_PER_TOKEN),
                cached_prompt_tokens: 0,
            };
            let cost = price.cost_nano(&estimate).min(reserved_nano);
            (cost, Basis::Estimated)
        }
        None => (0, Basis::Failed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
