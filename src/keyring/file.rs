//! The keyring of a single node (the memory store): a JSON state file, `{"version": n,
//! "keys": [...]}`, read once at start and written whole at every change: to a temporary file
//! beside it, fsynced, renamed over it, and the directory fsynced, so a crash leaves the old
//! file or the new one, never half of one. A change the disk refused is not made.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::record::KeyRecord;
use super::Keyring;
use crate::budget::store::StoreError;

pub struct FileKeyring {
    path: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    version: u64,
    keys: Vec<KeyRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("key state file {0}: {1}")]
    Read(PathBuf, io::Error),
    /// Not Aura's, or damaged: Aura will not start over it (it would lose every key in it).
    #[error("key state file {0} is not a key state Aura can read ({1}): fix or move it")]
    Unreadable(PathBuf, String),
}

impl FileKeyring {
    /// The keyring in `path` (none there yet: an empty one, written at the first change).
    pub fn open(path: &Path) -> Result<FileKeyring, FileError> {
        let state = match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| FileError::Unreadable(path.to_path_buf(), e.to_string()))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(FileError::Read(path.to_path_buf(), e)),
        };
        Ok(FileKeyring {
            path: path.to_path_buf(),
            state: Mutex::new(state),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Applies `change` to a copy of the state and writes it; the state changes only once the
    /// file holds it.
    fn change<T>(
        &self,
        change: impl FnOnce(&mut BTreeMap<String, KeyRecord>) -> T,
    ) -> Result<T, StoreError> {
        let mut state = self.lock();
        let mut keys: BTreeMap<String, KeyRecord> = state
            .keys
            .iter()
            .map(|k| (k.id.clone(), k.clone()))
            .collect();
        let out = change(&mut keys);
        let next = State {
            version: state.version + 1,
            keys: keys.into_values().collect(),
        };
        write_atomically(&self.path, &next).map_err(|e| {
            StoreError::Unavailable(format!("key state file {}: {e}", self.path.display()))
        })?;
        *state = next;
        Ok(out)
    }
}

fn write_atomically(path: &Path, state: &State) -> io::Result<()> {
    let json = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
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

    fn put(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.change(|keys| {
            keys.insert(record.id.clone(), record.clone());
        })
    }

    fn delete(&self, id: &str) -> Result<bool, StoreError> {
        self.change(|keys| keys.remove(id).is_some())
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
    fn keys_survive_a_reopen_and_a_damaged_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("aura-keyring-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("keys.json");
        let ring = FileKeyring::open(&path).unwrap();
        assert_eq!(ring.load().unwrap(), (0, Vec::new()));
        ring.put(&record("00000000000000aa", "a")).unwrap();
        ring.put(&record("00000000000000bb", "b")).unwrap();
        assert!(ring.delete("00000000000000aa").unwrap());
        assert!(!ring.delete("00000000000000aa").unwrap());
        let again = FileKeyring::open(&path).unwrap();
        let (version, keys) = again.load().unwrap();
        assert_eq!(version, 4);
        assert_eq!(keys, vec![record("00000000000000bb", "b")]);
        assert!(!path.with_extension("json.tmp").exists());
        fs::write(&path, b"{\"version\": 1, \"keys\": [{\"id\": 5}]}").unwrap();
        assert!(matches!(
            FileKeyring::open(&path),
            Err(FileError::Unreadable(..))
        ));
        let _ = fs::remove_dir_all(&dir);
    }
}
