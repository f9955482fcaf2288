//! Makes `stream_options.include_usage` true on a streaming chat request by splicing bytes into
//! the client's JSON body: one scan of the top-level object, then at most one insert or one patch.
//! Every other byte is forwarded as sent (no re-serialisation: key order, spacing and numbers stay).
//! Pure L0: no IO, clocks, globals or logging; depends on memchr, serde_json and nothing in Aura.
//! `with_model` (a request falling back to another model) replaces one value the same way.
//! Client input never drives recursion: nested values are skipped iteratively, bounded by MAX_DEPTH.

use std::ops::Range;

use memchr::memchr2;

/// Deepest nesting accepted in a request body; the top-level object is depth 1.
pub const MAX_DEPTH: usize = 128;

/// What the gateway learns from one top-level scan of a chat completion body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChatRequest {
    /// True only for the literal `"stream": true`.
    pub stream: bool,
    /// The client itself sent `"stream_options": {"include_usage": true}`.
    pub client_asked_usage: bool,
    /// The top-level `"model"` string, unescaped; None when absent or not a string.
    pub model: Option<String>,
    /// `max_completion_tokens`, else `max_tokens`, when a non-negative integer that fits a u64.
    pub max_tokens: Option<u64>,
    /// `n`: how many choices to generate, each up to `max_tokens` (1 when absent or not a
    /// positive integer).
    pub choices: u64,
}

/// The outcome of [`rewrite_chat_body`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    pub request: ChatRequest,
    /// The body to forward; None means forward the original bytes unchanged.
    pub body: Option<Vec<u8>>,
}

/// Why a body was refused. Every variant is the client's fault (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    #[error("request body must be a JSON object")]
    NotAnObject,
    #[error("malformed JSON in request body at byte {at}: {what}")]
    Malformed { at: usize, what: &'static str },
    #[error("request body nests deeper than {} levels", MAX_DEPTH)]
    TooDeep,
    #[error("duplicate key \"{key}\" in request body")]
    DuplicateKey { key: String },
    #[error("escape sequences in key names are not supported: write the key literally")]
    EscapedKey,
}

const NEW_MEMBER: &[u8] = br#","stream_options":{"include_usage":true}"#;
const NEW_OPTIONS: &[u8] = br#"{"include_usage":true}"#;
const NEW_USAGE: &[u8] = br#","include_usage":true"#;

/// Scans `body` (one JSON object) and, for `"stream": true`, makes sure
/// `stream_options.include_usage` is true by inserting or patching one member.
pub fn rewrite_chat_body(body: &[u8]) -> Result<Rewrite, RewriteError> {
    let open = skip_ws(body, 0);
    if body.get(open) != Some(&b'{') {
        return Err(RewriteError::NotAnObject);
    }
    let top = scan_object(body, open, 1)?;
    let after = skip_ws(body, top.close + 1);
    if after != body.len() {
        return Err(malformed(
            body,
            after,
            "unexpected bytes after the JSON object",
        ));
    }

    let value = |key: &[u8]| top.get(body, key).map(|v| &body[v]);
    let stream = value(b"stream") == Some(b"true".as_slice());
    let model = match top.get(body, b"model") {
        Some(v) => string_value(body, v)?,
        None => None,
    };
    let max_tokens = value(b"max_completion_tokens")
        .and_then(uint_value)
        .or_else(|| value(b"max_tokens").and_then(uint_value));
    let choices = value(b"n")
        .and_then(uint_value)
        .filter(|n| *n > 0)
        .unwrap_or(1);
    let (client_asked_usage, splice) = usage_splice(body, &top)?;

    let body = match splice {
        Some((range, insert)) if stream => {
            let mut out = Vec::with_capacity(body.len() + insert.len());
            out.extend_from_slice(&body[..range.start]);
            out.extend_from_slice(insert);
            out.extend_from_slice(&body[range.end..]);
            Some(out)
        }
        _ => None,
    };
    let request = ChatRequest {
        stream,
        client_asked_usage,
        model,
        max_tokens,
        choices,
    };
    Ok(Rewrite { request, body })
}

