//! Budgets in Valkey, against a real `redis-server` started per test on a free loopback port
//! (Debian's 7.0; Valkey speaks the same protocol).
//! - The store itself: ops apply exactly once per (holder, sequence), a retried lease ask gets
//!   the same grant, leases lapse, limits hold across holders, admin operations.
//! - The real `aura` binary with `--store valkey`: exact spend, SIGTERM returns every lease,
//!   two nodes sharing one budget never overspend, a store outage loses no spend (fail-open) or
//!   refuses with 503 (fail-closed), and a killed node's journal is replayed at its next start.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use aura::auth::KeyId;
use aura::budget::store::valkey::ValkeyStore;
use aura::budget::store::{system_clock, Store, StoreError};
use aura::budget::{Ask, Holder, KeyLimits, Op, Settlement, Spend};
use common::billing::*;
use common::valkey::{journal_dir, on_valkey, Valkey, ValkeyCluster};
use common::{
    raw_stream_request, sample, scrape_until, scrape_within, start_mock, Driver, Launch,
    MockOptions, MockUpstream, CHAT, STREAM, WHOLE,
};

on_both_drivers!(
    spend_is_exact_in_valkey_and_sigterm_returns_every_lease,
    two_nodes_share_one_budget_and_never_spend_past_it,
    a_store_outage_loses_no_spend_when_failing_open,
    failing_closed_refuses_with_503_until_the_store_is_back,
    a_killed_nodes_journal_is_replayed_at_its_next_start,
    failing_open_still_refuses_once_the_last_known_spend_is_used_up,
    a_request_cut_at_shutdown_is_billed_its_reservation,
    a_cluster_keeps_each_key_in_its_slot_and_spend_exact,
    an_op_the_store_refuses_is_set_aside_and_holds_up_nothing,
    the_store_speaks_tls_and_trusts_only_its_ca,
    an_idle_node_reports_whether_its_store_answers,
);

fn limits(default: u64, keys: &[(KeyId, u64)]) -> std::sync::Arc<KeyLimits> {
    std::sync::Arc::new(KeyLimits::new(default, keys.iter().copied().collect()))
}

fn store(valkey: &Valkey, limit: u64) -> ValkeyStore {
    ValkeyStore::new(
        &valkey.url(),
        Duration::from_secs(2),
        limits(limit, &[]),
        system_clock(),
    )
    .unwrap()
}

fn op(holder: &str, seq: u64, key: KeyId, settle: Settlement, ask: Option<Ask>) -> Op {
    let mut op = Op::new(Holder::from(holder), seq, key, 0);
    op.settle = settle;
    op.ask = ask;
    op
}

fn spend(spent: u64) -> Settlement {
    Settlement {
        spent: Spend::of(0, spent),
        ..Settlement::default()
    }
}

fn ask(need: u64, parts: u64) -> Option<Ask> {
    Some(Ask { need, parts })
}

#[test]
fn an_op_retried_or_replayed_is_applied_once() {
    let valkey = Valkey::start();
    let store = store(&valkey, 1_000_000);
    let key = KeyId::of("sk-valkey-once");
    let first = op("node-a/0", 10, key, spend(700), None);
    assert_eq!(
        store.apply(std::slice::from_ref(&first)).unwrap()[0]
            .account
            .spent,
        700
    );
    // The same op again (a retry after a timeout, or a journal replay), and an older one.
    store.apply(&[first.clone(), first]).unwrap();
    store
        .apply(&[op("node-a/0", 9, key, spend(5), None)])
        .unwrap();
    // Another holder's sequence numbers are its own.
    let other = op("node-b/0", 3, key, spend(11), None);
    let account = store.apply(&[other]).unwrap()[0].account;
    assert_eq!(account.spent, 711);
    let next = op("node-a/0", 11, key, spend(1), None);
    assert_eq!(store.apply(&[next]).unwrap()[0].account.spent, 712);
}

