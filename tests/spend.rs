//! The spend record and `GET /admin/spend`, from the outside: every settled request is one
//! JSON line whose costs add up to the store's spend, also when SIGTERM comes while streams
//! are in flight; files rotate by size and lose no line; the store answers spend per day by
//! key, team and model, across midnight.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::billing::*;
use common::valkey::{journal_dir, on_valkey, Valkey};
use common::{
    at_time, config_file, start_mock, Aura, Driver, Launch, MockOptions, CHAT, STREAM, WHOLE,
};
use serde_json::Value;

on_both_drivers!(
    every_settled_request_is_one_line_adding_up_to_the_store_across_a_sigterm,
    the_record_rotates_by_size_and_loses_no_line,
    the_store_answers_spend_per_day_by_key_team_and_model,
    a_revoked_keys_days_still_count_and_a_refused_answer_after_a_given_up_one_is_a_line,
);

const ADMIN: &str = "admin-token-spend-000001";
const KEYS: [&str; 2] = ["sk-test-spend-key-one-001", "sk-test-spend-key-two-002"];

fn config(extra: &str) -> String {
    format!(
        "admin_token = \"{ADMIN}\"\n{extra}\n[teams.finance]\nrpm = 10000\n\n[keys.one]\nkey = \"{}\"\nteam = \"finance\"\n\n[keys.two]\nkey = \"{}\"\n",
        KEYS[0], KEYS[1]
    )
}

fn record_dir(name: &str, driver: Driver) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "aura-spend-{}-{name}-{driver:?}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Every line of every file in `dir` (rotated ones too), parsed.
fn lines(dir: &Path) -> Vec<Value> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text.lines() {
            all.push(serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")));
        }
    }
    all
}

fn costs_by_key(lines: &[Value]) -> HashMap<String, u64> {
    let mut by_key = HashMap::new();
    for line in lines {
        *by_key
            .entry(line["alias"].as_str().unwrap_or("").to_string())
            .or_default() += line["cost_nano"].as_u64().unwrap();
    }
    by_key
}

