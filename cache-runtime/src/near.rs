//! The near tier: decoded values kept in this process in front of Redis, for
//! the functions and caches that opt in (`near_cache`).
//!
//! It serves only while this instance hears every invalidation: its bus
//! listener (`bus.rs`) is subscribed. Every invalidation this instance makes
//! and every one the bus brings from another instance is applied here, with
//! the local tier's fences, so a fill read before an invalidation is refused
//! even when the message arrives between the read and the fill. When the
//! listener loses its connection, a message may be lost with it: the tier
//! stops serving and forgets everything, and serves again only once a new
//! subscription is confirmed, starting empty.
//!
//! Expiry is local: an entry lives its function's TTL from when this process
//! read it, and at most `near_cache_ttl`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::fence::WINDOW;
use crate::local::{Entry, LocalTier};
use crate::pending::Pending;
use crate::schema::Schema;
use crate::store::FillFence;

pub(crate) struct Near {
    tier: LocalTier,
    listening: AtomicBool,
    max_ttl: Duration,
    /// Hits served here, for `stats` (counted by the engine, once decoded).
    pub(crate) hits: AtomicU64,
}

impl Near {
    pub(crate) fn new(max_entries: u64, max_ttl: Duration, schema: Schema) -> Self {
        Near {
            tier: LocalTier::new(max_entries, schema),
            listening: AtomicBool::new(false),
            max_ttl,
            hits: AtomicU64::new(0),
        }
    }

    /// The entry under `full`, alive at `now`, while this instance hears every invalidation.
    #[inline]
    pub(crate) fn get(&self, full: &str, now: Instant) -> Option<Arc<Entry>> {
        if !self.listening.load(Ordering::Acquire) {
            return None;
        }
        self.tier.get(full, now)
    }

    /// Taken before the Redis read whose value [`fill`](Self::fill) may keep.
    #[inline]
    pub(crate) fn fence(&self, now: Instant) -> FillFence {
        self.tier.fence(now)
    }

    /// Keeps what Redis gave (or took) under `fence`, unless something covering
    /// `full` or one of `tags` was invalidated since, or the listener is not
    /// subscribed. A deafening after the check clears the tier with a stamp
    /// newer than `fence`, so the insert is refused or removed either way.
    pub(crate) fn fill(
        &self,
        full: &str,
        bytes: Vec<u8>,
        ttl: Duration,
        tags: &[String],
        fence: FillFence,
    ) -> bool {
        let FillFence::Local(epoch, taken) = fence else { return false };
        // Older than the window, the stamps it must be checked against may be pruned.
        if !self.listening.load(Ordering::Acquire) || taken.elapsed() > WINDOW {
            return false;
        }
        let ttl = ttl.min(self.max_ttl).saturating_sub(taken.elapsed());
        !ttl.is_zero() && self.tier.set(full, bytes, ttl, tags, Some(epoch), false, None)
    }

    /// Applies an invalidation made here or heard on the bus.
    pub(crate) fn apply(&self, what: &Pending) {
        self.tier.apply(what);
    }

    /// A new subscription is confirmed: whatever was kept may have missed a
    /// message, so the tier starts over, then serves.
    pub(crate) fn listen(&self) {
        self.tier.clear();
        self.listening.store(true, Ordering::Release);
    }

    /// The listener lost its connection: serve nothing, and refuse every fill
    /// that read before now.
    pub(crate) fn deafen(&self) {
        self.listening.store(false, Ordering::Release);
        self.tier.clear();
    }

    /// Forgets everything; every fill in flight is refused.
    pub(crate) fn clear(&self) {
        self.tier.clear();
    }

    pub(crate) fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    pub(crate) fn len(&self) -> u64 {
        self.tier.len()
    }
}
