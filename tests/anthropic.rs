//! Anthropic's Messages API through Aura, against the real `aura` binary and the project's mock
//! as an `anthropic` upstream: the official `anthropic` Python SDK streams and non-streams, the
//! spend is the mock's usage at Claude's prices to the nano-dollar (cache writes and reads
//! apart), a spent key gets the SDK's 402 error, the stream reaches the client byte for byte,
//! and Aura's own errors take Anthropic's shape. The interpreter comes from `AURA_TEST_PYTHON`
//! (scripts/test points it at the venv with both SDKs), else `python3`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use aura::mock::anthropic::{stream_events, MessagesUsage};
use common::billing::wait_for_spend;
use common::{run_with_deadline, start_mock, Aura, Driver, Launch, MockOptions, MockUpstream};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/anthropic_client.py");
const CHUNKS: usize = 4;
const NO_SDK: i32 = 3;
const TEAM: &str = "sk-aura-claude-team-0001";
const BROKE: &str = "sk-aura-claude-broke-0001";
const OPERATOR: &str = "sk-ant-operator-key-0001";
const SMALL: &str = "sk-aura-claude-small-0001";

on_both_drivers!(
    the_anthropic_sdk_streams_and_is_billed_to_the_nano_dollar,
    a_spent_key_gets_the_sdks_402,
    a_stream_reaches_the_client_byte_for_byte,
    auras_own_errors_take_anthropics_shape,
    a_request_anthropic_adds_input_to_reserves_the_context_window,
    web_searches_are_billed,
);

/// Sonnet 4 in pico-dollars per token: input, output, cache read, 5-minute cache write.
const SONNET: (u64, u64, u64, u64) = (3_000_000, 15_000_000, 300_000, 3_750_000);

fn config(name: &str, driver: Driver, claude: &MockUpstream, openai: &MockUpstream) -> PathBuf {
    let text = format!(
        r#"
        key_mode = "virtual"
        [keys.team]
        key = "{TEAM}"
        limit_dollars = 5
        [keys.broke]
        key = "{BROKE}"
        limit_dollars = 0
        [keys.small]
        key = "{SMALL}"
        limit_dollars = 0.5

        [[upstreams]]
        name = "claude"
        kind = "anthropic"
        url = "{}"
        models = ["claude-*"]
        key = "{OPERATOR}"

        [[upstreams]]
        name = "openai"
        url = "{}"
        models = ["gpt-4o-mini"]
        key = "sk-openai-operator"
        "#,
        claude.url(),
        openai.url()
    );
    common::config_file(&format!("anthropic-{name}-{driver:?}"), &text)
}

fn start(name: &str, driver: Driver) -> (MockUpstream, MockUpstream, Aura) {
    let options = MockOptions {
        chunks: CHUNKS,
        ..MockOptions::default()
    };
    let (claude, openai) = (start_mock(options.clone()), start_mock(options));
    let path = config(name, driver, &claude, &openai);
    let aura = Launch::new("", driver)
        .arg("--config")
        .arg(path.to_str().unwrap())
        .start();
    (claude, openai, aura)
}