/// Bytes to replace and their replacement; an empty range is an insert.
type Splice = Option<(Range<usize>, &'static [u8])>;

/// Whether the client asked for usage itself, and the splice that makes
/// `stream_options.include_usage` true (None when it already is).
fn usage_splice(body: &[u8], top: &Object) -> Result<(bool, Splice), RewriteError> {
    let Some(options) = top.get(body, b"stream_options") else {
        return Ok((false, Some(top.insert_member(NEW_MEMBER))));
    };
    if body[options.start] != b'{' {
        // null, false, a string, an array: replace the whole value.
        return Ok((false, Some((options, NEW_OPTIONS))));
    }
    let inner = scan_object(body, options.start, 2)?;
    Ok(match inner.get(body, b"include_usage") {
        Some(v) if &body[v.clone()] == b"true" => (true, None),
        Some(v) => (false, Some((v, b"true".as_slice()))),
        None => (false, Some(inner.insert_member(NEW_USAGE))),
    })
}

struct Member {
    /// The key's bytes, quotes excluded (never holds an escape).
    key: Range<usize>,
    /// The value's bytes, from its first to its last byte.
    value: Range<usize>,
}

struct Object {
    open: usize,
    close: usize,
    members: Vec<Member>,
}

impl Object {
    fn get(&self, body: &[u8], key: &[u8]) -> Option<Range<usize>> {
        let member = self.members.iter().find(|m| &body[m.key.clone()] == key)?;
        Some(member.value.clone())
    }

    /// Where a new member goes: right after the last value (so spacing before `}` stays), or
    /// right after `{` when the object is empty. `insert` carries its own leading comma.
    fn insert_member(&self, insert: &'static [u8]) -> (Range<usize>, &'static [u8]) {
        let at = self.members.last().map_or(self.open + 1, |m| m.value.end);
        let insert = if self.members.is_empty() {
            insert.strip_prefix(b",").unwrap_or(insert)
        } else {
            insert
        };
        (at..at, insert)
    }
}

/// Scans the object whose `{` is at `open` (at nesting `depth`), recording each member's key
/// and value; refuses escaped and duplicate keys.
fn scan_object(body: &[u8], open: usize, depth: usize) -> Result<Object, RewriteError> {
    let mut members = Vec::new();
    let mut at = skip_ws(body, open + 1);
    if body.get(at) != Some(&b'}') {
        loop {
            if body.get(at) != Some(&b'"') {
                return Err(malformed(body, at, "expected a key string"));
            }
            let (end, escaped) = skip_string(body, at)?;
            if escaped {
                return Err(RewriteError::EscapedKey);
            }
            let key = at + 1..end - 1;
            at = skip_ws(body, end);
            if body.get(at) != Some(&b':') {
                return Err(malformed(body, at, "expected ':' after a key"));
            }
            let start = skip_ws(body, at + 1);
            let end = skip_value(body, start, depth + 1)?;
            members.push(Member {
                key,
                value: start..end,
            });
            at = skip_ws(body, end);
            match body.get(at) {
                Some(b',') => at = skip_ws(body, at + 1),
                Some(b'}') => break,
                _ => return Err(malformed(body, at, "expected ',' or '}' after a value")),
            }
        }
    }
    check_duplicates(body, &members)?;
    Ok(Object {
        open,
        close: at,
        members,
    })
}

/// Upstream parsers may keep a different copy of a duplicated key than Aura reads (a billing
/// bypass), so any duplicate is refused. Keys hold no escapes, so equal names are equal bytes.
fn check_duplicates(body: &[u8], members: &[Member]) -> Result<(), RewriteError> {
    let mut keys: Vec<&[u8]> = members.iter().map(|m| &body[m.key.clone()]).collect();
    keys.sort_unstable();
    match keys.windows(2).find(|pair| pair[0] == pair[1]) {
        Some(pair) => {
            let key: String = String::from_utf8_lossy(pair[0]).chars().take(64).collect();
            Err(RewriteError::DuplicateKey { key })
        }
        None => Ok(()),
    }
}

/// Skips the value starting at `at` (at nesting `depth` if it is a container); returns its end.
fn skip_value(body: &[u8], at: usize, depth: usize) -> Result<usize, RewriteError> {
    match body.get(at) {
        Some(b'"') => Ok(skip_string(body, at)?.0),
        Some(b'{' | b'[') => skip_nested(body, at, depth),
        Some(_) => skip_scalar(body, at),
        None => Err(malformed(body, at, "expected a value")),
    }
}

/// Skips the string whose opening quote is at `at`; returns the index after the closing quote
/// and whether the string held a backslash escape.
fn skip_string(body: &[u8], at: usize) -> Result<(usize, bool), RewriteError> {
    let mut i = at + 1;
    let mut escaped = false;
    loop {
        let rest = body.get(i..).unwrap_or_default();
        match memchr2(b'"', b'\\', rest) {
            Some(n) if rest[n] == b'"' => return Ok((i + n + 1, escaped)),
            Some(n) => {
                escaped = true;
                i += n + 2;
            }
            None => return Err(malformed(body, at, "unterminated string")),
        }
    }
}

/// Skips the object or array at `at` by bracket matching, without recursion: a bit per level
/// (1 = object) records what each open bracket must close with. MAX_DEPTH fits in 128 bits.
fn skip_nested(body: &[u8], at: usize, depth: usize) -> Result<usize, RewriteError> {
    if depth > MAX_DEPTH {
        return Err(RewriteError::TooDeep);
    }
    let mut objects = u128::from(body[at] == b'{');
    let mut level = 1;
    let mut i = at + 1;
    while let Some(&b) = body.get(i) {
        match b {
            b'"' => {
                i = skip_string(body, i)?.0;
                continue;
            }
            b'{' | b'[' => {
                if depth + level > MAX_DEPTH {
                    return Err(RewriteError::TooDeep);
                }
                objects = objects << 1 | u128::from(b == b'{');
                level += 1;
            }
            b'}' | b']' => {
                if (objects & 1 == 1) != (b == b'}') {
                    return Err(malformed(body, i, "mismatched bracket"));
                }
                objects >>= 1;
                level -= 1;
                if level == 0 {
                    return Ok(i + 1);
                }
            }
            _ => {}
        }
        i += 1;
    }
    Err(malformed(body, i, "unclosed bracket"))
}

/// Skips a literal or number at `at`, checking its grammar; returns its end.
fn skip_scalar(body: &[u8], at: usize) -> Result<usize, RewriteError> {
    let rest = &body[at..];
    let len = rest
        .iter()
        .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')))
        .unwrap_or(rest.len());
    let token = &rest[..len];
    match token {
        [] => Err(malformed(body, at, "expected a value")),
        b"true" | b"false" | b"null" => Ok(at + len),
        _ if is_number(token) => Ok(at + len),
        _ => Err(malformed(body, at, "invalid literal or number")),
    }
}

/// JSON number grammar: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
fn is_number(token: &[u8]) -> bool {
    let digits = |s: &[u8]| s.iter().take_while(|b| b.is_ascii_digit()).count();
    let t = token.strip_prefix(b"-").unwrap_or(token);
    let int = digits(t);
    if int == 0 || (int > 1 && t[0] == b'0') {
        return false;
    }
    let mut rest = &t[int..];
    if let Some(frac) = rest.strip_prefix(b".") {
        let n = digits(frac);
        if n == 0 {
            return false;
        }
        rest = &frac[n..];
    }
    if let Some(exp) = rest.strip_prefix(b"e").or_else(|| rest.strip_prefix(b"E")) {
        let exp = exp
            .strip_prefix(b"+")
            .or_else(|| exp.strip_prefix(b"-"))
            .unwrap_or(exp);
        let n = digits(exp);
        if n == 0 {
            return false;
        }
        rest = &exp[n..];
    }
    rest.is_empty()
}

/// The unescaped text of a string value; None when the value is not a string.
fn string_value(body: &[u8], value: Range<usize>) -> Result<Option<String>, RewriteError> {
    let raw = &body[value.clone()];
    let Some(inner) = raw.strip_prefix(b"\"").and_then(|r| r.strip_suffix(b"\"")) else {
        return Ok(None);
    };
    let text = if inner.contains(&b'\\') {
        serde_json::from_slice::<String>(raw).ok()
    } else {
        std::str::from_utf8(inner).ok().map(str::to_owned)
    };
    match text {
        Some(text) => Ok(Some(text)),
        None => Err(malformed(body, value.start, "invalid string")),
    }
}

/// A non-negative integer literal (no fraction or exponent) that fits a u64.
fn uint_value(raw: &[u8]) -> Option<u64> {
    if raw.is_empty() || !raw.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(raw).ok()?.parse().ok()
}

fn skip_ws(body: &[u8], mut at: usize) -> usize {
    while matches!(body.get(at), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        at += 1;
    }
    at
}

fn malformed(body: &[u8], at: usize, what: &'static str) -> RewriteError {
    let what = if at >= body.len() {
        "unexpected end of body"
    } else {
        what
    };
    RewriteError::Malformed {
        at: at.min(body.len()),
        what,
    }
}

/// The body with its top-level `model` value replaced by `model`, every other byte as sent: for
/// a request that falls back to another model. None when the body is not one JSON object
/// with a `model` member.
pub fn with_model(body: &[u8], model: &str) -> Option<Vec<u8>> {
    let open = skip_ws(body, 0);
    if body.get(open) != Some(&b'{') {
        return None;
    }
    let top = scan_object(body, open, 1).ok()?;
    let value = top.get(body, b"model")?;
    let name = serde_json::to_string(model).ok()?;
    let mut out = Vec::with_capacity(body.len() + name.len());
    out.extend_from_slice(&body[..value.start]);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&body[value.end..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fallback_model_replaces_the_model_and_nothing_else() {
        let body = br#"{ "seed": 123456789012345678901, "model" : "gpt-4o", "x": "\ud83d" }"#;
        let out = with_model(body, "gpt-4o-mini").unwrap();
        assert_eq!(
            out,
            br#"{ "seed": 123456789012345678901, "model" : "gpt-4o-mini", "x": "\ud83d" }"#
        );
        assert_eq!(
            with_model(br#"{"model":1}"#, "a\"b").unwrap(),
            br#"{"model":"a\"b"}"#
        );
        assert!(with_model(br#"{"n":1}"#, "m").is_none());
        assert!(with_model(b"[1]", "m").is_none());
    }
    use serde_json::Value;

    fn req(stream: bool, asked: bool, model: Option<&str>, max: Option<u64>) -> ChatRequest {
        ChatRequest {
            stream,
            client_asked_usage: asked,
            model: model.map(str::to_owned),
            max_tokens: max,
            choices: 1,
        }
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    /// (name, input, expected output (None = unchanged), expected request)
    type Case = (
        &'static str,
        &'static str,
        Option<&'static str>,
        ChatRequest,
    );

    fn cases() -> Vec<Case> {
        let s = |asked| req(true, asked, None, None);
        vec![
            (
                "no stream_options: member inserted after the last value",
                r#"{"model":"gpt-4o","stream":true,"messages":[]}"#,
                Some(r#"{"model":"gpt-4o","stream":true,"messages":[],"stream_options":{"include_usage":true}}"#),
                req(true, false, Some("gpt-4o"), None),
            ),
            (
                "pretty-printed body keeps its layout",
                "{\n  \"model\": \"gpt-4o\",\n  \"stream\": true\n}\n",
                Some("{\n  \"model\": \"gpt-4o\",\n  \"stream\": true,\"stream_options\":{\"include_usage\":true}\n}\n"),
                req(true, false, Some("gpt-4o"), None),
            ),
            (
                "whitespace around the body and the only member",
                " \r\n\t{ \"stream\" : true } \n",
                Some(" \r\n\t{ \"stream\" : true,\"stream_options\":{\"include_usage\":true} } \n"),
                s(false),
            ),
            (
                "stream first, other members after",
                r#"{"stream":true,"model":"m","max_tokens":7}"#,
                Some(r#"{"stream":true,"model":"m","max_tokens":7,"stream_options":{"include_usage":true}}"#),
                req(true, false, Some("m"), Some(7)),
            ),
            (
                "empty stream_options",
                r#"{"stream":true,"stream_options":{}}"#,
                Some(r#"{"stream":true,"stream_options":{"include_usage":true}}"#),
                s(false),
            ),
            (
                "empty stream_options with spaces",
                r#"{"stream":true,"stream_options":{ }}"#,
                Some(r#"{"stream":true,"stream_options":{"include_usage":true }}"#),
                s(false),
            ),
            (
                "stream_options without include_usage",
                r#"{"stream_options":{"continuous_usage_stats":true},"stream":true}"#,
                Some(r#"{"stream_options":{"continuous_usage_stats":true,"include_usage":true},"stream":true}"#),
                s(false),
            ),
            (
                "include_usage false is patched",
                r#"{"stream":true,"stream_options":{ "include_usage" : false }}"#,
                Some(r#"{"stream":true,"stream_options":{ "include_usage" : true }}"#),
                s(false),
            ),
            (
                "include_usage null is patched",
                r#"{"stream":true,"stream_options":{"include_usage":null,"x":1}}"#,
                Some(r#"{"stream":true,"stream_options":{"include_usage":true,"x":1}}"#),
                s(false),
            ),
            (
                "include_usage \"true\" (a string) is patched",
                r#"{"stream":true,"stream_options":{"include_usage":"true"}}"#,
                Some(r#"{"stream":true,"stream_options":{"include_usage":true}}"#),
                s(false),
            ),
            (
                "include_usage an object is patched",
                r#"{"stream":true,"stream_options":{"include_usage":{"a":[1]}}}"#,
                Some(r#"{"stream":true,"stream_options":{"include_usage":true}}"#),
                s(false),
            ),
            (
                "client already asked for usage",
                r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
                None,
                s(true),
            ),
            (
                "client already asked, with spaces",
                "{\"stream\": true, \"stream_options\": {\"include_usage\" :\ttrue}}",
                None,
                s(true),
            ),
            (
                "stream_options null is replaced",
                r#"{"stream":true,"stream_options":null}"#,
                Some(r#"{"stream":true,"stream_options":{"include_usage":true}}"#),
                s(false),
            ),
            (
                "stream_options a string is replaced",
                r#"{"stream_options":"{}","stream":true}"#,
                Some(r#"{"stream_options":{"include_usage":true},"stream":true}"#),
                s(false),
            ),
            (
                "stream_options an array is replaced",
                r#"{"stream":true,"stream_options":[{"include_usage":true}]}"#,
                Some(r#"{"stream":true,"stream_options":{"include_usage":true}}"#),
                s(false),
            ),
            (
                "stream_options false is replaced",
                r#"{"stream":true,"stream_options":false}"#,
                Some(r#"{"stream":true,"stream_options":{"include_usage":true}}"#),
                s(false),
            ),
            (
                "stream false: unchanged, nothing added",
                r#"{"model":"gpt-4o","stream":false}"#,
                None,
                req(false, false, Some("gpt-4o"), None),
            ),
            (
                "stream \"true\" (a string) is not streaming",
                r#"{"stream":"true"}"#,
                None,
                req(false, false, None, None),
            ),
            ("stream 1 is not streaming", r#"{"stream":1}"#, None, req(false, false, None, None)),
            ("stream null is not streaming", r#"{"stream":null}"#, None, req(false, false, None, None)),
            ("no stream at all", r#"{"model":"m"}"#, None, req(false, false, Some("m"), None)),
            ("empty object", "{}", None, req(false, false, None, None)),
            (
                "non-streaming with include_usage is left alone",
                r#"{"stream":false,"stream_options":{"include_usage":true}}"#,
                None,
                req(false, true, None, None),
            ),
            (
                "non-streaming with stream_options null is left alone",
                r#"{"stream_options":null}"#,
                None,
                req(false, false, None, None),
            ),
            (
                "nested stream:true in messages is not top-level",
                r#"{"messages":[{"role":"user","stream":true,"stream_options":null}],"model":"m"}"#,
                None,
                req(false, false, Some("m"), None),
            ),
            (
                "nested stream_options is not top-level",
                r#"{"stream":true,"tools":[{"stream_options":{"include_usage":true}}]}"#,
                Some(r#"{"stream":true,"tools":[{"stream_options":{"include_usage":true}}],"stream_options":{"include_usage":true}}"#),
                s(false),
            ),
            (
                "braces, brackets and escaped quotes inside strings",
                r#"{"messages":[{"content":"a \"}\" {[ \\\"stream\":true } \\"}],"stream":true}"#,
                Some(r#"{"messages":[{"content":"a \"}\" {[ \\\"stream\":true } \\"}],"stream":true,"stream_options":{"include_usage":true}}"#),
                s(false),
            ),
            (
                "a string value that looks like a key",
                r#"{"note":"\"stream\":true,","stream":false}"#,
                None,
                req(false, false, None, None),
            ),
            (
                "unicode in values",
                "{\"model\":\"modèle-ü\",\"messages\":[{\"content\":\"héllo 🌍 \\u00e9 \\ud83c\\udf0d\"}],\"stream\":true}",
                Some("{\"model\":\"modèle-ü\",\"messages\":[{\"content\":\"héllo 🌍 \\u00e9 \\ud83c\\udf0d\"}],\"stream\":true,\"stream_options\":{\"include_usage\":true}}"),
                req(true, false, Some("modèle-ü"), None),
            ),
            (
                "unicode keys elsewhere",
                r#"{"clé":1,"stream":true}"#,
                Some(r#"{"clé":1,"stream":true,"stream_options":{"include_usage":true}}"#),
                s(false),
            ),
            (
                "numbers are kept byte for byte",
                r#"{"temperature":0.70,"top_p":1E+0,"seed":-0,"stream":true}"#,
                Some(r#"{"temperature":0.70,"top_p":1E+0,"seed":-0,"stream":true,"stream_options":{"include_usage":true}}"#),
                s(false),
            ),
            (
                "escaped model is unescaped",
                r#"{"model":"gpt\u002d4o\/x"}"#,
                None,
                req(false, false, Some("gpt-4o/x"), None),
            ),
            ("model a number", r#"{"model":4}"#, None, req(false, false, None, None)),
            ("model null", r#"{"model":null}"#, None, req(false, false, None, None)),
            ("max_tokens", r#"{"max_tokens":100}"#, None, req(false, false, None, Some(100))),
            (
                "max_completion_tokens wins",
                r#"{"max_tokens":100,"max_completion_tokens":200}"#,
                None,
                req(false, false, None, Some(200)),
            ),
            (
                "max_completion_tokens null falls back",
                r#"{"max_completion_tokens":null,"max_tokens":5}"#,
                None,
                req(false, false, None, Some(5)),
            ),
            ("max_tokens zero", r#"{"max_tokens":0}"#, None, req(false, false, None, Some(0))),
            (
                "n choices",
                r#"{"max_tokens":10,"n":3}"#,
                None,
                ChatRequest {
                    choices: 3,
                    ..req(false, false, None, Some(10))
                },
            ),
            ("n zero counts as one", r#"{"n":0}"#, None, req(false, false, None, None)),
            ("max_tokens negative", r#"{"max_tokens":-1}"#, None, req(false, false, None, None)),
            ("max_tokens fraction", r#"{"max_tokens":1.5}"#, None, req(false, false, None, None)),
            ("max_tokens exponent", r#"{"max_tokens":1e3}"#, None, req(false, false, None, None)),
            ("max_tokens string", r#"{"max_tokens":"9"}"#, None, req(false, false, None, None)),
            (
                "max_tokens past u64",
                r#"{"max_tokens":18446744073709551616}"#,
                None,
                req(false, false, None, None),
            ),
            (
                "max_tokens u64::MAX",
                r#"{"max_tokens":18446744073709551615}"#,
                None,
                req(false, false, None, Some(u64::MAX)),
            ),
        ]
    }

    #[test]
    fn table() {
        for (name, input, output, request) in cases() {
            let got = rewrite_chat_body(input.as_bytes())
                .unwrap_or_else(|e| panic!("{name}: unexpected error {e}"));
            assert_eq!(
                got.body.as_deref().map(text),
                output.map(str::to_owned),
                "{name}"
            );
            assert_eq!(got.request, request, "{name}");
        }
    }

    fn malformed_what(err: &RewriteError) -> Option<&'static str> {
        match err {
            RewriteError::Malformed { what, .. } => Some(what),
            _ => None,
        }
    }

    #[test]
    fn errors() {
        use RewriteError::*;
        let dup = |key: &str| DuplicateKey {
            key: key.to_owned(),
        };
        let cases: Vec<(&str, RewriteError)> = vec![
            ("", NotAnObject),
            ("   \n", NotAnObject),
            ("[]", NotAnObject),
            ("null", NotAnObject),
            (r#""{}""#, NotAnObject),
            (r#"{"stream":true,"stream":false}"#, dup("stream")),
            (r#"{"stream":false,"stream":true}"#, dup("stream")),
            (r#"{"a":1,"b":2,"a":3}"#, dup("a")),
            (r#"{"model":"a","messages":[],"model":"b"}"#, dup("model")),
            (
                r#"{"stream":true,"stream_options":{"include_usage":false,"include_usage":true}}"#,
                dup("include_usage"),
            ),
            (
                r#"{"stream":true,"stream_options":{},"stream_options":{}}"#,
                dup("stream_options"),
            ),
            (r#"{"str\u0065am":true}"#, EscapedKey),
            (r#"{"stream":true,"str\u0065am":false}"#, EscapedKey),
            (r#"{"a\"b":1}"#, EscapedKey),
            (
                r#"{"stream":true,"stream_options":{"include\u005fusage":true}}"#,
                EscapedKey,
            ),
        ];
        for (input, want) in cases {
            assert_eq!(rewrite_chat_body(input.as_bytes()), Err(want), "{input}");
        }
    }

    #[test]
    fn malformed_bodies() {
        let cases = [
            (r#"{"model":"gpt"#, "unterminated string"),
            (r#"{"model":"gpt}"#, "unterminated string"),
            (r#"{"a":"\"}"#, "unterminated string"),
            (r#"{"a":["x]}"#, "unterminated string"),
            (r#"{"a":"x"}"b"#, "unexpected bytes after the JSON object"),
            (r#"{"a":1} x"#, "unexpected bytes after the JSON object"),
            (r#"{"a":1}}"#, "unexpected bytes after the JSON object"),
            (
                r#"{"a":1}{"b":2}"#,
                "unexpected bytes after the JSON object",
            ),
            (r#"{"a":[1,2}"#, "mismatched bracket"),
            (r#"{"a":{"b":1]}"#, "mismatched bracket"),
            (r#"{"a":[1,2]]}"#, "expected ',' or '}' after a value"),
            (r#"{"a":{"b":1}"#, "unexpected end of body"),
            (r#"{"a":[[1]"#, "unexpected end of body"),
            (r#"{"a" 1}"#, "expected ':' after a key"),
            (r#"{"a"}"#, "expected ':' after a key"),
            (r#"{"a":}"#, "expected a value"),
            (r#"{"a":,"b":1}"#, "expected a value"),
            (r#"{"a":1,}"#, "expected a key string"),
            (r#"{,}"#, "expected a key string"),
            (r#"{a:1}"#, "expected a key string"),
            (r#"{"a":1 "b":2}"#, "expected ',' or '}' after a value"),
            (r#"{"a":1;"b":2}"#, "expected ',' or '}' after a value"),
            (r#"{"stream":tru}"#, "invalid literal or number"),
            (r#"{"stream":True}"#, "invalid literal or number"),
            (r#"{"stream":truex}"#, "invalid literal or number"),
            (r#"{"a":01}"#, "invalid literal or number"),
            (r#"{"a":1.}"#, "invalid literal or number"),
            (r#"{"a":.5}"#, "invalid literal or number"),
            (r#"{"a":-}"#, "invalid literal or number"),
            (r#"{"a":1e}"#, "invalid literal or number"),
            (r#"{"a":+1}"#, "invalid literal or number"),
            (r#"{"a":NaN}"#, "invalid literal or number"),
            (r#"{"a":'x'}"#, "expected a value"),
            (r#"{"model":"\x"}"#, "invalid string"),
            (r#"{"model":"\ud800"}"#, "invalid string"),
            (
                r#"{"stream":true,"stream_options":{"include_usage":tru}}"#,
                "invalid literal or number",
            ),
            (
                r#"{"stream":true,"stream_options":{"include_usage"}}"#,
                "expected ':' after a key",
            ),
        ];
        for (input, what) in cases {
            let err = rewrite_chat_body(input.as_bytes()).expect_err(input);
            assert_eq!(malformed_what(&err), Some(what), "{input}: {err}");
        }
        let bad_utf8 = b"{\"model\":\"\xff\"}";
        let err = rewrite_chat_body(bad_utf8).expect_err("invalid UTF-8 model");
        assert_eq!(malformed_what(&err), Some("invalid string"));
    }

    #[test]
    fn error_positions() {
        let at = |input: &str| match rewrite_chat_body(input.as_bytes()) {
            Err(RewriteError::Malformed { at, .. }) => at,
            other => panic!("{input}: {other:?}"),
        };
        assert_eq!(at(r#"{"a":1} x"#), 8);
        assert_eq!(at(r#"{"a":[1,2}"#), 9);
        assert_eq!(at(r#"{"a":"x"#), 5);
        assert_eq!(at(r#"{"a":"#), 5);
    }

    fn nested(depth: usize) -> String {
        format!(r#"{{"a":{}1{}}}"#, "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn depth_limit() {
        // The top-level object is depth 1, so MAX_DEPTH - 1 nested arrays are the most allowed.
        assert!(rewrite_chat_body(nested(MAX_DEPTH - 1).as_bytes()).is_ok());
        let too_deep = [
            nested(MAX_DEPTH),
            nested(1_000_000),
            "{\"a\":".to_owned() + &"{\"b\":".repeat(500),
        ];
        for body in too_deep {
            assert_eq!(
                rewrite_chat_body(body.as_bytes()),
                Err(RewriteError::TooDeep)
            );
        }
        let options = format!(
            r#"{{"stream":true,"stream_options":{{"x":{}{}}}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(
            rewrite_chat_body(options.as_bytes()),
            Err(RewriteError::TooDeep)
        );
    }

    #[test]
    fn error_messages_are_fit_for_a_client() {
        let err = rewrite_chat_body(br#"{"a":1} x"#).expect_err("trailing");
        assert_eq!(
            err.to_string(),
            "malformed JSON in request body at byte 8: unexpected bytes after the JSON object"
        );
        assert_eq!(
            RewriteError::TooDeep.to_string(),
            "request body nests deeper than 128 levels"
        );
        let err = rewrite_chat_body(br#"{"stream":1,"stream":2}"#).expect_err("dup");
        assert_eq!(err.to_string(), r#"duplicate key "stream" in request body"#);
        let long = format!(r#"{{"{k}":1,"{k}":2}}"#, k = "k".repeat(1000));
        let err = rewrite_chat_body(long.as_bytes()).expect_err("dup");
        assert!(err.to_string().len() < 120, "{err}");
    }

    /// Valid streaming bodies (all end with `}`), used by the property tests.
    fn streaming_bodies() -> Vec<String> {
        let mut bodies: Vec<String> = cases()
            .into_iter()
            .filter(|(_, _, _, r)| r.stream)
            .map(|(_, input, _, _)| input.trim().to_owned())
            .collect();
        bodies.push(
            r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"What is in {this} image? \"quoted\" \\ backslash"},{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo="}}]}],"temperature":0.2,"max_completion_tokens":512,"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"x":{"type":"array","items":{"type":"number"}}}}}}],"tool_choice":"auto","stream":true,"n":1,"logit_bias":{"50256":-100},"user":"u-1"}"#.to_owned(),
        );
        bodies.push(
            "{\r\n\t\"stream\" :\ttrue ,\r\n\t\"stream_options\" : { \"continuous_usage_stats\" : false } ,\r\n\t\"messages\" : [ ]\r\n}"
                .to_owned(),
        );
        bodies
    }

    #[test]
    fn output_equals_input_plus_include_usage() {
        for body in streaming_bodies() {
            let out = rewrite_chat_body(body.as_bytes()).expect(&body);
            let Some(new) = out.body else {
                assert!(out.request.client_asked_usage, "{body}");
                continue;
            };
            let mut want: Value = serde_json::from_str(&body).expect(&body);
            let root = want.as_object_mut().expect("object");
            let options = root.entry("stream_options").or_insert(Value::Null);
            if !options.is_object() {
                *options = Value::Object(Default::default());
            }
            if let Some(options) = options.as_object_mut() {
                options.insert("include_usage".to_owned(), Value::Bool(true));
            }
            let got: Value =
                serde_json::from_slice(&new).unwrap_or_else(|e| panic!("{e}: {}", text(&new)));
            assert_eq!(got, want, "{body}");

            let again = rewrite_chat_body(&new).unwrap_or_else(|e| panic!("{e}: {}", text(&new)));
            assert_eq!(again.body, None, "{body}");
            assert!(again.request.client_asked_usage, "{body}");
            assert_eq!(
                ChatRequest {
                    client_asked_usage: false,
                    ..again.request
                },
                out.request,
                "{body}"
            );
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let mut bodies = streaming_bodies();
        bodies.extend(
            cases()
                .into_iter()
                .map(|(_, input, _, _)| input.trim().to_owned()),
        );
        for body in bodies {
            assert!(rewrite_chat_body(body.as_bytes()).is_ok(), "{body}");
            for cut in 0..body.len() {
                let prefix = &body.as_bytes()[..cut];
                assert!(rewrite_chat_body(prefix).is_err(), "prefix {cut} of {body}");
            }
        }
    }

    #[test]
    fn byte_mutations_never_panic() {
        let interesting = [
            b'"', b'\\', b'{', b'}', b'[', b']', b',', b':', b' ', b't', b'0', 0xff,
        ];
        for body in streaming_bodies() {
            let bytes = body.as_bytes();
            for i in 0..bytes.len() {
                let mut deleted = bytes.to_vec();
                deleted.remove(i);
                let _ = rewrite_chat_body(&deleted);
                for &b in &interesting {
                    let mut changed = bytes.to_vec();
                    changed[i] = b;
                    if let Ok(out) = rewrite_chat_body(&changed) {
                        if let Some(new) = out.body {
                            assert!(rewrite_chat_body(&new).is_ok(), "{}", text(&changed));
                        }
                    }
                }
            }
        }
    }
}
