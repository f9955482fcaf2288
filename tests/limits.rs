//! Aura's limits and timeouts, HTTP/1.1 edge cases and its access log, end to end: the real
//! binary in front of the project's mock upstream over loopback, each test on both drivers.
//! Timeouts are set to 300 ms so each test takes well under a second; every wait has a deadline
//! and none sleeps.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::{
    start_mock, Aura, Client, Driver, Launch, MockOptions, MockUpstream, Recorded, CHAT, STREAM,
    WHOLE,
};

/// The timeouts under test, as flags.
const SHORT_MS: &str = "300";
const SHORT: Duration = Duration::from_millis(300);
/// Timers fire on a millisecond wheel: allow a little early.
const SHORT_AT_LEAST: Duration = Duration::from_millis(250);
/// By when a 300 ms timeout must have shown; the alternative outcomes take 2 s or more.
const PROMPTLY: Duration = Duration::from_secs(1);
/// How long an access-log line may take to appear after its response.
const LOG_DEADLINE: Duration = Duration::from_secs(5);

/// The key the access-log test sends; its secret part must never be printed.
const SECRET: &str = "SECRET123";
const SECRET_AUTH: &str = "Bearer sk-live-SECRET123";

on_both_drivers!(
    silent_upstream_before_the_head_is_a_504,
    silent_upstream_mid_stream_truncates_the_response,
    the_read_timeout_is_the_silence_between_reads_however_long_the_stream,
    oversize_heads_are_431,
    chunked_request_bodies_are_forwarded_with_a_content_length,
    expect_100_continue_is_answered_and_not_forwarded,
    bad_framing_is_400_and_unknown_paths_are_404,
    http_1_0_stream_is_delimited_by_close,
    idle_connections_are_closed,
    slow_heads_and_bodies_time_out,
    access_log_has_one_line_per_request_and_no_api_key,
    client_leaving_mid_stream_still_gets_its_usage_logged,
    pipelined_requests_are_answered_in_order,
);

fn launch(mock: &MockUpstream, driver: Driver, flags: &[(&str, &str)]) -> Aura {
    let mut launch = Launch::new(&mock.url(), driver);
    for (flag, value) in flags {
        launch = launch.arg(flag).arg(value);
    }
    launch.start()
}

fn chat_requests(mock: &MockUpstream) -> Vec<Recorded> {
    mock.requests()
        .into_iter()
        .filter(|r| r.target.ends_with("/chat/completions"))
        .collect()
}

