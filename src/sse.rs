//! Server-sent events observed in flight, resumable across arbitrary splits: [`UsageScanner`]
//! finds the usage a stream carries, [`UsageOnlyStripper`] removes the usage-only event the
//! gateway asked for on the client's behalf. Pure L0: no IO, clocks, globals or logging; depends
//! on `usage` and `sse::scan` only. Hot path: both see every upstream read after it was written
//! to the client; an event without `"usage": {` costs a boundary search and a memmem scan, and
//! only events that match are copied and parsed.

pub(crate) mod scan;

use std::cell::RefCell;
use std::rc::Rc;

use crate::usage::{self, Found, ParseBuffers};
use scan::{Choices, Framer, KeyFinder};

/// Events larger than this are not parsed for usage: the scanner skips them.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// The stripper holds back at most this much of an event. Usage-only events are a few hundred
/// bytes; an event still undecided at this size is forwarded and never stripped. Small, because
/// a held event is rescanned on each push.
pub const MAX_HELD_BYTES: usize = 16 << 10;

/// The one parse of a usage-only event, shared by a stripper and a scanner fed the same bytes
/// in the same order (stripper first): the stripper parses the event to classify it and leaves
/// its usage here; the scanner, meeting the same event data, takes it instead of parsing again.
/// Saves one simd-json parse per stripped stream (`cargo bench --bench hot_path -- sse`).
#[derive(Debug, Default, Clone)]
pub struct SharedParse(Rc<RefCell<Option<Parsed>>>);

#[derive(Debug)]
struct Parsed {
    /// The event's data, as `scan::event_data` extracts it (before simd-json mutates it).
    data: Vec<u8>,
    found: Option<Found>,
}

impl SharedParse {
    fn remember(&self, data: &[u8], found: Option<Found>) {
        *self.0.borrow_mut() = Some(Parsed {
            data: data.to_vec(),
            found,
        });
    }

    /// The usage parsed from exactly `data`, taken out, if the other side parsed it.
    fn take_if(&self, data: &[u8]) -> Option<Option<Found>> {
        let mut memo = self.0.borrow_mut();
        if memo.as_ref().is_some_and(|p| p.data == data) {
            return memo.take().map(|p| p.found);
        }
        None
    }
}

/// Finds the usage of a stream: the last event that carries a non-null usage object wins
/// (vLLM repeats cumulative usage; Groq may send `x_groq.usage` then a standard chunk). An
/// Anthropic stream ([`UsageScanner::anthropic`]) tells its counts in two events, each count's
/// latest telling winning (`usage::anthropic`).
#[derive(Debug)]
pub struct UsageScanner {
    framer: Framer,
    usage_key: KeyFinder,
    /// The unfinished event's bytes, when it started in an earlier feed (at most one event).
    partial: Vec<u8>,
    /// The unfinished event outgrew [`MAX_EVENT_BYTES`]: it is skipped.
    oversize: bool,
    scratch: Vec<u8>,
    buffers: ParseBuffers,
    found: Option<Found>,
    shared: Option<SharedParse>,
    /// Set for an Anthropic Messages stream.
    anthropic: Option<usage::anthropic::Tally>,
}

impl Default for UsageScanner {
    fn default() -> Self {
        Self {
            framer: Framer::default(),
            usage_key: KeyFinder::usage(),
            partial: Vec::new(),
            oversize: false,
            scratch: Vec::new(),
            buffers: ParseBuffers::default(),
            found: None,
            shared: None,
            anthropic: None,
        }
    }
}

impl UsageScanner {
    /// A scanner for an Anthropic Messages stream (`message_start`, `message_delta`).
    pub fn anthropic() -> UsageScanner {
        UsageScanner {
            anthropic: Some(usage::anthropic::Tally::default()),
            ..UsageScanner::default()
        }
    }

    /// A scanner that takes the usage of an event its stripper already parsed.
    pub fn sharing(shared: SharedParse) -> UsageScanner {
        UsageScanner {
            shared: Some(shared),
            ..UsageScanner::default()
        }
    }

