//! Retries, fallbacks and health across `[[upstreams]]`, against the real `aura` binary: a first
//! upstream that fails on purpose (refuses, resets, stalls, 429s with Retry-After, 503s, or
//! breaks after its first byte) and a healthy mock behind it. What a client sees, what each
//! upstream was asked, what the key was billed, and what `/metrics` says.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::billing::{cost, mock_usage, post, wait_for_spend, MINI_IN, MINI_OUT};
use common::scripted::{self, Asked, Scripted, Then};
use common::{dead_port, start_mock, Driver, Launch, MockOptions, MockUpstream, CHAT};

on_both_drivers!(
    a_refused_connection_falls_back,
    a_reset_before_the_head_falls_back,
    a_stall_before_the_head_falls_back_at_its_timeout,
    a_429_on_a_pool_key_rests_it_for_its_retry_after,
    a_429_on_a_clients_own_key_rests_nothing,
    a_request_that_may_have_been_acted_on_is_not_sent_twice,
    an_attempt_given_up_after_it_was_sent_is_charged_its_reservation,
    a_write_the_upstream_never_takes_ends_at_the_deadline,
    a_model_whose_upstreams_all_fail_falls_back_to_another_model,
    a_503_falls_back_and_the_request_is_billed_once,
    nothing_is_retried_once_the_answer_has_started,
    a_failing_upstream_is_ejected_and_comes_back_on_a_trial,
    attempts_stop_at_max_attempts_and_the_last_answer_is_relayed,
);

const BODY: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

/// A config: upstream "first" (weight 10000: nearly always tried first) and "second" (weight
/// 1), both serving model `m`; `first_extra` adds to the first's entry.
fn config(name: &str, driver: Driver, first: &str, first_extra: &str, second: &str) -> PathBuf {
    let text = format!(
        r#"
        [[upstreams]]
        name = "first"
        url = "{first}"
        models = ["m"]
        weight = 10000
        {first_extra}

        [[upstreams]]
        name = "second"
        url = "{second}"
        models = ["m"]
        weight = 1
        "#
    );
    common::config_file(&format!("fallback-{name}-{driver:?}"), &text)
}

/// One worker: health is per worker, and the test reads one worker's.
fn launch(path: &Path, driver: Driver, flags: &[&str]) -> common::Aura {
    let mut launch = Launch::new("", driver)
        .workers(1)
        .arg("--config")
        .arg(path.to_str().unwrap());
    for flag in flags {
        launch = launch.arg(flag);
    }
    launch.start()
}

fn chats(mock: &MockUpstream) -> usize {
    mock.requests()
        .iter()
        .filter(|r| r.target.ends_with("/chat/completions"))
        .count()
}

fn ask(aura: &common::Aura) -> common::Response {
    aura.client().post_json(CHAT, &[], BODY)
}

/// A scripted first upstream doing `misbehave` to every request.
fn misbehaving(
    misbehave: impl Fn(&Asked, &mut TcpStream) -> Then + Send + Sync + 'static,
) -> Scripted {
    Scripted::start(misbehave)
}

/// Two requests (below the 3 failures that eject), each answered by the second upstream, and
/// the first's attempts counted under `outcome`.
fn falls_back(name: &str, driver: Driver, first: &str, first_extra: &str, outcome: &str) {
    let good = start_mock(MockOptions::default());
    let path = config(name, driver, first, first_extra, &good.url());
    let aura = launch(&path, driver, &[]);
    for _ in 0..2 {
        let r = ask(&aura);
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains("chat.completion"), "{}", r.text());
    }
    assert_eq!(chats(&good), 2);
    let text = common::scrape_until(&aura, |t| {
        t.lines().any(|l| {
            l == "aura_upstream_requests_total{upstream=\"second\",status_class=\"2xx\"} 2"
        })
    });
    let line =
        format!("aura_upstream_attempts_total{{upstream=\"first\",outcome=\"{outcome}\"}} 2");
    assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
}

