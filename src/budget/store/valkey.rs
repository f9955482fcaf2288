//! The fleet store: budgets in Valkey (or Redis), shared by every Aura node pointed at it.
//!
//! Per key id `K`, six hashes, all with the hash tag `{K}` so a script touches one slot:
//!
//! | key | fields |
//! |---|---|
//! | `aura:{K}` | `spent:<period>` (spend settled in that budget period: the current one and a few before it), `limit` (set by the admin API; absent: the configured or default limit), `base:<period>` (after a loss: the largest spend floor a node gave back), `squeeze` |
//! | `aura:{K}:lease` | holder (`node/boot/worker`) → nano-dollars leased to it |
//! | `aura:{K}:until` | holder → when its lease lapses (ms, the server's clock) |
//! | `aura:{K}:seq` | holder → the last sequence number applied |
//! | `aura:{K}:grant` | holder → what that sequence granted (answered again to a retry) |
//! | `aura:{K}:seen` | holder → when its last op was applied (ms); once more than 64 holders are listed, a new one makes the script forget those silent for 7 days (their `:seq` too) |
//!
//! Every op is one script run (apply.lua, EVALSHA, pipelined: one round trip per batch). The
//! script applies an op only if its sequence is newer than the holder's last, so a retry after
//! a timeout or a journal replay is harmless. A lease lapses `LEASE_TTL` after its holder last
//! touched the key (workers renew theirs well before), so a node that died does not strand
//! budget for long. An account with no spend, no admin limit and no lease expires after
//! `IDLE_TTL`. Reads (read.lua) are a script flagged `no-writes`, on the admin connection.
//! Money is integers: amounts reach `HINCRBY` as strings (exact); the script's sums are
//! doubles, exact below 2^53 nano-dollars, which `MAX_LIMIT_NANO` keeps every total under.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterConnection};
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Connection, ConnectionLike, RedisError};

use super::{Clock, Store, StoreError};
use crate::auth::KeyId;
use crate::budget::op::{
    period_of, period_start, Account, Applied, Epoch, KeyLimits, Op, PeriodSpend,
};

/// A lease not renewed for this long goes back to the key's budget.
pub const LEASE_TTL: Duration = Duration::from_secs(30);

/// Holders a key may list before the script forgets those silent for `FORGET_AFTER_MS`
/// (holders are new at every start of a node, so old ones pile up otherwise).
const HOLDERS_KEPT: u64 = 64;
const FORGET_AFTER_MS: u64 = 7 * 24 * 3600 * 1000;

/// How long a refused ask keeps asking the key's other holders to hand back their unused lease.
pub const SQUEEZE: Duration = Duration::from_millis(500);

/// Ops per pipelined round trip.
const BATCH: usize = 256;

/// An account with nothing in it (no spend, no admin limit, no lease) is dropped after this
/// long without an op.
pub const IDLE_TTL: Duration = Duration::from_secs(600);

/// The op script: see apply.lua for what it does, step by step.
const APPLY: &str = include_str!("valkey/apply.lua");
/// The read-only script of admin reads.
const READ: &str = include_str!("valkey/read.lua");

/// A connection to one server, or to a cluster (found by asking the configured server).
enum Link {
    Single(Connection),
    /// Boxed: a cluster connection is four times the size of a single one.
    Cluster(Box<ClusterConnection>),
}

impl Link {
    fn as_dyn(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Link::Single(c) => c,
            Link::Cluster(c) => c.as_mut(),
        }
    }
}

pub struct ValkeyStore {
    client: redis::Client,
    /// The CA a `rediss://` connection trusts, when not the system's (the cluster client needs
    /// it again).
    certs: Option<redis::TlsCertificates>,
    /// One connection, made on first use and again after any failure.
    connection: Mutex<Option<Link>>,
    apply: redis::Script,
    read: redis::Script,
    timeout: Duration,
    limits: Arc<KeyLimits>,
    clock: Clock,
    lease_ttl: Duration,
}