    /// Scans the next bytes of the body. Events wholly inside `payload` are scanned in place;
    /// only the unfinished event at its end is copied, up to [`MAX_EVENT_BYTES`].
    pub fn feed(&mut self, payload: &[u8]) {
        let mut rest = payload;
        while let Some(end) = self.framer.next_boundary(rest) {
            let (last, tail) = rest.split_at(end);
            self.end_event(last);
            rest = tail;
        }
        self.grow(rest);
    }

    /// End of stream: a final event without a trailing blank line still counts.
    pub fn finish(&mut self) {
        self.end_event(&[]);
        self.framer = Framer::default();
    }

    /// The usage of the last event that carried one, if any.
    pub fn found(&self) -> Option<&Found> {
        self.found.as_ref()
    }

    fn grow(&mut self, bytes: &[u8]) {
        if self.oversize || bytes.is_empty() {
            return;
        }
        if self.partial.len() + bytes.len() > MAX_EVENT_BYTES {
            self.oversize = true;
            self.partial.clear();
        } else {
            self.partial.extend_from_slice(bytes);
        }
    }

    fn end_event(&mut self, last: &[u8]) {
        if self.partial.is_empty() && !self.oversize {
            self.consider(last);
            return;
        }
        self.grow(last);
        let event = std::mem::take(&mut self.partial);
        if !self.oversize {
            self.consider(&event);
        }
        self.partial = event;
        self.partial.clear();
        self.oversize = false;
    }

    fn consider(&mut self, event: &[u8]) {
        if event.len() > MAX_EVENT_BYTES || !self.usage_key.has_object(event) {
            return;
        }
        self.scratch.clear();
        scan::event_data(event, &mut self.scratch);
        if let Some(tally) = self.anthropic.as_mut() {
            if let Some(root) = self.buffers.parse(&mut self.scratch) {
                if tally.add_event(&root) {
                    self.found = tally.found();
                }
            }
            return;
        }
        let parsed = match self.shared.as_ref().and_then(|s| s.take_if(&self.scratch)) {
            Some(found) => found,
            None => usage::from_event_json(&mut self.scratch, &mut self.buffers),
        };
        if let Some(found) = parsed {
            self.found = Some(found);
        }
    }
}

/// Removes usage-only events (data JSON with `"choices": []` and a non-null top-level `usage`,
/// with their trailing blank line) from the client's stream; every other byte passes unchanged
/// and in order, whatever the splits.
///
/// Latency: an event completed by a push is forwarded (or dropped) in that push. Of the
/// unfinished event at the end of a push, bytes are held back only while it may still be
/// usage-only; it is forwarded as soon as its bytes show that it cannot be: its first line is not
/// a `data:` field, its first `"choices"` is a non-empty array or not an array, or it outgrew
/// [`MAX_HELD_BYTES`]. Such events are never stripped, even when complete. So an ordinary
/// content chunk is held only until its `"choices":[{` has arrived.
#[derive(Debug)]
pub struct UsageOnlyStripper {
    framer: Framer,
    /// The unfinished event's bytes while it may still be usage-only.
    held: Vec<u8>,
    /// The unfinished event cannot be usage-only: its bytes are forwarded as they come.
    passing: bool,
    /// The last event ended on a CR at the end of a push: Some(dropped) says what becomes of a
    /// LF that completes it.
    lf_after: Option<bool>,
    classifier: Classifier,
}

impl Default for UsageOnlyStripper {
    fn default() -> Self {
        Self {
            framer: Framer::default(),
            held: Vec::new(),
            passing: false,
            lf_after: None,
            classifier: Classifier {
                usage_key: KeyFinder::usage(),
                choices_key: KeyFinder::choices(),
                scratch: Vec::new(),
                buffers: ParseBuffers::default(),
                shared: None,
            },
        }
    }
}

impl UsageOnlyStripper {
    /// A stripper that leaves the usage of each usage-only event it parses to its scanner.
    pub fn sharing(shared: SharedParse) -> UsageOnlyStripper {
        let mut stripper = UsageOnlyStripper::default();
        stripper.classifier.shared = Some(shared);
        stripper
    }

