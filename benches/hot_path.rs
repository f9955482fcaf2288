//! Micro-benchmarks of the per-request pure work on the relay's hot path: the usage scanner and
//! the usage-event stripper over a whole OpenAI stream fed in realistic reads, the scanner's
//! throughput by read size with and without usage, HTTP head parsing, the body rewrite, the
//! chunked decoder, metrics (recording one request; a two-worker scrape), and budgets (reserve and
//! settle in a shard, price lookup and cost, key id), and routing (choosing an upstream and
//! judging its answer).
//! `cargo bench --bench hot_path`.
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
    // The relay's order: stripper, then scanner, on each read; apart, or sharing one parse.
    let relay = |out: &mut Vec<u8>, shared: Option<aura::sse::SharedParse>| {
        out.clear();
        let (mut stripper, mut scanner) = match shared {
            Some(s) => (
                UsageOnlyStripper::sharing(s.clone()),
                UsageScanner::sharing(s),
            ),
            None => (UsageOnlyStripper::default(), UsageScanner::default()),
        };
        for event in &events {
            stripper.push(black_box(event), out);
            scanner.feed(event);
        }
        stripper.finish(out);
        scanner.finish();
        scanner.found().is_some()
    };
    let mut out = Vec::with_capacity(total);
    group.bench_function("stripper_then_scanner_per_stream", |b| {
        b.iter(|| black_box(relay(&mut out, None)))
    });
    group.bench_function("stripper_then_scanner_sharing_the_parse_per_stream", |b| {
        b.iter(|| black_box(relay(&mut out, Some(aura::sse::SharedParse::default()))))
    });
    group.finish();

    // Throughput by read size, with the usage event (and `"usage":null` in every chunk, as
    // OpenAI sends once include_usage is on) and without (an upstream that ignores it).
    let with_usage: Vec<u8> = events.concat();
    let without_usage = String::from_utf8(with_usage.clone())
        .unwrap()
        .split_inclusive("\n\n")
        .filter(|e| !e.contains("\"choices\":[]"))
        .map(|e| e.replace(",\"usage\":null", ""))
        .collect::<String>()
        .into_bytes();
    let mut group = c.benchmark_group("sse_scanner_by_read_size");
    for (label, stream, has_usage) in [
        ("with_usage", &with_usage, true),
        ("without_usage", &without_usage, false),
    ] {
        group.throughput(Throughput::Bytes(stream.len() as u64));
        for read in [64usize, 512, 4096, 16 * 1024] {
            group.bench_with_input(BenchmarkId::new(label, read), &read, |b, &read| {
                b.iter(|| {
                    let mut scanner = UsageScanner::default();
                    for piece in stream.chunks(read) {
                        scanner.feed(black_box(piece));
                    }
                    scanner.finish();
                    assert_eq!(scanner.found().is_some(), has_usage);
                })
            });
        }
    }
    group.finish();
}

