//! The mock upstream on its own, over real sockets: the shapes other tests build expectations
//! from (OpenAI's stream, usage chunk, errors), its `x-mock-*` controls, and its request log.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{request, start_mock, Client, MockOptions};
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";
const STREAM: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
const STREAM_USAGE: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#;
const WHOLE: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

fn json_events(body: &common::Response) -> Vec<Value> {
    body.events().iter().filter_map(|e| e.json()).collect()
}

#[test]
fn stream_without_stream_options_is_openai_shaped_and_has_no_usage() {
    let mock = start_mock(MockOptions::default());
    let r = Client::connect(mock.addr).post_json(CHAT, &[], STREAM);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert!(r.chunked && r.complete);
    let events = r.events();
    // role, 5 content chunks, finish, [DONE]
    assert_eq!(events.len(), 8, "{}", r.text());
    assert_eq!(events.last().unwrap().text, "data: [DONE]\n\n");
    assert!(!r.text().contains("usage"));
    let chunks = json_events(&r);
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role":"assistant","content":""})
    );
    assert_eq!(chunks[6]["choices"][0]["finish_reason"], "stop");
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "gpt-4o-mini-2024-07-18");
    }
    assert_eq!(r.streamed_content(), "tok0 tok1 tok2 tok3 tok4 ");
}

#[test]
fn include_usage_adds_null_usage_everywhere_and_a_usage_only_chunk() {
    let mock = start_mock(MockOptions::default());
    let r = Client::connect(mock.addr).post_json(CHAT, &[], STREAM_USAGE);
    let events = r.events();
    assert_eq!(events.len(), 9, "{}", r.text());
    for e in &events[..7] {
        assert!(e.text.contains(r#""usage":null}"#), "{}", e.text);
    }
    assert!(events[7].is_usage_only());
    let p = (STREAM_USAGE.len() / 4) as u64;
    let usage = &events[7].json().unwrap()["usage"];
    assert_eq!(
        *usage,
        json!({"prompt_tokens":p,"completion_tokens":5,"total_tokens":p+5,"prompt_tokens_details":{"cached_tokens":0}})
    );
    assert_eq!(events[8].text, "data: [DONE]\n\n");
}

#[test]
fn a_mock_that_does_not_honour_stream_options_sends_no_usage() {
    let deaf = start_mock(MockOptions {
        honour_stream_options: false,
        ..MockOptions::default()
    });
    let r = Client::connect(deaf.addr).post_json(CHAT, &[], STREAM_USAGE);
    assert!(!r.text().contains("usage"), "{}", r.text());
    let mock = start_mock(MockOptions::default());
    let r = Client::connect(mock.addr).post_json(CHAT, &[("x-mock-no-usage", "1")], STREAM_USAGE);
    assert!(!r.text().contains("usage"), "{}", r.text());
    assert_eq!(r.events().len(), 8);
}

#[test]
fn chunk_count_and_model_follow_options_and_headers() {
    let mock = start_mock(MockOptions {
        chunks: 2,
        model: "m-1".into(),
        ..MockOptions::default()
    });
    let mut client = Client::connect(mock.addr);
    let r = client.post_json(CHAT, &[], STREAM);
    assert_eq!(r.streamed_content(), "tok0 tok1 ");
    assert_eq!(json_events(&r)[0]["model"], "m-1");
    let r = client.post_json(CHAT, &[("x-mock-chunks", "3")], STREAM);
    assert_eq!(r.streamed_content(), "tok0 tok1 tok2 ");
    let r = client.post_json(CHAT, &[("x-mock-chunks", "0")], STREAM);
    assert_eq!(r.streamed_content(), "");
    assert_eq!(r.events().len(), 3);
}

#[test]
fn whole_answer_has_usage_and_content_length() {
    let mock = start_mock(MockOptions::default());
    let r = Client::connect(mock.addr).post_json(CHAT, &[], WHOLE);
    assert_eq!(r.status, 200);
    assert!(!r.chunked);
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string().as_str())
    );
    let v = r.json();
    let p = (WHOLE.len() / 4) as u64;
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "tok0 tok1 tok2 tok3 tok4 "
    );
    assert_eq!(v["usage"]["prompt_tokens"], p);
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["usage"]["total_tokens"], p + 5);
}

#[test]
fn events_are_spaced_by_the_delay() {
    let mock = start_mock(MockOptions {
        chunks: 3,
        ..MockOptions::default()
    });
    let r = Client::connect(mock.addr).post_json(CHAT, &[("x-mock-delay-ms", "150")], STREAM);
    let events = r.events();
    assert_eq!(events.len(), 6);
    let ttfb = events[0].at.duration_since(r.sent_at);
    let span = events[5].at.duration_since(events[0].at);
    assert!(
        span >= Duration::from_millis(500),
        "5 delays of 150 ms took {span:?}"
    );
    assert!(
        ttfb < span / 5,
        "the first event is sent at once, not after a delay: {ttfb:?}"
    );
    for pair in events.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(gap >= Duration::from_millis(75), "gap {gap:?}");
    }
}

