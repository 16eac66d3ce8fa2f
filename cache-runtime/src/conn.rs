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
//!
//! Small commands carry no timer of their own: a timer per command cost a
//! Redis hit about a tenth of its throughput. A watchdog pings every
//! connection used since its last two looks instead; replies come back in
//! order, so a ping that is not answered within the operation timeout means no
//! command sent before it will be either. It then stops the connection's
//! driver, which fails every command waiting on it at once. A command on a
//! stalled connection so waits at most the timeout plus about one watchdog
//! tick (a quarter of the timeout).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, RedisError, RedisResult};
use tokio::task::AbortHandle;
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
    /// Stops the driver: every command waiting on the connection fails at once.
    driver: AbortHandle,
    /// Set by every lease, cleared by every watchdog look: an idle connection is not pinged.
    used: AtomicBool,
    /// Whether the watchdog's previous look found it used. A command leased
    /// just before a look may send its request just after that look's ping:
    /// the next look pings again, so no request goes unwatched.
    used_before: AtomicBool,
    /// A watchdog ping is under way.
    pinging: AtomicBool,
    /// The watchdog stopped it for not answering: its commands' errors are timeouts.
    stalled: AtomicBool,
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
    /// How long connecting and the handshake may take.
    connect_timeout: Duration,
    /// Where a reconnect refused for its credentials is reported.
    misconfig: Arc<Misconfig>,
    carries: Carries,
    slots: Vec<Slot>,
    next: AtomicUsize,
    ids: AtomicU64,
    me: Weak<Connections>,
}

/// What a set of connections carries, which decides where their drivers run.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Carries {
    /// Small commands: drivers on the caller's runtime (no hop between threads
    /// on a hit), bounded by the watchdog with this timeout.
    Small(Duration),
    /// Big values: drivers on the cache's own thread, where parsing megabytes
    /// takes no time from the caller's workers; each command is timed by its caller.
    Big,
}

/// A connection handed to one command, with what is needed to poison it.
pub(crate) struct Lease {
    live: Arc<Live>,
    slot: usize,
}

impl Lease {
    /// A handle on the connection for one command.
    pub(crate) fn conn(&self) -> MultiplexedConnection {
        self.live.conn.clone()
    }

    /// Whether the watchdog stopped the connection for not answering: the
    /// command's error then means it timed out.
    pub(crate) fn stalled(&self) -> bool {
        self.live.stalled.load(Ordering::Acquire)
    }
}

impl Connections {
    /// `count` connections to `client`'s server, made on demand. For small
    /// commands, a watchdog on `runtime` stops any of them that does not answer
    /// a ping within the timeout; big ones need a timeout of their own.
    pub(crate) fn new(
        runtime: tokio::runtime::Handle,
        client: Client,
        config: AsyncConnectionConfig,
        connect_timeout: Duration,
        count: usize,
        misconfig: Arc<Misconfig>,
        carries: Carries,
    ) -> Arc<Self> {
        let this = Arc::new_cyclic(|me| Connections {
            runtime,
            client,
            config,
            connect_timeout,
            misconfig,
            carries,
            slots: (0..count.max(1)).map(|_| Slot::default()).collect(),
            next: AtomicUsize::new(0),
            ids: AtomicU64::new(0),
            me: me.clone(),
        });
        if let Carries::Small(timeout) = carries {
            this.runtime.spawn(watchdog(Arc::downgrade(&this), timeout));
        }
        this
    }

    /// Connects, completes the handshake and starts the driver on the current
    /// runtime, all within the connect timeout.
    async fn open(&self) -> Result<(MultiplexedConnection, AbortHandle), CacheError> {
        let open = open(self.client.get_connection_info(), self.config.clone());
        match tokio::time::timeout(self.connect_timeout, open).await {
            Ok(opened) => Ok(opened?),
            Err(_) => Err(CacheError::Timeout(self.connect_timeout)),
        }
    }

