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
//! Redis hit about a tenth of its throughput. A watchdog pings, every quarter
//! of the operation timeout, each connection a command is waiting on (in its
//! slot, or retired from it by a reconnect); replies come back in order, so a
//! ping that is not answered within the timeout means no command sent before
//! it will be either. It then stops the connection's driver, which fails every
//! command waiting on it at once. A command on a stalled connection so waits
//! at most the timeout and two watchdog ticks: one and a half times the timeout.
//! The driver stops when its runtime next runs: a connection shared with a
//! runtime that is blocked waits for it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo,
    RedisError, RedisResult,
};
use tokio::task::AbortHandle;
use tracing::instrument::WithSubscriber;

use crate::background::Background;
use crate::config::{CacheConfig, RedisTarget};
use crate::misconfig::Misconfig;
use crate::CacheError;

const MIN_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long after a failed move onto a caller's runtime the next is tried.
const REHOME_RETRY_MS: u64 = 1_000;

struct Live {
    conn: MultiplexedConnection,
    id: u64,
    /// Its driver runs on the cache's own thread rather than a caller's runtime.
    background: bool,
    /// Stops the driver: every command waiting on the connection fails at once.
    driver: AbortHandle,
    /// The watchdog stopped it for not answering: its commands' errors are timeouts.
    stalled: AtomicBool,
}

#[derive(Default)]
struct Slot {
    live: ArcSwapOption<Live>,
    reconnecting: AtomicBool,
    /// Failed attempts of the reconnect under way.
    failed_attempts: AtomicU32,
    /// When a failed move onto a caller's runtime may be tried again, in
    /// milliseconds since `Connections::origin`: not on every lease.
    rehome_after: AtomicU64,
}

