//! Fuzzing every parser that reads bytes from outside: the request head, the response head,
//! the chunked decoder (and encoder), the SSE usage scanner and usage-event stripper, the chat
//! body rewrite, and the usage parse (whole body, event, and as a body streams).
//!
//! A mutation fuzzer on stable Rust (nightly, and so cargo-fuzz, cannot be had here): inputs
//! from the checked-in corpus (tests/fuzz/corpus/<target>/, seeded from the shared SSE fixtures
//! and the suite's own inputs) are mutated (bit flips, bytes set, inserted, deleted, duplicated,
//! spliced from other inputs, tokens of the format inserted) and fed to each target, whose
//! oracle checks more than "no panic": the same result however the input is split across
//! reads, a decode of an encode gives the input back, a streamed usage parse agrees with the
//! whole-body one.
//!
//! `cargo nextest run --test fuzz` replays the corpus and fuzzes each target for
//! `AURA_FUZZ_SECONDS` (default 3); `scripts/fuzz` runs longer. `AURA_FUZZ_SEED` repeats a run.
//! An input that fails is written to tests/fuzz/crashes/ and named in the failure: fixed, it
//! moves to the corpus, where every run replays it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aura::http::chunked::{encode_chunk, ChunkedDecoder};
use aura::sse::{UsageOnlyStripper, UsageScanner};
use aura::usage::body::BodyUsage;

/// A target: the input and a random source for its splits; `Err` when an oracle fails.
type Target = fn(&[u8], &mut Rng) -> Result<(), String>;

const TARGETS: &[(&str, Target)] = &[
    ("request_head", request_head),
    ("response_head", response_head),
    ("chunked", chunked),
    ("sse", sse),
    ("rewrite", rewrite),
    ("usage", usage),
];

/// Tokens of the formats, inserted whole by the mutator.
const TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"\n\n",
    b"\r\n\r\n",
    b"0\r\n\r\n",
    b"ffffffffffffffff\r\n",
    b";ext=1",
    b"data: ",
    b"data:[DONE]\n\n",
    b"event: response.completed\n",
    b": comment\n",
    b"transfer-encoding: chunked\r\n",
    b"content-length: 5\r\n",
    b"content-length: -1\r\n",
    b"host: x\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}",
    b"\"stream\":true",
    b"\"stream_options\":{\"include_usage\":true}",
    b"\"model\":\"gpt-4o\"",
    b"\\u0000",
    b"\\\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\"",
    b"18446744073709551616",
    b"-0.0e-0",
];

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target)
}

/// The target's corpus, and for every target the shared SSE fixtures (any bytes are fair
/// input to any parser).
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let mut inputs = Vec::new();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/sse");
    for dir in [corpus_dir(target), fixtures] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            if let Ok(bytes) = std::fs::read(&path) {
                inputs.push(bytes);
            }
        }
    }
    assert!(!inputs.is_empty(), "no corpus for {target}");
    inputs
}

/// xorshift64*: small, seeded, repeatable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    /// Cut points splitting `len` bytes into pieces, as reads would.
    fn splits(&mut self, len: usize) -> Vec<usize> {
        let mut cuts: Vec<usize> = (0..self.below(8)).map(|_| self.below(len + 1)).collect();
        if self.below(4) == 0 {
            // Now and then every byte alone.
            cuts = (0..=len).collect();
        }
        cuts.push(0);
        cuts.push(len);
        cuts.sort_unstable();
        cuts.dedup();
        cuts
    }
}

fn pieces<'a>(input: &'a [u8], cuts: &[usize]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let cuts = cuts.to_vec();
    (0..cuts.len().saturating_sub(1)).map(move |i| &input[cuts[i]..cuts[i + 1]])
}

fn mutate(input: &[u8], corpus: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(7) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = rng.next() as u8;
            }
            2 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                out.splice(at..at, token.iter().copied());
            }
            3 if !out.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(out.len());
                out.drain(at.min(end)..end);
            }
            4 if !out.is_empty() => {
                let start = rng.below(out.len());
                let end = (start + 1 + rng.below(64)).min(out.len());
                let copy = out[start..end].to_vec();
                out.splice(at..at, copy);
            }
            5 => {
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let start = rng.below(other.len());
                    let end = (start + 1 + rng.below(256)).min(other.len());
                    out.splice(at..at, other[start..end].iter().copied());
                }
            }
            _ => {
                let bytes: Vec<u8> = (0..rng.below(8)).map(|_| rng.next() as u8).collect();
                out.splice(at..at, bytes);
            }
        }
    }
    out.truncate(1 << 20);
    out
}

