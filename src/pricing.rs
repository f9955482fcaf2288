//! Prices per model and the cost of a usage. Prices are integer pico-dollars (1e-12 USD) per
//! token, because real per-token prices go below a nano-dollar (LiteLLM lists $2e-08 a token);
//! costs are integer nano-dollars (1e-9 USD), rounded up, so a usage of a priced model never
//! costs 0. Dollars appear only at the edges (config, the LiteLLM file, `/v1/usage`).
//! A model is matched by exact name, then by its base name without a date suffix
//! (`gpt-4o-2024-08-06` → `gpt-4o`) or provider prefix (`groq/…`); anything else gets the
//! configured default price, never a free ride. Pure L0: no IO, clocks, globals or logging.

use std::collections::HashMap;
use std::sync::Arc;

use crate::usage::Usage;

pub const NANO_PER_DOLLAR: u64 = 1_000_000_000;
const PICO_PER_NANO: u128 = 1_000;

/// What one model costs per token, in pico-dollars, and its longest answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub input_pico: u64,
    pub output_pico: u64,
    /// Prompt tokens served from the provider's cache (OpenAI bills them at a discount).
    pub cached_input_pico: u64,
    /// Prompt tokens written to the provider's cache (Anthropic bills them above the input
    /// price: 1.25× for a 5-minute cache); the input price where none is given.
    pub cache_write_input_pico: u64,
    /// Prompt tokens written to the cache for an hour (Anthropic: 2× the input price); the
    /// cache-write price where none is given.
    pub cache_write_1h_input_pico: u64,
    /// The model's output limit, the upper bound of a request without `max_tokens`.
    pub max_output_tokens: Option<u64>,
    /// The model's context window: a usage reporting more prompt tokens is not believed.
    pub max_input_tokens: Option<u64>,
    /// Prices of what is not text tokens (images, audio, characters, seconds).
    pub units: Units,
    /// Dearer token prices for a request whose prompt passes a threshold.
    pub long_context: Option<LongContext>,
}

/// A model's prices for a request whose prompt is longer than `above_tokens` (LiteLLM's
/// `*_above_200k_tokens`: Claude Sonnet 4's long context, Gemini Pro): every token of such a
/// request is billed at them, not only those past the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongContext {
    pub above_tokens: u64,
    pub input_pico: u64,
    pub output_pico: u64,
    pub cached_input_pico: u64,
    pub cache_write_input_pico: u64,
    /// An hour's cache write past the threshold (Anthropic: 2× the long-context input price).
    pub cache_write_1h_input_pico: u64,
}

impl LongContext {
    fn max(self, other: LongContext) -> LongContext {
        LongContext {
            above_tokens: self.above_tokens.min(other.above_tokens),
            input_pico: self.input_pico.max(other.input_pico),
            output_pico: self.output_pico.max(other.output_pico),
            cached_input_pico: self.cached_input_pico.max(other.cached_input_pico),
            cache_write_input_pico: self
                .cache_write_input_pico
                .max(other.cache_write_input_pico),
            cache_write_1h_input_pico: self
                .cache_write_1h_input_pico
                .max(other.cache_write_1h_input_pico),
        }
    }
}

/// What a model charges beyond text tokens; none set for a text model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Units {
    /// An image or audio input token (the part of the prompt a usage reports as
    /// `image_tokens` / `audio_tokens`); none: the text input price.
    pub media_input_pico: Option<u64>,
    /// One image generated, for models whose answers carry no usage.
    pub per_image_nano: Option<u64>,
    /// One character of text to speech.
    pub per_character_pico: Option<u64>,
    /// One second of audio (transcriptions whose usage is a duration).
    pub per_second_pico: Option<u64>,
    /// One web search a server tool ran (Anthropic's `web_search`: $10 per 1,000).
    pub per_web_search_nano: Option<u64>,
}

impl Units {
    fn max(self, other: Units) -> Units {
        Units {
            media_input_pico: self.media_input_pico.max(other.media_input_pico),
            per_image_nano: self.per_image_nano.max(other.per_image_nano),
            per_character_pico: self.per_character_pico.max(other.per_character_pico),
            per_second_pico: self.per_second_pico.max(other.per_second_pico),
            per_web_search_nano: self.per_web_search_nano.max(other.per_web_search_nano),
        }
    }
}

impl Price {
    /// From dollars per million tokens, as providers publish them.
    pub fn per_million(input: f64, output: f64, cached_input: f64) -> Price {
        Price {
            input_pico: dollars_per_million_to_pico(input),
            output_pico: dollars_per_million_to_pico(output),
            cached_input_pico: dollars_per_million_to_pico(cached_input),
            cache_write_input_pico: dollars_per_million_to_pico(input),
            cache_write_1h_input_pico: dollars_per_million_to_pico(input),
            max_output_tokens: None,
            max_input_tokens: None,
            units: Units::default(),
            long_context: None,
        }
    }

    fn with_limits(mut self, max_input: u64, max_output: u64) -> Price {
        self.max_input_tokens = (max_input > 0).then_some(max_input);
        self.max_output_tokens = (max_output > 0).then_some(max_output);
        self
    }