impl ValkeyStore {
    /// Nothing is connected yet: the first call connects, and every call after a failure
    /// reconnects, so a store that is down at start or goes away later is picked up again.
    pub fn new(
        url: &str,
        timeout: Duration,
        limits: Arc<KeyLimits>,
        clock: Clock,
    ) -> Result<ValkeyStore, StoreError> {
        // The URL may hold a password: the error names only what is wrong with it.
        let client = redis::Client::open(url)
            .map_err(|e| StoreError::Protocol(format!("valkey_url: {:?}", e.kind())))?;
        Ok(ValkeyStore::with_client(
            client, None, timeout, limits, clock,
        ))
    }

    /// A store over TLS (`rediss://`) that trusts the CA certificates in `ca_pem` instead of the
    /// system's.
    pub fn with_ca(
        url: &str,
        ca_pem: Vec<u8>,
        timeout: Duration,
        limits: Arc<KeyLimits>,
        clock: Clock,
    ) -> Result<ValkeyStore, StoreError> {
        let certs = || redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca_pem.clone()),
        };
        let client = redis::Client::build_with_tls(url, certs())
            .map_err(|e| StoreError::Protocol(format!("valkey_url or CA file: {:?}", e.kind())))?;
        Ok(ValkeyStore::with_client(
            client,
            Some(certs()),
            timeout,
            limits,
            clock,
        ))
    }

    fn with_client(
        client: redis::Client,
        certs: Option<redis::TlsCertificates>,
        timeout: Duration,
        limits: Arc<KeyLimits>,
        clock: Clock,
    ) -> ValkeyStore {
        ValkeyStore {
            client,
            certs,
            connection: Mutex::new(None),
            apply: redis::Script::new(APPLY),
            read: redis::Script::new(READ),
            timeout,
            limits,
            clock,
            lease_ttl: LEASE_TTL,
        }
    }

    /// The same store on a connection of its own (for admin calls, so they never wait behind
    /// the ledger's ops, nor the ops behind them).
    pub fn second_connection(&self) -> ValkeyStore {
        ValkeyStore {
            connection: Mutex::new(None),
            apply: redis::Script::new(APPLY),
            read: redis::Script::new(READ),
            client: self.client.clone(),
            certs: self.certs.clone(),
            limits: self.limits.clone(),
            clock: self.clock.clone(),
            ..*self
        }
    }

    /// How long a lease lives without its holder touching the key (tests shorten it).
    pub fn with_lease_ttl(mut self, ttl: Duration) -> ValkeyStore {
        self.lease_ttl = ttl;
        self
    }

    /// The period of the account's window the clock is in.
    fn period_now(&self, key: KeyId) -> u64 {
        period_of(self.limits.window(key), (self.clock)())
    }

    /// Runs `call` on the connection, connecting first if needed. A failure drops the
    /// connection; a script the server forgot (a restart, SCRIPT FLUSH) is loaded again.
    fn with_connection<T>(
        &self,
        mut call: impl FnMut(&mut Link) -> Result<T, RedisError>,
    ) -> Result<T, StoreError> {
        let mut slot = match self.connection.lock() {
            Ok(slot) => slot,
            Err(poisoned) => poisoned.into_inner(),
        };
        if slot.is_none() {
            *slot = Some(self.connect()?);
        }
        let Some(connection) = slot.as_mut() else {
            return Err(StoreError::Unavailable("not connected".into()));
        };
        let mut result = call(connection);
        if matches!(&result, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
        {
            result = self
                .load_scripts(connection)
                .and_then(|()| call(connection));
        }
        result.map_err(|e| {
            if refuses_the_op(&e) {
                StoreError::Protocol(e.to_string())
            } else {
                // Down, failing over (READONLY, CLUSTERDOWN, TRYAGAIN, LOADING), busy, out of
                // memory, or misconfigured (NOPERM): all pass or can be fixed, and nothing may
                // be lost meanwhile. Start again on a fresh connection.
                *slot = None;
                StoreError::Unavailable(e.to_string())
            }
        })
    }

    fn load_scripts(&self, link: &mut Link) -> Result<(), RedisError> {
        self.apply.load(link.as_dyn())?;
        self.read.load(link.as_dyn())?;
        Ok(())
    }

    /// Connects to the configured server; if it is part of a cluster, to the whole cluster
    /// through it (every key of one API key shares a hash tag, so each script stays in one slot).
    fn connect(&self) -> Result<Link, StoreError> {
        let unavailable = |e: RedisError| StoreError::Unavailable(e.to_string());
        let mut single = self
            .client
            .get_connection_with_timeout(self.timeout)
            .map_err(unavailable)?;
        let timeout = Some(self.timeout);
        single
            .set_read_timeout(timeout)
            .and_then(|()| single.set_write_timeout(timeout))
            .map_err(unavailable)?;
        let info: String = redis::cmd("INFO")
            .arg("cluster")
            .query(&mut single)
            .map_err(unavailable)?;
        let mut link = if info.contains("cluster_enabled:1") {
            let mut builder =
                ClusterClient::builder(vec![self.client.get_connection_info().clone()])
                    .connection_timeout(self.timeout)
                    .response_timeout(self.timeout);
            if let Some(certs) = &self.certs {
                builder = builder.certs(certs.clone());
            }
            let cluster = builder
                .build()
                .and_then(|client| client.get_connection())
                .map_err(unavailable)?;
            cluster
                .set_read_timeout(timeout)
                .and_then(|()| cluster.set_write_timeout(timeout))
                .map_err(unavailable)?;
            Link::Cluster(Box::new(cluster))
        } else {
            Link::Single(single)
        };
        // Loaded up front (on every primary of a cluster) so the first EVALSHA is not NOSCRIPT.
        self.load_scripts(&mut link).map_err(unavailable)?;
        Ok(link)
    }

    /// The six hashes of one key, as the scripts take them.
    fn keys_of(cmd: &mut redis::Cmd, key: KeyId) {
        let tag = key_tag(key);
        cmd.arg(format!("{tag}:lease"))
            .arg(format!("{tag}:until"))
            .arg(format!("{tag}:seq"))
            .arg(format!("{tag}:grant"))
            .arg(format!("{tag}:seen"));
    }

    /// One run of the op script (see apply.lua for the arguments).
    fn op_command(&self, op: &Op) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.apply.get_hash()).arg(6).arg(key_tag(op.key));
        ValkeyStore::keys_of(&mut cmd, op.key);
        let flag = |on: bool| if on { 1 } else { 0 };
        let restore = op.restore.unwrap_or_default();
        let floor = restore.floor.unwrap_or(PeriodSpend { period: 0, nano: 0 });
        let signed = |v: Option<u64>| v.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX));
        cmd.arg(op.holder.as_ref())
            .arg(op.seq)
            .arg(self.limits.of(op.key))
            .arg(op.period)
            .arg(op.settle.from_lease)
            .arg(op.settle.returned)
            .arg(op.ask.map_or(0, |a| a.need))
            .arg(op.ask.map_or(0, |a| a.parts.max(1)))
            .arg(self.lease_ttl.as_millis() as u64)
            .arg(HOLDERS_KEPT)
            .arg(FORGET_AFTER_MS)
            .arg(SQUEEZE.as_millis() as u64)
            .arg(op.epoch.as_deref().unwrap_or(""))
            .arg(flag(op.close))
            .arg(flag(op.forget))
            .arg(signed(restore.held))
            .arg(floor.period)
            .arg(signed(restore.floor.map(|f| f.nano)))
            .arg(signed(restore.limit))
            .arg(self.limits.budget(op.key).history())
            .arg(IDLE_TTL.as_millis() as u64)
            .arg(period_start(self.limits.window(op.key), op.period));
        let spends: Vec<PeriodSpend> = op.settle.spent.iter().collect();
        cmd.arg(spends.len());
        for p in spends {
            cmd.arg(p.period).arg(p.nano);
        }
        cmd
    }

    /// Sends `cmds` in one round trip (per node of a cluster); one answer each.
    pub(crate) fn pipeline<T: redis::FromRedisValue>(
        &self,
        cmds: &[redis::Cmd],
    ) -> Result<Vec<T>, StoreError> {
        let replies: Vec<T> = self.with_connection(|link| match link {
            Link::Single(connection) => {
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd.clone());
                }
                pipe.query(connection)
            }
            // Sent as one pipeline per node, each command to the node owning its key's slot.
            Link::Cluster(connection) => {
                let mut pipe = redis::cluster::cluster_pipe();
                for cmd in cmds {
                    pipe.add_command(cmd.clone());
                }
                pipe.query(connection.as_mut())
            }
        })?;
        if replies.len() != cmds.len() {
            return Err(StoreError::Protocol(format!(
                "{} answers to {} calls",
                replies.len(),
                cmds.len()
            )));
        }
        Ok(replies)
    }

    fn run(&self, cmds: &[redis::Cmd]) -> Result<Vec<Applied>, StoreError> {
        type Reply = (u64, u64, u64, u64, u64, u64, String, u64);
        let replies: Vec<Reply> = self.pipeline(cmds)?;
        Ok(replies
            .into_iter()
            .map(
                |(granted, limit, spent, leased, squeezed, lost, epoch, held)| Applied {
                    granted,
                    account: Account {
                        limit,
                        spent,
                        leased,
                    },
                    squeezed: squeezed == 1,
                    lost: lost == 1,
                    epoch: (!epoch.is_empty()).then(|| Epoch::from(epoch)),
                    held: Some(held),
                },
            )
            .collect())
    }

    /// One run of the read-only script for `key`.
    fn read_command(&self, key: KeyId) -> redis::Cmd {
        let tag = key_tag(key);
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.read.get_hash())
            .arg(3)
            .arg(&tag)
            .arg(format!("{tag}:lease"))
            .arg(format!("{tag}:until"))
            .arg(self.limits.of(key))
            .arg(self.period_now(key));
        cmd
    }

    /// The key's totals in the current period and its spend per period, read only.
    fn read(&self, key: KeyId) -> Result<(Account, Vec<PeriodSpend>), StoreError> {
        let mut replies: Vec<Vec<redis::Value>> = self.pipeline(&[self.read_command(key)])?;
        parse_read(&replies.pop().unwrap_or_default())
    }

    /// Runs admin writes on the key's hashes, then lifts any idle expiry (an account an admin
    /// touched is kept).
    fn admin_write(&self, key: KeyId, write: redis::Cmd) -> Result<(), StoreError> {
        let tag = key_tag(key);
        let mut cmds = vec![write];
        for suffix in ["", ":lease", ":until", ":seq", ":grant", ":seen"] {
            let mut persist = redis::cmd("PERSIST");
            persist.arg(format!("{tag}{suffix}"));
            cmds.push(persist);
        }
        self.pipeline::<redis::Value>(&cmds).map(|_| ())
    }
}

