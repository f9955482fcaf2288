//! Budgets that cannot be got around, tried as a hostile client would: every other spelling of
//! a billed path, an extension method, two credentials, and routes that cost money Aura cannot
//! price. The real `aura` binary (in-memory store) in front of the mock, which records exactly
//! what reached it. Each test names the bug it reproduces.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::path::PathBuf;

use common::billing::*;
use common::{start_mock, Aura, Driver, MockOptions, MockUpstream, CHAT, STREAM, WHOLE};

on_both_drivers!(
    every_spelling_of_a_billed_path_is_billed_or_refused,
    a_spent_virtual_key_gets_nothing_by_any_spelling,
    one_credential_per_request_and_it_is_the_one_billed,
    routes_aura_cannot_price_are_refused_for_virtual_keys,
);

/// Spellings of `/v1/chat/completions` an upstream may read as it (a doubled or trailing
/// slash, dot segments, percent-encoded letters, another letter case).
const SPELLINGS: &[&str] = &[
    "//v1/chat/completions",
    "/v1//chat/completions",
    "/v1/chat/completions/",
    "/v1/./chat/completions",
    "/v1/models/../chat/completions",
    "/v1/chat/%63ompletions",
    "/%76%31/chat/completions",
    "/V1/Chat/Completions",
    "/v1/CHAT/COMPLETIONS",
];

/// Spellings that cannot be made canonical: an encoded slash, a `;`, a backslash, a path that
/// leaves `/v1`.
const REFUSED: &[&str] = &[
    "/v1/chat%2Fcompletions",
    "/v1/chat/completions;x=1",
    "/v1/chat\\completions",
    "/v1/../admin/keys",
    "/v1/%2e%2e/metrics",
];

fn send(aura: &Aura, method: &str, target: &str, headers: &[(&str, &str)], body: &str) -> u16 {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    aura.client()
        .request(method, target, &all, body.as_bytes())
        .status
}

/// Bug: other spellings of billed paths were forwarded as pass-through: no reservation, no
/// usage injection, cost 0.
fn every_spelling_of_a_billed_path_is_billed_or_refused(driver: Driver) {
    let key = "sk-test-routes-spelling-01";
    let mock = start_mock(MockOptions::default());
    let aura = launch(&mock, driver, &[]);
    let auth = bearer(key);
    for spelling in SPELLINGS {
        assert_eq!(
            send(&aura, "POST", spelling, &[("authorization", &auth)], STREAM),
            200,
            "{spelling}"
        );
    }
    // Each reached the upstream as the canonical path, with the usage event asked for.
    let requests = mock.requests();
    assert_eq!(requests.len(), SPELLINGS.len());
    for (r, spelling) in requests.iter().zip(SPELLINGS) {
        assert_eq!(r.target, CHAT, "{spelling}");
        assert_eq!(
            r.json().unwrap()["stream_options"]["include_usage"],
            true,
            "{spelling}"
        );
    }
    // And each was billed, to the nano-dollar.
    let want: u64 = requests
        .iter()
        .map(|r| {
            let (p, c) = mock_usage(r);
            cost(p, c, MINI_IN, MINI_OUT)
        })
        .sum();
    wait_for_spend(&aura, key, want);
    // What cannot be made canonical is refused, and never forwarded.
    for target in REFUSED {
        let r = aura.client().request(
            "POST",
            target,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            STREAM.as_bytes(),
        );
        assert_eq!(
            r.assert_openai_error(400)["error"]["code"],
            "invalid_path",
            "{target}"
        );
    }
    // A method an upstream might read as POST, in another case: refused, never forwarded.
    let r = aura.client().request(
        "post",
        CHAT,
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        STREAM.as_bytes(),
    );
    r.assert_openai_error(405);
    assert_eq!(
        mock.requests().len(),
        SPELLINGS.len(),
        "nothing more went upstream"
    );
}

fn virtual_config(name: &str, driver: Driver, extra: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "aura-routes-{}-{name}-{driver:?}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("aura.toml");
    let text = format!(
        r#"
        key_mode = "virtual"
        {extra}
        [keys.team-a]
        key = "sk-aura-routes-team-a-0001"
        upstream_key = "sk-proj-ORG-KEY-0000000001"
        limit_dollars = 0.0001
        "#
    );
    std::fs::write(&path, text).unwrap();
    path
}

const VIRTUAL_KEY: &str = "sk-aura-routes-team-a-0001";

/// Bug: in virtual mode a key that got 402 on the normal path got a 200 stream, paid for with
/// the org's upstream key, by spelling the path another way.
fn a_spent_virtual_key_gets_nothing_by_any_spelling(driver: Driver) {
    let config = virtual_config("spent", driver, "");
    let mock = start_mock(MockOptions::default());
    let aura = launch(&mock, driver, &[("--config", config.to_str().unwrap())]);
    let auth = bearer(VIRTUAL_KEY);
    // A $0.0001 limit: the default reservation of a request without max_tokens is far more.
    assert_eq!(
        send(&aura, "POST", CHAT, &[("authorization", &auth)], STREAM),
        402
    );
    for spelling in SPELLINGS {
        assert_eq!(
            send(&aura, "POST", spelling, &[("authorization", &auth)], STREAM),
            402,
            "{spelling}"
        );
    }
    for target in REFUSED {
        assert_eq!(
            send(&aura, "POST", target, &[("authorization", &auth)], STREAM),
            400,
            "{target}"
        );
    }
    assert!(mock.requests().is_empty(), "the org's key was never used");
    std::fs::remove_dir_all(config.parent().unwrap()).unwrap();
}

