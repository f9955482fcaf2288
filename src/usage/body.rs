//! The usage of a non-streaming JSON body, read as the body streams past: only the members that
//! can carry it (`usage`, `model`, `duration`, `x_groq.usage`, `response.usage`,
//! `response.model`) are kept, so a worker holds a few hundred bytes per answer, not the answer
//! (40 concurrent 7 MB answers kept whole held 318 MiB). The kept members are then read by the
//! same rules as a whole body ([`super::from_value`]).
//!
//! A small JSON lexer: strings (with escapes), containers, scalars, and the member names on the
//! way down from the top-level object. It checks only what it needs to find those members;
//! anything it cannot follow (not an object at the top, nesting past `MAX_DEPTH`, a wanted
//! member larger than `MAX_MEMBER_BYTES`) gives no usage, as an unparsable body did.

use super::Found;

/// Deeper nesting than this gives no usage: simd-json's own limit, so a body the whole-body
/// parse reads, this reads too (an answer may echo a client's deeply nested tool schema).
const MAX_DEPTH: usize = 1024;
/// A wanted member's value larger than this is dropped (a usage object is a few hundred bytes).
const MAX_MEMBER_BYTES: usize = 64 * 1024;
/// Member names longer than this are none of the wanted ones.
const MAX_NAME: usize = 16;

/// Where a wanted member sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Member {
    Usage,
    Model,
    Duration,
    GroqUsage,
    ResponseUsage,
    ResponseModel,
}

impl Member {
    /// The member at `path` (names from the top-level object down), if wanted.
    fn at(path: &[&[u8]]) -> Option<Member> {
        match path {
            [b"usage"] => Some(Member::Usage),
            [b"model"] => Some(Member::Model),
            [b"duration"] => Some(Member::Duration),
            [b"x_groq", b"usage"] => Some(Member::GroqUsage),
            [b"response", b"usage"] => Some(Member::ResponseUsage),
            [b"response", b"model"] => Some(Member::ResponseModel),
            _ => None,
        }
    }

    /// Whether members under this top-level one may be wanted.
    fn leads_to_one(name: &[u8]) -> bool {
        name == b"x_groq" || name == b"response"
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Container {
    Object,
    Array,
}

/// What the next byte outside a string may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A value (the body's, an array element, or after a member's `:`).
    Value,
    /// A member name or the object's end.
    Name,
    /// The `:` after a name.
    Colon,
    /// A `,` or the container's end.
    Next,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    Between,
    /// In a string; `name`: it is a member name.
    InString {
        name: bool,
        escaped: bool,
    },
    /// In a number, `true`, `false` or `null`.
    InScalar,
}

/// The value being kept: which member, and the depth it started at.
#[derive(Debug, Clone, Copy)]
struct Keeping {
    member: Member,
    depth: usize,
}

#[derive(Debug)]
pub struct BodyUsage {
    lex: Lex,
    expect: Expect,
    stack: Vec<Container>,
    /// Member names at depth 1 and 2 (the top-level object's, and its child object's).
    names: [Vec<u8>; 2],
    /// The name being read is longer than any wanted one.
    long_name: bool,
    keeping: Option<Keeping>,
    kept: [Option<Vec<u8>>; 6],
    /// The body is past following (not an object, too deep, malformed where it matters).
    lost: bool,
    /// The top-level object closed.
    closed: bool,
}

impl Default for BodyUsage {
    fn default() -> BodyUsage {
        BodyUsage {
            lex: Lex::Between,
            expect: Expect::Value,
            stack: Vec::new(),
            names: [Vec::new(), Vec::new()],
            long_name: false,
            keeping: None,
            kept: Default::default(),
            lost: false,
            closed: false,
        }
    }
}

impl BodyUsage {
    /// Reads the next bytes of the body.
    pub fn feed(&mut self, bytes: &[u8]) {
        let mut i = 0;
        while i < bytes.len() && !self.lost {
            let byte = bytes[i];
            match self.lex {
                Lex::InString { name, escaped } => {
                    if escaped {
                        self.lex = Lex::InString {
                            name,
                            escaped: false,
                        };
                        self.take_name_byte(name, byte);
                        self.keep(&bytes[i..=i]);
                        i += 1;
                        continue;
                    }
                    // Most of a body is string content: jump to the next quote or backslash.
                    let rest = &bytes[i..];
                    let run = memchr::memchr2(b'"', b'\\', rest).unwrap_or(rest.len());
                    if name {
                        for &b in &rest[..run] {
                            self.take_name_byte(true, b);
                        }
                    }
                    self.keep(&rest[..run]);
                    i += run;
                    let Some(&end) = bytes.get(i) else { break };
                    self.keep(&bytes[i..=i]);
                    i += 1;
                    if end == b'\\' {
                        self.lex = Lex::InString {
                            name,
                            escaped: true,
                        };
                    } else {
                        self.lex = Lex::Between;
                        if name {
                            self.expect = Expect::Colon;
                        } else {
                            self.value_ended();
                        }
                    }
                }
                Lex::InScalar => {
                    if matches!(byte, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                        self.lex = Lex::Between;
                        self.value_ended();
                        // The delimiter is read as structure.
                        continue;
                    }
                    self.keep(&bytes[i..=i]);
                    i += 1;
                }
                Lex::Between => {
                    self.structure(byte);
                    i += 1;
                }
            }
        }
    }