/// Two keys (one in a team) on Valkey, 24 slow streams and whole answers at once; SIGTERM
/// while they are in flight. Each answered request is one line, its fields filled; each
/// key's lines add up to its spend in the store, to the nano-dollar.
fn every_settled_request_is_one_line_adding_up_to_the_store_across_a_sigterm(driver: Driver) {
    let dir = record_dir("sigterm", driver);
    let record = dir.join("spend.jsonl");
    let path = config_file(&format!("spend-sigterm-{driver:?}"), &config(""));
    let mock = start_mock(MockOptions::default());
    let valkey = Valkey::start();
    let journal = journal_dir("spend-sigterm", driver);
    let mut aura = on_valkey(&mock, &valkey, driver, &journal, &[])
        .arg("--config")
        .arg(path.to_str().unwrap())
        .arg("--spend-record")
        .arg(record.to_str().unwrap())
        .start();
    let slow = [("x-mock-chunks", "8"), ("x-mock-delay-ms", "60")];
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let aura = &aura;
        let clients: Vec<_> = (0..24)
            .map(|i| {
                s.spawn(move || {
                    let body = if i % 3 == 0 { WHOLE } else { STREAM };
                    post(aura, KEYS[i % 2], CHAT, &slow, body)
                })
            })
            .collect();
        // In flight: the last requests are half way through their streams.
        std::thread::park_timeout(Duration::from_millis(250));
        let pid = aura.pid().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        assert!(sent.unwrap().success());
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    });
    assert!(aura.wait_exit(Duration::from_secs(30)).success());
    let answered = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(
        answered, 24,
        "the grace lets every stream finish: {statuses:?}"
    );
    let lines = lines(&dir);
    assert_eq!(lines.len(), answered, "one line per settled request");
    let ids: HashSet<&str> = lines
        .iter()
        .map(|l| l["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), lines.len(), "request ids are unique");
    let by_key = costs_by_key(&lines);
    for (alias, key) in [("one", KEYS[0]), ("two", KEYS[1])] {
        let (spent, _) = valkey.totals(key);
        assert_eq!(by_key[alias], spent, "{alias}: the lines against the store");
        assert!(spent > 0);
    }
    let first = lines.iter().find(|l| l["alias"] == "one").unwrap();
    assert_eq!(first["team"], "finance", "{first}");
    assert_eq!(first["model_requested"], "gpt-4o-mini");
    assert_eq!(first["model_answered"], "gpt-4o-mini-2024-07-18");
    assert_eq!(first["status"], 200);
    assert_eq!(first["attempts"], 1);
    assert_eq!(first["basis"], "reported");
    assert!(first["tokens"]["prompt"].as_u64().unwrap() > 0, "{first}");
    assert!(
        first["tokens"]["completion"].as_u64().unwrap() > 0,
        "{first}"
    );
    assert!(first["ttft_ms"].as_f64().unwrap() > 0.0, "{first}");
    assert!(first["time"].as_str().unwrap().ends_with('Z'), "{first}");
    assert_eq!(first["key_id"], aura::auth::KeyId::of(KEYS[0]).to_string());
    let text = std::fs::read_to_string(&record).unwrap();
    assert!(
        !text.contains(KEYS[0]) && !text.contains(KEYS[1]),
        "a key in clear"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A record limited to 3 KB a file, two kept: 40 requests leave the current file and two
/// rotated ones, each under the limit; with room for every file, no line is lost and their
/// costs add up to `/v1/usage`'s spend.
fn the_record_rotates_by_size_and_loses_no_line(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    for (keep, expect_all) in [(50, true), (2, false)] {
        let dir = record_dir(&format!("rotate-{keep}"), driver);
        let record = dir.join("spend.jsonl");
        let extra = format!(
            "spend_record = \"{}\"\nspend_record_max_bytes = 3000\nspend_record_files = {keep}\n",
            record.display()
        );
        let path = config_file(&format!("spend-rotate-{keep}-{driver:?}"), &config(&extra));
        let mut aura = Launch::new(&mock.url(), driver)
            .arg("--config")
            .arg(path.to_str().unwrap())
            .start();
        for _ in 0..40 {
            assert_eq!(post(&aura, KEYS[1], CHAT, &[], WHOLE), 200);
        }
        let usage = wait_until_spent(&aura, KEYS[1]);
        // A writer that kept up dropped nothing, and says so.
        common::scrape_until(&aura, |text| {
            text.lines()
                .any(|l| l == "aura_spend_record_dropped_total 0")
        });
        assert!(aura.terminate(Duration::from_secs(20)).success());
        let files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        for file in &files {
            assert!(std::fs::metadata(file).unwrap().len() <= 3000, "{file:?}");
        }
        let lines = lines(&dir);
        if expect_all {
            assert!(files.len() > 3, "{files:?}");
            assert_eq!(lines.len(), 40);
            assert_eq!(costs_by_key(&lines)["two"], usage);
        } else {
            assert_eq!(files.len(), 3, "{files:?}");
            assert!(lines.len() < 40);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `/v1/usage` spend once it stops moving (flushes are asynchronous).
fn wait_until_spent(aura: &common::Aura, key: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = u64::MAX;
    loop {
        let spent = nano(&usage_of(aura, key)["usage_dollars"]);
        if spent == last && spent > 0 {
            return spent;
        }
        assert!(Instant::now() < deadline, "spend never settled");
        last = spent;
        std::thread::park_timeout(Duration::from_millis(200));
    }
}

/// Requests on either side of midnight (the node's clock moved by libfaketime), by two keys
/// (one in a team) and a key Aura has no configuration for: `GET /admin/spend` answers each
/// day's spend by key, team and model from the store, adding up to what each key spent.
fn the_store_answers_spend_per_day_by_key_team_and_model(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let path = config_file(&format!("spend-days-{driver:?}"), &config(""));
    let stranger = "sk-test-spend-stranger-01";
    let started = Instant::now();
    let aura = at_time(
        Launch::new(&mock.url(), driver)
            .arg("--config")
            .arg(path.to_str().unwrap()),
        "2026-05-31 23:59:57",
    )
    .start();
    let cost_of = |from: usize| mock_cost(&mock.requests()[from..]);
    for key in [KEYS[0], KEYS[0], KEYS[1]] {
        assert_eq!(post(&aura, key, CHAT, &[], WHOLE), 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "too slow before midnight"
    );
    let before = cost_of(0);
    std::thread::park_timeout(
        (started + Duration::from_secs(4)).saturating_duration_since(Instant::now()),
    );
    for key in [KEYS[1], stranger] {
        assert_eq!(post(&aura, key, CHAT, &[], WHOLE), 200);
    }
    let after = cost_of(3);
    let deadline = Instant::now() + Duration::from_secs(10);
    let spend = loop {
        let (status, spend) = admin_json(
            &aura,
            ADMIN,
            "GET",
            "/admin/spend?from=2026-05-30&to=2026-06-01",
            "",
        );
        assert_eq!(status, 200, "{spend}");
        if spend["usage_nano"] == before + after {
            break spend;
        }
        assert!(Instant::now() < deadline, "{spend}");
        std::thread::park_timeout(Duration::from_millis(50));
    };
    let days = spend["days"].as_array().unwrap();
    assert_eq!(days.len(), 2, "{spend}");
    assert_eq!(days[0]["date"], "2026-05-31");
    assert_eq!(days[0]["usage_nano"], before);
    assert_eq!(days[1]["date"], "2026-06-01");
    assert_eq!(days[1]["usage_nano"], after);
    let find = |list: &Value, field: &str, name: &str| -> u64 {
        list.as_array()
            .unwrap()
            .iter()
            .find(|l| l[field] == name)
            .map_or(0, |l| l["usage_nano"].as_u64().unwrap())
    };
    // The first day: the team is key one's; every cost is gpt-4o-mini's.
    let team = find(&days[0]["teams"], "team", "finance");
    assert_eq!(team, find(&days[0]["keys"], "key", "one"), "{spend}");
    assert_eq!(
        find(&days[0]["models"], "model", "gpt-4o-mini"),
        before,
        "{spend}"
    );
    // Over the range, each key's total is its spend; the stranger is one of the other keys.
    assert_eq!(
        find(&spend["keys"], "key", "one") + find(&spend["keys"], "key", "two"),
        before + after - find(&spend["keys"], "key", "(other keys)")
    );
    assert!(find(&spend["keys"], "key", "(other keys)") > 0, "{spend}");
    assert_eq!(
        find(&spend["keys"], "key", "two"),
        nano(&usage_of(&aura, KEYS[1])["usage_dollars"])
    );
    let (status, refused) = admin_json(
        &aura,
        ADMIN,
        "GET",
        "/admin/spend?from=2026-06-02&to=2026-06-01",
        "",
    );
    assert_eq!(status, 400, "{refused}");
}

/// The sum of a list's `usage_nano`.
fn total(list: &Value) -> u64 {
    list.as_array()
        .unwrap()
        .iter()
        .map(|l| l["usage_nano"].as_u64().unwrap())
        .sum()
}

/// `/admin/spend` once `done` holds of it (flushes are asynchronous).
fn spend_when(aura: &Aura, done: impl Fn(&Value) -> bool) -> Value {
    common::poll("/admin/spend", Duration::from_secs(10), || {
        let (status, spend) = admin_json(aura, ADMIN, "GET", "/admin/spend", "");
        assert_eq!(status, 200, "{spend}");
        if done(&spend) {
            Ok(spend)
        } else {
            Err(spend.to_string())
        }
    })
}

/// Review: `/admin/spend` read only the reports of the keys configured now, so revoking a key
/// took its days out of the past. And a request given up on one upstream (its reservation
/// charged) then answered 401 by the next was spend with no line and no model.
fn a_revoked_keys_days_still_count_and_a_refused_answer_after_a_given_up_one_is_a_line(
    driver: Driver,
) {
    let mock = start_mock(MockOptions::default());
    let text = format!(
        "key_mode = \"virtual\"\nadmin_token = \"{ADMIN}\"\n[[upstreams]]\nname = \"mock\"\nurl = \"{}\"\nmodels = [\"gpt-4o-mini\"]\nkey = \"sk-provider-mock\"\n",
        mock.url()
    );
    let path = config_file(&format!("spend-revoked-{driver:?}"), &text);
    let aura = Launch::new("", driver)
        .arg("--config")
        .arg(path.to_str().unwrap())
        .start();
    let (status, made) = admin_json(&aura, ADMIN, "POST", "/admin/keys", r#"{"alias":"temp"}"#);
    assert_eq!(status, 201, "{made}");
    let secret = made["key"].as_str().unwrap().to_string();
    for _ in 0..3 {
        assert_eq!(post(&aura, &secret, CHAT, &[], WHOLE), 200);
    }
    let spent = mock_cost(&mock.requests());
    spend_when(&aura, |s| s["usage_nano"] == spent);
    let (status, _) = admin_json(&aura, ADMIN, "DELETE", "/admin/keys/temp", "");
    assert_eq!(status, 200);
    let after = spend_when(&aura, |_| true);
    assert_eq!(after["usage_nano"], spent, "{after}");
    assert_eq!(total(&after["keys"]), spent, "{after}");
    assert_eq!(total(&after["models"]), spent, "{after}");
    assert_eq!(after["keys"][0]["key"], "temp", "{after}");
    // Its report is no key of the store's: only its own budget is (what it spent).
    let id = made["key_id"].as_str().unwrap();
    let (_, keys) = admin_json(&aura, ADMIN, "GET", "/admin/keys", "");
    let stored: Vec<&Value> = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["source"] == "store")
        .collect();
    assert!(stored.iter().all(|k| k["key_id"] == id), "{keys}");

    // Passthrough: the first upstream takes the request and never answers (given up at its
    // first-byte timeout, its reservation charged); the second answers 401.
    let stall = common::scripted::Scripted::start(|_, stream| {
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut sink = [0u8; 1];
        let _ = std::io::Read::read(stream, &mut sink);
        common::scripted::Then::Close
    });
    let dir = record_dir("given-up", driver);
    let record = dir.join("spend.jsonl");
    let text = format!(
        "admin_token = \"{ADMIN}\"\nspend_record = \"{}\"\n[[upstreams]]\nname = \"first\"\nurl = \"http://{}/v1\"\nmodels = [\"gpt-4o-mini\"]\nweight = 10000\nfirst_byte_timeout_ms = 300\n[[upstreams]]\nname = \"second\"\nurl = \"{}\"\nmodels = [\"gpt-4o-mini\"]\nweight = 1\n",
        record.display(),
        stall.addr,
        mock.url()
    );
    let path = config_file(&format!("spend-given-up-{driver:?}"), &text);
    let mut aura = Launch::new("", driver)
        .workers(1)
        .arg("--config")
        .arg(path.to_str().unwrap())
        .start();
    let key = "sk-test-spend-given-up-01";
    let status = post(&aura, key, CHAT, &[("x-mock-status", "401")], WHOLE);
    assert_eq!(status, 401);
    let spend = spend_when(&aura, |s| s["usage_nano"].as_u64().unwrap_or(0) > 0);
    assert_eq!(total(&spend["models"]), total(&spend["keys"]), "{spend}");
    assert!(aura.terminate(Duration::from_secs(20)).success());
    let lines = lines(&dir);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["status"], 401);
    assert_eq!(lines[0]["cost_nano"], spend["usage_nano"], "{lines:?}");
    assert_eq!(lines[0]["attempts"], 2);
    let _ = std::fs::remove_dir_all(&dir);
}