/// What read.lua answers: `{limit, spent, leased, the account's fields...}`.
fn parse_read(reply: &[redis::Value]) -> Result<(Account, Vec<PeriodSpend>), StoreError> {
    let number = |v: Option<&redis::Value>| -> Result<u64, StoreError> {
        v.and_then(|v| redis::from_redis_value::<u64>(v.clone()).ok())
            .ok_or_else(|| StoreError::Protocol("a read answered no number".into()))
    };
    let account = Account {
        limit: number(reply.first())?,
        spent: number(reply.get(1))?,
        leased: number(reply.get(2))?,
    };
    let fields: Vec<String> = reply
        .iter()
        .skip(3)
        .filter_map(|v| redis::from_redis_value::<String>(v.clone()).ok())
        .collect();
    let mut history: Vec<PeriodSpend> = fields
        .chunks_exact(2)
        .filter_map(|pair| {
            let period = pair[0].strip_prefix("spent:")?.parse().ok()?;
            let nano = pair[1].parse().ok()?;
            Some(PeriodSpend { period, nano })
        })
        .collect();
    history.sort_by_key(|p| p.period);
    Ok((account, history))
}

/// Whether the store refused an op itself: its script failed on the op's data (WRONGTYPE on a
/// clobbered key, say), or it answered in a shape this version does not read. Such an op would
/// fail forever. Anything else (down, failing over, busy, out of memory, not allowed) passes or
/// can be fixed by an operator, and nothing may be set aside for it.
fn refuses_the_op(e: &RedisError) -> bool {
    const PASSING: [&str; 13] = [
        "OOM",
        "BUSY",
        "READONLY",
        "MASTERDOWN",
        "LOADING",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "NOREPLICAS",
        "MISCONF",
        "MOVED",
        "ASK",
        "NOPERM",
        "NOAUTH",
    ];
    if e.kind() == redis::ErrorKind::UnexpectedReturnType {
        return true;
    }
    e.clone().into_server_errors().is_some_and(|errors| {
        errors.iter().any(|(_, error)| {
            let in_script = error.details().is_some_and(|d| d.contains("script"));
            in_script && !PASSING.contains(&error.code())
        })
    })
}