/// A request head with `host` and `headers`, ending in the blank line.
fn head(method: &str, target: &str, version: &str, headers: &[(&str, &str)]) -> String {
    let mut out = format!("{method} {target} {version}\r\nhost: aura.test\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out
}

/// One chunk of a chunked body.
fn chunk(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n", data.len())
}

fn assert_error_code(r: &common::Response, status: u16, code: &str) {
    let v = r.assert_openai_error(status);
    assert_eq!(v["error"]["code"], code, "{v}");
}

fn assert_between(took: Duration, what: &str) {
    assert!(
        (SHORT_AT_LEAST..PROMPTLY).contains(&took),
        "{what} after {took:?}: expected the {SHORT:?} timeout, within {PROMPTLY:?}"
    );
}

fn silent_upstream_before_the_head_is_a_504(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = launch(
        &mock,
        driver,
        &[("--upstream-first-byte-timeout-ms", SHORT_MS)],
    );
    let mut client = aura.client();
    let r = client.post_json(CHAT, &[("x-mock-delay-ms", "2000")], WHOLE);
    assert_between(r.sent_at.elapsed(), "504");
    assert_error_code(&r, 504, "upstream_timeout");
    assert_eq!(r.json()["error"]["type"], "upstream_error");
    // The client keeps its connection; a prompt upstream answers on it.
    assert_eq!(client.post_json(CHAT, &[], WHOLE).status, 200);
}

fn silent_upstream_mid_stream_truncates_the_response(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = launch(&mock, driver, &[("--upstream-read-timeout-ms", SHORT_MS)]);
    // The mock sends the head and the role event at once, then 2 s of silence.
    let r = aura
        .client()
        .post_json(CHAT, &[("x-mock-delay-ms", "2000")], STREAM);
    assert_between(r.sent_at.elapsed(), "the stream ended");
    assert_eq!(r.status, 200, "the head was already sent");
    assert!(r.chunked);
    assert!(
        !r.complete,
        "no terminating chunk after an upstream timeout: {}",
        r.text()
    );
    let events = r.events();
    assert_eq!(events.len(), 1, "{}", r.text());
    assert_eq!(
        events[0].json().unwrap()["choices"][0]["delta"]["role"],
        "assistant"
    );
    // Aura keeps serving.
    assert_eq!(aura.client().get("/healthz").status, 200);
}

/// Aura arms one timer per stream for its upstream reads and re-arms it only when it fires
/// early: a stream four times longer than the read timeout, never silent for as long, must
/// pass whole; one that goes silent must be cut a timeout after its last read, not before.
fn the_read_timeout_is_the_silence_between_reads_however_long_the_stream(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = launch(&mock, driver, &[("--upstream-read-timeout-ms", SHORT_MS)]);
    let long = [("x-mock-chunks", "12"), ("x-mock-delay-ms", "100")];
    let r = aura.client().post_json(CHAT, &long, STREAM);
    let took = r.sent_at.elapsed();
    assert!(took > 4 * SHORT, "the stream took {took:?}");
    assert!(r.complete, "cut after {took:?}: {}", r.text());
    let whole = r.events().len();

    // The same stream, then 2 s of silence before the body's end.
    let quiet = [
        ("x-mock-chunks", "12"),
        ("x-mock-delay-ms", "100"),
        ("x-mock-end-delay-ms", "2000"),
    ];
    let r = aura.client().post_json(CHAT, &quiet, STREAM);
    let took_quiet = r.sent_at.elapsed();
    assert_eq!(r.events().len(), whole, "every event came: {}", r.text());
    assert!(!r.complete, "no terminating chunk after the timeout");
    assert!(
        took_quiet >= took + SHORT_AT_LEAST && took_quiet < took + PROMPTLY,
        "cut {took_quiet:?} after the request; its events took {took:?}, the timeout is {SHORT:?}"
    );
}

fn oversize_heads_are_431(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = launch(
        &mock,
        driver,
        &[("--max-head-bytes", "1024"), ("--max-headers", "10")],
    );

    let big = "x".repeat(4096);
    let r = aura
        .client()
        .request("GET", "/v1/models", &[("x-big", &big)], b"");
    assert_error_code(&r, 431, "head_too_large");
    assert_eq!(r.header("connection"), Some("close"));

    let names: Vec<String> = (0..20).map(|i| format!("x-h{i}")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    let r = aura.client().request("GET", "/v1/models", &many, b"");
    assert_error_code(&r, 431, "too_many_headers");

    assert!(mock.requests().is_empty(), "nothing reached the upstream");
    // Under both limits, a request goes through.
    let r = aura.client().request("GET", "/v1/models", &many[..5], b"");
    assert_eq!(r.status, 200, "{}", r.text());
}

fn chunked_request_bodies_are_forwarded_with_a_content_length(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = launch(&mock, driver, &[("--max-body-bytes", "1024")]);
    let headers = [
        ("content-type", "application/json"),
        ("authorization", "Bearer sk-test"),
        ("transfer-encoding", "chunked"),
    ];

    // The body in three chunks, each in a write of its own, then the last chunk.
    let mut client = aura.client();
    client.send(head("POST", CHAT, "HTTP/1.1", &headers).as_bytes());
    let (a, rest) = STREAM.split_at(20);
    let (b, c) = rest.split_at(30);
    for part in [a, b, c] {
        client.send(chunk(part).as_bytes());
    }
    client.send(b"0\r\n\r\n");
    let r = client.receive("POST");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.complete);
    assert_eq!(r.streamed_content(), "tok0 tok1 tok2 tok3 tok4 ");

    let sent = chat_requests(&mock);
    assert_eq!(sent.len(), 1);
    let upstream = &sent[0];
    let v = upstream
        .json()
        .expect("the mock got the de-chunked JSON body");
    assert_eq!(v["stream_options"]["include_usage"], true);
    assert_eq!(v["messages"][0]["content"], "Say hello");
    assert_eq!(
        upstream.header("content-length"),
        Some(upstream.body.len().to_string().as_str())
    );
    assert_eq!(upstream.header("transfer-encoding"), None);

    // Over --max-body-bytes in chunks (no Content-Length to refuse up front): 413. One write,
    // so that Aura has read every byte when it answers and closes.
    let part = "x".repeat(600);
    let oversize = format!(
        "{}{}{}0\r\n\r\n",
        head("POST", CHAT, "HTTP/1.1", &headers),
        chunk(&part),
        chunk(&part)
    );
    let mut client = aura.client();
    client.send(oversize.as_bytes());
    assert_error_code(&client.receive("POST"), 413, "body_too_large");
    assert_eq!(
        chat_requests(&mock).len(),
        1,
        "nothing more reached the mock"
    );
}

fn expect_100_continue_is_answered_and_not_forwarded(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = launch(&mock, driver, &[("--max-body-bytes", "1024")]);
    let length = WHOLE.len().to_string();
    let mut client = aura.client();
    client.send(
        head(
            "POST",
            CHAT,
            "HTTP/1.1",
            &[
                ("authorization", "Bearer sk-test"),
                ("content-type", "application/json"),
                ("content-length", &length),
                ("expect", "100-continue"),
            ],
        )
        .as_bytes(),
    );
    let (status, _) = client.read_head();
    assert_eq!(status, 100, "Aura sends the go-ahead before the body");
    assert!(client.buffered().is_empty(), "{:?}", client.buffered());
    client.send(WHOLE.as_bytes());
    let r = client.receive("POST");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 5);
    let sent = chat_requests(&mock);
    assert_eq!(sent[0].header("expect"), None, "{:?}", sent[0].headers);
    assert_eq!(sent[0].body, WHOLE.as_bytes());

    // A body announced over the limit is refused without a go-ahead, before it is sent.
    let mut client = aura.client();
    client.send(
        head(
            "POST",
            CHAT,
            "HTTP/1.1",
            &[("content-length", "4096"), ("expect", "100-continue")],
        )
        .as_bytes(),
    );
    assert_error_code(&client.receive("POST"), 413, "body_too_large");
}

