//! Helpers for the billing tests (tests/budgets.rs, tests/valkey.rs): prices of the mock's
//! models, what the mock's usage costs, and waiting for spend to reach the store.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Aura, Driver, Launch, MockUpstream, Recorded, CHAT, STREAM};

/// gpt-4o-mini (the mock answers as gpt-4o-mini-2024-07-18): pico-dollars per token.
pub const MINI_IN: u64 = 150_000;
pub const MINI_OUT: u64 = 600_000;
/// text-embedding-3-small.
pub const EMBED_IN: u64 = 20_000;

pub fn cost(prompt: u64, completion: u64, input_pico: u64, output_pico: u64) -> u64 {
    (prompt * input_pico + completion * output_pico).div_ceil(1_000)
}

pub fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// The mock's own usage for a recorded request: prompt = body bytes / 4 (at least 1),
/// completion = its `x-mock-chunks` (default 5).
pub fn mock_usage(r: &Recorded) -> (u64, u64) {
    let chunks = r
        .headers
        .iter()
        .find(|(n, _)| n == "x-mock-chunks")
        .map_or(5, |(_, v)| v.parse().unwrap());
    ((r.body.len() as u64 / 4).max(1), chunks)
}

pub fn launch(mock: &MockUpstream, driver: Driver, flags: &[(&str, &str)]) -> Aura {
    let mut launch = Launch::new(&mock.url(), driver);
    for (flag, value) in flags {
        launch = launch.arg(flag).arg(value);
    }
    launch.start()
}

/// `/v1/usage` for `key`.
pub fn usage_of(aura: &Aura, key: &str) -> Value {
    let r = aura
        .client()
        .request("GET", "/v1/usage", &[("authorization", &bearer(key))], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

pub fn nano(dollars: &Value) -> u64 {
    (dollars.as_f64().unwrap() * 1e9).round() as u64
}

/// Waits until `/v1/usage` shows `key` having spent `want` nano-dollars (workers flush every
/// 50 ms); fails with the last answer after 10 s.
pub fn wait_for_spend(aura: &Aura, key: &str, want: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let u = usage_of(aura, key);
        if nano(&u["usage_dollars"]) == want {
            return u;
        }
        assert!(
            Instant::now() < deadline,
            "spend never reached {want} nano-dollars: {u}"
        );
        std::thread::park_timeout(Duration::from_millis(20));
    }
}

/// Waits until `/metrics` has the sample `line` (workers publish every 250 ms).
pub fn wait_for_metric(aura: &Aura, line: &str) {
    super::scrape_until(aura, |text| text.lines().any(|l| l == line));
}

pub fn post(aura: &Aura, key: &str, target: &str, headers: &[(&str, &str)], body: &str) -> u16 {
    let auth = bearer(key);
    let mut all = vec![
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    all.extend_from_slice(headers);
    aura.client()
        .request("POST", target, &all, body.as_bytes())
        .status
}

/// Starts a stream and leaves after its first event (the mock then sends 6 more, 30 ms apart).
pub fn leave_mid_stream(aura: &Aura, key: &str) {
    let mut client = aura.client();
    let request = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: {}\r\ncontent-type: application/json\r\nx-mock-chunks: 6\r\nx-mock-delay-ms: 30\r\ncontent-length: {}\r\n\r\n{STREAM}",
        bearer(key),
        STREAM.len()
    );
    client.send(request.as_bytes());
    let (status, _) = client.read_head();
    assert_eq!(status, 200);
    client.read_until(b"\n\n");
}

/// The concurrency tests' verdict on 64 clients × 3 requests against a small limit: every
/// request was admitted (200) or refused (402), some of each; nothing was spent past the limit;
/// and less than `stranded_below` was left unspent in other workers' leases.
pub fn check_concurrent_spend(
    label: &str,
    statuses: &[u16],
    spent: u64,
    limit_nano: u64,
    stranded_below: u64,
) {
    let admitted = statuses.iter().filter(|&&s| s == 200).count();
    let refused = statuses.iter().filter(|&&s| s == 402).count();
    assert_eq!(admitted + refused, statuses.len(), "{statuses:?}");
    let overshoot = spent.saturating_sub(limit_nano);
    println!(
        "{label}, 64 clients × 3: {admitted} admitted, {refused} refused (402); spent {spent} of {limit_nano} nano-dollars, overshoot {overshoot}"
    );
    assert!(
        admitted > 0 && refused > 0,
        "{admitted} admitted, {refused} refused"
    );
    assert_eq!(overshoot, 0, "spent {spent} past the limit {limit_nano}");
    let stranded = limit_nano - spent;
    assert!(
        stranded < stranded_below,
        "{stranded} nano-dollars stranded in leases"
    );
}

/// An admin API call with `token`: its status and JSON body (null when it has none).
pub fn admin_json(
    aura: &Aura,
    token: &str,
    method: &str,
    target: &str,
    body: &str,
) -> (u16, Value) {
    let auth = bearer(token);
    let r = aura.client().request(
        method,
        target,
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    );
    let json = serde_json::from_str(&r.text()).unwrap_or(Value::Null);
    (r.status, json)
}

/// What `requests` to the mock cost, at gpt-4o-mini's prices.
pub fn mock_cost(requests: &[Recorded]) -> u64 {
    requests
        .iter()
        .map(|r| {
            let (p, c) = mock_usage(r);
            cost(p, c, MINI_IN, MINI_OUT)
        })
        .sum()
}
