//! The official `openai` Python SDK against Aura in front of the mock upstream: streams with and
//! without `stream_options`, a whole answer, an upstream error, and a spent key's 402. The interpreter comes from
//! `AURA_TEST_PYTHON` (scripts/test points it at a venv with the SDK), else `python3`; a missing
//! SDK fails the test rather than skipping it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::process::Command;
use std::time::Duration;

use common::{run_with_deadline, start_mock, Aura, Driver, Launch, MockOptions};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_client.py");
const CHUNKS: usize = 4;
/// The script's exit code when `import openai` fails.
const NO_SDK: i32 = 3;

on_both_drivers!(
    openai_python_sdk_works_through_aura,
    openai_python_sdk_raises_its_quota_error_on_a_spent_key,
);

fn openai_python_sdk_works_through_aura(driver: Driver) {
    let mock = start_mock(MockOptions {
        chunks: CHUNKS,
        ..MockOptions::default()
    });
    let aura = Aura::start(&mock.url(), driver);
    run_script(&aura, &[]);
}

fn openai_python_sdk_raises_its_quota_error_on_a_spent_key(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = Launch::new(&mock.url(), driver)
        .arg("--default-limit-dollars")
        .arg("0")
        .start();
    run_script(&aura, &["quota"]);
    assert!(
        mock.requests().is_empty(),
        "a refused request reached the upstream"
    );
}

fn run_script(aura: &Aura, extra: &[&str]) {
    let python = std::env::var("AURA_TEST_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let mut cmd = Command::new(&python);
    cmd.arg(SCRIPT)
        .arg(aura.base_url())
        .arg(CHUNKS.to_string())
        .args(extra);
    // Never let the SDK reach past loopback (a proxy setting would).
    cmd.env("NO_PROXY", "*")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY");
    let exit = run_with_deadline(cmd, Duration::from_secs(60));
    if exit.status.code() == Some(NO_SDK) {
        panic!("the openai Python SDK is not importable with {python}: run scripts/test (it sets AURA_TEST_PYTHON to a venv with openai)\n{}", exit.output());
    }
    assert!(
        exit.status.success(),
        "openai SDK checks failed ({}):\n{}",
        exit.status,
        exit.output()
    );
}
