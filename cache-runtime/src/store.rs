//! What a storage tier does. The Redis tier (`redis_tier.rs`) and the local
//! tier (`local.rs`) implement [`Store`]; the failover wrapper (`failover.rs`)
//! puts the local tier behind another store with a breaker and a log of what
//! the other store missed. A Redis Cluster backend or a two-tier store is one
//! more implementation, not one more arm in every method of the facade.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bus::Listener;
use crate::cache::KeyTtl;
use crate::fence::Fence;
use crate::lease::{Claim, Purpose};
use crate::local::Entry;
use crate::pending::Pending;
use crate::CacheError;

/// A boxed future: the trait is used as `dyn Store`.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Bytes read from a tier.
pub(crate) enum Raw {
    Owned(Vec<u8>),
    /// A local-tier entry: its bytes, and the decoded value it may keep.
    Local(Arc<Entry>),
}

impl std::ops::Deref for Raw {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Raw::Owned(v) => v,
            Raw::Local(entry) => &entry.bytes,
        }
    }
}

/// What a fill is checked against, taken before its read: a fill is stored only
/// in the tier it read, and only if nothing covering its key was invalidated since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FillFence {
    /// A shared store's fence as this process last saw it, and when it was taken.
    Shared(Fence, Instant),
    /// The local tier's invalidation counter, and when it was taken.
    Local(u64, Instant),
}

impl FillFence {
    /// When the fence was taken: a fill older than the fence window is refused.
    pub(crate) fn taken(&self) -> Instant {
        match self {
            FillFence::Shared(_, at) | FillFence::Local(_, at) => *at,
        }
    }
}

/// One write: a fill (with the fence taken before its read) or a `set`.
pub(crate) struct Write<'a> {
    pub(crate) full: &'a str,
    pub(crate) bytes: &'a [u8],
    pub(crate) ttl: Duration,
    pub(crate) tags: &'a [String],
    /// `None` writes whatever happened since (`set`, warm-up).
    pub(crate) expected: Option<FillFence>,
    /// Refuse the fills of this key that read before this write.
    pub(crate) bump: bool,
    /// Only check `expected`: whether a fill would be stored, without storing.
    pub(crate) check_only: bool,
    /// Store only where the entry is gone or still holds these bytes, as a
    /// read found them: a fail-safe write-back never replaces a newer fill.
    pub(crate) replaces: Option<&'a [u8]>,
}

/// One page of key names (bytes: another client may have written any) and the
/// cursor of the next page (0: done).
pub(crate) type KeyPage = (Vec<Vec<u8>>, u64);

/// What a server says about itself, for `stats()`.
#[derive(Debug, Default)]
pub(crate) struct ServerInfo {
    pub(crate) version: String,
    pub(crate) used_memory: u64,
    pub(crate) used_memory_human: String,
    pub(crate) peak_memory: u64,
    pub(crate) peak_memory_human: String,
    pub(crate) connected_clients: u64,
}

/// A storage tier. Keys are full keys (prefix included); globs are Redis globs.
pub(crate) trait Store: Send + Sync {
    /// Reads an entry.
    fn get<'a>(&'a self, full: &'a str) -> BoxFuture<'a, Result<Option<Raw>, CacheError>>;

    /// What a fill of `full` whose read starts at `now` is checked against; no
    /// I/O. The caller's clock reading is reused, so a hit reads the clock once.
    fn fence(&self, full: &str, now: Instant) -> FillFence;

    /// Stores a fill or a `set`; whether it was stored (a refused fill is `false`).
    fn write<'a>(&'a self, write: Write<'a>) -> BoxFuture<'a, Result<bool, CacheError>>;

    /// Fences and deletes what `what` covers; how many entries went.
    fn invalidate<'a>(&'a self, what: &'a Pending) -> BoxFuture<'a, Result<u64, CacheError>>;

    /// Removes an unreadable entry if it still holds `bytes`, fencing nothing.
    fn drop_if_same<'a>(&'a self, full: &'a str, bytes: &'a [u8]) -> BoxFuture<'a, Result<(), CacheError>>;

    /// Whether an entry is alive.
    fn exists<'a>(&'a self, full: &'a str) -> BoxFuture<'a, Result<bool, CacheError>>;

    /// How long an entry has left.
    fn ttl<'a>(&'a self, full: &'a str) -> BoxFuture<'a, Result<KeyTtl, CacheError>>;

    /// One page of key names matching `glob` from `cursor`; the next cursor (0: done).
    fn scan_page<'a>(
        &'a self,
        glob: &'a str,
        cursor: u64,
        count: usize,
    ) -> BoxFuture<'a, Result<KeyPage, CacheError>>;

    /// How many keys match `glob`.
    fn count<'a>(&'a self, glob: &'a str) -> BoxFuture<'a, Result<u64, CacheError>>;

    /// Whether the store answers.
    fn ping(&self) -> BoxFuture<'_, Result<(), CacheError>>;

    /// Server facts, for a store that has a server.
    fn server_info(&self) -> BoxFuture<'_, Result<Option<ServerInfo>, CacheError>>;

    /// Connects and checks that every command the cache needs is allowed.
    fn start(&self) -> BoxFuture<'_, Result<(), CacheError>> {
        Box::pin(async { Ok(()) })
    }

    /// Checks that every command the cache needs is allowed.
    fn check_access(&self) -> BoxFuture<'_, Result<(), CacheError>> {
        Box::pin(async { Ok(()) })
    }

    /// Periodic upkeep while the store answers (fence pruning, …).
    fn maintain(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// Reconnects in the background whatever is not connected.
    fn revive(&self) {}

    /// Reads refused for a missing or wrong signature (`sign.rs`).
    fn bad_signatures(&self) -> u64 {
        0
    }

    /// The Redis server behind this store, for what only Redis offers (the
    /// write-behind queue's streams).
    fn redis(&self) -> Option<&crate::redis_store::RedisStore> {
        None
    }

    /// Publishes `message` on the bus's `channel` (`bus.rs`); nowhere to
    /// publish is nothing to do.
    fn publish<'a>(&'a self, channel: &'a str, message: &'a [u8]) -> BoxFuture<'a, Result<(), CacheError>> {
        let _ = (channel, message);
        Box::pin(async { Ok(()) })
    }

    /// A connection of its own subscribed to `channels`.
    fn listen<'a>(&'a self, channels: &'a [&'a str]) -> BoxFuture<'a, Result<Listener, CacheError>> {
        let _ = channels;
        Box::pin(async { Err(CacheError::Unavailable("this store has no bus".into())) })
    }

    /// Takes the fleet lease on `full` for `ttl` (`lease.rs`): whether this
    /// call holds it. A store no other process shares has no fleet to wait for.
    fn acquire_lease<'a>(
        &'a self,
        full: &'a str,
        token: &'a str,
        ttl: Duration,
        purpose: Purpose,
    ) -> BoxFuture<'a, Result<Claim, CacheError>> {
        let _ = (full, token, ttl, purpose);
        Box::pin(async { Ok(Claim::Won) })
    }

    /// Extends a lease this call still holds; whether it did.
    fn renew_lease<'a>(
        &'a self,
        full: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, CacheError>> {
        let _ = (full, token, ttl);
        Box::pin(async { Ok(true) })
    }

    /// Lets a lease go, publishing `message` on `channel` if another instance waits.
    fn release_lease<'a>(
        &'a self,
        full: &'a str,
        token: &'a str,
        channel: &'a str,
        message: &'a [u8],
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        let _ = (full, token, channel, message);
        Box::pin(async { Ok(()) })
    }
}
