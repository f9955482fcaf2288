//! Micro-benchmarks of the per-request pure work on the relay's hot path: the usage scanner and
//! the usage-event stripper over a whole OpenAI stream fed in realistic reads, the body rewrite,
//! and the chunked decoder. `cargo bench --bench hot_path`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use aura::http::chunked::{encode_chunk, ChunkedDecoder, LAST_CHUNK};
use aura::rewrite::rewrite_chat_body;
use aura::sse::{UsageOnlyStripper, UsageScanner};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const FIXTURE: &[u8] = include_bytes!("../tests/fixtures/sse/openai-include-usage.sse");

/// A 20-content-event OpenAI stream with the usage event last (about 5 KB), split per event
/// the way upstreams write it.
fn stream_events() -> Vec<Vec<u8>> {
    let text = std::str::from_utf8(FIXTURE).unwrap();
    let events: Vec<&str> = text.split_inclusive("\n\n").collect();
    let content = events[1];
    let mut out = vec![events[0].as_bytes().to_vec()];
    out.extend((0..20).map(|_| content.as_bytes().to_vec()));
    out.extend(
        events[events.len() - 3..]
            .iter()
            .map(|e| e.as_bytes().to_vec()),
    );
    out
}

fn scanner(c: &mut Criterion) {
    let events = stream_events();
    let total: usize = events.iter().map(Vec::len).sum();
    let mut group = c.benchmark_group("sse");
    group.throughput(Throughput::Bytes(total as u64));
    group.bench_function("usage_scanner_per_stream", |b| {
        b.iter(|| {
            let mut scanner = UsageScanner::default();
            for event in &events {
                scanner.feed(black_box(event));
            }
            scanner.finish();
            black_box(scanner.found().is_some())
        })
    });
    group.bench_function("usage_only_stripper_per_stream", |b| {
        let mut out = Vec::with_capacity(total);
        b.iter(|| {
            out.clear();
            let mut stripper = UsageOnlyStripper::default();
            for event in &events {
                stripper.push(black_box(event), &mut out);
            }
            stripper.finish(&mut out);
            black_box(out.len())
        })
    });
    let whole: Vec<u8> = events.concat();
    for read in [64usize, 1024, 16 * 1024] {
        group.bench_with_input(
            BenchmarkId::new("usage_scanner_by_read_size", read),
            &read,
            |b, &read| {
                b.iter(|| {
                    let mut scanner = UsageScanner::default();
                    for piece in whole.chunks(read) {
                        scanner.feed(black_box(piece));
                    }
                    scanner.finish();
                    black_box(scanner.found().is_some())
                })
            },
        );
    }
    group.finish();
}

fn rewrite(c: &mut Criterion) {
    let message = r#"{"role":"user","content":"Summarise the following text, keeping \"quotes\" and {braces} intact."}"#;
    let messages = vec![message; 60].join(",");
    let body = format!(
        r#"{{"model":"gpt-4o-mini","messages":[{messages}],"temperature":0.2,"stream":true}}"#
    );
    let mut group = c.benchmark_group("rewrite");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function(format!("inject_include_usage_{}b", body.len()), |b| {
        b.iter(|| black_box(rewrite_chat_body(black_box(body.as_bytes())).unwrap()))
    });
    group.finish();
}

fn chunked(c: &mut Criterion) {
    let mut encoded = Vec::new();
    for event in stream_events() {
        encode_chunk(&event, &mut encoded);
    }
    encoded.extend_from_slice(LAST_CHUNK);
    let mut group = c.benchmark_group("chunked");
    group.throughput(Throughput::Bytes(encoded.len() as u64));
    group.bench_function("decode_stream", |b| {
        let mut out = Vec::with_capacity(encoded.len());
        b.iter(|| {
            out.clear();
            let mut decoder = ChunkedDecoder::default();
            black_box(decoder.decode(black_box(&encoded), &mut out).unwrap())
        })
    });
    group.finish();
}

criterion_group!(benches, scanner, rewrite, chunked);
criterion_main!(benches);