fn run_script(aura: &Aura, key: &str, extra: &[&str]) {
    let python = std::env::var("AURA_TEST_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let mut cmd = Command::new(&python);
    // Anthropic's SDKs add `/v1` themselves.
    let base = aura.base_url();
    cmd.arg(SCRIPT)
        .arg(base.trim_end_matches("/v1"))
        .arg(key)
        .arg(CHUNKS.to_string())
        .args(extra);
    cmd.env("NO_PROXY", "*")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("ANTHROPIC_BASE_URL");
    let exit = run_with_deadline(cmd, Duration::from_secs(60));
    if exit.status.code() == Some(NO_SDK) {
        panic!("the anthropic Python SDK is not importable with {python}: run scripts/test (it sets AURA_TEST_PYTHON to a venv with anthropic)\n{}", exit.output());
    }
    assert!(
        exit.status.success(),
        "anthropic SDK checks failed ({}):\n{}",
        exit.status,
        exit.output()
    );
}

/// What the mock's answer to `r` cost at Sonnet 4's prices: its input (a quarter of the
/// body), the cache counts the request asked for, and one output token per chunk.
fn mock_cost(r: &common::Recorded) -> u64 {
    let header = |name: &str| r.header(name).map_or(0, |v| v.parse::<u64>().unwrap());
    let input = (r.body.len() as u64 / 4).max(1);
    let (i, o, read, write) = SONNET;
    let pico = input * i
        + header("x-mock-cache-write") * write
        + header("x-mock-cache-read") * read
        + CHUNKS as u64 * o;
    pico.div_ceil(1_000)
}

fn the_anthropic_sdk_streams_and_is_billed_to_the_nano_dollar(driver: Driver) {
    let (claude, openai, aura) = start("sdk", driver);
    run_script(&aura, TEAM, &[]);
    let asked = claude.requests();
    let messages: Vec<_> = asked
        .iter()
        .filter(|r| r.target == "/v1/messages")
        .collect();
    assert_eq!(
        messages.len(),
        3,
        "{:?}",
        asked.iter().map(|r| &r.target).collect::<Vec<_>>()
    );
    assert!(asked
        .iter()
        .any(|r| r.target == "/v1/messages/count_tokens"));
    // The operator's key in Anthropic's header; the team's virtual key never left Aura.
    for r in &asked {
        assert_eq!(r.header("x-api-key"), Some(OPERATOR), "{:?}", r.headers);
        assert!(r.header("anthropic-version").is_some(), "{:?}", r.headers);
        assert!(
            r.headers.iter().all(|(_, v)| !v.contains("sk-aura")),
            "{:?}",
            r.headers
        );
    }
    assert!(
        openai.requests().is_empty(),
        "a claude request went to the openai upstream"
    );
    let want: u64 = messages.iter().map(|r| mock_cost(r)).sum();
    assert!(want > 0);
    wait_for_spend_by(&aura, TEAM, want);
}

/// `/v1/usage` asked with the key in `x-api-key`, as Anthropic's clients send it.
fn wait_for_spend_by(aura: &Aura, key: &str, want: u64) {
    // The budget identity is the key whichever header carries it: Bearer works as well.
    wait_for_spend(aura, key, want);
    let r = aura
        .client()
        .request("GET", "/v1/usage", &[("x-api-key", key)], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let spent = (r.json()["usage_dollars"].as_f64().unwrap() * 1e9).round() as u64;
    assert_eq!(spent, want);
}

fn a_spent_key_gets_the_sdks_402(driver: Driver) {
    let (claude, _openai, aura) = start("quota", driver);
    run_script(&aura, BROKE, &["quota"]);
    assert!(
        claude.requests().is_empty(),
        "a refused request reached the upstream"
    );
}

fn messages_request(aura: &Aura, key: &str, body: &str) -> common::Response {
    aura.client().request(
        "POST",
        "/v1/messages",
        &[
            ("content-type", "application/json"),
            ("x-api-key", key),
            ("anthropic-version", "2023-06-01"),
        ],
        body.as_bytes(),
    )
}

fn a_stream_reaches_the_client_byte_for_byte(driver: Driver) {
    let (claude, _openai, aura) = start("bytes", driver);
    let body = r#"{"model":"claude-haiku-4-5","max_tokens":32,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = messages_request(&aura, TEAM, body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let usage = MessagesUsage {
        input: (body.len() as u64 / 4).max(1),
        cache_write: 0,
        cache_read: 0,
        output: CHUNKS as u64,
        web_searches: 0,
    };
    let want: Vec<u8> = stream_events("claude-haiku-4-5", CHUNKS, usage).concat();
    assert_eq!(r.text(), String::from_utf8(want).unwrap());
    assert_eq!(claude.requests().len(), 1);
    // Haiku 4.5: $1 in, $5 out per million.
    let cost = (usage.input * 1_000_000 + usage.output * 5_000_000).div_ceil(1_000);
    wait_for_spend(&aura, TEAM, cost);
}

fn auras_own_errors_take_anthropics_shape(driver: Driver) {
    let (claude, _openai, aura) = start("errors", driver);
    let shape = |r: &common::Response, status: u16, kind: &str| {
        assert_eq!(r.status, status, "{}", r.text());
        let body = r.json();
        assert_eq!(body["type"], "error", "{body}");
        assert_eq!(body["error"]["type"], kind, "{body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    };
    let hi = r#""max_tokens":8,"messages":[{"role":"user","content":"hi"}]"#;
    // A model no anthropic upstream serves (gpt-4o-mini is the openai upstream's).
    let r = messages_request(&aura, TEAM, &format!(r#"{{"model":"gpt-4o-mini",{hi}}}"#));
    shape(&r, 404, "not_found_error");
    // A body that is not a Messages request.
    shape(
        &messages_request(&aura, TEAM, "{not json"),
        400,
        "invalid_request_error",
    );
    shape(
        &messages_request(&aura, TEAM, &format!("{{{hi}}}")),
        400,
        "invalid_request_error",
    );
    // A key Aura does not know.
    let r = messages_request(
        &aura,
        "sk-unknown",
        &format!(r#"{{"model":"claude-sonnet-4",{hi}}}"#),
    );
    shape(&r, 401, "authentication_error");
    assert!(
        claude.requests().is_empty(),
        "a refused request reached the upstream"
    );
    // A chat completion for a claude model: chat goes to OpenAI-compatible upstreams only.
    let r = aura.client().request(
        "POST",
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("authorization", &format!("Bearer {TEAM}")),
        ],
        br#"{"model":"claude-sonnet-4","messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "model_not_found");
}

/// A document Anthropic fetches (or a server tool's results) is input the body does not hold:
/// such a request reserves the model's whole context window, so a key that could not pay for
/// it is refused before anything is sent, whatever the body's size.
fn a_request_anthropic_adds_input_to_reserves_the_context_window(driver: Driver) {
    let (claude, _openai, aura) = start("expands", driver);
    let fetched = r#"{"model":"claude-opus-4-1","max_tokens":64,"messages":[{"role":"user","content":[{"type":"document","source":{"type":"url","url":"https://example.com/a.pdf"}},{"type":"text","text":"summarise"}]}]}"#;
    let r = messages_request(&aura, SMALL, fetched);
    assert_eq!(r.status, 402, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "billing_error", "{}", r.text());
    assert!(
        claude.requests().is_empty(),
        "a request the key could not pay for was sent"
    );
    // The same question with its text in the body fits the key's $0.50.
    let plain = r#"{"model":"claude-opus-4-1","max_tokens":64,"messages":[{"role":"user","content":"summarise"}]}"#;
    assert_eq!(messages_request(&aura, SMALL, plain).status, 200);
}

/// Web searches a server tool ran are billed at Anthropic's $10 per 1,000, beside the tokens.
fn web_searches_are_billed(driver: Driver) {
    let (claude, _openai, aura) = start("searches", driver);
    let body = r#"{"model":"claude-haiku-4-5","max_tokens":64,"stream":true,"tools":[{"type":"web_search_20250305","name":"web_search","max_uses":5}],"messages":[{"role":"user","content":"news?"}]}"#;
    let r = aura.client().request(
        "POST",
        "/v1/messages",
        &[
            ("content-type", "application/json"),
            ("x-api-key", TEAM),
            ("x-mock-web-searches", "4"),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text().contains("\"web_search_requests\":4"),
        "{}",
        r.text()
    );
    assert_eq!(claude.requests().len(), 1);
    // Haiku 4.5: $1 in, $5 out per million; 4 searches at $0.01.
    let input = (body.len() as u64 / 4).max(1);
    let tokens = (input * 1_000_000 + CHUNKS as u64 * 5_000_000).div_ceil(1_000);
    wait_for_spend(&aura, TEAM, tokens + 4 * 10_000_000);
}