#[test]
fn a_retried_lease_ask_gets_its_grant_once() {
    let valkey = Valkey::start();
    let store = store(&valkey, 10_000);
    let key = KeyId::of("sk-valkey-lease");
    let asking = op("node-a/1", 100, key, Settlement::default(), ask(1_000, 2));
    let granted = store
        .apply(std::slice::from_ref(&asking))
        .unwrap()
        .remove(0);
    // 1000 needed + half of the 9000 left.
    assert_eq!(granted.granted, 5_500);
    assert_eq!(granted.account.leased, 5_500);
    let again = store.apply(&[asking]).unwrap().remove(0);
    assert_eq!(again.granted, 5_500, "the retry is told its grant");
    assert_eq!(again.account.leased, 5_500, "and nothing more is leased");
    // Spend from the lease and the rest handed back.
    let settle = Settlement {
        spent: Spend::of(0, 1_200),
        from_lease: 1_200,
        returned: 4_300,
    };
    let account = store
        .apply(&[op("node-a/1", 101, key, settle, None)])
        .unwrap()[0]
        .account;
    assert_eq!((account.spent, account.leased), (1_200, 0));
}

/// A batch of an ask and a newer op of the same holder and key, applied, its answers lost (the
/// store killed before it replied): the retried ask is older than the last op applied and is
/// answered 0, but every answer says what the store counts as the holder's lease.
#[test]
fn an_answer_lost_for_a_grant_still_tells_the_holder_its_lease() {
    let valkey = Valkey::start();
    let store = store(&valkey, 10_000);
    let key = KeyId::of("sk-valkey-lost-grant");
    let asking = op("node-a/0", 20, key, Settlement::default(), ask(1_000, 2));
    let settle = Settlement {
        spent: Spend::of(0, 300),
        from_lease: 300,
        returned: 0,
    };
    let newer = op("node-a/0", 21, key, settle, None);
    let lost = store.apply(&[asking.clone(), newer.clone()]).unwrap();
    assert_eq!(lost[0].granted, 5_500);
    assert_eq!(lost[1].held, Some(5_200));
    let retried = store.apply(&[asking, newer]).unwrap();
    assert_eq!(
        retried[0].granted, 0,
        "an op older than the last applied grants nothing"
    );
    assert_eq!(
        retried[1].held,
        Some(5_200),
        "the holder's lease, as the store counts it"
    );
    let other = store
        .apply(&[op("node-b/0", 1, key, Settlement::default(), None)])
        .unwrap();
    assert_eq!(other[0].held, Some(0), "each holder is told its own lease");
    assert_eq!(store.account(key).unwrap().spent, 300, "applied once");
}

#[test]
fn leases_across_holders_never_pass_the_limit_and_a_need_is_all_or_nothing() {
    let valkey = Valkey::start();
    let store = store(&valkey, 1_000);
    let key = KeyId::of("sk-valkey-limit");
    let mut leased = 0;
    for (i, holder) in ["a/0", "a/1", "b/0", "b/1", "c/0"].iter().enumerate() {
        let answer = store
            .apply(&[op(
                holder,
                1 + i as u64,
                key,
                Settlement::default(),
                ask(150, 4),
            )])
            .unwrap()
            .remove(0);
        leased += answer.granted;
        assert_eq!(answer.account.leased, leased);
        assert!(answer.account.spent + answer.account.leased <= 1_000);
    }
    // 1000 - leased is below the next need: nothing is granted.
    let refused = store
        .apply(&[op(
            "d/0",
            1,
            key,
            Settlement::default(),
            ask(1_000 - leased + 1, 4),
        )])
        .unwrap()
        .remove(0);
    assert_eq!(refused.granted, 0);
    assert_eq!(refused.account.leased, leased);
}

#[test]
fn a_lease_not_renewed_lapses_back_into_the_budget() {
    let valkey = Valkey::start();
    let store = store(&valkey, 1_000).with_lease_ttl(Duration::from_millis(200));
    let key = KeyId::of("sk-valkey-lapse");
    let dead = op("gone/0", 1, key, Settlement::default(), ask(1_000, 1));
    assert_eq!(store.apply(&[dead]).unwrap()[0].granted, 1_000);
    let live = op("live/0", 1, key, Settlement::default(), ask(1, 1));
    assert_eq!(store.apply(&[live]).unwrap()[0].granted, 0, "all leased");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        std::thread::park_timeout(Duration::from_millis(50));
        if store.account(key).unwrap().leased == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the lease never lapsed");
    }
    let live = op("live/0", 2, key, Settlement::default(), ask(1, 1));
    assert_eq!(store.apply(&[live]).unwrap()[0].granted, 1_000);
}

