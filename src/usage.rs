//! Token usage read from one JSON object: the data of the SSE event the scanner picked (chat
//! chunk, Groq `x_groq`, Responses API `response.completed`) or a whole non-streaming body.
//! Pure L0: no IO, clocks, globals or logging; depends on simd-json (and memchr) and nothing
//! else of Aura. A non-streaming body is read as it streams by [`body::BodyUsage`].
//! Called only for the rare objects that carry usage, on a scratch copy (simd-json parses in
//! place); simd-json bounds nesting depth, so hostile input cannot drive deep recursion.

pub mod anthropic;
pub mod body;

use simd_json::prelude::*;
use simd_json::BorrowedValue as Value;

/// Tokens billed for one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// The part of `prompt_tokens` served from the provider's prompt cache.
    pub cached_prompt_tokens: u64,
    /// The part of `prompt_tokens` written to the provider's prompt cache, which Anthropic
    /// bills above the input price (`cache_creation_input_tokens`).
    pub cache_write_prompt_tokens: u64,
    /// The part of `cache_write_prompt_tokens` written for an hour, not 5 minutes (Anthropic:
    /// 2× the input price, against 1.25×).
    pub cache_write_1h_prompt_tokens: u64,
    /// The part of `prompt_tokens` that is image or audio (`image_tokens`, `audio_tokens`).
    pub media_prompt_tokens: u64,
    /// Seconds of audio, for a usage that is a duration (transcriptions).
    pub seconds: u64,
    /// Web searches a server tool ran (Anthropic's `server_tool_use.web_search_requests`).
    pub web_search_requests: u64,
}

/// Usage + the `model` field of the same JSON object (the response's model, e.g.
/// "gpt-4o-2024-08-06"), when present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub usage: Usage,
    pub model: Option<String>,
}

/// simd-json's parse buffers, kept by a scanner for the life of its stream so that a stream whose
/// every event carries usage (vLLM's `continuous_usage_stats`) does not allocate them per event.
/// Made on the first parse: most streams parse one event, many none.
#[derive(Default)]
pub struct ParseBuffers(Option<simd_json::Buffers>);

impl std::fmt::Debug for ParseBuffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ParseBuffers")
    }
}

impl ParseBuffers {
    /// Parses `json` in place (it is mutated: pass a scratch copy).
    pub fn parse<'j>(&mut self, json: &'j mut [u8]) -> Option<Value<'j>> {
        let buffers = self
            .0
            .get_or_insert_with(|| simd_json::Buffers::new(json.len()));
        simd_json::borrowed::to_value_with_buffers(json, buffers).ok()
    }
}

/// Parses one SSE event's data (JSON, may contain newlines from multi-line data). The input is
/// mutated (simd-json parses in place): pass a scratch copy.
pub fn from_event_json(json: &mut [u8], buffers: &mut ParseBuffers) -> Option<Found> {
    from_value(&buffers.parse(json)?)
}

/// Parses a whole non-streaming response body (chat completion, completion, embeddings,
/// Responses API); a scratch copy too. Same rules as [`from_event_json`]: the shapes overlap.
pub fn from_body_json(json: &mut [u8]) -> Option<Found> {
    from_value(&simd_json::to_borrowed_value(json).ok()?)
}

/// The first non-null of `usage`, `x_groq.usage`, `response.usage` is the usage; a usage that is
/// not an object or whose counts are not non-negative integers gives None (no guessing, and no
/// fall-back to the next place). `model` is the top-level one, else `response.model`; an empty
/// string counts as absent.
pub fn from_value(root: &Value) -> Option<Found> {
    let response = root.get("response");
    let model = root
        .get_str("model")
        .or_else(|| response?.get_str("model"))
        .filter(|m| !m.is_empty())
        .map(str::to_owned);
    let usage = non_null(root.get("usage"))
        .or_else(|| non_null(root.get("x_groq")?.get("usage")))
        .or_else(|| non_null(response?.get("usage")));
    let usage = match usage {
        Some(usage) => counts(usage)?,
        // A transcription in `verbose_json` without a usage: its `duration`.
        None => Usage {
            seconds: seconds(root.get("duration"))?,
            ..Usage::default()
        },
    };
    Some(Found { usage, model })
}

