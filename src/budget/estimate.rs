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
/// With it, what a tokens-per-minute limit reserves (`rate_tokens`).
pub fn upper_estimate(
    price: &Price,
    kind: Billable,
    body_bytes: usize,
    max_tokens: Option<u64>,
    choices: u64,
    cap: u64,
) -> Upper {
    let completion = match kind {
        Billable::Embeds => 0,
        Billable::Generates => max_tokens
            .or(price.max_output_tokens)
            .unwrap_or(cap)
            .saturating_mul(choices.max(1)),
    };
    let asked = match kind {
        Billable::Embeds => 0,
        Billable::Generates => max_tokens.unwrap_or(0).saturating_mul(choices.max(1)),
    };
    Upper {
        nano: price.upper_bound_nano(body_bytes as u64, completion),
        tokens: rate_tokens(body_bytes, asked),
    }
}

/// What a request reserves in a tokens-per-minute limit, as OpenAI counts it: its prompt at
/// `BYTES_PER_TOKEN` bytes a token, and the completion tokens it asks for (`max_tokens` × n;
/// none asked, none reserved). The reservation settles to the real count; it is an estimate,
/// not a bound (a dollar budget reserves the bound: `upper_estimate`'s `nano`).
pub fn rate_tokens(body_bytes: usize, completion: u64) -> u64 {
    (body_bytes as u64)
        .div_ceil(BYTES_PER_TOKEN)
        .saturating_add(completion)
}

/// A request's reservations: its cost's upper bound, and its tokens for a tokens-per-minute
/// limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upper {
    pub nano: u64,
    pub tokens: u64,
}

/// What a Messages request whose input Anthropic expands (a fetched document, a server tool's
/// results) may cost: its model's context window of `window` tokens in (every body byte a
/// token, when more), `max_tokens` out (else the model's output limit, else `cap`).
pub fn context_window_estimate(
    price: &Price,
    window: u64,
    body_bytes: usize,
    max_tokens: Option<u64>,
    cap: u64,
) -> u64 {
    let completion = max_tokens.or(price.max_output_tokens).unwrap_or(cap);
    price.upper_bound_nano(window.max(body_bytes as u64), completion)
}

/// What `searches` web searches cost at the model's price per search (Anthropic's where it
/// has none).
pub fn web_searches_cost(price: &Price, searches: u64) -> u64 {
    let each = price
        .units
        .per_web_search_nano
        .unwrap_or(crate::pricing::WEB_SEARCH_NANO);
    searches.saturating_mul(each)
}

/// The most output tokens one generated image can take (gpt-image-1 at high quality and its
/// largest size: 6,240, plus partial images).
pub const IMAGE_OUTPUT_TOKENS: u64 = 6_600;

/// Audio is never thinner than this (8 kbit/s): an upload's seconds are at most its bytes over
/// it.
pub const AUDIO_BYTES_PER_SECOND_MIN: u64 = 1_000;

/// The most `n` images can cost: per image where the model has a per-image price, and in
/// tokens (every body byte an input token, each image its most output tokens), whichever is more.
pub fn images_estimate(price: &Price, body_bytes: usize, n: u64) -> u64 {
    let n = n.max(1);
    let per_image = price
        .units
        .per_image_nano
        .map_or(0, |each| each.saturating_mul(n));
    let tokens = price.upper_bound_nano(body_bytes as u64, IMAGE_OUTPUT_TOKENS.saturating_mul(n));
    per_image.max(tokens)
}

/// What `characters` of text to speech cost, exactly (none: the model has no such price).
pub fn speech_cost(price: &Price, characters: u64) -> Option<u64> {
    let each = price.units.per_character_pico?;
    Some(Price::units_nano(characters, each))
}

/// The most a transcription of an upload of `body_bytes` can cost: by the second (at most the
/// bytes over the thinnest audio) where the model has a per-second price, and in tokens (every
/// byte an input token, the model's output limit or `cap` out), whichever is more.
pub fn transcription_estimate(price: &Price, body_bytes: usize, cap: u64) -> u64 {
    let seconds = (body_bytes as u64).div_ceil(AUDIO_BYTES_PER_SECOND_MIN);
    let by_time = price
        .units
        .per_second_pico
        .map_or(0, |each| Price::units_nano(seconds, each));
    let output = price.max_output_tokens.unwrap_or(cap);
    by_time.max(price.upper_bound_nano(body_bytes as u64, output))
}

/// How the settled cost was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// The usage the upstream reported.
    Reported,
    /// Known before the answer (text to speech: its characters).
    Fixed,
    /// No usage in a successful answer: estimated from bytes.
    Estimated,
    /// The usage reported is beyond any the model could have: billed the reservation.
    Implausible,
    /// The request failed: nothing to bill.
    Failed,
}

/// Whether `usage` is one the model could have produced: no more prompt tokens than its
/// context window, no more completion tokens than its output limit for each of `choices`, and
/// neither beyond `ceiling` (the configured most for any model); cached within the prompt.
pub fn plausible(usage: &Usage, price: &Price, choices: u64, ceiling: u64) -> bool {
    let prompt_max = price.max_input_tokens.map_or(ceiling, |m| m.min(ceiling));
    let completion_max = price
        .max_output_tokens
        .map_or(ceiling, |m| m.saturating_mul(choices.max(1)).min(ceiling));
    usage.prompt_tokens <= prompt_max
        && usage.completion_tokens <= completion_max
        && usage.cached_prompt_tokens <= usage.prompt_tokens
        && usage.media_prompt_tokens <= usage.prompt_tokens
        && usage.seconds <= ceiling
        && usage.web_search_requests <= MAX_WEB_SEARCHES
}