pub(crate) struct Connections {
    /// The cache's own runtime (`background.rs`), for connections made where
    /// no caller's runtime is at hand.
    runtime: tokio::runtime::Handle,
    endpoint: Endpoint,
    config: AsyncConnectionConfig,
    /// How long connecting and the handshake may take.
    connect_timeout: Duration,
    /// Where a reconnect refused for its credentials is reported.
    misconfig: Arc<Misconfig>,
    carries: Carries,
    slots: Vec<Slot>,
    /// Connections taken out of their slot (replaced or poisoned) while
    /// commands may still wait on them: watched until the last lease ends.
    retired: Mutex<Vec<Arc<Live>>>,
    origin: Instant,
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
    /// `count` connections to `endpoint`, made on demand. For small
    /// commands, a watchdog on `runtime` stops any of them that does not answer
    /// a ping within the timeout; big ones need a timeout of their own.
    pub(crate) fn new(
        runtime: tokio::runtime::Handle,
        endpoint: Endpoint,
        config: AsyncConnectionConfig,
        connect_timeout: Duration,
        count: usize,
        misconfig: Arc<Misconfig>,
        carries: Carries,
    ) -> Arc<Self> {
        let this = Arc::new_cyclic(|me| Connections {
            runtime,
            endpoint,
            config,
            connect_timeout,
            misconfig,
            carries,
            slots: (0..count.max(1)).map(|_| Slot::default()).collect(),
            retired: Mutex::new(Vec::new()),
            origin: Instant::now(),
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
        let open = self.endpoint.open(self.config.clone(), self.connect_timeout);
        match tokio::time::timeout(self.connect_timeout, open).await {
            Ok(opened) => opened,
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
                    && self.millis() >= self.slots[slot].rehome_after.load(Ordering::Relaxed)
                {
                    // A caller's runtime is at hand: move the driver onto it.
                    self.rehome(slot);
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
        let current = slot.live.load_full();
        let taken = match current {
            Some(live) if live.id == id => {
                let previous = slot.live.compare_and_swap(&Some(live.clone()), None);
                let took = previous.as_ref().is_some_and(|p| Arc::ptr_eq(p, &live));
                drop(previous);
                if took {
                    tracing::debug!(slot = index, "redis connection poisoned: reconnecting");
                    self.retire(live);
                }
                took
            }
            // Another connection already serves the slot: it is not this one's to replace.
            Some(_) => false,
            None => true,
        };
        if taken {
            self.reconnect(index);
        }
    }

    /// The error of a command that failed on one of these connections. Behind
    /// sentinels, READONLY means the master was demoted while connected: the
    /// error then says Redis is unavailable, so that the connection is dropped
    /// and the reconnect asks the sentinels for the new master (the write was
    /// not applied: an invalidation is queued). A standalone replica's READONLY
    /// stays an answer: reconnecting would reach the same replica.
    pub(crate) fn judge(&self, e: RedisError) -> CacheError {
        #[cfg(feature = "sentinel")]
        if self.endpoint.sentinels.is_some()
            && e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        {
            return CacheError::Unavailable(format!(
                "the master was demoted ({e}): reconnecting to the new one"
            ));
        }
        CacheError::from(e)
    }

    /// Changes whenever a connection is made: after it, the server may be another
    /// one (a restart, a failover) than the one the last reply came from.
    pub(crate) fn generation(&self) -> u64 {
        self.ids.load(Ordering::Acquire)
    }

    fn install(&self, slot: usize, (conn, driver): (MultiplexedConnection, AbortHandle), background: bool) {
        let id = self.ids.fetch_add(1, Ordering::AcqRel);
        let live = Live { conn, id, background, driver, stalled: AtomicBool::new(false) };
        if let Some(replaced) = self.slots[slot].live.swap(Some(Arc::new(live))) {
            self.retire(replaced);
        }
    }

    /// Keeps watching a connection out of its slot while commands wait on it.
    /// Only small commands' connections: big values' commands carry their own
    /// timers, and nothing would ever empty the list of theirs.
    fn retire(&self, live: Arc<Live>) {
        if matches!(self.carries, Carries::Small(_)) && Arc::strong_count(&live) > 1 {
            self.retired.lock().unwrap_or_else(|e| e.into_inner()).push(live);
        }
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
        // Made before the task is spawned: a task dropped before its first poll
        // (its runtime shutting down) clears the mark too.
        let done = Reconnecting { me: me.clone(), slot };
        home.spawn(async move {
            let _done = done;
            let Some(this) = me.upgrade() else { return };
            match this.open().await {
                Ok(opened) => this.install(slot, opened, background),
                // The connection it would replace still serves: try again later.
                Err(e) => {
                    tracing::debug!(slot, error = %e, "moving a connection onto the caller's runtime failed");
                    this.slots[slot].rehome_after.store(this.millis() + REHOME_RETRY_MS, Ordering::Relaxed);
                }
            }
        });
    }

    fn millis(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
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
        let done = Reconnecting { me: me.clone(), slot };
        let reconnect = async move {
            let _done = done;
            let mut attempt = 0u32;
            loop {
                // Ends with the cache: only a weak reference is held between attempts.
                let Some(this) = me.upgrade() else { return };
                match this.open().await {
                    Ok(opened) => {
                        this.install(slot, opened, background);
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

/// Clears a slot's `reconnecting` flag when its reconnect ends, however it
/// ends: a task dropped with the runtime it ran on would otherwise leave the
/// slot marked for good, and no later reconnect would start.
struct Reconnecting {
    me: Weak<Connections>,
    slot: usize,
}

impl Drop for Reconnecting {
    fn drop(&mut self) {
        if let Some(this) = self.me.upgrade() {
            this.slots[self.slot].reconnecting.store(false, Ordering::Release);
        }
    }
}

/// Where connections are opened, and how: the server of a URL, or the master
/// the sentinels name at each connect; over TLS when the URL says so.
#[derive(Clone)]
pub(crate) struct Endpoint {
    /// The server and the handshake's settings (credentials, database). With
    /// sentinels its address is unused: the master's is asked at each connect.
    info: ConnectionInfo,
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::Connector>,
    #[cfg(feature = "sentinel")]
    sentinels: Option<Arc<crate::sentinel::Sentinels>>,
}

impl Endpoint {
    /// The endpoint of `url`, with the TLS settings of `config` read (their
    /// files too) when the URL asks for TLS. A URL this build can't serve is a
    /// [`CacheError::Config`] naming the feature to enable.
    pub(crate) fn new(config: &CacheConfig, url: &str) -> Result<Endpoint, CacheError> {
        let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
        let refused = |reason: &str| CacheError::config("url", RedisTarget::url(url), reason);
        let tls = matches!(scheme, "rediss" | "valkeys" | "rediss+sentinel");
        if !tls && (config.tls_ca_cert().is_some() || config.tls_client_cert().is_some()) {
            return Err(refused(
                "TLS settings are given but the URL is not `rediss://`: use `rediss://` to connect over TLS",
            ));
        }
        if cfg!(not(feature = "tls")) && tls {
            return Err(refused(
                "TLS (`rediss://`) is not in this build: enable the `tls` feature of cache-runtime",
            ));
        }
        let sentinel = matches!(scheme, "redis+sentinel" | "rediss+sentinel");
        if cfg!(not(feature = "sentinel")) && sentinel {
            return Err(refused(
                "Sentinel (`redis+sentinel://`) is not in this build: enable the `sentinel` feature of cache-runtime",
            ));
        }
        #[cfg(feature = "sentinel")]
        let (info, sentinels) = if sentinel {
            let (sentinels, info) = crate::sentinel::Sentinels::parse(url)?;
            (info, Some(Arc::new(sentinels)))
        } else {
            (url.into_connection_info()?, None)
        };
        #[cfg(not(feature = "sentinel"))]
        let info = url.into_connection_info()?;
        Ok(Endpoint {
            #[cfg(feature = "tls")]
            tls: if tls {
                let insecure = matches!(info.addr(), ConnectionAddr::TcpTls { insecure: true, .. });
                Some(crate::tls::Connector::new(config, insecure)?)
            } else {
                None
            },
            info,
            #[cfg(feature = "sentinel")]
            sentinels,
        })
    }

    /// Opens a multiplexed connection. Its driver is spawned here rather than by
    /// redis-rs, so that the watchdog holds a handle that stops it. `timeout`
    /// bounds the whole of it; with sentinels, it is shared out among them.
    async fn open(
        &self,
        config: AsyncConnectionConfig,
        timeout: Duration,
    ) -> Result<(MultiplexedConnection, AbortHandle), CacheError> {
        self.open_with(self.info.redis_settings(), config, timeout).await
    }

    /// A connection of its own for the invalidation bus (`bus.rs`): RESP3, so
    /// that SUBSCRIBE leaves it usable for the PINGs that tell a silent
    /// partition, with every message pushed to `push`. Within `timeout`.
    pub(crate) async fn open_listener(
        &self,
        push: tokio::sync::mpsc::UnboundedSender<redis::PushInfo>,
        timeout: Duration,
    ) -> Result<(MultiplexedConnection, AbortHandle), CacheError> {
        let redis = self.info.redis_settings().clone().set_protocol(redis::ProtocolVersion::RESP3);
        let config = AsyncConnectionConfig::new().set_response_timeout(Some(timeout)).set_push_sender(push);
        match tokio::time::timeout(timeout, self.open_with(&redis, config, timeout)).await {
            Ok(opened) => opened,
            Err(_) => Err(CacheError::Timeout(timeout)),
        }
    }

    /// A connection of its own for blocking reads (the write-behind flusher's
    /// `XREADGROUP … BLOCK`): a blocked command holds up every command queued
    /// behind it on its connection, so it never shares the hot ones. It has
    /// no response timeout: its caller times each read by the block it asked
    /// for. To `node` (the master a cluster's MOVED names) when given, else to
    /// the endpoint's server; within `timeout`.
    pub(crate) async fn open_dedicated(
        &self,
        node: Option<(&str, u16)>,
        timeout: Duration,
    ) -> Result<(MultiplexedConnection, AbortHandle), CacheError> {
        let config = AsyncConnectionConfig::new().set_response_timeout(None);
        // RESP2 whatever the URL asks: the stream replies are read as arrays.
        let redis = &self.info.redis_settings().clone().set_protocol(redis::ProtocolVersion::RESP2);
        // A node that announces no address of its own (`MOVED 3999 :6381`) is
        // on the host this endpoint reached.
        let node = node.map(|(host, port)| match (host, self.info.addr()) {
            ("" | "?", ConnectionAddr::Tcp(seed, _)) => (seed.as_str(), port),
            #[cfg(feature = "tls")]
            ("" | "?", ConnectionAddr::TcpTls { host: seed, .. }) => (seed.as_str(), port),
            _ => (host, port),
        });
        let opened = async {
            match node {
                Some((host, port)) => self.open_at(host, port, redis, config).await,
                None => self.open_with(redis, config, timeout).await,
            }
        };
        match tokio::time::timeout(timeout, opened).await {
            Ok(opened) => opened,
            Err(_) => Err(CacheError::Timeout(timeout)),
        }
    }

    async fn open_with(
        &self,
        redis: &RedisConnectionInfo,
        config: AsyncConnectionConfig,
        #[cfg_attr(not(feature = "sentinel"), allow(unused_variables))] timeout: Duration,
    ) -> Result<(MultiplexedConnection, AbortHandle), CacheError> {
        #[cfg(feature = "sentinel")]
        if let Some(sentinels) = &self.sentinels {
            let (host, port) = sentinels.master(self, timeout).await?;
            let opened = self.open_at(&host, port, redis, config).await?;
            sentinels.check_master(&opened.0, &host, port).await?;
            return Ok(opened);
        }
        match self.info.addr() {
            ConnectionAddr::Tcp(host, port) => self.open_at(host, *port, redis, config).await,
            #[cfg(feature = "tls")]
            ConnectionAddr::TcpTls { host, port, .. } => self.open_at(host, *port, redis, config).await,
            #[cfg(unix)]
            ConnectionAddr::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path).await.map_err(RedisError::from)?;
                Ok(handshake(redis, stream, config).await?)
            }
            _ => Err(RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "this build connects to Redis over TCP, TLS and Unix sockets only",
            ))
            .into()),
        }
    }

    /// A connection to `host:port` with the handshake of `redis`, over TLS when
    /// the endpoint's URL asked for it.
    pub(crate) async fn open_at(
        &self,
        host: &str,
        port: u16,
        redis: &RedisConnectionInfo,
        config: AsyncConnectionConfig,
    ) -> Result<(MultiplexedConnection, AbortHandle), CacheError> {
        let stream = tokio::net::TcpStream::connect((host, port)).await.map_err(RedisError::from)?;
        // As redis-rs sets it (off by default): under load, Nagle coalesces
        // the pipelined requests into fewer packets.
        stream.set_nodelay(self.info.tcp_settings().nodelay()).map_err(RedisError::from)?;
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            let stream = tls.connect(host, stream).await?;
            return handshake(redis, stream, config).await.map_err(crate::tls::refused_late);
        }
        Ok(handshake(redis, stream, config).await?)
    }
}

/// The handshake (AUTH, SELECT) over `stream`, and the driver spawned.
async fn handshake<S>(
    redis: &RedisConnectionInfo,
    stream: S,
    config: AsyncConnectionConfig,
) -> RedisResult<(MultiplexedConnection, AbortHandle)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (conn, driver) = MultiplexedConnection::new_with_config(redis, stream, config).await?;
    Ok((conn, tokio::spawn(driver).abort_handle()))
}

/// Every quarter of `timeout`, pings each connection a command is waiting on
/// (a lease is alive: `run` holds one for the whole command), in its slot or
/// retired from it; one whose ping is not answered within `timeout` is
/// stalled: its driver is stopped and its slot reconnects. A request sent just
/// after a look's ping is covered by the next look's, so a stuck command
/// waits at most `timeout` and two ticks.
async fn watchdog(me: Weak<Connections>, timeout: Duration) {
    let mut tick = tokio::time::interval((timeout / 4).max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(this) = me.upgrade() else { return };
        for (index, slot) in this.slots.iter().enumerate() {
            if let Some(live) = slot.live.load_full() {
                // Held by the slot and by `live` here: any more are leases.
                if Arc::strong_count(&live) > 2 {
                    ping(&me, &live, Some(index), timeout);
                }
            }
        }
        let retired: Vec<Arc<Live>> = {
            let mut retired = this.retired.lock().unwrap_or_else(|e| e.into_inner());
            // Held by the list alone: no command waits on it any more.
            retired.retain(|live| Arc::strong_count(live) > 1);
            retired.clone()
        };
        for live in &retired {
            ping(&me, live, None, timeout);
        }
    }
}

/// One watchdog ping of `live`, which sits in `slot` unless it was retired.
fn ping(me: &Weak<Connections>, live: &Arc<Live>, slot: Option<usize>, timeout: Duration) {
    // Only the connection and a weak reference: a ping under way does not
    // count as a lease at the next look.
    let (mut conn, weak, me) = (live.conn.clone(), Arc::downgrade(live), me.clone());
    tokio::spawn(async move {
        let ping = redis::cmd("PING");
        let answered = tokio::time::timeout(timeout, ping.query_async::<()>(&mut conn)).await;
        let Some(live) = weak.upgrade() else { return };
        if answered.is_err() && !live.stalled.swap(true, Ordering::AcqRel) {
            live.driver.abort();
            tracing::debug!(?slot, ?timeout, "redis connection stalled");
            if let (Some(index), Some(this)) = (slot, me.upgrade()) {
                this.poison_slot(index, live.id);
            }
        }
    });
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
    fn a_url_this_build_cant_serve_names_the_feature_to_enable() {
        let config = CacheConfig::default();
        for (url, feature, built) in [
            ("rediss://:hunter2@127.0.0.1:6380/0", "tls", cfg!(feature = "tls")),
            ("redis+sentinel://:hunter2@127.0.0.1:26379/m", "sentinel", cfg!(feature = "sentinel")),
        ] {
            match Endpoint::new(&config, url) {
                // Built in: nothing is refused until a connect finds no server.
                Ok(_) => assert!(built, "{url}"),
                Err(e) => {
                    let message = e.to_string();
                    assert!(!built, "{message}");
                    assert!(
                        message.contains(&format!("enable the `{feature}` feature of cache-runtime")),
                        "{message}"
                    );
                    assert!(!message.contains("hunter2"), "{message}");
                }
            }
        }
    }

    #[test]
    fn tls_settings_with_a_plain_url_are_refused() {
        let config = CacheConfig::builder().tls_ca_cert("ca.pem").build().unwrap();
        let err = Endpoint::new(&config, "redis://127.0.0.1:6379/0").map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("use `rediss://`"), "{err}");
    }

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
