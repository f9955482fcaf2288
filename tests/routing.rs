//! Routing by model across several upstreams (`[[upstreams]]`), against the real `aura` binary
//! and two mock upstreams that record what reached each: exact names and globs, weights over
//! many requests, a model no upstream serves, and what a config may not say.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::path::PathBuf;

use common::billing::{cost, mock_usage, post, wait_for_spend, MINI_IN, MINI_OUT};
use common::{start_mock, Driver, Launch, MockOptions, MockUpstream, CHAT};

on_both_drivers!(
    a_model_goes_to_the_upstreams_that_serve_it_by_name_or_glob,
    unbilled_routes_go_by_their_model_and_model_less_ones_to_the_first,
    the_model_list_is_the_configs,
    an_unknown_model_is_404_even_for_a_key_that_could_not_pay,
    among_upstreams_serving_a_model_the_weights_hold,
    a_model_no_upstream_serves_is_404_in_openais_shape,
);

fn config(name: &str, driver: Driver, a: &MockUpstream, b: &MockUpstream) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "aura-routing-{name}-{driver:?}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("aura.toml");
    let text = format!(
        r#"
        [[upstreams]]
        name = "alpha"
        url = "{}"
        models = ["alpha-*", "shared"]
        weight = 1

        [[upstreams]]
        name = "beta"
        url = "{}"
        models = ["beta", "shared"]
        weight = 3
        "#,
        a.url(),
        b.url()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Aura routing to two mock upstreams by the config above.
fn two_upstreams(name: &str, driver: Driver) -> (MockUpstream, MockUpstream, common::Aura) {
    two_upstreams_with(name, driver, |launch| launch)
}

/// The same, `more` adding to Aura's launch (flags, a captured log).
fn two_upstreams_with(
    name: &str,
    driver: Driver,
    more: impl FnOnce(Launch) -> Launch,
) -> (MockUpstream, MockUpstream, common::Aura) {
    let (a, b) = (
        start_mock(MockOptions::default()),
        start_mock(MockOptions::default()),
    );
    let path = config(name, driver, &a, &b);
    let launch = Launch::new("", driver)
        .arg("--config")
        .arg(path.to_str().unwrap());
    let aura = more(launch).start();
    (a, b, aura)
}

fn chats(mock: &MockUpstream) -> usize {
    mock.requests()
        .iter()
        .filter(|r| r.target.ends_with("/chat/completions"))
        .count()
}

fn ask(aura: &common::Aura, model: &str) -> common::Response {
    let body = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
    aura.client().post_json(CHAT, &[], &body)
}

fn a_model_goes_to_the_upstreams_that_serve_it_by_name_or_glob(driver: Driver) {
    let (a, b, aura) = two_upstreams_with("names", driver, |launch| {
        launch.env("AURA_LOG", "info").capture_stderr()
    });
    for model in ["alpha-1", "alpha-2024-11-20"] {
        assert_eq!(ask(&aura, model).status, 200, "{model}");
    }
    assert_eq!((chats(&a), chats(&b)), (2, 0), "globs go to alpha only");
    assert_eq!(ask(&aura, "beta").status, 200);
    assert_eq!(
        (chats(&a), chats(&b)),
        (2, 1),
        "an exact name goes to beta only"
    );
    // `beta` is a name, not a glob: `beta-2` is served by nobody.
    assert_eq!(ask(&aura, "beta-2").status, 404);
    assert_eq!((chats(&a), chats(&b)), (2, 1));
    // The access log says which upstream answered (none for the 404).
    let lines = aura
        .log()
        .wait_for_count("aura::access", 4, std::time::Duration::from_secs(5));
    let served: Vec<usize> = ["alpha", "beta"]
        .iter()
        .map(|name| {
            let field = format!("upstream=\"{name}\"");
            lines.iter().filter(|l| l.contains(&field)).count()
        })
        .collect();
    assert_eq!(served, [2, 1], "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("upstream=\"\"") && l.contains("status=404")),
        "{lines:#?}"
    );
}

fn unbilled_routes_go_by_their_model_and_model_less_ones_to_the_first(driver: Driver) {
    let (a, b, aura) = two_upstreams("unbilled", driver);
    let to = |mock: &MockUpstream, path: &str| {
        mock.requests()
            .iter()
            .filter(|r| r.target.ends_with(path))
            .count()
    };
    // Moderations are not billed, but name a model: beta serves it.
    let r = aura.client().post_json(
        "/v1/moderations",
        &[],
        r#"{"model":"beta","input":"hello"}"#,
    );
    assert!(r.status < 500, "{}", r.status);
    assert_eq!((to(&a, "/moderations"), to(&b, "/moderations")), (0, 1));
    // A listing names none: the first upstream.
    let r = aura.client().request("GET", "/v1/files", &[], b"");
    assert!(r.status < 500, "{}", r.status);
    assert_eq!((to(&a, "/files"), to(&b, "/files")), (1, 0));
}