    /// Each field the larger of the two: what a request reserves when it may be answered at
    /// either price.
    pub fn max(self, other: Price) -> Price {
        Price {
            input_pico: self.input_pico.max(other.input_pico),
            output_pico: self.output_pico.max(other.output_pico),
            cached_input_pico: self.cached_input_pico.max(other.cached_input_pico),
            cache_write_input_pico: self
                .cache_write_input_pico
                .max(other.cache_write_input_pico),
            cache_write_1h_input_pico: self
                .cache_write_1h_input_pico
                .max(other.cache_write_1h_input_pico),
            max_output_tokens: self.max_output_tokens.max(other.max_output_tokens),
            max_input_tokens: self.max_input_tokens.max(other.max_input_tokens),
            units: self.units.max(other.units),
            long_context: match (self.long_context, other.long_context) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            },
        }
    }

    /// The prices a request with a prompt of `prompt_tokens` is billed at: the long-context
    /// ones past their threshold (each at least the base price), else these.
    fn at_prompt(&self, prompt_tokens: u64) -> Price {
        let Some(long) = self.long_context.filter(|l| prompt_tokens > l.above_tokens) else {
            return *self;
        };
        Price {
            input_pico: long.input_pico.max(self.input_pico),
            output_pico: long.output_pico.max(self.output_pico),
            cached_input_pico: long.cached_input_pico.max(self.cached_input_pico),
            cache_write_input_pico: long.cache_write_input_pico.max(self.cache_write_input_pico),
            cache_write_1h_input_pico: long
                .cache_write_1h_input_pico
                .max(self.cache_write_1h_input_pico),
            long_context: None,
            ..*self
        }
    }

    /// The price of an image or audio input token.
    fn media_input_pico(&self) -> u64 {
        self.units.media_input_pico.unwrap_or(self.input_pico)
    }

    /// The cost of `usage`, in nano-dollars, rounded up; none when it counts something this
    /// price has no price for (seconds of audio without a per-second price).
    pub fn cost_nano(&self, usage: &Usage) -> Option<u64> {
        let price = self.at_prompt(usage.prompt_tokens);
        price.cost_at(usage)
    }

    fn cost_at(&self, usage: &Usage) -> Option<u64> {
        let seconds = match (usage.seconds, self.units.per_second_pico) {
            (0, _) => 0,
            (s, Some(per_second)) => u128::from(s) * u128::from(per_second),
            (_, None) => return None,
        };
        let cached = usage.cached_prompt_tokens.min(usage.prompt_tokens);
        let written = usage
            .cache_write_prompt_tokens
            .min(usage.prompt_tokens - cached);
        let written_1h = usage.cache_write_1h_prompt_tokens.min(written);
        let media = usage
            .media_prompt_tokens
            .min(usage.prompt_tokens - cached - written);
        let text = usage.prompt_tokens - cached - written - media;
        let searches = u128::from(usage.web_search_requests)
            * u128::from(self.units.per_web_search_nano.unwrap_or(0))
            * 1_000;
        let pico = searches
            + u128::from(text) * u128::from(self.input_pico)
            + u128::from(media) * u128::from(self.media_input_pico())
            + u128::from(cached) * u128::from(self.cached_input_pico)
            + u128::from(written - written_1h) * u128::from(self.cache_write_input_pico)
            + u128::from(written_1h) * u128::from(self.cache_write_1h_input_pico)
            + u128::from(usage.completion_tokens) * u128::from(self.output_pico)
            + seconds;
        Some(pico_to_nano_up(pico))
    }

    /// The most `prompt_tokens` in and `completion_tokens` out can cost: prompt tokens at the
    /// dearest of every input price (text, media, cache write, and cache read, which a price
    /// file may set above the input price).
    pub fn upper_bound_nano(&self, prompt_tokens: u64, completion_tokens: u64) -> u64 {
        let price = self.at_prompt(prompt_tokens);
        let input = price
            .input_pico
            .max(price.media_input_pico())
            .max(price.cache_write_input_pico)
            .max(price.cache_write_1h_input_pico)
            .max(price.cached_input_pico);
        let pico = u128::from(prompt_tokens) * u128::from(input)
            + u128::from(completion_tokens) * u128::from(price.output_pico);
        pico_to_nano_up(pico)
    }

    /// `count` of something priced in pico-dollars each, in nano-dollars rounded up.
    pub fn units_nano(count: u64, pico_each: u64) -> u64 {
        pico_to_nano_up(u128::from(count) * u128::from(pico_each))
    }
}

fn pico_to_nano_up(pico: u128) -> u64 {
    u64::try_from(pico.div_ceil(PICO_PER_NANO)).unwrap_or(u64::MAX)
}

pub fn dollars_to_pico(dollars: f64) -> u64 {
    // `as` saturates: NaN → 0, negative → 0 (rejected by callers before), huge → u64::MAX.
    (dollars * 1e12).round() as u64
}

fn dollars_per_million_to_pico(dollars: f64) -> u64 {
    dollars_to_pico(dollars / 1e6)
}

/// Dollars (from config or an API) to nano-dollars, rounded to the nearest nano-dollar.
pub fn dollars_to_nano(dollars: f64) -> u64 {
    (dollars * 1e9).round() as u64
}

/// The largest limit a key may have: $4,000,000. Every total a store keeps (spend, leases, their
/// sums) then stays below 2^53 nano-dollars, where the Valkey store's Lua numbers (doubles) are
/// still exact integers; config and the admin API refuse anything larger.
pub const MAX_LIMIT_NANO: u64 = 4_000_000 * NANO_PER_DOLLAR;

/// A limit in dollars that Aura cannot hold exactly.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("a limit must be between $0 and ${max} (got {got})", max = MAX_LIMIT_NANO / NANO_PER_DOLLAR)]
pub struct LimitOutOfRange {
    pub got: f64,
}

/// A limit in dollars, as nano-dollars, refused when it is not a number between 0 and
/// [`MAX_LIMIT_NANO`].
pub fn limit_nano(dollars: f64) -> Result<u64, LimitOutOfRange> {
    if dollars.is_finite() && dollars >= 0.0 && dollars_to_nano(dollars) <= MAX_LIMIT_NANO {
        Ok(dollars_to_nano(dollars))
    } else {
        Err(LimitOutOfRange { got: dollars })
    }
}

/// Nano-dollars to dollars, for answers.
pub fn nano_to_dollars(nano: u64) -> f64 {
    nano as f64 / 1e9
}

/// How a model name found its price.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    Exact,
    /// Without its date suffix or provider prefix.
    Base,
    /// Not in the table: the default price.
    Default,
}

