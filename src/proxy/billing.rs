//! The fields of a request body that bound its cost (which routes are billed is route.rs; the
//! estimate itself is budget/estimate.rs).

use serde::Deserialize;

use super::rates::Rates;
use crate::budget::Reservation;
use crate::pricing::Price;

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

/// What a Messages request's cost depends on: its model (required), `max_tokens`, whether it
/// streams, and whether Anthropic adds input the body does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessagesBounds {
    pub model: String,
    pub max_tokens: Option<u64>,
    pub stream: bool,
    /// Anthropic adds input the body does not hold: a document or image it fetches (`source`
    /// of type `url` or `file`), a server tool's results (web search, web fetch, code
    /// execution, MCP servers, a container): the body's size bounds nothing.
    pub expands: bool,
    /// Web searches it may run: the sum of its web search tools' `max_uses`, or
    /// `WEB_SEARCHES_ASSUMED` for a tool without one.
    pub web_searches: u64,
}

/// Searches reserved for a web search tool that sets no `max_uses` (Anthropic sets no limit):
/// an answer that runs more is billed them all.
pub const WEB_SEARCHES_ASSUMED: u64 = 10;

/// Tools the client runs itself (their results come back in a later request's body): every
/// other typed tool is run by Anthropic, which adds its results as input.
const CLIENT_TOOLS: [&str; 5] = ["custom", "bash_", "text_editor_", "computer_", "memory_"];

/// The bounds of a Messages request; an error (for a 400) when the body is not a JSON object
/// naming its model.
pub fn messages_bounds(body: &[u8]) -> Result<MessagesBounds, String> {
    #[derive(Deserialize)]
    struct Fields {
        model: Option<serde_json::Value>,
        max_tokens: Option<serde_json::Value>,
        stream: Option<serde_json::Value>,
        messages: Option<serde_json::Value>,
        system: Option<serde_json::Value>,
        tools: Option<serde_json::Value>,
        mcp_servers: Option<serde_json::Value>,
        container: Option<serde_json::Value>,
    }
    let fields: Fields =
        serde_json::from_slice(body).map_err(|e| format!("the body is not a JSON object: {e}"))?;
    let model = match fields.model {
        Some(serde_json::Value::String(model)) if !model.is_empty() => model,
        _ => return Err("`model` must be a non-empty string".into()),
    };
    let tools: &[serde_json::Value] = fields
        .tools
        .as_ref()
        .and_then(|t| t.as_array())
        .map_or(&[], Vec::as_slice);
    let server_tool = tools.iter().any(|tool| {
        tool.get("type")
            .and_then(|t| t.as_str())
            .is_some_and(|kind| !CLIENT_TOOLS.iter().any(|c| kind.starts_with(c)))
    });
    let web_searches = tools
        .iter()
        .filter(|tool| {
            tool.get("type")
                .and_then(|t| t.as_str())
                .is_some_and(|kind| kind.starts_with("web_search"))
        })
        .map(|tool| {
            tool.get("max_uses")
                .and_then(|m| m.as_u64())
                .unwrap_or(WEB_SEARCHES_ASSUMED)
        })
        .fold(0u64, u64::saturating_add);
    let fetched = [&fields.messages, &fields.system]
        .into_iter()
        .flatten()
        .any(fetches_a_source);
    let expands = server_tool
        || fetched
        || fields.mcp_servers.as_ref().is_some_and(|m| !m.is_null())
        || fields.container.as_ref().is_some_and(|c| !c.is_null());
    Ok(MessagesBounds {
        model,
        max_tokens: fields.max_tokens.and_then(|v| v.as_u64()),
        stream: fields.stream.and_then(|v| v.as_bool()).unwrap_or(false),
        expands,
        web_searches,
    })
}

/// Whether `value` holds, at any depth, a content block whose `source` Anthropic fetches (a
/// `url` or a `file` of its Files API). Depth-bounded by the JSON parser's own limit (128).
fn fetches_a_source(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Object(map) => {
            let fetched = map
                .get("source")
                .and_then(|s| s.get("type"))
                .and_then(|t| t.as_str())
                .is_some_and(|kind| matches!(kind, "url" | "file"));
            fetched || map.values().any(fetches_a_source)
        }
        serde_json::Value::Array(items) => items.iter().any(fetches_a_source),
        _ => false,
    }
}

/// The fields of an images or audio request that bound its cost, from a JSON body or a
/// `multipart/form-data` one (edits, variations, transcriptions upload files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaBounds {
    pub model: Option<String>,
    /// Images asked for (`n`, at least 1).
    pub images: u64,
    /// Characters of text to speak (`input`).
    pub characters: u64,
}