/// The request head the openai Python SDK sends, and an OpenAI-like response head.
fn heads(c: &mut Criterion) {
    let request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost:8080\r\nAccept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\nAccept: application/json\r\nContent-Type: application/json\r\nUser-Agent: OpenAI/Python 1.54.0\r\nX-Stainless-Lang: python\r\nX-Stainless-Package-Version: 1.54.0\r\nX-Stainless-OS: Linux\r\nX-Stainless-Arch: x64\r\nX-Stainless-Runtime: CPython\r\nX-Stainless-Runtime-Version: 3.11.7\r\nAuthorization: Bearer sk-proj-0123456789abcdefghijklmnopqrstuvwxyz\r\nX-Stainless-Async: false\r\nx-stainless-retry-count: 0\r\nContent-Length: 151\r\n\r\n";
    let response = b"HTTP/1.1 200 OK\r\nDate: Fri, 27 Nov 2026 08:00:00 GMT\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\naccess-control-expose-headers: X-Request-ID\r\nopenai-organization: user-abc\r\nopenai-processing-ms: 142\r\nopenai-version: 2020-10-01\r\nx-ratelimit-limit-requests: 10000\r\nx-ratelimit-remaining-requests: 9999\r\nx-request-id: req_0123456789abcdef\r\ncf-cache-status: DYNAMIC\r\nServer: cloudflare\r\n\r\n";
    let mut group = c.benchmark_group("http_head");
    group.bench_function("parse_request_sdk_17_headers", |b| {
        b.iter(|| black_box(aura::http::parse_request(black_box(request), 100).unwrap()))
    });
    group.bench_function("parse_response_openai_14_headers", |b| {
        b.iter(|| black_box(aura::http::parse_response(black_box(response), 100).unwrap()))
    });
    // Every request: its target made canonical, then its route's billing looked up.
    group.bench_function("route_canonical_and_billing_chat", |b| {
        b.iter(|| {
            let target = aura::route::canonical(black_box("/v1/chat/completions")).unwrap();
            black_box(aura::route::billing(&http::Method::POST, &target.path))
        })
    });
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

/// Metrics on the request path (one request's record: two latencies and the counters) and at
/// scrape time (two workers' shards merged and encoded as Prometheus text).
fn metrics(c: &mut Criterion) {
    use aura::metrics::{prom, Latency, Record, Registry, Shard};
    use std::time::Duration;
    let usage = aura::usage::Usage {
        prompt_tokens: 30,
        completion_tokens: 20,
        cached_prompt_tokens: 0,
        ..aura::usage::Usage::default()
    };
    let key = aura::auth::KeyId::of("sk-bench-metrics-key-0001");
    let model: std::sync::Arc<str> = std::sync::Arc::from("gpt-4o-mini");
    let record = |i: u64| Record {
        route: "chat_completions",
        status: 200,
        error: None,
        ttft_overhead: Some(Duration::from_nanos(20_000 + (i % 997) * 13)),
        to_upstream: Some(Duration::from_nanos(40_000 + (i % 991) * 17)),
        usage: Some(&usage),
        usage_missing: false,
        usage_implausible: false,
        cost_nano: 1_234,
        default_price: false,
        billed: Some((key, Some(&model))),
        upstream: None,
        ttft: None,
    };
    let mut group = c.benchmark_group("metrics");
    group.bench_function("latency_record", |b| {
        let mut latency = Latency::default();
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            latency.record(black_box(Duration::from_nanos(20_000 + (i % 997) * 13)));
        })
    });
    group.bench_function("record_one_request", |b| {
        let shard = Shard::default();
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            shard.record(black_box(&record(i)));
        })
    });
    let registry = Registry::new(2);
    for worker in 0..2 {
        let shard = Shard::default();
        for i in 0..100_000 {
            shard.record(&record(i + worker as u64));
        }
        registry.publish(worker, shard.snapshot());
        registry.set_driver(worker, "io_uring");
    }
    group.bench_function("scrape_two_workers_gather_and_encode", |b| {
        b.iter(|| black_box(prom::render(&registry).len()))
    });
    group.finish();
}

