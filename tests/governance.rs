//! Teams, calendar windows and rate limits from the outside: real nodes sharing a real
//! redis-server, clocks moved across midnight by libfaketime, and the official openai SDK
//! reading the 429 and the `x-ratelimit-*` headers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::billing::*;
use common::valkey::{journal_dir, on_valkey, Valkey};
use common::{
    at_time, config_file, run_with_deadline, start_mock, Aura, Driver, Launch, MockOptions,
    MockUpstream, Recorded, CHAT,
};
use serde_json::Value;

on_both_drivers!(
    a_team_budget_holds_across_two_nodes_and_three_keys,
    each_window_keeps_its_own_spend_and_says_when_it_refuses,
    requests_and_tokens_per_minute_hold_across_two_nodes,
    requests_in_flight_hold_across_two_nodes_and_come_back,
    the_openai_sdk_reads_the_rate_limit_headers_and_its_429,
    a_reload_that_reshapes_or_reorders_budgets_keeps_each_windows_spend,
    a_tpm_limit_reserves_estimates_and_refuses_what_could_never_fit,
    the_admin_api_shows_keys_and_teams_not_their_accounts,
    a_rate_limits_accounts_expire_in_valkey_once_idle,
    a_keys_own_limits_bind_before_its_teams_and_the_headers_show_the_tightest,
);

const ADMIN: &str = "admin-token-governance-001";

/// A chat completion bounded by `max_tokens`: the mock answers 5 tokens, so the estimate
/// bounds the real cost.
const BOUNDED: &str =
    r#"{"model":"gpt-4o-mini","max_tokens":5,"messages":[{"role":"user","content":"Say hello"}]}"#;

/// What the mock's requests sent with `key` cost.
fn spend_of(mock: &MockUpstream, key: &str) -> u64 {
    mock_cost(&requests_of(mock, key))
}

/// The requests the mock got with `key`.
fn requests_of(mock: &MockUpstream, key: &str) -> Vec<Recorded> {
    let auth = bearer(key);
    mock.requests()
        .into_iter()
        .filter(|r| {
            r.headers
                .iter()
                .any(|(n, v)| n == "authorization" && *v == auth)
        })
        .collect()
}

/// The budget named `budget` in `/v1/usage`'s list for `key`.
fn window<'u>(usage: &'u Value, budget: &str) -> &'u Value {
    usage["budgets"]
        .as_array()
        .and_then(|all| all.iter().find(|b| b["budget"] == budget))
        .unwrap_or_else(|| panic!("no {budget} in {usage}"))
}