fn a_refused_connection_falls_back(driver: Driver) {
    let first = format!("http://127.0.0.1:{}/v1", dead_port());
    falls_back("refused", driver, &first, "", "connect_failed");
}

fn a_reset_before_the_head_falls_back(driver: Driver) {
    let first = misbehaving(|_, _| Then::Close);
    falls_back("reset", driver, &first.url(), "", "reset");
    assert_eq!(
        first.asked().len(),
        2,
        "each request reached the first once"
    );
}

fn a_stall_before_the_head_falls_back_at_its_timeout(driver: Driver) {
    let first = misbehaving(|_, stream| {
        // Never answers; the connection stays open until Aura gives up on it.
        let mut sink = [0u8; 1];
        let _ = std::io::Read::read(stream, &mut sink);
        Then::Close
    });
    let started = Instant::now();
    falls_back(
        "stall",
        driver,
        &first.url(),
        "first_byte_timeout_ms = 300",
        "timeout",
    );
    // Two requests, each waiting out the first's 300 ms, not the 300 s default.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

/// A first upstream that answers 429 (Retry-After: 30) to requests carrying `refused`, and a
/// whole answer naming it to any other.
fn rate_limiting(refused: &'static str) -> Scripted {
    misbehaving(move |asked, stream| {
        let auth = asked.header("authorization").unwrap_or_default();
        if auth.contains(refused) {
            let body = r#"{"error":{"message":"slow down","type":"rate_limit_error"}}"#;
            let answer = scripted::json_error("429 Too Many Requests", "retry-after: 30\r\n", body);
            scripted::send(stream, &answer);
        } else {
            scripted::send(stream, &scripted::json_answer("from-first"));
        }
        Then::Next
    })
}

fn a_429_on_a_pool_key_rests_it_for_its_retry_after(driver: Driver) {
    let first = rate_limiting("sk-first-pool");
    let good = start_mock(MockOptions::default());
    let text = format!(
        r#"
        key_mode = "virtual"
        [keys.team]
        key = "sk-aura-team-429"
        [[upstreams]]
        name = "first"
        url = "{}"
        models = ["m"]
        weight = 10000
        key = "sk-first-pool"
        [[upstreams]]
        name = "second"
        url = "{}"
        models = ["m"]
        key = "sk-second-pool"
        "#,
        first.url(),
        good.url()
    );
    let path = common::config_file(&format!("fallback-429-{driver:?}"), &text);
    let aura = launch(&path, driver, &[]);
    for _ in 0..5 {
        let r = aura.client().request(
            "POST",
            CHAT,
            &[
                ("content-type", "application/json"),
                ("authorization", "Bearer sk-aura-team-429"),
            ],
            BODY.as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // Its only key rests 30 s after its 429: though it weighs 10000 to 1, it was asked once.
    assert_eq!(first.asked().len(), 1);
    assert_eq!(chats(&good), 5);
    common::scrape_until(&aura, |t| {
        t.lines()
            .any(|l| l == "aura_upstream_up{upstream=\"first\"} 0")
            && t.lines().any(|l| {
                l == "aura_upstream_attempts_total{upstream=\"first\",outcome=\"key_refused\"} 1"
            })
    });
}

/// Passthrough: a 429 on one client's own key is about that key. The request goes on to the
/// next upstream, and the first stays in every other client's choices.
fn a_429_on_a_clients_own_key_rests_nothing(driver: Driver) {
    let first = rate_limiting("sk-limited");
    let good = start_mock(MockOptions::default());
    let path = config("tenant-429", driver, &first.url(), "", &good.url());
    let aura = launch(&path, driver, &[]);
    let ask_as = |key: &str| {
        aura.client().request(
            "POST",
            CHAT,
            &[
                ("content-type", "application/json"),
                ("authorization", &format!("Bearer {key}")),
            ],
            BODY.as_bytes(),
        )
    };
    let r = ask_as("sk-limited");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("chat.completion"), "{}", r.text());
    for _ in 0..5 {
        let r = ask_as("sk-other-tenant");
        assert!(r.text().contains("from-first"), "{}", r.text());
    }
    assert_eq!(first.asked().len(), 6);
}

/// An upstream that reads the request and holds it unanswered for `hold`.
fn stalling(hold: Duration) -> Scripted {
    misbehaving(move |_, stream| {
        stream.set_read_timeout(Some(hold)).unwrap();
        let mut sink = [0u8; 1];
        let _ = std::io::Read::read(stream, &mut sink);
        Then::Close
    })
}

/// A fine-tuning job (unpriced, not idempotent) that reached the first upstream may have been
/// created there: after its timeout, or its 502, it is not created again at the second.
fn a_request_that_may_have_been_acted_on_is_not_sent_twice(driver: Driver) {
    let bad_gateway = misbehaving(|_, stream| {
        scripted::send(
            stream,
            b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n",
        );
        Then::Next
    });
    let stalled = stalling(Duration::from_secs(3));
    for (first, extra, status) in [
        (&bad_gateway, "", 502),
        (&stalled, "first_byte_timeout_ms = 300", 504),
    ] {
        let good = start_mock(MockOptions::default());
        let path = config(
            &format!("job-{status}"),
            driver,
            &first.url(),
            extra,
            &good.url(),
        );
        let aura = launch(&path, driver, &[]);
        let job = r#"{"model":"m","training_file":"file-abc"}"#;
        let r = aura.client().post_json("/v1/fine_tuning/jobs", &[], job);
        assert_eq!(r.status, status, "{}", r.text());
        assert_eq!(first.asked().len(), 1);
        assert!(
            good.requests().is_empty(),
            "the job went to a second upstream"
        );
        // A request the upstream turned away (503) was not acted on: it goes on.
    }
}

/// A chat completion that reached the first upstream and got no answer in time: its provider
/// may be generating it, so when it goes on to the second, the key is charged the first
/// attempt's reservation; both time out, and the key is charged that, not nothing.
fn an_attempt_given_up_after_it_was_sent_is_charged_its_reservation(driver: Driver) {
    let (a, b) = (
        stalling(Duration::from_secs(3)),
        stalling(Duration::from_secs(3)),
    );
    let path = config(
        "given-up",
        driver,
        &a.url(),
        "first_byte_timeout_ms = 300",
        &b.url(),
    );
    // The second's timeout comes from the flag: every attempt is bounded.
    let aura = launch(&path, driver, &["--upstream-first-byte-timeout-ms", "300"]);
    let key = "sk-fallback-given-up";
    let r = aura.client().request(
        "POST",
        CHAT,
        &[
            ("content-type", "application/json"),
            ("authorization", &format!("Bearer {key}")),
        ],
        BODY.as_bytes(),
    );
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!((a.asked().len(), b.asked().len()), (1, 1));
    // gpt-4o-mini's price is not `m`'s: `m` is reserved at the default price (5 and 15 $ per
    // million) for every body byte in and 4096 tokens out.
    let reservation = (BODY.len() as u64 * 5_000_000 + 4096 * 15_000_000).div_ceil(1_000);
    wait_for_spend(&aura, key, reservation);
}

/// An upstream that accepts a connection and never reads it: the request's write is bounded
/// by the deadline of all attempts, as the wait for an answer is.
fn a_write_the_upstream_never_takes_ends_at_the_deadline(driver: Driver) {
    let hole = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let addr = hole.local_addr().unwrap();
    std::thread::spawn(move || {
        // Held open, never read, until the test process ends.
        let held: Vec<_> = hole.incoming().take(4).collect();
        std::thread::park_timeout(Duration::from_secs(60));
        drop(held);
    });
    let good = start_mock(MockOptions::default());
    let path = config(
        "hole",
        driver,
        &format!("http://{addr}/v1"),
        "",
        &good.url(),
    );
    let aura = launch(&path, driver, &["--upstream-total-timeout-ms", "1000"]);
    // 24 MiB: more than loopback's socket buffers take, less than max_body_bytes.
    let upload = vec![b'x'; 24 * 1024 * 1024];
    let started = Instant::now();
    let r = aura.client().request(
        "POST",
        "/v1/files",
        &[
            ("content-type", "application/octet-stream"),
            ("authorization", "Bearer sk-upload"),
        ],
        &upload,
    );
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        good.requests().is_empty(),
        "an upload that may have been taken was sent again"
    );
}

fn a_503_falls_back_and_the_request_is_billed_once(driver: Driver) {
    let first = scripted::overloaded();
    let good = start_mock(MockOptions::default());
    let path = config("503", driver, &first.url(), "", &good.url());
    let aura = launch(&path, driver, &[]);
    let key = "sk-fallback-billed-once";
    let mut want = 0;
    for _ in 0..2 {
        assert_eq!(post(&aura, key, CHAT, &[], BODY), 200);
    }
    for r in good.requests() {
        let (prompt, completion) = mock_usage(&r);
        want += cost(prompt, completion, MINI_IN, MINI_OUT);
    }
    assert_eq!(first.asked().len(), 2);
    // The answering attempt's usage, once per request: the 503s cost nothing.
    wait_for_spend(&aura, key, want);
}

fn nothing_is_retried_once_the_answer_has_started(driver: Driver) {
    let first = misbehaving(|_, stream| {
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        let event = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"half\"}}]}\n\n";
        let chunk = format!("{:x}\r\n{event}\r\n", event.len());
        scripted::send(stream, head.as_bytes());
        scripted::send(stream, chunk.as_bytes());
        // Then the upstream dies mid-answer.
        Then::Close
    });
    let good = start_mock(MockOptions::default());
    let path = config("started", driver, &first.url(), "", &good.url());
    let aura = launch(&path, driver, &[]);
    let mut client = aura.client();
    let request = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-started\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
        STREAM_BODY.len(),
        STREAM_BODY
    );
    client.send(request.as_bytes());
    let (status, _) = client.read_head();
    assert_eq!(status, 200);
    client.wait_closed(Duration::from_secs(10));
    let got = String::from_utf8_lossy(client.buffered()).to_string();
    assert!(got.contains("half"), "{got}");
    assert!(
        !got.contains("tok0"),
        "the second upstream's answer was spliced in: {got}"
    );
    assert_eq!(chats(&good), 0, "retried after the first byte");
}