/// Budgets on the request path: one request's reserve and settle in a worker's shard, with the
/// lease already held (the common case), and pricing a usage.
fn budget(c: &mut Criterion) {
    use aura::auth::KeyId;
    use aura::budget::journal::Journal;
    use aura::budget::shard::{Shard, ShardSettings};
    use aura::budget::store::{system_clock, MemoryStore};
    use aura::budget::{KeyLimits, LimitTable};
    use aura::config::Period;
    use aura::pricing::MAX_LIMIT_NANO;
    use aura::pricing::{Price, PriceTable};
    use std::collections::HashMap;
    use std::future::Future;
    use std::sync::Arc;
    use std::time::Instant;

    let limits = Arc::new(KeyLimits::of_table(LimitTable::keys(
        MAX_LIMIT_NANO,
        Period::Daily,
        HashMap::new(),
    )));
    let store = Arc::new(MemoryStore::new(limits.clone(), system_clock()));
    let journal_dir =
        std::env::temp_dir().join(format!("aura-bench-journal-{}", std::process::id()));
    let journal = Arc::new(Journal::open(&journal_dir).expect("a journal directory"));
    let shard = |journal: Option<&Arc<Journal>>| {
        Shard::new(
            aura::budget::ledger::Ledger::Inline(store.clone()),
            ShardSettings {
                holder: aura::budget::Holder::from("bench/0"),
                workers: 2,
                fail_open: true,
                clock: system_clock(),
                limits: limits.clone(),
                squeeze_wait: std::time::Duration::ZERO,
                journal: journal
                    .map(|j| j.worker(aura::budget::Holder::from("bench/0"), "bench-w0")),
            },
        )
    };
    // As the ledger thread does: fsync the live segments and delete the superseded ones.
    let syncing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let syncer = {
        let (journal, syncing) = (journal.clone(), syncing.clone());
        // A plain thread, as the ledger's is: it may sleep.
        #[allow(clippy::disallowed_methods)]
        std::thread::spawn(move || {
            while syncing.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(50));
                journal.sync();
            }
        })
    };
    let key = KeyId::of("sk-bench-0000000000000001");
    let mut group = c.benchmark_group("budget");
    // Without a journal (the in-memory store), and with one (the Valkey store: every settled
    // cost is a record in a mapped segment, rotated every 8192 records).
    for (name, shard) in [
        ("reserve_and_settle_one_request", shard(None)),
        (
            "reserve_and_settle_one_request_journaled",
            shard(Some(&journal)),
        ),
    ] {
        // A reservation the lease covers is ready at its first poll: no runtime needed.
        let reserve = |estimate: u64| {
            let mut future = std::pin::pin!(shard.reserve(black_box(key), black_box(estimate)));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            match future.as_mut().poll(&mut cx) {
                std::task::Poll::Ready(Ok(r)) => Some(r),
                _ => None,
            }
        };
        let first = reserve(73_000);
        assert!(first.is_some(), "the in-memory ledger answers in place");
        if let Some(r) = first {
            r.settle(0);
        }
        let (mut requests, mut denied) = (0u32, 0u64);
        group.bench_function(name, |b| {
            b.iter(|| {
                if let Some(r) = reserve(73_000) {
                    r.settle(black_box(21_000));
                } else {
                    denied += 1;
                }
                // As the worker does every 50 ms: hand the spend over (the store confirms it).
                // Every 4096 requests here (more often than a worker at 80k requests a second),
                // so that the loop itself reads no clock.
                requests = requests.wrapping_add(1);
                if requests % 4096 == 0 {
                    shard.flush(Instant::now());
                }
            })
        });
        assert_eq!(denied, 0, "every request is admitted from the lease");
    }
    syncing.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = syncer.join();
    let prices = PriceTable::builtin(Price::per_million(5.0, 15.0, 5.0));
    let usage = aura::usage::Usage {
        prompt_tokens: 60,
        completion_tokens: 20,
        cached_prompt_tokens: 0,
        ..aura::usage::Usage::default()
    };
    group.bench_function("price_lookup_dated_name_and_cost", |b| {
        b.iter(|| {
            let (price, _) = prices.lookup(black_box("gpt-4o-mini-2024-07-18"));
            black_box(price.cost_nano(&usage))
        })
    });
    group.bench_function("key_id_sha256", |b| {
        b.iter(|| {
            black_box(KeyId::of(black_box(
                "sk-proj-0123456789abcdefghijklmnopqrstuv",
            )))
        })
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&journal_dir);
}

/// What teams, calendar windows, spend records and rate limits add to a request's admission
/// and settle: a key Aura has no configuration for (its budget and the record of all such
/// keys), against a key in a team with a window of its own, the team's two windows, both
/// spend records, requests per minute (key and team), tokens per minute and a concurrency
/// limit; each reserved and settled on its lease, and the answering model's record charged.
fn governance(c: &mut Criterion) {
    use aura::auth::{KeyId, Member, Origin};
    use aura::budget::shard::{Shard, ShardSettings};
    use aura::budget::store::{system_clock, MemoryStore};
    use aura::budget::{Accounts, KeyLimits, Reservation};
    use aura::config::governance::{Limits, Rates, TeamEntry, Window};
    use aura::config::Period;
    use aura::governance::{Charges, Governance};
    use std::future::Future;
    use std::sync::Arc;
    use std::time::Instant;

    let big = |period| Window {
        period: Some(period),
        limit_dollars: 1e6,
    };
    let unreachable = Rates {
        rpm: Some(1 << 40),
        tpm: Some(1 << 50),
        max_concurrent: Some(1 << 30),
    };
    let team = TeamEntry {
        name: "bench".into(),
        limits: Limits {
            windows: vec![big(Period::Daily), big(Period::Monthly)],
            rates: Rates {
                tpm: None,
                ..unreachable
            },
        },
    };
    let governed = KeyId::of("sk-bench-governed-000001");
    let member = Member {
        id: governed,
        alias: "governed".into(),
        limits: Limits {
            windows: vec![big(Period::Never), big(Period::Daily)],
            rates: Rates {
                max_concurrent: None,
                ..unreachable
            },
        },
        team: Some("bench".into()),
        upstream_key: None,
        models: Vec::new(),
        upstream: None,
        origin: Origin::Config,
    };
    let governance = Governance::new(
        1_000_000_000_000,
        Period::Never,
        &[member],
        &[team],
        &["gpt-4o-mini"],
    );
    let limits = Arc::new(KeyLimits::of_table(governance.limits()));
    let store = Arc::new(MemoryStore::new(limits.clone(), system_clock()));
    let shard = Shard::new(
        aura::budget::ledger::Ledger::Inline(store),
        ShardSettings {
            holder: aura::budget::Holder::from("bench/0"),
            workers: 2,
            fail_open: true,
            clock: system_clock(),
            limits,
            squeeze_wait: std::time::Duration::ZERO,
            journal: None,
        },
    );
    let reserve = |accounts: Accounts, amount: u64| -> Option<Reservation<'_>> {
        if accounts.is_empty() {
            return None;
        }
        let mut future = std::pin::pin!(shard.reserve_all(black_box(accounts), amount));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match future.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(Ok(r)) => Some(r),
            _ => None,
        }
    };
    let model = governance.model_report(Some("gpt-4o-mini"));
    let mut group = c.benchmark_group("governance");
    let plain = Charges::own(KeyId::of("sk-bench-plain-0000000001"));
    let admitted = governance.charges(governed);
    assert_eq!((admitted.money().len(), admitted.requests.len()), (6, 2));
    for (name, charges) in [
        ("admit_and_settle_a_plain_key", plain),
        (
            "admit_and_settle_a_key_in_a_team_with_rate_limits",
            admitted,
        ),
    ] {
        let mut requests = 0u32;
        group.bench_function(name, |b| {
            b.iter(|| {
                // As `Rates::admit` then the money reservation, and `bill` at the end.
                let concurrent = reserve(charges.concurrent, 1);
                let rpm = reserve(charges.requests, 1);
                let tpm = reserve(charges.tokens, 40);
                let money = reserve(charges.money(), 73_000);
                for (r, used) in [(rpm, 1), (tpm, 31), (concurrent, 0)] {
                    if let Some(mut r) = r {
                        r.mark_sent();
                        r.settle(used);
                    }
                }
                if let Some(money) = money {
                    money.settle(black_box(21_000));
                }
                shard.charge(model, 21_000);
                requests = requests.wrapping_add(1);
                if requests.is_multiple_of(4096) {
                    shard.flush(Instant::now());
                }
            })
        });
    }
    group.finish();
}