#[derive(Debug, thiserror::Error)]
pub enum PriceFileError {
    #[error("price file is not JSON: {0}")]
    NotJson(String),
    #[error("price file is not a JSON object of models")]
    NotAnObject,
    #[error("model `{0}`: cost is not a non-negative number")]
    BadCost(String),
}

#[derive(Debug, Clone)]
pub struct PriceTable {
    /// `Arc` names: a metric label is a clone of the table's name, not a new string.
    by_name: HashMap<Arc<str>, Price>,
    default: Price,
    /// Per name, the most any of its dated variants costs (made by [`PriceTable::seal`]).
    ceilings: HashMap<Arc<str>, Price>,
}

/// Aura's own table: common OpenAI, Groq and open models, in dollars per million tokens
/// (input, output, cached input), context window and output limit, from the providers' pages
/// (2026).
const BUILTIN: &[(&str, f64, f64, f64, u64, u64)] = &[
    ("gpt-4o", 2.50, 10.00, 1.25, 128_000, 16_384),
    ("gpt-4o-mini", 0.15, 0.60, 0.075, 128_000, 16_384),
    ("gpt-4.1", 2.00, 8.00, 0.50, 1_047_576, 32_768),
    ("gpt-4.1-mini", 0.40, 1.60, 0.10, 1_047_576, 32_768),
    ("gpt-4.1-nano", 0.10, 0.40, 0.025, 1_047_576, 32_768),
    ("o3-mini", 1.10, 4.40, 0.55, 200_000, 100_000),
    ("gpt-3.5-turbo", 0.50, 1.50, 0.50, 16_385, 4_096),
    ("text-embedding-3-small", 0.02, 0.0, 0.02, 8_191, 0),
    ("text-embedding-3-large", 0.13, 0.0, 0.13, 8_191, 0),
    ("llama-3.1-8b-instant", 0.05, 0.08, 0.05, 131_072, 131_072),
    ("llama-3.3-70b-versatile", 0.59, 0.79, 0.59, 131_072, 32_768),
    (
        "meta-llama/Llama-3.1-8B-Instruct",
        0.05,
        0.08,
        0.05,
        131_072,
        131_072,
    ),
    ("mixtral-8x7b-32768", 0.24, 0.24, 0.24, 32_768, 32_768),
];

/// Aura's own prices of image and audio models (2026), in dollars: per million text input,
/// image or audio input and output tokens, per image, per million characters, per minute of
/// audio (0: none).
const BUILTIN_MEDIA: &[(&str, f64, f64, f64, f64, f64, f64)] = &[
    ("gpt-image-1", 5.00, 10.00, 40.00, 0.0, 0.0, 0.0),
    ("gpt-image-1-mini", 2.00, 2.50, 8.00, 0.0, 0.0, 0.0),
    ("gpt-image-1.5", 5.00, 8.00, 32.00, 0.0, 0.0, 0.0),
    ("tts-1", 0.0, 0.0, 0.0, 0.0, 15.00, 0.0),
    ("tts-1-hd", 0.0, 0.0, 0.0, 0.0, 30.00, 0.0),
    ("whisper-1", 0.0, 0.0, 0.0, 0.0, 0.0, 0.006),
    ("gpt-4o-transcribe", 2.50, 6.00, 10.00, 0.0, 0.0, 0.006),
    ("gpt-4o-mini-transcribe", 1.25, 3.00, 5.00, 0.0, 0.0, 0.003),
];

/// Anthropic's models, in dollars per million tokens (input, output, 5-minute cache write,
/// cache read), context window and output limit, from Anthropic's pricing page (2026). An
/// hour's cache write is 2× the input price for every model. Sonnet 4 and 4.5 take up to a
/// million tokens of context: past 200k a request's every token is billed at the long-context
/// prices (input, cache reads and writes 2×, output 1.5×). Names not listed fall to their
/// family's dearest price (`claude_family`).
const BUILTIN_ANTHROPIC: &[(&str, f64, f64, f64, f64, u64, u64)] = &[
    ("claude-opus-4-5", 5.00, 25.00, 6.25, 0.50, 200_000, 64_000),
    (
        "claude-opus-4-1",
        15.00,
        75.00,
        18.75,
        1.50,
        200_000,
        32_000,
    ),
    ("claude-opus-4", 15.00, 75.00, 18.75, 1.50, 200_000, 32_000),
    (
        "claude-opus-4-0",
        15.00,
        75.00,
        18.75,
        1.50,
        200_000,
        32_000,
    ),
    ("claude-3-opus", 15.00, 75.00, 18.75, 1.50, 200_000, 4_096),
    (
        "claude-sonnet-4-5",
        3.00,
        15.00,
        3.75,
        0.30,
        1_000_000,
        64_000,
    ),
    (
        "claude-sonnet-4",
        3.00,
        15.00,
        3.75,
        0.30,
        1_000_000,
        64_000,
    ),
    (
        "claude-sonnet-4-0",
        3.00,
        15.00,
        3.75,
        0.30,
        1_000_000,
        64_000,
    ),
    // 128k of output with Anthropic's `output-128k` beta.
    (
        "claude-3-7-sonnet",
        3.00,
        15.00,
        3.75,
        0.30,
        200_000,
        128_000,
    ),
    ("claude-3-5-sonnet", 3.00, 15.00, 3.75, 0.30, 200_000, 8_192),
    ("claude-haiku-4-5", 1.00, 5.00, 1.25, 0.10, 200_000, 64_000),
    ("claude-3-5-haiku", 0.80, 4.00, 1.00, 0.08, 200_000, 8_192),
    ("claude-3-haiku", 0.25, 1.25, 0.30, 0.03, 200_000, 4_096),
];

/// Anthropic's web search: $10 per 1,000 searches.
pub const WEB_SEARCH_NANO: u64 = 10_000_000;