const STREAM_BODY: &str =
    r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

fn a_failing_upstream_is_ejected_and_comes_back_on_a_trial(driver: Driver) {
    let healthy = Arc::new(AtomicBool::new(false));
    let switch = healthy.clone();
    let first = misbehaving(move |_, stream| {
        if switch.load(Ordering::SeqCst) {
            scripted::send(stream, &scripted::json_answer("from-first"));
        } else {
            let answer = "HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n";
            scripted::send(stream, answer.as_bytes());
        }
        Then::Next
    });
    let good = start_mock(MockOptions::default());
    let path = config("eject", driver, &first.url(), "", &good.url());
    let aura = launch(
        &path,
        driver,
        &[
            "--upstream-eject-after-failures",
            "2",
            "--upstream-eject-ms",
            "1500",
        ],
    );
    // Two failures in a row eject it: the next requests go to the second alone.
    for _ in 0..6 {
        assert_eq!(ask(&aura).status, 200);
    }
    assert_eq!(first.asked().len(), 2, "asked while ejected");
    common::scrape_until(&aura, |t| {
        t.lines()
            .any(|l| l == "aura_upstream_up{upstream=\"first\"} 0")
    });
    // It recovers; after its rest a trial request reaches it and it is back.
    healthy.store(true, Ordering::SeqCst);
    common::scrape_until(&aura, |t| {
        t.lines()
            .any(|l| l == "aura_upstream_up{upstream=\"first\"} 1")
    });
    let r = ask(&aura);
    assert_eq!(r.status, 200);
    assert!(r.text().contains("from-first"), "{}", r.text());
    for _ in 0..3 {
        assert!(ask(&aura).text().contains("from-first"));
    }
    assert_eq!(first.asked().len(), 6);
}

