//! `aura --demo`, as a newcomer runs it: two OpenAI-compatible mock upstreams, one failing half
//! its requests, and an Anthropic one. Every request is answered, the failures show as attempts
//! that went on, and Messages work too; all from the outside, with the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use common::{Driver, Launch, CHAT};

on_both_drivers!(the_demo_falls_back_from_its_flaky_upstream_and_serves_messages);

fn the_demo_falls_back_from_its_flaky_upstream_and_serves_messages(driver: Driver) {
    let aura = Launch::new("", driver).workers(1).arg("--demo").start();
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    for _ in 0..40 {
        let r = aura.client().post_json(CHAT, &[], body);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = aura.client().request(
        "POST",
        "/v1/messages",
        &[
            ("content-type", "application/json"),
            ("x-api-key", "sk-demo"),
            ("anthropic-version", "2023-06-01"),
        ],
        br#"{"model":"claude-sonnet-4","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["type"], "message");
    // Half of demo-flaky's answers were 503s that went on to demo: 40 requests, each drawn
    // between them, leave some (all but surely: 0.75^40 against).
    let text = common::scrape_until(&aura, |t| {
        t.lines().any(|l| {
            l.starts_with("aura_upstream_attempts_total{upstream=\"demo-flaky\",outcome=\"retryable_status\"}")
        }) && t
            .lines()
            .any(|l| l == "aura_upstream_requests_total{upstream=\"demo-anthropic\",status_class=\"2xx\"} 1")
    });
    let answered = |upstream: &str| -> u64 {
        let prefix = format!(
            "aura_upstream_requests_total{{upstream=\"{upstream}\",status_class=\"2xx\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .map_or(0, |n| n.parse().unwrap())
    };
    assert_eq!(answered("demo") + answered("demo-flaky"), 40, "{text}");
    assert!(answered("demo") > 0, "{text}");
    // The listing names the demo's models, Claude's among them.
    let models = aura.client().request(
        "GET",
        "/v1/models",
        &[("authorization", "Bearer sk-demo")],
        b"",
    );
    assert_eq!(models.status, 200);
    let ids: Vec<String> = models.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.contains(&"gpt-4o-mini".to_string()), "{ids:?}");
    assert!(ids.contains(&"claude-sonnet-4".to_string()), "{ids:?}");
}
