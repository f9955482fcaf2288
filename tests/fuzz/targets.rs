//! The fuzz targets and their oracles, shared by the suite's mutation fuzzer (tests/fuzz.rs)
//! and the coverage-guided one (tests/fuzz/afl, AFL++ through cargo-afl). Each takes the input
//! and a random source for the ways it is split across reads; `Err` names a failed oracle.

use aura::http::chunked::{encode_chunk, ChunkedDecoder};
use aura::sse::{UsageOnlyStripper, UsageScanner};
use aura::usage::body::BodyUsage;

/// A target: the input and a random source for its splits; `Err` when an oracle fails.
pub type Target = fn(&[u8], &mut Rng) -> Result<(), String>;

pub const TARGETS: &[(&str, Target)] = &[
    ("request_head", request_head),
    ("response_head", response_head),
    ("chunked", chunked),
    ("sse", sse),
    ("rewrite", rewrite),
    ("usage", usage),
];

/// xorshift64*: small, seeded, repeatable.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    /// Cut points splitting `len` bytes into pieces, as reads would.
    pub fn splits(&mut self, len: usize) -> Vec<usize> {
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

pub fn pieces<'a>(input: &'a [u8], cuts: &[usize]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let cuts = cuts.to_vec();
    (0..cuts.len().saturating_sub(1)).map(move |i| &input[cuts[i]..cuts[i + 1]])
}

/// A head parses the same from any prefix that holds it; the framing never panics.
pub fn request_head(input: &[u8], _: &mut Rng) -> Result<(), String> {
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

pub fn response_head(input: &[u8], _: &mut Rng) -> Result<(), String> {
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
pub fn chunked(input: &[u8], rng: &mut Rng) -> Result<(), String> {
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
pub fn sse(input: &[u8], rng: &mut Rng) -> Result<(), String> {
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
pub fn rewrite(input: &[u8], _: &mut Rng) -> Result<(), String> {
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
pub fn usage(input: &[u8], rng: &mut Rng) -> Result<(), String> {
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
