//! The journal: settled spend on its way to the store, on disk before a kill can lose it.
//!
//! Each worker appends a record to its own segment file as it settles a request (before the
//! response's last bytes reach the client), and one when it asks for a lease. A segment is
//! mapped into memory (`MAP_SHARED`): a record is a 48-byte copy into the page cache, no
//! syscall, and what is in the page cache survives the process (SIGKILL, OOM kill, a panic).
//! The ledger thread `fdatasync`s the live segments every `journal_fsync_interval_ms`: a power
//! loss loses at most that much.
//!
//! A full segment is replaced by a new one that starts with a snapshot: one record per op the
//! store has not confirmed yet and per key's spend not yet handed over, so the journal stays
//! as small as what is in flight, however long the store is away. Once the snapshot is complete
//! the old segment is deleted. A clean shutdown, with everything delivered, deletes the rest.
//!
//! At start, segments left by an earlier run (a kill, an outage at shutdown) are turned into
//! ops of their holders (`plan_replay`): every spend record is an op with its own sequence
//! number, so the store applies exactly what it had not applied before (it keeps each holder's
//! last sequence number per key: see `store/valkey.rs` for when it forgets one), in the period
//! it was settled in, and the holder's leases are dropped (it is gone). The directory is locked for the
//! life of the process: a second Aura pointed at it refuses to start.

pub mod legacy;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use memmap2::MmapMut;

use super::op::{Holder, Op, Spend};
use crate::auth::KeyId;

pub const RECORD_BYTES: usize = 48;
const HEADER_BYTES: usize = 512;
const MAGIC: &[u8; 8] = b"AURAJNL1";
/// 2: XXH3 checksums (1 had CRC-32s).
const VERSION: u32 = 2;
/// Records per segment before a worker starts the next one: 384 KiB.
pub const SEGMENT_RECORDS: usize = 8192;
/// Longest holder name a segment header keeps (`node/boot/worker`).
pub const MAX_HOLDER_BYTES: usize = 400;
const LOCK_FILE: &str = "aura.lock";
const SEGMENT_SUFFIX: &str = ".seg";
/// Ops the store refused again and again, set aside for an operator (JSON lines).
pub const REJECTED_FILE: &str = "rejected.jsonl";

/// One thing a holder wrote down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// Spend settled in `period`. In a snapshot: spend of an op the store has not confirmed
    /// (its records carry the op's sequence number), or spend not handed over yet.
    Spend {
        seq: u64,
        key: KeyId,
        period: u64,
        nano: u64,
    },
    /// The holder asked for, or holds, a lease on `key`.
    Lease { key: KeyId },
    /// The store applied the holder's op `seq` for `key`, and so every record of the key up to
    /// it: a replay need not (must not, after a store loss) apply them again.
    Confirmed { seq: u64, key: KeyId },
    /// The snapshot at the head of its segment is complete.
    SnapshotEnd,
}

const KIND_SPEND: u8 = 1;
const KIND_LEASE: u8 = 2;
const KIND_SNAPSHOT_END: u8 = 3;
const KIND_CONFIRMED: u8 = 4;

fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