fn attempts_stop_at_max_attempts_and_the_last_answer_is_relayed(driver: Driver) {
    let asked = |status: u16| {
        misbehaving(move |_, stream| {
            let body = format!(r#"{{"error":{{"message":"status {status}"}}}}"#);
            let answer = scripted::json_error(&format!("{status} Nope"), "", &body);
            scripted::send(stream, &answer);
            Then::Next
        })
    };
    let (a, b) = (asked(500), asked(503));
    let path = config("max", driver, &a.url(), "", &b.url());
    let aura = launch(&path, driver, &["--upstream-max-attempts", "2"]);
    let r = ask(&aura);
    // Both failed: the last answer goes to the client as it came.
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("status 503"), "{}", r.text());
    assert_eq!((a.asked().len(), b.asked().len()), (1, 1));
    // One attempt only: the first upstream's 500 is the answer.
    let path = config("max1", driver, &a.url(), "", &b.url());
    let aura = launch(&path, driver, &["--upstream-max-attempts", "1"]);
    let r = ask(&aura);
    assert_eq!(r.status, 500, "{}", r.text());
    assert_eq!(b.asked().len(), 1, "a second attempt with max_attempts 1");
}

/// `[fallbacks]`: every upstream serving gpt-4o answers 503, so the request goes on as
/// gpt-4o-mini, to the upstream serving that, its body naming the model it now asks for (the
/// usage still asked for in its stream), and it is billed as the model that answered.
fn a_model_whose_upstreams_all_fail_falls_back_to_another_model(driver: Driver) {
    let big = scripted::overloaded();
    let small = start_mock(MockOptions::default());
    let table = |fallbacks: &str| {
        format!(
            r#"
            {fallbacks}
            [[upstreams]]
            name = "big"
            url = "{}"
            models = ["gpt-4o"]
            [[upstreams]]
            name = "small"
            url = "{}"
            models = ["gpt-4o-mini"]
            "#,
            big.url(),
            small.url()
        )
    };
    let stream = r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let key = "sk-fallback-model";
    let ask = |aura: &common::Aura| {
        aura.client().request(
            "POST",
            CHAT,
            &[
                ("content-type", "application/json"),
                ("authorization", &format!("Bearer {key}")),
            ],
            stream.as_bytes(),
        )
    };
    // Without [fallbacks], the 503 is the answer.
    let path = common::config_file(&format!("fallback-none-{driver:?}"), &table(""));
    let aura = launch(&path, driver, &[]);
    assert_eq!(ask(&aura).status, 503);
    assert_eq!(chats(&small), 0);
    drop(aura);
    let path = common::config_file(
        &format!("fallback-model-{driver:?}"),
        &table("[fallbacks]\n\"gpt-4o\" = [\"gpt-4o-mini\"]"),
    );
    let aura = launch(&path, driver, &[]);
    let r = ask(&aura);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("data: [DONE]"), "{}", r.text());
    let asked = &small.requests()[0];
    let sent: serde_json::Value = serde_json::from_slice(&asked.body).unwrap();
    assert_eq!(sent["model"], "gpt-4o-mini");
    assert_eq!(sent["stream_options"]["include_usage"], true);
    // The client did not ask for the usage event: it was stripped, as ever.
    assert!(!r.text().contains("\"usage\":{"), "{}", r.text());
    let (prompt, completion) = mock_usage(asked);
    wait_for_spend(&aura, key, cost(prompt, completion, MINI_IN, MINI_OUT));
}