/// Seconds of audio, rounded up: a non-negative number.
fn seconds(v: Option<&Value>) -> Option<u64> {
    let v = v?;
    match v.as_u64() {
        Some(s) => Some(s),
        None => v
            .as_f64()
            .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e12)
            .map(|s| s.ceil() as u64),
    }
}

fn non_null<'v, 'de>(v: Option<&'v Value<'de>>) -> Option<&'v Value<'de>> {
    v.filter(|v| !v.is_null())
}

/// Chat completions, completions, embeddings and Groq name the counts `prompt_tokens`/
/// `completion_tokens`; the Responses API `input_tokens`/`output_tokens`. The prompt count is
/// required; the others are 0 when absent or null (embeddings have no completion).
fn counts(usage: &Value) -> Option<Usage> {
    if !usage.is_object() {
        return None;
    }
    // Transcriptions billed by the second: `{"type":"duration","seconds":9}`.
    if usage.get_str("type") == Some("duration") {
        return Some(Usage {
            seconds: seconds(usage.get("seconds"))?,
            ..Usage::default()
        });
    }
    let (prompt, completion, details) = if usage.contains_key("prompt_tokens") {
        (
            "prompt_tokens",
            "completion_tokens",
            "prompt_tokens_details",
        )
    } else {
        ("input_tokens", "output_tokens", "input_tokens_details")
    };
    // Transcriptions name their details `input_token_details`.
    let details = usage
        .get(details)
        .or_else(|| usage.get("input_token_details"));
    let detail = |name: &str| optional_count(details.and_then(|d| d.get(name)));
    Some(Usage {
        prompt_tokens: usage.get(prompt)?.as_u64()?,
        completion_tokens: optional_count(usage.get(completion))?,
        cached_prompt_tokens: detail("cached_tokens")?,
        cache_write_prompt_tokens: 0,
        cache_write_1h_prompt_tokens: 0,
        // Images and transcriptions name the input kinds; chat audio models too.
        media_prompt_tokens: detail("image_tokens")?.saturating_add(detail("audio_tokens")?),
        seconds: 0,
        web_search_requests: 0,
    })
}

/// Absent or null: Some(0). A non-negative integer: Some(it). Anything else: None.
fn optional_count(v: Option<&Value>) -> Option<u64> {
    match v {
        None => Some(0),
        Some(v) if v.is_null() => Some(0),
        Some(v) => v.as_u64(),
    }
}

#[cfg(test)]
mod media_tests {
    use super::*;

    fn parse(json: &str) -> Option<Usage> {
        let mut copy = json.as_bytes().to_vec();
        from_body_json(&mut copy).map(|f| f.usage)
    }