#[test]
fn admin_operations_and_configured_limits() {
    let valkey = Valkey::start();
    let configured = KeyId::of("sk-valkey-configured");
    let store = ValkeyStore::new(
        &valkey.url(),
        Duration::from_secs(2),
        limits(1_000, &[(configured, 99)]),
        system_clock(),
    )
    .unwrap();
    let key = KeyId::of("sk-valkey-admin");
    assert_eq!(store.account(configured).unwrap().limit, 99);
    assert!(store.holds(configured).unwrap());
    store.apply(&[op("a/0", 1, key, spend(300), None)]).unwrap();
    store
        .apply(&[op("a/0", 1, configured, spend(1), None)])
        .unwrap();
    assert_eq!(store.set_limit(key, 5_000).unwrap().remaining(), 4_700);
    assert_eq!(store.reset(key).unwrap().spent, 0);
    let ids: Vec<KeyId> = store
        .accounts()
        .unwrap()
        .iter()
        .map(|(id, _)| *id)
        .collect();
    assert!(ids.contains(&key) && ids.contains(&configured), "{ids:?}");
    store.remove(key).unwrap();
    assert!(!store.holds(key).unwrap());
    assert_eq!(store.account(key).unwrap().limit, 1_000);
    // Nothing of the API key itself is in the store: only its id.
    let mut c = valkey.connection();
    let names: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut c).unwrap();
    assert!(names.iter().all(|n| !n.contains("sk-valkey")), "{names:?}");
}

#[test]
fn a_store_that_is_down_is_unavailable_and_picked_up_again() {
    let mut valkey = Valkey::stopped();
    let store = store(&valkey, 1_000);
    let key = KeyId::of("sk-valkey-down");
    assert!(matches!(
        store.account(key),
        Err(StoreError::Unavailable(_))
    ));
    valkey.restart();
    assert_eq!(store.account(key).unwrap().limit, 1_000);
}

#[test]
fn on_a_cluster_one_batch_reaches_every_slot_and_every_node_is_listed() {
    let cluster = ValkeyCluster::start(3);
    let store = ValkeyStore::new(
        &cluster.url(),
        Duration::from_secs(2),
        limits(1_000_000, &[]),
        system_clock(),
    )
    .unwrap();
    let keys: Vec<String> = (0..12).map(|i| format!("sk-cluster-{i}")).collect();
    let ops: Vec<Op> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| op("c/0", 1, KeyId::of(k), spend(100 + i as u64), ask(10, 2)))
        .collect();
    let answers = store.apply(&ops).unwrap();
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(answer.account.spent, 100 + i as u64, "answer {i} in order");
        assert!(answer.granted >= 10);
    }
    // Applied once, even when the whole batch is sent again.
    store.apply(&ops).unwrap();
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(cluster.spent(k), 100 + i as u64);
    }
    let owners: std::collections::HashSet<u16> = keys.iter().map(|k| cluster.owner(k)).collect();
    assert!(
        owners.len() > 1,
        "the keys all landed on one node: {owners:?}"
    );
    let listed: Vec<KeyId> = store
        .accounts()
        .unwrap()
        .iter()
        .map(|(id, _)| *id)
        .collect();
    for k in &keys {
        assert!(listed.contains(&KeyId::of(k)), "{k} not listed");
    }
}

// --- the aura binary on Valkey ---

/// The spend of `keys` a journal directory holds (what a replay would apply, were none of it
/// applied); the spend records' accounts beside them are not counted.
fn journaled(dir: &std::path::Path, keys: &[&str]) -> u64 {
    let ids: Vec<KeyId> = keys.iter().map(|k| KeyId::of(k)).collect();
    aura::budget::journal::inspect(dir, 0)
        .map(|r| {
            r.ops
                .iter()
                .filter(|op| ids.contains(&op.key))
                .map(|op| op.settle.spent.total())
                .sum()
        })
        .unwrap_or(0)
}

/// The journal segments in a directory.
fn segments(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().to_string_lossy().ends_with(".seg"))
            })
            .count()
    })
}

/// What the mock's answers so far cost (chat and completions at gpt-4o-mini prices).
fn mock_spend(mock: &MockUpstream) -> u64 {
    mock.requests()
        .iter()
        .filter(|r| !r.headers.iter().any(|(n, _)| n == "x-mock-status"))
        .map(|r| {
            let (p, c) = mock_usage(r);
            cost(p, c, MINI_IN, MINI_OUT)
        })
        .sum()
}

fn wait_for_store_spend(valkey: &Valkey, key: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (spent, _) = valkey.totals(key);
        if spent == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the store holds {spent}, not {want} nano-dollars"
        );
        std::thread::park_timeout(Duration::from_millis(20));
    }
}