/// The most web searches one answer may report before its usage is not believed.
pub const MAX_WEB_SEARCHES: u64 = 1_000;

/// What a request reserved, and what bounds the usage it may report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserved {
    pub nano: u64,
    pub request_bytes: u64,
    /// `n` of the request: each choice may reach the output limit.
    pub choices: u64,
    /// The most tokens any usage may report (`max_usage_tokens`).
    pub ceiling: u64,
    /// What a successful answer costs whatever it says (text to speech).
    pub fixed: Option<u64>,
}

/// What came back for a request.
#[derive(Debug, Clone, Copy)]
pub struct Answer<'u> {
    pub usage: Option<&'u Usage>,
    pub succeeded: bool,
    /// De-framed body bytes received.
    pub response_bytes: u64,
    /// The client left and the response was not read to its end.
    pub abandoned: bool,
}

/// The settled cost of a request at `price` (its model's), in nano-dollars, and how it was found.
pub fn settle_cost(price: &Price, reserved: &Reserved, answer: &Answer) -> (u64, Basis) {
    match answer.usage {
        Some(u) if plausible(u, price, reserved.choices, reserved.ceiling) => {
            match price.cost_nano(u) {
                Some(cost) => (cost, Basis::Reported),
                // Seconds of audio and no per-second price: the reservation bounds it.
                None => (reserved.nano, Basis::Estimated),
            }
        }
        // An upstream that reports more than the model can do (a bug, or a lie): the
        // reservation, not a cost that would spend the key for ever.
        Some(_) => (reserved.nano, Basis::Implausible),
        None if answer.succeeded && reserved.fixed.is_some() => {
            (reserved.fixed.unwrap_or(reserved.nano), Basis::Fixed)
        }
        // The client left and the rest was not read: the upstream still generates it all, so
        // the whole upper estimate is billed.
        None if answer.abandoned => (reserved.nano, Basis::Estimated),
        None if answer.succeeded => {
            let estimate = Usage {
                prompt_tokens: reserved.request_bytes.div_ceil(BYTES_PER_TOKEN),
                completion_tokens: answer.response_bytes.div_ceil(BYTES_PER_TOKEN),
                ..Usage::default()
            };
            let cost = price
                .cost_nano(&estimate)
                .map_or(reserved.nano, |c| c.min(reserved.nano));
            (cost, Basis::Estimated)
        }
        None => (0, Basis::Failed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_beyond_what_the_model_can_do_is_billed_the_reservation() {
        let mut price = Price::per_million(1.0, 2.0, 1.0);
        price.max_input_tokens = Some(128_000);
        price.max_output_tokens = Some(16_384);
        let usage = |prompt, completion| Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            ..Usage::default()
        };
        let settle = |u: Usage, choices| {
            let reserved = Reserved {
                nano: 5_000,
                request_bytes: 100,
                choices,
                ceiling: 10_000_000,
                fixed: None,
            };
            let answer = Answer {
                usage: Some(&u),
                succeeded: true,
                response_bytes: 0,
                abandoned: false,
            };
            settle_cost(&price, &reserved, &answer)
        };
        assert_eq!(settle(usage(1_000, 100), 1), (1_200_000, Basis::Reported));
        assert_eq!(
            settle(usage(u64::MAX, u64::MAX), 1),
            (5_000, Basis::Implausible)
        );
        assert_eq!(settle(usage(128_001, 1), 1), (5_000, Basis::Implausible));
        assert_eq!(settle(usage(1, 16_385), 1), (5_000, Basis::Implausible));
        // Two choices may each reach the output limit.
        assert_eq!(settle(usage(1, 32_768), 2).1, Basis::Reported);
        // A model with no known limits: the configured ceiling.
        let unknown = Price::per_million(1.0, 2.0, 1.0);
        assert!(plausible(
            &usage(9_000_000, 9_000_000),
            &unknown,
            1,
            10_000_000
        ));
        assert!(!plausible(&usage(10_000_001, 0), &unknown, 1, 10_000_000));
    }

    #[test]
    fn estimates_bound_the_completion_by_request_then_model_then_cap() {
        let mut price = Price::per_million(1.0, 2.0, 1.0);
        // 1000 bytes × 1e6 pico + 10 × 2e6 pico.
        assert_eq!(
            upper_estimate(&price, Billable::Generates, 1000, Some(10), 1, 4096).nano,
            1_020_000
        );
        // Three choices of up to 10 tokens each.
        assert_eq!(
            upper_estimate(&price, Billable::Generates, 1000, Some(10), 3, 4096).nano,
            1_060_000
        );
        assert_eq!(
            upper_estimate(&price, Billable::Generates, 0, None, 1, 4096).nano,
            8_192_000
        );
        price.max_output_tokens = Some(100);
        assert_eq!(
            upper_estimate(&price, Billable::Generates, 0, None, 1, 4096).nano,
            200_000
        );
        assert_eq!(
            upper_estimate(&price, Billable::Embeds, 1000, Some(10), 1, 4096).nano,
            1_000_000
        );
    }
}
