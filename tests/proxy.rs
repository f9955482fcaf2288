//! The gateway end to end: the real `aura` binary in front of the project's mock upstream, over
//! loopback sockets, each test once with io_uring and once with the epoll driver. Expectations
//! come from asking the mock directly with the same bytes, so they hold byte for byte.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use common::{
    dead_port, request, start_mock, Aura, Driver, Launch, MockOptions, MockUpstream, Recorded,
    CHAT, READ_TIMEOUT, STREAM, STREAM_USAGE, WHOLE,
};
use serde_json::json;

on_both_drivers!(
    healthz_answers_json,
    stream_without_stream_options_gets_the_stream_without_the_usage_event,
    stream_with_include_usage_is_relayed_byte_for_byte,
    stream_is_relayed_as_it_arrives,
    non_streaming_chat_is_relayed_unchanged,
    other_v1_paths_pass_through,
    upstream_errors_pass_through,
    malformed_chat_bodies_are_refused,
    oversize_body_is_413,
    unreachable_upstream_is_502,
    dead_pooled_connection_is_retried_on_a_fresh_one,
    mid_stream_reset_truncates_the_response,
    keep_alive_serves_several_requests,
    second_aura_on_a_taken_port_refuses_to_start,
);

fn start(driver: Driver) -> (MockUpstream, Aura) {
    let mock = start_mock(MockOptions::default());
    let aura = Aura::start(&mock.url(), driver);
    (mock, aura)
}

/// The chat completion requests the mock received, in order.
fn chat_requests(mock: &MockUpstream) -> Vec<Recorded> {
    mock.requests()
        .into_iter()
        .filter(|r| r.target.ends_with("/chat/completions"))
        .collect()
}

/// The mock's direct answer to `body`, with `headers`.
fn direct(mock: &MockUpstream, headers: &[(&str, &str)], body: &[u8]) -> common::Response {
    let mut all = vec![
        ("content-type", "application/json"),
        ("authorization", "Bearer sk-test"),
    ];
    all.extend_from_slice(headers);
    request(mock.addr, "POST", CHAT, &all, body)
}

fn healthz_answers_json(driver: Driver) {
    let (_mock, aura) = start(driver);
    let r = aura.client().get("/healthz");
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{:?}",
        r.headers
    );
    r.json();
}

fn stream_without_stream_options_gets_the_stream_without_the_usage_event(driver: Driver) {
    let (mock, aura) = start(driver);
    let r = aura.client().post_json(CHAT, &[], STREAM);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert!(r.complete, "stream ended properly");

    // Aura asked the upstream for usage (for billing) ...
    let sent = chat_requests(&mock);
    assert_eq!(sent.len(), 1);
    let upstream_body = sent[0].json().expect("forwarded body is JSON");
    assert_eq!(
        upstream_body["stream_options"]["include_usage"], true,
        "include_usage injected"
    );
    assert_eq!(
        upstream_body["messages"],
        json!([{"role":"user","content":"Say hello"}])
    );

    // ... and the client gets exactly what the upstream sent for that body, less the usage-only
    // event it did not ask for. (With include_usage on, OpenAI puts `"usage":null` in every
    // chunk; the SDKs read that as no usage, and Aura does not rewrite event bytes.)
    let upstream = direct(&mock, &[], &sent[0].body);
    let upstream_events = upstream.events();
    assert!(
        upstream_events.iter().any(|e| e.is_usage_only()),
        "the mock sent a usage event"
    );
    let expected: String = upstream_events
        .iter()
        .filter(|e| !e.is_usage_only())
        .map(|e| e.text.as_str())
        .collect();
    assert_eq!(r.text(), expected);
    assert!(r
        .events()
        .iter()
        .all(|e| e.json().is_none_or(|v| v["usage"].is_null())));
    assert_eq!(r.streamed_content(), "tok0 tok1 tok2 tok3 tok4 ");
}

fn stream_with_include_usage_is_relayed_byte_for_byte(driver: Driver) {
    let (mock, aura) = start(driver);
    let r = aura.client().post_json(CHAT, &[], STREAM_USAGE);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.complete);
    let sent = chat_requests(&mock);
    assert_eq!(
        sent[0].body,
        STREAM_USAGE.as_bytes(),
        "already asked for: the body goes through unchanged"
    );
    let expected = direct(&mock, &[], STREAM_USAGE.as_bytes());
    assert_eq!(r.text(), expected.text());
    let events = r.events();
    let usage = events
        .iter()
        .find(|e| e.is_usage_only())
        .expect("the usage event reaches a client that asked for it");
    assert_eq!(usage.json().unwrap()["usage"]["completion_tokens"], 5);
}

