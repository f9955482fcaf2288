//! The keyring in Valkey: one hash, `aura:{keyring}` (key id → the key's record as JSON), and
//! its version, `aura:{keyring}:version`, bumped in the same script as every change. Both
//! share a hash tag, so a cluster keeps them in one slot.

use redis::Value;

use super::record::KeyRecord;
use super::Keyring;
use crate::budget::store::valkey::ValkeyStore;
use crate::budget::store::StoreError;

const KEYS: &str = "aura:{keyring}";
const VERSION: &str = "aura:{keyring}:version";

/// Writes or deletes one field and bumps the version, atomically.
const CHANGE: &str = r"
if ARGV[1] == 'put' then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
  return redis.call('INCR', KEYS[2])
end
if redis.call('HDEL', KEYS[1], ARGV[2]) == 0 then
  return -1
end
return redis.call('INCR', KEYS[2])
";

fn change(action: &str, id: &str, json: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(CHANGE)
        .arg(2)
        .arg(KEYS)
        .arg(VERSION)
        .arg(action)
        .arg(id)
        .arg(json);
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
        let keys = values
            .iter()
            .map(|json| {
                serde_json::from_str(json)
                    .map_err(|e| StoreError::Protocol(format!("a keyring record: {e}")))
            })
            .collect::<Result<Vec<KeyRecord>, _>>()?;
        Ok((version.unwrap_or(0), keys))
    }

    fn version(&self) -> Result<u64, StoreError> {
        let mut get = redis::cmd("GET");
        get.arg(VERSION);
        let version: Vec<Option<u64>> = self.pipeline(&[get])?;
        Ok(version.into_iter().flatten().next().unwrap_or(0))
    }

    fn put(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(record)
            .map_err(|e| StoreError::Protocol(format!("a keyring record: {e}")))?;
        let _: Vec<i64> = self.pipeline(&[change("put", &record.id, &json)])?;
        Ok(())
    }

    fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let version: Vec<i64> = self.pipeline(&[change("delete", id, "")])?;
        Ok(version.first().is_some_and(|v| *v >= 0))
    }
}