fn spend_is_exact_in_valkey_and_sigterm_returns_every_lease(driver: Driver) {
    let key = "sk-test-valkey-exact-000001";
    let mock = start_mock(MockOptions::default());
    let valkey = Valkey::start();
    let journal = journal_dir("exact", driver);
    let mut aura = on_valkey(&mock, &valkey, driver, &journal, &[]).start();
    for i in 0..4 {
        let chunks = (i + 2).to_string();
        assert_eq!(
            post(&aura, key, CHAT, &[("x-mock-chunks", &chunks)], STREAM),
            200
        );
    }
    for _ in 0..3 {
        assert_eq!(post(&aura, key, CHAT, &[], WHOLE), 200);
    }
    leave_mid_stream(&aura, key);
    assert_eq!(
        post(&aura, key, CHAT, &[("x-mock-status", "500")], WHOLE),
        500
    );
    let want = mock_spend(&mock);
    wait_for_spend(&aura, key, want);
    wait_for_store_spend(&valkey, key, want);
    let (_, leased) = valkey.totals(key);
    assert!(leased > 0, "the workers hold leases while running");
    // A stream in flight when SIGTERM arrives is finished, then everything is handed back.
    let mut client = aura.client();
    let request = raw_stream_request(key, &[("x-mock-chunks", "8"), ("x-mock-delay-ms", "40")]);
    client.send(request.as_bytes());
    assert_eq!(client.read_head().0, 200);
    let status = aura.terminate(Duration::from_secs(20));
    assert!(status.success(), "aura exited with {status:?}");
    client.read_until(b"0\r\n\r\n");
    let want = mock_spend(&mock);
    let (spent, leased) = valkey.totals(key);
    assert_eq!(spent, want, "spend in the store after SIGTERM");
    assert_eq!(leased, 0, "every lease returned at SIGTERM");
    assert_eq!(segments(&journal), 0, "nothing left in the journal");
    // The next node sees the same budget.
    let aura = on_valkey(&mock, &valkey, driver, &journal, &[]).start();
    let usage = usage_of(&aura, key);
    assert_eq!(nano(&usage["usage_dollars"]), want, "{usage}");
    println!("valkey: spend {want} nano-dollars exact; SIGTERM left 0 leased");
}

