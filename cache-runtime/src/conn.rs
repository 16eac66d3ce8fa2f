//! Multiplexed Redis connections that are thrown away at the first sign of trouble.
//!
//! A multiplexed connection matches replies to requests by order. After a
//! timeout that order can no longer be trusted (a middlebox may have dropped the
//! request, so the next reply would answer someone else's question), and after
//! an I/O error the socket is gone. Either way the connection is poisoned: it is
//! dropped from its slot, and callers fail fast until a background task has
//! reconnected with jittered exponential backoff. Only a read whose connection
//! failed without a timeout waits, and only for the first reconnect attempt
//! (at most the operation timeout): a driver that died with its runtime is
//! replaced that fast, and a Redis that is down fails that attempt as fast.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client};
use tracing::instrument::WithSubscriber;

use crate::background::Background;
use crate::misconfig::Misconfig;
use crate::CacheError;

const MIN_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

struct Live {
    conn: MultiplexedConnection,
    id: u64,
    /// Its driver runs on the cache's own thread rather than a caller's runtime.
    background: bool,
}

#[derive(Default)]
struct Slot {
    live: ArcSwapOption<Live>,
    reconnecting: AtomicBool,
    /// Failed attempts of the reconnect under way.
    failed_attempts: AtomicU32,
}

pub(crate) struct Connections {
    /// The cache's own runtime (`background.rs`), for connections made where
    /// no caller's runtime is at hand.
    runtime: tokio::runtime::Handle,
    client: Client,
    config: AsyncConnectionConfig,
    /// Where a reconnect refused for its credentials is reported.
    misconfig: Arc<Misconfig>,
    slots: Vec<Slot>,
    next: AtomicUsize,
    ids: AtomicU64,
    me: Weak<Connections>,
}

/// A connection handed to one command, with what is needed to poison it.
pub(crate) struct Lease {
    pub(crate) conn: MultiplexedConnection,
    slot: usize,
    id: u64,
}