    /// Appends to `out` the bytes of `input` (and of earlier pushes, held back) to forward now.
    pub fn push(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        if !input.is_empty() {
            if let Some(dropped) = self.lf_after.take() {
                let (lf, rest) = input.split_at(self.framer.finish_crlf(input));
                if !dropped {
                    out.extend_from_slice(lf);
                }
                input = rest;
            }
        }
        while let Some(end) = self.framer.next_boundary(input) {
            let (last, rest) = input.split_at(end);
            let dropped = self.end_event(last, out);
            input = rest;
            if input.is_empty() && self.framer.awaits_lf() {
                self.lf_after = Some(dropped);
            }
        }
        if self.passing {
            out.extend_from_slice(input);
        } else if !input.is_empty() {
            self.held.extend_from_slice(input);
            if self.classifier.cannot_be_usage_only(&self.held) {
                out.extend_from_slice(&self.held);
                self.held.clear();
                self.passing = true;
            }
        }
    }

    /// End of stream: forwards what is held, unless it is a usage-only event (one that merely
    /// lacks its trailing blank line).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.end_event(&[], out);
        self.framer = Framer::default();
        self.lf_after = None;
    }

    /// Completes the current event with `last`; returns true if it was dropped.
    fn end_event(&mut self, last: &[u8], out: &mut Vec<u8>) -> bool {
        if std::mem::take(&mut self.passing) {
            out.extend_from_slice(last);
            return false;
        }
        let event = if self.held.is_empty() {
            last
        } else {
            self.held.extend_from_slice(last);
            &self.held
        };
        let dropped = self.classifier.is_usage_only(event);
        if !dropped {
            out.extend_from_slice(event);
        }
        self.held.clear();
        dropped
    }
}

#[derive(Debug)]
struct Classifier {
    usage_key: KeyFinder,
    choices_key: KeyFinder,
    scratch: Vec<u8>,
    buffers: ParseBuffers,
    shared: Option<SharedParse>,
}

impl Classifier {
    /// True when the bytes of an event, complete or not, already rule out usage-only. Stable:
    /// once true for some bytes, it is true for any longer bytes of the same event.
    fn cannot_be_usage_only(&self, event: &[u8]) -> bool {
        let n = event.len().min(5);
        event.get(..n) != b"data:".get(..n)
            || event.len() > MAX_HELD_BYTES
            || self.choices_key.array(event) == Choices::Other
    }

    /// Classifies a complete event; parses (a copy of) its data only when the prefilters match.
    fn is_usage_only(&mut self, event: &[u8]) -> bool {
        if event.is_empty() || self.cannot_be_usage_only(event) || !self.usage_key.has_object(event)
        {
            return false;
        }
        self.scratch.clear();
        scan::event_data(event, &mut self.scratch);
        // The data as the scanner will see it: simd-json is about to parse it in place.
        let data = self.shared.as_ref().map(|_| self.scratch.clone());
        let Some(root) = self.buffers.parse(&mut self.scratch) else {
            return false;
        };
        use simd_json::prelude::*;
        let no_choices = root
            .get_array("choices")
            .is_some_and(|choices| choices.is_empty());
        if let (Some(shared), Some(data)) = (&self.shared, data) {
            shared.remember(&data, usage::from_value(&root));
        }
        no_choices && root.get("usage").is_some_and(|u| !u.is_null())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::Usage;
    use serde_json::Value as Json;

    macro_rules! fixture {
        ($name:literal) => {
            (
                $name,
                include_bytes!(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/fixtures/sse/",
                    $name
                )) as &[u8],
            )
        };
    }

    const FIXTURES: &[(&str, &[u8])] = &[
        fixture!("openai-include-usage.sse"),
        fixture!("openai-include-usage-crlf.sse"),
        fixture!("openai-no-usage.sse"),
        fixture!("azure-filter-first-chunk.sse"),
        fixture!("groq-x-groq-usage.sse"),
        fixture!("groq-both-usages.sse"),
        fixture!("vllm-continuous-usage.sse"),
        fixture!("openai-error-midstream.sse"),
        fixture!("responses-api.sse"),
    ];