    #[test]
    fn images_and_transcriptions_report_their_media_tokens_and_seconds() {
        let image = parse(
            r#"{"data":[],"usage":{"input_tokens":50,"input_tokens_details":{"text_tokens":10,"image_tokens":40},"output_tokens":4160,"total_tokens":4210}}"#,
        )
        .unwrap();
        assert_eq!(
            (
                image.prompt_tokens,
                image.media_prompt_tokens,
                image.completion_tokens
            ),
            (50, 40, 4160)
        );
        let tokens = parse(
            r#"{"text":"hi","usage":{"type":"tokens","input_tokens":14,"output_tokens":45,"total_tokens":59,"input_token_details":{"text_tokens":0,"audio_tokens":14}}}"#,
        )
        .unwrap();
        assert_eq!((tokens.prompt_tokens, tokens.media_prompt_tokens), (14, 14));
        let duration = parse(r#"{"text":"hi","usage":{"type":"duration","seconds":9}}"#).unwrap();
        assert_eq!((duration.seconds, duration.prompt_tokens), (9, 0));
        // verbose_json without a usage: its duration, rounded up.
        let verbose = parse(r#"{"text":"hi","duration":9.12,"segments":[]}"#).unwrap();
        assert_eq!(verbose.seconds, 10);
        assert_eq!(parse(r#"{"text":"hi","duration":-1}"#), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Parsed = Option<(Usage, Option<String>)>;

    fn usage(p: u64, c: u64, cached: u64) -> Usage {
        Usage {
            prompt_tokens: p,
            completion_tokens: c,
            cached_prompt_tokens: cached,
            ..Usage::default()
        }
    }

    fn parse(mut f: impl FnMut(&mut [u8]) -> Option<Found>, json: &str) -> Parsed {
        let mut copy = json.as_bytes().to_vec();
        f(&mut copy).map(|found| (found.usage, found.model))
    }

    #[test]
    fn event_shapes() {
        let some = |p, c, cached, model: &str| Some((usage(p, c, cached), Some(model.to_owned())));
        let cases: &[(&str, &str, Parsed)] = &[
            (
                "openai final chunk",
                r#"{"model":"gpt-4o-2024-08-06","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17,"prompt_tokens_details":{"cached_tokens":4}}}"#,
                some(12, 5, 4, "gpt-4o-2024-08-06"),
            ),
            (
                "multi-line data joined with LF",
                "{\"model\":\"m\",\n\"usage\":\n{\"prompt_tokens\":1,\"completion_tokens\":2}}",
                some(1, 2, 0, "m"),
            ),
            (
                "groq x_groq.usage",
                r#"{"model":"llama","choices":[{"index":0}],"x_groq":{"id":"r","usage":{"queue_time":0.01,"prompt_tokens":40,"completion_tokens":2}}}"#,
                some(40, 2, 0, "llama"),
            ),
            (
                "top-level usage beats x_groq.usage",
                r#"{"model":"llama","usage":{"prompt_tokens":40,"completion_tokens":2},"x_groq":{"usage":{"prompt_tokens":1,"completion_tokens":1}}}"#,
                some(40, 2, 0, "llama"),
            ),
            (
                "null top-level usage falls to x_groq",
                r#"{"model":"llama","usage":null,"x_groq":{"usage":{"prompt_tokens":3,"completion_tokens":1}}}"#,
                some(3, 1, 0, "llama"),
            ),
            (
                "responses api completed event",
                r#"{"type":"response.completed","response":{"model":"gpt-4o-mini","usage":{"input_tokens":11,"input_tokens_details":{"cached_tokens":3},"output_tokens":1}}}"#,
                some(11, 1, 3, "gpt-4o-mini"),
            ),
            (
                "null details and null completion",
                r#"{"model":"m","usage":{"prompt_tokens":5,"completion_tokens":null,"prompt_tokens_details":null}}"#,
                some(5, 0, 0, "m"),
            ),
            (
                "no model",
                r#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
                Some((usage(1, 1, 0), None)),
            ),
            (
                "empty model is absent",
                r#"{"model":"","usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
                Some((usage(1, 1, 0), None)),
            ),
            (
                "u64::MAX is still an integer",
                r#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":0}}"#,
                Some((usage(u64::MAX, 0, 0), None)),
            ),
            (
                "usage null",
                r#"{"model":"m","choices":[],"usage":null}"#,
                None,
            ),
            (
                "no usage anywhere",
                r#"{"model":"m","choices":[{"index":0}]}"#,
                None,
            ),
            (
                "responses created: usage null",
                r#"{"response":{"model":"m","usage":null}}"#,
                None,
            ),
            ("usage not an object", r#"{"usage":5}"#, None),
            ("usage array", r#"{"usage":[1,2]}"#, None),
            (
                "no prompt count",
                r#"{"usage":{"completion_tokens":1,"total_tokens":1}}"#,
                None,
            ),
            (
                "negative",
                r#"{"usage":{"prompt_tokens":-1,"completion_tokens":1}}"#,
                None,
            ),
            (
                "float",
                r#"{"usage":{"prompt_tokens":1.5,"completion_tokens":1}}"#,
                None,
            ),
            (
                "float with .0",
                r#"{"usage":{"prompt_tokens":2.0,"completion_tokens":1}}"#,
                None,
            ),
            (
                "exponent",
                r#"{"usage":{"prompt_tokens":1e3,"completion_tokens":1}}"#,
                None,
            ),
            (
                "string count",
                r#"{"usage":{"prompt_tokens":"12","completion_tokens":1}}"#,
                None,
            ),
            (
                "negative completion",
                r#"{"usage":{"prompt_tokens":1,"completion_tokens":-2}}"#,
                None,
            ),
            (
                "bad cached count",
                r#"{"usage":{"prompt_tokens":1,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":true}}}"#,
                None,
            ),
            (
                "beyond u64",
                r#"{"usage":{"prompt_tokens":18446744073709551616,"completion_tokens":1}}"#,
                None,
            ),
            (
                "huge",
                r#"{"usage":{"prompt_tokens":99999999999999999999999999999999999,"completion_tokens":1}}"#,
                None,
            ),
            (
                "invalid top-level usage does not fall back to x_groq",
                r#"{"usage":{"prompt_tokens":-1},"x_groq":{"usage":{"prompt_tokens":1}}}"#,
                None,
            ),
            (
                "truncated",
                r#"{"usage":{"prompt_tokens":12,"completion_tok"#,
                None,
            ),
            ("not json", "[DONE]", None),
            ("empty", "", None),
            (
                "top-level array",
                r#"[{"usage":{"prompt_tokens":1}}]"#,
                None,
            ),
            (
                "raw control char in a string",
                "{\"usage\":{\"prompt_tokens\":1},\"x\":\"\u{0}\"}",
                None,
            ),
        ];
        // One set of buffers for every case, as a scanner reuses them over a stream.
        let mut buffers = ParseBuffers::default();
        for (name, json, want) in cases {
            let got = parse(|j| from_event_json(j, &mut buffers), json);
            assert_eq!(&got, want, "{name}");
        }
    }

    #[test]
    fn body_shapes() {
        let cases: &[(&str, &str, Option<Usage>, Option<&str>)] = &[
            (
                "chat completion",
                r#"{"id":"c","object":"chat.completion","model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11,"prompt_tokens_details":{"cached_tokens":0}}}"#,
                Some(usage(9, 2, 0)),
                Some("gpt-4o-2024-08-06"),
            ),
            (
                "legacy completion",
                r#"{"object":"text_completion","model":"gpt-3.5-turbo-instruct","choices":[{"text":"x"}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#,
                Some(usage(5, 7, 0)),
                Some("gpt-3.5-turbo-instruct"),
            ),
            (
                "embeddings: no completion tokens",
                r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-0.2]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#,
                Some(usage(8, 0, 0)),
                Some("text-embedding-3-small"),
            ),
            (
                "responses api body",
                r#"{"id":"resp_1","object":"response","model":"gpt-4o-mini-2024-07-18","output":[],"usage":{"input_tokens":11,"input_tokens_details":{"cached_tokens":2},"output_tokens":4,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":15}}"#,
                Some(usage(11, 4, 2)),
                Some("gpt-4o-mini-2024-07-18"),
            ),
            (
                "error body",
                r#"{"error":{"message":"bad","type":"invalid_request_error"}}"#,
                None,
                None,
            ),
        ];
        for (name, json, want, model) in cases {
            let got = parse(from_body_json, json);
            assert_eq!(got.as_ref().map(|g| g.0), *want, "{name}");
            assert_eq!(got.and_then(|g| g.1).as_deref(), *model, "{name}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut inputs: Vec<Vec<u8>> = vec![
            vec![0xff; 64],
            b"{".repeat(5000),
            b"[".repeat(5000),
            [b"{\"usage\":".repeat(2000), b"1".to_vec()].concat(),
            b"{\"usage\":{\"prompt_tokens\":1}".to_vec(),
            b"\"usage\"".to_vec(),
            b"null".to_vec(),
            b"{\"usage\":{\"prompt_tokens\":1e999999}}".to_vec(),
        ];
        // Every prefix of a valid object: truncation anywhere.
        let full = br#"{"model":"m","usage":{"prompt_tokens":12,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":4}}}"#;
        inputs.extend((0..full.len()).map(|n| full[..n].to_vec()));
        // Pseudo-random bytes drawn from JSON-ish tokens.
        let tokens: &[&[u8]] = &[
            b"{",
            b"}",
            b"[",
            b"]",
            b"\"usage\"",
            b":",
            b",",
            b"1",
            b"-",
            b"null",
            b"\"",
            b"\\",
            b" ",
            b"\n",
            b"\xc3",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..500 {
            let mut v = Vec::new();
            for _ in 0..(seed % 40) {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                v.extend_from_slice(tokens[(seed >> 33) as usize % tokens.len()]);
            }
            inputs.push(v);
        }
        let mut buffers = ParseBuffers::default();
        for mut input in inputs {
            let mut copy = input.clone();
            let _ = from_event_json(&mut input, &mut buffers);
            let _ = from_body_json(&mut copy);
        }
    }
}