    /// The usage, once the whole body was read.
    pub fn finish(&mut self) -> Option<Found> {
        if self.lost || !self.closed {
            return None;
        }
        let mut json = Vec::with_capacity(256);
        json.push(b'{');
        let member = |json: &mut Vec<u8>, name: &str, value: &[u8]| {
            if json.len() > 1 {
                json.push(b',');
            }
            json.push(b'"');
            json.extend_from_slice(name.as_bytes());
            json.extend_from_slice(b"\":");
            json.extend_from_slice(value);
        };
        let kept = |m: Member| self.kept[m.index()].as_deref();
        for (m, name) in [
            (Member::Usage, "usage"),
            (Member::Model, "model"),
            (Member::Duration, "duration"),
        ] {
            if let Some(v) = kept(m) {
                member(&mut json, name, v);
            }
        }
        if let Some(v) = kept(Member::GroqUsage) {
            member(&mut json, "x_groq", b"{\"usage\":");
            json.extend_from_slice(v);
            json.push(b'}');
        }
        let response = [
            (Member::ResponseUsage, "usage"),
            (Member::ResponseModel, "model"),
        ];
        if response.iter().any(|(m, _)| kept(*m).is_some()) {
            member(&mut json, "response", b"{");
            let start = json.len();
            for (m, name) in response {
                if let Some(v) = kept(m) {
                    if json.len() > start {
                        json.push(b',');
                    }
                    json.push(b'"');
                    json.extend_from_slice(name.as_bytes());
                    json.extend_from_slice(b"\":");
                    json.extend_from_slice(v);
                }
            }
            json.push(b'}');
        }
        json.push(b'}');
        super::from_body_json(&mut json)
    }

    /// The usage of an Anthropic Messages answer, once the whole body was read: its `usage`,
    /// whose counts sit beside each other (`usage::anthropic`), and its `model`.
    pub fn finish_anthropic(&mut self) -> Option<Found> {
        if self.lost || !self.closed {
            return None;
        }
        let mut json = b"{\"type\":\"message\"".to_vec();
        for (m, name) in [(Member::Usage, "usage"), (Member::Model, "model")] {
            if let Some(v) = self.kept[m.index()].as_deref() {
                json.extend_from_slice(b",\"");
                json.extend_from_slice(name.as_bytes());
                json.extend_from_slice(b"\":");
                json.extend_from_slice(v);
            }
        }
        json.push(b'}');
        let root = simd_json::to_borrowed_value(&mut json).ok()?;
        let mut tally = super::anthropic::Tally::default();
        tally.add_answer(&root);
        tally.found()
    }

