//! Hot reload against the real `aura` binary: SIGHUP and `POST /admin/reload` read the config
//! file again. Streams in flight when it changes finish whole on the upstream they started on;
//! new requests follow the new upstreams, keys, limits and prices; a config with an error is
//! refused whole and the running one stays; each reload is logged and counted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::path::Path;
use std::time::Duration;

use common::billing::{bearer, wait_for_spend};
use common::{start_mock, Driver, Launch, MockOptions, MockUpstream, CHAT};

on_both_drivers!(
    a_sighup_under_load_lets_streams_finish_and_new_requests_follow_the_new_config,
    a_config_with_an_error_is_refused_whole_and_the_running_one_stays,
    a_lowered_limit_holds_at_once,
);

const ADMIN: &str = "admin-token-reload-0001";
const KEEP: &str = "sk-aura-reload-keep-0001";
const GONE: &str = "sk-aura-reload-gone-0001";
const NEW: &str = "sk-aura-reload-new-0001";
const BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

/// The config: `upstream` serving gpt-4o-mini, and `keys` (alias, key) with $5 each; `extra`
/// is added at the top level (e.g. a price).
fn write(path: &Path, upstream: &MockUpstream, keys: &[(&str, &str)], extra: &str) {
    write_limited(path, upstream, keys, 5.0, extra);
}

/// The same, every key with `limit` dollars.
fn write_limited(
    path: &Path,
    upstream: &MockUpstream,
    keys: &[(&str, &str)],
    limit: f64,
    extra: &str,
) {
    let keys: String = keys
        .iter()
        .map(|(alias, key)| format!("[keys.{alias}]\nkey = \"{key}\"\nlimit_dollars = {limit:?}\n"))
        .collect();
    let text = format!(
        "key_mode = \"virtual\"\nadmin_token = \"{ADMIN}\"\n{extra}\n{keys}\n[[upstreams]]\nname = \"up-{}\"\nurl = \"{}\"\nmodels = [\"gpt-4o-mini\"]\nkey = \"sk-provider\"\n",
        upstream.addr.port(),
        upstream.url()
    );
    std::fs::write(path, text).unwrap();
}

fn chat(aura: &common::Aura, key: &str) -> common::Response {
    aura.client().request(
        "POST",
        CHAT,
        &[
            ("content-type", "application/json"),
            ("authorization", &bearer(key)),
        ],
        BODY.as_bytes(),
    )
}

fn chats(mock: &MockUpstream) -> usize {
    mock.requests()
        .iter()
        .filter(|r| r.target.ends_with("/chat/completions"))
        .count()
}

fn a_sighup_under_load_lets_streams_finish_and_new_requests_follow_the_new_config(driver: Driver) {
    let (old, new) = (
        start_mock(MockOptions::default()),
        start_mock(MockOptions::default()),
    );
    let path = common::config_file(&format!("reload-sighup-{driver:?}"), "");
    write(&path, &old, &[("keep", KEEP), ("gone", GONE)], "");
    let aura = Launch::new("", driver)
        .arg("--config")
        .arg(path.to_str().unwrap())
        .env("AURA_LOG", "info")
        .capture_stderr()
        .start();
    assert_eq!(chat(&aura, GONE).status, 200);
    // Streams in flight at the reload: 8 of them, 20 events 50 ms apart (a second each).
    let streams: Vec<_> = (0..8)
        .map(|_| {
            let mut client = aura.client();
            let request = common::raw_stream_request(
                KEEP,
                &[("x-mock-chunks", "20"), ("x-mock-delay-ms", "50")],
            );
            client.send(request.as_bytes());
            let (status, _) = client.read_head();
            assert_eq!(status, 200);
            client
        })
        .collect();
    // The new config: another upstream, one key gone, one new, and a price for the model.
    let price = "[prices.\"gpt-4o-mini\"]\ninput_dollars_per_million = 100.0\noutput_dollars_per_million = 1000.0";
    write(&path, &new, &[("keep", KEEP), ("new", NEW)], price);
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &aura.pid().to_string()])
        .status();
    assert!(sent.is_ok_and(|s| s.success()));
    aura.log()
        .wait_for_count("configuration reloaded", 1, Duration::from_secs(10));
    // Every stream in flight ends whole, on the old upstream.
    for mut client in streams {
        let got = client.read_until(b"data: [DONE]");
        assert!(
            got.windows(12).any(|w| w == b"data: [DONE]"),
            "{}",
            String::from_utf8_lossy(got)
        );
    }
    assert_eq!(chats(&old), 9);
    // New requests: the new upstream, the new key, not the removed one, the new price.
    let r = chat(&aura, NEW);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(chat(&aura, GONE).status, 401);
    assert_eq!(chats(&new), 1);
    assert_eq!(
        chats(&old),
        9,
        "a request after the reload went to the old upstream"
    );
    let asked = &new.requests()[0];
    let (prompt, completion) = ((asked.body.len() as u64 / 4).max(1), 5);
    // $100 and $1000 per million: 10^8 and 10^9 pico-dollars a token.
    let want = (prompt * 100_000_000 + completion * 1_000_000_000).div_ceil(1_000);
    wait_for_spend(&aura, NEW, want);
    common::scrape_until(&aura, |t| {
        t.lines()
            .any(|l| l == "aura_config_reloads_total{result=\"applied\"} 1")
    });
}