fn stream_is_relayed_as_it_arrives(driver: Driver) {
    let (_mock, aura) = start(driver);
    let r = aura
        .client()
        .post_json(CHAT, &[("x-mock-delay-ms", "150")], STREAM);
    assert!(r.complete);
    let events = r.events();
    // role, 5 content, finish, [DONE] (the usage event in between is removed)
    assert_eq!(events.len(), 8, "{}", r.text());
    let first = events[0].at;
    let last = events[events.len() - 1].at;
    let span = last.duration_since(first);
    assert!(
        span >= Duration::from_millis(700),
        "events arrived over {span:?}, sent over ~1050 ms"
    );
    let ttfb = first.duration_since(r.sent_at);
    assert!(
        ttfb < span / 3,
        "first event after {ttfb:?}, stream spans {span:?}: buffered?"
    );
    for (i, pair) in events[..7].windows(2).enumerate() {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(
            gap >= Duration::from_millis(75),
            "events {i} and {} arrived {gap:?} apart: buffered?",
            i + 1
        );
    }
}

fn non_streaming_chat_is_relayed_unchanged(driver: Driver) {
    let (mock, aura) = start(driver);
    let r = aura.client().post_json(CHAT, &[], WHOLE);
    assert_eq!(r.status, 200, "{}", r.text());
    let sent = chat_requests(&mock);
    assert_eq!(
        sent[0].body,
        WHOLE.as_bytes(),
        "no stream_options added to a non-streaming request"
    );
    assert_eq!(sent[0].header("authorization"), Some("Bearer sk-test"));
    let expected = direct(&mock, &[], WHOLE.as_bytes());
    assert_eq!(r.body, expected.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 5);
}

fn other_v1_paths_pass_through(driver: Driver) {
    let (mock, aura) = start(driver);
    let mut client = aura.client();

    let embed = r#"{"model":"text-embedding-3-small","input":"hello"}"#;
    let r = client.post_json("/v1/embeddings", &[], embed);
    assert_eq!(r.status, 200, "{}", r.text());
    let expected = request(
        mock.addr,
        "POST",
        "/v1/embeddings",
        &[("content-type", "application/json")],
        embed.as_bytes(),
    );
    assert_eq!(r.body, expected.body);

    let r = client.get("/v1/models");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.body,
        request(mock.addr, "GET", "/v1/models", &[], b"").body
    );

    let r = client.request(
        "POST",
        "/v1/foo/bar?x=1",
        &[("x-custom", "1"), ("content-type", "text/plain")],
        b"raw body",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"method":"POST","target":"/v1/foo/bar?x=1","body":"raw body"})
    );

    let log = mock.requests();
    let seen = |target: &str| {
        log.iter()
            .find(|r| r.target == target)
            .unwrap_or_else(|| panic!("mock never saw {target}: {log:?}"))
            .clone()
    };
    let e = seen("/v1/embeddings");
    assert_eq!(
        (e.method.as_str(), e.body.as_slice()),
        ("POST", embed.as_bytes())
    );
    assert_eq!(seen("/v1/models").method, "GET");
    let other = seen("/v1/foo/bar?x=1");
    assert_eq!(other.method, "POST");
    assert_eq!(other.header("x-custom"), Some("1"));
    assert_eq!(other.header("content-type"), Some("text/plain"));
    assert_eq!(other.body, b"raw body");
}

fn upstream_errors_pass_through(driver: Driver) {
    let (mock, aura) = start(driver);
    let mut client = aura.client();
    for (status, body) in [("429", WHOLE), ("500", WHOLE), ("429", STREAM)] {
        let r = client.post_json(CHAT, &[("x-mock-status", status)], body);
        let v = r.assert_openai_error(status.parse().unwrap());
        let expected = direct(&mock, &[("x-mock-status", status)], body.as_bytes()).json();
        assert_eq!(v, expected, "status {status}");
    }
    // An upstream error does not cost the client its connection.
    assert_eq!(client.post_json(CHAT, &[], WHOLE).status, 200);
}

fn malformed_chat_bodies_are_refused(driver: Driver) {
    let (mock, aura) = start(driver);
    for body in [
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user""#,
        r#"{"stream":true,"stream":false,"model":"gpt-4o-mini","messages":[]}"#,
        "not json",
    ] {
        let r = aura.client().post_json(CHAT, &[], body);
        r.assert_openai_error(400);
    }
    assert!(
        chat_requests(&mock).is_empty(),
        "nothing malformed reaches the upstream"
    );
}

fn oversize_body_is_413(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = Launch::new(&mock.url(), driver)
        .arg("--max-body-bytes")
        .arg("1024")
        .start();
    let padding = "x".repeat(2048 - WHOLE.len() + "Say hello".len());
    let body = WHOLE.replace("Say hello", &padding);
    assert_eq!(body.len(), 2048);
    let r = aura.client().post_json(CHAT, &[], &body);
    r.assert_openai_error(413);
    assert!(chat_requests(&mock).is_empty());
    // A body under the limit still goes through.
    assert_eq!(aura.client().post_json(CHAT, &[], WHOLE).status, 200);
}