    /// One byte outside strings and scalars.
    fn structure(&mut self, byte: u8) {
        if matches!(byte, b' ' | b'\t' | b'\n' | b'\r') {
            return;
        }
        if self.closed {
            // Only whitespace may follow the body.
            self.lost = true;
            return;
        }
        match (self.expect, byte) {
            (Expect::Value, b'{' | b'[') => {
                self.start_value();
                self.keep(&[byte]);
                if self.stack.len() == MAX_DEPTH {
                    self.lost = true;
                    return;
                }
                if byte == b'{' {
                    self.stack.push(Container::Object);
                    self.expect = Expect::Name;
                } else {
                    self.stack.push(Container::Array);
                    self.expect = Expect::Value;
                }
            }
            (Expect::Value, b'"') => {
                self.start_value();
                self.keep(&[byte]);
                self.lex = Lex::InString {
                    name: false,
                    escaped: false,
                };
            }
            (Expect::Value, b']') if self.stack.last() == Some(&Container::Array) => {
                // An empty array.
                self.close(byte);
            }
            (Expect::Value, _) => {
                self.start_value();
                self.keep(&[byte]);
                self.lex = Lex::InScalar;
            }
            (Expect::Name, b'"') => {
                let depth = self.stack.len();
                if let Some(name) = self.names.get_mut(depth - 1) {
                    name.clear();
                }
                self.long_name = false;
                self.keep(&[byte]);
                self.lex = Lex::InString {
                    name: true,
                    escaped: false,
                };
            }
            (Expect::Name, b'}') => self.close(byte),
            (Expect::Colon, b':') => {
                self.keep(&[byte]);
                self.expect = Expect::Value;
            }
            (Expect::Next, b',') => {
                self.keep(&[byte]);
                self.expect = match self.stack.last() {
                    Some(Container::Object) => Expect::Name,
                    _ => Expect::Value,
                };
            }
            (Expect::Next, b'}' | b']') => self.close(byte),
            _ => self.lost = true,
        }
    }

    /// A value begins at the current depth: kept if it is a wanted member's.
    fn start_value(&mut self) {
        if self.keeping.is_some() {
            return;
        }
        let depth = self.stack.len();
        if depth == 0 {
            // The body itself: it must be an object.
            return;
        }
        if self.stack.last() != Some(&Container::Object) || self.long_name {
            return;
        }
        let member = match depth {
            1 => Member::at(&[&self.names[0]]),
            2 if self.stack[0] == Container::Object && Member::leads_to_one(&self.names[0]) => {
                Member::at(&[&self.names[0], &self.names[1]])
            }
            _ => None,
        };
        // A member named twice: the first counts, as in a whole-body parse (simd-json).
        if let Some(member) = member.filter(|m| self.kept[m.index()].is_none()) {
            self.kept[member.index()] = Some(Vec::new());
            self.keeping = Some(Keeping { member, depth });
        }
    }

    /// Closes the innermost container with `byte` (`}` or `]`), if it matches.
    fn close(&mut self, byte: u8) {
        let matches = matches!(
            (self.stack.last(), byte),
            (Some(Container::Object), b'}') | (Some(Container::Array), b']')
        );
        if !matches {
            self.lost = true;
            return;
        }
        self.keep(&[byte]);
        self.stack.pop();
        if self.stack.is_empty() {
            self.closed = true;
        }
        self.value_ended();
    }

    /// A value ended (a scalar, a string, or a container just closed).
    fn value_ended(&mut self) {
        let depth = self.stack.len();
        if depth == 0 && !self.closed {
            // A scalar or string body: not an object.
            self.lost = true;
            return;
        }
        if let Some(keeping) = self.keeping {
            if depth <= keeping.depth {
                self.keeping = None;
            }
        }
        self.expect = Expect::Next;
    }