/// Every `aura:{K}` account on one server, or on one node of a cluster (`node`).
fn scan(c: &mut dyn ScanTarget, node: Option<RoutingInfo>) -> Result<Vec<String>, RedisError> {
    let mut tags = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg("aura:{*}")
            .arg("COUNT")
            .arg(1000);
        let (next, batch): (u64, Vec<String>) = c.send(&cmd, node.clone())?;
        tags.extend(batch);
        if next == 0 {
            return Ok(tags);
        }
        cursor = next;
    }
}

/// Where a SCAN can go: a server, or a chosen node of a cluster.
trait ScanTarget {
    fn send(
        &mut self,
        cmd: &redis::Cmd,
        node: Option<RoutingInfo>,
    ) -> Result<(u64, Vec<String>), RedisError>;
}

impl ScanTarget for Connection {
    fn send(
        &mut self,
        cmd: &redis::Cmd,
        _: Option<RoutingInfo>,
    ) -> Result<(u64, Vec<String>), RedisError> {
        cmd.query(self)
    }
}

impl ScanTarget for ClusterConnection {
    fn send(
        &mut self,
        cmd: &redis::Cmd,
        node: Option<RoutingInfo>,
    ) -> Result<(u64, Vec<String>), RedisError> {
        match node {
            Some(routing) => Ok(redis::from_redis_value(self.route_command(cmd, routing)?)?),
            None => cmd.query(self),
        }
    }
}

