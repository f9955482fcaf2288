//! `/metrics` end to end: the real `aura` binary (2 workers) in front of the mock; counts, tokens
//! and the TTFT-overhead histogram merged over the workers, each worker's driver, and no key in
//! the text. Workers publish every 250 ms, so the tests wait for the counts with a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use common::{sample, scrape_until, start_mock, Aura, Driver, MockOptions, CHAT, STREAM, WHOLE};

const SECRET_KEY: &str = "sk-proj-metrics-test-secret-0123456789";

on_both_drivers!(
    requests_tokens_and_ttft_overhead_are_counted_over_all_workers,
    each_worker_reports_its_driver_and_no_key_appears,
    spend_is_exported_per_key_id_and_priced_model,
);

fn requests_tokens_and_ttft_overhead_are_counted_over_all_workers(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = Aura::start(&mock.url(), driver);
    // New connections, so SO_REUSEPORT spreads them over both workers.
    for _ in 0..3 {
        assert_eq!(aura.client().post_json(CHAT, &[], STREAM).status, 200);
    }
    assert_eq!(aura.client().post_json(CHAT, &[], WHOLE).status, 200);
    let no_usage = aura
        .client()
        .post_json(CHAT, &[("x-mock-no-usage", "1")], STREAM);
    assert_eq!(no_usage.status, 200);
    assert_eq!(aura.client().get("/nowhere").status, 404);

    let ok = r#"aura_requests_total{route="chat_completions",status_class="2xx"}"#;
    let text = scrape_until(&aura, |t| {
        sample(t, ok) == Some(5.0)
            && sample(
                t,
                r#"aura_requests_total{route="not_found",status_class="4xx"}"#,
            ) == Some(1.0)
    });
    // The mock's usage: prompt = forwarded body bytes / 4, completion = 5 chunks.
    let billed: Vec<_> = mock
        .requests()
        .into_iter()
        .filter(|r| r.target.ends_with("/chat/completions"))
        .filter(|r| !r.headers.iter().any(|(n, _)| n == "x-mock-no-usage"))
        .collect();
    assert_eq!(billed.len(), 4);
    let prompt: usize = billed.iter().map(|r| r.body.len() / 4).sum();
    assert_eq!(
        sample(&text, r#"aura_tokens_total{kind="prompt"}"#),
        Some(prompt as f64)
    );
    assert_eq!(
        sample(&text, r#"aura_tokens_total{kind="completion"}"#),
        Some(20.0)
    );
    assert_eq!(sample(&text, "aura_usage_missing_total"), Some(1.0));
    assert_eq!(
        sample(&text, r#"aura_errors_total{kind="not_found"}"#),
        Some(1.0)
    );

    // Every relayed answer has a first-byte overhead; buckets are cumulative and end at count.
    let name = "aura_ttft_overhead_seconds";
    assert_eq!(sample(&text, &format!("{name}_count")), Some(5.0));
    let buckets: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket{{")))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(buckets.len() > 10, "{text}");
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    assert_eq!(buckets.last(), Some(&5.0));
    let sum = sample(&text, &format!("{name}_sum")).unwrap();
    assert!(sum > 0.0 && sum < 5.0, "sum {sum}");
    assert_eq!(
        sample(&text, "aura_request_to_upstream_seconds_count"),
        Some(5.0)
    );
}

fn each_worker_reports_its_driver_and_no_key_appears(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = Aura::start(&mock.url(), driver);
    let auth = format!("Bearer {SECRET_KEY}");
    let r = aura
        .client()
        .request("POST", CHAT, &[("authorization", &auth)], STREAM.as_bytes());
    assert_eq!(r.status, 200);
    let label = match driver {
        Driver::IoUring => "io_uring",
        Driver::Epoll => "epoll",
    };
    let text = scrape_until(&aura, |t| {
        t.contains(r#"aura_requests_total{route="chat_completions",status_class="2xx"} 1"#)
    });
    for worker in 0..2 {
        let series = format!(r#"aura_worker_driver{{worker="{worker}",driver="{label}"}}"#);
        assert_eq!(sample(&text, &series), Some(1.0), "{text}");
    }
    assert!(
        !text.contains(SECRET_KEY) && !text.contains("sk-proj"),
        "{text}"
    );
}

fn spend_is_exported_per_key_id_and_priced_model(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = Aura::start(&mock.url(), driver);
    let auth = format!("Bearer {SECRET_KEY}");
    for body in [STREAM, WHOLE, STREAM] {
        let r = aura
            .client()
            .request("POST", CHAT, &[("authorization", &auth)], body.as_bytes());
        assert_eq!(r.status, 200);
    }
    let id = aura::auth::KeyId::of(SECRET_KEY).to_string();
    // The mock answers as gpt-4o-mini-2024-07-18: the label is the price table's base name.
    let requests = format!(r#"aura_key_requests_total{{key="{id}",model="gpt-4o-mini"}}"#);
    let text = scrape_until(&aura, |t| sample(t, &requests) == Some(3.0));
    let completion =
        format!(r#"aura_key_tokens_total{{key="{id}",model="gpt-4o-mini",kind="completion"}}"#);
    assert_eq!(sample(&text, &completion), Some(15.0), "{text}");
    // The key's cost is the whole cost here, and its remaining budget the default limit less it.
    let cost = format!(r#"aura_key_cost_dollars_total{{key="{id}",model="gpt-4o-mini"}}"#);
    let cost = sample(&text, &cost).unwrap();
    assert!(cost > 0.0);
    assert!((sample(&text, "aura_cost_dollars_total").unwrap() - cost).abs() < 1e-12);
    let remaining = format!(r#"aura_budget_remaining_dollars{{key="{id}"}}"#);
    let text = scrape_until(&aura, |t| {
        sample(t, &remaining).is_some_and(|left| (left - (10.0 - cost)).abs() < 1e-9)
    });
    assert_eq!(sample(&text, "aura_active_requests"), Some(0.0));
    assert!(!text.contains(SECRET_KEY), "{text}");
}
