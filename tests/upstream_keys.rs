//! Each upstream's own provider keys, headers and kind, against the real `aura` binary and
//! mock upstreams that record what reached them: a pool of keys taken in turn, a key the
//! provider refuses rested, an Azure upstream asked as Azure expects, and passthrough mode
//! refusing upstream keys.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::path::PathBuf;

use common::scripted::{self, Scripted, Then};
use common::{start_mock, Driver, Launch, MockOptions, CHAT};

on_both_drivers!(
    each_upstream_gets_its_own_keys_in_its_own_shape,
    a_key_the_provider_refuses_is_rested,
    every_key_refused_is_auras_502,
    a_client_cannot_steer_the_operators_key,
);

/// Aura with virtual key `sk-aura-team` and one upstream at `url` serving every model with the
/// pool `keys` (a TOML list), on one worker.
fn pooled(name: &str, driver: Driver, url: &str, keys: &str) -> common::Aura {
    let text = format!(
        r#"
        key_mode = "virtual"
        [keys.team]
        key = "sk-aura-team"
        [[upstreams]]
        name = "p"
        url = "{url}"
        models = ["*"]
        keys = {keys}
        "#
    );
    one_worker(&write_config(name, driver, &text), driver)
}

/// Aura with one worker (the pool's turn and its keys' rests are a worker's own) on `path`.
fn one_worker(path: &std::path::Path, driver: Driver) -> common::Aura {
    Launch::new("", driver)
        .workers(1)
        .arg("--config")
        .arg(path.to_str().unwrap())
        .start()
}

fn write_config(name: &str, driver: Driver, text: &str) -> PathBuf {
    common::config_file(&format!("upstream-keys-{name}-{driver:?}"), text)
}

fn chat(model: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
}

/// A chat completion for `model` with exactly these headers (and a JSON content type).
fn ask(aura: &common::Aura, headers: &[(&str, &str)], model: &str) -> common::Response {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    aura.client()
        .request("POST", CHAT, &all, chat(model).as_bytes())
}

