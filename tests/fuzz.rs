//! Fuzzing every parser that reads bytes from outside: the request head, the response head,
//! the chunked decoder (and encoder), the SSE usage scanner and usage-event stripper, the chat
//! body rewrite, and the usage parse (whole body, event, and as a body streams).
//!
//! A mutation fuzzer on stable Rust (nightly, and so cargo-fuzz, cannot be had here): inputs
//! from the checked-in corpus (tests/fuzz/corpus/<target>/, from the suite's own inputs, and
//! the provider-shaped streams in tests/fixtures/sse/) are mutated (bit flips, bytes set, inserted, deleted, duplicated,
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

#[path = "fuzz/targets.rs"]
mod targets;

use targets::{Rng, Target, TARGETS};

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

/// The target's corpus, and for every target the SSE fixtures (any bytes are fair
/// input to any parser).
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let mut inputs = Vec::new();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sse");
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