impl Record {
    /// `seq, key, period, nano, kind` then a 64-bit checksum (XXH3) of the bytes before it: a
    /// record a kill or a power loss tore (or the zeros past the last one) does not check out.
    /// XXH3 rather than a CRC: on 40 bytes it costs a third as much, on every settled request.
    fn encode(&self) -> [u8; RECORD_BYTES] {
        let mut out = [0u8; RECORD_BYTES];
        let (seq, key, period, nano, kind) = match *self {
            Record::Spend {
                seq,
                key,
                period,
                nano,
            } => (seq, key.to_bytes(), period, nano, KIND_SPEND),
            Record::Lease { key } => (0, key.to_bytes(), 0, 0, KIND_LEASE),
            Record::Confirmed { seq, key } => (seq, key.to_bytes(), 0, 0, KIND_CONFIRMED),
            Record::SnapshotEnd => (0, [0; 8], 0, 0, KIND_SNAPSHOT_END),
        };
        out[0..8].copy_from_slice(&seq.to_le_bytes());
        out[8..16].copy_from_slice(&key);
        out[16..24].copy_from_slice(&period.to_le_bytes());
        out[24..32].copy_from_slice(&nano.to_le_bytes());
        out[32] = kind;
        let sum = checksum(&out[..40]);
        out[40..48].copy_from_slice(&sum.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Record> {
        let bytes: &[u8; RECORD_BYTES] = bytes.try_into().ok()?;
        let sum = u64::from_le_bytes(bytes[40..48].try_into().ok()?);
        if sum != checksum(&bytes[..40]) {
            return None;
        }
        let word = |at: usize| -> Option<u64> {
            Some(u64::from_le_bytes(bytes[at..at + 8].try_into().ok()?))
        };
        let key = KeyId::from_bytes(bytes[8..16].try_into().ok()?);
        match bytes[32] {
            KIND_SPEND => Some(Record::Spend {
                seq: word(0)?,
                key,
                period: word(16)?,
                nano: word(24)?,
            }),
            KIND_LEASE => Some(Record::Lease { key }),
            KIND_CONFIRMED => Some(Record::Confirmed { seq: word(0)?, key }),
            KIND_SNAPSHOT_END => Some(Record::SnapshotEnd),
            _ => None,
        }
    }
}

/// A segment's header: whose it is, its place in the holder's sequence of segments, and
/// whether it starts with a snapshot of everything before it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    holder: String,
    generation: u64,
    snapshot: bool,
    capacity: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&u32::from(self.snapshot).to_le_bytes());
        out[16..24].copy_from_slice(&self.generation.to_le_bytes());
        out[24..28].copy_from_slice(&self.capacity.to_le_bytes());
        let holder = self.holder.as_bytes();
        let len = holder.len().min(MAX_HOLDER_BYTES);
        out[28..30].copy_from_slice(&(len as u16).to_le_bytes());
        out[30..30 + len].copy_from_slice(&holder[..len]);
        let sum = checksum(&out[..HEADER_BYTES - 8]);
        out[HEADER_BYTES - 8..].copy_from_slice(&sum.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Header> {
        let bytes = bytes.get(..HEADER_BYTES)?;
        let sum = u64::from_le_bytes(bytes[HEADER_BYTES - 8..].try_into().ok()?);
        if &bytes[0..8] != MAGIC || sum != checksum(&bytes[..HEADER_BYTES - 8]) {
            return None;
        }
        let u32_at = |at: usize| -> Option<u32> {
            Some(u32::from_le_bytes(bytes[at..at + 4].try_into().ok()?))
        };
        if u32_at(8)? != VERSION {
            return None;
        }
        let len = usize::from(u16::from_le_bytes(bytes[28..30].try_into().ok()?));
        Some(Header {
            snapshot: u32_at(12)? == 1,
            generation: u64::from_le_bytes(bytes[16..24].try_into().ok()?),
            capacity: u32_at(24)?,
            holder: String::from_utf8(bytes.get(30..30 + len)?.to_vec()).ok()?,
        })
    }
}

/// A segment read back: its header and its records up to the first that does not check out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub path: PathBuf,
    holder: String,
    generation: u64,
    snapshot: bool,
    records: Vec<Record>,
}

impl Segment {
    fn read(path: &Path) -> io::Result<Option<Segment>> {
        let bytes = std::fs::read(path)?;
        // Another version's segment may hold spend not yet in the store: never skipped.
        if let Some(version) = bytes
            .get(8..12)
            .filter(|_| bytes.starts_with(MAGIC))
            .and_then(|v| v.try_into().ok())
            .map(u32::from_le_bytes)
            .filter(|v| *v != VERSION)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} was written by another version of Aura (journal format {version}; this \
                     one reads {VERSION}): start the version that wrote it once, so it replays \
                     it, then this one",
                    path.display()
                ),
            ));
        }
        let Some(header) = Header::decode(&bytes) else {
            return Ok(None);
        };
        let records = bytes[HEADER_BYTES.min(bytes.len())..]
            .chunks_exact(RECORD_BYTES)
            .map_while(Record::decode)
            .collect();
        Ok(Some(Segment {
            path: path.to_path_buf(),
            holder: header.holder,
            generation: header.generation,
            snapshot: header.snapshot,
            records,
        }))
    }

    /// A snapshot segment is usable only once its snapshot is complete; a rotation cut short
    /// left the segment before it in place.
    fn usable(&self) -> bool {
        !self.snapshot || self.records.contains(&Record::SnapshotEnd)
    }
}