/// Runs `target` on `input`; a panic or a failed oracle is written to the crashes directory.
fn check(name: &str, target: Target, input: &[u8], rng: &mut Rng) {
    let outcome = catch_unwind(AssertUnwindSafe(|| target(input, rng)));
    let failure = match outcome {
        Ok(Ok(())) => return,
        Ok(Err(oracle)) => oracle,
        Err(panic) => panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into()),
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/crashes");
    std::fs::create_dir_all(&dir).unwrap();
    let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    let path = dir.join(format!("{name}-{hash:016x}"));
    std::fs::write(&path, input).unwrap();
    panic!("{name}: {failure}; input written to {}", path.display());
}

fn seconds() -> Duration {
    let secs = std::env::var("AURA_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(secs)
}

fn seed() -> u64 {
    std::env::var("AURA_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        })
}

fn fuzz(name: &str, target: Target) {
    let corpus = corpus(name);
    let seed = seed();
    println!("{name}: seed {seed} (AURA_FUZZ_SEED repeats it)");
    let mut rng = Rng(seed);
    for input in &corpus {
        check(name, target, input, &mut rng);
    }
    let deadline = Instant::now() + seconds();
    let mut runs = 0u64;
    while Instant::now() < deadline {
        for _ in 0..64 {
            let base = &corpus[rng.below(corpus.len())];
            let input = mutate(base, &corpus, &mut rng);
            check(name, target, &input, &mut rng);
            runs += 1;
        }
    }
    println!("{name}: {runs} mutated inputs, every oracle held");
}

macro_rules! fuzz_targets {
    ($($name:ident),+ $(,)?) => {$(
        #[test]
        fn $name() {
            let (name, target) = TARGETS
                .iter()
                .find(|(n, _)| *n == stringify!($name))
                .copied()
                .unwrap();
            fuzz(name, target);
        }
    )+};
}

mod fuzzing {
    use super::*;
    fuzz_targets!(request_head, response_head, chunked, sse, rewrite, usage);
}

// ---- The targets and their oracles.

/// A head parses the same from any prefix that holds it; the framing never panics.
fn request_head(input: &[u8], _: &mut Rng) -> Result<(), String> {
    let parsed = aura::http::parse_request(input, 100);
    if let Ok(Some(head)) = &parsed {
        if head.len > input.len() {
            return Err(format!("head of {} bytes in {}", head.len, input.len()));
        }
        let _ = aura::http::request_framing(head);
        let again = aura::http::parse_request(&input[..head.len], 100);
        match again {
            Ok(Some(h)) if h.len == head.len && h.target == head.target => {}
            other => return Err(format!("its own head parses as {other:?}")),
        }
    }
    Ok(())
}

fn response_head(input: &[u8], _: &mut Rng) -> Result<(), String> {
    if let Ok(Some(head)) = aura::http::parse_response(input, 100) {
        if head.len > input.len() {
            return Err(format!("head of {} bytes in {}", head.len, input.len()));
        }
        for method in [http::Method::GET, http::Method::HEAD, http::Method::POST] {
            let _ = aura::http::response_framing(&method, &head);
        }
    }
    Ok(())
}

/// Decoding gives the same however the input is split; an encoded payload decodes to itself.
fn chunked(input: &[u8], rng: &mut Rng) -> Result<(), String> {
    let whole = decode_all(&[input]);
    let cuts = rng.splits(input.len());
    let split: Vec<&[u8]> = pieces(input, &cuts).collect();
    let by_pieces = decode_all(&split);
    if whole != by_pieces {
        return Err(format!("whole {whole:?}, split at {cuts:?} {by_pieces:?}"));
    }
    let mut encoded = Vec::new();
    encode_chunk(input, &mut encoded);
    encoded.extend_from_slice(aura::http::chunked::LAST_CHUNK);
    match decode_all(&[&encoded]) {
        Ok((payload, true, _)) if payload == input => Ok(()),
        other => Err(format!("encode then decode gave {other:?}")),
    }
}

/// Feeds `reads` as a relay would (unconsumed bytes stay for the next read): the payload, done,
/// and the bytes consumed; or the error.
fn decode_all(reads: &[&[u8]]) -> Result<(Vec<u8>, bool, usize), String> {
    let mut decoder = ChunkedDecoder::default();
    let mut pending: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    let mut consumed = 0;
    for read in reads {
        pending.extend_from_slice(read);
        let decoded = decoder
            .decode(&pending, &mut out)
            .map_err(|e| e.to_string())?;
        consumed += decoded.consumed;
        pending.drain(..decoded.consumed);
        if decoded.done {
            return Ok((out, true, consumed));
        }
    }
    Ok((out, false, consumed))
}

/// The usage found, and the stream with the usage-only event stripped, are the same however
/// the stream is split.
fn sse(input: &[u8], rng: &mut Rng) -> Result<(), String> {
    let scan = |reads: &[&[u8]]| {
        let mut scanner = UsageScanner::default();
        for read in reads {
            scanner.feed(read);
        }
        scanner.finish();
        scanner.found().cloned()
    };
    let strip = |reads: &[&[u8]]| {
        let mut stripper = UsageOnlyStripper::default();
        let mut out = Vec::new();
        for read in reads {
            stripper.push(read, &mut out);
        }
        stripper.finish(&mut out);
        out
    };
    let cuts = rng.splits(input.len());
    let split: Vec<&[u8]> = pieces(input, &cuts).collect();
    let (found, found_split) = (scan(&[input]), scan(&split));
    if found != found_split {
        return Err(format!(
            "usage {found:?}, split at {cuts:?} {found_split:?}"
        ));
    }
    let (stripped, stripped_split) = (strip(&[input]), strip(&split));
    if stripped != stripped_split {
        return Err(format!("stripped output differs when split at {cuts:?}"));
    }
    if stripped.len() > input.len() {
        return Err("stripping added bytes".into());
    }
    Ok(())
}

/// A rewritten body is JSON that asks for the usage of a stream.
fn rewrite(input: &[u8], _: &mut Rng) -> Result<(), String> {
    let Ok(rewrite) = aura::rewrite::rewrite_chat_body(input) else {
        return Ok(());
    };
    if let Some(body) = &rewrite.body {
        let original: Result<serde_json::Value, _> = serde_json::from_slice(input);
        let value: serde_json::Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            // Only a body that was not JSON to begin with may come out as none.
            Err(e) if original.is_ok() => return Err(format!("rewrite is not JSON: {e}")),
            Err(_) => return Ok(()),
        };
        if rewrite.request.stream
            && original.is_ok()
            && value["stream_options"]["include_usage"] != serde_json::Value::Bool(true)
        {
            return Err("a stream's rewrite does not ask for usage".into());
        }
    }
    Ok(())
}

/// The usage read as a body streams is the usage of the whole body, for JSON bodies within the
/// streaming reader's bounds (no escapes, under 64 KiB); no parse panics.
fn usage(input: &[u8], rng: &mut Rng) -> Result<(), String> {
    let mut copy = input.to_vec();
    let whole = aura::usage::from_body_json(&mut copy);
    let mut copy = input.to_vec();
    let _ = aura::usage::from_event_json(&mut copy, &mut Default::default());
    let mut streamed = BodyUsage::default();
    let cuts = rng.splits(input.len());
    for piece in pieces(input, &cuts) {
        streamed.feed(piece);
    }
    let streamed = streamed.finish();
    // The streaming reader checks only the structure it walks: a body the whole-body parser
    // (simd-json) refuses (bytes that are not UTF-8 in a string it skips, a bare word, a number
    // past 2^64) may still give it a usage. What a body simd-json reads says, it reads the same.
    let within_bounds = !input.contains(&b'\\') && input.len() < 64 * 1024;
    let mut copy = input.to_vec();
    let json = simd_json::to_borrowed_value(&mut copy).is_ok();
    if within_bounds && json && streamed != whole {
        return Err(format!(
            "streamed {streamed:?}, whole {whole:?} (split at {cuts:?})"
        ));
    }
    Ok(())
}

/// Every file in the corpus (crashes fixed included) passes, whatever the seed.
#[test]
fn the_corpus_replays_clean() {
    for (name, target) in TARGETS {
        let mut rng = Rng(1);
        for input in corpus(name) {
            check(name, *target, &input, &mut rng);
        }
    }
}
