//! Cross-model fallbacks where they must not apply, or must not cost more than they should,
//! against the real `aura` binary: a body no fallback can name keeps its upstream's answer, a
//! job is never created on another model, speech is billed as the model that answered, and a
//! model whose upstream is ejected goes straight to its fallback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::net::TcpStream;
use std::path::Path;

use common::billing::{bearer, wait_for_spend};
use common::scripted::{self, Asked, Scripted, Then};
use common::{start_mock, Driver, Launch, MockOptions, CHAT};

fn launch(path: &Path) -> common::Aura {
    Launch::new("", Driver::Epoll)
        .workers(1)
        .arg("--config")
        .arg(path.to_str().unwrap())
        .start()
}

fn two(
    name: &str,
    big_models: &str,
    small_models: &str,
    big: &str,
    small: &str,
    fallbacks: &str,
) -> std::path::PathBuf {
    let text = format!(
        r#"
        {fallbacks}
        [[upstreams]]
        name = "big"
        url = "{big}"
        models = [{big_models}]
        [[upstreams]]
        name = "small"
        url = "{small}"
        models = [{small_models}]
        "#
    );
    common::config_file(&format!("review-{name}"), &text)
}

/// A transcription (a multipart upload, no generation) whose upstream answers 503 keeps that
/// answer: no fallback model applies to it.
#[test]
fn a_transcription_keeps_its_upstreams_503() {
    let big = scripted::overloaded();
    let small = start_mock(MockOptions::default());
    let path = two(
        "multipart",
        "\"whisper-1\"",
        "\"gpt-4o-transcribe\"",
        &big.url(),
        &small.url(),
        "[fallbacks]\n\"whisper-1\" = [\"gpt-4o-transcribe\"]",
    );
    let aura = launch(&path);
    let boundary = "b0";
    let mut body = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp3\"\r\nContent-Type: audio/mpeg\r\n\r\n").into_bytes();
    body.extend(std::iter::repeat_n(0x55u8, 2000));
    body.extend_from_slice(format!("\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--{boundary}--\r\n").as_bytes());
    let ct = format!("multipart/form-data; boundary={boundary}");
    let r = aura.client().request(
        "POST",
        "/v1/audio/transcriptions",
        &[
            ("authorization", "Bearer sk-review-mp"),
            ("content-type", &ct),
        ],
        &body,
    );
    assert_eq!(big.asked().len(), 1);
    assert_eq!(
        r.status,
        503,
        "the upstream's 503 should be relayed: {}",
        r.text()
    );
}

/// A chat body that falls back keeps every byte but its model's: its spacing, its key order, and
/// an integer past 64 bits that a JSON parser writing it again would round.
#[test]
fn a_fallback_body_is_the_clients_but_for_its_model() {
    let big = scripted::overloaded();
    let small = start_mock(MockOptions::default());
    let path = two(
        "surrogate",
        "\"gpt-4o\"",
        "\"gpt-4o-mini\"",
        &big.url(),
        &small.url(),
        "[fallbacks]\n\"gpt-4o\" = [\"gpt-4o-mini\"]",
    );
    let aura = launch(&path);
    let body = r#"{ "seed" : 123456789012345678901,"model":"gpt-4o",  "messages":[{"role":"user","content":"hi"}]}"#;
    let r = aura.client().request(
        "POST",
        CHAT,
        &[
            ("authorization", "Bearer sk-review-sur"),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(big.asked().len(), 1);
    let sent = String::from_utf8(small.requests()[0].body.clone()).unwrap();
    assert_eq!(
        sent,
        body.replace(r#""model":"gpt-4o""#, r#""model":"gpt-4o-mini""#)
    );
}

/// A fine-tuning job its upstream turned away (503) is never created on a fallback model.
#[test]
fn a_job_is_never_created_on_a_fallback_model() {
    let big = scripted::overloaded();
    let small = start_mock(MockOptions::default());
    let path = two(
        "ft",
        "\"gpt-4o-mini-2024-07-18\"",
        "\"gpt-3.5-turbo\"",
        &big.url(),
        &small.url(),
        "[fallbacks]\n\"gpt-4o-mini-2024-07-18\" = [\"gpt-3.5-turbo\"]",
    );
    let aura = launch(&path);
    let job = r#"{"model":"gpt-4o-mini-2024-07-18","training_file":"file-abc"}"#;
    let r = aura.client().post_json("/v1/fine_tuning/jobs", &[], job);
    assert_eq!(r.status, 503, "{}", r.text());
    let jobs: Vec<_> = small
        .requests()
        .into_iter()
        .filter(|r| r.target.contains("fine_tuning"))
        .collect();
    assert!(
        jobs.is_empty(),
        "job sent to the fallback as {}",
        String::from_utf8_lossy(&jobs[0].body)
    );
}

/// Text to speech by tts-1, with tts-1-hd as its fallback but not taken, is billed tts-1's
/// price per character, not the fallback's.
#[test]
fn speech_is_billed_as_the_model_that_answered() {
    let mock = start_mock(MockOptions::default());
    let text = format!(
        r#"
        [fallbacks]
        "tts-1" = ["tts-1-hd"]
        [[upstreams]]
        name = "one"
        url = "{}"
        models = ["tts-*"]
        "#,
        mock.url()
    );
    let path = common::config_file("review-tts", &text);
    let aura = launch(&path);
    let key = "sk-review-tts";
    let input = "Hello world, this is a speech test.";
    let body = format!(r#"{{"model":"tts-1","voice":"alloy","input":"{input}"}}"#);
    let r = aura.client().request(
        "POST",
        "/v1/audio/speech",
        &[
            ("authorization", &bearer(key)),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200);
    let asked: serde_json::Value = serde_json::from_slice(&mock.requests()[0].body).unwrap();
    assert_eq!(asked["model"], "tts-1", "answered by tts-1 itself");
    // tts-1: 15 $/M characters = 15_000_000 pico each.
    let want = (input.chars().count() as u64 * 15_000_000).div_ceil(1000);
    wait_for_spend(&aura, key, want);
}

/// A model whose only upstream is ejected goes straight to its fallback's upstream: the
/// known-bad one is not tried (and waited on) by every request.
#[test]
fn a_model_whose_upstream_is_ejected_goes_straight_to_its_fallback() {
    let big = Scripted::start(|_: &Asked, stream: &mut TcpStream| {
        scripted::send(
            stream,
            b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n",
        );
        Then::Next
    });
    let small = start_mock(MockOptions::default());
    let path = two(
        "ejected",
        "\"gpt-4o\"",
        "\"gpt-4o-mini\"",
        &big.url(),
        &small.url(),
        "[fallbacks]\n\"gpt-4o\" = [\"gpt-4o-mini\"]",
    );
    let aura = Launch::new("", Driver::Epoll)
        .workers(1)
        .arg("--config")
        .arg(path.to_str().unwrap())
        .arg("--upstream-eject-after-failures")
        .arg("2")
        .arg("--upstream-eject-ms")
        .arg("30000")
        .start();
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    for _ in 0..6 {
        let r = aura.client().request(
            "POST",
            CHAT,
            &[
                ("authorization", "Bearer sk-review-ej"),
                ("content-type", "application/json"),
            ],
            body.as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    common::scrape_until(&aura, |t| {
        t.lines()
            .any(|l| l == "aura_upstream_up{upstream=\"big\"} 0")
    });
    assert_eq!(big.asked().len(), 2, "asked while ejected");
}