/// Ops that replay an earlier run's journal, and the files they come from (deleted once every
/// op is applied).
#[derive(Debug, Default)]
pub struct Replay {
    pub ops: Vec<Op>,
    pub files: Vec<PathBuf>,
    /// Segments that could not be read (a header that does not check out): left in place.
    pub unreadable: Vec<PathBuf>,
}

/// Turns the segments of holders that are gone into ops. Per holder: from its newest complete
/// snapshot on (older segments are covered by it), every spend record becomes part of the op
/// with its sequence number (an op that spans periods has one record per period), oldest
/// first; the last op of each key closes the holder's lease on it, and a key with only a lease
/// record gets a close of its own (sequence 0: nothing to apply, only the close).
/// `period`: the period each key's window is in now.
pub fn plan_replay(segments: Vec<Segment>, period: &dyn Fn(KeyId) -> u64) -> Replay {
    let mut replay = Replay::default();
    let mut by_holder: BTreeMap<String, Vec<Segment>> = BTreeMap::new();
    for segment in segments {
        replay.files.push(segment.path.clone());
        by_holder
            .entry(segment.holder.clone())
            .or_default()
            .push(segment);
    }
    for (holder, mut segments) in by_holder {
        segments.retain(Segment::usable);
        segments.sort_by_key(|s| s.generation);
        let start = segments.iter().rposition(|s| s.snapshot).unwrap_or(0);
        let holder = Holder::from(holder);
        // key → seq → spend of that op, and the keys with a lease; per key, the newest op the
        // store confirmed (everything up to it is applied already).
        let mut spends: BTreeMap<KeyId, BTreeMap<u64, Spend>> = BTreeMap::new();
        let mut confirmed: BTreeMap<KeyId, u64> = BTreeMap::new();
        for record in segments[start.min(segments.len())..]
            .iter()
            .flat_map(|s| s.records.iter())
        {
            match *record {
                Record::Spend {
                    seq,
                    key,
                    period,
                    nano,
                } => spends
                    .entry(key)
                    .or_default()
                    .entry(seq)
                    .or_default()
                    .add(period, nano),
                Record::Lease { key } => {
                    spends.entry(key).or_default();
                }
                Record::Confirmed { seq, key } => {
                    let newest = confirmed.entry(key).or_default();
                    *newest = (*newest).max(seq);
                }
                Record::SnapshotEnd => {}
            }
        }
        for (key, ops) in &mut spends {
            if let Some(&newest) = confirmed.get(key) {
                ops.retain(|seq, _| *seq > newest);
            }
        }
        for (key, ops) in spends {
            let first = replay.ops.len();
            let period = period(key);
            for (seq, spend) in ops {
                let mut op = Op::new(holder.clone(), seq, key, period);
                op.settle.spent = spend;
                replay.ops.push(op);
            }
            if replay.ops.len() == first {
                replay.ops.push(Op::new(holder.clone(), 0, key, period));
            }
            if let Some(last) = replay.ops.last_mut() {
                last.close = true;
            }
        }
    }
    replay
}