    /// Anthropic Messages streams (`"dialect": "anthropic"` in expected.json).
    const ANTHROPIC_FIXTURES: &[(&str, &[u8])] = &[
        fixture!("anthropic-messages.sse"),
        fixture!("anthropic-prompt-cache.sse"),
        fixture!("anthropic-cut-before-delta.sse"),
    ];

    const EXPECTED: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/sse/expected.json"
    ));

    fn expected(name: &str) -> (Option<Usage>, bool) {
        let all: Json = serde_json::from_str(EXPECTED).unwrap();
        let e = &all[name];
        assert!(e.is_object(), "{name} missing from expected.json");
        let usage = e["prompt"].as_u64().map(|p| Usage {
            prompt_tokens: p,
            completion_tokens: e["completion"].as_u64().unwrap(),
            cached_prompt_tokens: e["cached"].as_u64().unwrap_or(0),
            cache_write_prompt_tokens: e["cache_write"].as_u64().unwrap_or(0),
            ..Usage::default()
        });
        (usage, e["usage_only_event"].as_bool().unwrap())
    }

    #[test]
    fn the_anthropic_scanner_finds_expected_usage_at_every_split() {
        for (name, stream) in ANTHROPIC_FIXTURES {
            let (want, _) = expected(name);
            for (how, pieces) in splits(stream) {
                let mut s = UsageScanner::anthropic();
                for piece in &pieces {
                    s.feed(piece);
                }
                s.finish();
                assert_eq!(s.found().map(|f| f.usage), want, "{name}, {how}");
            }
            // Read as an OpenAI stream, the same bytes must not pass for usage: its
            // `message_start` carries none where OpenAI's would be.
            if want.is_some() {
                assert_ne!(
                    scan(&[stream]).map(|f| f.usage),
                    want,
                    "{name} read as OpenAI"
                );
            }
        }
    }

    #[test]
    fn every_fixture_is_listed() {
        let all: Json = serde_json::from_str(EXPECTED).unwrap();
        let names: Vec<&str> = FIXTURES
            .iter()
            .chain(ANTHROPIC_FIXTURES)
            .map(|f| f.0)
            .collect();
        for name in all.as_object().unwrap().keys() {
            assert!(names.contains(&name.as_str()), "{name} has no test");
        }
    }

    // ---- helpers -------------------------------------------------------------------------

    fn scan(pieces: &[&[u8]]) -> Option<Found> {
        let mut s = UsageScanner::default();
        for piece in pieces {
            s.feed(piece);
        }
        s.finish();
        s.found().cloned()
    }

    fn strip(pieces: &[&[u8]]) -> Vec<u8> {
        let (mut s, mut out) = (UsageOnlyStripper::default(), Vec::new());
        for piece in pieces {
            s.push(piece, &mut out);
        }
        s.finish(&mut out);
        out
    }

    /// Whole, split in two at every offset, and one byte at a time.
    fn splits(stream: &[u8]) -> Vec<(String, Vec<&[u8]>)> {
        let mut all = vec![("whole".to_owned(), vec![stream])];
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            all.push((format!("split at {cut}"), vec![a, b]));
        }
        all.push(("bytewise".to_owned(), stream.chunks(1).collect()));
        all
    }

    fn lossy(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    /// The reference: naive split into events (after normalising line ends), serde_json on each
    /// data payload, the same places and last-wins rule.
    fn reference(stream: &[u8]) -> Option<Found> {
        let text = lossy(stream).replace("\r\n", "\n").replace('\r', "\n");
        let mut found = None;
        for event in text.split("\n\n") {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|v| v.strip_prefix(' ').unwrap_or(v))
                .collect();
            let Ok(v) = serde_json::from_str::<Json>(&data.join("\n")) else {
                continue;
            };
            let usage = [&v["usage"], &v["x_groq"]["usage"], &v["response"]["usage"]]
                .into_iter()
                .find(|u| !u.is_null());
            let Some(u) = usage else { continue };
            let count = |a: &str, b: &str| u.get(a).or_else(|| u.get(b)).and_then(Json::as_u64);
            let cached = ["prompt_tokens_details", "input_tokens_details"]
                .iter()
                .find_map(|d| u[d]["cached_tokens"].as_u64());
            let model = v["model"].as_str().or(v["response"]["model"].as_str());
            found = Some(Found {
                usage: Usage {
                    prompt_tokens: count("prompt_tokens", "input_tokens").unwrap(),
                    completion_tokens: count("completion_tokens", "output_tokens").unwrap_or(0),
                    cached_prompt_tokens: cached.unwrap_or(0),
                    ..Usage::default()
                },
                model: model.filter(|m| !m.is_empty()).map(str::to_owned),
            });
        }
        found
    }

    fn is_usage_only_json(event: &str) -> bool {
        let data: String = event
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        serde_json::from_str::<Json>(&data).is_ok_and(|v| {
            v["choices"].as_array().is_some_and(Vec::is_empty) && !v["usage"].is_null()
        })
    }

    /// The fixture minus its usage-only events (found naively), and how many were removed.
    fn naive_strip(stream: &[u8]) -> (Vec<u8>, usize) {
        let text = lossy(stream);
        let sep = if text.contains("\r\n") {
            "\r\n\r\n"
        } else {
            "\n\n"
        };
        let (mut out, mut removed) = (String::new(), 0);
        for event in text.split_inclusive(sep) {
            if is_usage_only_json(event) {
                removed += 1;
            } else {
                out.push_str(event);
            }
        }
        (out.into_bytes(), removed)
    }

    // ---- fixtures --------------------------------------------------------------------------

    #[test]
    fn scanner_finds_expected_usage_in_every_fixture_at_every_split() {
        for (name, stream) in FIXTURES {
            let (want, _) = expected(name);
            for (how, pieces) in splits(stream) {
                let got = scan(&pieces).map(|f| f.usage);
                assert_eq!(got, want, "{name}: {how}");
            }
        }
    }

    #[test]
    fn a_shared_parse_finds_the_same_usage_at_every_split() {
        for (name, stream) in FIXTURES {
            let (want, _) = expected(name);
            for (how, pieces) in splits(stream) {
                let shared = SharedParse::default();
                let mut stripper = UsageOnlyStripper::sharing(shared.clone());
                let mut scanner = UsageScanner::sharing(shared);
                let mut out = Vec::new();
                for piece in &pieces {
                    stripper.push(piece, &mut out);
                    scanner.feed(piece);
                }
                stripper.finish(&mut out);
                scanner.finish();
                let got = scanner.found().cloned();
                assert_eq!(got.as_ref().map(|f| f.usage), want, "{name}: {how}");
                assert_eq!(got, scan(&[stream]), "{name}: {how}: model too");
            }
        }
    }

    #[test]
    fn scanner_agrees_with_reference_parse() {
        for (name, stream) in FIXTURES {
            let got = scan(&[stream]);
            assert_eq!(got, reference(stream), "{name}");
        }
    }

    #[test]
    fn scanner_reports_response_model() {
        let cases = [
            ("openai-include-usage.sse", Some("gpt-4o-mini-2024-07-18")),
            ("azure-filter-first-chunk.sse", Some("gpt-4o-2024-08-06")),
            ("groq-both-usages.sse", Some("llama-3.1-8b-instant")),
            (
                "vllm-continuous-usage.sse",
                Some("meta-llama/Llama-3.1-8B-Instruct"),
            ),
            ("responses-api.sse", Some("gpt-4o-mini-2024-07-18")),
            ("openai-no-usage.sse", None),
        ];
        for (name, model) in cases {
            let (_, stream) = FIXTURES.iter().find(|f| f.0 == name).unwrap();
            let got = scan(&[stream]);
            assert_eq!(
                got.as_ref().and_then(|f| f.model.as_deref()),
                model,
                "{name}"
            );
        }
    }

    #[test]
    fn stripper_removes_exactly_the_usage_only_event_at_every_split() {
        for (name, stream) in FIXTURES {
            let (_, usage_only) = expected(name);
            let (want, removed) = naive_strip(stream);
            assert_eq!(removed, usize::from(usage_only), "{name}: naive count");
            if !usage_only {
                assert_eq!(want, *stream, "{name}");
            }
            for (how, pieces) in splits(stream) {
                let got = strip(&pieces);
                assert!(got == want, "{name}: {how}:\n{}", lossy(&got));
            }
            for done in ["data: [DONE]\n\n", "data: [DONE]\r\n\r\n"] {
                if stream.ends_with(done.as_bytes()) {
                    assert!(strip(&[stream]).ends_with(done.as_bytes()), "{name}");
                }
            }
        }
    }

    // ---- edge cases ------------------------------------------------------------------------

    fn usage(p: u64, c: u64) -> Option<Usage> {
        Some(Usage {
            prompt_tokens: p,
            completion_tokens: c,
            cached_prompt_tokens: 0,
            ..Usage::default()
        })
    }

    const CONTENT: &str =
        r#"{"model":"m","choices":[{"index":0,"delta":{"content":"x"}}],"usage":null}"#;
    const FINAL: &str =
        r#"{"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#;

    /// (event bytes, is usage-only) in stream order.
    type Parts = Vec<(String, bool)>;

    /// Streams built from (event, is usage-only) parts: the scanner's usage and the stripper's
    /// output must hold at every split.
    #[test]
    fn edge_case_streams_at_every_split() {
        let data = |json: &str, sep: &str| format!("data: {json}{sep}");
        let multi = "data: {\"model\":\"m\",\"choices\":[],\ndata: \"usage\" :\ndata:  {\"prompt_tokens\":3,\ndata:\"completion_tokens\":1}}\n\n";
        let cases: Vec<(&str, Parts, Option<Usage>)> = vec![
            (
                "spaces around colon",
                vec![
                    (data(CONTENT, "\n\n"), false),
                    (
                        data(
                            r#"{"choices" : [ ] , "usage" : {"prompt_tokens":3,"completion_tokens":1}}"#,
                            "\n\n",
                        ),
                        true,
                    ),
                ],
                usage(3, 1),
            ),
            (
                "usage null on every chunk",
                vec![
                    (data(CONTENT, "\n\n"), false),
                    (data(CONTENT, "\n\n"), false),
                    (data("[DONE]", "\n\n"), false),
                ],
                None,
            ),
            (
                "multi-line data",
                vec![(data(CONTENT, "\n\n"), false), (multi.to_owned(), true)],
                usage(3, 1),
            ),
            (
                "CR CR separators",
                vec![
                    (data(CONTENT, "\r\r"), false),
                    (data(FINAL, "\r\r"), true),
                    (data("[DONE]", "\r\r"), false),
                ],
                usage(3, 1),
            ),
            (
                "mixed separators",
                vec![
                    (data(CONTENT, "\n\r\n"), false),
                    (data(CONTENT, "\r\n\n"), false),
                    (data(FINAL, "\r\n\r\n"), true),
                    (data("[DONE]", "\r\r"), false),
                    (": keep-alive\n\n".to_owned(), false),
                ],
                usage(3, 1),
            ),
            (
                "no trailing blank line",
                vec![(data(CONTENT, "\n\n"), false), (data(FINAL, "\n"), true)],
                usage(3, 1),
            ),
            (
                "no trailing line end",
                vec![(data(CONTENT, "\r\n\r\n"), false), (data(FINAL, ""), true)],
                usage(3, 1),
            ),
            (
                "other fields before data are kept",
                vec![
                    (format!("event: x\ndata: {FINAL}\n\n"), false),
                    (data(CONTENT, "\n\n"), false),
                ],
                usage(3, 1),
            ),
            (
                "usage as a string value is not usage",
                vec![(
                    data(
                        r#"{"choices":[],"x":"\"usage\":{\"prompt_tokens\":9}"}"#,
                        "\n\n",
                    ),
                    false,
                )],
                None,
            ),
            (
                "choices null with usage is kept",
                vec![(
                    data(
                        r#"{"choices":null,"usage":{"prompt_tokens":3,"completion_tokens":1}}"#,
                        "\n\n",
                    ),
                    false,
                )],
                usage(3, 1),
            ),
            (
                "invalid usage does not replace a valid one",
                vec![
                    (data(FINAL, "\n\n"), true),
                    (
                        data(
                            r#"{"choices":[{"index":0}],"usage":{"prompt_tokens":-3}}"#,
                            "\n\n",
                        ),
                        false,
                    ),
                ],
                usage(3, 1),
            ),
            (
                "empty events and leading blank lines",
                vec![
                    ("\n".to_owned(), false),
                    ("\r\n".to_owned(), false),
                    (data(FINAL, "\n\n"), true),
                    ("\n".to_owned(), false),
                ],
                usage(3, 1),
            ),
        ];
        for (name, parts, want) in cases {
            let stream: String = parts.iter().map(|p| p.0.as_str()).collect();
            let stripped: String = parts
                .iter()
                .filter(|p| !p.1)
                .map(|p| p.0.as_str())
                .collect();
            for (how, pieces) in splits(stream.as_bytes()) {
                assert_eq!(scan(&pieces).map(|f| f.usage), want, "{name}: {how}");
                let got = strip(&pieces);
                assert!(
                    got == stripped.as_bytes(),
                    "{name}: {how}:\n{:?}",
                    lossy(&got)
                );
            }
        }
    }

    #[test]
    fn split_inside_the_usage_key() {
        let stream = format!("data: {CONTENT}\n\ndata: {FINAL}\n\ndata: [DONE]\n\n");
        let cut = stream.rfind("\"usa").unwrap() + 4;
        assert_eq!(&stream[cut - 4..cut + 3], "\"usage\"");
        let (a, b) = stream.as_bytes().split_at(cut);
        assert_eq!(scan(&[a, b]).map(|f| f.usage), usage(3, 1));
        assert_eq!(
            lossy(&strip(&[a, b])),
            format!("data: {CONTENT}\n\ndata: [DONE]\n\n")
        );
    }

    #[test]
    fn vllm_last_usage_wins_and_is_never_summed() {
        let ev = |c: u64| {
            format!("data: {{\"choices\":[{{\"index\":0}}],\"usage\":{{\"prompt_tokens\":7,\"completion_tokens\":{c}}}}}\n\n")
        };
        let stream = format!("{}{}{}", ev(1), ev(2), ev(3));
        assert_eq!(scan(&[stream.as_bytes()]).map(|f| f.usage), usage(7, 3));
    }

    #[test]
    fn oversize_event_is_skipped_not_buffered() {
        let padding = "x".repeat(MAX_EVENT_BYTES);
        let big = format!(
            "data: {{\"choices\":[],\"pad\":\"{padding}\",\"usage\":{{\"prompt_tokens\":999,\"completion_tokens\":9}}}}\n\n"
        );
        let small = format!("data: {FINAL}\n\n");
        for first in [big.as_str(), small.as_str()] {
            let stream = if first == small {
                format!("{small}{big}")
            } else {
                format!("{big}{small}")
            };
            let want = usage(3, 1);
            for pieces in [
                vec![stream.as_bytes()],
                stream.as_bytes().chunks(4096).collect(),
                stream.as_bytes().chunks(MAX_EVENT_BYTES / 2 + 7).collect(),
            ] {
                let mut s = UsageScanner::default();
                for piece in &pieces {
                    s.feed(piece);
                    assert!(s.partial.len() <= MAX_EVENT_BYTES);
                }
                s.finish();
                assert_eq!(s.found().map(|f| f.usage), want);
                // Too big to hold: the stripper forwards it, dropping only the small one.
                let got = strip(&pieces);
                assert!(got == big.as_bytes(), "{} bytes", got.len());
            }
        }
    }

    #[test]
    fn stripper_forwards_an_event_that_outgrows_the_hold_cap() {
        let padding = "x".repeat(MAX_HELD_BYTES);
        let big = format!(
            "data: {{\"choices\":[],\"pad\":\"{padding}\",\"usage\":{{\"prompt_tokens\":4,\"completion_tokens\":2}}}}\n\n"
        );
        let stream = format!("{big}data: [DONE]\n\n");
        for size in [1000, 4096, stream.len()] {
            let pieces: Vec<&[u8]> = stream.as_bytes().chunks(size).collect();
            let (mut s, mut out) = (UsageOnlyStripper::default(), Vec::new());
            for piece in &pieces {
                s.push(piece, &mut out);
                assert!(s.held.len() <= MAX_HELD_BYTES);
            }
            s.finish(&mut out);
            assert!(out == stream.as_bytes(), "chunks of {size}");
            assert_eq!(scan(&pieces).map(|f| f.usage), usage(4, 2), "still billed");
        }
    }

    #[test]
    fn stripper_latency() {
        let (mut s, mut out) = (UsageOnlyStripper::default(), Vec::new());
        let content = format!("data: {CONTENT}\n\n");
        let content = content.as_bytes();
        // A complete event is forwarded in the push that completes it.
        s.push(content, &mut out);
        assert_eq!(out, content);
        // An unfinished content chunk is held until its choices show it non-empty, then flows.
        let at = content
            .windows(12)
            .position(|w| w == br#""choices":[{"#)
            .unwrap()
            + 11;
        out.clear();
        s.push(&content[..at], &mut out);
        assert!(out.is_empty(), "held: choices not seen yet");
        s.push(&content[at..at + 1], &mut out);
        assert_eq!(
            out,
            &content[..=at],
            "released once choices shows non-empty"
        );
        s.push(&content[at + 1..at + 2], &mut out);
        assert_eq!(out, &content[..at + 2], "then forwarded byte by byte");
        s.push(&content[at + 2..], &mut out);
        assert_eq!(out, content);
        // A non-data event flows from its first bytes.
        out.clear();
        s.push(b"event: ping\ndata: {", &mut out);
        assert_eq!(out, b"event: ping\ndata: {");
        s.push(b"}\n\n", &mut out);
        // A usage-only candidate is held until complete, then dropped; [DONE] flows.
        out.clear();
        let last = format!("data: {FINAL}\n\n");
        s.push(&last.as_bytes()[..20], &mut out);
        assert!(out.is_empty());
        s.push(&last.as_bytes()[20..], &mut out);
        assert!(out.is_empty());
        s.push(b"data: [DONE]\n\n", &mut out);
        assert_eq!(out, b"data: [DONE]\n\n");
        // Azure's first chunk (choices [] without usage) is held until complete, then kept.
        let azure = br#"data: {"choices":[],"prompt_filter_results":[]}"#;
        out.clear();
        s.push(azure, &mut out);
        assert!(out.is_empty());
        s.push(b"\r\n\r", &mut out);
        assert_eq!(out.len(), azure.len() + 3, "complete at the second CR");
        s.push(b"\n", &mut out);
        s.finish(&mut out);
        assert_eq!(out, [&azure[..], b"\r\n\r\n"].concat());
    }

    /// Token soups: no panic, and the outcome never depends on how the input is split.
    #[test]
    fn garbage_is_split_invariant() {
        let tokens: &[&[u8]] = &[
            b"data:",
            b"data: ",
            b"event: x",
            b":",
            b"\n",
            b"\r",
            b"\r\n",
            b"{",
            b"}",
            b"[",
            b"]",
            b"\"usage\"",
            b"\"choices\"",
            b":[]",
            b"null",
            b",",
            b" ",
            b"1",
            b"-1",
            b"\"",
            b"\xff",
            br#"{"prompt_tokens":5,"completion_tokens":2}"#,
            b"[DONE]",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: usize| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize % n
        };
        for round in 0..300 {
            let mut stream = Vec::new();
            for _ in 0..next(60) {
                stream.extend_from_slice(tokens[next(tokens.len())]);
            }
            if round % 3 == 0 {
                stream.extend_from_slice(format!("data: {FINAL}\n\n").as_bytes());
            }
            let whole_usage = scan(&[&stream]);
            let whole_out = strip(&[&stream]);
            for (how, pieces) in splits(&stream) {
                assert_eq!(scan(&pieces), whole_usage, "{}: {how}", lossy(&stream));
                assert!(strip(&pieces) == whole_out, "{}: {how}", lossy(&stream));
            }
        }
    }
}
