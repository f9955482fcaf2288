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

/// What a stream (or a whole answer) has told of its usage so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    input: Option<u64>,
    cache_write: Option<u64>,
    cache_read: Option<u64>,
    output: Option<u64>,
    model: Option<String>,
}

impl Tally {
    /// Takes the counts of one event's JSON (or a whole answer's). True when it carried usage.
    /// An event whose counts are not all absent, null or non-negative integers is ignored
    /// whole: no guessing.
    pub fn add(&mut self, root: &Value) -> bool {
        let (usage, model) = match root.get_str("type") {
            Some("message_start") => {
                let message = root.get("message");
                (
                    message.and_then(|m| m.get("usage")),
                    message.and_then(|m| m.get_str("model")),
                )
            }
            Some("message_delta") => (root.get("usage"), None),
            Some("message") => (root.get("usage"), root.get_str("model")),
            _ => return false,
        };
        let Some(usage) = usage.filter(|u| u.is_object()) else {
            return false;
        };
        let count = |name: &str| match usage.get(name) {
            None => Ok(None),
            Some(v) if v.is_null() => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or(()),
        };
        let (Ok(input), Ok(cache_write), Ok(cache_read), Ok(output)) = (
            count("input_tokens"),
            count("cache_creation_input_tokens"),
            count("cache_read_input_tokens"),
            count("output_tokens"),
        ) else {
            return false;
        };
        if [input, cache_write, cache_read, output]
            .iter()
            .all(Option::is_none)
        {
            return false;
        }
        self.input = input.or(self.input);
        self.cache_write = cache_write.or(self.cache_write);
        self.cache_read = cache_read.or(self.cache_read);
        self.output = output.or(self.output);
        if let Some(model) = model.filter(|m| !m.is_empty()) {
            self.model = Some(model.to_owned());
        }
        true
    }

    /// The usage in OpenAI's terms: the prompt is the input with both cache counts added, the
    /// cached part is what was read from the cache, the written part is apart. None until the
    /// input count is known (a stream cut before `message_start` told it).
    pub fn found(&self) -> Option<Found> {
        let input = self.input?;
        let cache_write = self.cache_write.unwrap_or(0);
        let cache_read = self.cache_read.unwrap_or(0);
        Some(Found {
            usage: Usage {
                prompt_tokens: input.saturating_add(cache_write).saturating_add(cache_read),
                completion_tokens: self.output.unwrap_or(0),
                cached_prompt_tokens: cache_read,
                cache_write_prompt_tokens: cache_write,
                ..Usage::default()
            },
            model: self.model.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(events: &[&str]) -> Tally {
        let mut t = Tally::default();
        for e in events {
            let mut copy = e.as_bytes().to_vec();
            let root = simd_json::to_borrowed_value(&mut copy).unwrap();
            t.add(&root);
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
    fn a_delta_with_the_input_side_too_overrides_it_and_a_bad_count_is_ignored() {
        let t = tally(&[
            START,
            r#"{"type":"message_delta","delta":{},"usage":{"input_tokens":30,"cache_creation_input_tokens":100,"cache_read_input_tokens":400,"output_tokens":9}}"#,
            r#"{"type":"message_delta","delta":{},"usage":{"output_tokens":-3}}"#,
            r#"{"type":"message_delta","delta":{},"usage":{"output_tokens":"12"}}"#,
        ]);
        assert_eq!(usage(&t), Some((530, 9, 400, 100)));
    }

    #[test]
    fn a_whole_answer_and_the_shapes_that_carry_nothing() {
        let whole = tally(&[
            r#"{"id":"msg_2","type":"message","model":"claude-haiku-4-5","usage":{"input_tokens":12,"output_tokens":3,"cache_read_input_tokens":null}}"#,
        ]);
        assert_eq!(usage(&whole), Some((12, 3, 0, 0)));
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