    fn take_name_byte(&mut self, name: bool, byte: u8) {
        if !name {
            return;
        }
        let depth = self.stack.len();
        match self.names.get_mut(depth.wrapping_sub(1)) {
            Some(held) if held.len() < MAX_NAME => held.push(byte),
            Some(_) => self.long_name = true,
            None => {}
        }
    }

    /// Copies bytes of the value being kept.
    fn keep(&mut self, bytes: &[u8]) {
        let Some(keeping) = self.keeping else {
            return;
        };
        let slot = &mut self.kept[keeping.member.index()];
        if let Some(value) = slot {
            if value.len() + bytes.len() > MAX_MEMBER_BYTES {
                *slot = None;
                self.keeping = None;
            } else {
                value.extend_from_slice(bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bodies of every shape a provider answers with, some with their usage where a scanner
    /// could be fooled (inside strings, nested deeper, after a huge member).
    fn bodies() -> Vec<String> {
        let big: String = "x".repeat(200_000);
        let floats: Vec<String> = (0..20_000).map(|i| format!("{i}.5e-3")).collect();
        vec![
            r#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"hi \"usage\": {\"prompt_tokens\": 9}"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":4}}}"#.to_string(),
            format!(r#"{{"object":"list","data":[{{"object":"embedding","index":0,"embedding":[{}]}}],"model":"text-embedding-3-small","usage":{{"prompt_tokens":8,"total_tokens":8}}}}"#, floats.join(",")),
            format!(r#"{{"usage":{{"prompt_tokens":5,"completion_tokens":7}},"choices":[{{"text":"{big}"}}],"model":"m"}}"#),
            r#"{"id":"resp_1","object":"response","model":"gpt-4.1","output":[{"type":"message","content":[{"type":"output_text","text":"{\"usage\":1}"}]}],"usage":{"input_tokens":11,"output_tokens":22,"input_tokens_details":{"cached_tokens":0}}}"#.to_string(),
            r#"{"x_groq":{"id":"req_1","usage":{"prompt_tokens":3,"completion_tokens":4}},"model":"llama"}"#.to_string(),
            r#"{"response":{"model":"gpt-4.1","usage":{"input_tokens":2,"output_tokens":3}}}"#.to_string(),
            r#"{"text":"hello","duration":12.25,"language":"en"}"#.to_string(),
            r#"{"nested":{"usage":{"prompt_tokens":1,"completion_tokens":1}},"choices":[]}"#.to_string(),
            r#"{"usage":null,"x_groq":{"usage":{"prompt_tokens":2,"completion_tokens":2}}}"#.to_string(),
            r#"{"usage":{"prompt_tokens":-1,"completion_tokens":1}}"#.to_string(),
            r#"{"usage":"none"}"#.to_string(),
            r#"{ "model" : "a\u00e9\\\"b" , "usage" : { "prompt_tokens" : 1 , "completion_tokens" : 2 } }  "#.to_string(),
            r#"[{"usage":{"prompt_tokens":1,"completion_tokens":1}}]"#.to_string(),
            r#"{"usage":{"prompt_tokens":1,"completion_tokens":1}"#.to_string(),
            r#"{"usage":{"prompt_tokens":1,"completion_tokens":1}} trailing"#.to_string(),
            r#"{"a":[[],{},[1,{"b":[true,false,null]}]],"usage":{"prompt_tokens":6,"completion_tokens":0}}"#.to_string(),
            r#"{"model":"","response":{"model":"gpt-x"},"usage":{"prompt_tokens":1,"completion_tokens":1}}"#.to_string(),
            r#""just a string""#.to_string(),
            "12".to_string(),
            String::new(),
        ]
    }

    #[test]
    fn an_anthropic_answer_is_read_with_its_cache_counts_at_every_split() {
        let body = r#"{"id":"msg_01","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[{"type":"text","text":"\"usage\": {\"input_tokens\": 999}"}],"stop_reason":"end_turn","usage":{"input_tokens":30,"cache_creation_input_tokens":1200,"cache_read_input_tokens":2048,"output_tokens":42}}"#;
        for cut in 0..=body.len() {
            let mut reader = BodyUsage::default();
            reader.feed(&body.as_bytes()[..cut]);
            reader.feed(&body.as_bytes()[cut..]);
            let found = reader.finish_anthropic().expect("usage");
            let u = found.usage;
            assert_eq!(
                (
                    u.prompt_tokens,
                    u.completion_tokens,
                    u.cached_prompt_tokens,
                    u.cache_write_prompt_tokens
                ),
                (3278, 42, 2048, 1200),
                "split at {cut}"
            );
            assert_eq!(found.model.as_deref(), Some("claude-sonnet-4-5-20250929"));
        }
        // Unfinished, the answer has no usage yet.
        let mut cut_short = BodyUsage::default();
        cut_short.feed(&body.as_bytes()[..body.len() - 1]);
        assert_eq!(cut_short.finish_anthropic(), None);
    }

    fn whole(body: &str) -> Option<Found> {
        let mut copy = body.as_bytes().to_vec();
        super::super::from_body_json(&mut copy)
    }

    fn streamed(body: &str, pieces: &[usize]) -> Option<Found> {
        let mut scanner = BodyUsage::default();
        let bytes = body.as_bytes();
        let mut at = 0;
        for &n in pieces.iter().cycle() {
            if at >= bytes.len() {
                break;
            }
            let end = (at + n.max(1)).min(bytes.len());
            scanner.feed(&bytes[at..end]);
            at = end;
        }
        scanner.finish()
    }

    #[test]
    fn read_as_it_streams_it_finds_what_the_whole_body_says() {
        for body in bodies() {
            let want = whole(&body);
            for pieces in [&[usize::MAX][..], &[1], &[2, 3, 5], &[7, 1], &[4096, 13]] {
                assert_eq!(
                    streamed(&body, pieces),
                    want,
                    "{pieces:?} {}",
                    &body[..body.len().min(120)]
                );
            }
        }
    }

    #[test]
    fn it_keeps_only_the_members_that_carry_usage() {
        let floats: Vec<String> = (0..100_000).map(|i| format!("{i}.25")).collect();
        let body = format!(
            r#"{{"data":[{{"embedding":[{}]}}],"usage":{{"prompt_tokens":8,"total_tokens":8}}}}"#,
            floats.join(",")
        );
        let mut scanner = BodyUsage::default();
        for piece in body.as_bytes().chunks(16 * 1024) {
            scanner.feed(piece);
        }
        let held: usize = scanner.kept.iter().flatten().map(Vec::len).sum();
        assert!(held < 100, "held {held} bytes");
        assert_eq!(scanner.finish().unwrap().usage.prompt_tokens, 8);
    }

    #[test]
    fn too_deep_or_too_large_gives_no_usage_and_no_panic() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(streamed(&deep, &[100]), None);
        // Nesting the whole-body parse reads (an echoed tool schema) is read too.
        for depth in [127, 128, 200, 1000] {
            let nested = format!(
                r#"{{"tools":{}{},"usage":{{"prompt_tokens":7,"completion_tokens":9}}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            );
            assert_eq!(streamed(&nested, &[4096]), whole(&nested), "depth {depth}");
            assert!(whole(&nested).is_some(), "depth {depth}");
        }
        let huge = format!(r#"{{"usage":{{"x":"{}"}}}}"#, "y".repeat(MAX_MEMBER_BYTES));
        assert_eq!(streamed(&huge, &[1000]), None);
        for junk in ["}}}}", "{\"a\"::1}", "{,}", "{\"usage\" 1}", "]"] {
            assert_eq!(streamed(junk, &[1]), None, "{junk}");
        }
    }
}
