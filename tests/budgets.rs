//! Budgets end to end: the real `aura` binary (2 workers, in-memory store) in front of the mock.
//! Spend must equal the mock's usage × price to the nano-dollar, whatever the route and even when
//! clients leave mid-stream; concurrent clients on a small limit must not spend past it; a spent
//! key gets an OpenAI-style 402. Workers flush spend every 50 ms, so tests wait on `/v1/usage`
//! with a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::billing::*;
use common::{start_mock, Driver, Launch, MockOptions, CHAT, STREAM, WHOLE};

on_both_drivers!(
    spend_is_exact_over_every_billed_route_and_clients_that_leave,
    concurrent_clients_never_spend_past_the_limit,
    a_spent_key_gets_402_and_other_keys_do_not,
    usage_answers_for_the_callers_own_key_only,
    a_litellm_price_file_prices_the_response_model,
    an_unknown_model_is_billed_at_the_default_price,
    an_answer_without_usage_is_billed_an_estimate,
    the_access_log_bills_by_key_id_never_by_key,
    virtual_keys_reach_the_upstream_as_their_upstream_key,
    the_admin_api_needs_its_token_and_manages_limits,
    the_admin_api_is_off_without_a_token,
    past_the_drain_bound_a_left_stream_is_billed_its_reservation,
);

fn spend_is_exact_over_every_billed_route_and_clients_that_leave(driver: Driver) {
    let key = "sk-test-exact-000000000001";
    let mock = start_mock(MockOptions::default());
    let aura = launch(&mock, driver, &[]);
    let embed = r#"{"model":"text-embedding-3-small","input":["one","two","three"]}"#;
    for i in 0..6 {
        let chunks = (i + 1).to_string();
        assert_eq!(
            post(&aura, key, CHAT, &[("x-mock-chunks", &chunks)], STREAM),
            200
        );
    }
    for _ in 0..4 {
        assert_eq!(post(&aura, key, CHAT, &[], WHOLE), 200);
    }
    for _ in 0..3 {
        assert_eq!(post(&aura, key, "/v1/embeddings", &[], embed), 200);
    }
    for _ in 0..2 {
        leave_mid_stream(&aura, key);
    }
    let completion = r#"{"model":"gpt-4o-mini","prompt":"Say hello","max_tokens":16}"#;
    assert_eq!(post(&aura, key, "/v1/completions", &[], completion), 200);
    let response = r#"{"model":"gpt-4o-mini","input":"Say hello"}"#;
    let streamed = r#"{"model":"gpt-4o-mini","input":"Say hello","stream":true}"#;
    assert_eq!(post(&aura, key, "/v1/responses", &[], response), 200);
    assert_eq!(
        post(
            &aura,
            key,
            "/v1/responses",
            &[("x-mock-chunks", "3")],
            streamed
        ),
        200
    );
    // Failed upstream answers cost nothing; a model list is not billed.
    assert_eq!(
        post(&aura, key, CHAT, &[("x-mock-status", "500")], WHOLE),
        500
    );
    let models =
        aura.client()
            .request("GET", "/v1/models", &[("authorization", &bearer(key))], b"");
    assert_eq!(models.status, 200);

    let mut want = 0;
    let mut billed = 0;
    for r in mock.requests() {
        if r.headers.iter().any(|(n, _)| n == "x-mock-status") || r.method == "GET" {
            continue;
        }
        let (prompt, completion) = mock_usage(&r);
        want += if r.target.ends_with("/embeddings") {
            cost(prompt, 0, EMBED_IN, 0)
        } else {
            cost(prompt, completion, MINI_IN, MINI_OUT)
        };
        billed += 1;
    }
    assert_eq!(billed, 18);
    let usage = wait_for_spend(&aura, key, want);
    assert_eq!(nano(&usage["limit_dollars"]), 10_000_000_000);
    assert_eq!(
        nano(&usage["remaining_dollars"]),
        10_000_000_000 - want,
        "{usage}"
    );
    println!("18 billed requests, spend {want} nano-dollars, exact");
}

