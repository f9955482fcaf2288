//! Money: everything that decides, records and delivers what a key may spend and has spent.
//!
//! - [`op`]: the vocabulary every part below shares (pure);
//! - [`estimate`]: a request's upper cost estimate and its settled cost (pure);
//! - [`shard`]: a worker's leases, reservations and settled spend (the request path);
//! - [`journal`]: settled spend on disk before a kill can lose it, replayed at the next start;
//! - [`ledger`]: the one path from workers to the store, off the request path;
//! - [`store`]: the in-memory store (one node) and the Valkey store (a fleet).
//!
//! Lower layers never import higher ones: `op` and `estimate` import nothing of the rest;
//! the stores know ops, not shards; the shard knows the ledger only through its handle.

pub mod estimate;
pub mod journal;
pub mod ledger;
pub mod op;
pub mod shard;
pub mod store;

pub use op::{
    Account, Accounts, Applied, Ask, Budget, Holder, KeyLimits, LimitTable, Meter, Op, PeriodSpend,
    Settlement, Spend,
};
pub use shard::{Refusal, Reservation, Shard};