/// An Anthropic model's price from its row: input, output, 5-minute write, read (dollars per
/// million), context window, output limit.
fn anthropic_price(row: (f64, f64, f64, f64, u64, u64)) -> Price {
    let (input, output, write, read, max_in, max_out) = row;
    let mut price = Price::per_million(input, output, read).with_limits(max_in, max_out);
    price.cache_write_input_pico = dollars_per_million_to_pico(write);
    price.cache_write_1h_input_pico = dollars_per_million_to_pico(input * 2.0);
    price.units.per_web_search_nano = Some(WEB_SEARCH_NANO);
    if max_in > 200_000 {
        price.long_context = Some(LongContext {
            above_tokens: 200_000,
            input_pico: dollars_per_million_to_pico(input * 2.0),
            output_pico: dollars_per_million_to_pico(output * 1.5),
            cached_input_pico: dollars_per_million_to_pico(read * 2.0),
            cache_write_input_pico: dollars_per_million_to_pico(write * 2.0),
            cache_write_1h_input_pico: dollars_per_million_to_pico(input * 4.0),
        });
    }
    price
}

/// The model an unknown Claude name is priced as: its family's dearest (an Opus at Opus 4.1's
/// prices, not the default's), for a name newer than this table or an alias it lacks
/// (`claude-3-7-sonnet-latest`, `claude-opus-4-6`).
fn claude_family(model: &str) -> Option<&'static str> {
    let name = model.strip_prefix("claude-")?;
    if name.contains("opus") {
        Some("claude-opus-4-1")
    } else if name.contains("sonnet") {
        Some("claude-sonnet-4-5")
    } else if name.contains("haiku") {
        Some("claude-haiku-4-5")
    } else {
        None
    }
}

impl PriceTable {
    /// The built-in table, with `default` for models not in it.
    pub fn builtin(default: Price) -> PriceTable {
        let text = BUILTIN
            .iter()
            .map(|&(name, input, output, cached, max_in, max_out)| {
                let price = Price::per_million(input, output, cached).with_limits(max_in, max_out);
                (Arc::from(name), price)
            });
        let media = BUILTIN_MEDIA.iter().map(
            |&(name, input, media, output, per_image, per_million_chars, per_minute)| {
                let mut price = Price::per_million(input, output, input);
                let some = |v: f64| (v > 0.0).then_some(v);
                price.units = Units {
                    media_input_pico: some(media).map(dollars_per_million_to_pico),
                    per_image_nano: some(per_image).map(dollars_to_nano),
                    per_character_pico: some(per_million_chars).map(dollars_per_million_to_pico),
                    per_second_pico: some(per_minute).map(|m| dollars_to_pico(m / 60.0)),
                    per_web_search_nano: None,
                };
                (Arc::from(name), price)
            },
        );
        let anthropic =
            BUILTIN_ANTHROPIC
                .iter()
                .map(|&(name, input, output, write, read, max_in, max_out)| {
                    (
                        Arc::from(name),
                        anthropic_price((input, output, write, read, max_in, max_out)),
                    )
                });
        let by_name = text.chain(media).chain(anthropic).collect();
        PriceTable {
            by_name,
            default,
            ceilings: HashMap::new(),
        }
    }

    /// Done adding prices: each name's ceiling over its dated variants is worked out once
    /// (`gpt-4o` reserves at the most any `gpt-4o-YYYY-MM-DD` in the table costs).
    pub fn seal(&mut self) {
        let mut ceilings: HashMap<Arc<str>, Price> = HashMap::new();
        for (name, price) in &self.by_name {
            let Some(base) = base_name(name) else {
                continue;
            };
            if let Some((base, base_price)) = self.by_name.get_key_value(base) {
                let ceiling = ceilings.entry(base.clone()).or_insert(*base_price);
                *ceiling = ceiling.max(*price);
            }
        }
        self.ceilings = ceilings;
    }

    /// The price a request for `model` reserves at: its own, or the most one of its dated
    /// variants costs when more (an upstream may answer `gpt-4o` as any `gpt-4o-…`).
    pub fn reserving(&self, model: &str) -> Price {
        let (price, _, name) = self.resolve(model);
        name.and_then(|n| self.ceilings.get(n))
            .map_or(price, |ceiling| ceiling.max(price))
    }

    pub fn insert(&mut self, model: &str, price: Price) {
        self.by_name.insert(Arc::from(model), price);
    }

    /// Every model name the table has.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(|name| name.as_ref())
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The price of `model`, and how it was matched.
    pub fn lookup(&self, model: &str) -> (Price, Match) {
        let (price, matched, _) = self.resolve(model);
        (price, matched)
    }

    /// The price of `model`, how it was matched, and the table's name for it (exact, or its
    /// base name; none for the default price): a bounded label for metrics.
    pub fn resolve(&self, model: &str) -> (Price, Match, Option<&Arc<str>>) {
        match self.find(model) {
            Some((name, price, matched)) => (*price, matched, Some(name)),
            None => (self.default, Match::Default, None),
        }
    }

    fn find(&self, model: &str) -> Option<(&Arc<str>, &Price, Match)> {
        if let Some((name, p)) = self.by_name.get_key_value(model) {
            return Some((name, p, Match::Exact));
        }
        let unprefixed = model.rsplit('/').next().unwrap_or(model);
        let unaliased = unprefixed.strip_suffix("-latest");
        [
            Some(unprefixed),
            base_name(model),
            base_name(unprefixed),
            unaliased,
            unaliased.and_then(base_name),
            claude_family(unprefixed),
        ]
        .into_iter()
        .flatten()
        .find_map(|candidate| self.by_name.get_key_value(candidate))
        .map(|(name, p)| (name, p, Match::Base))
    }