fn unreachable_upstream_is_502(driver: Driver) {
    let aura = Aura::start(&format!("http://127.0.0.1:{}/v1", dead_port()), driver);
    let mut client = aura.client();
    for body in [WHOLE, STREAM] {
        let r = client.post_json(CHAT, &[], body);
        r.assert_openai_error(502);
    }
    assert_eq!(client.get("/healthz").status, 200);
}

/// A hand-rolled upstream: answers one keep-alive request on the first listener, closes that
/// connection and the listener, listens again on the same port (signalling `ready`), and answers
/// one request there. Aura's pooled connection to the first is then dead.
fn restarting_upstream(ready: mpsc::Sender<()>) -> u16 {
    let port = common::restartable_port();
    let first = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
    std::thread::spawn(move || {
        let conn = answer_one(&first, 1);
        drop(conn);
        drop(first);
        // std sets SO_REUSEADDR: the port is free again despite the closed connection's TIME_WAIT.
        let second = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
        ready.send(()).unwrap();
        let _conn = answer_one(&second, 2);
    });
    port
}

/// Accepts one connection, reads one content-length request, answers a chat completion
/// whose `id` ends in `n`.
fn answer_one(listener: &TcpListener, n: u32) -> TcpStream {
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    let mut buf = Vec::new();
    common::scripted::read_request(&mut conn, &mut buf).expect("a request before the close");
    let body = format!(
        r#"{{"id":"chatcmpl-{n}","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{{"index":0,"message":{{"role":"assistant","content":"hi"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}}}"#
    );
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(response.as_bytes()).unwrap();
    conn
}

fn dead_pooled_connection_is_retried_on_a_fresh_one(driver: Driver) {
    let (ready_tx, ready_rx) = mpsc::channel();
    let port = restarting_upstream(ready_tx);
    let aura = Aura::start(&format!("http://127.0.0.1:{port}/v1"), driver);
    // One client connection: both requests land on the same worker, hence the same pool.
    let mut client = aura.client();
    let r = client.post_json(CHAT, &[], WHOLE);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["id"], "chatcmpl-1");
    ready_rx
        .recv_timeout(READ_TIMEOUT)
        .expect("the upstream listens again");
    let r = client.post_json(CHAT, &[], WHOLE);
    assert_eq!(
        r.status,
        200,
        "a dead pooled connection must be retried once on a fresh one: {}",
        r.text()
    );
    assert_eq!(r.json()["id"], "chatcmpl-2");
}

fn mid_stream_reset_truncates_the_response(driver: Driver) {
    let (mock, aura) = start(driver);
    let r = aura
        .client()
        .post_json(CHAT, &[("x-mock-reset-after", "2")], STREAM);
    assert_eq!(r.status, 200, "the head was already sent");
    assert!(
        !r.complete,
        "the client must see the stream end abnormally (no last chunk): {}",
        r.text()
    );
    // What the upstream sent before it died reached the client.
    let upstream = direct(
        &mock,
        &[("x-mock-reset-after", "2")],
        &chat_requests(&mock)[0].body,
    );
    assert_eq!(r.text(), upstream.text());
    assert_eq!(r.streamed_content(), "tok0 ");
    // Aura keeps serving.
    let mut client = aura.client();
    assert_eq!(client.get("/healthz").status, 200);
    let r = client.post_json(CHAT, &[], STREAM);
    assert!(r.complete);
    assert_eq!(r.streamed_content(), "tok0 tok1 tok2 tok3 tok4 ");
}

fn keep_alive_serves_several_requests(driver: Driver) {
    let (_mock, aura) = start(driver);
    let mut client = aura.client();
    let r = client.post_json(CHAT, &[], STREAM);
    assert!(r.complete && r.status == 200);
    let r = client.post_json(CHAT, &[], WHOLE);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["object"], "chat.completion");
    let r = client.post_json(CHAT, &[], STREAM_USAGE);
    assert!(r.complete && r.status == 200);
    assert!(r.events().iter().any(|e| e.is_usage_only()));
}

fn second_aura_on_a_taken_port_refuses_to_start(driver: Driver) {
    let (mock, aura) = start(driver);
    let exit = Launch::new(&mock.url(), driver)
        .port(aura.port())
        .run_to_exit();
    assert!(
        !exit.status.success(),
        "second aura exited with {}\n{}",
        exit.status,
        exit.output()
    );
    assert!(
        exit.output().contains("already in use"),
        "{}",
        exit.output()
    );
    // The first one is unaffected.
    assert_eq!(aura.client().get("/healthz").status, 200);
}