/// Sends `body` for `key` and returns the status and the JSON body.
fn send(aura: &Aura, key: &str, headers: &[(&str, &str)], body: &str) -> (u16, Value) {
    let auth = bearer(key);
    let mut all = vec![
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    all.extend_from_slice(headers);
    let r = aura.client().request("POST", CHAT, &all, body.as_bytes());
    let json = serde_json::from_str(&r.text()).unwrap_or(Value::Null);
    (r.status, json)
}

/// Two nodes of two workers sharing `valkey`, each with the config file at `path`, their
/// clocks started at `at` (UTC) when given.
fn two_nodes(
    mock: &MockUpstream,
    valkey: &Valkey,
    driver: Driver,
    path: &std::path::Path,
    at: Option<&str>,
) -> [Aura; 2] {
    let name = path.file_name().unwrap().to_str().unwrap();
    ["node-a", "node-b"].map(|node| {
        let journal = journal_dir(&format!("{name}-{node}"), driver);
        let launch = on_valkey(mock, valkey, driver, &journal, &[])
            .arg("--config")
            .arg(path.to_str().unwrap())
            .node_id(node);
        match at {
            Some(at) => at_time(launch, at),
            None => launch,
        }
        .start()
    })
}

const TEAM_KEYS: [&str; 3] = [
    "sk-test-team-key-one-0001",
    "sk-test-team-key-two-0002",
    "sk-test-team-key-three-03",
];

/// A team with a daily and a monthly budget, its three keys spread over two nodes of two
/// workers each, 64 clients at once: the team's spend never passes the daily limit (the
/// estimate bounds every request's cost here, so not by a nano-dollar), both windows count
/// every request, and the refusals name the team's daily budget.
fn a_team_budget_holds_across_two_nodes_and_three_keys(driver: Driver) {
    const CLIENTS: usize = 64;
    const EACH: usize = 3;
    let daily_nano: u64 = 200_000;
    let monthly_nano: u64 = 1_000_000;
    let config = format!(
        r#"
[teams.research]
budgets = [{{ period = "daily", limit_dollars = 0.0002 }}, {{ period = "monthly", limit_dollars = 0.001 }}]

[keys.one]
key = "{}"
team = "research"

[keys.two]
key = "{}"
team = "research"

[keys.three]
key = "{}"
team = "research"
"#,
        TEAM_KEYS[0], TEAM_KEYS[1], TEAM_KEYS[2]
    );
    let path = config_file(&format!("team-fleet-{driver:?}"), &config);
    let mock = start_mock(MockOptions::default());
    let valkey = Valkey::start();
    let nodes = two_nodes(&mock, &valkey, driver, &path, None);
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let node = &nodes[i % 2];
                let key = TEAM_KEYS[i % 3];
                s.spawn(move || {
                    (0..EACH)
                        .map(|_| post(node, key, CHAT, &[], BOUNDED))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let spent: u64 = TEAM_KEYS.iter().map(|k| spend_of(&mock, k)).sum();
    check_concurrent_spend(
        "a team of 3 keys on 2 nodes × 2 workers",
        &statuses,
        spent,
        daily_nano,
        60_000,
    );
    // Every key's own spend, and both of the team's windows, hold every request once.
    let usage = wait_until_settled(
        &nodes[0],
        TEAM_KEYS[0],
        "team \"research\" daily budget",
        spent,
    );
    let monthly = window(&usage, "team \"research\" monthly budget");
    assert_eq!(nano(&monthly["usage_dollars"]), spent, "{usage}");
    assert_eq!(
        nano(&monthly["remaining_dollars"]),
        monthly_nano - spent,
        "{usage}"
    );
    assert_eq!(monthly["period"], "monthly");
    for (i, key) in TEAM_KEYS.iter().enumerate() {
        let own = usage_of(&nodes[(i + 1) % 2], key);
        assert_eq!(nano(&own["usage_dollars"]), spend_of(&mock, key), "{own}");
    }
    // The refusal says which budget refused, in OpenAI's shape.
    let (status, body) = send(&nodes[1], TEAM_KEYS[2], &[], BOUNDED);
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_quota");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("team \"research\" daily budget"),
        "{message}"
    );
}

/// Polls `/v1/usage` until the window `budget` shows `want` spent (flushes are asynchronous).
fn wait_until_settled(aura: &Aura, key: &str, budget: &str, want: u64) -> Value {
    common::poll(
        &format!("{budget} showing {want}"),
        Duration::from_secs(15),
        || {
            let usage = usage_of(aura, key);
            if nano(&window(&usage, budget)["usage_dollars"]) == want {
                Ok(usage)
            } else {
                Err(usage.to_string())
            }
        },
    )
}

/// A key with a daily and a monthly budget at once, its node's clock four seconds before
/// midnight: the day's budget refuses first; after midnight the day starts from zero while
/// the month goes on counting, and then the month refuses. One worker, so no lease another
/// worker holds refuses a request early.
fn each_window_keeps_its_own_spend_and_says_when_it_refuses(driver: Driver) {
    let key = "sk-test-windows-key-000001";
    // Each request reserves its estimate (every body byte a token, 5 out) and costs less.
    let estimate = cost(BOUNDED.len() as u64, 5, MINI_IN, MINI_OUT);
    let daily = 3 * estimate;
    let monthly = 4 * estimate + estimate / 2;
    let config = format!(
        r#"
[keys.windows]
key = "{key}"
budgets = [{{ period = "daily", limit_dollars = {} }}, {{ period = "monthly", limit_dollars = {} }}]
"#,
        daily as f64 / 1e9,
        monthly as f64 / 1e9
    );
    let path = config_file(&format!("windows-{driver:?}"), &config);
    let mock = start_mock(MockOptions::default());
    let started = Instant::now();
    let aura = one_worker(&mock, driver, &path, Some("2026-03-15 23:59:56"));
    let until_refused = |aura: &Aura| -> (usize, String) {
        for admitted in 0..20 {
            let (status, body) = send(aura, key, &[], BOUNDED);
            if status == 402 {
                let message = body["error"]["message"].as_str().unwrap().to_string();
                return (admitted, message);
            }
            assert_eq!(status, 200, "{body}");
        }
        panic!("never refused");
    };
    let (before, refused) = until_refused(&aura);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "too slow to finish before midnight"
    );
    assert!(before >= 3, "{before} admitted before midnight");
    assert!(
        refused.contains("key \"windows\" daily budget"),
        "{refused}"
    );
    let day_one = spend_of(&mock, key);
    assert!(day_one <= daily, "{day_one} spent of a {daily} day");
    std::thread::park_timeout(
        (started + Duration::from_secs(5)).saturating_duration_since(Instant::now()),
    );
    // A new day, the same month.
    let (after, refused) = until_refused(&aura);
    assert!(after >= 1, "the new day admitted nothing");
    assert!(
        refused.contains("key \"windows\" monthly budget"),
        "{refused}"
    );
    let total = spend_of(&mock, key);
    assert!(total <= monthly, "{total} spent of a {monthly} month");
    // Spend reaches the store at the next flush.
    let usage = wait_until_settled(&aura, key, "key \"windows\" daily budget", total - day_one);
    let day = window(&usage, "key \"windows\" daily budget");
    let month = window(&usage, "key \"windows\" monthly budget");
    assert_eq!(day["current_period"], "2026-03-16", "{usage}");
    assert_eq!(day["resets_at"], "2026-03-17T00:00:00Z", "{usage}");
    assert_eq!(month["current_period"], "2026-03", "{usage}");
    assert_eq!(nano(&month["usage_dollars"]), total, "{usage}");
    // The key's own account is its first budget: the legacy fields are the day's.
    assert_eq!(nano(&usage["usage_dollars"]), total - day_one, "{usage}");
}

