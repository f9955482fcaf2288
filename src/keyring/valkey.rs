//! The keyring in Valkey: one hash, `aura:{keyring}` (key id → the key's record as JSON), its
//! alias index `aura:{keyring}:aliases`, and its version, `aura:{keyring}:version`, bumped in
//! the same script as every change. All share a hash tag, so a cluster keeps them in one slot.

use redis::Value;

use super::record::KeyRecord;
use super::{readable, Keyring, Put};
use crate::budget::store::valkey::ValkeyStore;
use crate::budget::store::StoreError;

const KEYS: &str = "aura:{keyring}";
const VERSION: &str = "aura:{keyring}:version";
/// alias → key id: an alias is one key's across the fleet.
const ALIASES: &str = "aura:{keyring}:aliases";
/// report account id → whose spend it records (JSON).
const REPORTS: &str = "aura:{keyring}:reports";

/// A compare-and-set write of one record: refused (-2) unless the stored one is at the
/// revision expected (-1: none may be stored), refused (-3) if another key has the alias;
/// else the record and the alias index are written and the version is bumped (its new value
/// answered). A delete (ARGV[1] = 'delete') frees the alias too (-1: there was no record).
const CHANGE: &str = r"
local current = redis.call('HGET', KEYS[1], ARGV[2])
if ARGV[1] == 'delete' then
  if not current then return -1 end
  local ok, old = pcall(cjson.decode, current)
  if ok and type(old) == 'table' and old.alias and redis.call('HGET', KEYS[3], old.alias) == ARGV[2] then
    redis.call('HDEL', KEYS[3], old.alias)
  end
  redis.call('HDEL', KEYS[1], ARGV[2])
  return redis.call('INCR', KEYS[2])
end
local expected = tonumber(ARGV[4])
local old = nil
if expected < 0 then
  if current then return -2 end
else
  if not current then return -2 end
  local ok, decoded = pcall(cjson.decode, current)
  if not ok or type(decoded) ~= 'table' or tonumber(decoded.rev or 0) ~= expected then return -2 end
  old = decoded
end
-- The new alias is checked before the old one is let go: a refused rename keeps it.
local owner = redis.call('HGET', KEYS[3], ARGV[5])
if owner and owner ~= ARGV[2] then return -3 end
if old and old.alias and old.alias ~= ARGV[5] and redis.call('HGET', KEYS[3], old.alias) == ARGV[2] then
  redis.call('HDEL', KEYS[3], old.alias)
end
redis.call('HSET', KEYS[3], ARGV[5], ARGV[2])
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
return redis.call('INCR', KEYS[2])
";

fn change(action: &str, id: &str, json: &str, expected: i64, alias: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(CHANGE)
        .arg(3)
        .arg(KEYS)
        .arg(VERSION)
        .arg(ALIASES)
        .arg(action)
        .arg(id)
        .arg(json)
        .arg(expected)
        .arg(alias);
    cmd
}

impl Keyring for ValkeyStore {
    fn load(&self) -> Result<(u64, Vec<KeyRecord>), StoreError> {
        // The version first: the keys read after it are at least as new.
        let mut version = redis::cmd("GET");
        version.arg(VERSION);
        let mut keys = redis::cmd("HVALS");
        keys.arg(KEYS);
        let replies: Vec<Value> = self.pipeline(&[version, keys])?;
        let (Some(version), Some(values)) = (replies.first(), replies.get(1)) else {
            return Err(StoreError::Protocol("the keyring: a short answer".into()));
        };
        let version: Option<u64> = redis::from_redis_value(version.clone())
            .map_err(|e| StoreError::Protocol(format!("the keyring's version: {e}")))?;
        let values: Vec<String> = redis::from_redis_value(values.clone())
            .map_err(|e| StoreError::Protocol(format!("the keyring: {e}")))?;
        Ok((
            version.unwrap_or(0),
            readable(values.iter().map(String::as_str)),
        ))
    }

    fn version(&self) -> Result<u64, StoreError> {
        let mut get = redis::cmd("GET");
        get.arg(VERSION);
        let version: Vec<Option<u64>> = self.pipeline(&[get])?;
        Ok(version.into_iter().flatten().next().unwrap_or(0))
    }

    fn put(&self, record: &KeyRecord, expected: Option<u64>) -> Result<Put, StoreError> {
        let json = serde_json::to_string(record)
            .map_err(|e| StoreError::Protocol(format!("a keyring record: {e}")))?;
        let expected = expected.map_or(-1, |rev| i64::try_from(rev).unwrap_or(i64::MAX));
        let cmd = change("put", &record.id, &json, expected, &record.alias);
        let answer: Vec<i64> = self.pipeline(&[cmd])?;
        Ok(match answer.first() {
            Some(-2) => Put::Changed,
            Some(-3) => Put::AliasTaken,
            _ => Put::Written,
        })
    }

    fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let version: Vec<i64> = self.pipeline(&[change("delete", id, "", 0, "")])?;
        Ok(version.first().is_some_and(|v| *v >= 0))
    }

    fn name_reports(&self, names: &[(String, String)]) -> Result<(), StoreError> {
        let writes: Vec<redis::Cmd> = names
            .chunks(256)
            .map(|chunk| {
                let mut cmd = redis::cmd("HSET");
                cmd.arg(REPORTS);
                for (id, owner) in chunk {
                    cmd.arg(id).arg(owner);
                }
                cmd
            })
            .collect();
        if !writes.is_empty() {
            let _: Vec<Value> = self.pipeline(&writes)?;
        }
        Ok(())
    }

    fn report_names(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut all = redis::cmd("HGETALL");
        all.arg(REPORTS);
        let replies: Vec<Vec<(String, String)>> = self.pipeline(&[all])?;
        Ok(replies.into_iter().flatten().collect())
    }
}