/// The primaries' addresses in `CLUSTER NODES` output (`id host:port@bus flags master ...`).
fn primaries(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let address = fields.nth(1)?;
            let flags = fields.next()?;
            let primary = flags.split(',').any(|f| f == "master")
                && !flags.split(',').any(|f| f == "fail" || f == "noaddr");
            let (host, port) = address.split('@').next()?.rsplit_once(':')?;
            primary.then(|| Some((host.to_string(), port.parse().ok()?)))?
        })
        .collect()
}

/// `aura:{K}`: the hash tag keeps all of one key's hashes in one cluster slot.
fn key_tag(key: KeyId) -> String {
    format!("aura:{{{key}}}")
}

impl Store for ValkeyStore {
    fn apply(&self, ops: &[Op]) -> Result<Vec<Applied>, StoreError> {
        let mut applied = Vec::with_capacity(ops.len());
        for batch in ops.chunks(BATCH) {
            let cmds: Vec<redis::Cmd> = batch.iter().map(|op| self.op_command(op)).collect();
            applied.extend(self.run(&cmds)?);
        }
        Ok(applied)
    }

    fn account(&self, key: KeyId) -> Result<Account, StoreError> {
        Ok(self.read(key)?.0)
    }

    fn history(&self, key: KeyId) -> Result<Vec<PeriodSpend>, StoreError> {
        Ok(self.read(key)?.1)
    }

