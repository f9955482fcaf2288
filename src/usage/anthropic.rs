//! Anthropic's Messages API usage. Its counts sit beside each other where OpenAI's nest:
//! `input_tokens` is the input neither read from nor written to the prompt cache, and
//! `cache_read_input_tokens` and `cache_creation_input_tokens` are counted apart from it. A
//! stream tells them in two places: `message_start` (`message.usage`: the input side, and the
//! first output tokens) and each `message_delta` (`usage`: cumulative; `output_tokens` always,
//! the input side too in newer API versions). The latest count of each kind wins, never a sum.
//! A non-streamed answer (`"type":"message"`) carries its `usage` whole, beside its `model`.

use simd_json::prelude::*;
use simd_json::BorrowedValue as Value;

use super::{Found, Usage};

/// The input side of a usage: counted together, so one telling is taken whole.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Input {
    plain: u64,
    cache_write: u64,
    /// The part of `cache_write` written for an hour (`cache_creation.ephemeral_1h_input_tokens`).
    cache_write_1h: u64,
    cache_read: u64,
}

impl Input {
    /// Each count the larger of the two tellings: a later telling that moves tokens to a
    /// cheaper kind (input relabelled as cache reads) cannot lower the bill.
    fn max(self, other: Input) -> Input {
        Input {
            plain: self.plain.max(other.plain),
            cache_write: self.cache_write.max(other.cache_write),
            cache_write_1h: self.cache_write_1h.max(other.cache_write_1h),
            cache_read: self.cache_read.max(other.cache_read),
        }
    }

    fn total(self) -> u64 {
        self.plain
            .saturating_add(self.cache_write)
            .saturating_add(self.cache_read)
    }
}

/// What a stream (or a whole answer) has told of its usage so far.
///
/// Counts are cumulative, so they never go down: of each count the largest telling is kept
/// (relays are seen to send `input_tokens: 0` in `message_delta`, others send 0 in
/// `message_start` and the real count later); a telling that moved tokens from one kind to
/// another is not believed to have lowered any. The usage is
/// final only once a `message_delta` told it: `message_start` already carries an output count
/// (1), and a stream cut before its delta must not settle as if that were its answer. A
/// `message_delta` whose counts cannot be read (not non-negative integers) spoils the tally:
/// no usage rather than a stale one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    input: Option<Input>,
    output: u64,
    /// `server_tool_use.web_search_requests`: cumulative too.
    web_searches: u64,
    model: Option<String>,
    started: bool,
    /// A `message_delta` (or a whole answer) told the usage.
    told: bool,
    spoiled: bool,
}

impl Tally {
    /// Takes one stream event's JSON. True when it carried usage.
    pub fn add_event(&mut self, root: &Value) -> bool {
        match root.get_str("type") {
            // Only the first: a second start (a relay's mistake, or a hostile one) neither resets
            // the counts nor changes the model the answer is priced as.
            Some("message_start") if !self.started => {
                self.started = true;
                let message = root.get("message");
                if let Some(model) = message.and_then(|m| m.get_str("model")) {
                    self.set_model(model);
                }
                self.take(message.and_then(|m| m.get("usage")), false)
            }
            Some("message_delta") => self.take(root.get("usage"), true),
            _ => false,
        }
    }

    /// Takes a whole non-streamed answer (`"type":"message"`). True when it carried usage.
    pub fn add_answer(&mut self, root: &Value) -> bool {
        if root.get_str("type") != Some("message") {
            return false;
        }
        if let Some(model) = root.get_str("model") {
            self.set_model(model);
        }
        self.take(root.get("usage"), true)
    }

    fn set_model(&mut self, model: &str) {
        if !model.is_empty() {
            self.model = Some(model.to_owned());
        }
    }

    /// `final_telling`: a `message_delta` or a whole answer, whose counts make the usage final.
    fn take(&mut self, usage: Option<&Value>, final_telling: bool) -> bool {
        let Some(usage) = usage.filter(|u| u.is_object()) else {
            return false;
        };
        let counts = (
            count(usage.get("input_tokens")),
            count(usage.get("cache_creation_input_tokens")),
            count(usage.get("cache_read_input_tokens")),
            count(usage.get("output_tokens")),
            count(
                usage
                    .get("cache_creation")
                    .and_then(|c| c.get("ephemeral_1h_input_tokens")),
            ),
        );
        let (Ok(plain), Ok(cache_write), Ok(cache_read), Ok(output), Ok(hour)) = counts else {
            if final_telling {
                self.spoiled = true;
            }
            return false;
        };
        if [plain, cache_write, cache_read, output]
            .iter()
            .all(Option::is_none)
        {
            return false;
        }
        if plain.is_some() || cache_write.is_some() || cache_read.is_some() {
            let cache_write = cache_write.unwrap_or(0);
            let told = Input {
                plain: plain.unwrap_or(0),
                cache_write,
                // Part of the written count: never more than it.
                cache_write_1h: hour.unwrap_or(0).min(cache_write),
                cache_read: cache_read.unwrap_or(0),
            };
            self.input = Some(self.input.map_or(told, |had| had.max(told)));
        }
        self.output = self.output.max(output.unwrap_or(0));
        let searches = usage
            .get("server_tool_use")
            .and_then(|s| s.get("web_search_requests"));
        if let Ok(Some(searches)) = count(searches) {
            self.web_searches = self.web_searches.max(searches);
        }
        self.told |= final_telling;
        true
    }

