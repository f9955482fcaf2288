//! Keys made at runtime by the admin API: where they are kept, and how every node hears of a
//! change. With the Valkey store they live in Valkey (`keyring/valkey.rs`) and every node
//! polls a version number, so a key made, rotated or revoked on one node is in force on every
//! node within `POLL`; with the memory store they live in a state file (`keyring/file.rs`),
//! written whole and atomically at each change, read at start. Either way a key's secret is
//! never kept: only its SHA-256 (`record.rs`).

pub mod file;
pub mod record;
pub mod valkey;

use std::sync::Arc;
use std::time::Duration;

use crate::budget::store::StoreError;
use crate::reload::Shared;
use record::KeyRecord;

/// How often a node asks the keyring whether its keys changed.
pub const POLL: Duration = Duration::from_millis(250);

/// Where admin-made keys are kept. Calls block (a file write and fsync, a network round
/// trip): make them off the workers. Every change is a compare-and-set, so two admin calls
/// (on one node or two) never undo each other: a change made from a stale copy is refused.
pub trait Keyring: Send + Sync {
    /// Every key it can read (one it cannot, written by a newer Aura, say, is left out and
    /// logged), and the version they are at.
    fn load(&self) -> Result<(u64, Vec<KeyRecord>), StoreError>;
    /// The version: bumped by every change (cheap to poll).
    fn version(&self) -> Result<u64, StoreError>;
    /// Writes `record` if the key is still at revision `expected` (none: there must be no key
    /// with its id), and its alias is no other key's.
    fn put(&self, record: &KeyRecord, expected: Option<u64>) -> Result<Put, StoreError>;
    /// Removes a key; false: there was none with that id.
    fn delete(&self, id: &str) -> Result<bool, StoreError>;
    /// Names report accounts (id → whose spend, as JSON), so `/admin/spend` can show a day's
    /// spend after its key, team or model left the configuration. Names are never removed.
    fn name_reports(&self, names: &[(String, String)]) -> Result<(), StoreError>;
    /// Every report account ever named.
    fn report_names(&self) -> Result<Vec<(String, String)>, StoreError>;
}

/// What a compare-and-set write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    Written,
    /// The key changed (or went, or came) since it was read: read it again.
    Changed,
    /// Another key has the alias.
    AliasTaken,
}

/// Parses records as stored, leaving out (and logging) any this version cannot read.
fn readable<'a>(stored: impl Iterator<Item = &'a str>) -> Vec<KeyRecord> {
    stored
        .filter_map(|json| match serde_json::from_str::<KeyRecord>(json) {
            Ok(record) => Some(record),
            Err(e) => {
                tracing::error!(error = %e, "a keyring record this Aura cannot read is left out");
                None
            }
        })
        .collect()
}

/// Reads the keyring again into `shared` whenever its version moves (every `POLL`, for the
/// life of the process): how a node hears of keys another node made. A keyring that does not
/// answer keeps the keys last heard, and is asked again at the next poll.
pub fn follow(
    keyring: Arc<dyn Keyring>,
    shared: Arc<Shared>,
    mut seen: u64,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("aura-keyring".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                // Its own thread, never a worker's: it may block.
                std::thread::park_timeout(POLL);
                let moved = keyring.version().and_then(|version| {
                    if version == seen {
                        return Ok(());
                    }
                    let (version, keys) = keyring.load()?;
                    seen = version;
                    shared.set_admin_keys(Some((version, keys)));
                    Ok(())
                });
                match moved {
                    Ok(()) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "keyring unavailable: admin-made keys stay as last heard");
                    }
                    Err(_) => {}
                }
            }
        })
        .map(|_| ())
}
