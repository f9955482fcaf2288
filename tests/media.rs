//! Routes that cost money other than by chat tokens, billed as a provider bills them: images by
//! the usage their answer reports (gpt-image: text and image input tokens, image output
//! tokens), text to speech per character of its input (its answer is audio, with no usage),
//! transcriptions by the usage they report (seconds, or tokens). A model Aura cannot price for
//! such a route is refused for virtual keys. The real `aura` binary in front of the mock.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use common::billing::*;
use common::{start_mock, Aura, Driver, MockOptions};

on_both_drivers!(
    images_speech_and_transcriptions_are_billed_as_their_provider_bills_them,
    a_virtual_key_may_use_priced_media_routes_but_not_unpriced_models,
);

/// Picos per token or unit, from the built-in table.
const IMAGE_TEXT_IN: u64 = 5_000_000;
const IMAGE_MEDIA_IN: u64 = 10_000_000;
const IMAGE_OUT: u64 = 40_000_000;
const TTS_PER_CHAR: u64 = 15_000_000;
const WHISPER_PER_SECOND: u64 = 100_000_000;
const TRANSCRIBE_AUDIO_IN: u64 = 6_000_000;
const TRANSCRIBE_OUT: u64 = 10_000_000;

fn nano(picos: u128) -> u64 {
    picos.div_ceil(1_000) as u64
}

/// A multipart upload of `audio_bytes` of audio and a `model` field.
fn upload(model: &str, audio_bytes: usize) -> (String, Vec<u8>) {
    let boundary = "aura-test-boundary-01";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp3\"\r\nContent-Type: audio/mpeg\r\n\r\n"
    )
    .into_bytes();
    body.extend(std::iter::repeat_n(0x55u8, audio_bytes));
    body.extend_from_slice(
        format!("\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n--{boundary}--\r\n")
            .as_bytes(),
    );
    (format!("multipart/form-data; boundary={boundary}"), body)
}

fn send(
    aura: &Aura,
    key: &str,
    target: &str,
    content_type: &str,
    body: &[u8],
    extra: &[(&str, &str)],
) -> u16 {
    let auth = bearer(key);
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("content-type", content_type),
    ];
    headers.extend_from_slice(extra);
    aura.client().request("POST", target, &headers, body).status
}

fn images_speech_and_transcriptions_are_billed_as_their_provider_bills_them(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = launch(&mock, driver, &[]);
    let key = "sk-test-media-billing-0001";
    let mut want = 0;
    // Two images: the answer's usage, text and image input at their own prices.
    let images = br#"{"model":"gpt-image-1","prompt":"a lighthouse at dawn, in watercolour","n":2,"size":"1024x1024"}"#;
    assert_eq!(
        send(
            &aura,
            key,
            "/v1/images/generations",
            "application/json",
            images,
            &[]
        ),
        200
    );
    // The mock counts a quarter of the body's bytes as input, up to 40 of them image tokens.
    let input = (images.len() as u128 / 4).max(1);
    let image_in = input.min(40);
    want += nano(
        (input - image_in) * IMAGE_TEXT_IN as u128
            + image_in * IMAGE_MEDIA_IN as u128
            + 2 * 4_160 * IMAGE_OUT as u128,
    );
    wait_for_spend(&aura, key, want);
    // Text to speech: its characters, whatever the audio.
    let text = "Hello, wörld: this is a test of text to speech.";
    let speech = format!(r#"{{"model":"tts-1","voice":"alloy","input":"{text}"}}"#);
    assert_eq!(
        send(
            &aura,
            key,
            "/v1/audio/speech",
            "application/json",
            speech.as_bytes(),
            &[]
        ),
        200
    );
    want += nano(text.chars().count() as u128 * TTS_PER_CHAR as u128);
    wait_for_spend(&aura, key, want);
    // A transcription billed by the second (whisper-1): 90 s of a 100 KB upload.
    let (content_type, body) = upload("whisper-1", 100_000);
    assert_eq!(
        send(
            &aura,
            key,
            "/v1/audio/transcriptions",
            &content_type,
            &body,
            &[("x-mock-seconds", "90")]
        ),
        200
    );
    want += nano(90 * WHISPER_PER_SECOND as u128);
    wait_for_spend(&aura, key, want);
    // A transcription billed by tokens (gpt-4o-transcribe): audio in at its price, text out.
    let (content_type, body) = upload("gpt-4o-transcribe", 20_000);
    assert_eq!(
        send(
            &aura,
            key,
            "/v1/audio/translations",
            &content_type,
            &body,
            &[]
        ),
        200
    );
    let audio = (body.len() as u128 / 4).max(1);
    want += nano(audio * TRANSCRIBE_AUDIO_IN as u128 + 20 * TRANSCRIBE_OUT as u128);
    let usage = wait_for_spend(&aura, key, want);
    println!("media routes billed {want} nano-dollars: {usage}");
}

fn a_virtual_key_may_use_priced_media_routes_but_not_unpriced_models(driver: Driver) {
    let dir = std::env::temp_dir().join(format!("aura-media-{}-{driver:?}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("aura.toml");
    std::fs::write(
        &config,
        r#"
        key_mode = "virtual"
        [keys.team-a]
        key = "sk-aura-media-team-a-0001"
        upstream_key = "sk-proj-ORG-KEY-0000000002"
        "#,
    )
    .unwrap();
    let mock = start_mock(MockOptions::default());
    let aura = launch(&mock, driver, &[("--config", config.to_str().unwrap())]);
    let key = "sk-aura-media-team-a-0001";
    let images = br#"{"model":"gpt-image-1","prompt":"a cat","n":1}"#;
    assert_eq!(
        send(
            &aura,
            key,
            "/v1/images/generations",
            "application/json",
            images,
            &[]
        ),
        200
    );
    // A text-to-speech model with no price per character: Aura cannot price it.
    let unpriced = br#"{"model":"gpt-4o-mini-tts","voice":"alloy","input":"hello"}"#;
    let r = aura.client().request(
        "POST",
        "/v1/audio/speech",
        &[
            ("authorization", &bearer(key)),
            ("content-type", "application/json"),
        ],
        unpriced,
    );
    assert_eq!(
        r.assert_openai_error(403)["error"]["code"],
        "route_not_priced"
    );
    assert_eq!(
        mock.requests().len(),
        1,
        "only the priced request went upstream"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