    /// The usage in OpenAI's terms: the prompt is the input with both cache counts added, the
    /// cached part is what was read from the cache, the written part is apart. None until a
    /// `message_delta` (or the whole answer) told it, when the input side was never told, or
    /// when a telling could not be read.
    pub fn found(&self) -> Option<Found> {
        if !self.told || self.spoiled {
            return None;
        }
        let input = self.input?;
        Some(Found {
            usage: Usage {
                prompt_tokens: input.total(),
                completion_tokens: self.output,
                cached_prompt_tokens: input.cache_read,
                cache_write_prompt_tokens: input.cache_write,
                cache_write_1h_prompt_tokens: input.cache_write_1h,
                web_search_requests: self.web_searches,
                ..Usage::default()
            },
            model: self.model.clone(),
        })
    }
}

/// Absent or null: Ok(None). A non-negative integer, also written as a float with no fraction
/// (`500.0`, `5e2`): Ok(Some). Anything else: Err.
fn count(v: Option<&Value>) -> Result<Option<u64>, ()> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    if let Some(n) = v.as_u64() {
        return Ok(Some(n));
    }
    match v.as_f64() {
        Some(f) if f >= 0.0 && f.fract() == 0.0 && f < 9.0e15 => Ok(Some(f as u64)),
        _ => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_telling_cannot_move_input_to_a_cheaper_kind() {
        let mut tally = Tally::default();
        let start = r#"{"type":"message_start","message":{"model":"claude-opus-4-1","usage":{"input_tokens":100000,"output_tokens":1}}}"#;
        let delta = r#"{"type":"message_delta","usage":{"input_tokens":0,"cache_read_input_tokens":100000,"output_tokens":7,"server_tool_use":{"web_search_requests":2}}}"#;
        for event in [start, delta] {
            let mut json = event.as_bytes().to_vec();
            let root = simd_json::to_borrowed_value(&mut json).unwrap();
            assert!(tally.add_event(&root));
        }
        let usage = tally.found().unwrap().usage;
        // The plain input as first told stays: 100k at the input price, not the read price.
        assert_eq!(usage.prompt_tokens - usage.cached_prompt_tokens, 100_000);
        assert_eq!(usage.completion_tokens, 7);
        assert_eq!(usage.web_search_requests, 2);
    }

    fn tally(events: &[&str]) -> Tally {
        let mut t = Tally::default();
        for e in events {
            let mut copy = e.as_bytes().to_vec();
            let root = simd_json::to_borrowed_value(&mut copy).unwrap();
            t.add_event(&root);
        }
        t
    }

    fn usage(t: &Tally) -> Option<(u64, u64, u64, u64)> {
        t.found().map(|f| {
            let u = f.usage;
            (
                u.prompt_tokens,
                u.completion_tokens,
                u.cached_prompt_tokens,
                u.cache_write_prompt_tokens,
            )
        })
    }

    const START: &str = r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"stop_reason":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":100,"cache_read_input_tokens":400,"output_tokens":1}}}"#;

    #[test]
    fn the_input_side_comes_from_message_start_and_output_from_the_last_delta() {
        let t = tally(&[
            START,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":7}}"#,
            r#"{"type":"message_delta","delta":{},"usage":{"output_tokens":15}}"#,
        ]);
        assert_eq!(
            usage(&t),
            Some((525, 15, 400, 100)),
            "cumulative: the last, not a sum"
        );
        assert_eq!(
            t.found().unwrap().model.as_deref(),
            Some("claude-sonnet-4-5-20250929")
        );
    }

    #[test]
    fn a_delta_with_the_input_side_too_may_raise_it_but_never_lower_it() {
        let raised = tally(&[
            START,
            r#"{"type":"message_delta","delta":{},"usage":{"input_tokens":30,"cache_creation_input_tokens":100,"cache_read_input_tokens":400,"output_tokens":9}}"#,
        ]);
        assert_eq!(usage(&raised), Some((530, 9, 400, 100)));
        // A relay that zeroes the input in its delta, or lowers the output, bills nothing less.
        let zeroed = tally(&[
            START,
            r#"{"type":"message_delta","delta":{},"usage":{"input_tokens":0,"output_tokens":500}}"#,
            r#"{"type":"message_delta","delta":{},"usage":{"output_tokens":12}}"#,
        ]);
        assert_eq!(usage(&zeroed), Some((525, 500, 400, 100)));
        // One that sends 0 at the start and the real count in its delta is read right.
        let late = tally(&[
            r#"{"type":"message_start","message":{"model":"claude-haiku-4-5","usage":{"input_tokens":0,"output_tokens":0}}}"#,
            r#"{"type":"message_delta","delta":{},"usage":{"input_tokens":80,"cache_read_input_tokens":20,"output_tokens":7}}"#,
        ]);
        assert_eq!(usage(&late), Some((100, 7, 20, 0)));
        // A second start changes neither the counts nor the model priced.
        let restarted = tally(&[
            START,
            r#"{"type":"message_start","message":{"model":"claude-3-haiku","usage":{"input_tokens":1,"output_tokens":1}}}"#,
            r#"{"type":"message_delta","delta":{},"usage":{"output_tokens":50}}"#,
        ]);
        assert_eq!(usage(&restarted), Some((525, 50, 400, 100)));
        assert_eq!(
            restarted.found().unwrap().model.as_deref(),
            Some("claude-sonnet-4-5-20250929")
        );
        // Today's shape splits the written count by how long it is kept.
        let hour = tally(&[
            r#"{"type":"message_start","message":{"model":"claude-opus-4-1","usage":{"input_tokens":2095,"cache_creation_input_tokens":2051,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":51,"ephemeral_1h_input_tokens":2000},"output_tokens":1}}}"#,
            r#"{"type":"message_delta","delta":{},"usage":{"output_tokens":503}}"#,
        ]);
        let u = hour.found().unwrap().usage;
        assert_eq!(
            (
                u.prompt_tokens,
                u.cache_write_prompt_tokens,
                u.cache_write_1h_prompt_tokens
            ),
            (4146, 2051, 2000)
        );
        // Counts written as floats with no fraction are counts.
        let floats = tally(&[
            START,
            r#"{"type":"message_delta","delta":{},"usage":{"output_tokens":5e2}}"#,
        ]);
        assert_eq!(usage(&floats), Some((525, 500, 400, 100)));
    }

    #[test]
    fn no_usage_until_a_delta_tells_it_and_none_once_a_delta_cannot_be_read() {
        // Cut before its delta (a client gone, an upstream dead, an error event): the start's
        // output count of 1 is not the answer's.
        let cut = tally(&[
            START,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        ]);
        assert_eq!(usage(&cut), None);
        for bad in [
            r#"{"type":"message_delta","delta":{},"usage":{"output_tokens":-3}}"#,
            r#"{"type":"message_delta","delta":{},"usage":{"output_tokens":"12"}}"#,
            r#"{"type":"message_delta","delta":{},"usage":{"input_tokens":-1,"output_tokens":500}}"#,
            r#"{"type":"message_delta","delta":{},"usage":{"output_tokens":12.5}}"#,
        ] {
            let spoiled = tally(&[
                START,
                bad,
                r#"{"type":"message_delta","delta":{},"usage":{"output_tokens":600}}"#,
            ]);
            assert_eq!(usage(&spoiled), None, "{bad}");
        }
    }

    #[test]
    fn a_whole_answer_and_the_shapes_that_carry_nothing() {
        let mut whole = Tally::default();
        let mut answer = br#"{"id":"msg_2","type":"message","model":"claude-haiku-4-5","usage":{"input_tokens":12,"output_tokens":3,"cache_read_input_tokens":null}}"#.to_vec();
        assert!(whole.add_answer(&simd_json::to_borrowed_value(&mut answer).unwrap()));
        assert_eq!(usage(&whole), Some((12, 3, 0, 0)));
        // In a stream, a whole-answer shape is not a telling.
        let in_stream = tally(&[
            r#"{"type":"message","model":"m","usage":{"input_tokens":1,"output_tokens":1}}"#,
        ]);
        assert_eq!(usage(&in_stream), None);
        // OpenAI's shapes, pings, errors, and a delta before any start: no input known.
        let none = tally(&[
            r#"{"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2}}"#,
            r#"{"type":"ping"}"#,
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            r#"{"type":"message_delta","delta":{},"usage":{"output_tokens":4}}"#,
        ]);
        assert_eq!(usage(&none), None);
    }
}