fn a_config_with_an_error_is_refused_whole_and_the_running_one_stays(driver: Driver) {
    let (old, new) = (
        start_mock(MockOptions::default()),
        start_mock(MockOptions::default()),
    );
    let path = common::config_file(&format!("reload-refused-{driver:?}"), "");
    write(&path, &old, &[("keep", KEEP)], "");
    let aura = Launch::new("", driver)
        .arg("--config")
        .arg(path.to_str().unwrap())
        .start();
    let reload = |token: &str| {
        aura.client().request(
            "POST",
            "/admin/reload",
            &[("authorization", &bearer(token))],
            b"",
        )
    };
    // A new key and a new upstream, but a weight no upstream may have: refused whole.
    write(&path, &new, &[("keep", KEEP), ("new", NEW)], "");
    let text = std::fs::read_to_string(&path).unwrap() + "weight = -3\n";
    std::fs::write(&path, text).unwrap();
    assert_eq!(reload("wrong-token").status, 401);
    let r = reload(ADMIN);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "config_refused");
    assert!(r.text().contains("weight"), "{}", r.text());
    assert_eq!(chat(&aura, NEW).status, 401, "a key of the refused config");
    assert_eq!(chat(&aura, KEEP).status, 200);
    assert_eq!((chats(&old), chats(&new)), (1, 0));
    // A config that parses but names a price file that is not there: refused too.
    write(
        &path,
        &new,
        &[("keep", KEEP), ("new", NEW)],
        "price_file = \"/nonexistent/prices.json\"",
    );
    let r = reload(ADMIN);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("/nonexistent/prices.json"),
        "{}",
        r.text()
    );
    assert_eq!(chat(&aura, NEW).status, 401);
    // Fixed, it applies.
    write(&path, &new, &[("keep", KEEP), ("new", NEW)], "");
    let r = reload(ADMIN);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["generation"], 1);
    assert_eq!(chat(&aura, NEW).status, 200);
    assert_eq!((chats(&old), chats(&new)), (1, 1));
    common::scrape_until(&aura, |t| {
        t.lines()
            .any(|l| l == "aura_config_reloads_total{result=\"refused\"} 2")
            && t.lines()
                .any(|l| l == "aura_config_reloads_total{result=\"applied\"} 1")
    });
}

/// A key's limit cut by a reload holds at once: the budget workers had leased under the old
/// limit goes back to the store, which grants under the new one.
fn a_lowered_limit_holds_at_once(driver: Driver) {
    let upstream = start_mock(MockOptions::default());
    let path = common::config_file(&format!("reload-limit-{driver:?}"), "");
    write(&path, &upstream, &[("keep", KEEP)], "");
    let aura = Launch::new("", driver)
        .arg("--config")
        .arg(path.to_str().unwrap())
        .start();
    // Both workers hold leases for the key.
    for _ in 0..6 {
        assert_eq!(chat(&aura, KEEP).status, 200);
    }
    write_limited(&path, &upstream, &[("keep", KEEP)], 0.00001, "");
    let r = aura.client().request(
        "POST",
        "/admin/reload",
        &[("authorization", &bearer(ADMIN))],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let answered = chats(&upstream);
    let statuses: Vec<u16> = (0..10).map(|_| chat(&aura, KEEP).status).collect();
    assert!(statuses.iter().all(|&s| s == 402), "{statuses:?}");
    assert_eq!(
        chats(&upstream),
        answered,
        "a request past the new limit went upstream"
    );
}