/// Bug: with two `Authorization` headers Aura billed the first and forwarded both: a
/// throwaway key paid while an upstream that reads the last header used the real key.
fn one_credential_per_request_and_it_is_the_one_billed(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = launch(&mock, driver, &[]);
    let cases: &[&[(&str, &str)]] = &[
        &[
            ("authorization", "Bearer sk-throwaway-000000001"),
            ("authorization", "Bearer sk-real-000000000001"),
        ],
        &[
            ("authorization", "Bearer sk-throwaway-000000001"),
            ("api-key", "sk-real-000000000001"),
        ],
        &[
            ("authorization", "Bearer sk-throwaway-000000001"),
            ("x-api-key", "sk-real-000000000001"),
        ],
        &[(
            "authorization",
            "Bearer sk-throwaway-000000001, Bearer sk-real-000000000001",
        )],
    ];
    for headers in cases {
        for (method, target, body) in [
            ("POST", CHAT, STREAM),
            (
                "POST",
                "/v1/embeddings",
                r#"{"model":"text-embedding-3-small","input":"x"}"#,
            ),
            ("GET", "/v1/models", ""),
        ] {
            let mut all = vec![("content-type", "application/json")];
            all.extend_from_slice(headers);
            let r = aura.client().request(method, target, &all, body.as_bytes());
            assert_eq!(
                r.assert_openai_error(400)["error"]["code"],
                "ambiguous_credentials",
                "{method} {target} {headers:?}"
            );
        }
    }
    assert!(mock.requests().is_empty(), "none of them was forwarded");
    // One credential: billed and forwarded as sent.
    let key = "sk-test-routes-one-key-01";
    assert_eq!(post(&aura, key, CHAT, &[], WHOLE), 200);
    let forwarded: Vec<String> = mock.requests()[0]
        .headers
        .iter()
        .filter(|(n, _)| n == "authorization" || n == "api-key" || n == "x-api-key")
        .map(|(n, v)| format!("{n}: {v}"))
        .collect();
    assert_eq!(forwarded, [format!("authorization: Bearer {key}")]);
}

/// Bug: in virtual mode a key with no budget left could still start batches, fine-tuning jobs
/// and the like on the org's key.
fn routes_aura_cannot_price_are_refused_for_virtual_keys(driver: Driver) {
    let unpriced: &[(&str, &str)] = &[
        ("POST", "/v1/batches"),
        ("POST", "/v1/fine_tuning/jobs"),
        ("POST", "/v1/threads/thread_1/runs"),
        ("POST", "/v1/realtime/client_secrets"),
        ("POST", "/v1/some/new/route"),
        ("PUT", "/v1/files"),
    ];
    let body = r#"{"model":"gpt-4o-mini"}"#;
    let refuse = |mock: &MockUpstream, aura: &Aura| {
        for (method, target) in unpriced {
            let r = aura.client().request(
                method,
                target,
                &[
                    ("authorization", &bearer(VIRTUAL_KEY)),
                    ("content-type", "application/json"),
                ],
                body.as_bytes(),
            );
            assert_eq!(
                r.assert_openai_error(403)["error"]["code"],
                "route_not_priced",
                "{method} {target}"
            );
        }
        assert!(mock.requests().is_empty(), "nothing reached the upstream");
        // Free routes still work for the virtual key: reads, moderations.
        assert_eq!(
            send(
                aura,
                "GET",
                "/v1/models",
                &[("authorization", &bearer(VIRTUAL_KEY))],
                ""
            ),
            200
        );
        assert_eq!(
            send(
                aura,
                "POST",
                "/v1/moderations",
                &[("authorization", &bearer(VIRTUAL_KEY))],
                r#"{"input":"hi"}"#
            ),
            200
        );
    };
    let config = virtual_config("unpriced", driver, "");
    let mock = start_mock(MockOptions::default());
    let aura = launch(&mock, driver, &[("--config", config.to_str().unwrap())]);
    refuse(&mock, &aura);
    std::fs::remove_dir_all(config.parent().unwrap()).unwrap();
    // Allowed explicitly by the operator: forwarded (and never billed).
    let config = virtual_config("allowed", driver, "allow_unpriced_routes = true");
    let mock = start_mock(MockOptions::default());
    let aura = launch(&mock, driver, &[("--config", config.to_str().unwrap())]);
    for (method, target) in unpriced {
        assert_eq!(
            send(
                &aura,
                method,
                target,
                &[("authorization", &bearer(VIRTUAL_KEY))],
                body
            ),
            200,
            "{method} {target}"
        );
    }
    assert_eq!(mock.requests().len(), unpriced.len());
    std::fs::remove_dir_all(config.parent().unwrap()).unwrap();
}