/// Reads [`MediaBounds`] from a body of `content_type`; what cannot be read is absent (`n` 1,
/// no characters), so a body Aura cannot read is bounded by its model's limits.
pub fn media_bounds(content_type: Option<&str>, body: &[u8]) -> MediaBounds {
    let fields: Vec<(String, String)> = match content_type {
        Some(ct)
            if ct
                .trim()
                .to_ascii_lowercase()
                .starts_with("multipart/form-data") =>
        {
            form_fields(ct, body)
        }
        _ => match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(serde_json::Value::Object(map)) => map
                .into_iter()
                .filter_map(|(k, v)| match v {
                    serde_json::Value::String(s) => Some((k, s)),
                    serde_json::Value::Number(n) => Some((k, n.to_string())),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        },
    };
    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    MediaBounds {
        model: field("model").cloned(),
        images: field("n")
            .and_then(|n| n.trim().parse().ok())
            .filter(|n| *n > 0)
            .unwrap_or(1),
        characters: field("input").map_or(0, |text| text.chars().count() as u64),
    }
}

/// The text fields of a `multipart/form-data` body (its parts without a filename, up to 4 KiB
/// each); none when the boundary is missing.
fn form_fields(content_type: &str, body: &[u8]) -> Vec<(String, String)> {
    const MAX_FIELD: usize = 4 * 1024;
    let Some(boundary) = content_type.split(';').find_map(|p| {
        let (name, value) = p.trim().split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| value.trim().trim_matches('"').to_string())
    }) else {
        return Vec::new();
    };
    let delimiter = format!("--{boundary}");
    let mut fields = Vec::new();
    for part in split(body, delimiter.as_bytes()).into_iter().skip(1) {
        let Some(head_end) = memchr::memmem::find(part, b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&part[..head_end]).to_ascii_lowercase();
        let Some(disposition) = head
            .lines()
            .find(|l| l.trim_start().starts_with("content-disposition:"))
        else {
            continue;
        };
        if disposition.contains("filename") {
            continue;
        }
        let Some(name) = disposition.split(';').find_map(|p| {
            p.trim()
                .strip_prefix("name=")
                .map(|n| n.trim_matches('"').to_string())
        }) else {
            continue;
        };
        let value = &part[head_end + 4..];
        let value = value.strip_suffix(b"\r\n").unwrap_or(value);
        if value.len() <= MAX_FIELD {
            fields.push((name, String::from_utf8_lossy(value).into_owned()));
        }
    }
    fields
}

/// `body` cut at each `delimiter`.
fn split<'b>(body: &'b [u8], delimiter: &[u8]) -> Vec<&'b [u8]> {
    let mut parts = Vec::new();
    let mut rest = body;
    while let Some(at) = memchr::memmem::find(rest, delimiter) {
        parts.push(&rest[..at]);
        rest = &rest[at + delimiter.len()..];
    }
    parts.push(rest);
    parts
}

/// A reservation, and what settle needs to price the request.
#[derive(Debug)]
pub struct Bill<'s> {
    pub reservation: Reservation<'s>,
    /// Its reservations in its rate accounts, and the tokens it reserved there.
    pub rates: Rates<'s>,
    pub tokens: u64,
    pub request_bytes: u64,
    /// `n` of the request.
    pub choices: u64,
    /// The model asked for (the answer may name another), and the price it reserved at.
    pub requested: Option<String>,
    pub reserved_at: Price,
    /// What a successful answer costs whatever it says (text to speech).
    pub fixed: Option<u64>,
}

impl Bill<'_> {
    /// The request went to its upstream: from now on it may cost money and counts against
    /// its rate limits.
    pub fn mark_sent(&mut self) {
        self.reservation.mark_sent();
        self.rates.mark_sent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_messages_request_that_anthropic_expands_is_known() {
        let plain = br#"{"model":"claude-sonnet-4","max_tokens":64,"messages":[{"role":"user","content":"hi"}],"tools":[{"name":"f","input_schema":{}},{"type":"bash_20250124","name":"bash"}]}"#;
        let bounds = messages_bounds(plain).unwrap();
        assert!(!bounds.expands);
        assert_eq!((bounds.max_tokens, bounds.web_searches), (Some(64), 0));
        for body in [
            &br#"{"model":"m","messages":[{"role":"user","content":[{"type":"document","source":{"type":"url","url":"https://x/a.pdf"}}]}]}"#[..],
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image","source":{"type":"file","file_id":"f"}}]}]}"#,
            br#"{"model":"m","messages":[],"tools":[{"type":"web_fetch_20250910","name":"web_fetch"}]}"#,
            br#"{"model":"m","messages":[],"mcp_servers":[{"type":"url","url":"https://x"}]}"#,
            br#"{"model":"m","messages":[],"container":"c"}"#,
        ] {
            assert!(messages_bounds(body).unwrap().expands, "{}", String::from_utf8_lossy(body));
        }
        let searching = br#"{"model":"m","messages":[],"tools":[{"type":"web_search_20250305","name":"web_search","max_uses":3},{"type":"web_search_20250305","name":"again"}]}"#;
        let bounds = messages_bounds(searching).unwrap();
        assert!(bounds.expands);
        assert_eq!(bounds.web_searches, 3 + WEB_SEARCHES_ASSUMED);
        assert!(messages_bounds(br#"{"max_tokens":1}"#).is_err());
        assert!(
            messages_bounds(br#"{"model":"a","model":"b"}"#).is_err(),
            "a model named twice"
        );
    }

    #[test]
    fn media_bounds_come_from_json_or_a_form() {
        let json = media_bounds(
            Some("application/json"),
            br#"{"model":"gpt-image-1","n":3,"size":"1024x1024","prompt":"a cat"}"#,
        );
        assert_eq!(json.model.as_deref(), Some("gpt-image-1"));
        assert_eq!(json.images, 3);
        let speech = media_bounds(None, r#"{"model":"tts-1","input":"héllo"}"#.as_bytes());
        assert_eq!(speech.characters, 5);
        let form = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp3\"\r\nContent-Type: audio/mpeg\r\n\r\nID3\x00\x01binary\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XyZ\r\nContent-Disposition: form-data; name=\"n\"\r\n\r\n2\r\n--XyZ--\r\n";
        let bounds = media_bounds(Some("multipart/form-data; boundary=XyZ"), form);
        assert_eq!(bounds.model.as_deref(), Some("whisper-1"));
        assert_eq!(bounds.images, 2);
        let unreadable = media_bounds(Some("multipart/form-data"), form);
        assert_eq!((unreadable.model, unreadable.images), (None, 1));
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
}