fn the_model_list_is_the_configs(driver: Driver) {
    let (a, b, aura) = two_upstreams("listing", driver);
    let r = aura.client().request(
        "GET",
        "/v1/models",
        &[("authorization", "Bearer sk-routing-listing")],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let list = r.json();
    assert_eq!(list["object"], "list");
    let models: Vec<(String, String)> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!(m["object"], "model");
            (
                m["id"].as_str().unwrap().to_string(),
                m["owned_by"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    // Names only (`alpha-*` names no model), each once, owned by the first that serves it.
    assert_eq!(
        models,
        [
            ("beta".to_string(), "beta".to_string()),
            ("shared".to_string(), "alpha".to_string())
        ]
    );
    let asked = |m: &MockUpstream| {
        m.requests()
            .iter()
            .filter(|r| r.target.contains("/models"))
            .count()
    };
    assert_eq!((asked(&a), asked(&b)), (0, 0), "answered by Aura");
    // Without a key it is refused, as OpenAI does.
    let r = aura.client().request("GET", "/v1/models", &[], b"");
    r.assert_openai_error(401);
}

fn an_unknown_model_is_404_even_for_a_key_that_could_not_pay(driver: Driver) {
    let (a, b, aura) = two_upstreams_with("poor", driver, |launch| {
        launch.arg("--default-limit-dollars").arg("0.000001")
    });
    let key = "sk-routing-poor-key";
    let body = |model: &str| {
        format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
    };
    // A served model: the key cannot cover the reservation.
    assert_eq!(post(&aura, key, CHAT, &[], &body("beta")), 402);
    // A model nobody serves: 404 first, not a question of money.
    assert_eq!(post(&aura, key, CHAT, &[], &body("gpt-unknown")), 404);
    assert_eq!((chats(&a), chats(&b)), (0, 0));
}

fn among_upstreams_serving_a_model_the_weights_hold(driver: Driver) {
    let (a, b, aura) = two_upstreams("weights", driver);
    let n = 400;
    for _ in 0..n {
        assert_eq!(ask(&aura, "shared").status, 200);
    }
    let (to_a, to_b) = (chats(&a), chats(&b));
    assert_eq!(to_a + to_b, n);
    // Weights 1:3, one request at a time: alpha's share is 1/4 (100 of 400), binomial
    // standard deviation ~8.7; 60..140 is more than 4 of them either way.
    assert!(
        (60..=140).contains(&to_a),
        "alpha got {to_a} of {n}, beta {to_b}: weights 1:3"
    );
}

fn a_model_no_upstream_serves_is_404_in_openais_shape(driver: Driver) {
    let (a, b, aura) = two_upstreams("unknown", driver);
    let r = ask(&aura, "gpt-unknown");
    let error = r.assert_openai_error(404);
    assert_eq!(error["error"]["code"], "model_not_found", "{error}");
    assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`gpt-unknown`"),
        "{error}"
    );
    assert_eq!(
        (chats(&a), chats(&b)),
        (0, 0),
        "nothing reached an upstream"
    );
    // Nothing is billed for it: a key's spend after a 404 and an answered request is the
    // answered request's cost alone (the mock answers as gpt-4o-mini, and is priced so).
    let key = "sk-routing-404-key";
    let body = |model: &str| {
        format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
    };
    assert_eq!(post(&aura, key, CHAT, &[], &body("gpt-unknown")), 404);
    assert_eq!(post(&aura, key, CHAT, &[], &body("beta")), 200);
    let answered = b.requests().into_iter().last().unwrap();
    let (prompt, completion) = mock_usage(&answered);
    wait_for_spend(&aura, key, cost(prompt, completion, MINI_IN, MINI_OUT));
}

/// The exit code and log of `aura ARGS` (no upstream URL), which must exit by itself: a
/// config it refuses.
fn exit_code(args: &[&str]) -> (Option<i32>, String) {
    let launch = args
        .iter()
        .fold(Launch::new("", Driver::Epoll), |l, a| l.arg(a));
    let exit = launch.run_to_exit();
    (exit.status.code(), exit.stderr)
}

#[test]
fn a_virtual_key_s_upstream_key_is_not_sent_to_several_hosts() {
    let dir = std::env::temp_dir().join(format!("aura-routing-hosts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("aura.toml");
    std::fs::write(
        &path,
        r#"
        key_mode = "virtual"
        [keys.team]
        key = "sk-aura-routing-team"
        upstream_key = "sk-proj-the-operators-key"
        [[upstreams]]
        name = "one"
        url = "http://127.0.0.1:9/v1"
        models = ["a"]
        [[upstreams]]
        name = "two"
        url = "http://localhost:9/v1"
        models = ["b"]
        "#,
    )
    .unwrap();
    let (code, stderr) = exit_code(&["--config", path.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("upstream_key"), "{stderr}");
    assert!(
        !stderr.contains("sk-proj-the-operators-key"),
        "no key in the message: {stderr}"
    );
}

#[test]
fn a_config_may_not_name_upstreams_twice_over() {
    let (a, b) = (
        start_mock(MockOptions::default()),
        start_mock(MockOptions::default()),
    );
    let path = config("refused", Driver::Epoll, &a, &b);
    let refused: [&[&str]; 2] = [&["--upstream-url", "http://127.0.0.1:9/v1"], &["--demo"]];
    for extra in refused {
        let mut args = vec!["--config", path.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (code, stderr) = exit_code(&args);
        assert_eq!(code, Some(2), "{extra:?}: {stderr}");
        assert!(stderr.contains("[[upstreams]]"), "{extra:?}: {stderr}");
    }
}
