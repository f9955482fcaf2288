//! The keyring of a single node (the memory store): a JSON state file, `{"version": n,
//! "keys": [...]}`, read once at start and written whole at every change: to a temporary file
//! beside it, fsynced, renamed over it, and the directory fsynced, so a crash leaves the old
//! file or the new one, never half of one. A change the disk refused is not made. One Aura at
//! a time: the file's lock (`<file>.lock`) is held for the life of the process.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::record::KeyRecord;
use super::{readable, Keyring, Put};
use crate::budget::store::StoreError;

pub struct FileKeyring {
    /// Report accounts' names: kept for the life of the process, as the memory store's spend
    /// is.
    reports: Mutex<std::collections::BTreeMap<String, String>>,
    /// None: kept in memory only (no admin API to change it, no file named).
    path: Option<PathBuf>,
    state: Mutex<State>,
    /// Held (with an exclusive lock) for the life of the process.
    _lock: Option<File>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct State {
    version: u64,
    keys: Vec<KeyRecord>,
}

/// The file as read: records this version cannot read are kept as they were.
#[derive(Deserialize)]
struct Stored {
    version: u64,
    keys: Vec<serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("key state file {0}: {1}")]
    Read(PathBuf, io::Error),
    /// Not Aura's, or damaged: Aura will not start over it (it would lose every key in it).
    #[error("key state file {0} is not a key state Aura can read ({1}): fix or move it")]
    Unreadable(PathBuf, String),
    #[error("key state file {0} is in use by another Aura (its lock {1} is held)")]
    Locked(PathBuf, PathBuf),
}

impl FileKeyring {
    /// The keyring in `path` (none there yet: an empty one, written at the first change),
    /// locked for this process.
    pub fn open(path: &Path) -> Result<FileKeyring, FileError> {
        let read = |e| FileError::Read(path.to_path_buf(), e);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(read)?;
        }
        let lock_path = path.with_extension("json.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(read)?;
        if lock.try_lock().is_err() {
            return Err(FileError::Locked(path.to_path_buf(), lock_path));
        }
        let state = match fs::read(path) {
            Ok(bytes) => {
                let stored: Stored = serde_json::from_slice(&bytes)
                    .map_err(|e| FileError::Unreadable(path.to_path_buf(), e.to_string()))?;
                let texts: Vec<String> = stored.keys.iter().map(|k| k.to_string()).collect();
                State {
                    version: stored.version,
                    keys: readable(texts.iter().map(String::as_str)),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(read(e)),
        };
        Ok(FileKeyring {
            reports: Mutex::default(),
            path: Some(path.to_path_buf()),
            state: Mutex::new(state),
            _lock: Some(lock),
        })
    }

    /// A keyring with no file: empty at start, forgotten at exit.
    pub fn in_memory() -> FileKeyring {
        FileKeyring {
            reports: Mutex::default(),
            path: None,
            state: Mutex::new(State::default()),
            _lock: None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Writes `keys` as the next version; the state changes only once the file holds it.
    fn write(&self, state: &mut State, keys: Vec<KeyRecord>) -> Result<(), StoreError> {
        let next = State {
            version: state.version + 1,
            keys,
        };
        if let Some(path) = &self.path {
            write_atomically(path, &next).map_err(|e| {
                StoreError::Unavailable(format!("key state file {}: {e}", path.display()))
            })?;
        }
        *state = next;
        Ok(())
    }
}

fn write_atomically(path: &Path, state: &State) -> io::Result<()> {
    let json = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let temporary = path.with_extension("json.tmp");
    // Hashes and metadata, no secret; still the operator's alone.
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    file.write_all(&json)?;
    file.sync_all()?;
    fs::rename(&temporary, path)?;
    File::open(dir)?.sync_all()
}

impl Keyring for FileKeyring {
    fn load(&self) -> Result<(u64, Vec<KeyRecord>), StoreError> {
        let state = self.lock();
        Ok((state.version, state.keys.clone()))
    }

    fn version(&self) -> Result<u64, StoreError> {
        Ok(self.lock().version)
    }

    fn put(&self, record: &KeyRecord, expected: Option<u64>) -> Result<Put, StoreError> {
        let mut state = self.lock();
        let current = state.keys.iter().find(|k| k.id == record.id);
        if current.map(|k| k.rev) != expected {
            return Ok(Put::Changed);
        }
        if state
            .keys
            .iter()
            .any(|k| k.alias == record.alias && k.id != record.id)
        {
            return Ok(Put::AliasTaken);
        }
        let mut keys: Vec<KeyRecord> = state
            .keys
            .iter()
            .filter(|k| k.id != record.id)
            .cloned()
            .collect();
        keys.push(record.clone());
        self.write(&mut state, keys)?;
        Ok(Put::Written)
    }

    fn name_reports(&self, names: &[(String, String)]) -> Result<(), StoreError> {
        let mut reports = match self.reports.lock() {
            Ok(reports) => reports,
            Err(poisoned) => poisoned.into_inner(),
        };
        reports.extend(names.iter().cloned());
        Ok(())
    }

    fn report_names(&self) -> Result<Vec<(String, String)>, StoreError> {
        let reports = match self.reports.lock() {
            Ok(reports) => reports,
            Err(poisoned) => poisoned.into_inner(),
        };
        Ok(reports
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let mut state = self.lock();
        if !state.keys.iter().any(|k| k.id == id) {
            return Ok(false);
        }
        let keys = state.keys.iter().filter(|k| k.id != id).cloned().collect();
        self.write(&mut state, keys)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::KeyId;

    fn record(id: &str, alias: &str) -> KeyRecord {
        let mut record = KeyRecord::new(KeyId::parse(id).unwrap(), "cd".repeat(32), 1);
        record.alias = alias.into();
        record
    }

    #[test]
    fn keys_survive_a_reopen_and_a_damaged_or_locked_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("aura-keyring-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("keys.json");
        let ring = FileKeyring::open(&path).unwrap();
        assert_eq!(ring.load().unwrap(), (0, Vec::new()));
        assert_eq!(
            ring.put(&record("00000000000000aa", "a"), None).unwrap(),
            Put::Written
        );
        assert_eq!(
            ring.put(&record("00000000000000bb", "b"), None).unwrap(),
            Put::Written
        );
        // A stale change, a second creation, an alias taken: refused.
        let mut changed = record("00000000000000bb", "b");
        changed.rev = 1;
        assert_eq!(ring.put(&changed, Some(5)).unwrap(), Put::Changed);
        assert_eq!(ring.put(&changed, None).unwrap(), Put::Changed);
        assert_eq!(
            ring.put(&record("00000000000000cc", "a"), None).unwrap(),
            Put::AliasTaken
        );
        assert_eq!(ring.put(&changed, Some(0)).unwrap(), Put::Written);
        assert!(ring.delete("00000000000000aa").unwrap());
        assert!(!ring.delete("00000000000000aa").unwrap());
        // One Aura at a time.
        assert!(matches!(
            FileKeyring::open(&path),
            Err(FileError::Locked(..))
        ));
        drop(ring);
        let again = FileKeyring::open(&path).unwrap();
        let (version, keys) = again.load().unwrap();
        assert_eq!(version, 4);
        assert_eq!(keys, vec![changed]);
        assert!(!path.with_extension("json.tmp").exists());
        drop(again);
        fs::write(&path, b"{\"version\": 1, \"keys\": 5}").unwrap();
        assert!(matches!(
            FileKeyring::open(&path),
            Err(FileError::Unreadable(..))
        ));
        let _ = fs::remove_dir_all(&dir);
    }
}
