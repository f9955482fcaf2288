//! The budget stores: per key id, its limit, what it has spent, and how much of the rest is
//! leased out to workers. [`memory::MemoryStore`] serves one node (the default);
//! [`valkey::ValkeyStore`] serves a fleet sharing one Valkey/Redis. Workers never call a store
//! on the request path: their shards call it to take a lease and to flush, through the ledger.

pub mod memory;
pub mod valkey;

use std::sync::Arc;

use super::op::{Account, Applied, Op, PeriodSpend};
use crate::auth::KeyId;

pub use memory::MemoryStore;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer (down, unreachable, timed out); nothing is known of the call.
    #[error("budget store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with something this version does not understand.
    #[error("budget store answered unexpectedly: {0}")]
    Protocol(String),
}

/// A budget store. Every call is atomic per key, and together the calls keep
/// `spent + leased <= limit`, apart from spend beyond a lease (a request that cost more than its
/// estimate). Calls may block (a network round trip): workers make them only through the ledger.
pub trait Store: Send + Sync {
    /// Applies ops in order; one answer per op.
    fn apply(&self, ops: &[Op]) -> Result<Vec<Applied>, StoreError>;
    /// The key's totals in the current period (a key never seen has its configured limit).
    fn account(&self, key: KeyId) -> Result<Account, StoreError>;
    /// The key's spend in each period the store keeps, oldest first.
    fn history(&self, key: KeyId) -> Result<Vec<PeriodSpend>, StoreError>;
    /// Each key's spend in each period the store keeps (for many keys at once: a store may
    /// read them in fewer round trips).
    fn histories(&self, keys: &[KeyId]) -> Result<Vec<Vec<PeriodSpend>>, StoreError> {
        keys.iter().map(|key| self.history(*key)).collect()
    }
    /// Admin: sets the key's limit.
    fn set_limit(&self, key: KeyId, limit: u64) -> Result<Account, StoreError>;
    /// Admin: the key's spend in the current period back to zero.
    fn reset(&self, key: KeyId) -> Result<Account, StoreError>;
    /// Admin: forgets the key's limit and spend (back to its configured or the default limit).
    fn remove(&self, key: KeyId) -> Result<(), StoreError>;
    /// Every key the store holds, with its totals.
    fn accounts(&self) -> Result<Vec<(KeyId, Account)>, StoreError>;
    /// Whether the store holds the key (it has been used, or given a limit).
    fn holds(&self, key: KeyId) -> Result<bool, StoreError>;
    /// Whether the store answers at all (the ledger asks while it has nothing else to send).
    fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Seconds since the Unix epoch; a parameter so tests can move time.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    })
}

impl From<StoreError> for crate::error::Error {
    /// The cause is the ledger's to log (it sees every store failure); a client learns only
    /// that the store is unavailable.
    fn from(_: StoreError) -> crate::error::Error {
        crate::error::Error::StoreUnavailable
    }
}