/// Two nodes whose clocks start a second into a minute (so the burst stays in one minute):
/// a key limited to 30 requests a minute and a key limited to 1,000 tokens a minute, 64
/// clients at once on each. Nothing was leased at the start, so at most the limits are
/// admitted; every other request gets OpenAI's 429 with `Retry-After`.
fn requests_and_tokens_per_minute_hold_across_two_nodes(driver: Driver) {
    let rpm_key = "sk-test-rate-rpm-key-00001";
    let tpm_key = "sk-test-rate-tpm-key-00001";
    let config = format!(
        r#"
[keys.by-requests]
key = "{rpm_key}"
rpm = 30

[keys.by-tokens]
key = "{tpm_key}"
tpm = 1000
"#
    );
    let path = config_file(&format!("rates-{driver:?}"), &config);
    let mock = start_mock(MockOptions::default());
    let valkey = Valkey::start();
    let nodes = two_nodes(&mock, &valkey, driver, &path, Some("2026-03-15 10:00:01"));
    let burst = |key: &'static str| -> Vec<(u16, Value)> {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..64)
                .map(|i| {
                    let node = &nodes[i % 2];
                    s.spawn(move || send(node, key, &[], BOUNDED))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    for (key, kind) in [(rpm_key, "requests"), (tpm_key, "tokens")] {
        let answers = burst(key);
        let admitted = answers.iter().filter(|(s, _)| *s == 200).count();
        let limited: Vec<&Value> = answers
            .iter()
            .filter(|(s, _)| *s == 429)
            .map(|(_, b)| b)
            .collect();
        assert_eq!(admitted + limited.len(), answers.len(), "{answers:?}");
        assert!(admitted > 0 && !limited.is_empty(), "{admitted} admitted");
        for body in &limited {
            assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
            assert_eq!(body["error"]["type"], kind, "{body}");
        }
        let tokens: u64 = requests_of(&mock, key)
            .iter()
            .map(|r| {
                let (p, c) = mock_usage(r);
                p + c
            })
            .sum();
        println!("{kind} per minute, 2 nodes × 2 workers, 64 at once: {admitted} admitted, {} limited; {tokens} tokens", limited.len());
        match kind {
            "requests" => assert!(admitted <= 30, "{admitted} requests admitted of 30"),
            _ => assert!(tokens <= 1000, "{tokens} tokens admitted of 1000"),
        }
    }
    // A 429 says when to come back: before the minute turns. (A worker may still hold some
    // of the minute leased: the next requests use it up, none past the limit.)
    let more = |i: usize| {
        nodes[i % 2].client().request(
            "POST",
            CHAT,
            &[
                ("content-type", "application/json"),
                ("authorization", &bearer(rpm_key)),
            ],
            BOUNDED.as_bytes(),
        )
    };
    let r = (0..31)
        .map(more)
        .find(|r| r.status == 429)
        .expect("a 429 once the minute is used up");
    let admitted = requests_of(&mock, rpm_key).len();
    assert!(admitted <= 30, "{admitted} requests admitted of 30");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After: {retry}");
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("30"));
    let left: u64 = r
        .header("x-ratelimit-remaining-requests")
        .unwrap()
        .parse()
        .unwrap();
    assert!(left < 30, "{left} left");
}

/// At most 3 requests of a key in flight across two nodes: 12 slow requests at once get 3
/// answers and nine 429s; once they end, their places are free again on either node.
fn requests_in_flight_hold_across_two_nodes_and_come_back(driver: Driver) {
    let key = "sk-test-rate-inflight-0001";
    let config = format!("[keys.in-flight]\nkey = \"{key}\"\nmax_concurrent = 3\n");
    let path = config_file(&format!("in-flight-{driver:?}"), &config);
    let mock = start_mock(MockOptions::default());
    let valkey = Valkey::start();
    let nodes = two_nodes(&mock, &valkey, driver, &path, None);
    let slow = [("x-mock-delay-ms", "1500")];
    let answers: Vec<common::Response> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..12)
            .map(|i| {
                let node = &nodes[i % 2];
                s.spawn(move || {
                    let auth = bearer(key);
                    let mut headers = vec![
                        ("content-type", "application/json"),
                        ("authorization", auth.as_str()),
                    ];
                    headers.extend_from_slice(&slow);
                    node.client()
                        .request("POST", CHAT, &headers, BOUNDED.as_bytes())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let statuses: Vec<u16> = answers.iter().map(|r| r.status).collect();
    for limited in answers.iter().filter(|r| r.status == 429) {
        // A place in flight frees when any request ends: come back in a second.
        assert_eq!(limited.header("retry-after"), Some("1"));
        let body = limited.json();
        assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("concurrent requests"), "{message}");
    }
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    println!(
        "3 in flight, 2 nodes × 2 workers, 12 at once: {admitted} admitted, {limited} limited"
    );
    assert_eq!(admitted + limited, 12, "{statuses:?}");
    assert!((1..=3).contains(&admitted), "{admitted} in flight of 3");
    // Their places came back: one after another, on both nodes, nothing is refused.
    for i in 0..6 {
        assert_eq!(post(&nodes[i % 2], key, CHAT, &[], BOUNDED), 200);
    }
}

/// The official openai SDK against a key limited to 5 requests a minute (its node's clock a
/// second into a minute): `with_raw_response` shows the `x-ratelimit-*` headers counting
/// down, and the sixth request raises the SDK's `RateLimitError`, `rate_limit_exceeded`.
fn the_openai_sdk_reads_the_rate_limit_headers_and_its_429(driver: Driver) {
    let key = "sk-test-rate-sdk-key-00001";
    let config = format!("[keys.sdk]\nkey = \"{key}\"\nrpm = 5\ntpm = 100000\n");
    let path = config_file(&format!("rates-sdk-{driver:?}"), &config);
    let mock = start_mock(MockOptions::default());
    let aura = at_time(
        Launch::new(&mock.url(), driver)
            .arg("--config")
            .arg(path.to_str().unwrap()),
        "2026-03-15 10:00:01",
    )
    .start();
    let python = std::env::var("AURA_TEST_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/sdk/openai_rate_limits.py"
    );
    let mut cmd = std::process::Command::new(&python);
    cmd.arg(script)
        .arg(aura.base_url())
        .arg(key)
        .arg("5")
        .arg("100000");
    // Never let the SDK reach past loopback (a proxy setting would).
    cmd.env("NO_PROXY", "*")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY");
    let exit = run_with_deadline(cmd, Duration::from_secs(60));
    assert!(
        exit.status.success(),
        "openai SDK rate-limit checks failed ({}):\n{}",
        exit.status,
        exit.output()
    );
}

/// Sends `BOUNDED` for `key` until 402 (at most 50); the number admitted.
fn until_spent(aura: &Aura, key: &str) -> usize {
    for admitted in 0..50 {
        match post(aura, key, CHAT, &[], BOUNDED) {
            402 => return admitted,
            200 => {}
            other => panic!("status {other}"),
        }
    }
    panic!("never refused");
}

fn admin(aura: &Aura, method: &str, target: &str, body: &str) -> (u16, Value) {
    admin_json(aura, ADMIN, method, target, body)
}

/// One node of one worker before `mock`, with the config file at `path`, its clock started
/// at `at` (UTC) when given.
fn one_worker(
    mock: &MockUpstream,
    driver: Driver,
    path: &std::path::Path,
    at: Option<&str>,
) -> Aura {
    let launch = Launch::new(&mock.url(), driver)
        .workers(1)
        .arg("--config")
        .arg(path.to_str().unwrap());
    match at {
        Some(at) => at_time(launch, at),
        None => launch,
    }
    .start()
}

/// A key spends its monthly budget; the config then gives it a daily cap too
/// (`limit_dollars` becomes `budgets = [daily, monthly]`), or lists its windows the other
/// way round: after the reload the month is still spent. (Review: an account's id came from
/// where its window was listed, so a reload started the month afresh.)
fn a_reload_that_reshapes_or_reorders_budgets_keeps_each_windows_spend(driver: Driver) {
    let estimate = cost(BOUNDED.len() as u64, 5, MINI_IN, MINI_OUT);
    let monthly = format!("{}", (3 * estimate) as f64 / 1e9);
    let daily = "{ period = \"daily\", limit_dollars = 1.0 }";
    let month = format!("{{ period = \"monthly\", limit_dollars = {monthly} }}");
    let cases = [
        (
            "reshape",
            format!("limit_dollars = {monthly}"),
            format!("budgets = [{daily}, {month}]"),
        ),
        (
            "reorder",
            format!("budgets = [{month}, {daily}]"),
            format!("budgets = [{daily}, {month}]"),
        ),
    ];
    for (name, before, after) in cases {
        let key = format!("sk-test-gov-{name}-key-00001");
        let write = |budgets: &str| {
            format!("budget_period = \"monthly\"\nadmin_token = \"{ADMIN}\"\n[keys.k]\nkey = \"{key}\"\n{budgets}\n")
        };
        let path = config_file(&format!("gov-{name}-{driver:?}"), &write(&before));
        let mock = start_mock(MockOptions::default());
        let aura = one_worker(&mock, driver, &path, None);
        assert!(until_spent(&aura, &key) > 0);
        std::fs::write(&path, write(&after)).unwrap();
        let (status, body) = admin(&aura, "POST", "/admin/reload", "");
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            until_spent(&aura, &key),
            0,
            "{name}: the reload let more through"
        );
    }
}

/// A key of 1,000 tokens a minute: a 1.2 KB prompt with `max_tokens` 5 (about 310 tokens as
/// OpenAI counts them) is admitted; a request asking for more than the whole minute, or an
/// image (thousands of output tokens), is told it is too large, with no `Retry-After`: it
/// would never fit. (Review: every body byte was a token and images reserved none.)
fn a_tpm_limit_reserves_estimates_and_refuses_what_could_never_fit(driver: Driver) {
    let key = "sk-test-gov-tpm-estimate-01";
    let path = config_file(
        &format!("gov-tpm-{driver:?}"),
        &format!("[keys.tokens]\nkey = \"{key}\"\ntpm = 1000\n"),
    );
    let mock = start_mock(MockOptions::default());
    let aura = one_worker(&mock, driver, &path, Some("2026-03-15 10:00:01"));
    let text = "lorem ipsum ".repeat(100);
    let prompt = |max_tokens: u64| {
        format!(
            r#"{{"model":"gpt-4o-mini","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"{text}"}}]}}"#
        )
    };
    let (status, body) = send(&aura, key, &[], &prompt(5));
    assert_eq!(status, 200, "{body}");
    let auth = bearer(key);
    let headers = [
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    let images =
        br#"{"model":"gpt-image-1","prompt":"a lighthouse at dawn","n":2,"size":"1024x1024"}"#;
    let too_large = [
        (CHAT, prompt(2_000).into_bytes()),
        ("/v1/images/generations", images.to_vec()),
    ];
    for (target, body) in too_large {
        let r = aura.client().request("POST", target, &headers, &body);
        assert_eq!(r.status, 429, "{target}: {}", r.text());
        assert_eq!(r.header("retry-after"), None, "{target}");
        let json = r.json();
        assert_eq!(json["error"]["code"], "rate_limit_exceeded", "{json}");
        assert_eq!(json["error"]["type"], "tokens", "{json}");
        let message = json["error"]["message"].as_str().unwrap();
        assert!(message.contains("request too large"), "{message}");
    }
    // The first request's tokens were counted: the minute has room for one more like it.
    let (status, body) = send(&aura, key, &[], &prompt(5));
    assert_eq!(status, 200, "{body}");
}

/// `GET /admin/keys` lists keys, not the accounts behind their windows, teams and rate
/// limits; a key's history is labelled by its window; `GET /admin/teams` shows the team's
/// windows with its spend. (Review: rate and team accounts were listed as keys, in dollars.)
fn the_admin_api_shows_keys_and_teams_not_their_accounts(driver: Driver) {
    let key = "sk-test-gov-admin-list-001";
    let config = format!(
        r#"
admin_token = "{ADMIN}"
[teams.research]
budgets = [{{ period = "daily", limit_dollars = 1.0 }}]
rpm = 100

[keys.listed]
key = "{key}"
team = "research"
budgets = [{{ period = "daily", limit_dollars = 1.0 }}]
rpm = 50
tpm = 100000
"#
    );
    let path = config_file(&format!("gov-admin-{driver:?}"), &config);
    let mock = start_mock(MockOptions::default());
    let aura = one_worker(&mock, driver, &path, None);
    for _ in 0..3 {
        assert_eq!(post(&aura, key, CHAT, &[], BOUNDED), 200);
    }
    let spent = spend_of(&mock, key);
    wait_until_settled(&aura, key, "team \"research\" daily budget", spent);
    let (status, all) = admin(&aura, "GET", "/admin/keys", "");
    assert_eq!(status, 200, "{all}");
    let keys = all["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{all}");
    let listed = &keys[0];
    assert_eq!(listed["alias"], "listed");
    assert_eq!(listed["source"], "config");
    assert_eq!(listed["team"], "research");
    assert_eq!(listed["budgets"].as_array().unwrap().len(), 2, "{listed}");
    assert_eq!(
        listed["rate_limits"]["requests_per_minute"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let (_, one) = admin(&aura, "GET", "/admin/keys/listed", "");
    let label = one["periods"][0]["period"].as_str().unwrap();
    assert_eq!(label.len(), "2026-12-01".len(), "{one}");
    let (status, teams) = admin(&aura, "GET", "/admin/teams", "");
    assert_eq!(status, 200, "{teams}");
    let team = &teams["teams"][0];
    assert_eq!(team["name"], "research");
    assert_eq!(team["rpm"], 100);
    assert_eq!(nano(&team["budgets"][0]["usage_dollars"]), spent, "{teams}");
    assert_eq!(team["keys"][0]["alias"], "listed");
}

/// A key with rpm, tpm and max_concurrent on Valkey: once its leases went back, its rate
/// accounts are set to expire, whatever their last minute spent. (Review: they stayed
/// forever.)
fn a_rate_limits_accounts_expire_in_valkey_once_idle(driver: Driver) {
    let key = "sk-test-gov-valkey-expiry-1";
    let path = config_file(
        &format!("gov-expiry-{driver:?}"),
        &format!("[keys.v]\nkey = \"{key}\"\nrpm = 100\ntpm = 100000\nmax_concurrent = 5\n"),
    );
    let mock = start_mock(MockOptions::default());
    let valkey = Valkey::start();
    let journal = journal_dir("gov-expiry", driver);
    let aura = on_valkey(&mock, &valkey, driver, &journal, &[])
        .arg("--config")
        .arg(path.to_str().unwrap())
        .start();
    for _ in 0..3 {
        assert_eq!(post(&aura, key, CHAT, &[], BOUNDED), 200);
    }
    let mut connection = valkey.connection();
    let deadline = Instant::now() + Duration::from_secs(15);
    // A minute's number is in the tens of millions; a day's, a month's, in the tens of
    // thousands (the key's own budget, and the spend records, keep theirs).
    let by_the_minute = |fields: &[String]| {
        fields.iter().any(|f| {
            f.strip_prefix("spent:")
                .and_then(|p| p.parse::<u64>().ok())
                .is_some_and(|p| p > 1_000_000)
        })
    };
    loop {
        let accounts: Vec<String> = redis::cmd("KEYS")
            .arg("aura:{*}")
            .query(&mut connection)
            .unwrap();
        let mut minutes = 0;
        let mut lasting = Vec::new();
        for account in &accounts {
            let fields: Vec<String> = redis::cmd("HKEYS")
                .arg(account)
                .query(&mut connection)
                .unwrap();
            if !by_the_minute(&fields) {
                continue;
            }
            minutes += 1;
            let ttl: i64 = redis::cmd("PTTL")
                .arg(account)
                .query(&mut connection)
                .unwrap();
            if ttl < 0 {
                lasting.push(account.clone());
            }
        }
        if minutes == 2 && lasting.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{accounts:?}: {minutes} by the minute, never expiring {lasting:?}"
        );
        std::thread::park_timeout(Duration::from_millis(100));
    }
}

/// A key in a team, its own limits tighter than the team's: its daily budget refuses while
/// the team has room (the 402 names the key's), and the headers show the key's limit of
/// requests, the tighter, counting down.
fn a_keys_own_limits_bind_before_its_teams_and_the_headers_show_the_tightest(driver: Driver) {
    let key = "sk-test-gov-tightest-00001";
    let estimate = cost(BOUNDED.len() as u64, 5, MINI_IN, MINI_OUT);
    let config = format!(
        "[teams.roomy]\nbudgets = [{{ period = \"daily\", limit_dollars = 10.0 }}]\nrpm = 1000\n\n[keys.tight]\nkey = \"{key}\"\nteam = \"roomy\"\nbudgets = [{{ period = \"daily\", limit_dollars = {} }}]\nrpm = 20\n",
        (2 * estimate) as f64 / 1e9
    );
    let path = config_file(&format!("gov-tightest-{driver:?}"), &config);
    let mock = start_mock(MockOptions::default());
    let aura = one_worker(&mock, driver, &path, Some("2026-03-15 10:00:01"));
    let auth = bearer(key);
    let headers = [
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    let mut remaining = Vec::new();
    let refusal = loop {
        let r = aura
            .client()
            .request("POST", CHAT, &headers, BOUNDED.as_bytes());
        assert_eq!(
            r.header("x-ratelimit-limit-requests"),
            Some("20"),
            "the key's, the tighter"
        );
        remaining.push(
            r.header("x-ratelimit-remaining-requests")
                .unwrap()
                .parse::<u64>()
                .unwrap(),
        );
        match r.status {
            200 => assert!(remaining.len() < 10),
            402 => break r.json(),
            other => panic!("{other}: {}", r.text()),
        }
    };
    let message = refusal["error"]["message"].as_str().unwrap();
    assert!(message.contains("key \"tight\" daily budget"), "{message}");
    assert!(
        remaining.windows(2).all(|w| w[1] < w[0]),
        "remaining requests did not count down: {remaining:?}"
    );
}