/// The journal directory of this process: locked, with the live segments of its workers.
pub struct Journal {
    dir: PathBuf,
    /// Held (with an exclusive lock) for the life of the process.
    _lock: File,
    /// This run's segments, for the periodic fdatasync and the final clean-up.
    live: Mutex<Vec<(PathBuf, Arc<File>)>>,
    /// Segments a snapshot replaced: deleted once the snapshot is on disk (the next sync).
    superseded: Mutex<Vec<PathBuf>>,
    /// Journal write failures (a full disk): spend then stays in memory only.
    pub errors: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("dir", &self.dir).finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal directory {0}: {1}")]
    Dir(PathBuf, io::Error),
    #[error(
        "journal directory {dir} is in use by another Aura (pid {pid}); give each Aura its own --journal-dir"
    )]
    Locked { dir: PathBuf, pid: String },
    /// An earlier Aura's journal file that cannot be replayed whole.
    #[error("{0}")]
    Legacy(io::Error),
}

impl Journal {
    /// Creates `dir` if need be and locks it.
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        let fail = |e| JournalError::Dir(dir.to_path_buf(), e);
        std::fs::create_dir_all(dir).map_err(fail)?;
        let lock_path = dir.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(fail)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let pid = std::fs::read_to_string(&lock_path).unwrap_or_default();
                return Err(JournalError::Locked {
                    dir: dir.to_path_buf(),
                    pid: pid.trim().to_string(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(fail(e)),
        }
        lock.set_len(0)
            .and_then(|()| writeln!(lock, "{}", std::process::id()))
            .map_err(fail)?;
        Ok(Journal {
            dir: dir.to_path_buf(),
            _lock: lock,
            live: Mutex::new(Vec::new()),
            superseded: Mutex::new(Vec::new()),
            errors: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Segments an earlier run left (call before any worker writes).
    pub fn leftovers(&self) -> io::Result<(Vec<Segment>, Vec<PathBuf>)> {
        read_segments(&self.dir)
    }

    /// The journal of one worker (`name`: unique in this directory for this run).
    pub fn worker(self: &Arc<Journal>, holder: Holder, name: &str) -> WorkerJournal {
        WorkerJournal {
            journal: self.clone(),
            holder,
            name: name.to_string(),
            generation: 0,
            segment: None,
            retry_at: None,
        }
    }

    /// Flushes every live segment to the disk (the power-loss bound), then deletes the
    /// segments their snapshots replaced: never before the snapshot itself is on disk.
    pub fn sync(&self) {
        let superseded = std::mem::take(&mut *lock(&self.superseded));
        let files: Vec<Arc<File>> = self.lock_live().iter().map(|(_, f)| f.clone()).collect();
        let mut synced = true;
        for file in files {
            if let Err(e) = file.sync_data() {
                synced = false;
                self.failed(&e, "cannot fsync a journal segment");
            }
        }
        if !synced {
            lock(&self.superseded).extend(superseded);
            return;
        }
        if !superseded.is_empty() {
            sync_dir(&self.dir);
            self.remove(&superseded);
        }
    }

    /// At a clean shutdown, once the store has everything: this run's segments go.
    pub fn remove_live(&self) {
        let superseded = std::mem::take(&mut *lock(&self.superseded));
        for path in superseded {
            let _ = std::fs::remove_file(path);
        }
        for (path, _) in self.lock_live().drain(..) {
            let _ = std::fs::remove_file(path);
        }
        sync_dir(&self.dir);
    }

    /// Deletes replayed segments (their ops are all applied).
    pub fn remove(&self, files: &[PathBuf]) {
        for path in files {
            if let Err(e) = std::fs::remove_file(path) {
                if e.kind() != io::ErrorKind::NotFound {
                    self.failed(&e, "cannot delete a replayed journal segment");
                }
            }
        }
        sync_dir(&self.dir);
    }

    /// Appends one line to the file of ops set aside (fsynced: it is their only copy).
    pub fn set_aside(&self, line: &str) -> io::Result<()> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(REJECTED_FILE))?;
        writeln!(file, "{line}")?;
        file.sync_data()
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, Vec<(PathBuf, Arc<File>)>> {
        lock(&self.live)
    }

    fn failed(&self, error: &io::Error, what: &str) {
        let n = self
            .errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The first failure and then one in a thousand: a full disk fails every write.
        if n.is_multiple_of(1000) {
            tracing::error!(error = %error, dir = %self.dir.display(), "{what}");
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// One worker's segment, mapped for writing.
struct Mapped {
    path: PathBuf,
    map: MmapMut,
    /// Records it has room for, and the next free one.
    capacity: usize,
    next: usize,
}

/// A worker's journal: it appends records and rotates its segment when full.
pub struct WorkerJournal {
    journal: Arc<Journal>,
    holder: Holder,
    name: String,
    generation: u64,
    /// None until the first record, and after a failure to make a segment.
    segment: Option<Mapped>,
    /// After a failure: no new segment is tried before then (a full disk fails each time).
    retry_at: Option<std::time::Instant>,
}

/// What an append found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    Written,
    /// The segment is full (or there is none yet): rotate, with a snapshot that covers the
    /// record, and it is written.
    Full,
    /// The journal cannot be written (logged and counted): the record is in memory only.
    Failed,
}

impl WorkerJournal {
    pub fn append(&mut self, record: Record) -> Appended {
        match self.segment.as_mut() {
            Some(segment) if segment.next < segment.capacity => {
                let at = HEADER_BYTES + segment.next * RECORD_BYTES;
                segment.map[at..at + RECORD_BYTES].copy_from_slice(&record.encode());
                segment.next += 1;
                Appended::Written
            }
            _ if self.retry_at.is_some_and(|t| std::time::Instant::now() < t) => Appended::Failed,
            _ => Appended::Full,
        }
    }

    /// Starts the next segment with `snapshot` (everything not yet confirmed by the store),
    /// then drops the previous one. On failure the previous segment stays as it is.
    pub fn rotate(&mut self, snapshot: &[Record]) -> Appended {
        match self.start_segment(snapshot) {
            Ok(()) => {
                self.retry_at = None;
                Appended::Written
            }
            Err(e) => {
                self.journal.failed(
                    &e,
                    "cannot write the journal: settled spend is in memory only",
                );
                self.retry_at = Some(std::time::Instant::now() + std::time::Duration::from_secs(1));
                Appended::Failed
            }
        }
    }

    fn start_segment(&mut self, snapshot: &[Record]) -> io::Result<()> {
        let generation = self.generation + 1;
        let first = self.segment.is_none() && self.generation == 0;
        let capacity = SEGMENT_RECORDS.max(2 * (snapshot.len() + 1));
        let path = self
            .journal
            .dir
            .join(format!("{}-{generation:08}{SEGMENT_SUFFIX}", self.name));
        let header = Header {
            holder: self.holder.to_string(),
            generation,
            // The very first segment of a run has nothing before it to snapshot.
            snapshot: !first,
            capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
        };
        let bytes = HEADER_BYTES + capacity * RECORD_BYTES;
        let mut file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)?;
        // Writing the zeros (not just setting the length) allocates the blocks now: a full disk
        // fails here, not later as a SIGBUS on a mapped page.
        let mut image = vec![0u8; bytes];
        image[..HEADER_BYTES].copy_from_slice(&header.encode());
        let mut at = HEADER_BYTES;
        let records = snapshot
            .iter()
            .copied()
            .chain((!first).then_some(Record::SnapshotEnd));
        for record in records {
            image[at..at + RECORD_BYTES].copy_from_slice(&record.encode());
            at += RECORD_BYTES;
        }
        let written = file.write_all(&image);
        if let Err(e) = written {
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        #[allow(unsafe_code)]
        // SAFETY: the file was created by this process (create_new) in a directory it holds an
        // exclusive lock on, and it is never truncated while mapped; only this worker writes it,
        // through `&mut self`. Another program truncating it would be the one undefined event
        // (a SIGBUS), as for any mapped file.
        let map = unsafe { MmapMut::map_mut(&file)? };
        let file = Arc::new(file);
        let old = self.segment.replace(Mapped {
            path: path.clone(),
            map,
            capacity,
            next: (at - HEADER_BYTES) / RECORD_BYTES,
        });
        self.generation = generation;
        let mut live = self.journal.lock_live();
        live.push((path, file));
        if let Some(old) = old {
            // The snapshot is complete and covers everything in the old segment, which goes once
            // the snapshot is on disk (the ledger's next sync): a power loss before then finds
            // the old segment still there.
            live.retain(|(p, _)| *p != old.path);
            drop(live);
            drop(old.map);
            lock(&self.journal.superseded).push(old.path);
        }
        Ok(())
    }
}

/// Every segment in `dir`, and the files that are not readable segments.
fn read_segments(dir: &Path) -> io::Result<(Vec<Segment>, Vec<PathBuf>)> {
    let mut segments = Vec::new();
    let mut unreadable = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if !path.to_string_lossy().ends_with(SEGMENT_SUFFIX) {
            continue;
        }
        match Segment::read(&path) {
            Ok(Some(segment)) => segments.push(segment),
            Ok(None) => unreadable.push(path),
            // Deleted since it was listed (a rotation): nothing to read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok((segments, unreadable))
}

/// What a journal directory holds, as a replay would apply it, read without taking its lock
/// (for operators and tests: what is on disk now).
pub fn inspect(dir: &Path, period: u64) -> io::Result<Replay> {
    let (segments, unreadable) = read_segments(dir)?;
    let mut replay = plan_replay(segments, &|_| period);
    replay.unreadable = unreadable;
    Ok(replay)
}

/// Makes a creation or removal durable (best effort: some filesystems refuse a directory fsync).
fn sync_dir(dir: &Path) {
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
}

/// The default journal directory: `/var/lib/aura` where this user may write, else the user's
/// state directory (`$XDG_STATE_HOME/aura`, `~/.local/state/aura`), else a directory under the
/// system's temporary directory named after the user.
pub fn default_dir(env: &dyn crate::config::Source) -> PathBuf {
    default_dir_with(Path::new("/var/lib/aura"), env)
}

fn default_dir_with(system: &Path, env: &dyn crate::config::Source) -> PathBuf {
    if writable(system) {
        return system.to_path_buf();
    }
    if let Some(state) = env.get("XDG_STATE_HOME").filter(|s| s.starts_with('/')) {
        return Path::new(&state).join("aura");
    }
    if let Some(home) = env.get("HOME").filter(|s| s.starts_with('/')) {
        return Path::new(&home).join(".local/state/aura");
    }
    let user = env.get("USER").unwrap_or_else(|| "aura".into());
    std::env::temp_dir().join(format!("aura-{user}"))
}

/// Whether `dir` exists and this process may create files in it, or could create it.
fn writable(dir: &Path) -> bool {
    let probe = |d: &Path| {
        let test = d.join(format!(".aura-probe-{}", std::process::id()));
        let ok = File::create(&test).is_ok();
        let _ = std::fs::remove_file(&test);
        ok
    };
    if dir.is_dir() {
        return probe(dir);
    }
    dir.parent().is_some_and(|p| p.is_dir() && probe(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> KeyId {
        KeyId::of(&format!("sk-journal-{n}"))
    }

    fn dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("aura-journal-unit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn spend(seq: u64, k: u8, period: u64, nano: u64) -> Record {
        Record::Spend {
            seq,
            key: key(k),
            period,
            nano,
        }
    }

    #[test]
    fn records_round_trip_and_a_torn_one_does_not_check_out() {
        for record in [
            spend(7, 1, 20_000, 123),
            Record::Lease { key: key(2) },
            Record::Confirmed {
                seq: 9,
                key: key(3),
            },
            Record::SnapshotEnd,
        ] {
            let bytes = record.encode();
            assert_eq!(Record::decode(&bytes), Some(record));
            // The checked bytes (the last four are padding).
            for cut in 0..44 {
                let mut torn = bytes;
                torn[cut..].fill(0);
                assert_eq!(Record::decode(&torn), None, "cut at {cut}");
            }
        }
        assert_eq!(Record::decode(&[0; RECORD_BYTES]), None);
    }

    #[test]
    fn a_second_aura_cannot_take_a_locked_directory() {
        let dir = dir("lock");
        let first = Journal::open(&dir).unwrap();
        match Journal::open(&dir) {
            Err(JournalError::Locked { pid, .. }) => {
                assert_eq!(pid, std::process::id().to_string())
            }
            other => panic!("expected Locked, got {:?}", other.err()),
        }
        drop(first);
        assert!(Journal::open(&dir).is_ok(), "free again once released");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A journal in `dir` and a worker whose first segment holds one spend record.
    fn first_segment(dir: &Path) -> (Arc<Journal>, WorkerJournal) {
        let journal = Arc::new(Journal::open(dir).unwrap());
        let mut worker = journal.worker(Holder::from("n/b/0"), "b-w0");
        assert_eq!(worker.append(spend(1, 1, 5, 10)), Appended::Full);
        assert_eq!(worker.rotate(&[spend(1, 1, 5, 10)]), Appended::Written);
        (journal, worker)
    }

    #[test]
    fn what_a_worker_appends_reads_back_and_a_rotation_keeps_only_the_snapshot() {
        let dir = dir("rotate");
        let (journal, mut worker) = first_segment(&dir);
        assert_eq!(worker.append(spend(2, 1, 5, 20)), Appended::Written);
        let (segments, unreadable) = journal.leftovers().unwrap();
        assert!(unreadable.is_empty());
        assert_eq!(segments.len(), 1);
        assert_eq!(
            segments[0].records,
            vec![spend(1, 1, 5, 10), spend(2, 1, 5, 20)]
        );
        assert!(!segments[0].snapshot);
        // Rotate: the new segment starts with the snapshot; the old one goes once the snapshot
        // is on disk.
        assert_eq!(worker.rotate(&[spend(2, 1, 5, 30)]), Appended::Written);
        assert_eq!(journal.leftovers().unwrap().0.len(), 2);
        journal.sync();
        let (segments, _) = journal.leftovers().unwrap();
        assert_eq!(segments.len(), 1);
        assert_eq!(
            segments[0].records,
            vec![spend(2, 1, 5, 30), Record::SnapshotEnd]
        );
        journal.sync();
        journal.remove_live();
        assert!(journal.leftovers().unwrap().0.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn another_versions_segment_is_never_skipped() {
        let dir = dir("version");
        let (journal, worker) = first_segment(&dir);
        drop(worker);
        let path = journal.leftovers().unwrap().0[0].path.clone();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let error = journal.leftovers().unwrap_err().to_string();
        assert!(
            error.contains("written by another version of Aura (journal format 1"),
            "{error}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn segment(holder: &str, generation: u64, snapshot: bool, records: Vec<Record>) -> Segment {
        Segment {
            path: PathBuf::from(format!("{holder}-{generation}")),
            holder: holder.to_string(),
            generation,
            snapshot,
            records,
        }
    }

    /// An op as the tests compare it: holder, seq, key, spend by period, close.
    type Summary = (String, u64, KeyId, Vec<(u64, u64)>, bool);

    fn summary(replay: &Replay) -> Vec<Summary> {
        replay
            .ops
            .iter()
            .map(|op| {
                let spend = op.settle.spent.iter().map(|p| (p.period, p.nano)).collect();
                (op.holder.to_string(), op.seq, op.key, spend, op.close)
            })
            .collect()
    }

    #[test]
    fn a_replay_is_one_op_per_sequence_number_and_closes_each_lease() {
        let replay = plan_replay(
            vec![segment(
                "n/b/0",
                1,
                false,
                vec![
                    spend(3, 1, 5, 10),
                    Record::Lease { key: key(2) },
                    spend(4, 1, 5, 20),
                    // One op across a period's end: two records, one sequence number.
                    spend(9, 1, 5, 1),
                    spend(9, 1, 6, 2),
                ],
            )],
            &|_| 6,
        );
        assert_eq!(replay.files.len(), 1);
        let mut got = summary(&replay);
        got.sort_by_key(|(_, seq, key, _, _)| (*key, *seq));
        let mut want = vec![
            ("n/b/0".to_string(), 3, key(1), vec![(5, 10)], false),
            ("n/b/0".to_string(), 4, key(1), vec![(5, 20)], false),
            ("n/b/0".to_string(), 9, key(1), vec![(5, 1), (6, 2)], true),
            ("n/b/0".to_string(), 0, key(2), vec![], true),
        ];
        want.sort_by_key(|(_, seq, key, _, _)| (*key, *seq));
        assert_eq!(got, want);
        assert!(replay.ops.iter().all(|op| op.period == 6));
    }

    /// Records the store confirmed are not replayed: after a store that lost its data, they
    /// would be counted twice (the nodes give that spend back themselves).
    #[test]
    fn what_the_store_confirmed_is_not_replayed() {
        let replay = plan_replay(
            vec![segment(
                "n/b/0",
                1,
                false,
                vec![
                    spend(3, 1, 5, 10),
                    spend(4, 1, 5, 20),
                    Record::Confirmed {
                        seq: 6,
                        key: key(1),
                    },
                    spend(7, 1, 5, 30),
                    spend(5, 2, 5, 40),
                ],
            )],
            &|_| 5,
        );
        let ops: Vec<(u64, KeyId, u64)> = replay
            .ops
            .iter()
            .map(|op| (op.seq, op.key, op.settle.spent.total()))
            .collect();
        assert!(ops.contains(&(7, key(1), 30)));
        assert!(ops.contains(&(5, key(2), 40)));
        assert_eq!(ops.len(), 2, "{ops:?}");
    }

    #[test]
    fn a_complete_snapshot_covers_older_segments_and_an_incomplete_one_is_ignored() {
        let old = segment(
            "n/b/0",
            1,
            false,
            vec![spend(1, 1, 5, 10), spend(2, 1, 5, 5)],
        );
        let complete = segment(
            "n/b/0",
            2,
            true,
            vec![spend(2, 1, 5, 15), Record::SnapshotEnd, spend(3, 1, 5, 1)],
        );
        let torn = segment("n/b/0", 3, true, vec![spend(3, 1, 5, 16)]);
        let replay = plan_replay(vec![old.clone(), complete.clone(), torn], &|_| 5);
        assert_eq!(
            summary(&replay)
                .into_iter()
                .map(|(_, seq, _, spend, _)| (seq, spend))
                .collect::<Vec<_>>(),
            vec![(2, vec![(5, 15)]), (3, vec![(5, 1)])]
        );
        assert_eq!(replay.files.len(), 3, "every file goes once replayed");
        // A rotation cut short: only the old segment counts.
        let torn = segment("n/b/0", 2, true, vec![spend(2, 1, 5, 15)]);
        let replay = plan_replay(vec![old, torn], &|_| 5);
        assert_eq!(
            summary(&replay)
                .into_iter()
                .map(|(_, seq, _, spend, _)| (seq, spend))
                .collect::<Vec<_>>(),
            vec![(1, vec![(5, 10)]), (2, vec![(5, 5)])]
        );
    }

    #[test]
    fn the_default_directory_is_the_system_one_where_writable_else_the_users() {
        use std::collections::HashMap;
        let env = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let system = dir("default-system");
        std::fs::create_dir_all(&system).unwrap();
        let user = env(&[("XDG_STATE_HOME", "/state"), ("HOME", "/home/ann")]);
        assert_eq!(default_dir_with(&system, &user), system);
        // A directory no one may create (under a file): the user's state directory.
        let unwritable = system.join("a-file");
        std::fs::write(&unwritable, b"").unwrap();
        let unwritable = unwritable.join("aura");
        assert_eq!(
            default_dir_with(&unwritable, &user),
            PathBuf::from("/state/aura")
        );
        // A relative XDG_STATE_HOME is ignored, as the spec says.
        let relative = env(&[("XDG_STATE_HOME", "state"), ("HOME", "/home/ann")]);
        assert_eq!(
            default_dir_with(&unwritable, &relative),
            PathBuf::from("/home/ann/.local/state/aura")
        );
        let bare = env(&[("USER", "ann")]);
        assert_eq!(
            default_dir_with(&unwritable, &bare),
            std::env::temp_dir().join("aura-ann")
        );
        let _ = std::fs::remove_dir_all(&system);
    }
}