    /// Adds (or replaces) the models of a file in LiteLLM's `model_prices_and_context_window.json`
    /// format: `{"model": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05,
    /// "cache_read_input_token_cost": 1.25e-06, "max_output_tokens": 16384, ...}, ...}`. Entries
    /// without any cost (and LiteLLM's `sample_spec`) are skipped. A `provider/model` entry also
    /// answers for `model` unless that has an entry of its own. Returns the models added.
    pub fn merge_litellm(&mut self, json: &str) -> Result<usize, PriceFileError> {
        let root: serde_json::Value =
            serde_json::from_str(json).map_err(|e| PriceFileError::NotJson(e.to_string()))?;
        let models = root.as_object().ok_or(PriceFileError::NotAnObject)?;
        let mut added = Vec::new();
        for (name, spec) in models {
            if name == "sample_spec" {
                continue;
            }
            let cost = |field: &str| -> Result<Option<f64>, PriceFileError> {
                match spec.get(field) {
                    None | Some(serde_json::Value::Null) => Ok(None),
                    Some(v) => match v.as_f64() {
                        Some(c) if c >= 0.0 && c.is_finite() => Ok(Some(c)),
                        _ => Err(PriceFileError::BadCost(name.clone())),
                    },
                }
            };
            let (input, output) = (
                cost("input_cost_per_token")?,
                cost("output_cost_per_token")?,
            );
            let media = cost("input_cost_per_image_token")?.or(cost("input_cost_per_audio_token")?);
            // gpt-image lists its per-image price as an input cost, DALL·E as an output one.
            let per_image = cost("output_cost_per_image")?.or(cost("input_cost_per_image")?);
            let per_character = cost("input_cost_per_character")?;
            let per_second = cost("input_cost_per_second")?;
            let units = Units {
                media_input_pico: media.map(dollars_to_pico),
                per_image_nano: per_image.map(dollars_to_nano),
                per_character_pico: per_character.map(dollars_to_pico),
                per_second_pico: per_second.map(dollars_to_pico),
                per_web_search_nano: cost("search_context_cost_per_query")?.map(dollars_to_nano),
            };
            if input.is_none() && output.is_none() && units == Units::default() {
                continue;
            }
            let input = input.unwrap_or(0.0);
            let cached = cost("cache_read_input_token_cost")?.unwrap_or(input);
            let cache_write = cost("cache_creation_input_token_cost")?.unwrap_or(input);
            let cache_write_1h =
                cost("cache_creation_input_token_cost_above_1hr")?.unwrap_or(cache_write);
            let long_context = match cost("input_cost_per_token_above_200k_tokens")? {
                None => None,
                Some(long_input) => Some(LongContext {
                    above_tokens: 200_000,
                    input_pico: dollars_to_pico(long_input),
                    output_pico: dollars_to_pico(
                        cost("output_cost_per_token_above_200k_tokens")?
                            .or(output)
                            .unwrap_or(0.0),
                    ),
                    cached_input_pico: dollars_to_pico(
                        cost("cache_read_input_token_cost_above_200k_tokens")?.unwrap_or(cached),
                    ),
                    cache_write_input_pico: dollars_to_pico(
                        cost("cache_creation_input_token_cost_above_200k_tokens")?
                            .unwrap_or(cache_write),
                    ),
                    cache_write_1h_input_pico: dollars_to_pico(
                        cost("cache_creation_input_token_cost_above_1hr_above_200k_tokens")?
                            .unwrap_or(cache_write_1h),
                    ),
                }),
            };
            let max_output = ["max_output_tokens", "max_tokens"]
                .iter()
                .find_map(|f| spec.get(*f).and_then(serde_json::Value::as_u64));
            let price = Price {
                input_pico: dollars_to_pico(input),
                output_pico: dollars_to_pico(output.unwrap_or(0.0)),
                cached_input_pico: dollars_to_pico(cached),
                cache_write_input_pico: dollars_to_pico(cache_write),
                cache_write_1h_input_pico: dollars_to_pico(cache_write_1h),
                long_context,
                max_output_tokens: max_output,
                max_input_tokens: spec
                    .get("max_input_tokens")
                    .and_then(serde_json::Value::as_u64),
                units,
            };
            added.push((name.clone(), price));
        }
        let count = added.len();
        for (name, price) in &added {
            self.by_name.insert(Arc::from(name.as_str()), *price);
        }
        for (name, price) in added {
            if let Some((_, short)) = name.rsplit_once('/') {
                self.by_name.entry(Arc::from(short)).or_insert(price);
            }
        }
        Ok(count)
    }
}