/// What routing adds to a request: choosing among the upstreams serving its model (by weight,
/// load and health), its in-flight count, the health trial check, a pool key, and judging the
/// answer's head; with one upstream (`upstream_url`) and with four serving the model.
fn routing(c: &mut Criterion) {
    use aura::config::upstreams::Api;
    use aura::proxy::{Tried, View};
    use aura::reload::Live;
    use aura::upstream::Resolver;
    let mut group = c.benchmark_group("routing");
    let head = aura::http::parse_response(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n",
        100,
    )
    .unwrap()
    .unwrap();
    let four = (0..4)
        .map(|i| {
            format!(
                "[[upstreams]]\nname = \"u{i}\"\nurl = \"http://127.0.0.1:{}/v1\"\nmodels = [\"gpt-4o*\", \"o3\"]\nweight = {}\nkeys = [\"k1\", \"k2\"]\n",
                9000 + i,
                i + 1
            )
        })
        .collect::<String>();
    let four = format!("key_mode = \"virtual\"\n{four}");
    for (name, text) in [
        ("one_upstream", String::new()),
        ("four_upstreams_with_key_pools", four),
    ] {
        let mut config =
            aura::config::resolve(&[aura::config::file_layer(&text).unwrap()]).unwrap();
        let env: std::collections::HashMap<String, String> = std::collections::HashMap::new();
        config.upstreams = aura::config::file_tables(&text, &env).unwrap().upstreams;
        let resolvers = config
            .routes()
            .iter()
            .map(|r| Resolver::fixed(([127, 0, 0, 1], r.url.port).into()))
            .collect();
        let live = Live::new(&config, resolvers).unwrap();
        let keys = aura::reload::KeySet::build(&config, &live.prices, &[], &env);
        let view = View::build(&live, &keys, 0).unwrap();
        let routing = &view.routing;
        let rules = config.health;
        group.bench_function(name, |b| {
            b.iter(|| {
                let now = std::time::Instant::now();
                let tried = Tried::default();
                let chosen = routing
                    .next(black_box(Some("gpt-4o-mini")), Api::OpenAi, &tried, now)
                    .unwrap();
                let _in_flight = routing.picker.start(chosen);
                let upstream = &routing.upstreams[chosen];
                upstream.health.begin(&rules, now);
                let key = upstream.keys.pick(now);
                black_box(routing.judge_answer(chosen, key, &head, now))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, scanner, heads, rewrite, chunked, metrics, budget, governance, routing);
criterion_main!(benches);