fn bad_framing_is_400_and_unknown_paths_are_404(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = launch(&mock, driver, &[]);

    let mut client = aura.client();
    let smuggle = head(
        "POST",
        CHAT,
        "HTTP/1.1",
        &[("content-length", "5"), ("transfer-encoding", "chunked")],
    );
    client.send(format!("{smuggle}0\r\n\r\n").as_bytes());
    let r = client.receive("POST");
    assert_error_code(&r, 400, "malformed_request");
    assert_eq!(r.header("connection"), Some("close"));
    client.wait_closed(PROMPTLY);

    let mut client = aura.client();
    let r = client.get("/v2/models");
    assert_error_code(&r, 404, "not_found");
    let r = client.get("/v1");
    assert_error_code(&r, 404, "not_found");
    // A 404 keeps the connection.
    assert_eq!(client.get("/healthz").status, 200);
    assert!(mock.requests().is_empty(), "{:?}", mock.requests());
}

fn http_1_0_stream_is_delimited_by_close(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = launch(&mock, driver, &[]);
    let length = STREAM.len().to_string();
    let mut client = aura.client();
    let request = head(
        "POST",
        CHAT,
        "HTTP/1.0",
        &[
            ("authorization", "Bearer sk-test"),
            ("content-type", "application/json"),
            ("content-length", &length),
        ],
    );
    client.send(format!("{request}{STREAM}").as_bytes());
    // `receive` reads a body without length or chunking until the connection closes.
    let r = client.receive("POST");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!r.chunked, "{:?}", r.headers);
    assert_eq!(r.header("transfer-encoding"), None);
    assert_eq!(r.header("content-length"), None);
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(r.streamed_content(), "tok0 tok1 tok2 tok3 tok4 ");
    assert!(r.text().ends_with("data: [DONE]\n\n"), "{}", r.text());
}

fn idle_connections_are_closed(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = launch(&mock, driver, &[("--idle-timeout-ms", SHORT_MS)]);
    // After a request on a keep-alive connection ...
    let mut client = aura.client();
    assert_eq!(client.post_json(CHAT, &[], WHOLE).status, 200);
    let took = client.wait_closed(PROMPTLY * 2);
    assert_between(took, "closed after a request");
    assert!(client.buffered().is_empty());
    // ... and on one that never sent anything.
    let mut client = Client::connect(aura.addr);
    let took = client.wait_closed(PROMPTLY * 2);
    assert_between(took, "closed without a request");
    assert!(client.buffered().is_empty());
}