fn concurrent_clients_never_spend_past_the_limit(driver: Driver) {
    const CLIENTS: usize = 64;
    const EACH: usize = 3;
    let limit_nano: u64 = 200_000;
    let key = "sk-test-concurrent-000000001";
    let mock = start_mock(MockOptions::default());
    let aura = launch(&mock, driver, &[("--default-limit-dollars", "0.0002")]);
    // max_tokens equals the mock's 5 chunks: the estimate bounds the real cost.
    let body = r#"{"model":"gpt-4o-mini","max_tokens":5,"messages":[{"role":"user","content":"Say hello"}],"stream":true}"#;
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|_| {
                s.spawn(|| {
                    (0..EACH)
                        .map(|_| post(&aura, key, CHAT, &[], body))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let want: u64 = mock
        .requests()
        .iter()
        .map(|r| {
            let (p, c) = mock_usage(r);
            cost(p, c, MINI_IN, MINI_OUT)
        })
        .sum();
    let usage = wait_for_spend(&aura, key, want);
    // Without the squeeze, 26,750 was left stranded (3 requests' worth).
    check_concurrent_spend(
        "1 node × 2 workers",
        &statuses,
        nano(&usage["usage_dollars"]),
        limit_nano,
        20_000,
    );
}

fn a_spent_key_gets_402_and_other_keys_do_not(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    // One streamed request (estimate ~18k nano, cost ~8k) fits; a second does not.
    let aura = launch(&mock, driver, &[("--default-limit-dollars", "0.00002")]);
    let body = r#"{"model":"gpt-4o-mini","max_tokens":5,"messages":[{"role":"user","content":"Say hello"}],"stream":true}"#;
    let spent_key = "sk-test-spent-0000000000001";
    assert_eq!(post(&aura, spent_key, CHAT, &[], body), 200);
    let (p, c) = mock_usage(&mock.requests()[0]);
    wait_for_spend(&aura, spent_key, cost(p, c, MINI_IN, MINI_OUT));
    let auth = bearer(spent_key);
    let r = aura.client().request(
        "POST",
        CHAT,
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    );
    let error = r.assert_openai_error(402);
    assert_eq!(error["error"]["type"], "insufficient_quota");
    assert_eq!(error["error"]["code"], "insufficient_quota");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("budget exhausted"),
        "{error}"
    );
    assert_eq!(
        mock.requests().len(),
        1,
        "a refused request never reaches the upstream"
    );
    assert_eq!(
        post(&aura, "sk-test-other-00000000001", CHAT, &[], body),
        200
    );
}

fn usage_answers_for_the_callers_own_key_only(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = launch(&mock, driver, &[]);
    let key = "sk-proj-usage-test-0000abcd";
    let fresh = usage_of(&aura, key);
    assert_eq!(fresh["api_key"], "sk-...abcd");
    assert_eq!(fresh["limit_dollars"], 10.0);
    assert_eq!(fresh["usage_dollars"], 0.0);
    assert_eq!(fresh["remaining_dollars"], 10.0);
    assert_eq!(
        fresh.as_object().unwrap().len(),
        4,
        "exactly the original Aura's fields: {fresh}"
    );
    let r = aura.client().get("/v1/usage");
    let error = r.assert_openai_error(401);
    assert_eq!(error["error"]["code"], "missing_api_key");
    // A chat request without a key is refused before it reaches the upstream.
    let r = aura.client().request(
        "POST",
        CHAT,
        &[("content-type", "application/json")],
        WHOLE.as_bytes(),
    );
    r.assert_openai_error(401);
    assert!(mock.requests().is_empty());
}

fn a_litellm_price_file_prices_the_response_model(driver: Driver) {
    let dir = std::env::temp_dir().join(format!("aura-prices-{}-{driver:?}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("model_prices_and_context_window.json");
    // The response's dated name, priced apart from its base name.
    std::fs::write(
        &file,
        r#"{"sample_spec": {"max_tokens": "LEGACY"},
            "gpt-4o-mini-2024-07-18": {"input_cost_per_token": 1e-06, "output_cost_per_token": 3e-06,
                                       "max_output_tokens": 100, "litellm_provider": "openai"}}"#,
    )
    .unwrap();
    let mock = start_mock(MockOptions::default());
    let aura = launch(&mock, driver, &[("--price-file", file.to_str().unwrap())]);
    let key = "sk-test-pricefile-00000001";
    assert_eq!(post(&aura, key, CHAT, &[], WHOLE), 200);
    let (p, c) = mock_usage(&mock.requests()[0]);
    wait_for_spend(&aura, key, cost(p, c, 1_000_000, 3_000_000));
    std::fs::remove_dir_all(&dir).unwrap();
}

fn an_unknown_model_is_billed_at_the_default_price(driver: Driver) {
    let mock = start_mock(MockOptions {
        model: "acme-private-model-7b".into(),
        ..MockOptions::default()
    });
    let aura = launch(&mock, driver, &[]);
    let key = "sk-test-unknown-model-0001";
    let body =
        r#"{"model":"acme-private-model-7b","messages":[{"role":"user","content":"Say hello"}]}"#;
    assert_eq!(post(&aura, key, CHAT, &[], body), 200);
    let (p, c) = mock_usage(&mock.requests()[0]);
    // Default: $5 per million prompt tokens, $15 per million completion tokens.
    wait_for_spend(&aura, key, cost(p, c, 5_000_000, 15_000_000));
    wait_for_metric(&aura, "aura_default_price_requests_total 1");
}

fn an_answer_without_usage_is_billed_an_estimate(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = launch(&mock, driver, &[]);
    let key = "sk-test-no-usage-000000001";
    assert_eq!(
        post(&aura, key, CHAT, &[("x-mock-no-usage", "1")], STREAM),
        200
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let spent = loop {
        let spent = nano(&usage_of(&aura, key)["usage_dollars"]);
        if spent > 0 {
            break spent;
        }
        assert!(
            Instant::now() < deadline,
            "an answer without usage was free"
        );
        std::thread::park_timeout(Duration::from_millis(20));
    };
    // Never more than the reservation: body bytes as prompt tokens, 16384 completion tokens.
    let forwarded = mock.requests()[0].body.len() as u64;
    assert!(spent <= cost(STREAM.len() as u64, 16_384, MINI_IN, MINI_OUT));
    assert!(spent >= cost(forwarded / 4, 0, MINI_IN, 0), "{spent}");
    wait_for_metric(&aura, "aura_usage_missing_total 1");
}

fn the_access_log_bills_by_key_id_never_by_key(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = Launch::new(&mock.url(), driver)
        .env("AURA_LOG", "info")
        .capture_stderr()
        .start();
    let key = "sk-live-LOGSECRET-0000000001";
    assert_eq!(post(&aura, key, CHAT, &[], WHOLE), 200);
    let line = aura
        .log()
        .wait_for_count("aura::access", 1, Duration::from_secs(5))
        .remove(0);
    let id = aura::auth::KeyId::of(key).to_string();
    assert!(line.contains(&format!("key_id=\"{id}\"")), "{line}");
    let (p, c) = mock_usage(&mock.requests()[0]);
    let cost_field = format!("cost_nano_usd={}", cost(p, c, MINI_IN, MINI_OUT));
    assert!(line.contains(&cost_field), "{line}");
    assert!(line.contains("price=\"base_name\""), "{line}");
    assert!(
        !line.contains("LOGSECRET"),
        "the key leaked into the log: {line}"
    );
}

/// Writes `text` as a config file for one test and returns its path.
fn config_file(name: &str, driver: Driver, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("aura-{name}-{}-{driver:?}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("aura.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn virtual_keys_reach_the_upstream_as_their_upstream_key(driver: Driver) {
    let path = config_file(
        "virtual",
        driver,
        r#"
        key_mode = "virtual"
        [keys.team-a]
        key = "sk-aura-team-a-0000000001"
        upstream_key = "sk-proj-PROVIDER-SECRET-1"
        limit_dollars = 3
        [prices."gpt-4o-mini"]
        input_dollars_per_million = 2.0
        output_dollars_per_million = 4.0
        "#,
    );
    let mock = start_mock(MockOptions::default());
    let aura = launch(&mock, driver, &[("--config", path.to_str().unwrap())]);
    let key = "sk-aura-team-a-0000000001";
    assert_eq!(post(&aura, key, CHAT, &[], WHOLE), 200);
    let models =
        aura.client()
            .request("GET", "/v1/models", &[("authorization", &bearer(key))], b"");
    assert_eq!(models.status, 200);
    for r in mock.requests() {
        let auth: Vec<&String> = r
            .headers
            .iter()
            .filter(|(n, _)| n == "authorization")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(auth, ["Bearer sk-proj-PROVIDER-SECRET-1"], "{}", r.target);
    }
    // Unknown keys never reach the upstream, on billed routes or not.
    let stranger = "sk-not-configured-000000001";
    let r = aura.client().request(
        "POST",
        CHAT,
        &[
            ("authorization", &bearer(stranger)),
            ("content-type", "application/json"),
        ],
        WHOLE.as_bytes(),
    );
    assert_eq!(
        r.assert_openai_error(401)["error"]["code"],
        "invalid_api_key"
    );
    let r = aura.client().request(
        "GET",
        "/v1/models",
        &[("authorization", &bearer(stranger))],
        b"",
    );
    r.assert_openai_error(401);
    assert_eq!(mock.requests().len(), 2);
    // The key's configured limit, and the [prices] override of the base name.
    let (p, c) = mock_usage(&mock.requests()[0]);
    let usage = wait_for_spend(&aura, key, cost(p, c, 2_000_000, 4_000_000));
    assert_eq!(usage["limit_dollars"], 3.0);
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

fn the_admin_api_needs_its_token_and_manages_limits(driver: Driver) {
    const TOKEN: &str = "admin-token-0123456789";
    let mock = start_mock(MockOptions::default());
    let aura = launch(&mock, driver, &[("--admin-token", TOKEN)]);
    let admin = |method: &str, target: &str, token: &str, body: &str| {
        aura.client().request(
            method,
            target,
            &[
                ("authorization", &bearer(token)),
                ("content-type", "application/json"),
            ],
            body.as_bytes(),
        )
    };
    let key = "sk-test-admin-managed-00001";
    let id = aura::auth::KeyId::of(key).to_string();
    // No token, a wrong token: 401, and nothing changes.
    let r = aura.client().get("/admin/keys");
    assert_eq!(
        r.assert_openai_error(401)["error"]["code"],
        "invalid_admin_token"
    );
    admin("GET", "/admin/keys", "admin-token-0123456780", "").assert_openai_error(401);

    let created = admin(
        "POST",
        "/admin/keys",
        TOKEN,
        &format!(r#"{{"key":"{key}","limit_dollars":0.5}}"#),
    );
    assert_eq!(created.status, 201, "{}", created.text());
    let body = created.json();
    assert_eq!(body["key_id"], id.as_str());
    assert_eq!(body["limit_dollars"], 0.5);
    assert!(!created.text().contains(key), "the key came back in clear");
    assert_eq!(usage_of(&aura, key)["limit_dollars"], 0.5);

    assert_eq!(post(&aura, key, CHAT, &[], WHOLE), 200);
    let (p, c) = mock_usage(&mock.requests()[0]);
    let spent = cost(p, c, MINI_IN, MINI_OUT);
    wait_for_spend(&aura, key, spent);
    let one = admin("GET", &format!("/admin/keys/{id}"), TOKEN, "").json();
    assert_eq!(nano(&one["usage_dollars"]), spent);

    let patched = admin(
        "PATCH",
        &format!("/admin/keys/{id}"),
        TOKEN,
        r#"{"limit_dollars":2}"#,
    );
    assert_eq!(patched.status, 200);
    assert_eq!(patched.json()["limit_dollars"], 2.0);
    let reset = admin("POST", &format!("/admin/keys/{id}/reset"), TOKEN, "").json();
    assert_eq!(reset["usage_dollars"], 0.0);
    assert_eq!(usage_of(&aura, key)["usage_dollars"], 0.0);

    let all = admin("GET", "/admin/keys", TOKEN, "").json();
    assert!(
        all["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["key_id"] == id.as_str()),
        "{all}"
    );
    let bad = admin(
        "PATCH",
        &format!("/admin/keys/{id}"),
        TOKEN,
        r#"{"limit_dollars":-1}"#,
    );
    bad.assert_openai_error(400);
    admin("GET", "/admin/keys/0000000000000000", TOKEN, "").assert_openai_error(404);

    assert_eq!(
        admin("DELETE", &format!("/admin/keys/{id}"), TOKEN, "").status,
        200
    );
    assert_eq!(
        usage_of(&aura, key)["limit_dollars"],
        10.0,
        "back to the default"
    );
}

fn the_admin_api_is_off_without_a_token(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = launch(&mock, driver, &[]);
    aura.client().get("/admin/keys").assert_openai_error(404);
}

fn past_the_drain_bound_a_left_stream_is_billed_its_reservation(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    // No drains at all: a client that leaves mid-stream cannot be read on to its usage.
    let aura = launch(&mock, driver, &[("--max-drains-per-worker", "0")]);
    let key = "sk-test-no-drain-00000001";
    leave_mid_stream(&aura, key);
    // The reservation: the original body's bytes as prompt tokens, and gpt-4o-mini's 16384
    // output tokens (the request sets no max_tokens).
    wait_for_spend(
        &aura,
        key,
        cost(STREAM.len() as u64, 16_384, MINI_IN, MINI_OUT),
    );
    wait_for_metric(&aura, "aura_usage_missing_total 1");
}