fn two_nodes_share_one_budget_and_never_spend_past_it(driver: Driver) {
    const CLIENTS: usize = 64;
    const EACH: usize = 3;
    let limit_nano: u64 = 200_000;
    let key = "sk-test-valkey-fleet-00001";
    let mock = start_mock(MockOptions::default());
    let valkey = Valkey::start();
    let flags = [("--default-limit-dollars", "0.0002")];
    let journal_a = journal_dir("fleet-a", driver);
    let journal_b = journal_dir("fleet-b", driver);
    let nodes = [
        on_valkey(&mock, &valkey, driver, &journal_a, &flags)
            .node_id("node-a")
            .start(),
        on_valkey(&mock, &valkey, driver, &journal_b, &flags)
            .node_id("node-b")
            .start(),
    ];
    // max_tokens equals the mock's 5 chunks: the estimate bounds the real cost.
    let body = r#"{"model":"gpt-4o-mini","max_tokens":5,"messages":[{"role":"user","content":"Say hello"}],"stream":true}"#;
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let node = &nodes[i % 2];
                s.spawn(move || {
                    (0..EACH)
                        .map(|_| post(node, key, CHAT, &[], body))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let want = mock_spend(&mock);
    wait_for_store_spend(&valkey, key, want);
    // Without the squeeze, 51,500 was left stranded (6 requests' worth).
    check_concurrent_spend("2 nodes × 2 workers", &statuses, want, limit_nano, 30_000);
    // Both nodes answer the same budget.
    for node in &nodes {
        let usage = usage_of(node, key);
        assert_eq!(nano(&usage["usage_dollars"]), want, "{usage}");
    }
}

fn a_store_outage_loses_no_spend_when_failing_open(driver: Driver) {
    let key = "sk-test-valkey-outage-0001";
    let fresh = "sk-test-valkey-outage-new1";
    let mock = start_mock(MockOptions::default());
    let mut valkey = Valkey::start();
    let journal = journal_dir("outage", driver);
    let aura = on_valkey(&mock, &valkey, driver, &journal, &[]).start();
    for _ in 0..3 {
        assert_eq!(post(&aura, key, CHAT, &[], STREAM), 200);
    }
    wait_for_store_spend(&valkey, key, mock_spend(&mock));
    let valkey_spent_before = mock_spend(&mock);
    valkey.stop();
    // Admitted on the leases in hand, and for a key never seen, on its configured limit.
    for _ in 0..4 {
        assert_eq!(post(&aura, key, CHAT, &[], STREAM), 200);
        assert_eq!(post(&aura, key, CHAT, &[], WHOLE), 200);
    }
    assert_eq!(post(&aura, fresh, CHAT, &[], WHOLE), 200);
    wait_for_metric(&aura, "aura_store_up 0");
    // The undelivered spend is in the journal while the store is away.
    let undelivered = mock_spend(&mock) - valkey_spent_before;
    assert!(
        journaled(&journal, &[key, fresh]) >= undelivered,
        "the journal holds {} of the {undelivered} undelivered",
        journaled(&journal, &[key, fresh])
    );
    let usage = aura
        .client()
        .request("GET", "/v1/usage", &[("authorization", &bearer(key))], b"");
    let body = usage.assert_openai_error(503);
    assert_eq!(body["error"]["code"], "budget_store_unavailable");
    valkey.restart();
    // Every nano-dollar arrives once the store is back.
    let want_fresh = cost(WHOLE.len() as u64 / 4, 5, MINI_IN, MINI_OUT);
    let want = mock_spend(&mock) - want_fresh;
    wait_for_store_spend(&valkey, key, want);
    wait_for_store_spend(&valkey, fresh, want_fresh);
    wait_for_metric(&aura, "aura_store_up 1");
    // And a clean stop leaves no journal behind.
    let mut aura = aura;
    assert!(aura.terminate(Duration::from_secs(20)).success());
    assert_eq!(segments(&journal), 0, "the journal is gone once delivered");
    println!(
        "valkey outage: {want} + {want_fresh} nano-dollars delivered after the store came back"
    );
}

fn failing_closed_refuses_with_503_until_the_store_is_back(driver: Driver) {
    let key = "sk-test-valkey-closed-0001";
    let mock = start_mock(MockOptions::default());
    let mut valkey = Valkey::stopped();
    let journal = journal_dir("closed", driver);
    let flags = [("--store-failure", "closed"), ("--store-timeout-ms", "200")];
    let aura = on_valkey(&mock, &valkey, driver, &journal, &flags).start();
    let auth = bearer(key);
    let headers = [
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    let refused = aura
        .client()
        .request("POST", CHAT, &headers, STREAM.as_bytes());
    let body = refused.assert_openai_error(503);
    assert_eq!(body["error"]["code"], "budget_store_unavailable");
    assert!(mock.requests().is_empty(), "nothing went upstream");
    // Reconnects by itself: not only at boot.
    valkey.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while post(&aura, key, CHAT, &[], WHOLE) != 200 {
        assert!(
            Instant::now() < deadline,
            "still refused with the store back"
        );
        std::thread::park_timeout(Duration::from_millis(50));
    }
    wait_for_store_spend(&valkey, key, mock_spend(&mock));
}

fn a_killed_nodes_journal_is_replayed_at_its_next_start(driver: Driver) {
    let key = "sk-test-valkey-journal-001";
    let mock = start_mock(MockOptions::default());
    let mut valkey = Valkey::stopped();
    let journal = journal_dir("replay", driver);
    let node = |valkey: &Valkey| {
        on_valkey(&mock, valkey, driver, &journal, &[])
            .node_id("node-j")
            .start()
    };
    let aura = node(&valkey);
    for _ in 0..5 {
        assert_eq!(post(&aura, key, CHAT, &[], WHOLE), 200);
    }
    let want = mock_spend(&mock);
    // Each answer was journaled before its client had it all: kill at once, no flush.
    assert_eq!(
        journaled(&journal, &[key]),
        want,
        "the journal holds every answer"
    );
    drop(aura); // SIGKILL
    valkey.restart();
    let _next = node(&valkey);
    wait_for_store_spend(&valkey, key, want);
    let deadline = Instant::now() + Duration::from_secs(10);
    while segments(&journal) > 0 {
        assert!(Instant::now() < deadline, "journal never cleared");
        std::thread::park_timeout(Duration::from_millis(20));
    }
    println!("journal replayed: {want} nano-dollars reached the store after a SIGKILL");
}

fn failing_open_still_refuses_once_the_last_known_spend_is_used_up(driver: Driver) {
    let key = "sk-test-valkey-open-bound1";
    let limit_nano: u64 = 200_000;
    let mock = start_mock(MockOptions::default());
    let mut valkey = Valkey::start();
    let journal = journal_dir("open-bound", driver);
    let flags = [("--default-limit-dollars", "0.0002")];
    let aura = on_valkey(&mock, &valkey, driver, &journal, &flags).start();
    let body = r#"{"model":"gpt-4o-mini","max_tokens":5,"messages":[{"role":"user","content":"Say hello"}],"stream":true}"#;
    for _ in 0..4 {
        assert_eq!(post(&aura, key, CHAT, &[], body), 200);
    }
    wait_for_store_spend(&valkey, key, mock_spend(&mock));
    valkey.stop();
    // Each worker admits on what it last knew of the key, minus what it spent since: a long
    // enough outage ends in 402s, not in unlimited spend.
    let statuses: Vec<u16> = (0..60).map(|_| post(&aura, key, CHAT, &[], body)).collect();
    let refused = statuses.iter().filter(|&&s| s == 402).count();
    assert!(
        refused > 0,
        "nothing refused during the outage: {statuses:?}"
    );
    valkey.restart();
    let spent = mock_spend(&mock);
    wait_for_store_spend(&valkey, key, spent);
    let overshoot = spent.saturating_sub(limit_nano);
    println!(
        "fail-open outage: {} admitted, {refused} refused; spent {spent} of {limit_nano}, overshoot {overshoot}",
        statuses.len() - refused
    );
    // Bound: each of the 2 workers spends at most what was left when it last heard from the
    // store.
    assert!(spent <= 2 * limit_nano, "spent {spent}");
}

fn a_request_cut_at_shutdown_is_billed_its_reservation(driver: Driver) {
    let key = "sk-test-valkey-cut-000001";
    let mock = start_mock(MockOptions::default());
    let valkey = Valkey::start();
    let journal = journal_dir("cut", driver);
    let flags = [("--shutdown-grace-ms", "300")];
    let mut aura = on_valkey(&mock, &valkey, driver, &journal, &flags).start();
    let mut client = aura.client();
    let request = raw_stream_request(key, &[("x-mock-chunks", "100"), ("x-mock-delay-ms", "100")]);
    client.send(request.as_bytes());
    assert_eq!(client.read_head().0, 200);
    // A 10 s stream outlives the 300 ms grace: it is cut, and billed what it reserved.
    let status = aura.terminate(Duration::from_secs(10));
    assert!(status.success(), "aura exited with {status:?}");
    let (spent, leased) = valkey.totals(key);
    // Every body byte a prompt token, and gpt-4o-mini's whole output limit.
    let reserved = cost(STREAM.len() as u64, 16_384, MINI_IN, MINI_OUT);
    assert_eq!(spent, reserved, "the cut request is billed its reservation");
    assert_eq!(leased, 0, "every lease returned");
    println!("a stream cut at shutdown was billed its reservation: {spent} nano-dollars");
}

fn a_cluster_keeps_each_key_in_its_slot_and_spend_exact(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let cluster = ValkeyCluster::start(3);
    let journal = journal_dir("cluster", driver);
    let aura = Launch::new(&mock.url(), driver)
        .arg("--store")
        .arg("valkey")
        .arg("--valkey-url")
        .arg(&cluster.url())
        .arg("--journal-dir")
        .arg(journal.to_str().unwrap())
        .start();
    let keys: Vec<String> = (0..6)
        .map(|i| format!("sk-test-cluster-key-{i:04}"))
        .collect();
    for key in &keys {
        assert_eq!(post(&aura, key, CHAT, &[], STREAM), 200);
        assert_eq!(post(&aura, key, CHAT, &[], WHOLE), 200);
    }
    let requests = mock.requests();
    for (i, key) in keys.iter().enumerate() {
        let want: u64 = requests[2 * i..2 * i + 2]
            .iter()
            .map(|r| {
                let (p, c) = mock_usage(r);
                cost(p, c, MINI_IN, MINI_OUT)
            })
            .sum();
        let deadline = Instant::now() + Duration::from_secs(15);
        while cluster.spent(key) != want {
            assert!(
                Instant::now() < deadline,
                "{key}: {} of {want}",
                cluster.spent(key)
            );
            std::thread::park_timeout(Duration::from_millis(20));
        }
        assert_eq!(nano(&usage_of(&aura, key)["usage_dollars"]), want);
    }
    let owners: std::collections::HashSet<u16> = keys.iter().map(|k| cluster.owner(k)).collect();
    assert!(
        owners.len() > 1,
        "the keys all landed on one node: {owners:?}"
    );
}

fn an_op_the_store_refuses_is_set_aside_and_holds_up_nothing(driver: Driver) {
    let bad = "sk-test-valkey-refused-001";
    let good = "sk-test-valkey-fine-00001";
    let mock = start_mock(MockOptions::default());
    let valkey = Valkey::start();
    // Something else wrote a string where the key's account hash lives: the script fails on
    // every op of that key (WRONGTYPE), and on no other key.
    let bad_tag = format!("aura:{{{}}}", KeyId::of(bad));
    redis::cmd("SET")
        .arg(&bad_tag)
        .arg("not a hash")
        .query::<()>(&mut valkey.connection())
        .unwrap();
    let journal = journal_dir("refused", driver);
    let aura = on_valkey(&mock, &valkey, driver, &journal, &[]).start();
    // Failing open, the refused key is still served; the other key is unaffected.
    assert_eq!(post(&aura, bad, CHAT, &[], WHOLE), 200);
    assert_eq!(post(&aura, good, CHAT, &[], WHOLE), 200);
    let requests = mock.requests();
    let (p, c) = mock_usage(&requests[1]);
    wait_for_store_spend(&valkey, good, cost(p, c, MINI_IN, MINI_OUT));
    scrape_until(&aura, |t| {
        sample(t, "aura_ledger_rejected_ops_total").is_some_and(|n| n > 0.0)
    });
    let rejected = journal.join(aura::budget::journal::REJECTED_FILE);
    let text = std::fs::read_to_string(&rejected).unwrap();
    assert!(text.contains(&KeyId::of(bad).to_string()), "{text}");
    assert!(
        !text.contains(bad),
        "the key itself is never written: {text}"
    );
    // Nothing was applied to the clobbered key.
    let kind: String = redis::cmd("TYPE")
        .arg(&bad_tag)
        .query(&mut valkey.connection())
        .unwrap();
    assert_eq!(kind, "string");
    let _ = std::fs::remove_dir_all(journal);
}

fn the_store_speaks_tls_and_trusts_only_its_ca(driver: Driver) {
    let key = "sk-test-valkey-tls-000001";
    let mock = start_mock(MockOptions::default());
    let valkey = Valkey::start_tls();
    let ca = valkey.tls_ca.clone().unwrap();
    let journal = journal_dir("tls", driver);
    let aura = on_valkey(&mock, &valkey, driver, &journal, &[])
        .arg("--valkey-ca-file")
        .arg(ca.to_str().unwrap())
        .start();
    assert!(valkey.url().starts_with("rediss://"));
    assert_eq!(post(&aura, key, CHAT, &[], STREAM), 200);
    assert_eq!(post(&aura, key, CHAT, &[], WHOLE), 200);
    wait_for_store_spend(&valkey, key, mock_spend(&mock));
    wait_for_metric(&aura, "aura_store_up 1");
    // Without the CA, the system's roots do not trust the test certificate: no store.
    let untrusting = journal.join("untrusting");
    let other = on_valkey(&mock, &valkey, driver, &untrusting, &[]).start();
    assert_eq!(post(&other, key, CHAT, &[], WHOLE), 200, "fail-open serves");
    scrape_until(&other, |t| {
        sample(t, "aura_store_errors_total").is_some_and(|n| n > 0.0)
    });
    wait_for_metric(&other, "aura_store_up 0");
    let _ = std::fs::remove_dir_all(journal);
}

fn an_idle_node_reports_whether_its_store_answers(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let mut valkey = Valkey::start();
    let journal = journal_dir("idle", driver);
    let aura = on_valkey(&mock, &valkey, driver, &journal, &[]).start();
    // No request at all: the ledger asks the store itself.
    wait_for_metric(&aura, "aura_store_up 1");
    valkey.stop();
    // The next idle ping (every 5 s) finds it gone.
    scrape_within(&aura, Duration::from_secs(15), |t| {
        t.lines().any(|l| l == "aura_store_up 0")
    });
    assert!(mock.requests().is_empty());
}