fn each_upstream_gets_its_own_keys_in_its_own_shape(driver: Driver) {
    let (openai, azure) = (
        start_mock(MockOptions::default()),
        start_mock(MockOptions::default()),
    );
    let azure_base = format!("http://{}/openai", azure.addr);
    let text = format!(
        r#"
        key_mode = "virtual"
        [keys.team]
        key = "sk-aura-team-secret"

        [[upstreams]]
        name = "openai"
        url = "{}"
        models = ["gpt-4o-mini"]
        keys = ["sk-pool-one", "env:AURA_TEST_POOL_KEY"]
        headers = {{ "X-Team" = "blue" }}

        [[upstreams]]
        name = "azure"
        kind = "azure"
        url = "{azure_base}"
        models = ["gpt-4o"]
        key = "azure-key-1"
        api_version = "2024-10-21"
        deployments = {{ "gpt-4o" = "prod-4o" }}
        "#,
        openai.url()
    );
    let path = write_config("shapes", driver, &text);
    let aura = Launch::new("", driver)
        .workers(1)
        .arg("--config")
        .arg(path.to_str().unwrap())
        .env("AURA_TEST_POOL_KEY", "sk-pool-two")
        .start();
    let auth = [
        ("authorization", "Bearer sk-aura-team-secret"),
        ("x-team", "red"),
    ];
    for _ in 0..4 {
        let r = ask(&aura, &auth, "gpt-4o-mini");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = ask(&aura, &auth, "gpt-4o");
    assert_eq!(r.status, 200, "{}", r.text());

    // The pool's keys in turn, as bearer keys; the upstream's header replaces the client's.
    let seen: Vec<String> = openai
        .requests()
        .iter()
        .map(|r| r.header("authorization").unwrap().to_string())
        .collect();
    assert_eq!(
        seen,
        [
            "Bearer sk-pool-one",
            "Bearer sk-pool-two",
            "Bearer sk-pool-one",
            "Bearer sk-pool-two"
        ]
    );
    for r in openai.requests() {
        let teams: Vec<&str> = r
            .headers
            .iter()
            .filter(|(n, _)| n == "x-team")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(teams, ["blue"]);
    }
    // Azure: the deployment in the path, api-version in the query, the key in api-key.
    let asked = &azure.requests()[0];
    assert_eq!(
        asked.target,
        "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21"
    );
    assert_eq!(asked.header("api-key"), Some("azure-key-1"));
    assert_eq!(asked.header("authorization"), None);
    // The virtual key itself never left Aura.
    for r in openai.requests().iter().chain(azure.requests().iter()) {
        for (_, value) in &r.headers {
            assert!(!value.contains("sk-aura"), "{:?}", r.headers);
        }
    }
}

fn a_key_the_provider_refuses_is_rested(driver: Driver) {
    let upstream = Scripted::start(|asked, stream| {
        if asked.header("authorization").as_deref() == Some("bearer sk-revoked") {
            let body = r#"{"error":{"message":"Incorrect API key","code":"invalid_api_key"}}"#;
            scripted::send(stream, &scripted::json_error("401 Unauthorized", "", body));
        } else {
            scripted::send(stream, &scripted::json_answer("ok"));
        }
        Then::Next
    });
    let aura = pooled(
        "refused",
        driver,
        &upstream.url(),
        r#"["sk-revoked", "sk-valid"]"#,
    );
    let auth = [("authorization", "Bearer sk-aura-team")];
    let statuses: Vec<u16> = (0..6).map(|_| ask(&aura, &auth, "m").status).collect();
    // The first request went with the refused key, and on with the next; from then on only
    // the valid key is used. The provider's 401, about the operator's key, never reached the
    // client.
    assert_eq!(statuses, [200; 6]);
    let keys: Vec<String> = upstream
        .asked()
        .iter()
        .map(|a| a.header("authorization").unwrap())
        .collect();
    assert_eq!(
        keys.iter().filter(|k| *k == "bearer sk-revoked").count(),
        1,
        "{keys:?}"
    );
    assert_eq!(keys.len(), 7, "{keys:?}");
}

/// Every key of the pool refused: Aura's own 502, not the provider's answer about its key.
fn every_key_refused_is_auras_502(driver: Driver) {
    let upstream = Scripted::start(|_, stream| {
        let body = r#"{"error":{"message":"Incorrect API key provided: sk-proj-****abcd","code":"invalid_api_key"}}"#;
        scripted::send(stream, &scripted::json_error("401 Unauthorized", "", body));
        Then::Next
    });
    let aura = pooled(
        "all-refused",
        driver,
        &upstream.url(),
        r#"["sk-one", "sk-two"]"#,
    );
    let r = ask(&aura, &[("authorization", "Bearer sk-aura-team")], "m");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_keys_refused");
    assert!(!r.text().contains("sk-proj"), "{}", r.text());
    assert_eq!(upstream.asked().len(), 2, "each key once");
}

/// With Aura's own key, the client's headers that choose what an operator's key bills
/// (OpenAI's organization and project) do not go on; a second credential in an `_` spelling
/// is refused.
fn a_client_cannot_steer_the_operators_key(driver: Driver) {
    let openai = start_mock(MockOptions::default());
    let text = format!(
        r#"
        key_mode = "virtual"
        [keys.team]
        key = "sk-aura-team-steer"
        [[upstreams]]
        name = "openai"
        url = "{}"
        models = ["*"]
        key = "sk-pool-one"
        headers = {{ "OpenAI-Organization" = "org-operator" }}
        "#,
        openai.url()
    );
    let path = write_config("steer", driver, &text);
    let aura = Launch::new("", driver)
        .arg("--config")
        .arg(path.to_str().unwrap())
        .start();
    let auth = ("authorization", "Bearer sk-aura-team-steer");
    let r = ask(
        &aura,
        &[
            auth,
            ("openai-organization", "org-someone-else"),
            ("openai-project", "proj_someone_else"),
        ],
        "gpt-4o-mini",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let asked = &openai.requests()[0];
    let scoping: Vec<&(String, String)> = asked
        .headers
        .iter()
        .filter(|(n, _)| n.starts_with("openai-"))
        .collect();
    assert_eq!(
        scoping,
        [&(
            "openai-organization".to_string(),
            "org-operator".to_string()
        )]
    );
    let r = ask(&aura, &[auth, ("api_key", "sk-smuggled")], "gpt-4o-mini");
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(openai.requests().len(), 1);
}

#[test]
fn upstream_keys_need_virtual_keys() {
    let text = r#"
        [[upstreams]]
        name = "p"
        url = "http://127.0.0.1:9/v1"
        models = ["*"]
        key = "sk-operator"
        "#;
    let path = write_config("passthrough", Driver::IoUring, text);
    let exit = Launch::new("", Driver::IoUring)
        .arg("--config")
        .arg(path.to_str().unwrap())
        .run_to_exit();
    assert_eq!(exit.status.code(), Some(2), "{}", exit.output());
    assert!(
        exit.output().contains("key_mode = \"virtual\""),
        "{}",
        exit.output()
    );
    assert!(!exit.output().contains("sk-operator"), "{}", exit.output());
}

#[test]
fn print_config_shows_the_routing_table_without_secrets() {
    let text = r#"
        key_mode = "virtual"
        [keys.team]
        key = "sk-aura-team-print-0001"

        [[upstreams]]
        name = "groq"
        url = "https://api.groq.com/openai/v1"
        models = ["llama*"]
        keys = ["gsk-first-key-aaaa1111", "env:AURA_TEST_GROQ_KEY"]
        "#;
    let path = write_config("print", Driver::IoUring, text);
    let exit = Launch::new("", Driver::IoUring)
        .arg("--config")
        .arg(path.to_str().unwrap())
        .arg("--print-config")
        .env("AURA_TEST_GROQ_KEY", "gsk-second-key-bbbb2222")
        .run_to_exit();
    assert_eq!(exit.status.code(), Some(0), "{}", exit.output());
    let printed = &exit.stdout;
    assert!(printed.contains(r#"name = "groq""#), "{printed}");
    assert!(printed.contains(r#"models = ["llama*"]"#), "{printed}");
    assert!(
        printed.contains(r#"keys = ["gsk-...1111", "gsk-...2222"]"#),
        "{printed}"
    );
    for secret in ["gsk-first-key", "gsk-second-key", "sk-aura-team-print"] {
        assert!(
            !exit.output().contains(secret),
            "{secret} in {}",
            exit.output()
        );
    }
}