    /// Connects every slot now; an error leaves the slots to the background reconnect.
    pub(crate) async fn connect_all(&self) -> Result<(), CacheError> {
        for i in 0..self.slots.len() {
            let (home, background) = self.home();
            let made = if background {
                let me = self.me.clone();
                let open = async move {
                    match me.upgrade() {
                        Some(this) => this.open().await,
                        None => Err(CacheError::Unavailable("the cache is shutting down".into())),
                    }
                };
                Background::run(&home, open).await?
            } else {
                self.open().await
            };
            match made {
                Ok(opened) => self.install(i, opened, background),
                Err(e) => {
                    self.reconnect(i);
                    return Err(e);
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
        match self.slots[slot].live.load_full() {
            Some(live) => {
                if live.background
                    && matches!(self.carries, Carries::Small(_))
                    && !crate::background::on_own_thread()
                {
                    // A caller's runtime is at hand: move the driver onto it.
                    self.rehome(slot);
                }
                // Read first: under load the flag is already set, and a load
                // leaves the cache line shared between cores.
                if !live.used.load(Ordering::Relaxed) {
                    live.used.store(true, Ordering::Relaxed);
                }
                Ok(Lease { live, slot })
            }
            None => {
                self.reconnect(slot);
                Err(CacheError::Unavailable("reconnecting to Redis".into()))
            }
        }
    }

    /// Drops the leased connection from its slot (if still there) and reconnects.
    pub(crate) fn poison(&self, lease: &Lease) {
        self.poison_slot(lease.slot, lease.live.id);
    }

    fn poison_slot(&self, index: usize, id: u64) {
        let slot = &self.slots[index];
        let current = slot.live.load();
        if current.as_ref().is_some_and(|live| live.id == id) {
            slot.live.compare_and_swap(&*current, None);
            tracing::debug!(slot = index, "redis connection poisoned: reconnecting");
        }
        drop(current);
        self.reconnect(index);
    }

    /// Changes whenever a connection is made: after it, the server may be another
    /// one (a restart, a failover) than the one the last reply came from.
    pub(crate) fn generation(&self) -> u64 {
        self.ids.load(Ordering::Acquire)
    }

    fn install(&self, slot: usize, (conn, driver): (MultiplexedConnection, AbortHandle), background: bool) {
        let id = self.ids.fetch_add(1, Ordering::AcqRel);
        let live = Live {
            conn,
            id,
            background,
            driver,
            used: AtomicBool::new(false),
            used_before: AtomicBool::new(false),
            pinging: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
        };
        self.slots[slot].live.store(Some(Arc::new(live)));
    }

    /// Where a connection made now should live, and whether that is the cache's
    /// own thread. A driver on the caller's runtime answers without a hop
    /// between threads (a Redis hit at concurrency 1 costs ~20 µs less); the
    /// cache's own thread is for when no caller's runtime is at hand, and a
    /// connection made there moves to the first caller's runtime that leases it
    /// (see `lease`), or is replaced when that runtime has gone (see `redis_store.rs`).
    /// Big values always live there.
    fn home(&self) -> (tokio::runtime::Handle, bool) {
        if matches!(self.carries, Carries::Small(_)) && !crate::background::on_own_thread() {
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
            if let Ok(opened) = this.open().await {
                this.install(slot, opened, background);
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
                match this.open().await {
                    Ok(opened) => {
                        this.install(slot, opened, background);
                        this.slots[slot].reconnecting.store(false, Ordering::Release);
                        tracing::info!(slot, attempts = attempt + 1, "reconnected to Redis");
                        return;
                    }
                    Err(e) => {
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

/// Opens a multiplexed connection. Its driver is spawned here rather than by
/// redis-rs, so that the watchdog holds a handle that stops it.
async fn open(
    info: &ConnectionInfo,
    config: AsyncConnectionConfig,
) -> RedisResult<(MultiplexedConnection, AbortHandle)> {
    let redis = info.redis_settings();
    match info.addr() {
        ConnectionAddr::Tcp(host, port) => {
            let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            // As redis-rs sets it (off by default): under load, Nagle coalesces
            // the pipelined requests into fewer packets.
            stream.set_nodelay(info.tcp_settings().nodelay())?;
            let (conn, driver) = MultiplexedConnection::new_with_config(redis, stream, config).await?;
            Ok((conn, tokio::spawn(driver).abort_handle()))
        }
        #[cfg(unix)]
        ConnectionAddr::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path).await?;
            let (conn, driver) = MultiplexedConnection::new_with_config(redis, stream, config).await?;
            Ok((conn, tokio::spawn(driver).abort_handle()))
        }
        _ => Err(RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "this build connects to Redis over TCP and Unix sockets only",
        ))),
    }
}

/// Every quarter of `timeout`, pings each connection used since the last two looks
/// (one ping at a time per connection); one that does not answer within
/// `timeout` is stalled: its driver is stopped and its slot reconnects.
async fn watchdog(me: Weak<Connections>, timeout: Duration) {
    let mut tick = tokio::time::interval((timeout / 4).max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(this) = me.upgrade() else { return };
        for (index, slot) in this.slots.iter().enumerate() {
            let Some(live) = slot.live.load_full() else { continue };
            // A ping under way covers what was sent before it; what was sent
            // after it is left marked for the next look.
            if live.pinging.load(Ordering::Acquire) {
                continue;
            }
            let used = live.used.swap(false, Ordering::Relaxed);
            let used_before = live.used_before.swap(used, Ordering::Relaxed);
            if !(used || used_before) {
                continue;
            }
            live.pinging.store(true, Ordering::Release);
            let me = me.clone();
            tokio::spawn(async move {
                let mut conn = live.conn.clone();
                let ping = redis::cmd("PING");
                let ping = ping.query_async::<()>(&mut conn);
                let answered = tokio::time::timeout(timeout, ping).await;
                live.pinging.store(false, Ordering::Release);
                if answered.is_err() {
                    live.stalled.store(true, Ordering::Release);
                    live.driver.abort();
                    if let Some(this) = me.upgrade() {
                        tracing::debug!(slot = index, ?timeout, "redis connection stalled");
                        this.poison_slot(index, live.id);
                    }
                }
            });
        }
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