    fn histories(&self, keys: &[KeyId]) -> Result<Vec<Vec<PeriodSpend>>, StoreError> {
        let mut histories = Vec::with_capacity(keys.len());
        for batch in keys.chunks(BATCH) {
            let reads: Vec<redis::Cmd> = batch.iter().map(|&k| self.read_command(k)).collect();
            let replies: Vec<Vec<redis::Value>> = self.pipeline(&reads)?;
            for reply in &replies {
                histories.push(parse_read(reply)?.1);
            }
        }
        Ok(histories)
    }

    fn set_limit(&self, key: KeyId, limit: u64) -> Result<Account, StoreError> {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(key_tag(key)).arg("limit").arg(limit);
        self.admin_write(key, cmd)?;
        self.account(key)
    }

    fn reset(&self, key: KeyId) -> Result<Account, StoreError> {
        let period = self.period_now(key);
        let mut cmd = redis::cmd("HDEL");
        cmd.arg(key_tag(key))
            .arg(format!("spent:{period}"))
            .arg(format!("base:{period}"))
            // The layout before spend was kept per period.
            .arg("spent")
            .arg("period");
        self.admin_write(key, cmd)?;
        self.account(key)
    }

    fn remove(&self, key: KeyId) -> Result<(), StoreError> {
        // Limit and spend go; leases stay (they belong to workers that will settle or return
        // them), and so does the epoch: the account was emptied on purpose, not lost.
        let tag = key_tag(key);
        let account = self.with_connection(|c| {
            redis::cmd("HKEYS")
                .arg(&tag)
                .query::<Vec<String>>(c.as_dyn())
        })?;
        let fields: Vec<&String> = account.iter().filter(|f| *f != "epoch").collect();
        if fields.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("HDEL");
        cmd.arg(&tag).arg(fields);
        self.admin_write(key, cmd)
    }

    fn accounts(&self) -> Result<Vec<(KeyId, Account)>, StoreError> {
        let tags: Vec<String> = self.with_connection(|link| match link {
            Link::Single(c) => scan(c, None),
            // SCAN walks one node: walk every primary.
            Link::Cluster(c) => {
                let c = c.as_mut();
                let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(c)?;
                let mut tags = Vec::new();
                for (host, port) in primaries(&nodes) {
                    let node = SingleNodeRoutingInfo::ByAddress { host, port };
                    tags.extend(scan(c, Some(RoutingInfo::SingleNode(node)))?);
                }
                Ok(tags)
            }
        })?;
        let mut keys: Vec<KeyId> = tags
            .iter()
            .filter_map(|t| t.strip_prefix("aura:{")?.strip_suffix('}'))
            .filter_map(KeyId::parse)
            .collect();
        keys.sort();
        keys.dedup();
        // Read a batch per round trip (one at a time, 20,000 accounts took seconds); the
        // connection is let go between batches.
        let mut accounts = Vec::with_capacity(keys.len());
        for batch in keys.chunks(BATCH) {
            let reads: Vec<redis::Cmd> = batch.iter().map(|&k| self.read_command(k)).collect();
            let replies: Vec<Vec<redis::Value>> = self.pipeline(&reads)?;
            for (&key, reply) in batch.iter().zip(&replies) {
                accounts.push((key, parse_read(reply)?.0));
            }
        }
        Ok(accounts)
    }

    fn ping(&self) -> Result<(), StoreError> {
        self.with_connection(|c| redis::cmd("PING").query::<String>(c.as_dyn()))
            .map(|_| ())
    }

    fn holds(&self, key: KeyId) -> Result<bool, StoreError> {
        // Spend or an admin limit: an account emptied by the admin API keeps only its epoch.
        let fields: Vec<String> =
            self.with_connection(|c| redis::cmd("HKEYS").arg(key_tag(key)).query(c.as_dyn()))?;
        let held = fields
            .iter()
            .any(|f| f == "limit" || f.starts_with("spent:") || f == "spent");
        Ok(held || self.limits.names(key))
    }
}