impl Connections {
    pub(crate) fn new(
        runtime: tokio::runtime::Handle,
        client: Client,
        config: AsyncConnectionConfig,
        count: usize,
        misconfig: Arc<Misconfig>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Connections {
            runtime,
            client,
            config,
            misconfig,
            slots: (0..count.max(1)).map(|_| Slot::default()).collect(),
            next: AtomicUsize::new(0),
            ids: AtomicU64::new(0),
            me: me.clone(),
        })
    }

    /// Connects every slot now; an error leaves the slots to the background reconnect.
    pub(crate) async fn connect_all(&self) -> Result<(), CacheError> {
        for i in 0..self.slots.len() {
            let (client, config) = (self.client.clone(), self.config.clone());
            let connect = async move { client.get_multiplexed_async_connection_with_config(&config).await };
            let (home, background) = self.home();
            let made = if background { Background::run(&home, connect).await? } else { connect.await };
            match made {
                Ok(conn) => self.install(i, conn, background),
                Err(e) => {
                    self.reconnect(i);
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// Starts reconnecting every slot that has no live connection.
    pub(crate) fn revive(&self) {
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.live.load().is_none() {
                self.reconnect(i);
            }
        }
    }

    /// A live connection, round robin; an error while none is live in the chosen slot.
    #[inline]
    pub(crate) fn lease(&self) -> Result<Lease, CacheError> {
        let slot = if self.slots.len() == 1 {
            0
        } else {
            self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()
        };
        match &*self.slots[slot].live.load() {
            Some(live) => {
                if live.background && !crate::background::on_own_thread() {
                    // A caller's runtime is at hand: move the driver onto it.
                    self.rehome(slot);
                }
                Ok(Lease { conn: live.conn.clone(), slot, id: live.id })
            }
            None => {
                self.reconnect(slot);
                Err(CacheError::Unavailable("reconnecting to Redis".into()))
            }
        }
    }

    /// Drops the leased connection from its slot (if still there) and reconnects.
    pub(crate) fn poison(&self, lease: &Lease) {
        let slot = &self.slots[lease.slot];
        let current = slot.live.load();
        if current.as_ref().is_some_and(|live| live.id == lease.id) {
            slot.live.compare_and_swap(&*current, None);
            tracing::debug!(slot = lease.slot, "redis connection poisoned: reconnecting");
        }
        drop(current);
        self.reconnect(lease.slot);
    }

    /// Changes whenever a connection is made: after it, the server may be another
    /// one (a restart, a failover) than the one the last reply came from.
    pub(crate) fn generation(&self) -> u64 {
        self.ids.load(Ordering::Acquire)
    }

    fn install(&self, slot: usize, conn: MultiplexedConnection, background: bool) {
        let id = self.ids.fetch_add(1, Ordering::AcqRel);
        self.slots[slot].live.store(Some(Arc::new(Live { conn, id, background })));
    }

    /// Where a connection made now should live, and whether that is the cache's
    /// own thread. A driver on the caller's runtime answers without a hop
    /// between threads (a Redis hit at concurrency 1 costs ~20 µs less); the
    /// cache's own thread is for when no caller's runtime is at hand, and a
    /// connection made there moves to the first caller's runtime that leases it
    /// (see `lease`), or is replaced when that runtime has gone (see `redis_store.rs`).
    fn home(&self) -> (tokio::runtime::Handle, bool) {
        if !crate::background::on_own_thread() {
            if let Ok(caller) = tokio::runtime::Handle::try_current() {
                return (caller, false);
            }
        }
        (self.runtime.clone(), true)
    }

    /// Replaces a background-homed connection with one on the caller's runtime,
    /// keeping the old one in service until the new one is ready.
    fn rehome(&self, slot: usize) {
        if self.slots[slot].reconnecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.me.clone();
        let (home, background) = self.home();
        home.spawn(async move {
            let Some(this) = me.upgrade() else { return };
            if let Ok(conn) = this.client.get_multiplexed_async_connection_with_config(&this.config).await {
                this.install(slot, conn, background);
            }
            this.slots[slot].reconnecting.store(false, Ordering::Release);
        });
    }

    /// Waits, at most `timeout`, for the first attempt of the reconnects under
    /// way: whether every slot is live again. A driver that died with the
    /// runtime it ran on is replaced in about a millisecond; a Redis that is
    /// down fails that attempt as fast, so nobody waits out a backoff.
    pub(crate) async fn first_attempt(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.slots.iter().all(|s| s.live.load().is_some()) {
                return true;
            }
            let failed = self.slots.iter().any(|s| s.failed_attempts.load(Ordering::Acquire) > 0);
            if failed || tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn reconnect(&self, slot: usize) {
        if self.slots[slot].reconnecting.swap(true, Ordering::AcqRel) {
            return;
        }
        self.slots[slot].failed_attempts.store(0, Ordering::Release);
        let me = self.me.clone();
        let (home, background) = self.home();
        let reconnect = async move {
            let mut attempt = 0u32;
            loop {
                // Ends with the cache: only a weak reference is held between attempts.
                let Some(this) = me.upgrade() else { return };
                match this.client.get_multiplexed_async_connection_with_config(&this.config).await {
                    Ok(conn) => {
                        this.install(slot, conn, background);
                        this.slots[slot].reconnecting.store(false, Ordering::Release);
                        tracing::info!(slot, attempts = attempt + 1, "reconnected to Redis");
                        return;
                    }
                    Err(e) => {
                        let e = CacheError::from(e);
                        this.misconfig.report(&e);
                        tracing::debug!(slot, attempt, error = %e, "reconnect failed");
                    }
                }
                this.slots[slot].failed_attempts.fetch_add(1, Ordering::AcqRel);
                drop(this);
                tokio::time::sleep(backoff(attempt)).await;
                attempt = attempt.saturating_add(1);
            }
        };
        // Logged where the caller's events go, not only to the global subscriber.
        home.spawn(reconnect.with_current_subscriber());
    }
}

/// Full jitter: uniform in [0, min(MAX, MIN·2^attempt)], so reconnecting clients spread out.
fn backoff(attempt: u32) -> Duration {
    let ceiling = MIN_BACKOFF.saturating_mul(1u32 << attempt.min(16)).min(MAX_BACKOFF);
    ceiling.mul_f64(jitter())
}

fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    // A fresh RandomState is randomly keyed: enough entropy for jitter, no extra dependency.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            let ceiling = MIN_BACKOFF.saturating_mul(1u32 << attempt.min(16)).min(MAX_BACKOFF);
            assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
        }
        let spread: std::collections::HashSet<_> = (0..20).map(|_| backoff(10)).collect();
        assert!(spread.len() > 1, "no jitter");
    }
}
