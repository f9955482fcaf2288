//! The fleet exactness test: 2 nodes × 2 workers on one redis-server, well over 5,000 mixed
//! requests (streams with and without the client's own usage event, whole answers, the
//! Responses API, embeddings, upstream errors) on 8 keys, the store SIGKILLed and restarted in
//! the middle, then one node SIGKILLed at a random instant and restarted (its journal
//! replayed). At the end the store must hold, to the nano-dollar, what the mock reported for
//! every answer a client received in full, plus some of the requests in flight at the node's
//! kill (billed before their last bytes left, or not at all). It prints expected vs stored.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::load::{is_subset_sum, mock_costs, Got, Kind, Load, Rng, Sent};
use common::valkey::{journal_dir, on_valkey, Valkey};
use common::{start_mock, Driver, MockOptions};

on_both_drivers!(five_thousand_mixed_requests_survive_a_store_kill_and_a_node_sigkill_exactly);

const REQUESTS: usize = 5_000;

/// Waits until the loads have had `n` answers between them.
fn wait_for(loads: &[&Load], n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while loads.iter().map(|l| l.answered()).sum::<usize>() < n {
        assert!(
            Instant::now() < deadline,
            "the load stalled before {n} answers"
        );
        std::thread::park_timeout(Duration::from_millis(10));
    }
}

fn five_thousand_mixed_requests_survive_a_store_kill_and_a_node_sigkill_exactly(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let mut valkey = Valkey::start();
    let keys: Vec<String> = (0..8)
        .map(|i| format!("sk-test-fleet-key-{i:04}"))
        .collect();
    let (journal_a, journal_b) = (journal_dir("a", driver), journal_dir("b", driver));
    let mut a = on_valkey(&mock, &valkey, driver, &journal_a, &[])
        .node_id("fleet-a")
        .start();
    let mut b = on_valkey(&mock, &valkey, driver, &journal_b, &[])
        .node_id("fleet-b")
        .start();
    let ids = Arc::new(AtomicU64::new(1));
    let mut rng = Rng::seeded();
    let load_a = Load::mixed(a.addr, &keys, 6, ids.clone(), &Kind::ALL);
    let load_b = Load::mixed(b.addr, &keys, 6, ids.clone(), &Kind::ALL);
    wait_for(&[&load_a, &load_b], 1_200);
    // The store dies (SIGKILL) under load; both nodes fail open on what they know, keeping
    // their spend journaled; it comes back.
    valkey.kill();
    wait_for(&[&load_a, &load_b], 1_700);
    valkey.restart();
    // Node B dies at a random instant (SIGKILL), and comes back: its journal is replayed.
    wait_for(&[&load_a, &load_b], 2_400 + rng.below(600) as usize);
    b.kill();
    let sent_b = load_b.finish();
    let mut b = on_valkey(&mock, &valkey, driver, &journal_b, &[])
        .node_id("fleet-b")
        .start();
    let load_b2 = Load::mixed(b.addr, &keys, 6, ids.clone(), &Kind::ALL);
    let before = sent_b.len();
    wait_for(&[&load_a, &load_b2], REQUESTS - before);
    let sent_a = load_a.finish();
    let sent_b2 = load_b2.finish();
    // Both stop gracefully: everything flushed, every lease returned.
    assert!(a.terminate(Duration::from_secs(30)).success());
    assert!(b.terminate(Duration::from_secs(30)).success());

    let costs = mock_costs(&mock.requests());
    let all: Vec<Sent> = sent_a
        .iter()
        .chain(&sent_b)
        .chain(&sent_b2)
        .copied()
        .collect();
    assert!(all.len() >= REQUESTS, "{} requests", all.len());
    let expected: u64 = all
        .iter()
        .filter(|s| s.got == Got::Complete)
        .map(|s| costs[&s.id])
        .sum();
    let in_flight: Vec<u64> = sent_b
        .iter()
        .filter(|s| s.got != Got::Complete)
        .filter_map(|s| costs.get(&s.id).copied())
        .filter(|c| *c > 0)
        .collect();
    let stored: u64 = keys.iter().map(|k| valkey.totals(k).0).sum();
    let leased: u64 = keys.iter().map(|k| valkey.totals(k).1).sum();
    let refused = all
        .iter()
        .filter(|s| matches!(s.got, Got::Status(402 | 503)))
        .count();
    println!(
        "fleet: {} requests over 2 nodes × 2 workers, the store SIGKILLed and node B SIGKILLed \
         mid-load: expected {expected} nano-dollars (answers received in full), stored {stored}; \
         {} in flight at node B's kill costing {in_flight:?}; {refused} refused",
        all.len(),
        in_flight.len()
    );
    assert_eq!(refused, 0, "nothing refused: the limits are far away");
    assert!(
        stored >= expected,
        "{} nano-dollars of answers received in full were lost",
        expected - stored
    );
    assert!(
        is_subset_sum(stored - expected, &in_flight),
        "stored {} more than expected, not the cost of some requests in flight: counted twice?",
        stored - expected
    );
    let held: Vec<_> = keys
        .iter()
        .map(|k| valkey.hash(&format!("aura:{{{}}}:lease", aura::auth::KeyId::of(k))))
        .filter(|leases| !leases.is_empty())
        .collect();
    assert_eq!(
        leased, 0,
        "every lease returned or closed; still held: {held:?}"
    );
    let _ = std::fs::remove_dir_all(journal_a);
    let _ = std::fs::remove_dir_all(journal_b);
}