fn slow_heads_and_bodies_time_out(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = launch(&mock, driver, &[("--client-head-timeout-ms", SHORT_MS)]);

    // Half a head, then nothing.
    let mut client = aura.client();
    let started = Instant::now();
    client.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: aura.test\r\ncontent-");
    client.wait_closed(PROMPTLY * 2);
    assert_between(started.elapsed(), "the slow head ended");
    // Regression: the timed-out read had taken the buffer, so a partial head looked like an
    // idle connection and was closed without a word. Aura says why: an OpenAI-style 408.
    assert_error_code(&client.receive("POST"), 408, "client_timeout");

    // A whole head, then 3 of the 10 body bytes it announced.
    let mut client = aura.client();
    let request = head("POST", CHAT, "HTTP/1.1", &[("content-length", "10")]);
    client.send(format!("{request}{{\"a\"").as_bytes());
    let r = client.receive("POST");
    assert_between(r.sent_at.elapsed(), "the slow body ended");
    assert_error_code(&r, 408, "client_timeout");
    client.wait_closed(PROMPTLY);

    assert!(mock.requests().is_empty());
}

/// The value of `name=` in a text-format log line (quotes kept).
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let key = format!(" {name}=");
    let at = line
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {line:?}"))
        + key.len();
    line[at..].split(' ').next().unwrap_or_default()
}

