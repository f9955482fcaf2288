//! `aura-perf keys`: what a distinct API key costs in memory, measured. In this process: a
//! worker's budget shard on the in-memory store, fed `count` distinct keys (each reserves,
//! settles a cost, and is flushed and returned as a worker does when a key goes idle), then
//! `count` keys the upstream refused (401). In a Valkey server: `count / 10` accounts with spend,
//! and as many without (which expire). Resident memory is read from /proc, Valkey's from
//! `INFO memory`.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aura::auth::KeyId;
use aura::budget::ledger::Ledger;
use aura::budget::shard::{Shard, ShardSettings, IDLE_RETURN};
use aura::budget::store::valkey::ValkeyStore;
use aura::budget::store::{system_clock, MemoryStore, Store};
use aura::budget::{Holder, KeyLimits, LimitTable, Op, Spend};
use aura::config::Period;

use crate::procstat;

/// Keys per flush: a worker flushes every 50 ms; this many keys arrive in between at most.
const KEYS_PER_FLUSH: usize = 10_000;

pub fn run(count: usize, valkey_server: Option<&Path>, dir: &Path) -> std::io::Result<String> {
    let mut report = String::new();
    let (kept, refused) = memory_store(count)?;
    report.push_str(&format!(
        "- in-memory store, {count} distinct keys that spent: resident memory +{:.1} MiB, \
         {:.0} bytes a key\n",
        kept as f64 / 1_048_576.0,
        kept as f64 / count as f64
    ));
    report.push_str(&format!(
        "- in-memory store, {count} distinct keys the upstream refused (401): resident memory \
         +{:.1} MiB, {:.0} bytes a key\n",
        refused as f64 / 1_048_576.0,
        refused as f64 / count as f64
    ));
    if let Some(server) = valkey_server {
        let accounts = (count / 10).max(1);
        let (spent, idle) = valkey(server, dir, accounts)?;
        report.push_str(&format!(
            "- Valkey ({}), {accounts} accounts with spend: used_memory +{:.1} MiB, {:.0} bytes \
             an account (kept)\n",
            server.display(),
            spent as f64 / 1_048_576.0,
            spent as f64 / accounts as f64
        ));
        report.push_str(&format!(
            "- Valkey, {accounts} accounts with no spend (a lease asked for and returned): \
             used_memory +{:.1} MiB, {:.0} bytes an account, gone after {} s idle\n",
            idle as f64 / 1_048_576.0,
            idle as f64 / accounts as f64,
            aura::budget::store::valkey::IDLE_TTL.as_secs()
        ));
    }
    Ok(report)
}

/// Resident bytes of this process.
fn rss() -> u64 {
    procstat::rss_kib(&[std::process::id()]) * 1024
}

/// Bytes resident after `count` keys that spent, and after `count` keys refused.
fn memory_store(count: usize) -> std::io::Result<(u64, u64)> {
    let limits = Arc::new(KeyLimits::of_table(LimitTable::keys(
        1_000_000_000,
        Period::Daily,
        HashMap::new(),
    )));
    let store = Arc::new(MemoryStore::new(limits.clone(), system_clock()));
    let shard = Shard::new(
        Ledger::Inline(store),
        ShardSettings {
            holder: Holder::from("perf/0"),
            workers: 1,
            fail_open: true,
            clock: system_clock(),
            limits,
            squeeze_wait: Duration::ZERO,
            journal: None,
        },
    );
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut feed = |prefix: &str, refused: bool| -> std::io::Result<u64> {
        let before = rss();
        for i in 0..count {
            let key = KeyId::of(&format!("sk-perf-{prefix}-{i:012}"));
            let mut reserve = std::pin::pin!(shard.reserve(key, 1_000));
            match reserve.as_mut().poll(&mut cx) {
                std::task::Poll::Ready(Ok(reservation)) if refused => {
                    reservation.settle_refused_key()
                }
                std::task::Poll::Ready(Ok(reservation)) => reservation.settle(500),
                _ => return Err(std::io::Error::other("a reservation was not granted")),
            }
            if i % KEYS_PER_FLUSH == KEYS_PER_FLUSH - 1 {
                // The keys went idle: spend handed over, leases returned, entries dropped.
                shard.flush(Instant::now() + IDLE_RETURN);
            }
        }
        shard.flush(Instant::now() + IDLE_RETURN);
        Ok(rss().saturating_sub(before))
    };
    let kept = feed("kept", false)?;
    let refused = feed("refused", true)?;
    Ok((kept, refused))
}

/// Valkey's used_memory growth for `accounts` accounts with spend, then as many without.
fn valkey(server: &Path, dir: &Path, accounts: usize) -> std::io::Result<(u64, u64)> {
    let target = crate::targets::valkey(server, dir, None)?;
    let store = ValkeyStore::new(
        &format!("redis://{}/", target.addr),
        Duration::from_secs(5),
        Arc::new(KeyLimits::of_table(LimitTable::keys(
            1_000_000_000,
            Period::Daily,
            HashMap::new(),
        ))),
        system_clock(),
    )
    .map_err(std::io::Error::other)?;
    let client =
        redis::Client::open(format!("redis://{}/", target.addr)).map_err(std::io::Error::other)?;
    let mut info = client.get_connection().map_err(std::io::Error::other)?;
    let used = |c: &mut redis::Connection| -> std::io::Result<u64> {
        let text: String = redis::cmd("INFO")
            .arg("memory")
            .query(c)
            .map_err(std::io::Error::other)?;
        text.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| std::io::Error::other("no used_memory in INFO"))
    };
    let period = aura::budget::op::period_of(Period::Daily, system_clock()());
    let mut phase = |prefix: &str, spend: bool| -> std::io::Result<u64> {
        let before = used(&mut info)?;
        let ops: Vec<Op> = (0..accounts)
            .map(|i| {
                let key = KeyId::of(&format!("sk-perf-{prefix}-{i:012}"));
                let mut op = Op::new(Holder::from("perf/boot/0"), 1, key, period);
                if spend {
                    op.settle.spent = Spend::of(period, 500);
                }
                op
            })
            .collect();
        for batch in ops.chunks(1_000) {
            store.apply(batch).map_err(std::io::Error::other)?;
        }
        Ok(used(&mut info)?.saturating_sub(before))
    };
    let spent = phase("spent", true)?;
    let idle = phase("idle", false)?;
    drop(target);
    Ok((spent, idle))
}