/// `gpt-4o-2024-08-06` → `gpt-4o`, `gpt-4-0613` → `gpt-4`, `claude-3-5-sonnet-20241022` →
/// `claude-3-5-sonnet`: a trailing date (YYYY-MM-DD, YYYYMMDD or MMDD) removed.
fn base_name(model: &str) -> Option<&str> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let bytes = model.as_bytes();
    // -YYYY-MM-DD
    if bytes.len() > 11 && bytes[bytes.len() - 11] == b'-' {
        let date = &model[model.len() - 10..];
        let parts: Vec<&str> = date.split('-').collect();
        if parts.len() == 3
            && parts[0].len() == 4
            && parts[1].len() == 2
            && parts[2].len() == 2
            && parts.iter().all(|p| digits(p))
        {
            return Some(&model[..model.len() - 11]);
        }
    }
    let (stem, last) = model.rsplit_once('-')?;
    ((last.len() == 8 || last.len() == 4) && digits(last) && !stem.is_empty()).then_some(stem)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(prompt: u64, completion: u64, cached: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_prompt_tokens: cached,
            ..Usage::default()
        }
    }

    fn default_price() -> Price {
        Price::per_million(5.0, 15.0, 5.0)
    }

    #[test]
    fn costs_are_exact_integers_rounded_up() {
        let gpt4o = Price::per_million(2.50, 10.00, 1.25);
        // 1000 prompt (200 cached) and 500 completion tokens, per token 2.5e6, 1.25e6 and 1e7
        // pico: 800 × 2.5e6 + 200 × 1.25e6 + 500 × 1e7 = 7.25e9 pico = 7_250_000 nano ($0.00725).
        assert_eq!(gpt4o.cost_nano(&usage(1000, 500, 200)), Some(7_250_000));
        // A token priced below a nano-dollar (20 pico) still costs 1 nano-dollar, never 0.
        let tiny = Price {
            input_pico: 20,
            output_pico: 0,
            cached_input_pico: 20,
            cache_write_input_pico: 20,
            cache_write_1h_input_pico: 20,
            max_output_tokens: None,
            max_input_tokens: None,
            units: Units::default(),
            long_context: None,
        };
        assert_eq!(tiny.cost_nano(&usage(1, 0, 0)), Some(1));
        assert_eq!(tiny.cost_nano(&usage(0, 0, 0)), Some(0));
        // A cached count above the prompt count (a bad upstream) is capped, never underflows.
        assert_eq!(gpt4o.cost_nano(&usage(10, 0, 50)), Some(12_500));
        assert_eq!(gpt4o.upper_bound_nano(1000, 500), 7_500_000);
        assert_eq!(gpt4o.upper_bound_nano(u64::MAX, u64::MAX), u64::MAX);
    }

    #[test]
    fn cache_writes_and_reads_are_priced_apart_and_reserved_at_the_dearest() {
        // Claude Sonnet 4.5 in LiteLLM's file: $3 in, $15 out, $0.30 cache read, $3.75 write.
        let mut table = PriceTable::builtin(default_price());
        let added = table
            .merge_litellm(
                r#"{"claude-sonnet-4-5": {"input_cost_per_token": 3e-06,
                    "output_cost_per_token": 1.5e-05, "cache_read_input_token_cost": 3e-07,
                    "cache_creation_input_token_cost": 3.75e-06,
                    "cache_creation_input_token_cost_above_1hr": 6e-06, "max_output_tokens": 64000}}"#,
            )
            .unwrap();
        assert_eq!(added, 1);
        let (sonnet, _) = table.lookup("claude-sonnet-4-5");
        assert_eq!(sonnet.cache_write_input_pico, 3_750_000);
        // 30 plain + 1200 written + 2048 read prompt tokens, 42 out:
        // 30 × 3e6 + 1200 × 3.75e6 + 2048 × 3e5 + 42 × 1.5e7 pico.
        let usage = Usage {
            prompt_tokens: 3_278,
            completion_tokens: 42,
            cached_prompt_tokens: 2_048,
            cache_write_prompt_tokens: 1_200,
            ..Usage::default()
        };
        assert_eq!(sonnet.cost_nano(&usage), Some(5_834_400));
        // Of 1200 written, 1000 for an hour: 200 × 3.75e6 + 1000 × 6e6 instead of 1200 × 3.75e6.
        let hour = Usage {
            cache_write_1h_prompt_tokens: 1_000,
            ..usage
        };
        assert_eq!(
            sonnet.cost_nano(&hour),
            Some(5_834_400 - 1_000 * 3_750 + 1_000 * 6_000)
        );
        // A reservation covers a prompt written to the cache whole, for an hour.
        assert_eq!(sonnet.upper_bound_nano(1000, 0), 6_000_000);
        // And one read from a cache priced above the input (a price file may say so).
        let odd = Price::per_million(1.0, 1.0, 5.0);
        let all_cached = Usage {
            prompt_tokens: 1000,
            cached_prompt_tokens: 1000,
            ..Usage::default()
        };
        assert!(odd.cost_nano(&all_cached).unwrap() <= odd.upper_bound_nano(1000, 0));
        // Counts that add up to more than the prompt (a bad upstream) are capped, in order:
        // read, then written; never an underflow, never more than the prompt priced.
        let wild = Usage {
            prompt_tokens: 100,
            cached_prompt_tokens: 80,
            cache_write_prompt_tokens: 80,
            ..Usage::default()
        };
        assert_eq!(sonnet.cost_nano(&wild), Some(80 * 300 + 20 * 3_750));
        // Without a write price (OpenAI's models), a written token costs the input price.
        let gpt4o = Price::per_million(2.50, 10.00, 1.25);
        let written = Usage {
            prompt_tokens: 1000,
            cache_write_prompt_tokens: 1000,
            ..Usage::default()
        };
        assert_eq!(gpt4o.cost_nano(&written), gpt4o.cost_nano(&usage_of(1000)));
    }

    #[test]
    fn claude_is_priced_with_its_cache_reads_and_writes_apart() {
        let table = PriceTable::builtin(default_price());
        // A dated name resolves to its base: claude-sonnet-4-5-20250929 → claude-sonnet-4-5.
        let (sonnet, matched) = table.lookup("claude-sonnet-4-5-20250929");
        assert_eq!(matched, Match::Base);
        let usage = Usage {
            prompt_tokens: 1_000 + 2_000 + 4_000 + 8_000,
            completion_tokens: 500,
            cached_prompt_tokens: 4_000,
            cache_write_prompt_tokens: 2_000 + 8_000,
            cache_write_1h_prompt_tokens: 8_000,
            ..Usage::default()
        };
        // $ per million: input 3, output 15, read 0.30, 5m write 3.75, 1h write 6.
        let want_pico = 1_000 * 3_000_000
            + 500 * 15_000_000
            + 4_000 * 300_000
            + 2_000 * 3_750_000
            + 8_000 * 6_000_000;
        assert_eq!(sonnet.cost_nano(&usage), Some(want_pico / 1_000));
        // Past 200k prompt tokens, Sonnet's long-context prices.
        let long = Usage {
            prompt_tokens: 300_000,
            completion_tokens: 1_000,
            ..Usage::default()
        };
        assert_eq!(
            sonnet.cost_nano(&long),
            Some((300_000 * 6_000_000 + 1_000 * 22_500_000) / 1_000)
        );
        let (haiku, _) = table.lookup("claude-3-5-haiku-20241022");
        assert_eq!(haiku.max_output_tokens, Some(8_192));
        // Past 200k, an hour's cache write is 2× the long-context input price: $12.
        let long_hour = Usage {
            prompt_tokens: 300_000,
            cache_write_prompt_tokens: 300_000,
            cache_write_1h_prompt_tokens: 300_000,
            ..Usage::default()
        };
        assert_eq!(sonnet.cost_nano(&long_hour), Some(300_000 * 12_000));
        // Web searches at $10 per 1,000.
        let searched = Usage {
            prompt_tokens: 1,
            web_search_requests: 3,
            ..Usage::default()
        };
        assert_eq!(sonnet.cost_nano(&searched), Some(3_000 + 3 * 10_000_000));
    }

    #[test]
    fn claude_names_the_table_lacks_take_their_familys_dearest_price() {
        let table = PriceTable::builtin(default_price());
        let opus = table.lookup("claude-opus-4-1").0;
        for (name, want) in [
            ("claude-opus-4-6", "claude-opus-4-1"),
            ("claude-opus-4-0", "claude-opus-4-1"),
            ("claude-3-7-sonnet-latest", "claude-3-7-sonnet"),
            ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
            ("claude-3-opus-20240229", "claude-3-opus"),
            ("claude-sonnet-4-6", "claude-sonnet-4-5"),
            ("anthropic/claude-haiku-5-5", "claude-haiku-4-5"),
        ] {
            let (price, matched) = table.lookup(name);
            assert_eq!(price, table.lookup(want).0, "{name}");
            assert_ne!(matched, Match::Default, "{name}");
        }
        assert_eq!(
            table.lookup("claude-opus-4-6").0.output_pico,
            opus.output_pico
        );
        assert_eq!(table.lookup("claude-unknown").1, Match::Default);
    }

    #[test]
    fn past_its_long_context_threshold_a_request_is_billed_whole_at_the_dearer_prices() {
        let mut table = PriceTable::builtin(default_price());
        table
            .merge_litellm(
                r#"{"claude-sonnet-4": {"input_cost_per_token": 3e-06,
                    "output_cost_per_token": 1.5e-05, "cache_read_input_token_cost": 3e-07,
                    "input_cost_per_token_above_200k_tokens": 6e-06,
                    "output_cost_per_token_above_200k_tokens": 2.25e-05,
                    "cache_read_input_token_cost_above_200k_tokens": 6e-07}}"#,
            )
            .unwrap();
        let (sonnet, _) = table.lookup("claude-sonnet-4");
        let at = |prompt| sonnet.cost_nano(&usage(prompt, 1_000, 0)).unwrap();
        // At the threshold: base prices, 200k × 3e6 + 1000 × 1.5e7 pico.
        assert_eq!(at(200_000), 615_000_000);
        // One token past it: every token at the long-context prices.
        assert_eq!(at(200_001), 200_001 * 6_000 + 1_000 * 22_500);
        let cached = sonnet.cost_nano(&usage(300_000, 0, 100_000)).unwrap();
        assert_eq!(cached, 200_000 * 6_000 + 100_000 * 600);
        // A reservation past the threshold reserves at them.
        assert_eq!(
            sonnet.upper_bound_nano(300_000, 1_000),
            300_000 * 6_000 + 1_000 * 22_500
        );
        assert_eq!(
            sonnet.upper_bound_nano(1_000, 1_000),
            1_000 * 3_000 + 1_000 * 15_000
        );
        // Two prices' ceiling keeps the dearer long-context prices and the lower threshold.
        let other = Price {
            long_context: Some(LongContext {
                above_tokens: 128_000,
                input_pico: 1,
                output_pico: 1,
                cached_input_pico: 1,
                cache_write_input_pico: 1,
                cache_write_1h_input_pico: 1,
            }),
            ..Price::per_million(1.0, 1.0, 1.0)
        };
        let both = sonnet.max(other).long_context.unwrap();
        assert_eq!((both.above_tokens, both.input_pico), (128_000, 6_000_000));
    }

    fn usage_of(prompt: u64) -> Usage {
        usage(prompt, 0, 0)
    }

    #[test]
    fn images_audio_and_characters_have_their_own_prices() {
        let table = PriceTable::builtin(default_price());
        let (image, _) = table.lookup("gpt-image-1");
        // 50 text and 100 image input tokens, 4160 image output tokens: 50 × 5e6 + 100 × 1e7
        // + 4160 × 4e7 pico.
        let usage = Usage {
            prompt_tokens: 150,
            completion_tokens: 4_160,
            media_prompt_tokens: 100,
            ..Usage::default()
        };
        assert_eq!(image.cost_nano(&usage), Some(167_650_000));
        let (whisper, _) = table.lookup("whisper-1");
        let minute = Usage {
            seconds: 60,
            ..Usage::default()
        };
        assert_eq!(whisper.cost_nano(&minute), Some(6_000_000));
        // Seconds a model has no price for: not priced (never free).
        assert_eq!(image.cost_nano(&minute), None);
        let (tts, _) = table.lookup("tts-1");
        assert_eq!(tts.units.per_character_pico, Some(15_000_000));
    }

    #[test]
    fn names_resolve_exact_then_base_then_default() {
        let table = PriceTable::builtin(default_price());
        let cases = [
            ("gpt-4o", Match::Exact, 2_500_000),
            ("gpt-4o-2024-08-06", Match::Base, 2_500_000),
            ("gpt-4o-mini-2024-07-18", Match::Base, 150_000),
            ("gpt-3.5-turbo-0125", Match::Base, 500_000),
            ("openai/gpt-4o-mini", Match::Base, 150_000),
            ("llama-3.1-8b-instant", Match::Exact, 50_000),
            ("my-finetune", Match::Default, 5_000_000),
            ("", Match::Default, 5_000_000),
        ];
        for (model, how, input_pico) in cases {
            let (price, matched) = table.lookup(model);
            assert_eq!((matched, price.input_pico), (how, input_pico), "{model}");
        }
    }

    #[test]
    fn a_model_reserves_at_the_most_its_dated_variants_cost() {
        let mut table = PriceTable::builtin(default_price());
        table.insert("gpt-4o-2024-05-13", Price::per_million(5.0, 15.0, 5.0));
        table.seal();
        let reserved = table.reserving("gpt-4o");
        assert_eq!(
            (reserved.input_pico, reserved.output_pico),
            (5_000_000, 15_000_000)
        );
        assert_eq!(reserved.max_output_tokens, Some(16_384));
        // gpt-4o-mini is another model, not a variant of gpt-4o: its own price.
        assert_eq!(table.reserving("gpt-4o-mini").input_pico, 150_000);
        assert_eq!(table.reserving("nothing-known").input_pico, 5_000_000);
    }

    #[test]
    fn base_names() {
        assert_eq!(base_name("gpt-4o-2024-08-06"), Some("gpt-4o"));
        assert_eq!(base_name("gpt-4-0613"), Some("gpt-4"));
        assert_eq!(
            base_name("claude-3-5-sonnet-20241022"),
            Some("claude-3-5-sonnet")
        );
        assert_eq!(base_name("gpt-4o"), None);
        assert_eq!(base_name("llama-3.1-8b-instant"), None);
        assert_eq!(base_name("-0613"), None);
    }

    #[test]
    fn a_litellm_price_file_loads() {
        let json = r#"{
            "sample_spec": {"input_cost_per_token": 0, "max_tokens": "LEGACY"},
            "gpt-4o": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05,
                       "cache_read_input_token_cost": 1.25e-06, "max_output_tokens": 16384,
                       "litellm_provider": "openai", "mode": "chat"},
            "groq/llama3-8b-8192": {"input_cost_per_token": 5e-08, "output_cost_per_token": 8e-08,
                                    "max_tokens": 8192},
            "dall-e-3": {"mode": "image_generation", "output_cost_per_image": 0.04},
            "tts-1": {"mode": "audio_speech", "input_cost_per_character": 1.5e-05},
            "whisper-1": {"mode": "audio_transcription", "input_cost_per_second": 0.0001},
            "gpt-image-1": {"input_cost_per_token": 5e-06, "input_cost_per_image_token": 1e-05,
                            "output_cost_per_token": 4e-05},
            "text-embedding-3-small": {"input_cost_per_token": 2e-08, "mode": "embedding"}
        }"#;
        let mut table = PriceTable {
            by_name: HashMap::new(),
            default: default_price(),
            ceilings: HashMap::new(),
        };
        assert_eq!(table.merge_litellm(json).unwrap(), 7);
        let (gpt4o, how) = table.lookup("gpt-4o-2024-08-06");
        assert_eq!(how, Match::Base);
        assert_eq!(
            gpt4o,
            Price {
                input_pico: 2_500_000,
                output_pico: 10_000_000,
                cached_input_pico: 1_250_000,
                cache_write_input_pico: 2_500_000,
                cache_write_1h_input_pico: 2_500_000,
                max_output_tokens: Some(16_384),
                max_input_tokens: None,
                units: Units::default(),
                long_context: None,
            }
        );
        let (groq, how) = table.lookup("llama3-8b-8192");
        // The provider prefix is dropped on load: the short name answers as an exact match.
        assert_eq!(
            (how, groq.input_pico, groq.max_output_tokens),
            (Match::Exact, 50_000, Some(8192))
        );
        let (embed, _) = table.lookup("text-embedding-3-small");
        assert_eq!(
            (embed.input_pico, embed.cached_input_pico),
            (20_000, 20_000)
        );
        // Prices that are not per text token: per image, per character, per second, media input.
        let unit = |m: &str| table.lookup(m).0.units;
        assert_eq!(unit("dall-e-3").per_image_nano, Some(40_000_000));
        assert_eq!(unit("tts-1").per_character_pico, Some(15_000_000));
        assert_eq!(unit("whisper-1").per_second_pico, Some(100_000_000));
        assert_eq!(unit("gpt-image-1").media_input_pico, Some(10_000_000));
    }

    #[test]
    fn a_bad_price_file_is_refused() {
        let mut table = PriceTable::builtin(default_price());
        assert!(matches!(
            table.merge_litellm("[1]"),
            Err(PriceFileError::NotAnObject)
        ));
        assert!(matches!(
            table.merge_litellm("{"),
            Err(PriceFileError::NotJson(_))
        ));
        assert!(matches!(
            table.merge_litellm(r#"{"m": {"input_cost_per_token": -1}}"#),
            Err(PriceFileError::BadCost(_))
        ));
    }

    #[test]
    fn limits_that_cannot_be_held_exactly_are_refused() {
        assert_eq!(limit_nano(4_000_000.0), Ok(MAX_LIMIT_NANO));
        assert_eq!(limit_nano(0.0), Ok(0));
        for bad in [4_000_000.01, 1e10, -1.0, f64::NAN, f64::INFINITY] {
            let e = limit_nano(bad).unwrap_err();
            assert!(e.to_string().contains("$4000000"), "{e}");
        }
        // Sums of two totals stay exact in doubles.
        const { assert!(MAX_LIMIT_NANO < 1 << 52) };
    }

    #[test]
    fn dollars_convert_at_the_edges() {
        assert_eq!(dollars_to_nano(10.0), 10 * NANO_PER_DOLLAR);
        assert_eq!(dollars_to_nano(0.000_000_001), 1);
        assert_eq!(nano_to_dollars(2_500_000_000), 2.5);
    }
}