fn access_log_has_one_line_per_request_and_no_api_key(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = Launch::new(&mock.url(), driver)
        .env("AURA_LOG", "info")
        .capture_stderr()
        .start();
    let headers = [
        ("content-type", "application/json"),
        ("authorization", SECRET_AUTH),
    ];
    // One connection: one worker, so the lines come in request order.
    let mut client = aura.client();
    let r = client.request("POST", CHAT, &headers, STREAM.as_bytes());
    assert!(r.complete && r.status == 200, "{}", r.text());
    let r = client.request("POST", CHAT, &headers, WHOLE.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    let r = client.request("POST", CHAT, &headers, b"{\"model\":");
    r.assert_openai_error(400);
    let r = client.request("GET", "/nope", &[("authorization", SECRET_AUTH)], b"");
    r.assert_openai_error(404);
    let lines = aura.log().wait_for_count("aura::access", 4, LOG_DEADLINE);
    assert_eq!(lines.len(), 4, "{lines:#?}");
    let (stream, whole, malformed, not_found) = (&lines[0], &lines[1], &lines[2], &lines[3]);
    for (line, route, status, usage, completion) in [
        (stream, "\"chat_completions\"", "200", "\"found\"", "5"),
        (whole, "\"chat_completions\"", "200", "\"found\"", "5"),
        (malformed, "\"chat_completions\"", "400", "\"none\"", "0"),
        (not_found, "\"not_found\"", "404", "\"none\"", "0"),
    ] {
        assert_eq!(field(line, "route"), route, "{line}");
        assert_eq!(field(line, "status"), status, "{line}");
        assert_eq!(field(line, "usage"), usage, "{line}");
        assert_eq!(field(line, "completion_tokens"), completion, "{line}");
    }
    assert_eq!(field(stream, "stream"), "true");
    assert_eq!(field(whole, "stream"), "false");
    for (line, sent) in [stream, whole].into_iter().zip(chat_requests(&mock)) {
        let prompt = (sent.body.len() / 4).to_string();
        assert_eq!(field(line, "prompt_tokens"), prompt, "{line}");
        assert_eq!(field(line, "model"), "\"gpt-4o-mini-2024-07-18\"", "{line}");
    }
    assert_eq!(field(malformed, "error"), "\"invalid_body\"", "{malformed}");

    // Refused before any route (the head is malformed): the key must not show either.
    let mut other = aura.client();
    let smuggle = head(
        "POST",
        CHAT,
        "HTTP/1.1",
        &[
            ("authorization", SECRET_AUTH),
            ("content-length", "5"),
            ("transfer-encoding", "chunked"),
        ],
    );
    other.send(format!("{smuggle}0\r\n\r\n").as_bytes());
    other.receive("POST").assert_openai_error(400);

    // The key reached the upstream (passthrough) and nowhere else.
    assert!(chat_requests(&mock)
        .iter()
        .all(|r| r.header("authorization") == Some(SECRET_AUTH)));
    // Everything it printed, once it is gone and its pipes are drained.
    let (stdout, stderr) = (aura.stdout.clone(), aura.log().clone());
    drop(aura);
    let mut output = stdout.all_when_closed(LOG_DEADLINE);
    output.extend(stderr.all_when_closed(LOG_DEADLINE));
    // One line per request, no second one for any; the head refused before routing gets
    // one of its own.
    let (refused, access): (Vec<&String>, Vec<&String>) = output
        .iter()
        .filter(|l| l.contains("aura::access"))
        .partition(|l| l.contains(r#"route="unparsed""#));
    assert_eq!(access, lines.iter().collect::<Vec<_>>());
    assert_eq!(refused.len(), 1, "{refused:#?}");
    assert_eq!(field(refused[0], "status"), "400", "{}", refused[0]);
    assert_eq!(
        field(refused[0], "error"),
        "\"malformed_request\"",
        "{}",
        refused[0]
    );
    for line in &output {
        assert!(!line.contains(SECRET), "API key in aura's output: {line}");
    }
}

fn client_leaving_mid_stream_still_gets_its_usage_logged(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = Launch::new(&mock.url(), driver)
        .env("AURA_LOG", "info")
        .capture_stderr()
        .start();
    let mut client = aura.client();
    let request = head(
        "POST",
        CHAT,
        "HTTP/1.1",
        &[
            ("content-type", "application/json"),
            ("authorization", "Bearer sk-test"),
            ("content-length", &STREAM.len().to_string()),
            ("x-mock-delay-ms", "100"),
            ("x-mock-chunks", "10"),
        ],
    );
    client.send(format!("{request}{STREAM}").as_bytes());
    let (status, _) = client.read_head();
    assert_eq!(status, 200);
    let seen = client.read_until(b"\n\n");
    assert!(
        common::find(seen, b"\"role\":\"assistant\"").is_some(),
        "{}",
        String::from_utf8_lossy(seen)
    );
    drop(client);
    let left_at = Instant::now();

    let line = aura
        .log()
        .wait_for_count("aura::access", 1, LOG_DEADLINE)
        .remove(0);
    assert_eq!(field(&line, "usage"), "\"found\"", "{line}");
    assert_eq!(field(&line, "completion_tokens"), "10", "{line}");
    let prompt = (chat_requests(&mock)[0].body.len() / 4).to_string();
    assert_eq!(field(&line, "prompt_tokens"), prompt, "{line}");
    // The rest of the stream (10 more delays of 100 ms) was read after the client left.
    assert!(
        left_at.elapsed() >= Duration::from_millis(500),
        "logged {:?} after the client left: did Aura read on?",
        left_at.elapsed()
    );
}

fn pipelined_requests_are_answered_in_order(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = launch(&mock, driver, &[]);
    let json = [
        ("content-type", "application/json"),
        ("authorization", "Bearer sk-test"),
    ];
    let whole_len = WHOLE.len().to_string();
    let stream_len = STREAM.len().to_string();
    // The first is the slower one: order must not depend on which finishes first.
    let first = head(
        "POST",
        CHAT,
        "HTTP/1.1",
        &[
            json[0],
            json[1],
            ("content-length", &whole_len),
            ("x-mock-delay-ms", "150"),
            ("x-mock-chunks", "2"),
        ],
    );
    let second = head(
        "POST",
        CHAT,
        "HTTP/1.1",
        &[
            json[0],
            json[1],
            ("content-length", &stream_len),
            ("x-mock-chunks", "3"),
        ],
    );
    let mut client = aura.client();
    client.send(format!("{first}{WHOLE}{second}{STREAM}").as_bytes());
    let r = client.receive("POST");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["content"], "tok0 tok1 ");
    let r = client.receive("POST");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.complete);
    assert_eq!(r.streamed_content(), "tok0 tok1 tok2 ");
    // The connection is still good for a third.
    assert_eq!(client.get("/healthz").status, 200);
    assert_eq!(chat_requests(&mock).len(), 2);
}