#[test]
fn status_header_answers_an_openai_error() {
    let mock = start_mock(MockOptions::default());
    let mut client = Client::connect(mock.addr);
    for (status, kind) in [
        (429, "rate_limit_error"),
        (500, "server_error"),
        (503, "server_error"),
        (400, "invalid_request_error"),
    ] {
        let r = client.post_json(CHAT, &[("x-mock-status", &status.to_string())], STREAM);
        let v = r.assert_openai_error(status);
        assert_eq!(
            v,
            json!({"error":{"message":"mock error","type":kind,"param":null,"code":null}})
        );
    }
    // The connection stays usable after an error answer.
    assert_eq!(client.post_json(CHAT, &[], WHOLE).status, 200);
}

#[test]
fn reset_after_closes_mid_stream_without_the_last_chunk() {
    let mock = start_mock(MockOptions::default());
    let r = Client::connect(mock.addr).post_json(CHAT, &[("x-mock-reset-after", "2")], STREAM);
    assert_eq!(r.status, 200);
    assert!(!r.complete);
    let events = r.events();
    assert_eq!(events.len(), 2, "{}", r.text());
    assert_eq!(r.streamed_content(), "tok0 ");
    // The mock still serves.
    assert!(
        Client::connect(mock.addr)
            .post_json(CHAT, &[], STREAM)
            .complete
    );
}

#[test]
fn embeddings_models_and_echo() {
    let mock = start_mock(MockOptions::default());
    let mut client = Client::connect(mock.addr);
    let body = r#"{"model":"text-embedding-3-small","input":["a","b"]}"#;
    let v = client.post_json("/v1/embeddings", &[], body).json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["data"][1]["index"], 1);
    let p = (body.len() / 4) as u64;
    assert_eq!(v["usage"], json!({"prompt_tokens":p,"total_tokens":p}));
    let v = client.get("/v1/models").json();
    assert_eq!(v["data"][0]["id"], "gpt-4o-mini-2024-07-18");
    let r = client.request("PUT", "/v1/foo/bar?x=1", &[("x-custom", "1")], b"hello");
    assert_eq!(
        r.json(),
        json!({"method":"PUT","target":"/v1/foo/bar?x=1","body":"hello"})
    );
}

#[test]
fn every_request_is_recorded_in_order() {
    let mock = start_mock(MockOptions::default());
    request(mock.addr, "GET", "/v1/models", &[("x-a", "1")], b"");
    Client::connect(mock.addr).post_json(CHAT, &[("x-mock-status", "500")], WHOLE);
    let log = mock.requests();
    assert_eq!(log.len(), 2);
    assert_eq!(
        (log[0].method.as_str(), log[0].target.as_str()),
        ("GET", "/v1/models")
    );
    assert_eq!(log[0].header("X-A"), Some("1"));
    assert_eq!(
        (log[1].method.as_str(), log[1].target.as_str()),
        ("POST", CHAT)
    );
    assert_eq!(log[1].body, WHOLE.as_bytes());
    assert_eq!(log[1].json().unwrap()["model"], "gpt-4o-mini");
    assert_eq!(log[1].header("authorization"), Some("Bearer sk-test"));
}

#[test]
fn malformed_chat_body_is_a_400() {
    let mock = start_mock(MockOptions::default());
    let r = Client::connect(mock.addr).post_json(CHAT, &[], "{nope");
    r.assert_openai_error(400);
}

#[test]
fn harness_recognises_the_usage_only_event() {
    let at = std::time::Instant::now();
    let e = common::Event {
        at,
        text: "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n".into(),
    };
    assert!(e.is_usage_only());
    let e = common::Event {
        at,
        text: "data: {\"choices\":[{}],\"usage\":null}\n\n".into(),
    };
    assert!(!e.is_usage_only());
    let e = common::Event {
        at,
        text: "data: [DONE]\n\n".into(),
    };
    assert!(!e.is_usage_only());
    assert_eq!(e.data(), "[DONE]");
}

#[test]
fn completions_and_responses_carry_usage_whole_and_streamed() {
    let mock = start_mock(MockOptions::default());
    let body = r#"{"model":"gpt-4o-mini","prompt":"hi"}"#;
    let r = Client::connect(mock.addr).post_json("/v1/completions", &[], body);
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "tok0 tok1 tok2 tok3 tok4 ");
    assert_eq!(v["usage"]["prompt_tokens"], body.len() / 4);
    assert_eq!(v["usage"]["completion_tokens"], 5);

    let body = r#"{"model":"gpt-4o-mini","input":"hi"}"#;
    let r = Client::connect(mock.addr).post_json("/v1/responses", &[], body);
    let v = r.json();
    assert_eq!(
        (v["object"].as_str(), v["status"].as_str()),
        (Some("response"), Some("completed"))
    );
    assert_eq!(v["usage"]["input_tokens"], body.len() / 4);
    assert_eq!(v["usage"]["output_tokens"], 5);

    let body = r#"{"model":"gpt-4o-mini","input":"hi","stream":true}"#;
    let r = Client::connect(mock.addr).post_json("/v1/responses", &[("x-mock-chunks", "2")], body);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let events = json_events(&r);
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "response.created",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.completed"
        ]
    );
    assert!(events[0]["response"]["usage"].is_null());
    assert_eq!(events[3]["response"]["usage"]["output_tokens"], 2);
    assert!(r.text().contains("event: response.completed\n"));
}
