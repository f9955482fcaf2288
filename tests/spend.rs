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
use common::{at_time, config_file, start_mock, Driver, Launch, MockOptions, CHAT, STREAM, WHOLE};
use serde_json::Value;

on_both_drivers!(
    every_settled_request_is_one_line_adding_up_to_the_store_across_a_sigterm,
    the_record_rotates_by_size_and_loses_no_line,
    the_store_answers_spend_per_day_by_key_team_and_model,
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
    let cost_of = |from: usize| -> u64 {
        mock.requests()[from..]
            .iter()
            .map(|r| {
                let (p, c) = mock_usage(r);
                cost(p, c, MINI_IN, MINI_OUT)
            })
            .sum()
    };
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
